// 3x3 convolutions (stride 1, padding 1) on channels_last float32 CPU activations by Winograd's minimal filtering
// algorithm F(2x2, 3x3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016).
//
// Each 2x2 block of output pixels (a tile) comes from a 4x4 patch d of the input: y = A^T [(G g G^T) . (B^T d B)] A,
// where . multiplies element by element. Over the channels this is 16 independent matrix products, one per
// element of the 4x4 transformed patch: M_p[tile, co] = sum_ci V_p[tile, ci] U_p[ci, co], with 16 * Cin * Cout
// multiplications per tile against the direct convolution's 36 * Cin * Cout (2.25x fewer). The transforms
// themselves only add and subtract (B, A) or halve (G).
//
// One task is a run of tiles (of one image or, on small maps, several): its patches are transformed into V (in the core's cache, a few
// hundred KB at most), the 16 products run as register-blocked small GEMMs against the transformed weights U
// (computed once per call in Python, [16, Cin, Cout]), and each tile's four outputs are transformed back and
// written with the bias. Channels are the activations' contiguous axis (NHWC), so every step works on whole
// vectors of 16 channels; Cin and Cout must be multiples of 16.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {

typedef float v16 __attribute__((vector_size(64)));
constexpr int64_t V = 16;
constexpr int64_t MAX_TILES = 16;  // tiles per task: V and M of a task stay in the core's L2 cache

inline v16 load(const float* p) {
  v16 x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
inline void store(float* p, v16 x) { std::memcpy(p, &x, sizeof x); }

// C[R, NV * 16] = A[R, K] B[K, NV * 16] (row-major, leading dimensions lda, ldb, ldc): R rows and NV vectors of C
// stay in registers while k runs; each step loads NV vectors of B and broadcasts one element of A per row.
template <int R, int NV>
void micro(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t K) {
  v16 acc[R][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    v16 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + v * V);
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
      const float a = A[r * lda + k];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * V, acc[r][v]);
}

using Micro = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t);

// micro<R, NV> for R = 1 .. sizeof(Rs): at most 28 accumulators, so that NV loads of B and a broadcast fit the 32
// vector registers of AVX-512 beside them
template <int NV, int... Rs>
constexpr std::array<Micro, sizeof...(Rs)> table(std::integer_sequence<int, Rs...>) {
  return {&micro<Rs + 1, NV>...};
}
const auto MICRO1 = table<1>(std::make_integer_sequence<int, 24>{});
const auto MICRO2 = table<2>(std::make_integer_sequence<int, 14>{});
const auto MICRO4 = table<4>(std::make_integer_sequence<int, 6>{});

// C[M, N] = A[M, K] B[K, N], N a multiple of 16: column blocks of 4, 2 or 1 vectors; the rows split evenly into
// runs that fit the registers
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc) {
  int64_t n = 0;
  while (n < N) {
    const int64_t left = (N - n) / V;
    const int nv = left >= 4 ? 4 : left >= 2 ? 2 : 1;
    const Micro* micros = nv == 4 ? MICRO4.data() : nv == 2 ? MICRO2.data() : MICRO1.data();
    const int64_t most = nv == 4 ? MICRO4.size() : nv == 2 ? MICRO2.size() : MICRO1.size();
    const int64_t runs = (M + most - 1) / most;
    int64_t m = 0;
    for (int64_t run = 0; run < runs; ++run) {
      const int64_t rows = (M - m) / (runs - run);
      micros[rows - 1](A + m * lda, lda, B + n, ldb, C + m * ldc + n, ldc, K);
      m += rows;
    }
    n += nv * V;
  }
}

// V[t, p, c] for p = 4 i + j: (B^T d B)[i, j] of tile t's 4x4 patch d (rows of src, null where the patch leaves
// the image: zero padding), 16 channels at a time; out is tile t's [16, Cin] block
void input_transform(const float* const* src, int64_t Cin, float* out) {
  const int64_t point_stride = Cin;
  for (int64_t c = 0; c < Cin; c += V) {
    v16 d[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) d[i][j] = src[4 * i + j] ? load(src[4 * i + j] + c) : v16{};
    v16 t[4][4];
    for (int j = 0; j < 4; ++j) {  // B^T d
      t[0][j] = d[0][j] - d[2][j];
      t[1][j] = d[1][j] + d[2][j];
      t[2][j] = d[2][j] - d[1][j];
      t[3][j] = d[1][j] - d[3][j];
    }
    for (int i = 0; i < 4; ++i) {  // (B^T d) B
      float* o = out + 4 * i * point_stride + c;
      store(o, t[i][0] - t[i][2]);
      store(o + point_stride, t[i][1] + t[i][2]);
      store(o + 2 * point_stride, t[i][2] - t[i][1]);
      store(o + 3 * point_stride, t[i][1] - t[i][3]);
    }
  }
}

