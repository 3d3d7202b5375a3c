// The one translation unit the build compiles: XLA's FFI headers are heavy templates, and parsing them
// once instead of once per kernel halves the first-use build (4.2 s instead of 8.4 s on 2 cores).
#include "paged_decode.cc"
#include "packed_prefill.cc"
#include "paged_prefill.cc"
#include "token_filters.cc"
