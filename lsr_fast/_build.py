"""What the compiled extension ``lsr_fast._C`` is built from, and how: one list for setup.py
(build at install time) and lsr_fast._loader (compile on first use, ``python -m lsr_fast.build``).

This module imports nothing outside the standard library at import time: setup.py loads it by
path in a build environment that may have no torch (pip's isolated build), and a compile
subprocess runs ``compile_main`` from it without importing the lsr_fast package.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import time
from typing import Dict, Iterator, List, Optional

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

# The C++/CUDA compiler flags. No -std flag: cpp_extension picks the standard torch's headers
# need (C++20 for torch >= 2.10).
CXX_FLAGS = ["-O3"] + (["-fopenmp"] if sys.platform != "win32" else [])
LINK_FLAGS = ["-fopenmp"] if sys.platform != "win32" else []
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
# setup.py's builds also get Python's own CFLAGS (sysconfig: -DNDEBUG -g -fwrapv -O3 -Wall);
# compiling on first use (cpp_extension.load) does not, so it adds the one that changes the code.
JIT_CXX_FLAGS = ["-DNDEBUG"]
# With no GPU to ask, cpp_extension cannot pick the architectures: Ampere and Hopper SASS, plus
# Hopper PTX that newer GPUs can JIT-compile.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"

BUILD_INFO_FILE = "_build_info.py"  # written next to _C by setup.py (see write_build_info)
FIX_COMMAND = "python -m lsr_fast.build"  # also `lsr-fast build`
REINSTALL_COMMAND = "pip install --no-build-isolation --force-reinstall --no-deps <lsr_fast source>"

# Why an installed lsr_fast has no compiled extension: the "cause" field of the build info.
CAUSES = {
    "isolated": "pip built lsr_fast in an isolated build environment that had no torch (pip's default build "
                "isolation), so the extension was not compiled at install time",
    "no_torch": "torch was not importable when lsr_fast was built, so the extension was not compiled",
    "disabled": "lsr_fast was built with LSR_FAST_EXT=0 (no compiled extension)",
    "no_compiler": "no C++ compiler was found when lsr_fast was built",
    "failed": "compiling the extension failed when lsr_fast was built",
}


class BuildError(RuntimeError):
    """A build setting or step that cannot work; the message names the setting or file."""


def env_flag(name: str) -> Optional[bool]:
    """None when the environment variable is unset or empty, else True/False for '1'/'0'."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise BuildError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


# ---- sources --------------------------------------------------------------------------------


def source_root(package_dir: str = PACKAGE_DIR) -> Optional[str]:
    """The csrc/ folder: lsr_fast/_csrc in an installed wheel (setup.py copies it there), else
    the checkout's csrc/ next to the package (editable installs, a source tree); None if neither."""
    for root in (os.path.join(package_dir, "_csrc"), os.path.join(os.path.dirname(package_dir), "csrc")):
        if os.path.isfile(os.path.join(root, "ops.cpp")):
            return root
    return None


def sources(root: str, with_cuda: bool) -> List[str]:
    """The translation units of the extension, absolute paths, in a fixed order."""
    files = sorted(glob.glob(os.path.join(root, "*.cpp"))) + sorted(glob.glob(os.path.join(root, "cpu", "*.cpp")))
    if with_cuda:
        files += sorted(glob.glob(os.path.join(root, "cuda", "*.cu")))
    return [os.path.abspath(f) for f in files]


def source_files(root: str) -> List[str]:
    """Every file the build reads from ``root`` (sources and headers), relative, sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in files:
            if name.endswith((".cpp", ".cu", ".h", ".cuh", ".hpp")):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


def sources_hash(root: str) -> str:
    """sha256 over the sources, the headers and the flags: what a build's result depends on
    besides torch and Python (which the cache key adds)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([CXX_FLAGS, LINK_FLAGS, NVCC_FLAGS, JIT_CXX_FLAGS]).encode())
    for rel in source_files(root):
        digest.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as handle:
            digest.update(handle.read())
        digest.update(b"\0")
    return digest.hexdigest()


