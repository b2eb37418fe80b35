// The paper's `elevate` on CPU in one pass per row, forward and backward (peft_infosteer/_elevate.py has the formula;
// peft_infosteer/_native.py builds this file once per machine and falls back to the ATen path when it cannot).
//
// Why a kernel: at one token per call (generation) the ATen path is seven or eight small kernels per layer, each
// dispatched with the caches cold from the layer's matmuls, and their count, not their arithmetic, is the cost. Here a
// row is read once: the sum of the keys for the mean, and the m lowest-ranked keys kept in a small buffer (m is about
// 1% of d_ff, so almost every key is rejected by one comparison with the buffer's worst).
//
// Ranking: keys are compared as unsigned integers that order like the floats (|k| for "magnitude", k for "value");
// NaN ranks above everything (as torch.topk ranks it). Ties go to the lower index, so the selection is deterministic.
// Sums accumulate in double; values are computed in float (double for float64 keys) and rounded once.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

template <typename acc_t>
using rank_t = std::conditional_t<std::is_same_v<acc_t, double>, uint64_t, uint32_t>;
// (rank, index) in one integer: comparing it compares the rank first and, on equal ranks, the index
template <typename acc_t>
using packed_t = std::conditional_t<std::is_same_v<acc_t, double>, unsigned __int128, uint64_t>;

// An unsigned integer that orders like the float key (|v| or v); NaN of either sign ranks last. Branch-free, so the
// loop computing it vectorises.
template <typename acc_t, bool by_value>
inline rank_t<acc_t> rank_of(acc_t v) {
  using U = rank_t<acc_t>;
  constexpr U sign = U(1) << (sizeof(U) * 8 - 1);
  constexpr U inf = std::is_same_v<acc_t, double> ? U(0x7FF0000000000000ULL) : U(0x7F800000U);
  U bits;
  std::memcpy(&bits, &v, sizeof(U));
  const U magnitude = bits & ~sign;  // NaN magnitudes are above inf's already
  if (!by_value) return magnitude;   // |v|: -0.0 ranks as +0.0
  // v: negatives reversed, below the positives; -0.0 ranks as +0.0 (they are equal floats: ties)
  const U ordered = magnitude == 0 ? sign : (bits & sign) ? ~bits : (bits | sign);
  return magnitude > inf ? std::numeric_limits<U>::max() : ordered;
}

constexpr int64_t kGrain = 8;   // rows per task: a decode step (one row) never pays for a thread hand-off
constexpr int64_t kBlock = 16;  // keys screened together against a threshold (one vectorised comparison)

// The selection of one row (ranks and packed (rank, index) pairs of it), in `candidates` (room for max(d, 4q)).
//
// A row's q lowest pairs come from a screen: keys whose rank exceeds the threshold are skipped a block at a time, the
// rest are appended. With a threshold carried over from the previous row (rows of one call are tokens of one layer,
// so their bottom percentiles are alike) the screen passes about q keys and appends them without a branch; without
// one (the first row, or when too few keys passed) the threshold starts above every key and falls as candidates come
// in, compacted to the q lowest whenever the buffer fills.
template <typename scalar_t, typename acc_t, bool by_value>
struct RowSelector {
  using U = rank_t<acc_t>;
  using P = packed_t<acc_t>;
  static constexpr int shift = sizeof(U) * 8;

  int64_t d, m;
  std::vector<P> candidates;
  U carried = 0;
  bool has_carried = false;

  RowSelector(int64_t d_, int64_t m_) : d(d_), m(m_), candidates(std::max<int64_t>(d_, 8 * m_)) {}

  static P pack(U rank, int64_t j) { return (P(rank) << shift) | P(j); }
  static U rank_part(P p) { return static_cast<U>(p >> shift); }

  // the m lowest pairs of `row` into candidates[0, m); q >= m lowest are found so that q's rank can be carried
  void select(const scalar_t* row, bool carry) {
    const int64_t q = carry ? std::min(d, 2 * m) : m;
    int64_t count = 0;
    if (has_carried) count = screen_with(row, carried);
    if (count < m) count = screen_falling(row, q);  // no threshold yet, or it let too few keys through
    if (count > q) {
      std::nth_element(candidates.begin(), candidates.begin() + (q - 1), candidates.begin() + count);
      count = q;  // candidates[q - 1] is now the q-th lowest, the highest of the q kept
    } else if (carry && count == q) {
      std::iter_swap(candidates.begin() + (q - 1), std::max_element(candidates.begin(), candidates.begin() + q));
    }
    if (carry && count == q) {
      carried = rank_part(candidates[q - 1]);
      has_carried = true;
    }
    if (count > m) std::nth_element(candidates.begin(), candidates.begin() + (m - 1), candidates.begin() + count);
  }

