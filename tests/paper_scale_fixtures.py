"""Fixture datasets at the paper's sizes, in the real on-disk formats, and the paper-scale
``lsr-fast experiment`` command on them (used by tests/test_paper_scale.py and
scripts/paper_scale_cpu.py).

* GTA5 (1914x1052): ``root/images/NAME.png`` RGB and ``root/labels/NAME.png``, a paletted PNG
  whose indices are Cityscapes label ids.
* Cityscapes (2048x1024): ``root/leftImg8bit/SPLIT/CITY/BASE_leftImg8bit.png`` RGB and
  ``root/gtFine/SPLIT/CITY/BASE_gtFine_labelIds.png``, an 8-bit grey PNG of label ids.

The label maps are drawn street scenes, not noise: sky above a skyline of buildings and trees,
a road narrowing to a vanishing point, sidewalks and terrain beside it, cars on the road, poles
with traffic signs and lights, people and a fence, and (Cityscapes) the ego vehicle's bonnet
(label id 1, void) at the bottom. Images colour each region with a per-dataset palette, a
vertical shading and mild noise, so the two datasets differ in look as GTA5 and Cityscapes do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

GTA5_SIZE = (1052, 1914)        # (height, width) of every GTA5 image
CITYSCAPES_SIZE = (1024, 2048)  # of every Cityscapes image

# Cityscapes label ids (labelIds, as GTA5's palette indices are too).
ID = dict(unlabeled=0, ego_vehicle=1, road=7, sidewalk=8, building=11, wall=12, fence=13, pole=17,
          traffic_light=19, traffic_sign=20, vegetation=21, terrain=22, sky=23, person=24, rider=25, car=26,
          truck=27, bus=28, motorcycle=32, bicycle=33)

# Region colours per dataset: GTA5 saturated and bright, Cityscapes greyer and darker.
_COLOURS = {
    "gta5": {0: (0, 0, 0), 1: (20, 20, 20), 7: (110, 100, 120), 8: (220, 60, 220), 11: (150, 80, 60), 12: (160, 160, 100),
             13: (200, 150, 150), 17: (200, 200, 60), 19: (250, 170, 30), 20: (240, 240, 0), 21: (60, 180, 40),
             22: (160, 230, 120), 23: (80, 160, 250), 24: (240, 30, 60), 25: (255, 0, 0), 26: (20, 20, 200),
             27: (0, 40, 110), 28: (0, 90, 120), 32: (30, 0, 250), 33: (140, 20, 40)},
    "cityscapes": {0: (0, 0, 0), 1: (30, 30, 35), 7: (90, 85, 95), 8: (140, 110, 130), 11: (95, 90, 85), 12: (120, 115, 100),
                   13: (130, 120, 120), 17: (120, 120, 110), 19: (170, 140, 60), 20: (180, 180, 70), 21: (70, 100, 50),
                   22: (120, 140, 100), 23: (150, 170, 190), 24: (150, 60, 70), 25: (170, 50, 50), 26: (50, 50, 90),
                   27: (40, 50, 70), 28: (50, 70, 80), 32: (60, 40, 120), 33: (100, 40, 50)},
}


def street_label_ids(height: int, width: int, seed: int, *, ego_vehicle: bool) -> np.ndarray:
    """A street scene as a uint8 (height, width) map of Cityscapes label ids."""
    rng = np.random.default_rng(seed)
    ids = np.full((height, width), ID["sky"], dtype=np.uint8)
    ys = np.arange(height)[:, None]
    xs = np.arange(width)[None, :]
    horizon = int(height * rng.uniform(0.42, 0.50))
    vanish_x = width * rng.uniform(0.42, 0.58)

    # Skyline: blocks of buildings and trees of varying height, walls in front of some.
    x = 0
    while x < width:
        block = int(width * rng.uniform(0.05, 0.14))
        top = int(height * rng.uniform(0.05, 0.35))
        kind = ID["vegetation"] if rng.uniform() < 0.3 else ID["building"]
        ids[top:horizon, x:x + block] = kind
        if kind == ID["building"] and rng.uniform() < 0.25:
            ids[horizon - int(height * 0.04):horizon, x:x + block] = ID["wall"]
        x += block

    # Ground: terrain, then sidewalk and road narrowing towards the vanishing point.
    depth = np.clip((ys - horizon) / max(height - horizon, 1), 0.0, 1.0)  # 0 at the horizon, 1 at the bottom
    ground = ys >= horizon
    road_half = 0.02 * width + depth * 0.55 * width
    walk_half = road_half * 1.35 + 0.01 * width
    offset = np.abs(xs - vanish_x)
    ids[ground & (offset >= walk_half)] = ID["terrain"]
    ids[ground & (offset < walk_half)] = ID["sidewalk"]
    ids[ground & (offset < road_half)] = ID["road"]

    # A fence along the far left edge of the sidewalk.
    fence = ground & (ys < horizon + 0.08 * height) & (xs < vanish_x - walk_half) & (xs > vanish_x - walk_half - 0.08 * width)
    ids[fence] = ID["fence"]

    def box(y0, y1, x0, x1, value):
        y0, y1 = max(int(y0), 0), min(int(y1), height)
        x0, x1 = max(int(x0), 0), min(int(x1), width)
        if y1 > y0 and x1 > x0:
            ids[y0:y1, x0:x1] = value

    # Vehicles on the road, larger nearer the camera.
    for _ in range(rng.integers(3, 6)):
        d = rng.uniform(0.1, 0.8)
        y = horizon + d * (height - horizon) * 0.75
        half = 0.02 * width + d * 0.55 * width
        w = width * (0.03 + 0.12 * d)
        h = w * rng.uniform(0.5, 0.8)
        cx = vanish_x + rng.uniform(-0.8, 0.8) * half
        kind = rng.choice([ID["car"], ID["car"], ID["car"], ID["truck"], ID["bus"]])
        box(y - h, y, cx - w / 2, cx + w / 2, kind)

    # Poles with a sign or a traffic light, people, a rider on a bicycle, on the sidewalks.
    for side in (-1, 1):
        for _ in range(rng.integers(2, 4)):
            d = rng.uniform(0.1, 0.7)
            y = horizon + d * (height - horizon)
            half = (0.02 * width + d * 0.55 * width) * 1.15
            px = vanish_x + side * half
            pole_h = height * (0.12 + 0.35 * d)
            pole_w = max(width * (0.002 + 0.006 * d), 2)
            box(y - pole_h, y, px - pole_w / 2, px + pole_w / 2, ID["pole"])
            head = ID["traffic_sign"] if rng.uniform() < 0.6 else ID["traffic_light"]
            box(y - pole_h - pole_w * 5, y - pole_h, px - pole_w * 3, px + pole_w * 3, head)
        for _ in range(rng.integers(1, 4)):
            d = rng.uniform(0.2, 0.8)
            y = horizon + d * (height - horizon)
            half = (0.02 * width + d * 0.55 * width) * 1.2
            px = vanish_x + side * half
            w, h = width * (0.006 + 0.015 * d), height * (0.05 + 0.2 * d)
            box(y - h, y, px - w / 2, px + w / 2, ID["person"])
    d = rng.uniform(0.3, 0.6)
    y = horizon + d * (height - horizon)
    px = vanish_x + rng.uniform(-0.3, 0.3) * (0.02 * width + d * 0.55 * width)
    w = width * (0.01 + 0.02 * d)
    box(y - 0.6 * w, y, px - w, px + w, ID["bicycle"])
    box(y - 0.6 * w - 2.2 * w, y - 0.6 * w, px - w / 3, px + w / 3, ID["rider"])

    if ego_vehicle:  # the bonnet of Cityscapes' recording car: void
        bonnet = height - (0.08 * height) * (1.0 - ((xs - width / 2) / (width / 2)) ** 2)
        ids[(ys >= bonnet) & (ys >= height * 0.9)] = ID["ego_vehicle"]
    return ids


def street_image(ids: np.ndarray, look: str, seed: int) -> np.ndarray:
    """An RGB uint8 image of a label map: palette colour, vertical shading, mild noise."""
    rng = np.random.default_rng(seed + 1_000_003)
    lut = np.zeros((256, 3), dtype=np.float32)
    for label, colour in _COLOURS[look].items():
        lut[label] = colour
    rgb = lut[ids]
    height = ids.shape[0]
    rgb *= np.linspace(1.1, 0.8, height, dtype=np.float32)[:, None, None]
    rgb += rng.normal(0.0, 6.0, size=rgb.shape).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _palette() -> List[int]:
    """A 256-entry palette (GTA5's labels carry one; its colours are irrelevant to the ids)."""
    flat = []
    for index in range(256):
        flat += list(_COLOURS["gta5"].get(index, ((index * 7) % 256, (index * 13) % 256, (index * 29) % 256)))
    return flat


def write_paletted_ids(path: str, ids: np.ndarray) -> None:
    """A paletted ('P') PNG whose pixel indices are exactly ``ids``."""
    ids = np.ascontiguousarray(ids, dtype=np.uint8)
    im = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
    im.putpalette(_palette())
    im.save(path, compress_level=1)


def make_gta5(root: str, names: Sequence[str], seed: int = 0) -> None:
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "labels"), exist_ok=True)
    for k, name in enumerate(names):
        ids = street_label_ids(*GTA5_SIZE, seed=seed + k, ego_vehicle=False)
        Image.fromarray(street_image(ids, "gta5", seed + k)).save(os.path.join(root, "images", f"{name}.png"), compress_level=1)
        write_paletted_ids(os.path.join(root, "labels", f"{name}.png"), ids)


