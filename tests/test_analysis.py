"""lsr_fast.analysis: the numbers behind each figure against hand computations, the sampler,
the training-time scalars, and the `lsr-fast analyze` command on tiny checkpoints."""

import argparse
import json
import math
import os

import pytest
import torch

from lsr_fast import LSRRegularizer
from lsr_fast.analysis import (
    ClassReservoir,
    Run,
    angle_matrix,
    angles_to_prototype,
    class_histogram,
    class_mean_norms,
    collect,
    latent_scalars,
    log_latent_scalars,
    make_figures,
    mean_angle_to_others,
    mean_prototype_angle,
    nearest_downsample,
    norm_interval,
    row_normalise,
)
from lsr_fast.analysis.figures import l2_normalise

V = 255  # void


class FeaturesAreTheImage(torch.nn.Module):
    """A stand-in network whose features are its input (every `stride`-th pixel) and whose
    logits are those features: every number downstream can be worked out by hand."""

    def __init__(self, stride=1):
        super().__init__()
        self.stride = stride

    def forward(self, image):
        features = image[:, :, :: self.stride, :: self.stride].clone()
        return features.clone(), features


def _png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    return data


def _json(path):
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------ angles and norms by hand


def test_angles_between_hand_made_prototypes():
    orthogonal = torch.eye(4, 6)
    assert torch.allclose(angle_matrix(orthogonal)[~torch.eye(4, dtype=torch.bool)], torch.tensor(90.0, dtype=torch.float64))
    assert mean_prototype_angle(orthogonal) == pytest.approx(90.0)

    # unit vectors at 0, 60 and 120 degrees in a plane: pairs at 60, 60 and 120 degrees
    rad = [math.radians(a) for a in (0, 60, 120)]
    planar = torch.tensor([[math.cos(a), math.sin(a), 0.0] for a in rad]) * torch.tensor([[1.0], [3.0], [0.5]])
    expected = torch.tensor([[0, 60, 120], [60, 0, 60], [120, 60, 0]], dtype=torch.float64)
    assert torch.allclose(angle_matrix(planar), expected, atol=1e-4)
    assert torch.allclose(mean_angle_to_others(planar), torch.tensor([90.0, 60.0, 90.0], dtype=torch.float64), atol=1e-4)
    assert mean_prototype_angle(planar) == pytest.approx(80.0, abs=1e-4)  # (120 + 60 + 60) * 2 / 6

    present = torch.tensor([True, True, False])
    per_class = mean_angle_to_others(planar, present)
    assert per_class[:2].tolist() == pytest.approx([60.0, 60.0], abs=1e-4) and math.isnan(per_class[2])
    assert math.isnan(mean_prototype_angle(planar, torch.tensor([True, False, False])))

    # the same number as the regulariser's own diagnostic
    reg = LSRRegularizer(3, 3)
    reg.prototypes.copy_(planar)
    reg.seen.fill_(True)
    assert float(reg.mean_prototype_angle()) == pytest.approx(80.0, abs=1e-3)


def test_angles_to_prototype_by_hand():
    vectors = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [1, 1, 0], [-3, 0, 0], [1, math.sqrt(3), 0], [0, 0, 0]])
    angles = angles_to_prototype(vectors, torch.tensor([5.0, 0, 0]))
    assert angles.tolist() == pytest.approx([0, 90, 45, 180, 60, 90], abs=1e-5)
    with pytest.raises(ValueError, match="prototype"):
        angles_to_prototype(vectors, torch.zeros(4))


def test_norm_median_and_95_interval_by_hand():
    summary = norm_interval(torch.arange(1, 102, dtype=torch.float64))  # 1..101
    # linear interpolation: the q-quantile sits at position q * (n - 1) = 100 q
    assert summary == pytest.approx(dict(n=101, median=51.0, low=3.5, high=98.5))
    assert norm_interval([3.0, 4.0]) == pytest.approx(dict(n=2, median=3.5, low=3.025, high=3.975))
    assert norm_interval([2.0, 8.0, 5.0], coverage=0.5) == pytest.approx(dict(n=3, median=5.0, low=3.5, high=6.5))
    assert norm_interval([])["n"] == 0 and math.isnan(norm_interval([])["median"])


def test_row_normalised_confusion():
    confusion = torch.tensor([[2, 2, 0], [0, 0, 0], [1, 0, 3]])
    rows = row_normalise(confusion)
    assert rows[0].tolist() == [0.5, 0.5, 0.0] and rows[2].tolist() == [0.25, 0.0, 0.75]
    assert torch.isnan(rows[1]).all()
    with pytest.raises(ValueError, match="confusion"):
        row_normalise(torch.zeros(2, 3))


