// FlashAttention forward for packed variable-length batches on Hopper (sm_90a): wgmma tensor cores,
// warp specialization and a persistent, longest-first tile scheduler.
//
// A CTA is a producer and two or three consumer warpgroups and stays resident (one per SM), pulling
// work items (query tile of one sequence, head) in the scheduler's LPT order until none are left:
//  - warpgroup 0, the producer, gives up registers (setmaxnreg) and only copies: the Q tile, then
//    the K and V tiles the mask lets the query tile see (last tile first), into a ring of kStages
//    K/V slots. K/V tiles wholly inside their sequence go by TMA (cp.async.bulk.tensor, one thread,
//    maps built on the host); Q and a tile that runs past the sequence's end go by cp.async,
//    zero-filled past the end, so no other sequence's data ever enters a tile. Each copy batch
//    completes an mbarrier when it lands (transaction bytes, or cp.async.mbarrier.arrive).
//  - the consumers, warpgroups 1 and up, take 64 query rows each: S = Q K^T (wgmma, both operands
//    in shared memory), mask, online softmax in registers, O += P V (wgmma, P from registers),
//    software-pipelined so that each softmax overlaps the previous tile's P V (see consume()). K
//    and V slots are released separately, each as soon as its GEMM has finished reading it.
// The producer decodes each work item (a chain of dependent global loads: the schedule, then
// cu_seqlens) while the consumers still work on the previous one, and hands it to them decoded,
// through shared memory with the Q barrier. O and lse are written from registers, predicated on
// the row belonging to the sequence.
//
// Three consumers (block_m 192) serve long sequences at head dim 64, where the softmax bounds the
// kernel and a third warpgroup keeps one more in flight; at 160 registers a thread that holds S, P
// and O of 96-key tiles (m64n96 wgmma). The dispatch takes them by the batch's mean length
// (cupy_varlen/_spec.py, _TILES_WGMMA_LONG).
//
// Score modifiers (score_mod.cuh; CV_SOFTCAP, CV_ALIBI, CV_SINKS): softcap and ALiBi apply to each
// finished score tile before its mask and row max, the sink in the epilogue.
//
// Specialization (-D from cupy_varlen/_spec.py): CV_HEAD_DIM (64, 128 or 256), CV_BLOCK_M (128 or
// 192), CV_BLOCK_N, CV_STAGES, CV_WINDOWED, CV_DTYPE_BF16, CV_SOFTCAP, CV_ALIBI, CV_SINKS.

#include "common.cuh"
#include "epilogue.cuh"
#include "mask.cuh"
#include "pipeline.cuh"
#include "scheduler.cuh"
#include "score_mod.cuh"
#include "seqlen.cuh"
#include "softmax.cuh"
#include "sync_sm90.cuh"
#include "tiles.cuh"
#include "wgmma.cuh"

constexpr int kHeadDim = CV_HEAD_DIM;
constexpr int kBlockM = CV_BLOCK_M;
constexpr int kBlockN = CV_BLOCK_N;
constexpr int kStages = CV_STAGES;
constexpr int kConsumerRows = 64;  // one wgmma M per consumer warpgroup
constexpr int kConsumers = kBlockM / kConsumerRows;  // the spec's warps: 4 x (1 + kConsumers)
constexpr int kWarpgroupThreads = 128;
constexpr int kThreads = (1 + kConsumers) * kWarpgroupThreads;
constexpr int kNAtoms = kBlockN / 8;
constexpr int kDAtoms = kHeadDim / 8;
constexpr int kPanelBytes = 128;  // one row of a 64-element panel
// The producer's address arithmetic fits 24 registers up to head dim 128; head dim 256's copies
// (32 lanes per row) need 40, which leaves the consumers 232 (S is half as wide there).
constexpr int kProducerRegs = kHeadDim > 128 ? 40 : 24;
static_assert(kConsumers == 2 || kConsumers == 3, "two or three consumer warpgroups");
static_assert(kBlockM == kConsumers * kConsumerRows, "each consumer owns one 64-row wgmma tile");
static_assert(kHeadDim % 64 == 0 && kBlockN % 32 == 0, "operands are whole 128-byte panels");
static_assert(kBlockN <= 128, "one S = Q K^T wgmma per k16 step");
// setmaxnreg moves registers within what the CTA was launched with: __launch_bounds__(kThreads, 1)
// gives each thread 65536 / kThreads, rounded down to a multiple of 8 (168 at 384 threads, 128 at
// 512). Asking for more than the producer released makes the consumers' setmaxnreg.inc wait
// forever. The consumers share the rest: 240 with two (232 at head dim 256), 160 with three.
constexpr int kLaunchRegs = (65536 / kThreads) / 8 * 8;
constexpr int kConsumerRegsLeft =
    (kLaunchRegs * kThreads - kProducerRegs * kWarpgroupThreads) / (kConsumers * kWarpgroupThreads);
