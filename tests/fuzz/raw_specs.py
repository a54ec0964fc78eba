"""Specs of the raw ``torch.ops.lsr_fast.*`` entry points (forward and backward ops)."""

from __future__ import annotations


from .values import Kind, gen, pick
from .spec_base import WIDE, WIDE_MAP, fraction_kinds, ignore_kinds, set_arg, show
from .public_specs import ClusteringSpec, FeatureSpecBase, HistSpec, MaxSquareSpec, PseudoSpec, StatsSpec

# Set by child._child_setup (imported lazily so the parent stays light).
torch = None
reference = None
st = None


# ---- raw specs ----------------------------------------------------------------------------------------


def raw_op(name):
    return getattr(torch.ops.lsr_fast, name)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def raw_fraction_kinds(name):
    return fraction_kinds(name, raw=True)


def raw_size_kinds():
    kinds = []
    for arg, full, small in (("out_h", "H", "h"), ("out_w", "W", "w")):
        kinds += [Kind(f"{arg}={full}+1", "raise", (arg,), apply=set_arg(arg, lambda a, p, full=full: p[full] + 1)),
                  Kind(f"{arg}=0", "raise", (arg,), apply=set_arg(arg, 0)),
                  Kind(f"{arg}=-1", "raise", (arg,), apply=set_arg(arg, -1)),
                  Kind(f"{arg}={full}", "match", (arg,), apply=set_arg(arg, lambda a, p, full=full: p[full]))]
    return kinds


class RawHist(HistSpec):
    api = "raw"

    def build(self, p):
        a = super().build(p)
        size = a.pop("size")
        return dict(labels=a["labels"], out_h=size[0], out_w=size[1], num_classes=a["num_classes"], threshold=a["threshold"],
                    ignore_index=a["ignore_index"], class_weights=a["class_weights"])

    def call(self, a, backend):
        return raw_op("hist_downsample")(a["labels"], a["out_h"], a["out_w"], a["num_classes"], a["threshold"], a["ignore_index"], a["class_weights"])

    def oracle(self, a):
        return super().oracle(dict(a, size=(a["out_h"], a["out_w"])))

    def scalar_kinds(self):
        kinds = raw_size_kinds()
        kinds += [Kind(f"num_classes={v!r}", "raise", ("num_classes",), apply=set_arg("num_classes", v)) for v in (0, -1)]
        kinds += [Kind(f"num_classes={show(v)}", "either", ("num_classes",), dict(WIDE, weights=None), set_arg("num_classes", v))
                  for v in (2**22, 2**27, 2**31 - 1)]
        return kinds + raw_fraction_kinds("threshold") + ignore_kinds(raw=True)

    def zero_kinds(self):
        return [Kind("B=0", "either", ("labels",), {"B": 0}), Kind("H=0", "either", ("labels", "out_h"), {"H": 0})]

    def extra_kinds(self):
        return [Kind("class_weights shape (C+1,)", "raise", ("class_weights",), {"weights": "yes"},
                     set_arg("class_weights", lambda a, p: torch.ones(p["C"] + 1))),
                Kind("class_weights negative", "raise", ("class_weights",), {"weights": "yes"},
                     set_arg("class_weights", lambda a, p: -torch.ones(p["C"]))),
                Kind("class_weights float64", "either", ("class_weights",), {"weights": "yes"},
                     set_arg("class_weights", lambda a, p: torch.ones(p["C"], dtype=torch.float64))),
                Kind("class_weights int64", "either", ("class_weights",), {"weights": "yes"},
                     set_arg("class_weights", lambda a, p: torch.ones(p["C"], dtype=torch.int64)))]


