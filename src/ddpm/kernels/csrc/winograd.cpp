// 3x3 convolutions (stride 1, padding 1) on channels_last float32 CPU activations by Winograd's minimal filtering
// algorithms F(2x2, 3x3) and F(4x4, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks",
// CVPR 2016), forward and weight gradient.
//
// Each m x m block of output pixels (a tile) comes from an a x a patch d of the input (a = m + 2):
// y = A^T [(G g G^T) . (B^T d B)] A, where . multiplies element by element. Over the channels these are a^2
// independent matrix products, one per element p of the transformed patch: M_p[tile, co] = sum_ci V_p[tile, ci]
// U_p[ci, co], with a^2 Cin Cout multiplications per tile of m^2 pixels against the direct convolution's
// 9 m^2 Cin Cout: 2.25x fewer for F(2x2, 3x3) (16 per 4 pixels), 4x fewer for F(4x4, 3x3) (36 per 16), less
// where the tiles overhang the image. The transforms B and A add and subtract with small integer weights.
//
// One task is a run of tiles (of one image or, on small maps, of several): their patches are transformed into V
// (in the core's cache), the a^2 products run as register-blocked small GEMMs against the transformed filters U
// (computed in Python, [a^2, Cin, Cout]), and each tile's outputs are transformed back and written with the bias.
// Channels are the activations' contiguous axis (NHWC), so every step works on whole vectors of 16 channels, Cin
// and Cout padded with zeros to multiples of 16 (in V, U and M only). The weight gradient runs the same way
// backwards: dU_p = sum over tiles of V_p^T dM_p with dM = A dy A^T (mapped back to 3x3 filters, G^T dU G, in
// Python).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {

// Vectors of kLane floats: 16 with AVX-512 (32 registers of 16 floats), else 8 (AVX2: 16 registers of 8 floats).
// Channels are padded to multiples of V = 16 whatever the lane width (the layouts of U and of the GEMMs' blocks
// are the same on every CPU).
#if defined(__AVX512F__)
constexpr int kLane = 16;
#else
constexpr int kLane = 8;
#endif
typedef float vec __attribute__((vector_size(kLane * sizeof(float))));
constexpr int64_t L = kLane;
constexpr int64_t V = 16;

