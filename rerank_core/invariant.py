"""Batch-invariant linear layers: a row's output never depends on the rows beside it.

A CPU matrix-product library picks its blocking, and with it the order in which it sums the
products of a dot product, from the shape of the call. The same input row can therefore come out a
rounding step apart when it is multiplied together with 40 other rows or with 400 (oneDNN's
bf16 kernels on AMX do this for some widths, e.g. the 0.6B model's ``down_proj`` with 33 to 185
rows; fp32 differs already between 1 and 2 rows). A document's score would then depend on what
else shares its forward pass: on the load of the server, not only on the request.

:class:`TiledLinear` removes that dependence: it always multiplies exactly ``tile_rows`` rows at
once (the last tile is zero-padded). With the shape fixed, the kernel, its blocking and its
summation order are fixed, and one row's result does not depend on the other rows of its tile nor
on where in the tile it lies (checked by ``tests/test_invariance.py`` for every layer width of
the released models). Everything else in a packed pass is either computed per token (norms, RoPE,
activations, embeddings) or per segment (attention), so a score depends only on its own pair.

On a CPU whose oneDNN has bf16 kernels (:func:`can_prepack`) a bf16 weight is also reordered once
into the blocked layout the kernel reads (``torch.ops.mkldnn._reorder_linear_weight``), instead of
on every call, and the plain weight is dropped, so this costs no memory. On other CPUs (AVX2 only)
the tiles multiply the plain weight with torch's own bf16 kernels, which are just as invariant. The tile size trades the padding of the last
tile (up to ``tile_rows - 1`` rows per layer and pass) against the speed of each product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu import cpu_features

DEFAULT_TILE_ROWS = 256


def can_prepack(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can be reordered once for oneDNN: a CPU bf16 weight, on a CPU where
    torch's oneDNN has bf16 kernels (AVX-512 BW/VL/DQ or AVX-NE-CONVERT, :mod:`rerank_core.cpu`).
    Elsewhere torch refuses the reorder, and the tiles multiply the plain weight."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and cpu_features().onednn_bf16
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class TiledLinear(torch.nn.Module):
    """``y = x @ W.T + b`` computed in fixed tiles of ``tile_rows`` rows.

    Contract: for any leading shape of ``x``, every output row is bit-identical to what the same
    input row gives in any other call of this module (same weights, same device, same threads).

    Args:
        linear: the layer to replace; its weight is taken over (reordered when ``prepack``).
        tile_rows: rows per matrix product.
        prepack: reorder a CPU bf16 weight once for oneDNN; ignored where that is not possible.
    """

    def __init__(self, linear: torch.nn.Linear, tile_rows: int = DEFAULT_TILE_ROWS, prepack: bool = True):
        super().__init__()
        if tile_rows < 1:
            raise ValueError(f"tile_rows must be >= 1, got {tile_rows}")
        weight = linear.weight.detach()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.tile_rows = tile_rows
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.prepacked = prepack and can_prepack(weight)
        if self.prepacked:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, tile_rows)
        else:
            self.weight = weight

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        if self.prepacked:
            return torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        return F.linear(rows, self.weight, self.bias)

    # A graph break under torch.compile (rerank_core.compiled): the loop over tiles depends on
    # the number of rows, which would otherwise force a recompilation per pass size.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        n, tile = rows.shape[0], self.tile_rows
        out = rows.new_empty((n, self.out_features))
        full = n - n % tile
        for start in range(0, full, tile):
            out[start : start + tile] = self._product(rows[start : start + tile])
        if full < n:
            tail = rows.new_zeros((tile, self.in_features))
            tail[: n - full] = rows[full:]
            out[full:] = self._product(tail)[: n - full]
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"tile_rows={self.tile_rows}, prepacked={self.prepacked}"
        )


def tile_linear_layers(module: torch.nn.Module, tile_rows: int = DEFAULT_TILE_ROWS, prepack: bool = True) -> int:
    """Replace every ``nn.Linear`` inside ``module`` by a :class:`TiledLinear`, in place.

    Returns:
        the number of layers replaced.
    """
    targets = [(name, child) for name, child in module.named_modules() if isinstance(child, torch.nn.Linear)]
    for name, linear in targets:
        _replace_submodule(module, name, TiledLinear(linear, tile_rows, prepack))
    return len(targets)


def _replace_submodule(module: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    """Put ``new`` where ``module``'s submodule ``name`` (dotted) is."""
    parent_name, _, attr = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, attr, new)


def untile_linear_layers(module: torch.nn.Module) -> int:
    """Put plain ``nn.Linear`` layers back for every :class:`TiledLinear` inside ``module``, in place.

    A layer whose weight was reordered for oneDNN (``prepacked``) has no plain weight left and
    stays tiled (its products are the same ones, in tiles).

    Returns:
        the number of layers that stay tiled.
    """
    kept = 0
    for name, tiled in [(n, m) for n, m in module.named_modules() if isinstance(m, TiledLinear)]:
        if tiled.prepacked:
            kept += 1
            continue
        linear = torch.nn.Linear(tiled.in_features, tiled.out_features, bias=tiled.bias is not None,
                                 device=tiled.weight.device, dtype=tiled.weight.dtype)
        linear.weight = torch.nn.Parameter(tiled.weight, requires_grad=False)
        if tiled.bias is not None:
            linear.bias = torch.nn.Parameter(tiled.bias, requires_grad=False)
        _replace_submodule(module, name, linear)
    return kept


def tiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds any :class:`TiledLinear` (:func:`tile_linear_layers` ran on it)."""
    return any(isinstance(m, TiledLinear) for m in module.modules())