def make_cityscapes(root: str, split: str, items: Sequence[Tuple[str, str]], seed: int = 100) -> List[str]:
    """``items``: (city, base) pairs; returns their sample names ``CITY/BASE_leftImg8bit``."""
    names = []
    for k, (city, base) in enumerate(items):
        image_dir = os.path.join(root, "leftImg8bit", split, city)
        label_dir = os.path.join(root, "gtFine", split, city)
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(label_dir, exist_ok=True)
        ids = street_label_ids(*CITYSCAPES_SIZE, seed=seed + k, ego_vehicle=True)
        Image.fromarray(street_image(ids, "cityscapes", seed + k)).save(
            os.path.join(image_dir, f"{base}_leftImg8bit.png"), compress_level=1)
        Image.fromarray(ids, mode="L").save(os.path.join(label_dir, f"{base}_gtFine_labelIds.png"), compress_level=1)
        names.append(f"{city}/{base}_leftImg8bit")
    return names


GTA5_NAMES = ("00001", "00002", "00003")
CITYSCAPES_TRAIN = (("aachen", "aachen_000000_000019"), ("aachen", "aachen_000001_000019"),
                    ("bochum", "bochum_000000_000313"), ("bochum", "bochum_000000_000600"))
CITYSCAPES_VAL = (("frankfurt", "frankfurt_000000_000294"), ("lindau", "lindau_000000_000019"))


