"""Specs of the metrics (confusion matrix, IoU, mean IoU, MASR) and of LSRRegularizer's forward."""

from __future__ import annotations

import math

from .values import Kind, dyadic_probs, gen, label_setup, make_labels, pick
from .spec_base import Spec, set_arg, show

# Set by child._child_setup (imported lazily so the parent stays light).
torch = None
lsr_fast = None
st = None


# ---- metrics ---------------------------------------------------------------------------------------


def naive_confusion(prediction, target, C, ii):
    out = torch.zeros(C, C, dtype=torch.int64)
    for p_, t_ in zip(prediction.reshape(-1).tolist(), target.reshape(-1).tolist()):
        if t_ != ii:
            out[t_, p_] += 1
    return out


class ConfusionSpec(Spec):
    primary = "target"
    name = "confusion_matrix"
    tensors = ("prediction", "target")
    labels = ("prediction", "target")
    outputs = ("count",)
    partners = {"prediction": ("target",), "target": ("prediction",)}
    void_rule = False
    backends = False

    def params(self, draw, ov, small):
        p = dict(B=pick(draw, ov, "B", st.integers(1, 2)), H=pick(draw, ov, "H", st.integers(1, 5)),
                 W=pick(draw, ov, "W", st.integers(1, 5)), C=pick(draw, ov, "C", st.integers(1, 5)))
        p.update(label_setup(draw, ov, p["C"]))
        p["seed"] = draw(st.integers(0, 2**31 - 1))
        return p

    def build(self, p):
        g = gen(p["seed"])
        shape = (p["B"], p["H"], p["W"])
        prediction = make_labels(shape, p["C"], p["ii"], p["ldt"], 0.0, g)
        target = make_labels(shape, p["C"], p["ii"], p["ldt"], p["void"], g)
        return dict(prediction=prediction, target=target, num_classes=p["C"], ignore_index=p["ii"])

    def oor_where(self, name, a):
        if name == "prediction":  # a prediction only counts where the target is not void
            return a["target"].long() != a["ignore_index"]
        return None

    def call(self, a, backend):
        return lsr_fast.confusion_matrix(a["prediction"], a["target"], a["num_classes"], ignore_index=a["ignore_index"])

    def oracle(self, a):
        C = a["num_classes"]
        if C > 4096:
            raise ValueError("num_classes too large for the naive confusion matrix")
        return (naive_confusion(a["prediction"].long(), a["target"].long(), C, a["ignore_index"]),)

    def scalar_kinds(self):
        kinds = [Kind(f"num_classes={show(v)}", "raise", ("num_classes",), apply=set_arg("num_classes", v)) for v in (0, -1, 1.5, 2**64)]
        kinds.append(Kind("num_classes=2**27", "raise", ("num_classes",), apply=set_arg("num_classes", 2**27)))
        kinds += [Kind(f"ignore_index={show(v)}", "raise", ("ignore_index",), {"void": 0.0}, set_arg("ignore_index", v)) for v in (2**64, 1.5)]
        return kinds

    def zero_kinds(self):
        return [Kind("B=0", "either", ("prediction", "target"), {"B": 0})]

    def extra_kinds(self):
        return [Kind("prediction shape differs", "raise", ("prediction", "target"),
                     apply=set_arg("prediction", lambda a, p: a["prediction"][..., :-1] if p["W"] > 1 else a["prediction"].unsqueeze(0)))]


def naive_iou(confusion):
    c = confusion.double()
    out = []
    for i in range(c.shape[0]):
        tp = float(c[i, i])
        union = float(c[i, :].sum() + c[:, i].sum()) - tp
        out.append(tp / union if union > 0 else float("nan"))
    return torch.tensor(out, dtype=torch.float64)


class IouSpec(Spec):
    primary = "confusion"
    name = "per_class_iou"
    tensors = ("confusion",)
    outputs = ("float",)
    backends = False
    meta_mode = "meta"  # pure torch on any device: meta in, meta out is fine

    def params(self, draw, ov, small):
        return dict(C=pick(draw, ov, "C", st.integers(1, 6)), zero_rows=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))

    def build(self, p):
        confusion = torch.randint(0, 20, (p["C"], p["C"]), generator=gen(p["seed"]))
        if p["zero_rows"] and p["C"] > 1:
            confusion[0, :] = 0
            confusion[:, 0] = 0
        return dict(confusion=confusion)

    def tol_dtype(self, a):
        return torch.float64

    def call(self, a, backend):
        return lsr_fast.per_class_iou(a["confusion"])

    def oracle(self, a):
        return (naive_iou(a["confusion"]),)

    def zero_kinds(self):
        return [Kind("C=0", "either", ("confusion",), {"C": 0})]

    def extra_kinds(self):
        return [Kind("confusion not square", "raise", ("confusion",), apply=set_arg("confusion", lambda a, p: torch.ones(p["C"], p["C"] + 1))),
                Kind("confusion float64", "match", ("confusion",), apply=set_arg("confusion", lambda a, p: a["confusion"].double())),
                Kind("confusion str", "raise", ("confusion",), apply=set_arg("confusion", "cm"))]


