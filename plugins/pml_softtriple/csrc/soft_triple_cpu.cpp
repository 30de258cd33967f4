// Fused CPU kernels for the element-wise part of the SoftTriple loss (Qian et al., ICCV 2019).
//
// The similarities are stored transposed, (C * K, B): rows c * K .. c * K + K - 1 are the K centres of class c
// and each row is a contiguous batch vector. Both kernels work class by class, so the K rows of a class stay
// in L1 while all their element-wise work is done, and vectorise along the batch with at::vec (Sleef's exp).
// The soft assignment q is recomputed in the backward pass rather than stored: an exp costs less than
// moving a (C K, B) array through memory twice more.
//
//   forward:  s = s_raw * scale    (scale_j = 1 / ||w_j||; in place)
//             m = max_k s_k,  e_k = exp((s_k - m) / gamma),  q_k = e_k / sum_k' e_k',  S' = m + sum_k q_k (s_k - m)
//   backward: D_k = R q_k (1 + ((s_k - m) - (S' - m)) / gamma)    (= dl/ds_k; R = dl/dS', (C, B))
//             G_k = D_k inv_norm_k,  rowdot_k = sum_i G_k s_k,  coldot_c = sum_k D_k s_k    (coldot: (C, B))
// K = 2 (the paper's setting for many classes) has a closed form with one exp per pair instead of two:
//             q_1 = sigmoid((s_1 - s_0) / gamma),  S' = s_0 + q_1 (s_1 - s_0),
//             dS'/ds_1 = q_1 + q_0 q_1 (s_1 - s_0) / gamma,  dS'/ds_0 = 1 - dS'/ds_1.
// Everything is taken relative to the class's best centre m before dividing by gamma: in the hard-max limit
// (small gamma) S' - m is tiny and exact to its own rounding, where S' - s_k formed from S' itself would lose
// the digits that 1 / gamma then magnifies.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

void check_2d_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous(), "soft_triple_cpu: ", name,
              " must be a contiguous 2-D CPU tensor, got shape ", t.sizes(), " strides ", t.strides());
}

int64_t class_grain(int64_t k, int64_t batch) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, k * batch));
}

// The raw pointers and sizes one forward call works on.
template <typename scalar_t>
struct ForwardArrays {
  scalar_t* t_base;              // (C K, B): raw products in, cosines s out
  const scalar_t* scale_base;    // (C K): 1 / ||w_j||
  scalar_t* a_base;              // (C, B): S'
  int64_t classes, batch;
  scalar_t inv_g;                // 1 / gamma

  ForwardArrays(const Tensor& sim, const Tensor& scale, const Tensor& smooth, double inv_gamma)
      : t_base(sim.data_ptr<scalar_t>()),
        scale_base(scale.data_ptr<scalar_t>()),
        a_base(smooth.data_ptr<scalar_t>()),
        classes(smooth.size(0)),
        batch(smooth.size(1)),
        inv_g(static_cast<scalar_t>(inv_gamma)) {}
};

// The raw pointers and sizes one backward call works on.
template <typename scalar_t>
struct BackwardArrays {
  const scalar_t* t_base;        // (C K, B): s
  const scalar_t* r_base;        // (C, B): dl/dS'
  const scalar_t* n_base;        // (C K): 1 / ||w_j||
  scalar_t* g_base;              // (C K, B): dl/ds / ||w_j||
  scalar_t* d_base;              // (C K): row dots
  scalar_t* p_base;              // (C, B): per-class column dots
  int64_t classes, batch;
  scalar_t inv_g;                // 1 / gamma

  BackwardArrays(const Tensor& sim, const Tensor& grad_smooth, const Tensor& inv_norm, const Tensor& grad,
                 const Tensor& rowdot, const Tensor& coldot, double inv_gamma)
      : t_base(sim.data_ptr<scalar_t>()),
        r_base(grad_smooth.data_ptr<scalar_t>()),
        n_base(inv_norm.data_ptr<scalar_t>()),
        g_base(grad.data_ptr<scalar_t>()),
        d_base(rowdot.data_ptr<scalar_t>()),
        p_base(coldot.data_ptr<scalar_t>()),
        classes(grad_smooth.size(0)),
        batch(grad_smooth.size(1)),
        inv_g(static_cast<scalar_t>(inv_gamma)) {}
};

