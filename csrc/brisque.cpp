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
// Images are handed out one at a time from a shared counter (for_each_image), so a thread that the
// OS delays on a busy machine takes fewer images instead of holding the others at the barrier.
// The Gaussian is separable: a horizontal pass fills two H×W buffers (w_x ∗ Y, w_x ∗ Y²) that stay
// in cache, and one sweep down the rows finishes the vertical pass, forms the MSCN row, multiplies it
// with the previous row and accumulates — the MSCN map and the products are never stored.
//
// Speed (docs/design.md §3.5): every inner loop runs over x with no branch and no loop-carried
// dependence through memory, so it vectorises, and the image loops are compiled for AVX-512, AVX2 and
// the x86-64 baseline, picked at load time (PETAL_SIMD_CLONES; -ffp-contract=off keeps FMA out, so
// every clone rounds alike). Reductions keep kLanes independent partial sums: a lane count fixed in
// the source, not the vector width, so every build adds in the same order and gives the same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace petal_fast {
namespace {

using at::Tensor;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PETAL_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PETAL_SIMD_CLONES
#endif
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors between functions: all of them inlined
#define PETAL_INLINE inline __attribute__((always_inline))
#else
#define PETAL_INLINE inline
#endif

constexpr int kTaps = 7, kHalf = 3, kMaps = 5, kSums = 5;
constexpr double kC = 1.0 / 255.0;
constexpr double kFlat = 1e-10;  // |Y − μ| below this only in (numerically) constant windows

// The five sums of one map in kLanes partial sums each: lane l adds the values at x ≡ l (mod kLanes)
// in order. Branch-free (the sign of an MSCN value or product is a coin flip; a branch would
// mispredict half the time); counts are doubles (exact below 2⁵³) so that they vectorise with the rest.
constexpr int kLanes = 8;
struct Sums {
  double abs[kLanes] = {}, sq_neg[kLanes] = {}, sq_pos[kLanes] = {}, n_neg[kLanes] = {};

