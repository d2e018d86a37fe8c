"""GC's cost beside torch's best optimizers, side by side on the same gradients.

One command (``make bench``)::

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--repeats N]
                             [--sets resnet50,transformer] [--json PATH]
                             [--fresh-cache] [--foreach]

For each parameter set (ResNet-50, 25.6M; a 24-layer d=1024 transformer, 355M)
it times, interleaved round by round on the same parameters and gradients:
torch's fused Adam and fused SGD momentum without GC; the official repo's
per-parameter GC loop, then torch's step; ``pytorch_optimizer.centralize_gradient``,
then torch's step; gradcent's eager path (GC pass, then torch's fused step);
gradcent's fused step; gradcent's blocked step (``impl="blocked"``); gradcent's
native step (``impl="native"``, CPU only); the GC passes alone (row-blocked and
unblocked torch ops; the native kernel) and a plain copy of the gradients.
Then GC's share of a CIFAR ResNet-18 training step (batch 128, 32x32). It prints
medians, ratios and which of the issue's targets are met.

All the Adam cases share one optimizer state (and all the SGD cases another),
so the 355M set needs params + grads + two Adam states + one copy (~8.5 GB fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable

import paramsets
import torch
from pytorch_optimizer import centralize_gradient
from timing import measure, time_once
from torch import nn

import gradcent
from gradcent.experiments.models import cifar_resnet

LR = 1e-3
TARGETS = {
    "fused GC+Adam <= 1.10x torch fused Adam": 1.10,
    "fused GC+SGDM <= 1.10x torch SGDM": 1.10,
    "eager GC pass <= 1.0x a copy of the gradients": 1.0,
    "GC share of a ResNet-18 step <= 0.3%": 0.003,
    "per-parameter cost linear between the sets (within 10%)": 0.10,
}


def official_gc(grads: list[torch.Tensor]) -> None:
    """The GC loop of the paper's code (Yong et al., GitHub), per parameter."""
    for g in grads:
        if g.dim() > 1:
            g.add_(-g.mean(dim=tuple(range(1, g.dim())), keepdim=True))


def _opt_cases(params, kind: str, device: str, strategies: list[str]):
    """Step cases of one optimizer family, sharing one state; and first-step times."""
    grads = [p.grad for p in params]
    if kind == "adam":
        base = torch.optim.Adam(params, lr=LR, fused=True)
        eager = gradcent.Adam(params, lr=LR, fused=True)
        fused = {s: gradcent.Adam(params, lr=LR, impl="fused") for s in strategies}
        blocked = gradcent.Adam(params, lr=LR, impl="blocked")
        native = gradcent.Adam(params, lr=LR, impl="native") if device == "cpu" else None
    else:
        base = torch.optim.SGD(params, lr=LR, momentum=0.9, fused=True)
        eager = gradcent.SGD(params, lr=LR, momentum=0.9, fused=True)
        fused = {s: gradcent.SGD(params, lr=LR, momentum=0.9, impl="fused") for s in strategies}
        blocked = gradcent.SGD(params, lr=LR, momentum=0.9, impl="blocked")
        native = (
            gradcent.SGD(params, lr=LR, momentum=0.9, impl="native") if device == "cpu" else None
        )
    for strategy, opt in fused.items():
        opt.fused_strategy = strategy
    base.step()  # create the shared state
    for opt in (eager, blocked, native, *fused.values()):
        if opt is not None:
            opt.state = base.state
    first = {}
    for strategy, opt in fused.items():
        first[strategy] = time_once(opt.step, device)
    name = "Adam" if kind == "adam" else "SGDM"
    cases: dict[str, Callable[[], object]] = {
        f"torch fused {name} (no GC)": base.step,
        f"official GC loop + torch {name}": lambda: (official_gc(grads), base.step()),
        f"pytorch_optimizer GC + torch {name}": lambda: (centralize_gradient(grads), base.step()),
        f"gradcent eager + torch {name}": eager.step,
        f"gradcent blocked {name}": blocked.step,
    }
    if native is not None:
        cases[f"gradcent native {name}"] = native.step
    for strategy, opt in fused.items():
        cases[f"gradcent fused {name} [{strategy}]"] = opt.step
    return cases, first