template <typename scalar_t>
void forward_impl(const ForwardArrays<scalar_t>& arrays, int64_t k) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const auto [t_base, scale_base, a_base, classes, batch, inv_g] = arrays;
  at::parallel_for(0, classes, class_grain(k, batch), [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      scalar_t* t = t_base + c * k * batch;
      const scalar_t* sc = scale_base + c * k;
      scalar_t* a_out = a_base + c * batch;
      int64_t i = 0;
      for (; i + Vec::size() <= batch; i += Vec::size()) {
        Vec top(-std::numeric_limits<scalar_t>::infinity());
        for (int64_t j = 0; j < k; ++j) {
          const Vec v = Vec::loadu(t + j * batch + i) * Vec(sc[j]);
          v.store(t + j * batch + i);
          top = at::vec::maximum(top, v);
        }
        Vec z(0), a(0);
        for (int64_t j = 0; j < k; ++j) {
          const Vec v = Vec::loadu(t + j * batch + i) - top;
          const Vec ev = (v * Vec(inv_g)).exp();
          z = z + ev;
          a = at::vec::fmadd(ev, v, a);
        }
        (top + a / z).store(a_out + i);
      }
      for (; i < batch; ++i) {
        scalar_t top = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t j = 0; j < k; ++j) {
          t[j * batch + i] *= sc[j];
          top = std::max(top, t[j * batch + i]);
        }
        scalar_t z = 0, a = 0;
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t v = t[j * batch + i] - top;
          const scalar_t ev = std::exp(v * inv_g);
          z += ev;
          a += ev * v;
        }
        a_out[i] = top + a / z;
      }
    }
  });
}

// K = 2, forward: s in place and S' per (class, sample).
template <typename scalar_t>
void forward_pair_impl(const ForwardArrays<scalar_t>& arrays) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const auto [t_base, scale_base, a_base, classes, batch, inv_g] = arrays;
  at::parallel_for(0, classes, class_grain(2, batch), [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      scalar_t* s0 = t_base + 2 * c * batch;
      scalar_t* s1 = s0 + batch;
      const scalar_t sc0 = scale_base[2 * c], sc1 = scale_base[2 * c + 1];
      scalar_t* a_out = a_base + c * batch;
      int64_t i = 0;
      for (; i + Vec::size() <= batch; i += Vec::size()) {
        const Vec v0 = Vec::loadu(s0 + i) * Vec(sc0), v1 = Vec::loadu(s1 + i) * Vec(sc1);
        v0.store(s0 + i);
        v1.store(s1 + i);
        const Vec diff = v1 - v0;
        const Vec q1 = Vec(1) / (Vec(1) + (diff * Vec(-inv_g)).exp());
        at::vec::fmadd(q1, diff, v0).store(a_out + i);
      }
      for (; i < batch; ++i) {
        s0[i] *= sc0;
        s1[i] *= sc1;
        const scalar_t diff = s1[i] - s0[i];
        a_out[i] = s0[i] + diff / (scalar_t(1) + std::exp(-diff * inv_g));
      }
    }
  });
}