  // calls visit(rank, j) for every key of each block of kBlock keys where one ranks at most `threshold` (read per
  // block, so visit may lower it); the ranks of a block are computed in one vectorised pass
  template <typename Visit>
  void screen(const scalar_t* row, const U& threshold, Visit visit) {
    for (int64_t j0 = 0; j0 < d; j0 += kBlock) {
      const int64_t width = std::min(kBlock, d - j0);
      U ranks[kBlock];
      bool any = false;
      for (int64_t u = 0; u < width; ++u) {
        ranks[u] = rank_of<acc_t, by_value>(static_cast<acc_t>(row[j0 + u]));
        any |= ranks[u] <= threshold;
      }
      if (!any) continue;
      for (int64_t u = 0; u < width; ++u) visit(ranks[u], j0 + u);
    }
  }

  // every key ranked at most `threshold`, appended without a branch; returns how many
  int64_t screen_with(const scalar_t* row, U threshold) {
    int64_t count = 0;
    screen(row, threshold, [&](U rank, int64_t j) {
      candidates[count] = pack(rank, j);
      count += rank <= threshold;
    });
    return count;
  }

  // the q lowest pairs, the threshold falling from above every key; returns how many candidates remain (>= q)
  int64_t screen_falling(const scalar_t* row, int64_t q) {
    const int64_t capacity = 4 * q;
    P threshold = std::numeric_limits<P>::max();
    U threshold_rank = std::numeric_limits<U>::max();
    int64_t count = 0;
    screen(row, threshold_rank, [&](U rank, int64_t j) {
      const P candidate = pack(rank, j);
      if (candidate >= threshold) return;
      candidates[count++] = candidate;
      if (count == capacity) {
        std::nth_element(candidates.begin(), candidates.begin() + (q - 1), candidates.begin() + count);
        count = q;
        threshold = candidates[q - 1];  // the q-th lowest so far; everything before it is lower
        threshold_rank = rank_part(threshold);
      }
    });
    return count;
  }

  int64_t index_at(int64_t t) const { return static_cast<int64_t>(candidates[t] & ((P(1) << shift) - 1)); }
};

template <typename scalar_t, typename acc_t, bool by_value>
void forward_rows(const scalar_t* k, scalar_t* out, int64_t* index, scalar_t* picked, int64_t rows, int64_t d,
                  int64_t m, double scale) {
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    RowSelector<scalar_t, acc_t, by_value> selector(d, m);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = k + r * d;
      scalar_t* row_out = out + r * d;
      std::memcpy(row_out, row, sizeof(scalar_t) * d);
      // the sum for the mean in double (a signed sum may cancel), in kBlock independent chains (vectorised)
      double chains[kBlock] = {};
      int64_t j = 0;
      for (; j + kBlock <= d; j += kBlock) {
        for (int64_t u = 0; u < kBlock; ++u) {
          const double v = static_cast<acc_t>(row[j + u]);
          chains[u] += by_value ? v : std::fabs(v);
        }
      }
      double sum = 0.0;
      for (; j < d; ++j) {
        const double v = static_cast<acc_t>(row[j]);
        sum += by_value ? v : std::fabs(v);
      }
      for (int64_t u = 0; u < kBlock; ++u) sum += chains[u];
      selector.select(row, /*carry=*/r + 1 < end);
      const acc_t value = static_cast<acc_t>(sum / static_cast<double>(d) * scale);
      for (int64_t t = 0; t < m; ++t) {
        const int64_t at = selector.index_at(t);
        index[r * m + t] = at;
        picked[r * m + t] = row[at];
        // each replaced coefficient keeps its own sign, the sign of 0 counting as + (-0.0 + 0.0 is +0.0)
        const acc_t own = static_cast<acc_t>(row[at]) + acc_t(0);
        row_out[at] = static_cast<scalar_t>(by_value ? value : std::copysign(value, own));
      }
    }
  });
}

