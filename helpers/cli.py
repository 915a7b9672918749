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
from typing import Any

from helpers.errors import EsmaError, OutputError

__all__ = ["build_parser", "main"]

log = logging.getLogger("esma")

# Exit codes: 0 success, 1 finished but some subjects failed, 2 bad input / usage.
EXIT_OK, EXIT_PARTIAL, EXIT_BAD_INPUT = 0, 1, 2
#: Infrastructure failure (disk full, unwritable output): not the input's fault (issue 16).
EXIT_INFRASTRUCTURE = 3


# --------------------------------------------------------------------------- metrics (issue 2)
def _add_metrics(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("metrics", help="measure CSA, fat infiltration and asymmetry of one scan")
    p.add_argument("--image", type=Path,
                   help="axial fat-bright image, T1w or T2w without fat suppression (.nii/.nii.gz)")
    p.add_argument("--mask", required=True, type=Path, help="muscle label mask on the same grid")
    p.add_argument("--labels", required=True, type=Path, help="label JSON file")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--subject", help="subject ID (default: image name without _T2w/.nii.gz)")
    p.add_argument(
        "--fat-method",
        default=None,
        help="fat classification: unmix (default), gmm3, gmm2, kmeans2 or otsu",
    )
    p.add_argument("--no-bias-correction", action="store_true", help="skip N4 bias correction")
    p.add_argument("--levels", type=Path, help="CSV slice->vertebral level table")
    _add_dixon_metrics_args(p)
    p.add_argument("--no-side-check", action="store_true",
                   help="measure even when the label file's left/right contradict the anatomy")
    p.set_defaults(func=_cmd_metrics)


def _cmd_metrics(args: argparse.Namespace) -> int:
    from helpers.metrics import MetricsSettings, measure_files, write_result

    if _dixon_requested(args):
        return _cmd_metrics_dixon(args)
    if args.image is None:
        args.parser.error("give --image (one fat-bright image) or --water and --fat (Dixon)")
    options: dict[str, object] = {}
    if args.fat_method is not None:
        options["fat_method"] = args.fat_method
    if args.no_bias_correction:
        options["bias_correction"] = False
    if args.no_side_check:
        options["side_check"] = False
    settings = MetricsSettings.from_mapping(options)
    result = measure_files(
        args.image, args.mask, args.labels, subject=args.subject, settings=settings,
        levels_path=args.levels,
    )
    from helpers.contrast import contrast_from_name  # issue 18: record what was measured

    result.reference["contrast"] = contrast_from_name(args.image)
    paths = write_result(result, args.out)
    n_flagged = int((result.metrics["flags"].str.contains("absent|truncated", regex=True)).sum())
    log.info(
        "%s: %d metric rows, %d asymmetry rows (%s, bias correction %s) -> %s",
        result.reference["subject"], len(result.metrics), len(result.asymmetry),
        settings.fat_method, "on" if settings.bias_correction else "off", paths["metrics"].parent,
    )
    if n_flagged:
        log.warning("%d rows are NaN or partial (flags absent/truncated): see metrics.csv",
                    n_flagged)
    return EXIT_OK


# ------------------------------------------------------------------ Dixon metrics (issue 18)
def _add_dixon_metrics_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--water", type=Path, help="Dixon water image (with --fat, instead of --image)")
    p.add_argument("--fat", type=Path, help="Dixon fat image, on the water image's grid")
    p.add_argument("--dixon-erode-mm", type=float, default=None,
                   help="Dixon: leave voxels within this many mm of the muscle border out of "
                        "fat_pct (default 0: every voxel)")
    p.add_argument("--dixon-noise-correction", choices=("none", "rician"), default=None,
                   help="Dixon: take the magnitude noise floor off first (default none)")
    p.set_defaults(parser=p)


def _dixon_requested(args: argparse.Namespace) -> bool:
    dixon_only = (args.dixon_erode_mm, args.dixon_noise_correction)
    if args.water is None and args.fat is None:
        if any(v is not None for v in dixon_only):
            args.parser.error("--dixon-* options need --water and --fat")
        return False
    if args.water is None or args.fat is None:
        args.parser.error("--water and --fat go together (a Dixon pair)")
    if args.image is not None:
        args.parser.error("give either --image or --water and --fat, not both")
    if args.fat_method is not None or args.no_bias_correction:
        args.parser.error("--fat-method and --no-bias-correction do not apply to a Dixon pair")
    return True


def _cmd_metrics_dixon(args: argparse.Namespace) -> int:
    from helpers.dixon import DixonSettings, measure_dixon_files
    from helpers.metrics import write_result

    options: dict[str, object] = {}
    if args.dixon_erode_mm is not None:
        options["erode_mm"] = args.dixon_erode_mm
    if args.dixon_noise_correction is not None:
        options["noise_correction"] = args.dixon_noise_correction
    dixon = DixonSettings.from_mapping(options)
    result = measure_dixon_files(
        args.water, args.fat, args.mask, args.labels, subject=args.subject, dixon=dixon,
        levels_path=args.levels,
    )
    paths = write_result(result, args.out)
    log.info("%s: %d metric rows, %d asymmetry rows (dixon) -> %s", result.reference["subject"],
             len(result.metrics), len(result.asymmetry), paths["metrics"].parent)
    flagged = result.metrics["flags"].str.contains("dixon_low_signal|possible_water_fat_swap")
    if flagged.any():
        log.warning("%d rows flagged dixon_low_signal or possible_water_fat_swap: see "
                    "metrics.csv", int(flagged.sum()))
    return EXIT_OK


# ------------------------------------------------------------------ scores and stats (issue 3)
def _add_scores(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scores", help="score ODI, SRS-22r, VAS and JOA from item-level answers")
    p.add_argument("--clinical", required=True, type=Path, help="clinical CSV, one row a subject")
    p.add_argument("--out", required=True, type=Path, help="output scores CSV")
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="score valid rows, list the rest in OUT_skipped.csv (exit code 1 if any)",
    )
    p.add_argument(
        "--mapping",
        type=Path,
        help="YAML mapping of a site's columns/codes onto the standard layout",
    )
    p.add_argument("--encoding", help="text encoding of the clinical CSV (default UTF-8), "
                   "e.g. latin-1; overrides the mapping's encoding")
    p.set_defaults(func=_cmd_scores)


def _cmd_scores(args: argparse.Namespace) -> int:
    from helpers.clinical import load_clinical, load_mapping, write_table
    from helpers.scores import score_clinical

    mapping = load_mapping(args.mapping) if args.mapping else None
    if args.encoding:
        from dataclasses import replace

        from helpers.clinical import ClinicalMapping

        base = mapping if mapping is not None else ClinicalMapping()
        checked = ClinicalMapping.from_dict({"encoding": args.encoding}, where="--encoding")
        mapping = replace(base, encoding=checked.encoding)
    clinical = load_clinical(args.clinical, mapping)
    scores, skipped = score_clinical(clinical, skip_invalid=args.skip_invalid)
    write_table(scores, args.out)
    log.info("scored %d subjects -> %s", len(scores), args.out)
    skipped_path = args.out.with_name(f"{args.out.stem}_skipped.csv")
    if len(skipped):
        write_table(skipped, skipped_path)
        n_subjects = skipped["row"].nunique()
        log.warning("skipped %d row(s) with invalid values, listed in %s", n_subjects, skipped_path)
        return EXIT_PARTIAL
    skipped_path.unlink(missing_ok=True)  # a stale list from an earlier run would mislead
    return EXIT_OK


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="correlate asymmetry indices with clinical scores")
    p.add_argument("--asymmetry", required=True, type=Path, help="asymmetry.csv from metrics")
    p.add_argument("--scores", required=True, type=Path, help="scores CSV from esma scores")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--covariates", default="age,bmi", help="comma-separated partial covariates")
    p.add_argument(
        "--family",
        default="group",
        help="FDR family: group (default), group_score, group_index, group_muscle, "
        "group_level or all; always within one method",
    )
    p.set_defaults(func=_cmd_stats)