// K = 2, backward: the same outputs as backward_impl.
template <typename scalar_t>
void backward_pair_impl(const BackwardArrays<scalar_t>& arrays) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const auto [t_base, r_base, n_base, g_base, d_base, p_base, classes, batch, inv_g] = arrays;
  at::parallel_for(0, classes, class_grain(2, batch), [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const scalar_t* s0 = t_base + 2 * c * batch;
      const scalar_t* s1 = s0 + batch;
      scalar_t* g0 = g_base + 2 * c * batch;
      scalar_t* g1 = g0 + batch;
      const scalar_t n0 = n_base[2 * c], n1 = n_base[2 * c + 1];
      const scalar_t* r = r_base + c * batch;
      scalar_t* p = p_base + c * batch;
      Vec acc0(0), acc1(0);
      int64_t i = 0;
      for (; i + Vec::size() <= batch; i += Vec::size()) {
        const Vec v0 = Vec::loadu(s0 + i), v1 = Vec::loadu(s1 + i), rv = Vec::loadu(r + i);
        const Vec diff = v1 - v0;
        const Vec q1 = Vec(1) / (Vec(1) + (diff * Vec(-inv_g)).exp());
        const Vec d1 = at::vec::fmadd((Vec(1) - q1) * q1, diff * Vec(inv_g), q1);  // dS'/ds_1
        const Vec dv1 = rv * d1, dv0 = rv - dv1;
        const Vec gv0 = dv0 * Vec(n0), gv1 = dv1 * Vec(n1);
        gv0.store(g0 + i);
        gv1.store(g1 + i);
        acc0 = at::vec::fmadd(gv0, v0, acc0);
        acc1 = at::vec::fmadd(gv1, v1, acc1);
        at::vec::fmadd(dv1, v1, dv0 * v0).store(p + i);
      }
      scalar_t dot0 = at::vec::vec_reduce_all<scalar_t>([](Vec& x, Vec& y) { return x + y; }, acc0);
      scalar_t dot1 = at::vec::vec_reduce_all<scalar_t>([](Vec& x, Vec& y) { return x + y; }, acc1);
      for (; i < batch; ++i) {
        const scalar_t diff = s1[i] - s0[i];
        const scalar_t q1 = scalar_t(1) / (scalar_t(1) + std::exp(-diff * inv_g));
        const scalar_t d1 = q1 + (scalar_t(1) - q1) * q1 * diff * inv_g;
        const scalar_t dv1 = r[i] * d1, dv0 = r[i] - dv1;
        g0[i] = dv0 * n0;
        g1[i] = dv1 * n1;
        dot0 += g0[i] * s0[i];
        dot1 += g1[i] * s1[i];
        p[i] = dv0 * s0[i] + dv1 * s1[i];
      }
      d_base[2 * c] = dot0;
      d_base[2 * c + 1] = dot1;
    }
  });
}

template <typename scalar_t>
void backward_impl(const BackwardArrays<scalar_t>& arrays, int64_t k) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const auto [t_base, r_base, n_base, g_base, d_base, p_base, classes, batch, inv_g] = arrays;
  at::parallel_for(0, classes, class_grain(k, batch), [&](int64_t c_begin, int64_t c_end) {
    std::vector<Vec> acc(k), expo(k);
    std::vector<scalar_t> tail_acc(k), tail_expo(k);
    for (int64_t c = c_begin; c < c_end; ++c) {
      const scalar_t* t = t_base + c * k * batch;
      scalar_t* g = g_base + c * k * batch;
      const scalar_t* n = n_base + c * k;
      const scalar_t* r = r_base + c * batch;
      scalar_t* p = p_base + c * batch;
      std::fill(acc.begin(), acc.end(), Vec(0));
      std::fill(tail_acc.begin(), tail_acc.end(), scalar_t(0));
      int64_t i = 0;
      for (; i + Vec::size() <= batch; i += Vec::size()) {
        Vec top(-std::numeric_limits<scalar_t>::infinity());
        for (int64_t j = 0; j < k; ++j) top = at::vec::maximum(top, Vec::loadu(t + j * batch + i));
        Vec z(0), a(0);
        for (int64_t j = 0; j < k; ++j) {
          const Vec v = Vec::loadu(t + j * batch + i) - top;
          expo[j] = (v * Vec(inv_g)).exp();
          z = z + expo[j];
          a = at::vec::fmadd(expo[j], v, a);
        }
        const Vec rz = Vec::loadu(r + i) / z;
        const Vec smooth_rel = a / z;  // S' - m
        Vec pc(0);
        for (int64_t j = 0; j < k; ++j) {
          const Vec tv = Vec::loadu(t + j * batch + i);
          const Vec dv = expo[j] * rz * at::vec::fmadd((tv - top) - smooth_rel, Vec(inv_g), Vec(1));
          const Vec gv = dv * Vec(n[j]);
          gv.store(g + j * batch + i);
          acc[j] = at::vec::fmadd(gv, tv, acc[j]);
          pc = at::vec::fmadd(dv, tv, pc);
        }
        pc.store(p + i);
      }
      for (; i < batch; ++i) {
        scalar_t top = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t j = 0; j < k; ++j) top = std::max(top, t[j * batch + i]);
        scalar_t z = 0, a = 0;
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t v = t[j * batch + i] - top;
          tail_expo[j] = std::exp(v * inv_g);
          z += tail_expo[j];
          a += tail_expo[j] * v;
        }
        const scalar_t rz = r[i] / z, smooth_rel = a / z;
        scalar_t pc = 0;
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t tv = t[j * batch + i];
          const scalar_t dv = tail_expo[j] * rz * (scalar_t(1) + ((tv - top) - smooth_rel) * inv_g);
          const scalar_t gv = dv * n[j];
          g[j * batch + i] = gv;
          tail_acc[j] += gv * tv;
          pc += dv * tv;
        }
        p[i] = pc;
      }
      for (int64_t j = 0; j < k; ++j) {
        d_base[c * k + j] =
            at::vec::vec_reduce_all<scalar_t>([](Vec& x, Vec& y) { return x + y; }, acc[j]) + tail_acc[j];
      }
    }
  });
}