class RawPseudo(PseudoSpec):
    api = "raw"

    def build(self, p):
        a = super().build(p)
        size = a.pop("size")
        return dict(probs=a["probs"], out_h=size[0], out_w=size[1], threshold=a["threshold"], confidence=a["confidence"],
                    ignore_index=a["ignore_index"])

    def call(self, a, backend):
        return raw_op("pseudo_label_downsample")(a["probs"], a["out_h"], a["out_w"], a["threshold"], a["confidence"], a["ignore_index"])

    def oracle(self, a):
        return super().oracle(dict(a, size=(a["out_h"], a["out_w"])))

    def scalar_kinds(self):
        return raw_size_kinds() + raw_fraction_kinds("threshold") + raw_fraction_kinds("confidence") + ignore_kinds(raw=True)

    def zero_kinds(self):
        return [Kind("B=0", "either", ("probs",), {"B": 0}), Kind("C=0", "either", ("probs",), {"C": 0}),
                Kind("H=0", "either", ("probs", "out_h"), {"H": 0})]

    def extra_kinds(self):
        return []


class RawStats(StatsSpec):
    api = "raw"

    def call(self, a, backend):
        return raw_op("class_feature_stats")(a["features"], a["labels"], a["num_classes"], a["ignore_index"])

    def scalar_kinds(self):
        kinds = [Kind(f"num_classes={v!r}", "raise", ("num_classes",), apply=set_arg("num_classes", v)) for v in (0, -1)]
        kinds.append(Kind("num_classes=2**22", "either", ("num_classes",), WIDE_MAP, set_arg("num_classes", 2**22)))
        return kinds + ignore_kinds(raw=True)


class RawStatsBackward(FeatureSpecBase):  # noqa: D101 (primary: features)
    api = "raw"
    name = "class_feature_stats_backward"
    tensors = ("grad_sums", "features", "labels")
    labels = ("labels",)
    floats = ("grad_sums", "features")
    outputs = ("float",)
    partners = {"features": ("labels", "grad_sums"), "labels": ("features",), "grad_sums": ("features",)}

    def params(self, draw, ov, small):
        return self.feature_params(draw, ov, small)

    def build(self, p):
        g = gen(p["seed"])
        features, labels = self.feature_tensors(p, g)
        grad_sums = torch.randn(p["C"], p["K"], generator=g)
        return dict(grad_sums=grad_sums, features=features, labels=labels, ignore_index=p["ii"])

    def classes(self, a):
        return a["grad_sums"].shape[0] if a["grad_sums"].dim() else 0

    def tol_dtype(self, a):
        return a["features"].dtype if a["features"].dtype.is_floating_point else torch.float32

    def call(self, a, backend):
        return raw_op("class_feature_stats_backward")(a["grad_sums"], a["features"], a["labels"], a["ignore_index"])

    def oracle(self, a):
        f = a["features"].detach().clone().requires_grad_()
        sums, _ = reference.class_feature_stats(f, a["labels"], self.classes(a), a["ignore_index"])
        (grad,) = torch.autograd.grad(sums, f, a["grad_sums"].to(sums.dtype), allow_unused=True)
        return (torch.zeros_like(f) if grad is None else grad,)

    def scalar_kinds(self):
        return ignore_kinds(raw=True)

    def zero_kinds(self):
        return self.feature_zero_kinds(("features", "labels", "grad_sums")) + [
            Kind("C=0 (grad_sums has no rows)", "either", ("grad_sums",), {"C": 0, "void": 1.0})]

    def extra_kinds(self):
        return [Kind("grad_sums width K+1", "raise", ("grad_sums", "features"),
                     apply=set_arg("grad_sums", lambda a, p: torch.zeros(p["C"], p["K"] + 1)))]


def raw_reference_kinds():  # the reference tensor's dtype, rank, values: the generic kinds
    return [
        Kind("norm_mode=2", "raise", ("norm_mode",), apply=set_arg("norm_mode", 2)),
        Kind("norm_mode=-1", "raise", ("norm_mode",), apply=set_arg("norm_mode", -1)),
        Kind("norm_mode=1", "match", ("norm_mode",), apply=set_arg("norm_mode", 1)),
    ]


