// Matmuls straight from llama.cpp's quantized blocks (the bytes of a GGUF tensor, as stored): Q4_0, Q4_1, Q5_0,
// Q5_1, Q8_0 (32 weights a block) and the K-quants Q4_K, Q5_K, Q6_K (256 weights a super-block). Nothing is
// expanded: each call reads the blocks once and computes with their exact codes and scales. Weights are packed
// once at load (pack_rows: 8 rows interleaved, the same codes and scales) for kernels that compute 8 output
// columns at once; rows not in whole groups of 8 run as stored.
//
// Activations are quantized per row to int8 with one scale per 32 values (per 256 for the K-quants), the
// sums of every 16 codes kept beside them; a block's dot product is then integer arithmetic (AVX2 maddubs: 32
// u8 x s8 products a instruction) and one float multiply-add per block. That is llama.cpp's arithmetic, so the
// result differs from the exact float product only by the activations' rounding (each value moves by at most
// half its block's step: tests/test_block_kernels.py bounds the error by that, against float64).
//
// Layouts (the gguf package's dequantisation is the reference; weight = value of the formula):
//   Q4_0: d f16, qs[16]             w = d (q - 8), q = low nibbles (elements 0-15) then high (16-31)
//   Q4_1: d, m f16, qs[16]          w = d q + m
//   Q5_0: d f16, qh u32, qs[16]     w = d (q - 16), q's fifth bit: bit j of qh
//   Q5_1: d, m f16, qh u32, qs[16]  w = d q + m
//   Q8_0: d f16, qs[32] int8        w = d q
//   Q4_K: d, dmin f16, scales[12], qs[128]: 8 groups of 32, 6-bit scale sc and min m each;
//         w = d sc q - dmin m; groups 2i and 2i+1 are the low and high nibbles of qs[32i .. 32i+31]
//   Q5_K: d, dmin, scales[12], qh[32], qs[128]: as Q4_K, q's fifth bit for group g: bit g of qh[l]
//   Q6_K: ql[128], qh[64], scales[16] int8, d f16: 16 groups of 16, w = d sc (q - 32); 32 values of group
//         pair g (half h = g / 4, j = g % 4): nibble of ql[64h + 32 (j % 2) + l] (low for j < 2), two bits
//         (qh[32h + l] >> 2j) & 3 on top
#include "kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

enum BlockType : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

// A type's rows repacked by pack_rows (below): kPacked | the ggml type
constexpr int64_t kPacked = 256;
constexpr int64_t kPackRows = 8;  // weight rows interleaved in a packed group

struct Format {
  int64_t values;  // weights a block
  int64_t bytes;   // bytes a block
};

// bytes a block (0: a type without a kernel)
constexpr int64_t bytes_of(int64_t type) {
  switch (type) {
    case kQ4_0: return 18;
    case kQ4_1: return 20;
    case kQ5_0: return 22;
    case kQ5_1: return 24;
    case kQ8_0: return 34;
    case kQ4_K: return 144;
    case kQ5_K: return 176;
    case kQ6_K: return 210;
    default: return 0;
  }
}

// bytes a row takes per block once packed (Q4_K, Q5_K: their 6-bit scales and mins stored a byte each)
constexpr int64_t packed_bytes_of(int64_t type) {
  return type == kQ4_K ? 148 : type == kQ5_K ? 180 : bytes_of(type);
}

Format format_of(int64_t type) {
  const int64_t base = type & ~kPacked;
  TORCH_CHECK(bytes_of(base) > 0, "ggml block type ", base, " has no kernel");
  return {base == kQ4_K || base == kQ5_K || base == kQ6_K ? 256 : 32,
          type & kPacked ? packed_bytes_of(base) : bytes_of(base)};
}

inline float half(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(bits);
#else
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
#endif
}

// Q4_K / Q5_K: the 6-bit scale and min of group g from the 12 packed bytes
inline void scale_min(const uint8_t* s, int g, int* sc, int* m) {
  if (g < 4) {
    *sc = s[g] & 63;
    *m = s[g + 4] & 63;
  } else {
    *sc = (s[g + 4] & 0x0F) | ((s[g - 4] >> 6) << 4);
    *m = (s[g + 4] >> 4) | ((s[g] >> 6) << 4);
  }
}

// ---- the codes of one group of 32 weights, unsigned (the offset goes with the scales), portable ----

// legacy blocks (one group): codes 0..15 / 0..31, or the int8 codes of Q8_0 (as their bytes)
void legacy_codes(int64_t type, const uint8_t* b, uint8_t* q) {
  const int nib = type == kQ4_0 ? 2 : type == kQ4_1 ? 4 : type == kQ5_0 ? 6 : 8;
  if (type == kQ8_0) {
    std::memcpy(q, b + 2, 32);
    return;
  }
  uint32_t qh = 0;
  if (type == kQ5_0 || type == kQ5_1) std::memcpy(&qh, b + nib - 4, 4);
  const uint8_t* qs = b + nib;
  for (int l = 0; l < 16; ++l) {
    q[l] = (qs[l] & 0x0F) | (((qh >> l) & 1) << 4);
    q[l + 16] = (qs[l] >> 4) | (((qh >> (l + 16)) & 1) << 4);
  }
}

// K-quant super-blocks: group g of 8 (32 weights each)
void k_codes(int64_t type, const uint8_t* b, int g, uint8_t* q) {
  if (type == kQ6_K) {
    const int h = g / 4, j = g % 4;
    const uint8_t* ql = b + 64 * h + 32 * (j % 2);
    const uint8_t* qh = b + 128 + 32 * h;
    for (int l = 0; l < 32; ++l) {
      q[l] = ((j < 2 ? ql[l] : ql[l] >> 4) & 0x0F) | (((qh[l] >> (2 * j)) & 3) << 4);
    }
    return;
  }
  const uint8_t* qs = b + (type == kQ5_K ? 48 : 16) + 32 * (g / 2);
  for (int l = 0; l < 32; ++l) {
    q[l] = (g % 2 ? qs[l] >> 4 : qs[l]) & 0x0F;
    if (type == kQ5_K) q[l] |= ((b[16 + l] >> g) & 1) << 4;
  }
}

// the block's weights as floats (the embedding's rows; the portable path)
void dequantize_block(int64_t type, const uint8_t* b, float* out) {
  uint8_t q[32];
  if (format_of(type).values == 32) {
    legacy_codes(type, b, q);
    const float d = half(b);
    for (int l = 0; l < 32; ++l) {
      switch (type) {
        case kQ4_0: out[l] = d * (q[l] - 8); break;
        case kQ5_0: out[l] = d * (q[l] - 16); break;
        case kQ8_0: out[l] = d * static_cast<int8_t>(q[l]); break;
        default: out[l] = d * q[l] + half(b + 2);  // Q4_1, Q5_1
      }
    }
    return;
  }
  for (int g = 0; g < 8; ++g) {
    k_codes(type, b, g, q);
    if (type == kQ6_K) {
      const float d = half(b + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      for (int l = 0; l < 32; ++l) out[32 * g + l] = d * sc[2 * g + l / 16] * (q[l] - 32);
    } else {
      int sc, m;
      scale_min(b + 4, g, &sc, &m);
      const float d = half(b) * sc, dm = half(b + 2) * m;
      for (int l = 0; l < 32; ++l) out[32 * g + l] = d * q[l] - dm;
    }
  }
}

// ---- activations ----

// x quantized per row: int8 codes, one scale per `block` values (amax / 127), the sum of every 16 codes
struct Activations {
  int64_t rows, k, block;
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int16_t> sums;

  Activations() : rows(0), k(0), block(0) {}

  // x: float32 [rows, k]
  Activations(const float* xp, int64_t rows_, int64_t k_, int64_t block_) : rows(rows_), k(k_), block(block_) {
    q.resize(rows * k);
    d.resize(rows * k / block);
    sums.resize(rows * k / 16);
    const int64_t blocks = k / block;
    at::parallel_for(0, rows * blocks, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float* v = xp + i * block;
        int8_t* c = q.data() + i * block;
        float amax = 0.f;
        for (int64_t l = 0; l < block; ++l) amax = std::max(amax, std::fabs(v[l]));
        const float scale = amax / 127.f, inverse = amax > 0.f ? 127.f / amax : 0.f;
        d[i] = scale;
        for (int64_t l = 0; l < block; ++l) c[l] = static_cast<int8_t>(std::nearbyint(v[l] * inverse));
        for (int64_t s = 0; s < block / 16; ++s) {
          int total = 0;
          for (int l = 0; l < 16; ++l) total += c[16 * s + l];
          sums[i * (block / 16) + s] = static_cast<int16_t>(total);
        }
      }
    });
  }
};

// ---- dot products: one weight row against R activation rows ----

