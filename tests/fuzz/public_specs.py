"""Specs of the public lsr_fast ops (hist_downsample, pseudo labels, feature stats/terms/norms,
clustering, maxsquare, perplexity)."""

from __future__ import annotations


from .values import Kind, dyadic_probs, effective_classes, fractions, gen, label_setup, make_labels, norm_size, pad_rows, pick
from .spec_base import Spec, WIDE, WIDE_MAP, backend_kinds, fraction_kinds, ignore_kinds, set_arg, show

# Set by child._child_setup (imported lazily so the parent stays light).
torch = None
lsr_fast = None
reference = None
st = None


# ---- public specs ----------------------------------------------------------------------------------


class HistSpec(Spec):
    primary = "labels"
    name = "hist_downsample"
    tensors = ("labels", "class_weights")
    labels = ("labels",)
    weights = ("class_weights",)
    optional = {"class_weights": "weights"}
    outputs = ("label",)

    def params(self, draw, ov, small):
        top = 4 if small else 7
        p = dict(B=pick(draw, ov, "B", st.integers(1, 2)), H=pick(draw, ov, "H", st.integers(1, top)),
                 W=pick(draw, ov, "W", st.integers(1, top)), C=pick(draw, ov, "C", st.integers(1, 5)))
        p["h"] = min(pick(draw, ov, "h", st.integers(1, max(p["H"], 1))), max(p["H"], 1))
        p["w"] = min(pick(draw, ov, "w", st.integers(1, max(p["W"], 1))), max(p["W"], 1))
        p.update(label_setup(draw, ov, p["C"]))
        p["thr"] = pick(draw, ov, "thr", fractions())
        weights = st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=p["C"], max_size=p["C"])
        p["weights"] = draw(weights) if ov.get("weights") == "yes" else pick(draw, ov, "weights", st.none() | weights)
        p["seed"] = draw(st.integers(0, 2**31 - 1))
        return p

    def build(self, p):
        g = gen(p["seed"])
        labels = make_labels((p["B"], p["H"], p["W"]), p["C"], p["ii"], p["ldt"], p["void"], g)
        weights = None if p["weights"] is None else torch.tensor(p["weights"], dtype=torch.float32)
        return dict(labels=labels, size=(p["h"], p["w"]), num_classes=p["C"], threshold=p["thr"],
                    ignore_index=p["ii"], class_weights=weights)

    def call(self, a, backend):
        return lsr_fast.hist_downsample(a["labels"], a["size"], a["num_classes"], threshold=a["threshold"],
                                        ignore_index=a["ignore_index"], class_weights=a["class_weights"], backend=backend)

    def oracle(self, a):
        C = effective_classes(a["labels"], a["num_classes"], a["ignore_index"])
        weights = a["class_weights"]
        if weights is not None and C != a["num_classes"]:
            weights = weights[:C]
        return (reference.hist_downsample(a["labels"], norm_size(a["size"]), C, float(a["threshold"]), a["ignore_index"], weights),)

    def scalar_kinds(self):
        H = lambda a, p: p["H"]  # noqa: E731
        kinds = [
            Kind("size=(H+1, w)", "raise", ("size",), apply=set_arg("size", lambda a, p: (p["H"] + 1, p["w"]))),
            Kind("size=(h, W+1)", "raise", ("size",), apply=set_arg("size", lambda a, p: (p["h"], p["W"] + 1))),
            Kind("size=(0, w)", "raise", ("size",), apply=set_arg("size", lambda a, p: (0, p["w"]))),
            Kind("size=(-1, w)", "raise", ("size",), apply=set_arg("size", lambda a, p: (-1, p["w"]))),
            Kind("size=(h, w, 1)", "raise", ("size",), apply=set_arg("size", lambda a, p: (p["h"], p["w"], 1))),
            Kind("size=1.5", "raise", ("size",), apply=set_arg("size", 1.5)),
            Kind("size=None", "raise", ("size",), apply=set_arg("size", None)),
            Kind("size=int", "match", ("size",), apply=set_arg("size", lambda a, p: min(p["h"], p["w"]))),
            Kind("size=[h, w] list", "match", ("size",), apply=set_arg("size", lambda a, p: [p["h"], p["w"]])),
            Kind("size=(H, W)", "match", ("size",), apply=set_arg("size", lambda a, p: (p["H"], p["W"]))),
        ]
        del H
        kinds += [Kind(f"num_classes={show(v)}", "raise", ("num_classes",), apply=set_arg("num_classes", v))
                  for v in (0, -1, 1.5, None, True, 2**64)]
        kinds += [Kind(f"num_classes={show(v)}", "either", ("num_classes",), dict(WIDE, weights=None), set_arg("num_classes", v))
                  for v in (2**22, 2**27, 2**31 - 1, 2**40)]
        kinds += fraction_kinds("threshold") + ignore_kinds() + backend_kinds()
        return kinds

    def zero_kinds(self):
        return [Kind("B=0", "either", ("labels",), {"B": 0}),
                Kind("H=0", "either", ("labels", "size"), {"H": 0}),
                Kind("W=0", "either", ("labels", "size"), {"W": 0})]

    def extra_kinds(self):
        return [Kind("class_weights shape (C+1,)", "raise", ("class_weights",), {"weights": "yes"},
                     set_arg("class_weights", lambda a, p: torch.ones(p["C"] + 1))),
                Kind("class_weights negative", "raise", ("class_weights",), {"weights": "yes"},
                     set_arg("class_weights", lambda a, p: -torch.ones(p["C"]))),
                Kind("class_weights negative, checks off", "either", ("class_weights",), {"weights": "yes"},
                     set_arg("class_weights", lambda a, p: -torch.ones(p["C"])), checks=False),
                Kind("class_weights=list", "either", ("class_weights",), {"weights": "yes"},
                     set_arg("class_weights", lambda a, p: [1.0] * p["C"])),
                Kind("class_weights int64", "either", ("class_weights",), {"weights": "yes"},
                     set_arg("class_weights", lambda a, p: torch.ones(p["C"], dtype=torch.int64)))]


