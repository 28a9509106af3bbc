"""Grid, block, workspace and shared memory for a spec, and the launches themselves."""

from __future__ import annotations

import ctypes
import struct
import threading

from cupy.cuda import driver

from . import _tma

SCHEDULE_THREADS = 1024  # cuda_src/scheduler.cuh: kScheduleThreads
SCHEDULE_HEADER = 4  # cuda_src/scheduler.cuh: kScheduleHeader
# Every kernel's parameters, packed as the kernel lays them out (each at its natural alignment;
# these formats need no padding between fields).
# cuda_src/fwd_sm90.cu: struct Params, passed by value as one __grid_constant__ argument: 8 pointers,
# 9 int64 strides, 3 int32, 2 float32, 4 int32 (window, use_tma, lpt_across_heads), padding to the
# 64-byte alignment of the two 128-byte tensor maps of k and v.
_SM90_PARAMS = struct.Struct("<8Q9q3i2f4i20x128s128s")
_NO_MAP = bytes(_tma.MAP_BYTES)
# cuda_src/fwd_sm80.cu: varlen_fwd's arguments: 8 pointers, 9 int64 strides, 2 int32, 2 float32,
# 2 int32.
_SM80_PARAMS = struct.Struct("<8Q9q2i2f2i")
# cuda_src/scheduler.cuh: varlen_tile_schedule(cu_q, cu_k, batch, block_m, block_n, left, right,
# tile_bound, workspace).
_SCHEDULE_PARAMS = struct.Struct("<2Q6iQ")
_MAX_GRID_X = 2**31 - 1

# cuLaunchKernel's `extra` keys: the parameters as one buffer.
_PARAM_BUFFER_POINTER, _PARAM_BUFFER_SIZE, _PARAM_END = 1, 2, 0


class _ParamBuffer(threading.local):
    """One kernel signature's parameters, packed in place into ctypes memory that every launch from
    this thread reuses (cuLaunchKernel copies the parameters before it returns). Building the bytes
    and three ctypes objects per launch was about 2 us of a forward's ~45 us host path.

    ``by_struct``: the kernel's one argument is a by-value struct, passed through kernelParams, so
    the driver places it where the kernel's parameter table says (a struct with 64-byte aligned
    members, the tensor maps, may not sit at the start of the parameter space, which the packed
    ``extra`` form assumes). Otherwise the buffer goes as ``extra``: one driver call per kernel, no
    per-argument conversion."""

    def __init__(self, packer: struct.Struct, by_struct: bool = False):
        self.packer = packer
        self.buf = ctypes.create_string_buffer(packer.size)
        if by_struct:
            self._keep = (ctypes.c_void_p * 1)(ctypes.addressof(self.buf))
            self.kernel_params, self.extra = ctypes.addressof(self._keep), 0
        else:
            self._size = ctypes.c_size_t(packer.size)
            self._keep = (ctypes.c_void_p * 5)(_PARAM_BUFFER_POINTER, ctypes.addressof(self.buf),
                                               _PARAM_BUFFER_SIZE, ctypes.addressof(self._size),
                                               _PARAM_END)
            self.kernel_params, self.extra = 0, ctypes.addressof(self._keep)

    def pack(self, *fields) -> "_ParamBuffer":
        self.packer.pack_into(self.buf, 0, *fields)
        return self

    def launch(self, function, grid: int, block: int, stream_ptr: int,
               shared_mem: int = 0) -> None:
        """Launches ``function`` with the parameters last packed (by this thread)."""
        driver.launchKernel(function.ptr, grid, 1, 1, block, 1, 1, shared_mem, stream_ptr,
                            self.kernel_params, self.extra)


_SM90_ARGS = _ParamBuffer(_SM90_PARAMS, by_struct=True)
_SM80_ARGS = _ParamBuffer(_SM80_PARAMS)
_SCHEDULE_ARGS = _ParamBuffer(_SCHEDULE_PARAMS)


def _launch_schedule(function, stream_ptr: int, cu_rows, cu_cols, batch: int, block_rows: int,
                     block_cols: int, left: int, right: int, bound: int, workspace) -> None:
    _SCHEDULE_ARGS.pack(cu_rows, cu_cols, batch, block_rows, block_cols, left, right, bound,
                        workspace).launch(function, 1, SCHEDULE_THREADS, stream_ptr)


