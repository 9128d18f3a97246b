// The per-pixel math of the focal and dice losses, written once for every backend.
//
// Every function is an FMF_MATH template over V: float in CUDA threads and scalar CPU code, or
// fmf::simd::f32x8 (fmf/simd.h) in CPU vector loops; the same text serves both because GCC's vector
// types accept scalar operands and `cond ? a : b` with a lane mask. The formulas are the stable
// (softplus) forms: for |x| <= 100 nothing overflows and no NaN appears.
//
// Only exp, log1p and log differ by target: CUDA calls libdevice, the CPU uses the short
// polynomials below (about 2e-7 relative error), because libm calls would keep CPU loops scalar.
#pragma once
#include <cstdint>
#include <cstring>

#include "fmf/index_rules.h"

// Always inlined: CPU loops call these with f32x8 and must not pass vectors across calls.
#if defined(__CUDACC__)
#define FMF_MATH FMF_HD
#else
#define FMF_MATH inline __attribute__((always_inline))
#endif

namespace fmf {

// The integer type with V's lane count, and int -> float lane by lane (fmf/simd.h adds f32x8).
template <class V>
struct VecTraits {
  using Int = int32_t;
  static FMF_MATH V to_float(const Int& i) { return static_cast<V>(i); }
};

template <class V>
FMF_MATH V splat(float c) {
  return V{} + c;
}

template <class To, class From>
inline To bit_cast(const From& from) {
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// exp(x) for x <= 0, the only exponentials the losses take; results below FLT_MIN flush to 0.
template <class V>
FMF_MATH V exp_nonpos(const V& x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  using I = typename VecTraits<V>::Int;
  const auto under = x < -87.3f;
  const V xc = under ? splat<V>(-87.3f) : x;
  // x = n ln2 + r with |r| <= ln2 / 2; adding 1.5 * 2^23 rounds x / ln2 to the integer n, which
  // then sits in the low mantissa bits of `shifted`.
  const V shifted = xc * 1.44269504f + 12582912.f;
  const V n = shifted - 12582912.f;
  const V r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  V p = splat<V>(1.f / 40320.f);  // Taylor series of exp(r) to r^8
  p = p * r + 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const I two_n = (bit_cast<I>(shifted) - 0x4B400000 + 127) << 23;  // the float 2^n
  return p * bit_cast<V>(under ? I{} : two_n);
#endif
}

// log(1 + e) for e in [0, 1], accurate for tiny e: 2 atanh(s) with s = e / (2 + e) <= 1/3.
template <class V>
FMF_MATH V log1p_unit(const V& e) {
#ifdef __CUDA_ARCH__
  return log1pf(e);
#else
  const V s = e / (2.f + e), z = s * s;
  V p = splat<V>(1.f / 15.f);
  p = p * z + 1.f / 13.f;
  p = p * z + 1.f / 11.f;
  p = p * z + 1.f / 9.f;
  p = p * z + 1.f / 7.f;
  p = p * z + 1.f / 5.f;
  p = p * z + 1.f / 3.f;
  p = p * z + 1.f;
  return 2.f * s * p;
#endif
}

// log(m) for a normal m > 0: m = 2^k f with f in [sqrt(1/2), sqrt(2)), log f = 2 atanh((f-1)/(f+1)).
template <class V>
FMF_MATH V log_pos(const V& m) {
#ifdef __CUDA_ARCH__
  return logf(m);
#else
  using I = typename VecTraits<V>::Int;
  const I bits = bit_cast<I>(m);
  const I k = ((bits >> 23) & 255) - 127;
  const V f = bit_cast<V>((bits & 0x7FFFFF) | 0x3F800000);
  const auto hi = f > 1.41421356f;
  const V fr = hi ? f * 0.5f : f;
  const V kf = VecTraits<V>::to_float(hi ? k + 1 : k);
  const V s = (fr - 1.f) / (fr + 1.f), z = s * s;
  V p = splat<V>(1.f / 11.f);
  p = p * z + 1.f / 9.f;
  p = p * z + 1.f / 7.f;
  p = p * z + 1.f / 5.f;
  p = p * z + 1.f / 3.f;
  p = p * z + 1.f;
  return kf * 0.693147181f + 2.f * s * p;
#endif
}

// sigmoid(+-x) and softplus(+-x) from one exp and one log1p:
// sp = softplus(x) = BCE(x, 0) = -log(1 - sig), sp_neg = softplus(-x) = BCE(x, 1) = -log(sig),
// sig_neg = sigmoid(-x) = 1 - sig without the cancellation.
template <class V>
struct Logistic {
  V sig, sig_neg, sp, sp_neg;
};

template <class V>
FMF_MATH Logistic<V> logistic(const V& x) {
  const auto nonneg = x >= 0.f;
  const V e = exp_nonpos(nonneg ? -x : x);  // exp(-|x|) in (0, 1]
  const V l = log1p_unit(e);
  const V inv = 1.f / (1.f + e);
  const V small = e * inv;  // sigmoid(-|x|)
  const V zero = V{};
  return {nonneg ? inv : small, nonneg ? small : inv, (nonneg ? x : zero) + l, (nonneg ? zero : -x) + l};
}

// m^gamma for m in [0, 1] (gamma = 2, MaskFormer's value, is a product) and d(m^gamma)/dm.
template <class V>
FMF_MATH V pow_gamma(const V& m, float gamma) {
  if (gamma == 2.f) return m * m;
  if (gamma == 0.f) return splat<V>(1.f);
  const auto pos = m > 0.f;
  const V safe = pos ? m : splat<V>(1.f);
  return pos ? exp_nonpos(gamma * log_pos(safe)) : V{};
}

// d(m^gamma)/dx for m = 1 - p_t = sig (1 - t) + sig_neg t, whose derivative is (1 - 2t) sig sig_neg:
// gamma m^gamma (1 - 2t) sig sig_neg / m. The factor sig sig_neg / m is computed as
// max(sig, sig_neg) * (min(sig, sig_neg) / m), at most 1 because m >= min(sig, sig_neg); the form
// gamma m^(gamma-1) dm/dx would overflow for gamma < 1 at saturated logits (inf * 0 = NaN). Its
// limit at m = 0 is 0.
template <class V>
FMF_MATH V dpow_gamma_dx(const V& m, const V& m_pow, const V& sig, const V& sig_neg, const V& one_m_2t,
                         float gamma) {
  const V dm = one_m_2t * sig * sig_neg;
  if (gamma == 2.f) return 2.f * m * dm;
  if (gamma == 0.f) return V{};
  const auto pos = m > 0.f;
  const V safe = pos ? m : splat<V>(1.f);
  const auto sig_smaller = sig < sig_neg;
  const V lo = sig_smaller ? sig : sig_neg, hi = sig_smaller ? sig_neg : sig;
  return pos ? gamma * m_pow * one_m_2t * hi * (lo / safe) : V{};
}

// The matcher's per-pixel focal terms (official MaskFormer matcher): with p = sigmoid(x),
// pos = a (1-p)^gamma BCE(x, 1), neg = (1-a) p^gamma BCE(x, 0), a = alpha (no weights if alpha < 0).
template <class V>
struct CostTerms {
  V pos, neg, sig;
};

template <class V>
FMF_MATH CostTerms<V> matching_terms(const V& x, float alpha, float gamma) {
  const Logistic<V> L = logistic(x);
  const float a_pos = alpha >= 0.f ? alpha : 1.f, a_neg = alpha >= 0.f ? 1.f - alpha : 1.f;
  return {a_pos * pow_gamma(L.sig_neg, gamma) * L.sp_neg, a_neg * pow_gamma(L.sig, gamma) * L.sp, L.sig};
}

// The criterion's sigmoid focal loss at one pixel, target t in [0, 1] (soft targets allowed):
// FL = alpha_t (1 - p_t)^gamma BCE(x, t), p_t = p t + (1-p)(1-t), alpha_t = alpha t + (1-alpha)(1-t)
// (1 if alpha < 0); with kGrad also dFL/dx and dsig/dx.
template <class V>
struct FocalPixel {
  V loss, dloss, sig, dsig;
};

template <bool kGrad, class V>
FMF_MATH FocalPixel<V> focal_pixel(const V& x, const V& t, float alpha, float gamma) {
  const Logistic<V> L = logistic(x);
  const V one_m_t = 1.f - t;
  const V m = L.sig * one_m_t + L.sig_neg * t;  // 1 - p_t, without cancellation
  const V ce = t * L.sp_neg + one_m_t * L.sp;    // BCE(x, t) as a sum of two terms >= 0
  const V m_pow = pow_gamma(m, gamma);
  const V a_t = alpha >= 0.f ? alpha * t + (1.f - alpha) * one_m_t : splat<V>(1.f);
  FocalPixel<V> out{a_t * ce * m_pow, V{}, L.sig, V{}};
  if (kGrad) {
    out.dsig = L.sig * L.sig_neg;
    out.dloss = a_t * ((L.sig - t) * m_pow + ce * dpow_gamma_dx(m, m_pow, L.sig, L.sig_neg, one_m_t - t, gamma));
  }
  return out;
}

}  // namespace fmf
