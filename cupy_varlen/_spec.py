"""Kernel specializations.

A :class:`FwdSpec` is the complete, frozen description of one compiled forward kernel: kernel family,
element type, head-dim tile, tile shape, pipeline depth, mask kind, score modifiers and target
architecture. Its
fields become the kernel's ``-D`` macros and, with the assembled source, its cache key, in one place.
:func:`choose_fwd_spec` is the dispatcher; :func:`all_fwd_specs` lists every specialization it can
choose, which the CPU test suite compiles.

Two kernel families:

- ``"sm80"`` (``cuda_src/fwd_sm80.cu``): FlashAttention-2 on mma.sync, every architecture and head
  dim.
- ``"sm90"`` (``cuda_src/fwd_sm90.cu``): Hopper only (sm_90a), wgmma + warp specialization +
  persistent LPT scheduling, head-dim tiles 64, 128 and 256. Chosen automatically there; the
  environment variable ``CUPY_VARLEN_FWD_KERNEL`` (``auto``, ``sm80``, ``sm90``) or
  :data:`forward_kernel` overrides the choice (tests run both).
"""

from __future__ import annotations

import dataclasses
import os

DTYPES = ("bf16", "fp16")
HEAD_DIM_TILES = (32, 64, 96, 128, 160, 192, 224, 256)
MAX_HEAD_DIM = HEAD_DIM_TILES[-1]

# Architectures we build for. A cubin runs on later minor revisions of its major version (sm_80 code
# on an sm_87), but sm_86/sm_89 get their own entry because their shared memory is smaller.
# sm_90a enables Hopper's arch-specific instructions; the sm_80 kernel runs on it unchanged.
ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90a")

# Dynamic shared memory one block may opt into, per architecture (bytes).
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90a": 227 * 1024}

# The kernel file of each family; _build expands its #include lines into the translation unit.
FWD_SOURCE = {"sm80": "fwd_sm80.cu", "sm90": "fwd_sm90.cu"}
KERNELS = tuple(FWD_SOURCE)
# Backward dK/dV families; both include bwd_common.cuh's kernels (preprocess, dQ of either mode, the
# latter on mma.sync).
BWD_SOURCE = {"sm80": "bwd_sm80.cu", "sm90": "bwd_sm90.cu"}
SM90_THREADS = 384  # cuda_src/fwd_sm90.cu: a producer and two consumer warpgroups (three: 512)
# What the sm90 kernels' SharedStorage adds to their operand tiles: its barriers and bookkeeping,
# which it rounds up to its 1024-byte alignment (the swizzle atom), and as much again of slack that
# aligns its base within the dynamic shared memory. The kernels static_assert that it fits.
SM90_BOOKKEEPING_BYTES = 2 * 1024
# The sm90 backward's, exactly (its 80-query tiles need all of the 227 KB): SharedStorage's size is
# its tiles, statistics and barriers (at most 64 bytes) rounded up to its 1024-byte alignment, plus
# 1024 bytes of slack that aligns its base.
SM90_BWD_BARRIER_BYTES = 64


