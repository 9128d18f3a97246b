"""Native (C++/CUDA, fastmaskformer._C) backends of the ops. Each registers with the reason it is
unavailable when the extension is not built, so the dispatcher can explain and warn."""
from fastmaskformer._ext import native_cuda_error, native_error  # noqa: F401
