// CPU kernels for GC ViT's fused ops (window attention, Fused-MBConv) and a few neighbours
// (Linear + exact GELU, LayerNorm + Linear).
//
// Built by gcvit_kernels/cpu.py with torch.utils.cpp_extension.load; the vector width comes from
// at::vec::Vectorized<float> under the CPU_CAPABILITY chosen there (an AVX512 build with ATen's AVX512
// flags, 16 lanes, or an AVX2 build with -mavx2 -mfma, 8 lanes, when the running CPU has it, the generic
// DEFAULT build otherwise), so a cached build never runs instructions the CPU lacks.
//
// Layouts are the ones documented in gcvit/functional.py. All arithmetic is fp32; bf16 inputs are
// widened on load and rounded on store. Every kernel is deterministic and gives bit-identical
// results for any thread count (each output element is produced by exactly one task, reductions
// run in a fixed order).

// Light headers only (per-operator ATen headers, TORCH_LIBRARY registration, no pybind11/torch.h):
// this file compiles in ~15 s instead of ~70 s with <torch/extension.h>.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <dlfcn.h>
#include <unistd.h>

#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <tuple>
#include <limits>
#include <list>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t VL = Vec::size();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// fp32 scratch from c10's allocator, 64-byte aligned (a whole AVX-512 vector load from a row start never splits a
// cache line; std::vector's 16-byte alignment split every one), zero-filled
class Scratch {
 public:
  explicit Scratch(int64_t n) : p_(static_cast<float*>(c10::alloc_cpu(std::max<int64_t>(n, 1) * sizeof(float)))) {
    std::fill(p_, p_ + n, 0.f);
  }
  ~Scratch() { c10::free_cpu(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* data() const { return p_; }

 private:
  float* p_;
};

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

// dst = (src + bias) * mul over n values (bias optional)
template <typename T>
inline void load_row(const T* src, float* dst, int64_t n, float mul, const float* bias = nullptr) {
  if (bias)
    for (int64_t i = 0; i < n; ++i) dst[i] = (static_cast<float>(src[i]) + bias[i]) * mul;
  else
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]) * mul;
}

template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// 2^x for x <= 0 (the softmax's scores in log2 units minus their row maximum; the generic build's GELU's
// -x^2 log2(e) / 2).
// x = n + r with n = round(x), |r| <= 1/2; 2^r by Cephes exp2f's degree-6 polynomial (about 1 ulp), 2^n put in
// the exponent bits (AVX2: x clamped at -126 first so n fits them; AVX-512's vscalefps needs no clamp: 1.00-1.04x).
// Below EXP2_FLUSH, -inf included, the result is 0 (a NaN stays NaN): next to the row maximum's 1 such a weight is
// invisible, padded keys get exactly 0, and the erf GELU's tail (r t 2^x, r t < 1/8) never becomes a subnormal (with
// 2^-126 there, the GELU of x < -13 was one): subnormal operands cost a microcode assist per operation on Intel
// cores, in our passes and in the MKL GEMM a GELU output feeds. (No speed change on ordinary inputs, in-process
// A/B; a synthetic case with subnormal SE gates ran its 1x1 GEMM 3x slower.)
constexpr float EXP2_FLUSH = -120.f;

// lane-wise max without NaN bookkeeping: maxps returns its 2nd operand when either is NaN (the softmax's NaN
// scores still reach the output through their exp and the row sum; exp2_nonpositive keeps a NaN x)
inline Vec max_lanes(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}

inline Vec exp2_nonpositive(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#if defined(CPU_CAPABILITY_AVX512)
  const Vec v = x;  // vscalefps takes any n, and every x below EXP2_FLUSH is masked to 0
#else
  const Vec v = max_lanes(Vec(-126.f), x);
#endif
  const Vec n = v.round();
  const Vec r = v - n;
  Vec p(1.535336188319500e-4f);
  p = at::vec::fmadd(p, r, Vec(1.339887440266574e-3f));
  p = at::vec::fmadd(p, r, Vec(9.618437357674640e-3f));
  p = at::vec::fmadd(p, r, Vec(5.550332471162809e-2f));
  p = at::vec::fmadd(p, r, Vec(2.402264791363012e-1f));
  p = at::vec::fmadd(p, r, Vec(6.931472028550421e-1f));
  p = at::vec::fmadd(p, r, Vec(1.f));
#if defined(CPU_CAPABILITY_AVX2)
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(EXP2_FLUSH), _CMP_NLT_UQ);  // x >= EXP2_FLUSH or NaN
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
#else
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP2_FLUSH), _CMP_NLT_UQ);  // x >= EXP2_FLUSH or NaN
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));  // p * 2^n in one instruction
#endif
#else
  return Vec::blendv((x * Vec(static_cast<float>(M_LN2))).exp_u20(), Vec(0.f), x < Vec(EXP2_FLUSH));
#endif
}

// 1 / d for d >= 1 (the sigmoid's 1 + e^-|z|, the generic build's erf GELU's 1 + p |x|): the approximate reciprocal
// (14 bits on AVX-512, 12 on AVX2) and one Newton step, r (2 - d r), which leaves it within an ulp or two of the
// division, whose latency sat on the erf GELU's dependency chain
inline Vec recip_ge1(const Vec& d) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 r0 = _mm512_rcp14_ps(d);
  return Vec(_mm512_mul_ps(r0, _mm512_fnmadd_ps(d, r0, _mm512_set1_ps(2.f))));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 r0 = _mm256_rcp_ps(d);
  return Vec(_mm256_mul_ps(r0, _mm256_fnmadd_ps(d, r0, _mm256_set1_ps(2.f))));
#else
  return Vec(1.f) / d;
#endif
}

// Exact-erf GELU on vectors, GELU(x) = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)): a functor a loop builds once, so
// that on AVX-512 and AVX2 its table stays in registers.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Phi from the lower tail Q(z) = Phi(-z) = erfc(z / sqrt 2) / 2 at z = |x| (Phi(x) = 1 - Q for x >= 0, Q below): on
// each of VL intervals of z < 8 (width 1/2 on AVX-512, 1 on AVX2) a polynomial of degree GELU_DEGREE in the
// interval's coordinate u in [0, 1), each coefficient picked for every lane by one permute of a register holding it
// for all intervals. AVX-512: 6 permutes and 5 FMAs, 14.5 cycles a vector against the erf formula's 22.4; AVX2: 8
// and 7, 12.1 cycles against 20.1-20.5 (hot loops, AMD EPYC Zen 4). As accurate: Q within 3.1e-8 (AVX-512) and
// 3.4e-8 (AVX2) before fp32 rounding, where the erf's error is 7.5e-8. Q = 0 from z >= 8 (Q(8) = 6e-16), so
// GELU(-inf) = -inf * 0 = NaN as the reference's; a NaN stays NaN.
constexpr int GELU_INTERVALS = VL;  // a permute picks among the vector's lanes
constexpr int GELU_DEGREE = VL == 16 ? 5 : 7;

// the coefficients, interval by interval: the polynomial through Q at the GELU_DEGREE + 1 Chebyshev nodes of the
// interval, its monomial coefficients solved for in long double
struct GeluTable {
  alignas(64) float coef[GELU_DEGREE + 1][GELU_INTERVALS];

  GeluTable() {
    constexpr int n = GELU_DEGREE + 1;
    constexpr long double width = 8.0L / GELU_INTERVALS;
    for (int i = 0; i < GELU_INTERVALS; ++i) {
      long double a[n][n + 1];  // the Vandermonde system [u_j^k | Q(z_j)]
      for (int j = 0; j < n; ++j) {
        const long double u = 0.5L - 0.5L * std::cos((2 * j + 1) * static_cast<long double>(M_PI) / (2 * n));
        long double power = 1;
        for (int k = 0; k < n; ++k, power *= u) a[j][k] = power;
        a[j][n] = std::erfc((i + u) * width / std::sqrt(2.0L)) / 2;
      }
      for (int c = 0; c < n; ++c) {  // Gauss-Jordan elimination with partial pivoting
        int pivot = c;
        for (int r = c + 1; r < n; ++r)
          if (std::fabs(a[r][c]) > std::fabs(a[pivot][c])) pivot = r;
        for (int k = 0; k <= n; ++k) std::swap(a[c][k], a[pivot][k]);
        for (int r = 0; r < n; ++r)
          if (r != c) {
            const long double f = a[r][c] / a[c][c];
            for (int k = c; k <= n; ++k) a[r][k] -= f * a[c][k];
          }
      }
      for (int k = 0; k < n; ++k) coef[k][i] = static_cast<float>(a[k][n] / a[k][k]);
    }
  }
};

class GeluVec {
 public:
  GeluVec() {
    static const GeluTable table;
    for (int k = 0; k <= GELU_DEGREE; ++k) coef_[k] = Vec::loadu(table.coef[k]);
  }

#if defined(CPU_CAPABILITY_AVX512)
  Vec operator()(const Vec& x) const {
    const __m512 z = _mm512_abs_ps(x);
    // z in interval units, its interval i (NaN: the last) and u
    const __m512 y = _mm512_min_ps(_mm512_add_ps(z, z), _mm512_set1_ps(GELU_INTERVALS - 0.5f));
    const __m512 interval = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 u = _mm512_sub_ps(y, interval);
    const __m512i i = _mm512_cvttps_epi32(interval);
    __m512 q = _mm512_permutexvar_ps(i, coef_[GELU_DEGREE]);
    for (int k = GELU_DEGREE - 1; k >= 0; --k) q = _mm512_fmadd_ps(q, u, _mm512_permutexvar_ps(i, coef_[k]));
    q = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(z, _mm512_set1_ps(8.f), _CMP_LT_OQ), q);
    const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    return Vec(_mm512_mul_ps(x, _mm512_mask_mov_ps(_mm512_sub_ps(_mm512_set1_ps(1.f), q), negative, q)));
  }
#else
  Vec operator()(const Vec& x) const {
    const __m256 z = _mm256_andnot_ps(_mm256_set1_ps(-0.f), x);
    const __m256 y = _mm256_min_ps(z, _mm256_set1_ps(GELU_INTERVALS - 0.5f));  // intervals of width 1
    const __m256 interval = _mm256_round_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m256 u = _mm256_sub_ps(y, interval);
    const __m256i i = _mm256_cvttps_epi32(interval);
    __m256 q = _mm256_permutevar8x32_ps(coef_[GELU_DEGREE], i);
    for (int k = GELU_DEGREE - 1; k >= 0; --k) q = _mm256_fmadd_ps(q, u, _mm256_permutevar8x32_ps(coef_[k], i));
    q = _mm256_and_ps(q, _mm256_cmp_ps(z, _mm256_set1_ps(8.f), _CMP_LT_OQ));
    const __m256 negative = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
    return Vec(_mm256_mul_ps(x, _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(1.f), q), q, negative)));
  }
#endif

 private:
  Vec coef_[GELU_DEGREE + 1];
};
#else
// The generic build: x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7, the
// formula ATen's own vectorised erf uses): with u = |x| / sqrt 2 and t = 1 / (1 + p u), 1 - erf(u) = poly(t) t
// exp(-u^2). The constants fold 1 / sqrt 2, the 1/2 and log2(e) (exp2_nonpositive), so h = (1 - erf(u)) / 2
// and Phi(x) = 1 - h for x >= 0, h below.
class GeluVec {
 public:
  Vec operator()(const Vec& x) const {
    const Vec one(1.0f), pc(static_cast<float>(0.3275911 * M_SQRT1_2));
    const Vec c1(0.5f * 0.254829592f), c2(0.5f * -0.284496736f), c3(0.5f * 1.421413741f), c4(0.5f * -1.453152027f),
        c5(0.5f * 1.061405429f), neg_half_log2e(static_cast<float>(-0.5 * M_LOG2E));
    const Vec t = recip_ge1(at::vec::fmadd(pc, x.abs(), one));
    const Vec r = at::vec::fmadd(at::vec::fmadd(at::vec::fmadd(at::vec::fmadd(c5, t, c4), t, c3), t, c2), t, c1);
    const Vec h = r * t * exp2_nonpositive(x * neg_half_log2e * x);
    return x * Vec::blendv(one - h, h, x < Vec(0.f));
  }
};
#endif

inline float gelu_scalar(float x) { return 0.5f * x * (1.0f + std::erf(x * static_cast<float>(M_SQRT1_2))); }

// row = gelu(row + bias) in place (bias optional), n floats
inline void bias_gelu_row(float* row, const float* bias, int64_t n) {
  const GeluVec gelu;
  int64_t j = 0;
  for (; j + VL <= n; j += VL) {
    Vec v = Vec::loadu(row + j);
    if (bias) v = v + Vec::loadu(bias + j);
    gelu(v).store(row + j);
  }
  for (; j < n; ++j) row[j] = gelu_scalar(row[j] + (bias ? bias[j] : 0.f));
}

// ------------------------------------------------------------------------------------------------
// Window attention
// ------------------------------------------------------------------------------------------------

// f(std::integral_constant<int, 0>) ... f(std::integral_constant<int, N - 1>), expanded at compile time: every index
// into a tile of accumulators is a constant, so the compiler keeps the tile in registers. With plain loops over R
// and JV, GCC kept each tile in memory as well and moved it to and from registers around every product (72 vector
// spills in the 1x1 pass's 6 x 4 tile): 1.03-1.06x the Fused-MBConv, 1.05-1.08x the attention at the 7 x 7
// windows, the same at 14 x 14 (in-process A/B, AMD EPYC Zen 4, 2 threads, 30-40 rounds; same bits). The lambdas
// given to unroll are FORCE_INLINE: left to GCC, some stayed out of line and their tiles in memory.
#define FORCE_INLINE __attribute__((always_inline))
template <typename F, int... I>
[[gnu::always_inline]] inline void unroll_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
[[gnu::always_inline]] inline void unroll(F&& f) {
  unroll_impl(f, std::make_integer_sequence<int, N>{});
}

// f(r, v) for every element of an R x JV tile, both indices compile-time constants
template <int R, int JV, typename F>
[[gnu::always_inline]] inline void unroll_tile(F&& f) {
  unroll<R>([&](auto r) FORCE_INLINE { unroll<JV>([&](auto v) FORCE_INLINE { f(r, v); }); });
}

// The register-blocked product under the attention and the 1x1 conv: acc[r][v] += sum_k a[r * lda + k] *
// b[k * ldb + v * VL] for R rows and JV vectors of columns (R up to STRIP_ROWS, JV up to MAX_BLOCK_VECS; see
// below).
template <int R, int JV>
[[gnu::always_inline]] inline void fma_block(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t depth,
                                             Vec (&acc)[R][JV]) {
  for (int64_t k = 0; k < depth; ++k) {
    Vec bv[JV];
    unroll<JV>([&](auto v) FORCE_INLINE { bv[v] = Vec::loadu(b + k * ldb + v * VL); });
    unroll<R>([&](auto r) FORCE_INLINE {
      const Vec av(a[r * lda + k]);
      unroll<JV>([&](auto v) FORCE_INLINE { acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]); });
    });
  }
}

template <int R, int JV>
[[gnu::always_inline]] inline void zero(Vec (&acc)[R][JV]) {
  unroll_tile<R, JV>([&](auto r, auto v) FORCE_INLINE { acc[r][v] = Vec(0.f); });
}

