// GroupNorm, optionally followed by SiLU, for channels_last (NHWC) CPU tensors: forward and backward in one
// pass pair per image each, float32 or bfloat16 activations, float32 statistics, weights and arithmetic.
//
// PyTorch's CPU GroupNorm on channels_last input walks the activation several times, and the SiLU after it, its
// backward and autocast's casts around it walk it again. Here one image's activation (HW x C values) is read
// once for the statistics and once more to write the output, while it is still in the core's cache; the backward
// likewise reads x and dy twice and writes dx once. The loops run over the contiguous channel axis: with
// AVX-512 (built with -march=native on such a CPU) as explicit 16-lane intrinsics, elsewhere as plain loops for
// the compiler to vectorise; exp is a polynomial in both (no libm call in the loops).
//
// The input may come as up to 4 parts along the channels (torch.cat(parts, dim=1), never made): a U-Net
// decoder block reads its input and skip connection where they are. A shift [N, C] may be added to the input
// (x + shift[:, :, None, None], never made either): a residual block's time-embedding bias, folded into the
// per-channel constants.
//
// Statistics: per-channel sums are shifted by the channel's first value (no cancellation when |mean| >> std),
// combined per group in double with the law of total variance.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// ---- scalar helpers (the portable path, and the statistics) ----

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
}

inline float load1(const float* p, int64_t i) { return p[i]; }
inline float load1(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
inline void store1(float* p, int64_t i, float v) { p[i] = v; }
inline void store1(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }

// exp(x): 2^n * P(r) with n = round(x / ln 2), r = x - n ln 2 (in two parts), P the Cephes expf polynomial
// (~1 ulp); x is clamped to where 2^n is a normal float. Branch-free, so plain loops over it vectorise.
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float sigmoid(float z) { return 1.0f / (1.0f + exp_approx(-z)); }

// dL/dz from dL/dy where y = silu(z) (or y = z).
template <bool Silu>
inline float grad_z(float dy, float z) {
  if (!Silu) return dy;
  const float s = sigmoid(z);
  return dy * s * (1.0f + z * (1.0f - s));
}

// ---- the four passes over an image [HW, C] (rows of C channels, one per pixel) ----
// stats:    s1 = sum (x - pivot), s2 = sum (x - pivot)^2                        (per channel, over the pixels)
// forward:  y = silu(a x + b)  (or a x + b)                                     (row by row)
// sums:     dz = dL/dz; sum_dz = sum dz, sum_dzx = sum dz (x - m)               (per channel)
// dx:       dx = a dz + B (x - m) + Cc                                          (row by row)

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)

inline __mmask16 tail(int64_t c, int64_t C) {
  return C - c >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (C - c)) - 1u);
}

// Loads and stores of 16 channels; masked (for a last block of fewer than 16) only where needed, since full-width
// unmasked moves are faster on some CPUs.
constexpr __mmask16 kFull = 0xFFFF;

inline __m512 vload(const float* p, __mmask16 k) { return k == kFull ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(k, p); }
inline __m512 vload(const uint16_t* p, __mmask16 k) {
  const __m256i h = k == kFull ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(k, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void vstore(float* p, __m512 v, __mmask16 k) {
  if (k == kFull) {
    _mm512_storeu_ps(p, v);
  } else {
    _mm512_mask_storeu_ps(p, k, v);
  }
}
inline void vstore(uint16_t* p, __m512 v, __mmask16 k) {
#if defined(__AVX512BF16__)
  // one instruction: round to nearest even (NaN stays NaN; float denormals, below 1.2e-38, become zero)
  const __m256bh b = _mm512_cvtneps_pbh(v);
  __m256i h;
  std::memcpy(&h, &b, sizeof h);
#else
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  const __m256i h = _mm512_cvtepi32_epi16(r);
#endif
  if (k == kFull) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  } else {
    _mm256_mask_storeu_epi16(p, k, h);
  }
}

inline __m512 vexp(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// 1 / (1 + exp(-z)): the reciprocal's 14-bit estimate and one Newton step (relative error ~2^-28, float32's
// rounding), instead of a division, which took about as long as the rest of the forward pass on bf16 activations.
inline __m512 vsigmoid(__m512 z) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 d = _mm512_add_ps(one, vexp(_mm512_sub_ps(_mm512_setzero_ps(), z)));
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, one), r);  // r (2 - d r)
}