  static double total(const double* v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
  }
};

PETAL_INLINE void step(double v, double& abs, double& sq_neg, double& sq_pos, double& n_neg) {
  const bool neg = v < 0;
  const double sq = v * v;
  abs += std::fabs(v);
  sq_neg += neg ? sq : 0.0;
  sq_pos += neg ? 0.0 : sq;
  n_neg += neg ? 1.0 : 0.0;
}

#if defined(__GNUC__)
// GCC and Clang: the kLanes lanes as one 8-wide vector (vector extensions: a zmm register in the
// AVX-512 clone, two ymm in the AVX2 one, four xmm in the baseline), the same additions in the same
// order as the scalar form below, which the auto-vectoriser does not find (a reduction held in arrays).
typedef double vd8 __attribute__((vector_size(64)));
typedef long long vi8 __attribute__((vector_size(64)));

PETAL_INLINE vd8 load8(const double* p) {
  vd8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
PETAL_INLINE void store8(double* p, vd8 v) { std::memcpy(p, &v, sizeof v); }

template <bool Prod>
PETAL_INLINE void accumulate(Sums& s, const double* __restrict a, const double* __restrict b, int64_t n) {
  static_assert(kLanes == 8, "one vd8 holds the lanes");
  vd8 abs = load8(s.abs), sq_neg = load8(s.sq_neg), sq_pos = load8(s.sq_pos), n_neg = load8(s.n_neg);
  const vd8 minus_zero = {-0.0, -0.0, -0.0, -0.0, -0.0, -0.0, -0.0, -0.0}, one = {1, 1, 1, 1, 1, 1, 1, 1};
  int64_t x0 = 0;
  for (; x0 + kLanes <= n; x0 += kLanes) {
    const vd8 v = Prod ? load8(a + x0) * load8(b + x0) : load8(a + x0);
    const vi8 neg = v < 0;  // all ones where v < 0
    const vd8 sq = v * v;
    abs += (vd8)((vi8)v & ~(vi8)minus_zero);
    sq_neg += (vd8)((vi8)sq & neg);
    sq_pos += (vd8)((vi8)sq & ~neg);
    n_neg += (vd8)((vi8)one & neg);
  }
  store8(s.abs, abs), store8(s.sq_neg, sq_neg), store8(s.sq_pos, sq_pos), store8(s.n_neg, n_neg);
  for (int l = 0; x0 + l < n; ++l)
    step(Prod ? a[x0 + l] * b[x0 + l] : a[x0 + l], s.abs[l], s.sq_neg[l], s.sq_pos[l], s.n_neg[l]);
}
#else
template <bool Prod>
void accumulate(Sums& s, const double* a, const double* b, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    const int l = static_cast<int>(x % kLanes);
    step(Prod ? a[x] * b[x] : a[x], s.abs[l], s.sq_neg[l], s.sq_pos[l], s.n_neg[l]);
  }
}
#endif

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

// One MSCN row: the vertical pass over the seven rows of w_x ∗ Y (m0…m6) and of w_x ∗ Y² (s0…s6),
// taps added in order, then (Y − μ)/(σ + C). A function of its own because compilers honour __restrict
// on parameters: it tells them the rows do not overlap the output, so the loop vectorises
// (no run-time overlap checks for fifteen inputs).
PETAL_INLINE void mscn_row(const double* __restrict m0, const double* __restrict m1, const double* __restrict m2,
                           const double* __restrict m3, const double* __restrict m4, const double* __restrict m5,
                           const double* __restrict m6, const double* __restrict s0, const double* __restrict s1,
                           const double* __restrict s2, const double* __restrict s3, const double* __restrict s4,
                           const double* __restrict s5, const double* __restrict s6, const double* __restrict src,
                           const std::array<double, kTaps>& g, double* __restrict out, int64_t W, int64_t y,
                           const double* img, int64_t H, const std::array<double, kTaps * kTaps>& w2) {
  const double g0 = g[0], g1 = g[1], g2 = g[2], g3 = g[3], g4 = g[4], g5 = g[5], g6 = g[6];
  // written out, not through a lambda: a pointer read back from a closure loses its __restrict
  for (int64_t x = 0; x < W; ++x) {
    const double mu = g0 * m0[x] + g1 * m1[x] + g2 * m2[x] + g3 * m3[x] + g4 * m4[x] + g5 * m5[x] + g6 * m6[x];
    const double sq = g0 * s0[x] + g1 * s1[x] + g2 * s2[x] + g3 * s3[x] + g4 * s4[x] + g5 * s5[x] + g6 * s6[x];
    out[x] = (src[x] - mu) / (std::sqrt(std::fabs(mu * mu - sq)) + kC);
  }
  // rare: (numerically) constant windows, |Y − μ| ≤ kFlat; σ + C ≥ C, so only where |m| ≤ kFlat / C
  for (int64_t x = 0; x < W; ++x) {
    if (!(std::fabs(out[x]) <= kFlat / kC)) continue;
    const double mu = g0 * m0[x] + g1 * m1[x] + g2 * m2[x] + g3 * m3[x] + g4 * m4[x] + g5 * m5[x] + g6 * m6[x];
    const double sq = g0 * s0[x] + g1 * s1[x] + g2 * s2[x] + g3 * s3[x] + g4 * s4[x] + g5 * s5[x] + g6 * s6[x];
    if (std::fabs(src[x] - mu) <= kFlat)
      out[x] = centred_direct(img, H, W, y, x, w2) / (std::sqrt(std::fabs(mu * mu - sq)) + kC);
  }
}

// Per-thread scratch, reused from image to image (sized for the largest image of the call).
struct Buffers {
  std::vector<double> gray, half, hm, hs, pad, rows, tmp, zero;
};

PETAL_SIMD_CLONES
void image_moments(const double* img, int64_t H, int64_t W, const std::array<double, kTaps>& g,
                   const std::array<double, kTaps * kTaps>& w2, Buffers& buf, double* out) {
  buf.hm.resize(H * W);
  buf.hs.resize(H * W);
  buf.pad.assign(2 * (W + 2 * kHalf), 0.0);
  buf.rows.resize(2 * W);
  buf.zero.assign(W, 0.0);
  const double g0 = g[0], g1 = g[1], g2 = g[2], g3 = g[3], g4 = g[4], g5 = g[5], g6 = g[6];
  // horizontal pass: hm = w_x ∗ Y, hs = w_x ∗ Y² (zero padding), the taps added in order 0…6
  double* pv = buf.pad.data();
  double* pq = buf.pad.data() + W + 2 * kHalf;
  for (int64_t y = 0; y < H; ++y) {
    const double* src = img + y * W;
    for (int64_t x = 0; x < W; ++x) {
      pv[x + kHalf] = src[x];
      pq[x + kHalf] = src[x] * src[x];
    }
    double* __restrict m = buf.hm.data() + y * W;
    double* __restrict s = buf.hs.data() + y * W;
    for (int64_t x = 0; x < W; ++x) {
      m[x] = g0 * pv[x] + g1 * pv[x + 1] + g2 * pv[x + 2] + g3 * pv[x + 3] + g4 * pv[x + 4] + g5 * pv[x + 5] +
             g6 * pv[x + 6];
      s[x] = g0 * pq[x] + g1 * pq[x + 1] + g2 * pq[x + 2] + g3 * pq[x + 3] + g4 * pq[x + 4] + g5 * pq[x + 5] +
             g6 * pq[x + 6];
    }
  }
  // vertical pass row by row (rows outside the image read a zero row: + 0 changes no sum) → MSCN
  // row; products with the previous row
  std::array<Sums, kMaps> acc{};
  const int64_t counts[kMaps] = {H * W, H * (W - 1), (H - 1) * W, (H - 1) * (W - 1), (H - 1) * (W - 1)};
  double* prev = buf.rows.data();
  double* cur = buf.rows.data() + W;
  const double* zero = buf.zero.data();
  for (int64_t y = 0; y < H; ++y) {
    auto row = [&](const std::vector<double>& v, int j) {  // row y + j − 3 of a buffer; outside: zeros
      const int64_t r = y + j - kHalf;
      return r >= 0 && r < H ? v.data() + r * W : zero;
    };
    mscn_row(row(buf.hm, 0), row(buf.hm, 1), row(buf.hm, 2), row(buf.hm, 3), row(buf.hm, 4), row(buf.hm, 5),
             row(buf.hm, 6), row(buf.hs, 0), row(buf.hs, 1), row(buf.hs, 2), row(buf.hs, 3), row(buf.hs, 4),
             row(buf.hs, 5), row(buf.hs, 6), img + y * W, g, cur, W, y, img, H, w2);
    accumulate<false>(acc[0], cur, nullptr, W);
    accumulate<true>(acc[1], cur, cur + 1, W - 1);
    if (y > 0) {
      accumulate<true>(acc[2], prev, cur, W);
      accumulate<true>(acc[3], prev, cur + 1, W - 1);
      accumulate<true>(acc[4], cur, prev + 1, W - 1);
    }
    std::swap(prev, cur);
  }
  for (int i = 0; i < kMaps; ++i) {
    double* o = out + i * kSums;
    const double negatives = Sums::total(acc[i].n_neg);
    o[0] = Sums::total(acc[i].abs);
    o[1] = Sums::total(acc[i].sq_neg);
    o[2] = negatives;
    o[3] = Sums::total(acc[i].sq_pos);
    o[4] = static_cast<double>(counts[i]) - negatives;
  }
}

// OpenCV resize(fx = fy = 1/2, INTER_CUBIC): out[j] = Σ_t c_t · in[clamp(2j − 1 + t)], c = (−3, 19, 19, −3)/32,
// rows then columns; output size round-half-even(n / 2) (petal_fast/ops/_brisque_resize.py).
PETAL_INLINE void resize_half(const double* src, int64_t H, int64_t W, int64_t h, int64_t w, std::vector<double>& tmp,
                              double* dst) {
  constexpr double c0 = -3.0 / 32.0, c1 = 19.0 / 32.0, c2 = 19.0 / 32.0, c3 = -3.0 / 32.0;
  auto clamp = [](int64_t i, int64_t n) { return i < 0 ? int64_t{0} : (i >= n ? n - 1 : i); };
  tmp.resize(H * w);
  const int64_t last = std::min(w - 1, (W - 3) / 2);  // the last column whose taps 2j − 1 … 2j + 2 lie inside
  for (int64_t y = 0; y < H; ++y) {
    const double* s = src + y * W;
    double* t = tmp.data() + y * w;
    auto edge = [&](int64_t j) {
      t[j] = s[clamp(2 * j - 1, W)] * c0 + s[clamp(2 * j, W)] * c1 + s[clamp(2 * j + 1, W)] * c2 +
             s[clamp(2 * j + 2, W)] * c3;
    };
    edge(0);
    for (int64_t j = 1; j <= last; ++j) t[j] = s[2 * j - 1] * c0 + s[2 * j] * c1 + s[2 * j + 1] * c2 + s[2 * j + 2] * c3;
    for (int64_t j = std::max<int64_t>(1, last + 1); j < w; ++j) edge(j);
  }
  for (int64_t i = 0; i < h; ++i) {
    const double* r0 = tmp.data() + clamp(2 * i - 1, H) * w;
    const double* r1 = tmp.data() + clamp(2 * i, H) * w;
    const double* r2 = tmp.data() + clamp(2 * i + 1, H) * w;
    const double* r3 = tmp.data() + clamp(2 * i + 2, H) * w;
    double* o = dst + i * w;
    for (int64_t j = 0; j < w; ++j) o[j] = r0[j] * c0 + r1[j] * c1 + r2[j] * c2 + r3[j] * c3;
  }
}

// Luminance Y = 0.2125 R + 0.7154 G + 0.0721 B in [0, 1] (uint8 divided by 255), as float64.
template <typename T>
PETAL_INLINE void luminance(const T* src, int64_t C, int64_t HW, double* dst) {
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

// Hands images b ∈ [0, B) to fn(b, buffers) one at a time from a shared counter, on at most
// at::get_num_threads() threads (one parallel region; serial inside another). Dynamic, not a static
// split: a thread the OS preempts on a busy machine takes fewer images instead of making the others
// wait for its share at the end of the region.
template <typename Fn>
void for_each_image(int64_t B, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(B, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Buffers buf;
    for (int64_t b = next.fetch_add(1, std::memory_order_relaxed); b < B;
         b = next.fetch_add(1, std::memory_order_relaxed))
      fn(b, buf);
  });
}

// One image's moment sums (scales × 5 maps × 5 sums) from its raw values.
PETAL_SIMD_CLONES
void moments_of(const Tensor& x, int64_t b, int64_t scales, const std::array<double, kTaps>& g,
                const std::array<double, kTaps * kTaps>& w2, Buffers& buf, double* o) {
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3), h = half_size(H), w = half_size(W);
  const int64_t off = b * C * H * W;
  buf.gray.resize(H * W);
  const auto dtype = x.scalar_type();
  if (dtype == at::kByte) luminance(x.data_ptr<uint8_t>() + off, C, H * W, buf.gray.data());
  else if (dtype == at::kFloat) luminance(x.data_ptr<float>() + off, C, H * W, buf.gray.data());
  else luminance(x.data_ptr<double>() + off, C, H * W, buf.gray.data());
  image_moments(buf.gray.data(), H, W, g, w2, buf, o);
  if (scales == 2) {
    buf.half.resize(h * w);
    resize_half(buf.gray.data(), H, W, h, w, buf.tmp, buf.half.data());
    image_moments(buf.half.data(), h, w, g, w2, buf, o + kMaps * kSums);
  }
}

