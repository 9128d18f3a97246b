// Batched linear assignment on the GPU: one thread block per image, following fmf::lap::Solver
// (fmf/lap_solver.h) phase by phase and making the same choices, ties included, so CPU and GPU
// return the same matching. The serial decisions (which row, which column, the path) are thread
// 0's; every scan over columns or rows is spread over the block and merged by a block-wide
// reduction. Per-column and per-row state lives in shared memory; the oriented double cost in a
// global workspace (read one row per step, coalesced).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <math_constants.h>

#include <climits>

#include "fmf/lap_host.h"

namespace fmf {
namespace {

constexpr int kThreads = 128;  // MaskFormer's problems have about 100 columns: one or two per thread
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Shared memory per block: 3 doubles + 3 ints per column, 2 ints per row (see Smem below).
constexpr int64_t kSmemLimit = 48 * 1024;
constexpr int64_t kMaxSide = 1024;  // = CUDA_MAX_SIDE in fastmaskformer/ops/backends/native_lap.py

// A candidate of a lexicographic (value, key) minimum.
struct Cand {
  double val;
  int32_t key;
};

__device__ __forceinline__ bool before(const Cand& a, const Cand& b) {
  return a.val < b.val || (a.val == b.val && a.key < b.key);
}

__device__ __forceinline__ Cand shfl_down(const Cand& c, int offset) {
  return {__shfl_down_sync(kFullMask, c.val, offset), __shfl_down_sync(kFullMask, c.key, offset)};
}

// The two smallest candidates, a before b.
struct Top2 {
  Cand a, b;
};

__device__ __forceinline__ Top2 merge(const Top2& x, const Top2& y) {
  if (before(y.a, x.a)) return {y.a, before(x.a, y.b) ? x.a : y.b};
  return {x.a, before(y.a, x.b) ? y.a : x.b};
}

__device__ __forceinline__ void push(Top2& t, const Cand& c) {
  if (before(c, t.b)) {
    if (before(c, t.a)) {
      t.b = t.a;
      t.a = c;
    } else {
      t.b = c;
    }
  }
}

// Block-wide reductions; every thread gets the result. `scratch` holds kWarps entries.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(kFullMask, v, o));
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < kWarps; ++w) v = op(v, scratch[w]);
  return v;
}

__device__ Cand block_argmin(Cand c, Cand* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) {
    const Cand other = shfl_down(c, o);
    if (before(other, c)) c = other;
  }
  __syncthreads();
  if (lane == 0) scratch[warp] = c;
  __syncthreads();
  c = scratch[0];
  for (int w = 1; w < kWarps; ++w) {
    if (before(scratch[w], c)) c = scratch[w];
  }
  return c;
}

__device__ Top2 block_top2(Top2 t, Top2* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) t = merge(t, {shfl_down(t.a, o), shfl_down(t.b, o)});
  __syncthreads();
  if (lane == 0) scratch[warp] = t;
  __syncthreads();
  t = scratch[0];
  for (int w = 1; w < kWarps; ++w) t = merge(t, scratch[w]);
  return t;
}

struct MinOp {
  __device__ double operator()(double a, double b) const { return b < a ? b : a; }
};
struct MaxOp {
  __device__ double operator()(double a, double b) const { return b > a ? b : a; }
};

// One block's shared state, carved out of dynamic shared memory.
struct Smem {
  double *v, *d, *closed;  // [cols]: column duals, Dijkstra distances, 0 or +inf once scanned
  int32_t *y, *pred, *scanned;  // [cols]: col -> row, path, scanned columns in order
  int32_t *x, *free_rows;  // [rows]: row -> col, free rows
};

__host__ __device__ inline int64_t smem_bytes(int64_t rows, int64_t cols) {
  return cols * (3 * sizeof(double) + 3 * sizeof(int32_t)) + rows * 2 * sizeof(int32_t);
}

