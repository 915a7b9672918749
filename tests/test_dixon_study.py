"""Dixon subjects in a study (issue 18): found beside the image or in a manifest, contrast
recorded, mixing refused unless allowed, measured from the pair by the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import provenance, runs
from helpers.config import load_study
from helpers.errors import ConfigError
from helpers.nifti import load_image
from helpers.stages import s1_segment, s2_measure, s4_metrics
from helpers.synthetic import make_phantom, write_phantom
from helpers.synthetic_dixon import make_dixon_phantom, write_dixon_phantom


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dixon_study")
    images = root / "images"
    truths = {}
    for i, subject in enumerate(("sub-d1", "sub-d2")):
        dp = make_dixon_phantom(subject, template="small", seed=10 + i,
                                fat_pct={("erector_spinae", "left"): 14 + 4 * i})
        write_dixon_phantom(dp, images, prefix_tables=True)
        truths[subject] = dp.phantom.truth
    ph = make_phantom("sub-t1", template="small", seed=20)
    write_phantom(ph, images, prefix_tables=True)
    truths["sub-t1"] = ph.truth
    return {"root": root, "images": images, "truth": truths}


def _write_study(root: Path, name: str, **extra: object) -> Path:
    doc = {"study": name, "images": "images/*_T2w.nii.gz", "labels": "images/labels.json",
           "masks": "images/{subject}_dseg.nii.gz", "output": f"out-{name}", **extra}
    path = root / f"{name}.yml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def test_pairs_beside_the_image_are_found_and_contrast_recorded(cohort):
    study = load_study(_write_study(cohort["root"], "mixed", mixed_contrast=True))
    by = {s.subject: s for s in study.subjects}
    assert by["sub-d1"].water == (cohort["images"] / "sub-d1_water.nii.gz").resolve()
    assert by["sub-d1"].fat == (cohort["images"] / "sub-d1_fat.nii.gz").resolve()
    assert by["sub-d1"].contrast == "dixon"
    assert by["sub-t1"].water is None
    assert by["sub-t1"].contrast == "T2w"
    table = study.cohort_table()
    assert list(table["contrast"]) == ["dixon", "dixon", "T2w"]


def test_mixing_contrasts_needs_consent(cohort):
    with pytest.raises(ConfigError, match=r"mixed_contrast: the cohort mixes contrasts "
                                          r"\(1 T2w, 2 dixon\)"):
        load_study(_write_study(cohort["root"], "nomix"))


def test_manifest_with_water_and_fat_columns(cohort):
    root, images = cohort["root"], cohort["images"]
    manifest = pd.DataFrame({
        "subject": ["sub-d1", "sub-d2"],
        "image": ["", str(images / "sub-d2_T2w.nii.gz")],
        "water": [str(images / "sub-d1_water.nii.gz"), str(images / "sub-d2_water.nii.gz")],
        "fat": [str(images / "sub-d1_fat.nii.gz"), str(images / "sub-d2_fat.nii.gz")],
    })
    manifest.to_csv(root / "cohort.csv", index=False)
    study = load_study(_write_study(root, "manifest", images="cohort.csv"))
    by = {s.subject: s for s in study.subjects}
    assert by["sub-d1"].image == by["sub-d1"].water  # only the pair: the water image stands in
    assert {s.contrast for s in study.subjects} == {"dixon"}
    half = manifest.assign(fat=["", str(images / "sub-d2_fat.nii.gz")])
    half.to_csv(root / "half.csv", index=False)
    with pytest.raises(ConfigError, match="line 2: give both water and fat"):
        load_study(_write_study(root, "half", images="half.csv"))
    with pytest.raises(ConfigError, match=r"dixon\.segment_on: 'image', but .* only a water/fat pair, for sub-d1"):
        load_study(_write_study(root, "segimg", images="cohort.csv",
                                dixon={"segment_on": "image"}))
    bad = manifest.drop(columns=["water", "fat"]).assign(
        image=[str(images / "sub-d1_T2w.nii.gz")] * 1 + [str(images / "sub-d2_T2w.nii.gz")],
        contrast=["STIR", "T2w"])
    bad.to_csv(root / "bad.csv", index=False)
    with pytest.raises(ConfigError, match="'STIR' is not one of T1w, T2w, dixon"):
        load_study(_write_study(root, "bad", images="bad.csv"))


def test_study_dixon_settings_validated(cohort):
    with pytest.raises(ConfigError, match=r"dixon\.segment_on"):
        load_study(_write_study(cohort["root"], "badseg", mixed_contrast=True,
                                dixon={"segment_on": "inphase"}))


def test_pipeline_measures_dixon_subjects_from_the_pair(cohort):
    path = _write_study(cohort["root"], "run", mixed_contrast=True,
                        metrics={"bias_correction": False}, dixon={"erode_mm": 0})
    study, paths = runs.open_study(path, cohort["root"] / "runs" / "r1")
    segmentation = s1_segment.segment_stage(study, paths, progress=False)
    status = s2_measure.measure_stage(study, paths, segmentation, progress=False)
    assert set(status["status"]) == {"computed"}
    for subject, truth in cohort["truth"].items():
        m = pd.read_csv(paths.metrics_dir / subject / "metrics.csv")
        ref = json.loads((paths.metrics_dir / subject / "reference.json").read_text())
        agg = m[m["slice"].isna()].merge(truth[truth["slice"].isna()],
                                         on=["level", "muscle", "side"], suffixes=("", "_t"))
        ok = agg["n_slices_t"] > 0
        err = float(np.max(np.abs(agg.loc[ok, "fat_pct"] - agg.loc[ok, "fat_pct_t"])))
        if subject.startswith("sub-d"):
            assert set(m["method"]) == {"dixon"}
            assert ref["method"] == "dixon"
            assert err < 0.1
        else:
            assert set(m["method"]) == {"unmix"}
    # unchanged subjects are reused
    status2 = s2_measure.measure_stage(study, paths, segmentation, progress=False)
    assert set(status2["status"]) == {"reused"}
    # the cohort tables carry each subject's contrast; the index page counts them
    out = s4_metrics.metrics_stage(study, paths, progress=False)
    asym = pd.read_csv(paths.file("asymmetry.csv"))
    assert list(asym.columns)[-1] == "contrast"
    assert dict(zip(asym["subject"], asym["contrast"], strict=False)) == {
        "sub-d1": "dixon", "sub-d2": "dixon", "sub-t1": "T2w"}
    assert set(out.metrics["contrast"]) == {"dixon", "T2w"}
    counts = provenance.contrast_counts_of(study)
    assert counts == {"T2w": 1, "dixon": 2}
    assert provenance.contrast_text({"contrasts": counts}) == " (1 T2w, 2 dixon)"


def test_segmentation_input_is_the_sum_by_default(cohort, tmp_path):
    path = _write_study(cohort["root"], "seg", mixed_contrast=True)
    study, paths = runs.open_study(path, tmp_path / "run")
    s = study.subject("sub-d1")
    target = s1_segment.segmentation_input(study, paths, s)
    w, f = load_image(s.water), load_image(s.fat)
    assert np.allclose(load_image(target).data, w.data + f.data, atol=1e-2)
    mtime = target.stat().st_mtime_ns
    assert s1_segment.segmentation_input(study, paths, s) == target
    assert target.stat().st_mtime_ns == mtime  # reused, not rewritten
    plain = study.subject("sub-t1")
    assert s1_segment.segmentation_input(study, paths, plain) == plain.image
    path = _write_study(cohort["root"], "segw", mixed_contrast=True, dixon={"segment_on": "water"})
    study, paths = runs.open_study(path, tmp_path / "run2")
    target = s1_segment.segmentation_input(study, paths, study.subject("sub-d1"))
    assert target.name == "sub-d1_water.nii.gz"
    assert np.allclose(load_image(target).data, w.data, atol=1e-3)


def test_bids_folder_pairs_beside_the_image(cohort, tmp_path):
    import shutil

    images = cohort["images"]
    anat = tmp_path / "bids" / "sub-d1" / "anat"
    anat.mkdir(parents=True)
    for suffix in ("T2w", "water", "fat"):
        shutil.copyfile(images / f"sub-d1_{suffix}.nii.gz", anat / f"sub-d1_{suffix}.nii.gz")
    shutil.copytree(images, tmp_path / "images")
    doc = {"study": "bids", "images": "bids", "labels": "images/labels.json",
           "masks": "images/{subject}_dseg.nii.gz", "output": "out"}
    (tmp_path / "bids.yml").write_text(json.dumps(doc))
    study = load_study(tmp_path / "bids.yml")
    (s,) = study.subjects
    assert (s.subject, s.contrast) == ("sub-d1", "dixon")
    assert s.water == (anat / "sub-d1_water.nii.gz").resolve()
    assert s.fat == (anat / "sub-d1_fat.nii.gz").resolve()
    (anat / "sub-d1_fat.nii.gz").unlink()
    with pytest.raises(ConfigError, match=r"sub-d1_water\.nii\.gz has no fat partner beside it"):
        load_study(tmp_path / "bids.yml")


def test_frozen_run_study_keeps_pairs_contrasts_and_settings(cohort, tmp_path):
    from helpers.config import parse_study, resolved_document

    study = load_study(_write_study(cohort["root"], "frozen", mixed_contrast=True,
                                    dixon={"segment_on": "water", "erode_mm": 1.0}))
    manifest = tmp_path / "cohort.csv"
    study.cohort_table().to_csv(manifest, index=False)
    again = parse_study(resolved_document(study, manifest), tmp_path / "frozen.yml")
    assert again.subjects == study.subjects
    assert again.dixon == {"segment_on": "water", "erode_mm": 1.0}
    assert again.mixed_contrast is True