// an R x JV-vector tile from / to rows ld floats apart
template <int R, int JV>
[[gnu::always_inline]] inline void load_tile(Vec (&acc)[R][JV], const float* src, int64_t ld) {
  unroll_tile<R, JV>([&](auto r, auto v) FORCE_INLINE { acc[r][v] = Vec::loadu(src + r * ld + v * VL); });
}

template <int R, int JV>
[[gnu::always_inline]] inline void store_tile(const Vec (&acc)[R][JV], float* dst, int64_t ld) {
  unroll_tile<R, JV>([&](auto r, auto v) FORCE_INLINE { acc[r][v].store(dst + r * ld + v * VL); });
}

// f(std::integral_constant<int, JV>, first column) over nvec vectors of columns: blocks of MAX_JV (4 or 2) vectors,
// then one of each smaller power of two the rest needs
template <int MAX_JV = 2, typename F>
[[gnu::always_inline]] inline void for_column_blocks(int64_t nvec, F&& f) {
  int64_t v = 0;
  for (; v + MAX_JV <= nvec; v += MAX_JV) f(std::integral_constant<int, MAX_JV>{}, v * VL);
  if constexpr (MAX_JV == 4) {
    if (v + 2 <= nvec) {
      f(std::integral_constant<int, 2>{}, v * VL);
      v += 2;
    }
  }
  if (v < nvec) f(std::integral_constant<int, 1>{}, v * VL);
}

// rows per strip of the register-blocked products: with 2 column vectors and a broadcast, 12 accumulators fill
// the 16 AVX2 registers (the classic 6 x 16 micro-kernel). AVX-512's 32 registers would take 12 rows: measured
// 0.96-1.02x in the attention and the 1x1 pass (in-process A/B, 2 threads), so both widths use 6.
constexpr int STRIP_ROWS = 6;

// the widest column block of the attention's Q K^T and the 1x1 pass: on AVX-512, 4 vectors (24 accumulators in
// its 32 registers, each broadcast feeding 4 FMAs: 1.02-1.08x two vectors); with AVX2's 16 registers, 2 (4 spill:
// the AVX2 build measured 0.80-0.95x with 4). In-process A/B, 2 threads, results bit-identical.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int MAX_BLOCK_VECS = 4;
#else
constexpr int MAX_BLOCK_VECS = 2;
#endif

// f(std::integral_constant<int, R>) for a strip of 1 <= rows <= STRIP_ROWS rows
template <int R = STRIP_ROWS, typename F>
[[gnu::always_inline]] inline void with_rows(int64_t rows, F&& f) {
  if constexpr (R == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    if (rows >= R)
      f(std::integral_constant<int, R>{});
    else
      with_rows<R - 1>(rows, f);
  }
}

// rows [i0, i0 + rows) of S = Q Kt + bias (Q: (n, d), Kt: (d, np), bias: (n, np)) into the strip s (rows, np) and
// their maxima, taken in the same pass so the softmax needs no separate one
inline void qk_strip(const float* q, int64_t rows, int64_t d, const float* kt, int64_t np, const float* bias, float* s,
                     int64_t i0, float* row_max) {
  with_rows(rows, [&](auto rows_c) {
    constexpr int R = decltype(rows_c)::value;
    Vec rmax[R];
    unroll<R>([&](auto r) FORCE_INLINE { rmax[r] = Vec(-std::numeric_limits<float>::infinity()); });
    for_column_blocks<MAX_BLOCK_VECS>(np / VL, [&](auto jv_c, int64_t j0) {
      constexpr int JV = decltype(jv_c)::value;
      Vec acc[R][JV];
      load_tile(acc, bias + i0 * np + j0, np);  // starts from the bias: the add costs nothing
      fma_block(q + i0 * d, d, kt + j0, np, d, acc);
      store_tile(acc, s + j0, np);
      unroll_tile<R, JV>([&](auto r, auto v) FORCE_INLINE { rmax[r] = max_lanes(rmax[r], acc[r][v]); });
    });
    for (int r = 0; r < R; ++r)
      row_max[r] = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return max_lanes(a, b); }, rmax[r]);
  });
}

// rows [i0, i0 + rows) of O = P V (P: the strip's rows, (rows, np) of which the first n columns count, V: (n, dp),
// O: (n, dp))
inline void pv_strip(const float* p, int64_t np, int64_t n, const float* v, int64_t dp, float* o, int64_t i0,
                     int64_t rows) {
  with_rows(rows, [&](auto rows_c) {
    constexpr int R = decltype(rows_c)::value;
    for_column_blocks(dp / VL, [&](auto jv_c, int64_t c0) {
      constexpr int JV = decltype(jv_c)::value;
      Vec acc[R][JV];
      zero(acc);
      fma_block(p, np, v + c0, dp, n, acc);
      store_tile(acc, o + i0 * dp + c0, dp);
    });
  });
}

// bias[h, i, j] (heads, N, Np) from the table ((2wh-1)(2ww-1), heads), times log2(e) (the softmax runs in log2
// units); -inf in the padding columns.
// For a query (yi, xi) and key row yj the table rows of keys xj = 0 .. ww-1 run backwards from
// (yi - yj + wh - 1) (2ww - 1) + xi + ww - 1, so each run is a reversed slice of the head's table column.
at::Tensor build_bias(const at::Tensor& table, int64_t heads, int64_t wh, int64_t ww, int64_t np) {
  const int64_t n = wh * ww, span = 2 * ww - 1;
  auto tab = table.to(at::kFloat).t().mul(M_LOG2E).contiguous();  // (heads, rows): one head's table is contiguous
  auto bias = at::empty({heads, n, np}, tab.options());
  const int64_t rows = tab.size(1);
  const float* tp = tab.data_ptr<float>();
  float* bp = bias.data_ptr<float>();
  const float ninf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, heads * n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t hi = begin; hi < end; ++hi) {
      const int64_t h = hi / n, i = hi % n, yi = i / ww, xi = i % ww;
      const float* th = tp + h * rows;
      float* row = bp + hi * np;
      for (int64_t yj = 0; yj < wh; ++yj) {
        const float* run = th + (yi - yj + wh - 1) * span + xi + ww - 1;  // key xj reads run[-xj]
        float* dst = row + yj * ww;
        for (int64_t xj = 0; xj < ww; ++xj) dst[xj] = run[-xj];
      }
      for (int64_t j = n; j < np; ++j) row[j] = ninf;
    }
  });
  return bias;
}

// Built biases, kept by the table's contents (a hash, then an exact comparison: never a stale bias, whatever
// happened to the table in between) and the window, most recently used first, up to BIAS_CACHE_BYTES. Every
// call of the model's forward sees the same tables, so it reuses their biases instead of writing them again:
// 1.06x the attention at the 14x14 stage (1.3 MB of bias per call), 1.12-1.14x at the 7x7 stage 4 (in-process
// A/B, with the inference arena). Freed by arena_empty_cache (gcvit_kernels.cpu.arena_empty_cache).
constexpr size_t BIAS_CACHE_BYTES = 64 << 20;

class BiasCache {
 public:
  at::Tensor get(const at::Tensor& table, int64_t heads, int64_t wh, int64_t ww, int64_t np) {
    const at::Tensor key = table.to(at::kFloat).contiguous();
    const float* kp = key.data_ptr<float>();
    const size_t n = key.numel();
    uint64_t hash = 1469598103934665603ull ^ static_cast<uint64_t>((heads * 131 + wh) * 131 + ww) * 131 + np;
    const uint32_t* words = reinterpret_cast<const uint32_t*>(kp);
    for (size_t i = 0; i < n; ++i) hash = (hash ^ words[i]) * 1099511628211ull;
    {
      std::lock_guard<std::mutex> g(mutex_);
      for (auto it = entries_.begin(); it != entries_.end(); ++it)
        if (it->hash == hash && it->heads == heads && it->wh == wh && it->ww == ww && it->np == np &&
            it->table.size() == n && std::memcmp(it->table.data(), kp, n * sizeof(float)) == 0) {
          entries_.splice(entries_.begin(), entries_, it);
          return it->bias;
        }
    }
    at::Tensor bias = build_bias(key, heads, wh, ww, np);
    const size_t bytes = bias.numel() * sizeof(float) + n * sizeof(float);
    if (bytes <= BIAS_CACHE_BYTES) {
      std::lock_guard<std::mutex> g(mutex_);
      entries_.push_front({hash, heads, wh, ww, np, std::vector<float>(kp, kp + n), bias, bytes});
      bytes_ += bytes;
      while (bytes_ > BIAS_CACHE_BYTES) {
        bytes_ -= entries_.back().bytes;
        entries_.pop_back();
      }
    }
    return bias;
  }

  void clear() {
    std::lock_guard<std::mutex> g(mutex_);
    entries_.clear();
    bytes_ = 0;
  }

  int64_t bytes() {
    std::lock_guard<std::mutex> g(mutex_);
    return static_cast<int64_t>(bytes_);
  }

  static BiasCache& get_instance() {
    static BiasCache* cache = new BiasCache();  // never destroyed, like the arena its tensors may come from
    return *cache;
  }

 private:
  struct Entry {
    uint64_t hash;
    int64_t heads, wh, ww, np;
    std::vector<float> table;
    at::Tensor bias;
    size_t bytes;
  };
  std::mutex mutex_;
  std::list<Entry> entries_;
  size_t bytes_ = 0;
};

// the bias a thread's run of attention tasks keeps in L2 (about a quarter of a 1-2 MB L2)
constexpr int64_t ATTN_BIAS_L2_BYTES = 384 * 1024;

// K^T (d, np) from K's rows (np, d), in 8 x 8 register transposes (rows n .. np-1 of k are zero)
inline void transpose_keys(const float* k, int64_t np, int64_t d, float* kt) {
  const int64_t d8 = d / 8 * 8;
  for (int64_t t = 0; t < np; t += 8) {
    for (int64_t c = 0; c < d8; c += 8) at::vec::transpose_mxn<float, 8, 8>(k + t * d + c, d, kt + c * np + t, np);
    if (d8 < d) at::vec::transpose_mxn<float>(k + t * d + d8, d, kt + d8 * np + t, np, 8, static_cast<int>(d - d8));
  }
}

// One task = one window and a group of heads [h0, h1); tasks run group-major, so a thread's consecutive tasks
// share their heads and those heads' bias (N x Np each) stays in L2 (all heads' bias, 1.3 MB at the 14x14 stage,
// did not: reading it cost a fifth of the kernel there). Groups hold as many heads as fit ATTN_BIAS_L2_BYTES,
// fewer when there are too few windows to keep every thread busy. Each token's qkv slice for the group is read
// once, contiguously; the next task's slices are prefetched while this one computes. Every (window, head)
// result is computed by the same arithmetic whatever the grouping, so results do not depend on the thread count.
template <typename T>
void attn_fwd_impl(const at::Tensor& qkv, const at::Tensor& bias, const at::Tensor* gq, int64_t heads, int64_t wh,
                   int64_t ww, float scale, const float* qkv_bias, at::Tensor& out, float* lsep) {
  const int64_t B = qkv.size(0), H = qkv.size(1), W = qkv.size(2);
  const int64_t S = gq ? 2 : 3;
  const int64_t C = qkv.size(3) / S;
  const int64_t d = C / heads;
  const int64_t n = wh * ww;
  const int64_t np = round_up(n, VL);
  const int64_t dp = round_up(d, VL);
  const int64_t nwy = H / wh, nwx = W / ww, nwin = nwy * nwx;
  const int64_t nw_total = B * nwin;
  const int64_t G = gq ? gq->size(0) : 1;
  const int64_t per_g = nw_total / G;
  const int64_t sB = qkv.stride(0), sH = qkv.stride(1), sW = qkv.stride(2);
  const T* base = qkv.data_ptr<T>();
  const T* gbase = gq ? gq->data_ptr<T>() : nullptr;
  const float* biasp = bias.data_ptr<float>();
  T* outp = out.data_ptr<T>();
  const int64_t nthreads = at::get_num_threads();
  const int64_t bias_bytes = n * np * static_cast<int64_t>(sizeof(float));
  int64_t groups = std::max<int64_t>(1, std::min<int64_t>(heads, (heads * bias_bytes + ATTN_BIAS_L2_BYTES - 1) / ATTN_BIAS_L2_BYTES));
  if (nw_total * groups < 4 * nthreads) groups = std::min<int64_t>(heads, (4 * nthreads + nw_total - 1) / nw_total);
  const int64_t hpg = (heads + groups - 1) / groups;  // heads per group
  // the qkv projection's bias, added as q, k, v are loaded (the global query has none)
  const float* qbias = qkv_bias && !gq ? qkv_bias : nullptr;
  const float* kbias = qkv_bias ? qkv_bias + (S - 2) * C : nullptr;
  const float* vbias = qkv_bias ? qkv_bias + (S - 1) * C : nullptr;

  auto token_ptr = [&](int64_t w, int64_t t) {
    const int64_t b = w / nwin, r = w % nwin, wy = r / nwx, wx = r % nwx;
    const int64_t y = wy * wh + t / ww, x = wx * ww + t % ww;
    return base + b * sB + y * sH + x * sW;
  };

  at::parallel_for(0, nw_total * groups, 1, [&](int64_t begin, int64_t end) {
    Scratch qbuf(hpg * n * d + VL), kbuf(hpg * np * d), ktbuf(hpg * d * np), vbuf(hpg * n * dp), sbuf(STRIP_ROWS * np),
        obuf(n * dp), invbuf(n);
    float* sb = sbuf.data();
    float* ob = obuf.data();
    float* invp = invbuf.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t w = task % nw_total, grp = task / nw_total;
      const int64_t h0 = grp * hpg, h1 = std::min(heads, h0 + hpg);
      if (h0 >= h1) continue;
      const int64_t b = w / nwin, r = w % nwin, wy = r / nwx, wx = r % nwx;
      // pack Q (scaled), K^T, V of heads [h0, h1)
      for (int64_t t = 0; t < n; ++t) {
        const T* px = token_ptr(w, t);
        const T* qrow = gq ? gbase + ((w / per_g) * n + t) * C : px;
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t hl = h - h0;
          load_row(qrow + h * d, qbuf.data() + (hl * n + t) * d, d, scale, qbias ? qbias + h * d : nullptr);
          load_row(px + (S - 2) * C + h * d, kbuf.data() + (hl * np + t) * d, d, 1.f, kbias ? kbias + h * d : nullptr);
          load_row(px + (S - 1) * C + h * d, vbuf.data() + (hl * n + t) * dp, d, 1.f, vbias ? vbias + h * d : nullptr);
        }
      }
      for (int64_t hl = 0; hl < h1 - h0; ++hl) transpose_keys(kbuf.data() + hl * np * d, np, d, ktbuf.data() + hl * d * np);
      // the next task's qkv slices are prefetched a few tokens per strip while this one computes: issued in one
      // burst before the compute, they stalled it (spread out: 1.03-1.10x the burst, in-process A/B, 2 threads)
      const bool pf = task + 1 < end;
      const int64_t wn = (task + 1) % nw_total, hn0 = (task + 1) / nw_total * hpg, hn1 = std::min(heads, hn0 + hpg);
      const int64_t slice_bytes = (hn1 - hn0) * d * static_cast<int64_t>(sizeof(T));
      const int64_t strips = (n + STRIP_ROWS - 1) / STRIP_ROWS;
      const int64_t pf_per_strip = (n + (h1 - h0) * strips - 1) / ((h1 - h0) * strips);
      int64_t pf_next = 0;
      for (int64_t h = h0; h < h1; ++h) {
        const int64_t hl = h - h0;
        const float* qb = qbuf.data() + hl * n * d;
        const float* ktb = ktbuf.data() + hl * d * np;
        const float* vb = vbuf.data() + hl * n * dp;
        // strips of score rows: scores, softmax and P V while the strip is in L1
        for (int64_t i0 = 0; i0 < n; i0 += STRIP_ROWS) {
          const int64_t rows = std::min<int64_t>(STRIP_ROWS, n - i0);
          float row_max[STRIP_ROWS];
          qk_strip(qb, rows, d, ktb, np, biasp + h * n * np, sb, i0, row_max);
          for (int64_t k = 0; pf && k < pf_per_strip && pf_next < n; ++k, ++pf_next) {
            const T* px = token_ptr(wn, pf_next);
            for (int64_t part = 0; part < S; ++part) {
              const char* p = reinterpret_cast<const char*>(px + part * C + hn0 * d);
              for (int64_t off = 0; off < slice_bytes; off += 64) __builtin_prefetch(p + off, 0, 1);
            }
          }
          // softmax rows (unnormalised) in log2 units, keep 1/sum for the output
          for (int64_t ii = i0; ii < i0 + rows; ++ii) {
            float* row = sb + (ii - i0) * np;
            const float m = row_max[ii - i0];
            const Vec mv(m);
            Vec vsum(0.f);
            for (int64_t j = 0; j < np; j += VL) {
              const Vec e = exp2_nonpositive(Vec::loadu(row + j) - mv);
              e.store(row + j);
              vsum = vsum + e;
            }
            const float ssum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& c) { return a + c; }, vsum);
            invp[ii] = 1.f / ssum;
            if (lsep) lsep[(w * heads + h) * n + ii] = (m + std::log2(ssum)) * static_cast<float>(M_LN2);
          }
          pv_strip(sb, np, n, vb, dp, ob, i0, rows);
        }
        for (int64_t t = 0; t < n; ++t) {
          const int64_t y = wy * wh + t / ww, x = wx * ww + t % ww;
          T* op = outp + ((b * H + y) * W + x) * C + h * d;
          const float sc = invp[t];
          const float* orow = ob + t * dp;
          for (int64_t k = 0; k < d; ++k) op[k] = static_cast<T>(orow[k] * sc);
        }
      }
    }
  });
}

