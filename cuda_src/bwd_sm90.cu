// FlashAttention backward on Hopper (sm_90a): the dK/dV kernel (and atomic dQ) on wgmma tensor
// cores, warp-specialized; the algorithm, the parameters and the other kernels are in
// bwd_common.cuh.
//
// One CTA per (key tile of kBlockN = 128 keys, K/V head), three warpgroups:
//  - warpgroup 0, the producer, gives up registers and only copies: K and V once, then for every
//    query tile the mask lets the key tile see (for every query head of the GQA group) Q, dO and
//    the tile's lse_log2 and delta into a ring of kStages slots. Q and dO go by TMA where the tile
//    lies wholly inside its sequence, by cp.async (zero-filled past the sequence's end) where not;
//    the statistics by cp.async. Each batch of copies completes an mbarrier when it lands.
//  - warpgroups 1 and 2, the consumers, own 64 keys each. Per query tile:
//      S^T = K Q^T and dP^T = V dO^T      (wgmma, both operands in shared memory)
//      P^T, then dV += P^T dO             (A from registers: P never leaves them)
//      dS^T, then dK += dS^T Q            (A from registers; dK and dV stay in registers throughout)
//      dS^T to shared memory, dQ = dS K   (wgmma, both operands MN-major in shared memory)
//    and dQ's fp32 partial goes to the accumulator: each warp stages its part in shared memory as
//    its registers hold it (fragment order, 16-byte stores) and adds it with one bulk reduction,
//    no barrier beyond the warp's own. dQ needs all 128 keys, so
//    the two consumers meet at a named barrier once per query tile; dQ's work is split between them
//    by head-dim columns when a query tile is one wgmma M (64 rows), by rows when it is two (128).
// The GEMM for dV is issued before dS is computed and the one for dK before dS is stored, so the
// tensor cores run while the warpgroup does the softmax-gradient arithmetic.
//
// Specialization (-D from cupy_varlen/_spec.py), beyond bwd_common.cuh's: CV_STAGES (the Q/dO ring).

#include "bwd_common.cuh"
#include "epilogue.cuh"
#include "mask.cuh"
#include "pipeline.cuh"
#include "score_mod.cuh"
#include "softmax.cuh"
#include "sync_sm90.cuh"
#include "wgmma.cuh"

constexpr int kStages = CV_STAGES;
constexpr int kConsumers = 2;
constexpr int kWarpgroupThreads = 128;
constexpr int kThreads = (1 + kConsumers) * kWarpgroupThreads;
constexpr int kConsumerThreads = kConsumers * kWarpgroupThreads;
constexpr int kConsumerKeys = kBlockN / kConsumers;  // one wgmma M of 64
constexpr int kQAtoms = kBlockM / 8;                 // columns of S^T in mma atoms
constexpr int kPanelBytes = 128;                     // one row of a 64-element panel
// dQ = dS K, 64 rows per wgmma: two query row blocks go one per consumer, one is split by columns.
// A query tile that is no whole number of wgmma row blocks (80, FA4's width at head dim 128 without
// a mask: N = 80 wgmmas read their shared-memory operands below the pipe's rate, N = 64 ones at it)
// swaps the operands: dQ^T = K^T dS^T, each consumer 64 head-dim rows by all the tile's queries, dS
// stored queries x keys (transposed from the registers by stmatrix) and dQ^T staged transposed.
constexpr bool kDqSwapAB = kBlockM % 64 != 0;
constexpr bool kDqSplitRows = kBlockM == 2 * 64;
constexpr int kDqN = kDqSplitRows ? kHeadDim : kHeadDim / kConsumers;
constexpr int kDqRows = kDqSwapAB ? kBlockM : 64;  // query rows of a consumer's dQ partial
// Swapped, the accumulator holds dQ^T: 64 head-dim rows x kBlockM queries.
constexpr int kDqAccN = kDqSwapAB ? kBlockM : kDqN;
// The dQ accumulator (BwdParams::dq_accum) in this family's layout: per (query-tile slot, head) one
// chunk of kBlockM x kHeadDim floats, consumer c's in its c-th half, warp w's fragments
// (stage_fragments_f32's order) in the w-th quarter of that. Sequence b's tiles take the slots from
// first_dq_slot(b) on: the slots are query rows padded by kBlockM per sequence (FA3's dQ
// accumulator), so a tile's rows past its sequence's end land in its own slot, and no two
// sequences share one.
constexpr int kDqChunkFloats = kDqRows * kDqN;
constexpr int kConsumerWarps = kWarpgroupThreads / 32;
constexpr int kDqWarpFloats = kDqChunkFloats / kConsumerWarps;
static_assert(kDqWarpFloats == kDqAccN / 8 * 32 * 4, "a warp's part is its fragments");
static_assert(kConsumers * kDqChunkFloats == kBlockM * kHeadDim,
              "the consumers' dQ partials tile the query tile");