def find_compiler() -> Optional[str]:
    """The C++ compiler cpp_extension will call ($CXX, else c++), or None when it is not found."""
    name = os.environ.get("CXX") or ("cl" if sys.platform == "win32" else "c++")
    return shutil.which(name.split()[0])


def find_ninja() -> Optional[str]:
    """ninja (cpp_extension.load needs it): on PATH or in this interpreter's scripts folder."""
    found = shutil.which("ninja")
    if found:
        return found
    candidate = os.path.join(os.path.dirname(sys.executable), "ninja")
    return candidate if os.path.isfile(candidate) else None


def isolated_build() -> bool:
    """True inside an isolated PEP 517 build environment (pip's pip-build-env-*, build's build-env-*)."""
    return any(re.search(r"(pip-build-env-|build-env-)", entry or "") for entry in sys.path)


# ---- CUDA -----------------------------------------------------------------------------------


def cuda_toolkit_root() -> Optional[str]:
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


def toolkit_version(root: str) -> Optional[str]:
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


def cuda_version_mismatch(toolkit: str, toolkit_ver: Optional[str], torch_cuda: Optional[str]) -> str:
    """Why a toolkit cannot build for this torch (cpp_extension refuses another CUDA major), or ""."""
    if toolkit_ver is None or torch_cuda is None or toolkit_ver.split(".")[0] == torch_cuda.split(".")[0]:
        return ""
    return (f"the CUDA toolkit at {toolkit} is {toolkit_ver} but torch was built with CUDA {torch_cuda} "
            f"(the major versions must match: set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]}.x toolkit)")


def cuda_plan(torch_version: str, torch_cuda: Optional[str], force_cuda: Optional[bool],
              toolkit: Optional[str] = None) -> Dict:
    """Whether to compile the CUDA sources: {"with_cuda", "toolkit", "toolkit_version", "reason"}.

    ``reason`` says why not ("" when they are compiled). ``force_cuda`` is LSR_FAST_CUDA: False
    leaves them out, True makes a missing requirement an error for the caller to raise, None
    compiles them when torch is a CUDA build and a toolkit of the same major version is found.
    """
    if force_cuda is False:
        return {"with_cuda": False, "toolkit": None, "toolkit_version": None, "reason": "LSR_FAST_CUDA=0"}
    if toolkit is None and torch_cuda is not None:
        toolkit = cuda_toolkit_root()
    reasons = []
    version = toolkit_version(toolkit) if toolkit else None
    if torch_cuda is None:
        reasons.append(f"torch {torch_version} is not a CUDA build")
    elif toolkit is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)")
    else:
        mismatch = cuda_version_mismatch(toolkit, version, torch_cuda)
        if mismatch:
            reasons.append(mismatch)
    return {"with_cuda": not reasons, "toolkit": toolkit, "toolkit_version": version, "reason": "; ".join(reasons)}


def nvidia_wheel_include_dirs() -> List[str]:
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


def include_dirs(root: str, with_cuda: bool) -> List[str]:
    return [os.path.abspath(root)] + (nvidia_wheel_include_dirs() if with_cuda else [])


# ---- what a build was made for ----------------------------------------------------------------


def torch_identity(torch) -> Dict:
    """What a compiled extension must match in the torch that loads it (``torch`` is the module)."""
    git = getattr(torch.version, "git_version", None)
    return {
        "torch": torch.__version__,
        "torch_git": git if git and git != "Unknown" else None,
        "torch_cuda": torch.version.cuda,
        "cxx11abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)),
        "python": sys.implementation.cache_tag,
    }


def describe_torch(identity: Dict) -> str:
    cuda = f"CUDA {identity['torch_cuda']}" if identity.get("torch_cuda") else "CPU-only"
    return f"torch {identity.get('torch')} ({cuda}, {identity.get('python')})"


