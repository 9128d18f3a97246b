"""Build fastmaskformer: the Python package, its Triton kernels and the fastmaskformer._C extension.

The extension is built from every source under csrc/: ``*.cpp`` always, ``*.cu`` only when a CUDA
build of torch and nvcc are both present. ``FASTMASKFORMER_CUDA=1`` forces the CUDA part (and fails
loudly if it cannot be built), ``FASTMASKFORMER_CUDA=0`` skips it. Set TORCH_CUDA_ARCH_LIST and
MAX_JOBS to control what nvcc builds and how many compilers run at once (the Makefile does). With
TORCH_CUDA_ARCH_LIST unset and no GPU visible (build hosts, CI), the default is every architecture
the installed torch was built for (see build_config.cuda_arch_list). OpenMP is used when the C++
compiler compiles and links ``-fopenmp`` (probed; not Apple's clang without libomp);
``FASTMASKFORMER_OPENMP=0`` turns it off, ``=1`` requires it.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # build_config sits next to this file; pip may run it from elsewhere

import build_config  # noqa: E402

VERSION = "0.1.0"


def _want_cuda():
    import torch
    from torch.utils import cpp_extension

    flag = os.environ.get("FASTMASKFORMER_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        sys.exit(f"FASTMASKFORMER_CUDA must be 0 or 1, got {flag!r}")
    have_torch_cuda = torch.version.cuda is not None
    have_nvcc = cpp_extension.CUDA_HOME is not None
    if flag == "0":
        print("fastmaskformer: FASTMASKFORMER_CUDA=0, building the CPU part of _C only")
        return False
    if flag == "1":
        if not (have_torch_cuda and have_nvcc):
            sys.exit(
                "fastmaskformer: FASTMASKFORMER_CUDA=1 but "
                + ("torch is a CPU build" if not have_torch_cuda else "no CUDA toolkit (set CUDA_HOME)")
            )
        return True
    if not (have_torch_cuda and have_nvcc):
        why = "torch is a CPU build" if not have_torch_cuda else "nvcc/CUDA_HOME not found"
        print(f"fastmaskformer: skipping the CUDA sources of _C ({why}); CPU ops are still built")
        return False
    return True


def _set_cuda_arch_list():
    """Give torch's cpp_extension an architecture list when it has none and no GPU to ask."""
    from torch.utils import cpp_extension

    try:
        value, why = build_config.cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"),
                                                 *build_config.probe_cuda_archs(cpp_extension.CUDA_HOME))
    except ValueError as e:
        sys.exit(f"fastmaskformer: {e}")
    if value is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = value
    print(f"fastmaskformer: {why}")


def _openmp():
    """OpenMP where the C++ compiler supports it (probed); FASTMASKFORMER_OPENMP=0 turns it off."""
    try:
        openmp = build_config.probe_openmp(os.environ.get("FASTMASKFORMER_OPENMP"))
    except ValueError as e:
        sys.exit(f"fastmaskformer: {e}")
    print(f"fastmaskformer: {openmp.reason}")
    return openmp


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    if os.environ.get("FASTMASKFORMER_NO_EXT") == "1":
        # The Makefile installs the package this way, then builds _C in place (`make build`), so
        # the extension is compiled once and ninja rebuilds only what changed afterwards.
        return []

    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    with_cuda = _want_cuda()
    if with_cuda:
        _set_cuda_arch_list()
    openmp = _openmp()
    flags = build_config.compile_flags(VERSION, openmp, with_cuda)
    kwargs = dict(
        name="fastmaskformer._C",
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_link_args=flags["extra_link_args"],
    )
    if with_cuda:
        # Some CUDA installs lack the library headers (cusparse.h, cublas_v2.h) that ATen's CUDA
        # headers include; torch's pip wheels ship them under nvidia/cu*/include.
        try:
            import nvidia

            for d in nvidia.__path__:
                kwargs["include_dirs"] += sorted(glob.glob(os.path.join(d, "cu*", "include")))
        except ImportError:
            pass
        return [
            CUDAExtension(
                sources=cpp + cu,
                define_macros=[("WITH_CUDA", None)],
                extra_compile_args=flags["extra_compile_args"],
                **kwargs,
            )
        ]
    return [CppExtension(sources=cpp, extra_compile_args=flags["extra_compile_args"], **kwargs)]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="fastmaskformer",
    version=VERSION,
    description="MaskFormer training with fused Triton and C++/CUDA kernels for its expensive parts",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastmaskformer", "fastmaskformer.*"]) + ["fastmaskformer.kernels"],
    package_dir={"fastmaskformer.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    install_requires=["torch>=2.6", "torchvision", "timm>=0.9", "scipy", "numpy", "pyyaml", "tqdm", "pillow"],
    extras_require={
        # transformers, safetensors and pycocotools are test oracles (reference models, COCO AP).
        "dev": ["pytest", "pytest-benchmark", "pytest-xdist", "ninja", "transformers", "safetensors", "pycocotools"],
        "lapjv": ["lapjv"],
        "coco": ["pycocotools"],  # COCO instance segmentation: reading RLE/polygons and mask AP
    },
    entry_points={"console_scripts": ["fastmaskformer-train=fastmaskformer.train:main"]},
)