def _cmd_stats(args: argparse.Namespace) -> int:
    from helpers.clinical import write_table
    from helpers.stats import StatsInputError, analyse, load_asymmetry, load_scores

    asymmetry = load_asymmetry(args.asymmetry)
    scores = load_scores(args.scores)
    covariates = tuple(c.strip() for c in args.covariates.split(",") if c.strip())
    try:
        result = analyse(asymmetry, scores, covariates=covariates, family=args.family)
    except StatsInputError as exc:
        msg = f"{args.asymmetry}, {args.scores}: {exc}"
        raise EsmaError(msg) from exc
    correlations, interactions = result.correlations, result.interactions
    descriptive, unmatched = result.table1, result.unmatched
    write_table(correlations, args.out / "correlations.csv")
    write_table(interactions, args.out / "interactions.csv")
    write_table(descriptive, args.out / "table1.csv")
    write_table(unmatched, args.out / "unmatched.csv")
    log.info(
        "%d correlations, %d interactions, %d unmatched subject(s) -> %s",
        len(correlations),
        len(interactions),
        len(unmatched),
        args.out,
    )
    return EXIT_OK


# ----------------------------------------------------------------------- segmentation (issue 4)
def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment images with a trained nnU-Net v2 model")
    p.add_argument("--images", required=True, type=Path, help="an image file or a folder")
    p.add_argument("--model", required=True, type=Path,
                   help="model folder or exported .zip, or a bundled model: 'starter' (for "
                        "scans from any site) or 'demo'")
    p.add_argument("--out", required=True, type=Path, help="output folder for masks")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--fast", action="store_true", help="one fold, no mirror TTA, larger step, torch resampling of class scores")
    p.add_argument("--folds", help="comma-separated folds, e.g. 0,1")
    p.add_argument("--overwrite", action="store_true", help="redo subjects already segmented")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores)")
    p.add_argument("--no-scan-check", action="store_true",
                   help="segment scans that look non-axial, fat-suppressed or not lumbar "
                        "(helpers.scancheck) instead of refusing them")
    p.add_argument("--no-split-sides", action="store_true",
                   help="write the model's own labels (do not split unsided labels into sides)")
    p.set_defaults(func=_cmd_segment)