// out (B, H, W, C) and, with need_lse, the softmax's log-sum-exp (windows, heads, N) for the backward. qkv_bias
// (S*C float32, fp32 qkv only), when given, is the qkv projection's bias, not yet in qkv: the kernel adds it as it
// loads q, k and v, so the projection runs as a plain GEMM (inference: no bias copy into the output first).
std::tuple<at::Tensor, at::Tensor> window_attention_fwd(const at::Tensor& qkv, const at::Tensor& table,
                                             const c10::optional<at::Tensor>& global_query, int64_t heads,
                                             int64_t wh, int64_t ww, double scale,
                                             const c10::optional<at::Tensor>& qkv_bias, bool need_lse) {
  TORCH_CHECK(qkv.device().is_cpu(), "gcvit cpu window_attention_fwd: qkv must be a CPU tensor");
  TORCH_CHECK(qkv.dim() == 4, "gcvit cpu window_attention_fwd: qkv must be (B, H, W, S*C), got ", qkv.sizes());
  TORCH_CHECK(qkv.stride(3) == 1, "gcvit cpu window_attention_fwd: qkv's last dim must have stride 1");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16,
              "gcvit cpu window_attention_fwd: dtype must be float32 or bfloat16, got ", qkv.scalar_type());
  TORCH_CHECK(heads > 0 && wh > 0 && ww > 0, "gcvit cpu window_attention_fwd: bad num_heads/window");
  const bool global = global_query.has_value() && global_query->defined();
  const int64_t S = global ? 2 : 3;
  TORCH_CHECK(qkv.size(3) % (S * heads) == 0, "gcvit cpu window_attention_fwd: last dim ", qkv.size(3),
              " not divisible by S*heads = ", S * heads);
  TORCH_CHECK(qkv.size(1) % wh == 0 && qkv.size(2) % ww == 0, "gcvit cpu window_attention_fwd: map ",
              qkv.size(1), "x", qkv.size(2), " not divisible by window ", wh, "x", ww);
  const int64_t C = qkv.size(3) / S;
  const int64_t n = wh * ww;
  TORCH_CHECK(table.dim() == 2 && table.size(0) == (2 * wh - 1) * (2 * ww - 1) && table.size(1) == heads,
              "gcvit cpu window_attention_fwd: rel_pos_bias_table must be (", (2 * wh - 1) * (2 * ww - 1), ", ",
              heads, "), got ", table.sizes());
  const int64_t T = qkv.size(0) * (qkv.size(1) / wh) * (qkv.size(2) / ww);
  at::Tensor gq;
  if (global) {
    gq = global_query->contiguous();
    TORCH_CHECK(gq.scalar_type() == qkv.scalar_type(), "gcvit cpu window_attention_fwd: global_query dtype");
    TORCH_CHECK(gq.numel() % (n * C) == 0 && gq.size(0) * n * C == gq.numel() && gq.size(0) > 0,
                "gcvit cpu window_attention_fwd: global_query must be (G, wh, ww, C) or (G, N, C), got ",
                gq.sizes());
    TORCH_CHECK(T % gq.size(0) == 0, "gcvit cpu window_attention_fwd: ", T, " windows not divisible by G = ",
                gq.size(0));
  }
  const bool with_bias = qkv_bias.has_value() && qkv_bias->defined();
  if (with_bias)
    TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv_bias->scalar_type() == at::kFloat && qkv_bias->dim() == 1 &&
                    qkv_bias->size(0) == S * C && qkv_bias->is_contiguous(),
                "gcvit cpu window_attention_fwd: qkv_bias must be a contiguous float32 (", S * C,
                ") with float32 qkv, got ", qkv_bias->scalar_type(), " ", qkv_bias->sizes());
  auto out = at::empty({qkv.size(0), qkv.size(1), qkv.size(2), C}, qkv.options());
  auto lse = at::empty({need_lse ? T : 0, heads, n}, qkv.options().dtype(at::kFloat));
  if (qkv.numel() == 0 || T == 0) return {out, lse};
  const float* qb = with_bias ? qkv_bias->data_ptr<float>() : nullptr;
  float* lsep = need_lse ? lse.data_ptr<float>() : nullptr;
  const int64_t np = round_up(n, VL);
  auto bias = BiasCache::get_instance().get(table, heads, wh, ww, np);
  const float sc = static_cast<float>(scale * M_LOG2E);  // scores in log2 units, like the bias
  if (qkv.scalar_type() == at::kFloat)
    attn_fwd_impl<float>(qkv, bias, global ? &gq : nullptr, heads, wh, ww, sc, qb, out, lsep);
  else
    attn_fwd_impl<c10::BFloat16>(qkv, bias, global ? &gq : nullptr, heads, wh, ww, sc, qb, out, lsep);
  return {out, lse};
}

// ------------------------------------------------------------------------------------------------
// GEMMs, y = x @ W^T with W (n, k) as nn.Linear stores it, row-major: through MKL's BLAS sgemm, or through
// oneDNN's matmul (ATen's at::native::mkldnn_matmul, the oneDNN inside libtorch). Both are looked up at run time
// in the libraries torch has loaded, so the extension loads without either.
// MKL runs its AVX-512 kernels only on Intel CPUs: on an AMD EPYC (Zen 5, AVX-512) its sgemm ran gcvit_tiny's
// GEMMs at 112-185 GFLOP/s and oneDNN's at 194-352 (2 threads, fp32, every Linear shape of the model at batch 8;
// on the Intel Xeon MKL measured 204-356). So the default is MKL on Intel CPUs and oneDNN on others; the
// gcvit_cpu::set_gemm_backend op (GCVIT_CPU_GEMM=blas|onednn) forces one. Each backend sums in its own fixed
// order, the same for any thread count (checked by the thread-count tests).
// ------------------------------------------------------------------------------------------------

// Fortran BLAS sgemm, looked up at run time in the libraries torch has loaded (MKL or OpenBLAS export it), so
// the extension never fails to load over it; without it the MLP takes its two-GEMM path.
using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);

// y (rows, n) = x (rows, k) @ W^T with W (n, k), row-major with leading dims ldx / ldy, on the calling thread
// (inside a parallel region MKL runs single-threaded). Column-major BLAS computes y^T = W x^T. The integer
// arguments live in 64-bit slots: on a little-endian CPU a 32-bit (LP64) and a 64-bit (ILP64) BLAS read the
// same small values from them.
inline void blas_gemm_rows(SgemmFn sgemm, const float* x, int64_t ldx, const float* w, int64_t rows, int64_t n,
                           int64_t k, float* y, int64_t ldy) {
  static_assert(std::endian::native == std::endian::little, "the BLAS integer slots assume little-endian");
  const int64_t m_ = n, n_ = rows, k_ = k, lda = k, ldb = ldx, ldc = ldy;
  auto i = [](const int64_t& v) { return reinterpret_cast<const int*>(&v); };
  const float one = 1.f, zero = 0.f;
  sgemm("T", "N", i(m_), i(n_), i(k_), &one, w, i(lda), x, i(ldb), &zero, y, i(ldc));
}

// The symbol, checked once on a small product with a known answer (a wrong BLAS is turned off, never used)
SgemmFn blas_sgemm() {
  static const SgemmFn fn = []() -> SgemmFn {
    auto candidate = reinterpret_cast<SgemmFn>(dlsym(RTLD_DEFAULT, "sgemm_"));
    if (!candidate) return nullptr;
    const float x[6] = {1, 2, 3, 4, 5, 6};           // (2, 3)
    const float w[6] = {1, 0, -1, 2, 1, 0};          // (2, 3)
    float y[4] = {0, 0, 0, 0};                       // x @ w^T = [[-2, 4], [-2, 13]]
    blas_gemm_rows(candidate, x, 3, w, 2, 2, 3, y, 2);
    const bool ok = y[0] == -2.f && y[1] == 4.f && y[2] == -2.f && y[3] == 13.f;
    return ok ? candidate : nullptr;
  }();
  return fn;
}

using MkldnnMatmulFn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, float, float);

// at::native::mkldnn_matmul(mat1, mat2, result, beta, alpha): result = beta result + alpha mat1 @ mat2 (fp32 in,
// fp32 accumulation: torch.backends.mkldnn's default fp32 precision), checked once like the BLAS symbol
MkldnnMatmulFn onednn_matmul() {
  static const MkldnnMatmulFn fn = []() -> MkldnnMatmulFn {
    auto candidate =
        reinterpret_cast<MkldnnMatmulFn>(dlsym(RTLD_DEFAULT, "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff"));
    if (!candidate) return nullptr;
    try {
      float x[6] = {1, 2, 3, 4, 5, 6}, w[6] = {1, 0, -1, 2, 1, 0}, y[4] = {0, 0, 0, 0};  // as blas_sgemm's check
      const auto opts = at::TensorOptions().dtype(at::kFloat);
      candidate(at::from_blob(x, {2, 3}, opts), at::from_blob(w, {2, 3}, opts).t(), at::from_blob(y, {2, 2}, opts), 0.f,
                1.f);
      return y[0] == -2.f && y[1] == 4.f && y[2] == -2.f && y[3] == 13.f ? candidate : nullptr;
    } catch (const std::exception&) {  // a torch without MKLDNN raises
      return nullptr;
    }
  }();
  return fn;
}

// mkldnn::_linear_pointwise (what inductor's CPU freezing calls): oneDNN's inner product on plain weights, 1.06-1.14x
// the matmul primitive of mkldnn_matmul at every Linear shape of gcvit_tiny (fp32, batch 8, 2 threads, AMD EPYC);
// it allocates its output, so it serves the GEMMs that produce a new tensor
using LinearPointwiseOp = c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                              const std::optional<at::Tensor>&, c10::string_view,
                                                              c10::List<std::optional<at::Scalar>>,
                                                              std::optional<c10::string_view>)>;

const LinearPointwiseOp* onednn_linear_op() {
  static const std::optional<LinearPointwiseOp> op = []() -> std::optional<LinearPointwiseOp> {
    try {
      auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
      if (!handle) return std::nullopt;
      return handle->typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                      c10::string_view, c10::List<std::optional<at::Scalar>>,
                                      std::optional<c10::string_view>)>();
    } catch (const std::exception&) {  // another schema in this torch
      return std::nullopt;
    }
  }();
  return op ? &*op : nullptr;
}

enum class GemmBackend : int { blas = 0, onednn = 1 };

// (x86 only: elsewhere MKL is absent and ATen's BLAS is what torch.mm runs)
bool intel_cpu() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return intel;
#else
  return false;
#endif
}

GemmBackend default_gemm_backend() {
  if (!intel_cpu() && onednn_matmul()) return GemmBackend::onednn;
  return GemmBackend::blas;
}

std::atomic<int>& gemm_backend_slot() {
  static std::atomic<int> slot{static_cast<int>(default_gemm_backend())};
  return slot;
}

GemmBackend gemm_backend() { return static_cast<GemmBackend>(gemm_backend_slot().load(std::memory_order_relaxed)); }

std::string gemm_backend_name() { return gemm_backend() == GemmBackend::onednn ? "onednn" : "blas"; }

void set_gemm_backend(c10::string_view name) {
  if (name == "blas") {
    TORCH_CHECK(blas_sgemm(), "gcvit cpu set_gemm_backend: no BLAS sgemm_ in the loaded libraries");
    gemm_backend_slot() = static_cast<int>(GemmBackend::blas);
  } else if (name == "onednn") {
    TORCH_CHECK(onednn_matmul(), "gcvit cpu set_gemm_backend: torch has no oneDNN matmul (at::native::mkldnn_matmul)");
    gemm_backend_slot() = static_cast<int>(GemmBackend::onednn);
  } else {
    TORCH_CHECK(false, "gcvit cpu set_gemm_backend: 'blas' or 'onednn' expected, got '", name, "'");
  }
}

// y (M, N) = beta y + x (M, K) @ w (N, K)^T, beta 0 or 1 (bf16 takes ATen's mm); multi-threaded at the top level,
// single-threaded inside a parallel region (MKL and oneDNN both run nested calls on the calling thread)
void gemm_nt(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, float beta = 0.f) {
  if (gemm_backend() == GemmBackend::onednn && x.scalar_type() == at::kFloat)
    onednn_matmul()(x, w.t(), y, beta, 1.f);
  else if (beta == 0.f)
    at::mm_out(y, x, w.t());
  else
    at::addmm_out(y, y, x, w.t());
}

// result (B, M, N) = beta result + mat1 (B, M, K) @ mat2 (B, K, N), beta 0 or 1 (bf16 takes ATen's baddbmm)
void bmm_into(const at::Tensor& mat1, const at::Tensor& mat2, at::Tensor& result, float beta) {
  if (gemm_backend() == GemmBackend::onednn && mat1.scalar_type() == at::kFloat)
    onednn_matmul()(mat1, mat2, result, beta, 1.f);
  else
    at::baddbmm_out(result, result, mat1, mat2, beta, 1.f);
}

