"""Installing lsr_fast with its kernels (docs/install.md): the build record setup.py writes, the
loader's checks (another torch, a missing extension), the compile-on-first-use cache (key, stale
and broken folders, failures, the lock), and the diagnostics available_backends() gives.

Compiles are simulated by a fake compile process, except in the slow test at the end, which
compiles for real (about 3 minutes on 2 cores; LSR_FAST_RUN_SLOW=1 runs it). scripts/check_install.sh
(in CI) covers the wheel and the plain `pip install .` routes end to end.
"""

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from lsr_fast import _build as B
from lsr_fast import _loader
from lsr_fast.ops import _compiled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNING = B.torch_identity(torch)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test gets its own empty cache; compiling on first use is on unless a test says not."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(_loader.CACHE_ENV, str(folder))
    monkeypatch.delenv(_loader.JIT_ENV, raising=False)
    return folder


def simulate_package(monkeypatch, so=None, info=None):
    """The package as installed: its _C*.so path (or None) and its _build_info.py record (or None)."""
    monkeypatch.setattr(_loader, "package_extension", lambda: so)
    monkeypatch.setattr(_loader, "package_build_info", lambda: info)


# ---- diagnostics: a missing extension, another torch ------------------------------------------


def test_isolated_build_without_jit_names_the_cause_and_the_fix(monkeypatch):
    info = {"extension": False, "cause": "isolated", "reason": B.CAUSES["isolated"] + " (No module named 'torch')"}
    simulate_package(monkeypatch, None, info)
    monkeypatch.setenv(_loader.JIT_ENV, "0")
    module, reason = _loader.load()
    assert module is None
    assert "isolated build environment that had no torch" in reason
    assert "LSR_FAST_JIT=0" in reason and "python -m lsr_fast.build" in reason
    assert "circular import" not in reason and "reinstall with a C++ compiler" not in reason


def test_extension_never_built_is_not_a_circular_import(monkeypatch):
    simulate_package(monkeypatch, None, None)
    monkeypatch.setenv(_loader.JIT_ENV, "0")
    _, reason = _loader.load()
    assert "lsr_fast._C is not built" in reason and B.PACKAGE_DIR in reason
    assert "circular" not in reason


def test_extension_built_for_another_torch_is_not_loaded(monkeypatch, tmp_path):
    so = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    so.write_bytes(b"garbage: loading it would raise, so the test would see 'does not load'")
    info = dict(RUNNING, torch="2.1.0+cu118", torch_cuda="11.8", extension=True, so=so.name, so_size=so.stat().st_size)
    simulate_package(monkeypatch, str(so), info)
    monkeypatch.setattr(_loader, "import_extension", lambda path: pytest.fail(f"loaded {path} built for another torch"))
    monkeypatch.setenv(_loader.JIT_ENV, "0")
    module, reason = _loader.load()
    assert module is None
    assert "torch 2.1.0+cu118 (CUDA 11.8" in reason and f"torch {torch.__version__}" in reason
    assert "python -m lsr_fast.build" in reason and "--no-build-isolation --force-reinstall" in reason
    assert "undefined symbol" not in reason


def test_a_record_about_another_file_is_not_trusted(monkeypatch, tmp_path):
    """A _build_info.py left by an earlier build (other size) does not vouch for the library:
    it is loaded with its load error translated."""
    so = tmp_path / "_C.so"
    so.write_bytes(b"x" * 10)
    info = dict(RUNNING, extension=True, so=so.name, so_size=99)
    simulate_package(monkeypatch, str(so), info)

    def undefined_symbol(path):
        raise ImportError(f"{path}: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")

    monkeypatch.setattr(_loader, "import_extension", undefined_symbol)
    monkeypatch.setenv(_loader.JIT_ENV, "0")
    _, reason = _loader.load()
    assert "was built against another torch" in reason and torch.__version__ in reason
    assert "python -m lsr_fast.build" in reason


def test_bad_jit_flag_is_named(monkeypatch):
    simulate_package(monkeypatch, None, None)
    monkeypatch.setenv(_loader.JIT_ENV, "yes")
    _, reason = _loader.load()
    assert "LSR_FAST_JIT must be 0 or 1, got 'yes'" in reason


def test_missing_compiler_is_named_with_the_fix(monkeypatch):
    simulate_package(monkeypatch, None, {"extension": False, "cause": "isolated", "reason": B.CAUSES["isolated"]})
    monkeypatch.setenv("CXX", "no-such-compiler-lsr")
    _, reason = _loader.load()
    assert "no C++ compiler found (CXX='no-such-compiler-lsr' is not on PATH)" in reason
    assert "apt install g++" in reason and "python -m lsr_fast.build" in reason


