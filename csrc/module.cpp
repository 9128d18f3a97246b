// The Python module fastmaskformer._C. Ops live in the torch.ops.fastmaskformer namespace (one
// schema file per op under ops/); this module only answers what the build contains.
#include <torch/extension.h>
#include <torch/version.h>

#ifdef WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#ifndef FMF_VERSION
#define FMF_VERSION "unknown"
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
  d["version"] = FMF_VERSION;
  d["torch_version"] = TORCH_VERSION;
#ifdef WITH_CUDA
  d["with_cuda"] = true;
  d["cuda_runtime_version"] = CUDART_VERSION;
#else
  d["with_cuda"] = false;
  d["cuda_runtime_version"] = pybind11::none();
#endif
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastmaskformer native ops (registered under torch.ops.fastmaskformer)";
  m.def("build_info", &build_info, "What this build of _C contains: version, CUDA, OpenMP.");
}
