// Fused CPU forward and backward passes of the SoftTriple loss (Qian et al., ICCV 2019).
//
// One autograd operator, `losses`, whose forward and backward passes are each one C++ call, so that no Python
// runs between the steps of a pass nor between the passes (autograd's node is C++ too):
//
//   loss_forward:  x_hat = x / ||x||  (kept transposed, (d, B): BLAS's fastest operand layout here),
//                  ||w_j|| per centre, t = w^T x_hat  (the similarity product, (C K, B), kept as it is),
//                  s = t / ||w_j|| and S'_c per class, the class-wise softmax p and the losses.
//   loss_backward: dl/dS' = lambda g (p - 1[c = y])  (formed class by class),  dl/ds (recomputing s and the
//                  soft assignment from t),  dl/dx_hat = (dl/ds)^T w / ||w||  and  dl/dw = x_hat (dl/ds / ||w||)^T
//                  (the two gradient products), and the radial parts of the two normalisations.
//
// Both passes are also operators of their own (loss_forward, loss_backward), which the tests call directly.
//
// The products are stored transposed, (C * K, B): rows c * K .. c * K + K - 1 are the K centres of class c
// and each row is a contiguous batch vector. The soft-assignment kernels work class by class, so the K rows of
// a class stay in L1 while all their element-wise work is done, and vectorise along the batch with at::vec.
// Nothing of size (C K, B) or (C, B) is written that a later pass could form in registers: the cosines, the
// soft assignment and dl/dS' are recomputed where they are used (measured: keeping dS'/ds was slower at 100
// and at 11318 classes; writing the cosines back and the (C, B) arrays of dl/dS' and of per-class dots cost
// about 3 ms of 150 at 11318 classes, nothing measurable at 100).
//
//   forward:  m = max_k s_k,  e_k = exp((s_k - m) / gamma),  q_k = e_k / sum_k' e_k',  S' = m + sum_k q_k (s_k - m)
//   backward: D_k = R q_k (1 + ((s_k - m) - (S' - m)) / gamma)    (= dl/ds_k; R = dl/dS')
//             G_k = D_k / ||w_k||,  rowdot_k = sum_i G_k s_k,
//             radial_i = sum_c sum_k D_k s_k  (= x_hat_i . dl/dx_hat_i; per thread, then summed in a fixed order)
// K = 2 (the paper's setting for many classes) has a closed form with one exp per pair instead of two:
//             q_1 = sigmoid((s_1 - s_0) / gamma),  S' = s_0 + q_1 (s_1 - s_0),
//             dS'/ds_1 = q_1 + q_0 q_1 (s_1 - s_0) / gamma,  dS'/ds_0 = 1 - dS'/ds_1.
// Everything is taken relative to the class's best centre m before dividing by gamma: in the hard-max limit
// (small gamma) S' - m is tiny and exact to its own rounding, where S' - s_k formed from S' itself would lose
// the digits that 1 / gamma then magnifies.
//
// The soft assignment's exponentials use at::vec's exp_u20 (a polynomial, inlined; float32 error within 20
// ulp, float64 unchanged), as PyTorch's own CPU attention softmax does: it halves the cost of these kernels,
// and the loss and gradients stay as close to a float64 evaluation as PyTorch's eager float32 ops are
// (integration_tests/pml_softtriple/test_cpu_kernels.py). The class-wise cross-entropy keeps the 1-ulp exp:
// its values are the loss.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using at::Tensor;

constexpr int64_t kGrainElements = 32768;  // least work (elements) worth a task of at::parallel_for

void check_2d_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous(), "soft_triple_cpu: ", name,
              " must be a contiguous 2-D CPU tensor, got shape ", t.sizes(), " strides ", t.strides());
}

void check_vector(const Tensor& t, int64_t size, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == size && t.is_contiguous(), "soft_triple_cpu: ",
              name, " must be a contiguous CPU vector of ", size, " elements, got shape ", t.sizes());
}

// Labels index the (C, B) arrays: out-of-range values raise ValueError (never a stray write).
void check_labels(const Tensor& labels, int64_t batch, int64_t classes) {
  TORCH_CHECK(labels.device().is_cpu() && labels.scalar_type() == at::kLong && labels.dim() == 1 &&
                  labels.size(0) == batch && labels.is_contiguous(),
              "soft_triple_cpu: labels must be a contiguous int64 CPU vector of ", batch, " elements, got ",
              labels.scalar_type(), " of shape ", labels.sizes());
  if (batch == 0) return;
  const int64_t* y = labels.data_ptr<int64_t>();
  const auto [low, high] = std::minmax_element(y, y + batch);
  TORCH_CHECK_VALUE(*low >= 0 && *high < classes, "SoftTripleLoss: labels must lie in [0, num_classes=",
                    classes, "), got values in [", *low, ", ", *high, "]");
}

// Non-finite embeddings give a non-finite norm; a non-finite norm of finite values (overflow) is no error.
template <typename scalar_t>
void check_finite_rows(const scalar_t* x, const scalar_t* norm, int64_t batch, int64_t dim) {
  for (int64_t b = 0; b < batch; ++b) {
    if (std::isfinite(norm[b])) continue;
    const scalar_t* row = x + b * dim;
    TORCH_CHECK_VALUE(std::all_of(row, row + dim, [](scalar_t v) { return std::isfinite(v); }),
                      "SoftTripleLoss: embeddings contain NaN or Inf (row ", b, ")");
  }
}

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_item));
}