template <typename acc_t>
inline acc_t sign_of(acc_t v) {  // torch.sign: 0 for either zero
  return static_cast<acc_t>((v > 0) - (v < 0));
}

template <typename scalar_t, typename acc_t, bool by_value>
void backward_rows(const scalar_t* grad_out, const scalar_t* out, const int64_t* index, const scalar_t* picked,
                   scalar_t* grad, int64_t rows, int64_t d, int64_t m, double scale) {
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* g = grad_out + r * d;
      const scalar_t* o = out + r * d;
      const int64_t* at = index + r * m;
      const scalar_t* p = picked + r * m;
      scalar_t* row_grad = grad + r * d;
      double total = 0.0;
      for (int64_t t = 0; t < m; ++t) {
        const double gs = static_cast<acc_t>(g[at[t]]);
        // the replaced value is alpha * mean with the sign of k_s, 0 counting as + (as in the forward)
        total += by_value ? gs : (static_cast<acc_t>(p[t]) >= 0 ? gs : -gs);
      }
      const acc_t share = static_cast<acc_t>(scale / static_cast<double>(d) * total);
      // dL/dk_j = g_j + share * sign(k_j) (sign(k) = sign(k') outside the selection) ...
      for (int64_t j = 0; j < d; ++j) {
        const acc_t through_mean = by_value ? share : share * sign_of(static_cast<acc_t>(o[j]));
        row_grad[j] = static_cast<scalar_t>(static_cast<acc_t>(g[j]) + through_mean);
      }
      // ... and a replaced coefficient gets only its share, times d|k_s|/dk_s = sign(k_s) (0 for 0, as torch's)
      for (int64_t t = 0; t < m; ++t) {
        row_grad[at[t]] = static_cast<scalar_t>(by_value ? share : share * sign_of(static_cast<acc_t>(p[t])));
      }
    }
  });
}

void check_keys(const torch::Tensor& k, int64_t m) {
  TORCH_CHECK(k.device().is_cpu(), "the native elevate kernel runs on CPU tensors only");
  TORCH_CHECK(k.dim() >= 1 && k.size(-1) > 0, "elevate needs at least one key coefficient per row");
  TORCH_CHECK(m >= 1 && m <= k.size(-1), "elevate replaces between 1 and d_ff coefficients per row, got ", m);
}

}  // namespace

std::vector<torch::Tensor> elevate_forward(const torch::Tensor& k, int64_t m, double scale, bool by_value) {
  check_keys(k, m);
  const auto keys = k.contiguous();
  const int64_t d = keys.size(-1);
  const int64_t rows = keys.numel() / d;
  auto selected = keys.sizes().vec();
  selected.back() = m;
  auto out = torch::empty_like(keys, at::MemoryFormat::Contiguous);
  auto index = torch::empty(selected, keys.options().dtype(torch::kLong));
  auto picked = torch::empty(selected, keys.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, keys.scalar_type(), "elevate_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto run = by_value ? forward_rows<scalar_t, acc_t, true> : forward_rows<scalar_t, acc_t, false>;
    run(keys.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), picked.data_ptr<scalar_t>(),
        rows, d, m, scale);
  });
  return {out, index, picked};
}

torch::Tensor elevate_backward(const torch::Tensor& grad_out, const torch::Tensor& out, const torch::Tensor& index,
                               const torch::Tensor& picked, double scale, bool by_value) {
  check_keys(out, index.size(-1));
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.scalar_type() == out.scalar_type(),
              "the gradient must have the keys' shape and dtype");
  const auto g = grad_out.contiguous();
  const auto o = out.contiguous();
  const auto at = index.contiguous();
  const auto p = picked.contiguous();
  const int64_t d = o.size(-1);
  const int64_t m = at.size(-1);
  const int64_t rows = o.numel() / d;
  auto grad = torch::empty_like(g, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "elevate_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto run = by_value ? backward_rows<scalar_t, acc_t, true> : backward_rows<scalar_t, acc_t, false>;
    run(g.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), at.data_ptr<int64_t>(), p.data_ptr<scalar_t>(),
        grad.data_ptr<scalar_t>(), rows, d, m, scale);
  });
  return grad;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("elevate_forward", &elevate_forward, "elevate forward: (elevated keys, selected indices, values there)");
  module.def("elevate_backward", &elevate_backward, "elevate backward: dL/dk from dL/dk'");
}
