"""Stand-ins for the kinds of x86 CPU the engine tells apart (rerank_core.cpu), for tests of the
choices each kind gets; see ``rerank_core.cpu.force_cpu_features``."""

from rerank_core.cpu import CpuFeatures

_AMX = CpuFeatures(
    name="Intel Xeon (Sapphire Rapids)", cores=2, avx2=True, avx512=True, avx512_bf16=True, amx_bf16=True,
    avx_ne_convert=False, onednn_bf16=True,
)
CPU_KINDS = {
    "AMX": _AMX,
    "AVX512-BF16": _AMX.capped("AVX512_CORE_BF16"),
    "AVX-512": _AMX.capped("AVX512_CORE"),
    "AVX2": _AMX.capped("AVX2"),
}
