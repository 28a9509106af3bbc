"""Grid, block, workspace and shared memory for a spec, and the launches themselves."""

from __future__ import annotations

import struct

import numpy as np

from ._arrays import stream_handle

SCHEDULE_THREADS = 1024  # cuda_src/scheduler.cuh: kScheduleThreads
SCHEDULE_HEADER = 4  # cuda_src/scheduler.cuh: kScheduleHeader
# cuda_src/fwd_sm90.cu: struct Params, passed by value as one __grid_constant__ argument: 8 pointers,
# 9 int64 strides, 3 int32, 2 float32, 2 int32, padded to 8-byte alignment.
_SM90_PARAMS = struct.Struct("<8Q9q3i2f2i4x")
_SM90_PARAMS_DTYPE = np.dtype((np.void, _SM90_PARAMS.size))
_MAX_GRID_X = 2**31 - 1


def tile_bound(total_q: int, batch: int, block_m: int) -> int:
    """Host-side upper bound on sum_b ceil(len_b / block_m), from totals alone.

    sum ceil(l / m) <= sum (l + m - 1) / m = (total + batch (m - 1)) / m. It never reads
    cu_seqlens and never undercounts, whatever max_seqlen says; surplus CTAs exit at once.
    """
    return max(1, (total_q + batch * (block_m - 1)) // block_m)


def workspace_size(total_q: int, batch: int, spec) -> int:
    """int32 entries of the schedule workspace: a header and (sequence, tile) per query tile."""
    return SCHEDULE_HEADER + 2 * tile_bound(total_q, batch, spec.tiles.block_m)


def launch_forward(kernels, spec, stream_ptr: int, *, q, k, v, out, lse, cu_q, cu_k, workspace,
                   q_strides, k_strides, v_strides, o_strides, lse_head_stride: int,
                   total_q: int, batch: int, heads: int, heads_per_kv: int, head_dim: int,
                   scale: float, scale_log2: float, window, num_sms: int):
    """Launches the tile scheduler and the forward kernel on ``stream_ptr``. Pointers are ints."""
    stream = stream_handle(stream_ptr)
    tiles = spec.tiles
    left, right = np.int32(window[0]), np.int32(window[1])
    bound = tile_bound(total_q, batch, tiles.block_m)
    ctas = bound * heads
    if ctas > _MAX_GRID_X:
        raise ValueError(f"varlen_attn: {ctas} query tiles x heads exceed one launch's grid")
    kernels.schedule(
        (1,), (SCHEDULE_THREADS,),
        (cu_q, cu_k, np.int32(batch), np.int32(tiles.block_m), np.int32(tiles.block_n), left,
         right, np.int32(bound), workspace),
        stream=stream,
    )
    if spec.persistent:
        params = _SM90_PARAMS.pack(
            q, k, v, out, lse, cu_q, cu_k, workspace,
            q_strides[0], q_strides[1], k_strides[0], k_strides[1],
            v_strides[0], v_strides[1], o_strides[0], o_strides[1], lse_head_stride,
            heads_per_kv, heads, head_dim, scale, scale_log2, window[0], window[1],
        )
        kernels.main(
            (min(ctas, num_sms),), (spec.threads,),
            (np.frombuffer(params, dtype=_SM90_PARAMS_DTYPE),),
            shared_mem=spec.smem_bytes, stream=stream,
        )
        return
    kernels.main(
        (ctas,),
        (spec.threads,),
        (
            q, k, v, out, lse, cu_q, cu_k, workspace,
            q_strides[0], q_strides[1], k_strides[0], k_strides[1],
            v_strides[0], v_strides[1], o_strides[0], o_strides[1],
            lse_head_stride,
            np.int32(heads_per_kv), np.int32(head_dim),
            np.float32(scale), np.float32(scale_log2), left, right,
        ),
        shared_mem=spec.smem_bytes,
        stream=stream,
    )
