"""Built-in synthetic domain-shift scenes: the embedded default dataset (no files to download).

``SyntheticScenes("source", n)`` and ``SyntheticScenes("target", n)`` are street scenes drawn
from the same layout distribution (sky, a skyline of buildings and trees along a horizon, a road
in perspective with sidewalks, poles with signs, cars, people; sizes grow with the distance
below the horizon) but rendered differently, as GTA5 differs from Cityscapes:

- source: flat colours per class with a little per-instance variation, hard edges;
- target: another palette (hue and saturation moved per class), random global lighting (gain,
  gamma, colour cast, a brightness gradient), texture noise per region, blur, sensor noise.

A model trained on the source loses clearly on the target, while shapes and context stay the
same and the classes remain separable by appearance in the target, so adaptation has room to help.

Items are generated on the fly and depend only on (domain, seed, index): not on access order,
worker process or platform (layout draws use ``random.Random.random``, whose sequence Python
guarantees; pixel noise uses a seeded ``torch.Generator`` on the CPU).

Labels are Cityscapes trainIds (19-class numbering); only ``SYNTHETIC_CLASSES`` occur, plus 255
(void) on the ego-vehicle hood that about half the images show in a thin strip at the bottom
(as Cityscapes labels its ego vehicle), in both domains.
"""

from __future__ import annotations

import math
import operator
import random

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

NUM_CLASSES = 19
IGNORE_INDEX = 255

ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, SKY, PERSON, CAR = 0, 1, 2, 5, 7, 8, 10, 11, 13
SYNTHETIC_CLASSES = (ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, SKY, PERSON, CAR)

DOMAINS = ("source", "target")

# Colour of each drawn part per domain: (base RGB in [0, 1], or a tuple of them to pick from per
# instance (car paints, clothes), per-instance jitter amplitude). The source palette is saturated
# and game-like. The target one moves each colour about 36% of the way towards a dull,
# camera-like palette, which shifts hue and saturation per class (signs red -> orange, poles
# yellow -> olive, sidewalks pink -> greyer, road purple-grey -> neutral grey, sky paler).
# How far was tuned with a small segmentation net (64x128, 200 training images, ~2 min of CPU):
# trained on source it scores ~99 mIoU on source and ~62 on target; trained on target, ~96 on
# target. Moving all the way, the palette alone brought the source-trained net to ~20 mIoU on
# the target (no room left for adaptation); the camera look alone (texture, lighting, blur,
# noise) costs it ~18 points.
_PALETTES = {
    "source": {
        "sky": ((0.35, 0.65, 0.95), 0.04),
        "road": ((0.45, 0.40, 0.50), 0.03),
        "marking": ((0.95, 0.95, 0.90), 0.02),
        "sidewalk": ((0.80, 0.68, 0.72), 0.04),
        "building": ((0.62, 0.44, 0.32), 0.10),
        "vegetation": ((0.22, 0.68, 0.20), 0.06),
        "trunk": ((0.40, 0.26, 0.14), 0.04),
        "pole": ((0.80, 0.80, 0.25), 0.04),
        "sign": ((0.92, 0.20, 0.15), 0.05),
        "clothes": (((0.85, 0.20, 0.50), (0.20, 0.70, 0.80), (0.90, 0.55, 0.10), (0.30, 0.30, 0.80)), 0.08),
        "skin": ((0.95, 0.72, 0.55), 0.04),
        "car": (((0.15, 0.25, 0.80), (0.80, 0.12, 0.12), (0.90, 0.90, 0.92), (0.14, 0.14, 0.16), (0.95, 0.75, 0.10)), 0.08),
        "glass": ((0.55, 0.80, 0.90), 0.03),
        "wheel": ((0.08, 0.08, 0.08), 0.02),
        "hood": ((0.10, 0.10, 0.12), 0.02),
    },
    "target": {
        "sky": ((0.50, 0.71, 0.92), 0.05),
        "road": ((0.40, 0.40, 0.41), 0.04),
        "marking": ((0.89, 0.89, 0.86), 0.04),
        "sidewalk": ((0.72, 0.64, 0.65), 0.05),
        "building": ((0.58, 0.46, 0.36), 0.12),
        "vegetation": ((0.26, 0.58, 0.19), 0.06),
        "trunk": ((0.36, 0.25, 0.16), 0.04),
        "pole": ((0.62, 0.62, 0.28), 0.05),
        "sign": ((0.90, 0.38, 0.15), 0.06),
        "clothes": (((0.61, 0.20, 0.43), (0.17, 0.49, 0.55), (0.72, 0.46, 0.14), (0.37, 0.37, 0.70), (0.74, 0.19, 0.39)), 0.10),
        "skin": ((0.89, 0.68, 0.53), 0.06),
        "car": (((0.17, 0.24, 0.65), (0.67, 0.13, 0.13), (0.84, 0.85, 0.86), (0.12, 0.12, 0.14), (0.77, 0.65, 0.24)), 0.08),
        "glass": ((0.41, 0.58, 0.65), 0.04),
        "wheel": ((0.07, 0.07, 0.07), 0.02),
        "hood": ((0.11, 0.11, 0.12), 0.02),
    },
}

