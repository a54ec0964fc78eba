"""Finds, checks and loads the compiled extension ``lsr_fast._C``; compiles it on first use.

Where the extension comes from, first usable wins:

1. the per-torch cache: ``$LSR_FAST_CACHE_DIR`` (default ``~/.cache/lsr_fast``), one folder per
   torch version, C++ ABI and hash of the sources, flags and torch build
   (``2.13.0+cpu-cxx11abi-3f2a...``), filled by ``python -m lsr_fast.build`` or by compiling on
   first use;
2. ``lsr_fast/_C*.so`` installed with the package (``pip install --no-build-isolation``, a wheel),
   used only when its ``_build_info.py`` says it was built for this torch;
3. compiling on first use (unless ``LSR_FAST_JIT=0``): ``torch.utils.cpp_extension.load`` on the
   same sources with the same flags as setup.py (lsr_fast._build), in a subprocess whose output is
   the build log, under a file lock so that the processes torchrun starts compile once.

A cache folder is used only when its manifest names this key and the sha256 of its library
matches; anything else (an interrupted build, a damaged file) is deleted and rebuilt. A failed
compile is recorded and not retried on every import: ``python -m lsr_fast.build`` retries it.
An installed extension built for another torch is never loaded (that is an undefined-symbol
error, or a crash): the reason names both versions and the command that fixes it.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from types import ModuleType
from typing import Dict, List, Optional, Tuple

import torch

from . import _build as B

JIT_ENV = "LSR_FAST_JIT"
CACHE_ENV = "LSR_FAST_CACHE_DIR"
MANIFEST = "manifest.json"
FAILED = "failed.json"
LOG = "build.log"
FORMAT = 1  # of the cache key and manifest; bump to invalidate every cache folder

# Runs compile_main of lsr_fast/_build.py by path: importing the lsr_fast package in the compile
# process would load (and register) an extension there already.
_CHILD = ("import importlib.util, sys\n"
          "spec = importlib.util.spec_from_file_location('lsr_fast_build_helpers', sys.argv[1])\n"
          "module = importlib.util.module_from_spec(spec)\n"
          "spec.loader.exec_module(module)\n"
          "sys.exit(module.compile_main(sys.argv[2]))\n")

_loaded: Optional[Dict] = None  # what load() loaded: path, origin and what it was built for


class CompileError(RuntimeError):
    """Compiling the extension failed or cannot start; the message says why and what to do."""


def say(message: str) -> None:
    print(f"lsr_fast: {message}", file=sys.stderr, flush=True)


# ---- the cache ------------------------------------------------------------------------------


def cache_root() -> str:
    """$LSR_FAST_CACHE_DIR, else $XDG_CACHE_HOME/lsr_fast, else ~/.cache/lsr_fast."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lsr_fast")


def cache_key(identity: Dict, sources_hash: str) -> str:
    """The cache folder's name: <torch version>-<C++ ABI>-<hash of sources, flags and torch build>."""
    digest = hashlib.sha256(json.dumps({"format": FORMAT, "torch": identity, "sources": sources_hash},
                                       sort_keys=True).encode()).hexdigest()[:16]
    version = re.sub(r"[^A-Za-z0-9._+-]", "_", str(identity["torch"]))
    return f"{version}-{'cxx11abi' if identity['cxx11abi'] else 'precxx11abi'}-{digest}"


