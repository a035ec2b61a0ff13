// Softmax self-attention over the few tokens of a U-Net's low-resolution levels (a 7x7 map is 49 tokens with
// heads of 16 channels), float32 on the CPU, forward and backward.
//
// q, k and v are read where the 1x1 projection on channels_last activations leaves them, [B, L, 3, heads, d], and
// the output is written as [B, L, heads, d], the layout the output projection reads: no transposed copies. One
// (image, head) pair is one task: its q, k and v (a few KB) are gathered into contiguous row-major and
// transposed buffers in the core's cache, and every loop runs over a contiguous axis (the tokens, or the head's
// channels) for the compiler to vectorise. The forward keeps each query's log-sum-exp; the backward recomputes
// the probabilities from it instead of storing the [L, L] matrices.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Vectors of 16 floats (GCC/Clang vector extension: one AVX-512 register, two AVX ones). Buffers are padded to
// whole vectors with zeros, so no loop has a tail.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
constexpr int64_t V = 16;

// exp(x) for x <= 0 (scores shifted by their query's maximum or log-sum-exp) on 16 lanes: 2^n P(r) with the
// Cephes expf polynomial (~1 ulp), floor through a truncating conversion, 2^n through the exponent bits. Below
// -87 it returns ~e^-87 (a probability of 1e-38).
inline v16 vexp(v16 x) {
  x = x < -87.0f ? v16{} - 87.0f : x;
  const v16 t = x * 1.44269504088896341f + 0.5f;
  v16 n = __builtin_convertvector(__builtin_convertvector(t, vi16), v16);
  n = n > t ? n - 1.0f : n;  // floor
  v16 r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  v16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline int64_t whole(int64_t n) { return (n + V - 1) / V * V; }
inline v16 load(const float* p) {
  v16 x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
inline void store(float* p, v16 x) { std::memcpy(p, &x, sizeof x); }

// C[M, N] = A[M, K] B[K, N] (TransA: A^T B, A stored [K, M]), row-major; N a multiple of 16, ldb and ldc too.
// R rows of C and NV vectors of a row at a time stay in registers while k runs, each step one load of B per
// vector and one broadcast of A per row.
template <bool TransA, int R, int NV>
inline void block(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t K) {
  v16 acc[R][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    v16 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + v * V);
    for (int r = 0; r < R; ++r) {
      const float a = TransA ? A[k * lda + r] : A[r * lda + k];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * V, acc[r][v]);
}

// The widest blocks of columns: with AVX-512 (32 registers) 4 vectors, 16 accumulators of 4 rows; elsewhere (AVX2: 16
// registers of 8 floats, two to a vector) 1 vector, 8 registers of accumulators, as wider blocks spill there (the
// default net's attention at batch 128 took 16 ms forward instead of 21, 36 backward instead of 39, on a 2-core AVX2
// EPYC; PyTorch's SDPA 10 and 20 there, so by default the attention kernel does not run on AVX2: build.py).
#if defined(__AVX512F__)
constexpr int kMaxNV = 4;
#else
constexpr int kMaxNV = 1;
#endif

template <bool TransA, int R>
inline void row_block(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t K,
                      int64_t N) {
  int64_t n = 0;
  if constexpr (kMaxNV >= 4)
    for (; n + 4 * V <= N; n += 4 * V) block<TransA, R, 4>(A, lda, B + n, ldb, C + n, ldc, K);
  if constexpr (kMaxNV >= 2)
    for (; n + 2 * V <= N; n += 2 * V) block<TransA, R, 2>(A, lda, B + n, ldb, C + n, ldc, K);
  for (; n < N; n += V) block<TransA, R, 1>(A, lda, B + n, ldb, C + n, ldc, K);
}

template <bool TransA = false>
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) {
    const float* a = TransA ? A + i : A + i * lda;
    row_block<TransA, 4>(a, lda, B, ldb, C + i * ldc, ldc, K, N);
  }
  for (; i < M; ++i) row_block<TransA, 1>(TransA ? A + i : A + i * lda, lda, B, ldb, C + i * ldc, ldc, K, N);
}

