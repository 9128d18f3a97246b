// Native point-sampled mask loss on the CPU, forward and backward, one mask per task.
//
// A mask's points are taken in chunks of kChunk: each point's 2 x 2 taps on the logits and on the
// targets follow grid_sample's rule (the reference's fp32 arithmetic on 2 coords - 1, as
// fmf/ms_deform_attn.h's corners_at, here 8 points at a time with off-map corners folded into zero
// weights), the logits are read in their dtype and the targets in theirs (bool as bytes), each at
// its own resolution and through its strides (no copy of the full-resolution targets, whose rows
// are prefetched a chunk ahead of their reads); then an 8-lane vector loop adds the chunk's BCE,
// s t, s and t (forward) or computes each point's d loss / d x (backward), which is scattered into
// the point's 4 logit taps. fp32 logits and byte targets with unit column stride on a CPU with AVX2
// (the criterion's case) are read with vector gathers, their taps in registers (load_chunk_gathered).
// The points land in random order, so while a thread works on one mask it prefetches the next one's
// logit row, target and gradient row.
// Never stored: any [N, P] tensor; a thread holds one chunk of points (x, t, gradient, taps).
//
// Mask n reads row pred_index[n] of the logits and row target_index[n] of the targets when those
// are given (the criterion passes a layer's [B Q, h, w] logits and the step's targets with the matched
// rows, so neither is gathered into a copy and the backward writes the layer's gradient directly).
//
// Parallel over masks. A task owns its mask's statistics row (fp64 sums of the chunks' fp32 vector
// sums) and its [h, w] gradient slice, so no two threads write one value, and every sum is taken in
// point order: deterministic whatever the number of threads. Masks run grouped by the target row
// they read (target_order). When pred_index names a row twice, the backward runs its masks one
// after the other, in that order.
#include "fmf/simd.h"  // first: its diagnostic setting must precede the math templates

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "fmf/checks.h"
#include "fmf/dtypes.h"
#include "fmf/point_chunk.h"
#include "fmf/row_index.h"

