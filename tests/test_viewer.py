"""The widget browser built headlessly: clicks write the decisions file, sliders redraw."""

from __future__ import annotations

import importlib.util
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from helpers import qc, viewer
from helpers.errors import EsmaError
from helpers.labels import Label, LabelTable

widgets = pytest.importorskip("ipywidgets")

LABELS = LabelTable((Label(1, "multifidus", "right"), Label(2, "multifidus", "left")))


def _subject(folder, subject: str, codes: str, n_slices: int) -> tuple:
    mask = np.zeros((30, 24, n_slices), dtype=np.uint8)
    mask[6:11, 12:18, 1:-1] = 1  # patient's right in L-P-S storage
    mask[18:23, 12:18, 1:-1] = 2
    mask[6:11, 12:18, 2] = 0  # slice 2: right label missing, left present
    image = (np.random.default_rng(1).normal(100, 5, mask.shape) + 300 * (mask > 0)).astype(
        np.float32
    )
    affine = np.diag([-2.0, -2.0, 5.0, 1.0])
    img = nib.Nifti1Image(image, affine)
    msk = nib.Nifti1Image(mask, affine)
    if codes != "LPS":
        from helpers.synthetic import reorient

        img, msk = reorient(img, codes), reorient(msk, codes)
    nib.save(img, folder / f"{subject}_T2w.nii.gz")
    nib.save(msk, folder / f"{subject}_dseg.nii.gz")
    return subject, folder / f"{subject}_T2w.nii.gz", folder / f"{subject}_dseg.nii.gz"


@pytest.fixture
def cohort(tmp_path):
    rows = [_subject(tmp_path, "sub-01", "LPS", 6), _subject(tmp_path, "sub-02", "RAS", 9)]
    cases = pd.DataFrame(rows, columns=["subject", "image", "mask"])
    table = qc._frame(
        [
            qc._row("sub-01", "all", "coverage", "pass", 4, "slices 1-4"),
            qc._row(
                "sub-02",
                "L4",
                "fragmentation",
                "flag",
                0.6,
                "in 2 pieces on slice 3",
                muscle="multifidus",
                side="left",
            ),
        ]
    )
    decisions = tmp_path / "qc_decisions.csv"
    qc.init_decisions(qc.summarize_qc(table), decisions)
    return cases, table, decisions


def test_browser_tree_and_initial_draw(cohort):
    cases, table, decisions = cohort
    b = viewer.browse(cases, decisions, LABELS, qc=table, reviewer="Dr. T")
    assert isinstance(b.widget, widgets.VBox)
    assert list(b.subject.options) == ["sub-01", "sub-02"]
    assert (b.slice.min, b.slice.max) == (0, 5)
    assert b.image.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert b.draw_count == 1
    assert "QC: pass" in b.findings.value
    assert "include" in b.decision.value

    # every control sits in the displayed tree
    def walk(w):
        yield w
        for c in getattr(w, "children", ()):
            yield from walk(c)

    tree = set(map(id, walk(b.widget)))
    for w in (
        b.subject,
        b.slice,
        b.opacity,
        b.include_button,
        b.exclude_button,
        b.image,
        b.reviewer,
        b.reason,
    ):
        assert id(w) in tree


def test_sliders_and_subject_change_redraw(cohort):
    cases, table, decisions = cohort
    b = viewer.browse(cases, decisions, LABELS, qc=table, reviewer="Dr. T")
    first = b.image.value
    b.slice.value = 2 if b.slice.value != 2 else 3
    assert b.draw_count == 2
    assert b.image.value != first
    before = b.image.value
    b.opacity.value = 0.0
    assert b.draw_count == 3
    assert b.image.value != before
    assert b.message.value == ""
    b.subject.value = "sub-02"  # stored R-A-S, 9 slices
    assert b.slice.max == 8
    assert b.draw_count == 4
    assert "fragmentation" in b.findings.value
    assert "flag" in b.findings.value