// lse and delta atoms a consumer reads before the GEMM wait that precedes their use: all of a
// 64-query tile's. Larger tiles read all of delta ahead (P is packed to 16 bits by then) but
// little lse (beside S^T and dP^T): two atoms at 80 queries, none at 128 (d64), which also keeps
// delta where used in fp16, whose unpacking of P needs more registers (12-byte spill otherwise).
// A softcap reads lse again for dS (softcap_scores_gradient_packed): there lse is read where used.
constexpr int kStatsAhead = CV_SOFTCAP ? 0 : kQAtoms <= 8 ? kQAtoms : kDqSwapAB ? 2 : 0;
constexpr int kDeltaAhead = kQAtoms <= 8 || CV_DTYPE_BF16 ? kQAtoms : 0;
constexpr int kProducerRegs = 24;
constexpr int kConsumerRegs = 240;
static_assert(kConsumerKeys == 64, "each consumer warpgroup owns one 64-key wgmma tile");
static_assert(kBlockM == 64 || kBlockM == 128 || (kBlockM == 80 && kHeadDim == 128),
              "a query tile is one or two wgmma row blocks, or 80 queries at head dim 128");
static_assert(kBlockM <= kWarpgroupThreads, "one producer thread per lse and delta value");
static_assert(kHeadDim % 64 == 0 && kDqN % 64 == 0 && kDqN <= 128,
              "operands are whole 128-byte panels; dQ's N is one wgmma's");
// setmaxnreg moves registers within what the CTA was launched with (see fwd_sm90.cu).
constexpr int kLaunchRegs = (65536 / kThreads) / 8 * 8;
static_assert(kProducerRegs * kWarpgroupThreads + kConsumerRegs * kConsumerThreads <=
                  kLaunchRegs * kThreads, "register reallocation exceeds the CTA's registers");

// dS^T (keys x queries), or dS (queries x keys) with the operands of dQ swapped.
typedef typename Choose<kDqSwapAB, SmemTile<kBlockM, kBlockN>,
                       SmemTile<kBlockN, kBlockM>>::type DsTile;

// Shared memory. Operand tiles sit on 1024-byte boundaries: the 128-byte swizzle that wgmma reads
// is a function of the address. dK and dV are staged where K and V were.
struct SharedStorage {
  alignas(kSwizzleAtomBytes) unsigned char k[KTile::kBytes];
  alignas(kSwizzleAtomBytes) unsigned char v[KTile::kBytes];
  alignas(kSwizzleAtomBytes) unsigned char q[kStages][QTile::kBytes];
  alignas(kSwizzleAtomBytes) unsigned char dout[kStages][QTile::kBytes];
#if CV_DQ_ATOMIC
  // dS^T (or dS), twice: a consumer may store the next tile's while the other still reads this
  // one.
  alignas(kSwizzleAtomBytes) unsigned char ds[2][DsTile::kBytes];
  // Each consumer's dQ partial of its last query tile in fragment order, staged for the bulk
  // reduction.
  alignas(kSwizzleAtomBytes) unsigned char dq[kConsumers][kDqChunkFloats * 4];
#endif
  alignas(16) unsigned char stats[kStages][kStatBytes];  // lse_log2 and delta per query tile
  u64 kv_full;  // K and V landed
  u64 q_full[kStages], q_empty[kStages];  // a query tile's Q, dO and statistics: landed / read
};
// The host reserves CV_SMEM_BYTES (cupy_varlen/_spec.py, BwdSpec.smem_bytes): the storage plus the
// slack that aligns its base.
static_assert(sizeof(SharedStorage) + kSwizzleAtomBytes <= CV_SMEM_BYTES,
              "SharedStorage exceeds the shared memory the host reserves");

