// PetalLinear on the CPU (docs/design.md §1.1):
//   y = b + x Wᵀ + Σ_k c_k ⊙ D_k(U_k B_kᵀ),  U = x A_catᵀ (M × R),  c = [s(1−α), sα] per image.
// The kernels take the layer's tensors as they are (A: branches × r × K, B: branches × N × r, α, s):
// the branch weights and the concatenated layouts are built here, so an eager call pays no extra
// Python-level tensor ops for them. Row-blocked: each block of rows is read once while it is hot in
// cache, for every GEMM that needs it (base, shrink, expand in the same output; backward: dY·W,
// dY·B_cat, dYᵀ·V, dTᵀ·x), so the LoRA adds no full pass over an M×in or M×out tensor. Blocks run in
// parallel (at::parallel_for) unless the whole call is small; BLAS calls inside a block are
// single-threaded. Reductions over M (dA, dB) are per-thread fp32 partials summed at the end.
// Dropout masks come from hash32.h, never stored.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "hash32.h"

namespace petal_fast {
namespace {

using at::Tensor;

struct Dims {
  int64_t M, K, N, R, images, branches, rpi, r;
};

Dims dims_of(const Tensor& x, const Tensor& w, const Tensor& lora_a, const Tensor& lora_b,
             const std::optional<Tensor>& alpha) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "petal_linear: x must be contiguous (M, K)");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "petal_linear: weight must be (N, K)");
  TORCH_CHECK(lora_a.dim() == 3 && lora_a.size(2) == x.size(1) && lora_a.size(1) > 0,
              "petal_linear: lora_A must be (branches, r, K)");
  const int64_t branches = lora_a.size(0), r = lora_a.size(1);
  TORCH_CHECK(branches == 1 || branches == 2, "petal_linear: lora_A must have 1 or 2 branches");
  TORCH_CHECK(lora_b.dim() == 3 && lora_b.size(0) == branches && lora_b.size(1) == w.size(0) && lora_b.size(2) == r,
              "petal_linear: lora_B must be (branches, N, r)");
  const bool weighted = branches == 2;
  TORCH_CHECK(!weighted || (alpha.has_value() && alpha->dim() == 1),
              "petal_linear: a two-branch layer needs alpha of shape (images,)");
  Dims d{x.size(0), x.size(1), w.size(0), branches * r, weighted ? alpha->size(0) : 1, branches, 0, r};
  // An empty batch (0 images) has 0 rows; every integer division below needs a non-zero divisor.
  TORCH_CHECK(d.images > 0 ? d.M % d.images == 0 : d.M == 0, "petal_linear: rows must be a multiple of images");
  d.rpi = d.images > 0 ? d.M / d.images : 0;
  return d;
}

// A_cat (R × K) and B_cat (N × R), R = branches·r: both branches side by side.
Tensor a_cat_of(const Tensor& lora_a) { return lora_a.reshape({-1, lora_a.size(2)}).contiguous(); }
Tensor b_cat_of(const Tensor& lora_b) {
  if (lora_b.size(0) == 1) return lora_b.select(0, 0).contiguous();
  return lora_b.permute({1, 0, 2}).reshape({lora_b.size(1), -1}).contiguous();
}

// The per-image branch weights c (images × branches, row-major): [s(1−α_i), sα_i], or [s] for one
// branch, in both accumulation types (double for double inputs, else float; a handful of values).
struct Coef {
  std::vector<float> f;
  std::vector<double> d;
  template <typename acc_t>
  const acc_t* data() const {
    if constexpr (std::is_same_v<acc_t, double>) return d.data();
    else return f.data();
  }
};

Coef coef_of(const Dims& d, const std::optional<Tensor>& alpha, double scale) {
  std::vector<double> c(d.images * d.branches, scale);
  if (d.branches == 2) {
    const Tensor a = alpha->to(at::kDouble).contiguous();  // α read once, in double
    const double* av = a.data_ptr<double>();
    for (int64_t i = 0; i < d.images; ++i) {
      c[2 * i] = scale * (1.0 - av[i]);
      c[2 * i + 1] = scale * av[i];
    }
  }
  std::vector<float> f(c.begin(), c.end());  // the same values, rounded once to float
  return {std::move(f), std::move(c)};
}

// Tuning knobs of the strategies below, passed with every call (for re-tuning on another machine;
// the defaults are measured): path -1 automatic (by the size of W), 0 whole matrices, 1 row blocks;
// block_rows 0 automatic, else rows per block. The caller reads them from petal_fast's settings (the
// `cpu_path` / `cpu_block_rows` fields, per thread inside a settings.override block): the library
// keeps no copy, so two threads may run with different knobs.
struct Tuning {
  int64_t path;
  int64_t block_rows;
};

