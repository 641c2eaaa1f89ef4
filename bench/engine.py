"""Benchmark of the rerank_core engine against the official Qwen3-Reranker procedure (CPU).

Run from the repository root:

    python bench/engine.py                 # full run (several minutes on 2 cores), engine in fp32
    python bench/engine.py --dtype bfloat16  # the engine in bf16 (official still fp32), bf16 matmul probe
    python bench/engine.py --quick         # smoke run: fewer repeats, small memory workload
    python bench/engine.py --json out.json # also write the figures as JSON

The checkpoint is random (``rerank_core.synthetic.build_checkpoint(shape="0.6b")``) with the
exact Qwen3-Reranker-0.6B architecture and the real Qwen3 tokenizer. Compute cost does not depend
on weight values, so speed and memory are those of the real 0.6B model. It is built once into
``~/.cache/qwen3-rerank-serve/bench-0.6b`` (in a subprocess) and reused on later runs; pass
``--checkpoint DIR`` to use another directory (built there if it holds no checkpoint).

Measurements, all in one process run so that the ratios compare like with like:

1. **Workload A (speed and parity).** One query and 16 documents of 30..300 words (lengths spread
   evenly over that range, shuffled, seeded words from a list of common English words). The
   official procedure (``tests/reference.py:official_scores`` on ``AutoModelForCausalLM``, fp32,
   sdpa, left padding, full-vocabulary logits) and the engine (``Reranker.score``) both start from
   text, so both timings include tokenization. One warm-up call each, then ``--repeats`` rounds
   that alternate the two (the order flips every round). Reported: median seconds, pairs/s, the
   ratio official_time / engine_time ("speedup", i.e. engine pairs/s over official pairs/s), and
   the largest absolute score difference over all rounds.

2. **Useful GFLOP/s.** "Useful FLOPs" are the floating-point operations the engine cannot avoid
   for the real tokens of workload A, counted once each: the shared prefix (system prompt,
   instruction, query, ``"<Document>:"``) once, plus every document part (its text and the
   suffix). Padding and recomputation are excluded. Per token and per layer:

   * linear layers: ``2 * P_lin`` with ``P_lin`` the non-embedding linear parameters of one layer
     (q, k, v, o projections and the gate/up/down MLP; 15,728,640 for the 0.6B shape);
   * attention: ``4 * num_heads * head_dim * context``, where ``context`` is the number of keys the
     token attends to causally (its position in the full prefix + document sequence, plus one):
     ``2 * head_dim * context`` for the scores and as much for the weighted sum of values, per
     query head;

   plus, per pair, the one-row yes/no head: ``2 * hidden_size``. Norms, RoPE, activations,
   softmax and the embedding lookup are not counted (they are a few percent at most). The
   useful FLOPs divided by the engine's median time of workload A is the engine's useful GFLOP/s.
   Next to it, the same run measures this machine's fp32 matmul GFLOP/s with torch (median of
   several runs for a few shapes of the model's own linear layers; the best shape is reported),
   with the same torch thread settings (this script changes none).

3. **Peak memory.** 64 documents of ~400 words (380..420) scored by the engine in a fresh
   subprocess started before this process loads any model. Reported: the subprocess's peak
   resident set size (``VmHWM`` of its own address space, cross-checked with
   ``getrusage(RUSAGE_SELF).ru_maxrss``), its peak during loading alone, its resident size after
   loading, the bytes of the weights, and the engine's time for that workload (one call, no
   warm-up other than the probe pair ``Reranker.load`` scores). With ``--dtype bfloat16`` the
   subprocess loads a copy of the checkpoint stored in bf16 (``ensure_bf16_copy``), as the
   released checkpoints are.

Targets (``TARGETS``), fp32: speedup >= 2.8 with max score difference <= 1e-4, useful GFLOP/s >=
75% of fp32 matmul GFLOP/s, peak RSS of the 64 x 400-word subprocess < 4 GiB; bf16: max score
difference to the fp32 official scores <= 1e-2, useful GFLOP/s >= 60% of bf16 matmul GFLOP/s,
peak RSS < 2.5 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_CHECKPOINT = Path.home() / ".cache" / "qwen3-rerank-serve" / "bench-0.6b"
GIB = 1024**3

# Targets by the engine's dtype: bf16 is measured against the bf16 matmul probe and the fp32
# official scores (its rounding, not a bug, sets the score tolerance).
TARGETS = {
    "float32": {"speedup": 2.8, "max_diff": 1e-4, "matmul_fraction": 0.75, "peak_gib": 4.0},
    "bfloat16": {"speedup": None, "max_diff": 1e-2, "matmul_fraction": 0.60, "peak_gib": 2.5},
}

QUERY = "how do solar panels turn sunlight into electricity for a house"

# Common English words: documents read like (meaningless) English prose, so that the tokenizer
# produces a realistic number of tokens per word.
WORDS = """
the of and to in is was for that on as with by it from at his an were are which this be or
has had have not first one their its new after but who they two her she also been other when
there all during into school time may years more most only over city some world would where
later up such used many can state about national out known university united then made north
however including team under government south area river history water people system energy
light power house panel cell solar sun electric current battery roof grid home heat weather
market price cost year month day week local public health care doctor patient study research
data model network computer software language word book music film game player season league
club village town county region country island mountain valley forest lake sea coast bridge
road railway station airport building church museum library park garden field farm family
children student teacher class course degree college program project company business bank
money trade industry factory product service report news article story page author editor
history century war battle army force ship plane car engine fuel oil gas coal wind nuclear
plant tree flower animal bird fish food drink coffee tea bread water rain snow storm winter
summer spring autumn morning evening night early late small large long short high low old young
good great best better important different possible available local general special major
""".split()


# --------------------------------------------------------------------------------------------
# Inputs


def make_document(rng: random.Random, num_words: int) -> str:
    """``num_words`` random words as sentences of 6..16 words, capitalized, ending with a period."""
    words: list[str] = []
    while len(words) < num_words:
        sentence = [rng.choice(WORDS) for _ in range(min(rng.randint(6, 16), num_words - len(words)))]
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += "."
        words.extend(sentence)
    return " ".join(words)


def workload_a(seed: int = 0, count: int = 16, low: int = 30, high: int = 300) -> list[str]:
    """``count`` documents with word counts spread evenly over [low, high], in shuffled order."""
    rng = random.Random(seed)
    lengths = [round(low + i * (high - low) / (count - 1)) for i in range(count)]
    rng.shuffle(lengths)
    return [make_document(rng, n) for n in lengths]


def workload_memory(seed: int = 1, count: int = 64, words: int = 400) -> list[str]:
    """``count`` documents of ``words`` +- 5% words."""
    rng = random.Random(seed)
    spread = max(1, words // 20)
    return [make_document(rng, rng.randint(words - spread, words + spread)) for _ in range(count)]


# --------------------------------------------------------------------------------------------
# Checkpoint


def has_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) and (path / "tokenizer.json").is_file()


def ensure_checkpoint(path: Path) -> tuple[Path, bool]:
    """Build the random 0.6B-shaped checkpoint at ``path`` unless one is there; returns (path, built).

    Built in a subprocess (so that this process's memory stays small for the memory child) into a
    temporary sibling directory, then renamed, so an interrupted build leaves nothing half-written.
    """
    path = path.expanduser().resolve()
    if has_checkpoint(path):
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".building-", dir=path.parent))
    code = (
        "import sys; from rerank_core.synthetic import build_checkpoint; "
        "build_checkpoint(sys.argv[1], shape='0.6b', seed=0)"
    )
    print(f"building a random Qwen3-Reranker-0.6B-shaped checkpoint in {path} (once; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-c", code, str(tmp)], check=True, cwd=ROOT)
    if path.exists():  # an empty or partial directory
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
    tmp.rename(path)
    return path, True


def ensure_bf16_copy(path: Path) -> Path:
    """A copy of checkpoint ``path`` with its weights stored in bfloat16, as the released
    Qwen3-Reranker checkpoints store theirs (built once, beside ``path``, named ``<name>-bf16``).

    Loading fp32 files into a bf16 model keeps pages of the fp32 file resident (2.4 GB for the 0.6B
    shape), which a released checkpoint never costs; bf16 memory figures use this copy.
    """
    copy = path.with_name(path.name + "-bf16")
    if has_checkpoint(copy):
        return copy
    tmp = Path(tempfile.mkdtemp(prefix=copy.name + ".building-", dir=copy.parent))
    code = (
        "import sys, shutil, torch; from pathlib import Path; "
        "from transformers import AutoModelForCausalLM; "
        "src, dst = Path(sys.argv[1]), Path(sys.argv[2]); "
        "AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(dst); "
        "[shutil.copy(f, dst / f.name) for f in src.glob('tokenizer*')]"
    )
    print(f"writing a bfloat16 copy of {path} to {copy} (once)", flush=True)
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp)], check=True, cwd=ROOT)
    tmp.rename(copy)
    return copy


SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "vocab_size", "tie_word_embeddings")


def qwen3_06b_shape() -> dict:
    """The architecture fields of Qwen3-Reranker-0.6B, from the synthetic 0.6B shape (which
    tests/test_synthetic.py checks against the released values)."""
    from rerank_core.synthetic import SHAPES

    return {key: SHAPES["0.6b"][key] for key in SHAPE_KEYS}


def checkpoint_shape(path: Path) -> dict:
    """The architecture fields of ``path/config.json`` that set the compute cost."""
    config = json.loads((path / "config.json").read_text())
    return {key: config.get(key) for key in SHAPE_KEYS}


# --------------------------------------------------------------------------------------------
# FLOP accounting


def linear_params_per_layer(config) -> int:
    hidden = config.hidden_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    mlp = 3 * hidden * config.intermediate_size
    return attention + mlp


def useful_flops(config, shared_len: int, doc_lens: list[int]) -> dict:
    """Useful FLOPs of one query (see the module docstring for the definition)."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    tokens = shared_len + sum(doc_lens)
    linear = 2 * linear_params_per_layer(config) * layers * tokens
    # Context of the token at 0-based position p is p + 1 keys.
    contexts = sum(range(1, shared_len + 1))
    for n in doc_lens:
        contexts += sum(range(shared_len + 1, shared_len + n + 1))
    attention = 4 * heads * head_dim * layers * contexts
    head = 2 * config.hidden_size * len(doc_lens)
    return {
        "tokens": tokens,
        "linear": linear,
        "attention": attention,
        "head": head,
        "total": linear + attention + head,
    }


def executed_flops_estimate(config, shared_len: int, doc_lens: list[int], plan, packed: bool = False) -> dict:
    """Rough FLOPs each procedure *executes* on workload A, padding and recomputation included.

    For explaining the speedup only (the targets use :func:`useful_flops`). Linear layers and
    attention are counted as in :func:`useful_flops` but over padded rows; attention called with an
    explicit mask is counted dense (every query x key pair), a causal call without a mask half.

    * official: every pair is prefix + document + suffix, left-padded to the longest, one forward
      pass, then the full 151,669-wide LM head on every position (``logits_to_keep`` is 0);
    * engine: the shared prefix once (causal, no mask), then the document parts in the batches
      that ``plan(doc_lens)`` returns (the engine's own planner), each row attending to prefix +
      its batch width; with ``packed`` passes there is no padding and each row attends to prefix +
      its own length.
    """
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = 2 * linear_params_per_layer(config) * layers
    per_pair_key = 4 * heads * head_dim * layers  # per (query token, key) pair

    width = shared_len + max(doc_lens)
    rows = len(doc_lens)
    official = {
        "padded_tokens": rows * width,
        "linear": per_token * rows * width,
        "attention": per_pair_key * rows * width * width,
        "lm_head": 2 * config.hidden_size * config.vocab_size * rows * width,
    }
    official["total"] = official["linear"] + official["attention"] + official["lm_head"]

    batches = plan(doc_lens)
    attention = per_pair_key * shared_len * shared_len // 2
    if packed:
        padded = shared_len + sum(doc_lens)
        attention += sum(per_pair_key * w * (shared_len + w) for w in doc_lens)
    else:
        padded = shared_len + sum(len(b) * max(doc_lens[i] for i in b) for b in batches)
        for b in batches:
            w = max(doc_lens[i] for i in b)
            attention += per_pair_key * len(b) * w * (shared_len + w)
    engine = {
        "padded_tokens": padded,
        "linear": per_token * padded,
        "attention": attention,
        "head": 2 * config.hidden_size * rows,
    }
    engine["total"] = engine["linear"] + engine["attention"] + engine["head"]
    return {"official": official, "engine": engine, "engine_batches": [len(b) for b in batches]}


# --------------------------------------------------------------------------------------------
# Matmul roofline


MATMUL_SHAPES = ((2048, 1024, 3072), (2048, 3072, 1024), (2048, 1024, 2048), (4096, 1024, 3072))


class MatmulProbe:
    """GFLOP/s of torch matmuls shaped like the model's linear layers, in the engine's dtype.

    :meth:`sample` is called before workload A and once per round, so the matmul figure is taken
    under the same conditions (machine load included) as the engine's. The figure per shape is the
    median over all samples; the reported one is the best shape's.
    """

    def __init__(self, dtype: str = "float32"):
        import torch

        gen = torch.Generator().manual_seed(0)
        torch_dtype = getattr(torch, dtype)
        self.operands = {}
        for m, k, n in MATMUL_SHAPES:
            a = torch.randn(m, k, generator=gen).to(torch_dtype)
            b = torch.randn(k, n, generator=gen).to(torch_dtype)
            out = torch.empty(m, n, dtype=torch_dtype)
            torch.matmul(a, b, out=out)  # warm-up
            self.operands[(m, k, n)] = (a, b, out)
        self.times: dict[tuple[int, int, int], list[float]] = {shape: [] for shape in MATMUL_SHAPES}

    def sample(self, repeats: int) -> None:
        import torch

        for shape, (a, b, out) in self.operands.items():
            for _ in range(repeats):
                t0 = time.perf_counter()
                torch.matmul(a, b, out=out)
                self.times[shape].append(time.perf_counter() - t0)

    def result(self) -> dict:
        per_shape = {
            f"({m}x{k})@({k}x{n})": 2 * m * k * n / statistics.median(self.times[(m, k, n)]) / 1e9
            for m, k, n in MATMUL_SHAPES
        }
        best = max(per_shape, key=per_shape.get)
        samples = len(self.times[MATMUL_SHAPES[0]])
        return {"per_shape_gflops": per_shape, "best_shape": best, "best_gflops": per_shape[best],
                "samples_per_shape": samples}


def loadavg() -> float:
    return os.getloadavg()[0]


# --------------------------------------------------------------------------------------------
# Memory child


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def engine_config(max_batch_tokens: int | None, max_batch_pairs: int | None, max_padding: float | None = None,
                  packing: bool | None = None, batch_invariant: bool | None = None, dtype: str = "float32"):
    """The engine's default :class:`EngineConfig`, with the settings overridden when given."""
    from rerank_core import EngineConfig

    overrides = {"max_batch_tokens": max_batch_tokens, "max_batch_pairs": max_batch_pairs,
                 "max_padding": max_padding, "packing": packing, "batch_invariant": batch_invariant,
                 "dtype": dtype}
    return EngineConfig(**{k: v for k, v in overrides.items() if v is not None})


def engine_plan(scorer):
    """The planner ``scorer`` uses for document rows: ``lengths -> passes of indices``, and whether
    its passes are packed (rows joined without padding) or padded."""
    from rerank_core.batching import plan_batches, plan_packed

    if getattr(scorer, "packing", False):
        return (lambda lengths: plan_packed(lengths, scorer.max_batch_tokens, scorer.max_batch_pairs)), True
    max_padding = getattr(scorer, "max_padding", None)
    if max_padding is None:  # an engine without a padding cap
        return (lambda lengths: plan_batches(lengths, scorer.max_batch_tokens, scorer.max_batch_pairs)), False
    return (lambda lengths: plan_batches(lengths, scorer.max_batch_tokens, scorer.max_batch_pairs, max_padding)), False


def describe_config(scorer) -> dict:
    return {"max_batch_tokens": scorer.max_batch_tokens, "max_batch_pairs": scorer.max_batch_pairs,
            "share_prefix": scorer.share_prefix, "max_padding": getattr(scorer, "max_padding", None),
            "packing": getattr(scorer, "packing", False),
            "batch_invariant": getattr(scorer, "batch_invariant", False)}


def weight_bytes(module) -> int:
    """Bytes of a module's weights, the fixed-tile linear layers' (not parameters) included."""
    from rerank_core.invariant import TiledLinear

    total = sum(p.numel() * p.element_size() for p in module.parameters())
    total += sum(b.numel() * b.element_size() for b in module.buffers())
    for layer in module.modules():
        if isinstance(layer, TiledLinear):
            itemsize = 2 if layer.prepacked else layer.weight.element_size()
            total += layer.in_features * layer.out_features * itemsize
    return total


def memory_child(checkpoint: str, docs: int, words: int, config) -> None:
    """Runs in a fresh interpreter: load the engine, score the memory workload, print JSON."""
    import torch

    from rerank_core import Reranker

    documents = workload_memory(count=docs, words=words)
    t0 = time.perf_counter()
    reranker = Reranker.load(checkpoint, device="cpu", config=config)
    load_s = time.perf_counter() - t0
    after_load_rss = _status_kib("VmRSS")
    load_peak = _status_kib("VmHWM")
    weights = weight_bytes(reranker.scorer.backbone)
    encoded = reranker.encode(QUERY, documents)
    t0 = time.perf_counter()
    result = reranker.scorer.score([encoded])
    score_s = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    stats = result.stats
    print(
        "MEMORY_JSON "
        + json.dumps(
            {
                "documents": docs,
                "words_per_document": words,
                "engine_config": describe_config(reranker.scorer),
                "threads": torch.get_num_threads(),
                "load_seconds": load_s,
                "score_seconds": score_s,
                "pairs_per_second": docs / score_s,
                "tokens_real": stats.tokens,
                "tokens_padded": stats.padded_tokens,
                "forward_passes": stats.forward_passes,
                "pair_tokens_official": encoded.num_tokens(),
                "weights_bytes": weights,
                "rss_after_load_bytes": after_load_rss * 1024,
                "peak_rss_load_bytes": load_peak * 1024,
                "peak_rss_bytes": peak * 1024,
                "ru_maxrss_self_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        ),
        flush=True,
    )


def run_memory_child(checkpoint: Path, docs: int, words: int, budgets: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--_memory-child", str(checkpoint),
         "--memory-docs", str(docs), "--memory-words", str(words), *budgets],
        cwd=ROOT, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"memory subprocess failed with exit code {proc.returncode}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("MEMORY_JSON "))
    result = json.loads(line[len("MEMORY_JSON "):])
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # Max over all children waited for so far; equal to this child's peak when it is the largest.
    result["ru_maxrss_children_bytes"] = after * 1024
    result["ru_maxrss_children_is_this_child"] = after > before
    return result


# --------------------------------------------------------------------------------------------
# Main benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/engine.py",
        description=(
            "Benchmark the rerank_core engine against the official Qwen3-Reranker procedure on CPU "
            "(fp32) with a random checkpoint of the exact Qwen3-Reranker-0.6B shape: speed and "
            "parity, useful GFLOP/s against matmul GFLOP/s, and the peak RSS of a 64 x 400-word request."
        ),
    )
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help="checkpoint directory; built there (random weights, 0.6B shape) if missing "
                             f"(default: {DEFAULT_CHECKPOINT})")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds of workload A after one warm-up each (default 5; 2 with --quick)")
    parser.add_argument("--matmul-repeats", type=int, default=None,
                        help="timed runs per matmul shape before workload A and in each round "
                             "(default 5; 3 with --quick)")
    parser.add_argument("--memory-docs", type=int, default=None,
                        help="documents in the memory workload (default 64; 8 with --quick)")
    parser.add_argument("--memory-words", type=int, default=400,
                        help="words per memory-workload document, +-5%% (default 400)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the memory subprocess")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 rounds, fewer matmul runs, 8-document memory workload")
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="override EngineConfig.max_batch_tokens (default: the engine's own default)")
    parser.add_argument("--max-batch-pairs", type=int, default=None,
                        help="override EngineConfig.max_batch_pairs (default: the engine's own default)")
    parser.add_argument("--max-padding", type=float, default=None,
                        help="override EngineConfig.max_padding (default: the engine's own default for the device)")
    parser.add_argument("--packing", choices=("on", "off"), default=None,
                        help="override EngineConfig.packing (default: the engine's own default for the device)")
    parser.add_argument("--batch-invariant", choices=("on", "off"), default=None,
                        help="override EngineConfig.batch_invariant (default: the engine's own default)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the engine's dtype (default float32); the official procedure always runs "
                             "float32, the matmul probe runs in this dtype")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    repeats = args.repeats or (2 if args.quick else 5)
    matmul_repeats = args.matmul_repeats or (3 if args.quick else 5)
    memory_docs = args.memory_docs or (8 if args.quick else 64)
    packing = None if args.packing is None else args.packing == "on"
    invariant = None if args.batch_invariant is None else args.batch_invariant == "on"
    config = engine_config(args.max_batch_tokens, args.max_batch_pairs, args.max_padding, packing, invariant,
                           args.dtype)
    target = TARGETS[args.dtype]
    budgets = ["--dtype", args.dtype]
    if args.max_batch_tokens is not None:
        budgets += ["--max-batch-tokens", str(args.max_batch_tokens)]
    if args.max_batch_pairs is not None:
        budgets += ["--max-batch-pairs", str(args.max_batch_pairs)]
    if args.max_padding is not None:
        budgets += ["--max-padding", str(args.max_padding)]
    if args.packing is not None:
        budgets += ["--packing", args.packing]
    if args.batch_invariant is not None:
        budgets += ["--batch-invariant", args.batch_invariant]

    if args.memory_child:
        memory_child(args.memory_child, memory_docs, args.memory_words, config)
        return 0

    import torch
    import transformers

    from bench.hardware import describe, summary

    checkpoint, built = ensure_checkpoint(args.checkpoint)
    threads = torch.get_num_threads()
    machine = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_num_threads": threads,
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
    }
    arch = checkpoint_shape(checkpoint)
    shape_note = "exact Qwen3-Reranker-0.6B shape" if arch == qwen3_06b_shape() else f"NOT the 0.6B shape: {arch}"
    hardware = describe()
    print(summary(hardware))
    print(f"checkpoint: {checkpoint} ({'built now' if built else 'reused'}; {shape_note})")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"torch.get_num_threads()={threads}, interop={torch.get_num_interop_threads()}, cpus={os.cpu_count()}")
    print(f"mode: {'quick' if args.quick else 'full'}; repeats={repeats}; load average {loadavg():.2f}", flush=True)
    loads = [loadavg()]

    # 1. Memory first, while this process is still small (see run_memory_child).
    memory = None
    if not args.skip_memory:
        print(f"\n[memory] {memory_docs} documents x ~{args.memory_words} words in a fresh subprocess ...", flush=True)
        # bf16: from bf16 files, as the released checkpoints are stored (see ensure_bf16_copy).
        source = ensure_bf16_copy(checkpoint) if args.dtype == "bfloat16" else checkpoint
        memory = run_memory_child(source, memory_docs, args.memory_words, budgets)
        print(f"[memory] peak RSS {memory['peak_rss_bytes'] / GIB:.2f} GiB "
              f"(load alone {memory['peak_rss_load_bytes'] / GIB:.2f} GiB, weights "
              f"{memory['weights_bytes'] / GIB:.2f} GiB), scoring {memory['score_seconds']:.1f} s", flush=True)

    # 2. Matmul roofline: sampled now and again in every round of workload A.
    probe = MatmulProbe(args.dtype)
    probe.sample(matmul_repeats)

    # 3. Workload A.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rerank_core import Reranker
    from tests.reference import official_scores

    documents = workload_a()
    print(f"\n[A] loading the official model and the engine from {checkpoint} ...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    engine = Reranker.load(checkpoint, device="cpu", config=config)
    engine_settings = describe_config(engine.scorer)
    print(f"[A] engine config: {engine_settings}")

    encoded = engine.encode(QUERY, documents)
    flops = useful_flops(engine.scorer.backbone.config, len(encoded.shared), [len(d) for d in encoded.documents])
    stats = engine.scorer.score([encoded]).stats
    executed = executed_flops_estimate(engine.scorer.backbone.config, len(encoded.shared),
                                       [len(d) for d in encoded.documents], *engine_plan(engine.scorer))
    print(f"[A] 16 documents, {min(len(d.split()) for d in documents)}..{max(len(d.split()) for d in documents)} words; "
          f"shared prefix {len(encoded.shared)} tokens, document parts {sum(len(d) for d in encoded.documents)} tokens; "
          f"official pair tokens {encoded.num_tokens()}; engine padded tokens {stats.padded_tokens} "
          f"in {stats.forward_passes} forward passes (document batches of {executed['engine_batches']} rows)",
          flush=True)
    if executed["engine"]["padded_tokens"] != stats.padded_tokens:
        print(f"[A] note: the executed-FLOP estimate assumes {executed['engine']['padded_tokens']} padded tokens, "
              f"the engine reported {stats.padded_tokens}", flush=True)

    def run_official():
        return official_scores(model, tokenizer, QUERY, documents)

    def run_engine():
        return engine.score(QUERY, documents)

    runners = {"official": run_official, "engine": run_engine}
    times: dict[str, list[float]] = {"official": [], "engine": []}
    max_diff = 0.0
    for name, fn in runners.items():  # warm-up
        t0 = time.perf_counter()
        fn()
        print(f"[A] warm-up {name}: {time.perf_counter() - t0:.2f} s", flush=True)
    for r in range(repeats):
        order = ["official", "engine"] if r % 2 == 0 else ["engine", "official"]
        got = {}
        for name in order:
            t0 = time.perf_counter()
            got[name] = runners[name]()
            times[name].append(time.perf_counter() - t0)
        diff = max(abs(a - b) for a, b in zip(got["official"], got["engine"]))
        max_diff = max(max_diff, diff)
        probe.sample(matmul_repeats)
        loads.append(loadavg())
        print(f"[A] round {r + 1}/{repeats}: official {times['official'][-1]:.2f} s, "
              f"engine {times['engine'][-1]:.2f} s (ratio {times['official'][-1] / times['engine'][-1]:.2f}), "
              f"max |diff| {diff:.2e}, load average {loads[-1]:.2f}", flush=True)

    official_s = statistics.median(times["official"])
    engine_s = statistics.median(times["engine"])
    speedup = official_s / engine_s
    round_ratios = [o / e for o, e in zip(times["official"], times["engine"])]
    matmul = probe.result()
    for shape, g in matmul["per_shape_gflops"].items():
        print(f"[matmul] {shape}: {g:.1f} GFLOP/s (median of {matmul['samples_per_shape']})")
    engine_gflops = flops["total"] / engine_s / 1e9
    fraction = engine_gflops / matmul["best_gflops"]

    targets = {
        f"max score diff <= {target['max_diff']:g}": max_diff <= target["max_diff"],
        f"useful GFLOP/s >= {target['matmul_fraction']:.0%} of {args.dtype} matmul":
            fraction >= target["matmul_fraction"],
    }
    if target["speedup"] is not None:
        targets[f"speedup >= {target['speedup']}"] = speedup >= target["speedup"]
    if memory is not None:
        label = f"peak RSS ({memory_docs} x {args.memory_words} words) < {target['peak_gib']:g} GiB"
        targets[label] = memory["peak_rss_bytes"] / GIB < target["peak_gib"]

    rows = [
        ("engine dtype (official: float32)", args.dtype),
        ("torch threads", f"{threads}"),
        ("official, median s (16 pairs)", f"{official_s:.3f}"),
        ("official pairs/s", f"{16 / official_s:.2f}"),
        ("engine, median s (16 pairs)", f"{engine_s:.3f}"),
        ("engine pairs/s", f"{16 / engine_s:.2f}"),
        ("speedup (official s / engine s, of medians)", f"{speedup:.2f}x"),
        ("  per-round ratios: median (min..max)",
         f"{statistics.median(round_ratios):.2f} ({min(round_ratios):.2f}..{max(round_ratios):.2f})"),
        ("max |score diff|", f"{max_diff:.2e}"),
        ("tokens: useful / official padded / engine padded",
         f"{flops['tokens']} / {executed['official']['padded_tokens']} / {stats.padded_tokens}"),
        ("executed GFLOP estimate, official (of which LM head)",
         f"{executed['official']['total'] / 1e9:.0f} ({executed['official']['lm_head'] / 1e9:.0f})"),
        ("executed GFLOP estimate, engine", f"{executed['engine']['total'] / 1e9:.0f}"),
        ("useful GFLOP (workload A)", f"{flops['total'] / 1e9:.1f}"),
        ("engine useful GFLOP/s", f"{engine_gflops:.1f}"),
        (f"{args.dtype} matmul GFLOP/s (best: {matmul['best_shape']})", f"{matmul['best_gflops']:.1f}"),
        ("useful / matmul", f"{fraction:.1%}"),
        ("load average during run (min..max)", f"{min(loads):.1f}..{max(loads):.1f}"),
    ]
    if memory is not None:
        rows += [
            (f"peak RSS, {memory_docs} x ~{args.memory_words} words (GiB)", f"{memory['peak_rss_bytes'] / GIB:.2f}"),
            ("  of which weights (GiB)", f"{memory['weights_bytes'] / GIB:.2f}"),
            ("  peak RSS during load alone (GiB)", f"{memory['peak_rss_load_bytes'] / GIB:.2f}"),
            ("  RSS after load (GiB)", f"{memory['rss_after_load_bytes'] / GIB:.2f}"),
            (f"engine time, {memory_docs} x ~{args.memory_words} words (s)", f"{memory['score_seconds']:.1f}"),
            ("  pairs/s", f"{memory['pairs_per_second']:.2f}"),
        ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "=" * (width + 16))
    print("SUMMARY (bench/engine.py" + (", --quick)" if args.quick else ")"))
    print("=" * (width + 16))
    for k, v in rows:
        print(f"{k:<{width}}  {v:>12}")
    print("-" * (width + 16))
    for k, ok in targets.items():
        print(f"{'MET ' if ok else 'MISS'}  {k}")

    if args.json:
        report = {
            "mode": "quick" if args.quick else "full",
            "dtype": args.dtype,
            "checkpoint": str(checkpoint),
            "checkpoint_shape": arch,
            "checkpoint_note": shape_note,
            "machine": machine,
            "hardware": hardware,
            "workload_a": {
                "pairs": len(documents),
                "words": [len(d.split()) for d in documents],
                "shared_tokens": len(encoded.shared),
                "document_tokens": [len(d) for d in encoded.documents],
                "official_pair_tokens": encoded.num_tokens(),
                "engine_padded_tokens": stats.padded_tokens,
                "engine_forward_passes": stats.forward_passes,
                "repeats": repeats,
                "official_seconds": times["official"],
                "engine_seconds": times["engine"],
                "official_median_s": official_s,
                "engine_median_s": engine_s,
                "official_pairs_per_s": 16 / official_s,
                "engine_pairs_per_s": 16 / engine_s,
                "speedup": speedup,
                "round_ratios": round_ratios,
                "max_abs_score_diff": max_diff,
            },
            "useful_flops": flops,
            "executed_flops_estimate": executed,
            "engine_useful_gflops": engine_gflops,
            "matmul": matmul,
            "useful_over_matmul": fraction,
            "memory": memory,
            "engine_config": engine_settings,
            "load_average": loads,
            "targets": targets,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