// SharedStorage's members as shared-window addresses (see fwd_sm90.cu's Smem).
struct Smem {
  u32 base;
  CV_DEVICE u32 k() const { return base + CV_OFFSET_OF(SharedStorage, k); }
  CV_DEVICE u32 v() const { return base + CV_OFFSET_OF(SharedStorage, v); }
  CV_DEVICE u32 q(int stage) const { return base + CV_OFFSET_OF_ELEMENT(SharedStorage, q, stage); }
  CV_DEVICE u32 dout(int stage) const {
    return base + CV_OFFSET_OF_ELEMENT(SharedStorage, dout, stage);
  }
#if CV_DQ_ATOMIC
  CV_DEVICE u32 ds(int buffer) const {
    return base + CV_OFFSET_OF_ELEMENT(SharedStorage, ds, buffer);
  }
  CV_DEVICE u32 dq(int consumer) const {
    return base + CV_OFFSET_OF_ELEMENT(SharedStorage, dq, consumer);
  }
#endif
  CV_DEVICE u32 stats(int stage) const {
    return base + CV_OFFSET_OF_ELEMENT(SharedStorage, stats, stage);
  }
  CV_DEVICE u32 kv_full() const { return base + CV_OFFSET_OF(SharedStorage, kv_full); }
  CV_DEVICE u32 q_full(int stage) const {
    return base + CV_OFFSET_OF_ELEMENT(SharedStorage, q_full, stage);
  }
  CV_DEVICE u32 q_empty(int stage) const {
    return base + CV_OFFSET_OF_ELEMENT(SharedStorage, q_empty, stage);
  }
};
typedef PipelineState<kStages> QPipe;

// The named barrier of the consumers' meeting points (0 is __syncthreads').
constexpr int kConsumerBarrier = 1;

// Sequence b's first slot of the dQ accumulator (kDqChunkFloats above).
CV_DEVICE i64 first_dq_slot(i64 q_start, int b) { return (q_start + (i64)b * kBlockM) / kBlockM; }

// Everything about this CTA's key tile, derived identically by producer and consumers.
struct KeyTileWork {
  int kv_head, batch;
  SeqInfo seq;
  i64 dq_slot0;  // first_dq_slot of the sequence
  int n0, keys_valid;
  MaskBand band_t;  // the mask seen from the keys (see bwd_sm80.cu)
  QueryTileWalk walk;
  int n_iters;

  CV_DEVICE int head(const BwdParams& p, const QueryTileCursor& at) const {
    return kv_head * p.heads_per_kv + at.head_in_group;
  }
};

CV_DEVICE bool load_key_tile(const BwdParams& p, KeyTileWork& t) {
  TileWork work;
  // The key-tile schedule's head order: one K/V head at a time (ordered mode: two, so that a key
  // tile's predecessor in the dQ order is launched two CTAs before it, not one), the last group
  // widened where a head's work is short beside its longest tile (cupy_varlen/_launch.py).
  if (!decode_tile_in_head_order(p.schedule_kv, blockIdx.x, work, t.kv_head)) return false;
  t.batch = work.batch_idx;
  t.seq = load_seq_info(p.cu_seqlens_q, p.cu_seqlens_k, nullptr, work.batch_idx);
  t.dq_slot0 = first_dq_slot(t.seq.q_start, work.batch_idx);
  t.n0 = work.m_block * kBlockN;
  t.keys_valid = min(kBlockN, t.seq.k_len - t.n0);
  const MaskBand band = make_band(t.seq.q_len, t.seq.k_len, bwd_window(p));
  t.band_t = {-band.hi, -band.lo};
  t.walk = QueryTileWalk(
      key_block_range(t.n0, t.n0 + t.keys_valid - 1, t.seq.q_len, t.band_t, kBlockM),
      work.m_block, p.heads_per_kv);
  t.n_iters = t.walk.steps;
  return true;
}