// dst[c, r] = src[r, c] for r < rows, c < cols
void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// One (image, head): L tokens, d channels; Lp and dp padded to whole vectors. The scores are kept transposed,
// st[j, i] = q_i . k_j (keys down, queries across), so that each query's softmax over the keys runs down
// columns: 16 queries per vector, no sums across a vector's lanes.
struct Head {
  int64_t L, d, Lp, dp;
  std::vector<float> q, qt, k, v, st;  // q (scaled), k, v [L, dp]; qt (scaled) [dp, Lp]; st [L, Lp]

  Head(int64_t L_, int64_t d_)
      : L(L_), d(d_), Lp(whole(L_)), dp(whole(d_)), q(L * dp), qt(dp * Lp), k(L * dp), v(L * dp), st(L * Lp) {}

  // q, k and v of token i at base + i * row (+ C for k, + 2 C for v); padding stays zero
  void gather(const float* base, int64_t row, int64_t C, float scale) {
    if (d == dp) {  // whole vectors (heads of 16, 32, ... channels)
      for (int64_t i = 0; i < L; ++i) {
        const float* t = base + i * row;
        for (int64_t e = 0; e < d; e += V) {
          store(q.data() + i * dp + e, load(t + e) * scale);
          store(k.data() + i * dp + e, load(t + C + e));
          store(v.data() + i * dp + e, load(t + 2 * C + e));
        }
      }
    } else {
      for (int64_t i = 0; i < L; ++i) {
        const float* t = base + i * row;
        for (int64_t e = 0; e < d; ++e) {
          q[i * dp + e] = t[e] * scale;
          k[i * dp + e] = t[C + e];
          v[i * dp + e] = t[2 * C + e];
        }
      }
    }
    transpose(q.data(), dp, L, d, qt.data(), Lp);
  }

  // st = k q^T, then each query's (column's) softmax over the keys in place: p^T. Padding columns come out as
  // garbage that no later product reads. lse [Lp]: each query's log-sum-exp, written, or read if given.
  void probabilities(float* lse, bool given) {
    gemm(L, Lp, d, k.data(), dp, qt.data(), Lp, st.data(), Lp);
    for (int64_t i = 0; i < Lp; i += V) {
      v16 shift;
      if (given) {
        shift = load(lse + i);
      } else {
        shift = load(st.data() + i);
        for (int64_t j = 1; j < L; ++j) {
          const v16 x = load(st.data() + j * Lp + i);
          shift = x > shift ? x : shift;
        }
      }
      v16 sum = {};
      for (int64_t j = 0; j < L; ++j) {
        const v16 e = vexp(load(st.data() + j * Lp + i) - shift);
        store(st.data() + j * Lp + i, e);
        sum += e;
      }
      if (!given) {
        const v16 inv = 1.0f / sum;
        for (int64_t j = 0; j < L; ++j) store(st.data() + j * Lp + i, load(st.data() + j * Lp + i) * inv);
        v16 l;
        for (int m = 0; m < V; ++m) l[m] = shift[m] + std::log(sum[m]);
        store(lse + i, l);
      }
    }
  }
};

std::vector<torch::Tensor> forward(const torch::Tensor& qkv, double scale_d) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.dim() == 5 && qkv.size(2) == 3 &&
                  qkv.is_contiguous(),
              "attention: qkv must be a contiguous float32 CPU tensor [B, L, 3, heads, d]");
  const int64_t B = qkv.size(0), L = qkv.size(1), H = qkv.size(3), d = qkv.size(4), C = H * d;
  TORCH_CHECK(L > 0 && d > 0, "attention: empty sequence or head");
  auto out = torch::empty({B, L, H, d}, qkv.options());
  auto lse = torch::empty({B, H, L}, qkv.options());
  const float* src = qkv.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float scale = static_cast<float>(scale_d);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Head h(L, d);
    std::vector<float> o(L * h.dp), l(h.Lp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, head = task % H;
      h.gather(src + b * L * 3 * C + head * d, 3 * C, C, scale);
      h.probabilities(l.data(), false);
      std::memcpy(lp + task * L, l.data(), L * sizeof(float));
      gemm<true>(L, h.dp, L, h.st.data(), h.Lp, h.v.data(), h.dp, o.data(), h.dp);  // o = p v
      float* dst = op + b * L * C + head * d;
      for (int64_t i = 0; i < L; ++i)
        for (int64_t e = 0; e < d; ++e) dst[i * C + e] = o[i * h.dp + e];
    }
  });
  return {out, lse};
}

