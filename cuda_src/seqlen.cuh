// Where a sequence starts and how long it is, from the cumulative offsets.
#pragma once

#include "common.cuh"

struct SeqInfo {
  int q_start, q_len;
  int k_start, k_len;
};

// A decreasing pair of offsets is invalid input; reading it as an empty sequence keeps every access
// inside the tensors (check_inputs=True reports it instead).
//
// seqused_k (null: none) gives the keys of each sequence that take part, from the start of its slot
// in cu_seqlens_k (a KV cache whose slots are longer than what is filled): k_len is that count,
// and every mask aligns to it. A count outside [0, slot] is read as the nearest bound, so no key
// outside the slot is ever read (check_inputs=True reports it instead).
CV_DEVICE SeqInfo load_seq_info(const int* cu_seqlens_q, const int* cu_seqlens_k,
                                const int* seqused_k, int batch_idx) {
  SeqInfo s;
  s.q_start = __ldg(cu_seqlens_q + batch_idx);
  s.q_len = max(__ldg(cu_seqlens_q + batch_idx + 1) - s.q_start, 0);
  s.k_start = __ldg(cu_seqlens_k + batch_idx);
  s.k_len = max(__ldg(cu_seqlens_k + batch_idx + 1) - s.k_start, 0);
  if (seqused_k != nullptr) s.k_len = min(max(__ldg(seqused_k + batch_idx), 0), s.k_len);
  return s;
}

// A paged cache: the keys live in pages that a block table names, k_start is 0, and a sequence
// has the table's k_capacity keys (its pages per sequence x page size) at most; cu_seqlens_k (null:
// none) gives each sequence's count as its differences, seqused_k (null: none) too, and the
// smallest of the three counts.
CV_DEVICE SeqInfo load_paged_seq_info(const int* cu_seqlens_q, const int* cu_seqlens_k,
                                      const int* seqused_k, int batch_idx, int k_capacity) {
  SeqInfo s;
  s.q_start = __ldg(cu_seqlens_q + batch_idx);
  s.q_len = max(__ldg(cu_seqlens_q + batch_idx + 1) - s.q_start, 0);
  s.k_start = 0;
  s.k_len = k_capacity;
  if (cu_seqlens_k != nullptr)
    s.k_len = min(max(__ldg(cu_seqlens_k + batch_idx + 1) - __ldg(cu_seqlens_k + batch_idx), 0),
                  s.k_len);
  if (seqused_k != nullptr) s.k_len = min(max(__ldg(seqused_k + batch_idx), 0), s.k_len);
  return s;
}

// Either, as the schedule kernel meets them: k_capacity < 0 means no paged cache.
CV_DEVICE SeqInfo load_any_seq_info(const int* cu_seqlens_q, const int* cu_seqlens_k,
                                    const int* seqused_k, int batch_idx, int k_capacity) {
  return k_capacity < 0
             ? load_seq_info(cu_seqlens_q, cu_seqlens_k, seqused_k, batch_idx)
             : load_paged_seq_info(cu_seqlens_q, cu_seqlens_k, seqused_k, batch_idx, k_capacity);
}