// the same on raw rows: y (rows, n) = x (rows, k) @ W^T with leading dims ldx / ldy, on the calling thread
inline void gemm_rows(const float* x, int64_t ldx, const float* w, int64_t rows, int64_t n, int64_t k, float* y,
                      int64_t ldy) {
  if (gemm_backend() == GemmBackend::onednn) {
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    at::Tensor xt = at::from_blob(const_cast<float*>(x), {rows, k}, {ldx, 1}, opts);
    at::Tensor wt = at::from_blob(const_cast<float*>(w), {n, k}, opts);
    at::Tensor yt = at::from_blob(y, {rows, n}, {ldy, 1}, opts);
    onednn_matmul()(xt, wt.t(), yt, 0.f, 1.f);
  } else {
    blas_gemm_rows(blas_sgemm(), x, ldx, w, rows, n, k, y, ldy);
  }
}

// ------------------------------------------------------------------------------------------------
// Register-tiled GEMM on packed weights: out (rows, N) = init + a (rows, K) @ (W * gate)^T with W (N, K) as
// nn.Linear stores it (gate: a per-input-channel scale, or none), by fma_block. W is packed as K-major panels, one
// per column block of the product (up to MAX_BLOCK_VECS vectors of output columns), so a block's weight loads are
// contiguous. It runs the Fused-MBConv's 1x1 conv and, on the oneDNN backend, the Linear layers with small weights.
// ------------------------------------------------------------------------------------------------

// f(g, r0, r1) over rows [0, rows) of each of groups of them, split evenly over the threads to within a strip of
// STRIP_ROWS rows: each thread takes one contiguous run of the (group, strip) units, group-major, handed to f in
// runs within one group. (Tasks of 48 rows would split 196 rows 144 : 52 over two threads; this split measured
// 1.34x those on a 196 x 256 x 768 GEMM, 1.02x at 1568 rows, the same elsewhere; op A/B, AMD EPYC Zen 4.)
template <typename F>
void for_strip_runs(int64_t groups, int64_t rows, const F& f) {
  const int64_t strips = (rows + STRIP_ROWS - 1) / STRIP_ROWS;
  at::parallel_for(0, groups * strips, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1;) {
      const int64_t g = u / strips, s0 = u % strips, s1 = std::min(strips, s0 + (u1 - u));
      f(g, s0 * STRIP_ROWS, std::min(rows, s1 * STRIP_ROWS));
      u += s1 - s0;
    }
  });
}

// the panels of a packed weight with N output columns, as (first column, width) pairs
inline std::vector<std::pair<int64_t, int64_t>> weight_panels(int64_t N) {
  std::vector<std::pair<int64_t, int64_t>> panels;
  for_column_blocks<MAX_BLOCK_VECS>(N / VL,
                                    [&](auto jv_c, int64_t j0) { panels.emplace_back(j0, decltype(jv_c)::value * VL); });
  return panels;
}

#if defined(CPU_CAPABILITY_AVX512)
// dst[i, j] = src[j, i] (times scale[i] when scale is given) for a 16 x 16 block, in registers with every step
// inlined: ATen's transpose_mxn takes the block's size at run time and ran 2.3x slower (261 against 112 cycles a
// block, and 294 against 150 at 512 x 512, hot; single thread, AMD EPYC Zen 4). The unpack / shuffle network of
// ATen's transpose_block.
[[gnu::always_inline]] inline void transpose_16x16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst,
                                                   const float* scale) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; ++i) {  // interleave 32-bit elements
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // then 64-bit pairs
    const __m512d t0 = _mm512_castps_pd(t[4 * i]), t1 = _mm512_castps_pd(t[4 * i + 1]),
                  t2 = _mm512_castps_pd(t[4 * i + 2]), t3 = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int i = 0; i < 2; ++i)  // then 128-bit lanes, twice
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0x88);
      t[8 * i + j + 4] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + j + 4], 0xdd);
    }
  for (int i = 0; i < 16; ++i) {
    __m512 row = i < 8 ? _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88) : _mm512_shuffle_f32x4(t[i - 8], t[i], 0xdd);
    if (scale) row = _mm512_mul_ps(row, _mm512_set1_ps(scale[i]));
    _mm512_storeu_ps(dst + i * ld_dst, row);
  }
}
#endif

// dst[i, j] = src[j, i] (times scale[i] when scale is given) for a VL x VL block
inline void transpose_block(const float* src, int64_t ld_src, float* dst, int64_t ld_dst,
                            const float* scale = nullptr) {
#if defined(CPU_CAPABILITY_AVX512)
  transpose_16x16(src, ld_src, dst, ld_dst, scale);
#else
  at::vec::transpose_mxn<float, VL, VL>(src, ld_src, dst, ld_dst);
  if (scale)
    for (int64_t i = 0; i < VL; ++i) (Vec::loadu(dst + i * ld_dst) * Vec(scale[i])).store(dst + i * ld_dst);
#endif
}

// panel (j0, width) of packed: (w * gate)[j0 + jj, k] at j0 * K + k * width + jj (w: (N, K) contiguous)
// (VL x VL register transposes, the gate on each transposed row; the same products as one at a time)
inline void pack_panel(const float* w, const float* gate, int64_t K, float* packed, int64_t j0, int64_t width) {
  float* panel = packed + j0 * K;
  const int64_t kv = K / VL * VL;
  for (int64_t jj = 0; jj < width; jj += VL)
    for (int64_t k = 0; k < kv; k += VL)
      transpose_block(w + (j0 + jj) * K + k, K, panel + k * width + jj, width, gate ? gate + k : nullptr);
  for (int64_t k = kv; k < K; ++k)
    for (int64_t jj = 0; jj < width; ++jj) panel[k * width + jj] = w[(j0 + jj) * K + k] * (gate ? gate[k] : 1.f);
}

inline void pack_weight(const float* w, const float* gate, int64_t N, int64_t K, float* packed) {
  for (const auto& [j0, width] : weight_panels(N)) pack_panel(w, gate, K, packed, j0, width);
}

// ungated weights w (N, K) into packed, every panel of every weight a task of one parallel loop
struct PackJob {
  const float* w;
  int64_t N, K;
  float* packed;
};

inline void pack_weights_parallel(const std::vector<PackJob>& jobs) {
  std::vector<std::pair<const PackJob*, std::pair<int64_t, int64_t>>> tasks;
  for (const PackJob& job : jobs)
    for (const auto& panel : weight_panels(job.N)) tasks.emplace_back(&job, panel);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const PackJob& job = *tasks[t].first;
      pack_panel(job.w, nullptr, job.K, job.packed, tasks[t].second.first, tasks[t].second.second);
    }
  });
}

// fma_block, prefetching the lines of the tile after this one (next_rows rows of JV vectors, ld floats apart: of
// next_out for writing, then of next_init unless it is null), one every few k so their misses overlap the FMAs.
// The same sums in the same order as fma_block.
template <int R, int JV>
[[gnu::always_inline]] inline void fma_block_prefetching(const float* a, int64_t lda, const float* b, int64_t ldb,
                                                        int64_t depth, Vec (&acc)[R][JV], float* next_out,
                                                        const float* next_init, int64_t next_rows, int64_t ld) {
  const int64_t lines = next_rows * JV, total = next_init ? 2 * lines : lines;
  const int64_t step = std::max<int64_t>(1, depth / std::max<int64_t>(total, 1));
  int64_t k = 0;
  for (int64_t l = 0; l < total && k < depth; ++l, k += step) {
    fma_block(a + k, lda, b + k * ldb, ldb, std::min(step, depth - k), acc);
    const int64_t line = l < lines ? l : l - lines, off = line / JV * ld + line % JV * VL;
    if (l < lines)
      __builtin_prefetch(next_out + off, 1, 3);
    else
      __builtin_prefetch(next_init + off, 0, 3);
  }
  if (k < depth) fma_block(a + k, lda, b + k * ldb, ldb, depth - k, acc);
}

// Frozen weights: while a frozen_weights scope is entered (gcvit_kernels.cpu.frozen_weights), a weight packed
// straight from the caller's tensor is kept with that tensor and its version counter, and later calls with the same
// unchanged weight (the same storage, offset, shape and data pointer, and no in-place change since: the version)
// take the kept panels instead of packing again (a model's forwards then pack each weight once: gcvit_tiny
// batch 1 1.14x, batch 8 1.05x, in-process A/B, AMD EPYC Zen 4). Writes that bypass the version counter
// (param.data, numpy views) are the scope's contract not to make. Inference tensors, which have no version
// counter, and copies made for the call are never kept. The outermost scope's exit drops every entry.
class FrozenWeights {
 public:
  static FrozenWeights& get() {
    static FrozenWeights* cache = new FrozenWeights();  // never destroyed, like the arena
    return *cache;
  }

  void enter() {
    std::lock_guard<std::mutex> g(mutex_);
    ++depth_;
  }

  void exit() {
    std::lock_guard<std::mutex> g(mutex_);
    if (depth_ > 0 && --depth_ == 0) {
      entries_.clear();
      bytes_ = 0;
    }
  }

  int64_t bytes() {
    std::lock_guard<std::mutex> g(mutex_);
    return static_cast<int64_t>(bytes_);
  }

  // the kept panels of w (contiguous fp32 (N, K)), or an undefined tensor
  at::Tensor find(const at::Tensor& w) {
    std::lock_guard<std::mutex> g(mutex_);
    if (depth_ == 0 || !trackable(w)) return {};
    auto it = entries_.find(key(w));
    if (it == entries_.end() || it->second.version != version(w) || it->second.weight.data_ptr() != w.data_ptr())
      return {};
    return it->second.packed;
  }

  // keeps packed for w, when w is trackable and the caller's own tensor (original: the tensor the caller was
  // given, of which w is a view, not a copy)
  void keep(const at::Tensor& w, const at::Tensor& original, const at::Tensor& packed) {
    std::lock_guard<std::mutex> g(mutex_);
    if (depth_ == 0 || !trackable(w) || !w.storage().is_alias_of(original.storage())) return;
    // (a replaced entry has the same shape, so the same bytes)
    if (entries_.insert_or_assign(key(w), Entry{w, version(w), packed}).second)
      bytes_ += packed.numel() * sizeof(float);
  }

 private:
  using Key = std::tuple<const void*, int64_t, int64_t, int64_t>;
  struct KeyHash {
    size_t operator()(const Key& k) const {
      return std::hash<const void*>()(std::get<0>(k)) ^ (std::get<1>(k) * 1000003) ^ (std::get<2>(k) << 20) ^
             std::get<3>(k);
    }
  };
  struct Entry {
    at::Tensor weight;  // holds the storage, so no other tensor can take its address while kept
    uint32_t version;
    at::Tensor packed;
  };

  static bool trackable(const at::Tensor& w) { return !w.is_inference(); }
  static uint32_t version(const at::Tensor& w) { return w.unsafeGetTensorImpl()->version_counter().current_version(); }
  static Key key(const at::Tensor& w) {
    return {w.storage().unsafeGetStorageImpl(), w.storage_offset(), w.size(0), w.size(1)};
  }

  std::mutex mutex_;
  int depth_ = 0;
  std::unordered_map<Key, Entry, KeyHash> entries_;
  size_t bytes_ = 0;
};

// The panels of each contiguous fp32 weight (N, K) (pairs of the weight and the tensor the caller was given, of
// which it may be a view): the frozen ones kept, the others packed in one parallel loop (and kept while frozen)
std::vector<at::Tensor> packed_weights(std::initializer_list<std::pair<at::Tensor, at::Tensor>> weights) {
  std::vector<at::Tensor> packed;
  std::vector<bool> fresh;
  std::vector<PackJob> jobs;
  for (const auto& [w, original] : weights) {
    at::Tensor p = FrozenWeights::get().find(w);
    fresh.push_back(!p.defined());
    if (fresh.back()) {
      p = at::empty({w.numel()}, w.options());
      jobs.push_back({w.data_ptr<float>(), w.size(0), w.size(1), p.data_ptr<float>()});
    }
    packed.push_back(p);
  }
  if (jobs.empty()) return packed;
  pack_weights_parallel(jobs);
  size_t i = 0;
  for (const auto& [w, original] : weights) {
    if (fresh[i]) FrozenWeights::get().keep(w, original, packed[i]);
    ++i;
  }
  return packed;
}

// out = init + a @ packed^T for rows consecutive rows (a: K floats each, init and out: N floats each, or ldo apart
// when it is given; init null: zero), on the calling thread. PrefetchNext: each tile prefetches the out and init
// lines of the tile one strip below it, for an out that is not in cache (tile_gemm's Linear layers 1.21x at
// 25088 x 64 x {192, 256}, 1.10x at 6272 x 128 x 512, 1.03x at 392 x 512 x 2048, 0.99-1.01x at 1568 rows; the
// Fused-MBConv's 1x1 pass 1.02-1.09x the op at 14^2-112^2, measured before its per-image path moved to an L1 strip
// (below), which leaves the prefetch to its step-by-step path; the MLP's blocks, whose hidden rows are in L2
// already, 0.97-0.98x; op A/B, 40-60 rounds, AMD EPYC Zen 4, 2 threads, same bits). AVX-512 only
// (PREFETCH_NEXT_TILE).
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool PREFETCH_NEXT_TILE = true;
#else  // AVX2's 6 x 2-vector tiles: 0.92x the Fused-MBConv at 56^2 x 64 and 14^2 x 128, 1.06x at 28^2 x 128
constexpr bool PREFETCH_NEXT_TILE = false;
#endif

template <bool PrefetchNext = false>
inline void tile_rows(const float* a, int64_t K, const float* packed, int64_t N, const float* init, float* out,
                      int64_t rows, int64_t ldo = 0) {
  if (ldo == 0) ldo = N;
  for (int64_t p = 0; p < rows; p += STRIP_ROWS) {
    with_rows(std::min<int64_t>(STRIP_ROWS, rows - p), [&](auto rows_c) {
      constexpr int R = decltype(rows_c)::value;
      for_column_blocks<MAX_BLOCK_VECS>(N / VL, [&](auto jv_c, int64_t j0) {
        constexpr int JV = decltype(jv_c)::value;
        Vec acc[R][JV];
        if (init)
          load_tile(acc, init + p * ldo + j0, ldo);  // starts from init: the add costs nothing
        else
          zero(acc);
        if constexpr (PrefetchNext && PREFETCH_NEXT_TILE) {
          const int64_t q = p + R, next_rows = std::max<int64_t>(0, std::min<int64_t>(STRIP_ROWS, rows - q));
          fma_block_prefetching(a + p * K, K, packed + j0 * K, JV * VL, K, acc, out + q * ldo + j0,
                                init ? init + q * ldo + j0 : nullptr, next_rows, ldo);
        } else {
          fma_block(a + p * K, K, packed + j0 * K, JV * VL, K, acc);
        }
        store_tile(acc, out + p * ldo + j0, ldo);
      });
    });
  }
}

// whether our tiled GEMMs replace the backend's where measured faster: on the oneDNN backend of AVX-512 builds,
// and in AVX2 builds on CPUs other than Intel's. (There oneDNN's matmul refuses an AVX2-only CPU, so MKL's sgemm
// runs: single-threaded 81-93 GFLOP/s where our 6 x 2-vector tiles ran 90-98 at 1568 x 256 x 256, 392 x 512 x 512 and
// 6272 x 128 x 512; gcvit_tiny fused 1.04x / 1.07x at batch 8, 1.12x at batch 1; model A/B, 12-30 rounds, an AMD
// EPYC showing AVX2 only. 4 x 3- and 5 x 2-vector tiles measured 0.96-1.03x the 6 x 2. On oneDNN the AVX2 tile
// measured 0.99x at 7^2 x 512; MKL on Intel AVX2 CPUs is unmeasured and kept.)
bool tiled_gemm_pays() {
#if defined(CPU_CAPABILITY_AVX512)
  return gemm_backend() == GemmBackend::onednn;
#elif defined(CPU_CAPABILITY_AVX2)
  return !intel_cpu();
#else
  return false;
#endif
}