template <bool Silu>
inline __m512 vgrad_z(__m512 dy, __m512 z) {
  if (!Silu) return dy;
  const __m512 s = vsigmoid(z);
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_mul_ps(_mm512_mul_ps(dy, s), _mm512_fmadd_ps(z, _mm512_sub_ps(one, s), one));
}

// The statistics walk the image in bands of up to 64 channels (4 vectors of 16), row by row, with the band's
// sums in registers: each row's band is 4 consecutive cache lines, which the hardware prefetcher streams.
template <typename T, int NS>
static void stats_band(const T* x, int64_t HW, int64_t C, int64_t c0, const float* pivot, float* s1, float* s2) {
  __mmask16 k[NS];
  __m512 pv[NS], a1[NS], a2[NS];
  for (int s = 0; s < NS; ++s) {
    k[s] = tail(c0 + 16 * s, C);
    pv[s] = vload(pivot + c0 + 16 * s, k[s]);
    a1[s] = _mm512_setzero_ps();
    a2[s] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < HW; ++p) {
    for (int s = 0; s < NS; ++s) {
      const __m512 d = _mm512_sub_ps(vload(x + p * C + c0 + 16 * s, k[s]), pv[s]);
      a1[s] = _mm512_add_ps(a1[s], d);
      a2[s] = _mm512_fmadd_ps(d, d, a2[s]);
    }
  }
  for (int s = 0; s < NS; ++s) {
    vstore(s1 + c0 + 16 * s, a1[s], k[s]);
    vstore(s2 + c0 + 16 * s, a2[s], k[s]);
  }
}

// The backward's sums likewise, in bands of up to 64 channels.
template <typename T, bool Silu, int NS>
static void sums_band(const T* x, const T* dy, int64_t HW, int64_t C, int64_t ldy, int64_t c0, const float* a,
                      const float* b, const float* m, float* sum_dz, float* sum_dzx) {
  __mmask16 k[NS];
  __m512 av[NS], bv[NS], mv[NS], s1[NS], s2[NS];
  for (int s = 0; s < NS; ++s) {
    const int64_t c = c0 + 16 * s;
    k[s] = tail(c, C);
    av[s] = vload(a + c, k[s]);
    bv[s] = vload(b + c, k[s]);
    mv[s] = vload(m + c, k[s]);
    s1[s] = _mm512_setzero_ps();
    s2[s] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < HW; ++p) {
    for (int s = 0; s < NS; ++s) {
      const int64_t c = c0 + 16 * s;
      const __m512 xv = vload(x + p * C + c, k[s]);
      const __m512 dz = vgrad_z<Silu>(vload(dy + p * ldy + c, k[s]), _mm512_fmadd_ps(xv, av[s], bv[s]));
      s1[s] = _mm512_add_ps(s1[s], dz);
      s2[s] = _mm512_fmadd_ps(dz, _mm512_sub_ps(xv, mv[s]), s2[s]);
    }
  }
  for (int s = 0; s < NS; ++s) {
    vstore(sum_dz + c0 + 16 * s, s1[s], k[s]);
    vstore(sum_dzx + c0 + 16 * s, s2[s], k[s]);
  }
}

struct Avx512 {
template <typename T>
static void stats_pass(const T* x, int64_t HW, int64_t C, const float* pivot, float* s1, float* s2) {
  for (int64_t c = 0; c < C; c += 64) {
    const int64_t strips = (std::min<int64_t>(C - c, 64) + 15) / 16;
    if (strips == 4) stats_band<T, 4>(x, HW, C, c, pivot, s1, s2);
    else if (strips == 3) stats_band<T, 3>(x, HW, C, c, pivot, s1, s2);
    else if (strips == 2) stats_band<T, 2>(x, HW, C, c, pivot, s1, s2);
    else stats_band<T, 1>(x, HW, C, c, pivot, s1, s2);
  }
}

template <typename T, bool Silu>
static void forward_row(const T* x, const float* a, const float* b, T* y, int64_t C) {
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 k = tail(c, C);
    const __m512 z = _mm512_fmadd_ps(vload(x + c, k), vload(a + c, k), vload(b + c, k));
    vstore(y + c, Silu ? _mm512_mul_ps(z, vsigmoid(z)) : z, k);
  }
}