namespace fmf {
namespace {

using simd::f32x8;
using simd::kLanes;
using namespace point_chunk;

constexpr int kStats = 4;  // per mask: sums over the points of BCE, s t, s and t

// Sizes and element strides of the three inputs (the targets' strides in elements of their dtype),
// and the rows each mask reads (nullptr: row n).
struct Geometry {
  int64_t N, h, w, H, W, P;
  int64_t sp_n, sp_h, sp_w, st_n, st_h, st_w;
  const int64_t* pred_row;
  const int64_t* target_row;
  int64_t pred(int64_t n) const { return pred_row ? pred_row[n] : n; }
  int64_t target(int64_t n) const { return target_row ? target_row[n] : n; }
};

// One chunk of a mask's points: sampled logits x and targets t (zero past the chunk's end, so the
// vector loops read whole vectors), their taps (the logits' reused by the backward's scatter), the
// gradient.
struct Chunk {
  float x[kChunk], t[kChunk], g[kChunk];
  Taps low, high;
};

// Samples points [p0, p0 + m) of mask n into chunk. The targets' rows are prefetched before the
// logits are read: at full resolution they are the reads that miss the cache.
template <typename scalar_t, MaskKind kKind>
void load_chunk(const Geometry& g, const scalar_t* pred, const void* targets, const float* coords, int64_t n,
                int64_t p0, int64_t m, Chunk& chunk) {
  const float* xy = coords + (n * g.P + p0) * 2;
  point_taps(xy, m, g.h, g.w, chunk.low);
  point_taps(xy, m, g.H, g.W, chunk.high);
  const int64_t tgt0 = g.target(n) * g.st_n;
  const char* bytes = static_cast<const char*>(targets);
  const int64_t size = kMaskBytes<kKind>;
  for (int64_t i = 0; i < m; ++i) {
    __builtin_prefetch(bytes + (tgt0 + chunk.high.ya[i] * g.st_h + chunk.high.xa[i] * g.st_w) * size);
    __builtin_prefetch(bytes + (tgt0 + chunk.high.yb[i] * g.st_h + chunk.high.xa[i] * g.st_w) * size);
  }
  const scalar_t* logits = pred + g.pred(n) * g.sp_n;
  gather(chunk.low, m, [&](int64_t y, int64_t x) { return static_cast<float>(logits[y * g.sp_h + x * g.sp_w]); },
         chunk.x);
  gather(chunk.high, m, [&](int64_t y, int64_t x) { return mask_value(targets, tgt0 + y * g.st_h + x * g.st_w, kKind); },
         chunk.t);
}

#ifdef FMF_AVX2_GATHER
// load_chunk for fp32 logits and byte targets, both with unit column stride (fast_loads): each 8
// points' taps in registers, their corners read with AVX2 gathers; only the logits' taps are kept
// (chunk.low, for the backward's scatter). The same values as load_chunk, bit for bit.
FMF_AVX2_GATHER_FN void load_chunk_gathered(const Geometry& g, const float* pred, const uint8_t* targets,
                                            const float* coords, int64_t n, int64_t p0, int64_t m, Chunk& chunk) {
  const float* xy = coords + (n * g.P + p0) * 2;
  const float* logits = pred + g.pred(n) * g.sp_n;
  const uint8_t* target = targets + g.target(n) * g.st_n;
  for (int64_t i = 0; i < kChunk; i += kLanes) {
    f32x8 lx, ly;
    load_xy8(xy, i, m, lx, ly);
    const Taps8 low = taps8(lx, ly, g.h, g.w);
    store_taps8(low, i, chunk.low);
    const f32x8 x = bilinear8(low, static_cast<int32_t>(g.sp_h),
                              [&](const simd::i32x8& offset) { return gather_f32(logits, offset); });
    const f32x8 t = bilinear8(taps8(lx, ly, g.H, g.W), static_cast<int32_t>(g.st_h),
                              [&](const simd::i32x8& offset) { return gather_u8(target, offset); });
    const f32x8 past_m = simd::below(i, m);  // zero past the chunk's end (a NaN logit reads as NaN at weight 0)
    simd::store(chunk.x + i, past_m != 0.f ? x : f32x8{});
    simd::store(chunk.t + i, past_m != 0.f ? t : f32x8{});
  }
}
#endif

// Whether for_each_chunk takes load_chunk_gathered.
bool fast_loads(const Geometry& g, const at::Tensor& pred, const at::Tensor& target) {
#ifdef FMF_AVX2_GATHER
  return pred.scalar_type() == at::kFloat && mask_kind(target.scalar_type(), "target_masks") == MaskKind::kByte &&
         g.sp_w == 1 && g.st_w == 1 && avx2_gather_available() && gather_offsets_fit(g.h, g.sp_h, g.w) &&
         gather_offsets_fit(g.H, g.st_h, g.W, 3);
#else
  return false;
#endif
}

// Adds the sums over the first m points of (BCE(x, t), s t, s, t) to acc: the focal loss with
// gamma = 0 and no alpha weighting is BCE (fmf/focal_math.h, the stable softplus form).
FMF_CPU_CLONES void chunk_stats(const float* x, const float* t, int64_t m, double* acc) {
  f32x8 bce{}, st{}, s{}, ts{};
  for (int64_t i = 0; i < m; i += kLanes) {
    const f32x8 valid = simd::below(i, m), tv = simd::load(t + i);
    const FocalPixel<f32x8> px = focal_pixel<false>(simd::load(x + i), tv, -1.f, 0.f);
    bce += valid * px.loss;
    st += valid * px.sig * tv;
    s += valid * px.sig;
    ts += valid * tv;
  }
  acc[0] += simd::sum(bce);
  acc[1] += simd::sum(st);
  acc[2] += simd::sum(s);
  acc[3] += simd::sum(ts);
}

// g = d loss / d x per point: g_bce (s - t) + (g_st t + g_s) s (1 - s).
FMF_CPU_CLONES void chunk_grad(const float* x, const float* t, int64_t m, float g_bce, float g_st, float g_s,
                               float* g) {
  for (int64_t i = 0; i < m; i += kLanes) {
    const f32x8 tv = simd::load(t + i);
    const FocalPixel<f32x8> px = focal_pixel<true>(simd::load(x + i), tv, -1.f, 0.f);
    simd::store(g + i, g_bce * px.dloss + (g_st * tv + g_s) * px.dsig);
  }
}

// The inputs' checks and geometry; the row indices (int64 copies on the CPU, checked against the
// rows they index) are kept alive in pred_index / target_index.
struct Inputs {
  Geometry g;
  at::Tensor pred_index, target_index;
};

Inputs check_inputs(const at::Tensor& pred_masks, const at::Tensor& target_masks, const at::Tensor& coords,
                    const std::optional<at::Tensor>& pred_index, const std::optional<at::Tensor>& target_index) {
  FMF_CHECK_DIM(pred_masks, 3);
  FMF_CHECK_DIM(target_masks, 3);
  FMF_CHECK_DIM(coords, 3);
  FMF_CHECK_DEVICE(pred_masks, at::kCPU);
  FMF_CHECK_SAME_DEVICE(target_masks, pred_masks);
  FMF_CHECK_SAME_DEVICE(coords, pred_masks);
  check_float_dtype(pred_masks.scalar_type(), "pred_masks");
  mask_kind(target_masks.scalar_type(), "target_masks");
  check_float_dtype(coords.scalar_type(), "coords");
  const int64_t N = coords.size(0);
  TORCH_CHECK_VALUE(coords.size(2) == 2, "coords: expected [N, P, 2] (one set of points per mask), got shape ",
                    coords.sizes());
  Inputs in;
  in.pred_index = check_row_index(pred_index, "pred_index", N, pred_masks.size(0), "pred_masks");
  in.target_index = check_row_index(target_index, "target_index", N, target_masks.size(0), "target_masks");
  TORCH_CHECK_VALUE(N == 0 || (pred_masks.numel() > 0 && target_masks.numel() > 0),
                    "pred_masks/target_masks: expected non-empty mask sizes, got ", pred_masks.sizes(), " and ",
                    target_masks.sizes());
  in.g = {N,
          pred_masks.size(1),
          pred_masks.size(2),
          target_masks.size(1),
          target_masks.size(2),
          coords.size(1),
          pred_masks.stride(0),
          pred_masks.stride(1),
          pred_masks.stride(2),
          target_masks.stride(0),
          target_masks.stride(1),
          target_masks.stride(2),
          in.pred_index.defined() ? in.pred_index.const_data_ptr<int64_t>() : nullptr,
          in.target_index.defined() ? in.target_index.const_data_ptr<int64_t>() : nullptr};
  return in;
}

// Whether two masks read (so write the gradient of) the same row of the logits.
bool rows_repeat(const Geometry& g, int64_t rows) {
  if (!g.pred_row) return false;
  std::vector<char> seen(rows, 0);
  for (int64_t n = 0; n < g.N; ++n) {
    if (seen[g.pred_row[n]]++) return true;
  }
  return false;
}

// The masks in the order of the target rows they read (a stable counting sort; identity without
// target_index): masks that share a target (the criterion's decoder layers all read the step's
// targets) run one after the other on one thread, so its full-resolution target is read from memory
// once and then from cache. Each mask's sums stay in its own point order: the same bits in any order.
std::vector<int64_t> target_order(const Geometry& g, int64_t targets) {
  std::vector<int64_t> order(g.N);
  if (!g.target_row) {
    for (int64_t n = 0; n < g.N; ++n) order[n] = n;
    return order;
  }
  std::vector<int64_t> start(targets + 1, 0);
  for (int64_t n = 0; n < g.N; ++n) ++start[g.target_row[n] + 1];
  for (int64_t r = 0; r < targets; ++r) start[r + 1] += start[r];
  for (int64_t n = 0; n < g.N; ++n) order[start[g.target_row[n]]++] = n;
  return order;
}

// Calls on_chunk(n, m, chunk) for the chunks of every mask n in point order, after sampling their
// m points into chunk, with the logits' dtype and the targets' kind resolved at compile time;
// parallel over masks (in target_order), `grain` masks at least per thread. While a thread works on
// one mask it prefetches the next one's logit row, its target (unless the same) and its row of
// `grad` (the backward's [rows, h, w] output, written; nullptr in the forward).
template <class OnChunk>
void for_each_chunk(const Geometry& g, const at::Tensor& pred, const at::Tensor& target,
                    const float* points, int64_t grain, OnChunk on_chunk, float* grad = nullptr) {
  const MaskKind kind = mask_kind(target.scalar_type(), "target_masks");
  const std::vector<int64_t> order = target_order(g, target.size(0));
  [[maybe_unused]] const bool fast = fast_loads(g, pred, target);
  FMF_DISPATCH_FLOAT(pred.scalar_type(), "point_mask_loss_cpu", [&] {
    const scalar_t* logits = pred.const_data_ptr<scalar_t>();
    const void* targets = target.const_data_ptr();
    visit_mask_kind(kind, [&](auto k) {
      at::parallel_for(0, g.N, grain, [&](int64_t begin, int64_t end) {
        Chunk chunk;
        const int64_t chunks = (g.P + kChunk - 1) / kChunk;
        const int64_t t_bytes = kMaskBytes<decltype(k)::value>;
        for (int64_t i = begin; i < end; ++i) {
          const int64_t n = order[i], next = i + 1 < end ? order[i + 1] : -1;
          for (int64_t p0 = 0, c = 0; p0 < g.P; p0 += kChunk, ++c) {
            const int64_t m = std::min(kChunk, g.P - p0);
            if (next >= 0) {
              prefetch_part(reinterpret_cast<const char*>(logits + g.pred(next) * g.sp_n), g.h,
                            g.w * g.sp_w * sizeof(scalar_t), g.sp_h * sizeof(scalar_t), c, chunks);
              if (g.target(next) != g.target(n)) {
                prefetch_part(static_cast<const char*>(targets) + g.target(next) * g.st_n * t_bytes, g.H,
                              g.W * g.st_w * t_bytes, g.st_h * t_bytes, c, chunks);
              }
              if (grad) {
                prefetch_part(reinterpret_cast<const char*>(grad + g.pred(next) * g.h * g.w), g.h,
                              g.w * sizeof(float), g.w * sizeof(float), c, chunks, true);
              }
            }
#ifdef FMF_AVX2_GATHER
            if constexpr (std::is_same_v<scalar_t, float> && decltype(k)::value == MaskKind::kByte) {
              if (fast) {
                load_chunk_gathered(g, reinterpret_cast<const float*>(logits), static_cast<const uint8_t*>(targets),
                                    points, n, p0, m, chunk);
                on_chunk(n, m, chunk);
                continue;
              }
            }
#endif
            load_chunk<scalar_t, decltype(k)::value>(g, logits, targets, points, n, p0, m, chunk);
            on_chunk(n, m, chunk);
          }
        }
      });
    });
  });
}

at::Tensor point_mask_loss_forward_cpu(const at::Tensor& pred_masks, const at::Tensor& target_masks,
                                       const at::Tensor& coords, const std::optional<at::Tensor>& pred_index,
                                       const std::optional<at::Tensor>& target_index) {
  const Inputs in = check_inputs(pred_masks, target_masks, coords, pred_index, target_index);
  const Geometry& g = in.g;
  if (g.N == 0 || g.P == 0) return at::zeros({g.N, kStats}, pred_masks.options().dtype(at::kFloat));
  const at::Tensor xy = coords.to(at::kFloat).contiguous();  // as the reference's coords.float()
  at::Tensor sums = at::zeros({g.N, kStats}, pred_masks.options().dtype(at::kDouble));
  double* acc = sums.data_ptr<double>();
  for_each_chunk(g, pred_masks, target_masks, xy.const_data_ptr<float>(), 1,
                 [&](int64_t n, int64_t m, const Chunk& chunk) { chunk_stats(chunk.x, chunk.t, m, acc + n * kStats); });
  return sums.to(at::kFloat);
}

// Adds d loss / d pred_masks into out (float32 [rows, h, w], rows = pred_masks.size(0), contiguous).
void add_gradient(const Inputs& in, const at::Tensor& grad_stats, const at::Tensor& pred_masks,
                  const at::Tensor& target_masks, const at::Tensor& coords, float* out) {
  const Geometry& g = in.g;
  FMF_CHECK_DIM(grad_stats, 2);
  FMF_CHECK_SAME_DEVICE(grad_stats, pred_masks);
  TORCH_CHECK_VALUE(grad_stats.size(0) == g.N && grad_stats.size(1) == kStats, "grad_stats: expected shape [", g.N,
                    ", ", kStats, "], got ", grad_stats.sizes());
  if (g.N == 0 || g.P == 0) return;
  const at::Tensor xy = coords.to(at::kFloat).contiguous();
  const at::Tensor gs = grad_stats.to(at::kFloat).contiguous();
  const float* g_stats = gs.const_data_ptr<float>();
  const int64_t grain = rows_repeat(g, pred_masks.size(0)) ? g.N : 1;  // a repeated row: one thread, masks in order
  for_each_chunk(g, pred_masks, target_masks, xy.const_data_ptr<float>(), grain,
                 [&](int64_t n, int64_t m, Chunk& chunk) {
                   const float* gn = g_stats + n * kStats;  // the sum of t does not depend on x: gn[3] is unused
                   chunk_grad(chunk.x, chunk.t, m, gn[0], gn[1], gn[2], chunk.g);
                   const Taps& taps = chunk.low;
                   float* dst = out + g.pred(n) * g.h * g.w;
                   for (int64_t i = 0; i < m; ++i) {  // a zero-weight tap adds 0 at its clamped address
                     float* top = dst + taps.ya[i] * g.w;
                     float* bottom = dst + taps.yb[i] * g.w;
                     top[taps.xa[i]] += taps.w[0][i] * chunk.g[i];
                     top[taps.xb[i]] += taps.w[1][i] * chunk.g[i];
                     bottom[taps.xa[i]] += taps.w[2][i] * chunk.g[i];
                     bottom[taps.xb[i]] += taps.w[3][i] * chunk.g[i];
                   }
                 },
                 out);
}

at::Tensor point_mask_loss_backward_cpu(const at::Tensor& grad_stats, const at::Tensor& pred_masks,
                                        const at::Tensor& target_masks, const at::Tensor& coords,
                                        const std::optional<at::Tensor>& pred_index,
                                        const std::optional<at::Tensor>& target_index) {
  const Inputs in = check_inputs(pred_masks, target_masks, coords, pred_index, target_index);
  // fp32 gradient (the taps of many points add into one logit), in pred's dtype at the end; every
  // row of pred_masks gets one, zero where no mask reads it.
  at::Tensor grad = at::zeros({pred_masks.size(0), in.g.h, in.g.w}, pred_masks.options().dtype(at::kFloat));
  add_gradient(in, grad_stats, pred_masks, target_masks, coords, grad.data_ptr<float>());
  return grad.to(pred_masks.scalar_type());
}

void point_mask_loss_backward_into_cpu(const at::Tensor& grad_stats, const at::Tensor& pred_masks,
                                       const at::Tensor& target_masks, const at::Tensor& coords,
                                       const std::optional<at::Tensor>& pred_index,
                                       const std::optional<at::Tensor>& target_index, const at::Tensor& grad) {
  const Inputs in = check_inputs(pred_masks, target_masks, coords, pred_index, target_index);
  FMF_CHECK_SAME_DEVICE(grad, pred_masks);
  TORCH_CHECK_TYPE(grad.scalar_type() == at::kFloat, "grad: expected dtype float32, got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.sizes() == pred_masks.sizes() && grad.is_contiguous(),
                    "grad: expected a contiguous tensor of pred_masks' shape ", pred_masks.sizes(), ", got shape ",
                    grad.sizes(), grad.is_contiguous() ? "" : " (not contiguous)");
  add_gradient(in, grad_stats, pred_masks, target_masks, coords, grad.data_ptr<float>());
}

}  // namespace
}  // namespace fmf

TORCH_LIBRARY_IMPL(fastmaskformer, CPU, m) {
  m.impl("point_mask_loss_forward", &fmf::point_mask_loss_forward_cpu);
  m.impl("point_mask_loss_backward", &fmf::point_mask_loss_backward_cpu);
  m.impl("point_mask_loss_backward_into", &fmf::point_mask_loss_backward_into_cpu);
}
