"""Grid, block, workspace and shared memory for a spec, and the launches themselves."""

from __future__ import annotations

import ctypes
import struct
import threading

from cupy.cuda import driver

from . import _tma

SCHEDULE_THREADS = 1024  # cuda_src/scheduler.cuh: kScheduleThreads
SCHEDULE_HEADER = 16  # cuda_src/scheduler.cuh: kScheduleHeader
# Every kernel's parameters, packed as the kernel lays them out (each at its natural alignment;
# these formats need no padding between fields).
# cuda_src/fwd_sm90.cu: struct Params, passed by value as one __grid_constant__ argument: 11
# pointers (seqused_k, the ALiBi slopes and the sinks last, 0 for none), 10 int64 (strides, the
# slopes' batch stride), 3 int32, 4 float32 (scale, its log2 form, the softcap's two constants),
# 3 int32 (window, use_tma), padding to the 64-byte alignment of the two 128-byte tensor maps of
# k and v.
_SM90_PARAMS = struct.Struct("<11Q10q3i4f3i48x128s128s")
_NO_MAP = bytes(_tma.MAP_BYTES)
# cuda_src/fwd_sm80.cu: varlen_fwd's arguments: 13 pointers (the last five seqused_k, block_table,
# the split partials, the ALiBi slopes and the sinks), 13 int64 (strides: the pools' page strides,
# the block table's row stride and the slopes' batch stride last), 2 int32, 4 float32 (scale, its
# log2 form, the softcap's two constants), 4 int32 (window, page size, keys per sequence of a
# paged cache), 3 int32 (the decode tiles' splits, heads, total_q).
_SM80_PARAMS = struct.Struct("<13Q13q2i4f4i3i")
# cuda_src/split_combine.cuh: varlen_fwd_combine(partial, out, lse, cu_seqlens_q, sinks, 3 int64
# strides, num_splits, num_heads, total_q, head_dim).
_COMBINE_PARAMS = struct.Struct("<5Q3q4i")
COMBINE_THREADS = 128  # kCombineThreads
# cuda_src/scheduler.cuh: varlen_tile_schedule(cu_q, cu_k, seqused_k, workspace, batch, block_m,
# block_n, left, right, tile_bound, in_order, heads, head_group, sms, ranks_bound, k_capacity).
_SCHEDULE_PARAMS = struct.Struct("<4Q12i")
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
               shared_mem: int = 0, grid_y: int = 1, grid_z: int = 1) -> None:
        """Launches ``function`` with the parameters last packed (by this thread)."""
        driver.launchKernel(function.ptr, grid, grid_y, grid_z, block, 1, 1, shared_mem,
                            stream_ptr, self.kernel_params, self.extra)


_SM90_ARGS = _ParamBuffer(_SM90_PARAMS, by_struct=True)
_SM80_ARGS = _ParamBuffer(_SM80_PARAMS)
_COMBINE_ARGS = _ParamBuffer(_COMBINE_PARAMS)
_SCHEDULE_ARGS = _ParamBuffer(_SCHEDULE_PARAMS)


def _launch_schedule(function, stream_ptr: int, cu_rows, cu_cols, seqused_cols, schedule,
                     workspace) -> None:
    """``schedule``: varlen_tile_schedule's scalar arguments (batch, block_rows, block_cols, left,
    right, tile_bound, in_order, heads, head_group, sms, ranks_bound)."""
    _SCHEDULE_ARGS.pack(cu_rows, cu_cols, seqused_cols, workspace, *schedule).launch(
        function, 1, SCHEDULE_THREADS, stream_ptr)


class ScoreMods:
    """A call's score modifiers as the kernels take them (cuda_src/score_mod.cuh): the softcap's
    constants scale / c and c / scale (0 and 0 without one), the ALiBi slopes' batch stride in
    elements (0: one (H,) row for every sequence), and whether there are sinks. The slopes' and
    sinks' pointers come with each launch."""

    __slots__ = ("softcap_in", "softcap_out", "alibi_stride", "sinks")

    def __init__(self, scale: float, softcap: float = 0.0, alibi_stride: int = 0,
                 sinks: bool = False):
        self.softcap_in = scale / softcap if softcap else 0.0
        self.softcap_out = softcap / scale if softcap else 0.0
        self.alibi_stride, self.sinks = alibi_stride, sinks


NO_MODS = ScoreMods(1.0)