// Phases of Solver::load: copy (transposed when Q > n), find the range, replace +inf.
template <typename scalar_t>
__device__ lap::Status load(const scalar_t* src, int64_t Q, int64_t n, int64_t sq, int64_t st, bool transposed,
                            double* c, int32_t cols, double& big, double* red) {
  const int64_t so = transposed ? 1 : cols, to = transposed ? cols : 1;
  double lo = CUDART_INF, hi = -CUDART_INF;
  bool nan = false;
  for (int64_t e = threadIdx.x; e < Q * n; e += kThreads) {
    const int64_t q = e / n, t = e % n;
    const double h = static_cast<double>(src[q * sq + t * st]);
    nan |= h != h;
    lo = h < lo ? h : lo;
    hi = h > hi ? h : hi;
    c[q * so + t * to] = h;
  }
  const bool any_nan = __syncthreads_or(nan);
  lo = block_reduce(lo, MinOp{}, red);
  hi = block_reduce(hi, MaxOp{}, red);
  big = CUDART_INF;
  if (any_nan) return lap::kNaN;
  if (lo == -CUDART_INF) return lap::kNegInf;
  if (hi < CUDART_INF) return lap::kOk;
  lo = CUDART_INF, hi = -CUDART_INF;
  for (int64_t e = threadIdx.x; e < Q * n; e += kThreads) {
    if (c[e] < CUDART_INF) lo = fmin(lo, c[e]), hi = fmax(hi, c[e]);
  }
  lo = block_reduce(lo, MinOp{}, red);
  hi = block_reduce(hi, MaxOp{}, red);
  if (lo > hi) return lap::kInfeasible;
  big = lap::forbidden_cost(lo, hi, transposed ? n : Q);
  if (!isfinite(big)) return lap::kTooLarge;
  for (int64_t e = threadIdx.x; e < Q * n; e += kThreads) {
    if (c[e] == CUDART_INF) c[e] = big;
  }
  __syncthreads();
  return lap::kOk;
}

// Solver::reduce_columns (square problems). Returns the number of free rows.
__device__ int32_t reduce_columns(const double* c, int32_t n, Smem& s) {
  int32_t* arg = s.pred;
  int32_t* matches = s.free_rows;
  double* transfer = s.d;
  for (int32_t j = threadIdx.x; j < n; j += kThreads) {
    double m = CUDART_INF;
    int32_t a = 0;
    for (int32_t i = 0; i < n; ++i) {
      if (c[static_cast<int64_t>(i) * n + j] < m) m = c[static_cast<int64_t>(i) * n + j], a = i;
    }
    s.v[j] = m;
    arg[j] = a;
    matches[j] = 0;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int32_t j = n - 1; j >= 0; --j) {
      const int32_t i = arg[j];
      if (++matches[i] == 1 || s.v[j] < s.v[s.x[i]]) {
        if (s.x[i] >= 0) s.y[s.x[i]] = -1;
        s.x[i] = j;
        s.y[j] = i;
      }
    }
  }
  __syncthreads();
  for (int32_t i = threadIdx.x; i < n; i += kThreads) {
    transfer[i] = 0.0;
    if (matches[i] != 1 || n < 2) continue;
    double m = CUDART_INF;
    for (int32_t j = 0; j < n; ++j) {
      if (j != s.x[i]) m = fmin(m, c[static_cast<int64_t>(i) * n + j] - s.v[j]);
    }
    transfer[i] = m;
  }
  __syncthreads();
  for (int32_t i = threadIdx.x; i < n; i += kThreads) {
    if (matches[i] == 1) s.v[s.x[i]] -= transfer[i];
  }
  __syncthreads();
  __shared__ int32_t n_free;
  if (threadIdx.x == 0) {
    n_free = 0;
    for (int32_t i = 0; i < n; ++i) {
      if (matches[i] == 0) s.free_rows[n_free++] = i;
    }
  }
  __syncthreads();
  return n_free;
}

