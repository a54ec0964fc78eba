"""The fuzzer behind tests/test_fuzz.py: malformed and adversarial calls of every public op and
every raw ``torch.ops.lsr_fast.*`` entry point, checked against the contract below.

Run by tests/test_fuzz.py, one child process per group (so a segfault or an abort is a failed
test that shows the case, not the end of the pytest run), or by hand:

    python tests/fuzz_cases.py --group raw                 # one group, in a watched child
    python tests/fuzz_cases.py --group raw --unit 'raw.hist_downsample | threshold=nan'
    LSR_FAST_HYPOTHESIS_PROFILE=long python tests/fuzz_cases.py --group public-cpp

THE CONTRACT. Every call either raises an error whose message names the offending argument
(ValueError/TypeError from the public API; RuntimeError, ValueError or TypeError from a raw op),
or returns what lsr_fast.reference returns on the same input: integer outputs bit for bit,
float outputs (and the gradients reaching the inputs through autograd, for a stride-0 input
the gradient of the un-expanded leaf) within TOLERANCES of the input's dtype. Which of the two
a case must do is written next to each kind of case in ``kinds()``:

- "match":  must return the reference's result (valid input in a documented layout);
- "raise":  must raise, naming one of the listed arguments (bad dtype, rank, shape, device,
            out-of-range or NaN scalar, meta tensor given to a public op);
- "either": raise naming the argument, or match the reference (a dtype, layout or size the
            docs leave open: int16 labels, stride-0 or overlapping views, empty dimensions...);
- "shapes": no crash; outputs (and gradients) have the reference's shapes and dtypes
            (NaN inputs with the value checks off), or an error naming the argument;
- "meta":   raw op with every tensor on the meta device: meta outputs of the reference's
            shapes and dtypes (shape propagation), or an error naming an argument.

On top of the declared kind, the values decide (``value_rules``): a label outside [0, C) that
is not ignore_index, or a NaN/inf in features, probabilities, prototypes or the norm reference,
makes a public op with the value checks on (the default) "raise" (naming that tensor). With
``lsr_fast.value_checks(False)``, and always in the raw ops, such a label counts as void: the
case is compared with the reference on labels where it is replaced by ignore_index. NaN/inf
without the checks (and in a raw op) is "shapes"; class weights that are NaN, inf or negative
make raw ops (and checked public ops) "raise" naming class_weights. Every case must also finish
within SLOW_CASE_S; the parent kills a child whose case runs past CASE_LIMIT_S and reports it.

Profiles (LSR_FAST_HYPOTHESIS_PROFILE, as in tests/test_properties.py): "ci" (default) runs a
few derandomized examples per unit (a unit is one target x one kind of case; every kind runs
in every run), no shrinking; "long" runs many more from a random seed (printed, and taken from
LSR_FAST_FUZZ_SEED when set), with shrinking.

Layout of the package (tests/fuzz/), in the order a case flows through it:

    config.py        groups, time/memory limits, examples per unit of each profile
    runner.py        parent side: run_group, one watched child process per group
    values.py        tolerances, Expect/Mutated/Kind, value and tensor generators, describing values
    spec_base.py     the Spec base class and the scalar kinds the specs share
    public_specs.py  specs of the public ops
    metric_specs.py  specs of the metrics and of LSRRegularizer's forward
    raw_specs.py     specs of the raw torch.ops.lsr_fast.* entry points
    kinds.py         kinds of cases generated from a spec's roles
    checking.py      running and checking one case against the reference
    child.py         units, the child's hypothesis loop, the CLI (main)

tests/fuzz_cases.py is the script a child process runs (and the one a report's replay command names).
"""

from .config import CASE_LIMIT_S, GROUPS, SLOW_CASE_S
from .runner import run_group

__all__ = ["CASE_LIMIT_S", "GROUPS", "SLOW_CASE_S", "run_group"]