class PseudoSpec(Spec):
    primary = "probs"
    name = "pseudo_label_downsample"
    tensors = ("probs",)
    floats = ("probs",)
    outputs = ("label",)

    def params(self, draw, ov, small):
        top = 4 if small else 7
        p = dict(B=pick(draw, ov, "B", st.integers(1, 2)), C=pick(draw, ov, "C", st.integers(1, 5)),
                 H=pick(draw, ov, "H", st.integers(1, top)), W=pick(draw, ov, "W", st.integers(1, top)))
        p["h"] = min(pick(draw, ov, "h", st.integers(1, max(p["H"], 1))), max(p["H"], 1))
        p["w"] = min(pick(draw, ov, "w", st.integers(1, max(p["W"], 1))), max(p["W"], 1))
        p["ii"] = pick(draw, ov, "ii", st.one_of(st.sampled_from([255, -1, p["C"]]), st.integers(0, max(p["C"] - 1, 0))))
        p["thr"] = pick(draw, ov, "thr", fractions())
        p["conf"] = pick(draw, ov, "conf", st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]))
        p["seed"] = draw(st.integers(0, 2**31 - 1))
        return p

    def build(self, p):
        probs = dyadic_probs((p["B"], p["C"], p["H"], p["W"]), gen(p["seed"]))
        return dict(probs=probs, size=(p["h"], p["w"]), threshold=p["thr"], confidence=p["conf"], ignore_index=p["ii"])

    def call(self, a, backend):
        return lsr_fast.pseudo_label_downsample(a["probs"], a["size"], threshold=a["threshold"], confidence=a["confidence"],
                                                ignore_index=a["ignore_index"], backend=backend)

    def oracle(self, a):
        return (reference.pseudo_label_downsample(a["probs"], norm_size(a["size"]), float(a["threshold"]),
                                                  float(a["confidence"]), a["ignore_index"]),)

    def scalar_kinds(self):
        kinds = [
            Kind("size=(H+1, w)", "raise", ("size",), apply=set_arg("size", lambda a, p: (p["H"] + 1, p["w"]))),
            Kind("size=(0, w)", "raise", ("size",), apply=set_arg("size", lambda a, p: (0, p["w"]))),
            Kind("size=(h, w, 1)", "raise", ("size",), apply=set_arg("size", lambda a, p: (p["h"], p["w"], 1))),
            Kind("size=int", "match", ("size",), apply=set_arg("size", lambda a, p: min(p["h"], p["w"]))),
        ]
        return kinds + fraction_kinds("threshold") + fraction_kinds("confidence") + ignore_kinds() + backend_kinds()

    def zero_kinds(self):
        return [Kind("B=0", "either", ("probs",), {"B": 0}), Kind("C=0", "either", ("probs",), {"C": 0}),
                Kind("H=0", "either", ("probs", "size"), {"H": 0})]

    def extra_kinds(self):
        return [Kind("probs unnormalised (finite, negative and > 1)", "match", ("probs",),
                     apply=set_arg("probs", lambda a, p: a["probs"] * 4 - 1.5))]


