"""Decoder layers compiled by ``torch.compile``, attention left eager: for CPU passes in bf16.

Why: once the matrix products run on AMX in bf16, the work between them is a large share of a
pass. transformers computes each RMSNorm as six eager operations (two of them dtype
conversions), RoPE as ten (two concatenations for ``rotate_half``), SwiGLU's ``silu(gate) * up``
as two, and each residual add as one, every one reading and writing a whole activation.
Compiled, each run of them between two matrix products becomes one kernel. Measured on this
project's CPU (2 threads, bf16, 3,000 tokens of the 0.6B shape): RoPE 9.9 ms eager vs 2.5 ms
compiled per layer, ``silu(gate) * up`` 5.5 vs 3.8 ms; the matrix products themselves run the
same aten kernels as in eager mode. End to end figures: docs/benchmarks.md.

How: the class's ``forward`` is compiled once per process (``dynamic=True``: one compiled graph for
every number of tokens) and every decoder layer's instance ``forward`` calls it with the layer as
its first argument, so the 28 layers of the 0.6B model share one compilation. The parts that are
Python loops over a pass's layout stay eager, as graph breaks (:func:`torch.compiler.disable` at
their definitions): packed attention (:func:`rerank_core.packing.segment_attention`,
:func:`rerank_core.varlen.varlen_attention`) and the batch-invariant linear layers
(:class:`rerank_core.invariant.TiledLinear`). Only packed passes are compiled: padded ones pass a
recording cache object whose state would force a recompilation per layer.

Numerics: inductor computes a fused run of bf16 operations in float32 and rounds once at its end,
where eager rounds after every operation; a value can differ by a rounding step, and scores stay
as close to the float32 scores as eager ones (docs/benchmarks.md). Every compiled operation works
on one token at a time (norms, RoPE, activations, adds), so a score still does not depend on what
shares its pass (``tests/test_invariance.py`` runs with the layers compiled).

Compilation happens at the engine's start-up probe (seconds; inductor keeps its kernels in a cache
on disk, so later starts are faster) and needs a C++ compiler. Without one, or on any compile
error, the engine puts the eager layers back and logs why (:func:`uncompile_layers`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .cpu import pin_compiled_vector_width

# One compiled forward per decoder-layer class, shared by all its instances in this process.
_COMPILED: dict[type, Callable] = {}


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of ``model``: modules whose class name ends with ``DecoderLayer``."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def compiled_forward(cls: type) -> Callable:
    """``cls.forward`` compiled (lazily: compiling starts on the first call), one per class."""
    if cls not in _COMPILED:
        pin_compiled_vector_width()
        _COMPILED[cls] = torch.compile(cls.forward, dynamic=True)
    return _COMPILED[cls]


class _CompiledForward:
    """A layer's replacement ``forward``: its class's compiled forward, with the layer as ``self``."""

    def __init__(self, layer: torch.nn.Module):
        self.layer = layer

    def __call__(self, *args, **kwargs):
        return compiled_forward(type(self.layer))(self.layer, *args, **kwargs)


def compile_layers(model: torch.nn.Module) -> int:
    """Route every decoder layer of ``model`` through its compiled forward, in place; returns how many.

    Compilation is lazy: the first forward pass compiles, and a compile error surfaces there
    (then call :func:`uncompile_layers`).
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.forward = _CompiledForward(layer)
    return len(layers)


def uncompile_layers(model: torch.nn.Module) -> None:
    """Give every decoder layer of ``model`` its class's eager ``forward`` back."""
    for layer in decoder_layers(model):
        if isinstance(layer.__dict__.get("forward"), _CompiledForward):
            del layer.forward


def compiled_layer(layer: torch.nn.Module) -> bool:
    """Whether ``layer`` runs its compiled forward (:func:`compile_layers`)."""
    return isinstance(layer.__dict__.get("forward"), _CompiledForward)


def compiled(model: torch.nn.Module) -> bool:
    """Whether ``model``'s decoder layers run their compiled forward."""
    layers = decoder_layers(model)
    return bool(layers) and all(compiled_layer(m) for m in layers)