// y = A^T m A + bias for one tile's 16 products m (M_p rows, p = 4 i + j), into the valid ones of its 2x2 outputs
void output_transform(const float* m, int64_t Cout, const float* bias, float* const* dst) {
  const int64_t point_stride = Cout;
  for (int64_t c = 0; c < Cout; c += V) {
    v16 s[2][4];
    for (int j = 0; j < 4; ++j) {  // A^T m
      const v16 m0 = load(m + j * point_stride + c), m1 = load(m + (4 + j) * point_stride + c);
      const v16 m2 = load(m + (8 + j) * point_stride + c), m3 = load(m + (12 + j) * point_stride + c);
      s[0][j] = m0 + m1 + m2;
      s[1][j] = m1 - m2 - m3;
    }
    const v16 b = bias ? load(bias + c) : v16{};
    for (int i = 0; i < 2; ++i) {  // (A^T m) A
      if (dst[2 * i]) store(dst[2 * i] + c, s[i][0] + s[i][1] + s[i][2] + b);
      if (dst[2 * i + 1]) store(dst[2 * i + 1] + c, s[i][1] - s[i][2] - s[i][3] + b);
    }
  }
}

torch::Tensor conv3x3(const torch::Tensor& x, const torch::Tensor& u, const c10::optional<torch::Tensor>& bias_opt) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4 &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "winograd: x must be a channels_last float32 CPU tensor [N, C, H, W]");
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(u.scalar_type() == at::kFloat && u.is_contiguous() && u.dim() == 3 && u.size(0) == 16 &&
                  u.size(1) == Cin,
              "winograd: transformed weights must be contiguous float32 [16, Cin, Cout] with Cin = x.size(1)");
  const int64_t Cout = u.size(2);
  TORCH_CHECK(Cin % V == 0 && Cout % V == 0, "winograd: channel counts must be multiples of 16, got ", Cin, " -> ",
              Cout);
  const float* bias = nullptr;
  torch::Tensor b;
  if (bias_opt.has_value() && bias_opt->defined()) {
    b = bias_opt->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.numel() == Cout, "winograd: bias must be float32 [Cout]");
    bias = b.data_ptr<float>();
  }
  auto y = torch::empty({N, Cout, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (N == 0 || H == 0 || W == 0) return y;
  const int64_t th = (H + 1) / 2, tw = (W + 1) / 2, tiles = th * tw;
  const int64_t total = N * tiles, runs = (total + MAX_TILES - 1) / MAX_TILES;  // runs of near-equal length
  const float* xp = x.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, runs, 1, [&](int64_t begin, int64_t end) {
    const int64_t most = (total + runs - 1) / runs;
    std::vector<float> vbuf(16 * most * Cin), mbuf(16 * most * Cout);
    for (int64_t run = begin; run < end; ++run) {
      const int64_t first = run * total / runs, count = (run + 1) * total / runs - first;
      for (int64_t t = 0; t < count; ++t) {  // tile (first + t) of the batch: image n, tile row ty, column tx
        const int64_t n = (first + t) / tiles, ty = (first + t) % tiles / tw, tx = (first + t) % tw;
        const float* image = xp + n * H * W * Cin;
        const float* src[16];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) {
            const int64_t iy = 2 * ty - 1 + i, ix = 2 * tx - 1 + j;
            src[4 * i + j] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? image + (iy * W + ix) * Cin : nullptr;
          }
        input_transform(src, Cin, vbuf.data() + t * 16 * Cin);
      }
      for (int p = 0; p < 16; ++p)
        gemm(count, Cout, Cin, vbuf.data() + p * Cin, 16 * Cin, up + p * Cin * Cout, Cout, mbuf.data() + p * Cout,
             16 * Cout);
      for (int64_t t = 0; t < count; ++t) {
        const int64_t n = (first + t) / tiles, ty = (first + t) % tiles / tw, tx = (first + t) % tw;
        float* out = yp + n * H * W * Cout;
        float* dst[4];
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) {
            const int64_t oy = 2 * ty + i, ox = 2 * tx + j;
            dst[2 * i + j] = (oy < H && ox < W) ? out + (oy * W + ox) * Cout : nullptr;
          }
        output_transform(mbuf.data() + t * 16 * Cout, Cout, bias, dst);
      }
    }
  });
  return y;
}

}  // namespace

void register_winograd(pybind11::module_& m) {
  m.def("winograd_conv3x3", &conv3x3,
        "3x3 convolution, stride 1, padding 1, of channels_last float32 x [N, Cin, H, W] with Winograd-transformed "
        "weights u [16, Cin, Cout] and an optional bias [Cout]: y [N, Cout, H, W] (channels_last)");
}
