// Native mask loss on the CPU, forward and backward, one output row at a time.
//
// For mask n and target row Y: the logits are upsampled on the fly (bilinear, align_corners=False,
// fmf::linear_src: first along y into a low-resolution row, then along x), the targets are read
// from their own dtype, and a vector loop adds the row's focal loss and dice sums (forward) or
// writes d loss / d x for the row and scatters it back through the same bilinear taps (backward).
// What is never stored: any N x H x W tensor; a thread holds a few rows of W floats, and the
// gradient goes straight into an fp32 [N, h, w] buffer.
//
// Parallel over (mask, block of low-resolution rows). A task owns its rows of the gradient: the
// backward visits every target row whose taps touch them and adds only to its own rows, so no
// two threads write one value; the forward visits the target rows whose first tap is its own, so
// each row is counted once, and the partial sums are added in a fixed order (deterministic).
#include "fmf/simd.h"  // first: its diagnostic setting must precede the math templates

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fmf/checks.h"
#include "fmf/dtypes.h"
#include "fmf/index_rules.h"

namespace fmf {
namespace {

using simd::f32x8;
using simd::kLanes;
using simd::round_up;

constexpr int kStats = 4;  // per mask: sums over the pixels of focal, s t, s and t

// Adds one row's focal loss sum, sum s t, sum s and sum t to acc (x and t padded to whole vectors).
FMF_CPU_CLONES void row_stats(const float* x, const float* t, int64_t n, float alpha, float gamma, double* acc) {
  f32x8 focal{}, st{}, s{}, ts{};
  for (int64_t i = 0; i < n; i += kLanes) {
    const f32x8 valid = simd::below(i, n), tv = simd::load(t + i);
    const FocalPixel<f32x8> px = focal_pixel<false>(simd::load(x + i), tv, alpha, gamma);
    focal += valid * px.loss;
    st += valid * px.sig * tv;
    s += valid * px.sig;
    ts += valid * tv;
  }
  acc[0] += simd::sum(focal);
  acc[1] += simd::sum(st);
  acc[2] += simd::sum(s);
  acc[3] += simd::sum(ts);
}

// g = d loss / d x for one row: g_focal dFL/dx + (g_st t + g_s) ds/dx.
FMF_CPU_CLONES void row_grad(const float* x, const float* t, int64_t n, float alpha, float gamma, float g_focal,
                             float g_st, float g_s, float* g) {
  for (int64_t i = 0; i < n; i += kLanes) {
    const f32x8 tv = simd::load(t + i);
    const FocalPixel<f32x8> px = focal_pixel<true>(simd::load(x + i), tv, alpha, gamma);
    simd::store(g + i, g_focal * px.dloss + (g_st * tv + g_s) * px.dsig);
  }
}

template <MaskKind kKind>
void load_targets(const void* masks, int64_t offset, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = mask_value(masks, offset + i, kKind);
}

using LoadTargetsFn = void (*)(const void*, int64_t, int64_t, float*);

LoadTargetsFn load_targets_for(MaskKind kind) {
  return visit_mask_kind(kind, [](auto k) -> LoadTargetsFn { return load_targets<decltype(k)::value>; });
}

// The bilinear taps of every target row and column, and the split of low-resolution rows into blocks.
struct Plan {
  int64_t N, h, w, H, W, block_rows, blocks;
  std::vector<LinearTap> rows;  // [H]
  std::vector<int64_t> x0, x1;  // [W]
  std::vector<float> wx0, wx1;  // [W]
  const void* targets;
  LoadTargetsFn load_targets;
};

Plan make_plan(const at::Tensor& pred, const at::Tensor& target) {
  Plan p;
  p.N = pred.size(0), p.h = pred.size(1), p.w = pred.size(2), p.H = target.size(1), p.W = target.size(2);
  for (int64_t y = 0; y < p.H; ++y) p.rows.push_back(linear_src(y, p.h, p.H));
  for (int64_t x = 0; x < p.W; ++x) {
    const LinearTap tap = linear_src(x, p.w, p.W);
    p.x0.push_back(tap.i0), p.x1.push_back(tap.i1), p.wx0.push_back(tap.w0), p.wx1.push_back(tap.w1);
  }
  // Enough blocks to keep every thread busy when there are few masks, whole masks otherwise.
  const int64_t want = (4 * at::get_num_threads() + p.N - 1) / std::max<int64_t>(p.N, 1);
  p.block_rows = (p.h + std::min(want, p.h) - 1) / std::min(want, p.h);
  p.blocks = (p.h + p.block_rows - 1) / p.block_rows;
  p.targets = target.data_ptr();
  p.load_targets = load_targets_for(mask_kind(target.scalar_type(), "target_masks"));
  return p;
}

// Row buffers of one thread: the upsampled logits and the targets of a target row (padded to whole
// vectors), its gradient, and a low-resolution row.
struct Rows {
  std::vector<float> x, t, g, low;
  explicit Rows(const Plan& p)
      : x(round_up(p.W, kLanes), 0.f), t(round_up(p.W, kLanes), 0.f), g(round_up(p.W, kLanes), 0.f), low(p.w, 0.f) {}
};

// Upsampled logits and targets of target row Y of mask n into rows.x, rows.t.
template <typename scalar_t>
void load_row(const Plan& p, const scalar_t* pred, int64_t n, int64_t Y, Rows& rows) {
  const LinearTap& ty = p.rows[Y];
  const scalar_t* a = pred + (n * p.h + ty.i0) * p.w;
  const scalar_t* b = pred + (n * p.h + ty.i1) * p.w;
  for (int64_t i = 0; i < p.w; ++i) rows.low[i] = ty.w0 * static_cast<float>(a[i]) + ty.w1 * static_cast<float>(b[i]);
  for (int64_t X = 0; X < p.W; ++X) rows.x[X] = p.wx0[X] * rows.low[p.x0[X]] + p.wx1[X] * rows.low[p.x1[X]];
  p.load_targets(p.targets, (n * p.H + Y) * p.W, p.W, rows.t.data());
}

void check_inputs(const at::Tensor& pred, const at::Tensor& target) {
  FMF_CHECK_DIM(pred, 3);
  FMF_CHECK_DIM(target, 3);
  FMF_CHECK_DEVICE(pred, at::kCPU);
  FMF_CHECK_SAME_DEVICE(target, pred);
  check_float_dtype(pred.scalar_type(), "pred_masks");
  mask_kind(target.scalar_type(), "target_masks");
  TORCH_CHECK_VALUE(target.size(0) == pred.size(0), "target_masks: expected ", pred.size(0),
                    " masks (one per prediction), got shape ", target.sizes());
  TORCH_CHECK_VALUE(pred.size(0) == 0 || (pred.numel() > 0 && target.numel() > 0),
                    "pred_masks/target_masks: expected non-empty mask sizes, got ", pred.sizes(), " and ",
                    target.sizes());
}

at::Tensor mask_loss_forward_cpu(const at::Tensor& pred_masks, const at::Tensor& target_masks, double alpha,
                                 double gamma) {
  check_inputs(pred_masks, target_masks);
  const int64_t N = pred_masks.size(0);
  at::Tensor stats = at::zeros({N, kStats}, pred_masks.options().dtype(at::kFloat));
  if (N == 0) return stats;
  const at::Tensor pred = pred_masks.contiguous(), target = target_masks.contiguous();
  const Plan p = make_plan(pred, target);
  std::vector<double> partial(N * p.blocks * kStats, 0.0);
  FMF_DISPATCH_FLOAT(pred.scalar_type(), "mask_loss_forward_cpu", [&] {
    const scalar_t* x = pred.data_ptr<scalar_t>();
    at::parallel_for(0, N * p.blocks, 1, [&](int64_t begin, int64_t end) {
      Rows rows(p);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / p.blocks, r0 = task % p.blocks * p.block_rows, r1 = r0 + p.block_rows;
        for (int64_t Y = 0; Y < p.H; ++Y) {
          if (p.rows[Y].i0 < r0 || p.rows[Y].i0 >= r1) continue;
          load_row(p, x, n, Y, rows);
          row_stats(rows.x.data(), rows.t.data(), p.W, static_cast<float>(alpha), static_cast<float>(gamma),
                    partial.data() + task * kStats);
        }
      }
    });
  });
  float* out = stats.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    double acc[kStats] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t k = 0; k < p.blocks; ++k) {
      for (int s = 0; s < kStats; ++s) acc[s] += partial[(n * p.blocks + k) * kStats + s];
    }
    for (int s = 0; s < kStats; ++s) out[n * kStats + s] = static_cast<float>(acc[s]);
  }
  return stats;
}