class MeanIouSpec(IouSpec):
    name = "mean_iou"
    primary = "confusion_or_iou"
    tensors = ("confusion_or_iou",)
    generic_rank = False  # 2-d is a confusion matrix, 1-d per-class IoUs: its own kinds below
    meta_mode = "raise"  # returns a float: it cannot propagate meta

    def build(self, p):
        return dict(confusion_or_iou=super().build(p)["confusion"])

    def call(self, a, backend):
        return torch.tensor(lsr_fast.mean_iou(a["confusion_or_iou"]), dtype=torch.float64)

    def oracle(self, a):
        x = a["confusion_or_iou"]
        iou = naive_iou(x) if x.dim() == 2 else x.double()
        defined = iou[~torch.isnan(iou)]
        return (torch.tensor(float(defined.mean()) * 100 if defined.numel() else float("nan"), dtype=torch.float64),)

    def extra_kinds(self):
        name = "confusion_or_iou"
        return [Kind("1-d iou input", "match", (name,), apply=set_arg(name, lambda a, p: naive_iou(a[name]))),
                Kind("confusion not square", "raise", (name,), apply=set_arg(name, lambda a, p: torch.ones(p["C"], p["C"] + 1))),
                Kind("confusion 3-d", "raise", (name,), apply=set_arg(name, lambda a, p: torch.ones(2, p["C"], p["C"]))),
                Kind("confusion str", "raise", (name,), apply=set_arg(name, "cm"))]


class MasrSpec(Spec):
    primary = "adapted_iou"
    name = "masr"
    tensors = ("adapted_iou", "supervised_iou")
    optional = {"supervised_iou": "supervised"}
    outputs = ("float",)
    backends = False
    generic_rank = False  # sequences of any shape are flattened (documented)

    def params(self, draw, ov, small):
        n = pick(draw, ov, "n", st.sampled_from([19, 16, 13, 3]))
        supervised = pick(draw, ov, "supervised", st.booleans()) or n == 3
        return dict(n=n, supervised=supervised, nan=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))

    def build(self, p):
        g = gen(p["seed"])
        adapted = torch.rand(p["n"], generator=g, dtype=torch.float64)
        if p["nan"]:
            adapted[0] = float("nan")
        supervised = torch.rand(p["n"], generator=g, dtype=torch.float64) * 0.9 + 0.1 if p["supervised"] else None
        return dict(adapted_iou=adapted, supervised_iou=supervised)

    def tol_dtype(self, a):
        return torch.float64

    def call(self, a, backend):
        return torch.tensor(lsr_fast.masr(a["adapted_iou"], a["supervised_iou"]), dtype=torch.float64)

    def oracle(self, a):
        from lsr_fast.eval.metrics import paper_target_only_iou

        adapted = torch.as_tensor(a["adapted_iou"], dtype=torch.float64).reshape(-1)
        supervised = a["supervised_iou"]
        supervised = paper_target_only_iou(adapted.numel()) if supervised is None else torch.as_tensor(supervised, dtype=torch.float64).reshape(-1)
        ratios = [x / y for x, y in zip(adapted.tolist(), supervised.tolist()) if not math.isnan(x)]
        return (torch.tensor(sum(ratios) / len(ratios) * 100 if ratios else float("nan"), dtype=torch.float64),)

    def extra_kinds(self):
        both = ("adapted_iou", "supervised_iou")
        return [
            Kind("supervised_iou has a 0", "raise", ("supervised_iou",), {"supervised": True},
                 apply=lambda m, p, s: m.a["supervised_iou"].__setitem__(0, 0.0)),
            Kind("supervised_iou has a NaN", "raise", ("supervised_iou",), {"supervised": True},
                 apply=lambda m, p, s: m.a["supervised_iou"].__setitem__(0, float("nan"))),
            Kind("supervised_iou length differs", "raise", both, {"supervised": True},
                 apply=set_arg("supervised_iou", lambda a, p: a["supervised_iou"][:-1])),
            Kind("adapted_iou of 7 classes, no supervised_iou", "raise", ("adapted_iou",), {"n": 7, "supervised": False}),
            Kind("adapted_iou a list of str", "raise", ("adapted_iou",), {"supervised": True},
                 apply=set_arg("adapted_iou", lambda a, p: ["x"] * p["n"])),
            Kind("adapted_iou a list of floats", "match", ("adapted_iou",), {"nan": False},
                 apply=set_arg("adapted_iou", lambda a, p: a["adapted_iou"].tolist())),
            Kind("adapted_iou float32", "either", ("adapted_iou",), apply=set_arg("adapted_iou", lambda a, p: a["adapted_iou"].float())),
        ]


