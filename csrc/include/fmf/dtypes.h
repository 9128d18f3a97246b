// The dtypes the native ops take: predictions in float32/float16/bfloat16 (math in fp32), and
// target masks in any of five dtypes, each value read as a float where it lies: bool and uint8
// masks are read as the bytes they are, never converted to a float copy first.
#pragma once
#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "fmf/index_rules.h"  // FMF_HD

namespace fmf {

inline void check_float_dtype(c10::ScalarType dtype, const char* what) {
  TORCH_CHECK_TYPE(dtype == c10::ScalarType::Float || dtype == c10::ScalarType::Half ||
                       dtype == c10::ScalarType::BFloat16,
                   what, ": expected dtype float32, float16 or bfloat16, got ", dtype);
}

// AT_DISPATCH over the three prediction dtypes only (scalar_t inside), so no float64 copy of a
// kernel is compiled.
#define FMF_DISPATCH_FLOAT(TYPE, NAME, ...)                                           \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)            \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

enum class MaskKind : int32_t { kByte, kFloat, kHalf, kBFloat16 };

// Bytes per element of a mask buffer of kind K.
template <MaskKind K>
constexpr int64_t kMaskBytes = K == MaskKind::kByte ? 1 : K == MaskKind::kFloat ? 4 : 2;

// `what` names the argument in the error for an unsupported dtype.
inline MaskKind mask_kind(c10::ScalarType dtype, const char* what) {
  switch (dtype) {
    case c10::ScalarType::Bool:
    case c10::ScalarType::Byte:
      return MaskKind::kByte;
    case c10::ScalarType::Float:
      return MaskKind::kFloat;
    case c10::ScalarType::Half:
      return MaskKind::kHalf;
    case c10::ScalarType::BFloat16:
      return MaskKind::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, what, ": expected dtype bool, uint8, float32, float16 or bfloat16, got ", dtype);
  }
}

// Calls f(std::integral_constant<MaskKind, K>{}) with the runtime kind as a compile-time K, so a
// host kernel can pick the instantiation of a template on the mask dtype in one place.
template <class F>
decltype(auto) visit_mask_kind(MaskKind kind, F&& f) {
  switch (kind) {
    case MaskKind::kByte:
      return f(std::integral_constant<MaskKind, MaskKind::kByte>{});
    case MaskKind::kFloat:
      return f(std::integral_constant<MaskKind, MaskKind::kFloat>{});
    case MaskKind::kHalf:
      return f(std::integral_constant<MaskKind, MaskKind::kHalf>{});
    default:
      return f(std::integral_constant<MaskKind, MaskKind::kBFloat16>{});
  }
}

// Element i of a mask buffer of the given kind. CPU loops pass a compile-time kind, so the switch
// folds away; in CUDA kernels it is the same for every thread.
FMF_HD float mask_value(const void* masks, int64_t i, MaskKind kind) {
  switch (kind) {
    case MaskKind::kByte:
      return static_cast<float>(static_cast<const uint8_t*>(masks)[i]);
    case MaskKind::kFloat:
      return static_cast<const float*>(masks)[i];
    case MaskKind::kHalf:
      return static_cast<float>(static_cast<const c10::Half*>(masks)[i]);
    default:
      return static_cast<float>(static_cast<const c10::BFloat16*>(masks)[i]);
  }
}

}  // namespace fmf
