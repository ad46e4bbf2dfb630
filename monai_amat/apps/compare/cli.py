"""The command line of ``python -m monai_amat.apps.compare``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_amat.apps.compare.common import CompareError, literal, parse_sat_eps, parse_seeds
from monai_amat.apps.compare.stages import Comparison, StageError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m monai_amat.apps.compare`` (the ``--KEY VALUE`` overrides come on top).

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="python -m monai_amat.apps.compare",
        usage="%(prog)s --bundle BUNDLE --output_dir DIR [--epochs N] [--attack_steps K] [--data_source SOURCE] "
        '[--dataset_dir DATASET_DIR] [--sat_eps "[...]"] [--seeds "[...]"] [--overlay NAME] [--in_process] '
        "[--KEY VALUE ...]",
        description="STD training, calibration of the criterion from that model, AMAT training, SAT training at each "
        "SAT level, then robust evaluation of every model at the bundle's eps_list; writes comparison.json, "
        "comparison.md and comparison.png in DIR and keeps each run folder there (std/, amat/, sat_<eps>/; with "
        "--seeds, std_s<seed>/, amat_s<seed>/, sat_<eps>_s<seed>/). "
        "Repeating the command skips the stages that finished and resumes an interrupted training.",
        epilog="Any other --KEY VALUE (a Python literal, else a string) is a config override given to every run, e.g. "
        '--spatial_size "[64, 64]" --embedded_cases 8. Example: python -m monai_amat.apps.compare --bundle '
        "bundles/msd_hippocampus_seg_amat --output_dir runs/compare --epochs 1 --attack_steps 3",
        allow_abbrev=False,
    )
    parser.add_argument("--bundle", required=True, help="the bundle folder, e.g. bundles/msd_hippocampus_seg_amat")
    parser.add_argument(
        "--output_dir", required=True, metavar="DIR", help="the comparison folder DIR (created; reused on repeat)"
    )
    parser.add_argument(
        "--epochs", type=_positive_int, metavar="N", help="epochs of every training (default: the bundle's)"
    )
    parser.add_argument(
        "--attack_steps",
        type=_positive_int,
        metavar="K",
        help="PGD steps of the evaluation (attack_steps) and of the training attacks (train_attack_steps, unless "
        "--train_attack_steps is given); default: the bundle's",
    )
    parser.add_argument("--data_source", choices=("embedded", "real"), help="default: the bundle's (embedded)")
    parser.add_argument(
        "--dataset_dir", metavar="DATASET_DIR", help="the real data set folder (with --data_source real)"
    )
    parser.add_argument(
        "--sat_eps",
        type=parse_sat_eps,
        metavar='"[EPS, ...]"',
        help='SAT levels, e.g. "[1, 5, 10]" (default: the bundle\'s sat_eps_list)',
    )
    parser.add_argument(
        "--seeds",
        type=parse_seeds,
        metavar='"[SEED, ...]"',
        help='train and evaluate every model once per seed (the bundle key seed), e.g. "[0, 1, 2]"; the comparison '
        "shows means and sample sds over the seeds (default: one run with the bundle's seed)",
    )
    parser.add_argument(
        "--overlay",
        type=_overlays,
        default=(),
        metavar="NAME[,NAME]",
        help="bundle configs merged last into every stage, e.g. volumetric (configs/volumetric.json: the MSD "
        "bundles in 3D)",
    )
    parser.add_argument(
        "--in_process",
        action="store_true",
        help="run the stages in this process (faster start) instead of one `python -m monai.bundle run` each",
    )
    return parser


def _overlays(text: str) -> tuple[str, ...]:
    """``--overlay``: comma-separated config names without ``.json``."""
    names = tuple(n.strip().removesuffix(".json") for n in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected config names such as volumetric, got {text!r}")
    return names


def _parse_overrides(tokens: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``--KEY VALUE`` / ``--KEY=VALUE`` pairs; errors through ``parser.error``."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            parser.error(f"unrecognized argument {token!r} (overrides are --KEY VALUE pairs)")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                parser.error(f"argument --{key}: expected one value (a config override is --{key} VALUE)")
            value = tokens[i + 1]
            i += 1
        overrides[key] = literal(value)
        i += 1
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success, 1 when a stage failed (argument errors exit with status 2, argparse style).
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    names = [token[2:].partition("=")[0] for token in argv if token.startswith("--") and len(token) > 2]
    repeated = [name for name in dict.fromkeys(names) if names.count(name) > 1]
    if repeated:  # argparse would keep the last one silently
        parser.error(f"argument --{repeated[0]}: given twice")
    args, extra = parser.parse_known_args(argv)
    passthrough = _parse_overrides(extra, parser)
    overrides: dict[str, Any] = {}
    if args.data_source is not None:
        overrides["data_source"] = args.data_source
    if args.dataset_dir is not None:
        overrides["dataset_dir"] = str(Path(args.dataset_dir).resolve())
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.attack_steps is not None:
        overrides["attack_steps"] = overrides["train_attack_steps"] = args.attack_steps
    overrides.update(passthrough)  # a repeated option was refused above
    try:
        comparison = Comparison(
            args.bundle,
            args.output_dir,
            overrides,
            args.sat_eps,
            in_process=args.in_process,
            seeds=args.seeds,
            overlays=args.overlay,
        )
    except CompareError as e:
        parser.error(str(e))
    try:
        comparison.run()
    except StageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    print((comparison.output_dir / "comparison.md").read_text(), flush=True)
    return 0