def sm90_bwd_smem(storage_bytes: int) -> int:
    """Dynamic shared memory the sm90 backward reserves for ``storage_bytes`` of tiles and
    statistics."""
    return -(-(storage_bytes + SM90_BWD_BARRIER_BYTES) // 1024) * 1024 + 1024


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per CTA
    block_n: int  # keys per streamed tile
    warps: int
    stages: int  # K/V ring depth
    min_blocks: int  # CTAs per SM the register budget is sized for (__launch_bounds__)
    qk_unroll: int = 0  # unroll factor of QK^T's head-dim loop (0: full); trades ILP for registers
    sub_n: int = 0  # keys per register sub-tile (0: block_n); fewer score registers, same barriers

    @property
    def keys_per_subtile(self) -> int:
        return self.sub_n or self.block_n


# (head-dim tile) -> tile shape, per architecture, as found by benchmarks/lab/tune_tiles.py: the
# largest tiles and deepest K/V ring that fit the shared memory of the CTAs per SM they are sized
# for and compile with no register spills for every dtype and mask kind (the CPU tests re-check).
# Four warps own 32 query rows each where registers allow: a B fragment read from shared memory
# then feeds two mma row blocks, half the ldmatrix traffic per FLOP of 16-row warps.
_T = TileConfig
_TILES_SM90 = {
    32: _T(128, 128, 4, 2, 2, sub_n=64),
    64: _T(128, 128, 4, 2, 2, sub_n=64),
    96: _T(128, 64, 4, 2, 2),
    128: _T(128, 64, 4, 2, 2, qk_unroll=4),
    160: _T(128, 64, 8, 2, 1),
    192: _T(128, 64, 8, 2, 1),
    224: _T(128, 64, 8, 2, 1),
    256: _T(128, 64, 8, 2, 1),
}
_TILES_SM80 = {
    32: _T(128, 128, 4, 2, 2, sub_n=64),
    64: _T(128, 128, 4, 2, 2, sub_n=64),
    96: _T(128, 64, 4, 2, 2),
    128: _T(128, 32, 4, 2, 2),
    160: _T(128, 64, 8, 2, 1),
    192: _T(128, 64, 8, 2, 1),
    224: _T(128, 64, 8, 1, 1),
    256: _T(128, 64, 8, 1, 1),
}
# sm_86 / sm_89: 100 KB of shared memory per SM.
_TILES_SM86 = {
    32: _T(128, 128, 4, 2, 2, sub_n=64),
    64: _T(128, 64, 4, 2, 2),
    96: _T(128, 32, 4, 2, 2),
    128: _T(128, 64, 8, 2, 1),
    160: _T(128, 64, 8, 1, 1),
    192: _T(128, 64, 8, 1, 1),
    224: _T(64, 64, 4, 1, 1),
    256: _T(64, 64, 4, 1, 1, qk_unroll=2),
}
_TILE_TABLES = {
    "sm_80": _TILES_SM80,
    "sm_86": _TILES_SM86,
    "sm_89": _TILES_SM86,
    "sm_90a": _TILES_SM90,
}
# The sm80 family with ALiBi where the table's tile spills at its 255 registers (sm_90a D128 with a
# window, paged or with every modifier: 24-56 bytes under ptxas 12.9): QK^T's head-dim loop
# unrolled by 2, not 4. Spill-free with ALiBi in every mask, layout and modifier set (checked on
# the CPU, 2026-12-07). On Hopper this family runs the paged calls and CUPY_VARLEN_FWD_KERNEL=sm80.
_FWD_ALIBI_TILES = {("sm_90a", 128): _T(128, 64, 4, 2, 2, qk_unroll=2)}
# The sm90 family: 2 consumer warpgroups x 64 query rows; warps counts the producer warpgroup too.
# block_n is bounded by S's registers (64 per thread at 128 keys) beside O's (head_dim / 2).
_TILES_WGMMA = {
    64: _T(128, 128, 12, 6, 1),
    128: _T(128, 128, 12, 3, 1),
    256: _T(128, 64, 12, 2, 1),
}
# Batches of long sequences at head dim 64: three consumer warpgroups (192 query rows) keep a third
# softmax in flight, which is what bounds D64; their 160 registers a thread hold S, P and O only at
# 96 keys. On short sequences the 192-row tiles waste more rows past each sequence's end, so
# dispatch takes them only where the batch's mean length (total_q / batch, known on the host without
# reading cu_seqlens) reaches LONG_ROWS_MEAN. H100, uniform D64 batches (docs/performance.md,
# 2026-11-25): -12% at length 512, -7% at 1024, equal at 2048, +3% at 4096, +7% at 8192; +9% / +6%
# on B32 x <=8k (mean 4348).
_TILES_WGMMA_LONG = {
    64: _T(192, 96, 16, 8, 1),
}
LONG_ROWS_MEAN = 2048


def long_rows(total_q: int, batch: int) -> bool:
    """Whether a batch's mean query length reaches LONG_ROWS_MEAN (choose_fwd_spec's long_rows)."""
    return total_q >= LONG_ROWS_MEAN * batch


# Decode tiles (cuda_src/fwd_sm80.cu, CV_DECODE; every architecture): a few packed query rows
# against many keys, so the loop is bound by the K/V stream. 64 rows (four warps of 16: a decode
# step's query heads of one K/V head, GQA packed) and 64-key tiles; two CTAs per SM with the
# deepest K/V ring (2-4) that fits twice, else one with the deepest that fits once. Above head dim
# 128 QK^T's head-dim loop is unrolled by 4: fully unrolled, O's 128 registers a thread at d256 and
# the loop's fragments spill.
DECODE_BLOCK_M = 64
DECODE_BLOCK_N = 64


def _decode_tiles(arch: str, tile: int) -> TileConfig:
    def smem(stages):
        return tile * 2 * (DECODE_BLOCK_M + 2 * stages * DECODE_BLOCK_N)

    # An SM holds SMEM_LIMIT + 1 KB, and each resident CTA takes 1 KB of it for the system.
    per_sm = SMEM_LIMIT[arch] + 1024
    twice = [s for s in (2, 3, 4) if 2 * (smem(s) + 1024) <= per_sm]
    unroll = 2 if tile > 128 else 0
    if twice:
        return TileConfig(DECODE_BLOCK_M, DECODE_BLOCK_N, 4, max(twice), 2, unroll)
    once = [s for s in (1, 2, 3, 4) if smem(s) <= SMEM_LIMIT[arch]]
    return TileConfig(DECODE_BLOCK_M, DECODE_BLOCK_N, 4, max(once), 1, unroll)


# Tuning hook (benchmarks, tests): (arch or "sm90", head-dim tile) -> TileConfig replacing the
# table's entry. Dispatch and launch plans are memoized: call cupy_varlen._api.clear_caches() after
# it.
tile_overrides: dict = {}

# "auto" picks sm90 on Hopper where it has the head-dim tile, sm80 elsewhere. Read per dispatch.
forward_kernel = os.environ.get("CUPY_VARLEN_FWD_KERNEL", "auto")
# The same choice for the backward's dK/dV kernel (CUPY_VARLEN_BWD_KERNEL).
backward_kernel = os.environ.get("CUPY_VARLEN_BWD_KERNEL", "auto")


@dataclasses.dataclass(frozen=True)
class _KernelSpec:
    """What every kernel specialization has: element type, head-dim tile, tile shape, mask kind and
    target architecture (the kernel family is the subclasses' last field). The fields become the
    kernel's ``-D`` macros and, with the assembled source, its cache key."""

    dtype: str  # "bf16" | "fp16"
    head_dim_tile: int  # head dim rounded up to a multiple of 32
    tiles: object  # TileConfig or BwdTileConfig
    windowed: bool  # causal or sliding window: per-element masking beyond the sequence tail
    arch: str  # one of ARCHS

    # The head-dim tiles the sm90 family of this kind covers, and its name in messages.
    _sm90_tiles = {}
    _sm90_name = ""

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.kernel == "sm90" and (self.arch != "sm_90a"
                                      or self.head_dim_tile not in self._sm90_tiles):
            raise ValueError(f"{self._sm90_name} needs sm_90a and a head-dim tile in "
                             f"{tuple(self._sm90_tiles)}, got {self.arch} d{self.head_dim_tile}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.head_dim_tile not in HEAD_DIM_TILES:
            raise ValueError(f"head_dim_tile must be one of {HEAD_DIM_TILES}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")

    @property
    def threads(self) -> int:
        return self.tiles.warps * 32

    def _common_defines(self) -> dict:
        t = self.tiles
        return {
            "CV_DTYPE_BF16": int(self.dtype == "bf16"),
            "CV_HEAD_DIM": self.head_dim_tile,
            "CV_BLOCK_M": t.block_m,
            "CV_BLOCK_N": t.block_n,
            "CV_STAGES": t.stages,
            "CV_WINDOWED": int(self.windowed),
        }

    @property
    def options(self) -> tuple:
        """NVRTC options. ``--ptxas-options=-v`` puts registers and spills in the program log."""
        return (
            f"-arch={self.arch}",
            "-std=c++17",
            "--ptxas-options=-v",
            "-lineinfo",
        ) + tuple(f"-D{k}={v}" for k, v in sorted(self.defines.items()))


@dataclasses.dataclass(frozen=True)
class FwdSpec(_KernelSpec):
    """One forward-kernel specialization."""

    kernel: str = "sm80"  # one of KERNELS
    # k and v are page pools named by a block table (cuda_src/fwd_sm80.cu, CV_PAGED): the sm80
    # family's row-at-a-time gather, for any page size.
    paged: bool = False
    # Decode tiles (cuda_src/fwd_sm80.cu, CV_DECODE): GQA-packed rows, split keys, the combine.
    decode: bool = False
    # Score modifiers (cuda_src/score_mod.cuh): logit softcap, ALiBi, attention sinks.
    softcap: bool = False
    alibi: bool = False
    sinks: bool = False

    kernel_name = "varlen_fwd"
    schedule_kernel_name = "varlen_tile_schedule"
    _sm90_tiles = _TILES_WGMMA
    _sm90_name = "the sm90 kernel"

    def __post_init__(self):
        super().__post_init__()
        if self.paged and self.kernel != "sm80":
            raise ValueError("a paged KV cache is read by the sm80 kernel family only")
        if self.decode and self.kernel != "sm80":
            raise ValueError("the decode tiles belong to the sm80 kernel family")
        if self.smem_bytes > SMEM_LIMIT[self.arch]:
            raise ValueError(f"{self} needs {self.smem_bytes} B of shared memory")

    @property
    def source(self) -> str:
        return FWD_SOURCE[self.kernel]

    @property
    def entry_points(self) -> dict:
        """role -> (kernel name, dynamic shared memory). The decode tiles take their work from
        the grid (no schedule) and have the split-KV combine."""
        if self.decode:
            return {"main": (self.kernel_name, self.smem_bytes),
                    "combine": ("varlen_fwd_combine", 0)}
        return {"main": (self.kernel_name, self.smem_bytes),
                "schedule": (self.schedule_kernel_name, 0)}

    @property
    def persistent(self) -> bool:
        """One CTA per SM pulling work items, instead of one CTA per item."""
        return self.kernel == "sm90"

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory: the Q tile and the K/V ring, plus for sm90 the 1024-byte
        alignment slack and the barriers and work slot (the kernel static_asserts that its
        SharedStorage fits, given CV_SMEM_BYTES)."""
        row_bytes = self.head_dim_tile * 2
        t = self.tiles
        tiles = row_bytes * (t.block_m + 2 * t.stages * t.block_n)
        return tiles + (SM90_BOOKKEEPING_BYTES if self.kernel == "sm90" else 0)

    @property
    def defines(self) -> dict:
        t = self.tiles
        common = dict(self._common_defines(), CV_SOFTCAP=int(self.softcap),
                      CV_ALIBI=int(self.alibi), CV_SINKS=int(self.sinks))
        if self.kernel == "sm90":
            return dict(common, CV_SMEM_BYTES=self.smem_bytes)
        return dict(common, CV_SUB_N=t.keys_per_subtile, CV_WARPS=t.warps,
                    CV_MIN_BLOCKS=t.min_blocks,
                    CV_QK_UNROLL=t.qk_unroll or self.head_dim_tile // 16,
                    CV_PAGED=int(self.paged), CV_DECODE=int(self.decode))

    def __str__(self) -> str:
        t = self.tiles
        mask = "window" if self.windowed else "full"
        sub = f"/{t.sub_n}" if t.sub_n and t.sub_n != t.block_n else ""
        unroll = f" u{t.qk_unroll}" if t.qk_unroll else ""
        paged = " paged" if self.paged else ""
        decode = " decode" if self.decode else ""
        return (
            f"fwd[{self.kernel} {self.dtype} d{self.head_dim_tile} {t.block_m}x{t.block_n}{sub} "
            f"w{t.warps} s{t.stages}{unroll} {mask}{paged}{decode}{_mods_str(self)} {self.arch}]"
        )


# The score modifiers a spec may carry, as its field names (cuda_src/score_mod.cuh). The backward
# has no sinks field: its kernels are the same with sinks (the forward's lse holds the sink), and
# every backward module carries the dsinks kernel.
FWD_MODS = ("softcap", "alibi", "sinks")
BWD_MODS = ("softcap", "alibi")


def _mods_str(spec) -> str:
    return "".join(f" {m}" for m in FWD_MODS if getattr(spec, m, False))


def head_dim_tile(head_dim: int) -> int:
    return -(-head_dim // 32) * 32


def arch_for_capability(major: int, minor: int) -> str:
    """The build target for a device of compute capability major.minor."""
    cc = major * 10 + minor
    if cc < 80:
        raise RuntimeError(
            f"cupy_varlen needs compute capability 8.0 or newer (tensor-core bf16); "
            f"this device is {major}.{minor}"
        )
    if cc in (86, 89):
        return f"sm_{cc}"
    if major == 8:
        return "sm_80"
    return "sm_90a"


def kernel_for(arch: str, tile: int, choice: str = "auto", sm90_tiles=None) -> str:
    """The kernel family for ``arch`` and head-dim tile under ``choice`` (auto, sm80, sm90);
    ``sm90_tiles`` holds the head-dim tiles the sm90 family covers (the forward's by default)."""
    if choice not in ("auto",) + KERNELS:
        raise ValueError(f"kernel choice must be auto, sm80 or sm90, got {choice!r}")
    sm90_ok = arch == "sm_90a" and tile in (_TILES_WGMMA if sm90_tiles is None else sm90_tiles)
    if choice == "sm90" and not sm90_ok:
        return "sm80"  # the override selects where it can; other shapes keep the portable kernel
    if choice == "sm80" or not sm90_ok:
        return "sm80"
    return "sm90"


def choose_fwd_spec(dtype: str, head_dim: int, windowed: bool, arch: str,
                    choice: str = "auto", long_rows: bool = False,
                    paged: bool = False, decode: bool = False, softcap: bool = False,
                    alibi: bool = False, sinks: bool = False) -> FwdSpec:
    """``long_rows``: the batch's mean query length reaches LONG_ROWS_MEAN (see _TILES_WGMMA_LONG).
    ``paged``: k and v are page pools (the sm80 family on every architecture). ``decode``: the
    decode tiles (sm80 family, every architecture; see _decode_tiles), where choice and long_rows
    do not apply. ``softcap``, ``alibi``, ``sinks``: the score modifiers, on the same tiles."""
    tile = head_dim_tile(head_dim)
    mods = dict(softcap=softcap, alibi=alibi, sinks=sinks)
    if decode:
        tiles = tile_overrides.get(("decode", arch, tile)) or _decode_tiles(arch, tile)
        return FwdSpec(dtype, tile, tiles, windowed, arch, "sm80", paged, True, **mods)
    kernel = "sm80" if paged else kernel_for(arch, tile, choice)
    if kernel == "sm90":
        table = _TILES_WGMMA_LONG if long_rows and tile in _TILES_WGMMA_LONG else _TILES_WGMMA
        tiles = tile_overrides.get(("sm90", tile)) or table[tile]
    else:
        tiles = (tile_overrides.get((arch, tile))
                 or (_FWD_ALIBI_TILES.get((arch, tile)) if alibi else None)
                 or _TILE_TABLES[arch][tile])
    return FwdSpec(dtype, tile, tiles, windowed, arch, kernel, paged, **mods)


def _distinct_specs(archs, make) -> list:
    """The distinct specs that make(arch, kernel choice, dtype, head-dim tile, windowed) yields over
    every combination (both kernel families on sm_90a), in first-seen order."""
    specs = []
    for arch in archs:
        for choice in ("sm80", "sm90") if arch == "sm_90a" else ("sm80",):
            for dtype in DTYPES:
                for tile in HEAD_DIM_TILES:
                    for windowed in (False, True):
                        for spec in make(arch, choice, dtype, tile, windowed):
                            if spec not in specs:
                                specs.append(spec)
    return specs


def mod_sets(names) -> tuple:
    """Every subset of the modifiers ``names``, each as a tuple, the empty one first."""
    sets = [()]
    for name in names:
        sets += [subset + (name,) for subset in sets]
    return tuple(sets)


def all_fwd_specs(archs=ARCHS, mods=((),)):
    """Every specialization the dispatcher can return, for the given architectures, with each of
    the modifier sets ``mods`` (default: none; ``mod_sets(FWD_MODS)``: every one)."""
    return _distinct_specs(archs, lambda arch, choice, dtype, tile, windowed: tuple(
        choose_fwd_spec(dtype, tile, windowed, arch, choice, long_rows, paged, decode,
                        **{m: m in chosen for m in FWD_MODS})
        for chosen in mods for long_rows in (False, True) for paged in (False, True)
        for decode in (False, True)))


# ---------------------------------------------------------------------------------------------
# Backward: cuda_src/bwd_sm80.cu (mma.sync, every architecture) or, on Hopper at head-dim tiles 64
# and 128, cuda_src/bwd_sm90.cu (wgmma, warp-specialized); the same dispatch rule and override as
# the forward (backward_kernel / CUPY_VARLEN_BWD_KERNEL).


@dataclasses.dataclass(frozen=True)
class BwdTileConfig:
    block_m: int  # query rows per step of the dK/dV kernel (and per CTA of the dQ kernel)
    block_n: int  # keys per dK/dV CTA
    warps: int  # of the dK/dV kernel (sm90: 12, a producer and two consumer warpgroups); the dQ
    #             kernel has block_m / 16
    stages: int  # Q/dO ring depth of the dK/dV kernel (1: no prefetch)
    s_warp_rows: int  # sm80: warps down the keys for S^T/dP^T (the rest across the queries)
    kv_warp_rows: int  # sm80: warps down the keys for dK/dV (the rest across the head dim)
    dq_warp_rows: int  # sm80: warps down the queries for dQ in atomic mode
    dq_block_n: int  # keys per streamed tile of the deterministic dQ kernel
    dq_stages: int = 2  # its K/V ring depth


_B = BwdTileConfig
# Register budget per thread (1 CTA of 8 warps per SM): dK and dV accumulators
# (block_n x head_dim / 128 each) + S^T and dP^T (block_n x block_m / 128 each); shared memory:
# K, V, stages x (Q, dO), P^T, dS^T. Checked spill-free by the CPU tests.
_BWD_SM80 = {  # 163 KB
    32: _B(64, 128, 8, 2, 8, 8, 4, 64),
    64: _B(64, 128, 8, 2, 8, 8, 4, 64),
    96: _B(64, 128, 8, 2, 8, 4, 4, 64),
    128: _B(64, 128, 8, 2, 2, 4, 4, 64),
    160: _B(64, 64, 8, 2, 4, 4, 4, 32),
    192: _B(64, 64, 8, 2, 4, 4, 4, 32),
    224: _B(64, 64, 8, 1, 4, 4, 4, 32),
    256: _B(32, 64, 8, 2, 4, 4, 2, 32),
}
_BWD_TILES = {
    "sm_80": _BWD_SM80,
    # 227 KB. Measured on the H100 (bf16, 4 x 8192, atomic mode, 2026-11-24), against the sm_80
    # entries: d64 218 vs 202 TFLOP/s, d256 (2 x 4096) 173 vs 163.
    "sm_90a": {**_BWD_SM80, 64: _B(64, 128, 8, 2, 4, 4, 4, 64), 96: _B(64, 128, 8, 2, 4, 4, 4, 64),
               256: _B(64, 64, 8, 2, 4, 2, 4, 32)},
    "sm_86": {  # 100 KB
        32: _B(64, 128, 8, 2, 8, 8, 4, 64),
        64: _B(64, 128, 8, 2, 8, 8, 4, 64),
        96: _B(64, 64, 8, 2, 4, 4, 4, 64),
        128: _B(32, 64, 8, 2, 4, 4, 2, 64),
        160: _B(32, 32, 4, 1, 2, 2, 2, 32),
        192: _B(32, 32, 4, 1, 2, 2, 2, 32),
        224: _B(32, 32, 4, 1, 2, 2, 2, 32),
        256: _B(32, 32, 4, 1, 2, 2, 2, 32),
    },
}
_BWD_TILES["sm_89"] = _BWD_TILES["sm_86"]
# Atomic-dQ mode only, where the register budget differs (the dK/dV kernel also holds the dQ
# partial). Measured on the H100 (bf16, 4 x 8192, H16, 2026-11-24): d128 with S^T warps 4x2 and
# dK/dV warps 2x4 251 / 247 TFLOP/s (full / causal) against 233 / 224 for the table's 2x4 / 4x2;
# it spills in deterministic mode and with ALiBi (16 bytes), hence not in the table.
_BWD_ATOMIC_TILES = {("sm_90a", 128): _B(64, 128, 8, 2, 4, 2, 2, 64)}
# With ALiBi (the distance and slope beside a register file already full at 255), where the
# table's warp grid spills 4-16 bytes in the dK/dV kernel under ptxas 12.9: these grids compile
# spill-free with it in every mode, mask and modifier set (checked on the CPU, 2026-12-07).
_BWD_ALIBI_TILES = {
    ("sm_80", 96): _B(64, 128, 8, 2, 4, 4, 4, 64),
    ("sm_80", 256): _B(32, 64, 8, 2, 4, 2, 2, 32),
    ("sm_90a", 256): _B(64, 64, 8, 2, 4, 4, 4, 32),
}
# The sm90 family (sm_90a only): 128 keys per CTA, 64 per consumer warpgroup; queries per step
# bounded by S^T and dP^T (block_m / 2 registers each) beside dK and dV (head_dim / 2 each) in a
# consumer's 240 registers. The warp-grid fields do not apply (0).
_BWD_TILES_WGMMA = {
    64: _B(128, 128, 12, 2, 0, 0, 0, 64),
    128: _B(64, 128, 12, 2, 0, 0, 0, 64),
}
# Without a mask, FA4's width at head dim 128: 80 queries per step, where the shared-memory GEMMs
# (S^T, dP^T, dQ) at N = 64 read their operands at the pipe's whole rate. Both dQ modes (atomic and
# ordered). Masked tiles keep 64 (finer masking); so does fp16, whose P unpacking spills at 80, and
# softcap with ALiBi (8-16 bytes of spill at 80).
_BWD_TILES_WGMMA_FULL = {
    ("bf16", 128): _B(80, 128, 12, 2, 0, 0, 0, 64),
}
# Tuning hook, as tile_overrides for the forward: (arch or "sm90", head-dim tile) -> BwdTileConfig.
bwd_tile_overrides: dict = {}


@dataclasses.dataclass(frozen=True)
class BwdSpec(_KernelSpec):
    """One backward specialization: one module holding the preprocess, dK/dV, and either the dQ
    conversion (atomic and ordered modes) or (deterministic on sm80) the dQ kernel, plus the tile
    scheduler."""

    deterministic: bool
    kernel: str = "sm80"  # the dK/dV family, one of KERNELS
    # Score modifiers the kernels that recompute S apply (cuda_src/score_mod.cuh; see BWD_MODS).
    softcap: bool = False
    alibi: bool = False

    kernel_name = "varlen_bwd_dkdv"
    schedule_kernel_name = "varlen_tile_schedule"
    _sm90_tiles = _BWD_TILES_WGMMA
    _sm90_name = "the sm90 backward"

    def __post_init__(self):
        super().__post_init__()
        for name, size in (("dkdv", self.smem_bytes), ("dq", self.dq_smem_bytes)):
            if size > SMEM_LIMIT[self.arch]:
                raise ValueError(f"{self} needs {size} B of shared memory in its {name} kernel")

    @property
    def ordered_dq(self) -> bool:
        """Deterministic on the sm90 family: the dK/dV kernel adds dQ as in atomic mode, each
        query tile's partials in key-tile order (cuda_src/bwd_common.cuh, ordered mode)."""
        return self.deterministic and self.kernel == "sm90"

    @property
    def dq_kernel(self) -> bool:
        """Deterministic on the sm80 family: dQ comes from its own kernel, which recomputes S and
        dP per query tile."""
        return self.deterministic and self.kernel != "sm90"

    @property
    def dq_threads(self) -> int:
        return self.tiles.block_m // 16 * 32

    @property
    def source(self) -> str:
        return BWD_SOURCE[self.kernel]

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory of the dK/dV kernel: K, V, the Q/dO/statistics ring, and P^T and
        dS^T (sm80) or two dS^T buffers and the fp32 dQ staging (sm90)."""
        t, row = self.tiles, self.head_dim_tile * 2
        common = 2 * t.block_n * row + t.stages * (2 * t.block_m * row + 2 * t.block_m * 4)
        if self.kernel == "sm90":
            # Two dS^T buffers and the consumers' fp32 dQ staging (atomic and ordered modes).
            dq = 2 * t.block_n * t.block_m * 2 + t.block_m * row * 2
            return sm90_bwd_smem(common + dq)
        return common + 2 * 2 * t.block_n * t.block_m

    @property
    def dq_smem_bytes(self) -> int:
        """Dynamic shared memory of the deterministic dQ kernel (0 where there is none)."""
        if not self.dq_kernel:
            return 0
        t, row = self.tiles, self.head_dim_tile * 2
        return 2 * t.block_m * row + 2 * t.dq_stages * t.dq_block_n * row

    @property
    def entry_points(self) -> dict:
        """role -> (kernel name, dynamic shared memory)."""
        second = (("dq", ("varlen_bwd_dq", self.dq_smem_bytes)) if self.dq_kernel
                  else ("dq_convert", ("varlen_bwd_dq_convert", 0)))
        return dict((("main", (self.kernel_name, self.smem_bytes)),
                     ("schedule", (self.schedule_kernel_name, 0)),
                     ("preprocess", ("varlen_bwd_preprocess", 0)), second,
                     ("dsinks", ("varlen_bwd_dsinks", 0))))

    @property
    def defines(self) -> dict:
        t = self.tiles
        common = dict(self._common_defines(), CV_DQ_ATOMIC=int(not self.dq_kernel),
                      CV_DQ_ORDERED=int(self.ordered_dq), CV_DQ_BLOCK_N=t.dq_block_n,
                      CV_DQ_STAGES=t.dq_stages, CV_SOFTCAP=int(self.softcap),
                      CV_ALIBI=int(self.alibi))
        if self.kernel == "sm90":
            return dict(common, CV_SMEM_BYTES=self.smem_bytes)
        return dict(common, CV_WARPS=t.warps, CV_S_WARP_ROWS=t.s_warp_rows,
                    CV_KV_WARP_ROWS=t.kv_warp_rows, CV_DQ_WARP_ROWS=t.dq_warp_rows)

    def __str__(self) -> str:
        t = self.tiles
        mode = "ordered" if self.ordered_dq else "deterministic" if self.deterministic else "atomic"
        mask = "window" if self.windowed else "full"
        return (f"bwd[{self.kernel} {self.dtype} d{self.head_dim_tile} {t.block_n}x{t.block_m} "
                f"w{t.warps} s{t.stages} {mode} {mask}{_mods_str(self)} {self.arch}]")


def backward_kernel_for(arch: str, tile: int, choice: str = "auto") -> str:
    """The backward's dK/dV family for ``arch`` and head-dim tile under ``choice``."""
    return kernel_for(arch, tile, choice, _BWD_TILES_WGMMA)


def choose_bwd_spec(dtype: str, head_dim: int, windowed: bool, arch: str,
                    deterministic: bool, choice: str = "auto", softcap: bool = False,
                    alibi: bool = False) -> BwdSpec:
    tile = head_dim_tile(head_dim)
    kernel = backward_kernel_for(arch, tile, choice)
    if kernel == "sm90":
        tiles = (bwd_tile_overrides.get(("sm90", tile))
                 or (None if windowed or (softcap and alibi)
                     else _BWD_TILES_WGMMA_FULL.get((dtype, tile)))
                 or _BWD_TILES_WGMMA[tile])
    else:
        tiles = (bwd_tile_overrides.get((arch, tile))
                 or (_BWD_ALIBI_TILES.get((arch, tile)) if alibi else None)
                 or (None if deterministic or alibi else _BWD_ATOMIC_TILES.get((arch, tile)))
                 or _BWD_TILES[arch][tile])
    return BwdSpec(dtype, tile, tiles, windowed, arch, deterministic, kernel, softcap, alibi)


def all_bwd_specs(archs=ARCHS, mods=((),)):
    """Every backward specialization the dispatcher can return (both dQ modes), with each of the
    modifier sets ``mods`` (default: none; ``mod_sets(BWD_MODS)``: every one; names outside
    BWD_MODS are ignored)."""
    return _distinct_specs(archs, lambda arch, choice, dtype, tile, windowed: (
        choose_bwd_spec(dtype, tile, windowed, arch, det, choice,
                        **{m: m in chosen for m in BWD_MODS})
        for chosen in mods for det in (False, True)))
