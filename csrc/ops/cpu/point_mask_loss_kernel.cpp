// Native point-sampled mask loss on the CPU, forward and backward, one mask per task.
//
// A mask's points are taken in chunks of kChunk: each point's 2 x 2 taps on the logits and on the
// targets follow grid_sample's rule (the reference's fp32 arithmetic on 2 coords - 1, as
// fmf/ms_deform_attn.h's corners_at, here 8 points at a time with off-map corners folded into zero
// weights), the logits are read in their dtype and the targets in theirs (bool as bytes), each at
// its own resolution and through its strides (no copy of the full-resolution targets, whose rows
// are prefetched a chunk ahead of their reads); then an 8-lane vector loop adds the chunk's BCE,
// s t, s and t (forward) or computes each point's d loss / d x (backward), which is scattered into
// the point's 4 logit taps.
// Never stored: any [N, P] tensor; a thread holds one chunk of points (x, t, gradient, taps).
//
// Parallel over masks. A task owns its mask's statistics row (fp64 sums of the chunks' fp32 vector
// sums) and its [h, w] gradient slice, so no two threads write one value, and every sum is taken in
// point order: deterministic whatever the number of threads.
#include "fmf/simd.h"  // first: its diagnostic setting must precede the math templates

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "fmf/checks.h"
#include "fmf/dtypes.h"

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

// The 2 x 2 taps of a chunk's points on one map, as grid_sample reads them: clamped rows (ya, yb)
// and columns (xa, xb) of the corners, and their weights w[k] (corner k = 2 dy + dx), zero for a
// corner off the map, so reads and adds need no branch (a zero-weight tap reads or adds 0 at a
// clamped, valid address).
struct Taps {
  int32_t xa[kChunk], xb[kChunk], ya[kChunk], yb[kChunk];
  float w[4][kChunk];
};

// One chunk of a mask's points: sampled logits x and targets t (zero past the chunk's end, so the
// vector loops read whole vectors), their taps (the logits' reused by the backward's scatter), the
// gradient.
struct Chunk {
  float x[kChunk], t[kChunk], g[kChunk];
  Taps low, high;
};

// floor(v) for |v| < 2^31 (vector truncation, then one down where it rounded up).
inline f32x8 floor8(const f32x8& v) {
  const f32x8 f = __builtin_convertvector(__builtin_convertvector(v, simd::i32x8), f32x8);
  return f > v ? f - 1.f : f;
}

inline simd::i32x8 clamp8(const simd::i32x8& i, int32_t hi) { return i < 0 ? 0 : (i > hi ? hi : i); }

// Taps of points [0, m) of xy ((x, y) pairs) on an H x W map: fmf/ms_deform_attn.h's corners_at
// (the reference's fp32 arithmetic on 2 coords - 1, the same cut-off far outside) 8 points at a time.
// No FMA contraction here: a fused (g + 1) * W/2 - 1/2 can round a point on a pixel centre to the
// other side of it.
FMF_CPU_CLONES __attribute__((optimize("fp-contract=off"))) void point_taps(const float* xy, int64_t m, int64_t H, int64_t W, Taps& taps) {
  const float Wf = static_cast<float>(W), Hf = static_cast<float>(H), half_w = Wf * 0.5f, half_h = Hf * 0.5f;
  for (int64_t i = 0; i < m; i += kLanes) {
    f32x8 lx, ly;
    for (int j = 0; j < kLanes; ++j) {
      const bool in = i + j < m;
      lx[j] = in ? xy[2 * (i + j)] : -1.f;
      ly[j] = in ? xy[2 * (i + j) + 1] : -1.f;
    }
    f32x8 x = ((2.f * lx - 1.f) + 1.f) * half_w - 0.5f, y = ((2.f * ly - 1.f) + 1.f) * half_h - 0.5f;
    const auto inside = (x > -2.f) & (y > -2.f) & (x < Wf + 1.f) & (y < Hf + 1.f);
    x = inside ? x : -2.f, y = inside ? y : -2.f;
    const f32x8 x0 = floor8(x), y0 = floor8(y), fx = x - x0, fy = y - y0;
    const simd::i32x8 cx = __builtin_convertvector(x0, simd::i32x8), cy = __builtin_convertvector(y0, simd::i32x8);
    const int32_t w1 = static_cast<int32_t>(W) - 1, h1 = static_cast<int32_t>(H) - 1;
    const auto vx0 = (cx >= 0) & (cx <= w1), vx1 = (cx >= -1) & (cx < w1);
    const auto vy0 = (cy >= 0) & (cy <= h1), vy1 = (cy >= -1) & (cy < h1);
    const f32x8 zero{};
    simd::store(taps.w[0] + i, (vx0 & vy0) ? (1.f - fx) * (1.f - fy) : zero);
    simd::store(taps.w[1] + i, (vx1 & vy0) ? fx * (1.f - fy) : zero);
    simd::store(taps.w[2] + i, (vx0 & vy1) ? (1.f - fx) * fy : zero);
    simd::store(taps.w[3] + i, (vx1 & vy1) ? fx * fy : zero);
    const simd::i32x8 xa = clamp8(cx, w1), xb = clamp8(cx + 1, w1), ya = clamp8(cy, h1), yb = clamp8(cy + 1, h1);
    std::memcpy(taps.xa + i, &xa, sizeof xa), std::memcpy(taps.xb + i, &xb, sizeof xb);
    std::memcpy(taps.ya + i, &ya, sizeof ya), std::memcpy(taps.yb + i, &yb, sizeof yb);
  }
}

