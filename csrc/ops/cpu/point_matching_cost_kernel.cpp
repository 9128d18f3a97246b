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

// The rows [first, last] of an h-row map that the block of sorted points [p0, p0 + points) reads
// (a point in bucket b reads rows b - 2 and b - 1 at most), clamped to the map.
struct RowBand {
  int64_t first, last;
};

// Asks the cache for rows [first, last] of a map of row length `row_bytes` bytes: the reads of
// random columns of a band of rows miss the cache (no stride for the hardware prefetcher to follow),
// so each block fetches the rows its successor will read while it computes.
inline void prefetch_rows(const char* map, int64_t row_bytes, int64_t first, int64_t last) {
  for (const char* line = map + first * row_bytes; line < map + (last + 1) * row_bytes; line += 64) {
    __builtin_prefetch(line);
  }
}

// A block's points on one H x W map: each point's PointTaps, and for a point whose four corners all
// lie on the map (the points of the map's interior, nearly all) its top-left corner's offset, the
// other corners being +1, +W and +W + 1: its read needs no test.
struct BlockTaps {
  PointTaps taps[kPoints];
  int64_t corner[kPoints];
  bool inside[kPoints];

  // Stores t as point p's taps; returns whether all four of its corners lie on the map.
  bool put(int64_t p, const PointTaps& t) {
    taps[p] = t;
    corner[p] = t.off[0];
    return inside[p] = t.off[0] >= 0 && t.off[1] >= 0 && t.off[2] >= 0 && t.off[3] >= 0;
  }
};

// The bilinear value of point p of bt on a map of width W whose element i reads as read(i), in
// grid_sample's order of the four products; a corner off the map is never read.
template <class Read>
inline float read_point(const BlockTaps& bt, int64_t p, int64_t W, Read read) {
  if (!bt.inside[p]) return sample_at(bt.taps[p], read);
  const PointTaps& t = bt.taps[p];
  const int64_t c = bt.corner[p];
  return t.w[0] * read(c) + t.w[1] * read(c + 1) + t.w[2] * read(c + W) + t.w[3] * read(c + W + 1);
}

// t[p, j] = target j sampled at point p, one_minus_t[p, j] = 1 - t[p, j], and the column sums of t;
// each target's rows `next` (the next block's) are prefetched before its points are read.
template <MaskKind kKind>
void sample_targets(const ImageTargets& img, const BlockTaps& bt, int64_t points, RowBand next, int64_t cols,
                    float* t, float* one_minus_t, float* col_sums) {
  constexpr int64_t kBytes = kKind == MaskKind::kByte ? 1 : kKind == MaskKind::kFloat ? 4 : 2;
  for (int64_t j = 0; j < img.n; ++j) {
    const int64_t base = j * img.H * img.W;
    if (next.first <= next.last) {
      prefetch_rows(static_cast<const char*>(img.masks) + base * kBytes, img.W * kBytes, next.first, next.last);
    }
    float s = 0.f;
    for (int64_t p = 0; p < points; ++p) {
      const float v = read_point(bt, p, img.W, [&](int64_t i) { return mask_value(img.masks, base + i, kKind); });
      t[p * cols + j] = v;
      one_minus_t[p * cols + j] = 1.f - v;
      s += v;
    }
    col_sums[j] += s;
  }
}

// x_out[i, p] = query i's logits x + i * map sampled at point p, for i < nq, p < points: points
// [0, inside) are interior ones (a branch-free loop of four reads), the others go through sample_at.
// Each query's rows `next` (those of the next block) are prefetched before its points are read.
template <typename scalar_t>
inline void sample_queries_impl(const scalar_t* x, int64_t map, int64_t w, int64_t nq, const BlockTaps& bt,
                                int64_t inside, int64_t points, RowBand next, float* x_out) {
  const auto at = [](const scalar_t* c) { return static_cast<float>(*c); };
  for (int64_t i = 0; i < nq; i += 2) {
    // Two queries at a time: one read of each point's taps serves both.
    const bool pair = i + 1 < nq;
    const scalar_t* x0 = x + i * map;
    const scalar_t* x1 = pair ? x0 + map : x0;
    if (next.first <= next.last) {
      prefetch_rows(reinterpret_cast<const char*>(x0), w * sizeof(scalar_t), next.first, next.last);
      if (pair) prefetch_rows(reinterpret_cast<const char*>(x1), w * sizeof(scalar_t), next.first, next.last);
    }
    float* out0 = x_out + i * kPoints;
    float* out1 = pair ? out0 + kPoints : out0;
    for (int64_t p = 0; p < inside; ++p) {
      const PointTaps& t = bt.taps[p];
      const int64_t c = bt.corner[p];
      const float v0 = t.w[0] * at(x0 + c) + t.w[1] * at(x0 + c + 1) + t.w[2] * at(x0 + c + w) +
                       t.w[3] * at(x0 + c + w + 1);
      const float v1 = t.w[0] * at(x1 + c) + t.w[1] * at(x1 + c + 1) + t.w[2] * at(x1 + c + w) +
                       t.w[3] * at(x1 + c + w + 1);
      out1[p] = v1;  // (the same value as out0's when there is no second query)
      out0[p] = v0;
    }
    for (int64_t p = inside; p < points; ++p) {
      out0[p] = sample_at(bt.taps[p], [&](int64_t k) { return static_cast<float>(x0[k]); });
      if (pair) out1[p] = sample_at(bt.taps[p], [&](int64_t k) { return static_cast<float>(x1[k]); });
    }
  }
}