def identity_mismatch(built: Dict, running: Dict) -> str:
    """"" when an extension built for ``built`` can be loaded by ``running``, else what differs."""
    keys = ("torch", "torch_cuda", "cxx11abi", "python")
    differs = [key for key in keys if built.get(key) != running.get(key)]
    if built.get("torch_git") and running.get("torch_git") and built["torch_git"] != running["torch_git"]:
        differs.append("torch_git")
    if not differs:
        return ""
    what = f"it was built for {describe_torch(built)}, but this is {describe_torch(running)}"
    if differs == ["torch_git"]:
        what += f" from another commit ({built['torch_git'][:12]} vs {running['torch_git'][:12]})"
    elif differs == ["cxx11abi"]:
        what += f" with another C++ ABI (_GLIBCXX_USE_CXX11_ABI {int(built['cxx11abi'])} vs {int(running['cxx11abi'])})"
    return what


def write_text_atomic(path: str, text: str) -> None:
    """Temporary file in the same folder, flush, fsync, rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_build_info(path: str, info: Dict) -> None:
    """lsr_fast/_build_info.py: a literal dict the loader reads before it loads _C, so that an
    extension built for another torch is reported, never loaded (an undefined-symbol error or
    worse)."""
    info = dict(info, built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_text_atomic(path, "# Written by lsr_fast's setup.py when the package was built; read by lsr_fast._loader.\n"
                            f"BUILD_INFO = {info!r}\n")


def read_build_info(path: str) -> Optional[Dict]:
    """The dict of a _build_info.py, or None when the file is missing or not one of ours."""
    import ast

    try:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), path)
        for node in tree.body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["BUILD_INFO"]:
                value = ast.literal_eval(node.value)
                return value if isinstance(value, dict) else None
    except (OSError, SyntaxError, ValueError):
        return None
    return None


# ---- a lock between processes (torchrun starts several that import lsr_fast at once) ---------


@contextlib.contextmanager
def file_lock(path: str, on_wait=None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block; ``on_wait()`` is
    called once when another process holds it. The OS drops the lock if the holder dies."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # Windows
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        else:
            import msvcrt

            waited = False
            while True:
                try:
                    handle.seek(0)
                    msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
                    break
                except OSError:
                    if not waited and on_wait is not None:
                        on_wait()
                    waited = True
                    time.sleep(0.5)
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)


# ---- the compile subprocess of lsr_fast._loader -------------------------------------------------


def compile_main(plan_path: str) -> int:
    """Compile the extension with torch.utils.cpp_extension.load as ``plan_path`` (JSON) says,
    load it once to check it, and write result.json next to it. Runs in a subprocess whose output
    is the build log; returns the exit status."""
    with open(plan_path, encoding="utf-8") as handle:
        plan = json.load(handle)
    if plan.get("cuda_home"):
        os.environ["CUDA_HOME"] = plan["cuda_home"]  # cpp_extension reads it when imported
    if plan.get("arch_list"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = plan["arch_list"]
    start = time.time()
    print(f"lsr_fast: compiling {len(plan['sources'])} sources into {plan['build_dir']}", flush=True)
    from torch.utils import cpp_extension

    module = cpp_extension.load(
        name="_C",
        sources=plan["sources"],
        extra_cflags=plan["cxx_flags"],
        extra_cuda_cflags=plan["nvcc_flags"] if plan["with_cuda"] else None,
        extra_ldflags=plan["link_flags"],
        extra_include_paths=plan["include_dirs"],
        build_directory=plan["build_dir"],
        with_cuda=plan["with_cuda"],
        verbose=True,
        is_python_module=True,
    )
    result = {"so": os.path.abspath(module.__file__), "seconds": round(time.time() - start, 1)}
    write_text_atomic(os.path.join(plan["build_dir"], "result.json"), json.dumps(result))
    print(f"lsr_fast: built and loaded {result['so']} in {result['seconds']} s", flush=True)
    return 0
