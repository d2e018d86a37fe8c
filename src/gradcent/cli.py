"""The ``gradcent`` command: ``train``, ``compare``, ``diagnose``, ``presets``, ``report``.

Argument parsing only: every option becomes a field of
:class:`~gradcent.experiments.config.RunConfig` and the work is done in
:mod:`gradcent.experiments`. A bad value exits with status 2 and a message
naming the option.

References:
    Yong et al., ECCV 2020, §5 (the experiments the presets reproduce).

"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradcent.optim import IMPLS


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"5"`` -> seeds 0..4; ``"0,3,7"`` -> those seeds.

    Raises:
        argparse.ArgumentTypeError: naming the bad value.

    """
    try:
        if "," not in text:
            n = int(text)
            if n < 1:
                raise ValueError
            return tuple(range(n))
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid --seeds {text!r} (expected a count N >= 1 or a comma list like 0,1,2)"
        ) from None


def parse_list(text: str) -> tuple[str, ...]:
    """A comma-separated list (``"baseline,gc"``)."""
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"invalid list {text!r}")
    return items


_SWEEP_TYPES = {
    "lr": float,
    "weight_decay": float,
    "momentum": float,
    "gamma": float,
    "batch_size": int,
    "epochs": int,
    "optimizer": str,
    "gc_mode": str,
    "norm": str,
    "model": str,
}


def parse_sweep(text: str) -> dict[str, dict[str, Any]]:
    """``"lr=0.01,0.1"`` -> ``{"lr=0.01": {"lr": 0.01}, "lr=0.1": {"lr": 0.1}}``.

    Raises:
        argparse.ArgumentTypeError: naming the bad option or value.

    """
    key, _, values = text.partition("=")
    key = key.strip().replace("-", "_")
    if key not in _SWEEP_TYPES or not values.strip():
        raise argparse.ArgumentTypeError(
            f"invalid --sweep {text!r} (expected OPTION=V1,V2,... with OPTION one of "
            f"{', '.join(sorted(_SWEEP_TYPES))})"
        )
    points = {}
    for v in (v.strip() for v in values.split(",") if v.strip()):
        try:
            points[f"{key}={v}"] = {key: _SWEEP_TYPES[key](v)}
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid --sweep value {v!r} for {key}") from None
    return points


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r} (expected an integer >= 1)")
    return value


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a paper protocol (see `gradcent presets`)")
    p.add_argument(
        "--dataset",
        help="digits (default), mnist, fashionmnist, text, cifar100, imagefolder, coco, "
        "... or MODULE:FUNCTION",
    )
    p.add_argument(
        "--data", help="dataset folder, or the text file (not for digits, which is bundled)"
    )
    p.add_argument(
        "--download",
        action="store_true",
        default=None,
        help="mnist / fashionmnist: let torchvision fetch missing files into --data",
    )
    p.add_argument("--model", help="smallcnn (default), resnet20, gpt, ... or MODULE:FUNCTION")
    p.add_argument(
        "--context", type=_positive_int, help="text: characters per window (default 128)"
    )
    p.add_argument("--gpt-layers", type=_positive_int, help="gpt: blocks (default 4)")
    p.add_argument("--gpt-heads", type=_positive_int, help="gpt: attention heads (default 4)")
    p.add_argument("--gpt-width", type=_positive_int, help="gpt: model width (default 128)")
    p.add_argument("--norm", help="bn, gn or none")
    p.add_argument("--ws", action="store_true", default=None, help="weight-standardised convs")
    p.add_argument(
        "--pretrained",
        help="weights to fine-tune from: a run's checkpoint.pt or a state_dict file",
    )
    p.add_argument("--variants", type=parse_list, help="comma list, e.g. baseline,gc,gcc")
    p.add_argument("--seeds", type=parse_seeds, help="N (seeds 0..N-1) or a comma list")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--subset", type=_positive_int, help="use only this many samples")
    p.add_argument(
        "--image-size",
        type=_positive_int,
        help="detection models: resize target (default 800; small for CPU smoke runs)",
    )
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--optimizer", help="sgd, sgdw, adam, adamw, adagrad")
    p.add_argument(
        "--impl",
        choices=IMPLS,
        help="the optimizer's impl= (default; fused, native: GC inside the step, "
        "GC time not reported)",
    )
    p.add_argument("--gc-mode", help="GC mode of the gc variants: all, conv, fc")
    p.add_argument(
        "--sweep",
        type=parse_sweep,
        help="compare at each value, e.g. lr=0.01,0.1 or weight-decay=0,1e-4",
    )
    p.add_argument("--device", help="cpu, cuda or auto")
    p.add_argument("--workers", type=int, help="DataLoader workers")
    p.add_argument("--threads", type=int, help="torch CPU threads (0: torch default; 1 default)")
    p.add_argument("--out", help="output folder (default runs/<command>-<preset>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the runs in --out")
    p.add_argument("--quiet", action="store_true", default=None, help="no per-epoch logs")