template <typename T, bool Silu>
static void sums_pass(const T* x, const T* dy, int64_t HW, int64_t C, int64_t ldy, const float* a, const float* b,
                      const float* m, float* sum_dz, float* sum_dzx) {
  for (int64_t c = 0; c < C; c += 64) {
    const int64_t strips = (std::min<int64_t>(C - c, 64) + 15) / 16;
    if (strips == 4) sums_band<T, Silu, 4>(x, dy, HW, C, ldy, c, a, b, m, sum_dz, sum_dzx);
    else if (strips == 3) sums_band<T, Silu, 3>(x, dy, HW, C, ldy, c, a, b, m, sum_dz, sum_dzx);
    else if (strips == 2) sums_band<T, Silu, 2>(x, dy, HW, C, ldy, c, a, b, m, sum_dz, sum_dzx);
    else sums_band<T, Silu, 1>(x, dy, HW, C, ldy, c, a, b, m, sum_dz, sum_dzx);
  }
}

template <typename T, bool Silu>
static void dx_row(const T* x, const T* dy, const float* a, const float* b, const float* m, const float* B,
                   const float* Cc, T* dx, int64_t C) {
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 k = tail(c, C);
    const __m512 xv = vload(x + c, k), av = vload(a + c, k);
    const __m512 dz = vgrad_z<Silu>(vload(dy + c, k), _mm512_fmadd_ps(xv, av, vload(b + c, k)));
    const __m512 out =
        _mm512_fmadd_ps(av, dz, _mm512_fmadd_ps(vload(B + c, k), _mm512_sub_ps(xv, vload(m + c, k)), vload(Cc + c, k)));
    vstore(dx + c, out, k);
  }
}

};

#endif

// Plain loops (the compiler vectorises them where it can): the passes on CPUs without AVX-512, and a reference
// build of them everywhere (the module's *_portable functions, which the tests run).
struct Portable {
template <typename T>
static void stats_pass(const T* x, int64_t HW, int64_t C, const float* pivot, float* s1, float* s2) {
  for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = 0.0f;
  for (int64_t p = 0; p < HW; ++p) {
    const T* row = x + p * C;
    for (int64_t c = 0; c < C; ++c) {
      const float d = load1(row, c) - pivot[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  }
}

template <typename T, bool Silu>
static void forward_row(const T* x, const float* a, const float* b, T* y, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const float z = load1(x, c) * a[c] + b[c];
    store1(y, c, Silu ? z * sigmoid(z) : z);
  }
}

// one pixel's row of sums_pass; the sums are restrict-qualified so that the loop vectorises in every instance
// (GCC left one instance scalar when the row loop sat inside the pixel loop: the SiLU backward at batch 128, 64
// channels, 14x14 took 12.2 ms instead of 3.8 on a 2-core AVX2 EPYC)
template <typename T, bool Silu>
static void sums_row(const T* __restrict x, const T* __restrict dy, const float* __restrict a,
                     const float* __restrict b, const float* __restrict m, float* __restrict sum_dz,
                     float* __restrict sum_dzx, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const float xv = load1(x, c);
    const float dz = grad_z<Silu>(load1(dy, c), xv * a[c] + b[c]);
    sum_dz[c] += dz;
    sum_dzx[c] += dz * (xv - m[c]);
  }
}

template <typename T, bool Silu>
static void sums_pass(const T* x, const T* dy, int64_t HW, int64_t C, int64_t ldy, const float* a, const float* b,
                      const float* m, float* sum_dz, float* sum_dzx) {
  for (int64_t c = 0; c < C; ++c) sum_dz[c] = sum_dzx[c] = 0.0f;
  for (int64_t p = 0; p < HW; ++p) sums_row<T, Silu>(x + p * C, dy + p * ldy, a, b, m, sum_dz, sum_dzx, C);
}

template <typename T, bool Silu>
static void dx_row(const T* x, const T* dy, const float* a, const float* b, const float* m, const float* B,
                   const float* Cc, T* dx, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const float xv = load1(x, c);
    const float dz = grad_z<Silu>(load1(dy, c), xv * a[c] + b[c]);
    store1(dx, c, a[c] * dz + B[c] * (xv - m[c]) + Cc[c]);
  }
}
};

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
using Best = Avx512;
constexpr const char* kVectorIsa = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
using Best = Portable;  // the plain loops, vectorised by the compiler for AVX2 (-march=native)
constexpr const char* kVectorIsa = "avx2";  // and the Winograd kernel's 8-float path
#else
using Best = Portable;
constexpr const char* kVectorIsa = "portable";
#endif

