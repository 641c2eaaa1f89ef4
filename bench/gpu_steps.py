"""The steps of bench/gpu.py that measure the engine against the GPU's roof and a peer.

* ``roof``: the device's bf16 matrix rate on large products (the roof every share is taken of).
* ``profile``: one call of the throughput workload under torch.profiler: GPU time per kernel class
  (matrix products, attention, elementwise and norms, copies, gathers and index ops) and the
  GPU's idle share of the call (time no kernel runs: the host bounds it there).
* ``budgets``: packed bf16 passes at token budgets (``--budgets``) with a high row cap
  (``--pairs``): pairs/s, tokens/s, share of the roof, passes, peak memory. Decides CUDA's
  ``max_batch_tokens`` default.
* ``compile``: packed bf16, decoder layers eager against compiled (``compile_layers``), side by side.
* ``shapes``: the 4B and 8B shapes (random weights with the released configs' shapes, built on
  the device, never written to disk): pairs/s, tokens/s, share of the roof, peak memory, and the
  varlen start-up check's difference.
* ``fp8``: ``dtype: fp8`` (torchao float8, per-row scales) against bfloat16 on the same calls,
  and both against float32's scores (bench/quantized.py's fidelity measures: largest and p99
  |score diff|, Kendall tau, top-3 agreement). Where fp8 is refused (a CPU, a GPU below compute
  capability 8.9, torchao missing), the refusal is the step's fp8 figure.
* ``peer``: sentence-transformers' CrossEncoder on the seq-cls conversion of the same checkpoint
  (``score.weight = lm_head[yes] - lm_head[no]``, pad token 151643, the template applied by the
  caller, as the Qwen3 seq-cls recipes do), bf16, at its best batch size, against the engine.

Each step takes the shared arguments of bench/gpu.py and returns a JSON-able dict.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from pathlib import Path

import engine as bench_engine  # bench/engine.py
import torch

from rerank_core import EngineConfig, Reranker
from rerank_core.prompt import DEFAULT_INSTRUCTION, PREFIX, SUFFIX

# Released configs' shapes (Qwen/Qwen3-Reranker-4B and -8B: Qwen3-4B and Qwen3-8B).
RELEASED_SHAPES = {
    "4b": {"num_hidden_layers": 36, "hidden_size": 2560, "num_attention_heads": 32, "num_key_value_heads": 8,
           "head_dim": 128, "intermediate_size": 9728, "tie_word_embeddings": True},
    "8b": {"num_hidden_layers": 36, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
           "head_dim": 128, "intermediate_size": 12288, "tie_word_embeddings": False},
}

# Kernel classes of the profile, by substrings of kernel names (first match wins).
KERNEL_CLASSES = (
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("matrix products", ("gemm", "cutlass", "cublas", "nvjet", "sm90_xmma", "matmul", "addmm", "mm_", "wgmma",
                         "linear", "bmm")),
    # Before copies: torch's index_copy_ kernel is a scatter by index, not a plain copy.
    ("gathers and index ops", ("index", "gather", "scatter", "embedding")),
    ("copies", ("memcpy", "memset", "copy", "cat", "catarray")),
    ("elementwise and norms", ("elementwise", "vectorized", "reduce", "norm", "silu", "mul", "add", "rsqrt",
                               "pow", "mean", "neg", "sigmoid", "unrolled", "triton")),
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, size: int, repeats: int = 20) -> float:
    """bf16 matrix-product rate (FLOP/s) of ``size``-cubed products, median of ``repeats``."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def call_flops(config, encoded) -> float:
    """Useful FLOPs of scoring ``encoded`` (linear layers, attention, head; bench/engine.py's definition)."""
    return sum(bench_engine.useful_flops(config, len(e.shared), [len(d) for d in e.documents])["total"]
               for e in encoded)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """One warm-up call, then the median seconds of ``repeats`` calls, and the warm-up's result."""
    result = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def roof(device: torch.device, quick: bool) -> dict:
    size = 1024 if quick or device.type != "cuda" else 8192
    rate = matmul_rate(device, size)
    print(f"[roof] bf16 {size}^3 products: {rate / 1e12:.4g} TFLOP/s", flush=True)
    return {"size": size, "flops_per_s": rate}


