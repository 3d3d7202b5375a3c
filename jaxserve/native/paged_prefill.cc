// Paged attention of query groups for XLA's CPU backend: prompt chunks whose earlier tokens (a
// cached prefix, or the chunks before) are already in the pages.
//
//   q [T, Hq, D] f32 (the step's packed queries), k_pages / v_pages [N, bs, Hkv, D] f32,
//   query_index [B, Q] s32 (each sequence's query rows of q; T = padding), positions [T] s32,
//   block_tables [B, MB] s32, context_lens [B] s32 (keys per sequence, this step's included),
//   attr scale  ->  out [B, Q, Hq, D] f32 (padding queries: zeros)
//
// Query i of sequence b reads key positions 0 .. min(position_i, context_len_b - 1) through b's
// block table (ids clamped into [0, N): a bad id reads the null block). Work items are (sequence,
// tile of up to 64 of its queries, query head), through attend_tile.h: only real context is read,
// so one block-table width serves every call (no shape per context bucket, as for decode).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "attend_tile.h"
#include "pool_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace jaxserve_native;

namespace {

ffi::Error PagedPrefill(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> qidx, ffi::Buffer<ffi::S32> pos,
                        ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> ctx, float scale,
                        ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), id = qidx.dimensions();
  auto td = tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || id.size() != 2 || td.size() != 2 ||
      pos.dimensions().size() != 1 || ctx.dimensions().size() != 1)
    return ffi::Error::InvalidArgument("paged_prefill: want q [T,Hq,D], pages [N,bs,Hkv,D], query_index [B,Q], "
                                       "positions [T], tables [B,MB], lens [B]");
  for (int i = 0; i < 4; ++i)
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("paged_prefill: k and v pages differ in shape");
  if (kd[3] != qd[2] || kd[2] == 0 || qd[1] % kd[2] != 0 || td[0] != id[0] || ctx.dimensions()[0] != id[0] ||
      pos.dimensions()[0] != qd[0])
    return ffi::Error::InvalidArgument("paged_prefill: shapes disagree");
  const int64_t T = qd[0], Hq = qd[1], D = qd[2], N = kd[0], bs = kd[1], Hkv = kd[2], g = Hq / Hkv;
  const int64_t B = id[0], Q = id[1], MB = td[1];
  float* o = out->typed_data();
  std::fill(o, o + B * Q * Hq * D, 0.f);
  const int64_t tiles = (Q + QT - 1) / QT;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t *qi = qidx.typed_data(), *ps = pos.typed_data(), *tb = tables.typed_data(), *cl = ctx.typed_data();
  parallel_for(pool, B * tiles * Hq, [&](int64_t item, std::vector<float>& buf) {
    const int64_t h = item % Hq, tile = (item / Hq) % tiles, b = item / (Hq * tiles), kh = h / g;
    const int64_t nkeys = std::min<int64_t>(cl[b], MB * bs);
    QueryTile qt;
    for (int64_t i = tile * QT; i < std::min(Q, (tile + 1) * QT); ++i) {
      const int64_t row = qi[b * Q + i];
      if (row < 0 || row >= T) continue;  // padding
      qt.q[qt.n] = qp + (row * Hq + h) * D;
      qt.out[qt.n] = o + ((b * Q + i) * Hq + h) * D;
      qt.lim[qt.n] = std::min<int64_t>(ps[row], nkeys - 1);
      ++qt.n;
    }
    if (qt.n == 0 || nkeys <= 0) return;
    auto row_of = [&](const float* pages, int64_t j) {
      int64_t blk = tb[b * MB + j / bs];
      if (blk < 0 || blk >= N) blk = 0;
      return pages + ((blk * bs + j % bs) * Hkv + kh) * D;
    };
    attend_tile(qt, nkeys, D, scale, [&](int64_t j) { return row_of(kp, j); },
                [&](int64_t j) { return row_of(vp, j); }, buf);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxservePagedPrefill, PagedPrefill,
                              jaxserve_native::bind_qkv()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