# Target texture amplitude per class (fine grain, coarse blotches), relative to the colour.
_TEXTURE = {
    ROAD: (0.10, 0.08), SIDEWALK: (0.08, 0.10), BUILDING: (0.06, 0.15), POLE: (0.04, 0.04),
    SIGN: (0.03, 0.03), VEGETATION: (0.25, 0.20), SKY: (0.01, 0.06), PERSON: (0.06, 0.05),
    CAR: (0.05, 0.05),
}

_RECT, _ELLIPSE = 0, 1


def _mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): nearby (seed, index) pairs get unrelated streams."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        h = (h + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class _Canvas:
    """Label map, instance map and colour table of one scene, in coordinates where the image is
    1 unit high (x runs over [0, W/H]); pixel centres sit at (i + 0.5) / H."""

    def __init__(self, height: int, width: int, rng: random.Random, palette):
        self.h, self.w = height, width
        self.ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
        self.xs = (torch.arange(width, dtype=torch.float32) + 0.5) / height
        self.rng = rng
        self.palette = palette
        self.colours = []  # one RGB triple per instance id
        self.label = torch.empty(height, width, dtype=torch.int64)
        self.inst = torch.empty(height, width, dtype=torch.int64)

    def u(self, lo: float = 0.0, hi: float = 1.0) -> float:
        return lo + (hi - lo) * self.rng.random()

    def count(self, lo: int, hi: int) -> int:
        """A uniform integer in [lo, hi]."""
        return lo + min(int(self.rng.random() * (hi - lo + 1)), hi - lo)

    def colour(self, part: str, shade: float = 1.0) -> int:
        """A new instance id with the domain's colour for ``part``, jittered per instance."""
        base, jitter = self.palette[part]
        if isinstance(base[0], tuple):
            base = base[min(int(self.rng.random() * len(base)), len(base) - 1)]
        # A shared brightness jitter plus a smaller per-channel one.
        b = 1.0 + jitter * (2 * self.rng.random() - 1)
        rgb = [min(max(shade * (c * b + 0.5 * jitter * (2 * self.rng.random() - 1)), 0.0), 1.0) for c in base]
        self.colours.append(rgb)
        return len(self.colours) - 1

    def paint(self, kind: int, cls: int, iid: int, cx: float, cy: float, rx: float, ry: float) -> None:
        """Paint a rectangle or an ellipse (centre, half-sizes) over its bounding box only."""
        # At least half a pixel wide, so thin far poles still cover one pixel column.
        rx, ry = max(rx, 0.5 / self.h), max(ry, 0.5 / self.h)
        r0, r1 = max(0, math.floor((cy - ry) * self.h)), min(self.h, math.ceil((cy + ry) * self.h) + 1)
        c0, c1 = max(0, math.floor((cx - rx) * self.h)), min(self.w, math.ceil((cx + rx) * self.h) + 1)
        if r0 >= r1 or c0 >= c1:
            return
        dy = (self.ys[r0:r1, None] - cy) / ry
        dx = (self.xs[None, c0:c1] - cx) / rx
        if kind == _RECT:
            mask = (dy.abs() <= 1) & (dx.abs() <= 1)
        else:
            mask = dy * dy + dx * dx <= 1
        self.label[r0:r1, c0:c1].masked_fill_(mask, cls)
        self.inst[r0:r1, c0:c1].masked_fill_(mask, iid)


