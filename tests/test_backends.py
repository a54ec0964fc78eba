"""Backend selection, availability report, and the build helpers of setup.py."""

import importlib.util
import os
import stat
import subprocess
import sys

import pytest
import torch

import lsr_fast
from lsr_fast.ops import _backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_available_backends_reports_every_backend():
    report = lsr_fast.available_backends()
    assert set(report) == {"reference", "cpp", "cuda", "triton"}
    assert report["reference"] == "available"
    for name, state in report.items():
        assert isinstance(state, str) and state  # "available" or a reason
    if not torch.cuda.is_available():
        assert report["cuda"] != "available"


def test_import_and_report_in_a_fresh_interpreter():
    out = subprocess.run([sys.executable, "-c", "import lsr_fast; print(lsr_fast.available_backends())"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert "'reference': 'available'" in out.stdout


def test_unknown_backend_is_an_error():
    labels = torch.zeros(1, 4, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        lsr_fast.hist_downsample(labels, 2, 1, backend="fortran")


@pytest.mark.parametrize("name", ["cpp", "cuda", "triton"])
def test_unusable_backend_by_name_raises_with_the_reason(name):
    reason = lsr_fast.available_backends()[name]
    labels = torch.zeros(1, 4, 4, dtype=torch.int64)
    if reason == "available":
        pytest.skip(f"{name} is usable here")
    with pytest.raises(RuntimeError, match=f"backend '{name}' is not usable here"):
        lsr_fast.hist_downsample(labels, 2, 1, backend=name)


def run_pytest_requiring(required):
    """One quick test of this file in a fresh pytest, with LSR_FAST_REQUIRE_BACKENDS=``required``."""
    env = dict(os.environ, LSR_FAST_REQUIRE_BACKENDS=required)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_backends.py::test_unknown_backend_is_an_error"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_a_required_backend_that_is_not_usable_fails_the_session():
    """tests/conftest.py: a backend that LSR_FAST_REQUIRE_BACKENDS (set by scripts/test.sh) names
    but that is not usable stops the session (exit status 4, nothing run) with its name and
    available_backends()'s reason, instead of turning its cases into skips."""
    report = lsr_fast.available_backends()
    missing = [name for name in ("cuda", "triton", "cpp") if report[name] != "available"]
    if not missing:
        pytest.skip("every backend is usable here")
    name = missing[0]
    done = run_pytest_requiring(f"reference, {name}")
    assert done.returncode == 4, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"requires backend(s) ['{name}']" in done.stderr and report[name] in done.stderr, done.stderr[-2000:]
    assert "passed" not in done.stdout
    done = run_pytest_requiring("cpp,fortran")
    assert done.returncode == 4 and "unknown backend(s) ['fortran']" in done.stderr, done.stderr[-2000:]


def test_triton_backend_loads_wherever_it_can_run():
    """The Triton backend turns an error while setting up its kernels into "unavailable" (so an
    old Triton cannot break `import lsr_fast`); here, with a supported Triton, that must not
    happen, or every Triton test would silently drop out."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and no interpreter: the backend cannot run here")
    reason = lsr_fast.available_backends()["triton"]
    assert reason == "available" or "interpreter cannot run with NumPy" in reason, reason


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.6", True),   # Triton 3.6's interpreter calls int() on 1-element arrays
    ("3.6.0", "2.5.2", True),
    ("3.2.0", "2.4.0rc1", True),
    ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.6", False),  # fixed in 3.7
    ("3.10.0", "2.5.0", False),  # compared as numbers, not strings
    ("3.6.0", "", False),        # no NumPy: nothing to say
])
def test_triton_interpreter_version_problem(triton_version, numpy_version, refused):
    from lsr_fast import triton as triton_backend  # importable without triton; the check is plain Python

    reason = triton_backend._interpreter_problem(triton_version, numpy_version)
    assert bool(reason) == refused
    if refused:
        assert triton_version in reason and numpy_version in reason and "triton>=3.7" in reason


def test_cuda_backend_refuses_cpu_tensors():
    if lsr_fast.available_backends()["cuda"] != "available":
        pytest.skip("cuda backend not usable here")
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        lsr_fast.hist_downsample(torch.zeros(1, 4, 4, dtype=torch.int64), 2, 1, backend="cuda")


def test_auto_picks_the_compiled_backend_on_cpu_when_built():
    impl = _backends.resolve("hist_downsample", "auto", torch.device("cpu"))
    expected = "lsr_fast.ops._compiled" if lsr_fast.available_backends()["cpp"] == "available" else "lsr_fast.reference"
    assert impl.__module__ == expected


def test_value_checks_can_be_switched_off():
    labels = torch.full((1, 2, 2), 7)
    try:
        lsr_fast.set_value_checks(False)
        # Not checked: no ValueError. What the reference makes of a class outside [0, C) is
        # unspecified (an indexing error or some label), so only the missing check is asserted.
        try:
            lsr_fast.hist_downsample(labels, 1, 3, backend="reference")
        except ValueError as error:
            pytest.fail(f"value checks are off, yet hist_downsample checked the labels: {error}")
        except (RuntimeError, IndexError):
            pass
    finally:
        lsr_fast.set_value_checks(True)
    with pytest.raises(ValueError, match="value 7"):
        lsr_fast.hist_downsample(labels, 1, 3)


# ---- setup.py helpers ------------------------------------------------------------------------


def load_setup_module():
    spec = importlib.util.spec_from_file_location("lsr_fast_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the setup() call is guarded by __main__
    return module


def test_cuda_root_is_found_behind_a_wrapper_script(tmp_path, monkeypatch):
    toolkit = tmp_path / "toolkit"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    wrapper_dir = tmp_path / "wrappers"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper_dir))
    assert load_setup_module().cuda_toolkit_root() == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "missing"))  # an unusable CUDA_HOME is passed over
    assert load_setup_module().cuda_toolkit_root() == str(toolkit)


def test_toolkit_version_from_version_json_or_nvcc(tmp_path):
    setup = load_setup_module()
    (tmp_path / "bin").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    assert setup.toolkit_version(str(tmp_path)) == "12.4"
    (tmp_path / "version.json").write_text('{"cuda": {"name": "CUDA SDK", "version": "13.0.2"}}')
    assert setup.toolkit_version(str(tmp_path)) == "13.0"
    assert setup.toolkit_version(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("toolkit, torch_cuda, refused", [
    ("13.0", "12.4", True), ("12.8", "13.0", True), ("13.0", "13.0", False), ("12.8", "12.4", False),
    (None, "12.4", False), ("13.0", None, False),
])
def test_cuda_major_mismatch_is_named(toolkit, torch_cuda, refused):
    reason = load_setup_module().cuda_version_mismatch("/opt/cuda", toolkit, torch_cuda)
    assert bool(reason) == refused
    if refused:
        assert f"/opt/cuda is {toolkit}" in reason and f"CUDA {torch_cuda}" in reason and "CUDA_HOME" in reason


def test_env_flags_are_strict(monkeypatch):
    setup = load_setup_module()
    monkeypatch.setenv("LSR_FAST_CUDA", "yes")
    with pytest.raises(SystemExit, match="LSR_FAST_CUDA must be 0 or 1"):
        setup.env_flag("LSR_FAST_CUDA")
    monkeypatch.setenv("LSR_FAST_CUDA", "0")
    assert setup.env_flag("LSR_FAST_CUDA") is False


# ---- scripts/check_triton_compile.py ---------------------------------------------------------

PLANTED_KERNELS = '''
import importlib.util, os, sys
import torch, triton, triton.language as tl


@triton.jit
def scale(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(y_ptr + offsets, 2.0 * tl.load(x_ptr + offsets))


@triton.jit
def early_exit(x_ptr, n):  # Python runs `break`; Triton's compiler does not support it
    for i in range(n):
        if i == 3:
            break
        tl.store(x_ptr + i, 5.0)


x = torch.ones(64)


def exercise():
    scale[(1,)](x, x, BLOCK=64)
    early_exit[(1,)](x, 8)
    return 2


if os.environ.get("TRITON_INTERPRET") == "1":
    exercise()
    print("interpreted:", x[:5].tolist())
else:
    spec = importlib.util.spec_from_file_location("check", sys.argv[1])
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    compiler = check.compile_only([90], exercise)
    assert (x == 1).all(), "a kernel was launched"
    for (name, arch, _), error in sorted(compiler.done.items(), key=str):
        print(name.split(".")[-1], arch, "failed" if error else "ok")
'''


def test_triton_compile_check_compiles_for_a_gpu_and_catches_what_the_interpreter_accepts(tmp_path):
    """The compile-only check (scripts/check_triton_compile.py, run by CI over every kernel of the
    Triton backend) compiles for sm_90 without a GPU, launches nothing, and reports a kernel that
    Triton's interpreter runs but its compiler rejects (a `break` in a loop)."""
    pytest.importorskip("triton")
    program = tmp_path / "planted.py"
    program.write_text(PLANTED_KERNELS)
    script = os.path.join(ROOT, "scripts", "check_triton_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    interpreted = subprocess.run([sys.executable, str(program), script], capture_output=True, text=True,
                                 env=dict(env, TRITON_INTERPRET="1"), timeout=300)
    assert interpreted.returncode == 0, interpreted.stderr[-3000:]
    assert "interpreted: [5.0, 5.0, 5.0, 2.0, 2.0]" in interpreted.stdout  # scale, then early_exit up to its break

    done = subprocess.run([sys.executable, str(program), script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert "sm_90: 2 op calls, 2 kernel specialisations (every autotuning config)" in lines
    assert sorted(line for line in lines if line.endswith((" ok", " failed")) and not line.startswith(" ")) == [
        "early_exit 90 failed", "scale 90 ok"]
    assert any(line.startswith("  FAIL sm_90") and "early_exit" in line for line in lines)
    assert list((tmp_path / "cache").rglob("scale.cubin")), "no cubin was written"