def test_unwritable_cache_is_named_not_raised(monkeypatch, tmp_path):
    simulate_package(monkeypatch, None, None)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(_loader.CACHE_ENV, str(blocker / "cache"))  # a folder under a file: cannot exist
    monkeypatch.setattr(_loader, "build_plan", lambda entry, running: {})
    _, reason = _loader.load()
    assert f"could not use the cache folder {blocker / 'cache'}" in reason and "LSR_FAST_CACHE_DIR" in reason


def test_missing_sources_are_named(monkeypatch):
    simulate_package(monkeypatch, None, None)
    monkeypatch.setattr(B, "source_root", lambda package_dir=None: None)
    _, reason = _loader.load()
    assert "the C++ sources are not installed" in reason


def test_cuda_backend_names_why_the_cuda_kernels_are_missing(monkeypatch):
    if _compiled._LOAD_ERROR:
        pytest.skip(f"no compiled extension here: {_compiled._LOAD_ERROR}")
    if all(torch._C._dispatch_has_kernel_for_dispatch_key(f"lsr_fast::{op}", "CUDA") for op in _compiled.OPS):
        pytest.skip("this build has the CUDA kernels")
    why = "the CUDA toolkit at /opt/cuda is 12.4 but torch was built with CUDA 13.0"
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(_loader, "extension_info", lambda: {"path": "/x/_C.so", "cuda": False, "cuda_reason": why})
    reason = _compiled.unavailable_reason("cuda")
    assert "built without CUDA sources" in reason and why in reason and "python -m lsr_fast.build --force" in reason


def test_the_build_in_use_is_recorded():
    if _compiled._LOAD_ERROR:
        pytest.skip(f"no compiled extension here: {_compiled._LOAD_ERROR}")
    info = _loader.extension_info()
    assert info["origin"] in ("package", "cache") and os.path.isfile(info["path"])
    assert sys.modules["lsr_fast._C"].__file__ == info["path"]


# ---- what a build was made for -------------------------------------------------------------------


def test_identity_mismatch_names_what_differs():
    assert B.identity_mismatch(RUNNING, RUNNING) == ""
    other = dict(RUNNING, torch="2.4.1")
    assert "built for torch 2.4.1" in B.identity_mismatch(other, RUNNING)
    abi = dict(RUNNING, cxx11abi=not RUNNING["cxx11abi"])
    assert "C++ ABI" in B.identity_mismatch(abi, RUNNING)
    commit = dict(RUNNING, torch_git="0" * 40)
    if RUNNING["torch_git"]:
        assert "another commit" in B.identity_mismatch(commit, RUNNING)
    assert B.identity_mismatch(dict(RUNNING, torch_git=None), RUNNING) == ""  # unknown commit: not a mismatch


def test_build_info_round_trip(tmp_path):
    path = tmp_path / "_build_info.py"
    B.write_build_info(str(path), dict(RUNNING, extension=True, so="_C.so", so_size=3))
    info = B.read_build_info(str(path))
    assert info["torch"] == torch.__version__ and info["so_size"] == 3 and "built_at" in info
    path.write_text("BUILD_INFO = __import__('os').system('false')\n")  # never executed
    assert B.read_build_info(str(path)) is None
    assert B.read_build_info(str(tmp_path / "missing.py")) is None