// Per-channel scale a and shift b of one image (z = a x + b), and each channel's group mean m.
void affine(const float* mean, const float* rstd, const float* weight, const float* bias, int64_t C, int64_t G,
            float* a, float* b, float* m) {
  const int64_t D = C / G;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t g = c / D;
    const float w = weight ? weight[c] : 1.0f;
    a[c] = rstd[g] * w;
    b[c] = (bias ? bias[c] : 0.0f) - mean[g] * a[c];
    m[c] = mean[g];
  }
}

// One image's activation as parts along the channels (an unmade concatenation, torch.cat(parts, dim=1)): part k
// holds channels [c0[k], c0[k] + c[k]) as its own rows of c[k] values, one per pixel.
constexpr int kMaxParts = 4;
template <typename P>
struct Parts {
  int n = 0;
  P x[kMaxParts];
  int64_t c[kMaxParts], c0[kMaxParts];
  Parts at(int64_t offset_per_channel) const {  // the same parts moved on by offset_per_channel * c[k] values
    Parts r = *this;
    for (int k = 0; k < n; ++k) r.x[k] += offset_per_channel * c[k];
    return r;
  }
};

// With a shift [C] (or nullptr), the input is x + shift, a value per channel added to every pixel (a bias per
// image), never made: it moves each channel's mean, not its spread, and folds into the per-channel constants.
void fold_shift(const float* shift, const float* a, int64_t C, float* b, float* m) {
  if (!shift) return;
  for (int64_t c = 0; c < C; ++c) {
    b[c] += a[c] * shift[c];  // z = a (x + shift) + b
    if (m) m[c] -= shift[c];  // (x + shift) - mean = x - (mean - shift)
  }
}

// One image [HW, C] (plus shift [C], or nullptr): group statistics (mean, rstd [G]), then y [HW, C]. buf holds
// 5 C floats.
template <typename Ops, typename T, bool Silu>
void forward_image(const Parts<const T*>& x, const float* shift, T* y, const float* weight, const float* bias,
                   int64_t HW, int64_t C, int64_t G, double eps, float* mean, float* rstd, float* buf) {
  float* pivot = buf;
  float* s1 = buf + C;
  float* s2 = buf + 2 * C;
  float* a = buf + 3 * C;
  float* b = buf + 4 * C;
  for (int k = 0; k < x.n; ++k) {
    const int64_t c0 = x.c0[k];
    for (int64_t c = 0; c < x.c[k]; ++c) pivot[c0 + c] = load1(x.x[k], c);
    Ops::stats_pass(x.x[k], HW, x.c[k], pivot + c0, s1 + c0, s2 + c0);
  }
  if (shift) {
    for (int64_t c = 0; c < C; ++c) pivot[c] += shift[c];  // the sums about the pivot are the same for x + shift
  }
  // Group statistics from the channels' (law of total variance, in double): the mean of the channel means,
  // and the mean channel variance plus the variance of the channel means around the group's.
  const int64_t D = C / G;
  for (int64_t g = 0; g < G; ++g) {
    double group_mean = 0.0, var = 0.0;
    for (int64_t c = g * D; c < (g + 1) * D; ++c) group_mean += pivot[c] + static_cast<double>(s1[c]) / HW;
    group_mean /= D;
    for (int64_t c = g * D; c < (g + 1) * D; ++c) {
      const double shift = static_cast<double>(s1[c]) / HW;
      const double spread = pivot[c] + shift - group_mean;
      var += static_cast<double>(s2[c]) / HW - shift * shift + spread * spread;
    }
    var /= D;
    var = var > 0.0 ? var : 0.0;
    mean[g] = static_cast<float>(group_mean);
    rstd[g] = static_cast<float>(1.0 / std::sqrt(var + eps));
  }
  affine(mean, rstd, weight, bias, C, G, a, b, pivot);
  fold_shift(shift, a, C, b, nullptr);
  for (int64_t p = 0; p < HW; ++p) {
    for (int k = 0; k < x.n; ++k) {
      const int64_t c0 = x.c0[k], ck = x.c[k];
      Ops::template forward_row<T, Silu>(x.x[k] + p * ck, a + c0, b + c0, y + p * C + c0, ck);
    }
  }
}

