// The CPU solver of one assignment problem (fmf/lap.h), free of torch so that it reads as the
// executable specification of the CUDA kernel: every phase below has a block-parallel twin there
// that makes the same choices, ties included.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "fmf/lap.h"

namespace fmf {
namespace lap {

// One worker's buffers, reused for every image it solves. Nothing larger than one image's
// [rows, cols] cost is ever materialized.
class Solver {
 public:
  // Copies cost[q, t] (element strides sq, st) as double into the workspace, transposed when
  // `transposed` so that rows <= cols, and replaces +inf by the forbidden cost.
  template <typename scalar_t>
  Status load(const scalar_t* src, int64_t Q, int64_t n, int64_t sq, int64_t st, bool transposed) {
    rows_ = static_cast<int32_t>(transposed ? n : Q);
    cols_ = static_cast<int32_t>(transposed ? Q : n);
    c_.resize(static_cast<size_t>(rows_) * cols_);
    // One pass copies and finds the range with infinities included: lo = -inf flags a -inf entry,
    // hi = +inf a forbidden one (rare: only then is the finite range looked up). It walks the
    // workspace in order, so the source is read along its rows or, transposed, its columns.
    const int64_t sr = transposed ? st : sq, sk = transposed ? sq : st;
    double lo = kInf, hi = -kInf;
    int nan = 0;
    for (int64_t r = 0; r < rows_; ++r) {
      const scalar_t* s = src + r * sr;
      double* cr = c_.data() + r * cols_;
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(| : nan)
      for (int64_t k = 0; k < cols_; ++k) {
        const double h = static_cast<double>(s[k * sk]);
        nan |= h != h;
        lo = std::min(lo, h);
        hi = std::max(hi, h);
        cr[k] = h;
      }
    }
    if (nan) return kNaN;
    if (lo == -kInf) return kNegInf;
    big_ = kInf;
    if (hi < kInf) return kOk;
    lo = kInf, hi = -kInf;
    for (const double h : c_) {
      if (h < kInf) lo = std::min(lo, h), hi = std::max(hi, h);
    }
    if (lo > hi) return kInfeasible;  // every entry is +inf
    big_ = forbidden_cost(lo, hi, rows_);
    if (!std::isfinite(big_)) return kTooLarge;
    std::replace(c_.begin(), c_.end(), kInf, big_);
    return kOk;
  }

  // Solves the loaded problem; kInfeasible when the optimum still needs a forbidden pair.
  Status solve() {
    v_.assign(cols_, 0.0);
    x_.assign(rows_, -1);
    y_.assign(cols_, -1);
    free_.resize(rows_);
    d_.resize(cols_);
    pred_.resize(cols_);
    scanned_.resize(cols_);
    closed_.resize(cols_);
    int32_t n_free = rows_;
    if (rows_ == cols_) {
      n_free = reduce_columns();
    } else {
      std::iota(free_.begin(), free_.end(), 0);
    }
    if (cols_ > 1) {  // row reduction needs a second-cheapest column
      for (int pass = 0; pass < kArrPasses; ++pass) n_free = reduce_rows(n_free);
    }
    for (int32_t k = 0; k < n_free; ++k) augment(free_[k]);
    for (int32_t i = 0; i < rows_; ++i) {
      if (c_[static_cast<size_t>(i) * cols_ + x_[i]] == big_) return kInfeasible;
    }
    return kOk;
  }

  // Writes the pairs in the caller's (query, target) order, queries ascending.
  void write(bool transposed, int64_t* out_rows, int64_t* out_cols) const {
    if (!transposed) {
      for (int32_t i = 0; i < rows_; ++i) out_rows[i] = i, out_cols[i] = x_[i];
      return;
    }
    int64_t k = 0;
    for (int32_t j = 0; j < cols_; ++j) {
      if (y_[j] >= 0) out_rows[k] = j, out_cols[k] = y_[j], ++k;
    }
  }

 private:
  static constexpr double kInf = std::numeric_limits<double>::infinity();

  const double* row(int32_t i) const { return c_.data() + static_cast<size_t>(i) * cols_; }

  // Square problems only (a free column must keep dual 0 otherwise): v[j] = min over rows of
  // c[., j]; row i takes, of the columns whose minimum it holds, the one of smallest v. A row that
  // holds exactly one then moves the slack of its second-cheapest column onto that column's dual
  // (reduction transfer, every row against the duals before any transfer). Returns how many rows
  // are free, listed at the front of free_.
  int32_t reduce_columns() {
    std::vector<int32_t>& arg = pred_;  // pred_ and d_ are scratch until augment()
    std::fill(v_.begin(), v_.end(), kInf);
    for (int32_t i = 0; i < rows_; ++i) {
      const double* ci = row(i);
#pragma omp simd
      for (int32_t j = 0; j < cols_; ++j) {
        arg[j] = ci[j] < v_[j] ? i : arg[j];
        v_[j] = std::min(v_[j], ci[j]);
      }
    }
    std::vector<int32_t>& matches = free_;
    std::fill(matches.begin(), matches.end(), 0);
    for (int32_t j = cols_ - 1; j >= 0; --j) {
      const int32_t i = arg[j];
      if (++matches[i] == 1 || v_[j] < v_[x_[i]]) {
        if (x_[i] >= 0) y_[x_[i]] = -1;
        x_[i] = j;
        y_[j] = i;
      }
    }
    std::vector<double>& transfer = d_;
    for (int32_t i = 0; i < rows_; ++i) {
      transfer[i] = 0.0;
      if (matches[i] != 1 || cols_ < 2) continue;  // nothing to transfer without a second column
      const double* ci = row(i);
      const int32_t xi = x_[i];
      double m = kInf;
#pragma omp simd reduction(min : m)
      for (int32_t j = 0; j < cols_; ++j) m = std::min(m, j == xi ? kInf : ci[j] - v_[j]);
      transfer[i] = m;
    }
    int32_t n_free = 0;
    for (int32_t i = 0; i < rows_; ++i) {
      if (matches[i] == 0) {
        free_[n_free++] = i;  // safe in place: matches[i] for i' < i is no longer read
      } else if (matches[i] == 1) {
        v_[x_[i]] -= transfer[i];
      }
    }
    return n_free;
  }