def classify(name: str) -> str:
    lowered = name.lower()
    for kind, keys in KERNEL_CLASSES:
        if any(k in lowered for k in keys):
            return kind
    return "other"


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def profile(engine: Reranker, encoded, device: torch.device) -> dict:
    """GPU time per kernel class and the GPU's idle share over one ``score_encoded`` call."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    engine.score_encoded(encoded)  # warm
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        engine.score_encoded(encoded)
        sync(device)
        wall = time.perf_counter() - start
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    else:  # a smoke run: the CPU's aten ops stand in for kernels
        kernels = [e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
    per_class: dict[str, float] = {}
    intervals = []
    for e in kernels:
        span = (e.time_range.end - e.time_range.start) / 1e6
        per_class[classify(e.name)] = per_class.get(classify(e.name), 0.0) + span
        intervals.append((e.time_range.start / 1e6, e.time_range.end / 1e6))
    busy = busy_time(intervals)
    out = {"wall_s": wall, "kernel_busy_s": busy, "idle_share": max(0.0, 1 - busy / wall), "kernels": len(kernels),
           "per_class_s": dict(sorted(per_class.items(), key=lambda kv: -kv[1]))}
    print(f"[profile] call {wall * 1e3:.1f} ms, kernels busy {busy * 1e3:.1f} ms, GPU idle {out['idle_share']:.0%}, "
          f"{len(kernels)} kernels", flush=True)
    for kind, seconds in out["per_class_s"].items():
        print(f"[profile]   {kind:24s} {seconds * 1e3:8.1f} ms  {seconds / wall:5.1%} of the call", flush=True)
    return out


def measure_engine(engine: Reranker, encoded, device: torch.device, repeats: int, rate: float | None, label: str) -> dict:
    """pairs/s, tokens/s, share of the roof and peak memory of one engine on ``encoded``."""
    config = engine.scorer.backbone.config
    pairs = sum(len(e.documents) for e in encoded)
    flops = call_flops(config, encoded)
    reset_peak(device)
    seconds, result = timed(lambda: engine.scorer.score(encoded), device, repeats)
    stats = result.stats
    row = {"median_s": seconds, "pairs_per_s": pairs / seconds, "tokens_per_s": stats.tokens / seconds,
           "passes": stats.forward_passes, "tokens": stats.tokens, "peak_gib": peak_gib(device),
           "roof_share": (flops / seconds / rate) if rate else None,
           "compiled_layers": engine.compiled_layers, "compiled_layers_failure": engine.compiled_layers_failure,
           "packed_check_failure": engine.packed_check_failure,
           "packed_check_difference": engine.packed_check_difference}
    share = f"{row['roof_share']:.0%} of the roof" if rate else "roof not measured"
    print(f"[{label}] {seconds:7.3f} s  {row['pairs_per_s']:8.1f} pairs/s  {row['tokens_per_s']:9.0f} tokens/s  "
          f"{share}  {stats.forward_passes} passes  peak {row['peak_gib'] or 0:.1f} GiB  "
          f"check diff {engine.packed_check_difference}", flush=True)
    return row


def fp8(load, requests, device: torch.device, repeats: int, rate: float | None) -> dict:
    """``load(dtype)`` builds an engine for float32, bfloat16 and fp8 in turn, one at a time."""
    from quantized import fidelity  # bench/quantized.py

    out: dict = {"dtypes": {}}
    scores = {}
    for dtype in ("float32", "bfloat16", "fp8"):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            engine = load(dtype)
        except ValueError as e:  # the config's refusal, or the device's (QuantizedDtypeError)
            out["dtypes"][dtype] = {"refused": str(e)}
            print(f"[fp8] {dtype}: refused: {e}", flush=True)
            continue
        encoded = [engine.encode(q, d) for q, d in requests]
        out["dtypes"][dtype] = measure_engine(engine, encoded, device, repeats, rate, f"fp8 step {dtype:8s}")
        scores[dtype] = engine.score_encoded(encoded)
        del engine, encoded
    for dtype in ("bfloat16", "fp8"):
        if dtype in scores:
            report = out["dtypes"][dtype]["vs_float32"] = fidelity(scores["float32"], scores[dtype])
            print(f"[fp8] {dtype} vs float32: max |diff| {report['max_abs_diff']:.4f}  p99 {report['p99_abs_diff']:.4f}"
                  f"  tau mean {report['mean_kendall_tau']:.4f}  top3 {report['top3_agreement']:.3f}", flush=True)
    if "fp8" in scores:
        out["fp8/bf16 pairs/s"] = out["dtypes"]["fp8"]["pairs_per_s"] / out["dtypes"]["bfloat16"]["pairs_per_s"]
        print(f"[fp8] fp8/bf16 pairs/s {out['fp8/bf16 pairs/s']:.2f}x (target 1.5x)", flush=True)
    return out


def released_shape_engine(shape: str, checkpoint: Path, device: torch.device, settings: dict,
                          varlen_kernel=None) -> Reranker:
    """An engine over random weights of a released shape, built on ``device`` (never on disk).

    ``shape``: a key of :data:`RELEASED_SHAPES`, or of ``rerank_core.synthetic.SHAPES`` (``tiny``:
    smoke runs on CPU).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rerank_core.synthetic import SHAPES

    config = AutoConfig.from_pretrained(checkpoint)
    if shape in RELEASED_SHAPES:
        config.update(RELEASED_SHAPES[shape])
    else:
        config.update({k: v for k, v in SHAPES[shape].items() if k in bench_engine.SHAPE_KEYS})
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    engine_config = EngineConfig(device=str(device), dtype="bfloat16", **settings)
    return Reranker(model, tokenizer, engine_config, name=f"random-{shape}", varlen_kernel=varlen_kernel)


