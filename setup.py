"""Builds lsr_fast and its compiled extension ``lsr_fast._C`` (see docs/install.md).

The extension (csrc/) is built here when torch and a C++ compiler are present, against that
torch: ``pip install --no-build-isolation .`` (or ``-e .``, or ``pip wheel --no-build-isolation .``).
Its CUDA sources (csrc/cuda/*.cu) are added when torch is a CUDA build and a CUDA toolkit of the
same major version is found (else the CPU kernels are built alone, with a warning saying why).

Environment: LSR_FAST_CUDA=1 forces the CUDA sources (a failure is then an error), =0 leaves
them out; LSR_FAST_EXT=0 skips the extension, =1 requires it (no torch, no compiler or a failed
build is then an error instead of a warning).

A plain ``pip install .`` builds in an isolated environment without torch: the extension cannot
be compiled there (an isolated build would have to fetch some other torch). The package then
records why in lsr_fast/_build_info.py and ships csrc/ as lsr_fast/_csrc, and lsr_fast compiles
the same sources with the same flags on first import (lsr_fast._loader), into a per-torch cache.

Every build writes lsr_fast/_build_info.py next to the extension: the torch it was built for, so
that lsr_fast refuses an extension built for another torch with both versions named, instead of
failing with an undefined symbol.
"""