class FeatureSpecBase(Spec):
    """Shared by the feature ops: (B, K, h, w) maps or (N, K) rows with labels."""

    primary = "features"

    partners = {"features": ("labels",), "labels": ("features",)}

    def feature_params(self, draw, ov, small):
        rows = pick(draw, ov, "rows", st.booleans())
        p = dict(rows=rows, K=pick(draw, ov, "K", st.integers(1, 4 if small else 6)), C=pick(draw, ov, "C", st.integers(1, 5)))
        if rows:
            p.update(N=pick(draw, ov, "N", st.integers(1, 6 if small else 12)))
        else:
            p.update(B=pick(draw, ov, "B", st.integers(1, 2)), h=pick(draw, ov, "h", st.integers(1, 3 if small else 4)),
                     w=pick(draw, ov, "w", st.integers(1, 3 if small else 4)))
        p.update(label_setup(draw, ov, p["C"]))
        p["scale"] = pick(draw, ov, "scale", st.sampled_from([0.1, 1.0, 4.0]))
        p["seed"] = draw(st.integers(0, 2**31 - 1))
        return p

    def feature_tensors(self, p, g):
        shape = (p["N"], p["K"]) if p["rows"] else (p["B"], p["K"], p["h"], p["w"])
        lshape = (p["N"],) if p["rows"] else (p["B"], p["h"], p["w"])
        features = torch.randn(shape, generator=g) * p["scale"]
        labels = make_labels(lshape, p["C"], p["ii"], p["ldt"], p["void"], g)
        return features, labels

    def feature_zero_kinds(self, names=("features", "labels")):
        return [Kind("B=0 maps", "either", names, {"rows": False, "B": 0}), Kind("N=0 rows", "either", names, {"rows": True, "N": 0}),
                Kind("h=0", "either", names, {"rows": False, "h": 0}), Kind("K=0", "either", names + ("prototypes",), {"K": 0})]


class StatsSpec(FeatureSpecBase):
    name = "class_feature_stats"
    tensors = ("features", "labels")
    labels = ("labels",)
    floats = ("features",)
    diff = ("features",)
    outputs = ("float", "count")

    def params(self, draw, ov, small):
        return self.feature_params(draw, ov, small)

    def build(self, p):
        features, labels = self.feature_tensors(p, gen(p["seed"]))
        return dict(features=features, labels=labels, num_classes=p["C"], ignore_index=p["ii"])

    def call(self, a, backend):
        return lsr_fast.class_feature_stats(a["features"], a["labels"], a["num_classes"], ignore_index=a["ignore_index"], backend=backend)

    def oracle(self, a):
        C = effective_classes(a["labels"], a["num_classes"], a["ignore_index"])
        sums, counts = reference.class_feature_stats(a["features"], a["labels"], C, a["ignore_index"])
        return pad_rows(sums, a["num_classes"]), pad_rows(counts, a["num_classes"])

    def scalar_kinds(self):
        kinds = [Kind(f"num_classes={show(v)}", "raise", ("num_classes",), apply=set_arg("num_classes", v)) for v in (0, -1, 1.5, None, 2**64)]
        kinds.append(Kind("num_classes=2**22", "either", ("num_classes",), WIDE_MAP, set_arg("num_classes", 2**22)))
        return kinds + ignore_kinds() + backend_kinds()

    def zero_kinds(self):
        return self.feature_zero_kinds()


