"""The ``rerank`` console script, run as users run it: the installed script, in a subprocess.

Subprocesses that load the model cost seconds each (torch + transformers imports), so the
``rerank run`` checks share two invocations (module fixtures) and assert on them separately.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from rerank_cli.inputs import parse_inputs
from rerank_cli.output import clip

RERANK = Path(sys.executable).parent / "rerank"  # the console script pip installed into the venv
REPO = Path(__file__).resolve().parent.parent

SEED_QUERY = "What is machine learning?"
SEED_DOCS = [
    "Machine learning is a subset of AI that learns patterns from data and improves with experience.",
    "The weather today is sunny with a light breeze.",
    "Deep learning uses neural networks with many layers.",
]
INSTRUCTION = "Given a question about rivers, retrieve passages about geography"


@pytest.fixture(scope="module")
def reranker(tiny_checkpoint):
    """The engine as ``rerank run`` loads it: default dtype (``auto``: bf16 on CPUs that multiply
    it natively, float32 elsewhere), decoder layers eager (no ``--compile``)."""
    from rerank_core import EngineConfig, Reranker

    return Reranker.load(str(tiny_checkpoint), device="cpu", config=EngineConfig(compile_layers=False))


@pytest.fixture(scope="module")
def served_engine(tiny_checkpoint):
    """The engine as ``rerank serve``'s replica loads it: default dtype and settings (in bf16 on
    CPU, decoder layers compiled)."""
    from rerank_core import Reranker

    return Reranker.load(str(tiny_checkpoint), device="cpu")


def cli(*args, env: dict | None = None, cwd=None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the installed ``rerank`` script; no hub is reachable, so hub clients are kept offline."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RERANK_CACHE_DIR", "RERANK_HUB")}
    full_env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    full_env.update(env or {})
    return subprocess.run(
        [str(RERANK), *map(str, args)], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout
    )


def assert_clean_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """Exit ``code``, exactly one line on stderr starting ``rerank: error:``, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rerank: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def close(a, b, tol=1e-5):
    assert len(a) == len(b)
    assert max(abs(x - y) for x, y in zip(a, b)) <= tol, (a, b)


def ranked(scores, top_k=None):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order if top_k is None else order[:top_k]


def test_the_console_script_is_installed():
    assert RERANK.is_file(), f"{RERANK} missing: pip install -e '.[test]'"


# Help, imports -------------------------------------------------------------------------------


def test_help_describes_every_command_and_option():
    expected = {
        (): ["run", "list", "download", "serve", "batch", "exit status", "ONEDNN_MAX_CPU_ISA",
             # The defaults each kind of device gets (tests/test_cpu.py checks the choices themselves).
             "x86 CPU with AMX or AVX512-BF16", "bfloat16, packed passes, compiled layers",
             "other x86 CPUs (AVX2", "float32 (bf16 is emulated there", "CUDA GPU: bfloat16, packed varlen"],
        ("run",): ["--model", "--input", "query:", "file://", ".txt", ".jsonl", "--top-k", "--instruction",
                   "--max-length", "--max-chunks", "--device", "--dtype", "--hub", "--cache-dir", "--json", "--output",
                   "--no-progress", "qwen3-reranker-0.6b"],
        ("list",): ["--cache-dir", "--json"],
        ("download",): ["MODEL", "--hub", "--cache-dir"],
        ("serve",): ["CONFIG", "--model", "--hub", "--cache-dir", "--port", "--host", "--address", "serve-cpu.yaml"],
        ("batch",): ["INPUT", "--output", "--model", "--top-k", "--overwrite", "--input-format", "--output-format",
                     "--query-column", "--documents-column", "--document-column", "--instruction-column",
                     "--concurrency", "--num-cpus", "--num-gpus", "--tokenize-cpus", "--batch-size",
                     "--max-batch-tokens", "--max-batch-pairs", "--address", "--no-progress", "ray job submit"],
    }
    for command, words in expected.items():
        result = cli(*command, "--help")
        assert result.returncode == 0, result.stderr
        for word in words:
            assert word in result.stdout, (command, word)