// float parts of a legacy block: w = a q - c (c the offset taken through the activations' sums)
inline void legacy_affine(int64_t type, const uint8_t* b, float* a, float* c) {
  *a = half(b);
  switch (type) {
    case kQ4_0: *c = 8.f * *a; break;
    case kQ5_0: *c = 16.f * *a; break;
    case kQ8_0: *c = 0.f; break;
    default: *c = -half(b + 2);
  }
}

#if defined(__AVX2__)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 32 bytes with 0xFF where bit j of `bits` is set, for element j
inline __m256i bit_bytes(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000));
  const __m256i select = _mm256_set1_epi64x(0x8040201008040201);
  return _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
}

// 32-weight blocks: w = d q for the signed codes (Q8_0; Q4_0 and Q5_0 once their offset of 8 or 16 is taken
// off), w = d q + m for Q4_1 / Q5_1, whose m adds m * dx * (sum of the block's activation codes)
struct LBlock {
  __m256i codes, magnitudes;  // magnitudes: |codes| for the signed types, the codes themselves otherwise
  __m256 ds;                  // d in every lane (the many-row path scales with one vector multiply a row)
  float d, m;
};

template <int64_t T>
constexpr bool has_min() {
  return T == kQ4_1 || T == kQ5_1;
}

template <int64_t T>
inline void legacy_block(const uint8_t* b, LBlock* out) {
  constexpr int kStart = T == kQ4_0 ? 2 : T == kQ4_1 ? 4 : T == kQ5_0 ? 6 : 8;  // where the nibbles begin
  out->d = half(b);
  out->ds = _mm256_set1_ps(out->d);
  out->m = has_min<T>() ? half(b + 2) : 0.f;
  __m256i codes;
  if constexpr (T == kQ8_0) {
    codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
  } else {
    const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kStart));
    codes = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), _mm256_set1_epi8(0x0F));
    if constexpr (T == kQ5_0 || T == kQ5_1) {
      uint32_t qh;
      std::memcpy(&qh, b + kStart - 4, 4);
      codes = _mm256_or_si256(codes, _mm256_and_si256(bit_bytes(qh), _mm256_set1_epi8(0x10)));
    }
    if constexpr (T == kQ4_0) codes = _mm256_sub_epi8(codes, _mm256_set1_epi8(8));
    if constexpr (T == kQ5_0) codes = _mm256_sub_epi8(codes, _mm256_set1_epi8(16));
  }
  out->codes = codes;
  // signed codes: |w| times x with w's sign (maddubs takes one unsigned operand)
  out->magnitudes = has_min<T>() ? codes : _mm256_sign_epi8(codes, codes);
}

// block i of one activation row into its accumulators (mins: scalar, in intrinsics, so that every row tile adds
// in the same order and precision)
template <int64_t T>
inline void legacy_row(const LBlock& k, const Activations& x, int64_t row, int64_t i, __m256* acc, __m128* mins) {
  const int64_t blocks = x.k / 32;
  __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + row * x.k + i * 32));
  if constexpr (!has_min<T>()) xq = _mm256_sign_epi8(xq, k.codes);
  const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(k.magnitudes, xq), _mm256_set1_epi16(1));
  const float dx = x.d[row * blocks + i];
  *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(k.d * dx), *acc);
  if constexpr (has_min<T>()) {
    const int16_t* sum = x.sums.data() + row * (x.k / 16) + 2 * i;
    *mins = _mm_fmadd_ss(_mm_set_ss(k.m * dx), _mm_set_ss(static_cast<float>(sum[0] + sum[1])), *mins);
  }
}

template <int64_t T, int R>
void legacy_dot(const uint8_t* w, const Activations& x, int64_t row0, float* out) {
  constexpr int64_t kBytes = bytes_of(T);
  __m256 acc[R];
  __m128 mins[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), mins[r] = _mm_setzero_ps();
  for (int64_t i = 0; i < x.k / 32; ++i) {
    LBlock k;
    legacy_block<T>(w + i * kBytes, &k);
    for (int r = 0; r < R; ++r) legacy_row<T>(k, x, row0 + r, i, &acc[r], &mins[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) + _mm_cvtss_f32(mins[r]);
}

// a weight row's blocks unpacked once for many activation rows: the same arithmetic as legacy_dot
template <int64_t T>
void legacy_decode(const uint8_t* w, int64_t blocks, LBlock* out) {
  constexpr int64_t kBytes = bytes_of(T);
  for (int64_t i = 0; i < blocks; ++i) legacy_block<T>(w + i * kBytes, out + i);
}

// W decoded weight rows against R activation rows (each activation block loaded once for all W), out[w * R + r];
// every product in the same order and precision as legacy_dot
template <int64_t T, int W, int R>
void legacy_decoded_dot(const LBlock* const* w, const Activations& x, int64_t row0, float* out) {
  const int64_t blocks = x.k / 32;
  __m256 acc[W][R];
  __m128 mins[W][R];
  for (int v = 0; v < W; ++v) {
    for (int r = 0; r < R; ++r) acc[v][r] = _mm256_setzero_ps(), mins[v][r] = _mm_setzero_ps();
  }
  for (int64_t i = 0; i < blocks; ++i) {
    for (int r = 0; r < R; ++r) {
      const int64_t row = row0 + r;
      const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + row * x.k + i * 32));
      const float dx = x.d[row * blocks + i];
      const __m256 dxs = _mm256_set1_ps(dx);
      for (int v = 0; v < W; ++v) {
        const LBlock& k = w[v][i];
        const __m256i signed_x = has_min<T>() ? xq : _mm256_sign_epi8(xq, k.codes);
        const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(k.magnitudes, signed_x), _mm256_set1_epi16(1));
        acc[v][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(k.ds, dxs), acc[v][r]);
        if constexpr (has_min<T>()) {
          const int16_t* sum = x.sums.data() + row * (x.k / 16) + 2 * i;
          mins[v][r] = _mm_fmadd_ss(_mm_set_ss(k.m * dx), _mm_set_ss(static_cast<float>(sum[0] + sum[1])), mins[v][r]);
        }
      }
    }
  }
  for (int v = 0; v < W; ++v) {
    for (int r = 0; r < R; ++r) out[v * R + r] = hsum(acc[v][r]) + _mm_cvtss_f32(mins[v][r]);
  }
}

// the unsigned codes of group g (32 weights) of a K-quant super-block
template <int64_t T>
inline __m256i k_group(const uint8_t* b, int g) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  if constexpr (T == kQ6_K) {
    const int h = g / 4, j = g % 4;
    const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h + 32 * (j % 2)));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h));
    const __m256i nibbles = _mm256_and_si256(j < 2 ? ql : _mm256_srli_epi16(ql, 4), low);
    const __m256i top = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j)), _mm256_set1_epi8(3));
    return _mm256_or_si256(nibbles, _mm256_slli_epi16(top, 4));
  } else {
    const __m256i qs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (T == kQ5_K ? 48 : 16) + 32 * (g / 2)));
    __m256i codes = _mm256_and_si256(g % 2 ? _mm256_srli_epi16(qs, 4) : qs, low);
    if constexpr (T == kQ5_K) {
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
      const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(g)), _mm256_set1_epi8(1));
      codes = _mm256_or_si256(codes, _mm256_slli_epi16(bit, 4));
    }
    return codes;
  }
}

// K-quants: per super-block, sum_g scale_g * (codes_g . x_g) in int32 (madd with the scales as int16), the
// offsets (mins, or Q6_K's 32) through the activations' 16-sums, then one float multiply-add.

// a super-block's header: each group's scale as int16 in every lane (Q6_K: its two 16-value halves' scales, one
// per 128-bit lane), what multiplies each 16 activation codes' sum (the group's min, Q6_K's scale), d and dmin
template <int64_t T>
inline void k_header(const uint8_t* b, __m256i* scales, __m256i* offsets, float* d, float* dmin) {
  if constexpr (T == kQ6_K) {
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192));
    *d = half(b + 208);
    *dmin = 32.f * *d;
    for (int g = 0; g < 8; ++g) {
      const __m128i pick = _mm_set_epi64x(0x0101010101010101LL * (2 * g + 1), 0x0101010101010101LL * (2 * g));
      scales[g] = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc, pick));
    }
    *offsets = _mm256_cvtepi8_epi16(sc);
  } else {
    *d = half(b);
    *dmin = half(b + 2);
    uint32_t packed[3], unpacked[4];  // 12 bytes -> 8 scales, 8 mins (6 bits each)
    std::memcpy(packed, b + 4, 12);
    unpacked[0] = packed[0] & 0x3f3f3f3f;
    unpacked[1] = (packed[2] & 0x0f0f0f0f) | (((packed[0] >> 6) & 0x03030303) << 4);
    unpacked[2] = packed[1] & 0x3f3f3f3f;
    unpacked[3] = ((packed[2] >> 4) & 0x0f0f0f0f) | (((packed[1] >> 6) & 0x03030303) << 4);
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(unpacked));
    const __m256i sc = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(bytes));
    for (int g = 0; g < 8; ++g) {
      scales[g] = _mm256_shuffle_epi8(sc, _mm256_set1_epi16(static_cast<int16_t>(0x0100 + 0x0202 * g)));
    }
    const __m128i mins = _mm_cvtepu8_epi16(_mm_srli_si128(bytes, 8));
    *offsets = _mm256_set_m128i(_mm_unpackhi_epi16(mins, mins), _mm_unpacklo_epi16(mins, mins));
  }
}

