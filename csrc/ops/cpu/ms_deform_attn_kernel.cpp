// Native multi-scale deformable attention on the CPU, forward and backward.
//
// Each sampling point reads the 2 x 2 value rows around it (fmf/ms_deform_attn.h: grid_sample's
// rule) and works on their dh contiguous channels with 8-lane vector loops; math and accumulation
// are fp32, float16/bfloat16 inputs are converted as they are read. Never materialized: the
// reference's per-level [B*heads, dh, Lq, P] samples, their stack and the weighted product.
//
// Forward: parallel over (image, block of queries); each output row is one query's sum over its
// levels and points, in a fixed order.
// Backward: parallel over (image, head). The value rows such a task scatters into (its head's
// channels of its image's rows) and the location and weight gradients it writes (its head's points)
// belong to it alone, so there are no races and no per-thread copy of the whole gradient (a task
// holds its head's rows and their gradient in fp32: 2 x S x dh floats), and every value row adds its
// contributions in query order: deterministic whatever the number of threads. (Splitting tasks
// further by level was measured 1.5x slower at the R50 shapes: each task then reads every query's
// locations, weights and output gradient for a fraction of each cache line.)
#include "fmf/simd.h"  // first: its diagnostic setting must precede the math templates

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fmf/checks.h"
#include "fmf/dtypes.h"
#include "fmf/ms_deform_attn.h"

namespace fmf {
namespace {

using simd::f32x8;
using simd::kLanes;

#define FMF_INLINE inline __attribute__((always_inline))

constexpr int64_t kQueryBlock = 32;  // queries per forward task

struct Level {
  int64_t H, W, start;
};

struct Geometry {
  int64_t B, S, heads, dh, Lq, L, P;
  std::vector<Level> levels;
  int64_t row_stride() const { return heads * dh; }  // between value rows s and s + 1
};

Geometry check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                      const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  FMF_CHECK_DIM(value, 4);
  FMF_CHECK_DIM(spatial_shapes, 2);
  FMF_CHECK_DIM(level_start_index, 1);
  FMF_CHECK_DIM(sampling_locations, 6);
  FMF_CHECK_DIM(attention_weights, 5);
  FMF_CHECK_DEVICE(value, at::kCPU);
  FMF_CHECK_SAME_DEVICE(spatial_shapes, value);
  FMF_CHECK_SAME_DEVICE(level_start_index, value);
  FMF_CHECK_SAME_DEVICE(sampling_locations, value);
  FMF_CHECK_SAME_DEVICE(attention_weights, value);
  check_float_dtype(value.scalar_type(), "value");
  TORCH_CHECK_TYPE(sampling_locations.scalar_type() == value.scalar_type(),
                   "sampling_locations: expected the dtype of value (", value.scalar_type(), "), got ",
                   sampling_locations.scalar_type());
  TORCH_CHECK_TYPE(attention_weights.scalar_type() == value.scalar_type(),
                   "attention_weights: expected the dtype of value (", value.scalar_type(), "), got ",
                   attention_weights.scalar_type());
  TORCH_CHECK_TYPE(spatial_shapes.scalar_type() == at::kLong, "spatial_shapes: expected dtype int64, got ",
                   spatial_shapes.scalar_type());
  TORCH_CHECK_TYPE(level_start_index.scalar_type() == at::kLong, "level_start_index: expected dtype int64, got ",
                   level_start_index.scalar_type());