constexpr int kConsumerRegs = (kConsumerRegsLeft < 240 ? kConsumerRegsLeft : 240) / 8 * 8;
static_assert(kProducerRegs * kWarpgroupThreads + kConsumerRegs * kConsumers * kWarpgroupThreads <=
                  kLaunchRegs * kThreads, "register reallocation exceeds the CTA's registers");

typedef SmemTile<kBlockM, kHeadDim> QTile;
typedef SmemTile<kBlockN, kHeadDim> KVTile;

// Named barriers (0 is __syncthreads'): the producer's item broadcast, and the consumers' turns.
constexpr int kProducerBarrier = 1;
constexpr int kTurnBarrier = 2;  // + consumer index

// Ping-pong between the consumer warpgroups (FlashAttention-3): a warpgroup issues its GEMMs only
// on its turn and hands the turn over right after issuing, so one warpgroup's softmax runs while
// the other's GEMMs occupy the tensor cores, instead of both contending for the exp unit at once.
// Not at head dim 64: there a softmax outlasts the other warpgroup's GEMMs (about 1.1k cycles
// against 0.5k per 64 x 128 tile), so the turns only add waiting; with TMA loads the kernel ran
// 8-10% faster without them (full attention; causal +1.5%; docs/performance.md, 2026-11-25).
constexpr bool kTensorCoreTurns = kHeadDim > 64;
// Where O's rescale runs: with turns, between issuing S(i+1) and P(i) V(i), which the turn keeps
// to this warpgroup's own window on the tensor cores, so the multiplies hide behind S(i+1)'s GEMM
// (+0.7-1.4% over the other place at head dim 128 on causal, GQA and skewed batches, equal on
// full ones); without turns, in the branch-free block with the exponentials, whose issue gaps
// they fill (at head dim 64 +3% full and +13% causal over w8's kernel, where the other place
// gained +2% and +6%; docs/performance.md, w9).
constexpr bool kRescaleBeforeOutputGemm = kTensorCoreTurns;
struct TensorCoreTurn {
  int wg;
  CV_DEVICE void acquire() const {
    if (kTensorCoreTurns) named_barrier_sync(kTurnBarrier + wg, 2 * kWarpgroupThreads);
  }
  CV_DEVICE void release() const {
    if (kTensorCoreTurns)
      named_barrier_arrive(kTurnBarrier + (wg + 1) % kConsumers, 2 * kWarpgroupThreads);
  }
};

struct Params {
  const u16* q;
  const u16* k;
  const u16* v;
  u16* out;
  float* lse;
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  int* workspace;
  const int* seqused_k;  // null: every key of a sequence's slot (seqlen.cuh)
  const float* alibi_slopes;  // CV_ALIBI: (batch, heads) with row stride alibi_batch_stride
  const float* sinks;         // CV_SINKS: (heads,)
  i64 q_row_stride, q_head_stride, k_row_stride, k_head_stride;
  i64 v_row_stride, v_head_stride, o_row_stride, o_head_stride;
  i64 lse_head_stride, alibi_batch_stride;
  int heads_per_kv, num_heads, head_dim;
  float scale, scale_log2, softcap_in, softcap_out;
  int window_left, window_right;
  int use_tma;  // 1: tma_k and tma_v are valid maps of k and v (cupy_varlen/_tma.py)
  TensorMap tma_k, tma_v;
};
// The host packs this struct byte for byte (cupy_varlen/_launch.py, _SM90_PARAMS: 11 pointers,
// 10 int64, 3 int32, 4 float, 3 int32, padding to 64 bytes, two 128-byte maps); a field added on
// one side only changes the size.
static_assert(sizeof(Params) == 512, "Params layout must match the host's packing");