inline vec load(const float* p) {
  vec x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
inline void store(float* p, vec x) { std::memcpy(p, &x, sizeof x); }
// the first n (of kLane) floats at p, the rest zero (n may be 0 or less: the vectors of the padding past the last
// channel); stores the first n lanes of x
inline vec loadn(const float* p, int64_t n) {
  if (n >= L) return load(p);
  vec x = {};
  if (n > 0) std::memcpy(&x, p, n * sizeof(float));
  return x;
}
inline void storen(float* p, vec x, int64_t n) {
  if (n > 0) std::memcpy(p, &x, (n >= L ? L : n) * sizeof(float));
}
// storen for an output written once and read by another operation later: whole vectors at 64-byte aligned
// addresses go straight to memory (a non-temporal store, AVX-512; AVX: 32-byte ones), without first reading the cache line they
// fill and without evicting the data the kernel still works on. Measured side by side in the default net (two
// runs): the fp32 sampling forward 1.11x and 1.12x faster, the training step 1.08x. A thread's streamed stores
// are fenced (stream_fence) before another thread may read them.
inline void store_out(float* p, vec x, int64_t n) {
#if defined(__AVX512F__)
  if (n >= L && (reinterpret_cast<uintptr_t>(p) & 63) == 0) {
    _mm512_stream_ps(p, reinterpret_cast<__m512>(x));
    return;
  }
#elif defined(__AVX__)
  if (n >= L && (reinterpret_cast<uintptr_t>(p) & 31) == 0) {
    _mm256_stream_ps(p, reinterpret_cast<__m256>(x));
    return;
  }
#endif
  storen(p, x, n);
}
inline void stream_fence() {
#if defined(__AVX512F__) || defined(__AVX__)
  _mm_sfence();
#endif
}
inline int64_t whole(int64_t n) { return (n + V - 1) / V * V; }  // n rounded up to whole vectors

// The register blocking of the small GEMMs, by the vector registers the CPU has. With AVX-512: 32 registers of 16
// floats, blocks of up to 28 accumulators (R rows by NV vectors of 16 columns), so that NV loads of B and a
// broadcast fit beside them. Elsewhere (AVX2: 16 registers of 8 floats) the products run on 8-float vectors, one
// column of 16 floats (two registers) by at most 6 rows: 12 accumulators, two loads of B and a broadcast. Measured
// on a 2-core AVX2 EPYC, one core, the forward's GEMM shapes (12 x 64 x 64, 36 of them): 72 GFLOP/s, against 3.1
// with the AVX-512 blocking on 16-float vectors (which spill there) and 36-41 with blocks of two or four columns.
#if defined(__AVX512F__)
constexpr int kMaxNV = 4, kRows1 = 24, kRows2 = 14, kRows4 = 6;
#else
constexpr int kMaxNV = 1, kRows1 = 6, kRows2 = 1, kRows4 = 1;
#endif

// C[R, NV * 16] (+)= A[R, K] B[K, NV * 16] (TransA: A^T B, A stored [K, R]), row-major with leading dimensions lda,
// ldb, ldc: R rows and NV * 16 columns of C stay in registers while k runs; each step loads a row of B and
// broadcasts one element of A per row. Accumulate adds to C instead of overwriting it.
template <bool TransA, bool Accumulate, int R, int NV>
void micro(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t K) {
  constexpr int NL = NV * V / L;  // vectors per row
  vec acc[R][NL] = {};
  if (Accumulate)
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NL; ++v) acc[r][v] = load(C + r * ldc + v * L);
  for (int64_t k = 0; k < K; ++k) {
    vec b[NL];
#pragma GCC unroll 8
    for (int v = 0; v < NL; ++v) b[v] = load(B + k * ldb + v * L);
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
      const float a = TransA ? A[k * lda + r] : A[r * lda + k];
#pragma GCC unroll 8
      for (int v = 0; v < NL; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NL; ++v) store(C + r * ldc + v * L, acc[r][v]);
}

using Micro = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t);

// micro for R = 1 .. sizeof(Rs) rows
template <bool TransA, bool Accumulate, int NV, int... Rs>
constexpr std::array<Micro, sizeof...(Rs)> table(std::integer_sequence<int, Rs...>) {
  return {&micro<TransA, Accumulate, Rs + 1, NV>...};
}

template <bool TransA, bool Accumulate>
struct Micros {
  static constexpr auto one = table<TransA, Accumulate, 1>(std::make_integer_sequence<int, kRows1>{});
  static constexpr auto two = table<TransA, Accumulate, 2>(std::make_integer_sequence<int, kRows2>{});
  static constexpr auto four = table<TransA, Accumulate, 4>(std::make_integer_sequence<int, kRows4>{});
};

// C[M, N] (+)= A[M, K] B[K, N] (TransA: A stored [K, M]), N a multiple of 16: column blocks of 4, 2 or 1 vectors
// of 16 (at most kMaxNV); the rows split evenly into runs that fit the registers
template <bool TransA, bool Accumulate>
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc) {
  using T = Micros<TransA, Accumulate>;
  int64_t n = 0;
  while (n < N) {
    const int64_t left = (N - n) / V;
    const int nv = (kMaxNV >= 4 && left >= 4) ? 4 : (kMaxNV >= 2 && left >= 2) ? 2 : 1;
    const Micro* micros = nv == 4 ? T::four.data() : nv == 2 ? T::two.data() : T::one.data();
    const int64_t most = nv == 4 ? T::four.size() : nv == 2 ? T::two.size() : T::one.size();
    const int64_t runs = (M + most - 1) / most;
    int64_t m = 0;
    for (int64_t run = 0; run < runs; ++run) {
      const int64_t rows = (M - m) / (runs - run);
      micros[rows - 1](TransA ? A + m : A + m * lda, lda, B + n, ldb, C + m * ldc + n, ldc, K);
      m += rows;
    }
    n += nv * V;
  }
}