import importlib.util
import os
import shutil
import sys
import sysconfig
import warnings

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _load_build_helpers():
    """lsr_fast/_build.py by path: importing the lsr_fast package would need torch."""
    spec = importlib.util.spec_from_file_location("lsr_fast_build_helpers", os.path.join(ROOT, "lsr_fast", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _load_build_helpers()
# The helpers live in lsr_fast/_build.py, shared with the compile-on-first-use loader.
cuda_toolkit_root = B.cuda_toolkit_root
toolkit_version = B.toolkit_version
cuda_version_mismatch = B.cuda_version_mismatch
nvidia_wheel_include_dirs = B.nvidia_wheel_include_dirs


def env_flag(name):
    """None when unset, else True/False for '1'/'0' (anything else is an error)."""
    try:
        return B.env_flag(name)
    except B.BuildError as error:
        sys.exit(f"setup.py: {error}")


class BuildPy(build_py):
    """Also ships csrc/ as lsr_fast/_csrc (what lsr_fast compiles on first use when the wheel has
    no extension) and writes lsr_fast/_build_info.py saying why no extension was built, when none
    is; build_ext overwrites that file with what it built."""

    no_extension_info = None  # set by extension_modules() when no extension is built

    def run(self):
        super().run()
        if self.editable_mode:  # the package is the source tree, whose csrc/ lies next to it
            if self.no_extension_info is not None:
                B.write_build_info(os.path.join(ROOT, "lsr_fast", B.BUILD_INFO_FILE), self.no_extension_info)
            return
        package = os.path.join(self.build_lib, "lsr_fast")
        target = os.path.join(package, "_csrc")
        if os.path.isdir(CSRC):
            shutil.rmtree(target, ignore_errors=True)
            for rel in B.source_files(CSRC):
                os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
                shutil.copyfile(os.path.join(CSRC, rel), os.path.join(target, rel))
        info = self.no_extension_info or {"extension": False, "cause": "failed",
                                          "reason": "the extension build did not run to its end"}
        B.write_build_info(os.path.join(package, B.BUILD_INFO_FILE), info)


def no_extension(cause, detail, identity=None):
    """([], cmdclass) for a build without the extension, recording why."""
    reason = B.CAUSES[cause] + (f" ({detail})" if detail else "")
    if cause != "disabled":
        warnings.warn(f"lsr_fast: {reason}; lsr_fast will compile it on first import "
                      f"(or run `{B.FIX_COMMAND}`), unless LSR_FAST_JIT=0")
    BuildPy.no_extension_info = dict(identity or {}, extension=False, cause=cause, reason=reason)
    return [], {"build_py": BuildPy}


def extension_modules():
    """(ext_modules, cmdclass): the extension, or none with the reason recorded for lsr_fast."""
    ext_flag = env_flag("LSR_FAST_EXT")
    if ext_flag is False:
        return no_extension("disabled", "")
    required = ext_flag is True
    force_cuda = env_flag("LSR_FAST_CUDA")
    toolkit = cuda_toolkit_root() if force_cuda is not False else None
    if toolkit and not os.environ.get("CUDA_HOME"):
        # cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = toolkit
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        isolated = B.isolated_build()
        hint = " (this is an isolated build: use `pip install --no-build-isolation`)" if isolated else ""
        if force_cuda or required:
            sys.exit(f"setup.py: {'LSR_FAST_CUDA' if force_cuda else 'LSR_FAST_EXT'}=1 but torch cannot be imported: {error}{hint}")
        return no_extension("isolated" if isolated else "no_torch", str(error))
    identity = B.torch_identity(torch)
    compiler = B.find_compiler()
    if compiler is None:
        detail = f"CXX={os.environ['CXX']!r} is not on PATH" if os.environ.get("CXX") else "c++ is not on PATH"
        if required or force_cuda:
            sys.exit(f"setup.py: the extension is required but no C++ compiler was found ({detail})")
        return no_extension("no_compiler", detail, identity)

    plan = B.cuda_plan(torch.__version__, torch.version.cuda, force_cuda, toolkit=toolkit)
    with_cuda = plan["with_cuda"]
    if force_cuda and not with_cuda:
        sys.exit("setup.py: LSR_FAST_CUDA=1 but " + plan["reason"])
    if plan["reason"] and torch.version.cuda is not None and plan["toolkit"] is not None:
        # A CUDA build of torch with an unusable toolkit: still build the CPU kernels.
        warnings.warn("lsr_fast: building without the CUDA kernels: " + plan["reason"])
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = B.DEFAULT_ARCH_LIST

    # Relative source paths: setuptools wants them so (the build is run from ROOT).
    sources = [os.path.relpath(path, ROOT) for path in B.sources(CSRC, with_cuda)]
    extra = {"cxx": list(B.CXX_FLAGS)}
    if with_cuda:
        extra["nvcc"] = list(B.NVCC_FLAGS)
    extension_class = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    extension = extension_class(
        "lsr_fast._C",
        sources,
        include_dirs=B.include_dirs(CSRC, with_cuda),
        extra_compile_args=extra,
        extra_link_args=list(B.LINK_FLAGS),
        py_limited_api=False,
    )
    built_info = dict(identity, extension=True, cause="", reason="", cuda=with_cuda, cuda_reason=plan["reason"],
                      toolkit=plan["toolkit"], toolkit_version=plan["toolkit_version"],
                      arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST", "the visible GPUs") if with_cuda else None,
                      sources_hash=B.sources_hash(CSRC))

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Turns a failed optional build into a warning (a forced one still fails), records what was
        built in _build_info.py, and keeps editable builds' objects in build/ for ninja to reuse."""

        failure = ""

        def finalize_options(self):
            super().finalize_options()
            if self.editable_mode:
                # setuptools gives editable builds a fresh temporary folder: every
                # `pip install -e .` would recompile everything. build/ lets ninja relink only.
                self.build_temp = os.path.join(ROOT, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")

        def run(self):
            lock = os.path.join(self.build_temp, ".lsr_fast-build.lock")
            with B.file_lock(lock, on_wait=lambda: print(f"lsr_fast: waiting for another build in {self.build_temp}", flush=True)):
                try:
                    super().run()
                except Exception as error:  # noqa: BLE001 - any compiler failure
                    if force_cuda or required:
                        raise
                    self.failure = self.failure or str(error)
                    warnings.warn(f"lsr_fast: building the compiled extension failed ({error}); lsr_fast will "
                                  f"try again on first import (or run `{B.FIX_COMMAND}`)")
            self.write_info()

        def copy_file(self, infile, outfile, *args, **kwargs):
            """The in-place copy of the library goes to a new file renamed over the old one: a running
            process that has the old one loaded keeps its inode (rewriting it in place crashes it)."""
            if not str(outfile).endswith((".so", ".pyd", ".dylib")) or self.dry_run:
                return super().copy_file(infile, outfile, *args, **kwargs)
            tmp = f"{outfile}.{os.getpid()}.tmp"
            shutil.copyfile(infile, tmp)
            shutil.copymode(infile, tmp)
            os.replace(tmp, outfile)
            return outfile, True

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001
                if force_cuda or required:
                    raise
                self.failure = str(error)
                stale = self.get_ext_fullpath(ext.name)  # in build/: setuptools would copy it in place
                if os.path.isfile(stale):
                    os.remove(stale)
                warnings.warn(f"lsr_fast: building {ext.name} failed ({error})")

        def write_info(self):
            filename = self.get_ext_filename(self.get_ext_fullname("lsr_fast._C"))
            build_folder = os.path.dirname(os.path.join(self.build_lib, filename))
            folders = [build_folder]
            if self.inplace and not self.failure:  # a failed build leaves the in-place pair as it was
                folders.append(self.get_finalized_command("build_py").get_package_dir("lsr_fast"))
            for folder in folders:
                so = os.path.join(folder, os.path.basename(filename))
                if os.path.isfile(so) and not self.failure:
                    info = dict(built_info, so=os.path.basename(so), so_size=os.path.getsize(so))
                else:
                    if os.path.isfile(so):  # an earlier build's library must not go into the wheel
                        os.remove(so)
                    info = dict(identity, extension=False, cause="failed",
                                reason=B.CAUSES["failed"] + f" ({self.failure or 'no ' + os.path.basename(filename)})")
                B.write_build_info(os.path.join(folder, B.BUILD_INFO_FILE), info)

    print(f"lsr_fast: building the extension with {'CPU and CUDA' if with_cuda else 'CPU'} kernels"
          + (f" (toolkit {plan['toolkit']}, arch list {os.environ.get('TORCH_CUDA_ARCH_LIST', 'auto')})" if with_cuda else ""))
    BuildPy.no_extension_info = None
    return [extension], {"build_py": BuildPy, "build_ext": OptionalBuildExt.with_options(no_python_abi_suffix=False)}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its helpers
    ext_modules, cmdclass = extension_modules()
    setup(packages=find_packages(include=["lsr_fast", "lsr_fast.*"]), ext_modules=ext_modules, cmdclass=cmdclass)