# ------------------------------------------------------------------ downsampling by hand


def test_nearest_downsample_takes_floor_positions():
    labels = (torch.arange(5).view(5, 1) * 10 + torch.arange(7).view(1, 7)).unsqueeze(0)  # value = 10*row + col
    # rows floor(i*5/2) = 0, 2; cols floor(j*7/3) = 0, 2, 4
    assert nearest_downsample(labels, (2, 3))[0].tolist() == [[0, 2, 4], [20, 22, 24]]


LABEL_4x4 = torch.tensor([[2, 0, 1, 1],
                          [0, 0, 1, 1],
                          [3, 1, V, V],
                          [3, 1, V, 2]])


def test_class_histogram_of_hand_map():
    assert class_histogram(LABEL_4x4, 4).tolist() == [3, 6, 2, 2, 3]
    with pytest.raises(ValueError, match="labels contains the value 7"):
        class_histogram(torch.tensor([[7]]), 4)


def test_downsampling_figure_numbers_by_hand(tmp_path):
    # 2x2 windows: {2,0,0,0} nearest 2 / hist 0; {1,1,1,1} both 1; {3,1,3,1} nearest 3 / hist void
    # (a tie); {V,V,V,2} nearest void / hist 2
    image = torch.rand(1, 4, 4, 4)  # K = C = 4
    stats = collect(FeaturesAreTheImage(stride=2), [dict(image=image, label=LABEL_4x4, name="hand")], 4,
                    samples_per_class=None, backend="reference")
    written = make_figures([Run("A", stats)], str(tmp_path), figures=["downsampling"], names=list("abcd"))
    _png(written["downsampling"][0])
    numbers = _json(written["downsampling"][1])
    assert numbers["example"]["nearest"] == [[2, 1], [3, V]]
    assert numbers["example"]["hist"] == [[0, 1], [V, 2]]
    schemes = numbers["schemes"]
    assert schemes["full"]["counts"] == [3, 6, 2, 2] and schemes["full"]["void"] == 3
    assert schemes["nearest"]["counts"] == [0, 1, 1, 1] and schemes["nearest"]["void"] == 1
    assert schemes["hist"]["counts"] == [1, 1, 1, 0] and schemes["hist"]["void"] == 1
    assert schemes["full"]["fractions"] == pytest.approx([3 / 13, 6 / 13, 2 / 13, 2 / 13])
    assert schemes["nearest"]["fractions"] == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3])
    assert schemes["hist"]["fractions"] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])
    assert schemes["full"]["void_fraction"] == pytest.approx(3 / 16) and schemes["hist"]["void_fraction"] == 0.25
    assert set(os.listdir(tmp_path)) == {"downsampling.png", "downsampling.json"}


# ------------------------------------------------------------------ norms, angles, confusion on a hand scene

# 2x3 image, K = C = 3; the features are the pixels' vectors below (the stub returns its input).
SCENE_LABEL = torch.tensor([[0, 0, 1], [1, 2, V]])
SCENE_VECTORS = torch.tensor([[[3.0, 0, 0], [0, 4, 0], [0, 0, 2]],
                              [[0, 0, 5], [1, 1, 0], [7, 7, 7]]]).permute(2, 0, 1)  # (3, 2, 3)


def _scene_stats(**kwargs):
    batch = dict(image=SCENE_VECTORS.unsqueeze(0), label=SCENE_LABEL.unsqueeze(0), name="scene")
    return collect(FeaturesAreTheImage(), [batch], 3, backend="reference", **kwargs)


def test_collect_accumulates_class_means_and_confusion_by_hand():
    stats = _scene_stats(samples_per_class=10)
    # class means: (1.5, 2, 0), (0, 0, 3.5), (1, 1, 0); the void vector (7, 7, 7) is never used
    assert stats.counts.tolist() == [2, 2, 1]
    assert torch.allclose(stats.class_means, torch.tensor([[1.5, 2, 0], [0, 0, 3.5], [1, 1, 0]], dtype=torch.float64))
    # predictions = argmax of the vector (first on ties): 0, 1 | 2, 2 | 0
    assert stats.confusion.tolist() == [[1, 1, 0], [0, 0, 2], [1, 0, 0]]
    assert stats.reservoir.counts().tolist() == [2, 2, 1]
    twice = collect(FeaturesAreTheImage(), [dict(image=SCENE_VECTORS, label=SCENE_LABEL)] * 2, 3, samples_per_class=1)
    assert twice.counts.tolist() == [4, 4, 2] and twice.images == 2
    assert twice.confusion.tolist() == [[2, 2, 0], [0, 0, 4], [2, 0, 0]]
    assert twice.reservoir.counts().tolist() == [1, 1, 1]