// out[r] = sum_c mat[r][c] in[c] for a matrix known at compile time: once unrolled, zero terms drop out and
// weights of +-1 become additions and subtractions
template <int R, int C>
inline void apply(const float (&mat)[R][C], const vec* in, vec* out) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    vec acc = {};
    bool first = true;
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const float k = mat[r][c];
      if (k == 0.0f) continue;
      const vec term = k == 1.0f ? in[c] : k == -1.0f ? -in[c] : k * in[c];
      acc = first ? term : acc + term;
      first = false;
    }
    out[r] = acc;
  }
}

// F(m x m, 3x3): the 1-d transforms of a patch's columns and rows, by B^T (input, a -> a), A^T (output, a -> m)
// and A (output gradient, m -> a)
template <int m>
struct Winograd;

template <>
struct Winograd<2> {
  static constexpr int a = 4;
  static constexpr int64_t tiles_per_task = 16;  // V and M of a task stay in the core's L2 cache
  static constexpr float BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
  static constexpr float A[4][2] = {{1, 0}, {1, 1}, {1, -1}, {0, -1}};
  static void input(const vec* d, vec* t) { apply(BT, d, t); }
  static void output(const vec* M, vec* y) { apply(AT, M, y); }
  static void gradient(const vec* g, vec* r) { apply(A, g, r); }
};

// B^T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
//        [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
// A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
// (points 0, 1, -1, 2, -2 and infinity), written out with their common terms shared: 12 operations for B^T
// instead of 22, 10 for A^T instead of 17
template <>
struct Winograd<4> {
  static constexpr int a = 6;
  static constexpr int64_t tiles_per_task = 12;
  static void input(const vec* d, vec* t) {
    const vec p = d[4] - 4.0f * d[2], q = d[3] - 4.0f * d[1];  // t1 = p + q, t2 = p - q
    const vec r = d[4] - d[2], s = 2.0f * (d[3] - d[1]);      // t3 = r + s, t4 = r - s
    t[0] = 4.0f * d[0] - 5.0f * d[2] + d[4];
    t[1] = p + q;
    t[2] = p - q;
    t[3] = r + s;
    t[4] = r - s;
    t[5] = 4.0f * d[1] - 5.0f * d[3] + d[5];
  }
  static void output(const vec* M, vec* y) {
    const vec sum12 = M[1] + M[2], dif12 = M[1] - M[2], sum34 = M[3] + M[4], dif34 = M[3] - M[4];
    y[0] = M[0] + sum12 + sum34;
    y[1] = dif12 + 2.0f * dif34;
    y[2] = sum12 + 4.0f * sum34;
    y[3] = dif12 + 8.0f * dif34 + M[5];
  }
  static void gradient(const vec* g, vec* r) {  // A = (A^T)^T
    const vec even = g[0] + g[2], odd = g[1] + g[3], even4 = g[0] + 4.0f * g[2], odd4 = 2.0f * g[1] + 8.0f * g[3];
    r[0] = g[0];
    r[1] = even + odd;
    r[2] = even - odd;
    r[3] = even4 + odd4;
    r[4] = even4 - odd4;
    r[5] = g[3];
  }
};

// The rows of an NHWC image (C channels) under tile (ty, tx)'s a x a input patch, null outside the image (zero
// padding). The convolution's input is H x W; with up = 1 it is the image (H/2 x W/2) upsampled x2 (nearest).
template <int m>
void patch(const float* image, int64_t H, int64_t W, int64_t C, int64_t ty, int64_t tx, int up, const float** src) {
  constexpr int a = Winograd<m>::a;
  for (int i = 0; i < a; ++i)
    for (int j = 0; j < a; ++j) {
      const int64_t iy = m * ty - 1 + i, ix = m * tx - 1 + j;
      src[a * i + j] =
          (iy >= 0 && iy < H && ix >= 0 && ix < W) ? image + ((iy >> up) * (W >> up) + (ix >> up)) * C : nullptr;
    }
}

