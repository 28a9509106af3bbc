// Where a producer and its consumers stand in a ring of kStages shared-memory slots
// (FlashAttention-3's PipelineState). Each slot has a "full" mbarrier (the producer's copies landed)
// and an "empty" one (every consumer is done reading); both complete one phase per pass of the ring,
// so a waiter needs the slot index and the parity of the pass it is in, which flips each time the
// index wraps. Kernels that keep one state per role and advance it per slot never spell out the
// stage/phase arithmetic.
#pragma once

#include "common.cuh"
#include "sync_sm90.cuh"

template <int kStages>
struct PipelineState {
  // Slots passed so far. The slot and the pass parity derive from it: a count costs one register
  // where a kept (index, phase) pair costs two, and the backward's consumers, with 240 registers
  // nearly all taken by accumulators, spill with the pair.
  int count = 0;

  CV_DEVICE int index() const { return count % kStages; }
  // Parity of the ring pass: what a consumer waits for on the slot's full barrier.
  CV_DEVICE int phase() const { return (count / kStages) & 1; }
  CV_DEVICE void advance() { ++count; }
  CV_DEVICE PipelineState advanced() const { return PipelineState{count + 1}; }

  // The consumers' wait for the slot's data. A fresh empty barrier counts as having completed the
  // pass before the first, so the producer's first pass through the ring does not block.
  CV_DEVICE void wait_full(u32 full_bar) const { mbarrier_wait(full_bar, phase()); }
  CV_DEVICE void wait_empty(u32 empty_bar) const { mbarrier_wait(empty_bar, phase() ^ 1); }
};
