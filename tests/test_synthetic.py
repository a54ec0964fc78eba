"""The built-in synthetic domain-shift scenes (lsr_fast/data/synthetic.py)."""

import os
import random
import subprocess
import sys

import pytest
import torch

from lsr_fast.data.synthetic import NUM_CLASSES, SYNTHETIC_CLASSES, SyntheticScenes

ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, SKY, PERSON, CAR = 0, 1, 2, 5, 7, 8, 10, 11, 13
SMALL = (64, 128)  # enough for every statistic below, and quick


def _items(domain, n, seed=0, size=SMALL):
    ds = SyntheticScenes(domain, n, size=size, seed=seed)
    return [ds[i] for i in range(n)]


@pytest.fixture(scope="module")
def scenes():
    """20 images per domain and seed (seeds 0 and 1), shared by the statistics tests."""
    return {(d, s): _items(d, 20, seed=s) for d in ("source", "target") for s in (0, 1)}


def test_class_ids_are_cityscapes_train_ids():
    assert NUM_CLASSES == 19
    assert SYNTHETIC_CLASSES == (0, 1, 2, 5, 7, 8, 10, 11, 13)


@pytest.mark.parametrize("domain", ["source", "target"])
def test_item_format(domain):
    ds = SyntheticScenes(domain, 3, size=(40, 72), seed=5)
    assert len(ds) == 3
    item = ds[2]
    assert set(item) == {"image", "label", "name"}
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 40, 72)
    assert item["label"].dtype == torch.int64 and item["label"].shape == (40, 72)
    assert isinstance(item["name"], str) and item["name"] != ds[1]["name"]
    assert torch.equal(ds[-1]["label"], item["label"])


@pytest.mark.parametrize("domain", ["source", "target"])
def test_deterministic_by_seed_and_index(domain):
    a = SyntheticScenes(domain, 6, size=SMALL, seed=3)
    b = SyntheticScenes(domain, 6, size=SMALL, seed=3)
    # Access order and the global random state must not matter.
    torch.manual_seed(1)
    random.seed(1)
    first = a[4]
    _ = [b[i] for i in (5, 0, 2)]
    torch.manual_seed(2)
    random.seed(2)
    again, other_instance = a[4], b[4]
    for item in (again, other_instance):
        assert torch.equal(item["image"], first["image"])
        assert torch.equal(item["label"], first["label"])
        assert item["name"] == first["name"]
    other_index = a[3]
    other_seed = SyntheticScenes(domain, 6, size=SMALL, seed=4)[4]
    for item in (other_index, other_seed):
        assert not torch.equal(item["label"], first["label"])
        assert not torch.equal(item["image"], first["image"])


def test_domains_use_different_streams():
    # Same seed and index in both domains: unrelated layouts, not the same scene re-rendered.
    s = SyntheticScenes("source", 4, size=SMALL)[2]["label"]
    t = SyntheticScenes("target", 4, size=SMALL)[2]["label"]
    assert (s == t).float().mean() < 0.95