inline __m256i k_group_dot(__m256i sum, __m256i codes, const Activations& x, int64_t row, int64_t i, int g,
                           __m256i scale) {
  const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + row * x.k + i * 256 + 32 * g));
  return _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xq), scale));
}

// super-block i's integer sums into the rows' float accumulators
template <int R>
inline void k_finish(const __m256i* sums, __m256i offsets, float d, float dmin, const Activations& x, int64_t row0,
                     int64_t i, __m256* acc) {
  const int64_t blocks = x.k / 256;
  for (int r = 0; r < R; ++r) {
    const int64_t row = row0 + r;
    const float dx = x.d[row * blocks + i];
    const __m256i xs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.sums.data() + row * (x.k / 16) + 16 * i));
    const __m256i off = _mm256_madd_epi16(xs, offsets);
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), _mm256_set1_ps(d * dx), acc[r]);
    acc[r] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(off), _mm256_set1_ps(dmin * dx), acc[r]);
  }
}

// straight from the blocks: each group's codes unpacked as they are used (a few rows: decode)
template <int64_t T, int R>
void k_dot(const uint8_t* w, const Activations& x, int64_t row0, float* out) {
  constexpr int64_t kBytes = bytes_of(T);
  const int64_t blocks = x.k / 256;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < blocks; ++i) {
    const uint8_t* b = w + i * kBytes;
    __m256i scales[8], offsets, sums[R];
    float d, dmin;
    k_header<T>(b, scales, &offsets, &d, &dmin);
    for (int r = 0; r < R; ++r) sums[r] = _mm256_setzero_si256();
    for (int g = 0; g < 8; ++g) {
      const __m256i codes = k_group<T>(b, g);
      for (int r = 0; r < R; ++r) sums[r] = k_group_dot(sums[r], codes, x, row0 + r, i, g, scales[g]);
    }
    k_finish<R>(sums, offsets, d, dmin, x, row0, i, acc);
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

// a super-block unpacked once for many activation rows (prefill, batches): the same arithmetic as k_dot
struct KBlock {
  __m256i codes[8], scales[8], offsets;
  float d, dmin;
};

template <int64_t T>
void k_decode(const uint8_t* w, int64_t blocks, KBlock* out) {
  constexpr int64_t kBytes = bytes_of(T);
  for (int64_t i = 0; i < blocks; ++i) {
    const uint8_t* b = w + i * kBytes;
    k_header<T>(b, out[i].scales, &out[i].offsets, &out[i].d, &out[i].dmin);
    for (int g = 0; g < 8; ++g) out[i].codes[g] = k_group<T>(b, g);
  }
}

// W decoded weight rows against R activation rows, out[w * R + r]: the same arithmetic as k_dot
template <int W, int R>
void k_decoded_dot(const KBlock* const* w, const Activations& x, int64_t row0, float* out) {
  const int64_t blocks = x.k / 256;
  __m256 acc[W][R];
  for (int v = 0; v < W; ++v) {
    for (int r = 0; r < R; ++r) acc[v][r] = _mm256_setzero_ps();
  }
  for (int64_t i = 0; i < blocks; ++i) {
    __m256i sums[W][R];
    for (int v = 0; v < W; ++v) {
      for (int r = 0; r < R; ++r) sums[v][r] = _mm256_setzero_si256();
    }
    for (int g = 0; g < 8; ++g) {
      for (int r = 0; r < R; ++r) {
        const __m256i xq =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + (row0 + r) * x.k + i * 256 + 32 * g));
        for (int v = 0; v < W; ++v) {
          const __m256i products = _mm256_maddubs_epi16(w[v][i].codes[g], xq);
          sums[v][r] = _mm256_add_epi32(sums[v][r], _mm256_madd_epi16(products, w[v][i].scales[g]));
        }
      }
    }
    for (int v = 0; v < W; ++v) k_finish<R>(sums[v], w[v][i].offsets, w[v][i].d, w[v][i].dmin, x, row0, i, acc[v]);
  }
  for (int v = 0; v < W; ++v) {
    for (int r = 0; r < R; ++r) out[v * R + r] = hsum(acc[v][r]);
  }
}

template <int64_t T, int R>
inline void dot(const uint8_t* w, const Activations& x, int64_t row0, float* out) {
  if constexpr (T == kQ4_K || T == kQ5_K || T == kQ6_K) {
    k_dot<T, R>(w, x, row0, out);
  } else {
    legacy_dot<T, R>(w, x, row0, out);
  }
}

#else  // portable: the same integer arithmetic, one value at a time

template <int64_t type, int R>
void dot(const uint8_t* w, const Activations& x, int64_t row0, float* out) {
  const Format f = format_of(type);
  const int64_t blocks = x.k / f.values;
  uint8_t q[32];
  for (int r = 0; r < R; ++r) {
    const int64_t row = row0 + r;
    const int8_t* xq = x.q.data() + row * x.k;
    const int16_t* xs = x.sums.data() + row * (x.k / 16);
    double total = 0.0;
    for (int64_t i = 0; i < blocks; ++i) {
      const uint8_t* b = w + i * f.bytes;
      const float dx = x.d[row * blocks + i];
      if (f.values == 32) {
        float a, c;
        legacy_affine(type, b, &a, &c);
        legacy_codes(type, b, q);
        int dot = 0;
        for (int l = 0; l < 32; ++l) dot += (type == kQ8_0 ? static_cast<int8_t>(q[l]) : q[l]) * xq[32 * i + l];
        total += a * dx * dot - c * dx * (xs[2 * i] + xs[2 * i + 1]);
        continue;
      }
      int scaled = 0, offset = 0;
      for (int g = 0; g < 8; ++g) {
        k_codes(type, b, g, q);
        for (int hh = 0; hh < 2; ++hh) {
          int dot = 0;
          for (int l = 16 * hh; l < 16 * hh + 16; ++l) dot += q[l] * xq[256 * i + 32 * g + l];
          int sc, m;
          if (type == kQ6_K) {
            sc = reinterpret_cast<const int8_t*>(b + 192)[2 * g + hh];
            m = sc;
          } else {
            scale_min(b + 4, g, &sc, &m);
          }
          scaled += sc * dot;
          offset += m * xs[16 * i + 2 * g + hh];
        }
      }
      const float d = type == kQ6_K ? half(b + 208) : half(b), dmin = type == kQ6_K ? 32.f * d : half(b + 2);
      total += d * dx * scaled - dmin * dx * offset;
    }
    out[r] = static_cast<float>(total);
  }
}

#endif

// ---- packed rows: kPackRows weight rows interleaved, one output column per float lane ----
//
// A weight row at a time, a GEMV spends most of its instructions on each block's own scale (a scalar multiply,
// a broadcast and a float multiply-add per 32 weights) and on horizontal sums. pack_rows interleaves groups of 8
// rows so that one 32-byte load holds 4 codes of each of the 8 rows: a block's 8 scales convert in one
// instruction, the activations are broadcast 4 codes at a time, and each (weight row, activation row) dot
// product accumulates in its own lane, block by block: out = sum_i float(dot_i) * (d_i dx_i), in the order of
// i, with dot_i the exact integer dot product of block i. That value does not depend on how many activation
// rows a call takes or on the instruction set (VNNI or not): the same integers, the same float operations.
//
// Q4_0, packed: per group of 8 rows, per block i (144 bytes, as the 8 rows' blocks take): the 8 rows' d (f16),
// then 4 x 32 bytes, byte 4r + b of vector c holding row r's qs[4c + b] (weights 4c + b in the low nibble,
// 16 + 4c + b in the high one). Q4_1 (160 bytes): the rows' m (f16) after their d; the w = d q + m blocks add
// m dx (the block's activation sum) in float. Q5_0 (176 bytes) and Q5_1 (192): before the nibbles, the fifth bits
// as one vector: bit c of byte 4r + b is the fifth bit of the code in byte 4r + b of nibble vector c (c < 4: the
// low nibbles of vector c, c >= 4: the high ones of vector c - 4), i.e. bit 4c + b of row r's qh.
// Q8_0, packed: per group of 8 rows, per block (272 bytes, as stored): the rows' d (f16), then 8 x 32 bytes, byte
// 4r + b of vector c holding row r's code 4c + b (signed: |w| times x with w's sign, llama.cpp's trick).
// Q4_K, packed: per group of 8 rows, per super-block (1184 bytes, 148 a row): the rows' d, then dmin (f16); the
// 6-bit scales a byte each, [group g][row r]; the mins a byte each, per group pair j [row r][2j, 2j + 1]; then
// per pair j, 8 x 32 bytes, byte 4r + b of vector c holding row r's qs[32j + 4c + b] (group 2j's weight 4c + b
// in the low nibble, group 2j + 1's in the high one). The integer sums are each group's scale times its codes'
// dot product, and each group's min times its activations' sum; then d dx and dmin dx, as the stored path.
// Q5_K, packed: as Q4_K (1440 bytes, 180 a row), the rows' qh as 8 vectors at byte 160 (byte 4r + b of vector c
// holding row r's qh[4c + b]: the fifth bits of weight 4c + b of every group) and the codes after them.
// Q6_K, packed: per group of 8 rows, per super-block (1680 bytes, as stored): the rows' d (f16); the int8 scales
// per pair t of 16-weight sub-blocks [t][row r][2t, 2t + 1]; ql as 32 vectors (byte 4r + b of vector v: row r's
// ql[4v + b]) and qh as 16 (row r's qh[4u + b]). Integer: sum over sub-blocks of scale x (codes . x - 32 sum x).

