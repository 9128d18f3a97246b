// Native point-sampled mask loss on the CPU, forward and backward, one mask per task.
//
// A mask's points are taken in chunks of kChunk: each point's 2 x 2 taps on the logits and on the
// targets follow grid_sample's rule (fmf/ms_deform_attn.h: the reference's fp32 arithmetic on
// 2 coords - 1), the logits are read in their dtype and the targets in theirs (bool as bytes), each
// at its own resolution and through its strides (no copy of the full-resolution targets); then an
// 8-lane vector loop adds the chunk's BCE, s t, s and t (forward) or computes each point's
// d loss / d x (backward), which is scattered into the point's 4 logit taps.
// Never stored: any [N, P] tensor; a thread holds one chunk of points (x, t, gradient, taps).
//
// Parallel over masks. A task owns its mask's statistics row and its [h, w] gradient slice, so no two
// threads write one value, and every sum is taken in point order: deterministic whatever the number
// of threads.
#include "fmf/simd.h"  // first: its diagnostic setting must precede the math templates

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "fmf/checks.h"
#include "fmf/dtypes.h"
#include "fmf/ms_deform_attn.h"

namespace fmf {
namespace {

using simd::f32x8;
using simd::kLanes;

constexpr int kStats = 4;        // per mask: sums over the points of BCE, s t, s and t
constexpr int64_t kChunk = 64;  // points per vector pass, a multiple of kLanes

// Sizes and element strides of the three inputs (the targets' strides in elements of their dtype).
struct Geometry {
  int64_t N, h, w, H, W, P;
  int64_t sp_n, sp_h, sp_w, st_n, st_h, st_w;
};

// One chunk of a mask's points: sampled logits x and targets t (zero past the chunk's end, so the
// vector loops read whole vectors), the logits' taps (reused by the backward's scatter), the gradient.
struct Chunk {
  float x[kChunk], t[kChunk], g[kChunk];
  Corners taps[kChunk];
};

// The bilinear value at corners c of a map whose corner (x, y) reads as read(x, y); invalid corners
// read as zero, as grid_sample's zero padding.
template <class Read>
inline float blend(const Corners& c, Read read) {
  float v = 0.f;
  for (int k = 0; k < 4; ++k) {
    if (c.valid[k]) v += c.weight(k) * read(c.x0 + (k & 1), c.y0 + (k >> 1));
  }
  return v;
}

// Samples points [p0, p0 + m) of mask n into chunk.
template <typename scalar_t, MaskKind kKind>
void load_chunk(const Geometry& g, const scalar_t* pred, const void* targets, const float* coords, int64_t n,
                int64_t p0, int64_t m, Chunk& chunk) {
  const scalar_t* logits = pred + n * g.sp_n;
  const int64_t tgt0 = n * g.st_n;
  for (int64_t i = 0; i < m; ++i) {
    const float* xy = coords + (n * g.P + p0 + i) * 2;
    chunk.taps[i] = corners_at(xy[0], xy[1], g.h, g.w);
    chunk.x[i] = blend(chunk.taps[i], [&](int64_t x, int64_t y) {
      return static_cast<float>(logits[y * g.sp_h + x * g.sp_w]);
    });
    chunk.t[i] = blend(corners_at(xy[0], xy[1], g.H, g.W), [&](int64_t x, int64_t y) {
      return mask_value(targets, tgt0 + y * g.st_h + x * g.st_w, kKind);
    });
  }
  std::fill(chunk.x + m, chunk.x + kChunk, 0.f);
  std::fill(chunk.t + m, chunk.t + kChunk, 0.f);
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

Geometry check_inputs(const at::Tensor& pred_masks, const at::Tensor& target_masks, const at::Tensor& coords) {
  FMF_CHECK_DIM(pred_masks, 3);
  FMF_CHECK_DIM(target_masks, 3);
  FMF_CHECK_DIM(coords, 3);
  FMF_CHECK_DEVICE(pred_masks, at::kCPU);
  FMF_CHECK_SAME_DEVICE(target_masks, pred_masks);
  FMF_CHECK_SAME_DEVICE(coords, pred_masks);
  check_float_dtype(pred_masks.scalar_type(), "pred_masks");
  mask_kind(target_masks.scalar_type(), "target_masks");
  check_float_dtype(coords.scalar_type(), "coords");
  const int64_t N = pred_masks.size(0);
  TORCH_CHECK_VALUE(target_masks.size(0) == N, "target_masks: expected ", N, " masks (one per prediction), got shape ",
                    target_masks.sizes());
  TORCH_CHECK_VALUE(coords.size(0) == N && coords.size(2) == 2, "coords: expected [", N,
                    ", P, 2] (one set of points per mask), got shape ", coords.sizes());
  TORCH_CHECK_VALUE(N == 0 || (pred_masks.numel() > 0 && target_masks.numel() > 0),
                    "pred_masks/target_masks: expected non-empty mask sizes, got ", pred_masks.sizes(), " and ",
                    target_masks.sizes());
  return {N,
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
          target_masks.stride(2)};
}

at::Tensor point_mask_loss_forward_cpu(const at::Tensor& pred_masks, const at::Tensor& target_masks,
                                       const at::Tensor& coords) {
  const Geometry g = check_inputs(pred_masks, target_masks, coords);
  at::Tensor stats = at::zeros({g.N, kStats}, pred_masks.options().dtype(at::kFloat));
  if (g.N == 0 || g.P == 0) return stats;
  const at::Tensor xy = coords.to(at::kFloat).contiguous();  // as the reference's coords.float()
  const float* points = xy.const_data_ptr<float>();
  float* out = stats.data_ptr<float>();
  const MaskKind kind = mask_kind(target_masks.scalar_type(), "target_masks");
  FMF_DISPATCH_FLOAT(pred_masks.scalar_type(), "point_mask_loss_forward_cpu", [&] {
    const scalar_t* logits = pred_masks.const_data_ptr<scalar_t>();
    const void* targets = target_masks.const_data_ptr();
    visit_mask_kind(kind, [&](auto k) {
      at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
        Chunk chunk;
        for (int64_t n = begin; n < end; ++n) {
          double acc[kStats] = {0.0, 0.0, 0.0, 0.0};
          for (int64_t p0 = 0; p0 < g.P; p0 += kChunk) {
            const int64_t m = std::min(kChunk, g.P - p0);
            load_chunk<scalar_t, decltype(k)::value>(g, logits, targets, points, n, p0, m, chunk);
            chunk_stats(chunk.x, chunk.t, m, acc);
          }
          for (int s = 0; s < kStats; ++s) out[n * kStats + s] = static_cast<float>(acc[s]);
        }
      });
    });
  });
  return stats;
}

at::Tensor point_mask_loss_backward_cpu(const at::Tensor& grad_stats, const at::Tensor& pred_masks,
                                        const at::Tensor& target_masks, const at::Tensor& coords) {
  const Geometry g = check_inputs(pred_masks, target_masks, coords);
  FMF_CHECK_DIM(grad_stats, 2);
  FMF_CHECK_SAME_DEVICE(grad_stats, pred_masks);
  TORCH_CHECK_VALUE(grad_stats.size(0) == g.N && grad_stats.size(1) == kStats, "grad_stats: expected shape [", g.N,
                    ", ", kStats, "], got ", grad_stats.sizes());
  // fp32 gradient (the taps of many points add into one logit), in pred's dtype at the end.
  at::Tensor grad = at::zeros({g.N, g.h, g.w}, pred_masks.options().dtype(at::kFloat));
  if (g.N == 0 || g.P == 0) return grad.to(pred_masks.scalar_type());
  const at::Tensor xy = coords.to(at::kFloat).contiguous();
  const at::Tensor gs = grad_stats.to(at::kFloat).contiguous();
  const float* points = xy.const_data_ptr<float>();
  const float* g_stats = gs.const_data_ptr<float>();
  float* out = grad.data_ptr<float>();
  const MaskKind kind = mask_kind(target_masks.scalar_type(), "target_masks");
  FMF_DISPATCH_FLOAT(pred_masks.scalar_type(), "point_mask_loss_backward_cpu", [&] {
    const scalar_t* logits = pred_masks.const_data_ptr<scalar_t>();
    const void* targets = target_masks.const_data_ptr();
    visit_mask_kind(kind, [&](auto k) {
      at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
        Chunk chunk;
        for (int64_t n = begin; n < end; ++n) {
          const float* gn = g_stats + n * kStats;  // the sum of t does not depend on x: gn[3] is unused
          float* dst = out + n * g.h * g.w;
          for (int64_t p0 = 0; p0 < g.P; p0 += kChunk) {
            const int64_t m = std::min(kChunk, g.P - p0);
            load_chunk<scalar_t, decltype(k)::value>(g, logits, targets, points, n, p0, m, chunk);
            chunk_grad(chunk.x, chunk.t, m, gn[0], gn[1], gn[2], chunk.g);
            for (int64_t i = 0; i < m; ++i) {
              const Corners& c = chunk.taps[i];
              for (int j = 0; j < 4; ++j) {
                if (c.valid[j]) dst[c.row(j, g.w)] += c.weight(j) * chunk.g[i];
              }
            }
          }
        }
      });
    });
  });
  return grad.to(pred_masks.scalar_type());
}

}  // namespace
}  // namespace fmf

TORCH_LIBRARY_IMPL(fastmaskformer, CPU, m) {
  m.impl("point_mask_loss_forward", &fmf::point_mask_loss_forward_cpu);
  m.impl("point_mask_loss_backward", &fmf::point_mask_loss_backward_cpu);
}