// Prefetches the K rows at src (null: none) of C floats each into the cache. The kernels load the rows of tile
// t + kAhead while they work on tile t: a tile's patch is a x a pixels on a rows of the image, streams that the
// hardware prefetchers miss. Measured side by side in the default net: the fp32 sampling forward 1.07-1.13x
// faster (three runs; distances 1 to 6 within 2% of each other), the training step 1.05-1.07x.
constexpr int64_t kAhead = 2;
template <int K>
inline void prefetch_rows(const float* const* src, int64_t C) {
  for (int i = 0; i < K; ++i)
    if (src[i])
      for (int64_t c = 0; c < C; c += V) __builtin_prefetch(src[i] + c, 0, 3);
}

// The rows of an NHWC image (C channels) under tile (ty, tx)'s m x m outputs, null outside the image
template <int m, typename P>
void outputs(P image, int64_t H, int64_t W, int64_t C, int64_t ty, int64_t tx, P* dst) {
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < m; ++j) {
      const int64_t oy = m * ty + i, ox = m * tx + j;
      dst[m * i + j] = (oy < H && ox < W) ? image + (oy * W + ox) * C : nullptr;
    }
}

// V[p, c] = (B^T d B)[i, j] for p = a i + j, of one tile's patch d (rows src, null: zero), 16 channels at a time;
// out is the tile's [a^2, C] block
template <int m>
void input_transform(const float* const* src, int64_t C, float* out) {
  const int64_t Cp = whole(C);  // the block's channels, padded with zeros to whole vectors
  using T = Winograd<m>;
  constexpr int a = T::a;
  for (int64_t c = 0; c < Cp; c += L) {
    vec t[a][a];
    for (int j = 0; j < a; ++j) {  // B^T d, a column at a time
      vec col[a], res[a];
      for (int i = 0; i < a; ++i) col[i] = src[a * i + j] ? loadn(src[a * i + j] + c, C - c) : vec{};
      T::input(col, res);
      for (int i = 0; i < a; ++i) t[i][j] = res[i];
    }
    for (int i = 0; i < a; ++i) {  // (B^T d) B, a row at a time
      vec res[a];
      T::input(t[i], res);
      for (int j = 0; j < a; ++j) store(out + (a * i + j) * Cp + c, res[j]);
    }
  }
}

// y = A^T M A + bias (+ residual) for one tile's a^2 products M (rows [a^2, C]), into the valid ones of its
// m x m outputs (rows dst; the residual's rows at the same pixels, or null)
template <int m>
void output_transform(const float* M, int64_t C, const float* bias, float* const* dst, const float* const* residual) {
  const int64_t Cp = whole(C);  // M's channels, padded to whole vectors
  using T = Winograd<m>;
  constexpr int a = T::a;
  for (int64_t c = 0; c < Cp; c += L) {
    const int64_t n = C - c;
    vec s[m][a];
    for (int j = 0; j < a; ++j) {  // A^T M, a column at a time
      vec col[a], res[m];
      for (int i = 0; i < a; ++i) col[i] = load(M + (a * i + j) * Cp + c);
      T::output(col, res);
      for (int i = 0; i < m; ++i) s[i][j] = res[i];
    }
    const vec b = bias ? loadn(bias + c, n) : vec{};
    for (int i = 0; i < m; ++i) {  // (A^T M) A, a row at a time
      vec res[m];
      T::output(s[i], res);
      for (int j = 0; j < m; ++j) {
        float* d = dst[m * i + j];
        if (d) store_out(d + c, residual ? res[j] + b + loadn(residual[m * i + j] + c, n) : res[j] + b, n);
      }
    }
  }
}