Tensor checked_images(const Tensor& images, const char* op) {
  TORCH_CHECK(images.device().is_cpu(), op, ": images must be a CPU tensor");
  TORCH_CHECK(images.dim() == 4 && (images.size(1) == 1 || images.size(1) == 3), op,
              ": images must be (B, 1 or 3, H, W)");
  TORCH_CHECK(images.size(2) >= 4 && images.size(3) >= 4, op, ": H and W must be >= 4");
  const auto dtype = images.scalar_type();
  TORCH_CHECK(dtype == at::kByte || dtype == at::kFloat || dtype == at::kDouble, op,
              ": images must be uint8, float32 or float64");
  return images.contiguous();
}

// images (B, C ∈ {1, 3}, H, W) uint8 / float32 / float64 → (B, scales, 5 maps, 5 sums), scale 2 = half size.
Tensor brisque_moments(const Tensor& images, int64_t scales) {
  TORCH_CHECK(scales == 1 || scales == 2, "brisque_moments: scales must be 1 or 2");
  const Tensor x = checked_images(images, "brisque_moments");
  const int64_t B = x.size(0);
  Tensor out = at::empty({B, scales, kMaps, kSums}, x.options().dtype(at::kDouble));
  double* dst = out.data_ptr<double>();
  const auto g = gaussian_taps();
  const auto w2 = gaussian_window();
  for_each_image(B, [&](int64_t b, Buffers& buf) { moments_of(x, b, scales, g, w2, buf, dst + b * scales * kMaps * kSums); });
  return out;
}