def test_norm_angle_and_confusion_figures_by_hand(tmp_path):
    stats = _scene_stats(samples_per_class=10)
    reg = LSRRegularizer(3, 3)  # EMA prototypes: two orthogonal seen classes, one unseen
    reg.prototypes.copy_(torch.tensor([[2.0, 0, 0], [0, 0, 1], [1, 1, 1]]))
    reg.seen.copy_(torch.tensor([True, True, False]))
    runs = [Run("source-only", stats), Run.from_regularizer("LSR", stats, reg)]
    written = make_figures(runs, str(tmp_path), figures=["norms", "angles", "confusion"], names=["a", "b", "c"])
    for png, js in written.values():
        _png(png)

    norms = _json(written["norms"][1])
    a, b, c = norms["runs"][0]["classes"]
    # class a: (3,0,0) and (0,4,0) around the mean (1.5, 2, 0): cos 0.6 and 0.8
    assert sorted(a["norms"]) == pytest.approx([3.0, 4.0])
    assert sorted(a["angles"]) == pytest.approx([math.degrees(math.acos(0.8)), math.degrees(math.acos(0.6))], abs=1e-4)
    assert (a["median"], a["low"], a["high"]) == pytest.approx((3.5, 3.025, 3.975))
    assert sorted(b["norms"]) == pytest.approx([2.0, 5.0]) and b["angles"] == pytest.approx([0.0, 0.0], abs=1e-4)
    assert (b["median"], b["low"], b["high"]) == pytest.approx((3.5, 2.075, 4.925))
    assert c["norms"] == pytest.approx([math.sqrt(2)], rel=1e-5) and c["n"] == 1

    angles = _json(written["angles"][1])
    theta = math.degrees(math.atan2(4, 3)) - 45.0  # (3, 4) vs (1, 1): 8.13 degrees
    means = angles["runs"][0]["class_means"]
    assert means["mean_angle_to_others"] == pytest.approx([(90 + theta) / 2, 90.0, (90 + theta) / 2], abs=1e-4)
    assert means["mean_angle"] == pytest.approx((90 + theta + 90 + 90 + theta + 90) / 6, abs=1e-4)
    assert angles["runs"][0]["ema"] is None
    ema = angles["runs"][1]["ema"]
    assert ema["mean_angle_to_others"][:2] == pytest.approx([90.0, 90.0]) and ema["mean_angle_to_others"][2] is None
    assert ema["mean_angle"] == pytest.approx(90.0)
    assert angles["reference_angle"] == 90.0

    confusion = _json(written["confusion"][1])["runs"][0]
    assert confusion["counts"] == [[1, 1, 0], [0, 0, 2], [1, 0, 0]]
    assert confusion["row_normalised"] == [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    assert confusion["iou"] == pytest.approx([1 / 3, 0.0, 0.0])  # class a: TP 1, FP 1, FN 1
    assert confusion["miou"] == pytest.approx(100 / 9)


def test_tsne_figure_balanced_and_normalised(tmp_path):
    assert l2_normalise(torch.tensor([[3.0, 4.0], [0.0, 0.0]])).tolist() == [[0.6, 0.8], [0.0, 0.0]]
    g = torch.Generator().manual_seed(0)
    label = torch.tensor([0, 1, 2]).repeat_interleave(32).view(8, 12)  # 32 pixels of each class
    image = torch.rand(1, 3, 8, 12, generator=g) + torch.nn.functional.one_hot(label, 3).permute(2, 0, 1)
    stats = collect(FeaturesAreTheImage(), [dict(image=image, label=label)], 3, samples_per_class=20)
    written = make_figures([Run("A", stats), Run("B", stats)], str(tmp_path), figures=["tsne"], tsne_samples=30, seed=3)
    _png(written["tsne"][0])
    numbers = _json(written["tsne"][1])
    for run in numbers["runs"]:
        assert run["counts"] == [10, 10, 10] and len(run["x"]) == len(run["y"]) == 30
    assert numbers["runs"][0]["x"] == numbers["runs"][1]["x"]  # same vectors, fixed seed


def test_make_figures_rejects_bad_requests(tmp_path):
    stats = _scene_stats(samples_per_class=10)
    with pytest.raises(ValueError, match="figures"):
        make_figures([Run("A", stats)], str(tmp_path), figures=["histogram"])
    afile = tmp_path / "taken"
    afile.write_text("mine")
    with pytest.raises(ValueError, match="not a folder"):
        make_figures([Run("A", stats)], str(afile), figures=["angles"])
    assert afile.read_text() == "mine"


# ------------------------------------------------------------------ the sampler


def _stream(seed_rows=0):
    """Rows whose first value is a global id and second their class: 250 of class 0, 20 of
    class 1, 30 void, in three batches."""
    labels = torch.cat([torch.zeros(250, dtype=torch.long), torch.ones(20, dtype=torch.long), torch.full((30,), V)])
    labels = labels[torch.randperm(300, generator=torch.Generator().manual_seed(seed_rows))]
    rows = torch.stack([torch.arange(300).float(), labels.float()], 1)
    return [(rows[i:i + 100], labels[i:i + 100]) for i in range(0, 300, 100)]


def _sample(seed, capacity=50):
    reservoir = ClassReservoir(3, capacity, seed=seed)
    for rows, labels in _stream():
        reservoir.add(rows, labels)
    return reservoir


def test_reservoir_caps_each_class_and_keeps_rows_intact():
    reservoir = _sample(seed=1)
    assert reservoir.counts().tolist() == [50, 20, 0]
    assert reservoir.offered.tolist() == [250, 20, 0]
    assert reservoir.vectors.shape == (70, 2)
    assert torch.equal(reservoir.vectors[:, 1].long(), reservoir.labels)  # each row kept its own label
    ids = reservoir.vectors[:, 0]
    assert ids.unique().numel() == 70
    all_rows = torch.cat([r for r, _ in _stream()])
    assert sorted(ids[reservoir.labels == 1].long().tolist()) == sorted(
        all_rows[all_rows[:, 1] == 1, 0].long().tolist())  # a class under the cap is kept whole
    assert reservoir.class_vectors(0).shape == (50, 2)


def test_reservoir_is_deterministic_by_seed():
    a, b, c = _sample(seed=7), _sample(seed=7), _sample(seed=8)
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.vectors[a.labels == 0], c.vectors[c.labels == 0])