#if CV_DQ_ORDERED
// Ordered dQ additions (bwd_common.cuh): the counter of consumer `wg`'s half of query tile m0's dQ
// (head `head`): how many of the key tiles' warps have added their parts, kConsumerWarps a tile.
CV_DEVICE int* dq_order_slot(const BwdParams& p, const KeyTileWork& t, int head, int m0, int wg) {
  return p.dq_order + ((i64)head * p.total_q + t.seq.q_start + m0) * 2 + wg;
}

// Waits for this key tile's turn at query tile m0 (its place, from the last, among the key tiles
// that see the query tile: the range the forward walks for it), then orders the global memory they
// wrote before this thread's own additions (bulk reductions included, hence the proxy fence).
// Returns the counter, for pass_turn. (No timeout: a trap on the wait path made ptxas spill
// kilobytes of the consumers.)
CV_DEVICE int* wait_for_turn(const BwdParams& p, const KeyTileWork& t, int head, int m0,
                             int wg) {
  // The last of those key tiles is key_block_range's n_block_max - 1 for the query tile: the tile
  // of its last row's last allowed key (the band's upper edge is -band_t.lo).
#if CV_WINDOWED
  const int row_last = min(m0 + kBlockM, t.seq.q_len) - 1;
  const int key_last = last_key(row_last, t.seq.k_len, MaskBand{0, -t.band_t.lo});
#else
  const int key_last = t.seq.k_len - 1;  // every key tile sees every query tile
#endif
  const int turn = key_last / kBlockN - t.n0 / kBlockN;
  int* const order = dq_order_slot(p, t, head, m0, wg);
  // The count runs ahead of the turn once this tile's faster warps pass theirs, and reaches it
  // only through the tiles before: hence the test.
  while (ld_acquire_gpu(order) < turn * kConsumerWarps) __nanosleep(64);
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
  return order;
}

// After this warp's additions are complete: one of the kConsumerWarps passes that make the next key
// tile's turn.
CV_DEVICE void pass_turn(int* order) {
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
  red_release_gpu_add(order, 1);
}
#endif

// The TMA copies of one whole query tile (Q and dO) onto `full`, announcing their bytes without
// arriving. Not inlined: inline, the copies' operands changed the register allocation of the
// whole kernel enough that the d64 consumers spilled (NVRTC 12.9 and 13.0). It needs a dozen
// registers, well within the producer's kProducerRegs.
__noinline__ __device__ void send_query_tile_bulk(const BwdParams& p, u32 q_dst, u32 do_dst,
                                                  int head, int row0, u32 full) {
  mbarrier_expect_tx(full, 2 * QTile::kBytes);
  load_tile_bulk<kBlockM, kHeadDim>(q_dst, p.q_map, head, row0, full);
  load_tile_bulk<kBlockM, kHeadDim>(do_dst, p.do_map, head, row0, full);
}