Tuning tuning_of(int64_t path, int64_t block_rows) {
  TORCH_CHECK(path >= -1 && path <= 1, "petal_linear: path must be -1 (auto), 0 (whole) or 1 (blocked), got ", path);
  TORCH_CHECK(block_rows >= 0, "petal_linear: block_rows must be 0 (auto) or >= 1, got ", block_rows);
  return {path, block_rows};
}

// Rows per block. A block of the widest operand (~1 MiB) stays in L2 across all the GEMMs that
// read it. When the blocks also run the base GEMM and W is large (> 8 MiB), each block streams W
// again, so blocks grow to ≥ 256 rows, where the re-read is amortised (64-row blocks at 4096×4096
// cost 1.4× the base GEMM). A block does at least ~2¹⁸ multiply-adds: a smaller one does not pay for
// waking another thread, so a small call runs as one block on the calling thread.
// Tuning::block_rows overrides the choice.
int64_t block_rows(const Dims& d, int64_t elem, bool blocks_read_w, const Tuning& t) {
  if (t.block_rows) return t.block_rows;
  if (d.M == 0) return 1;  // no rows: no blocks (callers return before using this)
  int64_t rows = (int64_t{1} << 20) / std::max<int64_t>(1, std::max(d.N, d.K) * elem);
  rows = std::max<int64_t>(16, std::min<int64_t>(512, rows / 16 * 16));
  if (blocks_read_w && d.N * d.K * elem > (int64_t{8} << 20)) rows = std::max<int64_t>(rows, 256);
  const int64_t macs_per_row = d.R * (d.K + d.N) + (blocks_read_w ? d.K * d.N : 0);
  const int64_t min_rows = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, macs_per_row));
  int64_t blocks = std::min((d.M + rows - 1) / rows, std::max<int64_t>(1, d.M / min_rows));
  // as many blocks per thread on every thread (parallel_for hands each thread a contiguous range):
  // 3200 rows in 224-row blocks made 15 blocks, 8 on one core and 7 on the other
  if (blocks > 1) {
    const int64_t threads = at::get_num_threads();
    blocks = (blocks + threads - 1) / threads * threads;
  }
  return std::max<int64_t>(1, (d.M + blocks - 1) / blocks);
}

// Runs body(b0, b1) over [0, blocks): on the calling thread for one block (no parallel region to
// enter, no worker to wake), else through at::parallel_for.
template <typename F>
void for_blocks(int64_t blocks, const F& body) {
  if (blocks == 1) body(0, 1);
  else at::parallel_for(0, blocks, 1, body);
}

// Row blocks pay while W stays cache-resident from block to block; a large W is better served by one
// multi-threaded BLAS call per GEMM over all rows (measured on the 2-core EPYC, fp32, p = 0:
// 1600×1536→4608 blocked 1.41× the frozen base vs 1.05× whole; 25600×384→1152 blocked 1.12× vs 1.18×).
// With dropout and a large W only the base GEMM (x Wᵀ, dY W) is one whole call; the masked LoRA
// products still run per row block, so no M × out product or mask is ever materialised.
// Tuning::path overrides the choice.
bool use_row_blocks(const Dims& d, int64_t elem, const Tuning& t) {
  if (t.path >= 0) return t.path == 1;
  return d.N * d.K * elem <= (int64_t{4} << 20);
}

template <typename in_t, typename out_t, typename acc_t>
void scale_rows(const in_t* __restrict u, out_t* __restrict v, int64_t n, const Dims& d, int64_t r0,
                const acc_t* c) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t* ci = c + ((r0 + i) / d.rpi) * d.branches;
    for (int64_t k = 0; k < d.branches; ++k) {
      const acc_t ck = ci[k];
      const int64_t off = i * d.R + k * d.r;
      for (int64_t j = 0; j < d.r; ++j) v[off + j] = static_cast<out_t>(static_cast<acc_t>(u[off + j]) * ck);
    }
  }
}