def _layout(c: _Canvas) -> torch.Tensor:
    """Draw the scene into ``c``; returns the building windows (H, W) bool, before occlusion."""
    aspect = c.w / c.h
    Y, X = c.ys[:, None], c.xs[None, :]
    hz = c.u(0.36, 0.50)                      # horizon row
    xv = aspect * c.u(0.40, 0.60)             # vanishing point
    d = (Y - hz).clamp(min=0)                 # image distance below the horizon: object scale
    ground = Y > hz

    # Road and sidewalks: wedges from the vanishing point.
    sl, sr = c.u(1.0, 1.7), c.u(1.0, 1.7)
    wl, wr = c.u(0.3, 0.7), c.u(0.3, 0.7)
    road = ground & (X >= xv - sl * d) & (X <= xv + sr * d)
    side = ground & ~road & (X >= xv - sl * (1 + wl) * d) & (X <= xv + sr * (1 + wr) * d)

    # Skyline: column segments of buildings (mostly) or vegetation, taller away from the
    # vanishing point (nearer façades); below the horizon they fill what the sidewalks leave.
    n_seg = max(2, round(c.u(5, 10) * aspect / 2))
    cuts = sorted(c.u(0, aspect) for _ in range(n_seg - 1))
    seg = torch.bucketize(c.xs, torch.tensor(cuts, dtype=torch.float32))  # (W,)
    is_tree = [c.rng.random() < 0.25 for _ in range(n_seg)]
    slope = torch.tensor([c.u(0.15, 0.4) if t else c.u(0.3, 1.1) for t in is_tree])
    offset = torch.tensor([c.u(0.02, 0.07) if t else c.u(0.02, 0.15) for t in is_tree])
    bumps = torch.tensor([c.u(0.01, 0.03) if t else 0.0 for t in is_tree])
    phase = torch.tensor([c.u(0, 6.3) for _ in range(n_seg)])
    seg_class = torch.tensor([VEGETATION if t else BUILDING for t in is_tree])
    seg_iid = torch.tensor([c.colour("vegetation" if t else "building") for t in is_tree])
    xd = (c.xs - xv).abs()
    top = hz - (slope[seg] * xd + offset[seg] + bumps[seg] * torch.sin(c.xs * 90.0 + phase[seg]))
    structure = (Y >= top[None, :]) & ~road & ~side

    sky_iid = c.colour("sky")
    road_iid, side_iid = c.colour("road"), c.colour("sidewalk")
    c.label.copy_(torch.where(structure, seg_class[seg][None, :], torch.full_like(c.label, SKY)))
    c.inst.copy_(torch.where(structure, seg_iid[seg][None, :], torch.full_like(c.inst, sky_iid)))
    c.label.masked_fill_(road, ROAD)
    c.inst.masked_fill_(road, road_iid)
    c.label.masked_fill_(side, SIDEWALK)
    c.inst.masked_fill_(side, side_iid)

    # Dashed lane marking (label road), dashes lengthening towards the camera.
    lane = xv + c.u(-0.3, 0.3) * d
    dashes = torch.frac(torch.log(d.clamp(min=1e-3)) * 4.0) < 0.5
    marking = road & ((X - lane).abs() <= 0.015 * d) & dashes & (d > 0.02)
    c.inst.masked_fill_(marking, c.colour("marking"))

    # Building windows: a grid per building, spacing growing with the façade's nearness.
    spacing = 0.05 * (slope[seg] * xd + 0.1)  # (W,)
    # Depth below the horizon where the façade meets the sidewalk: no windows at street level.
    base = torch.where(c.xs < xv, xd / (sl * (1 + wl)), xd / (sr * (1 + wr)))
    wx = torch.frac((c.xs - torch.tensor([0.0] + cuts)[seg]) / spacing)
    wy = torch.frac((Y - top[None, :]) / spacing[None, :])
    windows = (
        (c.label == BUILDING) & (wx[None, :] > 0.3) & (wx[None, :] < 0.7) & (wy > 0.35) & (wy < 0.75)
        & (Y > top[None, :] + 0.5 * spacing[None, :]) & (Y < hz + 0.7 * base[None, :])
    )

    # Objects, painted far to near: (distance below horizon, kind, parameters).
    objects = []
    for _ in range(c.count(1, 4)):  # poles at the curb, some with a sign
        objects.append((c.u(0.03, 0.4), "pole", c.rng.random() < 0.5, c.rng.random() < 0.75))
    for _ in range(c.count(0, 3)):  # trees at the outer edge of the sidewalks
        objects.append((c.u(0.03, 0.4), "tree", c.rng.random() < 0.5, None))
    for _ in range(c.count(1, 6)):  # cars on the road
        objects.append((c.u(0.02, 0.38), "car", c.u(-0.85, 0.85), None))
    for _ in range(c.count(0, 6)):  # people on the sidewalks
        objects.append((c.u(0.03, 0.5), "person", c.rng.random() < 0.5, c.u(0.1, 0.9)))
    objects.sort(key=lambda o: o[0])
    for dg, kind, a, b in objects:
        yg = hz + dg
        if kind == "pole":
            left, has_sign = a, b
            xg = xv - sl * dg * 1.08 if left else xv + sr * dg * 1.08
            h = c.u(2.2, 3.0) * dg
            c.paint(_RECT, POLE, c.colour("pole"), xg, yg - h / 2, 0.04 * dg, h / 2)
            if has_sign:
                size = 0.3 * dg
                kind_s = _ELLIPSE if c.rng.random() < 0.5 else _RECT
                c.paint(kind_s, SIGN, c.colour("sign"), xg, yg - h + size, size, size)
        elif kind == "tree":
            left = a
            xg = xv - sl * (1 + wl) * dg if left else xv + sr * (1 + wr) * dg
            h = c.u(2.5, 4.0) * dg
            veg = c.colour("vegetation")
            c.paint(_RECT, VEGETATION, c.colour("trunk"), xg, yg - h * 0.3, 0.06 * dg, h * 0.3)
            c.paint(_ELLIPSE, VEGETATION, veg, xg, yg - h * 0.7, c.u(0.5, 0.9) * dg, h * 0.32)
        elif kind == "car":
            t = a
            xg = xv + (t * sr if t > 0 else t * sl) * dg
            w, h = c.u(1.2, 2.0) * dg, c.u(0.9, 1.1) * dg
            body = c.colour("car")
            c.paint(_RECT, CAR, body, xg, yg - 0.3 * h, w / 2, 0.25 * h)
            c.paint(_RECT, CAR, body, xg, yg - 0.7 * h, 0.38 * w, 0.2 * h)
            c.paint(_RECT, CAR, c.colour("glass"), xg, yg - 0.72 * h, 0.3 * w, 0.13 * h)
            wheel = c.colour("wheel")
            for sx in (-0.35, 0.35):
                c.paint(_ELLIPSE, CAR, wheel, xg + sx * w, yg - 0.08 * h, 0.1 * w, 0.1 * h)
        else:  # person
            left, t = a, b
            if left:
                xg = xv - sl * dg * (1 + t * wl)
            else:
                xg = xv + sr * dg * (1 + t * wr)
            h = c.u(1.0, 1.25) * dg
            c.paint(_RECT, PERSON, c.colour("clothes", 0.6), xg, yg - 0.23 * h, 0.1 * h, 0.23 * h)
            c.paint(_ELLIPSE, PERSON, c.colour("clothes"), xg, yg - 0.6 * h, 0.14 * h, 0.2 * h)
            c.paint(_ELLIPSE, PERSON, c.colour("skin"), xg, yg - 0.88 * h, 0.06 * h, 0.08 * h)

    # Ego-vehicle hood (void) in about half the scenes: a flat arc at the bottom.
    if c.rng.random() < 0.5:
        hh = c.u(0.03, 0.06)
        c.paint(_ELLIPSE, IGNORE_INDEX, c.colour("hood"), aspect / 2, 1.0 + 3 * hh, 0.75 * aspect, 4 * hh)
    return windows


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Approximately Gaussian blur of a (3, H, W) image, edges replicated.

    Small sigmas: a separable kernel as sums of shifted slices (much faster on the CPU than a
    depthwise conv2d). Large sigmas (big images): the same at a reduced size, then a bilinear
    upsampling, so the cost does not grow with sigma; area-down plus bilinear-up adds a blur of
    about 0.5 * factor, which the small kernel's sigma accounts for.
    """
    h, w = image.shape[-2:]
    factor = max(1, min(int(sigma / 0.8), h // 8, w // 8))
    if factor > 1:
        small = F.interpolate(image[None], size=(h // factor, w // factor), mode="area")[0]
        small = _gaussian_blur(small, math.sqrt(max((sigma / factor) ** 2 - 0.25, 0.09)))
        return F.interpolate(small[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    radius = max(1, math.ceil(2.5 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).tolist()
    x = F.pad(image[None], (radius, radius, radius, radius), mode="replicate")[0]
    rows = sum(k[i] * x[:, :, i: i + w] for i in range(2 * radius + 1))
    return sum(k[i] * rows[:, i: i + h] for i in range(2 * radius + 1))


def _smooth_noise(gen: torch.Generator, height: int, width: int, cell: int) -> torch.Tensor:
    """Zero-mean noise of about unit amplitude varying over ``cell`` pixels, (H, W)."""
    small = torch.randn(1, 1, height // cell + 2, width // cell + 2, generator=gen)
    return F.interpolate(small, size=(height, width), mode="bicubic", align_corners=False)[0, 0]


def _target_look(image: torch.Tensor, label: torch.Tensor, c: _Canvas, gen: torch.Generator) -> torch.Tensor:
    """Camera-like appearance: texture per region, lighting, blur, sensor noise. (3, H, W) in [0, 1]."""
    h, w = label.shape
    scale = h / 128.0  # noise and blur sizes follow the resolution, so the look is the same at any size
    fine_amp = torch.zeros(256)
    coarse_amp = torch.zeros(256)
    for cls, (fa, ca) in _TEXTURE.items():
        fine_amp[cls], coarse_amp[cls] = fa, ca
    fine = _smooth_noise(gen, h, w, max(1, round(1.5 * scale)))
    coarse = _smooth_noise(gen, h, w, max(2, round(12 * scale)))
    texture = 1.0 + fine_amp[label] * fine + coarse_amp[label] * coarse
    image = image * texture[None]

    # Lighting: global gain and colour cast, a linear brightness gradient, gamma.
    Y, X = c.ys[:, None], c.xs[None, :] / (w / h)
    angle = c.u(0, 2 * math.pi)
    gradient = 1.0 + c.u(0.1, 0.3) * ((X - 0.5) * math.cos(angle) + (Y - 0.5) * math.sin(angle)) * 2
    cast = torch.tensor([c.u(0.9, 1.1), c.u(0.95, 1.05), c.u(0.9, 1.1)]).view(3, 1, 1)
    image = (image * (c.u(0.75, 1.2) * gradient[None] * cast)).clamp(0, 1) ** c.u(0.8, 1.25)

    image = _gaussian_blur(image, 0.8 * scale)
    image = image + 0.025 * torch.randn(image.shape, generator=gen)
    return image


class SyntheticScenes(Dataset):
    """Street scenes with a synthetic-to-real-like appearance shift, generated on the fly.

    Args:
        domain: "source" (flat, game-like rendering) or "target" (camera-like rendering).
        n: number of images (>= 1).
        size: (height, width) of every image, each >= 16.
        seed: picks the set of scenes; item ``i`` depends only on (domain, seed, i).

    Items are dicts: image (uint8 (3, H, W) RGB), label (int64 (H, W) Cityscapes trainIds, 255 on
    the ego-vehicle hood), name (str). Source and target use different random streams, so
    ``source[i]`` and ``target[i]`` are unrelated scenes from the same layout distribution.
    """

    def __init__(self, domain: str, n: int, size: tuple[int, int] = (128, 256), seed: int = 0):
        if domain not in DOMAINS:
            raise ValueError(f"domain must be 'source' or 'target', got {domain!r}")
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, got {type(n).__name__}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if (
            not isinstance(size, (tuple, list)) or len(size) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) for s in size)
        ):
            raise TypeError(f"size must be a (height, width) pair of ints, got {size!r}")
        if min(size) < 16:
            raise ValueError(f"size must have height and width >= 16, got {tuple(size)}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.domain, self.n, self.size, self.seed = domain, n, (int(size[0]), int(size[1])), seed
        self.num_classes = NUM_CLASSES
        self.classes = SYNTHETIC_CLASSES
        self.ignore_index = IGNORE_INDEX

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, object]:
        if isinstance(index, bool):
            raise TypeError("index must be an int, got bool")
        try:
            index = operator.index(index)  # also numpy and 0-d torch integers, as samplers may give
        except TypeError:
            raise TypeError(f"index must be an int, got {type(index).__name__}") from None
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} {self.domain} scenes")
        index %= self.n
        stream = _mix_seed(self.seed, DOMAINS.index(self.domain) + 1, index)
        h, w = self.size
        canvas = _Canvas(h, w, random.Random(stream), _PALETTES[self.domain])
        windows = _layout(canvas) & (canvas.label == BUILDING)  # windows still visible after objects
        colours = torch.tensor(canvas.colours, dtype=torch.float32)  # (instances, 3)
        image = colours[canvas.inst].permute(2, 0, 1)
        image = torch.where(windows, image * 0.55, image)
        if self.domain == "target":
            gen = torch.Generator().manual_seed(stream)
            image = _target_look(image, canvas.label, canvas, gen)
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        return {"image": image, "label": canvas.label, "name": f"synthetic_{self.domain}_s{self.seed}_{index:06d}"}

    def __repr__(self) -> str:
        return f"SyntheticScenes(domain={self.domain!r}, n={self.n}, size={self.size}, seed={self.seed})"