template <typename scalar_t>
void sample_queries(const scalar_t* x, int64_t map, int64_t w, int64_t nq, const BlockTaps& bt, int64_t inside,
                    int64_t points, RowBand next, float* x_out) {
  sample_queries_impl(x, map, w, nq, bt, inside, points, next, x_out);
}

// fp32 logits (the common case) in a clone per instruction set.
template <>
FMF_CPU_CLONES void sample_queries<float>(const float* x, int64_t map, int64_t w, int64_t nq, const BlockTaps& bt,
                                          int64_t inside, int64_t points, RowBand next, float* x_out) {
  sample_queries_impl(x, map, w, nq, bt, inside, points, next, x_out);
}

using SampleFn = void (*)(const ImageTargets&, const BlockTaps&, int64_t, RowBand, int64_t, float*, float*, float*);

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
// Bucket of a point with y coordinate cy on a map of h rows: 1 + its row, 0 above the map (and NaN),
// h + 1 below it.
inline int64_t row_bucket(float cy, int64_t h) {
  const float y = cy * static_cast<float>(h);
  return y >= 0.f ? (y < static_cast<float>(h) ? static_cast<int64_t>(y) + 1 : h + 1) : 0;
}

std::vector<int64_t> row_order(const float* coords, int64_t P, int64_t h) {
  std::vector<int64_t> start(h + 3, 0), bucket(P), order(P);
  for (int64_t p = 0; p < P; ++p) {
    bucket[p] = row_bucket(coords[2 * p + 1], h);
    ++start[bucket[p] + 1];
  }
  for (int64_t r = 0; r < h + 2; ++r) start[r + 1] += start[r];
  for (int64_t p = 0; p < P; ++p) order[start[bucket[p]]++] = p;
  return order;
}

// The rows [first, last] of an M-row map that the block of sorted points [p0, p0 + points) reads,
// clamped to the map. The points are sorted by their bucket on the h-row logits, in which a point of
// bucket b has y in [(b - 1) / h, b / h): at M rows its taps lie in rows floor((b - 1) M / h - 1/2) to
// floor(b M / h - 1/2) + 1.
RowBand rows_read(const float* coords, const std::vector<int64_t>& order, int64_t p0, int64_t points, int64_t h,
                  int64_t M) {
  const double first = static_cast<double>(row_bucket(coords[2 * order[p0] + 1], h) - 1);
  const double last = static_cast<double>(row_bucket(coords[2 * order[p0 + points - 1] + 1], h));
  const auto row = [&](double b) { return static_cast<int64_t>(std::floor(b * M / h - 0.5)); };
  return {std::clamp<int64_t>(row(first), 0, M - 1), std::clamp<int64_t>(row(last) + 1, 0, M - 1)};
}

template <typename scalar_t>
void cost_task(const PointMatchingCostInputs& in, const Task& task, const Weights& wt, SampleFn sample) {
  const MatchingCostInputs& base = in.base;
  const ImageTargets& img = base.table[task.b];
  const int64_t Q = base.masks.size(1), h = base.masks.size(2), w = base.masks.size(3), P = in.P;
  const int64_t C = in.prob.size(2), n = img.n;
  const int64_t R = round_up(task.nq, kRows), NP = round_up(n + 1, kCols);

  std::vector<BlockTaps> block_taps(2);  // heap: two blocks of taps are too big for a thread's stack
  BlockTaps& pred_taps = block_taps[0];
  BlockTaps& tgt_taps = block_taps[1];
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
  RowBand band = rows_read(coords, order, 0, std::min(kPoints, P), h, h);
  RowBand tgt_band = rows_read(coords, order, 0, std::min(kPoints, P), h, img.H);
  for (int64_t p0 = 0; p0 < P; p0 += kPoints) {
    const int64_t points = std::min(kPoints, P - p0);
    // The rows of the next block that this one does not read.
    RowBand next{0, -1}, tgt_next{0, -1};
    if (p0 + points < P) {
      const int64_t next_points = std::min(kPoints, P - p0 - points);
      const RowBand b = rows_read(coords, order, p0 + points, next_points, h, h);
      const RowBand tb = rows_read(coords, order, p0 + points, next_points, h, img.H);
      next = {std::max(b.first, band.last + 1), b.last};
      tgt_next = {std::max(tb.first, tgt_band.last + 1), tb.last};
      band = b, tgt_band = tb;
    }
    // The block's points in the order interior-first at the logits' size (then the others, last
    // to first): the queries' loop over the interior ones has no branch.
    int64_t inside = 0, last = points;
    for (int64_t k = 0; k < points; ++k) {
      const int64_t q = order[p0 + k];
      const PointTaps pt = point_taps(coords[q * 2], coords[q * 2 + 1], h, w);
      const bool in_map = pt.off[0] >= 0 && pt.off[1] >= 0 && pt.off[2] >= 0 && pt.off[3] >= 0;
      const int64_t s = in_map ? inside++ : --last;
      pred_taps.put(s, pt);
      tgt_taps.put(s, point_taps(coords[q * 2], coords[q * 2 + 1], img.H, img.W));
    }
    sample(img, tgt_taps, points, tgt_next, NP, t, one_minus_t, col_sums.data());
    sample_queries(x, h * w, w, task.nq, pred_taps, inside, points, next, sig);
    for (int64_t i = 0; i < task.nq; ++i) {
      bce_terms(sig + i * kPoints, pos + i * kPoints, neg + i * kPoints, round_up(points, kLanes));
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