// V = c ⊙ U for the contiguous rows [r0, r0+n) of U, as `out` (U's dtype, or float for the
// reductions of half/bfloat16 inputs): one pass, no M-long copy of c.
Tensor row_scale(const Tensor& u_rows, const Dims& d, const Coef& c, int64_t r0, at::ScalarType out) {
  const int64_t n = u_rows.size(0);
  Tensor v = at::empty({n, d.R}, u_rows.options().dtype(out));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u_rows.scalar_type(), "petal_linear_row_scale", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = u_rows.data_ptr<scalar_t>();
    if (out == u_rows.scalar_type()) {
      scale_rows<scalar_t, scalar_t, acc_t>(src, v.data_ptr<scalar_t>(), n, d, r0, c.data<acc_t>());
    } else {
      TORCH_CHECK(out == at::kFloat, "petal_linear: row_scale widens to float only");
      scale_rows<scalar_t, float, acc_t>(src, v.data_ptr<float>(), n, d, r0, c.data<acc_t>());
    }
  });
  return v;
}

// out (rows × N) [+]= mask_k ⊙ part, mask of branch k for global rows r0…
template <typename T>
void apply_mask(T* out, const T* part, int64_t rows, int64_t n, int64_t r0, uint32_t key, uint32_t thr,
                double inv_keep, bool accumulate) {
  using acc_t = at::opmath_type<T>;  // float for half/bfloat16/float, double for double
  const acc_t inv = static_cast<acc_t>(inv_keep);
  for (int64_t i = 0; i < rows; ++i) {
    const uint32_t rh = mix32(key ^ static_cast<uint32_t>(r0 + i));
    for (int64_t j = 0; j < n; ++j) {
      const acc_t val = keep(rh, j, thr) ? static_cast<acc_t>(part[i * n + j]) * inv : acc_t(0);
      out[i * n + j] = accumulate ? static_cast<T>(static_cast<acc_t>(out[i * n + j]) + val) : static_cast<T>(val);
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PETAL_AVX2_CLONE __attribute__((target_clones("avx2", "default")))
#else
#define PETAL_AVX2_CLONE
#endif

// The float32 hot loop in a form compilers vectorise (32-bit column index, branch-free select, no
// aliasing), compiled for AVX2 and the baseline and picked at load time. Measured in isolation on
// the 2-core EPYC, 2 × 224×1152 masks: 2.4 ns/element as the generic loop, 0.85 (SSE2), 0.21 (AVX2).
PETAL_AVX2_CLONE
void apply_mask_f32(float* __restrict out, const float* __restrict part, int64_t rows, int64_t n, int64_t r0,
                    uint32_t key, uint32_t thr, float inv, bool accumulate) {
  const uint32_t cols = static_cast<uint32_t>(n);
  for (int64_t i = 0; i < rows; ++i) {
    const uint32_t rh = mix32(key ^ static_cast<uint32_t>(r0 + i));
    float* o = out + i * n;
    const float* src = part + i * n;
    if (accumulate) {
      for (uint32_t j = 0; j < cols; ++j) o[j] += src[j] * keep_scale(rh, j, thr, inv);
    } else {
      for (uint32_t j = 0; j < cols; ++j) o[j] = src[j] * keep_scale(rh, j, thr, inv);
    }
  }
}

void masked(Tensor out, const Tensor& part, int64_t r0, int64_t seed, int64_t branch, double p, bool accumulate) {
  const uint32_t key = branch_key(seed, branch), thr = keep_threshold(p);
  const double inv = 1.0 / (1.0 - p);
  if (out.scalar_type() == at::kFloat) {
    apply_mask_f32(out.data_ptr<float>(), part.data_ptr<float>(), out.size(0), out.size(1), r0, key, thr,
                   static_cast<float>(inv), accumulate);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "petal_linear_mask", [&] {
    apply_mask<scalar_t>(out.data_ptr<scalar_t>(), part.data_ptr<scalar_t>(), out.size(0), out.size(1), r0, key,
                         thr, inv, accumulate);
  });
}

std::tuple<Tensor, Tensor> petal_linear_fwd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                                            const Tensor& lora_a, const Tensor& lora_b,
                                            const std::optional<Tensor>& alpha, double scale, double p,
                                            int64_t seed, int64_t path, int64_t rows_per_block) {
  const Dims d = dims_of(x, w, lora_a, lora_b, alpha);
  const Tuning tune = tuning_of(path, rows_per_block);
  Tensor y = at::empty({d.M, d.N}, x.options());
  Tensor u = at::empty({d.M, d.R}, x.options());
  if (d.M == 0) return {y, u};  // empty batch: empty outputs, no GEMM, no block arithmetic
  const Coef c = coef_of(d, alpha, scale);
  const Tensor a_cat = a_cat_of(lora_a), b_cat = b_cat_of(lora_b);
  const Tensor wt = w.t(), at_ = a_cat.t(), bt = b_cat.t();
  const auto dt = x.scalar_type();
  const bool blocked = use_row_blocks(d, x.element_size(), tune);
  auto base = [&](Tensor out, const Tensor& in) {  // b + x Wᵀ
    if (bias.has_value()) at::addmm_out(out, *bias, in, wt);
    else at::mm_out(out, in, wt);
  };
  if (!blocked) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    base(y, x);
    if (p == 0.0) {
      at::mm_out(u, x, at_);
      y.addmm_(row_scale(u, d, c, 0, dt), bt);  // the expand accumulates into the base output
      return {y, u};
    }
  }
  const int64_t rows = block_rows(d, x.element_size(), blocked, tune);
  const int64_t blocks = (d.M + rows - 1) / rows;
  for_blocks(blocks, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads: plain kernels, no autograd
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * rows, n = std::min(rows, d.M - r0);
      Tensor xb = x.narrow(0, r0, n), yb = y.narrow(0, r0, n), ub = u.narrow(0, r0, n);
      at::mm_out(ub, xb, at_);
      Tensor vb = row_scale(ub, d, c, r0, dt);
      if (blocked) base(yb, xb);
      if (p == 0.0) {
        yb.addmm_(vb, bt);  // the expand accumulates into the base output
      } else {
        for (int64_t k = 0; k < d.branches; ++k) {
          Tensor part = at::mm(vb.narrow(1, k * d.r, d.r), bt.narrow(0, k * d.r, d.r));
          masked(yb, part, r0, seed, k, p, /*accumulate=*/true);
        }
      }
    }
  });
  return {y, u};
}