class RawTerms(FeatureSpecBase):
    api = "raw"
    name = "feature_terms"
    tensors = ("features", "labels", "prototypes", "reference")
    labels = ("labels",)
    floats = ("features", "prototypes", "reference")
    diff = ("features",)
    outputs = ("float", "count", "float", "float", "float")
    partners = ClusteringSpec.partners

    def params(self, draw, ov, small):
        p = self.feature_params(draw, ov, small)
        p["ref"] = pick(draw, ov, "ref", st.floats(0.0, 8.0))
        p["mode"] = pick(draw, ov, "mode", st.sampled_from([0, 1]))
        return p

    def build(self, p):
        g = gen(p["seed"])
        features, labels = self.feature_tensors(p, g)
        prototypes = torch.randn(p["C"], p["K"], generator=g) * p["scale"]
        return dict(features=features, labels=labels, prototypes=prototypes, reference=torch.tensor(p["ref"]),
                    norm_mode=p["mode"], ignore_index=p["ii"])

    def classes(self, a):
        return a["prototypes"].shape[0] if a["prototypes"].dim() else 0

    def call(self, a, backend):
        return raw_op("feature_terms")(a["features"], a["labels"], a["prototypes"], a["reference"], a["norm_mode"], a["ignore_index"])

    def oracle(self, a):
        mode = {0: "source", 1: "target"}[a["norm_mode"]]
        return reference.feature_terms(a["features"], a["labels"], a["prototypes"], a["reference"], mode, a["ignore_index"])

    def scalar_kinds(self):
        return raw_reference_kinds() + ignore_kinds(raw=True)

    def zero_kinds(self):
        return self.feature_zero_kinds() + [Kind("C=0 (no prototypes)", "either", ("prototypes",), {"C": 0, "void": 1.0})]

    def extra_kinds(self):
        return [Kind("prototypes width K+1", "raise", ("prototypes", "features"),
                     apply=set_arg("prototypes", lambda a, p: torch.zeros(p["C"], p["K"] + 1)))]


class RawTermsBackward(RawTerms):
    name = "feature_terms_backward"
    tensors = ("grad_sums", "grad_sq_dist_sums", "grad_norm_loss_sum", "grad_norm_sum", "features", "labels", "prototypes", "reference")
    floats = ("grad_sums", "grad_sq_dist_sums", "grad_norm_loss_sum", "grad_norm_sum", "features", "prototypes", "reference")
    diff = ()
    outputs = ("float",)
    partners = {"features": ("labels", "prototypes", "grad_sums"), "labels": ("features",), "prototypes": ("features", "grad_sums"),
                "grad_sums": ("features", "prototypes"), "grad_sq_dist_sums": ("prototypes",)}

    def build(self, p):
        a = super().build(p)
        g = gen(p["seed"] + 1)
        grads = dict(grad_sums=torch.randn(p["C"], p["K"], generator=g), grad_sq_dist_sums=torch.randn(p["C"], generator=g),
                     grad_norm_loss_sum=torch.randn((), generator=g), grad_norm_sum=torch.randn((), generator=g))
        return {**grads, **a}

    def tol_dtype(self, a):
        return a["features"].dtype if a["features"].dtype.is_floating_point else torch.float32

    def call(self, a, backend):
        return raw_op("feature_terms_backward")(a["grad_sums"], a["grad_sq_dist_sums"], a["grad_norm_loss_sum"], a["grad_norm_sum"],
                                                a["features"], a["labels"], a["prototypes"], a["reference"], a["norm_mode"], a["ignore_index"])

    def oracle(self, a):
        mode = {0: "source", 1: "target"}[a["norm_mode"]]
        f = a["features"].detach().clone().requires_grad_()
        sums, _, sq, loss, norm = reference.feature_terms(f, a["labels"], a["prototypes"], a["reference"], mode, a["ignore_index"])
        outs = (sums, sq, loss, norm)
        grads = [a[n].to(o.dtype) for n, o in zip(("grad_sums", "grad_sq_dist_sums", "grad_norm_loss_sum", "grad_norm_sum"), outs)]
        used = [(o, g_) for o, g_ in zip(outs, grads) if o.requires_grad]
        grad = None
        if used:
            (grad,) = torch.autograd.grad([o for o, _ in used], f, [g_ for _, g_ in used], allow_unused=True)
        return (torch.zeros_like(f) if grad is None else grad,)

    def zero_kinds(self):
        return self.feature_zero_kinds(("features", "labels", "grad_sums")) + [
            Kind("C=0 (no prototypes)", "either", ("prototypes", "grad_sums"), {"C": 0, "void": 1.0})]

    def extra_kinds(self):
        return [Kind("grad_sq_dist_sums shape (C+1,)", "raise", ("grad_sq_dist_sums",),
                     apply=set_arg("grad_sq_dist_sums", lambda a, p: torch.zeros(p["C"] + 1))),
                Kind("grad_norm_sum shape (2,)", "raise", ("grad_norm_sum",), apply=set_arg("grad_norm_sum", lambda a, p: torch.zeros(2)))]


