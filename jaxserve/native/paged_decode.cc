// Paged decode attention for XLA's CPU backend: one query token per sequence over its KV pages.
//
//   q [B, Hq, D] f32, k_pages / v_pages [N, bs, Hkv, D] f32, block_tables [B, MB] s32,
//   context_lens [B] s32, attr scale  ->  out [B, Hq, D] f32
//
// Work items are (sequence, run of KV heads): a run is all Hkv heads unless the batch is too small
// to keep XLA's intra-op threads busy, then halves of it. An item walks its sequence's blocks in
// table order with an online softmax (per query head: running max m, denominator l, accumulator),
// reading each block's K then V rows once, so K/V stream from memory at close to copy bandwidth
// (the XLA formulation gathers pages and transposes them for two batched mat-vecs: ~4x slower).
// Grouped-query attention: query head h reads KV head h / (Hq / Hkv).
// Items run on XLA's intra-op threads (pool_for.h). Block ids are clamped into [0, N)
// and context lengths to MB * bs: a bad table entry reads the null block, never outside the pages.
// A row with no context (padding) returns zeros.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "pool_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using jaxserve_native::parallel_for;

namespace {

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  const int32_t* tables;
  const int32_t* ctx;
  float* out;
  int64_t B, Hq, Hkv, D, bs, MB, N;
  float scale;
  int64_t runs;  // runs of KV heads per sequence (items = B * runs)
};

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Softmax bookkeeping for one block: s [n, g] scores in, probabilities out; rescales acc.
void online_softmax(float* s, int64_t n, int64_t g, int64_t D, float* m, float* l, float* acc) {
  for (int64_t j = 0; j < g; ++j) {
    float mx = m[j];
    for (int64_t t = 0; t < n; ++t) mx = std::max(mx, s[t * g + j]);
    const float alpha = std::exp(m[j] - mx);
    float sum = l[j] * alpha;
    for (int64_t t = 0; t < n; ++t) {
      const float e = std::exp(s[t * g + j] - mx);
      s[t * g + j] = e;
      sum += e;
    }
    m[j] = mx;
    l[j] = sum;
    float* a = acc + j * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
  }
}

void one_item(const Problem& p, int64_t item, std::vector<float>& buf) {
  const int64_t per = p.Hkv / p.runs, gq = p.Hq / p.Hkv, D = p.D, bs = p.bs;
  const int64_t b = item / p.runs, kh0 = (item % p.runs) * per, g = per * gq;
  const int64_t row = p.Hkv * D;  // floats from one token's row of a head to the next token's
  const int64_t ctx = std::min<int64_t>(p.ctx[b], p.MB * bs);
  buf.assign(g * D + 2 * g + bs * g, 0.f);
  float* acc = buf.data();
  float* m = acc + g * D;
  float* l = m + g;
  float* s = l + g;
  std::fill(m, m + g, -INFINITY);
  const float* q = p.q + (b * p.Hq + kh0 * gq) * D;
  for (int64_t i = 0; i * bs < ctx; ++i) {
    int64_t blk = p.tables[b * p.MB + i];
    if (blk < 0 || blk >= p.N) blk = 0;
    const int64_t n = std::min(bs, ctx - i * bs);
    const float* kb = p.k + (blk * bs * p.Hkv + kh0) * D;
    const float* vb = p.v + (blk * bs * p.Hkv + kh0) * D;
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < g; ++j) s[t * g + j] = dot(q + j * D, kb + t * row + (j / gq) * D, D) * p.scale;
    online_softmax(s, n, g, D, m, l, acc);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < g; ++j) {
        const float* vt = vb + t * row + (j / gq) * D;
        const float w = s[t * g + j];
        float* a = acc + j * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] += w * vt[d];
      }
  }
  float* o = p.out + (b * p.Hq + kh0 * gq) * D;
  for (int64_t j = 0; j < g; ++j) {
    const float inv = l[j] > 0.f ? 1.f / l[j] : 0.f;
    for (int64_t d = 0; d < D; ++d) o[j * D + d] = acc[j * D + d] * inv;
  }
}

ffi::Error PagedDecode(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> ctx,
                       float scale, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), td = tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || td.size() != 2 || ctx.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("paged_decode: want q [B,Hq,D], pages [N,bs,Hkv,D], tables [B,MB], lens [B]");
  for (int i = 0; i < 4; ++i)
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("paged_decode: k and v pages differ in shape");
  if (kd[3] != qd[2] || kd[2] == 0 || qd[1] % kd[2] != 0 || td[0] != qd[0] || ctx.dimensions()[0] != qd[0])
    return ffi::Error::InvalidArgument("paged_decode: q, pages, tables and lens disagree in shape");
  Problem p{q.typed_data(), k.typed_data(), v.typed_data(), tables.typed_data(), ctx.typed_data(),
            out->typed_data(), qd[0], qd[1], kd[2], qd[2], kd[1], td[1], kd[0], scale, 1};
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  while (p.B * p.runs < 4 * threads && p.Hkv % (p.runs * 2) == 0) p.runs *= 2;
  parallel_for(pool, p.B * p.runs, [&](int64_t item, std::vector<float>& buf) { one_item(p, item, buf); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxservePagedDecode, PagedDecode,
                              jaxserve_native::bind_qkv()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
