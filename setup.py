"""Builds lsr_fast and its optional compiled extension ``lsr_fast._C``.

The extension (csrc/) is built when torch and a C++ compiler are present. Its CUDA sources
(csrc/cuda/*.cu) are added when torch is a CUDA build and a CUDA toolkit of the same major
version is found (else the CPU kernels are built alone, with a warning saying why); the
environment variable LSR_FAST_CUDA=1 forces them (a failure is then an error), =0 leaves them
out. LSR_FAST_EXT=0 skips the extension altogether. A failed optional build prints a warning
and leaves a working pure-Python package (the "reference" backend).

Install with ``pip install --no-build-isolation -e .``: the build must see the torch you run
with (an isolated build would fetch another one).
"""

import glob
import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def env_flag(name):
    """None when unset, else True/False for '1'/'0' (anything else is an error)."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        sys.exit(f"setup.py: {name} must be 0 or 1, got {value!r}")
    return value == "1"


def cuda_toolkit_root():
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH, else the toolkit behind `nvcc` on PATH.

    The nvcc on PATH may be a wrapper script (`exec /opt/cuda-X/bin/nvcc "$@"`): follow links,
    then read the script for the real binary's path.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "rb") as handle:
                head = handle.read(4096)
            if head.startswith(b"#!"):
                for path in re.findall(rb"(/[^\s\"']+)/bin/nvcc\b", head):
                    candidates.append(path.decode())
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
            os.path.join(root, "include", "cuda_runtime.h")
        ):
            return root
    return None


def toolkit_version(root):
    """"major.minor" of the CUDA toolkit at ``root`` (version.json, else `nvcc --version`), or None."""
    try:
        with open(os.path.join(root, "version.json")) as handle:
            return ".".join(json.load(handle)["cuda"]["version"].split(".")[:2])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    try:
        out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def cuda_version_mismatch(toolkit, toolkit_ver, torch_cuda):
    """Why a toolkit cannot build for this torch (cpp_extension refuses another CUDA major), or ""."""
    if toolkit_ver is None or torch_cuda is None or toolkit_ver.split(".")[0] == torch_cuda.split(".")[0]:
        return ""
    return (f"the CUDA toolkit at {toolkit} is {toolkit_ver} but torch was built with CUDA {torch_cuda} "
            f"(the major versions must match: set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]}.x toolkit)")


def nvidia_wheel_include_dirs():
    """include/ folders of the nvidia-* wheels (cuBLAS, cuSPARSE, ... headers torch's CUDA
    headers include, which a bare toolkit may lack)."""
    roots = list(site.getsitepackages()) + [site.getusersitepackages(), sysconfig.get_paths()["purelib"]]
    found = []
    for root in roots:
        for include in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))) + sorted(
            glob.glob(os.path.join(root, "nvidia", "cu*", "include"))
        ):
            if include not in found:
                found.append(include)
    return found


def extension_modules():
    """(ext_modules, cmdclass) for the extension, or ([], {}) with a warning when it cannot be built."""
    if env_flag("LSR_FAST_EXT") is False:
        return [], {}
    force_cuda = env_flag("LSR_FAST_CUDA")
    toolkit = cuda_toolkit_root() if force_cuda is not False else None
    if toolkit and not os.environ.get("CUDA_HOME"):
        # cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = toolkit
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        if force_cuda:
            sys.exit(f"setup.py: LSR_FAST_CUDA=1 but torch cannot be imported: {error}")
        warnings.warn(f"lsr_fast: torch is not importable at build time ({error}); building without the compiled extension")
        return [], {}

    with_cuda = False
    if force_cuda is not False:
        reasons = []
        if torch.version.cuda is None:
            reasons.append(f"torch {torch.__version__} is not a CUDA build")
        if toolkit is None:
            reasons.append("no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)")
        else:
            mismatch = cuda_version_mismatch(toolkit, toolkit_version(toolkit), torch.version.cuda)
            if mismatch:
                reasons.append(mismatch)
        with_cuda = not reasons
        if force_cuda and reasons:
            sys.exit("setup.py: LSR_FAST_CUDA=1 but " + "; ".join(reasons))
        if reasons and torch.version.cuda is not None and toolkit is not None:
            # A CUDA build of torch with an unusable toolkit: still build the CPU kernels.
            warnings.warn("lsr_fast: building without the CUDA kernels: " + "; ".join(reasons))
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # With no GPU to ask, cpp_extension cannot pick the architectures: Ampere and Hopper
        # SASS, plus Hopper PTX that newer GPUs can JIT-compile.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: cpp_extension picks the standard torch's headers need (C++20 for torch >= 2.10).
    cxx_flags = ["-O3"]
    if sys.platform != "win32":
        cxx_flags.append("-fopenmp")
    extra = {"cxx": cxx_flags}
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += nvidia_wheel_include_dirs()
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        extension_class = cpp_extension.CUDAExtension
    else:
        extension_class = cpp_extension.CppExtension
    extension = extension_class(
        "lsr_fast._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"] if sys.platform != "win32" else [],
        py_limited_api=False,
    )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Turns a failed optional build into a warning; a forced CUDA build still fails."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - any compiler failure
                if force_cuda:
                    raise
                warnings.warn(f"lsr_fast: building the compiled extension failed ({error}); only the reference backend will be available")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001
                if force_cuda:
                    raise
                warnings.warn(f"lsr_fast: building {ext.name} failed ({error}); only the reference backend will be available")

    print(f"lsr_fast: building the extension with {'CPU and CUDA' if with_cuda else 'CPU'} kernels"
          + (f" (toolkit {toolkit}, arch list {os.environ.get('TORCH_CUDA_ARCH_LIST', 'auto')})" if with_cuda else ""))
    return [extension], {"build_ext": OptionalBuildExt.with_options(no_python_abi_suffix=False)}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its helpers
    ext_modules, cmdclass = extension_modules()
    setup(packages=find_packages(include=["lsr_fast", "lsr_fast.*"]), ext_modules=ext_modules, cmdclass=cmdclass)
