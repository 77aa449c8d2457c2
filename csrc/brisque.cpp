// BRISQUE on the CPU (petal_fast/ops/brisque_library.py), float64. Two ops:
//   brisque_moments(images, scales) — the fused stage below, per scale;
//   brisque_score(images, model…)  — the whole score: that stage at both scales, the AGGD fits and
//                                     the RBF ε-SVR, per image in one parallel task.
// The fused stage:
//   μ = w ∗ Y,  σ = sqrt|μ² − w ∗ Y²|,  m = (Y − μ) / (σ + 1/255)     (w: 7×7 Gaussian, σ_w = 7/6,
//   'same' zero-padded), then for m and its neighbour products (horizontal m[y,x]m[y,x+1],
//   vertical m[y,x]m[y+1,x], main diagonal m[y,x]m[y+1,x+1], secondary m[y+1,x]m[y,x+1]) the five
//   sums the AGGD fit needs: Σ|x|, Σ_{x<0} x², n_{x<0}, Σ_{x≥0} x², n_{x≥0}  →  (B, 5 maps, 5 sums).
// The input is the raw batch (uint8/float, gray or RGB): luminance, and the second scale (OpenCV's
// half-size bicubic resize), are computed per image in the same task, in thread-local buffers.
// One image per task (at::parallel_for): the Gaussian is separable, so a horizontal pass fills two
// H×W buffers (w_x ∗ Y, w_x ∗ Y²) that stay in cache, and one sweep down the rows finishes the
// vertical pass, forms the MSCN row, multiplies it with the previous row and accumulates — the
// MSCN map and the products are never stored.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace petal_fast {
namespace {

using at::Tensor;

constexpr int kTaps = 7, kHalf = 3, kMaps = 5, kSums = 5;
constexpr double kC = 1.0 / 255.0;
constexpr double kFlat = 1e-10;  // |Y − μ| below this only in (numerically) constant windows

// Branch-free (the sign of an MSCN value or product is a coin flip; a branch would mispredict half
// the time) and in kLanes independent partial sums, so the additions do not wait on each other.
constexpr int kLanes = 4;
struct Sums {
  double abs[kLanes] = {}, sq_neg[kLanes] = {}, sq_pos[kLanes] = {};
  int64_t n_neg[kLanes] = {};

