// Argument checks for native ops: messages name the argument, what was expected and what came.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define FMF_CHECK_DIM(t, d)                                                                         \
  TORCH_CHECK_VALUE((t).dim() == (d), #t ": expected a " #d "-d tensor, got shape ", (t).sizes())
#define FMF_CHECK_DEVICE(t, dev_type)                                                               \
  TORCH_CHECK_VALUE((t).device().type() == (dev_type), #t ": expected a tensor on ", (dev_type),   \
                    ", got one on ", (t).device())
#define FMF_CHECK_SAME_DEVICE(a, b)                                                                 \
  TORCH_CHECK_VALUE((a).device() == (b).device(), #a " is on ", (a).device(), " but " #b " is on ", \
                    (b).device())
