"""Per-target constants of the CPU schedules, in one object (as dlight's ``gpu/matmul.py`` ``get_configs``).

The rules are target-neutral SIMD code; what differs between an AVX-512 server, an AVX2 desktop and the
NEON cores of a Raspberry Pi is read from here: the SIMD width and which element types it computes, how
many vector registers there are for accumulators, and the L2 size.  The thread count is not here: kernels
run on the pool of the process that calls them (torch's), sized at run time, not by ``num-cores``.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.target import codegen

# The L2 one core sees, where the schedules were measured: Emerald Rapids (2 MiB per core).  Kept for
# every x86 CPU, whose measured behaviour must not change with the CPU's name.
X86_L2_BYTES = 2 << 20
# ARM cores by LLVM CPU name, from the vendors' manuals (not measured): the Raspberry Pi 4's Cortex-A72
# cluster shares 1 MiB, the Pi 5's Cortex-A76 has 512 KiB per core, the Pi 3's Cortex-A53 cluster 512 KiB.
ARM_L2_BYTES = {"cortex-a72": 1 << 20, "cortex-a76": 512 << 10, "cortex-a53": 512 << 10, "cortex-a55": 256 << 10}
ARM_DEFAULT_L2_BYTES = 512 << 10  # an unnamed ARM core: the common size of the cores above
# x86 CPUs whose FMA units are narrower than their registers, by LLVM CPU name: AMD's Zen 4 runs each 512-bit
# AVX-512 FMA as two 256-bit halves, so a vector of 8 float32 lanes costs it what one of 16 does.  Measured
# here (znver4, conv 16->33 3x5 on 2x16x50x100, output channels padded): blocks of 8 (40 channels) 0.54 ms,
# blocks of 16 (48 channels) 0.68 ms.  Intel's AVX-512 cores and Zen 5 have full-width 512-bit FMAs.
X86_FMA_BITS = {"znver4": 256}
# x86 CPUs, by LLVM CPU name, whose ungrouped stride-1 1x1 convs run row-vectorized (``CpuConv2dSpatial``, torch's
# weight layout) from this many output pixels up, instead of on output-channel blocks.  A 1x1 conv's reduction
# is short, so the blocked tile's write-back (a transpose to NCHW, 7 columns per channel) weighs; rows of 16
# contiguous outputs per channel store whole cache lines.  Measured on znver4 (2 threads, MobileNetV2's
# pointwise convs, both layouts interleaved call by call, blocked time / row-vectorized time): 112x112 1.14-1.61,
# 56x56 1.16-1.54, 28x28 0.96-1.18, 14x14 0.90-1.09, 7x7 0.64-0.72.  Not measured elsewhere (Emerald Rapids'
# shipped MobileNetV2 records were tuned on the blocked layout).
X86_POINTWISE_ROWS_MIN_PIXELS = {"znver4": 56 * 56}


@dataclass(frozen=True)
class CpuConfig:
    """What the CPU rules need to know about a target's cores."""

    isa: str  # "x86", "aarch64" or "arm" (32-bit ARM with NEON)
    vector_bits: int  # one SIMD register
    simd_dtypes: tuple[str, ...]  # element types the SIMD unit computes (armv7 NEON has no float64)
    vector_registers: int  # architectural SIMD registers
    l2_bytes: int
    # Whether a conv's reduction loops over kernel taps outside input channels.  x86 folds each broadcast
    # input into its FMA as a memory operand, so LLVM's unrolled 3x3 taps inside a channel cost no
    # registers; ARM loads every operand into a register, and on armv7's 16 the unrolled taps spilled
    # (llvm-mca, Cortex-A72, conv 64->64 3x3: 0.35 vector FMAs per cycle with 117 stack accesses per
    # iteration; taps outside: 0.79, none).  AArch64's 32 registers absorb it (0.98 against 0.95).
    taps_outer: bool = False
    # SIMD registers of output columns in a depthwise (row-vectorized) conv tile.  Four on x86 and AArch64;
    # on armv7 four registers plus the 3x3 taps' inputs spilled (llvm-mca, Cortex-A72, depthwise 3x3 at
    # 56x56: 0.38 vector FMAs per cycle, 37 stack accesses per iteration; two registers: 0.66, 3).
    row_vectors: int = 4
    # The width the FMA units (and the other vector units) compute at once, where narrower than a register
    # (``X86_FMA_BITS``).
    fma_bits: int | None = None
    # From how many output pixels a stride-1 1x1 conv runs row-vectorized (``X86_POINTWISE_ROWS_MIN_PIXELS``);
    # None: never.
    pointwise_rows_min_pixels: int | None = None

    def vector_lanes(self, dtype: str) -> int:
        """Elements of ``dtype`` in one SIMD register; 1 where the SIMD unit does not compute ``dtype``."""
        if dtype not in self.simd_dtypes:
            return 1
        return max(1, self.vector_bits // tvm.DataType(dtype).bits)

    def fma_lanes(self, dtype: str) -> int:
        """Elements of ``dtype`` one pass through the FMA units computes: a whole register but on CPUs that
        split wide vectors (``X86_FMA_BITS``)."""
        lanes = self.vector_lanes(dtype)
        return lanes if self.fma_bits is None else min(lanes, max(1, self.fma_bits // tvm.DataType(dtype).bits))

    @property
    def register_tile_limit(self) -> int:
        """How many accumulator vectors a micro-kernel may keep live: 32 registers on AVX-512 and A64 NEON,
        16 on AVX2 and armv7 NEON; a few stay free for the weight vector and the broadcast input."""
        return self.vector_registers - 4

    @property
    def conv_accumulator_limit(self) -> int:
        """Accumulator vectors of a conv register tile: half of the registers (measured on AVX-512:
        fuller tiles ran slower, see ``conv2d.py``)."""
        return self.vector_registers // 2


def _isa(target: tvm.target.Target) -> str | None:
    if target.kind.name != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", ""))
    if triple.startswith(("x86_64", "i386", "i686")):
        return "x86"
    if triple.startswith(("aarch64", "arm64")):
        return "aarch64"
    # 32-bit ARM: the rules are SIMD code, so only where NEON is there (armv7-a has it by default)
    if triple.startswith(("arm", "thumb")) and codegen.target_has_features("neon", target):
        return "arm"
    return None


def _x86_config(target: tvm.target.Target) -> CpuConfig:
    # From the CPU's features: LLVM's own vector width answers 512 for every x86_64 CPU, AVX2 ones included.
    avx512 = codegen.target_has_features("avx512f", target)
    bits = 512 if avx512 else 256 if codegen.target_has_features("avx", target) else 128
    long_mode = str(target.attrs["mtriple"]).startswith("x86_64")
    registers = (32 if avx512 else 16) if long_mode else 8
    cpu = str(target.attrs.get("mcpu", ""))
    return CpuConfig(
        "x86",
        bits,
        ("float32", "float64"),
        registers,
        X86_L2_BYTES,
        fma_bits=X86_FMA_BITS.get(cpu),
        pointwise_rows_min_pixels=X86_POINTWISE_ROWS_MIN_PIXELS.get(cpu),
    )


def _arm_config(target: tvm.target.Target, isa: str) -> CpuConfig:
    l2 = ARM_L2_BYTES.get(str(target.attrs.get("mcpu", "")), ARM_DEFAULT_L2_BYTES)
    if isa == "aarch64":  # A64 NEON: 32 registers of 128 bits, float32 and float64 lanes
        return CpuConfig(isa, 128, ("float32", "float64"), 32, l2)
    # armv7 NEON: 16 quad registers, float32 only (float64 runs on the scalar VFP unit)
    return CpuConfig(isa, 128, ("float32",), 16, l2, taps_outer=True, row_vectors=2)


_configs: dict[str, CpuConfig | None] = {}  # by the target's JSON: LLVM's feature queries take milliseconds


def _lookup(target: tvm.target.Target) -> CpuConfig | None:
    key = str(target)
    if key not in _configs:
        isa = _isa(target)
        if isa is None:
            _configs[key] = None
        else:
            _configs[key] = _x86_config(target) if isa == "x86" else _arm_config(target, isa)
    return _configs[key]


def is_simd_cpu(target: tvm.target.Target) -> bool:
    """Whether the CPU rules serve ``target``: LLVM for x86, AArch64, or 32-bit ARM with NEON."""
    return _lookup(target) is not None


def cpu_config(target: tvm.target.Target) -> CpuConfig:
    """The constants of ``target``'s CPU."""
    config = _lookup(target)
    if config is None:
        raise ValueError(
            f"the CPU schedule rules serve LLVM targets for x86, AArch64 and 32-bit ARM with NEON, not {target}"
        )
    return config