def make_paper_scale_datasets(base: str) -> Dict[str, object]:
    """GTA5 (3 images), Cityscapes train (4 images, the first and the third of them listed in a
    held-out selection list) and Cityscapes val (2 images) under ``base``."""
    gta5, cityscapes = os.path.join(base, "GTA5"), os.path.join(base, "cityscapes")
    make_gta5(gta5, GTA5_NAMES)
    train = make_cityscapes(cityscapes, "train", CITYSCAPES_TRAIN, seed=100)
    val = make_cityscapes(cityscapes, "val", CITYSCAPES_VAL, seed=200)
    selection = [train[0], train[2]]
    selection_list = os.path.join(base, "cityscapes_train_selection.txt")
    with open(selection_list, "w", encoding="utf-8") as handle:
        handle.write("# held-out selection images of the fixture's Cityscapes train split\n")
        handle.write("".join(f"{name}.png\n" for name in selection))
    return {"gta5": gta5, "cityscapes": cityscapes, "selection_list": selection_list, "selection": selection,
            "train": train, "val": val}


# ----------------------------------------------------------------------------- the command
PAPER_CONFIG = "configs/gta5_to_cityscapes.yaml"


def experiment_argv(data: Dict[str, object], out_dir: str, *, config: str = PAPER_CONFIG, adapt_steps: int = 3,
                    source_steps: int = 2, source_batch: int = 2, checkpoint_every: int = 1, extra: Sequence[str] = (),
                    source_extra: Sequence[str] = (), analysis: bool = True) -> List[str]:
    """``lsr-fast experiment -c CONFIG ...`` (as ``python -m lsr_fast.cli``) on the fixtures:
    random init (model.pretrained=null: pre-training learns BN statistics, adaptation starts from
    its best.pt), CPU, compiled kernels, a few steps, validation on the selection images only at
    the end of each stage, every step logged; the adaptation writes last.pt every
    ``checkpoint_every`` steps (0: only at the end), pre-training only at its end."""
    argv = [sys.executable, "-m", "lsr_fast.cli", "experiment", "-c", config,
            f"out_dir={out_dir}", "device=cpu", "backend=cpp", "model.pretrained=null",
            "data.workers=0", "train.progress=false", "train.log_every=1",
            f"data.source.root={data['gta5']}", f"data.target.root={data['cityscapes']}",
            f"data.val.root={data['cityscapes']}", f"data.target.exclude_list={data['selection_list']}",
            f"data.val.split_list={data['selection_list']}", "experiment.test_max_images=2",
            f"train.steps={adapt_steps}", "train.val_every=0", f"train.checkpoint_every={checkpoint_every}", *extra,
            "--source", f"train.steps={source_steps}", "--source", f"train.batch_source={source_batch}",
            "--source", "train.val_every=0", "--source", "train.checkpoint_every=0"]
    for item in source_extra:
        argv += ["--source", item]
    if not analysis:
        argv.append("--no-analysis")
    return argv