#if defined(__AVX2__)

// codes (unsigned 4-bit values as bytes) times 4 activation codes broadcast, summed into int32 lanes
inline __m256i dot_add(__m256i sum, __m256i codes, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(sum, codes, x);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(sum, codes, x);
#else
  return _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), _mm256_set1_epi16(1)));
#endif
}

// where a packed 32-weight block keeps its fifth bits (Q5_0, Q5_1) and its codes
template <int64_t T>
constexpr int64_t legacy_bits_at() {
  return has_min<T>() ? 32 : 16;
}

template <int64_t T>
constexpr int64_t legacy_codes_at() {
  return legacy_bits_at<T>() + (T == kQ5_0 || T == kQ5_1 ? 32 : 0);
}

// the 32-weight types: per block, 8 code vectors against 4 activation codes each
template <int64_t T, int R>
void legacy_packed_dot(const uint8_t* group, const Activations& x, int64_t row0, float* out) {
  constexpr bool kFifthBit = T == kQ5_0 || T == kQ5_1;
  const int64_t blocks = x.k / 32;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < blocks; ++i) {
    const uint8_t* b = group + i * kPackRows * bytes_of(T);
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    __m256i codes[8], magnitudes[8];  // vector c < 4 holds weights 4c .. 4c + 3 of each row, c + 4 16 above
    for (int c = 0; c < 8; ++c) {
      if constexpr (T == kQ8_0) {
        codes[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 + 32 * c));
        magnitudes[c] = _mm256_sign_epi8(codes[c], codes[c]);
      } else {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + legacy_codes_at<T>() + 32 * (c % 4)));
        magnitudes[c] = _mm256_and_si256(c < 4 ? v : _mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F));
        if constexpr (kFifthBit) {  // bit c of each byte to bit 4 (within its byte: the mask drops what crosses)
          const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + legacy_bits_at<T>()));
          const __m256i moved = c < 4 ? _mm256_sll_epi16(bits, _mm_cvtsi32_si128(4 - c))
                                      : _mm256_srl_epi16(bits, _mm_cvtsi32_si128(c - 4));
          magnitudes[c] = _mm256_or_si256(magnitudes[c], _mm256_and_si256(moved, _mm256_set1_epi8(0x10)));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t row = row0 + r;
      const int8_t* xq = x.q.data() + row * x.k + 32 * i;
      __m256i even = _mm256_setzero_si256(), odd = _mm256_setzero_si256();
      for (int c = 0; c < 8; c += 2) {
        int32_t x0, x1;
        std::memcpy(&x0, xq + 4 * c, 4);
        std::memcpy(&x1, xq + 4 * c + 4, 4);
        __m256i v0 = _mm256_set1_epi32(x0), v1 = _mm256_set1_epi32(x1);
        if constexpr (T == kQ8_0) v0 = _mm256_sign_epi8(v0, codes[c]), v1 = _mm256_sign_epi8(v1, codes[c + 1]);
        even = dot_add(even, magnitudes[c], v0);
        odd = dot_add(odd, magnitudes[c + 1], v1);
      }
      __m256i dot = _mm256_add_epi32(even, odd);
      const int16_t* sums = x.sums.data() + row * (x.k / 16) + 2 * i;
      if constexpr (T == kQ4_0 || T == kQ5_0) {  // the codes' offset of 8 (16), through the activations' sum
        dot = _mm256_sub_epi32(dot, _mm256_set1_epi32((T == kQ4_0 ? 8 : 16) * (sums[0] + sums[1])));
      }
      const float dx = x.d[row * blocks + i];
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, _mm256_set1_ps(dx)), acc[r]);
      if constexpr (has_min<T>()) {  // + m dx (sum of the block's activation codes)
        const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)));
        acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(dx * static_cast<float>(sums[0] + sums[1])), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + kPackRows * r, acc[r]);
}

// Q4_K and Q5_K (T): per group pair j, the low nibbles are group 2j's codes and the high ones group 2j + 1's; Q5_K
// ORs in each code's fifth bit, bit 2j (2j + 1) of its qh byte, moved to bit 4
template <int64_t T, int R>
void k_packed_dot(const uint8_t* group, const Activations& x, int64_t row0, float* out) {
  constexpr int64_t codes_at = T == kQ5_K ? 160 + 256 : 160;
  const int64_t blocks = x.k / 256;
  const __m256i low = _mm256_set1_epi8(0x0F), fifth = _mm256_set1_epi8(0x10);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < blocks; ++i) {
    const uint8_t* b = group + i * kPackRows * packed_bytes_of(T);
    __m256i scaled[R], offsets[R];
    for (int r = 0; r < R; ++r) scaled[r] = offsets[r] = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {  // groups 2j and 2j + 1
      __m256i sums_low[R], sums_high[R];
      for (int r = 0; r < R; ++r) sums_low[r] = sums_high[r] = _mm256_setzero_si256();
      for (int c = 0; c < 8; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + codes_at + 256 * j + 32 * c));
        __m256i codes_low = _mm256_and_si256(v, low), codes_high = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        if constexpr (T == kQ5_K) {  // bits 2j, 2j + 1 of each byte to bit 0, 1 (2j < 8: no bit crosses a byte)
          const __m256i bits = _mm256_srl_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 160 + 32 * c)),
                                                _mm_cvtsi32_si128(2 * j));
          codes_low = _mm256_or_si256(codes_low, _mm256_and_si256(_mm256_slli_epi16(bits, 4), fifth));
          codes_high = _mm256_or_si256(codes_high, _mm256_and_si256(_mm256_slli_epi16(bits, 3), fifth));
        }
        for (int r = 0; r < R; ++r) {
          const int8_t* xq = x.q.data() + (row0 + r) * x.k + 256 * i + 64 * j + 4 * c;
          int32_t x_low, x_high;
          std::memcpy(&x_low, xq, 4);
          std::memcpy(&x_high, xq + 32, 4);
          sums_low[r] = dot_add(sums_low[r], codes_low, _mm256_set1_epi32(x_low));
          sums_high[r] = dot_add(sums_high[r], codes_high, _mm256_set1_epi32(x_high));
        }
      }
      const auto scale = [&](int g) {
        return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 32 + 8 * g)));
      };
      const __m256i scale_low = scale(2 * j), scale_high = scale(2 * j + 1);
      const __m256i mins = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 96 + 16 * j)));
      for (int r = 0; r < R; ++r) {
        scaled[r] = _mm256_add_epi32(scaled[r], _mm256_add_epi32(_mm256_mullo_epi32(sums_low[r], scale_low),
                                                                 _mm256_mullo_epi32(sums_high[r], scale_high)));
        const int16_t* xs = x.sums.data() + (row0 + r) * (x.k / 16) + 16 * i + 4 * j;
        const int32_t pair = static_cast<uint16_t>(xs[0] + xs[1]) | (static_cast<int32_t>(xs[2] + xs[3]) << 16);
        offsets[r] = _mm256_add_epi32(offsets[r], _mm256_madd_epi16(mins, _mm256_set1_epi32(pair)));
      }
    }
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)));
    for (int r = 0; r < R; ++r) {
      const __m256 dx = _mm256_set1_ps(x.d[(row0 + r) * blocks + i]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(scaled[r]), _mm256_mul_ps(d, dx), acc[r]);
      acc[r] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(offsets[r]), _mm256_mul_ps(dmin, dx), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + kPackRows * r, acc[r]);
}