# ---- the regulariser -------------------------------------------------------------------------------


class RegularizerSpec(Spec):
    """LSRRegularizer forward (training mode, two steps so the second uses the first's EMA state
    and f-bar_s) against the same module on backend="reference"; every returned term, the
    buffers after each step, and the gradients of both feature maps and the probabilities."""

    primary = "source_features"

    name = "LSRRegularizer"
    tensors = ("source_features", "source_labels", "target_features", "target_probs")
    labels = ("source_labels",)
    floats = ("source_features", "target_features", "target_probs")
    diff = ("source_features", "target_features", "target_probs")
    TERMS = ("clustering_source", "clustering_target", "perpendicularity", "norm_source", "norm_target", "entropy",
             "total", "source_mean_norm", "target_mean_norm", "source_labels", "pseudo_labels")
    outputs = tuple(("label" if t.endswith("labels") else "float") for t in TERMS) * 2 + ("float", "bool", "float")
    sanitize_oracle = False  # terms["source_labels"] gives the labels back as they came
    exact_label_dtype = False
    fixed_ignore = True
    partners = {"source_features": ("source_labels",), "source_labels": ("source_features",),
                "target_features": ("target_probs",), "target_probs": ("target_features",)}

    def params(self, draw, ov, small):
        p = dict(C=pick(draw, ov, "C", st.integers(1, 4)), K=pick(draw, ov, "K", st.integers(1, 4)),
                 B=pick(draw, ov, "B", st.integers(1, 2)), h=pick(draw, ov, "h", st.integers(1, 3)),
                 w=pick(draw, ov, "w", st.integers(1, 3)), up=pick(draw, ov, "up", st.sampled_from([1, 2])),
                 init=draw(st.sampled_from(["zero", "first"])), seed=draw(st.integers(0, 2**31 - 1)))
        p.update(label_setup(draw, {"ii": 255, **ov}, p["C"]))
        return p

    def build(self, p):
        g = gen(p["seed"])
        B, K, C, h, w, up = p["B"], p["K"], p["C"], p["h"], p["w"], p["up"]
        source = torch.randn(B, K, h, w, generator=g)
        target = torch.randn(B, K, h, w, generator=g) * 1.5
        labels = make_labels((B, h * up, w * up), C, p["ii"], p["ldt"], p["void"], g)
        probs = dyadic_probs((B, C, h * up, w * up), g)
        return dict(source_features=source, source_labels=labels, target_features=target, target_probs=probs,
                    num_classes=C, init=p["init"])

    def classes(self, a):
        return a["num_classes"]

    def ignore(self, a):
        return 255

    def _run(self, a, backend):
        K = a["source_features"].shape[1] if a["source_features"].dim() == 4 else 1
        reg = lsr_fast.LSRRegularizer(a["num_classes"], K, lambda_entropy=0.1, prototype_init=a["init"], backend=backend)
        device = a["source_features"].device if isinstance(a["source_features"], torch.Tensor) else None
        if device is not None and device.type not in ("cpu", "meta"):
            reg = reg.to(device)
        out = []
        for _ in range(2):
            terms = reg(a["source_features"], a["source_labels"], a["target_features"], a["target_probs"])
            reg.check_values()  # a training-mode call defers its value checks: read them here
            out += [terms[t] for t in self.TERMS]
        return tuple(out) + (reg.prototypes.clone(), reg.seen.clone(), reg.mean_source_norm.clone())

    def call(self, a, backend):
        return self._run(a, backend)

    def oracle(self, a):
        return self._run(a, "reference")

    def extra_kinds(self):
        return [Kind("target_probs with C+1 classes", "raise", ("target_probs",),
                     apply=set_arg("target_probs", lambda a, p: torch.cat([a["target_probs"], a["target_probs"][:, :1] * 0], 1))),
                Kind("target_features of another width", "raise", ("target_features",),
                     apply=set_arg("target_features", lambda a, p: torch.zeros(p["B"], p["K"] + 1, p["h"], p["w"])))]