// Everything one work item needs, derived identically by producer and consumers.
struct WorkTile {
  int head, batch;
  SeqInfo seq;
  int m0, rows_valid;
  MaskBand band;
  KeyBlockRange range;
};
static_assert(sizeof(WorkTile) == 48, "WorkTile travels as three 16-byte shared words");

// Shared memory. Operand tiles sit on 1024-byte boundaries: the 128-byte swizzle that TMA writes and
// wgmma reads is a function of the address.
struct SharedStorage {
  alignas(kSwizzleAtomBytes) unsigned char q[QTile::kBytes];
  alignas(kSwizzleAtomBytes) unsigned char k[kStages][KVTile::kBytes];
  alignas(kSwizzleAtomBytes) unsigned char v[kStages][KVTile::kBytes];
  u64 q_full, q_empty;  // Q and the work slot published / every consumer done with them
  u64 k_full[kStages], v_full[kStages], k_empty[kStages], v_empty[kStages];
  alignas(16) WorkTile work;  // the item the consumers take next, decoded by the producer
  int next_item;              // the producer's next item, for all its threads
};
// The host reserves CV_SMEM_BYTES (cupy_varlen/_spec.py, FwdSpec.smem_bytes): the storage plus the
// slack that aligns its base.
static_assert(sizeof(SharedStorage) + kSwizzleAtomBytes <= CV_SMEM_BYTES,
              "SharedStorage exceeds the shared memory the host reserves");

// SharedStorage's members as shared-window addresses, which mbarriers, cp.async, TMA and wgmma
// descriptors take: the storage's aligned base plus the member's offset, a compile-time constant
// (going through generic pointers instead costs a special-register read per address in the loop).
struct Smem {
  u32 base;
  CV_DEVICE u32 q() const { return base + CV_OFFSET_OF(SharedStorage, q); }
  CV_DEVICE u32 k(int stage) const { return base + CV_OFFSET_OF_ELEMENT(SharedStorage, k, stage); }
  CV_DEVICE u32 v(int stage) const { return base + CV_OFFSET_OF_ELEMENT(SharedStorage, v, stage); }
  CV_DEVICE u32 q_full() const { return base + CV_OFFSET_OF(SharedStorage, q_full); }
  CV_DEVICE u32 q_empty() const { return base + CV_OFFSET_OF(SharedStorage, q_empty); }
  CV_DEVICE u32 k_full(int stage) const { return base + CV_OFFSET_OF_ELEMENT(SharedStorage, k_full, stage); }
  CV_DEVICE u32 v_full(int stage) const { return base + CV_OFFSET_OF_ELEMENT(SharedStorage, v_full, stage); }
  CV_DEVICE u32 k_empty(int stage) const {
    return base + CV_OFFSET_OF_ELEMENT(SharedStorage, k_empty, stage);
  }
  CV_DEVICE u32 v_empty(int stage) const {
    return base + CV_OFFSET_OF_ELEMENT(SharedStorage, v_empty, stage);
  }
  CV_DEVICE u32 work() const { return base + CV_OFFSET_OF(SharedStorage, work); }
  CV_DEVICE u32 next_item() const { return base + CV_OFFSET_OF(SharedStorage, next_item); }
};
typedef PipelineState<kStages> KVPipe;

// The consumers' copy of a decoded item; head -1 marks the end of the work.
CV_DEVICE void publish_work(u32 slot, const WorkTile& t) {
  uint4 words[3];
  memcpy(words, &t, sizeof(t));
#pragma unroll
  for (int i = 0; i < 3; ++i) st_shared_u128(slot + 16 * i, words[i]);
}

CV_DEVICE WorkTile read_work(u32 slot) {
  uint4 words[3];
#pragma unroll
  for (int i = 0; i < 3; ++i) words[i] = ld_shared_u128(slot + 16 * i);
  WorkTile t;
  memcpy(&t, words, sizeof(t));
  return t;
}