  // One pass of augmenting row reduction over free_[0, n_free). Row i takes its cheapest column j1
  // and lowers v[j1] until j1 is only as cheap as its second-cheapest column, which keeps every
  // reduced cost >= 0; a row it displaces is processed next while that lowered v strictly. Returns
  // how many rows are left free (now at the front of free_).
  int32_t reduce_rows(int32_t n_free) {
    int32_t k = 0, n_next = 0;
    int64_t budget = static_cast<int64_t>(kArrStepsPerRow) * rows_;
    while (k < n_free) {
      const int32_t i = free_[k++];
      const double* ci = row(i);
      // The two smallest (reduced cost, column) pairs, lexicographically. Most blocks of four
      // columns hold neither, which their branch-free minimum tells at once.
      double m1 = kInf, m2 = kInf;
      int32_t j1 = -1, j2 = -1;
      const auto insert = [&](double h, int32_t j) {
        if (h < m2) {
          if (h < m1) {
            m2 = m1, j2 = j1, m1 = h, j1 = j;
          } else {
            m2 = h, j2 = j;
          }
        }
      };
      int32_t j = 0;
      for (; j + 4 <= cols_; j += 4) {
        const double h0 = ci[j] - v_[j], h1 = ci[j + 1] - v_[j + 1];
        const double h2 = ci[j + 2] - v_[j + 2], h3 = ci[j + 3] - v_[j + 3];
        if (std::min(std::min(h0, h1), std::min(h2, h3)) < m2) {
          insert(h0, j), insert(h1, j + 1), insert(h2, j + 2), insert(h3, j + 3);
        }
      }
      for (; j < cols_; ++j) insert(ci[j] - v_[j], j);
      int32_t i0 = y_[j1];
      if (m1 < m2) {
        v_[j1] -= m2 - m1;
      } else if (i0 >= 0) {  // a tie: the second column may be free
        j1 = j2;
        i0 = y_[j2];
      }
      x_[i] = j1;
      y_[j1] = i;
      if (i0 >= 0) {
        x_[i0] = -1;
        if (m1 < m2 && --budget > 0) {
          free_[--k] = i0;
        } else {
          free_[n_next++] = i0;
        }
      }
    }
    return n_next;
  }

  // Shortest augmenting path from free row f (Dijkstra on reduced costs c - v, each assigned row's
  // u implied by its tight pair), then the dual update that keeps the new matching optimal.
  void augment(int32_t f) {
    std::fill(d_.begin(), d_.end(), kInf);
    std::fill(closed_.begin(), closed_.end(), 0.0);
    int32_t n_scanned = 0, i = f, sink = -1;
    double ui = 0.0, dist = 0.0;
    while (sink < 0) {
      // Relax row i and pick the unscanned column of smallest (distance, column_key): in this
      // ascending scan, the first smallest distance unless a later free column ties with it.
      const double* ci = row(i);
      int32_t best_j = -1;
      bool best_busy = true;
      double best = kInf;
      for (int32_t j = 0; j < cols_; ++j) {
        // Whether row i brings j closer is a coin flip, and scanned columns are scattered: both
        // are applied without branches. closed_[j] is +inf once j is scanned, so its final
        // distance stays put and it is never picked again.
        const double h = ci[j] - v_[j] - ui + closed_[j];
        const int32_t closer = -static_cast<int32_t>(h < d_[j]);
        pred_[j] = (i & closer) | (pred_[j] & ~closer);
        d_[j] = std::min(d_[j], h);
        const double cand = d_[j] + closed_[j];
        if (cand <= best && (cand < best || (best_busy && y_[j] < 0))) {
          best = cand, best_j = j, best_busy = y_[j] >= 0;
        }
      }
      dist = best;
      if (!best_busy) {
        sink = best_j;
      } else {  // best_j is scanned: its distance is final; go on from the row that holds it
        closed_[best_j] = kInf;
        scanned_[n_scanned++] = best_j;
        i = y_[best_j];
        ui = row(i)[best_j] - v_[best_j] - dist;
      }
    }
    for (int32_t k = 0; k < n_scanned; ++k) v_[scanned_[k]] += d_[scanned_[k]] - dist;
    for (int32_t j = sink;;) {
      const int32_t r = pred_[j], next = x_[r];
      y_[j] = r;
      x_[r] = j;
      if (r == f) break;
      j = next;
    }
  }

  std::vector<double> c_;  // [rows, cols] oriented cost, +inf replaced by big_
  std::vector<double> v_, d_, closed_;  // column duals; Dijkstra distances; 0 or +inf once scanned
  std::vector<int32_t> x_, y_, pred_, scanned_, free_;  // row -> col, col -> row, path, scanned cols, free rows
  int32_t rows_ = 0, cols_ = 0;
  double big_ = kInf;
};

}  // namespace lap
}  // namespace fmf