def seq_cls_copy(checkpoint: Path, out: Path) -> Path:
    """The seq-cls conversion of ``checkpoint`` in ``out``: one logit, ``lm_head[yes] - lm_head[no]``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForSequenceClassification

    from rerank_core.head import answer_token_ids

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    causal = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    yes, no = answer_token_ids(tokenizer)
    config = causal.config
    config.num_labels = 1
    config.pad_token_id = 151643
    config.architectures = ["Qwen3ForSequenceClassification"]
    seq = Qwen3ForSequenceClassification(config).to(torch.bfloat16)
    seq.model.load_state_dict(causal.model.state_dict())
    weight = causal.get_output_embeddings().weight
    with torch.no_grad():
        seq.score.weight.copy_((weight[yes] - weight[no])[None])
    seq.save_pretrained(out)
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.save_pretrained(out)
    return out


def cross_encoder_pairs(requests) -> list[tuple[str, str]]:
    """(query, document) texts with the Qwen3-Reranker template applied by the caller."""
    return [(f"{PREFIX}<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: {q}\n", f"<Document>: {d}{SUFFIX}")
            for q, docs in requests for d in docs]


def peer(checkpoint: Path, device: torch.device, requests, repeats: int, batch_sizes: list[int],
         engine: Reranker) -> dict:
    """CrossEncoder (bf16, seq-cls copy) at each batch size against the engine on the same pairs."""
    from sentence_transformers import CrossEncoder

    pairs = cross_encoder_pairs(requests)
    with tempfile.TemporaryDirectory() as tmp:
        path = seq_cls_copy(checkpoint, Path(tmp) / "seq-cls")
        model = CrossEncoder(str(path), device=str(device), model_kwargs={"dtype": torch.bfloat16}, max_length=8192)
        out = {"batch_sizes": {}}
        for batch in batch_sizes:
            seconds, scores = timed(lambda batch=batch, model=model: model.predict(pairs, batch_size=batch, show_progress_bar=False),
                                    device, repeats)
            out["batch_sizes"][batch] = {"median_s": seconds, "pairs_per_s": len(pairs) / seconds}
            print(f"[peer] CrossEncoder bf16 batch {batch:4d}: {len(pairs) / seconds:8.1f} pairs/s", flush=True)
        del model
        gc.collect()
    best = max(out["batch_sizes"].items(), key=lambda kv: kv[1]["pairs_per_s"])
    encoded = [engine.encode(q, d) for q, d in requests]
    seconds, result = timed(lambda: engine.score_encoded(encoded), device, repeats)
    engine_rate = len(pairs) / seconds
    flat = [s for row in result for s in row]
    out.update({"best_batch": best[0], "best_pairs_per_s": best[1]["pairs_per_s"], "engine_pairs_per_s": engine_rate,
                "engine_vs_peer": engine_rate / best[1]["pairs_per_s"], "engine_scores_sample": flat[:4],
                "peer_scores_sample": [float(s) for s in scores[:4]]})
    print(f"[peer] engine {engine_rate:.1f} pairs/s = {out['engine_vs_peer']:.2f}x CrossEncoder at batch {best[0]}; "
          f"first scores engine {out['engine_scores_sample']} peer {out['peer_scores_sample']}", flush=True)
    return out
