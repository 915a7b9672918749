"""The bundled demo study: synthetic cohort + the real example scan + clinical data, then a run.

``esma demo`` (:func:`run_demo`) builds, in its folder (default ``reports/demo``)::

    inputs/synthetic/<subject>/...   synthetic lumbar T2 phantoms (helpers.synthetic) with truth
    inputs/example/sub-0001_T1w.nii.gz   the real example scan (sample lumbar T2w scan from the
                                     MuscleMap toolbox, MIT) and its model-made reference mask
    inputs/manifest.csv              subject, image, manual_mask (reference masks for QC Dice),
                                     levels
    inputs/clinical.csv              synthetic questionnaires (helpers.clinical.simulate_clinical)
                                     with a planted relation: ODI rising with erector spinae
                                     |cdi| in men only (none in women)
    inputs/labels.json
    study.yml                        the study file; runs go to <folder>/<run-id>/

and runs the four notebooks on it with the demo segmentation model
(``data/demo_model/*.zip``).  The inputs are rebuilt only when the demo's parameters change, so
a second ``esma demo`` reuses the finished segmentations and measurements (its timings show it)
and writes a new run folder beside the first.

``python -m helpers.demo --sample`` builds a smaller study in ``data/sample/`` (the notebooks'
default) and runs it once, so that each notebook can also be opened and run on its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from helpers.files import atomic_write_text

__all__ = [
    "CI_SPEC",
    "DEMO_MODEL_DIR",
    "EXAMPLE_ATTRIBUTION",
    "SAMPLE_SPEC",
    "DemoSpec",
    "build_demo",
    "find_demo_model",
    "main",
    "run_demo",
]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
#: Folder of the shipped demo segmentation model (an exported nnU-Net zip).
DEMO_MODEL_DIR = REPO / "data" / "demo_model"
EXAMPLE_DIR = REPO / "data" / "example"
EXAMPLE_SUBJECT = "sub-0001"
#: How the real example scan is credited wherever it is shown.
EXAMPLE_ATTRIBUTION = "sample lumbar T2w scan from the MuscleMap toolbox (MIT)"
SAMPLE_DIR = REPO / "data" / "sample"


@dataclass(frozen=True)
class DemoSpec:
    """Parameters of a demo study (a change rebuilds the inputs).

    Attributes
    ----------
    name : str
        Study name.
    n_synthetic : int
        Synthetic subjects.
    include_example : bool
        Add the real example scan as subject ``sub-0001``.
    template : {"example", "small"}
        Phantom grid (``example``: 256 x 208 x 20 like the real scan).
    seed : int
        Seed of phantoms and clinical data.
    rho_male, rho_female : float
        Planted Spearman correlation of ODI with erector spinae |cdi| (whole stack) in men and
        in women.
    p_missing : float
        Share of unanswered questionnaire items.
    cdi_max : float
        Planted erector spinae |cdi| spread evenly over [0.02, cdi_max] (random signs), so the
        ranks the relation is planted on survive the measurement error.
    use_model : bool
        Segment with the demo model (else use the phantoms' own masks).
    workers : int
        Worker processes for the per-subject steps (1: sequential).
    """

    name: str = "demo"
    n_synthetic: int = 24
    include_example: bool = True
    template: str = "example"
    seed: int = 2024
    rho_male: float = 1.0
    rho_female: float = 0.0
    p_missing: float = 0.02
    cdi_max: float = 0.5
    use_model: bool = True
    workers: int = 2


def find_demo_model(folder: Path = DEMO_MODEL_DIR) -> Path | None:
    """The demo model zip in ``data/demo_model/`` (None when it is not there)."""
    if not folder.is_dir():
        return None
    zips = sorted(folder.glob("*.zip"))
    return zips[0] if zips else None


def _plan(spec: DemoSpec) -> pd.DataFrame:
    rng = np.random.default_rng(spec.seed)
    n = spec.n_synthetic
    width = max(3, len(str(n)))
    magnitudes = np.linspace(0.02, spec.cdi_max, n) if n > 1 else np.array([spec.cdi_max])
    magnitudes = rng.permutation(magnitudes)
    signs = rng.choice([-1.0, 1.0], n)
    return pd.DataFrame(
        {
            "subject": [f"syn-{i + 1:0{width}d}" for i in range(n)],
            "es_cdi": np.round(signs * magnitudes, 4),
        }
    )


def build_demo(folder: str | Path, spec: DemoSpec = DemoSpec(), *, rebuild: bool = False) -> Path:
    """Build (or reuse) the demo study's inputs and study file; returns the study YAML path.

    The inputs are reused when ``inputs/build.json`` records the same :class:`DemoSpec` and the
    same model, so that re-running the demo reuses its finished work.
    """
    from helpers.clinical import PlantedRelation, simulate_clinical, write_table
    from helpers.synthetic import make_cohort

    folder = Path(folder).resolve()
    inputs = folder / "inputs"
    study_file = folder / "study.yml"
    model = find_demo_model() if spec.use_model else None
    if spec.use_model and model is None:
        log.warning(
            "demo model not found in %s: the demo uses the phantoms' own masks instead of "
            "segmenting (train it with scripts/train_demo_model.py)",
            DEMO_MODEL_DIR,
        )
    record = {"spec": asdict(spec), "model": str(model) if model else None}
    stamp = inputs / "build.json"
    if (
        not rebuild
        and study_file.is_file()
        and stamp.is_file()
        and json.loads(stamp.read_text(encoding="utf-8")) == record
    ):
        log.info("demo inputs in %s are up to date", inputs)
        return study_file
    # new inputs: the work and the QC decisions of the old ones no longer apply (the run
    # folders of earlier demos are kept)
    for stale in (inputs, folder / "work", folder / "interactive"):
        if stale.exists():
            shutil.rmtree(stale)
    (folder / "qc_decisions.csv").unlink(missing_ok=True)
    log.info(
        "building the demo study in %s (%d synthetic subjects%s)",
        folder,
        spec.n_synthetic,
        " + the example scan" if spec.include_example else "",
    )
    cohort = make_cohort(
        spec.n_synthetic,
        inputs / "synthetic",
        seed=spec.seed,
        template=spec.template,
        plan=_plan(spec),
        progress=True,
    )
    rows = [
        {
            "subject": r.subject,
            "image": _rel(r.image, inputs),
            "manual_mask": _rel(r.mask, inputs),
            "levels": _rel(r.levels, inputs),
        }
        for r in cohort.itertuples(index=False)
    ]
    truth = pd.read_csv(inputs / "synthetic" / "asymmetry_truth.csv", dtype={"level": str})
    if spec.include_example:
        ex = inputs / "example"
        ex.mkdir(parents=True, exist_ok=True)
        for name in (f"{EXAMPLE_SUBJECT}_T1w.nii.gz", f"{EXAMPLE_SUBJECT}_T1w_dseg.nii.gz"):
            shutil.copyfile(EXAMPLE_DIR / name, ex / name)
        rows.append(
            {
                "subject": EXAMPLE_SUBJECT,
                "image": f"example/{EXAMPLE_SUBJECT}_T1w.nii.gz",
                "manual_mask": f"example/{EXAMPLE_SUBJECT}_T1w_dseg.nii.gz",
                "levels": "",
            }
        )
        # no planted asymmetry for the real scan: its scores are drawn independently
        truth = pd.concat(
            [
                truth,
                pd.DataFrame(
                    {
                        "subject": [EXAMPLE_SUBJECT],
                        "level": ["all"],
                        "muscle": ["erector_spinae"],
                        "cdi_abs": [np.nan],
                    }
                ),
            ],
            ignore_index=True,
        )
    manifest = pd.DataFrame(rows, columns=["subject", "image", "manual_mask", "levels"])
    if not spec.use_model or model is None:
        manifest["mask"] = manifest["manual_mask"]
    atomic_write_text(inputs / "manifest.csv", manifest.to_csv(index=False))
    shutil.copyfile(EXAMPLE_DIR / "labels.json", inputs / "labels.json")

    relation = PlantedRelation(
        index="cdi_abs",
        muscle="erector_spinae",
        level="all",
        score="odi_pct",
        rho_male=spec.rho_male,
        rho_female=spec.rho_female,
    )
    clinical = simulate_clinical(truth, seed=spec.seed, relation=relation, p_missing=spec.p_missing)
    write_table(clinical, inputs / "clinical.csv")

    atomic_write_text(study_file, _study_yaml(spec, model, study_file.parent))
    atomic_write_text(stamp, json.dumps(record, indent=2))
    return study_file


def _rel(path: str | Path, base: Path) -> str:
    return Path(path).resolve().relative_to(base.resolve()).as_posix()


def _study_yaml(spec: DemoSpec, model: Path | None, folder: Path) -> str:
    described = (
        f"Demo study: {spec.n_synthetic} synthetic lumbar T2 phantoms with planted asymmetry"
        + (
            f" and one real scan ({EXAMPLE_SUBJECT}, {EXAMPLE_ATTRIBUTION})"
            if spec.include_example
            else ""
        )
        + "; synthetic questionnaires with a planted relation: ODI rises with the true "
        f"erector spinae |cdi| in men (Spearman {spec.rho_male:g}), not in women "
        f"({spec.rho_female:g}). The measured |cdi| carries the segmentation's error, so the "
        "observed correlation is weaker than the planted one."
    )
    doc: dict[str, Any] = {
        "study": spec.name,
        "description": described,
        "images": "inputs/manifest.csv",
        "labels": "inputs/labels.json",
    }
    if model is not None and spec.use_model:
        doc["model"] = _relpath(model, folder)
        doc["segmentation"] = {"device": "cpu", "fast": True}
    doc["clinical"] = {"path": "inputs/clinical.csv"}
    doc["metrics"] = {"bias_correction": True}
    if spec.include_example:
        # the real example is T1-weighted, the phantoms T2-like: both fat-bright (issue 18)
        doc["mixed_contrast"] = True
    # the demo's stacks cut through the muscles by design: touching the first/last slice is
    # expected there, not a finding
    doc["qc"] = {"z_edge_status": "pass"}
    doc["statistics"] = {
        "covariates": ["age", "bmi"],
        "indices": ["cdi", "cdi_abs", "lfiar_log", "cdi_cc"],
        "levels": ["all"],
        "family": "group_score",
        "top_pairs": 6,
    }
    doc["executor"] = (
        {"kind": "processes", "workers": spec.workers}
        if spec.workers > 1
        else {"kind": "sequential"}
    )
    doc["output"] = "."
    header = (
        "# esma demo study (built by `esma demo`; rebuilt when the demo's parameters change).\n"
        "# Paths are relative to this file. Runs go to <output>/<run-id>/.\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False, width=100)


def _relpath(target: Path, start: Path) -> str:
    import os

    try:
        return Path(os.path.relpath(target, start)).as_posix()
    except ValueError:  # pragma: no cover - different drives on Windows
        return str(target)


def run_demo(
    folder: str | Path = "reports/demo",
    spec: DemoSpec = DemoSpec(),
    *,
    progress: bool = True,
    stream_output: bool = False,
) -> Any:
    """Build the demo study (or reuse it) and run the whole pipeline; returns the RunResult."""
    from helpers.runner import run_study

    study = build_demo(folder, spec)
    return run_study(study, progress=progress, stream_output=stream_output)


#: The small study ``python -m helpers.demo --sample`` builds for the notebooks' defaults.
SAMPLE_SPEC = DemoSpec(
    name="sample",
    n_synthetic=6,
    include_example=False,
    template="small",
    seed=7,
    rho_male=1.0,
    p_missing=0.0,
    workers=1,
)
#: The end-to-end test's study: 12 small phantoms (6 men, 6 women), a perfectly monotone planted
#: relation in men spread over a wide |cdi| range (so that the ranks survive segmentation error
#: at n = 6), no missing answers, sequential (no worker start-up on a 2-core CI machine).
CI_SPEC = DemoSpec(
    name="ci",
    n_synthetic=12,
    include_example=False,
    template="small",
    seed=11,
    rho_male=1.0,
    rho_female=0.0,
    p_missing=0.0,
    cdi_max=0.5,
    workers=1,
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m helpers.demo [--sample] [--out DIR] [--n N] [--no-run]``."""
    parser = argparse.ArgumentParser(
        prog="python -m helpers.demo",
        description="Build the demo study (synthetic cohort + example scan + clinical data) "
        "and run the pipeline on it.",
    )
    parser.add_argument(
        "--sample",
        action="store_true",
        help="build the small sample study the notebooks open by default (data/sample)",
    )
    parser.add_argument(
        "--out", type=Path, help="demo folder (default reports/demo, or data/sample with --sample)"
    )
    parser.add_argument("--n", type=int, help="number of synthetic subjects")
    parser.add_argument("--no-run", action="store_true", help="only build the study")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = SAMPLE_SPEC if args.sample else DemoSpec()
    if args.n is not None:
        from dataclasses import replace

        spec = replace(spec, n_synthetic=args.n)
    folder = args.out or (SAMPLE_DIR if args.sample else Path("reports/demo"))
    if args.no_run:
        path = build_demo(folder, spec)
        log.info("study file: %s", path)
        return 0
    result = run_demo(folder, spec)
    log.info("report: %s", result.index)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