// Packed weights up to this size stream from a core's L2 once per strip of rows; larger ones are split into
// column groups of at most this size (a quarter of a 1 MB L2 left to the strips of a and out)
constexpr int64_t TILE_GROUP_MAX_WEIGHT_BYTES = 768 * 1024;

// out (M, N) = init (M, N) + a (M, K) @ W^T (init null: zero) for W (N, K) as nn.Linear stores it, N a whole number
// of vectors (w: contiguous fp32, a view of given or a copy of it); multi-threaded. W is packed (in parallel over
// panels; packed_weights: kept while frozen), then tile_rows runs over for_strip_runs of
// column groups: contiguous runs of panels of up to TILE_GROUP_MAX_WEIGHT_BYTES, group-major, so a thread's run
// streams one group's weights from its L2 instead of all of them per strip (7^2 x 512, 1 MB in two groups:
// 1.04-1.08x oneDNN's inner product; 1536 x 512, 3 MB in four: 1.03-1.05x; AMD EPYC Zen 4, 2 threads, 30-40
// rounds, two runs). Every element is the same sum in the same order whatever the split.
void tile_gemm(const float* a, int64_t M, const at::Tensor& w, const at::Tensor& given, const float* init,
               float* out) {
  const int64_t N = w.size(0), K = w.size(1);
  const at::Tensor packed = packed_weights({{w, given}})[0];
  const float* pk = packed.data_ptr<float>();
  const auto panels = weight_panels(N);
  const int64_t np = static_cast<int64_t>(panels.size());
  const int64_t bytes = N * K * static_cast<int64_t>(sizeof(float));
  const int64_t groups = std::min<int64_t>(np, (bytes + TILE_GROUP_MAX_WEIGHT_BYTES - 1) / TILE_GROUP_MAX_WEIGHT_BYTES);
  for_strip_runs(groups, M, [&](int64_t g, int64_t r0, int64_t r1) {
    const auto& first = panels[np * g / groups];
    const auto& last = panels[np * (g + 1) / groups - 1];
    const int64_t c0 = first.first, width = last.first + last.second - c0;
    tile_rows<true>(a + r0 * K, K, pk + c0 * K, width, init ? init + r0 * N + c0 : nullptr, out + r0 * N + c0, r1 - r0,
                    N);
  });
}

// ------------------------------------------------------------------------------------------------
// Fused-MBConv: t = gelu(dwconv3x3(x)) with per-image channel sums, in one pass over x.
// ------------------------------------------------------------------------------------------------

// NCHW: one task per (b, c) plane; the plane is copied into a zero-padded fp32 tile.
template <typename T>
void dw_gelu_pool_nchw(const at::Tensor& x, const at::Tensor& w9, at::Tensor& t, at::Tensor& sums) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const T* xp = x.data_ptr<T>();
  T* tp = t.data_ptr<T>();
  const float* wp = w9.data_ptr<float>();  // (C, 9)
  float* sp = sums.data_ptr<float>();      // (B, C)
  const int64_t Wp = W + 2 + VL;           // padded row (+VL slack for full-vector loads)
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    const GeluVec gelu;
    std::vector<float> pad((H + 2) * Wp, 0.f), orow(round_up(W, VL));
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t c = bc % C;
      const T* plane = xp + bc * H * W;
      for (int64_t y = 0; y < H; ++y) load_row(plane + y * W, pad.data() + (y + 1) * Wp + 1, W, 1.f);
      const float* wc = wp + c * 9;
      Vec wv[9];
      for (int k = 0; k < 9; ++k) wv[k] = Vec(wc[k]);
      Vec vsum(0.f);
      float tail_sum = 0.f;
      const int64_t Wv = W / VL * VL;
      for (int64_t y = 0; y < H; ++y) {
        const float* r0 = pad.data() + y * Wp;
        const float* r1 = r0 + Wp;
        const float* r2 = r1 + Wp;
        T* trow = tp + bc * H * W + y * W;
        for (int64_t x0 = 0; x0 < W; x0 += VL) {
          Vec a = wv[0] * Vec::loadu(r0 + x0);
          a = at::vec::fmadd(wv[1], Vec::loadu(r0 + x0 + 1), a);
          a = at::vec::fmadd(wv[2], Vec::loadu(r0 + x0 + 2), a);
          a = at::vec::fmadd(wv[3], Vec::loadu(r1 + x0), a);
          a = at::vec::fmadd(wv[4], Vec::loadu(r1 + x0 + 1), a);
          a = at::vec::fmadd(wv[5], Vec::loadu(r1 + x0 + 2), a);
          a = at::vec::fmadd(wv[6], Vec::loadu(r2 + x0), a);
          a = at::vec::fmadd(wv[7], Vec::loadu(r2 + x0 + 1), a);
          a = at::vec::fmadd(wv[8], Vec::loadu(r2 + x0 + 2), a);
          a = gelu(a);
          if (x0 < Wv) {
            if constexpr (std::is_same_v<T, float>) {
              a.store(trow + x0);
              vsum = vsum + a;
            } else {
              a.store(orow.data() + x0);
              vsum = vsum + Vec::loadu(orow.data() + x0);
              store_row(orow.data() + x0, trow + x0, VL);
            }
          } else {
            a.store(orow.data() + x0);
            for (int64_t k = 0; k < W - x0; ++k) tail_sum += orow[x0 + k];
            store_row(orow.data() + x0, trow + x0, W - x0);
          }
        }
      }
      const float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum) + tail_sum;
      sp[bc] = s;
    }
  });
}

// Rows of up to this size take the GELU in a second pass over the row while it is in L1: its vectors are
// independent, so their long dependency chains overlap four at a time. Measured with the erf formula (reciprocal,
// polynomial, exp2), over the one-pass row with a division (Fused-MBConv, in-process A/B, AMD EPYC, 2 threads, 60
// rounds, two runs): 1.06-1.12x at 28^2 x 128, 1.02-1.09x at 56^2 x 64, 1.15-1.59x (noisy) at 14^2 x 256,
// 1.01-1.04x at 14^2 x 128 and 7^2 x 512; the 28 KB rows of 112^2 x 64 measured 0.92x split, so they keep the
// GELU in the dw pass. With the AVX-512 table GELU never splitting measured 0.99-1.01x (op A/B, AMD EPYC Zen 4),
// so the rule stays. Both orders give the same bits.
constexpr int64_t DW_GELU_SPLIT_MAX_ROW_BYTES = 16 * 1024;

// row = gelu(row) for W pixels of C floats and the row's channel sums into row_sums (each summed over x in order)
inline void gelu_sum_row(float* row, int64_t W, int64_t C, float* row_sums) {
  const GeluVec gelu;
  for (int64_t c0 = 0; c0 < C; c0 += VL) {
    Vec sum(0.f);
    int64_t xx = 0;
    for (; xx + 4 <= W; xx += 4) {
      float* p = row + xx * C + c0;
      const Vec g0 = gelu(Vec::loadu(p)), g1 = gelu(Vec::loadu(p + C)), g2 = gelu(Vec::loadu(p + 2 * C)),
                g3 = gelu(Vec::loadu(p + 3 * C));
      g0.store(p);
      g1.store(p + C);
      g2.store(p + 2 * C);
      g3.store(p + 3 * C);
      sum = sum + g0;
      sum = sum + g1;
      sum = sum + g2;
      sum = sum + g3;
    }
    for (; xx < W; ++xx) {
      float* p = row + xx * C + c0;
      const Vec g = gelu(Vec::loadu(p));
      g.store(p);
      sum = sum + g;
    }
    sum.store(row_sums + c0);
  }
}

// Row (b, y) of t = gelu(dwconv3x3(x)) for an fp32 channels_last map with C a whole number of vectors (w9t:
// (9, C)), into trow (W, C), and the row's channel sums into row_sums (C). One channel vector at a time, its nine
// weights in registers, sliding along the row: each pixel loads only its right-hand column of the (up to) three
// input rows and reuses the two it shares with the pixel before; the rows above and below the map are left out at
// compile time (Top / Bottom), so the loop holds no branch but the row's first and last pixel. Each kernel row is
// one FMA chain, the three summed; the same products and sums as before, so the same bits.
// next_row (row y + 2 of x, null past the map), which the next row's pass is the first to read, is prefetched into
// L2 a line per pixel and channel vector as this row computes: its loads had stalled the pass at C = 64 (1.086x the
// op at 112^2 x 64, 1.026x at 56^2 x 64, 0.995-1.004x elsewhere; AVX2 build 1.046x, 1.02x, 0.99-1.01x; op A/B, 150-200
// rounds, AMD EPYC Zen 4, same bits). Prefetching the next channel vector's lines of the same rows, or the next
// output row for writing, measured 1.00x.
template <bool Top, bool Bottom, bool Split>
inline void dw_row_channels(const float* const (&rowp)[3], const float* wp, int64_t W, int64_t C, float* trow,
                            float* row_sums, const float* next_row) {
  constexpr bool present[3] = {Top, true, Bottom};
  const GeluVec gelu;
  for (int64_t c0 = 0; c0 < C; c0 += VL) {
    Vec wv[9];
    for (int k = 0; k < 9; ++k) wv[k] = Vec::loadu(wp + k * C + c0);
    Vec left[3], mid[3], right[3];
    for (int ky = 0; ky < 3; ++ky)
      if (present[ky]) mid[ky] = Vec::loadu(rowp[ky] + c0);
    Vec vs(0.f);
    for (int64_t xx = 0; xx < W; ++xx) {
      const bool has_left = xx > 0, has_right = xx + 1 < W;
      Vec a[3];
      for (int ky = 0; ky < 3; ++ky) {
        a[ky] = Vec(0.f);
        if (!present[ky]) continue;
        if (has_right) right[ky] = Vec::loadu(rowp[ky] + (xx + 1) * C + c0);
        if (has_left) a[ky] = wv[ky * 3] * left[ky];
        a[ky] = at::vec::fmadd(wv[ky * 3 + 1], mid[ky], a[ky]);
        if (has_right) a[ky] = at::vec::fmadd(wv[ky * 3 + 2], right[ky], a[ky]);
        left[ky] = mid[ky];
        if (has_right) mid[ky] = right[ky];
      }
      if (next_row) __builtin_prefetch(next_row + xx * C + c0, 0, 2);
      const Vec conv = a[0] + a[1] + a[2];
      if constexpr (Split) {
        conv.store(trow + xx * C + c0);
      } else {
        const Vec g = gelu(conv);
        vs = vs + g;
        g.store(trow + xx * C + c0);
      }
    }
    if constexpr (!Split) vs.store(row_sums + c0);
  }
}

inline void dw_gelu_row_nhwc(const float* xp, const float* wp, int64_t H, int64_t W, int64_t C, int64_t b, int64_t y,
                             float* trow, float* row_sums) {
  const bool split = W * C * static_cast<int64_t>(sizeof(float)) <= DW_GELU_SPLIT_MAX_ROW_BYTES;
  const float* rowp[3];
  for (int64_t ky = 0; ky < 3; ++ky) {
    const int64_t yy = y + ky - 1;
    rowp[ky] = (yy < 0 || yy >= H) ? nullptr : xp + ((b * H + yy) * W) * C;
  }
  const float* next_row = y + 2 < H ? xp + ((b * H + y + 2) * W) * C : nullptr;
  // each case its own loop: the split one holds no GELU table, so all nine weights stay in registers (three were
  // reloaded every pixel: 1.033x the op at 7^2 x 512, 1.038x at 112^2 x 64, 1.003-1.014x elsewhere; same bits)
  auto run = [&](auto top, auto bottom) {
    if (split)
      dw_row_channels<top, bottom, true>(rowp, wp, W, C, trow, row_sums, next_row);
    else
      dw_row_channels<top, bottom, false>(rowp, wp, W, C, trow, row_sums, next_row);
  };
  const bool top = rowp[0] != nullptr, bottom = rowp[2] != nullptr;
  if (top && bottom)
    run(std::true_type{}, std::true_type{});
  else if (top)
    run(std::true_type{}, std::false_type{});
  else if (bottom)
    run(std::false_type{}, std::true_type{});
  else
    run(std::false_type{}, std::false_type{});
  if (split) gelu_sum_row(trow, W, C, row_sums);
}

// channels_last: one task per (b, y) row, vectorised over channels; row sums to a (B, H, C) buffer
// which is reduced over H in a fixed order afterwards. w9t is (9, Cp), zero-padded to a whole vector.
template <typename T>
void dw_gelu_pool_nhwc(const at::Tensor& x, const at::Tensor& w9t, at::Tensor& t, at::Tensor& sums) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cp = round_up(C, VL);
  const T* xp = x.data_ptr<T>();  // memory (B, H, W, C)
  T* tp = t.data_ptr<T>();
  const float* wp = w9t.data_ptr<float>();
  auto rows = at::empty({B, H, C}, x.options().dtype(at::kFloat));
  float* rp = rows.data_ptr<float>();
  const int64_t Wp = W + 2;
  if constexpr (std::is_same_v<T, float>) {
    if (Cp == C) {
      // fp32 with whole vectors of channels: taps read straight from x, results straight into t
      at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        for (int64_t by = begin; by < end; ++by)
          dw_gelu_row_nhwc(xp, wp, H, W, C, by / H, by % H, tp + by * W * C, rp + by * C);
      });
      sums.copy_(rows.sum(1));
      return;
    }
  }
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const GeluVec gelu;
    std::vector<float> in(3 * Wp * Cp, 0.f), acc(W * Cp), rsum(Cp);
    for (int64_t by = begin; by < end; ++by) {
      const int64_t b = by / H, y = by % H;
      // three zero-padded input rows in fp32, (3, W + 2, Cp)
      for (int64_t ky = 0; ky < 3; ++ky) {
        const int64_t yy = y + ky - 1;
        float* dst = in.data() + ky * Wp * Cp;
        if (yy < 0 || yy >= H) {
          std::fill(dst, dst + Wp * Cp, 0.f);
          continue;
        }
        const T* src = xp + ((b * H + yy) * W) * C;
        if (Cp == C && std::is_same_v<T, float>) {
          std::copy(src, src + W * C, dst + Cp);
        } else {
          for (int64_t xx = 0; xx < W; ++xx) load_row(src + xx * C, dst + (xx + 1) * Cp, C, 1.f);
        }
      }
      // channel vector outer (9 weight vectors stay in registers), pixels inner
      for (int64_t c = 0; c < Cp; c += VL) {
        Vec wv[9];
        for (int k = 0; k < 9; ++k) wv[k] = Vec::loadu(wp + k * Cp + c);
        Vec vs(0.f);
        const float* i0 = in.data() + c;
        const float* i1 = i0 + Wp * Cp;
        const float* i2 = i1 + Wp * Cp;
        for (int64_t xx = 0; xx < W; ++xx) {
          const int64_t o = xx * Cp;
          Vec a = wv[0] * Vec::loadu(i0 + o);
          a = at::vec::fmadd(wv[1], Vec::loadu(i0 + o + Cp), a);
          a = at::vec::fmadd(wv[2], Vec::loadu(i0 + o + 2 * Cp), a);
          a = at::vec::fmadd(wv[3], Vec::loadu(i1 + o), a);
          a = at::vec::fmadd(wv[4], Vec::loadu(i1 + o + Cp), a);
          a = at::vec::fmadd(wv[5], Vec::loadu(i1 + o + 2 * Cp), a);
          a = at::vec::fmadd(wv[6], Vec::loadu(i2 + o), a);
          a = at::vec::fmadd(wv[7], Vec::loadu(i2 + o + Cp), a);
          a = at::vec::fmadd(wv[8], Vec::loadu(i2 + o + 2 * Cp), a);
          a = gelu(a);  // padded lanes: zero weights, gelu(0) = 0
          vs = vs + a;
          a.store(acc.data() + o + c);
        }
        vs.store(rsum.data() + c);
      }
      T* trow = tp + ((b * H + y) * W) * C;
      if (Cp == C) {
        if constexpr (std::is_same_v<T, float>) {
          std::copy(acc.begin(), acc.begin() + W * C, trow);
        } else {
          store_row(acc.data(), trow, W * C);
        }
      } else {
        for (int64_t xx = 0; xx < W; ++xx) store_row(acc.data() + xx * Cp, trow + xx * C, C);
      }
      std::copy(rsum.begin(), rsum.begin() + C, rp + by * C);
    }
  });
  sums.copy_(rows.sum(1));
}