template <typename scalar_t>
scalar_t inverse_norm(scalar_t norm, scalar_t eps) {
  return scalar_t(1) / std::max(norm, eps);  // 1 / max(||w||, eps), as torch.nn.functional.normalize
}

template <typename scalar_t>
scalar_t sum_lanes(const at::vec::Vectorized<scalar_t>& v) {
  using Vec = at::vec::Vectorized<scalar_t>;
  return at::vec::vec_reduce_all<scalar_t>([](Vec& a, Vec& b) { return a + b; }, v);
}

// ------------------------------------------------------------------------------------------ normalisation

// norm_i = ||x_i||, out = (x / max(||x_i||, eps))^T, (d, B), in one read of x: blocks of rows are transposed
// tile by tile (at::vec::transpose_mxn) into the output's columns, then scaled there while in L1.
template <typename scalar_t>
void normalize_transposed_impl(const Tensor& x, const Tensor& norm, const Tensor& out, scalar_t eps) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kRows = 16;
  const int64_t batch = x.size(0), dim = x.size(1);
  const scalar_t* src = x.data_ptr<scalar_t>();
  scalar_t* norm_out = norm.data_ptr<scalar_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  at::parallel_for(0, (batch + kRows - 1) / kRows, 1, [&](int64_t block_begin, int64_t block_end) {
    scalar_t inv[kRows];
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t row0 = block * kRows, rows = std::min(kRows, batch - row0);
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* row = src + (row0 + r) * dim;
        Vec acc(0);
        int64_t col = 0;
        for (; col + Vec::size() <= dim; col += Vec::size()) {
          const Vec v = Vec::loadu(row + col);
          acc = at::vec::fmadd(v, v, acc);
        }
        scalar_t sq = sum_lanes(acc);
        for (; col < dim; ++col) sq += row[col] * row[col];
        norm_out[row0 + r] = std::sqrt(sq);
        inv[r] = inverse_norm(norm_out[row0 + r], eps);
      }
      at::vec::transpose_mxn<scalar_t>(src + row0 * dim, dim, dst + row0, batch, static_cast<int>(rows),
                                       static_cast<int>(dim));
      for (int64_t col = 0; col < dim; ++col) {
        scalar_t* column = dst + col * batch + row0;
        for (int64_t r = 0; r < rows; ++r) column[r] *= inv[r];
      }
    }
  });
}

// out_j = ||w_j|| for the columns of the (d, N) weight, reading it once, row by row.
template <typename scalar_t>
void column_norms_impl(const Tensor& weight, const Tensor& out) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kColumns = 1024;  // accumulators of one task stay in L1 while every row streams through
  const int64_t rows = weight.size(0), cols = weight.size(1);
  const scalar_t* w = weight.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, cols, kColumns, [&](int64_t col_begin, int64_t col_end) {
    for (int64_t start = col_begin; start < col_end; start += kColumns) {
      const int64_t stop = std::min(col_end, start + kColumns);
      std::fill(o + start, o + stop, scalar_t(0));
      for (int64_t row = 0; row < rows; ++row) {
        const scalar_t* src = w + row * cols;
        int64_t col = start;
        for (; col + Vec::size() <= stop; col += Vec::size()) {
          const Vec v = Vec::loadu(src + col);
          at::vec::fmadd(v, v, Vec::loadu(o + col)).store(o + col);
        }
        for (; col < stop; ++col) o[col] += src[col] * src[col];
      }
      for (int64_t col = start; col < stop; ++col) o[col] = std::sqrt(o[col]);
    }
  });
}

// ------------------------------------------------------------------------------------------ soft assignment

// The raw pointers and sizes one forward call works on.
template <typename scalar_t>
struct ForwardArrays {
  const scalar_t* t_base;        // (C K, B): the products w_j . x_hat_i (read only)
  const scalar_t* norm_base;     // (C K): ||w_j||
  scalar_t* a_base;              // (C, B): S'
  int64_t classes, batch;
  scalar_t inv_g, eps;           // 1 / gamma, the norm clamp

  ForwardArrays(const Tensor& sim, const Tensor& norm, const Tensor& smooth, double inv_gamma, double eps_)
      : t_base(sim.data_ptr<scalar_t>()),
        norm_base(norm.data_ptr<scalar_t>()),
        a_base(smooth.data_ptr<scalar_t>()),
        classes(smooth.size(0)),
        batch(smooth.size(1)),
        inv_g(static_cast<scalar_t>(inv_gamma)),
        eps(static_cast<scalar_t>(eps_)) {}
};

// The samples of each class, so that the backward pass can put the label term of dl/dS' into the class's
// row alone: samples[start[c] .. start[c + 1]) are those with label c (a counting sort of the labels).
struct LabelBuckets {
  std::vector<int64_t> start, samples;

  LabelBuckets(const int64_t* labels, int64_t batch, int64_t classes) : start(classes + 1, 0), samples(batch) {
    for (int64_t b = 0; b < batch; ++b) ++start[labels[b] + 1];
    for (int64_t c = 0; c < classes; ++c) start[c + 1] += start[c];
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t b = 0; b < batch; ++b) samples[next[labels[b]]++] = b;
  }
};