// Solver::reduce_rows: one pass of augmenting row reduction; returns the rows left free.
__device__ int32_t reduce_rows(const double* c, int32_t rows, int32_t cols, int32_t n_free, Smem& s, Top2* red) {
  __shared__ int32_t k, n_next, row;
  __shared__ int64_t budget;
  __syncthreads();  // every thread has read the previous phase's shared results
  if (threadIdx.x == 0) k = 0, n_next = 0, budget = static_cast<int64_t>(lap::kArrStepsPerRow) * rows;
  __syncthreads();
  while (true) {
    if (threadIdx.x == 0) row = k < n_free ? s.free_rows[k++] : -1;
    __syncthreads();
    const int32_t i = row;
    if (i < 0) break;
    const double* ci = c + static_cast<int64_t>(i) * cols;
    Top2 t{{CUDART_INF, INT_MAX}, {CUDART_INF, INT_MAX}};
    for (int32_t j = threadIdx.x; j < cols; j += kThreads) push(t, {ci[j] - s.v[j], j});
    t = block_top2(t, red);
    if (threadIdx.x == 0) {
      const double m1 = t.a.val, m2 = t.b.val;
      int32_t j1 = t.a.key;
      int32_t i0 = s.y[j1];
      if (m1 < m2) {
        s.v[j1] -= m2 - m1;
      } else if (i0 >= 0) {
        j1 = t.b.key;
        i0 = s.y[j1];
      }
      s.x[i] = j1;
      s.y[j1] = i;
      if (i0 >= 0) {
        s.x[i0] = -1;
        if (m1 < m2 && --budget > 0) {
          s.free_rows[--k] = i0;
        } else {
          s.free_rows[n_next++] = i0;
        }
      }
    }
    __syncthreads();
  }
  return n_next;
}

// Solver::augment: shortest augmenting path from free row f, dual update, path flip.
__device__ void augment(const double* c, int32_t cols, int32_t f, Smem& s, Cand* red) {
  __shared__ int32_t row, sink, n_scanned;
  __shared__ double ui, dist;
  for (int32_t j = threadIdx.x; j < cols; j += kThreads) s.d[j] = CUDART_INF, s.closed[j] = 0.0;
  if (threadIdx.x == 0) row = f, sink = -1, n_scanned = 0, ui = 0.0;
  __syncthreads();
  while (sink < 0) {
    const int32_t i = row;
    const double* ci = c + static_cast<int64_t>(i) * cols;
    Cand best{CUDART_INF, INT_MAX};
    for (int32_t j = threadIdx.x; j < cols; j += kThreads) {
      const double h = ci[j] - s.v[j] - ui + s.closed[j];
      if (h < s.d[j]) s.d[j] = h, s.pred[j] = i;
      const Cand cand{s.d[j] + s.closed[j], lap::column_key(j, s.y[j] >= 0)};
      if (before(cand, best)) best = cand;
    }
    best = block_argmin(best, red);
    if (threadIdx.x == 0) {
      const int32_t j = best.key & ~lap::kBusyBit;
      dist = best.val;
      if (s.y[j] < 0) {
        sink = j;
      } else {
        s.closed[j] = CUDART_INF;
        s.scanned[n_scanned++] = j;
        row = s.y[j];
        ui = c[static_cast<int64_t>(row) * cols + j] - s.v[j] - dist;
      }
    }
    __syncthreads();
  }
  for (int32_t k = threadIdx.x; k < n_scanned; k += kThreads) s.v[s.scanned[k]] += s.d[s.scanned[k]] - dist;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int32_t j = sink;;) {
      const int32_t r = s.pred[j], next = s.x[r];
      s.y[j] = r;
      s.x[r] = j;
      if (r == f) break;
      j = next;
    }
  }
  __syncthreads();
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    lap_kernel(const scalar_t* __restrict__ cost, int64_t sb, int64_t sq, int64_t st, int64_t Q, int64_t N,
               const int64_t* __restrict__ meta, double* __restrict__ work, int64_t* __restrict__ out,
               int64_t out_stride, int32_t* __restrict__ status) {
  extern __shared__ double smem_raw[];
  __shared__ double red_d[kWarps];
  __shared__ Cand red_c[kWarps];
  __shared__ Top2 red_t[kWarps];
  const int64_t b = blockIdx.x, B = gridDim.x;
  const int64_t n = meta[b], offset = meta[B + b];
  if (Q == 0 || n == 0) return;
  const bool transposed = Q > n;
  const int32_t rows = static_cast<int32_t>(transposed ? n : Q), cols = static_cast<int32_t>(transposed ? Q : n);
  const int64_t max_cols = Q > N ? Q : N, max_rows = Q < N ? Q : N;
  Smem s;
  s.v = smem_raw;
  s.d = s.v + max_cols;
  s.closed = s.d + max_cols;
  s.y = reinterpret_cast<int32_t*>(s.closed + max_cols);
  s.pred = s.y + max_cols;
  s.scanned = s.pred + max_cols;
  s.x = s.scanned + max_cols;
  s.free_rows = s.x + max_rows;
  double* c = work + b * Q * N;

  double big;  // the same in every thread: it comes from block-wide reductions
  const lap::Status loaded = load(cost + b * sb, Q, n, sq, st, transposed, c, cols, big, red_d);
  if (loaded != lap::kOk) {
    if (threadIdx.x == 0) status[b] = loaded;
    return;
  }
  for (int32_t j = threadIdx.x; j < cols; j += kThreads) s.v[j] = 0.0, s.y[j] = -1;
  for (int32_t i = threadIdx.x; i < rows; i += kThreads) s.x[i] = -1, s.free_rows[i] = i;
  __syncthreads();
  int32_t n_free = rows == cols ? reduce_columns(c, rows, s) : rows;
  if (cols > 1) {
    for (int pass = 0; pass < lap::kArrPasses; ++pass) n_free = reduce_rows(c, rows, cols, n_free, s, red_t);
  }
  for (int32_t k = 0; k < n_free; ++k) augment(c, cols, s.free_rows[k], s, red_c);

  bool uses_forbidden = false;
  for (int32_t i = threadIdx.x; i < rows; i += kThreads) {
    uses_forbidden |= c[static_cast<int64_t>(i) * cols + s.x[i]] == big;
  }
  if (__syncthreads_or(uses_forbidden)) {
    if (threadIdx.x == 0) status[b] = lap::kInfeasible;
    return;
  }
  // Solver::write: (query, target) pairs, queries ascending.
  if (threadIdx.x == 0) {
    int64_t* out_rows = out + offset;
    int64_t* out_cols = out + out_stride + offset;
    if (!transposed) {
      for (int32_t i = 0; i < rows; ++i) out_rows[i] = i, out_cols[i] = s.x[i];
    } else {
      int64_t k = 0;
      for (int32_t j = 0; j < cols; ++j) {
        if (s.y[j] >= 0) out_rows[k] = j, out_cols[k] = s.y[j], ++k;
      }
    }
  }
}

