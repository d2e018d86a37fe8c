"""The issue's performance targets, and whether a benchmark result meets them.

Pure functions over the result that ``run.py --json`` writes, so ``run.py --check``
and ``report.py --check`` judge by the same table. Standard library only: the
renderer and its tests run without torch.

The targets are set for CPU at 2 threads, ratios from interleaved rounds on the
same gradients (issue 15, item 7). The fused path is the GPU candidate: its
targets are reported on every device but only checked on CUDA.

A set target is judged on the median of the per-round ratios. On two shared
CPU cores one round's ratio ranges over 0.6-1.5x (a neighbour's burst lands on
one case of the pair), so the median of 15 rounds moves by about +-6% from one
run to the next. A median over the limit therefore fails only when the rounds
show it: a one-sided sign test on the per-round ratios against the limit at
``ALPHA`` (FAIL); otherwise the verdict says so (``ABOVE_NS``) without failing
the check. A limit missed in most rounds still fails.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

COPY = "copy of the gradients"
TORCH_ADAM = "torch fused Adam (no GC)"
TORCH_SGDM = "torch fused SGDM (no GC)"
STEP = "ResNet-18 step"

PASS = "PASS"
FAIL = "FAIL"
ABOVE_NS = "above, not significant"
NOT_MEASURED = "not measured"
ALPHA = 0.05  # the sign test's level for calling a limit missed


@dataclass(frozen=True)
class Target:
    """One promise: ``case`` takes at most ``limit`` times ``reference``.

    ``scope`` "set": once per parameter set, ``case`` and ``reference`` name timed
    cases. ``scope`` "step": ``case`` names a GC share of the ResNet-18 training
    step (``share_eager``, ...) and ``limit`` is a fraction of the step.
    ``checked_on`` "cuda": a GPU target, reported elsewhere but never failed there;
    "never": reported on every device, never failed (a path at parity by design).
    """

    name: str
    case: str
    reference: str
    limit: float
    scope: str = "set"
    checked_on: str = "any"


TARGETS: tuple[Target, ...] = (
    Target(
        "native GC pass (opt.centralize_grads(), impl='native') <= 0.70x a copy of the gradients",
        "gradcent native GC pass",
        COPY,
        0.70,
    ),
    Target("native GC+Adam <= 1.00x torch fused Adam", "gradcent native Adam", TORCH_ADAM, 1.00),
    Target("native GC+SGDM <= 1.00x torch fused SGD", "gradcent native SGDM", TORCH_SGDM, 1.00),
    # The eager pass reads a gradient for its mean, then reads and writes it: the bytes
    # of a copy. It is under a copy only while the second read hits cache, which varies
    # from process to process (ResNet-50: 0.84-1.14x in seven runs of one code, BENCHMARKS.md
    # "Night"), so a <= 1.00x limit fails by chance. Reported, not checked: issue 4's
    # "GC pass <= 1.0x a copy" is checked on the native pass (<= 0.70x, above), and a
    # drift of the eager pass by 1.5x or more fails its ResNet-18 step share (below).
    Target(
        "eager GC pass <= 1.00x a copy of the gradients (parity: reported, not checked)",
        "gradcent eager GC pass",
        COPY,
        1.00,
        checked_on="never",
    ),
    Target(
        "fused GC+Adam <= 1.10x torch fused Adam (GPU target)",
        "gradcent fused Adam",
        TORCH_ADAM,
        1.10,
        checked_on="cuda",
    ),
    Target(
        "fused GC+SGDM <= 1.10x torch fused SGD (GPU target)",
        "gradcent fused SGDM",
        TORCH_SGDM,
        1.10,
        checked_on="cuda",
    ),
    Target("GC share of a ResNet-18 step <= 0.3%, eager GC pass", "share_eager", "", 0.003, "step"),
    Target("GC share of a ResNet-18 step <= 0.3%, native step", "share_native", "", 0.003, "step"),
    Target(
        "GC share of a ResNet-18 step <= 0.3%, fused step (GPU target)",
        "share_fused",
        "",
        0.003,
        "step",
        "cuda",
    ),
)


@dataclass(frozen=True)
class Verdict:
    """A target judged on one parameter set (or the step): value shown and status."""

    target: str
    where: str
    measured: str
    status: str


def lookup(values: dict, case: str):
    """The entry of ``case`` (a median, or its rounds), also under the name older results gave it.

    Results written before the fused strategies were dropped call the fused
    step "gradcent fused Adam [per_param]".
    """
    for name in (case, f"{case} [per_param]"):
        if name in values:
            return values[name]
    return None


def paired_rounds(res: dict, case: str, reference: str) -> list[float] | None:
    """``case``'s time over ``reference``'s in each round both were timed in; None if not kept."""
    rounds = res.get("samples_s") or {}
    a, b = lookup(rounds, case), lookup(rounds, reference)
    if a and b and len(a) == len(b):
        return [x / y for x, y in zip(a, b, strict=True)]
    return None


def ratio(res: dict, case: str, reference: str) -> float | None:
    """``case``'s time over ``reference``'s on one parameter set, None where either did not run.

    The median over rounds of the two cases' ratio in the same round, when the
    result kept every round (``samples_s``; the two were timed in the same
    rounds): a slow round slows both, and its ratio stays. Older results, with
    medians only: the ratio of the medians.
    """
    paired = paired_rounds(res, case, reference)
    if paired:
        return statistics.median(paired)
    med = res.get("median_s") or {}
    value, ref = lookup(med, case), lookup(med, reference)
    return None if value is None or not ref else value / ref


def sign_test_above(ratios: list[float], limit: float) -> tuple[int, int, float]:
    """How strongly the rounds say the true ratio is above ``limit``.

    Args:
        ratios: per-round ratios of one case to its reference.
        limit: the target's limit.

    Returns:
        ``(above, n, p)``: rounds above the limit, rounds not equal to it, and the
        one-sided p-value P(X >= above) for X ~ Binomial(n, 1/2), the chance of so
        many rounds above if the median ratio were at the limit.

    References:
        Conover, Practical Nonparametric Statistics (3rd ed., 1999), §3.4, the sign test.
    """
    above = sum(r > limit for r in ratios)
    n = sum(r != limit for r in ratios)
    p = sum(math.comb(n, k) for k in range(above, n + 1)) / 2**n
    return above, n, p


def status_of(met: bool, target: Target, device: str, shown: bool = True) -> str:
    """PASS/FAIL where the target is checked on ``device``, else a reported-only note.

    ``shown`` False: missed by the median but not by the sign test (``ABOVE_NS``).
    """
    if target.checked_on == "never":
        return f"{'met' if met else 'missed'}; reported, not checked"
    if target.checked_on == "any" or device.startswith(target.checked_on):
        return PASS if met else (FAIL if shown else ABOVE_NS)
    return f"{'met' if met else 'missed'}; not checked on {device} ({target.checked_on} only)"


def _judge_set(target: Target, where: str, res: dict, device: str) -> Verdict:
    paired = paired_rounds(res, target.case, target.reference)
    value = statistics.median(paired) if paired else ratio(res, target.case, target.reference)
    if value is None:
        return Verdict(target.name, where, "", NOT_MEASURED)
    value = round(value, 3)  # judged as shown: "0.700x" passes "<= 0.70x"
    measured, met, shown = f"{value:.3f}x", value <= target.limit, True
    if not met and paired:
        above, n, p = sign_test_above(paired, target.limit)
        measured += f" ({above} of {n} rounds above, p = {p:.3f})"
        shown = p < ALPHA
    return Verdict(target.name, where, measured, status_of(met, target, device, shown))


def _judge_step(target: Target, step: dict | None, device: str) -> Verdict:
    share = (step or {}).get(target.case)
    if share is None:
        return Verdict(target.name, STEP, "", NOT_MEASURED)
    share = round(share, 5)  # judged as shown, to 0.001%
    return Verdict(
        target.name, STEP, f"{share:.3%}", status_of(share <= target.limit, target, device)
    )


def evaluate(result: dict, targets: tuple[Target, ...] = TARGETS) -> list[Verdict]:
    """Every target judged on a benchmark result, in table order.

    Args:
        result: what ``run.py --json`` writes: ``device``, ``sets`` (label ->
            ``median_s`` and, since 2026-12-02, ``samples_s``: every round) and
            ``resnet18_step`` (None when not run).
        targets: the table to judge by.

    Returns:
        One verdict per target and parameter set (per target for the step);
        "not measured" where a case did not run.
    """
    device = result.get("device", "cpu")
    sets = result.get("sets") or {}
    out = []
    for target in targets:
        if target.scope == "step":
            out.append(_judge_step(target, result.get("resnet18_step"), device))
        elif not sets:
            out.append(Verdict(target.name, "no parameter set run", "", NOT_MEASURED))
        else:
            for label, res in sets.items():
                out.append(_judge_set(target, label, res, device))
    return out


def failures(verdicts: list[Verdict]) -> list[Verdict]:
    """The verdicts that fail a check (missed where checked)."""
    return [v for v in verdicts if v.status == FAIL]