// The raw pointers and sizes one backward call works on. dl/dS'_{c,i} = scale_i (p_{c,i} - 1[c = y_i]),
// scale_i = lambda g_i, is formed class by class where it is used, never stored as a (C, B) array.
template <typename scalar_t>
struct BackwardArrays {
  const scalar_t* t_base;        // (C K, B): the products w_j . x_hat_i
  const scalar_t* p_base;        // (C, B): class probabilities p
  const scalar_t* scale_base;    // (B): lambda g_i
  const LabelBuckets* buckets;
  const scalar_t* norm_base;     // (C K): ||w_j||
  scalar_t* g_base;              // (C K, B): dl/ds / ||w_j||  (out)
  scalar_t* d_base;              // (C K): row dots sum_i (dl/ds / ||w_j||) s  (out)
  scalar_t* radial_base;         // (threads, B): each thread's sums over its classes of dl/ds s  (out, += )
  int64_t classes, batch;
  scalar_t inv_g, eps;           // 1 / gamma, the norm clamp
};

// dl/dS' of class c into r (B): scale * p_c, less scale at the class's own samples.
template <typename scalar_t>
void class_grad_row(const BackwardArrays<scalar_t>& arrays, int64_t c, scalar_t* r) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const scalar_t* p = arrays.p_base + c * arrays.batch;
  const scalar_t* scale = arrays.scale_base;
  int64_t i = 0;
  for (; i + Vec::size() <= arrays.batch; i += Vec::size()) {
    (Vec::loadu(p + i) * Vec::loadu(scale + i)).store(r + i);
  }
  for (; i < arrays.batch; ++i) r[i] = p[i] * scale[i];
  const auto& start = arrays.buckets->start;
  for (int64_t n = start[c]; n < start[c + 1]; ++n) {
    const int64_t b = arrays.buckets->samples[n];
    r[b] -= scale[b];
  }
}

// Any K, forward: S' per (class, sample); s = t / ||w_j|| formed in registers.
template <typename scalar_t>
void forward_impl(const ForwardArrays<scalar_t>& arrays, int64_t k) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const auto [t_base, norm_base, a_base, classes, batch, inv_g, eps] = arrays;
  at::parallel_for(0, classes, grain_for(k * batch), [&](int64_t c_begin, int64_t c_end) {
    std::vector<scalar_t> scale(k);
    for (int64_t c = c_begin; c < c_end; ++c) {
      const scalar_t* t = t_base + c * k * batch;
      scalar_t* a_out = a_base + c * batch;
      for (int64_t j = 0; j < k; ++j) scale[j] = inverse_norm(norm_base[c * k + j], eps);
      int64_t i = 0;
      for (; i + Vec::size() <= batch; i += Vec::size()) {
        Vec top(-std::numeric_limits<scalar_t>::infinity());
        for (int64_t j = 0; j < k; ++j) top = at::vec::maximum(top, Vec::loadu(t + j * batch + i) * Vec(scale[j]));
        Vec z(0), a(0);
        for (int64_t j = 0; j < k; ++j) {
          const Vec v = Vec::loadu(t + j * batch + i) * Vec(scale[j]) - top;
          const Vec ev = (v * Vec(inv_g)).exp_u20();
          z = z + ev;
          a = at::vec::fmadd(ev, v, a);
        }
        (top + a / z).store(a_out + i);
      }
      for (; i < batch; ++i) {
        scalar_t top = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t j = 0; j < k; ++j) top = std::max(top, t[j * batch + i] * scale[j]);
        scalar_t z = 0, a = 0;
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t v = t[j * batch + i] * scale[j] - top;
          const scalar_t ev = std::exp(v * inv_g);
          z += ev;
          a += ev * v;
        }
        a_out[i] = top + a / z;
      }
    }
  });
}

// K = 2, forward: S' per (class, sample).
template <typename scalar_t>
void forward_pair_impl(const ForwardArrays<scalar_t>& arrays) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const auto [t_base, norm_base, a_base, classes, batch, inv_g, eps] = arrays;
  at::parallel_for(0, classes, grain_for(2 * batch), [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const scalar_t* t0 = t_base + 2 * c * batch;
      const scalar_t* t1 = t0 + batch;
      const scalar_t sc0 = inverse_norm(norm_base[2 * c], eps), sc1 = inverse_norm(norm_base[2 * c + 1], eps);
      scalar_t* a_out = a_base + c * batch;
      int64_t i = 0;
      for (; i + Vec::size() <= batch; i += Vec::size()) {
        const Vec v0 = Vec::loadu(t0 + i) * Vec(sc0), v1 = Vec::loadu(t1 + i) * Vec(sc1);
        const Vec diff = v1 - v0;
        const Vec q1 = Vec(1) / (Vec(1) + (diff * Vec(-inv_g)).exp_u20());
        at::vec::fmadd(q1, diff, v0).store(a_out + i);
      }
      for (; i < batch; ++i) {
        const scalar_t v0 = t0[i] * sc0, v1 = t1[i] * sc1;
        const scalar_t diff = v1 - v0;
        a_out[i] = v0 + diff / (scalar_t(1) + std::exp(-diff * inv_g));
      }
    }
  });
}