def tile_bound(total_q: int, batch: int, block_m: int) -> int:
    """Host-side upper bound on sum_b ceil(len_b / block_m), from totals alone.

    sum ceil(l / m) <= sum (l + m - 1) / m = (total + batch (m - 1)) / m. It never reads
    cu_seqlens and never undercounts, whatever max_seqlen says; surplus CTAs exit at once.
    """
    return max(1, (total_q + batch * (block_m - 1)) // block_m)


def workspace_size(total_q: int, batch: int, spec) -> int:
    """int32 entries of the schedule workspace: a header and (sequence, tile) per query tile."""
    return SCHEDULE_HEADER + 2 * tile_bound(total_q, batch, spec.tiles.block_m)


def lpt_across_heads(total_k: int, heads_kv: int, head_dim: int, l2_bytes: int) -> bool:
    """Whether the persistent forward takes its work items in one longest-first order over all heads
    rather than head by head (cuda_src/scheduler.cuh, PersistentScheduler): where K and V (16-bit)
    fit in half of L2, the head-by-head order's L2 sharing is moot and its tail costs the most."""
    return 2 * 2 * total_k * heads_kv * head_dim <= l2_bytes // 2


def launch_forward(kernels, spec, stream_ptr: int, *, q, k, v, out, lse, cu_q, cu_k, workspace,
                   q_strides, k_strides, v_strides, o_strides, lse_head_stride: int,
                   total_q: int, total_k: int, batch: int, heads: int, heads_per_kv: int,
                   head_dim: int, scale: float, scale_log2: float, window, num_sms: int,
                   l2_bytes: int):
    """Launches the tile scheduler and the forward kernel on ``stream_ptr``. Pointers are ints."""
    tiles = spec.tiles
    bound = tile_bound(total_q, batch, tiles.block_m)
    ctas = bound * heads
    if ctas > _MAX_GRID_X:
        raise ValueError(f"varlen_attn: {ctas} query tiles x heads exceed one launch's grid")
    _launch_schedule(kernels.schedule, stream_ptr, cu_q, cu_k, batch, tiles.block_m,
                     tiles.block_n, window[0], window[1], bound, workspace)
    fields = (q, k, v, out, lse, cu_q, cu_k, workspace,
              q_strides[0], q_strides[1], k_strides[0], k_strides[1],
              v_strides[0], v_strides[1], o_strides[0], o_strides[1], lse_head_stride)
    if spec.persistent:
        heads_kv = heads // heads_per_kv
        k_map, v_map = (_tma.tile_map(ptr, spec.dtype, total_k, heads_kv, head_dim, strides[0],
                                      strides[1], tiles.block_n)
                        for ptr, strides in ((k, k_strides), (v, v_strides)))
        use_tma = k_map is not None and v_map is not None
        across = lpt_across_heads(total_k, heads_kv, head_dim, l2_bytes)
        _SM90_ARGS.pack(*fields, heads_per_kv, heads, head_dim, scale, scale_log2, window[0],
                        window[1], int(use_tma), int(across), k_map if use_tma else _NO_MAP,
                        v_map if use_tma else _NO_MAP).launch(
            kernels.main, min(ctas, num_sms), spec.threads, stream_ptr, spec.smem_bytes)
        return
    _SM80_ARGS.pack(*fields, heads_per_kv, head_dim, scale, scale_log2, window[0],
                    window[1]).launch(kernels.main, ctas, spec.threads, stream_ptr, spec.smem_bytes)


# cuda_src/bwd_common.cuh: struct BwdParams (both backward families), by value: 16 pointers,
# 19 int64, 3 int32, 2 float32, 3 int32 (window, use_dq_map), padding to the 64-byte alignment of
# the dQ accumulator's 128-byte tensor map. Through kernelParams, as the forward's Params.
_BWD_PARAMS = struct.Struct("<16Q19q3i2f3i8x128s")
_BWD_ARGS = _ParamBuffer(_BWD_PARAMS, by_struct=True)
# The sm90 dK/dV kernel adds each consumer's 64-row dQ partial through TMA reductions (the map's
# box: 64 rows x 32 fp32 columns, cuda_src/bwd_sm90.cu).
_DQ_BOX_ROWS = 64
_PREP_THREADS = 256  # cuda_src/bwd_common.cuh: kPrepThreads (8 lanes per row and head)
_CONVERT_THREADS = 256  # cuda_src/bwd_common.cuh: kConvertThreads (one thread per 8 elements)


def backward_workspace_sizes(total_q: int, total_k: int, heads: int, head_dim: int, batch: int,
                             spec) -> tuple:
    """(float32 entries, int32 entries) of the backward's scratch: lse_log2 and delta (heads x
    total_q each) and, in atomic mode, the dQ accumulator; the key-tile schedule and, in
    deterministic mode, the query-tile schedule."""
    t = spec.tiles
    floats = 2 * heads * total_q + (0 if spec.deterministic else total_q * heads * head_dim)
    ints = SCHEDULE_HEADER + 2 * tile_bound(total_k, batch, t.block_n)
    if spec.deterministic:
        ints += SCHEDULE_HEADER + 2 * tile_bound(total_q, batch, t.block_m)
    return floats, ints


def launch_backward(kernels, spec, stream_ptr: int, *, q, k, v, out, dout, dq, dk, dv, lse,
                    float_ws, int_ws, cu_q, cu_k, strides: dict, lse_strides, total_q: int,
                    total_k: int, batch: int, heads: int, heads_kv: int, head_dim: int,
                    scale: float, scale_log2: float, window):
    """Launches the backward's kernels on ``stream_ptr``. Pointers are ints; ``strides`` maps
    q, k, v, out, dout, dq, dk, dv to (row, head) strides in elements."""
    t = spec.tiles
    # The accumulator first: its float4 accesses need the allocation's alignment.
    accum_bytes = 0 if spec.deterministic else 4 * total_q * heads * head_dim
    dq_accum = 0 if spec.deterministic else float_ws
    lse_log2 = float_ws + accum_bytes
    delta = lse_log2 + 4 * heads * total_q
    bound_k = tile_bound(total_k, batch, t.block_n)
    ws_kv = int_ws
    ws_q = int_ws + 4 * (SCHEDULE_HEADER + 2 * bound_k)
    grid_kv = bound_k * heads_kv
    bound_q = tile_bound(total_q, batch, t.block_m)
    grid_q = bound_q * heads
    if max(grid_kv, grid_q) > _MAX_GRID_X:
        raise ValueError("varlen_attn_backward: tiles x heads exceed one launch's grid")
    s = strides
    dq_map = None
    if spec.kernel == "sm90" and not spec.deterministic and total_q > 0:
        dq_map = _tma.tile_map(dq_accum, "fp32", total_q, heads, head_dim, heads * head_dim,
                               head_dim, _DQ_BOX_ROWS)
    params = _BWD_ARGS.pack(
        q, k, v, out, dout, dq, dk, dv, lse, lse_log2, delta, dq_accum, cu_q, cu_k, ws_kv,
        ws_q if spec.deterministic else 0,
        *s["q"], *s["k"], *s["v"], *s["out"], *s["dout"], *s["dq"], *s["dk"], *s["dv"],
        *lse_strides, total_q, heads, heads // heads_kv, head_dim, scale, scale_log2,
        window[0], window[1], int(dq_map is not None), dq_map or _NO_MAP,
    )
    left, right = window
    rows = total_q * heads
    if rows:
        params.launch(kernels.preprocess, -(-rows * 8 // _PREP_THREADS), _PREP_THREADS,
                      stream_ptr)
    # Key tiles are scheduled as the forward schedules query tiles, with the roles swapped: the
    # transposed mask is the band with left and right exchanged.
    _launch_schedule(kernels.schedule, stream_ptr, cu_k, cu_q, batch, t.block_n, t.block_m,
                     right, left, bound_k, ws_kv)
    params.launch(kernels.main, grid_kv, spec.threads, stream_ptr, spec.smem_bytes)
    if spec.deterministic:
        _launch_schedule(kernels.schedule, stream_ptr, cu_q, cu_k, batch, t.block_m,
                         t.dq_block_n, left, right, bound_q, ws_q)
        params.launch(kernels.dq, grid_q, spec.dq_threads, stream_ptr, spec.dq_smem_bytes)
    elif rows:
        chunks = rows * (head_dim // 8)
        params.launch(kernels.dq_convert, -(-chunks // _CONVERT_THREADS), _CONVERT_THREADS,
                      stream_ptr)
