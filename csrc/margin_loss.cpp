// Fused margin-softmax core on the CPU (docs/design.md §1.3): per row i, over the classes j ≠ labels_i,
//   z_ij = s·⟨e_i/‖e_i‖, w_j/‖w_j‖⟩,  lse_i = log Σ exp z_ij,  zsum_i = Σ z_ij
// never holding a B×C tensor. Class chunks of W run in parallel (at::parallel_for); each chunk is
// one single-threaded BLAS GEMM into a B×n fp32 tile plus vectorised ATen passes over the tile
// while it is in cache. Forward keeps per-thread online log-sum-exp partials (running max, sum,
// logit sum), merged at the end. Backward recomputes the tile, G = s·(g_lse·exp(z − lse) + g_zsum)
// (0 at the target), dŴ_c = Gᵀ·Ê written straight into its disjoint rows of dW, dÊ summed in
// per-thread fp32 partials; then the ε-safe normalisation chain for both. fp32 (fp64 for fp64).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace petal_fast {
namespace {

using at::Tensor;

constexpr int64_t kTileElems = int64_t{1} << 18;  // ≈1 MiB fp32 tile per thread (2^17 and 2^20 measured no better)

at::ScalarType acc_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A chunk worth a parallel task: a task costs each thread a wake-up (µs on a quiet machine; on a
// busy one up to a scheduler time slice, docs/design.md §3.5), so none holds less than this many MACs
// (~0.1–0.2 ms of one core). Measured on the 2-core EPYC under load: the demo's head, B = 64, C = 300,
// D = 128 (2.5 M), forward 220 µs in two chunks on two threads, 157 µs in one.
constexpr int64_t kMinChunkMacs = int64_t{1} << 22;

int64_t chunk_classes(int64_t B, int64_t C, int64_t D) {
  if (C <= 0) return 1;
  int64_t n = std::max<int64_t>(64, std::min<int64_t>(8192, kTileElems / std::max<int64_t>(B, 1)));
  // enough chunks to keep every thread busy on small C, unless that makes them too small
  const int64_t per_thread = (C + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t smallest = (kMinChunkMacs + B * D - 1) / std::max<int64_t>(1, B * D);
  n = std::max<int64_t>(1, std::min({n, std::max({int64_t{16}, per_thread, smallest}), C}));
  const int64_t chunks = (C + n - 1) / n;
  return (C + chunks - 1) / chunks;  // evened out: 300 classes in two chunks of 150, not 256 + 44
}

// For an op small enough to be one chunk: this thread's OpenMP thread count (the ICV that
// at::parallel_for's regions and MKL read) is 1 for the scope, so the ATen calls inside open no
// parallel region either (an 8×32 · 32×100 GEMM: ~2 µs alone, 30–150 µs with a second thread to wake).
class SerialScope {
 public:
  explicit SerialScope(bool on) {
#ifdef _OPENMP
    if (on) {
      previous_ = omp_get_max_threads();
      omp_set_num_threads(1);
    }
#endif
  }
  ~SerialScope() {
#ifdef _OPENMP
    if (previous_ > 0) omp_set_num_threads(previous_);
#endif
  }
  SerialScope(const SerialScope&) = delete;
  SerialScope& operator=(const SerialScope&) = delete;

 private:
  int previous_ = 0;
};

Tensor inv_norm(const Tensor& x, double eps) {
  return at::linalg_vector_norm(x, 2, {1}).clamp_min_(eps).reciprocal_();
}

// Backward of x̂ = x·r, r = 1/max(‖x‖, ε): r·(dx̂ − x̂⟨x̂, dx̂⟩); no projection where ‖x‖ < ε.
Tensor normalise_grad(const Tensor& dxn, const Tensor& x, const Tensor& r, double eps) {
  Tensor xn = x * r.unsqueeze(1);
  Tensor proj = (xn * dxn).sum(1).mul_(r.lt(1.0 / eps));
  return (dxn - xn * proj.unsqueeze(1)).mul_(r.unsqueeze(1));
}

// dW_c = r·(dŴ − ŵ⟨ŵ, dŴ⟩) = r·dŴ − r³⟨w, dŴ⟩·w with dŴ = Gᵀ·Ê, in place in one n×D buffer
// (dW's own rows when they are fp32/fp64), so a chunk costs no extra n×D temporaries.
void chunk_dw(Tensor dw_rows, const Tensor& g, const Tensor& en, const Tensor& wc, const Tensor& rw, double eps) {
  const bool direct = dw_rows.scalar_type() == en.scalar_type();
  Tensor dwn = direct ? dw_rows : at::empty(dw_rows.sizes(), en.options());
  at::mm_out(dwn, g.t(), en);
  Tensor coef = at::empty_like(rw);
  const int64_t n = dwn.size(0), D = dwn.size(1);
  AT_DISPATCH_FLOATING_TYPES(dwn.scalar_type(), "margin_loss_dw", [&] {
    const scalar_t *pw = wc.data_ptr<scalar_t>(), *pr = rw.data_ptr<scalar_t>();
    const scalar_t* pd = dwn.data_ptr<scalar_t>();
    scalar_t* pc = coef.data_ptr<scalar_t>();
    for (int64_t j = 0; j < n; ++j) {
      scalar_t dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += pw[j * D + d] * pd[j * D + d];
      pc[j] = pr[j] < scalar_t(1.0 / eps) ? -pr[j] * pr[j] * pr[j] * dot : scalar_t(0);  // none if ‖w‖ < ε
    }
  });
  dwn.mul_(rw.unsqueeze(1)).addcmul_(wc, coef.unsqueeze(1));
  if (!direct) dw_rows.copy_(dwn);
}

void check(const Tensor& e, const Tensor& w, const Tensor& labels) {
  TORCH_CHECK(e.dim() == 2 && e.is_contiguous(), "margin_loss: embeddings must be contiguous (B, D)");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == e.size(1), "margin_loss: weight must be contiguous (C, D)");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == e.size(0) && labels.scalar_type() == at::kLong,
              "margin_loss: labels must be int64 (B,)");
}

// Rows whose target column lies in chunk [c0, c0+n), and that column (local index).
void target_cols(const int64_t* lab, int64_t B, int64_t c0, int64_t n, std::vector<int64_t>& rows,
                 std::vector<int64_t>& cols) {
  rows.clear();
  cols.clear();
  for (int64_t i = 0; i < B; ++i) {
    const int64_t c = lab[i] - c0;
    if (c >= 0 && c < n) {
      rows.push_back(i);
      cols.push_back(c);
    }
  }
}

// z = s·(Ê W_cᵀ)·r_w for chunk [c0, c0+n); returns the fp32 chunk of W and its inverse norms.
Tensor tile(const Tensor& en, const Tensor& w, int64_t c0, int64_t n, double scale, double eps, Tensor& wc,
            Tensor& rw) {
  wc = w.narrow(0, c0, n).to(en.scalar_type());
  rw = inv_norm(wc, eps);
  Tensor z = at::mm(en, wc.t());
  z.mul_((rw * scale).unsqueeze(0));
  return z;
}

template <typename T>
void set_cols(Tensor& z, const std::vector<int64_t>& rows, const std::vector<int64_t>& cols, T value) {
  T* p = z.data_ptr<T>();
  const int64_t n = z.size(1);
  for (size_t k = 0; k < rows.size(); ++k) p[rows[k] * n + cols[k]] = value;
}

std::tuple<Tensor, Tensor> margin_loss_fwd(const Tensor& e, const Tensor& w, const Tensor& labels, double scale,
                                           double eps) {
  check(e, w, labels);
  const auto acc = acc_type(e);
  const int64_t B = e.size(0), C = w.size(0);
  const int64_t step = chunk_classes(B, C, e.size(1)), chunks = (C + step - 1) / step;
  const SerialScope serial(chunks == 1);
  Tensor en = e.to(acc);
  en = en * inv_norm(en, eps).unsqueeze(1);
  const int threads = at::get_num_threads();
  const auto opts = en.options();
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<Tensor> m_part(threads), l_part(threads), z_part(threads);
  const int64_t* lab = labels.data_ptr<int64_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    at::AutoDispatchBelowADInplaceOrView guard;  // worker threads: plain kernels, no autograd
    const int t = at::get_thread_num();
    if (!m_part[t].defined()) {
      m_part[t] = at::full({B}, -inf, opts);
      l_part[t] = at::zeros({B}, opts);
      z_part[t] = at::zeros({B}, opts);
    }
    Tensor &m = m_part[t], &l = l_part[t], &zs = z_part[t];
    std::vector<int64_t> rows, cols;
    Tensor wc, rw;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t c0 = k * step, n = std::min(step, C - c0);
      Tensor z = tile(en, w, c0, n, scale, eps, wc, rw);
      target_cols(lab, B, c0, n, rows, cols);
      AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "margin_loss_fwd", [&] {
        scalar_t* pz = zs.data_ptr<scalar_t>();
        const scalar_t* p = z.data_ptr<scalar_t>();
        for (size_t r = 0; r < rows.size(); ++r) pz[rows[r]] -= p[rows[r] * n + cols[r]];
        zs.add_(z.sum(1));
        set_cols<scalar_t>(z, rows, cols, -std::numeric_limits<scalar_t>::infinity());
      });
      Tensor m_new = at::maximum(m, std::get<0>(z.max(1)));
      Tensor m_safe = at::where(m_new.isinf(), at::zeros_like(m_new), m_new);
      l.mul_((m - m_safe).exp_()).add_(z.sub_(m_safe.unsqueeze(1)).exp_().sum(1));
      m = m_new;
    }
  });
  Tensor m = at::full({B}, -inf, opts), l = at::zeros({B}, opts), zsum = at::zeros({B}, opts);
  for (int t = 0; t < threads; ++t) if (m_part[t].defined()) m = at::maximum(m, m_part[t]);
  Tensor m_safe = at::where(m.isinf(), at::zeros_like(m), m);
  for (int t = 0; t < threads; ++t) {
    if (!m_part[t].defined()) continue;
    l.add_(l_part[t] * (m_part[t] - m_safe).exp_());
    zsum.add_(z_part[t]);
  }
  return {m_safe + l.log(), zsum};
}