// Any K, backward: dl/ds / ||w_j|| into g, its row dots with s, and each thread's sums of dl/ds s per sample.
template <typename scalar_t>
void backward_impl(const BackwardArrays<scalar_t>& arrays, int64_t k) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t batch = arrays.batch;
  const scalar_t inv_g = arrays.inv_g;
  at::parallel_for(0, arrays.classes, grain_for(k * batch), [&](int64_t c_begin, int64_t c_end) {
    std::vector<Vec> acc(k), expo(k);
    std::vector<scalar_t> tail_acc(k), tail_expo(k), scale(k), r(batch);
    scalar_t* radial = arrays.radial_base + at::get_thread_num() * batch;
    for (int64_t c = c_begin; c < c_end; ++c) {
      const scalar_t* t = arrays.t_base + c * k * batch;
      scalar_t* g = arrays.g_base + c * k * batch;
      class_grad_row(arrays, c, r.data());
      for (int64_t j = 0; j < k; ++j) scale[j] = inverse_norm(arrays.norm_base[c * k + j], arrays.eps);
      std::fill(acc.begin(), acc.end(), Vec(0));
      std::fill(tail_acc.begin(), tail_acc.end(), scalar_t(0));
      int64_t i = 0;
      for (; i + Vec::size() <= batch; i += Vec::size()) {
        Vec top(-std::numeric_limits<scalar_t>::infinity());
        for (int64_t j = 0; j < k; ++j) top = at::vec::maximum(top, Vec::loadu(t + j * batch + i) * Vec(scale[j]));
        Vec z(0), a(0);
        for (int64_t j = 0; j < k; ++j) {
          const Vec v = Vec::loadu(t + j * batch + i) * Vec(scale[j]) - top;
          expo[j] = (v * Vec(inv_g)).exp_u20();
          z = z + expo[j];
          a = at::vec::fmadd(expo[j], v, a);
        }
        const Vec rz = Vec::loadu(r.data() + i) / z;
        const Vec smooth_rel = a / z;  // S' - m
        Vec pc(0);
        for (int64_t j = 0; j < k; ++j) {
          const Vec sv = Vec::loadu(t + j * batch + i) * Vec(scale[j]);
          const Vec dv = expo[j] * rz * at::vec::fmadd((sv - top) - smooth_rel, Vec(inv_g), Vec(1));
          const Vec gv = dv * Vec(scale[j]);
          gv.store(g + j * batch + i);
          acc[j] = at::vec::fmadd(gv, sv, acc[j]);
          pc = at::vec::fmadd(dv, sv, pc);
        }
        (Vec::loadu(radial + i) + pc).store(radial + i);
      }
      for (; i < batch; ++i) {
        scalar_t top = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t j = 0; j < k; ++j) top = std::max(top, t[j * batch + i] * scale[j]);
        scalar_t z = 0, a = 0;
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t v = t[j * batch + i] * scale[j] - top;
          tail_expo[j] = std::exp(v * inv_g);
          z += tail_expo[j];
          a += tail_expo[j] * v;
        }
        const scalar_t rz = r[i] / z, smooth_rel = a / z;
        scalar_t pc = 0;
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t sv = t[j * batch + i] * scale[j];
          const scalar_t dv = tail_expo[j] * rz * (scalar_t(1) + ((sv - top) - smooth_rel) * inv_g);
          const scalar_t gv = dv * scale[j];
          g[j * batch + i] = gv;
          tail_acc[j] += gv * sv;
          pc += dv * sv;
        }
        radial[i] += pc;
      }
      for (int64_t j = 0; j < k; ++j) arrays.d_base[c * k + j] = sum_lanes(acc[j]) + tail_acc[j];
    }
  });
}

// K = 2, backward: the same outputs as backward_impl.
template <typename scalar_t>
void backward_pair_impl(const BackwardArrays<scalar_t>& arrays) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t batch = arrays.batch;
  const scalar_t inv_g = arrays.inv_g;
  at::parallel_for(0, arrays.classes, grain_for(2 * batch), [&](int64_t c_begin, int64_t c_end) {
    std::vector<scalar_t> r(batch);
    scalar_t* radial = arrays.radial_base + at::get_thread_num() * batch;
    for (int64_t c = c_begin; c < c_end; ++c) {
      const scalar_t* t0 = arrays.t_base + 2 * c * batch;
      const scalar_t* t1 = t0 + batch;
      scalar_t* g0 = arrays.g_base + 2 * c * batch;
      scalar_t* g1 = g0 + batch;
      const scalar_t n0 = inverse_norm(arrays.norm_base[2 * c], arrays.eps);
      const scalar_t n1 = inverse_norm(arrays.norm_base[2 * c + 1], arrays.eps);
      class_grad_row(arrays, c, r.data());
      Vec acc0(0), acc1(0);
      int64_t i = 0;
      for (; i + Vec::size() <= batch; i += Vec::size()) {
        const Vec v0 = Vec::loadu(t0 + i) * Vec(n0), v1 = Vec::loadu(t1 + i) * Vec(n1);
        const Vec rv = Vec::loadu(r.data() + i);
        const Vec diff = v1 - v0;
        const Vec q1 = Vec(1) / (Vec(1) + (diff * Vec(-inv_g)).exp_u20());
        const Vec d1 = at::vec::fmadd((Vec(1) - q1) * q1, diff * Vec(inv_g), q1);  // dS'/ds_1
        const Vec dv1 = rv * d1, dv0 = rv - dv1;
        const Vec gv0 = dv0 * Vec(n0), gv1 = dv1 * Vec(n1);
        gv0.store(g0 + i);
        gv1.store(g1 + i);
        acc0 = at::vec::fmadd(gv0, v0, acc0);
        acc1 = at::vec::fmadd(gv1, v1, acc1);
        (Vec::loadu(radial + i) + at::vec::fmadd(dv1, v1, dv0 * v0)).store(radial + i);
      }
      scalar_t dot0 = sum_lanes(acc0), dot1 = sum_lanes(acc1);
      for (; i < batch; ++i) {
        const scalar_t v0 = t0[i] * n0, v1 = t1[i] * n1;
        const scalar_t diff = v1 - v0;
        const scalar_t q1 = scalar_t(1) / (scalar_t(1) + std::exp(-diff * inv_g));
        const scalar_t d1 = q1 + (scalar_t(1) - q1) * q1 * diff * inv_g;
        const scalar_t dv1 = r[i] * d1, dv0 = r[i] - dv1;
        g0[i] = dv0 * n0;
        g1[i] = dv1 * n1;
        dot0 += g0[i] * v0;
        dot1 += g1[i] * v1;
        radial[i] += dv0 * v0 + dv1 * v1;
      }
      arrays.d_base[2 * c] = dot0;
      arrays.d_base[2 * c + 1] = dot1;
    }
  });
}