def test_buttons_write_the_decisions_file(cohort):
    cases, table, decisions = cohort
    b = viewer.browse(cases, decisions, LABELS, qc=table, reviewer="Dr. T")
    b.subject.value = "sub-02"
    b.reason.value = "left multifidus split"
    b.exclude_button.click()
    d = qc.read_decisions(decisions).set_index("subject")
    assert (d.loc["sub-02", "decision"], d.loc["sub-02", "reviewer"]) == ("exclude", "Dr. T")
    assert d.loc["sub-02", "reason"] == "left multifidus split"
    assert d.loc["sub-01", "reviewer"] == "auto-qc"  # other rows untouched
    assert "exclude" in b.decision.value
    assert "Saved" in b.message.value
    assert qc.excluded_subjects(decisions)["subject"].tolist() == ["sub-02"]

    b.include_button.click()
    assert qc.read_decisions(decisions).set_index("subject").loc["sub-02", "decision"] == "include"

    b.reviewer.value = ""
    stamp = decisions.read_bytes()
    b.exclude_button.click()
    assert decisions.read_bytes() == stamp
    assert "reviewer" in b.message.value


def test_browser_accepts_a_mapping_and_reports_bad_files(tmp_path):
    s, image, mask = _subject(tmp_path, "sub-01", "LPS", 5)
    (tmp_path / "broken.nii.gz").write_bytes(b"junk")
    b = viewer.browse(
        {s: (image, mask), "sub-x": (tmp_path / "broken.nii.gz", mask)},
        tmp_path / "d.csv",
        LABELS,
        reviewer="R",
    )
    b.subject.value = "sub-x"
    assert "broken.nii.gz" in b.message.value
    b.include_button.click()  # a decision can still be recorded for an unreadable subject
    assert qc.read_decisions(tmp_path / "d.csv")["subject"].tolist() == ["sub-x"]
    with pytest.raises(EsmaError, match="lacks the column"):
        viewer.browse(pd.DataFrame({"subject": ["a"]}), tmp_path / "d.csv", LABELS)
    with pytest.raises(EsmaError, match="no subjects to show"):
        viewer.browse(pd.DataFrame(columns=["subject", "image", "mask"]), tmp_path / "d.csv", LABELS)


def test_view_3d_without_itkwidgets_gives_a_clear_message(tmp_path, monkeypatch):
    _, image, mask = _subject(tmp_path, "sub-01", "LPS", 4)
    monkeypatch.setitem(sys.modules, "itkwidgets", None)  # import fails
    out = viewer.view_3d(image, mask, backend="itkwidgets")
    assert isinstance(out, viewer.Unavailable)
    assert "itkwidgets is not installed" in out.message
    assert "browse" in out._repr_html_()


def test_itkwidgets_support_report():
    info = viewer.itkwidgets_support()
    assert set(info) >= {"version", "jupyterlab", "labextension", "nbextension", "note"}
    if info["version"] is None:
        assert info["note"] == "itkwidgets is not installed"
    elif not info["labextension"] and info["nbextension"]:
        assert "classic Notebook" in info["note"]


def test_view_3d_builds_an_itkwidgets_viewer(tmp_path):
    pytest.importorskip("itkwidgets")
    _, image, mask = _subject(tmp_path, "sub-01", "LPS", 4)
    out = viewer.view_3d(image, mask, backend="itkwidgets")
    assert not isinstance(out, viewer.Unavailable)
    assert type(out).__module__.startswith("itkwidgets")


def test_view_3d_niivue_sends_both_files_with_esma_label_colours_and_names(tmp_path):
    ipyniivue = pytest.importorskip("ipyniivue")
    _, image, mask = _subject(tmp_path, "sub-01", "RAS", 4)
    labels = LabelTable((*LABELS.labels, Label(4, "psoas_major", None)))
    nv = viewer.view_3d(image, mask, labels, opacity=0.7, height=400)  # niivue is the default
    assert isinstance(nv, ipyniivue.NiiVue)
    assert nv.height == 400
    assert nv.opts.is_radiological_convention
    base, overlay = nv.volumes
    # the file bytes travel in the widget state (nothing is fetched by URL)
    assert base.get_state()["path"]["data"] == image.read_bytes()
    assert overlay.get_state()["path"]["data"] == mask.read_bytes()
    assert base.url is None
    assert overlay.url is None
    assert base.colormap == "gray"
    assert overlay.opacity == pytest.approx(0.7)
    lut = overlay.colormap_label
    assert (lut.min, lut.max) == (0.0, 4.0)
    assert lut.labels == ["", "right_multifidus", "left_multifidus", "", "psoas_major"]
    rgba = np.array(lut.lut).reshape(-1, 4)
    colours = qc.label_colours(labels)
    assert rgba[0, 3] == 0  # background clear
    assert rgba[3, 3] == 0  # undeclared value 3 clear
    for value in (1, 2, 4):
        assert tuple(rgba[value, :3]) == tuple(round(c * 255) for c in colours[value])
        assert rgba[value, 3] == 255
    neuro = viewer.view_3d_niivue(image, mask, labels, convention="neurological")
    assert not neuro.opts.is_radiological_convention