at::Tensor mask_loss_backward_cpu(const at::Tensor& grad_stats, const at::Tensor& pred_masks,
                                  const at::Tensor& target_masks, double alpha, double gamma) {
  check_inputs(pred_masks, target_masks);
  FMF_CHECK_DIM(grad_stats, 2);
  FMF_CHECK_SAME_DEVICE(grad_stats, pred_masks);
  const int64_t N = pred_masks.size(0);
  TORCH_CHECK_VALUE(grad_stats.size(0) == N && grad_stats.size(1) == kStats, "grad_stats: expected shape [", N, ", ",
                    kStats, "], got ", grad_stats.sizes());
  at::Tensor grad = at::zeros(pred_masks.sizes(), pred_masks.options().dtype(at::kFloat));
  if (N == 0) return grad.to(pred_masks.scalar_type());
  const at::Tensor pred = pred_masks.contiguous(), target = target_masks.contiguous();
  const at::Tensor g_stats = grad_stats.to(at::kFloat).contiguous();
  const Plan p = make_plan(pred, target);
  const float* gs = g_stats.data_ptr<float>();
  float* out = grad.data_ptr<float>();
  FMF_DISPATCH_FLOAT(pred.scalar_type(), "mask_loss_backward_cpu", [&] {
    const scalar_t* x = pred.data_ptr<scalar_t>();
    at::parallel_for(0, N * p.blocks, 1, [&](int64_t begin, int64_t end) {
      Rows rows(p);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / p.blocks, r0 = task % p.blocks * p.block_rows, r1 = r0 + p.block_rows;
        const float* g = gs + n * kStats;  // the sum of t does not depend on x: g[3] is unused
        for (int64_t Y = 0; Y < p.H; ++Y) {
          const LinearTap& ty = p.rows[Y];
          const bool own0 = ty.i0 >= r0 && ty.i0 < r1, own1 = ty.i1 >= r0 && ty.i1 < r1;
          if (!own0 && !own1) continue;
          load_row(p, x, n, Y, rows);
          row_grad(rows.x.data(), rows.t.data(), p.W, static_cast<float>(alpha), static_cast<float>(gamma),
                   g[0], g[1], g[2], rows.g.data());
          std::fill(rows.low.begin(), rows.low.end(), 0.f);
          for (int64_t X = 0; X < p.W; ++X) {
            rows.low[p.x0[X]] += p.wx0[X] * rows.g[X];
            rows.low[p.x1[X]] += p.wx1[X] * rows.g[X];
          }
          const auto add_to_row = [&](int64_t row, float weight) {
            float* dst = out + (n * p.h + row) * p.w;
            for (int64_t i = 0; i < p.w; ++i) dst[i] += weight * rows.low[i];
          };
          if (own0) add_to_row(ty.i0, ty.w0);
          if (own1) add_to_row(ty.i1, ty.w1);
        }
      }
    });
  });
  return grad.to(pred_masks.scalar_type());
}

}  // namespace
}  // namespace fmf

TORCH_LIBRARY_IMPL(fastmaskformer, CPU, m) {
  m.impl("mask_loss_forward", &fmf::mask_loss_forward_cpu);
  m.impl("mask_loss_backward", &fmf::mask_loss_backward_cpu);
}
