"""What this CPU can do, as torch reports it: the one probe every CPU-dependent choice reads.

The engine's CPU paths depend on a few instruction-set features:

* ``dtype="auto"`` picks bfloat16 only where bf16 matrix products are native (AMX-BF16 or
  AVX512-BF16): there they run several times faster than float32; on an AVX2-only CPU bf16 is
  emulated (converted to float32 and back) and about 4x slower than float32.
* The batch-invariant linear layers (:mod:`rerank_core.invariant`) reorder a bf16 weight once for
  oneDNN, which torch allows only where oneDNN has bf16 kernels (AVX-512 BW/VL/DQ or
  AVX-NE-CONVERT); elsewhere they multiply plain bf16 tiles.
* Packed attention pads key counts to AMX tile blocks in bf16 (:data:`rerank_core.packing.KEY_BLOCK`)
  only where there is AMX: the slow tail path it avoids is AMX's.
* Compiled decoder layers are on by default only where bf16 is native, the only kind of CPU they
  were measured on.

:func:`cpu_features` reads ``torch.cpu.get_capabilities()`` (cpuinfo) and torch's own oneDNN
probe once. oneDNN's ceiling on the instruction set, ``ONEDNN_MAX_CPU_ISA`` (or its older name
``DNNL_MAX_CPU_ISA``), is honoured too: with ``ONEDNN_MAX_CPU_ISA=AVX2`` an AMX Xeon chooses as an
AVX2-only CPU does, and oneDNN runs its AVX2 kernels (torch's oneDNN probe follows it). torch's
own kernels and MKL's fp32 products have settings of their own (``ATEN_CPU_CAPABILITY=avx2``,
``MKL_ENABLE_INSTRUCTIONS=AVX2``); ``scripts/test-cpu-kind`` sets all three, which is how the AVX2
paths are tested on AMX machines. A ceiling can only lower what the CPU has.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import asdict, dataclass, replace

import torch

# oneDNN's ISA names in increasing order (oneDNN's ``dnnl_cpu_isa_t``; the AVX10 names are the
# current spellings of the AVX512_CORE_FP16 / AMX ones). Each feature below needs at least one.
ONEDNN_ISAS = (
    "SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
    "AVX10_2_512_AMX_2", "ALL",
)
_ISA_ALIASES = {
    "AVX512_CORE_FP16": "AVX10_1_512",
    "AVX512_CORE_AMX": "AVX10_1_512_AMX",
    "AVX512_CORE_AMX_FP16": "AVX10_1_512_AMX_FP16",
    "DEFAULT": "ALL",
}
# The lowest oneDNN ISA that still allows each feature. oneDNN's AVX2_VNNI levels are not strictly
# below AVX512_CORE (an AVX-512 ceiling drops AVX-NE-CONVERT there); treated as a line here, which
# changes no choice: under an AVX-512 ceiling oneDNN has bf16 kernels through AVX-512 either way.
_NEEDS = {
    "avx2": "AVX2",
    "avx_ne_convert": "AVX2_VNNI_2",
    "avx512": "AVX512_CORE",
    "avx512_bf16": "AVX512_CORE_BF16",
    "amx_bf16": "AVX10_1_512_AMX",
}
CEILING_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")

log = logging.getLogger(__name__)


def onednn_isa(name: str) -> str:
    """``name`` as one of :data:`ONEDNN_ISAS` (case-insensitive, old names accepted).

    Raises:
        ValueError: not an ISA name oneDNN knows.
    """
    isa = _ISA_ALIASES.get(name.strip().upper(), name.strip().upper())
    if isa not in ONEDNN_ISAS:
        known = ", ".join(ONEDNN_ISAS + tuple(_ISA_ALIASES))
        raise ValueError(f"unknown oneDNN CPU ISA {name!r}; one of {known}")
    return isa


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU features the engine's choices depend on.

    Attributes:
        name: the CPU's model name, as cpuinfo reports it.
        cores: physical cores.
        avx2: AVX2 and FMA.
        avx512: AVX-512 F, BW, VL and DQ (Skylake-SP and later Xeons, AMD Zen 4).
        avx512_bf16: AVX512-BF16 (bf16 dot products).
        amx_bf16: AMX tiles with bf16 (Sapphire Rapids and later Xeons).
        avx_ne_convert: AVX-NE-CONVERT (bf16 conversions on some AVX2 CPUs).
        onednn_bf16: torch's oneDNN runs bf16 kernels here (its weight reorder among them).
        ceiling: the oneDNN ISA ceiling applied (``ONEDNN_MAX_CPU_ISA``), or ``None``.
    """

    name: str
    cores: int
    avx2: bool
    avx512: bool
    avx512_bf16: bool
    amx_bf16: bool
    avx_ne_convert: bool
    onednn_bf16: bool
    ceiling: str | None = None

    @property
    def native_bf16(self) -> bool:
        """bf16 matrix products run natively (AMX-BF16 or AVX512-BF16), faster than float32."""
        return self.amx_bf16 or self.avx512_bf16

    @property
    def isa(self) -> str:
        """The best instruction set the engine tells apart: AMX, AVX512-BF16, AVX-512, AVX2 or older."""
        if self.amx_bf16:
            return "AMX"
        if self.avx512_bf16:
            return "AVX512-BF16"
        if self.avx512:
            return "AVX-512"
        return "AVX2" if self.avx2 else "pre-AVX2"

    def capped(self, isa: str) -> CpuFeatures:
        """These features as seen under the oneDNN ISA ceiling ``isa`` (see :func:`onednn_isa`)."""
        isa = onednn_isa(isa)
        level = ONEDNN_ISAS.index(isa)
        lowered = {f: getattr(self, f) and level >= ONEDNN_ISAS.index(need) for f, need in _NEEDS.items()}
        onednn_bf16 = self.onednn_bf16 and (lowered["avx512"] or lowered["avx_ne_convert"])
        return replace(self, **lowered, onednn_bf16=onednn_bf16, ceiling=isa)

    def describe(self) -> str:
        """One line for logs and benchmark output, e.g. ``AMD EPYC, 2 cores, AVX2 (bf16 emulated)``."""
        bf16 = "bf16 native" if self.native_bf16 else "bf16 emulated"
        ceiling = f", capped at {self.ceiling}" if self.ceiling else ""
        return f"{self.name}, {self.cores} cores, {self.isa} ({bf16}{ceiling})"

    def as_dict(self) -> dict:
        """The fields, with :attr:`isa` and :attr:`native_bf16`, for JSON output."""
        return {**asdict(self), "isa": self.isa, "native_bf16": self.native_bf16}