  void step(int l, double v) {
    const bool neg = v < 0;
    const double sq = v * v;
    abs[l] += std::fabs(v);
    sq_neg[l] += neg ? sq : 0.0;
    sq_pos[l] += neg ? 0.0 : sq;
    n_neg[l] += neg;
  }
  // accumulate a[x] · b[x] (Prod) or a[x] for x < n
  template <bool Prod>
  void add(const double* a, const double* b, int64_t n) {
    int64_t x0 = 0;
    for (; x0 + kLanes <= n; x0 += kLanes)
      for (int l = 0; l < kLanes; ++l) step(l, Prod ? a[x0 + l] * b[x0 + l] : a[x0 + l]);
    for (int l = 0; x0 + l < n; ++l) step(l, Prod ? a[x0 + l] * b[x0 + l] : a[x0 + l]);
  }
  static double total(const double* v) { return (v[0] + v[1]) + (v[2] + v[3]); }
  int64_t negatives() const { return n_neg[0] + n_neg[1] + n_neg[2] + n_neg[3]; }
};

std::array<double, kTaps> gaussian_taps() {
  std::array<double, kTaps> g{};
  const double sigma = 7.0 / 6.0;
  double total = 0;
  for (int k = 0; k < kTaps; ++k) {
    const double d = k - kHalf;
    g[k] = std::exp(-d * d / (2 * sigma * sigma));
    total += g[k];
  }
  for (auto& v : g) v /= total;  // the 2-D window is the outer product: normalised 1-D taps
  return g;
}

// The package's 2-D window: exp(−(x² + y²)/(2σ²)) / (2πσ²), divided by its NumPy sum (pairwise: 8 lanes).
std::array<double, kTaps * kTaps> gaussian_window() {
  std::array<double, kTaps * kTaps> w{};
  const double sigma = 7.0 / 6.0, norm = 1.0 / (2 * M_PI * (sigma * sigma));
  for (int j = 0; j < kTaps; ++j)
    for (int k = 0; k < kTaps; ++k) {
      const double y = j - kHalf, x = k - kHalf;
      w[j * kTaps + k] = norm * std::exp(-(x * x + y * y) / (2 * (sigma * sigma)));
    }
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int n = kTaps * kTaps, n8 = n - n % 8;
  for (int i = 0; i < n8; ++i) lane[i % 8] += w[i];
  double total = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (int i = n8; i < n; ++i) total += w[i];
  for (auto& v : w) v /= total;
  return w;
}

// Y − μ at (y, x) with μ summed directly over the 7×7 window, row by row as scipy's convolve2d does.
// Used only where the separable Y − μ is ~0: in an exactly constant window the true value is 0 and
// its sign is rounding noise, and the package's counts of negative/non-negative MSCN values (hence
// σ_l, σ_r) follow the direct sum's noise far more closely than the separable one's.
double centred_direct(const double* img, int64_t H, int64_t W, int64_t y, int64_t x,
                      const std::array<double, kTaps * kTaps>& w2) {
  double mu = 0;
  for (int j = 0; j < kTaps; ++j) {
    const int64_t r = y + j - kHalf;
    for (int k = 0; k < kTaps; ++k) {
      const int64_t c = x + k - kHalf;
      const double v = (r < 0 || r >= H || c < 0 || c >= W) ? 0.0 : img[r * W + c];
      mu += w2[j * kTaps + k] * v;
    }
  }
  return img[y * W + x] - mu;
}

void image_moments(const double* img, int64_t H, int64_t W, const std::array<double, kTaps>& g,
                   const std::array<double, kTaps * kTaps>& w2,
                   std::vector<double>& hm, std::vector<double>& hs, std::vector<double>& pad,
                   std::vector<double>& rows, double* out) {
  // horizontal pass: hm = w_x ∗ Y, hs = w_x ∗ Y² (zero padding); loops over x innermost so they vectorise
  pad.assign(2 * (W + 2 * kHalf), 0.0);
  double* pv = pad.data();
  double* pq = pad.data() + W + 2 * kHalf;
  for (int64_t y = 0; y < H; ++y) {
    const double* src = img + y * W;
    for (int64_t x = 0; x < W; ++x) {
      pv[x + kHalf] = src[x];
      pq[x + kHalf] = src[x] * src[x];
    }
    double* m = hm.data() + y * W;
    double* s = hs.data() + y * W;
    for (int64_t x = 0; x < W; ++x) m[x] = s[x] = 0.0;
    for (int k = 0; k < kTaps; ++k)
      for (int64_t x = 0; x < W; ++x) {
        m[x] += g[k] * pv[x + k];
        s[x] += g[k] * pq[x + k];
      }
  }
  // vertical pass row by row → MSCN row; products with the previous row
  std::array<Sums, kMaps> acc{};
  const int64_t counts[kMaps] = {H * W, H * (W - 1), (H - 1) * W, (H - 1) * (W - 1), (H - 1) * (W - 1)};
  double* prev = rows.data();
  double* cur = rows.data() + W;
  std::vector<double> mu(W), s2(W);
  for (int64_t y = 0; y < H; ++y) {
    std::fill(mu.begin(), mu.end(), 0.0);
    std::fill(s2.begin(), s2.end(), 0.0);
    for (int j = 0; j < kTaps; ++j) {
      const int64_t r = y + j - kHalf;
      if (r < 0 || r >= H) continue;
      const double* m = hm.data() + r * W;
      const double* s = hs.data() + r * W;
      for (int64_t x = 0; x < W; ++x) {
        mu[x] += g[j] * m[x];
        s2[x] += g[j] * s[x];
      }
    }
    const double* src = img + y * W;
    for (int64_t x = 0; x < W; ++x) {
      double d = src[x] - mu[x];
      if (std::fabs(d) <= kFlat) d = centred_direct(img, H, W, y, x, w2);
      cur[x] = d / (std::sqrt(std::fabs(mu[x] * mu[x] - s2[x])) + kC);
    }
    acc[0].add<false>(cur, nullptr, W);
    acc[1].add<true>(cur, cur + 1, W - 1);
    if (y > 0) {
      acc[2].add<true>(prev, cur, W);
      acc[3].add<true>(prev, cur + 1, W - 1);
      acc[4].add<true>(cur, prev + 1, W - 1);
    }
    std::swap(prev, cur);
  }
  for (int i = 0; i < kMaps; ++i) {
    double* o = out + i * kSums;
    o[0] = Sums::total(acc[i].abs);
    o[1] = Sums::total(acc[i].sq_neg);
    o[2] = static_cast<double>(acc[i].negatives());
    o[3] = Sums::total(acc[i].sq_pos);
    o[4] = static_cast<double>(counts[i] - acc[i].negatives());
  }
}

// OpenCV resize(fx = fy = 1/2, INTER_CUBIC): out[j] = Σ_t c_t · in[clamp(2j − 1 + t)], c = (−3, 19, 19, −3)/32,
// rows then columns; output size round-half-even(n / 2) (petal_fast/ops/_brisque_resize.py).
void resize_half(const double* src, int64_t H, int64_t W, int64_t h, int64_t w, std::vector<double>& tmp,
                 double* dst) {
  constexpr double c[4] = {-3.0 / 32.0, 19.0 / 32.0, 19.0 / 32.0, -3.0 / 32.0};
  auto clamp = [](int64_t i, int64_t n) { return i < 0 ? int64_t{0} : (i >= n ? n - 1 : i); };
  tmp.resize(H * w);
  for (int64_t y = 0; y < H; ++y)
    for (int64_t j = 0; j < w; ++j) {
      double a = 0;
      for (int t = 0; t < 4; ++t) a += src[y * W + clamp(2 * j - 1 + t, W)] * c[t];
      tmp[y * w + j] = a;
    }
  for (int64_t i = 0; i < h; ++i) {
    double* o = dst + i * w;
    for (int64_t j = 0; j < w; ++j) o[j] = 0;
    for (int t = 0; t < 4; ++t) {
      const double* r = tmp.data() + clamp(2 * i - 1 + t, H) * w;
      for (int64_t j = 0; j < w; ++j) o[j] += r[j] * c[t];
    }
  }
}

// Luminance Y = 0.2125 R + 0.7154 G + 0.0721 B in [0, 1] (uint8 divided by 255), as float64.
template <typename T>
void luminance(const T* src, int64_t C, int64_t HW, double* dst) {
  const double scale = std::is_same<T, uint8_t>::value ? 1.0 / 255.0 : 1.0;
  if (C == 1) {
    for (int64_t p = 0; p < HW; ++p) dst[p] = static_cast<double>(src[p]) * scale;
    return;
  }
  for (int64_t p = 0; p < HW; ++p)
    dst[p] = 0.2125 * (static_cast<double>(src[p]) * scale) + 0.7154 * (static_cast<double>(src[HW + p]) * scale) +
             0.0721 * (static_cast<double>(src[2 * HW + p]) * scale);
}

int64_t half_size(int64_t n) { return static_cast<int64_t>(std::nearbyint(n * 0.5)); }  // cvRound: half to even

// images (B, C ∈ {1, 3}, H, W) uint8 / float32 / float64 → (B, scales, 5 maps, 5 sums), scale 2 = half size.
Tensor brisque_moments(const Tensor& images, int64_t scales) {
  TORCH_CHECK(images.device().is_cpu(), "brisque_moments: images must be a CPU tensor");
  TORCH_CHECK(images.dim() == 4 && (images.size(1) == 1 || images.size(1) == 3),
              "brisque_moments: images must be (B, 1 or 3, H, W)");
  TORCH_CHECK(images.size(2) >= 4 && images.size(3) >= 4, "brisque_moments: H and W must be >= 4");
  TORCH_CHECK(scales == 1 || scales == 2, "brisque_moments: scales must be 1 or 2");
  const auto dtype = images.scalar_type();
  TORCH_CHECK(dtype == at::kByte || dtype == at::kFloat || dtype == at::kDouble,
              "brisque_moments: images must be uint8, float32 or float64");
  const Tensor x = images.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t h = half_size(H), w = half_size(W);
  Tensor out = at::empty({B, scales, kMaps, kSums}, x.options().dtype(at::kDouble));
  double* dst = out.data_ptr<double>();
  const auto g = gaussian_taps();
  const auto w2 = gaussian_window();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::vector<double> gray(H * W), half(h * w), hm(H * W), hs(H * W), pad, rows(2 * W), tmp;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t off = b * C * H * W;
      if (dtype == at::kByte) luminance(x.data_ptr<uint8_t>() + off, C, H * W, gray.data());
      else if (dtype == at::kFloat) luminance(x.data_ptr<float>() + off, C, H * W, gray.data());
      else luminance(x.data_ptr<double>() + off, C, H * W, gray.data());
      double* o = dst + b * scales * kMaps * kSums;
      image_moments(gray.data(), H, W, g, w2, hm, hs, pad, rows, o);
      if (scales == 2) {
        resize_half(gray.data(), H, W, h, w, tmp, half.data());
        image_moments(half.data(), h, w, g, w2, hm, hs, pad, rows, o + kMaps * kSums);
      }
    }
  });
  return out;
}