def _pass_cases(params, device: str) -> dict[str, Callable[[], object]]:
    """The GC passes alone, and the copy they are measured against."""
    grads = [p.grad for p in params]
    copies = [torch.empty_like(g) for g in grads]
    holder = gradcent.SGD(params, lr=LR)
    cases = {
        "copy of the gradients": lambda: torch._foreach_copy_(copies, grads),
        "official GC pass": lambda: official_gc(grads),
        "pytorch_optimizer GC pass": lambda: centralize_gradient(grads),
        "gradcent eager GC pass": holder.centralize_grads,
        "gradcent eager GC pass, unblocked": lambda: _unblocked(holder.centralize_grads),
    }
    if device == "cpu":
        # What centralize_grads() runs for an impl="native" optimizer: one kernel call.
        nat = gradcent.SGD(params, lr=LR, impl="native")
        cases["gradcent native GC pass"] = nat.centralize_grads
    return cases


def _unblocked(fn: Callable[[], object]) -> None:
    """Run ``fn`` with gradcent.core's row blocking switched off (the old pass)."""
    import gradcent.core as core

    saved, core.BLOCK_BYTES = core.BLOCK_BYTES, 1 << 62
    try:
        fn()
    finally:
        core.BLOCK_BYTES = saved


def bench_set(label: str, shapes, device: str, repeats: int, strategies: list[str]) -> dict:
    """All step and pass cases on one parameter set."""
    n = paramsets.count(shapes)
    params = paramsets.materialize(shapes, device)
    out: dict = {"params": n, "tensors": len(shapes), "first_step_s": {}, "median_s": {}}
    for kind in ("adam", "sgd"):
        cases, first = _opt_cases(params, kind, device, strategies)
        out["first_step_s"].update({f"{kind} [{s}]": t for s, t in first.items()})
        out["median_s"].update(measure(cases, device, repeats))
        del cases
    out["median_s"].update(measure(_pass_cases(params, device), device, repeats))
    _print_table(f"{label}: {n / 1e6:.1f}M parameters in {len(shapes)} tensors", out["median_s"])
    for key, t in out["first_step_s"].items():
        print(f"  first fused step (compile included) {key}: {t:.2f} s")
    del params
    return out


def bench_resnet18(device: str, batch: int, repeats: int) -> dict:
    """GC's share of a full CIFAR ResNet-18 training step (SGD momentum)."""
    torch.manual_seed(0)
    model = cifar_resnet(18, 10).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    eager = gradcent.SGD(model.parameters(), lr=0.1, momentum=0.9, model=model)
    fused = gradcent.SGD(model.parameters(), lr=0.1, momentum=0.9, model=model, impl="fused")
    cpu = device == "cpu"
    native = (
        gradcent.SGD(model.parameters(), lr=0.1, momentum=0.9, model=model, impl="native")
        if cpu
        else None
    )
    loss_fn = nn.CrossEntropyLoss()

    def train_step() -> None:
        base.zero_grad()
        loss_fn(model(x), y).backward()
        base.step()

    train_step()
    fused.state = base.state
    fused.step()  # compile outside the timing
    cases = {
        "full training step (torch SGDM)": train_step,
        "torch fused SGDM step": base.step,
        "gradcent fused SGDM step": fused.step,
        "gradcent eager GC pass": eager.centralize_grads,
    }
    if native is not None:
        native.state = base.state
        cases["gradcent native SGDM step"] = native.step
    med = measure(cases, device, repeats)
    full = med["full training step (torch SGDM)"]
    out = {"batch": batch, "median_s": med, "share_eager": med["gradcent eager GC pass"] / full}
    for which in ("fused", "native"):
        key = f"gradcent {which} SGDM step"
        if key in med:
            extra = med[key] - med["torch fused SGDM step"]
            out[f"share_{which}"] = max(extra, 0.0) / full
    _print_table(f"CIFAR ResNet-18 training step, batch {batch}", med)
    shares = ", ".join(f"{k[6:]} {v:.3%}" for k, v in out.items() if k.startswith("share_"))
    print(f"  GC share of the step (a GC pass, or a GC step's extra time): {shares}")
    return out


def _print_table(title: str, med: dict[str, float]) -> None:
    print(f"\n{title}")
    base_adam = med.get("torch fused Adam (no GC)")
    base_sgd = med.get("torch fused SGDM (no GC)")
    base_copy = med.get("copy of the gradients")
    for name, t in med.items():
        ref = base_adam if "Adam" in name else base_sgd if "SGDM" in name else base_copy
        ratio = f"{t / ref:6.2f}x" if ref else ""
        print(f"  {name:<44} {t * 1e3:10.2f} ms  {ratio}")