// dM[p, c] = (A dy A^T)[i, j] for p = a i + j, of one tile's m x m output gradient dy (rows src, null outside the
// image: zero): the gradient of its a^2 products; out is the tile's [a^2, C] block. The valid dy are summed into
// dbias (each output pixel lies in one tile).
template <int m>
void output_gradient_transform(const float* const* src, int64_t C, float* out, float* dbias) {
  const int64_t Cp = whole(C);  // out's and dbias's channels, padded to whole vectors
  using T = Winograd<m>;
  constexpr int a = T::a;
  for (int64_t c = 0; c < Cp; c += L) {
    vec g[m][m], sum = {};
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < m; ++j) {
        g[i][j] = src[m * i + j] ? loadn(src[m * i + j] + c, C - c) : vec{};
        sum += g[i][j];
      }
    store(dbias + c, load(dbias + c) + sum);
    vec r[a][m];
    for (int j = 0; j < m; ++j) {  // A dy, a column at a time
      vec col[m], res[a];
      for (int i = 0; i < m; ++i) col[i] = g[i][j];
      T::gradient(col, res);
      for (int i = 0; i < a; ++i) r[i][j] = res[i];
    }
    for (int i = 0; i < a; ++i) {  // (A dy) A^T, a row at a time
      vec res[a];
      T::gradient(r[i], res);
      for (int j = 0; j < a; ++j) store(out + (a * i + j) * Cp + c, res[j]);
    }
  }
}

void check_input(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4 &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "winograd: x must be a channels_last float32 CPU tensor [N, C, H, W]");
}

template <int m>
torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& u, int64_t Cout, const float* bias,
                      int64_t bias_stride, const float* rp, int up) {
  using T = Winograd<m>;
  constexpr int a = T::a, P = a * a;
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2) << up, W = x.size(3) << up;
  const int64_t Ci = whole(Cin), Co = whole(Cout);  // the channels of V, U and M: whole vectors
  const int64_t in_pixels = x.size(2) * x.size(3);
  auto y = torch::empty({N, Cout, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t th = (H + m - 1) / m, tw = (W + m - 1) / m, tiles = th * tw, total = N * tiles;
  if (total == 0) return y;
  const int64_t runs = (total + T::tiles_per_task - 1) / T::tiles_per_task;  // of near-equal length
  const float* xp = x.data_ptr<float>();
  const float* uptr = u.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, runs, 1, [&](int64_t begin, int64_t end) {
    const int64_t most = (total + runs - 1) / runs;
    std::vector<float> vbuf(P * most * Ci), mbuf(P * most * Co);
    for (int64_t run = begin; run < end; ++run) {
      const int64_t first = run * total / runs, count = (run + 1) * total / runs - first;
      for (int64_t t = 0; t < count; ++t) {  // tile (first + t) of the batch: image n, tile row ty, column tx
        const int64_t n = (first + t) / tiles, ty = (first + t) % tiles / tw, tx = (first + t) % tw;
        const float* src[P];
        if (first + t + kAhead < total) {
          const int64_t f = first + t + kAhead;
          patch<m>(xp + f / tiles * in_pixels * Cin, H, W, Cin, f % tiles / tw, f % tw, up, src);
          prefetch_rows<P>(src, Cin);
        }
        patch<m>(xp + n * in_pixels * Cin, H, W, Cin, ty, tx, up, src);
        input_transform<m>(src, Cin, vbuf.data() + t * P * Ci);
      }
      for (int p = 0; p < P; ++p)  // M_p = V_p U_p
        gemm<false, false>(count, Co, Ci, vbuf.data() + p * Ci, P * Ci, uptr + p * Ci * Co, Co,
                           mbuf.data() + p * Co, P * Co);
      for (int64_t t = 0; t < count; ++t) {
        const int64_t n = (first + t) / tiles, ty = (first + t) % tiles / tw, tx = (first + t) % tw;
        float* dst[m * m];
        outputs<m>(yp + n * H * W * Cout, H, W, Cout, ty, tx, dst);
        const float* residual[m * m];
        if (rp && t + kAhead < count) {
          const int64_t f = first + t + kAhead;
          outputs<m>(rp + f / tiles * H * W * Cout, H, W, Cout, f % tiles / tw, f % tw, residual);
          prefetch_rows<m * m>(residual, Cout);
        }
        if (rp) outputs<m>(rp + n * H * W * Cout, H, W, Cout, ty, tx, residual);
        output_transform<m>(mbuf.data() + t * P * Co, Cout, bias ? bias + n * bias_stride : nullptr, dst,
                            rp ? residual : nullptr);
      }
    }
    stream_fence();
  });
  return y;
}