// The gated 1x1 conv with its residual in one pass, fp32 channels_last (pixels x C rows, C a whole number of
// vectors): out[b, p, :] = x[b, p, :] + t[b, p, :] @ (pw * gate[b])^T by tile_rows, the accumulators starting from the
// residual so out is written once (MKL's baddbmm, used for bf16 and ragged C, copies x into out and runs a beta = 1
// GEMM over it). 1.10-1.14x the baddbmm path at 28^2 and 14^2 with C = 64 / 128, the same at 56^2 and 112^2 (batch
// 8, 2 threads).

// t[p, :] *= gate for npix rows of C floats
inline void gate_rows(float* t, const float* gate, int64_t npix, int64_t C) {
  for (int64_t p = 0; p < npix; ++p)
    for (int64_t c = 0; c < C; c += VL) (Vec::loadu(t + p * C + c) * Vec::loadu(gate + c)).store(t + p * C + c);
}

// out[i] = m[i, :] . v for rows rows of n floats (m row-major): VL rows at a time, each its own vector accumulator
// (independent FMA chains; one dot at a time waited on every FMA), the accumulators' lanes summed through a
// VL x VL transpose, then each row's tail of n % VL products. A block's missing rows repeat its last row, unstored.
inline void gemv_rows(const float* m, int64_t rows, int64_t n, const float* v, float* out) {
  const int64_t nv = n / VL * VL;
  alignas(64) float lanes[VL * VL];
  alignas(64) float columns[VL * VL];
  for (int64_t i0 = 0; i0 < rows; i0 += VL) {
    const int64_t nr = std::min<int64_t>(VL, rows - i0);
    const float* row[VL];
    for (int r = 0; r < VL; ++r) row[r] = m + (i0 + std::min<int64_t>(r, nr - 1)) * n;
    Vec acc[VL];
    for (int r = 0; r < VL; ++r) acc[r] = Vec(0.f);
    for (int64_t k = 0; k < nv; k += VL) {
      const Vec vk = Vec::loadu(v + k);
      for (int r = 0; r < VL; ++r) acc[r] = at::vec::fmadd(Vec::loadu(row[r] + k), vk, acc[r]);
    }
    for (int r = 0; r < VL; ++r) acc[r].store(lanes + r * VL);
    transpose_block(lanes, VL, columns, VL);
    Vec total = Vec::loadu(columns);
    for (int l = 1; l < VL; ++l) total = total + Vec::loadu(columns + l * VL);
    total.store(lanes);
    for (int64_t r = 0; r < nr; ++r) {
      float tail = 0.f;
      for (int64_t k = nv; k < n; ++k) tail += row[r][k] * v[k];
      out[i0 + r] = lanes[r] + tail;
    }
  }
}

// sigmoid(z) = 1 / (1 + e^-z) for z >= 0 and e^z / (1 + e^z) below, from u = e^-|z| (never overflows; 1 + u >= 1)
inline Vec sigmoid_vec(const Vec& z) {
  const Vec u = exp2_nonpositive(z.abs() * Vec(static_cast<float>(-M_LOG2E)));
  const Vec s = recip_ge1(Vec(1.f) + u);
  return Vec::blendv(s, u * s, z < Vec(0.f));
}

// One image's Squeeze-Excite gate from its channel sums of t: gate = sigmoid(W2 gelu(W1 sums / HW)), W1 (R, C),
// W2 (C, R) row-major; hidden is R floats of scratch. Vectorised throughout (the scalar dots and exp / erf took
// 4% of the Fused-MBConv at 7^2 x 512, 0.065 ms a thread)
inline void se_gate(const float* sums, int64_t HW, const float* w1, const float* w2, int64_t R, int64_t C,
                    float* hidden, float* gate) {
  const float inv_hw = 1.f / static_cast<float>(HW);
  gemv_rows(w1, R, C, sums, hidden);
  const GeluVec gelu;
  int64_t r = 0;
  for (; r + VL <= R; r += VL) gelu(Vec::loadu(hidden + r) * Vec(inv_hw)).store(hidden + r);
  for (; r < R; ++r) hidden[r] = gelu_scalar(hidden[r] * inv_hw);
  gemv_rows(w2, C, R, hidden, gate);
  int64_t c = 0;
  for (; c + VL <= C; c += VL) sigmoid_vec(Vec::loadu(gate + c)).store(gate + c);
  for (; c < C; ++c) gate[c] = 1.f / (1.f + std::exp(-gate[c]));
}

// One image's channel sums of t from its rows' sums (H, C), added in row order
inline void sum_rows(const float* rows, int64_t H, int64_t C, float* sums) {
  std::copy(rows, rows + C, sums);
  for (int64_t y = 1; y < H; ++y)
    for (int64_t c = 0; c < C; ++c) sums[c] += rows[y * C + c];
}

// a core's L2 in bytes (sysconf; 1 MiB when the system does not say)
int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? static_cast<int64_t>(v) : int64_t(1) << 20;
  }();
  return bytes;
}

// The 1x1 pass streams its packed weights through once per strip of pixels: with one weight for all images (the
// gate in t) up to this size. Beyond it (C = 512: 1 MB), the gated t of every image goes through one GEMM:
// tile_gemm where tiled_gemm_pays, which keeps each thread's half of the weights in its L2 and starts from
// the residual (1.06-1.09x oneDNN's matmul over a copy of x at 7^2 x 512, AMD EPYC Zen 4, 2 threads, op A/B);
// otherwise MKL's (our pass with the rows split measured 0.90x MKL's addmm at C = 512 on the Xeon).
constexpr size_t PW_SHARED_MAX_BYTES = 512 * 1024;

// The fp32 channels_last Fused-MBConv with C a whole number of vectors. The gate goes into the 1x1 weights, packed
// per image, or, on maps with H W < C, into t (C H W per image instead of C^2), with the weights packed once (or,
// beyond PW_SHARED_MAX_BYTES, one GEMM over every image's gated t, see above).
// When there is an image per thread and an image's t fits a core's L2, each task runs one image through
// every step (dw + GELU rows, channel sums, gate, 1x1 + residual): t, its sums and the weights never leave the
// core (1.18-1.33x the step-by-step order at 28^2 and 14^2, 1.08x at 56^2 x 64 with a 2 MB L2; in-process A/B,
// batch 8, 2 threads). Otherwise each step runs over all images (rows of the map,
// then pixel chunks). Both run the same arithmetic on every element, so the choice never changes a bit.
at::Tensor mbconv_nhwc_fp32(const at::Tensor& x, const at::Tensor& w9t, const at::Tensor& w1, const at::Tensor& w2,
                            const at::Tensor& pw, const at::Tensor& pw_given) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W, R = w1.size(0);
  const bool gate_t = HW < C;
  // weights too large for our pass (C = 512: 1 MB) take one GEMM over all pixels after the gated t
  const bool pw_gemm = gate_t && static_cast<size_t>(C * C) * sizeof(float) > PW_SHARED_MAX_BYTES;
  const bool pw_tiled = pw_gemm && tiled_gemm_pays();
  const float* xp = x.data_ptr<float>();  // memory (B, H, W, C)
  const float* wp = w9t.data_ptr<float>();
  const float* w1p = w1.data_ptr<float>();
  const float* w2p = w2.data_ptr<float>();
  const float* pwp = pw.data_ptr<float>();
  at::Tensor out = at::empty_like(x, x.options(), at::MemoryFormat::ChannelsLast);
  float* op = out.data_ptr<float>();
  // an image's t within L2: its x, read twice, comes from L3 (t alone: 1.06-1.09x x and t at 56^2 x 64 with a
  // 1 MB L2 and 32 MB L3, AMD EPYC, op A/B, 40 rounds)
  const int64_t t_bytes = HW * C * static_cast<int64_t>(sizeof(float));
  const bool per_image = B >= at::get_num_threads() && t_bytes <= l2_cache_bytes();
  // every image's t: for the GEMM over all of them, or for the step-by-step order
  at::Tensor t = at::empty({pw_gemm || !per_image ? B * HW * C : 0}, x.options());
  float* tp = t.data_ptr<float>();
  // the 1x1 conv of the pixels at off (npix of them) once their t is gated, unless one GEMM runs after (then
  // only the residual, for its beta = 1, unless the GEMM starts from it)
  auto pointwise = [&](const float* t_rows, const float* weights, int64_t off, int64_t npix) {
    if (!pw_gemm)
      tile_rows<true>(t_rows, C, weights, C, xp + off, op + off, npix);
    else if (!pw_tiled)
      std::memcpy(op + off, xp + off, npix * C * sizeof(float));
  };
  auto gemm_all = [&] {
    if (pw_tiled) {
      tile_gemm(tp, B * HW, pw, pw_given, xp, op);
    } else {
      at::Tensor out_rows = out.permute({0, 2, 3, 1}).view({B * HW, C});
      gemm_nt(t.view({B * HW, C}), pw, out_rows, 1.f);
    }
  };
  // the ungated weights, packed (kept while frozen)
  const at::Tensor shared = gate_t && !pw_gemm ? packed_weights({{pw, pw_given}})[0] : at::Tensor();
  const float* shp = shared.defined() ? shared.data_ptr<float>() : nullptr;
  if (per_image) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      Scratch strip(STRIP_ROWS * C), rows(H * C), sums(C), hidden(R), gate(C), packed(gate_t ? 0 : C * C);
      for (int64_t b = b0; b < b1; ++b) {
        // t lives in the image's out rows until the 1x1 pass overwrites them strip by strip through an L1 strip
        // (one image-sized buffer fewer in L2: 1.03-1.05x at 28^2 x 128, 0.995-1.04x elsewhere; op A/B, 60-80
        // rounds, AMD EPYC Zen 4)
        float* tb = pw_gemm ? tp + b * HW * C : op + b * HW * C;
        for (int64_t y = 0; y < H; ++y) dw_gelu_row_nhwc(xp, wp, H, W, C, b, y, tb + y * W * C, rows.data() + y * C);
        sum_rows(rows.data(), H, C, sums.data());
        se_gate(sums.data(), HW, w1p, w2p, R, C, hidden.data(), gate.data());
        if (gate_t)
          gate_rows(tb, gate.data(), HW, C);
        else
          pack_weight(pwp, gate.data(), C, C, packed.data());
        if (pw_gemm) {
          pointwise(tb, nullptr, b * HW * C, HW);
          continue;
        }
        const float* weights = gate_t ? shp : packed.data();
        for (int64_t p = 0; p < HW; p += STRIP_ROWS) {
          const int64_t n = std::min<int64_t>(STRIP_ROWS, HW - p), off = (b * HW + p) * C;
          tile_rows(tb + p * C, C, weights, C, xp + off, strip.data(), n);
          std::memcpy(tb + p * C, strip.data(), n * C * sizeof(float));
        }
      }
    });
    if (pw_gemm) gemm_all();
    return out;
  }
  at::Tensor rows = at::empty({B, H, C}, x.options());
  at::Tensor gate = at::empty({B, C}, x.options());
  at::Tensor packed = at::empty({gate_t ? 0 : B * C * C}, x.options());
  float* rp = rows.data_ptr<float>();
  float* gp = gate.data_ptr<float>();
  float* pk = packed.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t by = begin; by < end; ++by)
      dw_gelu_row_nhwc(xp, wp, H, W, C, by / H, by % H, tp + by * W * C, rp + by * C);
  });
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    Scratch sums(C), hidden(R);
    for (int64_t b = b0; b < b1; ++b) {
      sum_rows(rp + b * H * C, H, C, sums.data());
      se_gate(sums.data(), HW, w1p, w2p, R, C, hidden.data(), gp + b * C);
      if (!gate_t) pack_weight(pwp, gp + b * C, C, C, pk + b * C * C);
    }
  });
  constexpr int64_t piece = 48;  // pixels gated, then multiplied while in L1
  for_strip_runs(B, HW, [&](int64_t b, int64_t r0, int64_t r1) {
    for (int64_t p0 = r0; p0 < r1; p0 += piece) {
      const int64_t npix = std::min(r1, p0 + piece) - p0, off = (b * HW + p0) * C;
      if (gate_t) gate_rows(tp + off, gp + b * C, npix, C);
      pointwise(tp + off, gate_t ? shp : pk + b * C * C, off, npix);
    }
  });
  if (pw_gemm) gemm_all();
  return out;
}