def _paths(m: dict[str, float], strategy: str, key: str) -> dict[str, str]:
    """The GC step cases of one family ("Adam"/"SGDM") that ran: path -> case name."""
    names = {
        "fused": f"gradcent fused {key} [{strategy}]",
        "blocked": f"gradcent blocked {key}",
        "native": f"gradcent native {key}",
    }
    return {path: name for path, name in names.items() if name in m}


def targets(sets: dict[str, dict], step: dict | None, strategy: str) -> dict[str, tuple]:
    """(value, met) for each target of the issue and each fast path, from the medians.

    ``met`` is None for reference lines (torch's own per-parameter cost).
    """
    out: dict[str, tuple] = {}
    names = list(TARGETS)
    for label, res in sets.items():
        m = res["median_s"]
        for i, key in enumerate(("Adam", "SGDM")):
            for path, case in _paths(m, strategy, key).items():
                r = m[case] / m[f"torch fused {key} (no GC)"]
                name = names[i].replace("fused GC", f"{path} GC")
                out[f"{name} [{label}]"] = (f"{r:.3f}x", r <= TARGETS[names[i]])
        for case in ("gradcent eager GC pass", "gradcent native GC pass"):
            if case in m:
                r = m[case] / m["copy of the gradients"]
                name = names[2].replace("eager", case.split()[1])
                out[f"{name} [{label}]"] = (f"{r:.3f}x", r <= TARGETS[names[2]])
    if step is not None:
        for which in ("eager", "fused", "native"):
            share = step.get(f"share_{which}")
            if share is not None:
                out[f"{names[3]} [{which}]"] = (f"{share:.3%}", share <= TARGETS[names[3]])
    if len(sets) == 2:
        (la, a), (lb, b) = sets.items()
        paths = _paths(a["median_s"], strategy, "Adam")
        paths["torch (reference, no GC)"] = "torch fused Adam (no GC)"
        for path, key in paths.items():
            if key not in b["median_s"]:
                continue
            per_a, per_b = a["median_s"][key] / a["params"], b["median_s"][key] / b["params"]
            dev = per_b / per_a - 1
            name = f"{names[4]}, {path} Adam"
            # torch's own step shows what the machine does to per-parameter cost.
            met = None if path.startswith("torch") else abs(dev) <= TARGETS[names[4]]
            out[f"{name} [{lb} vs {la}]"] = (f"{dev:+.1%}", met)
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per case")
    ap.add_argument("--sets", default="resnet50,transformer", help="parameter sets to run")
    ap.add_argument("--no-step", action="store_true", help="skip the ResNet-18 training step")
    ap.add_argument("--step-repeats", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--fresh-cache", action="store_true", help="cold Inductor cache")
    ap.add_argument("--foreach", action="store_true", help="also time the foreach strategy")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the suite and print the tables and targets."""
    args = parse(argv)
    if args.fresh_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gradcent-inductor-")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    repeats = args.repeats or (2 if args.quick else 20 if cuda else 7)
    step_repeats = args.step_repeats or (1 if args.quick else 20 if cuda else 3)
    strategies = ["per_param"] + (["foreach"] if args.foreach else [])
    available = {
        "resnet50": ("ResNet-50", paramsets.resnet50_shapes),
        "transformer": ("transformer 24x1024", paramsets.transformer_shapes),
    }
    if args.quick:
        available = {
            "resnet50": ("small conv set", paramsets.quick_shapes),
            "transformer": (
                "small transformer",
                lambda: paramsets.transformer_shapes(layers=2, d=64, vocab=1000, context=64),
            ),
        }
    print(
        f"gradcent benchmark: torch {torch.__version__}, device {args.device}, "
        f"{torch.get_num_threads()} threads, {repeats} rounds, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    sets = {}
    for key in args.sets.split(","):
        label, shapes = available[key]
        sets[label] = bench_set(label, shapes(), args.device, repeats, strategies)
    step = None
    if not args.no_step:
        step = bench_resnet18(args.device, 4 if args.quick else 128, step_repeats)
    met = targets(sets, step, "per_param")
    print("\nTargets (issue #4):")
    for name, (value, ok) in met.items():
        print(f"  [{'info' if ok is None else 'met' if ok else 'NOT met'}] {name}: {value}")
    result = {"device": args.device, "torch": torch.__version__, "quick": args.quick}
    result.update({"sets": sets, "resnet18_step": step, "targets": met})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
