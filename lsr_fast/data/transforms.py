"""Training and evaluation transforms: resize, crop, flip, the paper's photometric augmentation,
and input normalisation.

A transform is called as ``transform(image, label, generator)`` with a uint8 (3, H, W) RGB image
and an integer (H, W) label map, and returns a float32 (3, h, w) network input and an int64
(h, w) label map. Every random draw comes from ``generator``, so the same generator state gives
the same output (AugmentedDataset seeds one per sample for exact resume).

Photometric augmentation (paper Sec. 5), applied to the float image on the 0..255 scale after
resize, crop and flip, in this order:

* white point: each channel c is multiplied by (255 + u_c) / 255, u_c ~ U(-white_point, white_point);
* jitter: each channel c gets an additive offset v_c ~ U(-jitter, jitter);
* the image is then clipped to [0, 255];
* blur: with probability ``blur_prob``, a Gaussian blur with sigma ~ U(blur_sigma) (kernel radius
  ceil(3 sigma), edge pixels replicated), the same for all channels.

Setting white_point, jitter or blur_prob to 0 switches that step off.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# Input sizes used in the paper, as (height, width): GTA5 resized to 1280x720, SYNTHIA kept at
# 1280x760, Cityscapes resized to 1024x512.
PAPER_SIZES = {"gta5": (720, 1280), "synthia": (760, 1280), "cityscapes": (512, 1024)}

NORMALIZE_MODES = ("imagenet", "caffe", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, on 0..1
IMAGENET_STD = (0.229, 0.224, 0.225)
# Mean of the Caffe-trained DeepLab weights: BGR order, on the 0..255 scale.
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)


def _check_mode(mode: str) -> None:
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, got {mode!r}")


def _channel_view(values, like: torch.Tensor) -> torch.Tensor:
    # (3,) constants shaped to broadcast over (..., 3, H, W).
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(3, 1, 1)


def normalize_image(image: torch.Tensor, mode: str = "imagenet") -> torch.Tensor:
    """RGB image on the 0..255 scale (uint8 or float; (3, H, W) or (B, 3, H, W)) -> float32
    network input.

    "imagenet": x / 255, minus the ImageNet mean, divided by its std (RGB order).
    "caffe": channels reordered to BGR, minus CAFFE_MEAN_BGR, on the 0..255 scale.
    "none": x / 255.
    """
    _check_mode(mode)
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"image must be (3, H, W) or (B, 3, H, W), got shape {tuple(image.shape)}")
    x = image.to(torch.float32)
    if mode == "imagenet":
        return (x / 255.0 - _channel_view(IMAGENET_MEAN, x)) / _channel_view(IMAGENET_STD, x)
    if mode == "caffe":
        return x.flip(-3) - _channel_view(CAFFE_MEAN_BGR, x)
    return x / 255.0


def denormalize_image(tensor: torch.Tensor, mode: str = "imagenet") -> torch.Tensor:
    """Inverse of normalize_image: network input -> uint8 RGB image of the same layout.

    Values are rounded and, for display, clipped to [0, 255] (an augmented or perturbed input
    may leave the range slightly)."""
    _check_mode(mode)
    if tensor.dim() not in (3, 4) or tensor.shape[-3] != 3:
        raise ValueError(f"tensor must be (3, H, W) or (B, 3, H, W), got shape {tuple(tensor.shape)}")
    x = tensor.detach().to(torch.float32)
    if mode == "imagenet":
        x = (x * _channel_view(IMAGENET_STD, x) + _channel_view(IMAGENET_MEAN, x)) * 255.0
    elif mode == "caffe":
        x = (x + _channel_view(CAFFE_MEAN_BGR, x)).flip(-3)
    else:
        x = x * 255.0
    return x.round().clamp(0, 255).to(torch.uint8)


def _size_pair(name: str, value) -> Optional[Tuple[int, int]]:
    if value is None:
        return None
    if (
        not isinstance(value, Sequence) or len(value) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{name} must be a (height, width) pair of positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def _check_inputs(image: torch.Tensor, label: Optional[torch.Tensor]) -> None:
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a uint8 (3, H, W) tensor, got {got}")
    if label is None:
        return
    if not isinstance(label, torch.Tensor) or label.dim() != 2 or label.is_floating_point() or label.dtype == torch.bool:
        got = f"{label.dtype} {tuple(label.shape)}" if isinstance(label, torch.Tensor) else type(label).__name__
        raise ValueError(f"label must be an integer (H, W) tensor, got {got}")
    if tuple(label.shape) != tuple(image.shape[1:]):
        raise ValueError(f"image is {tuple(image.shape[1:])} but label is {tuple(label.shape)} (H, W)")


def resize_image(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bicubic (antialiased when shrinking) resize of a (3, H, W) image on the 0..255 scale to
    float32 (3, h, w), clamped to [0, 255] (bicubic overshoots at edges)."""
    x = image.to(torch.float32)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    x = F.interpolate(x[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]
    return x.clamp_(0.0, 255.0)


def resize_label(label: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (H, W) label map: output pixel (i, j) takes input pixel
    (floor((i + 0.5) H / h), floor((j + 0.5) W / w)), so only values present survive."""
    height, width = label.shape
    rows = ((torch.arange(size[0], dtype=torch.float64) + 0.5) * (height / size[0])).floor().long().clamp_(max=height - 1)
    cols = ((torch.arange(size[1], dtype=torch.float64) + 0.5) * (width / size[1])).floor().long().clamp_(max=width - 1)
    return label[rows][:, cols]


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a float (3, H, W) image, radius ceil(3 sigma), edges replicated.

    Written as a sum of shifted slices: on the CPU this is several times faster than a grouped
    conv2d at training sizes."""
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).tolist()
    height, width = image.shape[-2:]
    padded = F.pad(image[None], (radius, radius, radius, radius), mode="replicate")[0]
    rows = padded[:, :, 0:width] * kernel[0]
    for i in range(1, 2 * radius + 1):
        rows.add_(padded[:, :, i:i + width], alpha=kernel[i])
    out = rows[:, 0:height] * kernel[0]
    for i in range(1, 2 * radius + 1):
        out.add_(rows[:, i:i + height], alpha=kernel[i])
    return out


def _uniform(generator: torch.Generator, low: float, high: float, n: int = 1) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


class TrainTransform:
    """Resize -> random crop -> random horizontal flip -> photometric augmentation -> normalize.

    resize: (height, width) or None; the image is resized bicubic, the label nearest.
    crop: (height, width) or None; a random window, which must fit inside the (resized) image.
    flip: horizontal flip with probability 0.5.
    white_point, jitter, blur_prob, blur_sigma: see the module docstring; 0 switches one off.
    normalize: "imagenet", "caffe" or "none" (see normalize_image).
    """

    def __init__(
        self,
        resize: Optional[Tuple[int, int]] = None,
        crop: Optional[Tuple[int, int]] = None,
        flip: bool = True,
        white_point: float = 75.0,
        jitter: float = 25.0,
        blur_prob: float = 0.5,
        blur_sigma: Tuple[float, float] = (0.1, 2.0),
        normalize: str = "imagenet",
    ):
        self.resize = _size_pair("resize", resize)
        self.crop = _size_pair("crop", crop)
        self.flip = bool(flip)
        if not 0.0 <= float(white_point) < 255.0:
            raise ValueError(f"white_point must be in [0, 255) so that the gain stays positive, got {white_point}")
        if not float(jitter) >= 0.0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        if not 0.0 <= float(blur_prob) <= 1.0:
            raise ValueError(f"blur_prob must be in [0, 1], got {blur_prob}")
        if len(blur_sigma) != 2 or not 0.0 < float(blur_sigma[0]) <= float(blur_sigma[1]):
            raise ValueError(f"blur_sigma must be a (low, high) pair with 0 < low <= high, got {blur_sigma!r}")
        _check_mode(normalize)
        self.white_point = float(white_point)
        self.jitter = float(jitter)
        self.blur_prob = float(blur_prob)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.normalize = normalize

    def __repr__(self) -> str:
        return (
            f"TrainTransform(resize={self.resize}, crop={self.crop}, flip={self.flip}, "
            f"white_point={self.white_point}, jitter={self.jitter}, blur_prob={self.blur_prob}, "
            f"blur_sigma={self.blur_sigma}, normalize={self.normalize!r})"
        )

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        _check_inputs(image, label)
        if not isinstance(generator, torch.Generator):
            raise TypeError("TrainTransform needs a torch.Generator: all of its randomness comes from it")
        label = label.long()
        x = image.to(torch.float32)
        if self.resize is not None:
            x = resize_image(image, self.resize)
            label = resize_label(label, self.resize)

        if self.crop is not None:
            height, width = label.shape
            ch, cw = self.crop
            if ch > height or cw > width:
                raise ValueError(f"crop {self.crop} is larger than the image ({height}, {width}) (H, W)")
            top = int(torch.randint(0, height - ch + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - cw + 1, (1,), generator=generator))
            x = x[:, top:top + ch, left:left + cw]
            label = label[top:top + ch, left:left + cw]

        if self.flip and float(torch.rand(1, generator=generator)) < 0.5:
            x = x.flip(-1)
            label = label.flip(-1)

        if self.white_point > 0 or self.jitter > 0:
            gain = torch.ones(3, dtype=torch.float64)
            offset = torch.zeros(3, dtype=torch.float64)
            if self.white_point > 0:
                gain = (255.0 + _uniform(generator, -self.white_point, self.white_point, 3)) / 255.0
            if self.jitter > 0:
                offset = _uniform(generator, -self.jitter, self.jitter, 3)
            x = (x * gain.to(x.dtype).view(3, 1, 1) + offset.to(x.dtype).view(3, 1, 1)).clamp_(0.0, 255.0)

        if self.blur_prob > 0 and float(torch.rand(1, generator=generator)) < self.blur_prob:
            sigma = float(_uniform(generator, *self.blur_sigma))
            x = gaussian_blur(x, sigma)

        return normalize_image(x.contiguous(), self.normalize), label.contiguous()


class EvalTransform:
    """Resizes the image only (bicubic) and normalizes it; the label keeps its full resolution,
    as evaluation is done at full label resolution (predictions are upsampled to it)."""

    def __init__(self, resize: Optional[Tuple[int, int]] = None, normalize: str = "imagenet"):
        self.resize = _size_pair("resize", resize)
        _check_mode(normalize)
        self.normalize = normalize

    def __repr__(self) -> str:
        return f"EvalTransform(resize={self.resize}, normalize={self.normalize!r})"

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        _check_inputs(image, label)
        x = resize_image(image, self.resize) if self.resize is not None else image.to(torch.float32)
        return normalize_image(x, self.normalize), label.long()