def test_help_and_list_import_neither_torch_nor_transformers_nor_ray_nor_the_network():
    code = """
import socket, sys
def offline(*args, **kwargs):
    raise OSError("network access attempted")
socket.socket.connect = socket.create_connection = socket.getaddrinfo = offline
from rerank_cli.main import main
for args in (["--help"], ["batch", "--help"]):
    try:
        main(args)
    except SystemExit:
        pass
assert main(["list"]) == 0
assert main(["list", "--json"]) == 0
heavy = sorted(m for m in ("torch", "transformers", "rerank_core.reranker", "ray") if m in sys.modules)
assert not heavy, heavy
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "qwen3-reranker-8b" in result.stdout


def test_module_entry_point_works_too():
    result = subprocess.run([sys.executable, "-m", "rerank_cli.main", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: rerank" in result.stdout


def test_dtype_choices_match_the_engine():
    from rerank_cli.main import DTYPES
    from rerank_core.config import DTYPES as ENGINE_DTYPES
    from rerank_core.config import QUANTIZED_DTYPES

    assert set(DTYPES) == {"auto", *ENGINE_DTYPES, *QUANTIZED_DTYPES}


# rerank run: the seed example ------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_run(tiny_checkpoint, tmp_path_factory):
    """``rerank run`` with -i inputs, the table on stdout and -o FILE, run once."""
    out = tmp_path_factory.mktemp("seed") / "ranking.json"
    args = ["run", "-m", tiny_checkpoint, "-i", f"query: {SEED_QUERY}  ", *[a for d in SEED_DOCS for a in ("-i", d)]]
    result = cli(*args, "-o", out)
    assert result.returncode == 0, result.stderr
    return result, json.loads(out.read_text(encoding="utf-8"))


def test_seed_example_prints_a_table_ranked_like_the_engine(seed_run, reranker):
    result, _ = seed_run
    scores = reranker.score(SEED_QUERY, SEED_DOCS)
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "index", "document"]
    assert len(lines) == 1 + len(SEED_DOCS)
    for rank, (line, index) in enumerate(zip(lines[1:], ranked(scores)), start=1):
        cells = line.split(maxsplit=3)
        assert cells[:3] == [str(rank), f"{scores[index]:.4f}", str(index)], line
        assert cells[3] == clip(SEED_DOCS[index])
    long_doc = next(line for line in lines if "Machine learning" in line)
    assert long_doc.endswith("…") and len(long_doc.split(maxsplit=3)[3]) <= 60
    assert result.stderr == ""  # no progress bar for 3 documents, no library noise


def assert_seed_response(body: dict, reranker) -> None:
    """``body`` ranks the seed example with documents, as the engine does, with its token usage."""
    expected = reranker.rank(SEED_QUERY, SEED_DOCS, return_documents=True)
    assert [r["index"] for r in body["results"]] == [r.index for r in expected]
    close([r["relevance_score"] for r in body["results"]], [r.relevance_score for r in expected])
    assert [r["document"] for r in body["results"]] == [r.document for r in expected]
    tokens = reranker.encode(SEED_QUERY, SEED_DOCS).num_tokens()
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_output_file_holds_the_rerank_response_with_engine_scores(seed_run, reranker, tiny_checkpoint):
    _, body = seed_run
    assert set(body) == {"id", "model", "results", "usage"}
    assert body["id"].startswith("rerank-") and body["model"] == str(tiny_checkpoint)
    assert_seed_response(body, reranker)


def test_json_with_output_writes_the_file_only(tiny_checkpoint, reranker, tmp_path):
    """``--json -o FILE``: the body goes to FILE, not to stdout as well (without -o, stdout gets it)."""
    out = tmp_path / "ranking.json"
    result = cli("run", "-m", tiny_checkpoint, "-i", f"query: {SEED_QUERY}", *[a for d in SEED_DOCS for a in ("-i", d)],
                 "--json", "-o", out)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
    assert_seed_response(json.loads(out.read_text(encoding="utf-8")), reranker)


# rerank run: files, --json, --top-k, --instruction, progress --------------------------------------


@pytest.fixture(scope="module")
def files_run(tiny_checkpoint, tmp_path_factory):
    """Every file format at once, the query from a .json file, > 64 documents, run once.

    Returns the process, its parsed --json stdout, and the documents in the order given.
    """
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "query.json").write_text(json.dumps({"query": "  Which rivers flow into the sea?", "documents": [
        "The Nile flows into the Mediterranean Sea.", {"text": "Mountains are high."}]}))
    lines = [f"passage {i}: " + ("the river meets the sea" if i % 3 == 0 else "a quiet mountain village") for i in range(60)]
    (folder / "docs.txt").write_text("\n".join(lines[:30]) + "\n\n   \n" + "\n".join(lines[30:]) + "\n")
    (folder / "list.json").write_text(json.dumps(["Rhine delta 🌊", {"text": "北京是中国的首都。"}], ensure_ascii=False))
    (folder / "docs.jsonl").write_text('"The Amazon carries more water than any other river."\n\n{"text": "Cats sleep a lot."}\n')
    documents = [
        "The Nile flows into the Mediterranean Sea.", "Mountains are high.", *lines,
        "Rhine delta 🌊", "北京是中国的首都。",
        "The Amazon carries more water than any other river.", "Cats sleep a lot.",
        "An inline document next to the files.",
    ]
    result = cli(
        "run", "--model", tiny_checkpoint, "--json", "--top-k", 5, "--instruction", INSTRUCTION,
        "-i", "file://query.json", "-i", "file://docs.txt", "-i", f"file://{folder / 'list.json'}",
        "-i", "file://docs.jsonl", "-i", "An inline document next to the files.",
        cwd=folder,
    )
    assert result.returncode == 0, result.stderr
    return result, json.loads(result.stdout), documents


def test_files_give_the_query_and_documents_in_order(files_run):
    _, body, documents = files_run
    assert len(documents) == 67
    for r in body["results"]:
        assert r["document"] == documents[r["index"]]


def test_top_k_and_instruction_match_the_engine(files_run, reranker):
    _, body, documents = files_run
    query = "Which rivers flow into the sea?"
    expected = reranker.rank(query, documents, top_k=5, instruction=INSTRUCTION)
    assert [r["index"] for r in body["results"]] == [r.index for r in expected]
    close([r["relevance_score"] for r in body["results"]], [r.relevance_score for r in expected])
    default = reranker.score(query, documents)
    assert max(abs(r["relevance_score"] - default[r["index"]]) for r in body["results"]) > 1e-3
    tokens = reranker.encode(query, documents, INSTRUCTION).num_tokens()
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_max_chunks_scores_long_documents_by_their_best_window(tiny_checkpoint):
    from rerank_core import Reranker
    from tests.test_windows import LONG, SHORT

    result = cli("run", "--model", tiny_checkpoint, "--dtype", "float32", "--json", "--max-length", 160, "--max-chunks", 3,
                 "-i", "query: Which river runs through town 91?", "-i", LONG, "-i", SHORT)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    engine = Reranker.load(str(tiny_checkpoint), device="cpu", dtype="float32", max_length=160)
    query = "Which river runs through town 91?"
    expected = engine.score_windowed(engine.encode_windows(query, [LONG, SHORT], max_chunks_per_doc=3))
    assert expected.windows == [3, 1]
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    close([got[0], got[1]], expected.scores())
    assert body["usage"]["prompt_tokens"] == expected.tokens


def test_no_progress_bar_when_stderr_is_not_a_terminal(files_run):
    result, _, _ = files_run
    assert result.stderr == ""  # 67 documents, but stderr is a pipe: no bar, no `\r` frames


def test_run_compiles_the_layers_only_when_asked(tiny_checkpoint):
    # In bf16 the compiled layers round differently from the eager ones (tests/test_compiled.py),
    # so the scores tell which path the console script took.
    from rerank_core import EngineConfig, Reranker

    def scores(*flags):
        result = cli("run", "-m", tiny_checkpoint, "--dtype", "bfloat16", "--json", *flags,
                     *(a for d in SEED_DOCS for a in ("-i", d)), "-i", f"query: {SEED_QUERY}")
        assert result.returncode == 0, result.stderr
        ranked_ = json.loads(result.stdout)["results"]
        return [r["relevance_score"] for r in sorted(ranked_, key=lambda r: r["index"])]

    eager = Reranker.load(str(tiny_checkpoint), device="cpu", dtype="bfloat16", config=EngineConfig(compile_layers=False))
    compiled = Reranker.load(
        str(tiny_checkpoint), device="cpu", dtype="bfloat16", config=EngineConfig(compile_layers=True)
    )
    expected_eager, expected_compiled = eager.score(SEED_QUERY, SEED_DOCS), compiled.score(SEED_QUERY, SEED_DOCS)
    close(scores(), expected_eager, tol=1e-6)
    if compiled.compiled_layers:  # a machine without a C++ compiler runs eagerly either way
        assert expected_eager != expected_compiled
        close(scores("--compile"), expected_compiled, tol=1e-6)


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_many_documents_show_a_progress_bar_on_a_terminal(tiny_checkpoint, tmp_path):
    (tmp_path / "docs.txt").write_text("".join(f"document {i}\n" for i in range(65)))
    import fcntl
    import struct
    import termios

    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RERANK_CACHE_DIR", "RERANK_HUB")}
        result = subprocess.run([str(RERANK), "run", "-m", str(tiny_checkpoint), "-i", "query: q", "-i",
                                 f"file://{tmp_path / 'docs.txt'}", "--top-k", "1"],
                                stdout=subprocess.PIPE, stderr=terminal, env=env, timeout=180)
        os.close(terminal)
        terminal = None
        written = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: everything the process wrote has been read
                break
            if not chunk:
                break
            written += chunk
    finally:
        if terminal is not None:
            os.close(terminal)
        os.close(controller)
    assert result.returncode == 0, written
    text = written.decode()
    assert "\r" in text and "65/65" in text, text
    assert len(result.stdout.decode().strip().splitlines()) == 2  # the table: header and the best document


# rerank run: bad input ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "broken.json").write_text('{"query": "q", "documents": [')
    (folder / "numbers.json").write_text("[1, 2]")
    (folder / "shape.json").write_text('{"docs": ["a"]}')
    (folder / "broken.jsonl").write_text('"fine"\n{"text": 3}\n')
    (folder / "binary.txt").write_bytes(b"\xff\xfe\x00")
    (folder / "docs.csv").write_text("a,b\n")
    (folder / "empty.txt").write_text("\n  \n")
    (folder / "a.json").write_text('{"query": "one", "documents": ["x"]}')
    (folder / "b.json").write_text('{"query": "two", "documents": ["y"]}')
    (folder / "no-checkpoint").mkdir()
    return folder


BAD_RUNS = {
    "no query": (["-i", "a document"], 2, "no query"),
    "no documents": (["-i", "query: q"], 2, "no documents"),
    "no inputs": ([], 2, "no query"),
    "blank query": (["-i", "query:   ", "-i", "d"], 2, "query is empty"),
    "only an empty file": (["-i", "query: q", "-i", "file://empty.txt"], 2, "no documents"),
    "missing file": (["-i", "query: q", "-i", "file://missing.txt"], 2, "cannot read missing.txt"),
    "invalid json": (["-i", "query: q", "-i", "file://broken.json"], 2, "broken.json is not valid JSON"),
    "json of numbers": (["-i", "query: q", "-i", "file://numbers.json"], 2, "item 0"),
    "json object without documents": (["-i", "query: q", "-i", "file://shape.json"], 2, "shape.json"),
    "bad jsonl line": (["-i", "query: q", "-i", "file://broken.jsonl"], 2, "broken.jsonl:2"),
    "not utf-8": (["-i", "query: q", "-i", "file://binary.txt"], 2, "not UTF-8"),
    "unsupported file type": (["-i", "query: q", "-i", "file://docs.csv"], 2, "unsupported file type '.csv'"),
    "conflicting file queries": (["-i", "file://a.json", "-i", "file://b.json"], 2, "different queries"),
    "top-k zero": (["-i", "query: q", "-i", "d", "--top-k", "0"], 2, "--top-k"),
    "top-k not a number": (["-i", "query: q", "-i", "d", "--top-k", "three"], 2, "--top-k"),
    "max-chunks zero": (["-i", "query: q", "-i", "d", "--max-chunks", "0"], 2, "--max-chunks"),
    "blank instruction": (["-i", "query: q", "-i", "d", "--instruction", " "], 2, "--instruction"),
    "unknown dtype": (["-i", "query: q", "-i", "d", "--dtype", "float8"], 2, "--dtype"),
    "unknown option": (["-i", "query: q", "-i", "d", "--fast"], 2, "--fast"),
    "unknown model": (["-i", "query: q", "-i", "d", "-m", "qwen3-reranker-13b"], 1, "unknown model source"),
    "directory without checkpoint": (["-i", "query: q", "-i", "d", "-m", "no-checkpoint"], 1, "no config.json"),
    "unknown hub": (["-i", "query: q", "-i", "d", "--hub", "github"], 2, "--hub"),
    "output directory missing": (["-i", "query: q", "-i", "d", "-o", "nowhere/out.json"], 2, "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_input_fails_with_one_clear_line(case, bad_files):
    args, code, fragment = BAD_RUNS[case]
    assert_clean_error(cli("run", *args, cwd=bad_files), code, fragment)


def test_runtime_errors_after_loading_torch_are_clean_too(tiny_checkpoint):
    # A bad --device is found once torch is imported, before the model is loaded.
    assert_clean_error(cli("run", "-m", tiny_checkpoint, "-i", "query: q", "-i", "d", "--device", "tpu9"),
                       2, "--device")
    import torch

    if not torch.cuda.is_available():
        assert_clean_error(cli("run", "-m", tiny_checkpoint, "-i", "query: q", "-i", "d", "--device", "cuda"),
                           1, "CUDA is not available")


# Input parsing, in process -------------------------------------------------------------------------


def test_first_query_input_wins_and_later_ones_are_documents():
    inputs = parse_inputs(["doc 1", "query:  the query ", "query: not a query", ""])
    assert inputs.query == "the query"
    assert inputs.documents == ["doc 1", "query: not a query", ""]


def test_an_explicit_query_overrides_a_json_files_query(tmp_path):
    (tmp_path / "q.json").write_text('{"query": "from file", "documents": ["x"]}')
    assert parse_inputs([f"file://{tmp_path}/q.json", "query: explicit"]).query == "explicit"
    assert parse_inputs([f"file://{tmp_path}/q.json"]).query == "from file"


def test_progress_bar_without_tqdm(monkeypatch, capsys):
    from rerank_cli.output import Progress

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    with Progress(130) as progress:
        progress.update(64)
        progress.update(66)
    err = capsys.readouterr().err
    assert "64/130" in err and err.rstrip().endswith("130/130 docs 100%")


def test_table_clips_documents_on_one_line():
    from rerank_cli.output import table

    body = {"results": [{"index": 12, "relevance_score": 0.123456, "document": "a\nb   " + "x" * 100},
                        {"index": 3, "relevance_score": 0.1, "document": ""}]}
    lines = table(body).splitlines()
    assert lines[1].split(maxsplit=3) == ["1", "0.1235", "12", "a b " + "x" * 55 + "…"]
    assert lines[2].split() == ["2", "0.1000", "3"]


# rerank list / download -------------------------------------------------------------------------------


def _fake_checkpoint(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")


@pytest.fixture
def fake_caches(tmp_path):
    """A download cache holding 0.6B in ModelScope's layout and 4B in Hugging Face's."""
    cache = tmp_path / "cache"
    _fake_checkpoint(cache / "models" / "Qwen" / "Qwen3-Reranker-0___6B")
    hf = cache / "models--Qwen--Qwen3-Reranker-4B"
    _fake_checkpoint(hf / "snapshots" / "abc123")
    (hf / "refs").mkdir()
    (hf / "refs" / "main").write_text("abc123")
    (cache / "models" / "Qwen" / "Qwen3-Reranker-8B").mkdir()  # empty: a failed download
    return cache


def test_list_shows_registry_default_and_cache_state(fake_caches, tmp_path):
    empty = tmp_path / "empty"
    isolated = {"MODELSCOPE_CACHE": str(empty), "HF_HUB_CACHE": str(empty), "HF_HOME": str(empty)}
    result = cli("list", "--cache-dir", fake_caches, env=isolated)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("qwen3-")}
    assert set(rows) == {"qwen3-reranker-0.6b", "qwen3-reranker-4b", "qwen3-reranker-8b"}
    assert rows["qwen3-reranker-0.6b"].split() == ["qwen3-reranker-0.6b", "*", "Qwen/Qwen3-Reranker-0.6B", "0.6B", "modelscope"]
    assert rows["qwen3-reranker-4b"].split() == ["qwen3-reranker-4b", "Qwen/Qwen3-Reranker-4B", "4B", "huggingface"]
    assert rows["qwen3-reranker-8b"].split() == ["qwen3-reranker-8b", "Qwen/Qwen3-Reranker-8B", "8B", "no"]
    assert str(fake_caches) in result.stdout

    # $RERANK_CACHE_DIR is the default --cache-dir; --json gives the directories.
    result = cli("list", "--json", env={**isolated, "RERANK_CACHE_DIR": str(fake_caches)})
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["qwen3-reranker-0.6b"]["default"] is True
    assert rows["qwen3-reranker-0.6b"]["cached"] == {
        "modelscope": str(fake_caches / "models" / "Qwen" / "Qwen3-Reranker-0___6B")}
    assert rows["qwen3-reranker-4b"]["cached"] == {
        "huggingface": str(fake_caches / "models--Qwen--Qwen3-Reranker-4B" / "snapshots" / "abc123")}
    assert rows["qwen3-reranker-8b"]["cached"] == {}

    # Without a cache dir: the hubs' own caches ($MODELSCOPE_CACHE, $HF_HUB_CACHE).
    _fake_checkpoint(empty / "models" / "Qwen--Qwen3-Reranker-8B" / "snapshots" / "master")
    result = cli("list", "--json", env=isolated)
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert {name: list(row["cached"]) for name, row in rows.items()} == {
        "qwen3-reranker-0.6b": [], "qwen3-reranker-4b": [], "qwen3-reranker-8b": ["modelscope"]}


@pytest.mark.parametrize("hub,other", [("huggingface", "modelscope"), ("modelscope", "huggingface")])
def test_download_fails_fast_and_cleanly_offline(tmp_path, hub, other):
    started = time.monotonic()
    result = cli("download", "qwen3-reranker-0.6b", "--hub", hub, "--cache-dir", tmp_path)
    line = assert_clean_error(result, 1, f"could not download 'Qwen/Qwen3-Reranker-0.6B' from {hub}")
    # It says what can work instead, never the command that just failed.
    assert f"--hub {other}" in line and "--cache-dir DIR" in line and "local checkpoint directory" in line
    assert "rerank download" not in line
    assert time.monotonic() - started < 60


def test_download_rejects_unknown_models_and_hubs():
    assert_clean_error(cli("download", "qwen3-reranker-13b"), 1, "unknown model source 'qwen3-reranker-13b'")
    assert_clean_error(cli("download", "x", "--hub", "github"), 2, "--hub")


def test_download_of_a_local_directory_prints_it(tiny_checkpoint):
    result = cli("download", tiny_checkpoint)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tiny_checkpoint)


# rerank serve ------------------------------------------------------------------------------------------


def test_serve_rejects_bad_arguments_before_starting_anything(tmp_path):
    assert_clean_error(cli("serve", tmp_path / "missing.yaml"), 2, "missing.yaml not found")
    (tmp_path / "bad.yaml").write_text("applications: [")
    assert_clean_error(cli("serve", tmp_path / "bad.yaml"), 2, "not valid YAML")
    (tmp_path / "empty.yaml").write_text("applications: []\n")
    assert_clean_error(cli("serve", tmp_path / "empty.yaml"), 2, "applications[0].args.models[0]")
    assert_clean_error(cli("serve", "--model", "qwen3-reranker-13b"), 1, "unknown model source")
    assert_clean_error(cli("serve", "--port", "70000"), 2, "--port")


@pytest.mark.parametrize("hub", [None, "huggingface"])
def test_serve_without_a_hub_fails_fast_with_one_line_before_starting_ray(tmp_path, hub):
    """The README's first command on a machine without a hub: the model cannot be downloaded."""
    started = time.monotonic()
    result = cli("serve", "--port", _free_port(), *(["--hub", hub] if hub else []),
                 env={"RERANK_CACHE_DIR": str(tmp_path)}, timeout=120)
    elapsed = time.monotonic() - started
    line = assert_clean_error(result, 1, "model 'qwen3-reranker-0.6b' of application 'reranker'",
                              f"could not download 'Qwen/Qwen3-Reranker-0.6B' from {hub or 'modelscope'}",
                              "--model DIR", "--cache-dir DIR")
    assert f"--hub {'modelscope' if hub else 'huggingface'}" in line
    assert result.stdout == ""  # Ray never started: nothing from `serve run`
    assert elapsed < 60, elapsed