def _cmd_segment(args: argparse.Namespace) -> int:
    import os

    # Idle OpenMP threads sleep instead of spinning (must be set before torch loads): on a shared
    # CPU, spinning threads make inference several times slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from helpers.segment import SegmentSettings, find_images, resolve_model, segment_cohort

    settings = SegmentSettings(device=args.device, fast=args.fast, num_threads=args.threads,
                               folds=SegmentSettings.parse_folds(args.folds),
                               split_sides=not args.no_split_sides,
                               check_scan=not args.no_scan_check)
    images = find_images(args.images)
    table = segment_cohort(images, resolve_model(args.model), args.out, settings,
                           overwrite=args.overwrite,
                           progress=sys.stderr.isatty())
    counts = table["status"].value_counts().to_dict()
    log.info("segment: %d done, %d skipped, %d failed; masks in %s", counts.get("done", 0),
             counts.get("skipped", 0), counts.get("failed", 0), args.out)
    failed = table[table["status"] == "failed"]
    for err in failed["error"]:
        print(f"esma segment: failed: {err}", file=sys.stderr)  # noqa: T201
    return EXIT_PARTIAL if len(failed) else EXIT_OK


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train and export an nnU-Net v2 model from labelled scans")
    p.add_argument("--images", required=True, type=Path, help="folder of images")
    p.add_argument("--masks", required=True, type=Path,
                   help="folder of masks named <subject>_dseg.nii.gz (or like the image)")
    p.add_argument("--labels", required=True, type=Path, help="label JSON file of the masks")
    p.add_argument("--out", required=True, type=Path, help="model zip to write")
    p.add_argument("--work", required=True, type=Path, help="scratch folder for nnU-Net")
    p.add_argument("--configuration", default="2d", help="nnU-Net configuration (2d, 3d_fullres)")
    p.add_argument("--folds", default="0,1,2,3,4", help="folds to train, e.g. 0 or 0,1,2,3,4")
    p.add_argument("--epochs", type=int, default=1000, help="training epochs")
    p.add_argument("--iterations", type=int, default=250, help="iterations per epoch")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dataset-id", type=int, default=501, help="nnU-Net dataset ID (11-999)")
    p.add_argument("--dataset-name", default="EsmaMuscles", help="nnU-Net dataset name")
    p.add_argument("--small", action="store_true",
                   help="shrink the 2d network for CPU training (helpers.training.SmallNetwork)")
    p.add_argument("--init-from", type=Path, default=None, metavar="MODEL",
                   help="fine-tune this model (zip or folder) on the cases: its plans and "
                   "weights are the start (nnU-Net pretrained weights); the card names it")
    p.add_argument("--held-out-images", type=Path, default=None,
                   help="with --held-out-masks: report Dice before and after on these cases")
    p.add_argument("--held-out-masks", type=Path, default=None,
                   help="masks of the held-out images")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from helpers.segment import SegmentSettings
    from helpers.training import SmallNetwork, TrainSettings, pair_cases, train_model

    folds = SegmentSettings.parse_folds(args.folds) or (0,)
    settings = TrainSettings(
        dataset_id=args.dataset_id, dataset_name=args.dataset_name,
        configuration=args.configuration, folds=folds, epochs=args.epochs,
        iterations_per_epoch=args.iterations, device=args.device,
        small_network=SmallNetwork() if args.small else None,
        init_from=str(args.init_from) if args.init_from else None,
    )
    cases = pair_cases(args.images, args.masks)
    held_out = None
    if (args.held_out_images is None) != (args.held_out_masks is None):
        msg = "give --held-out-images and --held-out-masks together"
        raise EsmaError(msg)
    if args.held_out_images is not None:
        held_out = pair_cases(args.held_out_images, args.held_out_masks)
    result = train_model(cases, args.labels, args.work, args.out, settings)
    dice = result.validation.groupby(["muscle", "side"], dropna=False, sort=False)["dice"].mean()
    log.info("train: model %s (%.0f min); validation Dice:\n%s", result.model_zip,
             result.seconds / 60, dice.round(3).to_string())
    if held_out:
        from helpers.labels import load_labels
        from helpers.training import compare_models

        models = {"after": result.model_zip}
        if args.init_from is not None:
            models = {"before": args.init_from, **models}
        table = compare_models(models, held_out, load_labels(args.labels),
                               Path(args.work) / "held_out", device=settings.device)
        wide = table.pivot_table(index=["muscle", "side"], columns="model", values="dice",
                                 sort=False)
        print(f"esma train: held-out Dice ({len(held_out)} cases)\n"  # noqa: T201
              f"{wide.round(3).to_string()}")
    return EXIT_OK


