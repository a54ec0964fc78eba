"""Value checks whose verdicts stay on the device until asked: no host read inside a step.

The ops' value checks (label range, finiteness, signs of weights) need the tensors' values. Read
at once, each is a device-to-host copy, a synchronisation on a GPU: one LSR training step made
about 16 of them. Inside ``with checks:`` (a :class:`DeferredChecks`) the same checks read
nothing: each computes its verdict on the device (a flag, and the offending value for labels)
and folds it in place into flags kept by ``checks``. ``checks.raise_if_failed()`` reads every
flag in one copy per device and raises :class:`ValueCheckError` with the check's own message,
the step it first failed at and, for labels, a value that failed. The trainer reads at its log
steps and before every checkpoint; LSRRegularizer reads every ``check_every`` training calls and
before its state_dict is taken (so no checkpoint holds state computed from a failed step).

Until the read, the ops run on: the kernels treat an out-of-range label as void (in every
backend) and a NaN propagates to the loss. The flags are updated in place, so a step captured
in a CUDA graph replays its checks too (with the step label of the capture).
"""

from __future__ import annotations

import contextlib
import re
from typing import Dict, List, Optional

import torch

# The DeferredChecks that value checks report to, innermost last; empty: checks read at once.
_active: List["DeferredChecks"] = []
# Renames of op arguments to the caller's names (see named_as), innermost last.
_names: List[Dict[str, str]] = []


class ValueCheckError(ValueError):
    """A value check that failed, read after the fact: ``check`` (the kind: "labels",
    "finite", "weights", "positive"), ``argument`` (the name checked), ``step`` (the step it
    first failed at, or None when no step was set) and the message the check gives at once,
    followed by where it failed."""

    def __init__(self, message: str, *, check: str, argument: str, step: Optional[int]):
        super().__init__(message)
        self.check, self.argument, self.step = check, argument, step


class _Verdict:
    """One check's device flags, all int64 so one copy reads them: failed (0/1), the first
    failing step (-1: none set) and value (a label, or a float's bits)."""

    __slots__ = ("check", "argument", "message", "float_value", "flags", "order")

    def __init__(self, check, argument, message, float_value, device, order):
        self.check, self.argument, self.message = check, argument, message
        self.float_value, self.order = float_value, order
        self.flags = torch.zeros(3, dtype=torch.int64, device=device)  # made on the device: no copy
        self.flags[1].fill_(-1)


class DeferredChecks:
    """Collects the verdicts of value checks run inside ``with self:`` without reading them.

    ``step`` (an int, or None) labels the verdicts recorded from then on. ``errors()`` reads
    every flag (one copy per device) and returns a ValueCheckError per failed check, earliest
    step first; ``raise_if_failed()`` raises the first and forgets them all; ``clear()`` forgets
    them without reading; ``failed_count(device)`` is the number of failed checks as an int32
    device tensor (for an all-reduce before the read, so every rank raises together).
    """

    def __init__(self):
        self.step: Optional[int] = None
        self._verdicts: Dict[tuple, _Verdict] = {}

    def __enter__(self) -> "DeferredChecks":
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)

    def record(self, check: str, argument: str, message: str, bad: torch.Tensor,
               value: Optional[torch.Tensor] = None) -> None:
        """Fold one verdict in: ``bad`` a 0-dim bool device tensor, ``value`` (optional, 0-dim)
        what failed; ``message`` the check's text with ``{value}`` where the value goes."""
        argument, message = _renamed(argument), _renamed(message)
        float_value = value is not None and value.dtype.is_floating_point
        key = (check, message, bad.device, float_value)
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self._verdicts[key] = _Verdict(check, argument, message, float_value, bad.device, len(self._verdicts))
        if value is None:
            value = torch.zeros((), dtype=torch.int64, device=bad.device)
        elif float_value:
            value = value.detach().to(torch.float64).view(torch.int64)
        step = -1 if self.step is None else self.step
        new = torch.stack([torch.ones((), dtype=torch.int64, device=bad.device), value.new_full((), step), value.long()])
        first = bad & (verdict.flags[0] == 0)
        verdict.flags.copy_(torch.where(first, new, verdict.flags))

    def failed_count(self, device) -> torch.Tensor:
        """How many checks failed on ``device`` (int32, 0-dim, on ``device``); reads nothing."""
        flags = [v.flags[0] for v in self._verdicts.values() if v.flags.device == torch.device(device)]
        if not flags:
            return torch.zeros((), dtype=torch.int32, device=device)
        return torch.stack(flags).sum(dtype=torch.int32)

    def errors(self) -> List[ValueCheckError]:
        by_device: Dict[torch.device, List[_Verdict]] = {}
        for verdict in self._verdicts.values():
            by_device.setdefault(verdict.flags.device, []).append(verdict)
        found = []
        for verdicts in by_device.values():
            rows = torch.stack([v.flags for v in verdicts]).cpu()  # the one read per device
            for verdict, (failed, step, value) in zip(verdicts, rows):
                if failed:
                    shown = value.view(torch.float64).item() if verdict.float_value else int(value)
                    found.append((int(step) if step >= 0 else None, verdict, shown))
        found.sort(key=lambda item: (item[0] is None, item[0] or 0, item[1].order))
        return [_error(step, verdict, value) for step, verdict, value in found]

    def raise_if_failed(self, failed_elsewhere: str = "") -> None:
        """Raise the earliest failure (naming the others), and forget them all. Without a local
        failure, a non-empty ``failed_elsewhere`` (what a caller learnt from other ranks) is
        raised as the error, so every rank raises at the same read."""
        errors = self.errors()
        if not errors and failed_elsewhere:
            raise ValueCheckError(failed_elsewhere, check="other rank", argument="", step=None)
        if errors:
            self.clear()
            first = errors[0]
            if len(errors) > 1:
                others = "; ".join(str(e) for e in errors[1:])
                raise ValueCheckError(f"{first} (and {len(errors) - 1} more: {others})", check=first.check,
                                      argument=first.argument, step=first.step)
            raise first

    def clear(self) -> None:
        self._verdicts.clear()


def _error(step: Optional[int], verdict: _Verdict, value) -> ValueCheckError:
    message = verdict.message.format(value=value)
    where = f"first failed at step {step}" if step is not None else "deferred check"
    return ValueCheckError(f"{message} ({where})", check=verdict.check, argument=verdict.argument, step=step)


def active() -> Optional[DeferredChecks]:
    """The DeferredChecks value checks report to now, or None (they read at once)."""
    return _active[-1] if _active else None


@contextlib.contextmanager
def named_as(**names):
    """Inside the block, op arguments carry the caller's names: in an op's TypeError/ValueError
    raised at once ("labels contains the value 7" -> "source_labels contains the value 7") and
    in the verdicts of deferred checks. The ops name their own arguments, which are ambiguous
    when a caller passes two domains through one op."""
    _names.append(names)
    try:
        yield
    except (TypeError, ValueError) as error:
        if isinstance(error, ValueCheckError):
            raise
        raise type(error)(_rename(str(error), names)) from error
    finally:
        _names.pop()


def _renamed(text: str) -> str:
    for names in reversed(_names):
        text = _rename(text, names)
    return text


def _rename(text: str, names: Dict[str, str]) -> str:
    for inner, outer in names.items():
        text = re.sub(rf"\b{inner}\b", outer, text)
    return text
