// Batched point-sampled matching cost on the GPU: one launch for the whole batch.
//
// Grid (target tiles, query tiles, image x share). A block takes a kTile x kTile tile of (queries,
// targets) of one image and one share of its points. For each chunk of kChunk points it computes
// the points' bilinear taps at the prediction and at the target size (fmf/point_sampling.h), then
// stages in shared memory its queries' logits sampled there as [BCE(x, 1); BCE(x, 0); sigmoid(x)],
// [3][kChunk][kTile], and its targets sampled in place, [kChunk][kTile]. Each of the 16 x 16
// threads adds to a 2 x 2 patch of sum (pos t + neg (1 - t)) and sum sig t, to its rows' sum sig
// and its columns' sum t, in fp32 registers. Shares store their sums in a workspace; the last block
// of a tile to finish (an atomic counter per tile) adds the shares in a fixed order
// (deterministic) and writes the cost. No sampled [Q, P] or [n, P] tensor exists.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "fmf/focal_math.h"
#include "fmf/point_matching_cost.h"
#include "fmf/point_sampling.h"

namespace fmf {
namespace {

constexpr int kTile = 32;   // queries and targets per block
constexpr int kChunk = 32;  // points staged at once
constexpr int kThreads = 256;
constexpr int kSide = 16;   // threads per tile side; each owns a 2 x 2 patch
constexpr int kMaxShares = 64;
constexpr int kMaxGridZ = 65535;
// One share's sums of a tile: [kTile][kTile][2] products (bce, sig t), [kTile] row sums of sig,
// [kTile] column sums of t.
constexpr int kProducts = kTile * kTile * 2;
constexpr int kRecord = kProducts + 2 * kTile;

template <typename scalar_t>
struct Params {
  const float* prob;          // [B, Q, C], softmax of the class logits
  const scalar_t* masks;      // [B, Q, h, w]
  const float* coords;        // [B, P, 2]
  const int64_t* labels;
  const ImageTargets* table;  // [B]
  float* cost;                // [B, Q, n_max], +inf already
  float* work;                // [B, q_tiles, j_tiles, shares, kRecord]
  int* counters;              // [B, q_tiles, j_tiles]
  int64_t Q, C, h, w, P, n_max;
  int q_tiles, j_tiles, shares;
  MaskKind kind;
  float cost_class, cost_mask, cost_dice;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) point_matching_cost_kernel(const Params<scalar_t> prm) {
  const int jt = blockIdx.x, qt = blockIdx.y;
  const int b = blockIdx.z / prm.shares, share = blockIdx.z % prm.shares;
  const ImageTargets img = prm.table[b];
  const int64_t q0 = static_cast<int64_t>(qt) * kTile, j0 = static_cast<int64_t>(jt) * kTile;
  if (j0 >= img.n) return;  // padding columns: the output is +inf there already

  __shared__ PointTaps taps[2][kChunk];          // [prediction size, target size][point]
  __shared__ float terms[3][kChunk][kTile + 1];  // +1: conflict-free column writes
  __shared__ float tile[kChunk][kTile + 1];
  __shared__ bool last;
  const int tid = threadIdx.x, tx = tid % kSide, ty = tid / kSide;
  const int64_t Q = prm.Q, P = prm.P, hw = prm.h * prm.w;
  const int64_t chunks = (P + kChunk - 1) / kChunk;
  const int64_t c_begin = chunks * share / prm.shares, c_end = chunks * (share + 1) / prm.shares;
  const scalar_t* x = prm.masks + b * Q * hw;
  const float* coords = prm.coords + b * P * 2;

  float acc[2][2][2] = {};              // [bce, sig t][row][column]
  float rows[2] = {}, cols[2] = {};     // sum sig per row; sum t per column
  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t p0 = c * kChunk;
    if (tid < 2 * kChunk) {
      const int k = tid % kChunk;
      const bool target = tid >= kChunk;
      const int64_t p = p0 + k < P ? p0 + k : P - 1;  // a point past P is never used
      taps[target][k] = point_taps(coords[2 * p], coords[2 * p + 1], target ? img.H : prm.h, target ? img.W : prm.w);
    }
    __syncthreads();
    for (int e = tid; e < kTile * kChunk; e += kThreads) {
      const int i = e / kChunk, k = e % kChunk;  // query / target i of the tile, point k of the chunk
      const int64_t p = p0 + k, q = q0 + i, j = j0 + i;
      float pos = 0.f, neg = 0.f, sig = 0.f;
      if (q < Q && p < P) {
        const scalar_t* xq = x + q * hw;
        const Logistic<float> l = logistic(sample_at(taps[0][k], [&](int64_t o) { return static_cast<float>(xq[o]); }));
        pos = l.sp_neg, neg = l.sp, sig = l.sig;
      }
      terms[0][k][i] = pos;
      terms[1][k][i] = neg;
      terms[2][k][i] = sig;
      float t = 0.f;
      if (j < img.n && p < P) {
        const int64_t base = j * img.H * img.W;
        t = sample_at(taps[1][k], [&](int64_t o) { return mask_value(img.masks, base + o, prm.kind); });
      }
      tile[k][i] = t;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kChunk; ++k) {
      const float t[2] = {tile[k][2 * tx], tile[k][2 * tx + 1]};
      for (int r = 0; r < 2; ++r) {
        const float pos = terms[0][k][2 * ty + r], neg = terms[1][k][2 * ty + r], sig = terms[2][k][2 * ty + r];
        for (int cc = 0; cc < 2; ++cc) {
          acc[0][r][cc] += pos * t[cc] + neg * (1.f - t[cc]);  // BCE(x, t), no cancellation
          acc[1][r][cc] += sig * t[cc];
        }
        rows[r] += sig;
      }
      cols[0] += t[0];
      cols[1] += t[1];
    }
    __syncthreads();
  }

