// Which keys a query row may attend to, and which key tiles a query tile must visit.
//
// For a sequence with lengths (q_len, k_len) the diagonal is bottom-right aligned: query row i sits
// at key position i + k_len - q_len. Key j is allowed iff 0 <= j < k_len and
//   j >= i + k_len - q_len - left   (when left >= 0)
//   j <= i + k_len - q_len + right  (when right >= 0)
// causal is right = 0. Both window conditions bound the same quantity, j - i, so a sequence's mask
// is a band [band.lo, band.hi] of j - i plus the tail j < k_len: per score that is two compares
// against lane constants, not a per-row 64-bit bound.
#pragma once

#include "common.cuh"

struct AttnWindow {
  int left;   // -1: unbounded
  int right;  // -1: unbounded
};

struct MaskBand {
  int lo, hi;  // allowed iff lo <= key - row <= hi
};

// Rows and keys are below 2^31 - kBlockM, so key - row fits an int; the band edges are clamped to
// the int range, which keeps an unbounded side unbounded.
CV_DEVICE MaskBand make_band(int q_len, int k_len, AttnWindow w) {
  const i64 diag = (i64)k_len - q_len;
  const i64 int_max = 0x7fffffff;
  MaskBand b;
  b.lo = w.left < 0 ? (int)-int_max : (int)max(diag - w.left, -int_max);
  b.hi = w.right < 0 ? (int)int_max : (int)min(diag + w.right, int_max);
  return b;
}

// First and last allowed key of query row `row` (last < first: none).
CV_DEVICE int first_key(int row, MaskBand b) { return (int)max((i64)row + b.lo, (i64)0); }
CV_DEVICE int last_key(int row, int k_len, MaskBand b) {
  return (int)min((i64)row + b.hi, (i64)k_len - 1);
}

// Key tiles [n_block_min, n_block_max) that hold an allowed key of query rows [row_first, row_last].
// The band moves right with the row: the first row bounds the low end, the last row the high end.
struct KeyBlockRange {
  int n_block_min, n_block_max;
  CV_DEVICE int count() const { return n_block_max > n_block_min ? n_block_max - n_block_min : 0; }
};

CV_DEVICE KeyBlockRange key_block_range(int row_first, int row_last, int k_len, MaskBand b,
                                        int block_n) {
  const int lo = first_key(row_first, b);
  const int hi = last_key(row_last, k_len, b);
  KeyBlockRange r;
  r.n_block_min = lo / block_n;
  r.n_block_max = hi >= lo ? hi / block_n + 1 : r.n_block_min;
  return r;
}

// Share `split` of `num_splits` of a key range (the decode tiles' split-KV): consecutive tiles, an
// even share each but the last ones, which are shorter or empty where tiles are fewer than splits.
CV_DEVICE KeyBlockRange split_share(KeyBlockRange r, int split, int num_splits) {
  const int per = (r.count() + num_splits - 1) / num_splits;
  KeyBlockRange s;
  s.n_block_min = min(r.n_block_min + split * per, r.n_block_max);
  s.n_block_max = min(s.n_block_min + per, r.n_block_max);
  return s;
}

// Decides per key tile whether any score needs masking; only those tiles pay for apply_mask.
template <int kBlockN>  // keys per tested tile
struct TileMaskTest {
  int unmasked_lo;  // tile start must be >= this (last row's first key) ...
  int unmasked_hi;  // ... and tile end <= this (first row's last key, the tail included)
  CV_DEVICE TileMaskTest(int row_first, int row_last, int k_len, MaskBand b)
      : unmasked_lo(first_key(row_last, b)), unmasked_hi(last_key(row_first, k_len, b)) {}
  CV_DEVICE bool needs_mask(int n0) const {
    return n0 < unmasked_lo || n0 + kBlockN - 1 > unmasked_hi;
  }
};

// Sets disallowed scores of a warp's C fragments to -inf. Fragment (m, n, e) holds query row
// row0 + 16m + group + 8(e / 2) and key n0 + 8n + 2quad + e % 2; every offset from the lane's
// first element is a compile-time constant.
template <int kMAtoms, int kNAtoms>
CV_DEVICE void apply_mask(float (&s)[kMAtoms][kNAtoms][4], int row0, int n0, int lane, int k_len,
                          MaskBand b) {
  const int key0 = n0 + 2 * (lane & 3);
  const int rel0 = key0 - (row0 + (lane >> 2));
#pragma unroll
  for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int n = 0; n < kNAtoms; ++n)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int key = key0 + 8 * n + j;
          const int rel = rel0 + 8 * n + j - 16 * m - 8 * h;
          if (key >= k_len || rel < b.lo || rel > b.hi) s[m][n][2 * h + j] = neg_inf();
        }
}

// apply_mask for tiles whose rows are (query position, head) pairs, `group` consecutive rows per
// position (the decode tiles' packed GQA rows): row r sits at position r / group. One division per
// row, on masked tiles only.
template <int kMAtoms, int kNAtoms>
CV_DEVICE void apply_mask_grouped(float (&s)[kMAtoms][kNAtoms][4], int row0, int n0, int lane,
                                  int k_len, MaskBand b, int group) {
  const int key0 = n0 + 2 * (lane & 3);
#pragma unroll
  for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int pos = (row0 + 16 * m + (lane >> 2) + 8 * h) / group;
#pragma unroll
      for (int n = 0; n < kNAtoms; ++n)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int key = key0 + 8 * n + j;
          const int rel = key - pos;
          if (key >= k_len || rel < b.lo || rel > b.hi) s[m][n][2 * h + j] = neg_inf();
        }
    }
}

// Sets the scores of fragment rows row0 + ... at or past `rows_valid` to -inf (the backward's key
// rows past a sequence's end; the forward never holds such rows).
template <int kMAtoms, int kNAtoms>
CV_DEVICE void mask_rows_from(float (&s)[kMAtoms][kNAtoms][4], int row0, int rows_valid,
                              int lane) {
#pragma unroll
  for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      if (row0 + 16 * m + (lane >> 2) + 8 * h >= rows_valid)
#pragma unroll
        for (int n = 0; n < kNAtoms; ++n) s[m][n][2 * h] = s[m][n][2 * h + 1] = neg_inf();
}
