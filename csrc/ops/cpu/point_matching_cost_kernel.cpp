// Batched point-sampled matching cost on the CPU (Mask2Former's matcher).
//
// One task is (image b, a block of R queries). It walks the image's P points sorted by the logit row
// they fall in, in blocks of at most kPoints points spanning at most kBuckets rows. The logit rows a
// block reads (kRing at most) are kept pixel-major in a ring, [w][R] per row (the R queries of one
// pixel side by side), transposed from the [Q, h, w] maps once per row, so a point's sample for every
// query is four weighted runs of R floats: x as [kPoints][R]. Per block it also samples the targets
// in place into tile = [t; 1 - t] as [2][kPoints][NP] (column n of t holds ones, so the products
// below also give the row sums of sigmoid), turns x into terms = [pos; neg; sig] =
// [BCE(x, 1); BCE(x, 0); sigmoid(x)], and adds three small products in registers, vectorized over
// the queries:
//     bce += pos^T t + neg^T (1 - t)      (sums of terms >= 0: no cancellation at saturated logits)
//     sgt += sig^T t
// Nothing of size Q x P or n x P is stored: a task's scratch is kRing x w x R + 3 kPoints x R +
// 2 kPoints x NP + 2 NP x R floats, the taps of kPoints points and the P points sorted by row.
#include "fmf/simd.h"  // first: its diagnostic setting must precede the math templates

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "fmf/point_matching_cost.h"
#include "fmf/point_sampling.h"