std::tuple<Tensor, Tensor> margin_loss_bwd(const Tensor& e, const Tensor& w, const Tensor& labels, const Tensor& lse,
                                           const Tensor& g_lse, const Tensor& g_zsum, double scale, double eps,
                                           bool need_e, bool need_w) {
  check(e, w, labels);
  const auto acc = acc_type(e);
  const int64_t B = e.size(0), C = w.size(0), D = e.size(1);
  const int64_t step = chunk_classes(B, C, D), chunks = (C + step - 1) / step;
  const SerialScope serial(chunks == 1);
  Tensor e_acc = e.to(acc);
  Tensor re = inv_norm(e_acc, eps);
  Tensor en = e_acc * re.unsqueeze(1);
  Tensor lse_acc = lse.to(acc);
  Tensor lse_safe = at::where(lse_acc.isinf(), at::zeros_like(lse_acc), lse_acc).unsqueeze(1);
  Tensor a = (g_lse.to(acc) * scale).unsqueeze(1), b = (g_zsum.to(acc) * scale).unsqueeze(1);
  Tensor dw = need_w ? at::empty_like(w) : Tensor();
  const int threads = at::get_num_threads();
  std::vector<Tensor> de_part(threads);
  const int64_t* lab = labels.data_ptr<int64_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const int t = at::get_thread_num();
    if (need_e && !de_part[t].defined()) de_part[t] = at::zeros({B, D}, en.options());
    std::vector<int64_t> rows, cols;
    Tensor wc, rw;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t c0 = k * step, n = std::min(step, C - c0);
      Tensor z = tile(en, w, c0, n, scale, eps, wc, rw);
      target_cols(lab, B, c0, n, rows, cols);
      AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "margin_loss_bwd_mask", [&] {
        set_cols<scalar_t>(z, rows, cols, -std::numeric_limits<scalar_t>::infinity());
      });
      Tensor g = z.sub_(lse_safe).exp_().mul_(a).add_(b);
      AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "margin_loss_bwd_zero", [&] {
        set_cols<scalar_t>(g, rows, cols, scalar_t(0));
      });
      if (need_w) chunk_dw(dw.narrow(0, c0, n), g, en, wc, rw, eps);
      if (need_e) de_part[t].addmm_(g.mul_(rw.unsqueeze(0)), wc);
    }
  });
  Tensor de;
  if (need_e) {
    Tensor den = at::zeros({B, D}, en.options());
    for (int t = 0; t < threads; ++t) if (de_part[t].defined()) den.add_(de_part[t]);
    de = normalise_grad(den, e_acc, re, eps).to(e.scalar_type());
  }
  return {de, dw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(petal_fast, m) {
  m.def("margin_loss_fwd(Tensor e, Tensor w, Tensor labels, float scale, float eps) -> (Tensor, Tensor)");
  m.def("margin_loss_bwd(Tensor e, Tensor w, Tensor labels, Tensor lse, Tensor g_lse, Tensor g_zsum, float scale, "
        "float eps, bool need_e, bool need_w) -> (Tensor, Tensor)");
  m.impl("margin_loss_fwd", c10::DispatchKey::CPU, TORCH_FN(margin_loss_fwd));
  m.impl("margin_loss_bwd", c10::DispatchKey::CPU, TORCH_FN(margin_loss_bwd));
}

}  // namespace petal_fast