// Q6_K's codes of one packed vector: ggml's layout puts weights 32g .. 32g + 31 (g = 4h + j) in nibble j / 2 of ql
// (the low one for j < 2) and in bits 2j, 2j + 1 of qh
template <int J>
inline __m256i q6_k_codes(__m256i l, __m256i hb) {
  const __m256i nibbles = _mm256_and_si256(J < 2 ? l : _mm256_srli_epi16(l, 4), _mm256_set1_epi8(0x0F));
  __m256i bits = hb;
  if constexpr (J == 0) bits = _mm256_slli_epi16(hb, 4);
  if constexpr (J == 1) bits = _mm256_slli_epi16(hb, 2);
  if constexpr (J == 3) bits = _mm256_srli_epi16(hb, 2);
  return _mm256_or_si256(nibbles, _mm256_and_si256(bits, _mm256_set1_epi8(0x30)));
}

// weights 32G .. 32G + 31 of super-block i (sub-blocks 2G and 2G + 1) into the integer sums; G a constant, so that
// the codes' shifts and every accumulator's index are fixed at compile time (a runtime G left the accumulators on
// the stack and a branch per vector: half the speed)
template <int G, int R>
inline void q6_k_packed_group(const uint8_t* b, const Activations& x, int64_t row0, int64_t i, __m256i* scaled,
                              __m256i* offsets) {
  constexpr int h = G / 4, j = G % 4;
  const uint8_t* ql = b + 144 + 32 * (16 * h + 8 * (j % 2));
  const uint8_t* qh = b + 144 + 1024 + 32 * 8 * h;
  // scales of sub-blocks 2G, 2G + 1 as int16 pairs per row, and each as int32
  const __m256i pair = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16 + 16 * G)));
  const __m256i scales[2] = {_mm256_srai_epi32(_mm256_slli_epi32(pair, 16), 16), _mm256_srai_epi32(pair, 16)};
#pragma GCC unroll 2
  for (int s = 0; s < 2; ++s) {
    __m256i sums[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) sums[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int c = 4 * s; c < 4 * s + 4; ++c) {
      const __m256i codes = q6_k_codes<j>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32 * c)),
                                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + 32 * c)));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        int32_t xc;
        std::memcpy(&xc, x.q.data() + (row0 + r) * x.k + 256 * i + 32 * G + 4 * c, 4);
        sums[r] = dot_add(sums[r], codes, _mm256_set1_epi32(xc));
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) scaled[r] = _mm256_add_epi32(scaled[r], _mm256_mullo_epi32(sums[r], scales[s]));
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    int32_t sums;
    std::memcpy(&sums, x.sums.data() + (row0 + r) * (x.k / 16) + 16 * i + 2 * G, 4);
    offsets[r] = _mm256_add_epi32(offsets[r], _mm256_madd_epi16(pair, _mm256_set1_epi32(sums)));
  }
}

template <int R, int... G>
inline void q6_k_packed_groups(std::integer_sequence<int, G...>, const uint8_t* b, const Activations& x,
                               int64_t row0, int64_t i, __m256i* scaled, __m256i* offsets) {
  (q6_k_packed_group<G, R>(b, x, row0, i, scaled, offsets), ...);
}

template <int R>
void q6_k_packed_dot(const uint8_t* group, const Activations& x, int64_t row0, float* out) {
  const int64_t blocks = x.k / 256;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < blocks; ++i) {
    const uint8_t* b = group + i * kPackRows * packed_bytes_of(kQ6_K);
    // every line of the super-block asked for first, so that its misses overlap: the vectors are read out of
    // order (each qh vector for four groups), and a GEMV streamed 15 GB/s from memory without this (Q4_K: 22),
    // 22-28 with it; asking for the next super-blocks instead was slower
    for (int64_t line = 0; line < kPackRows * packed_bytes_of(kQ6_K); line += 64) _mm_prefetch(b + line, _MM_HINT_T0);
    __m256i scaled[R], offsets[R];
    for (int r = 0; r < R; ++r) scaled[r] = offsets[r] = _mm256_setzero_si256();
    q6_k_packed_groups<R>(std::make_integer_sequence<int, 8>(), b, x, row0, i, scaled, offsets);
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    for (int r = 0; r < R; ++r) {
      const __m256i total = _mm256_sub_epi32(scaled[r], _mm256_slli_epi32(offsets[r], 5));
      const __m256 dx = _mm256_set1_ps(x.d[(row0 + r) * blocks + i]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(d, dx), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + kPackRows * r, acc[r]);
}

template <int64_t T, int R>
inline void packed_dot(const uint8_t* group, const Activations& x, int64_t row0, float* out) {
  if constexpr (T == kQ4_K || T == kQ5_K) {
    k_packed_dot<T, R>(group, x, row0, out);
  } else if constexpr (T == kQ6_K) {
    q6_k_packed_dot<R>(group, x, row0, out);
  } else {
    legacy_packed_dot<T, R>(group, x, row0, out);
  }
}
#endif

constexpr int kRowTile = 4;  // activation rows per pass over a weight row (its codes unpacked once for all)
constexpr int64_t kDecodedRows = 8;
constexpr int64_t kPrefetchBytes = 4096;  // from this many rows, a weight row is unpacked once per call

// one weight matrix of a block_linear call: its rows are output columns start.. of the result
struct Part {
  const uint8_t* data;
  int64_t row_bytes, type, start;
};

#if defined(__AVX2__)
constexpr int kWeightTile = 2;            // weight rows unpacked side by side, each activation load used for both
constexpr int64_t kChunkBytes = 192 << 10;  // activation codes walked per pass over the weights (kept in L2)
// the packed kernels' passes: a group of 8 weight rows (up to ~120 KB at K = 18,944) stays in L2 for every tile
// of a pass, so the weights are read from memory once per pass; at 192 KB the 7B's down projection took 8
// activation rows a pass, 64 passes over its 55 MB at 512 rows, and ran at half the speed of its gate
constexpr int64_t kPackedChunkBytes = 1 << 20;

// the many-row path: the activations in chunks that stay in L2; for each chunk, the part's weight rows unpacked
// kWeightTile at a time into `decoded`, then `dot<W, R>` over kRowTile activation rows at a time (W weight rows
// x R activation rows a call, out[w * R + r]), single rows for the rest
template <typename Block, typename Decode, typename Dot>
void decoded_columns(const Part& part, int64_t begin, int64_t end, const Activations& x, float* out, int64_t n,
                     std::vector<Block>& decoded, Decode decode, Dot dot) {
  const int64_t blocks = static_cast<int64_t>(x.k / (std::is_same_v<Block, KBlock> ? 256 : 32));
  const int64_t chunk = std::max<int64_t>(kRowTile, kChunkBytes / x.k / kRowTile * kRowTile);
  decoded.resize(kWeightTile * blocks);
  const Block* rows[kWeightTile] = {decoded.data(), decoded.data() + blocks};
  float results[kWeightTile * kRowTile];
  for (int64_t first = 0; first < x.rows; first += chunk) {
    const int64_t last = std::min(x.rows, first + chunk);
    for (int64_t j = begin; j < end; j += kWeightTile) {
      const int width = static_cast<int>(std::min<int64_t>(kWeightTile, end - j));
      for (int v = 0; v < width; ++v) decode(part.data + (j + v) * part.row_bytes, blocks, decoded.data() + v * blocks);
      float* column = out + part.start + j;
      int64_t row = first;
      for (; row + kRowTile <= last; row += kRowTile) {
        width == kWeightTile ? dot(std::integral_constant<int, kWeightTile>(), std::integral_constant<int, kRowTile>(),
                                   rows, row, results)
                             : dot(std::integral_constant<int, 1>(), std::integral_constant<int, kRowTile>(), rows,
                                   row, results);
        for (int v = 0; v < width; ++v) {
          for (int r = 0; r < kRowTile; ++r) column[(row + r) * n + v] = results[v * kRowTile + r];
        }
      }
      for (; row < last; ++row) {
        width == kWeightTile
            ? dot(std::integral_constant<int, kWeightTile>(), std::integral_constant<int, 1>(), rows, row, results)
            : dot(std::integral_constant<int, 1>(), std::integral_constant<int, 1>(), rows, row, results);
        for (int v = 0; v < width; ++v) column[row * n + v] = results[v];
      }
    }
  }
}
#endif

#if defined(__AVX2__)
// output columns [begin, end) of a packed part, every activation row: each group of 8 weight rows against the
// activation rows, kRowTile at a time, the activations in chunks that stay in L2 (a group at the range's edges
// is computed whole and only its columns in range kept)
template <int64_t T>
void packed_columns(const Part& part, int64_t begin, int64_t end, const Activations& x, float* out, int64_t n) {
  // activation rows a call, each group's codes unpacked once for all (the Q4_K / Q5_K kernel, with twice the
  // integer sums a row, spills its registers at 8 and is fastest at 4)
  constexpr int kTile = T == kQ4_K || T == kQ5_K ? 4 : 8;
  const int64_t chunk = std::max<int64_t>(kTile, kPackedChunkBytes / x.k / kTile * kTile);
  float results[kTile * kPackRows];
  for (int64_t first = 0; first < x.rows; first += chunk) {
    const int64_t last = std::min(x.rows, first + chunk);
    for (int64_t g = begin / kPackRows; g * kPackRows < end; ++g) {
      const uint8_t* group = part.data + g * kPackRows * part.row_bytes;
      const int64_t lo = std::max(begin, g * kPackRows), hi = std::min(end, (g + 1) * kPackRows);
      const auto keep = [&](int64_t row, int rows) {
        for (int r = 0; r < rows; ++r) {
          for (int64_t j = lo; j < hi; ++j) out[(row + r) * n + part.start + j] = results[r * kPackRows + j - g * kPackRows];
        }
      };
      int64_t row = first;
      for (; row + kTile <= last; row += kTile) {
        packed_dot<T, kTile>(group, x, row, results);
        keep(row, kTile);
      }
      if constexpr (kTile > kRowTile) {
        for (; row + kRowTile <= last; row += kRowTile) {
          packed_dot<T, kRowTile>(group, x, row, results);
          keep(row, kRowTile);
        }
      }
      for (; row < last; ++row) {
        packed_dot<T, 1>(group, x, row, results);
        keep(row, 1);
      }
    }
  }
}
#endif

// output columns [begin, end) of `part` (relative to its first row) for every activation row
template <int64_t T>
void part_columns(const Part& part, int64_t begin, int64_t end, const Activations& x, float* out, int64_t n) {
  float results[kRowTile];
#if defined(__AVX2__)
  if (x.rows >= kDecodedRows) {  // each weight row unpacked once per chunk, then reused for its activation rows
    const auto dot = [&x](auto weights, auto rows, const auto* const* w, int64_t row, float* out) {
      if constexpr (T == kQ4_K || T == kQ5_K || T == kQ6_K) {
        k_decoded_dot<decltype(weights)::value, decltype(rows)::value>(w, x, row, out);
      } else {
        legacy_decoded_dot<T, decltype(weights)::value, decltype(rows)::value>(w, x, row, out);
      }
    };
    if constexpr (T == kQ4_K || T == kQ5_K || T == kQ6_K) {
      thread_local std::vector<KBlock> decoded;
      decoded_columns(part, begin, end, x, out, n, decoded, k_decode<T>, dot);
    } else {
      thread_local std::vector<LBlock> decoded;
      decoded_columns(part, begin, end, x, out, n, decoded, legacy_decode<T>, dot);
    }
    return;
  }
#endif
  for (int64_t j = begin; j < end; ++j) {
    const uint8_t* w = part.data + j * part.row_bytes;
#if defined(__AVX2__)
    // ask for the bytes kPrefetchBytes ahead of this row now: a matrix of a few MB (a MoE expert) is read
    // before the hardware prefetcher has ramped up on it
    for (int64_t b = 0; b < part.row_bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchBytes + b), _MM_HINT_T0);
#endif
    float* column = out + part.start + j;
    int64_t row = 0;
    for (; row + kRowTile <= x.rows; row += kRowTile) {
      dot<T, kRowTile>(w, x, row, results);
      for (int r = 0; r < kRowTile; ++r) column[(row + r) * n] = results[r];
    }
    for (; row < x.rows; ++row) {
      dot<T, 1>(w, x, row, results);
      column[row * n] = results[0];
    }
  }
}