// The parts of a work item that take arithmetic only. The consumers redo them from the published
// item instead of reading them: without a window the band then stays a compile-time constant, and
// the mask code in their loop shrinks to the sequence-end test (reading it measured 3% slower at
// head dim 64, full attention).
CV_DEVICE void derive_work(const Params& p, WorkTile& t) {
#if CV_WINDOWED
  const AttnWindow window = {p.window_left, p.window_right};
#else
  const AttnWindow window = {-1, -1};
#endif
  t.rows_valid = min(kBlockM, t.seq.q_len - t.m0);
  t.band = make_band(t.seq.q_len, t.seq.k_len, window);
  t.range = key_block_range(t.m0, t.m0 + t.rows_valid - 1, t.seq.k_len, t.band, kBlockN);
}

// The decoded item, or the end marker (head -1) past the last one.
CV_DEVICE WorkTile load_work(const Params& p, const PersistentScheduler& scheduler, int item) {
  WorkTile t;
  t.head = -1;
  if (scheduler.done(item)) return t;
  const TileWork w = scheduler.tile(item, t.head);
  t.batch = w.batch_idx;
  t.seq = load_seq_info(p.cu_seqlens_q, p.cu_seqlens_k, p.seqused_k, w.batch_idx);
  t.m0 = w.m_block * kBlockM;
  derive_work(p, t);
  return t;
}

// One K or V tile by TMA. The full barrier counts one arrival per producer thread, as for cp.async:
// thread 0's also announces the tile's bytes, the others' are plain.
CV_DEVICE void load_bulk(u32 dst, const TensorMap& map, int head, int row, u32 full, int ptid) {
  if (ptid == 0) {
    mbarrier_arrive_expect_tx(full, KVTile::kBytes);
    load_tile_bulk<kBlockN, kHeadDim>(dst, map, head, row, full);
  } else {
    mbarrier_arrive(full);
  }
}