// ------------------------------------------------------------------------------------------ cross-entropy

// Cross-entropy over classes, per sample: the logits l_c = lambda (S'_c - delta 1[c = y]) (a (C, B) array
// holding S' on entry) become the softmax probabilities p_c in place, and losses_i = log sum_c exp(l_c) - l_y.
// shift_by_la: the logits lie in [-lambda (1 + delta), lambda], so exp(l - lambda) can neither overflow nor
// underflow to a zero sum; otherwise each sample's largest logit is subtracted.
template <typename scalar_t>
void cross_entropy_impl(scalar_t* a, const int64_t* labels, scalar_t* losses, int64_t classes, int64_t batch,
                        scalar_t la, scalar_t margin, bool shift_by_la) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t grain = std::max<int64_t>(Vec::size(), grain_for(classes));
  at::parallel_for(0, batch, grain, [&](int64_t b_begin, int64_t b_end) {
    const int64_t width = b_end - b_begin;
    std::vector<scalar_t> top(width, la), total(width, scalar_t(0)), target(width);
    for (int64_t i = 0; i < width; ++i) {
      scalar_t& smooth_y = a[labels[b_begin + i] * batch + b_begin + i];
      smooth_y -= margin;
      target[i] = la * smooth_y;
    }
    if (!shift_by_la) {
      std::fill(top.begin(), top.end(), -std::numeric_limits<scalar_t>::infinity());
      for (int64_t c = 0; c < classes; ++c) {
        const scalar_t* row = a + c * batch + b_begin;
        for (int64_t i = 0; i < width; ++i) top[i] = std::max(top[i], la * row[i]);
      }
    }
    for (int64_t c = 0; c < classes; ++c) {
      scalar_t* row = a + c * batch + b_begin;
      int64_t i = 0;
      for (; i + Vec::size() <= width; i += Vec::size()) {
        const Vec e = at::vec::fmsub(Vec(la), Vec::loadu(row + i), Vec::loadu(top.data() + i)).exp();
        e.store(row + i);
        (Vec::loadu(total.data() + i) + e).store(total.data() + i);
      }
      for (; i < width; ++i) {
        row[i] = std::exp(la * row[i] - top[i]);
        total[i] += row[i];
      }
    }
    for (int64_t i = 0; i < width; ++i) {
      losses[b_begin + i] = std::log(total[i]) + top[i] - target[i];
      total[i] = scalar_t(1) / total[i];
    }
    for (int64_t c = 0; c < classes; ++c) {
      scalar_t* row = a + c * batch + b_begin;
      int64_t i = 0;
      for (; i + Vec::size() <= width; i += Vec::size()) {
        (Vec::loadu(row + i) * Vec::loadu(total.data() + i)).store(row + i);
      }
      for (; i < width; ++i) row[i] *= total[i];
    }
  });
}

// ------------------------------------------------------------------------------------------ radial parts

// Backward of x_hat = x / max(||x||, eps), in place on g = dl/dx_hat, (B, d):
// dl/dx = (g - x (x_hat . g) / ||x||) / ||x||, no radial part where ||x|| <= eps. x_hat_i . g_i is the
// sum over the rows of the per-thread partial sums (threads, B), taken in a fixed order.
template <typename scalar_t>
void embedding_grad_impl(scalar_t* g, const scalar_t* x, const scalar_t* x_norm, const scalar_t* partials,
                         int64_t batch, int64_t dim, int64_t threads, scalar_t eps) {
  using Vec = at::vec::Vectorized<scalar_t>;
  std::vector<scalar_t> radial(partials, partials + batch);
  for (int64_t thread = 1; thread < threads; ++thread) {
    const scalar_t* row = partials + thread * batch;
    int64_t b = 0;
    for (; b + Vec::size() <= batch; b += Vec::size()) {
      (Vec::loadu(radial.data() + b) + Vec::loadu(row + b)).store(radial.data() + b);
    }
    for (; b < batch; ++b) radial[b] += row[b];
  }
  at::parallel_for(0, batch, grain_for(dim), [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      const scalar_t inv = inverse_norm(x_norm[b], eps);
      const scalar_t factor = x_norm[b] > eps ? radial[b] * inv : scalar_t(0);
      scalar_t* gb = g + b * dim;
      const scalar_t* xb = x + b * dim;
      int64_t i = 0;
      for (; i + Vec::size() <= dim; i += Vec::size()) {
        (at::vec::fnmadd(Vec::loadu(xb + i), Vec(factor), Vec::loadu(gb + i)) * Vec(inv)).store(gb + i);
      }
      for (; i < dim; ++i) gb[i] = (gb[i] - xb[i] * factor) * inv;
    }
  });
}

