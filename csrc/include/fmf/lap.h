// The batched linear assignment solver's shared rules (CPU and CUDA follow them step by step).
//
// Each image is solved as `rows x cols` with rows <= cols: the [Q, N] cost itself when Q <= N, its
// transpose otherwise, copied once into a double-precision workspace. The solver is Jonker-
// Volgenant: column reduction (square problems only), augmenting row reduction, then one shortest
// augmenting path (Dijkstra on reduced costs) per row still free. In a rectangular problem the
// column duals start at 0 and only ever decrease, and only on assigned columns, so every free
// column keeps dual 0: that is what keeps it optimal (columns may stay unmatched) without padding
// it to a square.
//
// +inf (a forbidden pair) is replaced by a finite `forbidden_cost` so large that a matching using
// one costs more than any matching avoiding them all; the solver then never meets an infinity, and
// a solution that still uses a forbidden pair proves the problem infeasible.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FMF_LAP_HD __host__ __device__ __forceinline__
#else
#define FMF_LAP_HD inline
#endif

namespace fmf {
namespace lap {

// Per-image outcome; the host raises a ValueError naming the first image that is not kOk.
enum Status : int32_t { kOk = 0, kNaN = 1, kNegInf = 2, kInfeasible = 3, kTooLarge = 4 };

// Augmenting row reduction: how many passes, and how many re-queued rows each pass may take per
// row of the problem. It re-queues a displaced row as long as that strictly lowers a column dual;
// in floating point those steps can shrink to an ulp, so the budget also bounds the pass, and what
// is left goes to the shortest-path phase (always safe: the invariants hold after every step).
// Measured with the CPU solver on this project's 2-core CPU, us per problem (min over repeats;
// Q x N uniform costs, and 100 x 100 integer costs in 0..4):
//   passes x steps   100x100   100x90   100x50   int 100x100
//   0 (none)            90        73       18         65
//   1 x 2               69        44       10         61
//   2 x 1               69        43       11         67
//   2 x 2               74        44       11         66
//   2 x 8               85        43       11         67
constexpr int kArrPasses = 1;
constexpr int kArrStepsPerRow = 2;

// Keys that order Dijkstra's candidate columns: smaller distance first, then a free column (it
// ends the search at once), then the lower index, so CPU and CUDA pick the same column on ties.
constexpr int32_t kBusyBit = 1 << 30;
FMF_LAP_HD int32_t column_key(int32_t j, bool busy) { return busy ? (j | kBusyBit) : j; }

// A matching of `rows` pairs avoiding every forbidden pair costs at most rows * hi; one that uses a
// forbidden pair costs at least big + (rows - 1) * lo. big = hi + (rows + 1) * (hi - lo) + |hi| + 1
// exceeds the first bound by a margin relative to the costs' scale, so it survives rounding.
// The product is rounded on its own on the GPU (no fused multiply-add, which the CPU build lacks),
// so both compute the same value.
FMF_LAP_HD double forbidden_cost(double lo, double hi, int64_t rows) {
#if defined(__CUDA_ARCH__)
  const double spread = __dmul_rn(static_cast<double>(rows + 1), hi - lo);
#else
  const double spread = static_cast<double>(rows + 1) * (hi - lo);
#endif
  return hi + spread + fabs(hi) + 1.0;
}

}  // namespace lap
}  // namespace fmf