  Geometry g;
  g.B = value.size(0), g.S = value.size(1), g.heads = value.size(2), g.dh = value.size(3);
  g.L = spatial_shapes.size(0);
  TORCH_CHECK_VALUE(spatial_shapes.size(1) == 2, "spatial_shapes: expected shape [L, 2] (H_l, W_l), got ",
                    spatial_shapes.sizes());
  TORCH_CHECK_VALUE(level_start_index.size(0) == g.L, "level_start_index: expected ", g.L,
                    " entries (one per level of spatial_shapes), got shape ", level_start_index.sizes());
  const auto loc = sampling_locations.sizes();
  TORCH_CHECK_VALUE(loc[0] == g.B && loc[2] == g.heads && loc[3] == g.L && loc[5] == 2,
                    "sampling_locations: expected shape [", g.B, ", Lq, ", g.heads, ", ", g.L,
                    ", P, 2] (batch and heads of value, levels of spatial_shapes), got ", loc);
  g.Lq = loc[1], g.P = loc[4];
  TORCH_CHECK_VALUE(attention_weights.sizes() == loc.slice(0, 5), "attention_weights: expected shape ",
                    loc.slice(0, 5), " (sampling_locations without its last dim), got ", attention_weights.sizes());

  const at::Tensor shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  int64_t rows = 0;
  for (int64_t l = 0; l < g.L; ++l) {
    const Level level{hw[2 * l], hw[2 * l + 1], start[l]};
    TORCH_CHECK_VALUE(level.H > 0 && level.W > 0, "spatial_shapes: level ", l, " has size ", level.H, " x ",
                      level.W, "; expected H_l, W_l >= 1");
    TORCH_CHECK_VALUE(level.start == rows, "level_start_index: level ", l, " starts at row ", level.start,
                      " but the levels before it hold ", rows, " rows (expected the cumulative sum of H_l * W_l)");
    rows += level.H * level.W;
    g.levels.push_back(level);
  }
  TORCH_CHECK_VALUE(rows == g.S, "value: expected ", rows, " rows (the sum of H_l * W_l over spatial_shapes), got "
                    "shape ", value.sizes());
  return g;
}

// Eight channels from src as floats.
template <typename T>
FMF_INLINE f32x8 load8(const T* src) {
  f32x8 v;
  for (int j = 0; j < kLanes; ++j) v[j] = static_cast<float>(src[j]);
  return v;
}

template <>
FMF_INLINE f32x8 load8<float>(const float* src) {
  return simd::load(src);
}

// dst[c] += w * src[c] for c < n.
template <typename T>
FMF_INLINE void axpy(float* dst, const T* src, float w, int64_t n) {
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) simd::store(dst + c, simd::load(dst + c) + w * load8(src + c));
  for (; c < n; ++c) dst[c] += w * static_cast<float>(src[c]);
}

// sum_c a[c] * b[c] for c < n.
template <typename T>
FMF_INLINE float dot(const float* a, const T* b, int64_t n) {
  f32x8 acc{};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) acc += simd::load(a + c) * load8(b + c);
  float s = simd::sum(acc);
  for (; c < n; ++c) s += a[c] * static_cast<float>(b[c]);
  return s;
}

// Rows and queries a backward task asks for ahead of use: one head's slices are heads * dh (or
// heads * L * P) elements apart, strides the hardware prefetcher does not follow; prefetching them
// made the backward 1.5x faster at the R50 shapes (120 -> 77 ms on one thread).
constexpr int64_t kAhead = 4;

// Asks for the cache lines of p[0, n) (a hint: no effect on results).
template <typename T>
FMF_INLINE void prefetch_span(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < n * static_cast<int64_t>(sizeof(T)); i += 64) __builtin_prefetch(c + i);
}

// Output rows of queries [q0, q1) of image b, all heads; acc holds dh floats.
template <typename T>
FMF_CPU_CLONES void forward_block(const Geometry& g, const T* value, const T* loc, const T* attn, T* out, int64_t b,
                                  int64_t q0, int64_t q1, float* acc) {
  const int64_t rs = g.row_stride();
  for (int64_t q = q0; q < q1; ++q) {
    for (int64_t h = 0; h < g.heads; ++h) {
      std::fill(acc, acc + g.dh, 0.f);
      const int64_t point0 = ((b * g.Lq + q) * g.heads + h) * g.L * g.P;
      for (int64_t l = 0; l < g.L; ++l) {
        const Level& lv = g.levels[l];
        const T* rows = value + (b * g.S + lv.start) * rs + h * g.dh;
        for (int64_t p = 0; p < g.P; ++p) {
          const int64_t i = point0 + l * g.P + p;
          const Corners c = corners_at(static_cast<float>(loc[2 * i]), static_cast<float>(loc[2 * i + 1]), lv.H, lv.W);
          const float a = static_cast<float>(attn[i]);
          for (int k = 0; k < 4; ++k) {
            if (c.valid[k]) axpy(acc, rows + c.row(k, lv.W) * rs, a * c.weight(k), g.dh);
          }
        }
      }
      T* dst = out + ((b * g.Lq + q) * g.heads + h) * g.dh;
      for (int64_t ch = 0; ch < g.dh; ++ch) dst[ch] = static_cast<T>(acc[ch]);
    }
  }
}