void columns(const Part& part, int64_t begin, int64_t end, const Activations& x, float* out, int64_t n) {
  switch (part.type) {
    case kQ4_0: return part_columns<kQ4_0>(part, begin, end, x, out, n);
    case kQ4_1: return part_columns<kQ4_1>(part, begin, end, x, out, n);
    case kQ5_0: return part_columns<kQ5_0>(part, begin, end, x, out, n);
    case kQ5_1: return part_columns<kQ5_1>(part, begin, end, x, out, n);
    case kQ8_0: return part_columns<kQ8_0>(part, begin, end, x, out, n);
    case kQ4_K: return part_columns<kQ4_K>(part, begin, end, x, out, n);
    case kQ5_K: return part_columns<kQ5_K>(part, begin, end, x, out, n);
    case kQ6_K: return part_columns<kQ6_K>(part, begin, end, x, out, n);
#if defined(__AVX2__)
    case kPacked | kQ4_0: return packed_columns<kQ4_0>(part, begin, end, x, out, n);
    case kPacked | kQ4_1: return packed_columns<kQ4_1>(part, begin, end, x, out, n);
    case kPacked | kQ5_0: return packed_columns<kQ5_0>(part, begin, end, x, out, n);
    case kPacked | kQ5_1: return packed_columns<kQ5_1>(part, begin, end, x, out, n);
    case kPacked | kQ8_0: return packed_columns<kQ8_0>(part, begin, end, x, out, n);
    case kPacked | kQ4_K: return packed_columns<kQ4_K>(part, begin, end, x, out, n);
    case kPacked | kQ5_K: return packed_columns<kQ5_K>(part, begin, end, x, out, n);
    case kPacked | kQ6_K: return packed_columns<kQ6_K>(part, begin, end, x, out, n);
#endif
    default: TORCH_CHECK(false, "ggml block type ", part.type, " has no kernel");
  }
}

}  // namespace

// y = x W^T where W is the row-wise concatenation of `weights` (uint8 [rows_i, bytes a row], ggml `types`):
// a fused projection whose parts may be stored in different block types. x [M, K] float32 or bfloat16 ->
// [M, sum rows_i] float32.
torch::Tensor block_linear(torch::Tensor x, std::vector<torch::Tensor> weights, std::vector<int64_t> types) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "block_linear: x must be a contiguous float32 or bfloat16 matrix");
  TORCH_CHECK(weights.size() == types.size() && !weights.empty(), "block_linear: one type per weight");
  const int64_t m = x.size(0), k = x.size(1);
  std::vector<Part> parts;
  int64_t n = 0;
  bool legacy = false, k_quant = false;
  for (size_t p = 0; p < weights.size(); ++p) {
    const Format f = format_of(types[p]);
    const auto& w = weights[p];
    TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(),
                "block_linear: weights must be contiguous uint8 [rows, bytes]");
    TORCH_CHECK(k % f.values == 0 && w.size(1) == k / f.values * f.bytes, "block_linear: a weight row of type ",
                types[p], " holds ", w.size(1), " bytes, not the blocks of ", k, " values");
    (f.values == 256 ? k_quant : legacy) = true;
    parts.push_back({w.data_ptr<uint8_t>(), w.size(1), types[p], n});
    n += w.size(0);
  }
  auto out = torch::empty({m, n}, x.options().dtype(torch::kFloat32));
  if (m == 0 || n == 0) return out;
  const torch::Tensor xf = x.scalar_type() == torch::kFloat32 ? x : x.to(torch::kFloat32);
  const Activations per32 = legacy ? Activations(xf.data_ptr<float>(), m, k, 32) : Activations();
  const Activations per256 = k_quant ? Activations(xf.data_ptr<float>(), m, k, 256) : Activations();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (size_t p = 0; p < parts.size(); ++p) {
      const int64_t rows_end = p + 1 < parts.size() ? parts[p + 1].start : n;
      const int64_t first = std::max(begin, parts[p].start), last = std::min(end, rows_end);
      if (first >= last) continue;
      const Activations& acts = format_of(parts[p].type).values == 256 ? per256 : per32;
      columns(parts[p], first - parts[p].start, last - parts[p].start, acts, op, n);
    }
  });
  return out;
}

#if defined(__AVX2__)
constexpr bool has_packed_kernel(int64_t type) {
  return bytes_of(type) > 0;
}

// to[32 v + 4 r .. 32 v + 4 r + 3] = from[r][offset + 4 v .. + 3] for v < count (4 or a multiple of 8): dword v of
// each of the 8 rows side by side, as 8 x 8 transposes of dwords
inline void interleave_dwords(const uint8_t* const* from, int64_t offset, int count, uint8_t* to) {
  for (int v0 = 0; v0 < count; v0 += 8) {
    __m256i r[8], t[8], u[8];
    for (int row = 0; row < 8; ++row) {
      const uint8_t* p = from[row] + offset + 4 * v0;
      r[row] = count == 4 ? _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))
                          : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    }
    for (int k = 0; k < 8; k += 2) {
      t[k] = _mm256_unpacklo_epi32(r[k], r[k + 1]);
      t[k + 1] = _mm256_unpackhi_epi32(r[k], r[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
      u[k] = _mm256_unpacklo_epi64(t[k], t[k + 2]);
      u[k + 1] = _mm256_unpackhi_epi64(t[k], t[k + 2]);
      u[k + 2] = _mm256_unpacklo_epi64(t[k + 1], t[k + 3]);
      u[k + 3] = _mm256_unpackhi_epi64(t[k + 1], t[k + 3]);
    }
    for (int v = 0; v < std::min(count, 8); ++v) {
      const __m256i out = v < 4 ? _mm256_permute2x128_si256(u[v], u[v + 4], 0x20)
                                : _mm256_permute2x128_si256(u[v - 4], u[v], 0x31);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + 32 * (v0 + v)), out);
    }
  }
}