torch::Tensor conv3x3(const torch::Tensor& x, const torch::Tensor& u, const c10::optional<torch::Tensor>& bias_opt,
                      const c10::optional<torch::Tensor>& residual_opt, bool upsample, int64_t out_channels) {
  check_input(x);
  const int up = upsample ? 1 : 0;
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2) << up, W = x.size(3) << up;
  TORCH_CHECK(u.scalar_type() == at::kFloat && u.is_contiguous() && u.dim() == 3 &&
                  (u.size(0) == 16 || u.size(0) == 36) && u.size(1) == whole(Cin) && u.size(2) % V == 0,
              "winograd: transformed weights must be contiguous float32 [16 or 36, Cin, Cout], Cin = x.size(1), both "
              "padded with zeros to multiples of 16");
  const int64_t Cout = out_channels < 0 ? u.size(2) : out_channels;
  TORCH_CHECK(Cout > 0 && whole(Cout) == u.size(2), "winograd: out_channels=", out_channels,
              " does not round up to the transformed weights' ", u.size(2), " columns");
  const float* bias = nullptr;
  int64_t bias_stride = 0;
  torch::Tensor b;
  if (bias_opt.has_value() && bias_opt->defined()) {
    b = bias_opt->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && (b.sizes() == at::IntArrayRef({Cout}) ||
                                                  b.sizes() == at::IntArrayRef({N, Cout})),
                "winograd: bias must be float32 [Cout] or, one per image, [N, Cout]");
    bias = b.data_ptr<float>();
    bias_stride = b.dim() == 2 ? Cout : 0;
  }
  const float* rp = nullptr;
  if (residual_opt.has_value() && residual_opt->defined()) {
    const auto& r = *residual_opt;
    TORCH_CHECK(r.scalar_type() == at::kFloat && r.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                    r.sizes() == at::IntArrayRef({N, Cout, H, W}),
                "winograd: the residual must be a channels_last float32 tensor shaped like the output");
    rp = r.data_ptr<float>();
  }
  return u.size(0) == 16 ? forward<2>(x, u, Cout, bias, bias_stride, rp, up)
                         : forward<4>(x, u, Cout, bias, bias_stride, rp, up);
}

template <int m>
std::vector<torch::Tensor> weight_grad(const torch::Tensor& x, const torch::Tensor& dy, int up) {
  using T = Winograd<m>;
  constexpr int a = T::a, P = a * a;
  const int64_t N = x.size(0), Cin = x.size(1), H = dy.size(2), W = dy.size(3), Cout = dy.size(1);
  const int64_t Ci = whole(Cin), Co = whole(Cout);  // the channels of V, dM and dU: whole vectors
  const int64_t in_pixels = x.size(2) * x.size(3);
  const int64_t threads = at::get_num_threads();
  auto du = torch::zeros({threads, P, Ci, Co}, x.options());
  auto db = torch::zeros({threads, N, Co}, x.options());
  const int64_t th = (H + m - 1) / m, tw = (W + m - 1) / m, tiles = th * tw, total = N * tiles;
  if (total > 0) {
    const int64_t runs = (total + 2 * T::tiles_per_task - 1) / (2 * T::tiles_per_task);  // sums over more tiles
    const float* xp = x.data_ptr<float>();
    const float* gp = dy.data_ptr<float>();
    float* dup = du.data_ptr<float>();
    float* dbp = db.data_ptr<float>();
    at::parallel_for(0, runs, 1, [&](int64_t begin, int64_t end) {
      const int64_t thread = at::get_thread_num();
      TORCH_CHECK(thread < threads, "winograd: more threads than at the call's start");
      float* partial = dup + thread * P * Ci * Co;
      float* dbias = dbp + thread * N * Co;
      const int64_t most = (total + runs - 1) / runs;
      std::vector<float> vbuf(P * most * Ci), gbuf(P * most * Co);
      for (int64_t run = begin; run < end; ++run) {
        const int64_t first = run * total / runs, count = (run + 1) * total / runs - first;
        for (int64_t t = 0; t < count; ++t) {
          const int64_t n = (first + t) / tiles, ty = (first + t) % tiles / tw, tx = (first + t) % tw;
          const float* src[P];
          const float* grad[m * m];
          if (first + t + kAhead < total) {
            const int64_t f = first + t + kAhead, fy = f % tiles / tw, fx = f % tw;
            patch<m>(xp + f / tiles * in_pixels * Cin, H, W, Cin, fy, fx, up, src);
            prefetch_rows<P>(src, Cin);
            outputs<m>(gp + f / tiles * H * W * Cout, H, W, Cout, fy, fx, grad);
            prefetch_rows<m * m>(grad, Cout);
          }
          patch<m>(xp + n * in_pixels * Cin, H, W, Cin, ty, tx, up, src);
          input_transform<m>(src, Cin, vbuf.data() + t * P * Ci);
          outputs<m>(gp + n * H * W * Cout, H, W, Cout, ty, tx, grad);
          output_gradient_transform<m>(grad, Cout, gbuf.data() + t * P * Co, dbias + n * Co);
        }
        for (int p = 0; p < P; ++p)  // dU_p += V_p^T dM_p
          gemm<true, true>(Ci, Co, count, vbuf.data() + p * Ci, P * Ci, gbuf.data() + p * Co, P * Co,
                           partial + p * Ci * Co, Co);
      }
    });
  }
  return {du.sum(0).slice(1, 0, Cin).slice(2, 0, Cout).contiguous(), db.sum(0).slice(1, 0, Cout).contiguous()};
}

