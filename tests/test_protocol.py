"""The paper's protocol (issue 14): config checks across keys and stages, the poly horizon apart
from the stopping step, held-out selection lists, both evaluation protocols, loading multi-level
and Caffe-layout weights, and `lsr-fast experiment --plan` against the paper's numbers."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from lsr_fast.cli import main as cli
from lsr_fast.eval.evaluate import evaluate, predict
from lsr_fast.models import DeepLabV2, load_pretrained
from lsr_fast.train import ConfigError, build_config, load_checkpoint, train
from lsr_fast.train.config import check_protocol, load_config
from lsr_fast.train.experiment import plan, run_experiment, stage_configs

from test_data import make_cityscapes
from test_train import TINY, tiny_config

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
SELECTION = os.path.join(CONFIGS, "lists", "cityscapes_train_selection.txt")


def write_list(path, names):
    path.write_text("".join(f"{n}\n" for n in names))
    return str(path)


# ----------------------------------------------------------------------------- config checks

def test_stop_step_beyond_the_poly_horizon_is_refused_naming_keys_and_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: {source: {name: synthetic}, target: {name: synthetic}, val: {name: synthetic}}\n"
                    "train: {steps: 300}\noptim: {poly_steps: 200}\n")
    with pytest.raises(ConfigError, match=rf"train\.steps \(300\) exceeds optim\.poly_steps \(200\) in {path}"):
        load_config(str(path))
    assert load_config(str(path), ["optim.poly_steps=300"])["optim"]["poly_steps"] == 300


def test_crop_larger_than_the_resized_image_is_refused():
    with pytest.raises(ConfigError, match=r"data\.crop \[32, 96\] is larger than the source images \(data\.source\.size \[32, 64\]\)"):
        build_config(None, [*TINY, "data.crop=[32, 96]"])
    with pytest.raises(ConfigError, match=r"data\.crop \[600, 600\] is larger than the target images \(data\.target\.resize \[512, 1024\]\)"):
        build_config(None, [*TINY, "data.source.resize=[720, 1280]", "data.target.resize=[512, 1024]", "data.crop=[600, 600]"])
    build_config(None, [*TINY, "data.crop=[32, 32]"])


def test_frozen_batchnorm_without_weights_is_refused_naming_both_keys(tmp_path):
    config = tiny_config(tmp_path, "model.batchnorm=frozen")
    with pytest.raises(ConfigError, match=r"model\.batchnorm is frozen but neither model\.pretrained nor init"):
        check_protocol(config)
    with pytest.raises(ConfigError, match="model.batchnorm is frozen"):
        train(config)
    assert not os.path.exists(config["out_dir"])  # refused before anything was written
    check_protocol(tiny_config(tmp_path, "model.batchnorm=train"))


def cityscapes_config(tmp_path, *extra):
    root = tmp_path / "cs"
    if not root.exists():
        make_cityscapes(root, "train", items=[("aachen", f"aachen_00000{i}_000019") for i in range(4)])
    return build_config(None, [*TINY, "data.target.name=cityscapes", f"data.target.root={root}", "data.target.split=train",
                               "data.val.name=cityscapes", f"data.val.root={root}", "data.val.split=train",
                               f"out_dir={tmp_path / 'run'}", *extra])


def test_selection_images_the_run_trains_on_are_refused(tmp_path):
    held_out = write_list(tmp_path / "held_out.txt", ["aachen/aachen_000000_000019_leftImg8bit.png"])
    train_list = write_list(tmp_path / "train.txt", [f"aachen/aachen_00000{i}_000019_leftImg8bit" for i in range(3)])
    disjoint = write_list(tmp_path / "disjoint.txt", [f"aachen/aachen_00000{i}_000019_leftImg8bit" for i in (1, 2, 3)])
    for extra, shared in (
        ([], "every image"),  # val = the whole training split
        ([f"data.val.split_list={held_out}"], "aachen_000000"),  # a list, but the target trains on every image
        ([f"data.val.split_list={held_out}", f"data.target.split_list={train_list}"], "aachen_000000"),
    ):
        with pytest.raises(ConfigError, match=rf"data\.val selects on images that data\.target trains on .*{shared}"):
            check_protocol(cityscapes_config(tmp_path, *extra))
    check_protocol(cityscapes_config(tmp_path, f"data.val.split_list={held_out}", f"data.target.exclude_list={held_out}"))
    check_protocol(cityscapes_config(tmp_path, f"data.val.split_list={held_out}", f"data.target.split_list={disjoint}"))
    check_protocol(cityscapes_config(tmp_path, "data.val.split=val"))  # another split
    # target_only trains on the target: the same rule holds for its labelled set.
    with pytest.raises(ConfigError, match=r"data\.target trains on"):
        check_protocol(cityscapes_config(tmp_path, "mode=target_only", f"data.val.split_list={held_out}"))


def test_exclude_list_leaves_images_out_and_names_unknown_entries(tmp_path):
    from lsr_fast.data import CityscapesDataset

    make_cityscapes(tmp_path / "cs", "train", items=[("ulm", f"ulm_00000{i}_000019") for i in range(3)])
    excluded = write_list(tmp_path / "ex.txt", ["# held out", "ulm/ulm_000001_000019_leftImg8bit.png"])
    dataset = CityscapesDataset(tmp_path / "cs", split="train", exclude_list=excluded)
    assert dataset.names == ["ulm/ulm_000000_000019_leftImg8bit", "ulm/ulm_000002_000019_leftImg8bit"]
    wrong = write_list(tmp_path / "wrong.txt", ["ulm/ulm_000009_000019_leftImg8bit.png"])
    with pytest.raises(ValueError, match=rf"split list {wrong}: 'ulm/ulm_000009_000019_leftImg8bit' has no image"):
        CityscapesDataset(tmp_path / "cs", split="train", exclude_list=wrong)


def test_shipped_selection_list_is_the_every_sixth_image_rule():
    from lsr_fast.data.datasets import read_split_list

    names = read_split_list(SELECTION)
    assert len(names) == len(set(names)) == 496  # ceil(2975 / 6)
    cities = {n.split("/")[0] for n in names}
    assert len(cities) == 18 and all(n.split("/")[1].startswith(n.split("/")[0] + "_") for n in names)
    assert names == sorted(names)  # drawn in the sorted order of the train list
    assert names[:3] == [f"aachen/aachen_0000{i:02d}_000019_leftImg8bit" for i in (0, 6, 12)]


# ----------------------------------------------------------------------------- schedule

def test_poly_schedule_runs_over_poly_steps_not_the_stopping_step(tmp_path):
    config = tiny_config(tmp_path, "train.steps=3", "optim.poly_steps=10", "mode=source_only")
    train(config)
    records = [json.loads(line) for line in open(os.path.join(config["out_dir"], "metrics.jsonl"))]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    # After step s the scheduler holds the lr of step s: 0.01 * (1 - s / 10) ** 0.9, by hand.
    for step, want in ((1, 0.01 * 0.9 ** 0.9), (2, 0.01 * 0.8 ** 0.9), (3, 0.01 * 0.7 ** 0.9)):
        assert lrs[step] == pytest.approx(want, rel=1e-9)
    checkpoint = load_checkpoint(os.path.join(config["out_dir"], "last.pt"))
    assert checkpoint["config"]["optim"]["poly_steps"] == 10 and checkpoint["step"] == 3


def test_checkpoints_record_the_selection_split_and_list(tmp_path):
    held_out = write_list(tmp_path / "held_out.txt", ["aachen/aachen_000000_000019_leftImg8bit.png"])
    config = cityscapes_config(tmp_path, "mode=source_only", "train.steps=1", f"data.val.split_list={held_out}",
                               f"data.target.exclude_list={held_out}", "data.val.resize=[16, 16]")
    train(config)
    selection = load_checkpoint(os.path.join(config["out_dir"], "best.pt"))["selection"]
    assert selection == {"dataset": "cityscapes", "split": "train", "split_list": held_out, "exclude_list": None,
                         "images": 1, "metric": "mIoU"}


# ----------------------------------------------------------------------------- evaluation

class ColumnModel(torch.nn.Module):
    """Logits at the input size: class 0 scores 1 on the left half of the columns, class 1 on
    the right half."""

    def forward(self, images):
        b, _, h, w = images.shape
        logits = torch.zeros(b, 2, h, w)
        logits[:, 0, :, : w // 2] = 1.0
        logits[:, 1, :, w // 2:] = 1.0
        return logits, torch.zeros(b, 1, h, w)


def test_both_protocols_by_hand():
    label = torch.zeros(4, 8, dtype=torch.int64)
    label[:, 5:] = 1
    dataset = [{"image": torch.zeros(3, 2, 4), "label": label}]
    out = evaluate(ColumnModel(), dataset, 2, device=torch.device("cpu"), protocols=("full_resolution", "input_resolution"))
    # Full: the 2x4 logits upsampled to 4x8 predict 0 on columns 0-3 and 1 on 4-7 (column 3
    # maps to input x = 1.25, 3/4 class 0); column 4 is class 0 in the label.
    assert out["full_resolution"].tolist() == [[16, 4], [0, 12]]
    # Input: the label at 2x4 by pixel centres takes columns 1, 3, 5, 7 -> 0, 0, 1, 1.
    assert out["input_resolution"].tolist() == [[4, 0], [0, 4]]
    assert torch.equal(evaluate(ColumnModel(), dataset, 2, device=torch.device("cpu")), out["full_resolution"])
    with pytest.raises(ValueError, match="protocols must name some of full_resolution, input_resolution"):
        evaluate(ColumnModel(), dataset, 2, device=torch.device("cpu"), protocols=("nearest",))


def test_predict_upsamples_with_the_runs_align_corners():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 5, 7)
    model = lambda images: (logits, None)  # noqa: E731
    for corners in (False, True):
        want = torch.softmax(F.interpolate(logits, size=(17, 23), mode="bilinear", align_corners=corners), 1)
        torch.testing.assert_close(predict(model, torch.zeros(1, 3, 5, 7), (17, 23), align_corners=corners), want)
    assert not torch.allclose(predict(model, torch.zeros(1, 3, 5, 7), (17, 23), align_corners=True),
                              predict(model, torch.zeros(1, 3, 5, 7), (17, 23), align_corners=False))


# ----------------------------------------------------------------------------- weights

def small(seed):
    torch.manual_seed(seed)
    return DeepLabV2(3, "resnet18", width=4)


def deeplab_state(model, prefix="", heads=("layer5",)):
    state = {prefix + k[len("backbone."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    for n, head in enumerate(heads):
        for i, conv in enumerate(model.classifier.convs):
            state[f"{prefix}{head}.conv2d_list.{i}.weight"] = conv.weight.detach() + n
            state[f"{prefix}{head}.conv2d_list.{i}.bias"] = conv.bias.detach() + n
    return state


def test_multilevel_checkpoint_loads_layer6_as_the_classifier(tmp_path):
    source, target = small(1), small(2)
    path = tmp_path / "adaptsegnet.pth"
    torch.save(deeplab_state(source, heads=("layer5", "layer6")), path)  # layer6 = layer5 + 1
    report = load_pretrained(target, path, skip_classifier=False)
    for i, conv in enumerate(target.classifier.convs):
        assert torch.equal(conv.weight, source.classifier.convs[i].weight + 1)
        assert torch.equal(conv.bias, source.classifier.convs[i].bias + 1)
    assert sorted(report.skipped) == sorted(f"layer5.conv2d_list.{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert report.unexpected == [] and report.missing == []
    # Single-head files keep loading layer5.
    single = small(3)
    torch.save(deeplab_state(source), tmp_path / "init.pth")
    load_pretrained(single, tmp_path / "init.pth", skip_classifier=False)
    assert torch.equal(single.classifier.convs[0].weight, source.classifier.convs[0].weight)


def test_caffe_layout_with_imagenet_normalisation_is_refused(tmp_path):
    source = small(1)
    path = tmp_path / "deeplab_init.pth"
    torch.save(deeplab_state(source, prefix="Scale."), path)
    for normalize in ("imagenet", "none"):
        with pytest.raises(ValueError, match=rf"DeepLab init layout .* is '{normalize}': set data\.normalize: caffe for model\.pretrained"):
            load_pretrained(small(2), path, normalize=normalize)
    load_pretrained(small(2), path, normalize="caffe")
    torch.save({k[len("backbone."):]: v for k, v in source.state_dict().items() if k.startswith("backbone.")}, tmp_path / "tv.pth")
    load_pretrained(small(2), tmp_path / "tv.pth", normalize="imagenet")  # torchvision layout: ImageNet input
    config = tiny_config(tmp_path, "model.batchnorm=frozen", f"model.pretrained={path}", "data.normalize=imagenet",
                         "data.source.num_images=2", "data.target.num_images=2")
    with pytest.raises(ConfigError, match=r"model\.pretrained: .*data\.normalize: caffe"):
        train(config)


# ----------------------------------------------------------------------------- stages and --plan

PAPER = {"gta5_to_cityscapes": dict(classes=19, source="gta5", resize=[720, 1280], preset="gta5_released",
                                    lambdas=(0.1, 0.2, 0.025, 0.1), alpha=0.2),
         "synthia_to_cityscapes": dict(classes=16, source="synthia", resize=[760, 1280], preset="synthia_released",
                                       lambdas=(0.05, 0.2, 0.1, 0.1), alpha=0.0)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_plan_of_the_paper_configs_is_the_papers_protocol(name, capsys, monkeypatch):
    monkeypatch.chdir(os.path.join(CONFIGS, os.pardir))  # the configs name repository-relative files
    paper = PAPER[name]
    assert cli(["experiment", "-c", f"configs/{name}.yaml", "--plan"]) == 0  # no dataset exists here
    result = json.loads(capsys.readouterr().out)
    stages = {s["name"]: s for s in result["stages"]}
    assert list(stages) == ["source_only", "lsr"]
    pre, adapt = stages["source_only"], stages["lsr"]
    # Pre-training: batch 10, random 512x512 patches, BN statistics learnt, fp32.
    assert (pre["mode"], pre["batch_source"], pre["source"]["crop"], pre["batchnorm"], pre["amp"]) == ("source_only", 10, [512, 512], "train", "none")
    assert pre["source"]["name"] == paper["source"] and pre["source"]["resize"] == paper["resize"] and pre["source"]["used"]
    assert pre["lr"] == 2.5e-4 and pre["poly_steps"] == 250000 and pre["init"] is None and pre["lsr"] is None
    # Adaptation: batch 1 + 1, full images, BN frozen, poly over 250k stopped at 27,450, fp32.
    assert (adapt["batch_source"], adapt["batch_target"], adapt["source"]["crop"], adapt["batchnorm"], adapt["amp"]) == (1, 1, None, "frozen", "none")
    assert (adapt["steps"], adapt["poly_steps"], adapt["lr"], adapt["poly_power"]) == (27450, 250000, 2.5e-4, 0.9)
    assert adapt["source"]["resize"] == paper["resize"] and adapt["target"]["resize"] == [512, 1024]
    assert adapt["init"]["stage"] == "source_only" and adapt["init"]["file"].endswith(os.path.join("source_only", "best.pt"))
    assert adapt["align_corners"] is True and adapt["backbone"] == "resnet101"
    lsr = adapt["lsr"]
    assert lsr["preset"] == paper["preset"] and (lsr["lambda_cluster"], lsr["lambda_perp"], lsr["lambda_norm"], lsr["lambda_entropy"]) == paper["lambdas"]
    assert lsr["alpha"] == paper["alpha"] and lsr["clustering_distance"] == "l1_mean" and lsr["norm_form"] == "released"
    # Selection on 496 held-out train images the adaptation never sees; the table on Cityscapes val.
    for stage in (pre, adapt):
        assert stage["val"] == {"name": "cityscapes", "split": "train", "split_list": "configs/lists/cityscapes_train_selection.txt",
                                "exclude_list": None, "images": 496, "every": stage["val"]["every"],
                                "early_stop_patience": stage["val"]["early_stop_patience"]}
    assert adapt["target"]["exclude_list"] == adapt["val"]["split_list"] and adapt["target"]["split"] == "train"
    evaluation = result["evaluation"]
    assert evaluation["dataset"]["name"] == "cityscapes" and evaluation["dataset"]["split"] == "val"
    assert evaluation["protocols"] == ["full_resolution", "input_resolution"]
    assert load_config(f"configs/{name}.yaml")["data"]["num_classes"] == paper["classes"]


def test_stage_checks_refuse_contradictions_before_anything_starts(tmp_path):
    config = tiny_config(tmp_path, "train.steps=1", name="exp")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"init: {tmp_path / 'exp' / 'lsr' / 'best.pt'}\n")
    with pytest.raises(ConfigError, match="pre-training cannot start from the adaptation's output"):
        stage_configs({**config, "experiment": {**config["experiment"], "source_config": str(recipe)}})
    recipe.write_text("mode: lsr\n")
    with pytest.raises(ConfigError, match=rf"experiment\.source_config {recipe} sets mode 'lsr'"):
        stage_configs({**config, "experiment": {**config["experiment"], "source_config": str(recipe)}})
    recipe.write_text("train: {steps: 5}\noptim: {poly_steps: 4}\n")
    with pytest.raises(ConfigError, match=rf"train\.steps \(5\) exceeds optim\.poly_steps \(4\) in {recipe}"):
        stage_configs({**config, "experiment": {**config["experiment"], "source_config": str(recipe)}})
    # A selection list naming an image that is not there stops the experiment before stage 1.
    cs = cityscapes_config(tmp_path, "train.steps=1", f"data.val.split_list={write_list(tmp_path / 'v.txt', ['aachen/aachen_000777_000019'])}",
                           f"data.target.exclude_list={tmp_path / 'v.txt'}", "experiment.target_only=false")
    with pytest.raises(ConfigError, match=r"has no image"):
        run_experiment(cs, analyze=False)
    assert not os.path.exists(os.path.join(cs["out_dir"], "source_only"))


def test_source_recipe_applies_on_top_of_the_base_config(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {batchnorm: train}\ndata: {crop: [32, 32]}\ntrain: {steps: 7, batch_source: 3}\n")
    base = tiny_config(tmp_path, "model.batchnorm=frozen", "model.pretrained=null", "init=null", f"experiment.source_config={recipe}",
                       "experiment.target_only=false", "experiment.control=false", "train.steps=2", name="exp")
    configs = stage_configs(base, ["train.steps=5"])
    assert list(configs) == ["source_only", "lsr"]
    pre, adapt = configs["source_only"], configs["lsr"]
    assert (pre["train"]["steps"], pre["train"]["batch_source"], pre["data"]["crop"], pre["model"]["batchnorm"]) == (5, 3, [32, 32], "train")
    assert pre["data"]["source"] == base["data"]["source"] and pre["out_dir"] == os.path.join(base["out_dir"], "source_only")
    assert (adapt["train"]["steps"], adapt["model"]["batchnorm"], adapt["data"]["crop"]) == (2, "frozen", None)
    assert math.isclose(plan(base, ["train.steps=5"])["stages"][0]["steps"], 5)


def test_a_list_naming_a_missing_image_stops_a_run_before_it_starts(tmp_path):
    missing = write_list(tmp_path / "v.txt", ["aachen/aachen_000777_000019_leftImg8bit.png"])
    config = cityscapes_config(tmp_path, "mode=source_only", f"data.val.split_list={missing}", f"data.target.exclude_list={missing}")
    with pytest.raises(ConfigError, match=rf"data\.val \(config\): split list {missing}: 'aachen/aachen_000777_000019_leftImg8bit' has no image"):
        train(config)
    assert not os.path.exists(config["out_dir"])


def test_an_analysis_killed_half_way_is_redone(tmp_path, monkeypatch):
    import lsr_fast.analysis as analysis
    from lsr_fast.train import experiment

    calls = []

    def figures(source, adapted, *, out, device):
        calls.append(out)
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, "fig5.png"), "w").close()
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed after the first figure
    monkeypatch.setattr(analysis, "analyze_checkpoints", figures)
    with pytest.raises(KeyboardInterrupt):
        experiment._analyze(str(tmp_path), torch.device("cpu"))
    assert not os.path.exists(os.path.join(tmp_path, "analysis", experiment.ANALYSIS_DONE))
    assert experiment._analyze(str(tmp_path), torch.device("cpu")) == os.path.join(tmp_path, "analysis")
    assert len(calls) == 2 and os.path.isfile(os.path.join(tmp_path, "analysis", experiment.ANALYSIS_DONE))
