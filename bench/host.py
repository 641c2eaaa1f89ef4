"""Host-side time of the engine's CUDA path, measured on any machine: no GPU needed.

Run from the repository root:

    python bench/host.py                       # the GPU workload: 8 queries x 64 documents
    python bench/host.py --engine-root DIR     # the same, with the engine of another checkout
    python bench/host.py --json host.json

A GPU replica is host-bound when the Python between its kernels takes longer than the kernels:
the GPU then idles, however fast its matrix units are. That Python can be timed on a CPU, with
the device arithmetic taken out, in two parts:

1. **Pass preparation** (per call): planning, each pass's token ids, positions, kept rows and
   varlen layout (``rerank_core/varlen.py``), its transfer to the device and the head's read-back
   of the scores. Timed by running the varlen path of :class:`~rerank_core.forward.PairScorer` on
   the GPU workload (bench/gpu.py's: 8 queries x 64 documents of 30..300 words, 512 pairs, the
   real Qwen3 tokenizer) with the decoder stack replaced by a stand-in that returns zeros of the
   right shape: everything but the layers, at the real token counts.
2. **The layer stack** (per pass): one forward pass through a 28-layer model of the 0.6B's depth
   and tiny width (hidden 64) on CPU, with a stand-in varlen kernel that returns its output
   buffer unfilled, over a pass of 64 one-token segments after one-token prefixes (the segment
   and store structure of a real pass, no arithmetic to speak of). What remains is transformers'
   and the engine's Python per layer and torch's dispatch of each op. The ATen ops of one pass are
   counted (each one a kernel launch on CUDA, which adds its launch cost on top of the time here).

The estimate of host time per call is part 1 plus passes per call times part 2, for each token
budget in ``--budgets`` (a larger budget means fewer passes). It is set against the GPU time of
the same call at the target rate of issue 24 (450k real tokens/s on an H100/H200): the host must
stay under 10 % of it. On CUDA the host's work overlaps the GPU's only where nothing waits for
the device between passes (``rerank_core/staging.py``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGET_TOKENS_PER_S = 450_000  # issue 24's GPU target, 0.6B shape, bf16
HOST_SHARE = 0.10  # the host's most share of a call's GPU time at that rate


def null_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """``varlen_attn``'s signature, no arithmetic: the output buffer, unfilled."""
    return torch.empty_like(query)


class StandInStack(torch.nn.Module):
    """Replaces a decoder stack: reads its inputs' shapes, returns zero hidden states."""

    def __init__(self, real: torch.nn.Module):
        super().__init__()
        self.real = real
        self.config = real.config

    def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=False, **kwargs):
        hidden = torch.zeros(1, input_ids.shape[1], self.config.hidden_size)
        return types.SimpleNamespace(last_hidden_state=hidden)