// The radial part of the centre gradient: d s_{j,i} / d w_j = (x_hat_i - s_{j,i} w_j / ||w_j||) / ||w_j||, so
// column j loses w_j rowdot_j / ||w_j|| (none for columns of norm <= eps). In place on out (d, N) when
// accumulate; else out = -w_j rowdot_j / ||w_j||, for a product to accumulate onto.
template <typename scalar_t>
void center_radial_impl(scalar_t* out, const scalar_t* weight, const scalar_t* rowdot, const scalar_t* norm,
                        int64_t rows, int64_t cols, scalar_t eps, bool accumulate) {
  using Vec = at::vec::Vectorized<scalar_t>;
  std::vector<scalar_t> factor(cols);
  for (int64_t j = 0; j < cols; ++j) factor[j] = norm[j] > eps ? rowdot[j] / norm[j] : scalar_t(0);
  const scalar_t* f = factor.data();
  at::parallel_for(0, rows, grain_for(cols), [&](int64_t r_begin, int64_t r_end) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      scalar_t* o = out + r * cols;
      const scalar_t* w = weight + r * cols;
      int64_t j = 0;
      if (accumulate) {
        for (; j + Vec::size() <= cols; j += Vec::size()) {
          at::vec::fnmadd(Vec::loadu(w + j), Vec::loadu(f + j), Vec::loadu(o + j)).store(o + j);
        }
        for (; j < cols; ++j) o[j] -= w[j] * f[j];
      } else {
        for (; j + Vec::size() <= cols; j += Vec::size()) {
          at::vec::fnmadd(Vec::loadu(w + j), Vec::loadu(f + j), Vec(0)).store(o + j);
        }
        for (; j < cols; ++j) o[j] = -w[j] * f[j];
      }
    }
  });
}

// ------------------------------------------------------------------------------------------ operators