CV_DEVICE void produce(const BwdParams& p, const KeyTileWork& t, const Smem& smem, int ptid) {
  const int chunks_valid = p.head_dim / 8;
  const i64 key0 = t.seq.k_start + t.n0;
  load_tile_async<kBlockN, kHeadDim, kWarpgroupThreads>(
      smem.k(), p.k + key0 * p.k_row_stride + (i64)t.kv_head * p.k_head_stride,
      p.k_row_stride, t.keys_valid, chunks_valid, ptid);
  load_tile_async<kBlockN, kHeadDim, kWarpgroupThreads>(
      smem.v(), p.v + key0 * p.v_row_stride + (i64)t.kv_head * p.v_head_stride,
      p.v_row_stride, t.keys_valid, chunks_valid, ptid);
  mbarrier_arrive_on_copies(smem.kv_full());

  // One step per query tile: the step count is the ring position.
  QueryTileCursor at = t.walk.begin();
  for (QPipe q_pipe; q_pipe.count < t.n_iters; q_pipe.advance(), t.walk.advance(at)) {
    const int stage = q_pipe.index();
    q_pipe.wait_empty(smem.q_empty(stage));
    const int head = t.head(p, at);
    const int m0 = at.m_block * kBlockM;
    const int rows = t.seq.q_len - m0;
    const i64 row0 = t.seq.q_start + m0;
    const u32 full = smem.q_full(stage);
    if (p.use_qdo_map && rows >= kBlockM) {
      // A tile wholly inside its sequence: two TMA copies per panel from one thread instead of
      // 16-byte cp.async and its address arithmetic in every producer thread. That thread still
      // arrives through its statistics' cp.async below, so it only announces the bytes.
      if (ptid == 0)
        send_query_tile_bulk(p, smem.q(stage), smem.dout(stage), head, (int)row0, full);
    } else {
      // The tile that runs past the sequence's end: cp.async zero-fills those rows, where TMA
      // would read the next sequence's (whose non-finite values would reach dK and dV as 0 * inf).
      load_tile_async<kBlockM, kHeadDim, kWarpgroupThreads>(
          smem.q(stage),
          p.q + row0 * p.q_row_stride + (i64)head * p.q_head_stride, p.q_row_stride, rows,
          chunks_valid, ptid);
      load_tile_async<kBlockM, kHeadDim, kWarpgroupThreads>(
          smem.dout(stage),
          p.dout + row0 * p.do_row_stride + (i64)head * p.do_head_stride, p.do_row_stride, rows,
          chunks_valid, ptid);
    }
    const i64 at = (i64)head * p.total_q + row0;
    const u32 stats = smem.stats(stage);
    // Rows past the sequence read lse 0 and delta 0; the tail mask zeroes their P anyway.
    load_stats_async(stats, p.lse_log2 + at, rows, kBlockM, ptid);
    load_stats_async(stats + kBlockM * 4, p.delta + at, rows, kBlockM, ptid);
    mbarrier_arrive_on_copies(full);
  }
  // No copy may still be landing when the CTA retires.
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

CV_DEVICE void consume(const BwdParams& p, const KeyTileWork& t, const Smem& smem, int wg,
                       int ctid) {
  const u32 k_rows = smem.k() + wg * kConsumerKeys * kPanelBytes;
  const u32 v_rows = smem.v() + wg * kConsumerKeys * kPanelBytes;
  const int lane = ctid & 31;
  // This warp's first key in the tile, from threadIdx.x rather than the uniform `wg`: from `wg`,
  // the masking's per-thread arithmetic moved around enough to spill 4-80 bytes in the masked
  // D128 tiles (NVRTC 12.9 and 13.5).
  const int key_row0 =
      ((int)threadIdx.x / kWarpgroupThreads - 1) * kConsumerKeys + (ctid >> 5) * 16;
  const TileMaskTest<kBlockM> mask_test(t.n0, t.n0 + t.keys_valid - 1, t.seq.q_len, t.band_t);

  float acc_dv[1][kDAtoms][4], acc_dk[1][kDAtoms][4];
  zero_fragments(acc_dv);
  zero_fragments(acc_dk);
  float(&dv_flat)[kHeadDim / 2] = reinterpret_cast<float(&)[kHeadDim / 2]>(acc_dv);
  float(&dk_flat)[kHeadDim / 2] = reinterpret_cast<float(&)[kHeadDim / 2]>(acc_dk);
  // Waited on even with no query tile to visit: the epilogue stages dK and dV where K and V landed.
  mbarrier_wait(smem.kv_full(), 0);

  // One step per query tile: the step count is the ring position.
#if CV_DQ_ORDERED
  int* pending_turn = nullptr;  // a warp's lane 0: the counter its last additions will advance
#endif
  QueryTileCursor at = t.walk.begin();
  for (QPipe q_pipe; q_pipe.count < t.n_iters; q_pipe.advance(), t.walk.advance(at)) {
    const int it = q_pipe.count;
    const int stage = q_pipe.index();
    const u32 q_slot = smem.q(stage);
    const u32 do_slot = smem.dout(stage);
    const u32 stats = smem.stats(stage);
    const int m0 = at.m_block * kBlockM;
    q_pipe.wait_full(smem.q_full(stage));
    fence_proxy_async();  // the copies, observed through the barrier, before wgmma reads them

    // Read before the GEMMs are issued: after, the loads queue behind the GEMMs' operand reads in
    // the shared-memory pipe, and the first branch after the S^T wait waited for them (7% of the
    // causal D128 backward's warp samples, ncu, H200, 2026-12-02).
    const ColumnStats<kQAtoms, kStatsAhead> lse_log2(stats, 0, lane);
    float s[1][kQAtoms][4], dp[1][kQAtoms][4];
    float(&s_flat)[kBlockM / 2] = reinterpret_cast<float(&)[kBlockM / 2]>(s);
    float(&dp_flat)[kBlockM / 2] = reinterpret_cast<float(&)[kBlockM / 2]>(dp);
    wgmma_ss_kmajor<kBlockM, kHeadDim>(s_flat, k_rows, KTile::kRowCount * kPanelBytes, q_slot,
                                       kBlockM * kPanelBytes);
    wgmma_ss_kmajor<kBlockM, kHeadDim>(dp_flat, v_rows, KTile::kRowCount * kPanelBytes, do_slot,
                                       kBlockM * kPanelBytes);
#if CV_DQ_ORDERED
    // The last tile's dQ additions, issued at its end, land while S^T and dP^T are computed: then
    // the next key tile's turn there. (At the staging, an iteration later, each key tile of a full
    // mask would wait a whole iteration longer than the one before it.)
    if (lane == 0 && pending_turn) {
      bulk_wait_group<0>();
      pass_turn(pending_turn);
    }
#endif
    wgmma_wait<1>();  // S^T is done; dP^T may still run
    fence_registers(s);
#if CV_SOFTCAP
    apply_softcap(s, bwd_softcap(p));
#endif
#if CV_ALIBI
    apply_alibi(s, t.n0 + key_row0, m0, t.seq.q_len - t.seq.k_len,
                bwd_alibi_slope(p, t.batch, t.head(p, at)), lane);
#endif
    if (mask_test.needs_mask(m0))
      apply_mask(s, t.n0 + key_row0, m0, lane, t.seq.q_len, t.band_t);
    // Keys past the sequence hold zeros, whose score is 0, not -inf: exp2(0 - lse) could overflow.
    if (t.keys_valid < kBlockN) mask_rows_from(s, key_row0, t.keys_valid, lane);
    u32 pa[kBlockM / 16][4];
    // P straight into its 16-bit operand, a k16 fragment at a time: nothing needs the fp32 P
    // later (scores_gradient_packed), and its registers free as the fragments fill.
    probabilities_backward_packed(s, lse_log2, p.scale_log2, pa);
    const ColumnStats<kQAtoms, kDeltaAhead> delta(stats + kBlockM * 4, 0, lane);  // ditto, dP^T
    wgmma_rs_mnmajor<kHeadDim, kBlockM>(dv_flat, pa, do_slot, kBlockM * kPanelBytes);

    wgmma_wait<1>();  // dP^T is done; dV's GEMM may still run
    fence_registers(dp);
#if CV_SOFTCAP
    softcap_scores_gradient_packed(pa, dp, delta, lse_log2, p.softcap_in / p.scale_log2);
#else
    scores_gradient_packed(pa, dp, delta);  // P's fp32 registers were free while dP^T ran
#endif
    u32 dsa[kBlockM / 16][4];
    pack_a_fragments(dp, dsa);
#if CV_DQ_ATOMIC
    const u32 ds_tile = smem.ds(it & 1);
    if constexpr (kDqSwapAB)
      stage_a_fragments_transposed<DsTile>(dsa, ds_tile, key_row0, lane);
    else
      stage_fragments<DsTile>(dp, ds_tile, key_row0, 0, lane);
    fence_proxy_async();  // the generic-proxy stores before the other consumer's wgmma reads
    // Both halves of dS^T are in; this buffer's previous contents (two tiles ago) were read by
    // GEMMs that both consumers have waited for before arriving here last time.
    named_barrier_sync(kConsumerBarrier, kConsumerThreads);
    const int q_row0 = kDqSplitRows ? wg * 64 : 0;  // this consumer's dQ rows and columns
    const int d0 = kDqSplitRows ? 0 : wg * kDqN;
    float dq[1][kDqAccN / 8][4];
    float(&dq_flat)[kDqAccN / 2] = reinterpret_cast<float(&)[kDqAccN / 2]>(dq);
    if constexpr (kDqSwapAB)
      wgmma_ss_mn_k<kDqAccN, kBlockN>(dq_flat, smem.k() + d0 / 64 * KTile::kRowCount * kPanelBytes,
                                      ds_tile, DsTile::kRowCount * kPanelBytes);
    else
      wgmma_ss_mnmajor<kDqAccN, kBlockN>(
          dq_flat, ds_tile + q_row0 / 64 * DsTile::kRowCount * kPanelBytes,
          smem.k() + d0 / 64 * KTile::kRowCount * kPanelBytes, KTile::kRowCount * kPanelBytes);
#endif
    // dK last: it runs while dQ goes out.
    wgmma_rs_mnmajor<kHeadDim, kBlockM>(dk_flat, dsa, q_slot, kBlockM * kPanelBytes);
#if CV_DQ_ATOMIC
    wgmma_wait<1>();  // dV and dQ are done; dK may still run
    fence_registers(dq);
    // P's registers are free from here (its GEMM, dV's, is done): the 80-query tile needs them
    // for the dQ staging.
    if constexpr (kDqSwapAB) fence_registers(pa);
    const int head = t.head(p, at);
    // The whole partial goes out, rows past the sequence's end included: they land in this
    // sequence's own slot, which no other sequence adds to and dq_convert reads only up to the
    // sequence's end.
    const int warp = ctid >> 5;
    const u32 staging = smem.dq(wg) + warp * kDqWarpFloats * 4;
    if (lane == 0) bulk_wait_group_read<0>();  // the last tile's reduction has read it
    __syncwarp();
    stage_fragments_f32(dq, staging, lane);
    fence_proxy_async();  // the generic-proxy stores before the bulk copy reads them
    __syncwarp();
    if (lane == 0) {
#if CV_DQ_ORDERED
      pending_turn = wait_for_turn(p, t, head, m0, wg);
#endif
      reduce_add_bulk(p.dq_accum + ((t.dq_slot0 + at.m_block) * p.heads + head) *
                                       (i64)(kBlockM * kHeadDim) +
                          wg * kDqChunkFloats + warp * kDqWarpFloats,
                      staging, kDqWarpFloats * 4);
    }
#endif
    wgmma_wait<0>();
    fence_registers(acc_dv);
    fence_registers(acc_dk);
    if constexpr (!kDqSwapAB) fence_registers(pa);  // A operands: live until their GEMMs are done
    fence_registers(dsa);
    mbarrier_arrive(smem.q_empty(stage));  // Q, dO and the statistics are read for the last time
  }
#if CV_DQ_ATOMIC
  // The staging buffer must stay until the reductions have read it, and their adds must be done
  // before the dQ conversion reads the accumulator.
  if (lane == 0) {
    bulk_wait_group<0>();
#if CV_DQ_ORDERED
    if (pending_turn) pass_turn(pending_turn);
#endif
  }
#endif

  // dV and dK are staged where V and K were: K is read by both consumers' dQ GEMMs, so both must
  // be done with it first.
  named_barrier_sync(kConsumerBarrier, kConsumerThreads);
  stage_fragments<KTile>(acc_dv, smem.v(), key_row0, 0, lane);
  stage_fragments<KTile>(acc_dk, smem.k(), key_row0, 0, lane, p.scale);
  named_barrier_sync(kConsumerBarrier, kConsumerThreads);
  const int chunks_valid = p.head_dim / 8;
  const int tid = wg * kWarpgroupThreads + ctid;
  write_staged_tile<KTile, kConsumerThreads>(
      smem.v(),
      p.dv + (i64)(t.seq.k_start + t.n0) * p.dv_row_stride + (i64)t.kv_head * p.dv_head_stride,
      p.dv_row_stride, t.keys_valid, chunks_valid, tid);
  write_staged_tile<KTile, kConsumerThreads>(
      smem.k(),
      p.dk + (i64)(t.seq.k_start + t.n0) * p.dk_row_stride + (i64)t.kv_head * p.dk_head_stride,
      p.dk_row_stride, t.keys_valid, chunks_valid, tid);
}

extern "C" __global__ void __launch_bounds__(kThreads, 1)
varlen_bwd_dkdv(const __grid_constant__ BwdParams p) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // The swizzle pattern is a function of the address: the storage's tiles need 1024-byte alignment,
  // which the dynamic shared memory's base need not have.
  const Smem smem{(smem_addr(smem_raw) + kSwizzleAtomBytes - 1) & ~(kSwizzleAtomBytes - 1)};
  KeyTileWork t;
  if (!load_key_tile(p, t)) return;  // the same for every thread: before any barrier
  const int tid = threadIdx.x;
  if (tid == 0) {
    mbarrier_init(smem.kv_full(), kWarpgroupThreads);
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(smem.q_full(s), kWarpgroupThreads);
      mbarrier_init(smem.q_empty(s), kConsumerThreads);
    }
  }
  __syncthreads();
  const int wg = warpgroup_index();
  if (wg == 0) {
    warpgroup_reg_dealloc<kProducerRegs>();
    produce(p, t, smem, tid);
  } else {
    warpgroup_reg_alloc<kConsumerRegs>();
    consume(p, t, smem, wg - 1, tid % kWarpgroupThreads);
  }
}

