"""GC's cost beside torch's best optimizers, side by side on the same gradients.

One command (``make bench``)::

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--repeats N] [--threads N]
                             [--sets resnet50,transformer] [--no-step] [--json PATH]
                             [--fresh-cache] [--check]

For each parameter set (ResNet-50, 25.6M; a 24-layer d=1024 transformer, 355M)
it times, interleaved round by round on the same parameters and gradients:
torch's fused Adam and fused SGD momentum without GC; the official repo's
per-parameter GC loop, then torch's step; ``pytorch_optimizer.centralize_gradient``,
then torch's step (when installed); gradcent's eager path (``impl="default"``: GC
pass, then torch's fused step); gradcent's fused step (``impl="fused"``); gradcent's
native step (``impl="native"``, CPU only); the GC passes alone (``opt.centralize_grads()``
of the default and native paths) and a plain copy of the gradients. Then GC's share of a
CIFAR ResNet-18 training step (batch 128, 32x32). It prints medians, ratios and the
targets of ``targets.py``; ``--check`` exits 1 when one is missed.
``report.py`` renders the ``--json`` file as markdown tables.

All the Adam cases share one optimizer state (and all the SGD cases another),
so the 355M set needs params + grads + two Adam states + one copy (~8.5 GB fp32).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable

import paramsets
import torch
from report import check_report, reference_of
from targets import evaluate, ratio
from timing import measure, measure_rounds, medians, time_once
from torch import nn

import gradcent
from gradcent.experiments.models import cifar_resnet

try:
    from pytorch_optimizer import centralize_gradient
except ImportError:  # a lent GPU's image may lack it: its cases are left out
    centralize_gradient = None

LR = 1e-3


def official_gc(grads: list[torch.Tensor]) -> None:
    """The GC loop of the paper's code (Yong et al., GitHub), per parameter."""
    for g in grads:
        if g.dim() > 1:
            g.add_(-g.mean(dim=tuple(range(1, g.dim())), keepdim=True))


def _opt_cases(params, kind: str, device: str) -> tuple[dict[str, Callable[[], object]], float]:
    """Step cases of one optimizer family, sharing one state; and the first fused step's time."""
    grads = [p.grad for p in params]
    impls = ("fused", "native") if device == "cpu" else ("fused",)  # native: a CPU kernel
    if kind == "adam":
        base = torch.optim.Adam(params, lr=LR, fused=True)
        make = functools.partial(gradcent.Adam, params, lr=LR)
    else:
        base = torch.optim.SGD(params, lr=LR, momentum=0.9, fused=True)
        make = functools.partial(gradcent.SGD, params, lr=LR, momentum=0.9)
    eager = make(fused=True)
    opts = {impl: make(impl=impl) for impl in impls}
    base.step()  # create the shared state
    for opt in (eager, *opts.values()):
        opt.state = base.state
    first = time_once(opts["fused"].step, device)
    name = "Adam" if kind == "adam" else "SGDM"
    cases: dict[str, Callable[[], object]] = {
        f"torch fused {name} (no GC)": base.step,
        f"official GC loop + torch {name}": lambda: (official_gc(grads), base.step()),
    }
    if centralize_gradient is not None:
        cases[f"pytorch_optimizer GC + torch {name}"] = lambda: (
            centralize_gradient(grads),
            base.step(),
        )
    cases[f"gradcent eager + torch {name}"] = eager.step
    for impl, opt in opts.items():
        cases[f"gradcent {impl} {name}"] = opt.step
    return cases, first


def _pass_cases(params, device: str) -> dict[str, Callable[[], object]]:
    """The GC passes alone, and the copy they are measured against."""
    grads = [p.grad for p in params]
    copies = [torch.empty_like(g) for g in grads]
    holder = gradcent.SGD(params, lr=LR)
    cases = {
        "copy of the gradients": lambda: torch._foreach_copy_(copies, grads),
        "official GC pass": lambda: official_gc(grads),
    }
    if centralize_gradient is not None:
        cases["pytorch_optimizer GC pass"] = lambda: centralize_gradient(grads)
    cases["gradcent eager GC pass"] = holder.centralize_grads
    if device == "cpu":
        # What centralize_grads() runs for an impl="native" optimizer: one kernel call.
        nat = gradcent.SGD(params, lr=LR, impl="native")
        cases["gradcent native GC pass"] = nat.centralize_grads
    return cases


