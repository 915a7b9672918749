"""The asymmetry formula registry, and the reports stating the formulas a study selects."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import formulas, report
from helpers.config import load_study
from helpers.metrics import CDI_FORMULAS, LFIAR_FORMULAS, MetricsSettings


def test_registry_computes_the_hand_worked_values():
    # FCSA 110 vs 90 mm2: normalized difference 20 / 100; log ratio ln(110 / 90).
    assert float(formulas.cdi(110.0, 90.0, "normalized_difference")) == pytest.approx(0.2)
    assert float(formulas.cdi(110.0, 90.0, "log_ratio")) == pytest.approx(0.2006707, abs=1e-7)
    assert np.isnan(formulas.cdi(0.0, 90.0, "log_ratio"))
    # FI 10 % vs 0.1 % with a 0.5 % floor: ratio 10 / 0.5; log ln(10 / 0.5).
    main, log = formulas.lfiar(10.0, 0.1, 0.5, "ratio")
    assert float(main) == pytest.approx(20.0)
    assert float(log) == pytest.approx(np.log(20.0))
    main, _ = formulas.lfiar(12.0, 4.0, 0.5, "normalized_difference")
    assert float(main) == pytest.approx(8.0 / 8.0)
    # The settings accept exactly the registry's names.
    assert CDI_FORMULAS == tuple(formulas.CDI)
    assert LFIAR_FORMULAS == tuple(formulas.LFIAR)


def _study(root: Path, example_dir: Path, metrics: dict | None) -> Path:
    data = np.full((6, 5, 3), 1, dtype=np.int16)
    for folder, suffix in (("images", "T2w"), ("masks", "dseg")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, np.diag([0.9, 0.9, 4.0, 1.0])),
                 root / folder / f"sub-01_{suffix}.nii.gz")
    shutil.copyfile(example_dir / "labels.json", root / "labels.json")
    (root / "model.zip").write_bytes(b"stand-in; the config only checks it exists")
    doc = {"study": "trial", "images": "images/*_T2w.nii.gz", "labels": "labels.json",
           "model": "model.zip"}
    if metrics is not None:
        doc["metrics"] = metrics
    path = root / "study.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def test_a_log_ratio_study_is_reported_with_log_ratio(tmp_path, example_dir):
    """The metrics and statistics reports (notebooks 03 and 04, and the tables' notes) state
    ``report.caveats_markdown(study.metrics_settings().to_dict())``: the formulas the study
    selects, not the defaults (issue 17)."""
    study = load_study(_study(tmp_path / "log", example_dir, {
        "cdi_formula": "log_ratio", "lfiar_formula": "normalized_difference",
        "lfiar_floor_pct": 2.0, "fat_method": "otsu", "bias_correction": False}))
    text = report.caveats_markdown(study.metrics_settings().to_dict())
    assert "**cdi** = ln(FCSA_left / FCSA_right) (`cdi_formula: log_ratio`)" in text
    assert "(FCSA_left - FCSA_right)" not in text
    assert "**lfiar** = (FI_left - FI_right) / ((FI_left + FI_right) / 2)" in text
    assert "max(FI_right, 2 %)" in text  # lfiar_log keeps the floor, 2 % here
    assert "`fat_method: otsu`): Otsu's threshold" in text
    assert "without bias-field correction" in text

    default = load_study(_study(tmp_path / "default", example_dir, None))
    text = report.caveats_markdown(default.metrics_settings().to_dict())
    assert "**cdi** = (FCSA_left - FCSA_right) / ((FCSA_left + FCSA_right) / 2)" in text
    assert "ln(FCSA_left / FCSA_right)" not in text
    assert "**lfiar** = FI_left / max(FI_right, 0.5 %)" in text
    assert "`fat_method: unmix`): partial-volume two-tissue model" in text
    assert "after N4 bias-field correction" in text


@pytest.mark.parametrize("cdi_formula", CDI_FORMULAS)
def test_every_registered_formula_is_stated_and_computed_alike(cdi_formula):
    """The text a report states for a formula evaluates to what the registry computes."""
    f = formulas.CDI[cdi_formula]
    assert f"`cdi_formula: {cdi_formula}`" in formulas.describe({"cdi_formula": cdi_formula})[0]
    expr = f.text().replace("ln", "np.log")
    for left, right in ((110.0, 90.0), (50.0, 75.0)):
        stated = eval(expr, {"np": np, "FCSA_left": left, "FCSA_right": right})
        assert float(formulas.cdi(left, right, cdi_formula)) == pytest.approx(stated)
    assert MetricsSettings(cdi_formula=cdi_formula).cdi_formula == cdi_formula


def test_the_asymmetry_figure_titles_state_the_selected_formula():
    """Notebook 03's asymmetry figure: its panel titles state the CDI formula the settings
    select and lfiar_log with their floor, not the defaults' text."""
    asym = pd.DataFrame({"level": ["all", "all"], "muscle": ["multifidus", "psoas_major"],
                         "cdi": [0.1, -0.05], "lfiar_log": [0.2, 0.0]})
    titles = [ax.get_title() for ax in report.asymmetry_figure(
        asym, settings={"cdi_formula": "log_ratio", "lfiar_floor_pct": 1.0}).axes]
    assert titles == ["cdi = ln(FCSA_left / FCSA_right)",
                      "lfiar_log = ln(max(FI_left, 1 %) / max(FI_right, 1 %))"]
    titles = [ax.get_title() for ax in report.asymmetry_figure(asym).axes]
    assert titles[0] == "cdi = (FCSA_left - FCSA_right) / ((FCSA_left + FCSA_right) / 2)"
    assert titles[1] == "lfiar_log = ln(max(FI_left, 0.5 %) / max(FI_right, 0.5 %))"