// block i of the group's 8 rows (from[r]: row r's block) into the group's packed block `to` (the layouts above
// the packed kernels)
void pack_blocks(int64_t type, const uint8_t* const* from, uint8_t* to) {
  switch (type) {
    case kQ4_0:
    case kQ4_1:
    case kQ5_0:
    case kQ5_1:
    case kQ8_0: {
      const bool fifth = type == kQ5_0 || type == kQ5_1, with_min = type == kQ4_1 || type == kQ5_1;
      for (int r = 0; r < 8; ++r) {
        std::memcpy(to + 2 * r, from[r], 2);
        if (with_min) std::memcpy(to + 16 + 2 * r, from[r] + 2, 2);
      }
      uint8_t* codes = to + (with_min ? 32 : 16);
      if (fifth) {
        for (int r = 0; r < 8; ++r) {
          uint32_t qh;
          std::memcpy(&qh, from[r] + (with_min ? 4 : 2), 4);
          for (int b = 0; b < 4; ++b) {
            uint8_t bits = 0;
            for (int c = 0; c < 8; ++c) bits |= static_cast<uint8_t>(((qh >> (4 * c + b)) & 1u) << c);
            codes[4 * r + b] = bits;
          }
        }
        codes += 32;
      }
      const int64_t qs = type == kQ4_0 ? 2 : type == kQ4_1 ? 4 : type == kQ5_0 ? 6 : type == kQ5_1 ? 8 : 2;
      interleave_dwords(from, qs, type == kQ8_0 ? 8 : 4, codes);
      return;
    }
    case kQ4_K:
    case kQ5_K:
      for (int r = 0; r < 8; ++r) {
        std::memcpy(to + 2 * r, from[r], 2);
        std::memcpy(to + 16 + 2 * r, from[r] + 2, 2);
        for (int group = 0; group < 8; ++group) {
          int sc, m;
          scale_min(from[r] + 4, group, &sc, &m);
          to[32 + 8 * group + r] = static_cast<uint8_t>(sc);
          to[96 + 16 * (group / 2) + 2 * r + group % 2] = static_cast<uint8_t>(m);
        }
      }
      if (type == kQ5_K) interleave_dwords(from, 16, 8, to + 160);  // qh
      interleave_dwords(from, type == kQ5_K ? 48 : 16, 32, to + (type == kQ5_K ? 416 : 160));
      return;
    case kQ6_K:
      for (int r = 0; r < 8; ++r) {
        std::memcpy(to + 2 * r, from[r] + 208, 2);
        for (int t = 0; t < 8; ++t) std::memcpy(to + 16 + 16 * t + 2 * r, from[r] + 192 + 2 * t, 2);
      }
      interleave_dwords(from, 0, 32, to + 144);
      interleave_dwords(from, 128, 16, to + 144 + 1024);
      return;
    default: TORCH_CHECK(false, "ggml block type ", type, " has no packed layout");
  }
}
#endif

constexpr int kPopulateRead = 22, kPopulateWrite = 23;  // MADV_POPULATE_*, Linux 5.14 (older headers lack them)

// uint8 [rows, columns] in memory of its own (pages mapped in as populate() or first writes ask for them)
torch::Tensor anonymous_bytes(int64_t rows, int64_t columns) {
  const size_t bytes = static_cast<size_t>(rows * columns);
  void* memory = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (memory == MAP_FAILED) return torch::empty({rows, columns}, torch::kUInt8);
  return torch::from_blob(memory, {rows, columns}, [bytes](void* p) { munmap(p, bytes); }, torch::kUInt8);
}

// map in the pages that [from, to) touches in one call (`advice`: kPopulateRead for a file's pages, with
// MADV_WILLNEED where the kernel lacks it; kPopulateWrite for memory about to be written): a page fault apiece
// made filling a 1 GB model cost ~1 s of its load
void populate(const uint8_t* from, const uint8_t* to, int advice) {
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  void* begin = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(from) / page * page);
  const size_t length = reinterpret_cast<uintptr_t>(to) - reinterpret_cast<uintptr_t>(begin);
  if (madvise(begin, length, advice) != 0 && advice == kPopulateRead) madvise(begin, length, MADV_WILLNEED);
}

// The rows of a weight (uint8 [rows, bytes a row], ggml `type`) in the layout of the packed kernels, with the
// type that names it (kPacked | type); the weight itself and its type where there is no packed kernel for it
// (a type without one, rows not a multiple of 8, no AVX2). The same bytes, moved: every value is as stored.
// `mapped`: the weight is a view of a file's read-only mapping, whose pages are then mapped in (MADV_POPULATE_READ)
// and let go again (MADV_DONTNEED: the page cache keeps them) 8 MB at a time as they are packed, so that a
// model's resident memory never holds a matrix twice. Never for anonymous memory, which that would zero.
std::tuple<torch::Tensor, int64_t> pack_rows(torch::Tensor weight, int64_t type, bool mapped) {
  TORCH_CHECK(weight.scalar_type() == torch::kUInt8 && weight.dim() == 2 && weight.is_contiguous(),
              "pack_rows: weight must be contiguous uint8 [rows, bytes]");
#if defined(__AVX2__)
  const int64_t rows = weight.size(0), row_bytes = weight.size(1);
  if (!has_packed_kernel(type) || rows % kPackRows != 0 || row_bytes % bytes_of(type) != 0) {
    return {weight, type};
  }
  const int64_t blocks = row_bytes / bytes_of(type), block_bytes = packed_bytes_of(type);
  auto packed = anonymous_bytes(rows, blocks * block_bytes);
  const uint8_t* src = weight.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto address = [&](int64_t group) { return reinterpret_cast<uintptr_t>(src + group * kPackRows * row_bytes); };
  uintptr_t released = (address(0) + page - 1) / page * page;  // whole pages of the weight only
  const int64_t groups = rows / kPackRows, step = std::max<int64_t>(1, (8 << 20) / (kPackRows * row_bytes));
  for (int64_t first = 0; first < groups; first += step) {
    const int64_t last = std::min(groups, first + step);
    // each thread maps in its own share: the kernel's zeroing of fresh pages (most of a load, in a VM whose
    // host backs them on first touch) then runs on every thread, not on one while the others wait
    at::parallel_for(first, last, 1, [&](int64_t begin, int64_t end) {
      if (mapped) populate(src + begin * kPackRows * row_bytes, src + end * kPackRows * row_bytes, kPopulateRead);
      const int64_t group_bytes = blocks * kPackRows * block_bytes;
      populate(dst + begin * group_bytes, dst + end * group_bytes, kPopulateWrite);
      for (int64_t g = begin; g < end; ++g) {
        for (int64_t i = 0; i < blocks; ++i) {
          const uint8_t* from[kPackRows];
          for (int64_t r = 0; r < kPackRows; ++r) from[r] = src + (g * kPackRows + r) * row_bytes + i * bytes_of(type);
          pack_blocks(type, from, dst + (g * blocks + i) * kPackRows * block_bytes);
        }
      }
    });
    const uintptr_t done = address(last) / page * page;
    if (mapped && done > released) {
      madvise(reinterpret_cast<void*>(released), done - released, MADV_DONTNEED);
      released = done;
    }
  }
  return {packed, kPacked | type};
#else
  return {weight, type};
#endif
}

// rows `ids` of a block-quantized matrix (uint8 [N, bytes a row]) as float32 [len(ids), K]: embedding lookups
torch::Tensor block_rows(torch::Tensor weight, int64_t type, torch::Tensor ids, int64_t k) {
  TORCH_CHECK(weight.scalar_type() == torch::kUInt8 && weight.dim() == 2 && weight.is_contiguous(),
              "block_rows: weight must be contiguous uint8 [rows, bytes]");
  TORCH_CHECK(ids.scalar_type() == torch::kInt64 && ids.dim() == 1, "block_rows: ids must be int64 [n]");
  TORCH_CHECK(!(type & kPacked), "block_rows: the rows of a packed weight are not stored one after another");
  const Format f = format_of(type);
  TORCH_CHECK(k % f.values == 0 && weight.size(1) == k / f.values * f.bytes, "block_rows: rows of ",
              weight.size(1), " bytes do not hold ", k, " values of type ", type);
  const int64_t count = ids.size(0), rows = weight.size(0), blocks = k / f.values;
  auto out = torch::empty({count, k}, torch::dtype(torch::kFloat32));
  const int64_t* idp = ids.contiguous().data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(idp[i] >= 0 && idp[i] < rows, "block_rows: row ", idp[i], " is outside 0..", rows - 1);
  }
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* row = weight.data_ptr<uint8_t>() + idp[i] * weight.size(1);
      float* o = out.data_ptr<float>() + i * k;
      for (int64_t b = 0; b < blocks; ++b) dequantize_block(type, row + b * f.bytes, o + b * f.values);
    }
  });
  return out;
}

