// Which tokens a sampled row may pick (top-k, top-p, min-p): the CPU form of
// jaxserve.model.token_filters.keep_mask, with the same kept set (masses here are summed in double, so
// a token whose mass before it is within float32 rounding of top_p may land on the other side). NaN
// logits must be mapped to -inf first (the caller does): the order below needs a total order.
//
//   x [B, V] float32 (logits after bias, ban and penalties, divided by the temperature), top_k [B] int32
//   (<= 0: off), top_p [B] float32 (>= 1: off), min_p [B] float32 (0: off) --> keep [B, V] bool
//
// The order is a stable sort's: larger value first, a lower token id first among equal values. top-k keeps
// the first k; top-p keeps each token whose mass strictly before it, under the top-k-kept distribution, is
// < top_p (masses in double); min-p keeps values within log(min_p) of the best. No row is sorted whole:
// nth_element partitions find the top-k set and the nucleus's end (O(V) expected). Rows run on XLA's
// intra-op threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "pool_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Filters {
  const float* x;
  const int32_t* top_k;
  const float* top_p;
  const float* min_p;
  bool* keep;
  int64_t V;
};

// The kept prefix of row `x` in the stable order: returns n with ids[0, n) its tokens (in any order).
// top-k: nth_element puts the first k in front. top-p: the cut is the smallest r >= 1 whose mass before
// it reaches p x (the top-k mass); a binary search over nth_element partitions finds it in O(V) expected.
int64_t kept_prefix(const float* x, int64_t V, int64_t k, double p, float best, std::vector<int32_t>& ids) {
  auto before = [x](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
  auto w = [x, best](int32_t i) { return std::exp(double(x[i]) - double(best)); };
  ids.resize(V);
  std::iota(ids.begin(), ids.end(), 0);
  if (k < V) std::nth_element(ids.begin(), ids.begin() + k, ids.end(), before);
  if (p >= 1.0) return k;
  double z = 0.0;
  for (int64_t r = 0; r < k; ++r) z += w(ids[r]);
  const double target = p * z;
  int64_t lo = 0, hi = k;  // ids[0, lo) are the first lo tokens, with mass `above` < target; the cut is in (lo, hi]
  double above = 0.0;
  while (hi - lo > 32) {
    const int64_t mid = lo + (hi - lo) / 2;
    std::nth_element(ids.begin() + lo, ids.begin() + mid, ids.begin() + hi, before);
    double m = 0.0;
    for (int64_t r = lo; r < mid; ++r) m += w(ids[r]);
    if (above + m >= target) {
      hi = mid;
    } else {
      above += m;
      lo = mid;
    }
  }
  std::sort(ids.begin() + lo, ids.begin() + hi, before);
  for (int64_t r = lo; r < hi; ++r) {
    if (r > 0 && !(above < target)) return r;
    above += w(ids[r]);
  }
  return hi;
}

void one_row(const Filters& f, int64_t row, std::vector<int32_t>& ids) {
  const float* x = f.x + row * f.V;
  bool* keep = f.keep + row * f.V;
  const int64_t V = f.V;
  float best = -INFINITY;
  for (int64_t i = 0; i < V; ++i) best = std::max(best, x[i]);
  const float floor = std::log(f.min_p[row]);  // -inf when min_p is 0
  const int32_t k_in = f.top_k[row];
  const int64_t k = (k_in > 0 && k_in < V) ? k_in : V;
  const double p = f.top_p[row];
  if (k == V && p >= 1.0) {  // min-p alone
    for (int64_t i = 0; i < V; ++i) keep[i] = x[i] - best >= floor;
    return;
  }
  const int64_t n = kept_prefix(x, V, k, p, best, ids);
  std::fill(keep, keep + V, false);
  for (int64_t r = 0; r < n; ++r) keep[ids[r]] = x[ids[r]] - best >= floor;  // the prefix, then min-p
}

ffi::Error KeepMask(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> top_k,
                    ffi::Buffer<ffi::F32> top_p, ffi::Buffer<ffi::F32> min_p, ffi::ResultBuffer<ffi::PRED> keep) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || top_k.dimensions().size() != 1 || top_p.dimensions().size() != 1 ||
      min_p.dimensions().size() != 1 || top_k.dimensions()[0] != xd[0] || top_p.dimensions()[0] != xd[0] ||
      min_p.dimensions()[0] != xd[0])
    return ffi::Error::InvalidArgument("keep_mask: want x [B,V], top_k / top_p / min_p [B]");
  Filters f{x.typed_data(), top_k.typed_data(), top_p.typed_data(), min_p.typed_data(), keep->typed_data(), xd[1]};
  jaxserve_native::parallel_for(pool, xd[0], [&](int64_t row, std::vector<float>&) {
    thread_local std::vector<int32_t> ids;
    one_row(f, row, ids);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveKeepMask, KeepMask,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::PRED>>());