class WeightedStatsSpec(StatsSpec):
    """class_feature_stats with per-vector ``weights`` (the toolkit's masked average pooling and
    confidence-weighted prototypes; the weight sums become the second output). The unweighted
    op's own kinds run in StatsSpec: here the kinds of the weights, and the features' dtypes and
    layouts, the labels' void rule and empty inputs through the weighted path."""

    tensors = ("features", "labels", "weights")
    weights = ("weights",)  # finite and >= 0 (a value check), as class weights
    outputs = ("float", "float")
    partners = {"features": ("labels",), "labels": ("features",), "weights": ("labels",)}
    FEATURE_KINDS = ("dtype float16", "dtype bfloat16", "dtype float64", "channels_last", "transposed memory",
                     "stride 0 in dim 0 (expanded)")

    def target(self, backend):
        return f"public.class_feature_stats(weights=)[{backend}]"

    def params(self, draw, ov, small):
        p = self.feature_params(draw, ov, small)
        p["zeros"] = pick(draw, ov, "zeros", st.sampled_from([0.0, 0.3, 1.0]))  # share of weights exactly 0
        return p

    def build(self, p):
        g = gen(p["seed"])
        features, labels = self.feature_tensors(p, g)
        weights = torch.rand(labels.shape, generator=g) * 2
        weights = torch.where(torch.rand(labels.shape, generator=g) < p["zeros"], torch.zeros(()), weights)
        return dict(features=features, labels=labels, weights=weights, num_classes=p["C"], ignore_index=p["ii"])

    def call(self, a, backend):
        return lsr_fast.class_feature_stats(a["features"], a["labels"], a["num_classes"], weights=a["weights"],
                                            ignore_index=a["ignore_index"], backend=backend)

    def oracle(self, a):
        C = effective_classes(a["labels"], a["num_classes"], a["ignore_index"])
        sums, weight_sums = reference.class_feature_stats(a["features"], a["labels"], C, a["ignore_index"], a["weights"])
        return pad_rows(sums, a["num_classes"]), pad_rows(weight_sums, a["num_classes"])

    def keep_kind(self, kind):
        subject, _, what = kind.name.partition(": ")
        return (kind.name.startswith("weights") or kind.name == "valid input" or kind.name.startswith("every tensor on meta")
                or kind.name in self.zero_kinds_names() or (subject == "features" and what in self.FEATURE_KINDS)
                or (subject == "labels" and what.startswith("value") and (not kind.checks or "ignore_index" in what)))

    def scalar_kinds(self):
        return []

    def extra_kinds(self):
        def one_negative(a, p):
            w = a["weights"].clone()
            w.reshape(-1)[p["seed"] % max(w.numel(), 1):][:1] = -0.5
            return w

        return [Kind("weights: one negative", "raise", ("weights",), apply=set_arg("weights", one_negative)),
                Kind("weights: one negative, checks off", "shapes", ("weights",), checks=False,
                     apply=set_arg("weights", one_negative)),
                Kind("weights shape of features", "raise", ("weights",), {"rows": False},
                     set_arg("weights", lambda a, p: torch.ones(p["B"], p["K"], p["h"], p["w"]))),
                Kind("weights shape (N+1,)", "raise", ("weights",), {"rows": True},
                     set_arg("weights", lambda a, p: torch.ones(p["N"] + 1))),
                Kind("weights=list", "raise", ("weights",), {"rows": True},
                     set_arg("weights", lambda a, p: [1.0] * p["N"])),
                Kind("weights all 0", "match", ("weights",), {"zeros": 1.0}),
                Kind("weights requiring grad", "match", ("weights",),
                     apply=set_arg("weights", lambda a, p: a["weights"].clone().requires_grad_()))]