def maxsquare_class_weight(probs, alpha):
    B, C = probs.shape[:2]
    if probs.numel() == 0:
        return torch.zeros(B, C, dtype=acc_dtype(probs.dtype))
    p = probs.to(acc_dtype(probs.dtype)).reshape(B, C, -1)
    prediction = p.argmax(dim=1)
    offsets = torch.arange(B).unsqueeze(1) * C
    hist = torch.bincount((prediction + offsets).reshape(-1), minlength=B * C).reshape(B, C).to(p.dtype)
    return 1.0 / (hist.pow(alpha) * float(p.shape[2]) ** (1.0 - alpha)).clamp(min=1.0)


class RawMaxSquare(MaxSquareSpec):
    api = "raw"
    outputs = ("float", "float")

    def call(self, a, backend):
        return raw_op("maxsquare_loss")(a["probs"], a["alpha"])

    def oracle(self, a):
        return reference.maxsquare_loss(a["probs"], float(a["alpha"])), maxsquare_class_weight(a["probs"].detach(), float(a["alpha"]))

    def scalar_kinds(self):
        return raw_fraction_kinds("alpha")


class RawMaxSquareBackward(MaxSquareSpec):  # noqa: D101 (primary: probs)
    api = "raw"
    name = "maxsquare_loss_backward"
    tensors = ("grad_loss", "probs", "class_weight")
    floats = ("grad_loss", "probs", "class_weight")
    diff = ()
    outputs = ("float",)
    partners = {"probs": ("class_weight",), "class_weight": ("probs",)}

    def build(self, p):
        a = super().build(p)
        probs = a["probs"]
        return dict(grad_loss=torch.randn((), generator=gen(p["seed"] + 1)), probs=probs,
                    class_weight=maxsquare_class_weight(probs, p["alpha"]))

    def tol_dtype(self, a):
        return a["probs"].dtype if a["probs"].dtype.is_floating_point else torch.float32

    def call(self, a, backend):
        return raw_op("maxsquare_loss_backward")(a["grad_loss"], a["probs"], a["class_weight"])

    def oracle(self, a):
        probs = a["probs"].detach().clone().requires_grad_()
        B, C = probs.shape[:2]
        acc = acc_dtype(probs.dtype)
        if probs.numel() == 0:
            return (torch.zeros_like(probs),)
        p = probs.to(acc).reshape(B, C, -1)
        weight = a["class_weight"].to(acc).gather(1, p.argmax(dim=1))
        loss = -(p.pow(2).sum(dim=1) * weight).sum() / (B * C)
        (grad,) = torch.autograd.grad(loss, probs, a["grad_loss"].to(acc), allow_unused=True)
        return (torch.zeros_like(probs) if grad is None else grad,)

    def scalar_kinds(self):
        return []

    def extra_kinds(self):
        return [Kind("class_weight shape (B, C+1)", "raise", ("class_weight",),
                     apply=set_arg("class_weight", lambda a, p: torch.ones(p["B"], p["C"] + 1))),
                Kind("grad_loss shape (1,)", "raise", ("grad_loss",), apply=set_arg("grad_loss", lambda a, p: torch.ones(1)))]