torch::Tensor backward(const torch::Tensor& dout_in, const torch::Tensor& qkv, const torch::Tensor& out,
                       const torch::Tensor& lse, double scale_d) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.dim() == 5 && qkv.size(2) == 3 &&
                  qkv.is_contiguous(),
              "attention: qkv must be a contiguous float32 CPU tensor [B, L, 3, heads, d]");
  const int64_t B = qkv.size(0), L = qkv.size(1), H = qkv.size(3), d = qkv.size(4), C = H * d;
  const auto dout = dout_in.contiguous();
  TORCH_CHECK(dout.sizes() == out.sizes() && out.is_contiguous() && dout.scalar_type() == at::kFloat &&
                  out.sizes() == at::IntArrayRef({B, L, H, d}),
              "attention: dout and out must be float32 [B, L, heads, d]");
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == B * H * L, "attention: lse must be contiguous [B, heads, L]");
  auto dqkv = torch::empty_like(qkv);
  const float* src = qkv.data_ptr<float>();
  const float* dop = dout.data_ptr<float>();
  const float* op = out.data_ptr<float>();
  const float* lp = lse.data_ptr<float>();
  float* dst = dqkv.data_ptr<float>();
  const float scale = static_cast<float>(scale_d);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Head h(L, d);
    const int64_t Lp = h.Lp, dp = h.dp;
    // dO [L, dp] and dO^T [dp, Lp]; dP^T, then dS^T [L, Lp]; dq, dk, dv [L, dp]; D and lse [Lp]
    std::vector<float> dO(L * dp), dOt(dp * Lp), dPt(L * Lp), dq(L * dp), dk(L * dp), dv(L * dp), D(Lp), l(Lp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, head = task % H;
      h.gather(src + b * L * 3 * C + head * d, 3 * C, C, scale);
      const float* dorows = dop + b * L * C + head * d;
      const float* orows = op + b * L * C + head * d;
      for (int64_t i = 0; i < L; ++i) {
        float acc = 0.0f;
        for (int64_t e = 0; e < d; ++e) {
          dO[i * dp + e] = dorows[i * C + e];
          acc += dorows[i * C + e] * orows[i * C + e];
        }
        D[i] = acc;  // sum_j p_ij dp_ij = dO_i . o_i
      }
      transpose(dO.data(), dp, L, d, dOt.data(), Lp);
      std::memcpy(l.data(), lp + task * L, L * sizeof(float));
      h.probabilities(l.data(), true);                                       // p^T
      gemm(L, Lp, d, h.v.data(), dp, dOt.data(), Lp, dPt.data(), Lp);        // dP^T = v dO^T
      for (int64_t j = 0; j < L; ++j)                                        // dS^T = P^T (dP^T - D), in place
        for (int64_t i = 0; i < Lp; i += V) {
          float* g = dPt.data() + j * Lp + i;
          store(g, load(h.st.data() + j * Lp + i) * (load(g) - load(D.data() + i)));
        }
      gemm(L, dp, L, h.st.data(), Lp, dO.data(), dp, dv.data(), dp);         // dv = P^T dO
      gemm(L, dp, L, dPt.data(), Lp, h.q.data(), dp, dk.data(), dp);         // dk = dS^T (scale q)
      gemm<true>(L, dp, L, dPt.data(), Lp, h.k.data(), dp, dq.data(), dp);   // dq / scale = dS k
      float* rows = dst + b * L * 3 * C + head * d;
      for (int64_t i = 0; i < L; ++i) {
        float* t = rows + i * 3 * C;
        for (int64_t e = 0; e < d; ++e) {
          t[e] = dq[i * dp + e] * scale;
          t[C + e] = dk[i * dp + e];
          t[2 * C + e] = dv[i * dp + e];
        }
      }
    }
  });
  return dqkv;
}

}  // namespace

void register_attention(pybind11::module_& m) {
  m.def("attention_forward", &forward,
        "softmax attention of qkv [B, L, 3, heads, d] (float32, CPU): (out [B, L, heads, d], lse [B, heads, L])");
  m.def("attention_backward", &backward, "attention backward: dqkv [B, L, 3, heads, d] from (dout, qkv, out, lse)");
}