def test_view_3d_niivue_errors_name_the_problem(tmp_path, monkeypatch):
    pytest.importorskip("ipyniivue")
    _, image, mask = _subject(tmp_path, "sub-01", "LPS", 4)
    only_right = LabelTable((Label(1, "multifidus", "right"),))
    with pytest.raises(EsmaError, match=r"sub-01_dseg\.nii\.gz.*2"):
        viewer.view_3d(image, mask, only_right)  # the mask holds label 2 too
    with pytest.raises(EsmaError, match="needs the label file"):
        viewer.view_3d(image, mask)
    with pytest.raises(EsmaError, match="backend must be one of"):
        viewer.view_3d(image, mask, LABELS, backend="vtk")
    with pytest.raises(EsmaError, match="convention"):
        viewer.view_3d_niivue(image, mask, LABELS, convention="sideways")
    with pytest.raises(EsmaError, match=r"missing\.nii\.gz"):
        viewer.view_3d(tmp_path / "missing.nii.gz", mask, LABELS)
    monkeypatch.setattr(viewer.importlib.util, "find_spec", lambda name: None)
    out = viewer.view_3d(image, mask, LABELS)
    assert isinstance(out, viewer.Unavailable)
    assert "ipyniivue is not installed" in out.message


def test_qc_notebook_view_shows_the_worst_subject_with_the_chosen_backend(tmp_path, example_dir):
    """``s3_qc.qc_view_3d`` (the 02_qc cell): NiiVue by default, itkwidgets when asked."""
    ipyniivue = pytest.importorskip("ipyniivue")
    import shutil

    from helpers.runs import open_study
    from helpers.stages import s1_segment, s3_qc

    shutil.copyfile(example_dir / "labels.json", tmp_path / "labels.json")
    good = nib.load(example_dir / "sub-0001_T1w_dseg.nii.gz")
    swapped = np.asarray(good.dataobj).copy()
    swapped[swapped == 1], swapped[swapped == 3] = 3, 1  # multifidus <-> erector spinae: fails
    (tmp_path / "masks").mkdir()
    for subject in ("sub-0001", "sub-0002"):
        shutil.copyfile(example_dir / "sub-0001_T1w.nii.gz", tmp_path / f"{subject}_T2w.nii.gz")
    shutil.copyfile(example_dir / "sub-0001_T1w_dseg.nii.gz", tmp_path / "masks/sub-0001.nii.gz")
    nib.save(nib.Nifti1Image(swapped, good.affine, good.header), tmp_path / "masks/sub-0002.nii.gz")
    (tmp_path / "study.yml").write_text(
        "study: tiny\nimages: '*_T2w.nii.gz'\nlabels: labels.json\n"
        "masks: 'masks/{subject}.nii.gz'\noutput: out\nqc: {z_edge_status: pass}\n"
    )
    study, paths = open_study(tmp_path / "study.yml", tmp_path / "out" / "run")
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    seg = s1_segment.segment_stage(study, paths, progress=False)
    out = s3_qc.qc_stage(study, paths, seg, progress=False)
    assert out.summary.set_index("subject").loc["sub-0002", "status"] == "fail"
    nv = s3_qc.qc_view_3d(study, paths, out)
    assert isinstance(nv, ipyniivue.NiiVue)
    overlay = nv.volumes[1]
    assert overlay.get_state()["path"]["data"] == (tmp_path / "masks/sub-0002.nii.gz").read_bytes()
    assert "right_multifidus" in overlay.colormap_label.labels
    if importlib.util.find_spec("itkwidgets") is not None:
        itk_view = s3_qc.qc_view_3d(study, paths, out, backend="itkwidgets")
        assert type(itk_view).__module__.startswith("itkwidgets")