namespace {

// one expert's share of a step: the rows it takes (gathered), their activations, its matrices' parts
struct ExpertJob {
  std::vector<int64_t> tokens;
  std::vector<float> weights;
  torch::Tensor input, output;
  Activations per32, per256;
  std::vector<Part> parts;
  int64_t columns = 0;
};

void quantize_input(ExpertJob& job) {
  bool legacy = false, k_quant = false;
  for (const Part& p : job.parts) (format_of(p.type).values == 256 ? k_quant : legacy) = true;
  const float* xp = job.input.data_ptr<float>();
  const int64_t rows = job.input.size(0), k = job.input.size(1);
  if (legacy) job.per32 = Activations(xp, rows, k, 32);
  if (k_quant) job.per256 = Activations(xp, rows, k, 256);
}

// every job's matrices in one parallel pass over all their output columns
void run_jobs(std::vector<ExpertJob*>& jobs) {
  int64_t total = 0;
  std::vector<int64_t> first;
  for (ExpertJob* job : jobs) {
    first.push_back(total);
    job->output = torch::empty({job->input.size(0), job->columns}, torch::dtype(torch::kFloat32));
    total += job->columns;
  }
  at::parallel_for(0, total, 16, [&](int64_t begin, int64_t end) {
    for (size_t j = 0; j < jobs.size(); ++j) {
      const ExpertJob& job = *jobs[j];
      const int64_t lo = std::max(begin, first[j]) - first[j], hi = std::min(end, first[j] + job.columns) - first[j];
      for (size_t p = 0; p < job.parts.size() && lo < hi; ++p) {
        const int64_t rows_end = p + 1 < job.parts.size() ? job.parts[p + 1].start : job.columns;
        const int64_t a = std::max(lo, job.parts[p].start), b = std::min(hi, rows_end);
        if (a >= b) continue;
        const Activations& acts = format_of(job.parts[p].type).values == 256 ? job.per256 : job.per32;
        columns(job.parts[p], a - job.parts[p].start, b - job.parts[p].start, acts, job.output.data_ptr<float>(),
                job.columns);
      }
    }
  });
}

Part part_of(const torch::Tensor& w, int64_t type, int64_t k, int64_t start) {
  const Format f = format_of(type);
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous() && k % f.values == 0 &&
                  w.size(1) == k / f.values * f.bytes,
              "a weight must be contiguous uint8 [rows, the blocks of ", k, " values] of type ", type);
  return {w.data_ptr<uint8_t>(), w.size(1), type, start};
}

}  // namespace

// A DeepSeek MoE layer's experts straight from their blocks, in one call a step: each token through the SwiGLU
// (down(silu(gate x) * up x)) of the experts the router chose, weighted, summed in ascending expert order, then
// the shared expert added, as DeepseekMoE's Python loop does. All chosen experts' gate|up columns run in one
// parallel pass, then all their down columns in another (the loop paid a dispatch per matrix and left threads
// idle at each of ~18 small calls a layer).
BlockExperts::BlockExperts(std::vector<torch::Tensor> weights, std::vector<int64_t> types, bool shared)
    : weights_(std::move(weights)), types_(std::move(types)), shared_(shared) {
  TORCH_CHECK(weights_.size() % 3 == 0 && weights_.size() == types_.size() && weights_.size() >= 3,
              "BlockExperts: gate, up and down per expert, one type each");
  for (const auto& t : types_) format_of(t);
}

torch::Tensor BlockExperts::forward(torch::Tensor x, torch::Tensor ids, torch::Tensor weights) const {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "BlockExperts: x must be float32 [T, H]");
  TORCH_CHECK(ids.scalar_type() == torch::kInt64 && weights.scalar_type() == torch::kFloat32 && ids.dim() == 2 &&
                  ids.sizes() == weights.sizes() && ids.size(0) == x.size(0),
              "BlockExperts: ids int64 and weights float32, both [T, k]");
  x = x.contiguous();
  const int64_t tokens = x.size(0), hidden = x.size(1), routed = static_cast<int64_t>(weights_.size()) / 3 - shared_;
  const auto id = ids.contiguous(), weight = weights.contiguous();
  std::vector<ExpertJob> jobs(routed + shared_);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t j = 0; j < ids.size(1); ++j) {
      const int64_t e = id.data_ptr<int64_t>()[t * ids.size(1) + j];
      TORCH_CHECK(e >= 0 && e < routed, "BlockExperts: expert ", e, " is outside 0..", routed - 1);
      jobs[e].tokens.push_back(t);
      jobs[e].weights.push_back(weight.data_ptr<float>()[t * ids.size(1) + j]);
    }
  }
  std::vector<ExpertJob*> active;
  for (int64_t e = 0; e < routed + shared_; ++e) {
    ExpertJob& job = jobs[e];
    if (e == routed) {  // the shared expert: every token
      job.input = x;
    } else if (job.tokens.empty()) {
      continue;
    } else {
      job.input = x.index_select(0, torch::tensor(job.tokens, torch::dtype(torch::kInt64)));
    }
    const torch::Tensor& gate = weights_[3 * e];
    job.parts = {part_of(gate, types_[3 * e], hidden, 0), part_of(weights_[3 * e + 1], types_[3 * e + 1], hidden,
                                                                gate.size(0))};
    job.columns = gate.size(0) + weights_[3 * e + 1].size(0);
    active.push_back(&job);
  }
  at::parallel_for(0, static_cast<int64_t>(active.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t a = begin; a < end; ++a) quantize_input(*active[a]);
  });
  run_jobs(active);
  for (ExpertJob* job : active) {  // down: silu(gate) * up in, hidden out
    const int64_t e = job - jobs.data();
    job->input = silu_and_mul(job->output);
    job->parts = {part_of(weights_[3 * e + 2], types_[3 * e + 2], job->input.size(1), 0)};
    job->columns = weights_[3 * e + 2].size(0);
    TORCH_CHECK(job->columns == hidden, "BlockExperts: down projections must give ", hidden, " values");
  }
  at::parallel_for(0, static_cast<int64_t>(active.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t a = begin; a < end; ++a) quantize_input(*active[a]);
  });
  run_jobs(active);
  auto out = torch::zeros({tokens, hidden}, torch::dtype(torch::kFloat32));
  float* o = out.data_ptr<float>();
  for (ExpertJob* job : active) {
    if (job - jobs.data() == routed) continue;
    const float* y = job->output.data_ptr<float>();
    for (size_t i = 0; i < job->tokens.size(); ++i) {
      float* row = o + job->tokens[i] * hidden;
      for (int64_t c = 0; c < hidden; ++c) row[c] += y[i * hidden + c] * job->weights[i];
    }
  }
  if (shared_) out.add_(jobs[routed].output);
  return out;
}

void bind_block_experts(pybind11::module& m) {
  pybind11::class_<BlockExperts, std::shared_ptr<BlockExperts>>(m, "BlockExperts")
      .def(pybind11::init<std::vector<torch::Tensor>, std::vector<int64_t>, bool>())
      .def("forward", &BlockExperts::forward);
}

// y[:, h] = x[:, h] W_h^T for every head h: x [T, H, K] float32, w uint8 [H, N, bytes a row] of one ggml type ->
// [T, H, N] float32. DeepSeek's absorbed attention multiplies each head by its own slice of kv_b (attn_k_b,
// attn_v_b); every head's columns run in one parallel pass.
torch::Tensor block_heads(torch::Tensor x, torch::Tensor w, int64_t type) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kFloat32 && w.dim() == 3 && w.size(0) == x.size(1),
              "block_heads: x float32 [T, H, K], w uint8 [H, N, bytes]");
  const int64_t heads = x.size(1), k = x.size(2);
  std::vector<ExpertJob> jobs(heads);
  std::vector<ExpertJob*> active;
  for (int64_t h = 0; h < heads; ++h) {
    jobs[h].input = x.select(1, h).contiguous();
    jobs[h].parts = {part_of(w[h], type, k, 0)};
    jobs[h].columns = w.size(1);
    quantize_input(jobs[h]);
    active.push_back(&jobs[h]);
  }
  run_jobs(active);
  std::vector<torch::Tensor> outputs;
  for (const ExpertJob& job : jobs) outputs.push_back(job.output);
  return torch::stack(outputs, 1);
}