# --------------------------------------------------------------------- pipeline (issues 5, 7)
def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the four notebooks of a study through papermill")
    p.add_argument("study", type=Path, help="study YAML file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--shared-kernel", action="store_true",
                   help="run all notebooks in one kernel (its names deleted between them) "
                        "instead of one kernel each: less start-up, more peak memory")
    p.add_argument("--show-output", action="store_true",
                   help="echo the notebooks' printed output while they run")
    p.set_defaults(func=_cmd_run)


def _report_run(result: Any) -> int:
    """Print where a run's reports are and return its exit code (0, 1 or 2)."""
    n_failed = int(result.failures["subject"].nunique())
    stopped = [nb.name for nb in result.notebooks if not nb.ok]
    head = f"esma: run {result.run_id} of study {result.study}"
    lines = [f"{head}: {result.seconds:.0f} s, exit code {result.exit_code}"]
    if stopped:
        lines.append(f"esma: notebook(s) stopped: {', '.join(stopped)} (see their HTML reports)")
    if n_failed:
        lines.append(f"esma: {n_failed} subject(s) failed: see failures.csv")
    lines.append(f"esma: report: {result.index}")
    print("\n".join(lines))  # noqa: T201
    return int(result.exit_code)


def _passive_openmp_for_kernels() -> None:
    """Idle OpenMP threads of the notebooks' kernels sleep instead of spinning (issue 19).

    The kernels inherit this process's environment, and torch reads the variable when it
    loads, so it must be set before a kernel starts: as ``esma segment`` sets it for itself.
    Without it the segment stage of a fresh 3-subject run took 85 s and 24 s of CPU on the busy
    2-core machine, with it 13 s and 7.5 s (benchmarks/bench_throughput.py, same invocation).
    A value the user set is kept.
    """
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _cmd_run(args: argparse.Namespace) -> int:
    from helpers.runner import run_study

    _passive_openmp_for_kernels()
    result = run_study(args.study, progress=not args.quiet, stream_output=args.show_output,
                       shared_kernel=args.shared_kernel)
    return _report_run(result)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build the bundled demo study and run the whole pipeline")
    p.add_argument("--out", type=Path, default=Path("reports/demo"), help="demo folder")
    p.add_argument("--subjects", type=int, default=None,
                   help="number of synthetic subjects (default 24, plus the example scan)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from helpers.demo import DemoSpec, run_demo

    spec = DemoSpec()
    if args.subjects is not None:
        if args.subjects < 1:
            parser_msg = f"--subjects must be at least 1, got {args.subjects}"
            raise EsmaError(parser_msg)
        spec = replace(spec, n_synthetic=args.subjects)
    _passive_openmp_for_kernels()
    result = run_demo(args.out, spec, progress=not args.quiet)
    return _report_run(result)


# ----------------------------------------------------------------------- DICOM ingest (issue 6)
def _add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="convert DICOM axial T2 series to pseudonymized NIfTI",
        usage="esma ingest DICOM_DIR --out DIR [options] | esma ingest --study STUDY.yml",
    )
    p.add_argument(
        "dicom_dir", nargs="?", type=Path, help="folder of DICOM files (searched recursively)"
    )
    p.add_argument("--out", type=Path, help="output folder")
    p.add_argument(
        "--study",
        type=Path,
        help="ingest what the study YAML's ingest: section names (DICOM folder, out, key, "
        "rules); skipped when already done with the same files and settings",
    )
    p.add_argument(
        "--key",
        type=Path,
        help="pseudonym key CSV, kept private (default OUT/../esma_pseudonym_key.csv)",
    )
    p.add_argument("--secret-file", type=Path, help="pseudonym secret (default KEY.secret)")
    p.add_argument(
        "--allow-fat-suppressed", action="store_true", help="write fat-suppressed series (noted)"
    )
    p.add_argument(
        "--allow-windowed", action="store_true", help="write windowed/8-bit series (noted)"
    )
    p.add_argument(
        "--max-axial-angle", type=float, default=30.0, help="degrees from axial still axial"
    )
    p.add_argument(
        "--allow-burned-in",
        action="store_true",
        help="write series flagged BurnedInAnnotation YES (noted; default: refused)",
    )
    p.set_defaults(func=_cmd_ingest)