// loss_forward(x, w, y, K, lambda, gamma, delta, eps) -> (losses, ||x_i||, x_hat^T, ||w_j||, t, p): the whole
// forward pass; the products t = w^T x_hat (C K, B) and the class probabilities p (C, B) are what loss_backward
// needs besides the inputs. Labels outside [0, C) and non-finite embeddings raise ValueError.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> loss_forward(const Tensor& embeddings,
                                                                        const Tensor& weight,
                                                                        const Tensor& labels, int64_t k,
                                                                        double la, double gamma, double margin,
                                                                        double eps) {
  check_2d_contiguous(embeddings, "embeddings");
  check_2d_contiguous(weight, "weight");
  TORCH_CHECK(embeddings.scalar_type() == weight.scalar_type() && at::isFloatingType(weight.scalar_type()),
              "soft_triple_cpu: embeddings and weight must have the same float dtype, got ",
              embeddings.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(k >= 1 && weight.size(1) % k == 0 && weight.size(1) > 0 && embeddings.size(1) == weight.size(0),
              "soft_triple_cpu: weight must have shape (d, C * K) for embeddings of shape (B, d), got ",
              weight.sizes(), " and ", embeddings.sizes(), " with K = ", k);
  const int64_t batch = embeddings.size(0), dim = embeddings.size(1), classes = weight.size(1) / k;
  check_labels(labels, batch, classes);
  const auto options = embeddings.options();
  Tensor x_norm = at::empty({batch}, options), x_hat_t = at::empty({dim, batch}, options);
  Tensor norm = at::empty({classes * k}, options);
  Tensor prob = at::empty({classes, batch}, options), losses = at::empty({batch}, options);
  // The logits lie in [-lambda (1 + delta), lambda]: shifting them by lambda is safe unless lambda is huge.
  const double tiny = embeddings.scalar_type() == at::kFloat ? std::numeric_limits<float>::min()
                                                             : std::numeric_limits<double>::min();
  const bool shift_by_la = la * (2.0 + margin) + 2.0 < -std::log(tiny) - 2.0;
  Tensor sim;
  AT_DISPATCH_FLOATING_TYPES(embeddings.scalar_type(), "soft_triple_loss_forward", [&] {
    normalize_transposed_impl<scalar_t>(embeddings, x_norm, x_hat_t, static_cast<scalar_t>(eps));
    check_finite_rows<scalar_t>(embeddings.data_ptr<scalar_t>(), x_norm.data_ptr<scalar_t>(), batch, dim);
    column_norms_impl<scalar_t>(weight, norm);
    sim = at::mm(weight.t(), x_hat_t);
    const ForwardArrays<scalar_t> arrays(sim, norm, prob, 1.0 / gamma, eps);
    if (k == 2) {
      forward_pair_impl<scalar_t>(arrays);
    } else {
      forward_impl<scalar_t>(arrays, k);
    }
    cross_entropy_impl<scalar_t>(prob.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(),
                                 losses.data_ptr<scalar_t>(), classes, batch, static_cast<scalar_t>(la),
                                 static_cast<scalar_t>(margin), shift_by_la);
  });
  return {losses, x_norm, x_hat_t, norm, sim, prob};
}

// loss_backward(g, x, ||x_i||, x_hat^T, w, ||w_j||, t, p, y, grad_sim!, K, lambda, gamma, eps, embeddings_grad,
// weight_grad) -> (dl/dx, dl/dw), an output not asked for empty. The scratch array grad_sim (C K, B) is
// overwritten (with dl/dt).
std::tuple<Tensor, Tensor> loss_backward(const Tensor& grad_losses, const Tensor& embeddings,
                                         const Tensor& x_norm, const Tensor& x_hat_t, const Tensor& weight,
                                         const Tensor& norm, const Tensor& sim, const Tensor& prob,
                                         const Tensor& labels, const Tensor& grad_sim, int64_t k, double la,
                                         double gamma, double eps, bool embeddings_grad, bool weight_grad) {
  const std::pair<const Tensor*, const char*> matrices[] = {{&embeddings, "embeddings"}, {&x_hat_t, "x_hat_t"},
                                                            {&weight, "weight"},         {&sim, "sim"},
                                                            {&prob, "prob"},             {&grad_sim, "grad_sim"}};
  for (const auto& [t, name] : matrices) {
    check_2d_contiguous(*t, name);
    TORCH_CHECK(t->scalar_type() == sim.scalar_type(), "soft_triple_cpu: ", name, " has dtype ",
                t->scalar_type(), ", expected ", sim.scalar_type());
  }
  const int64_t batch = embeddings.size(0), dim = embeddings.size(1), classes = prob.size(0);
  TORCH_CHECK(k >= 1 && sim.size(0) == classes * k && sim.size(1) == batch && prob.size(1) == batch &&
                  grad_sim.sizes() == sim.sizes() && weight.size(0) == dim && weight.size(1) == classes * k &&
                  x_hat_t.size(0) == dim && x_hat_t.size(1) == batch,
              "soft_triple_cpu.loss_backward: shape mismatch: sim ", sim.sizes(), ", prob ", prob.sizes(),
              ", weight ", weight.sizes(), ", embeddings ", embeddings.sizes(), ", K = ", k);
  check_vector(x_norm, batch, "x_norm");
  check_vector(norm, classes * k, "norm");
  TORCH_CHECK(grad_losses.dim() == 1 && grad_losses.size(0) == batch &&
                  grad_losses.scalar_type() == sim.scalar_type() && grad_losses.device().is_cpu(),
              "soft_triple_cpu: grad_losses must be a CPU vector of ", batch, " elements of dtype ",
              sim.scalar_type(), ", got ", grad_losses.scalar_type(), " of shape ", grad_losses.sizes());
  check_labels(labels, batch, classes);
  Tensor grad_embeddings = at::empty({0}, sim.options()), grad_weight = at::empty({0}, sim.options());
  Tensor rowdot = at::empty({classes * k}, sim.options());
  const LabelBuckets buckets(labels.data_ptr<int64_t>(), batch, classes);
  const int64_t threads = at::get_num_threads();
  Tensor radial = at::zeros({threads, batch}, sim.options());  // per-thread sums of dl/ds s per sample
  AT_DISPATCH_FLOATING_TYPES(sim.scalar_type(), "soft_triple_loss_backward", [&] {
    const auto e = static_cast<scalar_t>(eps);
    std::vector<scalar_t> scale(batch);  // lambda g_i, g of any stride (an expanded mean's gradient)
    const scalar_t* g = grad_losses.data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b) scale[b] = static_cast<scalar_t>(la) * g[b * grad_losses.stride(0)];
    const BackwardArrays<scalar_t> arrays{sim.data_ptr<scalar_t>(),
                                          prob.data_ptr<scalar_t>(),
                                          scale.data(),
                                          &buckets,
                                          norm.data_ptr<scalar_t>(),
                                          grad_sim.data_ptr<scalar_t>(),
                                          rowdot.data_ptr<scalar_t>(),
                                          radial.data_ptr<scalar_t>(),
                                          classes,
                                          batch,
                                          static_cast<scalar_t>(1.0 / gamma),
                                          e};
    if (k == 2) {
      backward_pair_impl<scalar_t>(arrays);
    } else {
      backward_impl<scalar_t>(arrays, k);
    }
    if (embeddings_grad) {
      grad_embeddings = at::mm(grad_sim.t(), weight.t());
      embedding_grad_impl<scalar_t>(grad_embeddings.data_ptr<scalar_t>(), embeddings.data_ptr<scalar_t>(),
                                    x_norm.data_ptr<scalar_t>(), radial.data_ptr<scalar_t>(), batch, dim,
                                    threads, e);
    }
    if (weight_grad) {
      const int64_t cols = classes * k;
      const scalar_t* w = weight.data_ptr<scalar_t>();
      if (weight.numel() >= (int64_t(1) << 21)) {  // large: the product accumulates onto the radial part
        grad_weight = at::empty_like(weight);
        center_radial_impl<scalar_t>(grad_weight.data_ptr<scalar_t>(), w, rowdot.data_ptr<scalar_t>(),
                                     norm.data_ptr<scalar_t>(), dim, cols, e, false);
        grad_weight.addmm_(x_hat_t, grad_sim.t());
      } else {
        grad_weight = at::mm(x_hat_t, grad_sim.t());
        center_radial_impl<scalar_t>(grad_weight.data_ptr<scalar_t>(), w, rowdot.data_ptr<scalar_t>(),
                                     norm.data_ptr<scalar_t>(), dim, cols, e, true);
      }
    }
  });
  return {grad_embeddings, grad_weight};
}

// ------------------------------------------------------------------------------------------ autograd

// The backward pass's scratch array (C K, B), kept per thread between calls: a fresh one per step would cost
// page faults comparable to the arithmetic done on it.
thread_local Tensor backward_scratch;

// release_scratch(): frees this thread's scratch array (the next backward pass allocates it again).
void release_scratch() { backward_scratch.reset(); }