namespace fmf {
namespace {

using simd::f32x8;
using simd::kLanes;
using simd::round_up;

constexpr int64_t kPoints = 256;  // points per block at most
constexpr int64_t kBuckets = 4;   // logit rows whose points one block takes at most
constexpr int64_t kRing = kBuckets + 2;  // rows one block reads: a point in row b reads rows b - 1 to b + 1
constexpr int64_t kTargetTile = 4;  // targets per register tile of the products (by 8 or 16 queries)

struct Weights {
  float cost_class, cost_mask, cost_dice;
};

// Rows [first, last] of a map (empty when last < first).
struct RowBand {
  int64_t first, last;
};

// x[0, n) -> BCE(x, 1), BCE(x, 0) and sigmoid(x) (in place of x); n is a whole number of 8-lane
// vectors. 16 lanes at a time where the CPU has AVX-512 (the logistic is a long run of arithmetic).
template <class V>
__attribute__((always_inline)) inline void bce_terms_at(float* x_sig, float* pos, float* neg, int64_t i) {
  const Logistic<V> l = logistic(simd::load<V>(x_sig + i));
  simd::store(pos + i, l.sp_neg);
  simd::store(neg + i, l.sp);
  simd::store(x_sig + i, l.sig);
}

FMF_CPU_CLONES_512 void bce_terms(float* x_sig, float* pos, float* neg, int64_t n) {
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) bce_terms_at<simd::f32x16>(x_sig, pos, neg, i);
  if (i < n) bce_terms_at<f32x8>(x_sig, pos, neg, i);
}

// sums[j, r] += sum_p a[p, r] tile[p, j] over r in [r0, r0 + kVectors * kLanes), j < cols (a multiple
// of kTargetTile), p < points; a has row stride R, tile row stride cols, sums row stride R.
template <int kVectors>
__attribute__((always_inline)) inline void add_products_tile(const float* a, int64_t R, int64_t r0, const float* tile,
                                                             int64_t points, int64_t cols, float* sums) {
  for (int64_t j = 0; j < cols; j += kTargetTile) {
    f32x8 acc[kTargetTile][kVectors] = {};
    for (int64_t p = 0; p < points; ++p) {
      f32x8 av[kVectors];
      for (int v = 0; v < kVectors; ++v) av[v] = simd::load(a + p * R + r0 + v * kLanes);
      for (int64_t k = 0; k < kTargetTile; ++k) {
        const float tv = tile[p * cols + j + k];
        for (int v = 0; v < kVectors; ++v) acc[k][v] += tv * av[v];
      }
    }
    for (int64_t k = 0; k < kTargetTile; ++k) {
      for (int v = 0; v < kVectors; ++v) {
        float* s = sums + (j + k) * R + r0 + v * kLanes;
        simd::store(s, simd::load(s) + acc[k][v]);
      }
    }
  }
}

// The same over every r < R (a multiple of kLanes): pairs of vectors, then the odd one.
FMF_CPU_CLONES void add_products(const float* a, int64_t R, const float* tile, int64_t points, int64_t cols,
                                 float* sums) {
  int64_t r = 0;
  for (; r + 2 * kLanes <= R; r += 2 * kLanes) add_products_tile<2>(a, R, r, tile, points, cols, sums);
  if (r < R) add_products_tile<1>(a, R, r, tile, points, cols, sums);
}

// A point's four taps on the ring of pixel-major logit rows: the runs of R floats of its corners
// (nullptr off the map: never read) and their weights.
struct RunTaps {
  const float* run[4];
  float w[4];
  bool inside;  // all four corners on the map
};

// x[p, r] = the logits of query r sampled at point p, the corners added in grid_sample's order.
FMF_CPU_CLONES void sample_runs(const RunTaps* taps, int64_t points, int64_t R, float* x) {
  for (int64_t p = 0; p < points; ++p) {
    const RunTaps& t = taps[p];
    float* out = x + p * R;
    if (t.inside) {
      for (int64_t r = 0; r < R; r += kLanes) {
        simd::store(out + r, t.w[0] * simd::load(t.run[0] + r) + t.w[1] * simd::load(t.run[1] + r) +
                                 t.w[2] * simd::load(t.run[2] + r) + t.w[3] * simd::load(t.run[3] + r));
      }
    } else {
      for (int64_t r = 0; r < R; r += kLanes) {
        f32x8 v{};
        for (int k = 0; k < 4; ++k) {
          if (t.run[k]) v += t.w[k] * simd::load(t.run[k] + r);
        }
        simd::store(out + r, v);
      }
    }
  }
}

// Row `row` of queries [0, nq) of maps x (map elements apart, rows of w) into dst pixel-major:
// dst[c * R + i] = x[i][row][c]: 16 queries at a time, so each pixel's run is written in whole lines.
template <typename scalar_t>
void transpose_row_scalar(const scalar_t* x, int64_t map, int64_t w, int64_t nq, int64_t R, int64_t row,
                          float* dst) {
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < nq; i0 += kTile) {
    const int64_t m = std::min(kTile, nq - i0);
    const scalar_t* src[kTile];
    for (int64_t k = 0; k < m; ++k) src[k] = x + (i0 + k) * map + row * w;
    for (int64_t c = 0; c < w; ++c) {
      float* d = dst + c * R + i0;
      for (int64_t k = 0; k < m; ++k) d[k] = static_cast<float>(src[k][c]);
    }
  }
}

// The fp32 case in 8 x 8 tiles transposed in registers (the tails as above). Rows are asked for in
// increasing order, so each query's next row is prefetched while this one is read: the reads of
// one row of Q maps, each on its own pages, would otherwise wait on the cache one after another.
FMF_CPU_CLONES void transpose_row_f32(const float* x, int64_t map, int64_t w, int64_t nq, int64_t R, int64_t row,
                                      float* dst) {
  const int64_t nq8 = nq / kLanes * kLanes, w8 = w / kLanes * kLanes;
  for (int64_t i0 = 0; i0 < nq8; i0 += kLanes) {
    const float* src = x + i0 * map + row * w;
    if (row + 1 < map / w) {  // row + 1 of the same 8 maps (map / w rows each)
      for (int k = 0; k < kLanes; ++k) {
        prefetch_rows(reinterpret_cast<const char*>(src + k * map), w * sizeof(float), w * sizeof(float), 1, 1);
      }
    }
    for (int64_t c = 0; c < w8; c += kLanes) {
      f32x8 v[kLanes];
      for (int k = 0; k < kLanes; ++k) v[k] = simd::load(src + k * map + c);
      simd::transpose8(v);
      for (int k = 0; k < kLanes; ++k) simd::store(dst + (c + k) * R + i0, v[k]);
    }
    for (int64_t c = w8; c < w; ++c) {
      for (int k = 0; k < kLanes; ++k) dst[c * R + i0 + k] = src[k * map + c];
    }
  }
  if (nq8 < nq) transpose_row_scalar(x + nq8 * map, map, w, nq - nq8, R, row, dst + nq8);
}

