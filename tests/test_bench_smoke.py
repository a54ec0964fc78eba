"""`lsr-fast bench` as a smoke test, and the memory claim its report makes.

The quick mode runs on tiny shapes with few rounds into a temporary folder; the tests check
that the JSON, Markdown and PNG are written and well-formed. Nothing here asserts a timing.

The fused CPU kernels must not materialise a full-resolution one-hot map or an (N, C, K)
tensor. That is checked under an address-space limit (RLIMIT_AS) in a subprocess: every
allocation counts against it (torch tensors and the kernels' own std::vector scratch alike),
and the limit is set below the size such a tensor would have even at one byte per element.
The reference, which does build a full-resolution one-hot map, fails under the same limit,
which shows the limit bites.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lsr_fast
from lsr_fast import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--quick", "--shapes", "tiny", "--step-size", "tiny", "--rounds", "2", "--warmup", "1",
         "--min-time", "0", "--step-rounds", "1"]
HAS_CPP = lsr_fast.available_backends()["cpp"] == "available"


def report_files(folder):
    names = sorted(os.listdir(folder))
    stems = sorted({os.path.splitext(n)[0] for n in names})
    return names, stems


def test_quick_run_writes_json_markdown_and_png(tmp_path):
    backends = "reference,cpp" if HAS_CPP else "reference"
    assert bench.main(QUICK + ["--backends", backends, "--out", str(tmp_path)]) == 0

    names, stems = report_files(tmp_path)
    assert len(stems) == 1 and names == [stems[0] + ext for ext in (".json", ".md", ".png")]
    assert stems[0].startswith(bench.device_name(torch.device("cpu")) + "-")

    report = json.loads((tmp_path / (stems[0] + ".json")).read_text())
    meta = report["meta"]
    assert meta["device_type"] == "cpu" and meta["versions"]["torch"] == torch.__version__
    assert meta["command"].startswith("python -m lsr_fast.bench --quick")
    assert meta["copy"]["gbps"] > 0
    expected = {(c.op, c.pass_name, c.backend) for c in bench.cases(torch.device("cpu"), backends=backends.split(","),
                                                                       shapes=["tiny"])[0]}
    assert {(r["op"], r["pass"], r["backend"]) for r in report["results"]} == expected
    for r in report["results"]:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["bytes"] > 0 and r["rounds"] >= 2
        assert r["speedup"] is not None
        assert r["peak_bytes"] is None or r["peak_bytes"] >= 0
    assert [g["goal"] for g in report["goals"]] == [f"cpp vs reference, {op} {p}" for op, p, _ in bench.CPU_GOALS]
    assert all(g["met"] is None for g in report["goals"])  # no paper shape in a quick run
    variants = [s["variant"] for s in report["steps"]]
    if report["step_note"]:
        assert "lsr_fast.models" in report["step_note"]
    else:
        assert variants[:3] == ["source_only", "two_domain", "lsr-reference"]
        assert all(s["status"] == "ok" and s["median_ms"] > 0 for s in report["steps"])

    markdown = (tmp_path / (stems[0] + ".md")).read_text()
    assert markdown.startswith(f"# lsr_fast benchmarks: {meta['device']}")
    for heading in ("## Goals", "## Ops", "### hist_downsample", "### losses", "### regularizer"):
        assert heading in markdown
    assert f"torch {torch.__version__}" in markdown and meta["command"] in markdown
    table_rows = [line for line in markdown.splitlines() if line.startswith("| tiny |")]
    assert len(table_rows) == len(report["results"])
    assert all(row.count("|") == table_rows[0].count("|") for row in table_rows)

    png = (tmp_path / (stems[0] + ".png")).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    height, width = matplotlib.image.imread(str(tmp_path / (stems[0] + ".png"))).shape[:2]
    assert height > 100 and width > 100


def test_second_run_does_not_overwrite(tmp_path):
    args = QUICK + ["--ops", "hist_downsample", "--backends", "reference", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    _, (first,) = report_files(tmp_path)
    before = (tmp_path / (first + ".json")).read_bytes()
    assert bench.main(args) == 0
    _, stems = report_files(tmp_path)
    assert stems == [first, first + "-2"]
    assert (tmp_path / (first + ".json")).read_bytes() == before


def test_compile_failure_is_recorded_not_raised(tmp_path, monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler for inductor (simulated)")

    monkeypatch.setattr(torch, "compile", broken_compile)
    args = QUICK + ["--ops", "hist_downsample", "--backends", "reference,compile", "--out", str(tmp_path)]
    assert bench.main(args) == 0  # a compile failure is reported, not a failed run
    _, (stem,) = report_files(tmp_path)
    results = json.loads((tmp_path / (stem + ".json")).read_text())["results"]
    compiled = [r for r in results if r["backend"] == "compile"]
    assert len(compiled) == 1 and compiled[0]["status"] == "failed"
    assert "torch.compile failed" in compiled[0]["reason"] and "simulated" in compiled[0]["reason"]
    assert "simulated" in (tmp_path / (stem + ".md")).read_text()


def test_spent_time_budget_reports_cases_as_not_run(tmp_path):
    args = QUICK + ["--ops", "hist_downsample,train_step", "--backends", "reference", "--time-budget", "0", "--out", str(tmp_path)]
    assert bench.main(args) == 1  # not every case ran
    _, (stem,) = report_files(tmp_path)
    report = json.loads((tmp_path / (stem + ".json")).read_text())
    assert [(r["op"], r["status"]) for r in report["results"]] == [("hist_downsample", "not run")]
    assert "time budget of 0 min" in report["results"][0]["reason"]
    assert report["steps"] == [] and "time budget" in report["step_note"]
    markdown = (tmp_path / (stem + ".md")).read_text()
    assert "| tiny | fwd | int64 | reference | not run |" in markdown


def quick_report(tmp_path, name, ops, *extra):
    out = tmp_path / name
    code = bench.main(QUICK + ["--ops", ops, "--backends", "reference", "--out", str(out), *extra])
    (stem,) = report_files(out)[1]
    return code, str(out / (stem + ".json"))


def test_merge_joins_parts_split_by_op(tmp_path):
    _, first = quick_report(tmp_path, "a", "hist_downsample,maxsquare_loss")
    _, second = quick_report(tmp_path, "b", "losses,train_step")
    assert bench.main(["--merge", first, second, "--out", str(tmp_path / "merged")]) == 0
    names, (stem,) = report_files(tmp_path / "merged")
    assert len(names) == 3
    merged = json.loads((tmp_path / "merged" / (stem + ".json")).read_text())
    parts = [json.loads(open(path).read()) for path in (first, second)]
    assert merged["results"] == [dict(r, copy_gbps=p["meta"]["copy"]["gbps"]) for p in parts for r in p["results"]]
    assert merged["steps"] == parts[1]["steps"] and merged["steps"]
    assert [p["file"] for p in merged["meta"]["parts"]] == [first, second]
    assert merged["meta"]["command"] == f"lsr-fast bench --merge {first} {second}"
    markdown = (tmp_path / "merged" / (stem + ".md")).read_text()
    for heading in ("### hist_downsample", "### maxsquare_loss", "### losses", "## Training step"):
        assert heading in markdown
    assert parts[0]["meta"]["command"] in markdown and parts[1]["meta"]["command"] in markdown


def test_merge_takes_a_case_not_run_from_the_part_that_ran_it(tmp_path):
    code, spent = quick_report(tmp_path, "a", "hist_downsample,maxsquare_loss", "--time-budget", "0")
    assert code == 1
    _, ran = quick_report(tmp_path, "b", "maxsquare_loss")
    merged = bench.merge_reports([(spent, json.loads(open(spent).read())), (ran, json.loads(open(ran).read()))])
    status = {(r["op"], r["pass"]): r["status"] for r in merged["results"]}
    assert status == {("hist_downsample", "fwd"): "not run", ("maxsquare_loss", "fwd"): "ok", ("maxsquare_loss", "fwd+bwd"): "ok"}


def test_merge_refuses_overlap_other_devices_and_measuring_options(tmp_path, capsys):
    _, first = quick_report(tmp_path, "a", "hist_downsample")
    _, second = quick_report(tmp_path, "b", "hist_downsample")
    with pytest.raises(SystemExit, match=f"{second}: case hist_downsample-tiny-fwd-int64-reference was also measured in {first}"):
        bench.main(["--merge", first, second, "--out", str(tmp_path / "merged")])
    report = json.loads(open(second).read())
    report["meta"]["device"] = "nvidia-h100"
    report["results"] = []
    other = tmp_path / "other.json"
    other.write_text(json.dumps(report))
    with pytest.raises(SystemExit, match=f"{other}: device 'nvidia-h100' differs"):
        bench.main(["--merge", first, str(other), "--out", str(tmp_path / "merged")])
    with pytest.raises(SystemExit, match="takes no --shapes"):
        bench.main(["--merge", first, second, "--shapes", "tiny"])
    with pytest.raises(SystemExit, match="cannot read .*missing.json"):
        bench.main(["--merge", first, str(tmp_path / "missing.json")])
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("option, value", [("--ops", "nope"), ("--backends", "cuda,nope"), ("--shapes", "huge"),
                                           ("--rounds", "0"), ("--min-time", "-1"), ("--dtypes", "float16")])
def test_bad_options_are_named(option, value, capsys):
    with pytest.raises(SystemExit, match="^2$") as exit_info:  # argparse's usage error; the message goes to stderr
        bench.main([option, value])
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err


def test_profiler_lines_stay_out_of_the_output(tmp_path):
    """The CPU peak memory runs torch.profiler, whose kineto printed "USDT: ... profiler_start" and
    "profiler_stop" around every case. A fresh process (kineto reads its log level once), through
    ``python -m lsr_fast.bench`` as scripts/gpu_session.sh runs it."""
    env = {name: value for name, value in os.environ.items() if name != "KINETO_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    args = QUICK + ["--ops", "hist_downsample", "--backends", "reference", "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, "-m", "lsr_fast.bench", *args], check=False, capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[1/1] hist_downsample-tiny-fwd-int64-reference: " in done.stdout
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert report["results"][0]["peak_bytes"] is not None  # the profiler did run
    assert "profiler_start" not in done.stdout + done.stderr and "profiler_stop" not in done.stdout + done.stderr


def test_cases_reject_unknown_names():
    with pytest.raises(ValueError, match="shapes: unknown 'huge'"):
        bench.cases(torch.device("cpu"), shapes=["huge"])


def test_cases_cover_every_op_backend_and_pass():
    cases, skipped = bench.cases(torch.device("cpu"), shapes=["tiny"])
    assert {c.op for c in cases} == set(bench.OPS)
    assert {(c.op, c.pass_name) for c in cases} == {(op, p) for op, passes in bench.OPS.items() for p in passes}
    assert {c.backend for c in cases} <= {"reference", "compile", "cpp", "plain"}
    assert "dtype bfloat16" in skipped and "backend triton" in skipped and "backend cuda" in skipped
    for op in bench.TOOLKIT_OPS:  # the plain-torch baseline first, then lsr_fast's backends, no torch.compile
        backends = [c.backend for c in cases if c.op == op and c.backward]
        assert backends[0] == "plain" and "compile" not in backends and "reference" in backends
    assert {c.backend for c in cases if c.op not in bench.TOOLKIT_OPS} <= {"reference", "compile", "cpp"}


def test_toolkit_cases_run_and_report_both_versions(tmp_path):
    backends = ["reference", "cpp"] if HAS_CPP else ["reference"]
    assert bench.main(QUICK + ["--ops", "toolkit", "--backends", ",".join(backends), "--out", str(tmp_path)]) == 0
    _, (stem,) = report_files(tmp_path)
    report = json.loads((tmp_path / (stem + ".json")).read_text())
    measured = {(r["op"], r["pass"], r["backend"]): r for r in report["results"]}
    assert set(measured) == {(op, p, b) for op in bench.TOOLKIT_OPS for p in ("fwd", "fwd+bwd") for b in ["plain"] + backends}
    for (op, _, backend), r in measured.items():
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["bytes"] > 0, r
        # Speed-ups are against the plain-torch version of the same step.
        assert r["speedup"] == pytest.approx(measured[(op, r["pass"], "plain")]["median_ms"] / r["median_ms"])
    assert report["steps"] == [] and all(g["met"] is None for g in report["goals"])
    markdown = (tmp_path / (stem + ".md")).read_text()
    for op in bench.TOOLKIT_OPS:
        assert f"### {op}" in markdown
    assert "| tiny | fwd+bwd | float32 | plain | " in markdown and "plain median / this median" in markdown


def _toolkit_step(op, backend, dtype="float32"):
    """Two calls of one toolkit step (a backward after the first) on the tiny inputs: the losses,
    the gradients of the first, and the bank after both (None for the few-shot step, which has none)."""
    from lsr_fast.bench import toolkit

    x = bench.make_inputs("tiny", dtype, torch.device("cpu"))
    forward, leaves, state = toolkit.build(op, x, bench.SHAPES["tiny"].C, backend, backward=True)
    first = forward()
    grads = torch.autograd.grad(first, leaves)
    second = forward()
    return (first.detach(), second.detach()), grads, state()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("op", ["toolkit_fewshot", "toolkit_proda", "toolkit_contrastive"])
def test_toolkit_lsr_fast_and_plain_versions_compute_the_same_step(op, dtype, monkeypatch):
    """The two versions a toolkit case times must be one computation: the same losses (also the
    second step's, after the bank's update), gradients and bank, on every CPU backend; and the
    plain version must run with every lsr_fast op and the PrototypeBank made unusable."""
    assert set(bench.TOOLKIT_OPS) == {"toolkit_fewshot", "toolkit_proda", "toolkit_contrastive"}
    with lsr_fast.value_checks(False):  # as the bench times them
        results = {b: _toolkit_step(op, b, dtype) for b in ["reference"] + (["cpp"] if HAS_CPP else [])}

        def forbidden(*args, **kwargs):
            raise AssertionError("the plain-torch version called an lsr_fast op")

        for name in ("class_feature_stats", "prototype_distances", "hist_downsample", "feature_terms", "PrototypeBank"):
            monkeypatch.setattr(lsr_fast, name, forbidden)
        plain = _toolkit_step(op, "plain", dtype)
    (want_first, want_second), want_grads, (want_protos, want_seen) = plain
    assert torch.isfinite(want_first) and want_first > 0.05 and all(g.abs().sum() > 0 for g in want_grads)  # a real case
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-2, atol=1e-3)
    for backend, ((first, second), grads, (protos, seen)) in results.items():
        torch.testing.assert_close(first, want_first, **tol, msg=lambda m: f"{backend}: loss: {m}")
        torch.testing.assert_close(second, want_second, **tol, msg=lambda m: f"{backend}: second step's loss: {m}")
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{backend}: gradient: {m}")
        if want_protos is not None:
            torch.testing.assert_close(protos, want_protos, **tol)
            assert torch.equal(seen, want_seen)


def test_gpu_report_renders_and_judges_goals():
    """The GPU branches of the report (GB/s columns, bandwidth / compile / step goals) on made-up
    numbers, so they are exercised without a GPU."""
    results = []
    for backend, ms in (("reference", 10.0), ("compile", 2.0), ("cuda", 1.0), ("triton", 1.6)):
        for op, passes in bench.OPS.items():
            for pass_name in passes:
                results.append(dict(op=op, shape="gta5", **{"pass": pass_name}, dtype="float32", backend=backend,
                                    status="ok", median_ms=ms, min_ms=ms, rounds=10, iqr_ms=0.1, bytes=int(2e9 * ms * 1e-3),
                                    gbps=2000.0 * (0.9 if backend == "cuda" else 0.5), peak_bytes=10**6, compile_s=None))
    results.append(dict(results[0], backend="triton", status="failed", reason="OutOfMemoryError: made up"))
    steps = [dict(variant=v, size="paper", backbone="resnet101", width=64, source=[720, 1280], target=[512, 1024],
                  status="ok", median_ms=ms, min_ms=ms, rounds=5, times_ms=[ms] * 5, peak_bytes=10**9)
             for v, ms in (("source_only", 100.0), ("two_domain", 180.0), ("lsr-cuda", 181.0), ("lsr-triton", 185.0))]
    bench.add_speedups(results)
    bench.add_step_overheads(steps)
    report = dict(meta=dict(device="nvidia-h100", device_type="cuda", device_description="made up", date="2026-01-01",
                            command="lsr-fast bench", versions=dict(python="3", torch="2", triton="3", lsr_fast="0", commit="x"),
                            copy=dict(bytes=2**31, median_ms=1.0, gbps=2500.0), timing=dict(warmup=5, rounds=10, min_time=1.0),
                            value_checks=False),
                  results=results, steps=steps, step_note="", skipped={})
    goals = {g["goal"]: g for g in bench.evaluate_goals(report)}
    assert goals["cuda losses: share of copy bandwidth (2500 GB/s)"]["met"] is True  # 1800 of 2500 GB/s
    assert goals["triton losses: share of copy bandwidth (2500 GB/s)"]["met"] is False
    assert "30 points short" in goals["triton losses: share of copy bandwidth (2500 GB/s)"]["shortfall"]
    assert goals["cuda losses vs torch.compile(reference)"]["met"] is True  # 2.0x
    assert goals["triton losses vs torch.compile(reference)"]["met"] is False  # 1.25x
    assert goals["LSR overhead in a training step (cuda)"]["met"] is True  # 1%
    assert "3.0 points over" in goals["LSR overhead in a training step (triton)"]["shortfall"]  # 5%
    report["goals"] = list(goals.values())
    markdown = bench.render_markdown(report)
    assert "| GB/s | % copy |" in markdown and "OutOfMemoryError: made up" in markdown
    assert bench.render_chart(report).startswith(b"\x89PNG")

    # Merged from two runs whose copy bandwidths differ: each case is judged against its own run's.
    part_b = dict(report, meta=dict(report["meta"], copy=dict(bytes=2**31, median_ms=1.0, gbps=1900.0)),
                  results=[dict(r, shape="cityscapes") for r in results if r["backend"] in ("reference", "cuda")], steps=[])
    part_a = dict(report, results=[r for r in results if r["backend"] in ("reference", "cuda")])
    merged = bench.merge_reports([("a.json", part_a), ("b.json", part_b)])
    goals = {g["goal"]: g for g in merged["goals"]}
    share = goals["cuda losses: share of copy bandwidth (measured per part)"]
    assert share["met"] is True and share["measured"] == "worst 72% (gta5 fwd float32) of 4 cases"  # 1800 / 2500
    markdown = bench.render_markdown(merged)  # 1800 GB/s is 72% of part a's copy, 95% of part b's
    assert "| 72% |" in markdown and "| 95% |" in markdown and "copy 1900.0 GB/s" in markdown


# ---- the fused kernels stay small ------------------------------------------------------------

MEMORY_CHECK = textwrap.dedent(
    """
    import ctypes, json, resource, sys
    import torch
    import lsr_fast

    lsr_fast.set_value_checks(False)
    # Every allocation of 64 KiB or more gets fresh pages from mmap and returns them when freed,
    # so nothing can hide in memory that the warm-up call freed but glibc kept.
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD

    def vm_size():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

    def fits(fn, budget):
        fn()  # warm-up without the limit: thread pools, allocator arenas, lazy initialisation
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm_size() + budget, hard))
        try:
            fn()
            return "ok"
        except (RuntimeError, MemoryError) as error:
            return "out of memory: " + str(error).splitlines()[0][:120]
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

    def with_grad(op, f, labels, protos):
        f = f.detach().requires_grad_()
        if op == "feature_terms":
            s, _, sq, nl, ns = lsr_fast.feature_terms(f, labels, protos, 1.0, backend=BACKEND)
            loss = s.sum() + sq.sum() + nl + ns
        else:
            loss = lsr_fast.class_feature_stats(f, labels, protos.shape[0], backend=BACKEND)[0].sum()
        return torch.autograd.grad(loss, f)

    g = torch.Generator().manual_seed(0)
    # Full resolution: C = 100 classes, 256 x 512 pixels; a one-hot map is >= 13 MB at 1 byte/element.
    C, H, W, h, w = 100, 256, 512, 33, 65
    labels = torch.randint(0, C, (1, H, W), generator=g)
    probs = torch.rand(1, C, H, W, generator=g).softmax(1)
    # Features: N = 64 x 64 vectors, K = 128, C = 64; an (N, C, K) tensor is >= 33 MB at 1 byte/element.
    K, C2, N1 = 128, 64, 64
    feats = torch.randn(1, K, N1, N1, generator=g).relu_()
    small = torch.randint(0, C2, (1, N1, N1), generator=g)
    protos = torch.randn(C2, K, generator=g)
    one_hot_budget = C * H * W // 2
    nck_budget = N1 * N1 * C2 * K // 4
    results = {}
    for BACKEND in ("cpp", "reference"):
        results[BACKEND] = {
            "hist_downsample": fits(lambda: lsr_fast.hist_downsample(labels, (h, w), C, backend=BACKEND), one_hot_budget),
            "pseudo_label_downsample": fits(lambda: lsr_fast.pseudo_label_downsample(probs, (h, w), backend=BACKEND), one_hot_budget),
            "feature_terms fwd+bwd": fits(lambda: with_grad("feature_terms", feats, small, protos), nck_budget),
            "class_feature_stats fwd+bwd": fits(lambda: with_grad("class_feature_stats", feats, small, protos), nck_budget),
        }
    results["control"] = fits(lambda: torch.ones(one_hot_budget // 4 + 2**18), one_hot_budget)  # budget + 1 MiB
    print(json.dumps(results))
    """
)


@pytest.mark.skipif(not HAS_CPP, reason="the cpp backend is not built")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS, /proc and glibc's mallopt are Linux tools")
def test_fused_cpu_kernels_do_not_materialise_one_hot_or_nck():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", MEMORY_CHECK], check=False, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["control"].startswith("out of memory"), "the address-space limit does not bite"
    assert results["reference"]["hist_downsample"].startswith("out of memory"), "the reference's one-hot map went unseen"
    assert results["cpp"] == {name: "ok" for name in results["cpp"]}, results["cpp"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fused_gpu_kernels_do_not_materialise_one_hot_or_nck(backend):
    if lsr_fast.available_backends()[backend] != "available":
        pytest.skip(f"{backend}: {lsr_fast.available_backends()[backend]}")
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    C, H, W = 100, 256, 512
    labels = torch.randint(0, C, (1, H, W), generator=g).to(device)
    probs = torch.rand(1, C, H, W, generator=g).softmax(1).to(device)
    K, C2, N1 = 128, 64, 64
    feats = torch.randn(1, K, N1, N1, generator=g).relu_().to(device).requires_grad_()
    small = torch.randint(0, C2, (1, N1, N1), generator=g).to(device)
    protos = torch.randn(C2, K, generator=g).to(device)

    def terms():
        s, _, sq, nl, ns = lsr_fast.feature_terms(feats, small, protos, 1.0, backend=backend)
        return torch.autograd.grad(s.sum() + sq.sum() + nl + ns, feats)

    checks = [
        (lambda: lsr_fast.hist_downsample(labels, (33, 65), C, backend=backend), C * H * W // 2),
        (lambda: lsr_fast.pseudo_label_downsample(probs, (33, 65), backend=backend), C * H * W // 2),
        (terms, N1 * N1 * C2 * K // 4),
    ]
    for fn, budget in checks:
        fn()  # warm-up (autotuning)
        peak, _ = bench.peak_memory(fn, device)
        assert peak < budget, f"{backend}: {peak} bytes allocated, limit {budget}"
