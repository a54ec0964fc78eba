"""DeepLabV2 / ResNet: sizes, Caffe-style strides, ASPP, BN modes, weight loading, param groups.

Tiny models (width 4-8) keep this file fast; the full-width ResNet-101 is only constructed.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from lsr_fast.models import (
    BACKBONES,
    DeepLabV2,
    FrozenBatchNorm2d,
    LoadReport,
    build_model,
    load_pretrained,
    parameter_groups,
)


def tiny(backbone="resnet18", num_classes=3, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("width", 4)
    return DeepLabV2(num_classes, backbone, **kwargs)


def bn_layers(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


# --- sizes ------------------------------------------------------------------------------------

# Hand arithmetic, e.g. 720: conv1 floor((720+6-7)/2)+1 = 360; max-pool (ceil) ceil((360+2-3)/2)+1
# = 181; layer2's stride-2 1x1 conv floor((181-1)/2)+1 = 91; dilated stages keep the size.
# 131: 66 -> ceil(65/2)+1 = 34 (floor mode would give 33) -> 17.
HAND_SIZES = [
    ((720, 1280), (91, 161)),
    ((512, 1024), (65, 129)),
    ((760, 1280), (96, 161)),
    ((97, 131), (13, 17)),
    ((33, 45), (5, 6)),
    ((1, 1), (1, 1)),
]


@pytest.mark.parametrize("size,expected", HAND_SIZES)
def test_output_size_matches_hand_arithmetic(size, expected):
    model = tiny()
    assert model.output_size(*size) == expected


@pytest.mark.parametrize("size,expected", [HAND_SIZES[i] for i in (0, 3, 4)])
def test_forward_shapes_at_paper_and_odd_sizes(size, expected):
    model = tiny("resnet18", num_classes=5).eval()
    with torch.no_grad():
        logits, features = model(torch.randn(1, 3, *size))
    assert logits.shape == (1, 5, *expected)
    assert features.shape == (1, 8 * 4, *expected)  # resnet18: 8 * width


def test_bottleneck_backbone_gives_the_same_sizes():
    model = tiny("resnet50", num_classes=2).eval()
    with torch.no_grad():
        logits, features = model(torch.randn(2, 3, 97, 131))
    assert logits.shape == (2, 2, 13, 17)
    assert features.shape == (2, 4 * 8 * 4, 13, 17)  # expansion 4 * 8 * width
    assert model.output_size(97, 131) == (13, 17)
    assert tiny("resnet101").output_size(720, 1280) == (91, 161)


def test_caffe_style_strides_and_dilations():
    backbone = tiny("resnet50").backbone
    assert (backbone.conv1.kernel_size, backbone.conv1.stride, backbone.conv1.padding) == ((7, 7), (2, 2), (3, 3))
    pool = backbone.maxpool
    assert (pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode) == (3, 2, 1, True)
    first = backbone.layer2[0]
    assert first.conv1.kernel_size == (1, 1) and first.conv1.stride == (2, 2)
    assert first.conv2.kernel_size == (3, 3) and first.conv2.stride == (1, 1)
    assert first.downsample[0].stride == (2, 2)
    for layer, dilation in ((backbone.layer1, 1), (backbone.layer3, 2), (backbone.layer4, 4)):
        for block in layer:
            assert block.conv1.stride == (1, 1) and block.conv2.stride == (1, 1)
            assert block.conv2.dilation == (dilation, dilation)
            assert block.conv2.padding == (dilation, dilation)


def test_resnet101_layout_and_parameter_count():
    model = DeepLabV2(19, "resnet101")
    backbone = model.backbone
    assert [len(getattr(backbone, f"layer{i}")) for i in (1, 2, 3, 4)] == [3, 4, 23, 3]
    assert model.feature_dim == 2048
    # torchvision's ResNet-101 has 44,549,160 parameters, of which fc has 2048*1000 + 1000;
    # moving the stride and dilating convs changes no shapes.
    assert sum(p.numel() for p in backbone.parameters()) == 44_549_160 - 2_049_000
    # ASPP: 4 convs of 2048*19*9 weights + 19 biases.
    assert sum(p.numel() for p in model.classifier.parameters()) == 4 * (2048 * 19 * 9 + 19)


@pytest.mark.parametrize("backbone,width,counts,feature_dim", [
    ("resnet18", 64, [2, 2, 2, 2], 512),
    ("resnet50", 16, [3, 4, 6, 3], 512),  # 4 * 8 * 16
    ("resnet18", 8, [2, 2, 2, 2], 64),
])
def test_block_counts_and_feature_dim(backbone, width, counts, feature_dim):
    model = DeepLabV2(2, backbone, width=width)
    assert [len(getattr(model.backbone, f"layer{i}")) for i in (1, 2, 3, 4)] == counts
    assert model.feature_dim == feature_dim
    assert model.classifier.convs[0].in_channels == feature_dim


def test_resnet18_full_width_parameter_count():
    # torchvision ResNet-18: 11,689,512 parameters, fc 512*1000 + 1000.
    model = DeepLabV2(2, "resnet18")
    assert sum(p.numel() for p in model.backbone.parameters()) == 11_689_512 - 513_000


def test_backbones_tuple():
    assert set(BACKBONES) == {"resnet18", "resnet50", "resnet101"}


# --- ASPP -------------------------------------------------------------------------------------


def test_aspp_is_the_sum_of_four_dilated_convs():
    model = tiny(num_classes=4)
    features = torch.randn(2, model.feature_dim, 9, 11)
    convs = model.classifier.convs
    expected = sum(F.conv2d(features, convs[i].weight, convs[i].bias, padding=d, dilation=d) for i, d in enumerate((6, 12, 18, 24)))
    torch.testing.assert_close(model.classifier(features), expected)


def test_two_branch_aspp_sums_only_the_first_two():
    model = tiny(num_classes=4, two_branch_aspp=True)
    assert len(model.classifier.convs) == 4  # all four exist so checkpoints still load
    features = torch.randn(1, model.feature_dim, 7, 30)
    convs = model.classifier.convs
    expected = sum(F.conv2d(features, convs[i].weight, convs[i].bias, padding=d, dilation=d) for i, d in enumerate((6, 12)))
    torch.testing.assert_close(model.classifier(features), expected)
    # and the full model's logits are that classifier applied to its features
    logits, feats = model.eval()(torch.randn(1, 3, 40, 50))
    torch.testing.assert_close(logits, model.classifier(feats))


def test_classifier_and_backbone_init():
    model = DeepLabV2(19, "resnet18", width=8)
    for conv in model.classifier.convs:
        assert 0.0085 < conv.weight.std().item() < 0.0115  # N(0, 0.01), 64*19*9 samples
        assert torch.all(conv.bias == 0)
    # Kaiming fan_out: std = sqrt(2 / (out_channels * k * k)); conv1 has 8*49 fan_out.
    # (PyTorch's default init would give 1/sqrt(3 * 147) = 0.048, far outside.)
    assert abs(model.backbone.conv1.weight.std().item() - math.sqrt(2 / (8 * 49))) < 0.008
    for bn in bn_layers(model):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


# --- batch norm modes -------------------------------------------------------------------------


def test_frozen_bn_uses_running_stats_in_train_mode():
    model = tiny("resnet18")
    assert all(isinstance(bn, FrozenBatchNorm2d) for bn in bn_layers(model))
    # Non-trivial running statistics so that using batch statistics would show.
    for bn in bn_layers(model):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x = torch.randn(2, 3, 33, 45)
    with torch.no_grad():
        eval_logits, _ = model.eval()(x)
    model.train()
    logits, _ = model(x)
    torch.testing.assert_close(logits, eval_logits)
    for k, v in model.state_dict().items():
        if "running" in k:
            assert torch.equal(v, before[k]), k
    logits.sum().backward()
    for bn in bn_layers(model):
        assert not bn.weight.requires_grad and not bn.bias.requires_grad
        assert bn.weight.grad is None and bn.bias.grad is None
    assert model.backbone.conv1.weight.grad is not None


def test_train_bn_updates_stats_and_trains():
    model = tiny("resnet18", batchnorm="train").train()
    assert all(type(bn) is torch.nn.BatchNorm2d for bn in bn_layers(model))
    mean_before = model.backbone.bn1.running_mean.clone()
    logits, _ = model(torch.randn(2, 3, 35, 37) + 3.0)
    assert not torch.equal(model.backbone.bn1.running_mean, mean_before)
    logits.sum().backward()
    assert model.backbone.bn1.weight.requires_grad and model.backbone.bn1.weight.grad is not None


# --- memory format and autocast ---------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_channels_last_matches_contiguous(backbone):
    model = tiny(backbone, num_classes=5).eval()
    x = torch.randn(2, 3, 41, 57)
    with torch.no_grad():
        logits, features = model(x)
        model = model.to(memory_format=torch.channels_last)
        logits_cl, features_cl = model(x.to(memory_format=torch.channels_last))
    assert features_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(logits_cl, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(features_cl, features, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batchnorm", ["frozen", "train"])
def test_bf16_autocast_forward(batchnorm):
    model = tiny("resnet18", num_classes=5, batchnorm=batchnorm).eval()
    x = torch.randn(1, 3, 41, 57)
    with torch.no_grad():
        reference, _ = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, features = model(x)
    assert logits.dtype == torch.bfloat16  # autocast really ran the convs in bf16
    assert torch.isfinite(logits).all() and torch.isfinite(features).all()
    scale = reference.abs().max().item()
    assert (logits.float() - reference).abs().max().item() < 0.05 * scale


# --- weight loading ---------------------------------------------------------------------------


def strip_backbone(state):
    """Our backbone keys without the "backbone." prefix (torchvision names)."""
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}


def assert_same_tensors(model, state, prefix):
    ours = model.state_dict()
    for k, v in state.items():
        if k.startswith(prefix):
            assert torch.equal(ours[k], v), k


def test_round_trip_own_state_dict(tmp_path):
    source = tiny(seed=1)
    path = tmp_path / "own.pth"
    torch.save(source.state_dict(), path)
    target = tiny(seed=2)
    report = load_pretrained(target, path, skip_classifier=False)
    assert_same_tensors(target, source.state_dict(), "")
    assert set(report.loaded) == set(source.state_dict())
    assert report.missing == [] and report.unexpected == [] and report.skipped == [] and report.shape_mismatch == []


def test_own_state_dict_with_skip_classifier_keeps_the_classifier(tmp_path):
    source, target = tiny(seed=1), tiny(seed=2)
    path = tmp_path / "own.pth"
    torch.save(source.state_dict(), path)
    classifier_before = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("classifier.")}
    report = load_pretrained(target, path)
    assert sorted(report.skipped) == sorted(f"classifier.convs.{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert report.missing == []
    assert_same_tensors(target, source.state_dict(), "backbone.")
    assert_same_tensors(target, classifier_before, "classifier.")


@pytest.mark.parametrize("with_counters", [True, False])
def test_torchvision_checkpoint(tmp_path, with_counters):
    source, target = tiny("resnet50", seed=1), tiny("resnet50", seed=2)
    state = strip_backbone(source.state_dict())
    if not with_counters:  # checkpoints from before PyTorch 0.4.1 have no num_batches_tracked
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.randn(1000, source.feature_dim)
    state["fc.bias"] = torch.randn(1000)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    report = load_pretrained(target, path)
    assert_same_tensors(target, source.state_dict(), "backbone.")
    assert sorted(report.skipped) == ["fc.bias", "fc.weight"]
    assert report.missing == [] and report.unexpected == [] and report.shape_mismatch == []
    assert len(report.loaded) == len(state) - 2


@pytest.mark.parametrize("prefix", ["Scale.", "module."])
@pytest.mark.parametrize("skip_classifier", [True, False])
def test_deeplab_init_layout(tmp_path, prefix, skip_classifier):
    source, target = tiny(seed=1), tiny(seed=2)
    state = {prefix + k: v for k, v in strip_backbone(source.state_dict()).items()}
    classifier = source.classifier.convs
    for i in range(4):
        state[f"{prefix}layer5.conv2d_list.{i}.weight"] = classifier[i].weight.detach().clone()
        state[f"{prefix}layer5.conv2d_list.{i}.bias"] = classifier[i].bias.detach().clone()
    path = tmp_path / "deeplab_init.pth"
    torch.save(state, path)
    classifier_before = target.classifier.convs[2].weight.detach().clone()
    report = load_pretrained(target, path, skip_classifier=skip_classifier)
    assert_same_tensors(target, source.state_dict(), "backbone.")
    aspp_keys = sorted(k for k in state if ".layer5." in k)
    if skip_classifier:
        assert sorted(report.skipped) == aspp_keys
        assert torch.equal(target.classifier.convs[2].weight, classifier_before)
    else:
        assert report.skipped == []
        assert_same_tensors(target, source.state_dict(), "classifier.")
        assert "classifier.convs.3.bias" in report.loaded
    assert report.missing == [] and report.unexpected == []


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_wrapped_state_dict(tmp_path, wrapper):
    source, target = tiny(seed=1), tiny(seed=2)
    path = tmp_path / "checkpoint.pth"
    torch.save({wrapper: source.state_dict(), "epoch": 3, "note": "resume"}, path)
    report = load_pretrained(target, path, skip_classifier=False)
    assert_same_tensors(target, source.state_dict(), "")
    assert report.unexpected == [] and report.missing == []


def test_report_lists_missing_unexpected_and_shape_mismatch(tmp_path):
    source, target = tiny(seed=1), tiny(seed=2)
    state = dict(source.state_dict())
    del state["backbone.layer4.1.conv2.weight"]
    state["backbone.layer1.0.conv1.weight"] = torch.randn(5, 4, 3, 3)  # model: (4, 4, 3, 3)
    state["decoder.extra.weight"] = torch.randn(2)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    kept = target.backbone.layer1[0].conv1.weight.detach().clone()
    report = load_pretrained(target, path, skip_classifier=False)
    assert isinstance(report, LoadReport)
    assert report.missing == ["backbone.layer4.1.conv2.weight"]
    assert report.unexpected == ["decoder.extra.weight"]
    assert report.shape_mismatch == ["backbone.layer1.0.conv1.weight"]
    assert report.skipped == []
    assert len(report.loaded) == len(source.state_dict()) - 2
    assert torch.equal(target.backbone.layer1[0].conv1.weight, kept)  # mismatch not loaded
    text = str(report)
    assert str(path) in text
    assert "backbone.layer4.1.conv2.weight" in text and "decoder.extra.weight" in text
    assert "(5, 4, 3, 3)" in text and "(4, 4, 3, 3)" in text


def test_counters_absent_from_file_are_not_missing(tmp_path):
    source, target = tiny(seed=1), tiny(seed=2)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "no_counters.pth"
    torch.save(state, path)
    report = load_pretrained(target, path, skip_classifier=False)
    assert report.missing == []


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_pretrained(tiny(), path)


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth"):
        load_pretrained(tiny(), path)


def test_file_matching_nothing(tmp_path):
    path = tmp_path / "unrelated.pth"
    torch.save({"encoder.weight": torch.randn(3, 3), "head.bias": torch.randn(3)}, path)
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="unrelated.pth"):
        load_pretrained(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_file_of_another_width_matches_nothing(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(tiny(width=8).state_dict(), path)
    with pytest.raises(ValueError, match="wide.pth"):
        load_pretrained(tiny(width=4), path)


def test_file_holding_a_tensor(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="tensor.pth"):
        load_pretrained(tiny(), path)


# --- parameter groups -------------------------------------------------------------------------


@pytest.mark.parametrize("batchnorm", ["frozen", "train"])
def test_parameter_groups_cover_trainable_params_once(batchnorm):
    model = tiny("resnet50", batchnorm=batchnorm)
    groups = parameter_groups(model, 2.5e-4)
    assert [g["name"] for g in groups] == ["backbone", "classifier"]
    assert groups[0]["lr"] == 2.5e-4
    assert groups[1]["lr"] == pytest.approx(2.5e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.classifier.parameters()}
    bn_params = {id(bn.weight) for bn in bn_layers(model)}
    assert bool(bn_params & set(ids)) == (batchnorm == "train")
    torch.optim.SGD(groups, lr=1.0, momentum=0.9)  # accepted by an optimizer as is


def test_parameter_groups_multiplier():
    groups = parameter_groups(tiny(), 0.01, classifier_lr_mult=3.0)
    assert groups[1]["lr"] == pytest.approx(0.03)


@pytest.mark.parametrize("kwargs,error,name", [
    ({"lr": 0.0}, ValueError, "lr"),
    ({"lr": -1.0}, ValueError, "lr"),
    ({"lr": float("nan")}, ValueError, "lr"),
    ({"lr": "0.1"}, TypeError, "lr"),
    ({"lr": 0.1, "classifier_lr_mult": 0}, ValueError, "classifier_lr_mult"),
])
def test_parameter_groups_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        parameter_groups(tiny(), **kwargs)


# --- bad arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize("args,kwargs,error,name", [
    ((0,), {}, ValueError, "num_classes"),
    ((2.5,), {}, TypeError, "num_classes"),
    ((True,), {}, TypeError, "num_classes"),
    ((3, "resnet34"), {}, ValueError, "backbone"),
    ((3, "resnet18"), {"width": 0}, ValueError, "width"),
    ((3, "resnet18"), {"width": "8"}, TypeError, "width"),
    ((3, "resnet18"), {"two_branch_aspp": "yes"}, TypeError, "two_branch_aspp"),
    ((3, "resnet18"), {"batchnorm": "eval"}, ValueError, "batchnorm"),
])
def test_constructor_rejects_bad_arguments(args, kwargs, error, name):
    with pytest.raises(error, match=name):
        DeepLabV2(*args, **kwargs)


def test_build_model_passes_arguments():
    model = build_model(7, "resnet50", width=4, two_branch_aspp=True, batchnorm="train")
    assert isinstance(model, DeepLabV2)
    assert model.num_classes == 7 and model.feature_dim == 4 * 8 * 4
    assert model.two_branch_aspp and model.batchnorm == "train"
    with pytest.raises(TypeError, match="unexpected keyword argument 'depth'"):  # passed on, not swallowed
        build_model(7, "resnet18", depth=5)


def test_other_bad_inputs(tmp_path):
    model = tiny()
    with pytest.raises(ValueError, match="height"):
        model.output_size(0, 10)
    with pytest.raises(TypeError, match="width"):
        model.output_size(10, 2.0)
    with pytest.raises(TypeError, match="skip_classifier"):
        load_pretrained(model, tmp_path / "x.pth", skip_classifier=1)
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(TypeError, match="model"):
        load_pretrained(torch.nn.Linear(2, 2), tmp_path / "x.pth")
    with pytest.raises(TypeError, match="model"):
        parameter_groups(torch.nn.Linear(2, 2), 0.1)