def test_reservoir_sample_is_uniform_over_the_stream():
    # capacity 20 of 200 vectors in 4 batches: each vector is kept with probability 0.1, so a
    # quarter of the sample comes from the last batch (a first-N sampler would give none)
    late = 0
    for seed in range(300):
        reservoir = ClassReservoir(1, 20, seed=seed)
        for start in range(0, 200, 50):
            reservoir.add(torch.arange(start, start + 50).float().unsqueeze(1), torch.zeros(50, dtype=torch.long))
        late += int((reservoir.vectors[:, 0] >= 150).sum())
    assert 0.22 < late / (300 * 20) < 0.28


def test_reservoir_takes_feature_maps_and_checks_input():
    features = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [V, 1]], [[1, 1], [0, V]]])
    reservoir = ClassReservoir(2, 10, seed=0)
    reservoir.add(features, labels)
    kept = {tuple(v.tolist()) for v in reservoir.class_vectors(0)}
    assert kept == {tuple(features[0, :, 0, 0].tolist()), tuple(features[1, :, 1, 0].tolist())}
    with pytest.raises(ValueError, match="labels contains the value 5"):
        reservoir.add(torch.zeros(2, 3), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="K=4"):
        reservoir.add(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="capacity"):
        ClassReservoir(2, 0)
    sub_vectors, sub_labels = reservoir.subsample(2)
    assert torch.bincount(sub_labels).tolist() == [1, 1]


# ------------------------------------------------------------------ training-time scalars


def test_class_mean_norms_by_hand():
    # pixels: (3,4) class 0, (0,1) class 0, (6,8) class 1, (1,1) void -> means 3, 10, NaN
    features = torch.tensor([[[3.0, 0.0], [6.0, 1.0]], [[4.0, 1.0], [8.0, 1.0]]]).unsqueeze(0)  # (1, 2, 2, 2)
    labels = torch.tensor([[[0, 0], [1, V]]])
    norms = class_mean_norms(features, labels, 3)
    assert norms[:2].tolist() == pytest.approx([3.0, 10.0]) and math.isnan(norms[2])
    rows = features.permute(0, 2, 3, 1).reshape(-1, 2)
    assert torch.allclose(class_mean_norms(rows, labels.reshape(-1), 3, backend="reference")[:2], norms[:2])
    # full-resolution labels are hist-downsampled to the 2x2 feature map first
    full = labels.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.allclose(class_mean_norms(features, full, 3)[:2], norms[:2])
    with pytest.raises(ValueError, match="labels"):
        class_mean_norms(rows, labels, 3)


