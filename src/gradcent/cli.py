"""The ``gradcent`` command: ``train``, ``compare``, ``diagnose``, ``presets``, ``report``.

Argument parsing only: the run options are read from the fields of
:class:`~gradcent.experiments.config.RunConfig` (one ``--flag`` per field
declared with ``flag=``, parsed by its type), every value is checked by the
config's validation, and the work is done in :mod:`gradcent.experiments`. A bad
value exits with status 2 and a message naming the option.

References:
    Yong et al., ECCV 2020, §5 (the experiments the presets reproduce).

"""

from __future__ import annotations

import argparse
import sys
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


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


def parse_ints(text: str) -> tuple[int, ...]:
    """``"60,120,180"`` -> ``(60, 120, 180)``; ``""`` -> ``()``.

    Raises:
        argparse.ArgumentTypeError: naming the bad value.

    """
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid integer list {text!r} (expected a comma list like 2,4)"
        ) from None


def parse_bool(text: str) -> bool:
    """``"true"`` / ``"1"`` -> True, ``"false"`` / ``"0"`` -> False (any case).

    Raises:
        argparse.ArgumentTypeError: naming the bad value.

    """
    value = {"true": True, "1": True, "false": False, "0": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"invalid boolean {text!r} (expected true or false)")
    return value


# Values --sweep can spell: one scalar per point (a tuple's commas would be ambiguous).
_SCALARS = {int: int, float: float, str: str, bool: parse_bool}


def sweep_options() -> dict[str, Callable[[str], Any]]:
    """``{option: parser}`` of the options ``--sweep`` takes: the sweepable scalars.

    Returns:
        Every option of ``config.SWEEPABLE`` whose values are single numbers,
        strings or booleans, with the parser of one value.

    References:
        Yong et al., ECCV 2020, Tables 1-5 (each varies one option).

    """
    from gradcent.experiments.config import SWEEPABLE, flag_options, option_type

    return {
        name: _SCALARS[option_type(name)]
        for name in flag_options()
        if name in SWEEPABLE and option_type(name) in _SCALARS
    }


def parse_sweep(text: str) -> dict[str, dict[str, Any]]:
    """``"lr=0.01,0.1"`` -> ``{"lr=0.01": {"lr": 0.01}, "lr=0.1": {"lr": 0.1}}``.

    Raises:
        argparse.ArgumentTypeError: naming the bad option or value.

    """
    types = sweep_options()
    key, _, values = text.partition("=")
    key = key.strip().replace("-", "_")
    if key not in types or not values.strip():
        raise argparse.ArgumentTypeError(
            f"invalid --sweep {text!r} (expected OPTION=V1,V2,... with OPTION one of "
            f"{', '.join(sorted(types))})"
        )
    points = {}
    for v in (v.strip() for v in values.split(",") if v.strip()):
        try:
            points[f"{key}={v}"] = {key: types[key](v)}
        except (ValueError, argparse.ArgumentTypeError):
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


# Options whose text has its own syntax; the others are read by their type.
_SYNTAX: dict[str, Callable[[str], Any]] = {"seeds": parse_seeds, "sweep": parse_sweep}


def _argument(name: str) -> dict[str, Any]:
    """``add_argument`` keywords of one RunConfig option, from its type and --help."""
    from gradcent.experiments.config import flag_options, option_choices, option_type

    kw: dict[str, Any] = {"help": flag_options()[name]}
    if choices := option_choices(name):
        kw["choices"] = choices
    kind = option_type(name)
    if name in _SYNTAX:
        kw["type"] = _SYNTAX[name]
    elif kind is bool:  # a switch; None means "not given" (the preset's value stays)
        kw.update(action="store_true", default=None)
    elif typing.get_origin(kind) is tuple:
        kw["type"] = parse_list if typing.get_args(kind)[0] is str else parse_ints
    else:
        kw["type"] = kind
    return kw


def _add_run_options(p: argparse.ArgumentParser) -> None:
    # One --flag per RunConfig option declared with flag=; the values are
    # checked once, by config.validate (which names the option).
    from gradcent.experiments.config import flag_options

    for name in flag_options():
        p.add_argument(f"--{name.replace('_', '-')}", **_argument(name))
    p.add_argument("--out", help="output folder (default runs/<command>-<preset>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the runs in --out")


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


def resolve_config(args: argparse.Namespace) -> Any:
    """The RunConfig from ``--preset`` and the other options given."""
    from gradcent.experiments.config import flag_options, resolve

    preset = None
    if args.preset:
        from gradcent.experiments.presets import get_preset

        preset = get_preset(args.preset)
    if args.variants:
        from gradcent.experiments.variants import get_variant

        for name in args.variants:
            get_variant(name)
    # --preset is resolved to its Preset above; every other flag is an override.
    options = {k: getattr(args, k) for k in flag_options() if k != "preset"}
    return resolve(preset, **options)


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