class DistancesSpec(FeatureSpecBase):
    """prototype_distances: (B, K, h, w) maps or (N, K) rows against (C, K) prototypes, both
    metrics; no backend (a GEMM and norms), so the layouts, dtypes and errors are at stake (the
    oracle sees contiguous inputs). With zero vectors or a prototype equal to a feature the
    values must be finite: the oracle fails on non-finite values from finite inputs (a NaN
    would otherwise match a NaN); the gradients' finiteness is tests/test_prototype_distances.py's."""

    name = "prototype_distances"
    tensors = ("features", "prototypes")
    floats = ("features", "prototypes")
    diff = ("features", "prototypes")
    outputs = ("float",)
    partners = {"features": ("prototypes",), "prototypes": ("features",)}
    backends = False

    def params(self, draw, ov, small):
        return dict(self.feature_params(draw, ov, small), metric=pick(draw, ov, "metric", st.sampled_from(["l2", "cosine"])))

    def build(self, p):
        g = gen(p["seed"])
        features = self.feature_tensors(p, g)[0]  # its labels are not an argument
        return dict(features=features, prototypes=torch.randn(p["C"], p["K"], generator=g) * p["scale"], metric=p["metric"])

    def classes(self, a):
        return None

    def call(self, a, backend):
        return lsr_fast.prototype_distances(a["features"], a["prototypes"], metric=a["metric"])

    def oracle(self, a):
        f, protos = a["features"], a["prototypes"]
        out = reference.prototype_distances(f, protos, a["metric"])
        if all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and bool(torch.isfinite(t).all()) for t in (f, protos)):
            # Finite inputs (zero vectors, coinciding vectors too): finite values, or the case fails
            # ("the reference raised"); a NaN would otherwise match a NaN.
            assert bool(torch.isfinite(out).all()), f"non-finite {a['metric']} values from finite inputs"
        return (out,)

    def scalar_kinds(self):
        return [Kind(f"metric={v!r}", "raise", ("metric",), apply=set_arg("metric", v)) for v in ("L2", "euclidean", "", None, 2)]

    def zero_kinds(self):
        return self.feature_zero_kinds(("features",)) + [Kind("C=0 (no prototypes)", "either", ("prototypes",), {"C": 0})]

    def extra_kinds(self):
        def zero_vector(m, p, spec):
            f = m.a["features"].clone()
            if f.numel():
                (f[0] if p["rows"] else f[0, :, 0, 0]).zero_()
            m.a["features"] = f

        def coincide(m, p, spec):
            f, protos = m.a["features"], m.a["prototypes"].clone()
            if f.numel() and protos.numel():
                protos[0] = f[0] if p["rows"] else f[0, :, 0, 0]
            m.a["prototypes"] = protos

        return [Kind("prototypes width K+1", "raise", ("prototypes",), {},
                     set_arg("prototypes", lambda a, p: torch.zeros(p["C"], p["K"] + 1))),
                Kind("prototypes 1-d (K,)", "raise", ("prototypes",), {}, set_arg("prototypes", lambda a, p: torch.zeros(p["K"]))),
                Kind("features: a zero vector", "match", ("features",), {"K": st.integers(1, 4)}, zero_vector),
                Kind("prototypes: a zero row", "match", ("prototypes",), {"C": st.integers(1, 4)},
                     set_arg("prototypes", lambda a, p: torch.cat([torch.zeros(1, p["K"]), a["prototypes"][1:]]))),
                Kind("a prototype equal to a feature", "match", ("prototypes",), {"C": st.integers(1, 4), "K": st.integers(1, 4)},
                     coincide)]


class ClusteringSpec(FeatureSpecBase):
    name = "clustering_loss"
    tensors = ("features", "labels", "prototypes", "valid")
    labels = ("labels",)
    floats = ("features", "prototypes")
    masks = ("valid",)
    diff = ("features",)
    optional = {"valid": "valid"}
    outputs = ("float",)
    partners = {"features": ("labels", "prototypes"), "labels": ("features",), "prototypes": ("features",)}

    def params(self, draw, ov, small):
        p = self.feature_params(draw, ov, small)
        valid = st.lists(st.booleans(), min_size=p["C"], max_size=p["C"])
        p["valid"] = draw(valid) if ov.get("valid") == "yes" else pick(draw, ov, "valid", st.none() | valid)
        return p

    def build(self, p):
        g = gen(p["seed"])
        features, labels = self.feature_tensors(p, g)
        prototypes = torch.randn(p["C"], p["K"], generator=g) * p["scale"]
        valid = None if p["valid"] is None else torch.tensor(p["valid"], dtype=torch.bool)
        return dict(features=features, labels=labels, prototypes=prototypes, valid=valid, ignore_index=p["ii"])

    def classes(self, a):
        return a["prototypes"].shape[0] if a["prototypes"].dim() else 0

    def call(self, a, backend):
        return lsr_fast.clustering_loss(a["features"], a["labels"], a["prototypes"], valid=a["valid"], ignore_index=a["ignore_index"], backend=backend)

    def oracle(self, a):
        return (reference.clustering_loss(a["features"], a["labels"], a["prototypes"], a["valid"], a["ignore_index"]),)

    def scalar_kinds(self):
        return ignore_kinds() + backend_kinds()

    def zero_kinds(self):
        return self.feature_zero_kinds() + [Kind("C=0 (no prototypes)", "either", ("prototypes",), {"C": 0, "void": 1.0})]

    def extra_kinds(self):
        return [Kind("valid int64", "either", ("valid",), {"valid": "yes"}, set_arg("valid", lambda a, p: a["valid"].long())),
                Kind("valid shape (C+1,)", "raise", ("valid",), {"valid": "yes"},
                     set_arg("valid", lambda a, p: torch.ones(p["C"] + 1, dtype=torch.bool))),
                Kind("prototypes width K+1", "raise", ("prototypes", "features"), {},
                     set_arg("prototypes", lambda a, p: torch.zeros(p["C"], p["K"] + 1)))]