def cache_entry(identity: Optional[Dict] = None) -> Optional[Tuple[str, str, str]]:
    """(folder, key, sources folder) for this torch and these sources; None without sources."""
    root = B.source_root()
    if root is None:
        return None
    key = cache_key(identity or B.torch_identity(torch), B.sources_hash(root))
    return os.path.join(cache_root(), key), key, root


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_entry(folder: str, key: str) -> Tuple[Optional[Dict], str]:
    """(manifest, "") when ``folder`` holds a complete, intact build for ``key``; else (None, why not)."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        return None, "not built"
    if not os.path.isfile(path):
        return None, f"{folder} holds no {MANIFEST} (an interrupted or failed build)"
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        so = os.path.join(folder, manifest["so"])
        expected, recorded_key, fmt = manifest["so_sha256"], manifest["key"], manifest["format"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"{path} is unreadable ({error})"
    if fmt != FORMAT or recorded_key != key:
        return None, f"{path} describes another build ({recorded_key}, format {fmt})"
    if not os.path.isfile(so):
        return None, f"{so} is missing"
    if file_sha256(so) != expected:
        return None, f"{so} does not match the sha256 its manifest recorded (damaged or overwritten)"
    return manifest, ""


# ---- loading ----------------------------------------------------------------------------------


def package_extension() -> Optional[str]:
    """The lsr_fast/_C*.so installed with the package, or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(B.PACKAGE_DIR, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def package_build_info() -> Optional[Dict]:
    return B.read_build_info(os.path.join(B.PACKAGE_DIR, B.BUILD_INFO_FILE))


def import_extension(path: str) -> ModuleType:
    """Load ``path`` as lsr_fast._C (its static initialisers register torch.ops.lsr_fast.*)."""
    spec = importlib.util.spec_from_file_location("lsr_fast._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["lsr_fast._C"] = module
    package = sys.modules.get("lsr_fast")
    if package is not None:
        package._C = module
    return module


def describe_load_error(path: str, error: BaseException) -> str:
    text = str(error)
    if "undefined symbol" in text or "symbol not found" in text.lower():
        return (f"{path} was built against another torch than this {B.describe_torch(B.torch_identity(torch))} "
                f"(loading it fails: {text})")
    return f"{path} does not load ({type(error).__name__}: {text})"


def jit_setting() -> Tuple[bool, str]:
    """(compile on first use?, why not) from LSR_FAST_JIT (default on)."""
    try:
        return B.env_flag(JIT_ENV) is not False, ""
    except B.BuildError as error:
        return False, str(error)


def load() -> Tuple[Optional[ModuleType], str]:
    """(lsr_fast._C, "") or (None, why not and the command that fixes it). Called once, when
    lsr_fast.ops._compiled is imported."""
    global _loaded
    running = B.torch_identity(torch)
    notes: List[str] = []
    try:
        entry = cache_entry(running)
    except OSError as error:  # an unreadable source file: no cache lookup, no compiling
        entry = None
        notes.append(f"the C++ sources cannot be read ({error})")
    cache_broken = False
    if entry is not None:
        manifest, _ = check_entry(entry[0], entry[1])
        if manifest is not None:
            so = os.path.join(entry[0], manifest["so"])
            try:
                module = import_extension(so)
            except (ImportError, OSError) as error:
                notes.append(describe_load_error(so, error))
                cache_broken = True  # rebuilt below, never used again
            else:
                _loaded = dict(manifest, path=so, origin="cache")
                return module, ""

    so = package_extension()
    record = package_build_info()
    if so is not None:
        trusted = bool(record and record.get("extension") and record.get("so") == os.path.basename(so)
                       and record.get("so_size") == os.path.getsize(so))
        mismatch = B.identity_mismatch(record, running) if trusted else ""
        if mismatch:
            notes.append(f"the installed extension {so} is not loaded: {mismatch}")
        else:
            try:
                module = import_extension(so)
            except (ImportError, OSError) as error:
                notes.append(describe_load_error(so, error))
            else:
                _loaded = dict(record if trusted else {}, path=so, origin="package")
                return module, ""
    elif record and not record.get("extension"):
        notes.append(record.get("reason") or B.CAUSES.get(record.get("cause"), "the extension was not built"))
    else:
        notes.append(f"the compiled extension lsr_fast._C is not built (no _C*.so in {B.PACKAGE_DIR})")
    return compile_on_first_use(entry, running, notes, rebuild=cache_broken)


def compile_on_first_use(entry, running: Dict, notes: List[str], rebuild: bool = False) -> Tuple[Optional[ModuleType], str]:
    global _loaded
    cause = "; ".join(notes)
    enabled, problem = jit_setting()
    if not enabled:
        why = problem or f"compiling on first use is off ({JIT_ENV}=0)"
        return None, f"{cause}; {why}. Fix: run `{B.FIX_COMMAND}`" + (
            f" (or reinstall: {B.REINSTALL_COMMAND})" if "is not loaded" in cause or "another torch" in cause else "")
    try:
        manifest = build(entry, running, explicit=False, force=rebuild)
        so = os.path.join(os.path.dirname(manifest["path"]), manifest["so"])
    except CompileError as error:
        return None, f"{cause}; {error}"
    except OSError as error:  # e.g. a read-only home: the cache cannot be written
        return None, (f"{cause}; compiling on first use could not use the cache folder {cache_root()} ({error}). "
                      f"Fix: set {CACHE_ENV} to a writable folder, then run `{B.FIX_COMMAND}`")
    try:
        module = import_extension(so)
    except (ImportError, OSError) as error:
        return None, f"{cause}; compiling on first use succeeded but {describe_load_error(so, error)}. Fix: run `{B.FIX_COMMAND} --force`"
    _loaded = dict(manifest, path=so, origin="cache")
    return module, ""


def extension_info() -> Optional[Dict]:
    """What load() loaded: path, origin ("cache" or "package"), the torch it was built for, CUDA
    kernels (cuda, cuda_reason, arch_list); None when no extension is loaded."""
    return dict(_loaded) if _loaded is not None else None


# ---- compiling --------------------------------------------------------------------------------


def build_plan(entry, running: Dict) -> Dict:
    """What to compile, for lsr_fast._build.compile_main; CompileError when it cannot start."""
    folder, key, root = entry
    compiler = B.find_compiler()
    if compiler is None:
        which = f"CXX={os.environ['CXX']!r} is not on PATH" if os.environ.get("CXX") else "c++ is not on PATH"
        raise CompileError(f"no C++ compiler found ({which}): install one (e.g. `apt install g++`, or set CXX), "
                           f"then run `{B.FIX_COMMAND}`")
    if B.find_ninja() is None:
        raise CompileError(f"ninja is not installed (torch.utils.cpp_extension.load needs it): `pip install ninja`, "
                           f"then run `{B.FIX_COMMAND}`")
    try:
        force_cuda = B.env_flag("LSR_FAST_CUDA")
    except B.BuildError as error:
        raise CompileError(str(error)) from None
    cuda = B.cuda_plan(running["torch"], running["torch_cuda"], force_cuda)
    if force_cuda and not cuda["with_cuda"]:
        raise CompileError(f"LSR_FAST_CUDA=1 but {cuda['reason']}")
    arch_list = None
    if cuda["with_cuda"]:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or (None if torch.cuda.is_available() else B.DEFAULT_ARCH_LIST)
    return {
        "key": key, "build_dir": folder, "sources_root": root, "compiler": compiler,
        "sources": B.sources(root, cuda["with_cuda"]), "include_dirs": B.include_dirs(root, cuda["with_cuda"]),
        "cxx_flags": B.CXX_FLAGS + B.JIT_CXX_FLAGS, "link_flags": list(B.LINK_FLAGS), "nvcc_flags": list(B.NVCC_FLAGS),
        "with_cuda": cuda["with_cuda"], "cuda_reason": cuda["reason"], "cuda_home": cuda["toolkit"] if cuda["with_cuda"] else None,
        "toolkit": cuda["toolkit"], "toolkit_version": cuda["toolkit_version"], "arch_list": arch_list,
    }


def first_error_line(log: str) -> str:
    try:
        with open(log, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return ""
    for line in lines:
        if "Ninja is required" in line:
            return "ninja is missing (`pip install ninja`)"
        if re.search(r"(\berror\b|fatal)", line) and not line.startswith("[") and "Werror" not in line:
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else ""


def build(entry, running: Optional[Dict] = None, *, explicit: bool, force: bool = False) -> Dict:
    """Compile the extension into the cache folder ``entry`` (from cache_entry()) unless a
    complete build is there; returns its manifest (with "path": the manifest's path).

    Holds the folder's lock: concurrent callers wait, then use the build. A folder that fails
    check_entry is deleted first. After a failed compile, later non-``explicit`` calls raise
    CompileError naming the log instead of compiling again; ``explicit`` (python -m lsr_fast.build)
    and ``force`` always compile."""
    if entry is None:
        raise CompileError("the C++ sources are not installed (neither lsr_fast/_csrc nor a csrc/ folder next to the "
                           "package): reinstall lsr_fast from its source, e.g. `pip install <sdist or git URL>`")
    running = running or B.torch_identity(torch)
    folder, key, _ = entry
    plan = build_plan(entry, running)  # before the lock: a missing compiler needs no waiting
    waited = []

    def on_wait():
        waited.append(True)
        say(f"waiting for another process that compiles the kernels into {folder} ...")

    with B.file_lock(folder + ".lock", on_wait=on_wait):
        manifest, problem = check_entry(folder, key)
        if manifest is not None and not force:
            return dict(manifest, path=os.path.join(folder, MANIFEST))
        failed = os.path.join(folder, FAILED)
        if not explicit and not force and os.path.isfile(failed):
            try:
                with open(failed, encoding="utf-8") as handle:
                    previous = json.load(handle)
            except (OSError, ValueError):
                previous = {"log": os.path.join(folder, LOG), "error": "unknown"}
            raise CompileError(f"compiling the extension failed before ({previous.get('error')}; log: {previous.get('log')}); "
                               f"fix the cause, then run `{B.FIX_COMMAND}`")
        if os.path.isdir(folder):
            if problem != "not built" and not force:
                say(f"discarding the cached build in {folder}: {problem}")
            shutil.rmtree(folder)
        os.makedirs(folder)
        return _compile(plan, running)


def _compile(plan: Dict, running: Dict) -> Dict:
    folder = plan["build_dir"]
    log = os.path.join(folder, LOG)
    plan_path = os.path.join(folder, "plan.json")
    B.write_text_atomic(plan_path, json.dumps(plan, indent=1))
    what = "C++ and CUDA" if plan["with_cuda"] else "C++"
    say(f"compiling the {what} kernels for {B.describe_torch(running)} into {folder} "
        f"(once per torch version; a few minutes on few cores; log: {log}; {JIT_ENV}=0 turns this off)")
    env = dict(os.environ)
    ninja = B.find_ninja()
    if ninja and not shutil.which("ninja"):  # the venv's ninja, its bin/ not on PATH (not activated)
        env["PATH"] = os.path.dirname(ninja) + os.pathsep + env.get("PATH", "")
    start = time.time()
    with open(log, "w", encoding="utf-8") as out:
        status = subprocess.run([sys.executable, "-c", _CHILD, B.__file__, plan_path], stdout=out,
                                stderr=subprocess.STDOUT, cwd=folder, env=env, check=False).returncode
    result_path = os.path.join(folder, "result.json")
    if status != 0 or not os.path.isfile(result_path):
        error = first_error_line(log) or f"exit status {status}"
        B.write_text_atomic(os.path.join(folder, FAILED), json.dumps({"key": plan["key"], "status": status,
                                                                      "error": error, "log": log}))
        say(f"compiling the kernels failed after {time.time() - start:.0f} s: {error} (log: {log})")
        raise CompileError(f"compiling the extension failed ({error}); log: {log}. Fix the cause, then run `{B.FIX_COMMAND}`")
    with open(result_path, encoding="utf-8") as handle:
        so = json.load(handle)["so"]
    manifest = {
        "format": FORMAT, "key": plan["key"], **running, "so": os.path.relpath(so, folder), "so_sha256": file_sha256(so),
        "so_size": os.path.getsize(so), "cuda": plan["with_cuda"], "cuda_reason": plan["cuda_reason"],
        "toolkit": plan["toolkit"], "toolkit_version": plan["toolkit_version"],
        "arch_list": (plan["arch_list"] or "the visible GPUs") if plan["with_cuda"] else None,
        "sources_root": plan["sources_root"], "compiler": plan["compiler"], "log": log,
        "seconds": round(time.time() - start, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    B.write_text_atomic(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1))
    say(f"compiled in {manifest['seconds']:.0f} s: {so}")
    return dict(manifest, path=os.path.join(folder, MANIFEST))