def test_same_item_in_another_process():
    item = SyntheticScenes("target", 8, size=(48, 80), seed=11)[7]
    code = (
        "import torch, sys; from lsr_fast.data.synthetic import SyntheticScenes; "
        "it = SyntheticScenes('target', 8, size=(48, 80), seed=11)[7]; "
        "sys.stdout.write(repr((it['image'].long().sum().item(), (it['image'].long() ** 2).sum().item(), "
        "(it['label'] * torch.arange(80)).sum().item())))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    image = item["image"].long()
    here = (image.sum().item(), (image ** 2).sum().item(), (item["label"] * torch.arange(80)).sum().item())
    assert out.stdout == repr(here)


@pytest.mark.parametrize("domain", ["source", "target"])
def test_labels_only_synthetic_classes_and_void(scenes, domain):
    allowed = torch.tensor(SYNTHETIC_CLASSES + (255,))
    for item in scenes[(domain, 0)]:
        assert torch.isin(item["label"], allowed).all()


@pytest.mark.parametrize("domain", ["source", "target"])
def test_every_class_is_common(scenes, domain):
    labels = torch.stack([item["label"] for item in scenes[(domain, 0)]])
    present = torch.stack([(labels == c).flatten(1).any(1) for c in SYNTHETIC_CLASSES]).float().mean(1)
    # Large classes in (nearly) every scene, small ones (signs, people) in at least half of them.
    for c, fraction in zip(SYNTHETIC_CLASSES, present.tolist()):
        needed = 0.9 if c in (ROAD, SIDEWALK, BUILDING, SKY, CAR, POLE) else 0.5
        assert fraction >= needed, f"class {c} appears in only {fraction:.0%} of the images"
    # Void is only the thin ego-vehicle hood: present in some images, never more than a strip.
    void = (labels == 255).float()
    assert 0 < void.flatten(1).amax(1).mean() < 1
    assert void.mean(dim=(0, 2))[: SMALL[0] * 8 // 10].sum() == 0


@pytest.mark.parametrize("domain", ["source", "target"])
def test_layout_sky_above_road_below(scenes, domain):
    labels = torch.stack([item["label"] for item in scenes[(domain, 0)]])
    rows = SMALL[0] // 10
    top, bottom = labels[:, :rows], labels[:, -rows:]
    up = torch.isin(top, torch.tensor([SKY, BUILDING, VEGETATION])).float().mean()
    assert up > 0.85
    valid = bottom != 255
    ground = (torch.isin(bottom, torch.tensor([ROAD, SIDEWALK])) & valid).sum() / valid.sum()
    assert ground > 0.6
    assert not torch.isin(top, torch.tensor([ROAD, SIDEWALK])).any()
    assert not (bottom == SKY).any()


def _colour_histogram(items, bins=6):
    """Normalised joint RGB histogram over all pixels of the items."""
    q = torch.stack([item["image"] for item in items]).long() * bins // 256  # (N, 3, H, W)
    index = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    hist = torch.bincount(index.flatten(), minlength=bins ** 3).double()
    return hist / hist.sum()


def test_domains_differ_in_colour_statistics(scenes):
    hist = {key: _colour_histogram(items) for key, items in scenes.items()}
    within_source = (hist[("source", 0)] - hist[("source", 1)]).abs().sum()
    within_target = (hist[("target", 0)] - hist[("target", 1)]).abs().sum()
    across = min(
        (hist[("source", a)] - hist[("target", b)]).abs().sum() for a in (0, 1) for b in (0, 1)
    )
    assert across > 3 * max(within_source, within_target)
    assert across > 0.8  # of a maximum of 2: the two domains barely share colours


def _class_mean_colours(items):
    images = torch.stack([item["image"] for item in items]).double()  # (N, 3, H, W)
    labels = torch.stack([item["label"] for item in items])
    means = {}
    for c in SYNTHETIC_CLASSES:
        mask = (labels == c).unsqueeze(1).double()
        means[c] = (images * mask).sum(dim=(0, 2, 3)) / mask.sum()
    return means


def test_class_colours_shift_between_domains(scenes):
    source, source_b = _class_mean_colours(scenes[("source", 0)]), _class_mean_colours(scenes[("source", 1)])
    target, target_b = _class_mean_colours(scenes[("target", 0)]), _class_mean_colours(scenes[("target", 1)])
    for c in SYNTHETIC_CLASSES:
        across = (source[c] - target[c]).norm()
        within = max((source[c] - source_b[c]).norm(), (target[c] - target_b[c]).norm())
        assert across > 10, f"class {c}: mean colours only {across:.1f} apart between domains"
        # Target lighting varies per image, so a 20-image mean moves by up to ~13 levels.
        assert across > 1.5 * within, f"class {c}: domain shift {across:.1f} vs {within:.1f} within a domain"


def test_target_is_noisy_and_source_is_flat(scenes):
    # Source regions are flat colours: most horizontal neighbours are identical; the target is
    # textured and noisy, so almost none are.
    def same_neighbours(items):
        images = torch.stack([item["image"] for item in items])
        return (images[..., 1:] == images[..., :-1]).all(1).float().mean()

    assert same_neighbours(scenes[("source", 0)]) > 0.8
    assert same_neighbours(scenes[("target", 0)]) < 0.2


@pytest.mark.parametrize("size", [(97, 131), (16, 16), (16, 300), (300, 17)])
@pytest.mark.parametrize("domain", ["source", "target"])
def test_odd_sizes(domain, size):
    item = SyntheticScenes(domain, 2, size=size, seed=1)[1]
    assert item["image"].shape == (3,) + size
    assert item["label"].shape == size
    assert torch.isin(item["label"], torch.tensor(SYNTHETIC_CLASSES + (255,))).all()


def test_large_image():
    item = SyntheticScenes("target", 1, size=(512, 1024))[0]
    assert item["image"].shape == (3, 512, 1024)
    assert len(torch.unique(item["label"])) >= 6


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"domain": "real", "n": 2}, ValueError, "domain"),
        ({"domain": None, "n": 2}, ValueError, "domain"),
        ({"domain": "source", "n": 0}, ValueError, "n"),
        ({"domain": "source", "n": 2.0}, TypeError, "n"),
        ({"domain": "source", "n": True}, TypeError, "n"),
        ({"domain": "source", "n": 2, "size": (15, 64)}, ValueError, "size"),
        ({"domain": "source", "n": 2, "size": (64,)}, TypeError, "size"),
        ({"domain": "source", "n": 2, "size": 64}, TypeError, "size"),
        ({"domain": "source", "n": 2, "size": (64.0, 128)}, TypeError, "size"),
        ({"domain": "source", "n": 2, "seed": 1.5}, TypeError, "seed"),
        ({"domain": "source", "n": 2, "seed": "0"}, TypeError, "seed"),
    ],
)
def test_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=rf"\b{name}\b"):
        SyntheticScenes(**kwargs)


def test_index_out_of_range():
    ds = SyntheticScenes("source", 3, size=SMALL)
    with pytest.raises(IndexError, match="index"):
        ds[3]
    with pytest.raises(IndexError, match="index"):
        ds[-4]
    with pytest.raises(TypeError, match="index"):
        ds["1"]