// ---- the rest of BRISQUE per image, so a CPU batch is one parallel call (no small torch ops after it,
// which cost more than the whole computation on a busy 2-core machine). Same formulas as
// petal_fast/ops/_brisque_ggd.py and _brisque_svr.py.
double log_phi(double nu) { return 2 * std::lgamma(2 / nu) - std::lgamma(1 / nu) - std::lgamma(3 / nu); }

// log φ on an even grid of log ν over the bracket [1e-3, 1e3] (φ increases from 0 to 3/4), built once.
constexpr int kGrid = 256;
struct ShapeGrid {
  double lo = std::log(1e-3), hi = std::log(1e3), u[kGrid], f[kGrid];
  ShapeGrid() {
    for (int i = 0; i < kGrid; ++i) {
      u[i] = lo + (hi - lo) * i / (kGrid - 1);
      f[i] = log_phi(std::exp(u[i]));
    }
  }
};

// ν with log φ(ν) = log r̂: the grid cell that brackets it, then the Illinois variant of regula falsi
// in u = log ν inside that cell (7 evaluations on average, against 64 for bisection over the whole
// bracket; the same root to ~1e-12). r̂ beyond φ's range gives the bracket's end, as in the reference.
double solve_shape(double r_hat) {
  if (!std::isfinite(r_hat) || r_hat <= 0) return std::numeric_limits<double>::quiet_NaN();
  static const ShapeGrid grid;
  const double target = std::log(r_hat);
  if (!(grid.f[0] < target)) return std::exp(grid.u[0]);
  if (!(target < grid.f[kGrid - 1])) return std::exp(grid.u[kGrid - 1]);
  const int i = static_cast<int>(std::upper_bound(grid.f, grid.f + kGrid, target) - grid.f);  // f[i-1] ≤ t < f[i]
  double a = grid.u[i - 1], b = grid.u[i], fa = grid.f[i - 1] - target, fb = grid.f[i] - target;
  if (fa == 0) return std::exp(a);
  double c = a, c_prev = b;
  for (int side = 0, it = 0; it < 60; ++it) {
    c = (a * fb - b * fa) / (fb - fa);
    if (!(a < c && c < b)) c = 0.5 * (a + b);
    const double fc = log_phi(std::exp(c)) - target;
    if (fc == 0 || std::fabs(c - c_prev) <= 1e-14 * std::max(1.0, std::fabs(c))) break;
    c_prev = c;
    if (fc < 0) {
      a = c, fa = fc;
      if (side == -1) fb *= 0.5;
      side = -1;
    } else {
      b = c, fb = fc;
      if (side == 1) fa *= 0.5;
      side = 1;
    }
  }
  return std::exp(c);
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
    if (i == 0) {
      f[0] = nu;
      f[1] = 0.5 * (var_l + var_r);
    } else {
      const double lg1 = std::lgamma(1 / nu), lg2 = std::lgamma(2 / nu), lg3 = std::lgamma(3 / nu);
      double* o = f + 2 + 4 * (i - 1);
      o[0] = nu;
      o[1] = (sd_r - sd_l) * std::exp(0.5 * (lg1 - lg3) + lg2 - lg1);
      o[2] = var_l;
      o[3] = var_r;
    }
  }
}

