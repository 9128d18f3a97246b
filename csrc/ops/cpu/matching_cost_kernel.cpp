// Batched matching cost on the CPU.
//
// One task is (image b, a block of queries). It walks the image's pixels in blocks of kPixels and
// for each block fills two small tiles: the focal terms of its queries, terms = [pos; neg; sig] as
// [3R, kPixels] (R = the block's queries rounded up to kRows), and the targets read in place at
// their nearest-downsampled positions, tile = [kPixels, NP] (column n holds ones, so the products
// below also give the row sums of neg and sig). Then sums += terms @ tile, a small GEMM in
// registers. Nothing of size Q x h*w or n x h*w is ever stored: the scratch of one task is
// 3R x kPixels + kPixels x NP + 3R x NP floats.
#include "fmf/simd.h"  // first: its diagnostic setting must precede the math templates

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "fmf/index_rules.h"
#include "fmf/matching_cost.h"

namespace fmf {
namespace {

using simd::f32x8;
using simd::kLanes;
using simd::round_up;

constexpr int64_t kPixels = 256;  // pixels per block: the target tile stays in L1/L2
constexpr int64_t kRows = 4;      // register tile of the product loop: kRows x kCols sums
constexpr int64_t kCols = 2 * kLanes;

struct Weights {
  float cost_class, cost_mask, cost_dice, alpha, gamma;
};

// x[0, n) -> pos, neg and sig (in place of x); n is a whole number of vectors.
FMF_CPU_CLONES void focal_terms(float* x_sig, float* pos, float* neg, int64_t n, float alpha, float gamma) {
  for (int64_t i = 0; i < n; i += kLanes) {
    const CostTerms<f32x8> c = matching_terms(simd::load(x_sig + i), alpha, gamma);
    simd::store(pos + i, c.pos);
    simd::store(neg + i, c.neg);
    simd::store(x_sig + i, c.sig);
  }
}

// sums[r, j] += sum_p a[r, p] tile[p, j] for r < rows (a multiple of kRows), j < cols (a multiple
// of kCols), p < pixels; a has row stride a_stride, tile and sums have row stride cols.
FMF_CPU_CLONES void accumulate_products(const float* a, int64_t rows, int64_t a_stride, const float* tile,
                                        int64_t pixels, int64_t cols, float* sums) {
  for (int64_t r = 0; r < rows; r += kRows) {
    const float* ar = a + r * a_stride;
    for (int64_t j = 0; j < cols; j += kCols) {
      f32x8 acc[kRows][2] = {};
      for (int64_t p = 0; p < pixels; ++p) {
        const f32x8 t0 = simd::load(tile + p * cols + j), t1 = simd::load(tile + p * cols + j + kLanes);
        for (int64_t i = 0; i < kRows; ++i) {
          const float av = ar[i * a_stride + p];
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

// tile[p, j] = target j at pixel p0 + p (its nearest source offset is src[p0 + p]), and the column
// sums of the targets.
template <MaskKind kKind>
void gather_targets(const ImageTargets& img, const int64_t* src, int64_t pixels, int64_t cols, float* tile,
                    float* col_sums) {
  for (int64_t j = 0; j < img.n; ++j) {
    const int64_t base = j * img.H * img.W;
    float s = 0.f;
    for (int64_t p = 0; p < pixels; ++p) {
      const float v = mask_value(img.masks, base + src[p], kKind);
      tile[p * cols + j] = v;
      s += v;
    }
    col_sums[j] += s;
  }
}

using GatherFn = void (*)(const ImageTargets&, const int64_t*, int64_t, int64_t, float*, float*);

GatherFn gather_for(MaskKind kind) {
  return visit_mask_kind(kind, [](auto k) -> GatherFn { return gather_targets<decltype(k)::value>; });
}

// softmax(z) = exp(z - max) / denom for one query's class logits z[0, C).
struct Softmax {
  float max, denom;
};

Softmax softmax_of(const float* z, int64_t C) {
  const float mx = *std::max_element(z, z + C);
  float s = 0.f;
  for (int64_t c = 0; c < C; ++c) s += std::exp(z[c] - mx);
  return {mx, s};
}

struct Task {
  int64_t b, q0, nq;
};

template <typename scalar_t>
void cost_task(const MatchingCostInputs& in, const Task& task, const Weights& wt, GatherFn gather) {
  const ImageTargets& img = in.table[task.b];
  const int64_t Q = in.masks.size(1), h = in.masks.size(2), w = in.masks.size(3), P = h * w;
  const int64_t C = in.logits.size(2), n = img.n;
  const int64_t R = round_up(task.nq, kRows), NP = round_up(n + 1, kCols);

  std::vector<int64_t> src(P);  // nearest source offset of every pixel, F.interpolate's rule
  for (int64_t y = 0; y < h; ++y) {
    const int64_t row = nearest_src(y, img.H, h) * img.W;
    for (int64_t x = 0; x < w; ++x) src[y * w + x] = row + nearest_src(x, img.W, w);
  }
  std::vector<float> terms(3 * R * kPixels, 0.f), tile(kPixels * NP, 0.f), sums(3 * R * NP, 0.f), col_sums(NP, 0.f);
  for (int64_t p = 0; p < kPixels; ++p) tile[p * NP + n] = 1.f;
  float* pos = terms.data();
  float* neg = pos + R * kPixels;
  float* sig = neg + R * kPixels;

  const scalar_t* x = in.masks.data_ptr<scalar_t>() + (task.b * Q + task.q0) * P;
  for (int64_t p0 = 0; p0 < P; p0 += kPixels) {
    const int64_t pixels = std::min(kPixels, P - p0);
    gather(img, src.data() + p0, pixels, NP, tile.data(), col_sums.data());
    for (int64_t i = 0; i < task.nq; ++i) {
      const scalar_t* xi = x + i * P + p0;
      float* s = sig + i * kPixels;
      for (int64_t p = 0; p < pixels; ++p) s[p] = static_cast<float>(xi[p]);
      focal_terms(s, pos + i * kPixels, neg + i * kPixels, round_up(pixels, kLanes), wt.alpha, wt.gamma);
    }
    accumulate_products(terms.data(), 3 * R, kPixels, tile.data(), pixels, NP, sums.data());
  }

  const int64_t* labels = in.labels.data_ptr<int64_t>() + img.first_label;
  float* out = in.cost.data_ptr<float>() + (task.b * Q + task.q0) * in.n_max;
  for (int64_t i = 0; i < task.nq; ++i) {
    const float* z = in.logits.data_ptr<float>() + (task.b * Q + task.q0 + i) * C;
    const Softmax sm = softmax_of(z, C);
    const float* pos_t = sums.data() + i * NP;
    const float* neg_t = sums.data() + (R + i) * NP;
    const float* sig_t = sums.data() + (2 * R + i) * NP;
    for (int64_t j = 0; j < n; ++j) {
      const float focal = (pos_t[j] + neg_t[n] - neg_t[j]) / static_cast<float>(P);  // neg @ (1 - t)
      const float dice = 1.f - (2.f * sig_t[j] + 1.f) / (sig_t[n] + col_sums[j] + 1.f);
      const float prob = std::exp(z[labels[j]] - sm.max) / sm.denom;
      const float c = -wt.cost_class * prob + wt.cost_mask * focal + wt.cost_dice * dice;
      // Not finite (predictions that are not): NaN, which every solver rejects naming the image.
      out[i * in.n_max + j] = std::isfinite(c) ? c : std::numeric_limits<float>::quiet_NaN();
    }
  }
}

at::Tensor matching_cost_cpu(const at::Tensor& pred_logits, const at::Tensor& pred_masks, const at::Tensor& tgt_labels,
                             at::TensorList tgt_masks, double cost_class, double cost_mask, double cost_dice,
                             double alpha, double gamma) {
  MatchingCostInputs in = prepare_matching_cost(pred_logits, pred_masks, tgt_labels, tgt_masks, at::kCPU);
  const int64_t C = in.logits.size(2), Q = in.masks.size(1);
  const int64_t* labels = in.labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < in.labels.numel(); ++i) {  // the last column, "no object", is never a target
    TORCH_CHECK_VALUE(labels[i] >= 0 && labels[i] < C - 1, "tgt_labels: expected values in [0, ", C - 1,
                      ") (the classes of pred_logits but its last, no-object column), got ", labels[i],
                      " at position ", i);
  }

  // Tasks: every image with targets, split into query blocks when there are too few images to
  // occupy every thread; the largest images go first, and threads take tasks as they finish.
  std::vector<int64_t> images;
  for (int64_t b = 0; b < static_cast<int64_t>(in.table.size()); ++b) {
    if (in.table[b].n > 0 && Q > 0) images.push_back(b);
  }
  if (images.empty()) return in.cost;
  std::stable_sort(images.begin(), images.end(), [&](int64_t a, int64_t b) { return in.table[a].n > in.table[b].n; });
  const int64_t threads = at::get_num_threads();
  const int64_t n_images = static_cast<int64_t>(images.size());
  const int64_t splits = std::min((2 * threads + n_images - 1) / n_images, (Q + 7) / 8);
  const int64_t block = round_up((Q + splits - 1) / splits, kRows);
  std::vector<Task> tasks;
  for (int64_t b : images) {
    for (int64_t q0 = 0; q0 < Q; q0 += block) tasks.push_back({b, q0, std::min(block, Q - q0)});
  }

  const Weights wt{static_cast<float>(cost_class), static_cast<float>(cost_mask), static_cast<float>(cost_dice),
                   static_cast<float>(alpha), static_cast<float>(gamma)};
  const GatherFn gather = gather_for(in.kind);
  std::atomic<int64_t> next{0};
  FMF_DISPATCH_FLOAT(in.masks.scalar_type(), "matching_cost_cpu", [&] {
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      for (int64_t t = next++; t < static_cast<int64_t>(tasks.size()); t = next++) {
        cost_task<scalar_t>(in, tasks[t], wt, gather);
      }
    });
  });
  return in.cost;
}

}  // namespace
}  // namespace fmf

TORCH_LIBRARY_IMPL(fastmaskformer, CPU, m) {
  m.impl("matching_cost", &fmf::matching_cost_cpu);
}