#if CV_DQ_ATOMIC
// ---------------------------------------------------------------------------------------------
// dq = scale * accumulator, rounded to 16 bits: one CTA per (slot, head), thread t of consumer c
// reading back the fragments that consumer's thread t staged, then writing them as the
// consumers' own epilogue writes dK (stage, then 16-byte rows).

extern "C" __global__ void __launch_bounds__(kConsumerThreads)
varlen_bwd_dq_convert(const BwdParams p) {
  __shared__ __align__(128) unsigned char tile_raw[QTile::kBytes];
  const i64 slot = blockIdx.x / p.heads;
  const int head = (int)(blockIdx.x - slot * p.heads);
  // The sequence whose slots hold this one: the last b with first_dq_slot(b) <= slot (the first
  // slots strictly increase with b).
  int lo = 0, hi = p.batch - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first_dq_slot(p.cu_seqlens_q[mid], mid) <= slot) lo = mid; else hi = mid - 1;
  }
  const int q_start = p.cu_seqlens_q[lo];
  const int m0 = (int)(slot - first_dq_slot(q_start, lo)) * kBlockM;
  const int rows_valid = min(kBlockM, p.cu_seqlens_q[lo + 1] - q_start - m0);
  if (rows_valid <= 0) return;  // padding between two sequences' slots: the same for the CTA

  const int wg = threadIdx.x / kWarpgroupThreads, ctid = threadIdx.x % kWarpgroupThreads;
  const int lane = ctid & 31, warp_row0 = (ctid >> 5) * 16;
  const float4* src = reinterpret_cast<const float4*>(
      p.dq_accum + (slot * p.heads + head) * (i64)(kBlockM * kHeadDim) + wg * kDqChunkFloats +
      (ctid >> 5) * kDqWarpFloats);
  float dq[1][kDqAccN / 8][4];