def reference_strategy():
    return st.one_of(st.floats(0.0, 8.0), st.tuples(st.floats(0.0, 8.0), st.sampled_from(["float32", "float64"])))


def make_reference(value):
    if isinstance(value, (tuple, list)):
        return torch.tensor(value[0], dtype=getattr(torch, value[1]))
    return value


def reference_kinds(name="reference"):
    kinds = [Kind(f"{name}={v!r}", "raise", (name,), apply=set_arg(name, v)) for v in (float("nan"), float("inf"), float("-inf"), "1.0", None)]
    kinds += [Kind(f"{name}={v!r}", "match", (name,), apply=set_arg(name, v)) for v in (-1.0, 0.0, 1e6)]
    kinds += [
        Kind(f"{name}=tensor([2.0]) 1-d", "raise", (name,), apply=set_arg(name, lambda a, p: torch.tensor([2.0]))),
        Kind(f"{name}=tensor(2) int64", "either", (name,), apply=set_arg(name, lambda a, p: torch.tensor(2))),
        Kind(f"{name}=tensor(nan)", "either", (name,), apply=set_arg(name, lambda a, p: torch.tensor(float("nan")))),
        Kind(f"{name}=tensor(nan), checks off", "shapes", (name,), apply=set_arg(name, lambda a, p: torch.tensor(float("nan"))), checks=False),
        Kind(f"{name}=meta tensor", "raise", (name,), apply=set_arg(name, lambda a, p: torch.tensor(2.0, device="meta"))),
        Kind(f"{name}=tensor requiring grad", "match", (name,), apply=set_arg(name, lambda a, p: torch.tensor(2.0, requires_grad=True))),
    ]
    return kinds


def mode_kinds():
    return [Kind(f"mode={v!r}", "raise", ("mode",), apply=set_arg("mode", v)) for v in ("Source", "", None, 0)]


class NormSpec(FeatureSpecBase):
    name = "norm_alignment_loss"
    tensors = ("features",)
    floats = ("features", "reference")
    diff = ("features",)
    outputs = ("float",)

    def params(self, draw, ov, small):
        p = self.feature_params(draw, ov, small)
        p["ref"] = pick(draw, ov, "ref", reference_strategy())
        p["mode"] = pick(draw, ov, "mode", st.sampled_from(["source", "target"]))
        return p

    def build(self, p):
        features, _ = self.feature_tensors(p, gen(p["seed"]))
        return dict(features=features, reference=make_reference(p["ref"]), mode=p["mode"])

    def call(self, a, backend):
        return lsr_fast.norm_alignment_loss(a["features"], a["reference"], mode=a["mode"], backend=backend)

    def oracle(self, a):
        return (reference.norm_alignment_loss(a["features"], a["reference"], a["mode"]),)

    def scalar_kinds(self):
        return reference_kinds() + mode_kinds() + backend_kinds()

    def zero_kinds(self):
        return self.feature_zero_kinds(("features",))