def run_setup(args, cwd, extra_sys_path=(), env=None):
    """setup.py as setuptools runs it, in a subprocess where `import torch` fails."""
    code = ("import runpy, sys\n"
            "sys.modules['torch'] = None  # ImportError on import torch\n"
            f"sys.path.extend({list(extra_sys_path)!r})\n"
            f"sys.argv = ['setup.py'] + {args!r}\n"
            "runpy.run_path('setup.py', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), check=False)


@pytest.fixture
def source_copy(tmp_path):
    """A copy of the source tree's build inputs (setup.py writes egg-info next to them)."""
    tree = tmp_path / "src"
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(os.path.join(ROOT, name), tree / name)
    shutil.copytree(os.path.join(ROOT, "csrc"), tree / "csrc")
    shutil.copytree(os.path.join(ROOT, "lsr_fast"), tree / "lsr_fast",
                    ignore=shutil.ignore_patterns("_C*.so", "_build_info.py", "__pycache__"))
    return tree


def test_isolated_build_records_why_and_ships_the_sources(source_copy, tmp_path):
    lib = tmp_path / "lib"
    done = run_setup(["-q", "build_py", "--build-lib", str(lib)], source_copy,
                     extra_sys_path=[str(tmp_path / "pip-build-env-abc" / "overlay")])
    assert done.returncode == 0, done.stderr
    info = B.read_build_info(str(lib / "lsr_fast" / "_build_info.py"))
    assert info["extension"] is False and info["cause"] == "isolated", info
    assert "isolated build environment that had no torch" in info["reason"]
    shipped = B.source_files(str(lib / "lsr_fast" / "_csrc"))
    assert shipped == B.source_files(os.path.join(ROOT, "csrc")) and "cpu/feature_terms.h" in shipped
    assert B.source_root(str(lib / "lsr_fast")) == str(lib / "lsr_fast" / "_csrc")
    required = run_setup(["-q", "build_py", "--build-lib", str(lib)], source_copy,
                         extra_sys_path=[str(tmp_path / "pip-build-env-abc" / "overlay")], env={"LSR_FAST_EXT": "1"})
    assert required.returncode != 0 and "LSR_FAST_EXT=1 but torch cannot be imported" in required.stderr
    assert "--no-build-isolation" in required.stderr


# ---- the cache: key, stale and broken folders ------------------------------------------------------


def test_cache_key_follows_sources_flags_and_torch(tmp_path, monkeypatch):
    root = tmp_path / "csrc"
    shutil.copytree(os.path.join(ROOT, "csrc"), root)
    key = _loader.cache_key(RUNNING, B.sources_hash(str(root)))
    version, abi, digest = key.rsplit("-", 2)
    assert version == torch.__version__ and abi in ("cxx11abi", "precxx11abi") and len(digest) == 16
    assert _loader.cache_key(RUNNING, B.sources_hash(str(root))) == key  # stable
    with open(root / "cpu" / "cpu_utils.h", "a") as handle:  # a header counts
        handle.write("\n// changed\n")
    changed = _loader.cache_key(RUNNING, B.sources_hash(str(root)))
    assert changed != key
    assert _loader.cache_key(dict(RUNNING, torch="2.99.0"), B.sources_hash(str(root))) != changed
    monkeypatch.setattr(B, "CXX_FLAGS", B.CXX_FLAGS + ["-O0"])
    assert _loader.cache_key(RUNNING, B.sources_hash(str(root))) != changed
    assert _loader.cache_root() == os.environ[_loader.CACHE_ENV]


def make_entry(folder, key, payload=b"library bytes"):
    folder.mkdir(parents=True)
    (folder / "_C.so").write_bytes(payload)
    manifest = {"format": _loader.FORMAT, "key": key, "so": "_C.so", "so_sha256": _loader.file_sha256(str(folder / "_C.so"))}
    (folder / _loader.MANIFEST).write_text(json.dumps(manifest))
    return manifest


def test_check_entry_accepts_only_a_complete_intact_build(tmp_path):
    folder = tmp_path / "entry"
    assert _loader.check_entry(str(folder), "k") == (None, "not built")
    make_entry(folder, "k")
    manifest, problem = _loader.check_entry(str(folder), "k")
    assert manifest is not None and problem == ""
    assert "describes another build" in _loader.check_entry(str(folder), "other-key")[1]
    (folder / "_C.so").write_bytes(b"library bytez")  # same size, other bytes
    assert "does not match the sha256" in _loader.check_entry(str(folder), "k")[1]
    (folder / "_C.so").unlink()
    assert "_C.so is missing" in _loader.check_entry(str(folder), "k")[1]
    (folder / _loader.MANIFEST).write_text("{not json")
    assert "unreadable" in _loader.check_entry(str(folder), "k")[1]
    (folder / _loader.MANIFEST).unlink()
    assert "interrupted or failed build" in _loader.check_entry(str(folder), "k")[1]


FAKE_COMPILE = """
import json, os, sys, time
plan = json.load(open(sys.argv[2]))
folder = plan['build_dir']
with open(os.path.join(os.path.dirname(folder), 'compiles.txt'), 'a') as log:
    log.write('x')
print('fake compile of', len(plan['sources']), 'sources', flush=True)
time.sleep(float(os.environ.get('FAKE_COMPILE_SECONDS', '0')))
if os.environ.get('FAKE_COMPILE_FAIL'):
    print('csrc/cpu/feature_terms.cpp:12:3: error: expected ; before }', flush=True)
    sys.exit(1)
so = os.path.join(folder, '_C.so')
open(so, 'wb').write(b'a fake library')
json.dump({'so': so, 'seconds': 0.0}, open(os.path.join(folder, 'result.json'), 'w'))
"""


@pytest.fixture
def fake_compiler(monkeypatch, cache_dir):
    """build() runs FAKE_COMPILE instead of the compile process; returns (entry, compile count)."""
    monkeypatch.setattr(_loader, "_CHILD", FAKE_COMPILE)
    entry = _loader.cache_entry(RUNNING)

    def plan(entry_, running):
        return {"key": entry_[1], "build_dir": entry_[0], "sources_root": entry_[2], "compiler": "c++",
                "sources": B.sources(entry_[2], False), "with_cuda": False, "cuda_reason": "test", "toolkit": None,
                "toolkit_version": None, "arch_list": None}

    monkeypatch.setattr(_loader, "build_plan", plan)

    def compiles():
        path = cache_dir / "compiles.txt"
        return len(path.read_text()) if path.exists() else 0

    return entry, compiles


def test_build_compiles_once_and_reuses_the_result(fake_compiler, capsys):
    entry, compiles = fake_compiler
    manifest = _loader.build(entry, RUNNING, explicit=False)
    assert compiles() == 1
    assert "compiling the C++ kernels for torch" in capsys.readouterr().err
    assert manifest["key"] == entry[1] and manifest["torch"] == torch.__version__ and manifest["cuda"] is False
    assert _loader.check_entry(entry[0], entry[1])[0] is not None
    assert "fake compile of" in open(manifest["log"]).read()
    _loader.build(entry, RUNNING, explicit=False)
    assert compiles() == 1
    _loader.build(entry, RUNNING, explicit=True, force=True)
    assert compiles() == 2


def test_broken_or_interrupted_cache_is_rebuilt_never_used(fake_compiler, capsys):
    entry, compiles = fake_compiler
    os.makedirs(entry[0])
    leftover = os.path.join(entry[0], "half_written.o")
    open(leftover, "w").close()
    _loader.build(entry, RUNNING, explicit=False)  # no manifest: an interrupted build
    assert compiles() == 1 and not os.path.exists(leftover)
    assert "discarding the cached build" in capsys.readouterr().err
    with open(os.path.join(entry[0], "_C.so"), "ab") as handle:  # damaged library
        handle.write(b"!")
    _loader.build(entry, RUNNING, explicit=False)
    assert compiles() == 2
    assert _loader.check_entry(entry[0], entry[1])[0] is not None


def test_failed_compile_is_reported_with_its_log_and_not_retried_on_import(fake_compiler, monkeypatch):
    entry, compiles = fake_compiler
    monkeypatch.setenv("FAKE_COMPILE_FAIL", "1")
    with pytest.raises(_loader.CompileError) as error:
        _loader.build(entry, RUNNING, explicit=False)
    log = os.path.join(entry[0], _loader.LOG)
    assert "error: expected ; before }" in str(error.value) and log in str(error.value)
    assert "python -m lsr_fast.build" in str(error.value)
    with pytest.raises(_loader.CompileError, match="failed before"):
        _loader.build(entry, RUNNING, explicit=False)  # the next import: no second compile
    assert compiles() == 1
    monkeypatch.delenv("FAKE_COMPILE_FAIL")
    _loader.build(entry, RUNNING, explicit=True)  # python -m lsr_fast.build retries
    assert compiles() == 2 and _loader.check_entry(entry[0], entry[1])[0] is not None


def test_concurrent_processes_compile_once(fake_compiler, monkeypatch, capsys):
    """torchrun's processes import lsr_fast at once: one compiles, the others wait and use it.
    (flock locks belong to open files, so threads that each open the lock file contend like
    processes do.)"""
    entry, compiles = fake_compiler
    monkeypatch.setenv("FAKE_COMPILE_SECONDS", "1")
    results, errors = [], []

    def worker():
        try:
            results.append(_loader.build(entry, RUNNING, explicit=False)["so_sha256"])
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and len(results) == 3 and len(set(results)) == 1
    assert compiles() == 1
    assert "waiting for another process that compiles the kernels" in capsys.readouterr().err


def test_file_lock_excludes_other_processes(tmp_path):
    """A second process blocks until the first releases the lock (and is told it waits)."""
    lock, marks = tmp_path / "x.lock", tmp_path / "marks.txt"
    code = ("import importlib.util, sys, time\n"
            f"spec = importlib.util.spec_from_file_location('b', {B.__file__!r})\n"
            "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)\n"
            f"with b.file_lock({str(lock)!r}, on_wait=lambda: print('waited', flush=True)):\n"
            f"    open({str(marks)!r}, 'a').write('<')\n"
            "    time.sleep(float(sys.argv[1]))\n"
            f"    open({str(marks)!r}, 'a').write('>')\n")
    first = subprocess.Popen([sys.executable, "-c", code, "1.5"])
    for _ in range(100):  # until the first holds the lock
        if marks.exists():
            break
        threading.Event().wait(0.05)
    second = subprocess.run([sys.executable, "-c", code, "0"], capture_output=True, text=True, timeout=60)
    assert first.wait(timeout=60) == 0 and second.returncode == 0
    assert marks.read_text() == "<><>"  # never interleaved
    assert "waited" in second.stdout


# ---- python -m lsr_fast.build ------------------------------------------------------------------------


def test_build_command_compiles_reports_and_fails_with_the_log(fake_compiler, monkeypatch, capsys):
    from lsr_fast import build as build_command

    entry, compiles = fake_compiler
    assert build_command.main(["--force", "--no-check"]) == 0
    out = capsys.readouterr().out
    assert compiles() == 1 and "compiled in" in out and os.path.join(entry[0], "_C.so") in out
    assert f"torch {torch.__version__}" in out and "CPU only (no CUDA kernels: test)" in out and "build log:" in out
    assert build_command.main(["--no-check"]) == 0  # up to date: reported, not compiled
    assert compiles() == 1 and "built already" in capsys.readouterr().out
    monkeypatch.setenv("FAKE_COMPILE_FAIL", "1")
    assert build_command.main(["--force", "--no-check"]) == 1
    err = capsys.readouterr().err
    assert "lsr-fast build: error: compiling the extension failed" in err and _loader.LOG in err


def test_build_command_leaves_a_fitting_installed_extension_alone(monkeypatch, capsys):
    from lsr_fast import build as build_command

    info = _loader.extension_info()
    if not info or info.get("origin") != "package" or not info.get("torch"):
        pytest.skip(f"no installed extension with a build record here ({info})")
    monkeypatch.setattr(_loader, "build", lambda *a, **k: pytest.fail("compiled although the installed extension fits"))
    assert build_command.main(["--no-check"]) == 0
    out = capsys.readouterr().out
    assert "nothing to compile" in out and info["path"] in out


def test_lsr_fast_build_is_the_same_command(monkeypatch):
    pytest.importorskip("yaml")  # the lsr-fast tool needs the training extra
    from lsr_fast import build as build_command
    from lsr_fast import cli

    seen = []
    monkeypatch.setattr(build_command, "run", lambda args: seen.append((args.force, args.cache_dir)) or 0)
    assert cli.main(["build", "--force", "--cache-dir", "/somewhere"]) == 0
    assert seen == [(True, "/somewhere")]


# ---- a real compile (slow) -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LSR_FAST_RUN_SLOW") != "1",
                    reason="compiles the extension for real (about 3 minutes on 2 cores): set LSR_FAST_RUN_SLOW=1")