#pragma unroll
  for (int n = 0; n < kDqAccN / 8; ++n) {
    const float4 v = src[n * 32 + lane];
    dq[0][n][0] = v.x * p.scale;
    dq[0][n][1] = v.y * p.scale;
    dq[0][n][2] = v.z * p.scale;
    dq[0][n][3] = v.w * p.scale;
  }
  const u32 tile = smem_addr(tile_raw);
  if constexpr (kDqSwapAB) {
    // dQ^T: rows are head-dim columns d0 + warp_row0 + ..., columns the tile's queries.
    u32 packed[kDqAccN / 16][4];
    pack_a_fragments(dq, packed);
    stage_a_fragments_transposed<QTile>(packed, tile, wg * kDqN + warp_row0, lane);
  } else {
    const int q_row0 = kDqSplitRows ? wg * 64 : 0;
    const int d0 = kDqSplitRows ? 0 : wg * kDqN;
    stage_fragments<QTile>(dq, tile, q_row0 + warp_row0, d0 / 8, lane);
  }
  __syncthreads();
  const i64 row0 = q_start + m0;
  write_staged_tile<QTile, kConsumerThreads>(
      tile, p.dq + row0 * p.dq_row_stride + (i64)head * p.dq_head_stride, p.dq_row_stride,
      rows_valid, p.head_dim / 8, threadIdx.x);
}
#endif