// One image: dx (in x's parts) from dy [HW, C], and this image's terms of dweight and dbias [C]. buf holds 7 C
// floats. The gradient of the shift is dx summed over the pixels (made by the caller).
template <typename Ops, typename T, bool Silu>
void backward_image(const T* dy, const Parts<const T*>& x, const float* shift, const Parts<T*>& dx, const float* mean,
                    const float* rstd, const float* weight, const float* bias, int64_t HW, int64_t C, int64_t G,
                    float* dweight, float* dbias, float* buf) {
  float* a = buf;  // z = a x + b; a is also dx's factor of dz, rstd * weight
  float* b = buf + C;
  float* m = buf + 2 * C;
  float* sum_dz = buf + 3 * C;
  float* sum_dzx = buf + 4 * C;  // sum of dz * (x - mean)
  float* B = buf + 5 * C;
  float* Cc = buf + 6 * C;
  affine(mean, rstd, weight, bias, C, G, a, b, m);
  fold_shift(shift, a, C, b, m);
  for (int k = 0; k < x.n; ++k) {
    const int64_t c0 = x.c0[k];
    Ops::template sums_pass<T, Silu>(x.x[k], dy + c0, HW, x.c[k], C, a + c0, b + c0, m + c0, sum_dz + c0,
                                     sum_dzx + c0);
  }
  // dx = rstd (w dz - mean(w dz) - xhat mean(w dz xhat)) = a dz + B (x - mean) + Cc, means over the group
  const int64_t D = C / G;
  const double M = static_cast<double>(HW) * D;
  for (int64_t g = 0; g < G; ++g) {
    double m1 = 0.0, m2 = 0.0;
    for (int64_t c = g * D; c < (g + 1) * D; ++c) {
      const double w = weight ? weight[c] : 1.0;
      m1 += w * sum_dz[c];
      m2 += w * sum_dzx[c];
    }
    const double r = rstd[g];
    m1 /= M;
    m2 = m2 * r / M;
    for (int64_t c = g * D; c < (g + 1) * D; ++c) {
      dweight[c] = static_cast<float>(sum_dzx[c] * r);
      dbias[c] = sum_dz[c];
      B[c] = static_cast<float>(-r * r * m2);
      Cc[c] = static_cast<float>(-r * m1);
    }
  }
  for (int64_t p = 0; p < HW; ++p) {
    for (int k = 0; k < x.n; ++k) {
      const int64_t c0 = x.c0[k], ck = x.c[k];
      Ops::template dx_row<T, Silu>(x.x[k] + p * ck, dy + p * C + c0, a + c0, b + c0, m + c0, B + c0, Cc + c0,
                                    dx.x[k] + p * ck, ck);
    }
  }
}

// Checks the parts of x (one or more tensors concatenated along the channels) and returns their channel count.
int64_t check_input(const std::vector<torch::Tensor>& xs, const c10::optional<torch::Tensor>& weight,
                    const c10::optional<torch::Tensor>& bias, int64_t groups) {
  TORCH_CHECK(!xs.empty() && xs.size() <= static_cast<size_t>(kMaxParts), "group_norm_silu: x must be 1 to ",
              kMaxParts, " tensors concatenated along the channels, got ", xs.size());
  int64_t C = 0;
  for (const auto& x : xs) {
    TORCH_CHECK(x.device().is_cpu(), "group_norm_silu: x must be a CPU tensor");
    TORCH_CHECK(x.dim() == 4, "group_norm_silu: x must be 4-d [N, C, H, W], got ", x.dim(), "-d");
    TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "group_norm_silu: x must be channels_last");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                "group_norm_silu: x must be float32 or bfloat16, got ", x.scalar_type());
    TORCH_CHECK(x.scalar_type() == xs[0].scalar_type() && x.size(0) == xs[0].size(0) &&
                    x.size(2) == xs[0].size(2) && x.size(3) == xs[0].size(3),
                "group_norm_silu: the parts of x must share dtype, batch size, height and width");
    C += x.size(1);
  }
  TORCH_CHECK(groups > 0 && C % groups == 0, "group_norm_silu: groups=", groups, " must divide C=", C);
  for (const auto* t : {&weight, &bias}) {
    if (t->has_value()) {
      const auto& v = t->value();
      TORCH_CHECK(v.scalar_type() == at::kFloat && v.is_contiguous() && v.numel() == C && v.device().is_cpu(),
                  "group_norm_silu: weight and bias must be contiguous float32 CPU tensors of C=", C, " values");
    }
  }
  return C;
}

