"""`python -m lsr_fast.build` (also `lsr-fast build`): compile lsr_fast's C++/CUDA kernels for the
torch installed here, into the per-torch cache that lsr_fast loads them from, and report what was
built: for which torch, CUDA and GPU architectures, and where. Then a fresh Python process checks
that lsr_fast loads that build.

Steered by the environment (docs/install.md): LSR_FAST_CACHE_DIR, LSR_FAST_CUDA, CUDA_HOME,
TORCH_CUDA_ARCH_LIST, MAX_JOBS, CXX.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

import torch

from . import _build as B
from . import _loader

HELP = "compile the C++/CUDA kernels for the torch installed here (into the per-torch cache) and say what was built"

_CHECK = ("import json, lsr_fast\n"
          "from lsr_fast import _loader\n"
          "print(json.dumps({'backends': lsr_fast.available_backends(), 'loaded': _loader.extension_info()}))\n")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="compile again even when an up-to-date build exists (e.g. after installing a CUDA toolkit)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help=f"the cache to build into (default: ${_loader.CACHE_ENV}, else ~/.cache/lsr_fast)")
    parser.add_argument("--no-check", action="store_true", help="skip loading the build in a fresh Python process")


def describe(info: Dict) -> List[str]:
    """Report lines about a build (a cache manifest or an installed extension's build record)."""
    lines = [f"  built for:  {B.describe_torch(info)}, C++ ABI {'cxx11' if info.get('cxx11abi') else 'pre-cxx11'}"]
    if info.get("cuda"):
        toolkit = f"{info.get('toolkit')} (CUDA {info.get('toolkit_version') or '?'})"
        lines.append(f"  kernels:    CPU and CUDA, architectures {info.get('arch_list')}, toolkit {toolkit}")
    else:
        lines.append("  kernels:    CPU only" + (f" (no CUDA kernels: {info['cuda_reason']})" if info.get("cuda_reason") else ""))
    if info.get("sources_root"):
        lines.append(f"  sources:    {info['sources_root']}")
    if info.get("log"):
        lines.append(f"  build log:  {info['log']}")
    return lines


def check_in_fresh_process(expected: str) -> int:
    """Load lsr_fast in a new interpreter (no compiling) and confirm it uses ``expected``."""
    env = dict(os.environ, **{_loader.JIT_ENV: "0"})
    done = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, env=env, check=False)
    lines = done.stdout.strip().splitlines()
    try:
        state = json.loads(lines[-1])
    except (IndexError, ValueError):
        print(f"check: a fresh Python could not import lsr_fast (exit status {done.returncode}):\n{done.stderr[-3000:]}",
              file=sys.stderr)
        return 1
    for name, status in state["backends"].items():
        print(f"  backend {name:9s} {status}")
    loaded = (state.get("loaded") or {}).get("path")
    if loaded != expected:
        print(f"check: a fresh Python loads {loaded or 'no extension'}, not {expected}", file=sys.stderr)
        return 1
    if state["backends"].get("cpp") != "available":
        print("check: the cpp backend is not usable with this build", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    if args.cache_dir:
        os.environ[_loader.CACHE_ENV] = os.path.abspath(args.cache_dir)
    running = B.torch_identity(torch)
    entry = _loader.cache_entry(running)
    current: Optional[Dict] = _loader.extension_info()
    manifest = None
    if entry is not None and not args.force:
        manifest, _ = _loader.check_entry(entry[0], entry[1])
    if manifest is not None:
        path = os.path.join(entry[0], manifest["so"])
        print(f"lsr_fast: the kernels for this torch are built already (at {manifest.get('built_at')}; --force compiles again):\n  {path}")
    elif not args.force and current and current.get("origin") == "package" and current.get("torch"):
        print(f"lsr_fast: the extension installed with the package is built for this torch; nothing to compile "
              f"(--force compiles a copy into {_loader.cache_root()}, which then takes precedence):\n  {current['path']}")
        for line in describe(current):
            print(line)
        return 0
    else:
        try:
            manifest = _loader.build(entry, running, explicit=True, force=args.force)
        except _loader.CompileError as error:
            print(f"lsr-fast build: error: {error}", file=sys.stderr)
            return 1
        path = os.path.join(os.path.dirname(manifest["path"]), manifest["so"])
        print(f"lsr_fast: compiled in {manifest['seconds']:.0f} s:\n  {path}")
    for line in describe(manifest):
        print(line)
    if current and current.get("path") != path:
        print(f"  (this process loaded {current['path']} at import; new Python processes load the build above)")
    return 0 if args.no_check else check_in_fresh_process(path)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lsr_fast.build", description=HELP)
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