CV_DEVICE void produce(const Params& p, const Smem& smem, int ptid) {
  const PersistentScheduler scheduler(p.workspace, p.num_heads);
  const int chunks_valid = p.head_dim / 8;
  int item = scheduler.first_item();
  WorkTile t = load_work(p, scheduler, item);
  PipelineState<1> q_pipe;  // the Q tile and the work slot: one slot
  KVPipe kv_pipe;
  for (;; q_pipe.advance()) {
    // The consumers are done with the previous Q tile (and have long since read the work slot).
    q_pipe.wait_empty(smem.q_empty());
    if (ptid == 0) {
      publish_work(smem.work(), t);
      mbarrier_arrive(smem.q_full());  // releases the slot writes; the count's one extra arrival
    }
    if (scheduler.done(item)) {
      // Hand the end marker over without copies (the count expects one arrival per thread).
      mbarrier_arrive(smem.q_full());
      break;
    }
    int next = 0;
    if (ptid == 0) next = scheduler.next_item();  // latency hidden behind this tile's copies

    load_tile_async<kBlockM, kHeadDim, kWarpgroupThreads>(
        smem.q(),
        p.q + (i64)(t.seq.q_start + t.m0) * p.q_row_stride + (i64)t.head * p.q_head_stride,
        p.q_row_stride, t.rows_valid, chunks_valid, ptid);
    mbarrier_arrive_on_copies(smem.q_full());

    const int n_iters = t.range.count();
    const int kv_head = t.head / p.heads_per_kv;
    for (int it = 0; it < n_iters; ++it, kv_pipe.advance()) {
      const int stage = kv_pipe.index();
      const int n0 = (t.range.n_block_max - 1 - it) * kBlockN;
      const i64 row = t.seq.k_start + n0;
      // A tile wholly inside its sequence goes by TMA: one instruction per panel from one thread,
      // where cp.async costs every producer thread its address arithmetic. The tile that runs past
      // the sequence's end (the first one sent) keeps cp.async, which zero-fills those rows.
      const bool bulk = p.use_tma && n0 + kBlockN <= t.seq.k_len;
      auto send = [&](u32 dst, const TensorMap& map, const u16* base, i64 row_stride,
                      i64 head_stride, u32 full) {
        if (bulk) {
          load_bulk(dst, map, kv_head, (int)row, full, ptid);
        } else {
          load_tile_async<kBlockN, kHeadDim, kWarpgroupThreads>(
              dst, base + row * row_stride + (i64)kv_head * head_stride, row_stride,
              t.seq.k_len - n0, chunks_valid, ptid);
          mbarrier_arrive_on_copies(full);
        }
      };
      kv_pipe.wait_empty(smem.k_empty(stage));
      send(smem.k(stage), p.tma_k, p.k, p.k_row_stride, p.k_head_stride, smem.k_full(stage));
      kv_pipe.wait_empty(smem.v_empty(stage));
      send(smem.v(stage), p.tma_v, p.v, p.v_row_stride, p.v_head_stride, smem.v_full(stage));
    }
    // Every producer thread follows thread 0's item sequence. The first barrier keeps thread 0
    // from overwriting the slot before every thread has read the previous value.
    named_barrier_sync(kProducerBarrier, kWarpgroupThreads);
    if (ptid == 0) st_shared_s32(smem.next_item(), next);
    named_barrier_sync(kProducerBarrier, kWarpgroupThreads);
    item = ld_shared_s32(smem.next_item());
    // Decoded now, while the consumers work through the ring: its loads stay off their path.
    t = load_work(p, scheduler, item);
  }
  // No copy may still be landing when the CTA retires.
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// Issues S = Q K^T for this warpgroup's 64 rows as one wgmma group; the scores are valid after the
// matching wgmma_wait + fence_registers.
CV_DEVICE void issue_scores(float (&s)[1][kNAtoms][4], u32 q_rows, u32 k_tile) {
  wgmma_ss_kmajor<kBlockN, kHeadDim>(reinterpret_cast<float(&)[kBlockN / 2]>(s), q_rows,
                                     kBlockM * kPanelBytes, k_tile, kBlockN * kPanelBytes);
}

// Issues O += P V as one wgmma group (V's rows are the keys: MN-major).
CV_DEVICE void issue_output(float (&o)[1][kDAtoms][4], const u32 (&pa)[kBlockN / 16][4],
                            u32 v_tile) {
  wgmma_rs_mnmajor<kHeadDim, kBlockN>(reinterpret_cast<float(&)[kHeadDim / 2]>(o), pa, v_tile,
                                      kBlockN * kPanelBytes);
}

// The score modifiers' constants of one work item (score_mod.cuh).
struct ItemMods {
  float alibi;       // the item's ALiBi slope in raw units
  int alibi_offset;  // Lk - Lq
};

CV_DEVICE ItemMods item_mods(const Params& p, const WorkTile& t) {
  ItemMods mods{0.f, 0};
#if CV_ALIBI
  mods.alibi = alibi_slope(p.alibi_slopes, p.alibi_batch_stride, t.batch, t.head, p.scale);
  mods.alibi_offset = t.seq.k_len - t.seq.q_len;
#endif
  return mods;
}

// Modifiers, mask and row max of a finished score tile: the first half of the online softmax,
// which needs neither the output nor P's registers, so it runs while P V may still be in flight.
CV_DEVICE void mask_and_max(float (&s)[1][kNAtoms][4], const Params& p, const WorkTile& t,
                            const ItemMods& mods, const TileMaskTest<kBlockN>& mask_test, int n0,
                            int row0, int lane, OnlineSoftmax<1>& softmax,
                            float (&correction)[1][2], float (&max_scaled)[1][2]) {
#if CV_SOFTCAP
  apply_softcap(s, Softcap{p.softcap_in, p.softcap_out});
#endif
#if CV_ALIBI
  apply_alibi(s, row0, n0, mods.alibi_offset, mods.alibi, lane);
#endif
  if (mask_test.needs_mask(n0)) apply_mask(s, row0, n0, lane, t.seq.k_len, t.band);
  softmax.update_max(s, p.scale_log2, correction, max_scaled);
}

// Per warpgroup, software-pipelined over key tiles: iteration i issues S(i+1) = Q K(i+1)^T and then
// O += P(i) V(i), waits for S(i+1), masks it and takes its row max, then waits for P(i) V(i) and
// exponentiates S(i+1) into P(i)'s registers, as one branch-free block with O's rescale where that
// does not run between the two GEMMs' issue (kRescaleBeforeOutputGemm). FlashAttention-3
// exponentiates before the second wait, but ptxas hoisted that wait above the softmax anyway, and
// issuing the wgmmas blocks the warps for about the GEMMs' duration (docs/performance.md, head dim
// 64 section): what overlaps a softmax is the other consumer's GEMMs. Waiting before the
// exponentials lets the rescale's multiplies and the packs fill the issue slots between them
// instead of following them on the critical path.
CV_DEVICE void consume(const Params& p, const Smem& smem, int wg, int ctid) {
  const int lane = ctid & 31;
  const int warp_row0 = wg * kConsumerRows + (ctid >> 5) * 16;  // first row of this warp's 16
  const u32 q_rows = smem.q() + wg * kConsumerRows * kPanelBytes;
  const TensorCoreTurn turn{wg};
  if (wg == kConsumers - 1) turn.release();  // consumer 0 goes first, then 1, ...
  PipelineState<1> q_pipe;
  KVPipe kv_pipe;  // V(i), and K(i) before the steady state
  for (;; q_pipe.advance()) {
    q_pipe.wait_full(smem.q_full());
    WorkTile t = read_work(smem.work());
    if (t.head < 0) break;
    derive_work(p, t);
    const TileMaskTest<kBlockN> mask_test(t.m0, t.m0 + t.rows_valid - 1, t.seq.k_len, t.band);
    const ItemMods mods = item_mods(p, t);
    const int row0 = t.m0 + warp_row0;
    fence_proxy_async();  // Q's copies, observed through q_full, before wgmma reads them

    float acc_o[1][kDAtoms][4];
    zero_fragments(acc_o);
    OnlineSoftmax<1> softmax;
    float s[1][kNAtoms][4];
    u32 pa[kBlockN / 16][4];
    float correction[1][2];
    const int n_iters = t.range.count();
    auto n0_of = [&](int it) { return (t.range.n_block_max - 1 - it) * kBlockN; };
    // Tiles that came by cp.async (generic proxy) need the proxy fence before wgmma reads them; the
    // producer's choice, repeated: K(i+1) of the steady state is always whole, V(i) may not be.
    auto by_cp_async = [&](int it) { return !p.use_tma || n0_of(it) + kBlockN > t.seq.k_len; };

    if (n_iters > 0) {
      kv_pipe.wait_full(smem.k_full(kv_pipe.index()));
      if (by_cp_async(0)) fence_proxy_async();
      turn.acquire();
      issue_scores(s, q_rows, smem.k(kv_pipe.index()));
      turn.release();
      wgmma_wait<0>();
      fence_registers(s);
      mbarrier_arrive(smem.k_empty(kv_pipe.index()));
      if (n_iters == 1) mbarrier_arrive(smem.q_empty());
      float max_scaled[1][2];
      mask_and_max(s, p, t, mods, mask_test, n0_of(0), row0, lane, softmax, correction,
                   max_scaled);
      softmax.exponentiate(s, p.scale_log2, correction, max_scaled);
      pack_a_fragments(s, pa);  // O is still 0: no rescale
    } else {
      mbarrier_arrive(smem.q_empty());
    }

    // Steady state, every iteration but the last: the wgmma group bookkeeping (wait<1> retires
    // S(i+1) but not P(i) V(i)) has to be visible to ptxas without branches, or it serializes
    // every wgmma.
    int it = 0;
    for (; it < n_iters - 1; ++it, kv_pipe.advance()) {
      const KVPipe k_pipe = kv_pipe.advanced();  // K(i+1)
      k_pipe.wait_full(smem.k_full(k_pipe.index()));
      kv_pipe.wait_full(smem.v_full(kv_pipe.index()));
      if (by_cp_async(it)) fence_proxy_async();
      turn.acquire();
      issue_scores(s, q_rows, smem.k(k_pipe.index()));
      if (kRescaleBeforeOutputGemm) OnlineSoftmax<1>::rescale_always(acc_o, correction);
      issue_output(acc_o, pa, smem.v(kv_pipe.index()));
      turn.release();

      wgmma_wait<1>();  // S(i+1) is done; P(i) V(i) may still run
      fence_registers(s);
      mbarrier_arrive(smem.k_empty(k_pipe.index()));
      if (it + 2 == n_iters) mbarrier_arrive(smem.q_empty());  // that was the last read of Q
      float max_scaled[1][2];
      mask_and_max(s, p, t, mods, mask_test, n0_of(it + 1), row0, lane, softmax, correction,
                   max_scaled);
      wgmma_wait<0>();
      fence_registers(acc_o);
      fence_registers(pa);  // P(i) was live until here: its registers were the GEMM's operand
      mbarrier_arrive(smem.v_empty(kv_pipe.index()));
      if (!kRescaleBeforeOutputGemm) OnlineSoftmax<1>::rescale_always(acc_o, correction);
      softmax.exponentiate(s, p.scale_log2, correction, max_scaled);
      pack_a_fragments(s, pa);  // over P(i)'s registers, which the finished GEMM has released
    }
    if (n_iters > 0) {  // the last P V
      kv_pipe.wait_full(smem.v_full(kv_pipe.index()));
      if (by_cp_async(it)) fence_proxy_async();
      turn.acquire();
      if (kRescaleBeforeOutputGemm) OnlineSoftmax<1>::rescale_always(acc_o, correction);
      issue_output(acc_o, pa, smem.v(kv_pipe.index()));
      turn.release();
      wgmma_wait<0>();
      fence_registers(acc_o);
      fence_registers(pa);
      mbarrier_arrive(smem.v_empty(kv_pipe.index()));
      kv_pipe.advance();
    }

    float row_lse[1][2];
#if CV_SINKS
    const float head_sink = __ldg(p.sinks + t.head);
    const float sink[1][2] = {{head_sink, head_sink}};
    softmax.finalize_with_sink(acc_o, p.scale, sink, row_lse);
#else
    softmax.finalize(acc_o, p.scale, row_lse);
#endif
    if (p.lse != nullptr)
      store_lse(row_lse, p.lse + (i64)t.head * p.lse_head_stride + t.seq.q_start + t.m0,
                t.rows_valid, warp_row0, lane);
    store_output_fragments(
        acc_o, p.out + (i64)(t.seq.q_start + t.m0) * p.o_row_stride + (i64)t.head * p.o_head_stride,
        p.o_row_stride, t.rows_valid, p.head_dim, warp_row0, lane);
  }
  // Consumer 1's opening hand-over left one arrival on consumer 0's turn barrier: take it, so no
  // barrier is left mid-phase when the CTA retires.
  if (wg == 0) turn.acquire();
}

extern "C" __global__ void __launch_bounds__(kThreads, 1)
varlen_fwd(const __grid_constant__ Params p) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // The swizzle pattern is a function of the address: the storage's tiles need 1024-byte alignment,
  // which the dynamic shared memory's base need not have.
  const Smem smem{(smem_addr(smem_raw) + kSwizzleAtomBytes - 1) & ~(kSwizzleAtomBytes - 1)};
  const int tid = threadIdx.x;
  if (tid == 0) {
    mbarrier_init(smem.q_full(), kWarpgroupThreads + 1);
    mbarrier_init(smem.q_empty(), kConsumers * kWarpgroupThreads);
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(smem.k_full(s), kWarpgroupThreads);
      mbarrier_init(smem.v_full(s), kWarpgroupThreads);
      mbarrier_init(smem.k_empty(s), kConsumers * kWarpgroupThreads);
      mbarrier_init(smem.v_empty(s), kConsumers * kWarpgroupThreads);
    }
  }
  __syncthreads();
  const int wg = warpgroup_index();
  if (wg == 0) {
    warpgroup_reg_dealloc<kProducerRegs>();
    produce(p, smem, tid);
  } else {
    warpgroup_reg_alloc<kConsumerRegs>();
    consume(p, smem, wg - 1, tid % kWarpgroupThreads);
  }
}