// The parts of xs's first image, as pointers of type P.
template <typename P>
Parts<P> parts_of(const std::vector<torch::Tensor>& xs) {
  Parts<P> r;
  int64_t c0 = 0;
  for (const auto& x : xs) {
    r.x[r.n] = static_cast<P>(x.data_ptr());
    r.c[r.n] = x.size(1);
    r.c0[r.n++] = c0;
    c0 += x.size(1);
  }
  return r;
}

// The shift, if given, must be float32 [N, C], contiguous: a value per image and channel.
void check_shift(const c10::optional<torch::Tensor>& shift, int64_t N, int64_t C) {
  if (!shift.has_value()) return;
  const auto& s = shift.value();
  TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 2 &&
                  s.size(0) == N && s.size(1) == C,
              "group_norm_silu: shift must be a contiguous float32 CPU tensor [N, C] = [", N, ", ", C, "]");
}

const float* data_or_null(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// f(T{}, std::bool_constant<Silu>{}) for the activation type (uint16_t holds bf16) and the SiLU flag.
template <typename F>
void dispatch(bool bf16, bool silu, F&& f) {
  if (bf16) {
    silu ? f(uint16_t{}, std::true_type{}) : f(uint16_t{}, std::false_type{});
  } else {
    silu ? f(float{}, std::true_type{}) : f(float{}, std::false_type{});
  }
}

// y = GroupNorm (+ SiLU) of torch.cat(xs, dim=1) (+ shift[:, :, None, None]), without making the concatenation
// or the sum: (y, mean, rstd).
template <typename Ops>
std::vector<torch::Tensor> run_forward(const std::vector<torch::Tensor>& xs,
                                       const c10::optional<torch::Tensor>& weight,
                                       const c10::optional<torch::Tensor>& bias, int64_t groups, double eps,
                                       bool silu, const c10::optional<torch::Tensor>& shift) {
  const int64_t C = check_input(xs, weight, bias, groups);
  const auto& x = xs[0];
  const int64_t N = x.size(0), HW = x.size(2) * x.size(3);
  check_shift(shift, N, C);
  const float* sh = data_or_null(shift);
  auto y = torch::empty({N, C, x.size(2), x.size(3)}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto mean = torch::empty({N, groups}, x.options().dtype(at::kFloat));
  auto rstd = torch::empty({N, groups}, x.options().dtype(at::kFloat));
  const float* w = data_or_null(weight);
  const float* b = data_or_null(bias);
  float* mean_p = mean.data_ptr<float>();
  float* rstd_p = rstd.data_ptr<float>();
  void* yp = y.data_ptr();
  dispatch(x.scalar_type() == at::kBFloat16, silu, [&](auto type, auto with_silu) {
    using T = decltype(type);
    const auto xp = parts_of<const T*>(xs);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(5 * C);
      for (int64_t n = begin; n < end; ++n) {
        forward_image<Ops, T, decltype(with_silu)::value>(xp.at(n * HW), sh ? sh + n * C : nullptr,
                                                          static_cast<T*>(yp) + n * HW * C, w, b, HW, C, groups, eps,
                                                          mean_p + n * groups, rstd_p + n * groups, buf.data());
      }
    });
  });
  return {y, mean, rstd};
}