at::Tensor fused_mbconv_fwd(const at::Tensor& x, const at::Tensor& dw, const at::Tensor& se_r, const at::Tensor& se_e,
                            const at::Tensor& pw) {
  TORCH_CHECK(x.device().is_cpu(), "gcvit cpu fused_mbconv_fwd: x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 4, "gcvit cpu fused_mbconv_fwd: x must be (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "gcvit cpu fused_mbconv_fwd: dtype must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(dw.dim() == 4 && dw.size(0) == C && dw.size(1) == 1 && dw.size(2) == 3 && dw.size(3) == 3,
              "gcvit cpu fused_mbconv_fwd: dw_weight must be (C, 1, 3, 3), got ", dw.sizes());
  TORCH_CHECK(se_r.dim() == 4 && se_r.size(1) == C && se_r.size(2) == 1 && se_r.size(3) == 1,
              "gcvit cpu fused_mbconv_fwd: se_reduce_weight must be (C_rd, C, 1, 1), got ", se_r.sizes());
  const int64_t R = se_r.size(0);
  TORCH_CHECK(se_e.dim() == 4 && se_e.size(0) == C && se_e.size(1) == R && se_e.size(2) == 1 && se_e.size(3) == 1,
              "gcvit cpu fused_mbconv_fwd: se_expand_weight must be (C, C_rd, 1, 1), got ", se_e.sizes());
  TORCH_CHECK(pw.dim() == 4 && pw.size(0) == C && pw.size(1) == C && pw.size(2) == 1 && pw.size(3) == 1,
              "gcvit cpu fused_mbconv_fwd: pw_weight must be (C, C, 1, 1), got ", pw.sizes());
  if (x.numel() == 0) return x.clone();
  const bool cl = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w9 = dw.to(at::kFloat).reshape({C, 9}).contiguous();
  at::Tensor w1 = se_r.to(at::kFloat).reshape({R, C}).contiguous();
  at::Tensor w2 = se_e.to(at::kFloat).reshape({C, R}).contiguous();
  at::Tensor w9t;
  const int64_t Cp = round_up(C, VL);
  // fp32 with whole vectors of channels: the channels_last kernel; an NCHW map with H W < C too, converted on the
  // way in and out (over the NCHW path's per-image GEMMs of H W columns: 1.37x at 14^2 x 256 and 1.48x at 7^2 x 512;
  // the AVX2 build 1.25x and 1.39x; on larger maps the two copies cost more, 0.64-0.92x at 112^2-28^2; op A/B,
  // 20-30 rounds, AMD EPYC Zen 4, 2 threads)
  const bool nhwc_fp32 = x.scalar_type() == at::kFloat && Cp == C && (cl || H * W < C);
  if (cl || nhwc_fp32) {  // (9, Cp), zero-padded: a loop, where zeros + a strided copy_ cost tens of us a call
    w9t = at::empty({9, Cp}, w9.options());
    const float* src = w9.data_ptr<float>();
    float* dst = w9t.data_ptr<float>();
    for (int64_t k = 0; k < 9; ++k)
      for (int64_t c = 0; c < Cp; ++c) dst[k * Cp + c] = c < C ? src[c * 9 + k] : 0.f;
  }
  if (nhwc_fp32) {
    at::Tensor y = mbconv_nhwc_fp32(x.contiguous(at::MemoryFormat::ChannelsLast), w9t, w1, w2,
                                    pw.to(at::kFloat).reshape({C, C}).contiguous(), pw);
    return cl ? y : y.contiguous();
  }
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor xc = x.contiguous(fmt);
  at::Tensor t = at::empty_like(xc, xc.options(), fmt);
  at::Tensor sums = at::empty({B, C}, x.options().dtype(at::kFloat));
  if (cl) {
    if (x.scalar_type() == at::kFloat)
      dw_gelu_pool_nhwc<float>(xc, w9t, t, sums);
    else
      dw_gelu_pool_nhwc<c10::BFloat16>(xc, w9t, t, sums);
  } else {
    if (x.scalar_type() == at::kFloat)
      dw_gelu_pool_nchw<float>(xc, w9, t, sums);
    else
      dw_gelu_pool_nchw<c10::BFloat16>(xc, w9, t, sums);
  }
  // gate (B, C) = sigmoid(W2 gelu(W1 mean)), fp32
  at::Tensor mean = sums.div(static_cast<double>(H * W));
  at::Tensor gate = at::gelu(mean.mm(w1.t())).mm(w2.t()).sigmoid();
  if (H * W < C) {
    // small maps: scaling t (C * HW per image) is cheaper than folding the gate into weights (C * C)
    t.mul_(gate.to(t.scalar_type()).view({B, C, 1, 1}));
    at::Tensor wt = pw.to(x.scalar_type()).reshape({C, C});
    if (cl) {  // one GEMM over all pixels, the residual as its beta=1 input (bf16, ragged C)
      at::Tensor y = xc.permute({0, 2, 3, 1}).reshape({B * H * W, C}).clone();
      gemm_nt(t.permute({0, 2, 3, 1}).reshape({B * H * W, C}), wt, y, 1.f);
      return y.view({B, H, W, C}).permute({0, 3, 1, 2});
    }
    // NCHW: y_b = x_b + W t_b, one backend GEMM per image on the shared weights
    at::Tensor y = xc.clone();
    at::Tensor t3 = t.view({B, C, H * W}), y3 = y.view({B, C, H * W});
    for (int64_t b = 0; b < B; ++b) {
      at::Tensor yb = y3.select(0, b);
      gemm_nt(wt, t3.select(0, b).t(), yb, 1.f);
    }
    return y;
  }
  // fold the gate into the 1x1 conv weight per image: Wb[o, i] = pw[o, i] * gate[b, i]
  at::Tensor wf = pw.to(at::kFloat).reshape({1, C, C}).mul(gate.unsqueeze(1)).to(x.scalar_type());
  if (cl) {
    // memory (B, HW, C): y = x + t @ Wb^T, the residual is the GEMM's beta=1 input
    at::Tensor y = xc.permute({0, 2, 3, 1}).reshape({B, H * W, C}).clone();
    bmm_into(t.permute({0, 2, 3, 1}).reshape({B, H * W, C}), wf.transpose(1, 2), y, 1.f);
    return y.view({B, H, W, C}).permute({0, 3, 1, 2});
  }
  at::Tensor y = xc.view({B, C, H * W}).clone();
  bmm_into(wf, t.view({B, C, H * W}), y, 1.f);
  return y.view({B, C, H, W});
}

// ------------------------------------------------------------------------------------------------
// Linear layers with fused epilogues: one MKL GEMM y = x @ W^T into the output (beta = 0, see linear_gelu),
// then ONE pass over each output row while it is hot in cache:
//   linear_gelu:                y = gelu(y + b)
//   linear_residual:            y = residual + gamma * (y + b)
//   linear_residual_layernorm:  the same, and normed = LayerNorm(y) from the row still in L1
//   mlp_residual:               linear_gelu then linear_residual, in L2-sized row blocks where it pays
// and layer_norm, the same row normalisation for the norms no GEMM precedes (one read, one write per row)
// (gamma is a LayerScale, optional). Each row is owned by one task: deterministic for any thread count.
// ------------------------------------------------------------------------------------------------

// an optional per-channel vector (bias, layer scale, LayerNorm affine): float32 (n) when given
void check_vector(const char* op, const char* name, const c10::optional<at::Tensor>& t, int64_t n) {
  if (t.has_value() && t->defined())
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->scalar_type() == at::kFloat, "gcvit cpu ", op, ": ", name,
                " must be float32 (", n, "), got ", t->scalar_type(), " ", t->sizes());
}

void check_linear(const char* op, const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "gcvit cpu ", op, ": CPU tensors expected");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gcvit cpu ", op, ": x (M, K) and weight (N, K) ",
              "expected, got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "gcvit cpu ", op, ": float32 only");
  check_vector(op, "bias", bias, w.size(0));
}

// the residual rows the epilogues read: float32 (m, n), unit column stride (any row stride)
void check_residual(const char* op, const at::Tensor& residual, int64_t m, int64_t n) {
  TORCH_CHECK(residual.dim() == 2 && residual.size(0) == m && residual.size(1) == n &&
                  residual.scalar_type() == at::kFloat && residual.stride(1) == 1,
              "gcvit cpu ", op, ": residual must be float32 (", m, ", ", n, ") with unit column stride, got ",
              residual.sizes());
}

const float* opt_ptr(const c10::optional<at::Tensor>& t, at::Tensor& keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  keep = t->contiguous();
  return keep.data_ptr<float>();
}

// Where tiled_gemm_pays (the oneDNN backend of an AVX-512 build; AVX2 builds off Intel CPUs), Linear layers with N a
// whole number of vectors take tile_gemm: over oneDNN's inner product at gcvit_tiny's shapes (batch 8, 2 threads,
// AMD EPYC Zen 4, 15-40 rounds, the packing included), 1.04-1.14x at the 56^2 stage (K = 64 / 192), 1.08-1.24x at
// 28^2, at 14^2 1.06-1.26x for the 256 x 256 projection and 1.00-1.18x for the 768 x 256 and 256 x 768 ones (three
// runs), at 7^2, with 1-3 MB of weights in column groups, 1.03-1.08x (two runs; without the groups, 0.62-0.94x).
// (MKL's sgemm on Intel CPUs, the BLAS backend there, is kept: unmeasured against the tiles.)
bool tiled_linear(int64_t N) { return tiled_gemm_pays() && N % VL == 0; }

// y (M, N) = x @ W^T (beta = 0) by the GEMM backend; multi-threaded
at::Tensor linear(const at::Tensor& x, const at::Tensor& w) {
  // no input features: a sum of nothing (oneDNN's inner product refuses K = 0)
  if (w.size(1) == 0) return at::zeros({x.size(0), w.size(0)}, x.options());
  if (tiled_linear(w.size(0))) {
    at::Tensor xc = x.contiguous(), wc = w.contiguous();
    at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
    tile_gemm(xc.data_ptr<float>(), x.size(0), wc, w, nullptr, y.data_ptr<float>());
    return y;
  }
  if (gemm_backend() == GemmBackend::onednn && onednn_linear_op()) {
    static const c10::List<std::optional<at::Scalar>> no_scalars;
    return onednn_linear_op()->call(x.contiguous(), w, c10::nullopt, "none", no_scalars, c10::nullopt);
  }
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  gemm_nt(x.contiguous(), w, y);
  return y;
}

// Runs fn(row_begin, row_end) over the M rows in chunks of about 16K elements.
template <typename F>
void for_rows(int64_t m, int64_t n, const F& fn) {
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), fn);
}

// The bias goes in with the GELU, in the row pass after a beta = 0 GEMM: addmm would first copy the bias into
// every output row. On AMD EPYC (AVX2) the copy measured 5-8% faster (it warmed the freshly faulted output lines
// MKL then wrote); on the AVX-512 Xeon, with the inference arena's reused pages, the row-pass bias is 1.04-1.13x
// (in-process A/B, gcvit_tiny's four stage shapes, 2 threads), and the block-epilogue ops below do the same.
at::Tensor linear_gelu(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  check_linear("linear_gelu", x, w, bias);
  at::Tensor y = linear(x, w);
  at::Tensor bk;
  const float* bp = opt_ptr(bias, bk);
  const int64_t n = y.size(1);
  float* p = y.data_ptr<float>();
  for_rows(y.size(0), n, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) bias_gelu_row(p + r * n, bp, n);
  });
  return y;
}

// y = x @ W^T + bias by the GEMM backend, the bias added in a row pass (as in linear_gelu): the qkv projection of a
// fused CPU inference (the one Linear with no epilogue of its own)
at::Tensor linear_op(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  check_linear("linear", x, w, bias);
  at::Tensor y = linear(x, w);
  if (bias.has_value() && bias->defined()) {
    at::Tensor bk;
    const float* bp = opt_ptr(bias, bk);
    const int64_t n = y.size(1);
    float* p = y.data_ptr<float>();
    for_rows(y.size(0), n, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        at::vec::map2<float>([](Vec a, Vec b) { return a + b; }, p + r * n, p + r * n, bp, n);
    });
  }
  return y;
}

// row = residual + gamma * (row + bias) in place (bias, gamma optional); returns the row's sum
inline float residual_row(float* row, const float* res, const float* bias, const float* gamma, int64_t n) {
  Vec vsum(0.f);
  float tail = 0.f;
  int64_t j = 0;
  for (; j + VL <= n; j += VL) {
    Vec v = Vec::loadu(row + j);
    if (bias) v = v + Vec::loadu(bias + j);
    if (gamma) v = v * Vec::loadu(gamma + j);
    v = v + Vec::loadu(res + j);
    v.store(row + j);
    vsum = vsum + v;
  }
  for (; j < n; ++j) {
    float v = row[j] + (bias ? bias[j] : 0.f);
    v = res[j] + (gamma ? gamma[j] * v : v);
    row[j] = v;
    tail += v;
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum) + tail;
}

// out = LayerNorm(row) * weight + bias (bias optional), given the row's sum; two-pass moments over the row while
// it is in L1: the mean, then the mean squared deviation
inline void layernorm_row(const float* row, float sum, int64_t n, const float* weight, const float* bias, float eps,
                          float* out) {
  const float mean = sum / n;
  const Vec mv(mean);
  Vec vsq(0.f);
  float tail_sq = 0.f;
  int64_t j = 0;
  for (; j + VL <= n; j += VL) {
    const Vec dv = Vec::loadu(row + j) - mv;
    vsq = at::vec::fmadd(dv, dv, vsq);
  }
  for (; j < n; ++j) tail_sq += (row[j] - mean) * (row[j] - mean);
  const float var = (at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsq) + tail_sq) / n;
  const float rstd = 1.f / std::sqrt(var + eps);
  const Vec rv(rstd);
  for (j = 0; j + VL <= n; j += VL) {
    const Vec v = (Vec::loadu(row + j) - mv) * rv;
    at::vec::fmadd(v, Vec::loadu(weight + j), bias ? Vec::loadu(bias + j) : Vec(0.f)).store(out + j);
  }
  for (; j < n; ++j) out[j] = (row[j] - mean) * rstd * weight[j] + (bias ? bias[j] : 0.f);
}

// y = residual + gamma * (x @ W^T + b); with ln_weight: also normed = LayerNorm(y) * ln_weight + ln_bias
std::tuple<at::Tensor, at::Tensor> linear_residual_impl(const char* op, const at::Tensor& x, const at::Tensor& w,
                                                        const c10::optional<at::Tensor>& bias,
                                                        const at::Tensor& residual,
                                                        const c10::optional<at::Tensor>& gamma,
                                                        const c10::optional<at::Tensor>& ln_weight,
                                                        const c10::optional<at::Tensor>& ln_bias, double eps) {
  check_linear(op, x, w, bias);
  const int64_t m = x.size(0), n = w.size(0);
  check_residual(op, residual, m, n);
  check_vector(op, "gamma", gamma, n);
  check_vector(op, "ln_weight", ln_weight, n);
  check_vector(op, "ln_bias", ln_bias, n);
  // the bias goes in with the residual, in the row pass (see linear_gelu)
  at::Tensor y = linear(x, w);
  at::Tensor bk, gk, lwk, lbk;
  const float* bp = opt_ptr(bias, bk);
  const float* gp = opt_ptr(gamma, gk);
  const float* lw = opt_ptr(ln_weight, lwk);
  const float* lb = opt_ptr(ln_bias, lbk);
  const bool norm = ln_weight.has_value() && ln_weight->defined();
  at::Tensor normed = norm ? at::empty_like(y) : at::empty({0}, y.options());
  float* yp = y.data_ptr<float>();
  float* np_ = norm ? normed.data_ptr<float>() : nullptr;
  const float* rp = residual.data_ptr<float>();
  const int64_t rs = residual.stride(0);
  const float epsf = static_cast<float>(eps);
  for_rows(m, n, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = yp + r * n;
      const float sum = residual_row(row, rp + r * rs, bp, gp, n);
      if (norm) layernorm_row(row, sum, n, lw, lb, epsf, np_ + r * n);
    }
  });
  return {y, normed};
}

// out (m, n) = LayerNorm over the rows of x (m, n; unit column stride, any row stride) * weight + bias
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "gcvit cpu layer_norm: x must be a float32 CPU (M, N) tensor with unit column stride, got ",
              x.scalar_type(), " ", x.sizes());
  const int64_t m = x.size(0), n = x.size(1);
  check_vector("layer_norm", "weight", weight, n);
  check_vector("layer_norm", "bias", bias, n);
  at::Tensor out = at::empty({m, n}, x.options());
  at::Tensor wk, bk;
  const float* wp = opt_ptr(weight, wk);
  const float* bp = opt_ptr(bias, bk);
  const float* xp = x.data_ptr<float>();
  const int64_t xs = x.stride(0);
  float* op = out.data_ptr<float>();
  const float epsf = static_cast<float>(eps);
  for_rows(m, n, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = xp + r * xs;
      layernorm_row(row, at::vec::reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, row, n), n, wp, bp, epsf,
                    op + r * n);
    }
  });
  return out;
}