def tiny_deep_model(config, layers: int):
    """A Qwen3 causal LM of ``config``'s vocabulary and ``layers`` layers, tiny width, fp32, CPU."""
    from transformers import AutoModelForCausalLM

    small = type(config).from_dict(config.to_dict())
    small.update(dict(num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(small, dtype=torch.float32, attn_implementation="sdpa").eval()


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_ops(fn) -> tuple[int, int]:
    """ATen ops dispatched by ``fn()``: ``(all, computing)``, where computing ones exclude views
    (transposes, slices: no kernel launch on CUDA)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = [0, 0]

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            counts[0] += 1
            counts[1] += not func.is_view
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return counts[0], counts[1]


def load_engine_package(root: Path) -> None:
    """Import ``rerank_core`` from ``root``, ahead of an installed (editable) copy."""
    import importlib.util

    init = root / "rerank_core" / "__init__.py"
    loaded = sys.modules.get("rerank_core")
    if loaded is not None and Path(loaded.__file__).resolve() == init.resolve():
        return  # already this one (a second import would make a second copy of its classes)
    spec = importlib.util.spec_from_file_location("rerank_core", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["rerank_core"] = module
    spec.loader.exec_module(module)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-root", type=Path, default=ROOT,
                        help="checkout whose rerank_core is timed (default: this one), for before/after runs")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a checkpoint whose tokenizer and config are used (default: bench/engine.py's 0.6B one)")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--budgets", default="8192,16384,32768,65536", help="max_batch_tokens values")
    parser.add_argument("--layers", type=int, default=28, help="decoder layers (28: the 0.6B)")
    parser.add_argument("--pairs", type=int, default=64, help="max_batch_pairs (rows per pass)")
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the layer stack compiled (inductor on CPU; default on)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    load_engine_package(args.engine_root.resolve())
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    import engine as bench_engine  # bench/engine.py: the checkpoint with the real tokenizer
    from transformers import AutoConfig, AutoTokenizer

    from bench.hardware import describe, summary

    forward = importlib.import_module("rerank_core.forward")
    head_module = importlib.import_module("rerank_core.head")
    prompt = importlib.import_module("rerank_core.prompt")
    varlen = importlib.import_module("rerank_core.varlen")
    packing = importlib.import_module("rerank_core.packing")
    print(f"engine: {Path(forward.__file__).parent}", flush=True)
    info = describe()
    print(summary(info), flush=True)
    torch.set_num_threads(1)  # host work is one thread; fewer threads also steadies the figures

    checkpoint = args.checkpoint or bench_engine.ensure_checkpoint(bench_engine.DEFAULT_CHECKPOINT)[0]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    encoder = prompt.PromptEncoder(tokenizer, 8192)
    requests = [(f"{bench_engine.QUERY} ({q})", bench_engine.workload_a(seed=q, count=args.docs))
                for q in range(args.queries)]
    encoded = [encoder.encode(q, d) for q, d in requests]
    tokens = sum(len(e.shared) + sum(map(len, e.documents)) for e in encoded)
    pairs = args.queries * args.docs
    print(f"workload: {pairs} pairs, {tokens} tokens (packed, shared parts once)", flush=True)

    model = tiny_deep_model(config, args.layers)
    yes, no = head_module.answer_token_ids(tokenizer)

    def scorer(budget: int):
        head = head_module.YesNoHead(model.get_output_embeddings().weight, yes, no)
        return forward.PairScorer(model.get_decoder(), head, budget, args.pairs, True, 0.5, True,
                                  varlen.VarlenAttention(null_varlen_attn))

    # 2. The layer stack, per pass: 64 one-token segments after one-token prefixes in one store.
    stack = scorer(8192)
    prefix_pass = packing.Segments([1] * 8, [None] * 8, record=[])
    ids = torch.zeros((1, 8), dtype=torch.long)
    stack.backbone(input_ids=ids, position_ids=torch.zeros_like(ids), use_cache=False,
                   attention_mask={"full_attention": stack.packed_attention.prepare(
                       prefix_pass, varlen.build_layout(prefix_pass))} if hasattr(varlen, "host_layout")
                   else {"full_attention": stack.packed_attention.prepare(prefix_pass, torch.device("cpu"))})
    refs = [packing.PrefixRef(0, q, 1) for q in range(8) for _ in range(8)]
    segments = packing.Segments([1] * 64, refs, [prefix_pass.record])
    pass_ids = torch.zeros((1, 64), dtype=torch.long)
    positions = torch.ones_like(pass_ids)

    def one_pass():
        if hasattr(varlen, "host_layout"):
            mask = stack.packed_attention.prepare(segments, varlen.build_layout(segments))
        else:
            mask = stack.packed_attention.prepare(segments, torch.device("cpu"))
        stack.backbone(input_ids=pass_ids, position_ids=positions, attention_mask={"full_attention": mask},
                       use_cache=False)

    layer_stacks = {}
    compiled = importlib.import_module("rerank_core.compiled")
    for kind in ("eager", "compiled") if args.compiled else ("eager",):
        if kind == "compiled":
            # Inductor on CPU stands in for inductor on CUDA: the Python per layer that remains
            # once each run of elementwise ops between matrix products is one kernel.
            compiled.compile_layers(model.get_decoder())
        with torch.inference_mode():
            one_pass()
            seconds = median_s(one_pass, args.repeats)
            ops, computing = count_ops(one_pass) if kind == "eager" else (None, None)
        layer_stacks[kind] = {"per_pass_ms": seconds * 1e3, "aten_ops": ops, "computing_ops": computing}
        counted = f", {ops} ATen ops of which {computing} not views" if ops else ""
        print(f"[layers {kind:8s}] one pass through {args.layers} layers: {seconds * 1e3:6.2f} ms host{counted}",
              flush=True)
    compiled.uncompile_layers(model.get_decoder())

    # 1. Pass preparation, per call, for each budget; and the estimate per call.
    report = {"hardware": info, "engine": str(Path(forward.__file__).parent), "pairs": pairs, "tokens": tokens,
              "layers": layer_stacks, "budgets": {}}
    gpu_s = tokens / TARGET_TOKENS_PER_S
    print(f"GPU time of the call at {TARGET_TOKENS_PER_S / 1e3:.0f}k tokens/s: {gpu_s * 1e3:.0f} ms; "
          f"host budget ({HOST_SHARE:.0%}): {gpu_s * HOST_SHARE * 1e3:.1f} ms", flush=True)
    for budget in [int(b) for b in args.budgets.split(",")]:
        prep = scorer(budget)
        prep.backbone = StandInStack(prep.backbone)
        stats = prep.score(encoded).stats
        prep_s = median_s(lambda prep=prep: prep.score(encoded), args.repeats)
        hosts = {kind: prep_s + stats.forward_passes * v["per_pass_ms"] / 1e3 for kind, v in layer_stacks.items()}
        report["budgets"][budget] = {
            "passes": stats.forward_passes, "prep_ms": prep_s * 1e3,
            **{f"host_ms_{kind}": h * 1e3 for kind, h in hosts.items()},
            **{f"share_of_gpu_at_target_{kind}": h / gpu_s for kind, h in hosts.items()},
        }
        estimates = "  ".join(f"{kind} {h * 1e3:6.1f} ms ({h / gpu_s:4.0%})" for kind, h in hosts.items())
        print(f"[budget {budget:6d}] {stats.forward_passes:3d} passes  preparation {prep_s * 1e3:5.1f} ms  "
              f"host per call (share of the GPU time at target): {estimates}", flush=True)
    model.get_decoder().set_attn_implementation("sdpa")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