def _cmd_ingest(args: argparse.Namespace) -> int:
    from helpers.dicom import IngestRules, ingest

    if args.study is not None:
        return _ingest_study(args)
    if args.dicom_dir is None or args.out is None:
        msg = "give DICOM_DIR and --out DIR, or --study STUDY.yml"
        raise EsmaError(msg)
    rules = IngestRules(
        allow_fat_suppressed=args.allow_fat_suppressed,
        allow_windowed=args.allow_windowed,
        max_axial_angle_deg=args.max_axial_angle,
        allow_burned_in=args.allow_burned_in,
    )
    result = ingest(
        args.dicom_dir, args.out, key_path=args.key, secret_path=args.secret_file, rules=rules
    )
    log.info("wrote %d images and %s", len(result.images), args.out / "ingest.csv")
    return EXIT_PARTIAL if result.failed else EXIT_OK


def _ingest_study(args: argparse.Namespace) -> int:
    from helpers.config import load_study
    from helpers.stages.s0_ingest import ingest_stage, ingest_summary

    defaults = {"dicom_dir": None, "out": None, "key": None, "secret_file": None,
                "allow_fat_suppressed": False, "allow_windowed": False, "max_axial_angle": 30.0,
                "allow_burned_in": False}
    given = [k for k, v in defaults.items() if getattr(args, k) != v]
    if given:
        names = ", ".join("DICOM_DIR" if k == "dicom_dir" else "--" + k.replace("_", "-")
                          for k in given)
        msg = (f"--study takes the DICOM folder, out, key and rules from the study file; "
               f"drop {names}")
        raise EsmaError(msg)
    study = load_study(args.study)
    result = ingest_stage(study)
    log.info("%s%s; images and ingest.csv in %s", ingest_summary(result.table),
             " (reused: DICOM unchanged)" if result.reused else "", study.ingest.out)
    return EXIT_PARTIAL if result.failed else EXIT_OK