  const int64_t tile_id = (static_cast<int64_t>(b) * prm.q_tiles + qt) * prm.j_tiles + jt;
  float* records = prm.work + tile_id * prm.shares * kRecord;
  float* mine = records + static_cast<int64_t>(share) * kRecord;
  for (int r = 0; r < 2; ++r) {
    for (int cc = 0; cc < 2; ++cc) {
      for (int s = 0; s < 2; ++s) mine[((2 * ty + r) * kTile + 2 * tx + cc) * 2 + s] = acc[s][r][cc];
    }
  }
  for (int r = 0; r < 2 && tx == 0; ++r) mine[kProducts + 2 * ty + r] = rows[r];  // the same in every column
  for (int cc = 0; cc < 2 && ty == 0; ++cc) mine[kProducts + kTile + 2 * tx + cc] = cols[cc];
  __threadfence();  // publish this share's sums before counting it as done
  __syncthreads();
  if (tid == 0) last = atomicAdd(prm.counters + tile_id, 1) == prm.shares - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();

  // The last share of the tile: the cost from every share's sums, added in share order.
  for (int r = 0; r < 2; ++r) {
    const int i = 2 * ty + r;
    const int64_t q = q0 + i;
    if (q >= Q) continue;
    float sig_all = 0.f;
    for (int s = 0; s < prm.shares; ++s) sig_all += __ldcg(records + s * kRecord + kProducts + i);
    for (int cc = 0; cc < 2; ++cc) {
      const int jj = 2 * tx + cc;
      const int64_t j = j0 + jj;
      if (j >= img.n) continue;
      float bce = 0.f, sig_t = 0.f, t_all = 0.f;
      for (int s = 0; s < prm.shares; ++s) {
        const float* rec = records + s * kRecord;
        bce += __ldcg(rec + (i * kTile + jj) * 2);
        sig_t += __ldcg(rec + (i * kTile + jj) * 2 + 1);
        t_all += __ldcg(rec + kProducts + kTile + jj);
      }
      const float dice = 1.f - (2.f * sig_t + 1.f) / (sig_all + t_all + 1.f);
      const int64_t label = prm.labels[img.first_label + j];
      // Checking labels on the host would cost a sync: an out-of-range one (the no-object column
      // included) reads nothing and gives NaN, as in the reference; every solver rejects NaN naming
      // the image, and the matcher then says which input was wrong.
      const float prob = label >= 0 && label < prm.C - 1 ? prm.prob[(b * Q + q) * prm.C + label] : NAN;
      const float cost = -prm.cost_class * prob + prm.cost_mask * (bce / static_cast<float>(prm.P)) +
                         prm.cost_dice * dice;
      prm.cost[(b * Q + q) * prm.n_max + j] = isfinite(cost) ? cost : NAN;
    }
  }
}

at::Tensor point_matching_cost_cuda(const at::Tensor& pred_logits, const at::Tensor& pred_masks,
                                    const at::Tensor& tgt_labels, at::TensorList tgt_masks, const at::Tensor& coords,
                                    double cost_class, double cost_mask, double cost_dice) {
  const PointMatchingCostInputs in =
      prepare_point_matching_cost(pred_logits, pred_masks, tgt_labels, tgt_masks, coords, at::kCUDA);
  const c10::cuda::CUDAGuard guard(pred_logits.device());
  const MatchingCostInputs& base = in.base;
  const int64_t B = base.masks.size(0), Q = base.masks.size(1);
  if (B == 0 || Q == 0 || base.n_max == 0) return base.cost;
  TORCH_CHECK_VALUE(B <= kMaxGridZ, "pred_logits: the CUDA kernel takes up to ", kMaxGridZ, " images, got ", B);

  const int q_tiles = static_cast<int>((Q + kTile - 1) / kTile);
  const int j_tiles = static_cast<int>((base.n_max + kTile - 1) / kTile);
  int64_t busy_tiles = 0;
  for (const ImageTargets& img : base.table) busy_tiles += q_tiles * ((img.n + kTile - 1) / kTile);
  // Split the points into shares until there are about two blocks per multiprocessor.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, pred_logits.device().index()));
  const int64_t chunks = (in.P + kChunk - 1) / kChunk;
  const int shares = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({(2 * sms + busy_tiles - 1) / busy_tiles, chunks, kMaxShares, kMaxGridZ / B})));

  // Pinned host memory and an asynchronous copy: the host does not wait for the GPU here (the
  // caching host allocator keeps the buffer until the copy has run).
  at::Tensor table = at::empty({B * 5}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(table.data_ptr<int64_t>(), base.table.data(), B * sizeof(ImageTargets));
  table = table.to(pred_logits.device(), /*non_blocking=*/true);
  const auto opts = pred_logits.options();
  at::Tensor work = at::empty({B * q_tiles * j_tiles * shares * kRecord}, opts.dtype(at::kFloat));
  at::Tensor counters = at::zeros({B * q_tiles * j_tiles}, opts.dtype(at::kInt));

  const dim3 grid(j_tiles, q_tiles, static_cast<unsigned>(B * shares));
  auto stream = c10::cuda::getCurrentCUDAStream();
  FMF_DISPATCH_FLOAT(base.masks.scalar_type(), "point_matching_cost_cuda", [&] {
    const Params<scalar_t> prm{in.prob.data_ptr<float>(),
                               base.masks.data_ptr<scalar_t>(),
                               in.coords.data_ptr<float>(),
                               base.labels.data_ptr<int64_t>(),
                               reinterpret_cast<const ImageTargets*>(table.data_ptr<int64_t>()),
                               base.cost.data_ptr<float>(),
                               work.data_ptr<float>(),
                               counters.data_ptr<int>(),
                               Q,
                               in.prob.size(2),
                               base.masks.size(2),
                               base.masks.size(3),
                               in.P,
                               base.n_max,
                               q_tiles,
                               j_tiles,
                               shares,
                               base.kind,
                               static_cast<float>(cost_class),
                               static_cast<float>(cost_mask),
                               static_cast<float>(cost_dice)};
    point_matching_cost_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(prm);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return base.cost;
}

}  // namespace
}  // namespace fmf

TORCH_LIBRARY_IMPL(fastmaskformer, CUDA, m) {
  m.impl("point_matching_cost", &fmf::point_matching_cost_cuda);
}