template <typename scalar_t>
void column_sq_norms_impl(const Tensor& weight, const Tensor& out) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t rows = weight.size(0), cols = weight.size(1);
  const scalar_t* w = weight.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  // Column blocks small enough for their accumulators to stay in L1 while every row streams through.
  at::parallel_for(0, cols, 1024, [&](int64_t col_begin, int64_t col_end) {
    for (int64_t start = col_begin; start < col_end; start += 1024) {
      const int64_t stop = std::min(col_end, start + 1024);
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
    }
  });
}

template <typename scalar_t>
void normalize_transposed_impl(const Tensor& x, const Tensor& norm, const Tensor& out, double eps) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kRows = 16;  // rows normalised and transposed together: their cache lines stay in L1
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
        scalar_t sq = at::vec::vec_reduce_all<scalar_t>([](Vec& a, Vec& b) { return a + b; }, acc);
        for (; col < dim; ++col) sq += row[col] * row[col];
        const scalar_t n = std::sqrt(sq);
        norm_out[row0 + r] = n;
        inv[r] = scalar_t(1) / std::max(n, static_cast<scalar_t>(eps));
      }
      for (int64_t col = 0; col < dim; ++col) {
        scalar_t* column = dst + col * batch + row0;
        for (int64_t r = 0; r < rows; ++r) column[r] = src[(row0 + r) * dim + col] * inv[r];
      }
    }
  });
}