// ---- the rest of BRISQUE per image, so a CPU batch is one parallel call (no small torch ops after it,
// which cost more than the whole computation on a busy 2-core machine). Same formulas as
// petal_fast/ops/_brisque_ggd.py and _brisque_svr.py; the shape ν is found by bisection in log ν instead of
// table + Newton (same root, same bracket [1e-3, 1e3]).
double log_phi(double nu) { return 2 * std::lgamma(2 / nu) - std::lgamma(1 / nu) - std::lgamma(3 / nu); }

double solve_shape(double r_hat) {
  if (!std::isfinite(r_hat) || r_hat <= 0) return std::numeric_limits<double>::quiet_NaN();
  const double target = std::log(r_hat);
  double a = std::log(1e-3), b = std::log(1e3);
  for (int i = 0; i < 64; ++i) {
    const double mid = 0.5 * (a + b);
    if (log_phi(std::exp(mid)) < target) a = mid;
    else b = mid;
  }
  return std::exp(0.5 * (a + b));
}

// (5 maps × 5 sums) → 18 features: MSCN [ν, (σ_l² + σ_r²)/2], each product [ν, η, σ_l², σ_r²].
void aggd_features(const double* sums, double* f) {
  for (int i = 0; i < kMaps; ++i) {
    const double* m = sums + i * kSums;
    const double n = m[2] + m[4];
    const double r_hat = (m[0] / n) * (m[0] / n) / ((m[1] + m[3]) / n);
    const double var_l = m[1] / m[2], var_r = m[3] / m[4];
    const double sd_l = std::sqrt(var_l), sd_r = std::sqrt(var_r), g = sd_l / sd_r;
    const double nu = solve_shape(r_hat * (g * g * g + 1) * (g + 1) / ((g * g + 1) * (g * g + 1)));
    const double lg1 = std::lgamma(1 / nu), lg2 = std::lgamma(2 / nu), lg3 = std::lgamma(3 / nu);
    if (i == 0) {
      f[0] = nu;
      f[1] = 0.5 * (var_l + var_r);
    } else {
      double* o = f + 2 + 4 * (i - 1);
      o[0] = nu;
      o[1] = (sd_r - sd_l) * std::exp(0.5 * (lg1 - lg3) + lg2 - lg1);
      o[2] = var_l;
      o[3] = var_r;
    }
  }
}