def bench_set(label: str, shapes, device: str, repeats: int) -> dict:
    """All step and pass cases on one parameter set."""
    n = paramsets.count(shapes)
    params = paramsets.materialize(shapes, device)
    out: dict = {"params": n, "tensors": len(shapes), "first_step_s": {}, "samples_s": {}}
    for kind in ("adam", "sgd"):
        cases, first = _opt_cases(params, kind, device)
        out["first_step_s"][kind] = first
        out["samples_s"].update(measure_rounds(cases, device, repeats))
        del cases
    out["samples_s"].update(measure_rounds(_pass_cases(params, device), device, repeats))
    out["median_s"] = medians(out["samples_s"])
    _print_table(f"{label}: {n / 1e6:.1f}M parameters in {len(shapes)} tensors", out)
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
    _print_table(f"CIFAR ResNet-18 training step, batch {batch}", {"median_s": med})
    shares = ", ".join(f"{k[6:]} {v:.3%}" for k, v in out.items() if k.startswith("share_"))
    print(f"  GC share of the step (a GC pass, or a GC step's extra time): {shares}")
    return out


def _print_table(title: str, res: dict) -> None:
    """Median ms of each case and its ratio to its reference (paired by round where kept)."""
    print(f"\n{title}")
    for name, t in res["median_s"].items():
        value = ratio(res, name, reference_of(name))
        shown = "" if value is None else f"{value:6.2f}x"
        print(f"  {name:<44} {t * 1e3:10.2f} ms  {shown}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per case")
    ap.add_argument("--sets", default="resnet50,transformer", help="parameter sets to run")
    ap.add_argument("--no-step", action="store_true", help="skip the ResNet-18 training step")
    ap.add_argument("--step-repeats", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here (report.py reads it)")
    ap.add_argument("--fresh-cache", action="store_true", help="cold Inductor cache")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Run the suite, print the tables; the result that --json writes."""
    if args.fresh_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gradcent-inductor-")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    repeats = args.repeats or (2 if args.quick else 20 if cuda else 15)
    step_repeats = args.step_repeats or (1 if args.quick else 20 if cuda else 3)
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
    date = time.strftime("%Y-%m-%d %H:%M")
    print(
        f"gradcent benchmark: torch {torch.__version__}, device {args.device}, "
        f"{torch.get_num_threads()} threads, {repeats} rounds, {date}"
    )
    if centralize_gradient is None:
        print("  (pytorch_optimizer is not installed: its cases are not run)")
    result = {"device": args.device, "torch": torch.__version__, "quick": args.quick}
    result.update({"threads": torch.get_num_threads(), "repeats": repeats, "date": date})
    result["sets"] = {}
    for key in args.sets.split(","):
        label, shapes = available[key]
        result["sets"][label] = bench_set(label, shapes(), args.device, repeats)
    result["resnet18_step"] = None
    if not args.no_step:
        result["resnet18_step"] = bench_resnet18(
            args.device, 4 if args.quick else 128, step_repeats
        )
    return result


def print_targets(verdicts: list, device: str) -> None:
    """One line per target and set: PASS, FAIL, not measured, or reported only."""
    print(f"\nTargets (benchmarks/targets.py; set for CPU at 2 threads; device {device}):")
    if not device.startswith("cuda"):
        print("  (the fused targets are GPU targets: reported here, checked only on cuda)")
    for v in verdicts:
        print(f"  [{v.status}] {v.target} [{v.where}]: {v.measured or '-'}")


def main(argv: list[str] | None = None) -> int:
    """Run the suite, print the tables and targets; 1 with --check when a target is missed."""
    args = parse(argv)
    result = run(args)
    verdicts = evaluate(result)
    print_targets(verdicts, args.device)
    result["argv"] = sys.argv[1:] if argv is None else list(argv)
    result["targets"] = [vars(v) for v in verdicts]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return check_report(verdicts) if args.check else 0


if __name__ == "__main__":
    sys.exit(main())