// dA_cat (R × K) and dB_cat (N × R) back in the parameters' layouts (branches × r × K, branches × N × r),
// with lora_B's canonical strides (DDP compares them literally).
std::tuple<Tensor, Tensor> to_parameter_layout(const Tensor& da, const Tensor& db, const Tensor& lora_a,
                                               const Tensor& lora_b, const Dims& d) {
  Tensor da_p = da.to(lora_a.scalar_type()).view({d.branches, d.r, d.K});
  Tensor db_p = db.to(lora_b.scalar_type());  // (a permuted size-1 dimension would keep odd strides)
  db_p = d.branches == 1 ? db_p.unsqueeze(0) : db_p.view({d.N, d.branches, d.r}).permute({1, 0, 2}).contiguous();
  return {da_p, db_p};
}

std::tuple<Tensor, Tensor, Tensor> petal_linear_bwd(const Tensor& dy_in, const Tensor& x, const Tensor& w,
                                                    const Tensor& lora_a, const Tensor& lora_b,
                                                    const std::optional<Tensor>& alpha, double scale,
                                                    const Tensor& u, double p, int64_t seed, bool need_x,
                                                    int64_t path, int64_t rows_per_block) {
  const Dims d = dims_of(x, w, lora_a, lora_b, alpha);
  const Tuning tune = tuning_of(path, rows_per_block);
  const Tensor dy = dy_in.contiguous();
  TORCH_CHECK(dy.size(0) == d.M && dy.size(1) == d.N, "petal_linear_bwd: dy must be (M, N)");
  TORCH_CHECK(u.dim() == 2 && u.size(0) == d.M && u.size(1) == d.R && u.is_contiguous(),
              "petal_linear_bwd: U must be contiguous (M, R)");
  Tensor dx = need_x ? at::empty({d.M, d.K}, x.options()) : Tensor();
  if (d.M == 0)  // empty batch: nothing flows back; the adapter gradients are exact zeros
    return {dx, at::zeros_like(lora_a), at::zeros_like(lora_b)};
  const Coef c = coef_of(d, alpha, scale);
  const Tensor a_cat = a_cat_of(lora_a), b_cat = b_cat_of(lora_b);
  const bool fp32 = x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble;
  const auto acc = fp32 ? x.options() : x.options().dtype(at::kFloat);  // reductions over M in fp32
  const auto acc_t = acc.dtype().toScalarType();
  const Tensor b_acc = b_cat.to(acc_t);
  const bool blocked = use_row_blocks(d, x.element_size(), tune);
  if (!blocked && p == 0.0) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Tensor dy_acc = dy.to(acc_t);
    const Tensor du = at::mm(dy_acc, b_acc);                           // dU = dY·B_cat
    const Tensor db = at::mm(dy_acc.t(), row_scale(u, d, c, 0, acc_t));  // dB = dYᵀ·(c ⊙ U)
    const Tensor dt = row_scale(du, d, c, 0, acc_t);                   // dT = c ⊙ dU
    const Tensor da = at::mm(dt.t(), x.to(acc_t));                     // dA = dTᵀ·x
    if (need_x) {
      at::mm_out(dx, dy, w);
      dx.addmm_(dt.to(x.scalar_type()), a_cat);  // LoRA term in the same output as dY·W
    }
    auto [da_p, db_p] = to_parameter_layout(da, db, lora_a, lora_b, d);
    return {dx, da_p, db_p};
  }
  if (!blocked && need_x) {  // dropout with a large W: dY W as one call, the LoRA terms per block
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::mm_out(dx, dy, w);
  }
  // Dropout: each branch's GEMMs keep all R columns, the other branch's zeroed (branch_cols), rather
  // than r-wide slices: MKL on the 2-core EPYC takes ~300 µs for a 224×1152 block times 1152×8 and
  // 108 µs times 1152×16, so the r = 8 slices cost more than twice the flops of the full width.
  std::vector<Tensor> branch_cols, b_branch;
  if (p > 0.0)
    for (int64_t k = 0; k < d.branches; ++k) {
      Tensor cols = at::zeros({1, d.R}, acc);
      cols.narrow(1, k * d.r, d.r).fill_(1);
      branch_cols.push_back(cols);
      b_branch.push_back(b_acc * cols);
    }
  const int64_t rows = block_rows(d, x.element_size(), blocked, tune);
  const int64_t blocks = (d.M + rows - 1) / rows;
  const int threads = blocks == 1 ? 1 : at::get_num_threads();
  std::vector<Tensor> db_part(threads), da_part(threads);
  for_blocks(blocks, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int t = blocks == 1 ? 0 : at::get_thread_num();
    if (!db_part[t].defined()) {
      db_part[t] = at::zeros({d.N, d.R}, acc);
      da_part[t] = at::zeros({d.R, d.K}, acc);
    }
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * rows, n = std::min(rows, d.M - r0);
      Tensor dyb = dy.narrow(0, r0, n), xb = x.narrow(0, r0, n);
      Tensor dyb_acc = dyb.to(acc_t);
      Tensor vb = row_scale(u.narrow(0, r0, n), d, c, r0, acc_t);
      Tensor dub;
      if (p == 0.0) {
        dub = at::mm(dyb_acc, b_acc);              // dU = dY·B_cat (both branches)
        db_part[t].addmm_(dyb_acc.t(), vb);        // dB += dYᵀ·(c ⊙ U)
      } else {
        dub = at::zeros({n, d.R}, acc);
        Tensor dyk = at::empty_like(dyb_acc);
        for (int64_t k = 0; k < d.branches; ++k) {
          masked(dyk, dyb_acc, r0, seed, k, p, /*accumulate=*/false);
          dub.addmm_(dyk, b_branch[k]);                            // dU_k = D_k(dY)·B_k
          db_part[t].addmm_(dyk.t(), vb * branch_cols[k]);         // dB_k += D_k(dY)ᵀ·(c_k ⊙ U_k)
        }
      }
      Tensor dtb = row_scale(dub, d, c, r0, acc_t);  // dT = c ⊙ dU
      da_part[t].addmm_(dtb.t(), xb.to(acc_t));
      if (need_x) {
        Tensor dxb = dx.narrow(0, r0, n);
        if (blocked) at::mm_out(dxb, dyb, w);
        dxb.addmm_(dtb.to(x.scalar_type()), a_cat);  // LoRA term in the same output as dY·W
      }
    }
  });
  Tensor db, da;  // the per-thread partials, summed into the first one
  for (int t = 0; t < threads; ++t) {
    if (!db_part[t].defined()) continue;
    if (!db.defined()) {
      db = db_part[t];
      da = da_part[t];
    } else {
      db.add_(db_part[t]);
      da.add_(da_part[t]);
    }
  }
  auto [da_p, db_p] = to_parameter_layout(da, db, lora_a, lora_b, d);
  return {dx, da_p, db_p};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(petal_fast, m) {
  m.def("petal_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor? alpha, float scale, float p, int seed, int path=-1, int block_rows=0) -> (Tensor, Tensor)");
  m.def("petal_linear_bwd(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor? alpha, float scale, Tensor u, float p, int seed, bool need_x, int path=-1, int block_rows=0) -> (Tensor, Tensor, Tensor)");
  m.impl("petal_linear_fwd", c10::DispatchKey::CPU, TORCH_FN(petal_linear_fwd));
  m.impl("petal_linear_bwd", c10::DispatchKey::CPU, TORCH_FN(petal_linear_bwd));
}

}  // namespace petal_fast
