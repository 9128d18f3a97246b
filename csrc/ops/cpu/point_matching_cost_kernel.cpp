// Batched point-sampled matching cost on the CPU (Mask2Former's matcher).
//
// One task is (image b, a block of queries). It walks the image's P points, sorted by row, in blocks
// of kPoints. For each block it computes every point's bilinear taps at the prediction size and at the target
// size (fmf/point_sampling.h), samples the targets in place into tile = [t; 1 - t] as
// [2][kPoints][NP] (column n of t holds ones, so the products below also give the row sums of
// sigmoid), samples each query's logits x and turns them into terms = [pos; neg; sig] =
// [BCE(x, 1); BCE(x, 0); sigmoid(x)] as [3][R][kPoints], then adds two small products in registers:
//     bce += pos @ t + neg @ (1 - t)      (sums of terms >= 0: no cancellation at saturated logits)
//     sgt += sig @ t
// Nothing of size Q x P or n x P is stored: a task's scratch is 3R x kPoints + 2 kPoints x NP + 2R x NP
// floats, the taps of kPoints points and the order of the P points.
#include "fmf/simd.h"  // first: its diagnostic setting must precede the math templates

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "fmf/point_matching_cost.h"
#include "fmf/point_sampling.h"

namespace fmf {
namespace {

using simd::f32x8;
using simd::kLanes;
using simd::round_up;

constexpr int64_t kPoints = 256;  // points per block: the target tile stays in L1/L2
constexpr int64_t kRows = 4;      // register tile of the product loop: kRows x kCols sums
constexpr int64_t kCols = 2 * kLanes;

struct Weights {
  float cost_class, cost_mask, cost_dice;
};

// x[0, n) -> BCE(x, 1), BCE(x, 0) and sigmoid(x) (in place of x); n is a whole number of vectors.
FMF_CPU_CLONES void bce_terms(float* x_sig, float* pos, float* neg, int64_t n) {
  for (int64_t i = 0; i < n; i += kLanes) {
    const Logistic<f32x8> l = logistic(simd::load(x_sig + i));
    simd::store(pos + i, l.sp_neg);
    simd::store(neg + i, l.sp);
    simd::store(x_sig + i, l.sig);
  }
}

// sums[r, j] += sum_p a[r, p] tile[p, j] for r < rows (a multiple of kRows), j < cols (a multiple
// of kCols), p < points; a has row stride kPoints, tile and sums have row stride cols.
FMF_CPU_CLONES void add_products(const float* a, int64_t rows, const float* tile, int64_t points, int64_t cols,
                                 float* sums) {
  for (int64_t r = 0; r < rows; r += kRows) {
    for (int64_t j = 0; j < cols; j += kCols) {
      f32x8 acc[kRows][2] = {};
      for (int64_t p = 0; p < points; ++p) {
        const f32x8 t0 = simd::load(tile + p * cols + j), t1 = simd::load(tile + p * cols + j + kLanes);
        for (int64_t i = 0; i < kRows; ++i) {
          const float av = a[(r + i) * kPoints + p];
          acc[i][0] += av * t0;
          acc[i][1] += av * t1;
        }
      }
      for (int64_t i = 0; i < kRows; ++i) {
        float* s = sums + (r + i) * cols + j;
        simd::store(s, simd::load(s) + acc[i][0]);
        simd::store(s + kLanes, simd::load(s + kLanes) + acc[i][1]);
      }
    }
  }
}

// t[p, j] = target j sampled at point p, one_minus_t[p, j] = 1 - t[p, j], and the column sums of t.
template <MaskKind kKind>
void sample_targets(const ImageTargets& img, const PointTaps* taps, int64_t points, int64_t cols, float* t,
                    float* one_minus_t, float* col_sums) {
  for (int64_t j = 0; j < img.n; ++j) {
    const int64_t base = j * img.H * img.W;
    float s = 0.f;
    for (int64_t p = 0; p < points; ++p) {
      const float v = sample_at(taps[p], [&](int64_t i) { return mask_value(img.masks, base + i, kKind); });
      t[p * cols + j] = v;
      one_minus_t[p * cols + j] = 1.f - v;
      s += v;
    }
    col_sums[j] += s;
  }
}

using SampleFn = void (*)(const ImageTargets&, const PointTaps*, int64_t, int64_t, float*, float*, float*);

SampleFn sampler_for(MaskKind kind) {
  return visit_mask_kind(kind, [](auto k) -> SampleFn { return sample_targets<decltype(k)::value>; });
}

struct Task {
  int64_t b, q0, nq;
};

// The points in the order of the prediction rows they fall in (a stable counting sort; rows above
// and below the map in buckets of their own). A block of kPoints consecutive points then reads a
// band of a few rows of each query's map and of each target, which stays in cache, where points in
// their random order would pull every query's whole map through the cache once per block. The sums
// over points are the same up to rounding in another order.
std::vector<int64_t> row_order(const float* coords, int64_t P, int64_t h) {
  std::vector<int64_t> start(h + 3, 0), bucket(P), order(P);
  for (int64_t p = 0; p < P; ++p) {
    const float y = coords[2 * p + 1] * static_cast<float>(h);  // NaN goes to bucket 0
    bucket[p] = y >= 0.f ? (y < static_cast<float>(h) ? static_cast<int64_t>(y) + 1 : h + 1) : 0;
    ++start[bucket[p] + 1];
  }
  for (int64_t r = 0; r < h + 2; ++r) start[r + 1] += start[r];
  for (int64_t p = 0; p < P; ++p) order[start[bucket[p]]++] = p;
  return order;
}

template <typename scalar_t>
void cost_task(const PointMatchingCostInputs& in, const Task& task, const Weights& wt, SampleFn sample) {
  const MatchingCostInputs& base = in.base;
  const ImageTargets& img = base.table[task.b];
  const int64_t Q = base.masks.size(1), h = base.masks.size(2), w = base.masks.size(3), P = in.P;
  const int64_t C = in.prob.size(2), n = img.n;
  const int64_t R = round_up(task.nq, kRows), NP = round_up(n + 1, kCols);

  std::vector<PointTaps> pred_taps(kPoints), tgt_taps(kPoints);
  std::vector<float> terms(3 * R * kPoints, 0.f), tile(2 * kPoints * NP, 0.f), sums(2 * R * NP, 0.f),
      col_sums(NP, 0.f);
  float* t = tile.data();
  float* one_minus_t = t + kPoints * NP;
  for (int64_t p = 0; p < kPoints; ++p) t[p * NP + n] = 1.f;
  float* pos = terms.data();
  float* neg = pos + R * kPoints;
  float* sig = neg + R * kPoints;
  float* bce = sums.data();
  float* sgt = bce + R * NP;

  const float* coords = in.coords.data_ptr<float>() + task.b * P * 2;
  const std::vector<int64_t> order = row_order(coords, P, h);
  const scalar_t* x = base.masks.data_ptr<scalar_t>() + (task.b * Q + task.q0) * h * w;
  for (int64_t p0 = 0; p0 < P; p0 += kPoints) {
    const int64_t points = std::min(kPoints, P - p0);
    for (int64_t p = 0; p < points; ++p) {
      const float cx = coords[order[p0 + p] * 2], cy = coords[order[p0 + p] * 2 + 1];
      pred_taps[p] = point_taps(cx, cy, h, w);
      tgt_taps[p] = point_taps(cx, cy, img.H, img.W);
    }
    sample(img, tgt_taps.data(), points, NP, t, one_minus_t, col_sums.data());
    for (int64_t i = 0; i < task.nq; ++i) {
      const scalar_t* xi = x + i * h * w;
      float* s = sig + i * kPoints;
      for (int64_t p = 0; p < points; ++p) {
        s[p] = sample_at(pred_taps[p], [&](int64_t k) { return static_cast<float>(xi[k]); });
      }
      bce_terms(s, pos + i * kPoints, neg + i * kPoints, round_up(points, kLanes));
    }
    add_products(pos, R, t, points, NP, bce);
    add_products(neg, R, one_minus_t, points, NP, bce);
    add_products(sig, R, t, points, NP, sgt);
  }

  const int64_t* labels = base.labels.data_ptr<int64_t>() + img.first_label;
  float* out = base.cost.data_ptr<float>() + (task.b * Q + task.q0) * base.n_max;
  for (int64_t i = 0; i < task.nq; ++i) {
    const float* prob = in.prob.data_ptr<float>() + (task.b * Q + task.q0 + i) * C;
    const float* bce_i = bce + i * NP;
    const float* sgt_i = sgt + i * NP;
    for (int64_t j = 0; j < n; ++j) {
      const float dice = 1.f - (2.f * sgt_i[j] + 1.f) / (sgt_i[n] + col_sums[j] + 1.f);
      // A label outside [0, K) (the no-object column included) gives NaN, as in the reference.
      const float p_label = labels[j] >= 0 && labels[j] < C - 1 ? prob[labels[j]]
                                                                : std::numeric_limits<float>::quiet_NaN();
      const float c = -wt.cost_class * p_label + wt.cost_mask * (bce_i[j] / static_cast<float>(P)) +
                      wt.cost_dice * dice;
      // Not finite (predictions that are not): NaN, which every solver rejects naming the image.
      out[i * base.n_max + j] = std::isfinite(c) ? c : std::numeric_limits<float>::quiet_NaN();
    }
  }
}

at::Tensor point_matching_cost_cpu(const at::Tensor& pred_logits, const at::Tensor& pred_masks,
                                   const at::Tensor& tgt_labels, at::TensorList tgt_masks, const at::Tensor& coords,
                                   double cost_class, double cost_mask, double cost_dice) {
  const PointMatchingCostInputs in =
      prepare_point_matching_cost(pred_logits, pred_masks, tgt_labels, tgt_masks, coords, at::kCPU);
  const int64_t Q = in.base.masks.size(1);

  // Tasks: every image with targets, split into query blocks when there are too few images to
  // occupy every thread (each block samples its image's targets again: n x P reads, against the
  // block's Q_block x P).
  std::vector<int64_t> images;
  for (int64_t b = 0; b < static_cast<int64_t>(in.base.table.size()); ++b) {
    if (in.base.table[b].n > 0 && Q > 0) images.push_back(b);
  }
  if (images.empty()) return in.base.cost;
  const int64_t threads = at::get_num_threads(), n_images = static_cast<int64_t>(images.size());
  const int64_t splits = std::min((threads + n_images - 1) / n_images, (Q + 15) / 16);
  const int64_t block = round_up((Q + splits - 1) / splits, kRows);
  std::vector<Task> tasks;
  for (int64_t b : images) {
    for (int64_t q0 = 0; q0 < Q; q0 += block) tasks.push_back({b, q0, std::min(block, Q - q0)});
  }

  const Weights wt{static_cast<float>(cost_class), static_cast<float>(cost_mask), static_cast<float>(cost_dice)};
  const SampleFn sample = sampler_for(in.base.kind);
  FMF_DISPATCH_FLOAT(in.base.masks.scalar_type(), "point_matching_cost_cpu", [&] {
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) cost_task<scalar_t>(in, tasks[t], wt, sample);
    });
  });
  return in.base.cost;
}

}  // namespace
}  // namespace fmf

TORCH_LIBRARY_IMPL(fastmaskformer, CPU, m) {
  m.impl("point_matching_cost", &fmf::point_matching_cost_cpu);
}