// The bilinear values of points [0, m) at their taps on a map whose element (y, x) reads as
// read(y, x); zero past m.
template <class Read>
inline void gather(const Taps& taps, int64_t m, Read read, float* out) {
  for (int64_t i = 0; i < m; ++i) {
    const int64_t xa = taps.xa[i], xb = taps.xb[i], ya = taps.ya[i], yb = taps.yb[i];
    out[i] = taps.w[0][i] * read(ya, xa) + taps.w[1][i] * read(ya, xb) + taps.w[2][i] * read(yb, xa) +
             taps.w[3][i] * read(yb, xb);
  }
  std::fill(out + m, out + kChunk, 0.f);
}

// Samples points [p0, p0 + m) of mask n into chunk. The targets' rows are prefetched before the
// logits are read: at full resolution they are the reads that miss the cache.
template <typename scalar_t, MaskKind kKind>
void load_chunk(const Geometry& g, const scalar_t* pred, const void* targets, const float* coords, int64_t n,
                int64_t p0, int64_t m, Chunk& chunk) {
  const float* xy = coords + (n * g.P + p0) * 2;
  point_taps(xy, m, g.h, g.w, chunk.low);
  point_taps(xy, m, g.H, g.W, chunk.high);
  const int64_t tgt0 = n * g.st_n;
  const char* bytes = static_cast<const char*>(targets);
  const int64_t size = kKind == MaskKind::kByte ? 1 : kKind == MaskKind::kFloat ? 4 : 2;
  for (int64_t i = 0; i < m; ++i) {
    __builtin_prefetch(bytes + (tgt0 + chunk.high.ya[i] * g.st_h + chunk.high.xa[i] * g.st_w) * size);
    __builtin_prefetch(bytes + (tgt0 + chunk.high.yb[i] * g.st_h + chunk.high.xa[i] * g.st_w) * size);
  }
  const scalar_t* logits = pred + n * g.sp_n;
  gather(chunk.low, m, [&](int64_t y, int64_t x) { return static_cast<float>(logits[y * g.sp_h + x * g.sp_w]); },
         chunk.x);
  gather(chunk.high, m, [&](int64_t y, int64_t x) { return mask_value(targets, tgt0 + y * g.st_h + x * g.st_w, kKind); },
         chunk.t);
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

// Calls on_chunk(n, m, chunk) for the chunks of every mask n in point order, after sampling their
// m points into chunk, with the logits' dtype and the targets' kind resolved at compile time;
// parallel over masks.
template <class OnChunk>
void for_each_chunk(const Geometry& g, const at::Tensor& pred, const at::Tensor& target,
                    const float* points, OnChunk on_chunk) {
  const MaskKind kind = mask_kind(target.scalar_type(), "target_masks");
  FMF_DISPATCH_FLOAT(pred.scalar_type(), "point_mask_loss_cpu", [&] {
    const scalar_t* logits = pred.const_data_ptr<scalar_t>();
    const void* targets = target.const_data_ptr();
    visit_mask_kind(kind, [&](auto k) {
      at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
        Chunk chunk;
        for (int64_t n = begin; n < end; ++n) {
          for (int64_t p0 = 0; p0 < g.P; p0 += kChunk) {
            const int64_t m = std::min(kChunk, g.P - p0);
            load_chunk<scalar_t, decltype(k)::value>(g, logits, targets, points, n, p0, m, chunk);
            on_chunk(n, m, chunk);
          }
        }
      });
    });
  });
}

at::Tensor point_mask_loss_forward_cpu(const at::Tensor& pred_masks, const at::Tensor& target_masks,
                                       const at::Tensor& coords) {
  const Geometry g = check_inputs(pred_masks, target_masks, coords);
  if (g.N == 0 || g.P == 0) return at::zeros({g.N, kStats}, pred_masks.options().dtype(at::kFloat));
  const at::Tensor xy = coords.to(at::kFloat).contiguous();  // as the reference's coords.float()
  at::Tensor sums = at::zeros({g.N, kStats}, pred_masks.options().dtype(at::kDouble));
  double* acc = sums.data_ptr<double>();
  for_each_chunk(g, pred_masks, target_masks, xy.const_data_ptr<float>(),
                 [&](int64_t n, int64_t m, const Chunk& chunk) { chunk_stats(chunk.x, chunk.t, m, acc + n * kStats); });
  return sums.to(at::kFloat);
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
  const float* g_stats = gs.const_data_ptr<float>();
  float* out = grad.data_ptr<float>();
  for_each_chunk(g, pred_masks, target_masks, xy.const_data_ptr<float>(),
                 [&](int64_t n, int64_t m, Chunk& chunk) {
                   const float* gn = g_stats + n * kStats;  // the sum of t does not depend on x: gn[3] is unused
                   chunk_grad(chunk.x, chunk.t, m, gn[0], gn[1], gn[2], chunk.g);
                   const Taps& taps = chunk.low;
                   float* dst = out + n * g.h * g.w;
                   for (int64_t i = 0; i < m; ++i) {  // a zero-weight tap adds 0 at its clamped address
                     float* top = dst + taps.ya[i] * g.w;
                     float* bottom = dst + taps.yb[i] * g.w;
                     top[taps.xa[i]] += taps.w[0][i] * chunk.g[i];
                     top[taps.xb[i]] += taps.w[1][i] * chunk.g[i];
                     bottom[taps.xa[i]] += taps.w[2][i] * chunk.g[i];
                     bottom[taps.xb[i]] += taps.w[3][i] * chunk.g[i];
                   }
                 });
  return grad.to(pred_masks.scalar_type());
}

}  // namespace
}  // namespace fmf

TORCH_LIBRARY_IMPL(fastmaskformer, CPU, m) {
  m.impl("point_mask_loss_forward", &fmf::point_mask_loss_forward_cpu);
  m.impl("point_mask_loss_backward", &fmf::point_mask_loss_backward_cpu);
}