at::Tensor linear_residual(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                           const at::Tensor& residual, const c10::optional<at::Tensor>& gamma) {
  return std::get<0>(linear_residual_impl("linear_residual", x, w, bias, residual, gamma, c10::nullopt, c10::nullopt,
                                          0.0));
}

std::tuple<at::Tensor, at::Tensor> linear_residual_layernorm(const at::Tensor& x, const at::Tensor& w,
                                                             const c10::optional<at::Tensor>& bias,
                                                             const at::Tensor& residual,
                                                             const c10::optional<at::Tensor>& gamma,
                                                             const at::Tensor& ln_weight,
                                                             const c10::optional<at::Tensor>& ln_bias, double eps) {
  return linear_residual_impl("linear_residual_layernorm", x, w, bias, residual, gamma, ln_weight, ln_bias, eps);
}

// The MLP with its residual: out = residual + gamma * (gelu(x @ W1^T + b1) @ W2^T + b2). When both weights
// fit in a core's L2 next to a block (small channel counts, the high-resolution stages) it runs in blocks
// of MLP_BLOCK_ROWS rows per task, so a block's hidden activations never leave the thread's L2 instead of
// a full (M, hidden) round trip through memory (measured 1.15-1.3x at gcvit_tiny's 56^2 x 64 and 28^2 x 128
// stages); larger layers run as linear_gelu then linear_residual (multi-threaded GEMMs, which measured
// faster there).
// With tiled weights (tiled_linear: see tiled_gemm_pays) the blocks run tile_rows on weights packed once per
// call: over the blocks of oneDNN GEMMs below, 1.21x at 56^2 x 64; blocked, 1.09x the two tiled GEMMs at 28^2 x 128
// (op A/B, 20 rounds, AMD EPYC Zen 4, 2 threads).
// Otherwise, on oneDNN, only the smallest layers stay blocked: its per-call set-up weighs more on a block's small
// GEMMs, and the two-GEMM path measured 1.13x the blocked one at 28^2 x 128 (op A/B twice, 30 and 50 rounds; 56^2 x
// 64 was inconclusive, IQR 0.65-1.28), the model 1.014-1.062x with no block at all (AMD EPYC, 2 threads), and its
// blocks are larger: at 56^2 x 64, 1024 rows measured 1.17x 256 rows and 1.17x no block, 1.02x 512 rows, 1.05x 2048
// (op A/B, 20 rounds, AMD EPYC Zen 4, 2 threads; at 28^2 x 128 blocks of 1024 still lost, 0.90x the two GEMMs).
constexpr int64_t MLP_BLOCK_ROWS = 256;
constexpr int64_t MLP_BLOCK_ROWS_ONEDNN = 1024;
constexpr int64_t MLP_BLOCKED_MAX_WEIGHT_BYTES = 512 * 1024;
constexpr int64_t MLP_BLOCKED_MAX_WEIGHT_BYTES_ONEDNN = 128 * 1024;

at::Tensor mlp_residual(const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                        const at::Tensor& w2, const c10::optional<at::Tensor>& b2, const at::Tensor& residual,
                        const c10::optional<at::Tensor>& gamma) {
  check_linear("mlp_residual", x, w1, b1);
  const int64_t m = x.size(0), c = x.size(1), hd = w1.size(0);
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == c && w2.size(1) == hd && w2.scalar_type() == at::kFloat,
              "gcvit cpu mlp_residual: fc2 weight must be float32 (", c, ", ", hd, "), got ", w2.sizes());
  check_vector("mlp_residual", "fc2 bias", b2, c);
  check_residual("mlp_residual", residual, m, c);
  check_vector("mlp_residual", "gamma", gamma, c);
  const bool onednn = gemm_backend() == GemmBackend::onednn;
  // tiled: both weights packed once, each block's GEMMs by tile_rows
  const bool tiled = tiled_linear(hd) && tiled_linear(c);
  const int64_t max_blocked = onednn && !tiled ? MLP_BLOCKED_MAX_WEIGHT_BYTES_ONEDNN : MLP_BLOCKED_MAX_WEIGHT_BYTES;
  if (!(onednn || blas_sgemm()) || 2 * c * hd * static_cast<int64_t>(sizeof(float)) > max_blocked)
    return linear_residual(linear_gelu(x, w1, b1), w2, b2, residual, gamma);
  at::Tensor xc = x.contiguous(), w1c = w1.contiguous(), w2c = w2.contiguous();
  at::Tensor out = at::empty({m, c}, x.options());
  at::Tensor bk1, bk2, gk;
  const float* bp1 = opt_ptr(b1, bk1);
  const float* bp2 = opt_ptr(b2, bk2);
  const float* gp = opt_ptr(gamma, gk);
  const float* xp = xc.data_ptr<float>();
  const float* w1p = w1c.data_ptr<float>();
  const float* w2p = w2c.data_ptr<float>();
  const float* rp = residual.data_ptr<float>();
  const int64_t rs = residual.stride(0);
  float* op = out.data_ptr<float>();
  const std::vector<at::Tensor> packed = tiled ? packed_weights({{w1c, w1}, {w2c, w2}}) : std::vector<at::Tensor>();
  const float* pk1 = tiled ? packed[0].data_ptr<float>() : nullptr;
  const float* pk2 = tiled ? packed[1].data_ptr<float>() : nullptr;
  const int64_t block_rows = onednn && !tiled ? MLP_BLOCK_ROWS_ONEDNN : MLP_BLOCK_ROWS;
  // rows [r_begin, r_end) on the calling thread, in blocks of up to block_rows
  auto run_rows = [&](int64_t r_begin, int64_t r_end) {
    std::vector<float> hidden(block_rows * hd);
    float* h = hidden.data();
    for (int64_t r0 = r_begin; r0 < r_end; r0 += block_rows) {
      const int64_t rows = std::min(block_rows, r_end - r0);
      // y (rows, n) = a (rows, k) @ w^T, contiguous rows; packed: w's panels when tiled
      auto block_gemm = [&](const float* a, const float* w, const float* packed, int64_t n, int64_t k, float* y) {
        if (tiled)
          tile_rows(a, k, packed, n, nullptr, y, rows);
        else
          gemm_rows(a, k, w, rows, n, k, y, n);
      };
      float* o = op + r0 * c;
      block_gemm(xp + r0 * c, w1p, pk1, hd, c, h);
      for (int64_t r = 0; r < rows; ++r) bias_gelu_row(h + r * hd, bp1, hd);
      block_gemm(h, w2p, pk2, c, hd, o);
      for (int64_t r = 0; r < rows; ++r) residual_row(o + r * c, rp + (r0 + r) * rs, bp2, gp, c);
    }
  };
  if (tiled) {  // tile_rows' bits do not depend on the rows it is given: split evenly
    for_strip_runs(1, m, [&](int64_t, int64_t r0, int64_t r1) { run_rows(r0, r1); });
  } else {  // the backend's GEMMs see the same blocks whatever the thread count
    at::parallel_for(0, (m + block_rows - 1) / block_rows, 1, [&](int64_t blk0, int64_t blk1) {
      run_rows(blk0 * block_rows, std::min(m, blk1 * block_rows));
    });
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// Inference arena: a caching CPU allocator installed while a fused model runs a CPU inference forward
// (gcvit_kernels.cpu.inference_arena). Every forward allocates and frees the same large activations; from glibc
// they come back as fresh pages (large blocks are mmapped, the heap top is trimmed), and each first touch of a
// page faults (30,000 faults per gcvit_tiny batch-8 forward, measured here). The arena keeps freed blocks of at
// least ARENA_MIN_BYTES by size and hands them out again, so a forward reuses the previous one's pages. Blocks
// freed after the forward (the output, say) still return here. At most arena_limit bytes are kept; beyond that
// blocks go back to the system. Like ONNX Runtime's CPU arena, which is on by default there.
// ------------------------------------------------------------------------------------------------

constexpr size_t ARENA_MIN_BYTES = 64 << 10;
constexpr size_t ARENA_ROUND = 4096;
constexpr size_t ARENA_HEADER = 64;  // keeps the data 64-byte aligned, like c10's allocator

class InferenceArena final : public c10::Allocator {
 public:
  // every block carries its size in a header of ARENA_HEADER bytes before the data, so the data pointer alone
  // frees it (raw_deleter: oneDNN and others allocate through raw_allocate / raw_deallocate)
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t size = nbytes < ARENA_MIN_BYTES ? nbytes : (nbytes + ARENA_ROUND - 1) / ARENA_ROUND * ARENA_ROUND;
    char* base = nullptr;
    if (size >= ARENA_MIN_BYTES) {
      std::lock_guard<std::mutex> g(mutex_);
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {
        base = static_cast<char*>(it->second.back());
        it->second.pop_back();
        cached_ -= size;
      }
    }
    if (!base) {
      base = static_cast<char*>(c10::alloc_cpu(size + ARENA_HEADER));
      *reinterpret_cast<size_t*>(base) = size;
    }
    void* data = base + ARENA_HEADER;
    return {data, data, &InferenceArena::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &InferenceArena::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  // install as the CPU allocator (nested and concurrent forwards share one installation)
  bool enter() {
    std::lock_guard<std::mutex> g(install_mutex_);
    if (depth_ == 0) {
      c10::Allocator* current = c10::GetCPUAllocator();
      if (current != this) fallback_ = current;
      c10::SetCPUAllocator(this, 0);
      if (c10::GetCPUAllocator() != this) return false;  // a higher-priority allocator is installed: leave it
    }
    ++depth_;
    return true;
  }

  void exit() {
    std::lock_guard<std::mutex> g(install_mutex_);
    if (depth_ > 0 && --depth_ == 0) c10::SetCPUAllocator(fallback_, 0);
  }

  void set_limit(int64_t bytes) {
    std::lock_guard<std::mutex> g(mutex_);
    limit_ = static_cast<size_t>(std::max<int64_t>(bytes, 0));
    trim(limit_);
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> g(mutex_);
    return static_cast<int64_t>(cached_);
  }

  void empty_cache() {
    BiasCache::get_instance().clear();
    std::lock_guard<std::mutex> g(mutex_);
    trim(0);
  }

  static InferenceArena& get() {
    static InferenceArena* arena = new InferenceArena();  // never destroyed: blocks may be freed at exit
    return *arena;
  }

 private:
  static void release(void* data) {
    if (!data) return;
    char* base = static_cast<char*>(data) - ARENA_HEADER;
    get().give_back(base, *reinterpret_cast<size_t*>(base));
  }

  void give_back(char* base, size_t size) {
    if (size >= ARENA_MIN_BYTES) {
      std::lock_guard<std::mutex> g(mutex_);
      if (cached_ + size <= limit_) {
        free_[size].push_back(base);
        cached_ += size;
        return;
      }
    }
    c10::free_cpu(base);
  }

  void trim(size_t keep) {  // mutex_ held
    for (auto& [size, blocks] : free_)
      while (cached_ > keep && !blocks.empty()) {
        c10::free_cpu(blocks.back());
        blocks.pop_back();
        cached_ -= size;
      }
  }

  std::mutex mutex_, install_mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0, limit_ = size_t(1) << 30;
  int64_t depth_ = 0;
  c10::Allocator* fallback_ = c10::GetDefaultCPUAllocator();
};

int64_t vec_size() { return VL; }

// This machine's FMA peak over the parallel region's threads, in GFLOP/s, measured on `flops` floating-point
// operations split evenly over the threads: each runs FMA_PEAK_CHAINS independent chains of register FMAs (more
// than an FMA's latency times the FMA ports of any x86 core, so the ports never wait); all threads' FLOPs over the
// region's wall time. The roofline the op benchmarks hold the GEMM-bound Fused-MBConv against
// (benchmarks/test_bench_cpu.py times it on the 1x1 conv's FLOPs beside the op): no kernel computes faster.
constexpr int FMA_PEAK_CHAINS = 12;

double fma_peak_gflops(int64_t flops) {
  TORCH_CHECK(flops > 0, "gcvit cpu fma_peak_gflops: flops must be positive, got ", flops);
  const int64_t threads = at::get_num_threads();
  const int64_t per_round = 2 * VL * FMA_PEAK_CHAINS * threads;
  const int64_t iterations = (flops + per_round - 1) / per_round;
  std::vector<float> sink(threads);
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Vec acc[FMA_PEAK_CHAINS];
      unroll<FMA_PEAK_CHAINS>([&](auto c) FORCE_INLINE { acc[c] = Vec(1.f + 1e-3f * c); });
      const Vec mul(0.9999999f), add(1e-7f);
      for (int64_t it = 0; it < iterations; ++it)
        unroll<FMA_PEAK_CHAINS>([&](auto c) FORCE_INLINE { acc[c] = at::vec::fmadd(acc[c], mul, add); });
      Vec total(0.f);
      unroll<FMA_PEAK_CHAINS>([&](auto c) FORCE_INLINE { total = total + acc[c]; });
      alignas(64) float lanes[VL];
      total.store(lanes);
      sink[i] = lanes[0];  // the chains' results are used, so the loop is not dropped
    }
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  TORCH_CHECK(std::isfinite(sink[0]), "gcvit cpu fma_peak_gflops: the FMA chains overflowed");
  return static_cast<double>(per_round) * static_cast<double>(iterations) / seconds * 1e-9;
}

std::string capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

}  // namespace

TORCH_LIBRARY(gcvit_cpu, m) {
  m.def("window_attention_fwd(Tensor qkv, Tensor table, Tensor? global_query, int heads, int wh, int ww, float scale, "
        "Tensor? qkv_bias=None, bool need_lse=True) -> (Tensor, Tensor)", &window_attention_fwd);
  m.def("fused_mbconv_fwd", &fused_mbconv_fwd);
  m.def("linear", &linear_op);
  m.def("linear_gelu", &linear_gelu);
  m.def("mlp_residual", &mlp_residual);
  m.def("has_blas", []() { return blas_sgemm() != nullptr; });
  m.def("has_onednn", []() { return onednn_matmul() != nullptr; });
  m.def("gemm_backend", &gemm_backend_name);
  m.def("set_gemm_backend", &set_gemm_backend);
  m.def("linear_residual_layernorm", &linear_residual_layernorm);
  m.def("layer_norm", &layer_norm);
  m.def("capability", &capability);
  m.def("arena_enter", []() { return InferenceArena::get().enter(); });
  m.def("arena_exit", []() { InferenceArena::get().exit(); });
  m.def("arena_set_limit", [](int64_t bytes) { InferenceArena::get().set_limit(bytes); });
  m.def("arena_cached_bytes", []() { return InferenceArena::get().cached_bytes(); });
  m.def("arena_empty_cache", []() { InferenceArena::get().empty_cache(); });
  m.def("bias_cache_bytes", []() { return BiasCache::get_instance().bytes(); });
  m.def("frozen_weights_enter", []() { FrozenWeights::get().enter(); });
  m.def("frozen_weights_exit", []() { FrozenWeights::get().exit(); });
  m.def("frozen_weights_bytes", []() { return FrozenWeights::get().bytes(); });
  m.def("vec_size", &vec_size);
  m.def("fma_peak_gflops", &fma_peak_gflops);
}