template <typename scalar_t>
void transpose_row(const scalar_t* x, int64_t map, int64_t w, int64_t nq, int64_t R, int64_t row, float* dst) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    transpose_row_f32(x, map, w, nq, R, row, dst);
  } else {
    transpose_row_scalar(x, map, w, nq, R, row, dst);
  }
}

// A block's points on the H x W targets: each point's PointTaps, and whether all four of its
// corners lie on the map (the points of the map's interior, nearly all): then its corners are
// off[0] + {0, 1, W, W + 1} and its read needs no test.
struct BlockTaps {
  PointTaps taps[kPoints];
  bool inside[kPoints];

  void put(int64_t p, const PointTaps& t) {
    taps[p] = t;
    inside[p] = t.off[0] >= 0 && t.off[1] >= 0 && t.off[2] >= 0 && t.off[3] >= 0;
  }
};

// The bilinear value of point p of bt on a map of width W whose element i reads as read(i), in
// grid_sample's order of the four products; a corner off the map is never read.
template <class Read>
inline float read_point(const BlockTaps& bt, int64_t p, int64_t W, Read read) {
  if (!bt.inside[p]) return sample_at(bt.taps[p], read);
  const PointTaps& t = bt.taps[p];
  const int64_t c = t.off[0];
  return t.w[0] * read(c) + t.w[1] * read(c + 1) + t.w[2] * read(c + W) + t.w[3] * read(c + W + 1);
}