def _add_distributed_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--distributed",
        choices=("none", "ddp", "fsdp"),
        default="none",
        help="under torchrun: DDP or FSDP2 over the ranks (docs/SCALING.md)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``gradcent`` command."""
    parser = argparse.ArgumentParser(
        prog="gradcent", description="Gradient Centralization experiments (Yong et al., 2020)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="one run, checkpointed every epoch")
    _add_run_options(train)
    _add_distributed_option(train)
    train.add_argument(
        "--stop-after",
        type=_positive_int,
        help="stop after N epochs in total, as if interrupted (then --resume)",
    )
    compare = sub.add_parser("compare", help="variants x seeds, table + plots")
    _add_run_options(compare)
    _add_distributed_option(compare)
    diag = sub.add_parser("diagnose", help="Fig. 3 (weight means) and Fig. 4 (gradient norms)")
    _add_run_options(diag)
    diag.add_argument("--checkpoint", help="weights for Fig. 3 (default: Kaiming init)")
    diag.add_argument(
        "--iterations",
        type=_positive_int,
        default=200,
        help="training steps for Fig. 4 (default 200)",
    )
    sub.add_parser("presets", help="list the paper presets")
    report = sub.add_parser(
        "report", help="markdown table(s) of finished comparisons, from their results.json"
    )
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="--out folders of compare")
    report.add_argument(
        "--no-command", action="store_true", help="only the tables, not the reproducing command"
    )
    return parser


_CONFIG_OPTIONS = (
    "dataset",
    "data",
    "download",
    "context",
    "gpt_layers",
    "gpt_heads",
    "gpt_width",
    "model",
    "norm",
    "ws",
    "pretrained",
    "variants",
    "seeds",
    "epochs",
    "subset",
    "image_size",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "optimizer",
    "impl",
    "gc_mode",
    "sweep",
    "device",
    "workers",
    "threads",
    "quiet",
)


def resolve_config(args: argparse.Namespace) -> Any:
    """The RunConfig from ``--preset`` and the other options given."""
    from gradcent.experiments.config import resolve

    preset = None
    if args.preset:
        from gradcent.experiments.presets import get_preset

        preset = get_preset(args.preset)
    if args.variants:
        from gradcent.experiments.variants import get_variant

        for name in args.variants:
            get_variant(name)
    return resolve(preset, **{k: getattr(args, k) for k in _CONFIG_OPTIONS})


def default_out(command: str, cfg: Any) -> Path:
    """``runs/<command>-<preset or dataset>-<UTC time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path("runs") / f"{command}-{cfg.preset or cfg.dataset}-{stamp}"


def _log(quiet: bool):
    return None if quiet else (lambda line: print(line, flush=True))


def cmd_train(args: argparse.Namespace, cfg: Any, out: Path) -> int:
    """``gradcent train``: one run of the first ``--variants`` (default gc), first seed."""
    from gradcent.experiments.train import train_run

    if args.variants:
        variant = args.variants[0]
    else:
        variant = "gc" if "gc" in cfg.variants else cfg.variants[-1]
    seed = cfg.seeds[0]
    result = train_run(
        cfg, variant, seed, out, resume=args.resume, log=_log(cfg.quiet), stop_after=args.stop_after
    )
    final = result["final"]
    print(f"{variant} seed={seed}: " + ", ".join(f"{k}={v:.4f}" for k, v in final.items()))
    print(f"run folder: {out} (checkpoint.pt, result.json, config.json)")
    return 0


def cmd_compare(args: argparse.Namespace, cfg: Any, out: Path) -> int:
    """``gradcent compare``: every variant x seed, then the table and the plots."""
    from gradcent.experiments.comparison import run_compare

    outcome = run_compare(cfg, out, log=_log(cfg.quiet))
    print(outcome.table)
    for path in outcome.plots:
        print(f"plot: {path}")
    for path in outcome.files:
        print(f"results: {path}")
    return 0


def cmd_diagnose(args: argparse.Namespace, cfg: Any, out: Path) -> int:
    """``gradcent diagnose``: Fig. 3 and Fig. 4 as PNG + CSV."""
    from gradcent.experiments.diagnose import run_diagnose

    for path in run_diagnose(cfg, out, args.checkpoint, args.iterations, cfg.seeds[0]):
        print(f"wrote: {path}")
    return 0


def cmd_presets() -> int:
    """``gradcent presets``: one line per preset."""
    from gradcent.experiments.presets import PRESETS

    for name, preset in PRESETS.items():
        print(f"{name:15s} {preset.description}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``gradcent report RUN_DIR...``: each folder's markdown table, from its results.json."""
    from gradcent.experiments.report import report_run

    print("\n\n".join(report_run(d, command=not args.no_command) for d in args.runs))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradcent`` command.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status (0 on success; bad options exit with 2 via argparse).

    References:
        Yong et al., ECCV 2020, §5.

    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "presets":
        return cmd_presets()
    try:
        if args.command == "report":
            return cmd_report(args)
        cfg = resolve_config(args)
        if args.resume and not args.out:
            raise ValueError("--resume needs --out (the folder of the run to continue)")
        out = Path(args.out) if args.out else default_out(args.command, cfg)
        commands = {"train": cmd_train, "compare": cmd_compare, "diagnose": cmd_diagnose}
        from gradcent.experiments.distributed_run import launched

        with launched(getattr(args, "distributed", "none"), cfg.device) as run:
            return commands[args.command](args, cfg, run.from_main(out))
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    return 2


if __name__ == "__main__":
    sys.exit(main())