// RBF ε-SVR on min/max-scaled features: Σ_i c_i exp(−g ‖x − s_i‖²) − ρ. The support vectors come
// transposed (dim × n_sv, n_sv padded to kLanes with zero coefficients), so kLanes vectors' distances
// accumulate side by side, each over d in order.
PETAL_SIMD_CLONES
double svr_score(const double* feat, const double* f_min, const double* f_max, const double* support_t,
                 const double* coef, int64_t n_pad, int64_t dim, double rho, double gamma) {
  double x[64];
  for (int64_t d = 0; d < dim; ++d) x[d] = -1 + 2.0 / (f_max[d] - f_min[d]) * (feat[d] - f_min[d]);
  double total[kLanes] = {};
  for (int64_t i0 = 0; i0 < n_pad; i0 += kLanes) {
    double d2[kLanes] = {};
    for (int64_t d = 0; d < dim; ++d)
      for (int l = 0; l < kLanes; ++l) {
        const double diff = x[d] - support_t[d * n_pad + i0 + l];
        d2[l] += diff * diff;
      }
    for (int l = 0; l < kLanes; ++l) total[l] += coef[i0 + l] * std::exp(-gamma * d2[l]);
  }
  return Sums::total(total) - rho;
}

// [min, max] of one image's raw values, NaN if any value is NaN (for the caller's input-range check).
// In the input's own type (exact); min and max do not depend on the order, so the loop may be vectorised freely.
template <typename T>
PETAL_INLINE void value_range(const T* src, int64_t n, double* out) {
  using lim = std::numeric_limits<T>;
  T lo = lim::has_infinity ? lim::infinity() : lim::max(), hi = lim::has_infinity ? -lim::infinity() : lim::lowest();
  int nan = 0;
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    const T v = src[i];
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    nan |= v != v;
  }
  out[0] = nan ? std::numeric_limits<double>::quiet_NaN() : static_cast<double>(lo);
  out[1] = nan ? std::numeric_limits<double>::quiet_NaN() : static_cast<double>(hi);
}

