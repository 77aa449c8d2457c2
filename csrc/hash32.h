// Counter-based dropout hash defined in petal_fast/definitions/dropout.py (also kernels/_rng.py):
// lowbias32, key = mix(seed ^ mix(branch + 1)), h(i, j) = mix(mix(key ^ i) ^ j * 0x9E3779B9),
// keep when (h >> 8) >= round(p * 2^24).
#pragma once
#include <cmath>
#include <cstdint>

namespace petal_fast {

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

inline uint32_t branch_key(int64_t seed, int64_t branch) {
  return mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(branch + 1)));
}

inline uint32_t keep_threshold(double p) {
  return static_cast<uint32_t>(std::llround(p * 16777216.0));
}

inline bool keep(uint32_t row_hash, int64_t col, uint32_t threshold) {
  return (mix32(row_hash ^ (static_cast<uint32_t>(col) * 0x9E3779B9u)) >> 8) >= threshold;
}

// The dropout factor of column col: inv (= 1/(1−p)) if kept, else 0.
inline float keep_scale(uint32_t row_hash, uint32_t col, uint32_t threshold, float inv) {
  return (mix32(row_hash ^ (col * 0x9E3779B9u)) >> 8) >= threshold ? inv : 0.0f;
}

}  // namespace petal_fast