# ------------------------------------------------------- QC corrections (issue 15)
def _add_qc(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("qc", help="quality-control tools (export masks for correction)")
    qsub = p.add_subparsers(dest="qc_command", required=True, metavar="QC_COMMAND")
    e = qsub.add_parser(
        "export",
        help="write a correction bundle (image, mask, ITK-SNAP/Slicer label files, README)",
    )
    e.add_argument("--study", type=Path, required=True, help="study YAML file")
    e.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    e.add_argument("--run", type=Path, default=None, help="run folder (default: the latest)")
    e.add_argument("--subjects", default=None,
                   help="comma-separated subject IDs (default: those QC marked fail or flag)")
    e.add_argument("--status", default="fail,flag",
                   help="QC statuses exported when --subjects is not given (default fail,flag)")
    e.set_defaults(func=_cmd_qc_export)


def _cmd_qc_export(args: argparse.Namespace) -> int:
    from helpers.corrections import export_for_review

    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    statuses = tuple(s.strip() for s in args.status.split(",") if s.strip())
    folder, done = export_for_review(
        args.study, args.out, run_dir=args.run, subjects=subjects, statuses=statuses
    )
    print(f"esma qc export: {len(done)} subject(s) in {folder} (see its README.md)")  # noqa: T201
    return 0


# ------------------------------------------------------------------------------------ main
_ADDERS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_metrics,
    _add_scores,
    _add_stats,
    _add_segment,
    _add_train,
    _add_run,
    _add_demo,
    _add_ingest,
    _add_qc,
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
    from helpers.lifecycle import handle_termination, interrupted_exit_code

    parser = build_parser()
    args = parser.parse_args(argv)
    handle_termination()  # issue 16: SIGTERM ends like Ctrl-C, with one line
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except OutputError as exc:
        print(f"esma {args.command}: error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_INFRASTRUCTURE
    except EsmaError as exc:
        print(f"esma {args.command}: error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:
        code = interrupted_exit_code(exc)
        what = "SIGTERM" if code != 130 else "Ctrl-C"
        print(f"esma {args.command}: interrupted ({what}); finished work is kept, run the "  # noqa: T201
              "same command again to resume", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