def test_serve_patches_a_temporary_copy_of_the_default_config(monkeypatch, tiny_checkpoint, capsys):
    from rerank_cli import serve_cmd
    from rerank_cli.main import build_parser

    default = REPO / "configs" / "serve-cpu.yaml"
    original = default.read_text()
    seen = {}

    def fake_run_child(command, env=None):
        seen["command"], seen["env"] = command, env
        seen["config"] = yaml.safe_load(Path(command[command.index("run") + 1]).read_text())
        return 0

    monkeypatch.setattr(serve_cmd, "run_child", fake_run_child)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tiny_checkpoint.parent)
    args = build_parser().parse_args(["serve", "--model", tiny_checkpoint.name, "--port", "8123", "--host", "0.0.0.0",
                                      "--hub", "huggingface", "--cache-dir", "/models"])
    assert serve_cmd.serve(args) == 0

    command, config = seen["command"], seen["config"]
    assert command[-2:] == ["--address", "local"]  # a new local cluster, never someone else's
    assert seen["env"]["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "1" and seen["env"]["PATH"] == os.environ["PATH"]
    assert not Path(command[command.index("run") + 1]).exists()  # the temporary copy is removed
    expected = yaml.safe_load(original)
    expected["applications"][0]["args"]["models"][0].update(
        source=str(tiny_checkpoint.resolve()), hub="huggingface", cache_dir="/models")
    expected["http_options"].update(port=8123, host="0.0.0.0")
    assert config == expected
    assert default.read_text() == original
    assert capsys.readouterr().out.strip() == (
        f"rerank: serving {default} with model source '{tiny_checkpoint.resolve()}' at http://0.0.0.0:8123/ "
        f"(Ctrl-C to stop)")


def test_a_local_cluster_gets_the_control_loop_setting_unless_the_environment_has_one():
    from rerank_cli.serve_cmd import local_cluster_env

    assert local_cluster_env({"PATH": "/bin"}) == {"PATH": "/bin", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1"}
    mine = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1"}
    assert local_cluster_env(mine) == mine


def test_serve_watch_reports_the_first_failed_deployment_in_one_line(capsys):
    from types import SimpleNamespace as NS

    from rerank_cli.serve_child import watch

    deploying = NS(status="DEPLOYING", message="", deployments={})
    running = NS(status="RUNNING", message="", deployments={})
    traceback = ("The deployment failed to start 3 times in a row.\nTraceback (most recent call last):\n"
                 "  File \"x.py\", line 1\nrerank_core.registry.ModelSourceError: cannot load a checkpoint  \n\n")
    failed = NS(status="DEPLOY_FAILED", message="Deploying app 'main' failed", deployments={
        "RerankIngress": NS(status="HEALTHY", message=""),
        "model-tiny": NS(status="DEPLOY_FAILED", message=traceback),
    })
    states = iter([{}, {"main": deploying}, {"main": running, "other": deploying}, {"main": running, "other": running},
                   {"main": running, "other": running}, {"main": failed, "other": running}])
    line = watch(lambda: NS(applications=next(states)), poll_s=0)
    assert line == ("application 'main' failed to deploy: deployment 'model-tiny': "
                    "rerank_core.registry.ModelSourceError: cannot load a checkpoint")
    assert capsys.readouterr().out == "rerank: ready: application(s) main, other RUNNING\n"  # once
    no_details = NS(status="DEPLOY_FAILED", message="", deployments={})
    assert watch(lambda: NS(applications={"x": no_details}), poll_s=0) == "application 'x' failed to deploy: no reason given"


@pytest.mark.slow
def test_serve_exits_with_the_cause_when_a_deployment_cannot_start(tmp_path):
    """A source that resolves (a directory with config.json) but cannot load: Serve's replicas fail,
    and `rerank serve` exits 1 naming the cause instead of waiting forever."""
    broken = tmp_path / "broken-checkpoint"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}')
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    process = subprocess.Popen([str(RERANK), "serve", "--model", str(broken), "--port", str(_free_port())],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=400)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # this test's own process group only
            process.wait(timeout=30)
    assert process.returncode == 1, (out[-2000:], err[-2000:])
    last = err.strip().splitlines()[-1]
    assert last.startswith("rerank: error: application 'reranker' failed to deploy: deployment "), last
    assert f"cannot load a checkpoint from {broken}" in last, last


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _descendants(root: int) -> dict[int, str]:
    """``{pid: start time}`` of every process below ``root`` (start times guard against pid reuse)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    found, stack = {}, [root]
    while stack:
        for child in children.get(stack.pop(), []):
            stat = _proc_stat(child)
            if stat is not None:
                found[child] = stat[19]
                stack.append(child)
    return found


def _still_running(processes: dict[int, str]) -> dict[int, str]:
    running = {}
    for pid, started in processes.items():
        stat = _proc_stat(pid)
        if stat is not None and stat[19] == started and stat[0] != "Z":
            running[pid] = started
    return running


def _read_proc(pid: int, name: str) -> bytes:
    """``/proc/PID/NAME``, or nothing for a process that has exited meanwhile."""
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process checks read /proc")
def test_serve_runs_the_app_until_sigint_then_stops_its_ray_cluster(tiny_checkpoint, served_engine, tmp_path):
    port = _free_port()
    log_path = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(RERANK), "serve", "--model", str(tiny_checkpoint), "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    cluster: dict[int, str] = {}
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            assert process.poll() is None, f"rerank serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
            assert "Deploying app 'reranker' failed" not in log_path.read_text(), log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"/health never answered 200:\n{log_path.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        cluster = _descendants(process.pid)
        assert len(cluster) > 3  # serve run, gcs_server, raylet, workers, ...
        # The cluster runs Serve's control loop at rerank serve's setting (rerank_cli.serve_cmd).
        controllers = [pid for pid in cluster if b"ServeController" in _read_proc(pid, "cmdline")]
        assert controllers
        environ = _read_proc(controllers[0], "environ").split(b"\0")
        assert b"RAY_SERVE_CONTROL_LOOP_INTERVAL_S=1" in environ

        first_line = log_path.read_text().splitlines()[0]
        default_config = REPO / "configs" / "serve-cpu.yaml"
        assert first_line.startswith(f"rerank: serving {default_config} with model source '{tiny_checkpoint}'")
        assert f"at http://127.0.0.1:{port}/" in first_line

        r = requests.post(f"{url}/rerank", json={"query": SEED_QUERY, "documents": SEED_DOCS,
                                                 "return_documents": True}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert_seed_response(body, served_engine)

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0, log_path.read_text()[-3000:]
        deadline = time.monotonic() + 30
        while _still_running(cluster) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _still_running(cluster), "processes of the Ray cluster outlived `rerank serve`"
        temp_config = [line for line in log_path.read_text().splitlines() if "Running config file" in line]
        assert temp_config and not Path(temp_config[0].split("'")[1]).exists()  # temporary YAML removed
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        for pid in _still_running(cluster):  # only processes this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