// The backward of run_forward: (dx for each part of xs..., dweight, dbias).
template <typename Ops>
std::vector<torch::Tensor> run_backward(const torch::Tensor& dy, const std::vector<torch::Tensor>& xs,
                                        const torch::Tensor& mean, const torch::Tensor& rstd,
                                        const c10::optional<torch::Tensor>& weight,
                                        const c10::optional<torch::Tensor>& bias, int64_t groups, bool silu,
                                        const c10::optional<torch::Tensor>& shift) {
  const int64_t C = check_input(xs, weight, bias, groups);
  const auto& x = xs[0];
  const int64_t N = x.size(0), HW = x.size(2) * x.size(3);
  check_shift(shift, N, C);
  const float* sh = data_or_null(shift);
  TORCH_CHECK(dy.dim() == 4 && dy.size(0) == N && dy.size(1) == C && dy.size(2) == x.size(2) &&
                  dy.size(3) == x.size(3) && dy.scalar_type() == x.scalar_type() &&
                  dy.is_contiguous(at::MemoryFormat::ChannelsLast),
              "group_norm_silu: dy must be a channels_last tensor of x's shape and dtype");
  TORCH_CHECK(mean.numel() == N * groups && rstd.numel() == N * groups && mean.is_contiguous() &&
                  rstd.is_contiguous() && mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat,
              "group_norm_silu: mean and rstd must be contiguous float32 [N, groups]");
  std::vector<torch::Tensor> out;
  for (const auto& part : xs) out.push_back(torch::empty_like(part, at::MemoryFormat::ChannelsLast));
  auto dweight_parts = torch::empty({N, C}, x.options().dtype(at::kFloat));
  auto dbias_parts = torch::empty({N, C}, x.options().dtype(at::kFloat));
  const float* w = data_or_null(weight);
  const float* b = data_or_null(bias);
  const float* mean_p = mean.data_ptr<float>();
  const float* rstd_p = rstd.data_ptr<float>();
  float* dw_p = dweight_parts.data_ptr<float>();
  float* db_p = dbias_parts.data_ptr<float>();
  const void* dyp = dy.data_ptr();
  dispatch(x.scalar_type() == at::kBFloat16, silu, [&](auto type, auto with_silu) {
    using T = decltype(type);
    const auto xp = parts_of<const T*>(xs);
    const auto dxp = parts_of<T*>(out);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(7 * C);
      for (int64_t n = begin; n < end; ++n) {
        backward_image<Ops, T, decltype(with_silu)::value>(
            static_cast<const T*>(dyp) + n * HW * C, xp.at(n * HW), sh ? sh + n * C : nullptr, dxp.at(n * HW),
            mean_p + n * groups,
            rstd_p + n * groups, w, b, HW, C, groups, dw_p + n * C, db_p + n * C, buf.data());
      }
    });
  });
  out.push_back(dweight_parts.sum(0));
  out.push_back(dbias_parts.sum(0));
  return out;
}

// The single-tensor forms.
template <typename Ops>
std::vector<torch::Tensor> forward_one(const torch::Tensor& x, const c10::optional<torch::Tensor>& weight,
                                       const c10::optional<torch::Tensor>& bias, int64_t groups, double eps,
                                       bool silu) {
  return run_forward<Ops>({x}, weight, bias, groups, eps, silu, c10::nullopt);
}

template <typename Ops>
std::vector<torch::Tensor> backward_one(const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& mean,
                                        const torch::Tensor& rstd, const c10::optional<torch::Tensor>& weight,
                                        const c10::optional<torch::Tensor>& bias, int64_t groups, bool silu) {
  return run_backward<Ops>(dy, {x}, mean, rstd, weight, bias, groups, silu, c10::nullopt);
}

}  // namespace

void register_attention(pybind11::module_& m);  // attention.cpp
void register_winograd(pybind11::module_& m);   // winograd.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward_one<Best>, "GroupNorm (+ SiLU) forward on channels_last CPU tensors: (y, mean, rstd)");
  m.def("backward", &backward_one<Best>, "GroupNorm (+ SiLU) backward: (dx, dweight, dbias)");
  m.def("forward_portable", &forward_one<Portable>, "forward with the plain-loop passes");
  m.def("backward_portable", &backward_one<Portable>, "backward with the plain-loop passes");
  namespace py = pybind11;
  const auto fwd_args = std::make_tuple(py::arg("xs"), py::arg("weight"), py::arg("bias"), py::arg("groups"),
                                        py::arg("eps"), py::arg("silu"), py::arg("shift") = py::none());
  const auto bwd_args = std::make_tuple(py::arg("dy"), py::arg("xs"), py::arg("mean"), py::arg("rstd"),
                                        py::arg("weight"), py::arg("bias"), py::arg("groups"), py::arg("silu"),
                                        py::arg("shift") = py::none());
  std::apply([&](auto... a) {
    m.def("forward_parts", &run_forward<Best>,
          "forward of the concatenation of a list of tensors along the channels, plus a shift [N, C] or None, "
          "without making either: (y, mean, rstd)", a...);
    m.def("forward_parts_portable", &run_forward<Portable>, "forward_parts with the plain-loop passes", a...);
  }, fwd_args);
  std::apply([&](auto... a) {
    m.def("backward_parts", &run_backward<Best>, "backward of forward_parts: (dx of each part..., dweight, dbias)",
          a...);
    m.def("backward_parts_portable", &run_backward<Portable>, "backward_parts with the plain-loop passes", a...);
  }, bwd_args);
  register_attention(m);
  register_winograd(m);
  m.attr("vector_isa") = pybind11::str(kVectorIsa);
}