// normalize_transposed(x, eps) -> (||x_i||, (x / max(||x_i||, eps))^T): the norms and the normalised rows,
// written transposed and contiguous, (d, B), in one read of x.
std::tuple<Tensor, Tensor> normalize_transposed(const Tensor& x, double eps) {
  check_2d_contiguous(x, "x");
  Tensor norm = at::empty({x.size(0)}, x.options());
  Tensor out = at::empty({x.size(1), x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "soft_triple_normalize_transposed",
                             [&] { normalize_transposed_impl<scalar_t>(x, norm, out, eps); });
  return {norm, out};
}

// column_sq_norms(weight) -> (weight * weight).sum(0), reading the (d, N) weight once.
Tensor column_sq_norms(const Tensor& weight) {
  check_2d_contiguous(weight, "weight");
  Tensor out = at::empty({weight.size(1)}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "soft_triple_column_sq_norms",
                             [&] { column_sq_norms_impl<scalar_t>(weight, out); });
  return out;
}

// forward(sim, scale, smooth, K, 1 / gamma): sim (C K, B) becomes s in place; smooth (C, B) gets S'.
void forward(const Tensor& sim, const Tensor& scale, const Tensor& smooth, int64_t k, double inv_gamma) {
  check_2d_contiguous(sim, "sim");
  check_2d_contiguous(smooth, "smooth");
  TORCH_CHECK(k >= 1 && sim.size(0) == smooth.size(0) * k && sim.size(1) == smooth.size(1),
              "soft_triple_cpu.forward: sim must have shape (C * K, B) for smooth of shape (C, B)");
  TORCH_CHECK(scale.is_contiguous() && scale.numel() == sim.size(0),
              "soft_triple_cpu.forward: scale must have C * K elements");
  TORCH_CHECK(scale.scalar_type() == sim.scalar_type() && smooth.scalar_type() == sim.scalar_type(),
              "soft_triple_cpu.forward: dtype mismatch");
  AT_DISPATCH_FLOATING_TYPES(sim.scalar_type(), "soft_triple_forward",
                             [&] {
                               const ForwardArrays<scalar_t> arrays(sim, scale, smooth, inv_gamma);
                               if (k == 2) {
                                 forward_pair_impl<scalar_t>(arrays);
                               } else {
                                 forward_impl<scalar_t>(arrays, k);
                               }
                             });
}

// backward(sim, grad_smooth, inv_norm, grad, rowdot, coldot, K, 1 / gamma): grad (C K, B), rowdot (C K) and
// coldot (C, B) are written; q and S' are recomputed from s.
void backward(const Tensor& sim, const Tensor& grad_smooth, const Tensor& inv_norm,
              const Tensor& grad, const Tensor& rowdot, const Tensor& coldot, int64_t k, double inv_gamma) {
  check_2d_contiguous(sim, "sim");
  check_2d_contiguous(grad_smooth, "grad_smooth");
  check_2d_contiguous(grad, "grad");
  check_2d_contiguous(coldot, "coldot");
  TORCH_CHECK(k >= 1 && sim.size(0) == grad_smooth.size(0) * k && sim.size(1) == grad_smooth.size(1),
              "soft_triple_cpu.backward: sim must have shape (C * K, B) for grad_smooth of shape (C, B)");
  TORCH_CHECK(grad.sizes() == sim.sizes() && coldot.sizes() == grad_smooth.sizes(),
              "soft_triple_cpu.backward: shape mismatch");
  TORCH_CHECK(inv_norm.is_contiguous() && inv_norm.numel() == sim.size(0) && rowdot.is_contiguous() &&
                  rowdot.numel() == sim.size(0),
              "soft_triple_cpu.backward: inv_norm and rowdot must have C * K elements");
  for (const Tensor* other : {&grad_smooth, &inv_norm, &grad, &rowdot, &coldot}) {
    TORCH_CHECK(other->scalar_type() == sim.scalar_type(), "soft_triple_cpu.backward: dtype mismatch");
  }
  AT_DISPATCH_FLOATING_TYPES(sim.scalar_type(), "soft_triple_backward", [&] {
    const BackwardArrays<scalar_t> arrays(sim, grad_smooth, inv_norm, grad, rowdot, coldot, inv_gamma);
    if (k == 2) {
      backward_pair_impl<scalar_t>(arrays);
    } else {
      backward_impl<scalar_t>(arrays, k);
    }
  });
}

}  // namespace

TORCH_LIBRARY(graftkit_soft_triple, m) {
  m.def("column_sq_norms(Tensor weight) -> Tensor");
  m.def("normalize_transposed(Tensor x, float eps) -> (Tensor, Tensor)");
  m.def("forward(Tensor(a!) sim, Tensor scale, Tensor(b!) smooth, int k, float inv_gamma) -> ()");
  m.def("backward(Tensor sim, Tensor grad_smooth, Tensor inv_norm, Tensor(a!) grad, "
        "Tensor(b!) rowdot, Tensor(c!) coldot, int k, float inv_gamma) -> ()");
}

TORCH_LIBRARY_IMPL(graftkit_soft_triple, CPU, m) {
  m.impl("column_sq_norms", &column_sq_norms);
  m.impl("normalize_transposed", &normalize_transposed);
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