def tile_bound(total_q: int, batch: int, block_m: int) -> int:
    """Host-side upper bound on sum_b ceil(len_b / block_m), from totals alone.

    sum ceil(l / m) <= sum (l + m - 1) / m = (total + batch (m - 1)) / m. It never reads
    cu_seqlens and never undercounts, whatever max_seqlen says; surplus CTAs exit at once.
    """
    return max(1, (total_q + batch * (block_m - 1)) // block_m)


def lpt_across_heads(total_k: int, heads_kv: int, head_dim: int, l2_bytes: int) -> bool:
    """Whether the persistent forward takes its work items in one longest-first order over all heads
    rather than one K/V head's query heads at a time (cuda_src/scheduler.cuh, HeadOrder's lead
    groups): where K and V (16-bit) fit in half of L2, the head-by-head order's L2 sharing is moot
    and its tail costs the most."""
    return 2 * 2 * total_k * heads_kv * head_dim <= l2_bytes // 2


class ForwardLaunch:
    """A forward's two launches (tile scheduler, attention kernel) with everything but the pointers
    decided: grid, workspace size and the kernel's scalar parameters. Built once per launch plan
    (cupy_varlen._api), so a repeated call only packs pointers and launches."""

    __slots__ = ("kernels", "spec", "grid", "workspace_entries", "schedule", "scalars",
                 "map_args")

    def __init__(self, kernels, spec, *, q_strides, k_strides, v_strides, o_strides,
                 lse_head_stride: int, total_q: int, total_k: int, batch: int, heads: int,
                 heads_per_kv: int, head_dim: int, scale: float, scale_log2: float, window,
                 num_sms: int, l2_bytes: int, paged=None, mods: ScoreMods = NO_MODS):
        """``paged`` (a paged cache, spec.paged): (page size, pages per sequence, k's and v's page
        strides, the block table's row stride); k_strides and v_strides are then the pools' (row
        in a page, head) strides. ``mods``: the score modifiers' constants (spec's flags)."""
        tiles = spec.tiles
        bound = tile_bound(total_q, batch, tiles.block_m)
        ctas = bound * heads
        if ctas > _MAX_GRID_X:
            raise ValueError(f"varlen_attn: {ctas} query tiles x heads exceed one launch's grid")
        self.kernels, self.spec = kernels, spec
        # int32 entries: a header and (sequence, tile) per query tile.
        self.workspace_entries = SCHEDULE_HEADER + 2 * bound
        heads_kv = heads // heads_per_kv
        across = spec.persistent and lpt_across_heads(total_k, heads_kv, head_dim, l2_bytes)
        # The persistent grid pulls real items (ranks = the tile count); the sm80 grid's CTAs are
        # tile bound x heads and read the order head by head themselves.
        page_size, pages, k_page, v_page, table_stride = paged or (0, 0, 0, 0, 0)
        k_capacity = page_size * pages if paged else -1
        self.schedule = (batch, tiles.block_m, tiles.block_n, window[0], window[1], bound, 0,
                         heads, heads if across else heads_per_kv, num_sms,
                         0 if spec.persistent else 1, k_capacity)
        strides = (q_strides[0], q_strides[1], k_strides[0], k_strides[1], v_strides[0],
                   v_strides[1], o_strides[0], o_strides[1], lse_head_stride)
        if spec.persistent:
            self.scalars = strides + (mods.alibi_stride, heads_per_kv, heads, head_dim, scale,
                                      scale_log2, mods.softcap_in, mods.softcap_out, window[0],
                                      window[1])
            # tile_map's arguments after the pointer, for k and for v.
            self.map_args = tuple((spec.dtype, total_k, heads_kv, head_dim, s[0], s[1],
                                   tiles.block_n) for s in (k_strides, v_strides))
            self.grid = min(ctas, num_sms)
        else:
            self.scalars = strides + (k_page, v_page, table_stride, mods.alibi_stride,
                                      heads_per_kv, head_dim, scale, scale_log2, mods.softcap_in,
                                      mods.softcap_out, window[0], window[1], page_size,
                                      k_capacity, 1, heads, total_q)
            self.grid = ctas

    def launch(self, stream_ptr: int, q: int, k: int, v: int, out: int, lse: int, cu_q: int,
               cu_k: int, workspace: int, seqused_k: int = 0, block_table: int = 0,
               alibi: int = 0, sinks: int = 0) -> None:
        """Launches on ``stream_ptr``; every argument is a device pointer (lse 0: not written;
        seqused_k 0: none; block_table 0: no paged cache, else cu_k 0: no offsets; alibi and sinks
        0: none, which the spec's flags must agree with)."""
        kernels, spec = self.kernels, self.spec
        _launch_schedule(kernels.schedule, stream_ptr, cu_q, cu_k, seqused_k, self.schedule,
                         workspace)
        if spec.persistent:
            # Per call: a map holds its tensor's address (cached per pointer by tile_map).
            k_args, v_args = self.map_args
            k_map, v_map = _tma.tile_map(k, *k_args), _tma.tile_map(v, *v_args)
            use_tma = k_map is not None and v_map is not None
            _SM90_ARGS.pack(q, k, v, out, lse, cu_q, cu_k, workspace, seqused_k, alibi, sinks,
                            *self.scalars,
                            int(use_tma),
                            k_map if use_tma else _NO_MAP,
                            v_map if use_tma else _NO_MAP).launch(
                kernels.main, self.grid, spec.threads, stream_ptr, spec.smem_bytes)
        else:
            _SM80_ARGS.pack(q, k, v, out, lse, cu_q, cu_k, workspace, seqused_k, block_table, 0,
                            alibi, sinks, *self.scalars).launch(
                kernels.main, self.grid, spec.threads, stream_ptr, spec.smem_bytes)


# The decode tiles (cuda_src/fwd_sm80.cu, CV_DECODE) serve calls whose packed rows (max_seqlen_q x
# query heads per K/V head) fit this many: two 64-row tiles.
DECODE_MAX_ROWS = 128
_MAX_GRID_YZ = 65535
# A split takes at least this many 64-key tiles: below it the partials' traffic and the combine
# cost more than the parallelism brings.
MIN_SPLIT_TILES = 4
MAX_SPLITS = 64


def takes_decode_tiles(num_splits, max_seqlen_q: int, heads_per_kv: int, batch: int,
                       heads_kv: int) -> bool:
    """Whether a forward runs on the decode tiles: few query rows per K/V head, num_splits not 1
    (one split keeps every sequence's bits independent of the batch, which the decode choice, made
    from max_seqlen_q, would not), and a grid within the y and z limits."""
    return (num_splits != 1 and max_seqlen_q * heads_per_kv <= DECODE_MAX_ROWS
            and batch <= _MAX_GRID_YZ and heads_kv <= _MAX_GRID_YZ)


def decode_splits(ctas: int, keys_bound: int, block_n: int, slots: int, num_splits) -> int:
    """Key splits of the decode tiles (``ctas`` of them unsplit), from shapes alone: no share
    shorter than MIN_SPLIT_TILES key tiles of the longest sequence (``keys_bound`` keys at most),
    at most ``num_splits`` (None: MAX_SPLITS), and within that the fewest that fill the GPU's
    ``slots`` (SMs x CTAs per SM) and keep its last wave at least 90% full (a second wave 20%
    full would leave the GPU idle 40% of the time), or else the fullest."""
    cap = MAX_SPLITS if num_splits is None else num_splits
    hi = max(1, min(cap, -(-keys_bound // block_n) // MIN_SPLIT_TILES))
    lo = min(max(1, -(-slots // ctas)), hi)
    best, best_fill = lo, 0.0
    for splits in range(lo, hi + 1):
        total = ctas * splits
        fill = total / (-(-total // slots) * slots)
        if fill >= 0.9:
            return splits
        if fill > best_fill:
            best, best_fill = splits, fill
    return best


class DecodeLaunch:
    """A forward on the decode tiles: the attention kernel over a (query-tile slots x splits, K/V
    heads, sequences) grid and, with more than one split, the combine. ``workspace_entries``: the
    fp32 partials' size in 4-byte entries (0: one split, no partials)."""

    __slots__ = ("kernels", "spec", "grid", "splits", "workspace_entries", "scalars",
                 "combine_grid", "combine_scalars")

    def __init__(self, kernels, spec, *, q_strides, k_strides, v_strides, o_strides,
                 lse_head_stride: int, total_q: int, batch: int, heads: int, heads_per_kv: int,
                 head_dim: int, scale: float, scale_log2: float, window, max_seqlen_q: int,
                 keys_bound: int, num_sms: int, num_splits=None, paged=None,
                 mods: ScoreMods = NO_MODS):
        """``keys_bound``: an upper bound on any sequence's key count (sizes the splits);
        ``paged`` and ``mods`` as for ForwardLaunch."""
        self.kernels, self.spec = kernels, spec
        heads_kv = heads // heads_per_kv
        # Query tiles per sequence, from max_seqlen_q; a CTA strides over more where it is loose.
        slots = max(1, -(-max_seqlen_q * heads_per_kv // spec.tiles.block_m))
        self.splits = splits = decode_splits(slots * heads_kv * batch, keys_bound,
                                             spec.tiles.block_n, num_sms * spec.tiles.min_blocks,
                                             num_splits)
        self.grid = (slots * splits, heads_kv, batch)
        page_size, pages, k_page, v_page, table_stride = paged or (0, 0, 0, 0, 0)
        k_capacity = page_size * pages if paged else -1
        strides = (q_strides[0], q_strides[1], k_strides[0], k_strides[1], v_strides[0],
                   v_strides[1], o_strides[0], o_strides[1], lse_head_stride)
        self.scalars = strides + (k_page, v_page, table_stride, mods.alibi_stride, heads_per_kv,
                                  head_dim, scale, scale_log2, mods.softcap_in, mods.softcap_out,
                                  window[0], window[1], page_size, k_capacity, splits, heads,
                                  total_q)
        # lse and O partials per split and (token, head) row (split_combine.cuh's layout: the lse
        # entries rounded up to 16 bytes, then the O rows).
        rows = splits * total_q * heads
        self.workspace_entries = (-(-rows // 4) * 4 + rows * head_dim) if splits > 1 else 0
        rows_per_block = COMBINE_THREADS // 32
        self.combine_grid = (max(1, min(-(-max_seqlen_q * heads // rows_per_block), _MAX_GRID_X)),
                             batch)
        self.combine_scalars = (o_strides[0], o_strides[1], lse_head_stride, splits, heads,
                                total_q, head_dim)

    def launch(self, stream_ptr: int, q: int, k: int, v: int, out: int, lse: int, cu_q: int,
               cu_k: int, workspace: int, seqused_k: int = 0, block_table: int = 0,
               alibi: int = 0, sinks: int = 0) -> None:
        """As ForwardLaunch.launch; ``workspace`` holds workspace_entries fp32 partials."""
        kernels, spec = self.kernels, self.spec
        split = self.splits > 1
        gx, gy, gz = self.grid
        _SM80_ARGS.pack(q, k, v, out, lse, cu_q, cu_k, 0, seqused_k, block_table,
                        workspace if split else 0, alibi, sinks, *self.scalars).launch(
            kernels.main, gx, spec.threads, stream_ptr, spec.smem_bytes, gy, gz)
        if split:
            cx, cy = self.combine_grid
            _COMBINE_ARGS.pack(workspace, out, lse, cu_q, sinks, *self.combine_scalars).launch(
                kernels.combine, cx, COMBINE_THREADS, stream_ptr, 0, cy)


# cuda_src/bwd_common.cuh: struct BwdParams (both backward families), by value: 22 pointers (the
# last five the ALiBi slopes, the sinks, dsinks and dsinks' partials and tickets), 21 int64
# (strides, total_q, the dQ accumulator's size, the slopes' batch stride), 3 int32, 4 float32
# (scale, its log2 form, the softcap's two constants), 4 int32 (window, batch, use_qdo_map),
# padding to the 64-byte alignment of the 128-byte tensor maps of q and dout. Through
# kernelParams, as the forward's Params.
_BWD_PARAMS = struct.Struct("<22Q21q3i4f4i60x128s128s")
_BWD_ARGS = _ParamBuffer(_BWD_PARAMS, by_struct=True)
_PREP_THREADS = 256  # cuda_src/bwd_common.cuh: kPrepThreads (8 lanes per row and head)
# The dQ conversion's block: bwd_sm80.cu's kConvertThreads (one thread per 8 elements), bwd_sm90.cu's
# kConsumerThreads (one CTA per query-tile slot and head).
_CONVERT_THREADS = 256
SINK_THREADS = 256  # cuda_src/bwd_common.cuh: kSinkThreads
SINK_ROWS = 8192  # kSinkRows: query rows per CTA of varlen_bwd_dsinks


def dq_accum_slots(total_q: int, batch: int, block_m: int) -> int:
    """Query-tile slots of the sm90 family's dQ accumulator (cuda_src/bwd_sm90.cu, kDqChunkFloats):
    sequence b's tiles start at slot (q_start + b block_m) // block_m, so the last slot in use is
    at most (total_q + batch block_m - 1) // block_m."""
    return (total_q + batch * block_m - 1) // block_m + 1


class BackwardLaunch:
    """A backward's launches (preprocess, key-tile scheduler, dK/dV kernel, then the dQ conversion
    or, deterministic on the sm80 family, the query-tile scheduler and the dQ kernel) with
    everything but the pointers decided, as :class:`ForwardLaunch`.

    ``strides`` maps q, k, v, out, dout, dq, dk, dv to (row, head) strides in elements."""

    __slots__ = ("kernels", "spec", "workspace_entries", "int_offset", "accum_bytes", "scalars",
                 "schedule_kv", "schedule_q", "grid_kv", "grid_q", "grid_prep", "grid_convert",
                 "q_map_args", "do_map_args", "heads", "total_q", "sink_chunks",
                 "sink_partials_offset", "sink_tickets_offset")

    def __init__(self, kernels, spec, *, strides: dict, lse_strides, total_q: int, total_k: int,
                 batch: int, heads: int, heads_kv: int, head_dim: int, scale: float,
                 scale_log2: float, window, num_sms: int, mods: ScoreMods = NO_MODS):
        """``mods``: the score modifiers' constants; with sinks, the launches also compute dsinks
        (varlen_bwd_dsinks)."""
        t = spec.tiles
        self.kernels, self.spec, self.heads, self.total_q = kernels, spec, heads, total_q
        bound_k = tile_bound(total_k, batch, t.block_n)
        bound_q = tile_bound(total_q, batch, t.block_m)
        self.grid_kv, self.grid_q = bound_k * heads_kv, bound_q * heads
        if max(self.grid_kv, self.grid_q) > _MAX_GRID_X:
            raise ValueError("varlen_attn_backward: tiles x heads exceed one launch's grid")
        # Scratch, one allocation of 32-bit words (one allocation less per call): float32 lse_log2
        # and delta (heads x total_q each) after, where the dK/dV kernel adds dQ (atomic and
        # ordered modes), the dQ accumulator (first: its float4 and bulk accesses need the
        # allocation's alignment); then, from a 16-byte boundary, int32 the key-tile schedule (its
        # int2 entries need 8) and after it, with the dQ kernel, the query-tile schedule or,
        # ordered, the counters of the dQ additions. The accumulator is row-major on the sm80
        # family; on the sm90 family whole query tiles in fragment order, one per slot and head.
        # With sinks, dsinks' partials close the float part and its tickets the int part.
        slots = dq_accum_slots(total_q, batch, t.block_m) if total_q else 0
        if spec.dq_kernel:
            accum_floats = 0
        elif spec.kernel == "sm90":
            accum_floats = slots * heads * t.block_m * spec.head_dim_tile
        else:
            accum_floats = total_q * heads * head_dim
        self.accum_bytes = 4 * accum_floats
        self.sink_chunks = max(1, -(-total_q // SINK_ROWS)) if mods.sinks else 0
        floats = 2 * heads * total_q + accum_floats
        self.sink_partials_offset = 4 * floats
        floats += heads * self.sink_chunks
        float_entries = -(-floats // 4) * 4
        int_entries = SCHEDULE_HEADER + 2 * bound_k
        if spec.dq_kernel:
            int_entries += SCHEDULE_HEADER + 2 * bound_q
        elif spec.ordered_dq:
            int_entries += 2 * heads * total_q
        self.sink_tickets_offset = 4 * (float_entries + int_entries)
        if mods.sinks:
            int_entries += heads
        self.int_offset = 4 * float_entries
        self.workspace_entries = float_entries + int_entries
        left, right = window
        # Key tiles are scheduled as the forward schedules query tiles, with the roles swapped: the
        # transposed mask is the band with left and right exchanged.
        # Ordered mode: each sequence's key tiles in order (a CTA waits only for earlier ones), and
        # two K/V heads a group (a key tile's predecessor in the dQ order is launched two CTAs
        # before it, not one: a shorter wait for its hand-off, 0-6% faster on the H200,
        # 2026-12-02). The sm90 grid reads the head order; the sm80 kernels go head by head.
        group = min(2, heads_kv) if spec.ordered_dq else 1
        self.schedule_kv = (batch, t.block_n, t.block_m, right, left, bound_k,
                            int(spec.ordered_dq), heads_kv, group, num_sms, 1, -1)
        self.schedule_q = (batch, t.block_m, t.dq_block_n, left, right, bound_q, 0, heads,
                           heads // heads_kv, num_sms, 1, -1)
        s = strides
        self.scalars = (*s["q"], *s["k"], *s["v"], *s["out"], *s["dout"], *s["dq"], *s["dk"],
                        *s["dv"], *lse_strides, total_q, accum_floats, mods.alibi_stride, heads,
                        heads // heads_kv, head_dim, scale, scale_log2, mods.softcap_in,
                        mods.softcap_out, left, right, batch)
        rows = total_q * heads
        self.grid_prep = -(-rows * 8 // _PREP_THREADS)
        self.grid_convert = (slots * heads if spec.kernel == "sm90"
                             else -(-rows * (head_dim // 8) // _CONVERT_THREADS))
        if self.grid_convert > _MAX_GRID_X:
            raise ValueError("varlen_attn_backward: the dQ conversion exceeds one launch's grid")
        # The sm90 dK/dV kernel loads whole query tiles of q and dout by TMA where both have a map.
        self.q_map_args = self.do_map_args = None
        if spec.kernel == "sm90" and total_q > 0:
            self.q_map_args, self.do_map_args = (
                (spec.dtype, total_q, heads, head_dim, *s[name], t.block_m)
                for name in ("q", "dout"))

    def launch(self, stream_ptr: int, *, q, k, v, out, dout, dq, dk, dv, lse, workspace, cu_q,
               cu_k, alibi=0, sinks=0, dsinks=0) -> None:
        """Launches on ``stream_ptr``; every argument is a device pointer, ``workspace`` one of
        ``workspace_entries`` 32-bit words (alibi, sinks: 0 for none; dsinks written with
        sinks)."""
        kernels, spec = self.kernels, self.spec
        float_ws, int_ws = workspace, workspace + self.int_offset
        dq_accum = 0 if spec.dq_kernel else float_ws
        lse_log2 = float_ws + self.accum_bytes
        delta = lse_log2 + 4 * self.heads * self.total_q
        ws_kv = int_ws
        # After the key-tile schedule: the query-tile schedule or the ordered mode's counters.
        ws_after = int_ws + 4 * (SCHEDULE_HEADER + 2 * self.schedule_kv[5])
        # Per call: a map holds its tensor's address (cached per pointer by tile_map).
        q_map = do_map = None
        if self.q_map_args is not None:
            q_map = _tma.tile_map(q, *self.q_map_args)
            do_map = _tma.tile_map(dout, *self.do_map_args)
        use_qdo = q_map is not None and do_map is not None
        chunks = self.sink_chunks
        params = _BWD_ARGS.pack(
            q, k, v, out, dout, dq, dk, dv, lse, lse_log2, delta, dq_accum, cu_q, cu_k, ws_kv,
            ws_after if spec.dq_kernel else 0, ws_after if spec.ordered_dq else 0, alibi, sinks,
            dsinks, workspace + self.sink_partials_offset if chunks else 0,
            workspace + self.sink_tickets_offset if chunks > 1 else 0,
            *self.scalars, int(use_qdo), q_map if use_qdo else _NO_MAP,
            do_map if use_qdo else _NO_MAP)
        if self.total_q:
            params.launch(kernels.preprocess, self.grid_prep, _PREP_THREADS, stream_ptr)
        if chunks:  # the preprocess's lse_log2 and delta (and zeroed tickets) are what it reads
            params.launch(kernels.dsinks, chunks, SINK_THREADS, stream_ptr, 0, self.heads)
        _launch_schedule(kernels.schedule, stream_ptr, cu_k, cu_q, 0, self.schedule_kv, ws_kv)
        params.launch(kernels.main, self.grid_kv, spec.threads, stream_ptr, spec.smem_bytes)
        if spec.dq_kernel:
            _launch_schedule(kernels.schedule, stream_ptr, cu_q, cu_k, 0, self.schedule_q,
                             ws_after)
            params.launch(kernels.dq, self.grid_q, spec.dq_threads, stream_ptr,
                          spec.dq_smem_bytes)
        elif self.total_q:
            params.launch(kernels.dq_convert, self.grid_convert, _CONVERT_THREADS, stream_ptr)
