// Batched linear assignment on the CPU: each image solved by fmf::lap::Solver in double precision,
// the images shared between the calling thread (torch.ops has released the GIL) and helper threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "fmf/lap_host.h"
#include "fmf/lap_solver.h"

namespace fmf {
namespace {

// A helper thread is worth waking for this many cost entries (about 0.2 ms of solving): below
// that, waking it costs more than it saves.
constexpr int64_t kCellsPerHelper = 64 * 1024;

// The images of one call, claimed one at a time by the calling thread and by helpers from ATen's
// inter-op pool. Why not at::parallel_for: its closing barrier waits for every thread, and on a
// busy machine (a training job's data loaders, or this project's shared 2-core CI box) a thread
// may wait milliseconds for a core: there a 30 us batch measured 8-16 ms with 2 threads. Here the
// caller only ever waits for images a running helper has claimed; a helper that starts late finds
// nothing left and returns without touching the batch.
class Batch {
 public:
  Batch(int64_t size, std::function<void(lap::Solver&, int64_t)> solve) : size_(size), solve_(std::move(solve)) {}

  // Solves unclaimed images until none is left.
  void drain() {
    lap::Solver solver;
    for (int64_t b; (b = next_.fetch_add(1)) < size_;) {
      try {
        solve_(solver, b);
      } catch (...) {  // a helper's exception (only std::bad_alloc) is rethrown by wait()
        const std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
      if (done_.fetch_add(1) + 1 == size_) {
        const std::lock_guard<std::mutex> lock(mutex_);
        finished_.notify_all();
      }
    }
  }

  // Returns once every image is solved.
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    finished_.wait(lock, [&] { return done_.load() == size_; });
    if (error_) std::rethrow_exception(error_);
  }

 private:
  const int64_t size_;
  const std::function<void(lap::Solver&, int64_t)> solve_;
  std::atomic<int64_t> next_{0}, done_{0};
  std::mutex mutex_;
  std::condition_variable finished_;
  std::exception_ptr error_;
};

at::Tensor linear_sum_assignment_cpu(const at::Tensor& cost, const at::Tensor& sizes) {
  const auto offsets = lap::check_and_offsets(cost, sizes, at::kCPU);
  const int64_t B = cost.size(0), Q = cost.size(1), N = cost.size(2);
  auto out = at::full({2, B * std::min(Q, N)}, -1, cost.options().dtype(at::kLong));
  if (offsets[B] == 0) return out;
  const auto n = sizes.contiguous();
  const int64_t* n_ptr = n.data_ptr<int64_t>();
  int64_t* out_rows = out.data_ptr<int64_t>();
  int64_t* out_cols = out_rows + out.size(1);
  std::vector<int32_t> status(B, lap::kOk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cost.scalar_type(), "linear_sum_assignment_cpu", [&] {
    const scalar_t* src = cost.data_ptr<scalar_t>();
    auto batch = std::make_shared<Batch>(B, [&](lap::Solver& s, int64_t b) {
      if (offsets[b + 1] == offsets[b]) return;
      const bool transposed = Q > n_ptr[b];
      status[b] = s.load(src + b * cost.stride(0), Q, n_ptr[b], cost.stride(1), cost.stride(2), transposed);
      if (status[b] == lap::kOk) status[b] = s.solve();
      if (status[b] == lap::kOk) s.write(transposed, out_rows + offsets[b], out_cols + offsets[b]);
    });
    const int64_t helpers = std::min<int64_t>({at::get_num_threads() - 1, B - 1, B * Q * N / kCellsPerHelper});
    for (int64_t h = 0; h < helpers; ++h) at::launch([batch] { batch->drain(); });
    batch->drain();
    batch->wait();
  });
  lap::raise_first_error(status.data(), B);
  return out;
}

}  // namespace
}  // namespace fmf

TORCH_LIBRARY_IMPL(fastmaskformer, CPU, m) {
  m.impl("linear_sum_assignment", &fmf::linear_sum_assignment_cpu);
}