at::Tensor linear_sum_assignment_cuda(const at::Tensor& cost, const at::Tensor& sizes) {
  const auto offsets = lap::check_and_offsets(cost, sizes, at::kCUDA);
  const int64_t B = cost.size(0), Q = cost.size(1), N = cost.size(2);
  const int64_t rows = std::min(Q, N), cols = std::max(Q, N);
  TORCH_CHECK_VALUE(cols <= kMaxSide, "cost: the CUDA solver takes up to ", kMaxSide, " rows and columns, got ",
                    cost.sizes());
  const int64_t smem = smem_bytes(rows, cols);
  TORCH_CHECK_VALUE(smem + 1024 <= kSmemLimit, "cost: ", cost.sizes(), " needs ", smem,
                    " bytes of shared memory per image, more than the CUDA solver's ", kSmemLimit);
  const c10::cuda::CUDAGuard guard(cost.device());
  auto out = at::full({2, B * rows}, -1, cost.options().dtype(at::kLong));
  if (offsets[B] == 0) return out;
  // sizes then offsets, one copy to the device.
  auto meta = at::empty({2 * B}, sizes.options().pinned_memory(true));  // async copy below
  const auto n = sizes.contiguous();
  std::copy(n.data_ptr<int64_t>(), n.data_ptr<int64_t>() + B, meta.data_ptr<int64_t>());
  std::copy(offsets.begin(), offsets.begin() + B, meta.data_ptr<int64_t>() + B);
  meta = meta.to(cost.device(), /*non_blocking=*/true);
  auto work = at::empty({B, Q * N}, cost.options().dtype(at::kDouble));
  auto status = at::zeros({B}, cost.options().dtype(at::kInt));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cost.scalar_type(), "linear_sum_assignment_cuda", [&] {
    lap_kernel<scalar_t><<<B, kThreads, smem, stream>>>(
        cost.data_ptr<scalar_t>(), cost.stride(0), cost.stride(1), cost.stride(2), Q, N,
        meta.data_ptr<int64_t>(), work.data_ptr<double>(), out.data_ptr<int64_t>(), out.size(1),
        status.data_ptr<int32_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto status_host = status.cpu();  // synchronizes: errors must name their image now
  lap::raise_first_error(status_host.data_ptr<int32_t>(), B);
  return out;
}

}  // namespace
}  // namespace fmf

TORCH_LIBRARY_IMPL(fastmaskformer, CUDA, m) {
  m.impl("linear_sum_assignment", &fmf::linear_sum_assignment_cuda);
}