def _ceiling() -> str | None:
    """The ceiling in the environment, or ``None``; a name oneDNN does not know is ignored with a
    warning, as oneDNN itself ignores it."""
    for variable in CEILING_VARIABLES:
        value = os.environ.get(variable, "").strip()
        if value:
            try:
                return onednn_isa(value)
            except ValueError as e:
                log.warning("%s ignored: %s", variable, e)
                return None
    return None


def probe() -> CpuFeatures:
    """Read the features from torch now (uncached; :func:`cpu_features` is the cached one).

    A ``ONEDNN_MAX_CPU_ISA``/``DNNL_MAX_CPU_ISA`` that oneDNN does not know is ignored (logged).
    """
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        found = capabilities()
    else:  # torch < 2.8: these two, and ATen's own dispatch level for AVX-512
        avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
        found = {"amx_bf16": torch.cpu._is_amx_tile_supported(), "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
                 **{f: avx512 for f in ("avx512_f", "avx512_bw", "avx512_vl", "avx512_dq")}}
    mkldnn = torch.backends.mkldnn.is_available()
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    features = CpuFeatures(
        name=str(found.get("cpu_name") or "unknown CPU"),
        cores=int(found.get("num_physical_cores") or os.cpu_count() or 1),
        avx2=bool(found.get("avx2", torch.backends.cpu.get_cpu_capability() != "DEFAULT")),
        avx512=all(found.get(f, False) for f in ("avx512_f", "avx512_bw", "avx512_vl", "avx512_dq")),
        avx512_bf16=mkldnn and bool(found.get("avx512_bf16")),
        amx_bf16=mkldnn and bool(found.get("amx_bf16")),
        avx_ne_convert=bool(found.get("avx_ne_convert")),
        onednn_bf16=(mkldnn and bool(check())) if check is not None else False,
    )
    ceiling = _ceiling()
    return features.capped(ceiling) if ceiling else features


@functools.cache
def _probed() -> CpuFeatures:
    return probe()


_forced: list[CpuFeatures] = []


def cpu_features() -> CpuFeatures:
    """This process's :class:`CpuFeatures`, probed once (see :func:`probe`), or the ones
    :func:`force_cpu_features` stands in."""
    return _forced[-1] if _forced else _probed()


@contextlib.contextmanager
def force_cpu_features(features: CpuFeatures):
    """Make every choice read ``features`` inside the block (tests of another CPU kind's choices).

    Process-wide, not per thread (the compute thread must see it too), and not thread-safe: for
    tests, one block at a time.

    Only the engine's choices change: torch and oneDNN still run this CPU's kernels, so forcing
    features this CPU lacks (AMX on an AVX2 CPU) is for checking choices, not for running them.
    To run as a lesser CPU, set ``ONEDNN_MAX_CPU_ISA`` before the process starts instead.
    """
    _forced.append(features)
    try:
        yield features
    finally:
        _forced.pop()


def pin_compiled_vector_width() -> None:
    """Put the CPU's vector width into inductor's compile-cache key; call before ``torch.compile``.

    inductor's cache of compiled graphs (torch 2.13) keys a graph without the vector instruction
    set its kernels were written for, and rebuilds a cached kernel with the flags of the process
    that finds it. A process of another width (another CPU sharing a persistent
    ``TORCHINDUCTOR_CACHE_DIR``, or ``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 CPU, as
    ``scripts/test-cpu-kind`` runs) then runs AVX-512 loops over AVX2 vectors or the reverse:
    seen here as NaN scores and as heap corruption. inductor's ``cpp.simdlen`` setting is part of
    that key; set to the width inductor picks anyway, it changes no kernel and keeps each width's
    entries apart. A width already set (by the user) is left as it is.
    """
    from torch._inductor import config as inductor_config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    if inductor_config.cpp.simdlen is None:
        width = pick_vec_isa().bit_width()
        if width:  # 0: no vector ISA inductor can use; nothing to tell apart
            inductor_config.cpp.simdlen = width
