"""Corrections: the export bundle for ITK-SNAP / 3D Slicer and the study's ``corrections:`` key
(a corrected mask replaces the model's for that subject only, is validated like any mask and is
recorded per subject with its sha256)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from helpers import corrections, qc, runs
from helpers.cli import main
from helpers.errors import ConfigError
from helpers.files import sha256_file
from helpers.labels import load_labels
from helpers.stages import s1_segment, s3_qc

ES_MF = ((1, 3), (2, 4))


def _swapped(data: np.ndarray) -> np.ndarray:
    out = data.copy()
    for a, b in ES_MF:
        out[data == a] = b
        out[data == b] = a
    return out


def test_label_files_name_and_colour_every_label(example_dir):
    labels = load_labels(example_dir / "labels.json")
    colours = qc.label_colours(labels)
    snap = corrections.itksnap_label_file(labels).splitlines()
    body = [ln for ln in snap if ln and not ln.startswith("#")]
    assert body[0].split()[0] == "0"  # the clear label
    parsed = {int(ln.split()[0]): ln.split() for ln in body[1:]}
    assert sorted(parsed) == list(labels.values)
    for lab in labels.labels:
        fields = parsed[lab.value]
        rgb = tuple(int(x) for x in fields[1:4])
        assert rgb == tuple(round(c * 255) for c in colours[lab.value])
        assert fields[-1] == f'"{lab.side}_{lab.muscle}"'
        assert fields[4:7] == ["1", "1", "1"]  # opaque, visible, mesh
    ctbl = [ln.split() for ln in corrections.slicer_color_table(labels).splitlines()]
    rows = {int(f[0]): f for f in ctbl if not f[0].startswith("#")}
    assert rows[0][1] == "background"
    for lab in labels.labels:
        assert rows[lab.value][1] == f"{lab.side}_{lab.muscle}"
        assert tuple(int(x) for x in rows[lab.value][2:5]) == tuple(
            round(c * 255) for c in colours[lab.value]
        )


def _cases(tmp_path: Path, example_dir: Path) -> pd.DataFrame:
    img = nib.load(example_dir / "sub-0001_T1w.nii.gz")
    header = img.header.copy()
    header["descrip"] = b"Doe^Jane 1961-02-03"
    named = tmp_path / "in" / "sub-0001_T2w.nii.gz"
    named.parent.mkdir()
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, header), named)
    return pd.DataFrame(
        [
            {
                "subject": "sub-0001",
                "image": str(named),
                "mask": str(example_dir / "sub-0001_T1w_dseg.nii.gz"),
                "status": "fail",
                "reasons": "fail arrangement: swapped",
                "source": "model",
            },
            {
                "subject": "sub-0002",
                "image": str(named),
                "mask": str(example_dir / "sub-0001_T1w_dseg.nii.gz"),
                "status": "pass",
                "reasons": "",
                "source": "model",
            },
        ]
    )


def test_export_bundle_writes_the_picked_subjects_without_identity(tmp_path, example_dir):
    cases = _cases(tmp_path, example_dir)
    out = corrections.export_bundle(cases, example_dir / "labels.json", tmp_path / "bundle")
    # default: fail and flag only
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["sub-0001"]
    listed = pd.read_csv(out / "subjects.csv", dtype=str, keep_default_na=False)
    assert listed.to_dict("records") == [
        {
            "subject": "sub-0001",
            "status": "fail",
            "reasons": "fail arrangement: swapped",
            "mask_source": "model",
        }
    ]
    lab = load_labels(example_dir / "labels.json")
    assert (out / "labels.itksnap.txt").read_text() == corrections.itksnap_label_file(lab)
    assert (out / "labels.ctbl").read_text() == corrections.slicer_color_table(lab)
    readme = (out / "README.md").read_text()
    assert "sub-0001" in readme
    assert "sub-0002" not in readme  # a passing subject is not picked by default
    assert (
        load_labels(out / "labels.json").labels == load_labels(example_dir / "labels.json").labels
    )
    image = nib.load(out / "sub-0001" / "sub-0001_T2w.nii.gz")
    source = nib.load(cases.loc[0, "image"])
    assert b"Doe" not in image.header["descrip"].tobytes()
    raw = gzip.decompress((out / "sub-0001" / "sub-0001_T2w.nii.gz").read_bytes())
    assert b"Doe^Jane" not in raw
    assert b"Doe^Jane" in gzip.decompress(Path(cases.loc[0, "image"]).read_bytes())
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), np.asanyarray(source.dataobj))
    np.testing.assert_allclose(image.affine, source.affine)
    mask = nib.load(out / "sub-0001" / "sub-0001_dseg.nii.gz")
    truth = nib.load(example_dir / "sub-0001_T1w_dseg.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(mask.dataobj), np.asanyarray(truth.dataobj))
    import nrrd

    seg, seg_header = nrrd.read(str(out / "sub-0001" / "sub-0001_dseg.seg.nrrd"))
    np.testing.assert_array_equal(seg, np.asanyarray(truth.dataobj))
    assert seg_header["Segment0_Name"] == "{0.side}_{0.muscle}".format(
        load_labels(example_dir / "labels.json").labels[0]
    )
    readme = (out / "README.md").read_text()
    assert "itksnap -g" in readme
    assert "-l labels.itksnap.txt" in readme
    assert "labels.ctbl" in readme
    assert "_dseg.seg.nrrd" in readme
    assert "corrections:" in readme
    # explicit picks, and unknown subjects named
    out2 = corrections.export_bundle(
        cases, example_dir / "labels.json", tmp_path / "b2", subjects=["sub-0002"]
    )
    assert sorted(p.name for p in out2.iterdir() if p.is_dir()) == ["sub-0002"]
    with pytest.raises(ConfigError, match="sub-0099"):
        corrections.export_bundle(
            cases, example_dir / "labels.json", tmp_path / "b3", subjects=["sub-0099"]
        )


def _study(tmp_path: Path, example_dir: Path, *, corrections_key: bool) -> Path:
    shutil.copyfile(example_dir / "labels.json", tmp_path / "labels.json")
    good = nib.load(example_dir / "sub-0001_T1w_dseg.nii.gz")
    bad = _swapped(np.asarray(good.dataobj))
    (tmp_path / "masks").mkdir()
    for subject in ("sub-0001", "sub-0002"):
        shutil.copyfile(example_dir / "sub-0001_T1w.nii.gz", tmp_path / f"{subject}_T2w.nii.gz")
    # sub-0001's given mask has erector spinae and multifidus swapped; sub-0002's is right
    nib.save(nib.Nifti1Image(bad, good.affine, good.header), tmp_path / "masks/sub-0001.nii.gz")
    shutil.copyfile(example_dir / "sub-0001_T1w_dseg.nii.gz", tmp_path / "masks/sub-0002.nii.gz")
    (tmp_path / "fixed").mkdir()
    text = (
        "study: tiny\nimages: '*_T2w.nii.gz'\nlabels: labels.json\n"
        "masks: 'masks/{subject}.nii.gz'\noutput: out\n"
        "qc: {z_edge_status: pass}  # the example's muscles run through the whole stack\n"
    )
    if corrections_key:
        text += "corrections: fixed/\n"
    study = tmp_path / "study.yml"
    study.write_text(text)
    return study


def _run(study_file: Path, run: str):
    study, paths = runs.open_study(study_file, study_file.parent / "out" / run)
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    seg = s1_segment.segment_stage(study, paths, progress=False)
    out = s3_qc.qc_stage(study, paths, seg, progress=False)
    return study, paths, seg, out


def test_corrected_mask_replaces_the_given_one_for_that_subject_only(tmp_path, example_dir):
    study_file = _study(tmp_path, example_dir, corrections_key=True)
    _, _, seg, out = _run(study_file, "20260101T000000Z-aaaaaa")
    d = out.decisions.set_index("subject")
    assert d["decision"].to_dict() == {"sub-0001": "exclude", "sub-0002": "include"}
    assert set(seg["status"]) == {"given"}

    # the reviewer exports, fixes and saves the corrected mask into the corrections folder
    _bundle, picked = corrections.export_for_review(study_file, tmp_path / "bundle")
    assert picked == ["sub-0001"]
    fixed = tmp_path / "fixed" / "sub-0001_dseg.nii.gz"
    shutil.copyfile(example_dir / "sub-0001_T1w_dseg.nii.gz", fixed)

    _, paths, seg, out = _run(study_file, "20260102T000000Z-bbbbbb")
    assert seg.set_index("subject")["status"].to_dict() == {
        "sub-0001": "corrected",
        "sub-0002": "given",
    }
    sources = corrections.read_mask_sources(paths.run_dir).set_index("subject")
    assert sources.loc["sub-0001", "source"] == "corrected"
    assert sources.loc["sub-0001", "sha256"] == sha256_file(fixed)
    assert sources.loc["sub-0002", "source"] == "given"
    assert sources.loc["sub-0001", "mask_file"] == "sub-0001_dseg.nii.gz"  # name, no folder
    # only the corrected subject was measured and checked again
    measured = out.measured.set_index("subject")["status"].to_dict()
    assert measured == {"sub-0001": "computed", "sub-0002": "reused"}
    d = out.decisions.set_index("subject")
    assert d["decision"].to_dict() == {"sub-0001": "include", "sub-0002": "include"}
    # the run's index shows the mask sources
    section = corrections.mask_sources_section(paths.run_dir)
    assert "given 1" in section
    assert "corrected 1" in section
    assert sha256_file(fixed) in section


def test_invalid_correction_fails_that_subject_naming_the_file(tmp_path, example_dir):
    study_file = _study(tmp_path, example_dir, corrections_key=True)
    good = nib.load(example_dir / "sub-0001_T1w_dseg.nii.gz")
    data = np.asarray(good.dataobj).copy()
    data[0, 0, 0] = 42  # a value the label file does not declare
    nib.save(nib.Nifti1Image(data, good.affine, good.header), tmp_path / "fixed/sub-0001.nii.gz")
    study, paths = runs.open_study(study_file, tmp_path / "out" / "20260101T000000Z-aaaaaa")
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    seg = s1_segment.segment_stage(study, paths, progress=False).set_index("subject")
    assert seg.loc["sub-0001", "status"] == "failed"
    assert seg.loc["sub-0001", "error"].startswith("corrected mask sub-0001.nii.gz: ")
    assert "42" in seg.loc["sub-0001", "error"]
    assert str(tmp_path) not in seg.loc["sub-0001", "error"]
    assert seg.loc["sub-0002", "status"] == "given"


def test_corrections_key_accepts_an_empty_folder_and_is_documented(tmp_path, example_dir):
    from helpers.config import STUDY_KEYS, load_study

    assert "corrections" in STUDY_KEYS
    study = load_study(_study(tmp_path, example_dir, corrections_key=True))
    assert all(s.corrected_mask is None for s in study.subjects)
    (tmp_path / "study2.yml").write_text(
        (tmp_path / "study.yml").read_text().replace("fixed/", "missing/")
    )
    with pytest.raises(ConfigError, match="corrections"):
        load_study(tmp_path / "study2.yml")


def test_cli_qc_export(tmp_path, example_dir, capsys):
    study_file = _study(tmp_path, example_dir, corrections_key=False)
    assert main(["qc", "export", "--study", str(study_file), "--out", str(tmp_path / "b")]) == 2
    assert "no run with segmentations" in capsys.readouterr().err
    _run(study_file, "20260101T000000Z-aaaaaa")
    code = main(
        [
            "qc",
            "export",
            "--study",
            str(study_file),
            "--out",
            str(tmp_path / "b"),
            "--subjects",
            "sub-0002",
        ]
    )
    assert code == 0
    assert "1 subject(s)" in capsys.readouterr().out
    assert (tmp_path / "b" / "sub-0002" / "sub-0002_dseg.nii.gz").is_file()
    assert "add `corrections: corrections/`" in (tmp_path / "b" / "README.md").read_text()


def _oblique_mask(tmp_path: Path) -> Path:
    """A small mask stored L-P-S with an oblique, anisotropic affine and a missing label."""
    rng = np.random.default_rng(3)
    data = np.zeros((12, 10, 5), np.int16)
    data[2:6, 3:7, 1:4] = 1
    data[7:11, 2:5, 0:2] = 4
    data[0, 0, 4] = 2
    theta = np.deg2rad(12)
    rot = np.array(
        [[-np.cos(theta), 0, np.sin(theta)], [0, -1, 0], [np.sin(theta), 0, np.cos(theta)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.9, 1.1, 4.5])
    affine[:3, 3] = rng.uniform(-80, 80, 3)
    path = tmp_path / "m_dseg.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_slicer_segmentation_reads_back_with_names_colours_values_and_geometry(
    tmp_path, example_dir
):
    import nrrd
    import SimpleITK as sitk

    labels = load_labels(example_dir / "labels.json")
    colours = qc.label_colours(labels)
    mask = _oblique_mask(tmp_path)
    out = corrections.write_slicer_segmentation(mask, labels, tmp_path / "m.seg.nrrd")
    data, header = nrrd.read(str(out), index_order="F")
    nifti = nib.load(mask)
    truth = np.asanyarray(nifti.dataobj)
    np.testing.assert_array_equal(data, truth)
    assert data.dtype == np.uint8
    assert header["encoding"] == "gzip"
    assert header["space"] == "left-posterior-superior"
    assert header["Segmentation_SourceRepresentation"] == "Binary labelmap"
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    # geometry: voxel (i, j, k) lands on the NIfTI world point with x and y negated (RAS -> LPS)
    for ijk in [(0, 0, 0), (11, 9, 4), (3, 7, 2)]:
        ras = nifti.affine @ np.array([*ijk, 1.0])
        lps = header["space origin"] + np.asarray(ijk) @ header["space directions"]
        np.testing.assert_allclose(lps, ras[:3] * [-1, -1, 1], atol=1e-9)
    # one segment per declared label, in file order
    n_segments = len({k.split("_")[0] for k in header if k.startswith("Segment") and
                      not k.startswith("Segmentation")})
    assert n_segments == len(labels.labels)
    for n, lab in enumerate(labels.labels):
        name = f"{lab.side}_{lab.muscle}"
        assert header[f"Segment{n}_Name"] == name
        assert header[f"Segment{n}_ID"] == name
        assert int(header[f"Segment{n}_LabelValue"]) == lab.value
        assert header[f"Segment{n}_Layer"] == "0"
        rgb = [float(x) for x in header[f"Segment{n}_Color"].split()]
        np.testing.assert_allclose(rgb, colours[lab.value], atol=1 / 255)
        extent = [int(x) for x in header[f"Segment{n}_Extent"].split()]
        where = np.nonzero(truth == lab.value)
        if where[0].size:
            assert extent == [v for ax in where for v in (int(ax.min()), int(ax.max()))]
        else:
            assert extent == [0, -1, 0, -1, 0, -1]  # Slicer's empty extent
    # an independent reader: ITK puts both files on the same physical grid (LPS)
    a, b = sitk.ReadImage(str(mask)), sitk.ReadImage(str(out))
    np.testing.assert_allclose(b.GetOrigin(), a.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(b.GetSpacing(), a.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(b.GetDirection(), a.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(b), sitk.GetArrayFromImage(a))


def test_slicer_segmentation_rejects_undeclared_labels_naming_the_file(tmp_path, example_dir):
    from helpers.errors import InputFileError

    labels = load_labels(example_dir / "labels.json")
    path = tmp_path / "bad_dseg.nii.gz"
    data = np.zeros((4, 4, 3), np.uint8)
    data[1, 1, 1] = 77
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(InputFileError, match=r"bad_dseg\.nii\.gz.*\[77\]"):
        corrections.write_slicer_segmentation(path, labels, tmp_path / "bad.seg.nrrd")
    assert not (tmp_path / "bad.seg.nrrd").exists()