// The gradients of conv3x3 with respect to its transformed filters and its bias, from its input x and output
// gradient dy: (dU [a^2, Cin, Cout], dbias [N, Cout], each image's sum of dy). Each thread sums its runs of tiles
// apart.
std::vector<torch::Tensor> conv3x3_weight_grad(const torch::Tensor& x, const torch::Tensor& dy, int64_t m,
                                               bool upsample) {
  check_input(x);
  const int up = upsample ? 1 : 0;
  TORCH_CHECK(dy.scalar_type() == at::kFloat && dy.dim() == 4 && dy.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  dy.size(0) == x.size(0) && dy.size(2) == x.size(2) << up && dy.size(3) == x.size(3) << up,
              "winograd: dy must be a channels_last float32 tensor [N, Cout, H, W] with x's N, H and W (twice x's H "
              "and W with upsample)");
  TORCH_CHECK(m == 2 || m == 4, "winograd: tiles of 2x2 or 4x4 outputs, got m=", m);
  return m == 2 ? weight_grad<2>(x, dy, up) : weight_grad<4>(x, dy, up);
}

}  // namespace

void register_winograd(pybind11::module_& m) {
  m.def("winograd_conv3x3", &conv3x3,
        "3x3 convolution, stride 1, padding 1, of channels_last float32 x [N, Cin, H, W] with Winograd-transformed "
        "filters u ([16, Cin, Cout]: F(2x2, 3x3); [36, Cin, Cout]: F(4x4, 3x3)), an optional bias ([Cout], or "
        "[N, Cout]: one per image) and an optional residual to add (shaped like y): y [N, Cout, H, W] "
        "(channels_last); with upsample, of x upsampled x2 (nearest) first. Cin and Cout of u are padded with zeros "
        "to multiples of 16; out_channels is y's (by default u's)", pybind11::arg("x"), pybind11::arg("u"),
        pybind11::arg("bias") = pybind11::none(), pybind11::arg("residual") = pybind11::none(),
        pybind11::arg("upsample") = false, pybind11::arg("out_channels") = -1);
  m.def("winograd_conv3x3_weight_grad", &conv3x3_weight_grad,
        "gradients of winograd_conv3x3 with respect to its transformed filters and its bias, from x and dy "
        "(channels_last float32) and the tile size m (2 or 4): (du [(m + 2)^2, Cin, Cout], dbias [N, Cout], the "
        "bias gradient of each image); with upsample, of the convolution of x upsampled x2",
        pybind11::arg("x"), pybind11::arg("dy"), pybind11::arg("m"), pybind11::arg("upsample") = false);
}