PETAL_SIMD_CLONES
void image_range(const Tensor& x, int64_t b, int64_t per_image, double* out) {
  const auto dtype = x.scalar_type();
  if (dtype == at::kByte) value_range(x.data_ptr<uint8_t>() + b * per_image, per_image, out);
  else if (dtype == at::kFloat) value_range(x.data_ptr<float>() + b * per_image, per_image, out);
  else value_range(x.data_ptr<double>() + b * per_image, per_image, out);
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
  const Tensor x = checked_images(images, "brisque_score");
  const int64_t B = x.size(0), n_sv = support.size(0), n_pad = (n_sv + kLanes - 1) / kLanes * kLanes;
  const auto opts = x.options().dtype(at::kDouble);
  Tensor feats = at::empty({B, dim}, opts);
  Tensor scores = at::empty({B}, opts);
  Tensor ranges = at::empty({B, 2}, opts);
  // the model transposed and padded once per call (n_sv × 36 doubles: ~0.2 MB, a few µs)
  Tensor sv_t = at::zeros({dim, n_pad}, opts);
  sv_t.narrow(1, 0, n_sv).copy_(support.t());
  Tensor c_pad = at::zeros({n_pad}, opts);
  c_pad.narrow(0, 0, n_sv).copy_(coef.reshape(-1));
  const Tensor lo = f_min.contiguous(), hi = f_max.contiguous();
  const int64_t per_image = x.numel() / std::max<int64_t>(B, 1);
  const double *p_lo = lo.data_ptr<double>(), *p_hi = hi.data_ptr<double>(), *p_sv = sv_t.data_ptr<double>(),
               *p_c = c_pad.data_ptr<double>();
  double *pf = feats.data_ptr<double>(), *po = scores.data_ptr<double>(), *pr = ranges.data_ptr<double>();
  const auto g = gaussian_taps();
  const auto w2 = gaussian_window();
  for_each_image(B, [&](int64_t b, Buffers& buf) {
    double sums[2 * kMaps * kSums];
    moments_of(x, b, 2, g, w2, buf, sums);
    aggd_features(sums, pf + b * dim);
    aggd_features(sums + kMaps * kSums, pf + b * dim + 18);
    po[b] = svr_score(pf + b * dim, p_lo, p_hi, p_sv, p_c, n_pad, dim, rho, gamma);
    image_range(x, b, per_image, pr + 2 * b);
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
