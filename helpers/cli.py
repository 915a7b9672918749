"""The ``esma`` command line.

Each sub-command parses its arguments here and calls into the ``helpers`` module that owns the
work; heavy modules (torch, nnU-Net) are imported only by the commands that need them.  Errors
the toolkit raises on purpose (:class:`helpers.errors.EsmaError`) end the command with a one-line
reason naming the file and a non-zero exit code; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from helpers.errors import EsmaError

__all__ = ["build_parser", "main"]

log = logging.getLogger("esma")

# Exit codes: 0 success, 1 finished but some subjects failed, 2 bad input / usage.
EXIT_OK, EXIT_PARTIAL, EXIT_BAD_INPUT = 0, 1, 2


# --------------------------------------------------------------------------- metrics (issue 2)
def _add_metrics(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("metrics", help="measure CSA, fat infiltration and asymmetry of one scan")
    p.add_argument("--image", required=True, type=Path, help="axial T2 image (.nii/.nii.gz)")
    p.add_argument("--mask", required=True, type=Path, help="muscle label mask on the same grid")
    p.add_argument("--labels", required=True, type=Path, help="label JSON file")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--subject", help="subject ID (default: image name without _T2w/.nii.gz)")
    p.add_argument("--fat-method", default=None, help="fat classification method")
    p.add_argument("--no-bias-correction", action="store_true", help="skip N4 bias correction")
    p.add_argument("--levels", type=Path, help="CSV slice->vertebral level table")
    p.set_defaults(func=_cmd_metrics)


def _cmd_metrics(args: argparse.Namespace) -> int:
    msg = "esma metrics is not implemented yet"
    raise NotImplementedError(msg)


# ------------------------------------------------------------------ scores and stats (issue 3)
def _add_scores(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scores", help="score ODI, SRS-22r, VAS and JOA from item-level answers")
    p.add_argument("--clinical", required=True, type=Path, help="clinical CSV, one row a subject")
    p.add_argument("--out", required=True, type=Path, help="output scores CSV")
    p.add_argument("--skip-invalid", action="store_true", help="score valid rows, list the rest")
    p.set_defaults(func=_cmd_scores)


def _cmd_scores(args: argparse.Namespace) -> int:
    msg = "esma scores is not implemented yet"
    raise NotImplementedError(msg)


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="correlate asymmetry indices with clinical scores")
    p.add_argument("--asymmetry", required=True, type=Path, help="asymmetry.csv from metrics")
    p.add_argument("--scores", required=True, type=Path, help="scores CSV from esma scores")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--covariates", default="age,bmi", help="comma-separated partial covariates")
    p.set_defaults(func=_cmd_stats)


def _cmd_stats(args: argparse.Namespace) -> int:
    msg = "esma stats is not implemented yet"
    raise NotImplementedError(msg)


# ----------------------------------------------------------------------- segmentation (issue 4)
def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment images with a trained nnU-Net v2 model")
    p.add_argument("--images", required=True, type=Path, help="an image file or a folder")
    p.add_argument("--model", required=True, type=Path, help="model folder or exported .zip")
    p.add_argument("--out", required=True, type=Path, help="output folder for masks")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--fast", action="store_true", help="one fold, no mirror TTA, larger step")
    p.add_argument("--folds", help="comma-separated folds, e.g. 0,1")
    p.add_argument("--overwrite", action="store_true", help="redo subjects already segmented")
    p.set_defaults(func=_cmd_segment)


def _cmd_segment(args: argparse.Namespace) -> int:
    msg = "esma segment is not implemented yet"
    raise NotImplementedError(msg)


# --------------------------------------------------------------------- pipeline (issues 5, 7)
def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the four notebooks of a study through papermill")
    p.add_argument("study", type=Path, help="study YAML file")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    msg = "esma run is not implemented yet"
    raise NotImplementedError(msg)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build the bundled demo study and run the whole pipeline")
    p.add_argument("--out", type=Path, default=Path("reports/demo"), help="demo folder")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    msg = "esma demo is not implemented yet"
    raise NotImplementedError(msg)


# ----------------------------------------------------------------------- DICOM ingest (issue 6)
def _add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="convert DICOM axial T2 series to pseudonymized NIfTI")
    p.add_argument("dicom_dir", type=Path, help="folder of DICOM files (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.set_defaults(func=_cmd_ingest)


def _cmd_ingest(args: argparse.Namespace) -> int:
    msg = "esma ingest is not implemented yet"
    raise NotImplementedError(msg)


# ------------------------------------------------------------------------------------ main
_ADDERS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_metrics,
    _add_scores,
    _add_stats,
    _add_segment,
    _add_run,
    _add_demo,
    _add_ingest,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``esma`` argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="esma", description="Paraspinal muscle asymmetry from lumbar MRI."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _ADDERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``esma`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except EsmaError as exc:
        print(f"esma {args.command}: error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