class TermsSpec(FeatureSpecBase):
    name = "feature_terms"
    tensors = ("features", "labels", "prototypes")
    labels = ("labels",)
    floats = ("features", "prototypes", "reference")
    diff = ("features",)
    outputs = ("float", "count", "float", "float", "float")
    partners = ClusteringSpec.partners

    def params(self, draw, ov, small):
        p = self.feature_params(draw, ov, small)
        p["ref"] = pick(draw, ov, "ref", reference_strategy())
        p["mode"] = pick(draw, ov, "mode", st.sampled_from(["source", "target"]))
        return p

    def build(self, p):
        g = gen(p["seed"])
        features, labels = self.feature_tensors(p, g)
        prototypes = torch.randn(p["C"], p["K"], generator=g) * p["scale"]
        return dict(features=features, labels=labels, prototypes=prototypes, reference=make_reference(p["ref"]),
                    mode=p["mode"], ignore_index=p["ii"])

    def classes(self, a):
        return a["prototypes"].shape[0] if a["prototypes"].dim() else 0

    def call(self, a, backend):
        return lsr_fast.feature_terms(a["features"], a["labels"], a["prototypes"], a["reference"], mode=a["mode"],
                                      ignore_index=a["ignore_index"], backend=backend)

    def oracle(self, a):
        return reference.feature_terms(a["features"], a["labels"], a["prototypes"], a["reference"], a["mode"], a["ignore_index"])

    def scalar_kinds(self):
        return reference_kinds() + mode_kinds() + ignore_kinds() + backend_kinds()

    def zero_kinds(self):
        return self.feature_zero_kinds() + [Kind("C=0 (no prototypes)", "either", ("prototypes",), {"C": 0, "void": 1.0})]

    def extra_kinds(self):
        return [Kind("prototypes width K+1", "raise", ("prototypes", "features"), {},
                     set_arg("prototypes", lambda a, p: torch.zeros(p["C"], p["K"] + 1)))]


class MaxSquareSpec(Spec):
    primary = "probs"
    name = "maxsquare_loss"
    tensors = ("probs",)
    floats = ("probs",)
    diff = ("probs",)
    outputs = ("float",)

    def params(self, draw, ov, small):
        top = 4 if small else 6
        return dict(B=pick(draw, ov, "B", st.integers(1, 2)), C=pick(draw, ov, "C", st.integers(1, 5)),
                    H=pick(draw, ov, "H", st.integers(1, top)), W=pick(draw, ov, "W", st.integers(1, top)),
                    alpha=pick(draw, ov, "alpha", fractions()), seed=draw(st.integers(0, 2**31 - 1)))

    def build(self, p):
        logits = torch.randn(p["B"], p["C"], p["H"], p["W"], generator=gen(p["seed"])) * 3
        return dict(probs=logits.softmax(1) if p["C"] else logits, alpha=p["alpha"])

    def call(self, a, backend):
        return lsr_fast.maxsquare_loss(a["probs"], alpha=a["alpha"], backend=backend)

    def oracle(self, a):
        return (reference.maxsquare_loss(a["probs"], float(a["alpha"])),)

    def scalar_kinds(self):
        return fraction_kinds("alpha") + backend_kinds()

    def zero_kinds(self):
        return [Kind("B=0", "either", ("probs",), {"B": 0}), Kind("C=0", "either", ("probs",), {"C": 0}),
                Kind("H=0", "either", ("probs",), {"H": 0})]


class PerpSpec(Spec):
    primary = "prototypes"
    name = "perpendicularity_loss"
    tensors = ("prototypes", "present")
    floats = ("prototypes",)
    masks = ("present",)
    diff = ("prototypes",)
    optional = {"present": "present"}
    outputs = ("float",)
    backends = False

    def params(self, draw, ov, small):
        C = pick(draw, ov, "C", st.integers(1, 6))
        present = st.lists(st.booleans(), min_size=C, max_size=C)
        return dict(C=C, K=pick(draw, ov, "K", st.integers(1, 6)),
                    present=draw(present) if ov.get("present") == "yes" else pick(draw, ov, "present", st.none() | present),
                    seed=draw(st.integers(0, 2**31 - 1)))

    def build(self, p):
        prototypes = torch.randn(p["C"], p["K"], generator=gen(p["seed"]))
        present = None if p["present"] is None else torch.tensor(p["present"], dtype=torch.bool)
        return dict(prototypes=prototypes, present=present)

    def call(self, a, backend):
        return lsr_fast.perpendicularity_loss(a["prototypes"], a["present"])

    def oracle(self, a):
        return (reference.perpendicularity_loss(a["prototypes"], a["present"]),)

    def zero_kinds(self):
        return [Kind("C=0", "either", ("prototypes",), {"C": 0, "present": None}), Kind("K=0", "either", ("prototypes",), {"K": 0})]

    def extra_kinds(self):
        return [Kind("present int64", "either", ("present",), {"present": "yes"}, set_arg("present", lambda a, p: a["present"].long())),
                Kind("present shape (C+1,)", "raise", ("present",), {"present": "yes"},
                     set_arg("present", lambda a, p: torch.ones(p["C"] + 1, dtype=torch.bool)))]