def test_real_compile_into_the_cache_is_loaded_and_correct(cache_dir):
    env = dict(os.environ, **{_loader.CACHE_ENV: str(cache_dir)})
    built = subprocess.run([sys.executable, "-m", "lsr_fast.build", "--force"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0, built.stdout + built.stderr
    assert "compiled in" in built.stdout and f"torch {torch.__version__}" in built.stdout
    check = ("import torch, lsr_fast\n"
             "from lsr_fast import _loader\n"
             "info = _loader.extension_info()\n"
             "assert info['origin'] == 'cache', info\n"
             "labels = torch.randint(0, 5, (2, 33, 47))\n"
             "for backend in ('cpp', 'reference'):\n"
             "    print(backend, lsr_fast.hist_downsample(labels, (9, 11), 5, backend=backend).sum().item())\n")
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=dict(env, **{_loader.JIT_ENV: "0"}),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    sums = dict(line.split() for line in out.stdout.strip().splitlines())
    assert sums["cpp"] == sums["reference"]


def test_cli_commands_without_the_training_extra():
    """`lsr-fast backends` and `build` need no pyyaml; `train` says what is missing."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['yaml'] = None\n"
            "from lsr_fast.cli import main\n"
            "assert main(['backends']) == 0\n"
            "sys.exit(main(['train', '-c', 'x.yaml']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "reference: available" in done.stdout
    assert "lsr-fast train is unavailable" in done.stderr and "lsr_fast[training]" in done.stderr