// slot, reused when its shape and dtype match and nothing else holds it, else a new array put in its place.
Tensor reusable_scratch(Tensor& slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!slot.defined() || slot.sizes() != sizes || slot.dtype() != options.dtype() || slot.use_count() > 1) {
    slot = at::empty(sizes, options);
  }
  return slot;
}

// As torch.autograd.function.once_differentiable: gradients that depend on differentiable upstream gradients
// (create_graph=True) get a node that raises when they are differentiated, instead of silently being constants.
torch::autograd::variable_list differentiating_raises(const torch::autograd::variable_list& grads) {
  torch::autograd::DelayedError error(
      "SoftTripleLoss: trying to differentiate twice a function that is differentiable once (its backward "
      "pass, the fused CPU kernels, is not differentiable)",
      static_cast<int64_t>(grads.size()));
  torch::autograd::variable_list inputs;
  inputs.reserve(grads.size());
  for (const Tensor& grad : grads) {
    inputs.push_back(grad.defined() ? grad.detach().set_requires_grad(true) : Tensor());
  }
  return error.apply(std::move(inputs));
}

}  // namespace

namespace graftkit {

// losses = loss_forward(...)[0] with loss_backward as its gradient: the node autograd records for `losses`
// (its grad_fn reads CppNode<graftkit::SoftTripleLossFunction>).
class SoftTripleLossFunction : public torch::autograd::Function<SoftTripleLossFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& embeddings, const Tensor& weight,
                        const Tensor& labels, int64_t k, double la, double gamma, double margin, double eps) {
    auto [losses, x_norm, x_hat_t, norm, sim, prob] =
        loss_forward(embeddings, weight, labels, k, la, gamma, margin, eps);
    ctx->save_for_backward({embeddings, weight, labels, x_norm, x_hat_t, norm, sim, prob});
    ctx->saved_data["k"] = k;
    ctx->saved_data["la"] = la;
    ctx->saved_data["gamma"] = gamma;
    ctx->saved_data["eps"] = eps;
    return losses;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const bool create_graph = at::GradMode::is_enabled();
    at::NoGradGuard no_grad;  // the products inside are not part of any graph
    const auto saved = ctx->get_saved_variables();
    const Tensor &embeddings = saved[0], &weight = saved[1], &labels = saved[2], &x_norm = saved[3];
    const Tensor &x_hat_t = saved[4], &norm = saved[5], &sim = saved[6], &prob = saved[7];
    Tensor grad_losses = grad_outputs[0];
    if (grad_losses.scalar_type() != sim.scalar_type()) grad_losses = grad_losses.to(sim.scalar_type());
    const bool embeddings_grad = ctx->needs_input_grad(0), weight_grad = ctx->needs_input_grad(1);
    auto [grad_embeddings, grad_weight] = loss_backward(
        grad_losses, embeddings, x_norm, x_hat_t, weight, norm, sim, prob, labels,
        reusable_scratch(backward_scratch, sim.sizes(), sim.options()), ctx->saved_data["k"].toInt(),
        ctx->saved_data["la"].toDouble(), ctx->saved_data["gamma"].toDouble(), ctx->saved_data["eps"].toDouble(),
        embeddings_grad, weight_grad);
    torch::autograd::variable_list grads = {embeddings_grad ? grad_embeddings : Tensor(),
                                             weight_grad ? grad_weight : Tensor(),
                                             Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    if (create_graph && grad_outputs[0].requires_grad()) {
      at::AutoGradMode enable_grad(true);
      return differentiating_raises(grads);
    }
    return grads;
  }
};

}  // namespace graftkit

namespace {

// losses(x, w, y, K, lambda, gamma, delta, eps) -> per-sample losses (B), differentiable in x and w.
Tensor losses_autograd(const Tensor& embeddings, const Tensor& weight, const Tensor& labels, int64_t k,
                       double la, double gamma, double margin, double eps) {
  return graftkit::SoftTripleLossFunction::apply(embeddings, weight, labels, k, la, gamma, margin, eps);
}

// The same below autograd (inference mode): the forward pass only, nothing kept.
Tensor losses_no_grad(const Tensor& embeddings, const Tensor& weight, const Tensor& labels, int64_t k, double la,
                      double gamma, double margin, double eps) {
  return std::get<0>(loss_forward(embeddings, weight, labels, k, la, gamma, margin, eps));
}

}  // namespace

TORCH_LIBRARY(graftkit_soft_triple, m) {
  m.def("loss_forward(Tensor embeddings, Tensor weight, Tensor labels, int k, float la, float gamma, "
        "float margin, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("loss_backward(Tensor grad_losses, Tensor embeddings, Tensor x_norm, Tensor x_hat_t, Tensor weight, "
        "Tensor norm, Tensor sim, Tensor prob, Tensor labels, Tensor(a!) grad_sim, int k, float la, float gamma, "
        "float eps, bool embeddings_grad, bool weight_grad) "
        "-> (Tensor, Tensor)");
  m.def("losses(Tensor embeddings, Tensor weight, Tensor labels, int k, float la, float gamma, float margin, "
        "float eps) -> Tensor");
  m.def("release_scratch() -> ()", &release_scratch);
}

TORCH_LIBRARY_IMPL(graftkit_soft_triple, Autograd, m) {
  m.impl("losses", &losses_autograd);
}

TORCH_LIBRARY_IMPL(graftkit_soft_triple, CPU, m) {
  m.impl("loss_forward", &loss_forward);
  m.impl("loss_backward", &loss_backward);
  m.impl("losses", &losses_no_grad);
}
