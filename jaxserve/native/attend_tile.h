// One tile of up to QT query rows (one head each) against keys 0 .. nkeys-1, causal per query:
// query i reads keys 0 .. lim[i]. Shared by packed_prefill.cc (keys: the prompt's own tokens) and
// paged_prefill.cc (keys: a sequence's pages, through its block table).
//
// Keys come KT at a time, transposed once into [D][KT] so each query's scores are vector FMAs over
// the tile (no horizontal sums), QB = 4 queries per load; an online softmax per query; the value
// rows accumulated into [D], 4 queries per load. QT = 64 queries share each transpose (16 made the
// transpose as dear as the scores). KeyRow(kp) returns the D floats of key position kp (the same
// function with the value array gives its value row).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fast_exp.h"

namespace jaxserve_native {

constexpr int64_t QT = 64;  // queries per tile
constexpr int64_t KT = 16;  // keys per tile
constexpr int64_t QB = 4;   // queries scored together against one key tile

struct QueryTile {
  const float* q[QT];  // each query row's D floats
  float* out[QT];      // where its normalized output goes
  int64_t lim[QT];     // its last key position (inclusive)
  int64_t n = 0;
};

// Online-softmax update of one query's state for one key tile: sc holds the raw scores in, the
// weights out (0 past the query's last key).
inline void softmax_step(float* sc, int64_t valid, float scale, float& m, float& l, float* a, int64_t D) {
  float mx = m;
  for (int64_t jj = 0; jj < valid; ++jj) mx = std::max(mx, sc[jj] * scale);
  const float alpha = std::exp(m - mx);
#pragma omp simd
  for (int64_t jj = 0; jj < KT; ++jj) sc[jj] = jj < valid ? fast_exp(sc[jj] * scale - mx) : 0.f;
  float sum = 0.f;
  for (int64_t jj = 0; jj < KT; ++jj) sum += sc[jj];
  m = mx;
  l = l * alpha + sum;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
}

// Scores of 4 queries (rows q0..q3, D long) against the transposed key tile kt [D][KT].
inline void score4(const float* const* qv, const float* kt, int64_t D, float (*sc)[KT]) {
  for (int64_t b = 0; b < QB; ++b) std::fill(sc[b], sc[b] + KT, 0.f);
  for (int64_t d = 0; d < D; ++d) {
    const float* kd = kt + d * KT;
    const float q0 = qv[0][d], q1 = qv[1][d], q2 = qv[2][d], q3 = qv[3][d];
#pragma omp simd
    for (int64_t jj = 0; jj < KT; ++jj) {
      sc[0][jj] += q0 * kd[jj];
      sc[1][jj] += q1 * kd[jj];
      sc[2][jj] += q2 * kd[jj];
      sc[3][jj] += q3 * kd[jj];
    }
  }
}

// acc rows a[0..3] += sum over the tile's keys of their weights times the value rows.
template <class ValRow>
inline void accumulate4(float* const* a, float (*sc)[KT], int64_t j0, int64_t nk, int64_t nb, int64_t D,
                        ValRow val_row) {
  if (nb < QB) {
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t jj = 0; jj < nk; ++jj) {
        const float w = sc[b][jj];
        const float* vr = val_row(j0 + jj);
        float* ab = a[b];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ab[d] += w * vr[d];
      }
    return;
  }
  float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
  for (int64_t jj = 0; jj < nk; ++jj) {
    const float w0 = sc[0][jj], w1 = sc[1][jj], w2 = sc[2][jj], w3 = sc[3][jj];
    const float* vr = val_row(j0 + jj);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const float x = vr[d];
      a0[d] += w0 * x;
      a1[d] += w1 * x;
      a2[d] += w2 * x;
      a3[d] += w3 * x;
    }
  }
}

template <class KeyRow, class ValRow>
void attend_tile(const QueryTile& t, int64_t nkeys, int64_t D, float scale, KeyRow key_row, ValRow val_row,
                 std::vector<float>& buf) {
  const int64_t nq = t.n;
  buf.assign(D * KT + nq * (D + 2), 0.f);
  float* kt = buf.data();    // [D][KT] the key tile, transposed
  float* acc = kt + D * KT;  // [nq][D]
  float* m = acc + nq * D;   // [nq]
  float* l = m + nq;         // [nq]
  std::fill(m, m + nq, -INFINITY);
  int64_t reach = -1;  // the furthest key any query reads
  for (int64_t i = 0; i < nq; ++i) reach = std::max(reach, std::min(t.lim[i], nkeys - 1));
  for (int64_t j0 = 0; j0 <= reach; j0 += KT) {
    const int64_t nk = std::min(KT, reach + 1 - j0);
    for (int64_t jj = 0; jj < KT; ++jj) {
      const float* kr = jj < nk ? key_row(j0 + jj) : nullptr;
      for (int64_t d = 0; d < D; ++d) kt[d * KT + jj] = kr ? kr[d] : 0.f;
    }
    for (int64_t i0 = 0; i0 < nq; i0 += QB) {
      const int64_t nb = std::min(QB, nq - i0);
      int64_t last = 0;  // keys of this tile any of these queries reads
      for (int64_t b = 0; b < nb; ++b) last = std::max(last, std::min(nk, t.lim[i0 + b] - j0 + 1));
      if (last <= 0) continue;  // the key tile is in the future of all these queries
      alignas(64) float sc[QB][KT];
      const float* qv[QB];
      float* a[QB];
      for (int64_t b = 0; b < QB; ++b) {
        qv[b] = t.q[i0 + std::min(b, nb - 1)];
        a[b] = acc + (i0 + std::min(b, nb - 1)) * D;
      }
      score4(qv, kt, D, sc);
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t valid = std::max<int64_t>(0, std::min(nk, t.lim[i0 + b] - j0 + 1));
        if (valid == 0) {
          std::fill(sc[b], sc[b] + KT, 0.f);
          continue;
        }
        softmax_step(sc[b], valid, scale, m[i0 + b], l[i0 + b], acc + (i0 + b) * D, D);
      }
      accumulate4(a, sc, j0, last, nb, D, val_row);
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    for (int64_t d = 0; d < D; ++d) t.out[i][d] = acc[i * D + d] * inv;
  }
}

}  // namespace jaxserve_native
