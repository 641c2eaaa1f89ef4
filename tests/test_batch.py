"""``rerank batch`` / ``rerank_batch.rerank_file`` on the session's local Ray instance.

Scores are compared with ``Reranker.score`` on the same tiny checkpoint (1e-5), for both input
shapes (query rows, pair rows) and both formats (JSONL, Parquet) in and out. Each pipeline run
costs seconds on a loaded 2-core machine, so the runs are shared by module fixtures and asserted
on separately.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rerank_batch import BatchInputError, Columns, ModelOptions, Shape, Workers, rerank_file
from rerank_core import rank_indices
from tests.test_cli import assert_clean_error, cli

pytestmark = pytest.mark.slow

# Logical CPUs only: the session's Ray declares 4 on 2 cores; scoring actors reserve none, so the
# pipeline never waits for resources whatever else the session runs.
WORKERS = Workers(concurrency=1, num_cpus=0, tokenize_cpus=0.5, batch_size=3)
INSTRUCTION = "Given a question about rivers, retrieve passages about geography"

QUERY_ROWS = [
    {"id": 0, "query": "What is machine learning?", "meta": {"split": "dev"},
     "documents": ["Machine learning learns patterns from data.", "The weather is sunny.", "",
                   "Deep learning uses neural networks with many layers."]},
    {"id": 1, "query": "longest river in Africa", "meta": {"split": "test"}, "instruction": INSTRUCTION,
     "documents": ["The Nile flows north through eleven countries.", "Paris is the capital of France."]},
    {"id": 2, "query": "capital of France", "meta": {"split": "dev"}, "instruction": None,
     "documents": ["Paris is the capital and largest city of France."]},
    {"id": 3, "query": "What is machine learning?", "meta": {"split": "dev"},
     "documents": ["A subset of AI.", "Cooking pasta takes ten minutes.", "Statistics on computers."]},
    {"id": 4, "query": "ocean currents", "meta": {"split": "test"},
     "documents": ["Currents move heat around the planet." * 20, "Tides follow the moon.", "x"]},
    {"id": 5, "query": "mountains", "meta": {"split": "dev"}, "documents": ["Everest is the highest."]},
    {"id": 6, "query": "music history", "meta": {"split": "test"}, "instruction": INSTRUCTION,
     "documents": ["Bach wrote fugues.", "Rivers of Europe.", "The Danube.", "Jazz began in New Orleans."]},
]


def pair_rows() -> list[dict]:
    """Several pairs per query, in runs and scattered, with and without an instruction."""
    rows = []
    for q in QUERY_ROWS:
        for d, doc in enumerate(q["documents"]):
            rows.append({"qid": q["id"], "docno": f"d{q['id']}-{d}", "query": q["query"], "document": doc,
                         **({"instruction": q["instruction"]} if q.get("instruction") else {})})
    return rows[::2] + rows[1::2]  # pairs of one query apart, in a fixed order


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    names = list(dict.fromkeys(k for row in rows for k in row))
    pq.write_table(pa.table({n: [row.get(n) for row in rows] for n in names}), path)
    return path


def read_output(directory: Path) -> list[dict]:
    """Every row of an output directory, files in name order."""
    rows = []
    for file in sorted(directory.iterdir()):
        if file.suffix == ".jsonl":
            rows += [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line]
        else:
            assert file.suffix == ".parquet", file
            rows += pq.read_table(file).to_pylist()
    return rows


def close(a, b, tol=1e-5):
    assert len(a) == len(b), (a, b)
    assert max(abs(x - y) for x, y in zip(a, b)) <= tol, (a, b)


@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> ModelOptions:
    return ModelOptions(str(tiny_checkpoint), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def batch_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("batch")


def run(ray_cluster, inputs, output, model, **options):
    return rerank_file(inputs, str(output), model, workers=options.pop("workers", WORKERS), progress=False, **options)


# Both shapes, both formats -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def query_jsonl_run(ray_cluster, batch_dir, model):
    """Query rows in two JSONL files -> JSONL, top_k=2."""
    first = write_jsonl(batch_dir / "queries-a.jsonl", QUERY_ROWS[:4])
    second = write_jsonl(batch_dir / "queries-b.jsonl", QUERY_ROWS[4:])
    result = run(ray_cluster, [str(first), str(second)], batch_dir / "queries-out", model, top_k=2)
    return result, read_output(batch_dir / "queries-out")


@pytest.fixture(scope="module")
def query_parquet_run(ray_cluster, batch_dir, model):
    """Query rows in Parquet -> Parquet (from the output's suffix), all of each ranking."""
    source = write_parquet(batch_dir / "queries.parquet", QUERY_ROWS)
    result = run(ray_cluster, str(source), batch_dir / "scored.parquet", model)
    return result, read_output(batch_dir / "scored.parquet")


@pytest.fixture(scope="module")
def pair_jsonl_run(ray_cluster, batch_dir, model):
    """Pair rows in JSONL -> Parquet."""
    source = write_jsonl(batch_dir / "pairs.jsonl", pair_rows())
    result = run(ray_cluster, str(source), batch_dir / "pairs-out", model, output_format="parquet")
    return result, read_output(batch_dir / "pairs-out")


@pytest.fixture(scope="module")
def pair_parquet_run(ray_cluster, batch_dir, model):
    """Pair rows in Parquet with renamed columns -> JSONL."""
    renamed = [{"q": r["query"], "passage": r["document"], "task": r.get("instruction"), "docno": r["docno"]}
               for r in pair_rows()]
    source = write_parquet(batch_dir / "renamed.parquet", renamed)
    columns = Columns(query="q", document="passage", instruction="task")
    result = run(ray_cluster, str(source), batch_dir / "renamed-out", model, columns=columns, output_format="jsonl")
    return result, read_output(batch_dir / "renamed-out")


def expected_query_scores(reranker, row):
    return reranker.score(row["query"], row["documents"], row.get("instruction"))


@pytest.mark.parametrize("run_name", ["query_jsonl_run", "query_parquet_run"])
def test_query_rows_get_the_engines_scores_and_ranking(run_name, request, reranker):
    result, rows = request.getfixturevalue(run_name)
    assert result.shape is Shape.QUERIES
    top_k = 2 if run_name == "query_jsonl_run" else None
    assert [r["id"] for r in rows] == [r["id"] for r in QUERY_ROWS]  # input order
    for source, out in zip(QUERY_ROWS, rows):
        expected = expected_query_scores(reranker, source)
        close(out["scores"], expected)
        assert out["ranking"] == rank_indices(out["scores"], top_k)
        assert out["ranking"] == rank_indices(expected, top_k)
        # every input column comes back unchanged
        for name, value in source.items():
            assert out.get(name) == value, (name, out)


def test_query_rows_output_columns_are_the_inputs_plus_scores_and_ranking(query_parquet_run, query_jsonl_run):
    _, rows = query_parquet_run
    assert list(rows[0]) == ["id", "query", "meta", "documents", "instruction", "scores", "ranking"]
    result, rows = query_jsonl_run
    assert {"scores", "ranking"} <= set(rows[0]) and len(rows[0]) == 7
    assert [Path(f).name for f in result.files] == sorted(Path(f).name for f in result.files)
    assert all(Path(f).name.startswith("part-") and f.endswith(".jsonl") for f in result.files)


@pytest.mark.parametrize("run_name", ["pair_jsonl_run", "pair_parquet_run"])
def test_pair_rows_get_the_engines_score(run_name, request, reranker):
    result, rows = request.getfixturevalue(run_name)
    assert result.shape is Shape.PAIRS
    expected_rows = pair_rows()
    assert [r["docno"] for r in rows] == [r["docno"] for r in expected_rows]
    expected = [reranker.score(r["query"], [r["document"]], r.get("instruction"))[0] for r in expected_rows]
    close([r["scores"] for r in rows], expected)
    assert all("ranking" not in r for r in rows)


def test_pair_rows_keep_their_columns(pair_jsonl_run, pair_parquet_run):
    _, rows = pair_jsonl_run
    assert set(rows[0]) == {"qid", "docno", "query", "document", "instruction", "scores"}
    assert rows[0]["qid"] == pair_rows()[0]["qid"]
    result, rows = pair_parquet_run
    assert list(rows[0]) == ["q", "passage", "task", "docno", "scores"]
    assert result.output_format == "jsonl"


# Pairs of one query share their prefix -----------------------------------------------------------


def test_pairs_of_one_query_are_scored_as_one_query(tiny_checkpoint, model, reranker):
    """Within a batch, pair rows of one query and instruction reach the engine as one query with
    all their documents (one shared prefix), and each row still gets its own score."""
    from rerank_batch.columns import FILE_COLUMN, ROW_COLUMN
    from rerank_batch.stages import Score, tokenize

    rows = pair_rows()[:10]
    table = pa.table({
        "query": [r["query"] for r in rows], "document": [r["document"] for r in rows],
        "instruction": [r.get("instruction") for r in rows],
        FILE_COLUMN: ["pairs.jsonl"] * len(rows), ROW_COLUMN: list(range(1, len(rows) + 1)),
    })
    encoded = tokenize(table, model, Columns(), Shape.PAIRS, "line")
    scorer = Score(model, Shape.PAIRS, top_k=None, chunk_passes=4)
    calls = []
    score_encoded = scorer.reranker.score_encoded
    scorer.reranker.score_encoded = lambda queries: calls.append(queries) or score_encoded(queries)
    out = scorer(encoded)

    distinct = {(r["query"], r.get("instruction")) for r in rows}
    assert sum(len(queries) for queries in calls) == len(distinct) < len(rows)
    assert sum(len(q.documents) for queries in calls for q in queries) == len(rows)
    expected = [reranker.score(r["query"], [r["document"]], r.get("instruction"))[0] for r in rows]
    close(out.column("scores").to_pylist(), expected)
    assert out.column_names == ["query", "document", "instruction", "scores"]


def test_chunks_follow_the_token_budget(model):
    from rerank_batch.stages import Score

    scorer = Score.__new__(Score)
    scorer.chunk_tokens = 100
    groups = {(1,) * 10: [0], (2,) * 10: [1, 2], (3,) * 10: [3]}
    docs = [[[0] * 30], [[0] * 20], [[0] * 20], [[0] * 200]]
    chunks = scorer._chunks(groups, docs)
    # 40 + 50 fit in 100; the 210-token group goes alone rather than being split.
    assert [[rows for _, rows in chunk] for chunk in chunks] == [[[0], [1, 2]], [[3]]]


# A scoring actor that dies -----------------------------------------------------------------------


@pytest.mark.timeout(1800)  # two model loads and a restart: minutes on a loaded 2-core machine
def test_a_killed_scoring_actor_is_replaced_and_every_row_is_written(ray_cluster, batch_dir, model, reranker):
    """SIGKILL the scoring actor's process mid-run: Ray restarts it, Ray Data sends its batches
    again, and the output is complete and exact."""
    import signal
    import threading
    import time

    # ray.util.state needs the dashboard, which the session's Ray runs without; the GCS table
    # behind it is read directly.
    from ray._private.state import actors

    # Enough rows that the run is still scoring when the actor is killed, also on an idle machine
    # (with 60 the pipeline could finish between two polls, and the kill then hit nothing).
    total = 400
    rows = [{"n": i, "query": f"query {i % 4}", "document": f"document number {i} " * (1 + i % 5)} for i in range(total)]
    source = write_jsonl(batch_dir / "fault.jsonl", rows)
    output = batch_dir / "fault-out"
    outcome: dict = {}
    workers = Workers(concurrency=1, num_cpus=0, tokenize_cpus=0.5, batch_size=2)
    thread = threading.Thread(target=lambda: outcome.update(
        result=run(ray_cluster, str(source), output, model, workers=workers)), daemon=True)

    def scorers() -> dict[str, dict]:
        return {actor_id: info for actor_id, info in actors().items()
                if info["ActorClassName"] == "MapWorker(MapBatches(Score))" and info["State"] == "ALIVE"}

    before = set(scorers())
    thread.start()
    deadline = time.monotonic() + 1200
    victim = None
    while victim is None and time.monotonic() < deadline and thread.is_alive():
        victim = next((actor_id for actor_id, info in scorers().items() if actor_id not in before and info["Pid"]), None)
        time.sleep(0.1)
    assert victim is not None, "the scoring actor never started"
    os.kill(actors()[victim]["Pid"], signal.SIGKILL)
    thread.join(timeout=1200)
    assert not thread.is_alive() and "result" in outcome
    assert actors()[victim]["NumRestarts"] >= 1
    out = read_output(output)
    assert [r["n"] for r in out] == list(range(total))
    expected = [reranker.score(r["query"], [r["document"]])[0] for r in rows]
    close([r["scores"] for r in out], expected)


# Errors --------------------------------------------------------------------------------------------


def test_a_missing_column_is_named_before_any_work(ray_cluster, batch_dir, model):
    source = write_jsonl(batch_dir / "no-docs.jsonl", [{"query": "q", "text": "t"}])
    with pytest.raises(BatchInputError, match=r"no-docs.jsonl: no column 'documents' .* or 'document' .*'text'"):
        run(ray_cluster, str(source), batch_dir / "never", model)
    source = write_jsonl(batch_dir / "no-query.jsonl", [{"question": "q", "documents": ["d"]}])
    with pytest.raises(BatchInputError, match=r"no-query.jsonl: no column 'query'"):
        run(ray_cluster, str(source), batch_dir / "never", model)
    assert not (batch_dir / "never").exists()


def test_malformed_lines_are_named(ray_cluster, batch_dir, model):
    source = batch_dir / "broken.jsonl"
    source.write_text('{"query": "q", "documents": ["a"]}\n\n{"query": "q", "documents": [\n', encoding="utf-8")
    with pytest.raises(BatchInputError, match=r"broken.jsonl line 3: not valid JSON"):
        run(ray_cluster, str(source), batch_dir / "never", model)
    source.write_text('{"query": "q", "documents": ["a"]}\n["not", "an", "object"]\n', encoding="utf-8")
    with pytest.raises(BatchInputError, match=r"broken.jsonl line 2: expected a JSON object, got list"):
        run(ray_cluster, str(source), batch_dir / "never", model)
    source.write_text('{"query": "q", "documents": ["a"]}\n{"query": "q", "documents": "a"}\n', encoding="utf-8")
    with pytest.raises(BatchInputError, match=r"broken.jsonl line 2: column 'documents' holds a string, but line 1"):
        run(ray_cluster, str(source), batch_dir / "never", model)


def test_a_bad_row_deep_in_the_input_fails_the_run_and_leaves_no_output(ray_cluster, batch_dir, model):
    """Found by a tokenize task after other batches were scored and written: the error names the
    row, and what was written is deleted."""
    rows = [{"query": f"query {i}", "document": f"document {i}"} for i in range(40)]
    rows[33]["document"] = None
    source = write_jsonl(batch_dir / "late-error.jsonl", rows)
    output = batch_dir / "late-error-out"
    with pytest.raises(BatchInputError, match=r"late-error.jsonl line 34: 'document' must be a string, got null"):
        run(ray_cluster, str(source), output, model)
    assert not output.exists()


def test_parquet_rows_are_named_by_number(ray_cluster, batch_dir, model):
    rows = [{"query": "q", "documents": ["a"]}, {"query": "q", "documents": []}]
    source = write_parquet(batch_dir / "empty-docs.parquet", rows)
    with pytest.raises(BatchInputError, match=r"empty-docs.parquet row 2: 'documents' must be a non-empty list"):
        run(ray_cluster, str(source), batch_dir / "never", model)


def test_an_input_with_a_scores_column_is_refused(ray_cluster, batch_dir, model):
    source = write_jsonl(batch_dir / "rescored.jsonl", [{"query": "q", "document": "d", "scores": 0.5}])
    with pytest.raises(BatchInputError, match=r"has a column 'scores', which the output adds"):
        run(ray_cluster, str(source), batch_dir / "never", model)


def test_an_existing_output_is_refused_unless_overwrite(ray_cluster, batch_dir, model):
    source = write_jsonl(batch_dir / "small.jsonl", QUERY_ROWS[:1])
    output = batch_dir / "existing"
    output.mkdir()
    (output / "stale.jsonl").write_text("{}\n")
    with pytest.raises(BatchInputError, match=r"existing already exists; remove it or pass --overwrite"):
        run(ray_cluster, str(source), output, model)
    assert (output / "stale.jsonl").exists()
    run(ray_cluster, str(source), output, model, overwrite=True)
    assert [p.name for p in output.iterdir()] != ["stale.jsonl"] and not (output / "stale.jsonl").exists()
    assert [r["id"] for r in read_output(output)] == [0]


def test_unknown_formats_are_refused(ray_cluster, batch_dir, model):
    source = batch_dir / "rows.csv"
    source.write_text("query,document\nq,d\n")
    with pytest.raises(BatchInputError, match=r"cannot tell the format of .*rows.csv"):
        run(ray_cluster, str(source), batch_dir / "never", model)


def test_workers_validate_their_settings():
    with pytest.raises(ValueError, match="concurrency"):
        Workers(concurrency=0)
    with pytest.raises(ValueError, match="num_cpus must be >= 0"):
        Workers(num_cpus=-1)


# The console script ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_address(ray_cluster) -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def test_cli_scores_a_file_on_the_running_cluster(ray_address, batch_dir, tiny_checkpoint, reranker):
    source = write_jsonl(batch_dir / "cli.jsonl",
                         [{"question": r["query"], "docs": r["documents"], "id": r["id"]} for r in QUERY_ROWS[:3]])
    output = batch_dir / "cli-out"
    result = cli("batch", source, "-o", output, "-m", tiny_checkpoint, "--device", "cpu", "--dtype", "float32",
                 "--query-column", "question", "--documents-column", "docs", "--top-k", "1",
                 "--num-cpus", "0", "--tokenize-cpus", "0.5", "--address", ray_address, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stdout.strip().startswith(f"rerank: wrote {output} (")
    rows = read_output(output)
    assert [r["id"] for r in rows] == [0, 1, 2]
    for source_row, out in zip(QUERY_ROWS, rows):
        expected = expected_query_scores(reranker, {**source_row, "instruction": None})
        close(out["scores"], expected)
        assert out["ranking"] == rank_indices(expected, 1)


def test_cli_bad_input_exits_2_with_one_error_line(ray_address, batch_dir, tiny_checkpoint):
    source = write_jsonl(batch_dir / "cli-bad.jsonl", [{"query": "q", "documents": ["a"]}, {"query": " ", "documents": ["b"]}])
    result = cli("batch", source, "-o", batch_dir / "cli-bad-out", "-m", tiny_checkpoint, "--device", "cpu",
                 "--num-cpus", "0", "--address", ray_address, "--no-progress")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"rerank: error: {source} line 2: 'query' must be a non-empty string, got \" \""
    )
    assert not (batch_dir / "cli-bad-out").exists()


def test_cli_usage_errors_come_before_ray_starts(batch_dir):
    existing = batch_dir / "cli-existing"
    existing.mkdir()
    source = write_jsonl(batch_dir / "cli-small.jsonl", QUERY_ROWS[:1])
    assert_clean_error(cli("batch", source, "-o", existing), 2, "already exists", "--overwrite")
    assert_clean_error(cli("batch", source), 2, "-o/--output")
    assert_clean_error(cli("batch", source, "-o", batch_dir / "x", "--num-cpus", "-1"), 2, "--num-cpus")


def test_cli_unknown_model_exits_1(ray_address, batch_dir):
    source = write_jsonl(batch_dir / "cli-model.jsonl", QUERY_ROWS[:1])
    result = cli("batch", source, "-o", batch_dir / "cli-model-out", "-m", batch_dir / "no-such-model",
                 "--address", ray_address, "--no-progress")
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("rerank: error: ")
    assert "no-such-model" in result.stderr.strip().splitlines()[-1]
    assert not (batch_dir / "cli-model-out").exists()