// RBF ε-SVR on min/max-scaled features: Σ_i c_i exp(−g ‖x − s_i‖²) − ρ.
double svr_score(const double* feat, const double* f_min, const double* f_max, const double* support,
                 const double* coef, int64_t n_sv, int64_t dim, double rho, double gamma) {
  std::vector<double> x(dim);
  for (int64_t d = 0; d < dim; ++d) x[d] = -1 + 2.0 / (f_max[d] - f_min[d]) * (feat[d] - f_min[d]);
  double total = 0;
  for (int64_t i = 0; i < n_sv; ++i) {
    const double* sv = support + i * dim;
    double d2 = 0;
    for (int64_t d = 0; d < dim; ++d) d2 += (x[d] - sv[d]) * (x[d] - sv[d]);
    total += coef[i] * std::exp(-gamma * d2);
  }
  return total - rho;
}

// [min, max] of one image's raw values, NaN if any value is NaN (for the caller's input-range check).
template <typename T>
void value_range(const T* src, int64_t n, double* out) {
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(src[i]);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
    nan |= v != v;
  }
  out[0] = nan ? std::numeric_limits<double>::quiet_NaN() : lo;
  out[1] = nan ? std::numeric_limits<double>::quiet_NaN() : hi;
}

// images (B, C ∈ {1, 3}, H, W) → (scores (B,), features (B, 36), per-image [min, max] of the raw
// values (B, 2)), everything per image in one task.
std::tuple<Tensor, Tensor, Tensor> brisque_score(const Tensor& images, const Tensor& f_min, const Tensor& f_max,
                                         const Tensor& support, const Tensor& coef, double rho, double gamma) {
  const int64_t dim = 2 * 18;
  TORCH_CHECK(f_min.scalar_type() == at::kDouble && f_max.scalar_type() == at::kDouble &&
                  support.scalar_type() == at::kDouble && coef.scalar_type() == at::kDouble,
              "brisque_score: the model tensors must be float64");
  TORCH_CHECK(f_min.numel() == dim && f_max.numel() == dim && support.dim() == 2 && support.size(1) == dim &&
                  coef.numel() == support.size(0),
              "brisque_score: model must be f_min, f_max (36,), support (n, 36), coef (n,)");
  const Tensor sums = brisque_moments(images, 2);  // (B, 2, 5, 5)
  const int64_t B = sums.size(0);
  Tensor feats = at::empty({B, dim}, sums.options());
  Tensor scores = at::empty({B}, sums.options());
  Tensor ranges = at::empty({B, 2}, sums.options());
  const Tensor x = images.contiguous();
  const int64_t per_image = x.numel() / std::max<int64_t>(B, 1);
  double* pr = ranges.data_ptr<double>();
  const Tensor lo = f_min.contiguous(), hi = f_max.contiguous(), sv = support.contiguous(), c = coef.contiguous();
  const double* ps = sums.data_ptr<double>();
  double* pf = feats.data_ptr<double>();
  double* po = scores.data_ptr<double>();
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t b = b0; b < b1; ++b) {
      aggd_features(ps + b * 2 * kMaps * kSums, pf + b * dim);
      aggd_features(ps + b * 2 * kMaps * kSums + kMaps * kSums, pf + b * dim + 18);
      po[b] = svr_score(pf + b * dim, lo.data_ptr<double>(), hi.data_ptr<double>(), sv.data_ptr<double>(),
                        c.data_ptr<double>(), sv.size(0), dim, rho, gamma);
      const auto dtype = x.scalar_type();
      if (dtype == at::kByte) value_range(x.data_ptr<uint8_t>() + b * per_image, per_image, pr + 2 * b);
      else if (dtype == at::kFloat) value_range(x.data_ptr<float>() + b * per_image, per_image, pr + 2 * b);
      else value_range(x.data_ptr<double>() + b * per_image, per_image, pr + 2 * b);
    }
  });
  return {scores, feats, ranges};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(petal_fast, m) {
  m.def("brisque_moments(Tensor images, int scales) -> Tensor");
  m.impl("brisque_moments", c10::DispatchKey::CPU, TORCH_FN(brisque_moments));
  m.def("brisque_score(Tensor images, Tensor f_min, Tensor f_max, Tensor support, Tensor coef, float rho, "
        "float gamma) -> (Tensor, Tensor, Tensor)");
  m.impl("brisque_score", c10::DispatchKey::CPU, TORCH_FN(brisque_score));
}

}  // namespace petal_fast