class Finished:
    """What one run of the command left: exit code, output, wall time, the process's peak RSS
    (KiB, ``os.wait4``), for each watched file when it appeared and the peak RSS until then, and
    for each followed file the (wall seconds, process CPU seconds) at which each line appeared."""

    def __init__(self, returncode: int, output: str, seconds: float, max_rss_kib: int, signalled_at: Optional[float],
                 appeared: Dict[str, Tuple[float, Optional[int]]],
                 lines: Dict[str, List[Tuple[Optional[float], Optional[float]]]]):
        self.returncode, self.output, self.seconds = returncode, output, seconds
        self.max_rss_kib, self.signalled_at, self.appeared, self.lines = max_rss_kib, signalled_at, appeared, lines

    def __repr__(self):
        return f"Finished(rc={self.returncode}, {self.seconds:.0f} s, max RSS {self.max_rss_kib / 1048576:.2f} GiB)"


def _peak_rss_kib(pid: int) -> Optional[int]:
    """VmHWM (the peak resident set so far) of a live process, in KiB; None if unreadable."""
    try:
        with open(f"/proc/{pid}/status", "r", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU time of a live process (all its threads), in seconds; None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "r", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as handle:
            return handle.read().count(b"\n")
    except OSError:
        return 0


def run_command(argv: Sequence[str], cwd: str, log_path: str, *, terminate_when: Optional[str] = None,
                watch: Optional[Dict[str, str]] = None, follow: Sequence[str] = (), timeout: float = 3600.0,
                env: Optional[Dict[str, str]] = None) -> Finished:
    """Run ``argv`` to its end (output to ``log_path``); with ``terminate_when`` (a file path),
    send SIGTERM once that file exists. ``watch`` (name -> file path): when each file first
    appears, and the process's VmHWM at that moment (the peak RSS of everything before it).
    ``follow`` (file paths, e.g. metrics.jsonl): for each complete line written to them, the wall
    time and the process's CPU time when it was seen (polled every 0.2 s)."""
    start = time.perf_counter()
    signalled_at = None
    appeared: Dict[str, Tuple[float, Optional[int]]] = {}
    watch = dict(watch or {})
    # Lines already there (a resumed run's) get no stamp.
    lines: Dict[str, List[Tuple[Optional[float], Optional[float]]]] = {path: [(None, None)] * _count_lines(path)
                                                                         for path in follow}
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(list(argv), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while True:
            for name, path in watch.items():
                if name not in appeared and os.path.exists(path):
                    appeared[name] = (time.perf_counter() - start, _peak_rss_kib(process.pid))
            for path, seen in lines.items():
                count = _count_lines(path)
                if count > len(seen):
                    stamp = (time.perf_counter() - start, _cpu_seconds(process.pid))
                    seen.extend([stamp] * (count - len(seen)))
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid == process.pid:
                break
            if terminate_when is not None and signalled_at is None and os.path.exists(terminate_when):
                process.send_signal(signal.SIGTERM)
                signalled_at = time.perf_counter() - start
            if time.perf_counter() - start > timeout:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.2)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    with open(log_path, "r", encoding="utf-8") as handle:
        output = handle.read()
    return Finished(process.returncode, output, time.perf_counter() - start, usage.ru_maxrss, signalled_at, appeared, lines)


def read_jsonl(path: str) -> List[dict]:
    with open(path, "r", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def seconds_per_step(metrics_path: str) -> Dict[int, float]:
    """Step -> seconds of that step, from a run logged with train.log_every=1 (the trainer's
    ``steps_per_s`` of a one-step window: data loading, forward, backward and SGD step;
    validation, checkpoints and logging are outside it)."""
    return {r["step"]: 1.0 / r["steps_per_s"] for r in read_jsonl(metrics_path) if "steps_per_s" in r}


def cpu_seconds_per_step(metrics_path: str, stamps: Sequence[Tuple[Optional[float], Optional[float]]]) -> Dict[int, float]:
    """Step -> CPU seconds (all threads) of the training process between the previous step's
    record and this step's, from ``run_command(follow=[metrics_path])`` stamps of a run logged
    with train.log_every=1; only steps whose previous step was logged in the same process."""
    records = read_jsonl(metrics_path)[:len(stamps)]
    out = {}
    previous = None
    for record, (_, cpu) in zip(records, stamps):
        if "steps_per_s" not in record:
            previous = None  # a validation record: the next window would include it
            continue
        if previous is not None and cpu is not None and previous[0] == record["step"] - 1:
            out[record["step"]] = cpu - previous[1]
        previous = (record["step"], cpu) if cpu is not None else None
    return out