def test_latent_scalars_for_tensorboard():
    reg = LSRRegularizer(3, 4)
    reg.prototypes.copy_(torch.eye(3, 4))
    reg.seen.copy_(torch.tensor([True, True, False]))
    features = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    labels = torch.tensor([0, 2])

    class Writer:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

    writer = Writer()
    scalars = log_latent_scalars(writer, 12, regularizer=reg, features=features, labels=labels,
                                 class_names=["road", "car", "sky"])
    assert scalars == pytest.approx({"latent/mean_prototype_angle": 90.0, "latent/norm/road": 5.0,
                                     "latent/norm/sky": 2.0, "latent/norm/mean": 3.5})
    assert sorted(writer.calls) == sorted((tag, value, 12) for tag, value in scalars.items())
    assert latent_scalars(regularizer=LSRRegularizer(3, 4)) == {}  # nothing seen yet: no angle
    with pytest.raises(ValueError, match="together"):
        latent_scalars(features=features)


# ------------------------------------------------------------------ the command


def _checkpoints(folder):
    pytest.importorskip("lsr_fast.train.checkpoint")
    from lsr_fast.train.build import build_model, build_regularizer
    from lsr_fast.train.checkpoint import save_checkpoint
    from lsr_fast.train.config import build_config

    def synthetic(domain, seed):
        return dict(name="synthetic", domain=domain, num_images=3, size=[32, 64], resize=None, seed=seed)

    paths = {}
    for mode in ("source_only", "lsr"):
        config = build_config({"mode": mode, "model": {"backbone": "resnet18", "width": 4, "batchnorm": "train"},
                               "data": {"source": synthetic("source", 0), "target": synthetic("target", 1),
                                        "val": synthetic("target", 2)}})
        torch.manual_seed(0)
        model = build_model(config)
        payload = {"model": model.state_dict(), "config": config, "step": 1}
        if mode == "lsr":
            reg = build_regularizer(config, model.feature_dim)
            reg.prototypes.copy_(torch.eye(19, model.feature_dim))
            reg.seen[:4] = True
            payload["regularizer"] = reg.state_dict()
        paths[mode] = str(folder / f"{mode}.pt")
        save_checkpoint(paths[mode], payload)
    return paths


def _command(argv):
    from lsr_fast.analysis.cli import configure_parser, run

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return run(parser.parse_args(argv))


def test_analyze_command_on_tiny_checkpoints(tmp_path, capsys):
    paths = _checkpoints(tmp_path)
    out = tmp_path / "figures"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code = _command(["--checkpoint", paths["lsr"], "--compare", paths["source_only"], "--out", str(out),
                     "--max-images", "2", "--samples-per-class", "20", "--device", "cpu",
                     "--figures", "angles,confusion", "norms"])
    assert code == 0
    printed = capsys.readouterr().out
    for figure in ("angles", "confusion", "norms"):
        _png(out / f"{figure}.png")
        assert str(out / f"{figure}.png") in printed
    assert not (out / "tsne.png").exists() and (out / "notes.txt").read_text() == "keep me"
    angles = _json(out / "angles.json")
    lsr, source_only = angles["runs"]
    assert lsr["label"] == "lsr: lsr.pt" and source_only["ema"] is None
    assert lsr["ema"]["mean_angle_to_others"][:4] == pytest.approx([90.0] * 4)  # eye(19, K) prototypes
    assert _json(out / "confusion.json")["runs"][0]["images"] == 2
    norms = _json(out / "norms.json")
    assert all(c["n"] <= 20 for run in norms["runs"] for c in run["classes"])


def test_analyze_command_errors_name_the_argument(tmp_path, capsys):
    afile = tmp_path / "out.txt"
    afile.write_text("mine")
    assert _command(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert _command(["--checkpoint", str(afile), "--out", str(afile)]) == 2
    assert "not a folder" in capsys.readouterr().err and afile.read_text() == "mine"
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error; its message goes to stderr
        _command(["--checkpoint", "a.pt", "--out", "o", "--figures", "histogram"])
    assert "--figures" in capsys.readouterr().err