// Every gradient of (image b, head h): its value rows, and its points' location and weight
// gradients. The task first copies its value rows to `rows` as contiguous fp32 [S, dh] and
// accumulates their gradient in `grad_rows` alike, then writes that out once: the inner loops read
// and add fp32 at unit stride whatever the dtype, instead of rows heads * dh apart (which also map
// to few cache sets). go holds dh floats.
template <typename T>
FMF_CPU_CLONES void backward_task(const Geometry& g, const T* grad_out, const T* value, const T* loc, const T* attn,
                                  T* grad_value, T* grad_loc, T* grad_attn, int64_t b, int64_t h, float* go,
                                  float* rows, float* grad_rows) {
  const int64_t rs = g.row_stride(), dh = g.dh;
  const int64_t first = b * g.S * rs + h * dh;
  for (int64_t r = 0; r < g.S; ++r) {
    if (r + kAhead < g.S) prefetch_span(value + first + (r + kAhead) * rs, dh);
    for (int64_t ch = 0; ch < dh; ++ch) rows[r * dh + ch] = static_cast<float>(value[first + r * rs + ch]);
  }
  std::fill(grad_rows, grad_rows + g.S * dh, 0.f);
  for (int64_t q = 0; q < g.Lq; ++q) {
    const T* gq = grad_out + ((b * g.Lq + q) * g.heads + h) * dh;
    if (q + kAhead < g.Lq) {  // this head's slices of a later query
      const int64_t later = (b * g.Lq + q + kAhead) * g.heads + h;
      prefetch_span(grad_out + later * dh, dh);
      prefetch_span(loc + later * g.L * g.P * 2, g.L * g.P * 2);
      prefetch_span(attn + later * g.L * g.P, g.L * g.P);
    }
    for (int64_t ch = 0; ch < dh; ++ch) go[ch] = static_cast<float>(gq[ch]);
    const int64_t point0 = ((b * g.Lq + q) * g.heads + h) * g.L * g.P;
    for (int64_t l = 0; l < g.L; ++l) {
      const Level& lv = g.levels[l];
      const float* level_rows = rows + lv.start * dh;
      float* level_grad = grad_rows + lv.start * dh;
      for (int64_t i = point0 + l * g.P; i < point0 + (l + 1) * g.P; ++i) {
        const Corners c = corners_at(static_cast<float>(loc[2 * i]), static_cast<float>(loc[2 * i + 1]), lv.H, lv.W);
        const float a = static_cast<float>(attn[i]);
        float d[4] = {0.f, 0.f, 0.f, 0.f};  // <grad_out row, corner k>, zero outside the level
        for (int k = 0; k < 4; ++k) {
          if (!c.valid[k]) continue;
          const int64_t offset = c.row(k, lv.W) * dh;
          d[k] = dot(go, level_rows + offset, dh);
          axpy(level_grad + offset, go, a * c.weight(k), dh);
        }
        float sampled = 0.f;
        for (int k = 0; k < 4; ++k) sampled += c.weight(k) * d[k];
        // d sample / d pixel coordinate, times d pixel / d loc = the level's size.
        const float dx = (1.f - c.fy) * (d[1] - d[0]) + c.fy * (d[3] - d[2]);
        const float dy = (1.f - c.fx) * (d[2] - d[0]) + c.fx * (d[3] - d[1]);
        grad_attn[i] = static_cast<T>(sampled);
        grad_loc[2 * i] = static_cast<T>(a * dx * static_cast<float>(lv.W));
        grad_loc[2 * i + 1] = static_cast<T>(a * dy * static_cast<float>(lv.H));
      }
    }
  }
  for (int64_t r = 0; r < g.S; ++r) {
    for (int64_t ch = 0; ch < dh; ++ch) grad_value[first + r * rs + ch] = static_cast<T>(grad_rows[r * dh + ch]);
  }
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const Geometry g = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  at::Tensor out = at::empty({g.B, g.Lq, g.heads * g.dh}, value.options());
  if (out.numel() == 0) return out;
  const at::Tensor v = value.contiguous(), loc = sampling_locations.contiguous(), attn = attention_weights.contiguous();
  const int64_t blocks = (g.Lq + kQueryBlock - 1) / kQueryBlock;
  FMF_DISPATCH_FLOAT(v.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const scalar_t *pv = v.data_ptr<scalar_t>(), *pl = loc.data_ptr<scalar_t>(), *pa = attn.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, g.B * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(g.dh);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, q0 = task % blocks * kQueryBlock;
        forward_block(g, pv, pl, pa, po, b, q0, std::min(q0 + kQueryBlock, g.Lq), acc.data());
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Geometry g = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  FMF_CHECK_DIM(grad_output, 3);
  FMF_CHECK_SAME_DEVICE(grad_output, value);
  check_float_dtype(grad_output.scalar_type(), "grad_output");
  TORCH_CHECK_VALUE(grad_output.size(0) == g.B && grad_output.size(1) == g.Lq && grad_output.size(2) == g.heads * g.dh,
                    "grad_output: expected shape [", g.B, ", ", g.Lq, ", ", g.heads * g.dh, "] (the output's), got ",
                    grad_output.sizes());
  // Every element of every gradient is written by exactly one task (the levels tile value's rows).
  at::Tensor grad_value = at::empty(value.sizes(), value.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_loc = at::empty(sampling_locations.sizes(), sampling_locations.options());
  at::Tensor grad_attn = at::empty(attention_weights.sizes(), attention_weights.options());
  if (grad_attn.numel() == 0 || g.dh == 0) {
    grad_value.zero_(), grad_loc.zero_(), grad_attn.zero_();
    return {grad_value, grad_loc, grad_attn};
  }
  const at::Tensor v = value.contiguous(), loc = sampling_locations.contiguous(), attn = attention_weights.contiguous();
  const at::Tensor gout = grad_output.to(value.scalar_type()).contiguous();
  FMF_DISPATCH_FLOAT(v.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    const scalar_t *pv = v.data_ptr<scalar_t>(), *pl = loc.data_ptr<scalar_t>(), *pa = attn.data_ptr<scalar_t>();
    const scalar_t* pg = gout.data_ptr<scalar_t>();
    scalar_t *pgv = grad_value.data_ptr<scalar_t>(), *pgl = grad_loc.data_ptr<scalar_t>(),
             *pga = grad_attn.data_ptr<scalar_t>();
    at::parallel_for(0, g.B * g.heads, 1, [&](int64_t begin, int64_t end) {
      // One head's rows and their gradient: 2 x 688 KB at the R50 encoder's shapes.
      std::vector<float> go(g.dh), rows(g.S * g.dh), grad_rows(g.S * g.dh);
      for (int64_t task = begin; task < end; ++task) {
        backward_task(g, pg, pv, pl, pa, pgv, pgl, pga, task / g.heads, task % g.heads, go.data(), rows.data(),
                      grad_rows.data());
      }
    });
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace
}  // namespace fmf

TORCH_LIBRARY_IMPL(fastmaskformer, CPU, m) {
  m.impl("ms_deform_attn_forward", &fmf::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &fmf::ms_deform_attn_backward_cpu);
}