// t[p, j] = target j sampled at point p, one_minus_t[p, j] = 1 - t[p, j], and the column sums of t;
// each target's rows `next` (the next block's) are prefetched before its points are read.
template <MaskKind kKind>
void sample_targets(const ImageTargets& img, const BlockTaps& bt, int64_t points, RowBand next, int64_t cols,
                    float* t, float* one_minus_t, float* col_sums) {
  constexpr int64_t kBytes = kMaskBytes<kKind>;
  for (int64_t j = 0; j < img.n; ++j) {
    const int64_t base = j * img.H * img.W;
    if (next.first <= next.last) {
      prefetch_rows(static_cast<const char*>(img.masks) + base * kBytes, img.W * kBytes, img.W * kBytes, next.first,
                    next.last);
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

using SampleFn = void (*)(const ImageTargets&, const BlockTaps&, int64_t, RowBand, int64_t, float*, float*, float*);

SampleFn sampler_for(MaskKind kind) {
  return visit_mask_kind(kind, [](auto k) -> SampleFn { return sample_targets<decltype(k)::value>; });
}

struct Task {
  int64_t b, q0, nq;
};

// Bucket of a point with y coordinate cy on a map of h rows: 1 + its row, 0 above the map (and NaN),
// h + 1 below it.
inline int64_t row_bucket(float cy, int64_t h) {
  const float y = cy * static_cast<float>(h);
  return y >= 0.f ? (y < static_cast<float>(h) ? static_cast<int64_t>(y) + 1 : h + 1) : 0;
}

// The points in the order of the prediction rows they fall in (a stable counting sort on their
// buckets): their buckets and coordinates in that order, so blocks read them sequentially. A block
// of consecutive points then reads a band of a few rows of the logits (which the ring holds) and of
// each target (which stays in cache), where points in their random order would pull every map whole
// through the cache once per block. The sums over points are the same up to rounding in another order.
struct RowOrder {
  std::vector<int64_t> bucket;
  std::vector<float> xy;  // the points' (x, y) in that order
};

RowOrder row_order(const float* coords, int64_t P, int64_t h) {
  std::vector<int64_t> start(h + 3, 0), bucket(P);
  RowOrder sorted{std::vector<int64_t>(P), std::vector<float>(2 * P)};
  for (int64_t p = 0; p < P; ++p) {
    bucket[p] = row_bucket(coords[2 * p + 1], h);
    ++start[bucket[p] + 1];
  }
  for (int64_t r = 0; r < h + 2; ++r) start[r + 1] += start[r];
  for (int64_t p = 0; p < P; ++p) {
    const int64_t k = start[bucket[p]]++;
    sorted.bucket[k] = bucket[p];
    sorted.xy[2 * k] = coords[2 * p], sorted.xy[2 * k + 1] = coords[2 * p + 1];
  }
  return sorted;
}

// The rows [first, last] of an M-row target map that the sorted points [p0, p1) read, clamped to the
// map: a point of bucket b has y in [(b - 1) / h, b / h), so at M rows its taps lie in rows
// floor((b - 1) M / h - 1/2) to floor(b M / h - 1/2) + 1.
RowBand rows_read(const std::vector<int64_t>& bucket, int64_t p0, int64_t p1, int64_t h, int64_t M) {
  const auto row = [&](int64_t b) { return static_cast<int64_t>(std::floor(static_cast<double>(b) * M / h - 0.5)); };
  return {std::clamp<int64_t>(row(bucket[p0] - 1), 0, M - 1), std::clamp<int64_t>(row(bucket[p1 - 1]) + 1, 0, M - 1)};
}

// Ends of the blocks of the sorted points: at most kPoints points and kBuckets buckets each.
std::vector<int64_t> block_ends(const std::vector<int64_t>& bucket) {
  std::vector<int64_t> ends;
  const int64_t P = static_cast<int64_t>(bucket.size());
  for (int64_t p0 = 0; p0 < P;) {
    int64_t p1 = p0 + 1;
    while (p1 < P && p1 - p0 < kPoints && bucket[p1] - bucket[p0] < kBuckets) ++p1;
    ends.push_back(p1);
    p0 = p1;
  }
  return ends;
}

template <typename scalar_t>
void cost_task(const PointMatchingCostInputs& in, const Task& task, const Weights& wt, SampleFn sample) {
  const MatchingCostInputs& base = in.base;
  const ImageTargets& img = base.table[task.b];
  const int64_t Q = base.masks.size(1), h = base.masks.size(2), w = base.masks.size(3), P = in.P;
  const int64_t C = in.prob.size(2), n = img.n;
  const int64_t R = round_up(task.nq, kLanes), NP = round_up(n + 1, kTargetTile);

  std::vector<BlockTaps> tgt_block(1);  // heap: a block of taps is too big for a thread's stack
  BlockTaps& tgt_taps = tgt_block[0];
  std::vector<RunTaps> pred_taps(kPoints);
  std::vector<Corners> corners(kPoints);
  std::vector<float> ring(kRing * w * R, 0.f), terms(3 * kPoints * R, 0.f), tile(2 * kPoints * NP, 0.f),
      sums(2 * NP * R, 0.f), col_sums(NP, 0.f);
  std::vector<int64_t> ring_row(kRing, -1);  // the logit row each ring slot holds
  float* t = tile.data();
  float* one_minus_t = t + kPoints * NP;
  for (int64_t p = 0; p < kPoints; ++p) t[p * NP + n] = 1.f;
  float* pos = terms.data();
  float* neg = pos + kPoints * R;
  float* sig = neg + kPoints * R;
  float* bce = sums.data();
  float* sgt = bce + NP * R;

  const RowOrder sorted = row_order(in.coords.data_ptr<float>() + task.b * P * 2, P, h);
  const float* xy = sorted.xy.data();
  const std::vector<int64_t> ends = block_ends(sorted.bucket);
  const scalar_t* x = base.masks.data_ptr<scalar_t>() + (task.b * Q + task.q0) * h * w;
  RowBand tgt_band = rows_read(sorted.bucket, 0, ends[0], h, img.H);
  const int64_t blocks = static_cast<int64_t>(ends.size());
  for (int64_t k = 0, p0 = 0; k < blocks; p0 = ends[k++]) {
    const int64_t points = ends[k] - p0;
    // The target rows of the next block that this one does not read, fetched while it computes.
    RowBand tgt_next{0, -1};
    if (k + 1 < blocks) {
      const RowBand tb = rows_read(sorted.bucket, ends[k], ends[k + 1], h, img.H);
      tgt_next = {std::max(tb.first, tgt_band.last + 1), tb.last};
      tgt_band = tb;
    }
    // The block's taps; the logit rows they read, into the ring where it does not hold them yet.
    int64_t first = h, last = -1;
    for (int64_t p = 0; p < points; ++p) {
      const float cx = xy[2 * (p0 + p)], cy = xy[2 * (p0 + p) + 1];
      corners[p] = corners_at(cx, cy, h, w);
      tgt_taps.put(p, point_taps(cx, cy, img.H, img.W));
      const Corners& c = corners[p];
      if (c.valid[0] || c.valid[1]) first = std::min(first, c.y0), last = std::max(last, c.y0);
      if (c.valid[2] || c.valid[3]) first = std::min(first, c.y0 + 1), last = std::max(last, c.y0 + 1);
    }
    TORCH_INTERNAL_ASSERT(last - first < kRing, "point_matching_cost: a block reads more logit rows than its ring");
    for (int64_t r = first; r <= last; ++r) {
      if (ring_row[r % kRing] != r) {
        transpose_row(x, h * w, w, task.nq, R, r, ring.data() + (r % kRing) * w * R);
        ring_row[r % kRing] = r;
      }
    }
    for (int64_t p = 0; p < points; ++p) {
      const Corners& c = corners[p];
      RunTaps& rt = pred_taps[p];
      for (int q = 0; q < 4; ++q) {
        const int64_t row = c.y0 + (q >> 1), col = c.x0 + (q & 1);
        rt.run[q] = c.valid[q] ? ring.data() + ((row % kRing) * w + col) * R : nullptr;
        rt.w[q] = c.weight(q);
      }
      rt.inside = c.valid[0] && c.valid[1] && c.valid[2] && c.valid[3];
    }
    sample(img, tgt_taps, points, tgt_next, NP, t, one_minus_t, col_sums.data());
    sample_runs(pred_taps.data(), points, R, sig);
    bce_terms(sig, pos, neg, points * R);
    add_products(pos, R, t, points, NP, bce);
    add_products(neg, R, one_minus_t, points, NP, bce);
    add_products(sig, R, t, points, NP, sgt);
  }

  const int64_t* labels = base.labels.data_ptr<int64_t>() + img.first_label;
  float* out = base.cost.data_ptr<float>() + (task.b * Q + task.q0) * base.n_max;
  for (int64_t i = 0; i < task.nq; ++i) {
    const float* prob = in.prob.data_ptr<float>() + (task.b * Q + task.q0 + i) * C;
    for (int64_t j = 0; j < n; ++j) {
      const float bce_ij = bce[j * R + i], sgt_ij = sgt[j * R + i], sig_i = sgt[n * R + i];
      const float dice = 1.f - (2.f * sgt_ij + 1.f) / (sig_i + col_sums[j] + 1.f);
      // A label outside [0, K) (the no-object column included) gives NaN, as in the reference.
      const float p_label = labels[j] >= 0 && labels[j] < C - 1 ? prob[labels[j]]
                                                                : std::numeric_limits<float>::quiet_NaN();
      const float c = -wt.cost_class * p_label + wt.cost_mask * (bce_ij / static_cast<float>(P)) +
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
  const int64_t block = round_up((Q + splits - 1) / splits, kLanes);
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
