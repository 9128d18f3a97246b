// Batched matching cost on the GPU: one launch for the whole batch.
//
// Grid (target tiles, query tiles, image x share). A block takes a kTile x kTile tile of (queries,
// targets) of one image and one share of its pixels. For each chunk of kChunk pixels it stages in
// shared memory the focal terms of its queries, [pos; neg; sig] as [3][kChunk][kTile], and its
// targets read in place at their nearest-downsampled positions, [kChunk][kTile]; then each of the
// 16 x 16 threads adds to a 2 x 2 patch of sum pos t, sum neg t, sum sig t, and to its rows' sum
// neg, sum sig and its columns' sum t, in fp32 registers. Shares store their sums in a workspace;
// the last block of a tile to finish (an atomic counter per tile) adds the shares in a fixed order
// (deterministic) and writes the cost. No resized targets and no Q x h*w temporaries exist.
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
#include "fmf/index_rules.h"
#include "fmf/matching_cost.h"

namespace fmf {
namespace {

constexpr int kTile = 32;   // queries and targets per block
constexpr int kChunk = 32;  // pixels staged at once
constexpr int kThreads = 256;
constexpr int kSide = 16;   // threads per tile side; each owns a 2 x 2 patch
constexpr int kMaxShares = 64;
// One share's sums of a tile: [kTile][kTile][3] products, [kTile][2] row sums, [kTile] column sums.
constexpr int kProducts = kTile * kTile * 3;
constexpr int kRecord = kProducts + kTile * 2 + kTile;

template <typename scalar_t>
struct Params {
  const float* logits;  // [B, Q, C]
  const scalar_t* masks;  // [B, Q, h, w]
  const int64_t* labels;
  const ImageTargets* table;  // [B]
  float* cost;  // [B, Q, n_max], +inf already
  float* work;  // [B, q_tiles, j_tiles, shares, kRecord]
  int* counters;  // [B, q_tiles, j_tiles]
  int64_t Q, C, h, w, n_max;
  int q_tiles, j_tiles, shares;
  MaskKind kind;
  float cost_class, cost_mask, cost_dice, alpha, gamma;
};

__device__ float warp_max(float v) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) matching_cost_kernel(const Params<scalar_t> prm) {
  const int jt = blockIdx.x, qt = blockIdx.y;
  const int b = blockIdx.z / prm.shares, share = blockIdx.z % prm.shares;
  const ImageTargets img = prm.table[b];
  const int64_t q0 = static_cast<int64_t>(qt) * kTile, j0 = static_cast<int64_t>(jt) * kTile;
  if (j0 >= img.n) return;  // padding columns: the output is +inf there already

  __shared__ float terms[3][kChunk][kTile + 1];  // +1: conflict-free column writes
  __shared__ float tile[kChunk][kTile + 1];
  __shared__ float z_max[kTile], z_den[kTile];
  __shared__ bool last;
  const int tid = threadIdx.x, tx = tid % kSide, ty = tid / kSide;
  const int64_t Q = prm.Q, h = prm.h, w = prm.w, P = h * w;
  const int64_t chunks = (P + kChunk - 1) / kChunk;
  const int64_t c_begin = chunks * share / prm.shares, c_end = chunks * (share + 1) / prm.shares;
  const scalar_t* x = prm.masks + b * Q * P;

  float acc[3][2][2] = {};          // [pos t, neg t, sig t][row][column]
  float rows[2][2] = {}, cols[2] = {};  // [neg, sig][row]; sum t per column
  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t p0 = c * kChunk;
    for (int e = tid; e < kTile * kChunk; e += kThreads) {
      const int i = e / kChunk, k = e % kChunk;  // query / target i of the tile, pixel k of the chunk
      const int64_t p = p0 + k, q = q0 + i, j = j0 + i;
      CostTerms<float> ct{0.f, 0.f, 0.f};
      if (q < Q && p < P) ct = matching_terms(static_cast<float>(x[q * P + p]), prm.alpha, prm.gamma);
      terms[0][k][i] = ct.pos;
      terms[1][k][i] = ct.neg;
      terms[2][k][i] = ct.sig;
      float t = 0.f;
      if (j < img.n && p < P) {
        const int64_t src = nearest_src(p / w, img.H, h) * img.W + nearest_src(p % w, img.W, w);
        t = mask_value(img.masks, j * img.H * img.W + src, prm.kind);
      }
      tile[k][i] = t;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kChunk; ++k) {
      const float t[2] = {tile[k][2 * tx], tile[k][2 * tx + 1]};
      for (int r = 0; r < 2; ++r) {
        const float a[3] = {terms[0][k][2 * ty + r], terms[1][k][2 * ty + r], terms[2][k][2 * ty + r]};
        for (int s = 0; s < 3; ++s) {
          acc[s][r][0] += a[s] * t[0];
          acc[s][r][1] += a[s] * t[1];
        }
        rows[0][r] += a[1];
        rows[1][r] += a[2];
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
      for (int s = 0; s < 3; ++s) mine[((2 * ty + r) * kTile + 2 * tx + cc) * 3 + s] = acc[s][r][cc];
    }
  }
  for (int r = 0; r < 2 && tx == 0; ++r) {  // the row sums are the same in every column of threads
    mine[kProducts + (2 * ty + r) * 2] = rows[0][r];
    mine[kProducts + (2 * ty + r) * 2 + 1] = rows[1][r];
  }
  for (int cc = 0; cc < 2 && ty == 0; ++cc) mine[kProducts + 2 * kTile + 2 * tx + cc] = cols[cc];
  __threadfence();  // publish this share's sums before counting it as done
  __syncthreads();
  if (tid == 0) last = atomicAdd(prm.counters + tile_id, 1) == prm.shares - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();

  // The last share of the tile: the softmax of its queries, then the cost from every share's sums.
  const int warp = tid / 32, lane = tid % 32;
  for (int i = warp; i < kTile; i += kThreads / 32) {
    float mx = -INFINITY, den = 0.f;
    if (q0 + i < Q) {
      const float* z = prm.logits + (b * Q + q0 + i) * prm.C;
      for (int64_t cl = lane; cl < prm.C; cl += 32) mx = fmaxf(mx, z[cl]);
      mx = warp_max(mx);
      for (int64_t cl = lane; cl < prm.C; cl += 32) den += expf(z[cl] - mx);
      den = warp_sum(den);
    }
    if (lane == 0) z_max[i] = mx, z_den[i] = den;
  }
  __syncthreads();
  for (int r = 0; r < 2; ++r) {
    const int i = 2 * ty + r;
    const int64_t q = q0 + i;
    if (q >= Q) continue;
    float neg_all = 0.f, sig_all = 0.f;
    for (int s = 0; s < prm.shares; ++s) {
      neg_all += __ldcg(records + s * kRecord + kProducts + i * 2);
      sig_all += __ldcg(records + s * kRecord + kProducts + i * 2 + 1);
    }
    for (int cc = 0; cc < 2; ++cc) {
      const int jj = 2 * tx + cc;
      const int64_t j = j0 + jj;
      if (j >= img.n) continue;
      float sum[3] = {0.f, 0.f, 0.f}, t_all = 0.f;
      for (int s = 0; s < prm.shares; ++s) {
        const float* rec = records + s * kRecord;
        for (int k = 0; k < 3; ++k) sum[k] += __ldcg(rec + (i * kTile + jj) * 3 + k);
        t_all += __ldcg(rec + kProducts + 2 * kTile + jj);
      }
      const float focal = (sum[0] + neg_all - sum[1]) / static_cast<float>(P);  // neg @ (1 - t)
      const float dice = 1.f - (2.f * sum[2] + 1.f) / (sig_all + t_all + 1.f);
      const int64_t label = prm.labels[img.first_label + j];
      // Checking labels on the host would cost a sync: an out-of-range one (the no-object column
      // included) reads nothing and gives NaN, like any cost that is not finite; every solver
      // rejects NaN naming the image, and the matcher then says which input was wrong.
      const float prob = label >= 0 && label < prm.C - 1
                             ? expf(prm.logits[(b * Q + q) * prm.C + label] - z_max[i]) / z_den[i]
                             : NAN;
      const float cost = -prm.cost_class * prob + prm.cost_mask * focal + prm.cost_dice * dice;
      prm.cost[(b * Q + q) * prm.n_max + j] = isfinite(cost) ? cost : NAN;
    }
  }
}

at::Tensor matching_cost_cuda(const at::Tensor& pred_logits, const at::Tensor& pred_masks, const at::Tensor& tgt_labels,
                              at::TensorList tgt_masks, double cost_class, double cost_mask, double cost_dice,
                              double alpha, double gamma) {
  MatchingCostInputs in = prepare_matching_cost(pred_logits, pred_masks, tgt_labels, tgt_masks, at::kCUDA);
  const c10::cuda::CUDAGuard guard(pred_logits.device());
  const int64_t B = in.masks.size(0), Q = in.masks.size(1), h = in.masks.size(2), w = in.masks.size(3);
  if (B == 0 || Q == 0 || in.n_max == 0) return in.cost;

  const int q_tiles = static_cast<int>((Q + kTile - 1) / kTile);
  const int j_tiles = static_cast<int>((in.n_max + kTile - 1) / kTile);
  int64_t busy_tiles = 0;
  for (const ImageTargets& img : in.table) busy_tiles += q_tiles * ((img.n + kTile - 1) / kTile);
  // Split the pixels into shares until there are about two blocks per multiprocessor.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, pred_logits.device().index()));
  const int64_t chunks = (h * w + kChunk - 1) / kChunk;
  const int shares = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>({(2 * sms + busy_tiles - 1) / busy_tiles, chunks, kMaxShares})));

  // Pinned host memory and an asynchronous copy: the host does not wait for the GPU here (the
  // caching host allocator keeps the buffer until the copy has run).
  at::Tensor table = at::empty({B * 5}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(table.data_ptr<int64_t>(), in.table.data(), B * sizeof(ImageTargets));
  table = table.to(pred_logits.device(), /*non_blocking=*/true);
  const auto opts = pred_logits.options();
  at::Tensor work = at::empty({B * q_tiles * j_tiles * shares * kRecord}, opts.dtype(at::kFloat));
  at::Tensor counters = at::zeros({B * q_tiles * j_tiles}, opts.dtype(at::kInt));

  const dim3 grid(j_tiles, q_tiles, static_cast<unsigned>(B * shares));
  auto stream = c10::cuda::getCurrentCUDAStream();
  FMF_DISPATCH_FLOAT(in.masks.scalar_type(), "matching_cost_cuda", [&] {
    const Params<scalar_t> prm{in.logits.data_ptr<float>(),
                               in.masks.data_ptr<scalar_t>(),
                               in.labels.data_ptr<int64_t>(),
                               reinterpret_cast<const ImageTargets*>(table.data_ptr<int64_t>()),
                               in.cost.data_ptr<float>(),
                               work.data_ptr<float>(),
                               counters.data_ptr<int>(),
                               Q,
                               in.logits.size(2),
                               h,
                               w,
                               in.n_max,
                               q_tiles,
                               j_tiles,
                               shares,
                               in.kind,
                               static_cast<float>(cost_class),
                               static_cast<float>(cost_mask),
                               static_cast<float>(cost_dice),
                               static_cast<float>(alpha),
                               static_cast<float>(gamma)};
    matching_cost_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(prm);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return in.cost;
}

}  // namespace
}  // namespace fmf

TORCH_LIBRARY_IMPL(fastmaskformer, CUDA, m) {
  m.impl("matching_cost", &fmf::matching_cost_cuda);
}
