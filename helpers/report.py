"""Figures and tables for the pipeline's reports.

Plotting functions take tidy DataFrames and return a :class:`matplotlib.figure.Figure` built
without pyplot's global state (the notebooks ``display`` it; :func:`save_figure` writes a PNG).
Table functions return DataFrames ready to display; :func:`write_tables` writes every table as
CSV plus one ``.xlsx`` workbook for clinicians.  Subjects appear only by their pseudonymous ID,
and the scatter plots draw points without labels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from helpers import fat_methods, formulas
from helpers.files import atomic_path, atomic_write_bytes, atomic_write_text

__all__ = [
    "PSOAS_CAVEAT",
    "asymmetry_figure",
    "caveats_markdown",
    "correlation_heatmaps",
    "fdr_table",
    "metrics_figure",
    "png",
    "qc_findings",
    "qc_status_table",
    "save_figure",
    "scatter_pairs",
    "strongest_pairs",
    "table",
    "table1_display",
    "write_tables",
]

log = logging.getLogger(__name__)

#: Shown wherever psoas fat infiltration appears.
PSOAS_CAVEAT = (
    "Psoas fat infiltration measured on T2-weighted images is unreliable: no thresholding method "
    "reached acceptable agreement with Dixon fat fraction for the psoas (ICC <= 0.01, Wesselink "
    "et al. 2024, N Am Spine Soc J 17:100313). Treat psoas fat_pct, lfiar and fcsa with caution."
)
SEX_COLOURS = {"M": "#1f77b4", "F": "#d62728"}
SEX_NAMES = {"M": "men", "F": "women"}
GROUP_TITLES = {"all": "all subjects", "male": "men", "female": "women"}
_DPI = 100


# -------------------------------------------------------------------------------- helpers
def save_figure(fig: Figure, target: str | Path, dpi: int = _DPI) -> Path:
    """Write ``fig`` as PNG atomically and return the path."""
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    return Path(target)


def table(df: pd.DataFrame, *, precision: int = 3, max_rows: int | None = None) -> Any:
    """A DataFrame for display in a report: no row index, numbers to ``precision`` digits.

    An empty table shows as the word *none*.
    """
    if df is None or df.empty:
        from IPython.display import Markdown

        return Markdown("*none*")
    shown = df if max_rows is None else df.head(max_rows)
    return shown.style.hide(axis="index").format(precision=precision, na_rep="")


def png(
    fig: Figure, target: str | Path | None = None, dpi: int = _DPI, alt: str | None = None
) -> Any:
    """``fig`` as an embeddable PNG for a notebook (and written to ``target`` when given).

    Returns an :class:`IPython.display.Image`, so reports embed the figure as base64 PNG
    whatever matplotlib backend the kernel runs.  ``alt`` (default: the figure's title) is the
    image's alternative text in the HTML report.
    """
    import io

    from IPython.display import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, bbox_inches="tight", format="png")
    data = buffer.getvalue()
    if target is not None:
        atomic_write_bytes(target, data)
    title = fig.get_suptitle()
    return Image(data=data, format="png", metadata={"alt": alt or title or "figure"})


def _no_data(message: str) -> Figure:
    """A small figure that says there is nothing to show (empty cohort, all excluded)."""
    fig = Figure(figsize=(6, 1.2), layout="constrained")
    ax = fig.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center")
    fig.suptitle(message)
    return fig


def _label(index: str, muscle: str, level: str) -> str:
    return f"{muscle} {index}" + ("" if level == "all" else f" ({level})")


# -------------------------------------------------------------------------------- metrics
def metrics_figure(metrics: pd.DataFrame, level: str = "all") -> Figure:
    """Per-side muscle area and fat of the cohort: strip plots of csa_mm2, fat_pct, fcsa_mm2.

    Parameters
    ----------
    metrics : pandas.DataFrame
        ``metrics.csv`` rows (subject, level, slice, muscle, side, csa_mm2, fat_pct, fcsa_mm2).
    level : str
        Which aggregate level to show (default the whole stack, ``"all"``).
    """
    rows = metrics[(metrics["level"].astype(str) == level) & metrics["slice"].isna()]
    if rows.empty:
        return _no_data(f"No measurements at level {level}")
    measures = (
        ("csa_mm2", "CSA (mm2)"),
        ("fat_pct", "fat infiltration (%)"),
        ("fcsa_mm2", "functional CSA (mm2)"),
    )
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    muscles = list(dict.fromkeys(rows["muscle"]))
    rng = np.random.default_rng(0)
    for ax, (col, title) in zip(axes, measures, strict=True):
        for i, muscle in enumerate(muscles):
            for j, (side, colour) in enumerate((("left", "#2ca02c"), ("right", "#9467bd"))):
                v = rows.loc[(rows["muscle"] == muscle) & (rows["side"] == side), col]
                v = pd.to_numeric(v, errors="coerce").dropna()
                x = i + (j - 0.5) * 0.3 + rng.uniform(-0.06, 0.06, len(v))
                ax.scatter(
                    x,
                    v,
                    s=14,
                    color=colour,
                    alpha=0.8,
                    label=side if (i == 0 and col == "csa_mm2") else None,
                )
                if len(v):
                    ax.hlines(
                        v.median(),
                        i + (j - 0.5) * 0.3 - 0.12,
                        i + (j - 0.5) * 0.3 + 0.12,
                        color="black",
                        lw=1.5,
                    )
        ax.set_xticks(range(len(muscles)), [m.replace("_", "\n") for m in muscles], fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(title="side", fontsize=8)
    fig.suptitle(f"Per-side measurements, level {level} (bar = median)")
    return fig


def asymmetry_figure(
    asymmetry: pd.DataFrame, level: str = "all", settings: Mapping[str, Any] | None = None
) -> Figure:
    """Distribution of cdi and lfiar_log per muscle (0 = symmetric).

    ``settings``: the ``metrics`` settings the run used; the panel titles state the CDI formula
    they select and the LFIAR floor (:mod:`helpers.formulas`; defaults when not given).
    """
    rows = asymmetry[asymmetry["level"].astype(str) == level]
    if rows.empty:
        return _no_data(f"No asymmetry indices at level {level}")
    muscles = list(dict.fromkeys(rows["muscle"]))
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    rng = np.random.default_rng(1)
    for ax, (col, title) in zip(
        axes,
        (("cdi", f"cdi = {formulas.cdi_text(settings)}"),
         ("lfiar_log", f"lfiar_log = {formulas.lfiar_log_text(settings)}")),
        strict=True,
    ):
        for i, muscle in enumerate(muscles):
            v = pd.to_numeric(rows.loc[rows["muscle"] == muscle, col], errors="coerce").dropna()
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(v)), v, s=14, alpha=0.8, color="#444")
            if len(v):
                ax.hlines(v.median(), i - 0.2, i + 0.2, color="#d62728", lw=2)
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(muscles)), [m.replace("_", "\n") for m in muscles], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Left-right asymmetry, level {level} (> 0: left larger / fattier)")
    return fig


# ------------------------------------------------------------------------------------- QC
def _worst_first(status: object) -> int:
    """Sort key: ``fail`` first, then ``flag``, ``pass``, anything else (one order: qc)."""
    from helpers.qc import severity_rank

    return -severity_rank(status)


def qc_status_table(summary: pd.DataFrame, decisions: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per subject: QC status, reasons and the reviewer's decision (when there is one)."""
    out = summary.copy()
    if decisions is not None and len(decisions):
        d = decisions[["subject", "decision", "reviewer"]].rename(
            columns={"reviewer": "decided_by"}
        )
        out = out.merge(d, on="subject", how="left")
    return out.sort_values(
        ["status", "subject"], key=lambda c: c.map(_worst_first) if c.name == "status" else c
    ).reset_index(drop=True)


def qc_findings(qc_rows: pd.DataFrame) -> pd.DataFrame:
    """The QC rows that are not ``pass``: fails first, then flags, by subject."""
    out = qc_rows[qc_rows["status"] != "pass"].copy()
    return out.sort_values(
        ["status", "subject", "level"],
        key=lambda c: c.map(_worst_first) if c.name == "status" else c,
        kind="stable",
    ).reset_index(drop=True)


# ------------------------------------------------------------------------------ statistics
def correlation_heatmaps(
    correlations: pd.DataFrame,
    *,
    method: str = "spearman",
    level: str = "all",
    groups: Sequence[str] = ("all", "male", "female"),
    alpha: float = 0.05,
) -> Figure:
    """Heatmaps of rho (index x muscle rows, score columns), one panel per group.

    Cells with ``p_fdr < alpha`` are marked ``*`` (FDR-significant); untestable cells are grey.
    """
    rows = correlations[
        (correlations["method"] == method) & (correlations["level"].astype(str) == level)
    ]
    groups = [g for g in groups if g in set(rows["group"])]
    scores = list(dict.fromkeys(rows["score"]))
    keys = list(dict.fromkeys(zip(rows["muscle"], rows["index"], strict=True)))
    n_rows, n_cols = max(len(keys), 1), max(len(scores), 1)
    width = min(6.0 + 1.1 * n_cols * len(groups), 26.0)
    height = min(2.0 + 0.32 * n_rows, 14.0)
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(len(groups), 1), sharey=True))
    norm = TwoSlopeNorm(vmin=-1.0, vcenter=0.0, vmax=1.0)
    image = None
    for ax, group in zip(axes, groups, strict=False):
        g = rows[rows["group"] == group].set_index(["muscle", "index", "score"])
        mat = np.full((n_rows, n_cols), np.nan)
        sig = np.zeros((n_rows, n_cols), dtype=bool)
        for i, (muscle, index) in enumerate(keys):
            for j, score in enumerate(scores):
                if (muscle, index, score) in g.index:
                    rec = g.loc[(muscle, index, score)]
                    rec = rec.iloc[0] if isinstance(rec, pd.DataFrame) else rec
                    mat[i, j] = rec["rho"]
                    sig[i, j] = bool(rec["p_fdr"] < alpha) if pd.notna(rec["p_fdr"]) else False
        ax.set_facecolor("#dddddd")
        image = ax.imshow(np.ma.masked_invalid(mat), cmap="RdBu_r", norm=norm, aspect="auto")
        for i in range(n_rows):
            for j in range(n_cols):
                if np.isfinite(mat[i, j]):
                    text = f"{mat[i, j]:.2f}" + ("*" if sig[i, j] else "")
                    colour = "white" if abs(mat[i, j]) > 0.6 else "black"
                    weight = "bold" if sig[i, j] else "normal"
                    ax.text(
                        j,
                        i,
                        text,
                        ha="center",
                        va="center",
                        fontsize=7,
                        color=colour,
                        fontweight=weight,
                    )
        n = rows.loc[rows["group"] == group, "n"]
        n_text = f"n = {int(n.max())}" if len(n) else "n = 0"
        ax.set_title(f"{GROUP_TITLES.get(group, group)} ({n_text})")
        ax.set_xticks(range(len(scores)), scores, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(keys)), [f"{m} {i}" for m, i in keys], fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="Spearman rho")
    title = "partial Spearman rho" if method == "partial_spearman" else "Spearman rho"
    fig.suptitle(f"{title}, level {level}; * = FDR-adjusted p < {alpha:g}")
    return fig


def strongest_pairs(
    correlations: pd.DataFrame, n: int = 4, *, method: str = "spearman"
) -> pd.DataFrame:
    """The ``n`` index x muscle x level x score pairs with the smallest p in any group.

    Ties are broken by the largest ``|rho|``; each pair appears once (its best group is kept).
    """
    rows = correlations[(correlations["method"] == method) & correlations["p"].notna()].copy()
    if rows.empty or n <= 0:
        return rows.head(0)
    rows["abs_rho"] = rows["rho"].abs()
    rows = rows.sort_values(["p", "abs_rho"], ascending=[True, False], kind="stable")
    best = rows.drop_duplicates(["index", "muscle", "level", "score"], keep="first")
    return best.head(n).drop(columns="abs_rho").reset_index(drop=True)


def scatter_pairs(
    asymmetry: pd.DataFrame, scores: pd.DataFrame, pairs: pd.DataFrame, *, ncols: int = 2
) -> Figure:
    """Scatter plots of the given pairs with a least-squares line per sex.

    Parameters
    ----------
    asymmetry : pandas.DataFrame
        subject, level, muscle and the index columns.
    scores : pandas.DataFrame
        One row per subject: subject, sex and the score columns.
    pairs : pandas.DataFrame
        Rows with index, muscle, level, score (e.g. :func:`strongest_pairs`).

    Notes
    -----
    Lines are for the eye only; the statistics are rank-based (Spearman rho per sex is given in
    the legend).
    """
    from scipy.stats import spearmanr

    n = max(len(pairs), 1)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(5.2 * ncols, 4.0 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    sc = scores.set_index(scores["subject"].astype(str))
    for ax, pair in zip(axes, pairs.itertuples(index=False), strict=False):
        rows = asymmetry[
            (asymmetry["muscle"] == pair.muscle) & (asymmetry["level"].astype(str) == pair.level)
        ]
        x = pd.to_numeric(rows.set_index(rows["subject"].astype(str))[pair.index], errors="coerce")
        y = pd.to_numeric(sc[pair.score], errors="coerce").reindex(x.index)
        sex = sc["sex"].reindex(x.index) if "sex" in sc else pd.Series(index=x.index, dtype=object)
        for code, colour in SEX_COLOURS.items():
            keep = (sex == code) & x.notna() & y.notna()
            if not keep.any():
                continue
            xs, ys = x[keep].to_numpy(float), y[keep].to_numpy(float)
            rho = spearmanr(xs, ys).statistic if len(xs) >= 3 else float("nan")
            ax.scatter(
                xs,
                ys,
                s=22,
                color=colour,
                alpha=0.85,
                label=f"{SEX_NAMES[code]} (n={len(xs)}, rho={rho:.2f})",
            )
            if len(xs) >= 3 and np.ptp(xs) > 0:
                slope, icpt = np.polyfit(xs, ys, 1)
                grid = np.linspace(xs.min(), xs.max(), 20)
                ax.plot(grid, icpt + slope * grid, color=colour, lw=1.5)
        other = (~sex.isin(list(SEX_COLOURS))) & x.notna() & y.notna()
        if other.any():
            ax.scatter(x[other], y[other], s=22, color="grey", label="sex missing")
        ax.set_xlabel(_label(pair.index, pair.muscle, pair.level))
        ax.set_ylabel(pair.score)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(pairs) :]:
        ax.set_visible(False)
    fig.suptitle("Strongest pairs (line: least squares per sex, for the eye)")
    return fig


def fdr_table(
    correlations: pd.DataFrame, *, alpha: float = 0.05, only_significant: bool = False
) -> pd.DataFrame:
    """Correlations sorted by p with a ``sig`` mark (``*`` where p_fdr < alpha) and caveats.

    Psoas rows involving fat (lfiar, lfiar_log, cdi via FCSA) carry ``psoas T2 fat unreliable``.
    """
    out = correlations.copy()
    out["sig"] = np.where(out["p_fdr"] < alpha, "*", "")
    is_psoas = out["muscle"].astype(str).str.contains("psoas")
    out["caveat"] = np.where(is_psoas, "psoas T2 fat unreliable", "")
    if only_significant:
        out = out[out["sig"] == "*"]
    from helpers.stats import CORRELATION_COLUMNS  # here: importing stats loads pingouin

    # The correlation table's columns, with the mark, group and method first.
    lead = ["sig", "group", "method"]
    cols = [*lead, *(c for c in CORRELATION_COLUMNS if c not in lead), "caveat"]
    out = out.reindex(columns=[c for c in cols if c in out.columns])
    return out.sort_values(["p_fdr", "p"], kind="stable", na_position="last").reset_index(drop=True)


def table1_display(table: pd.DataFrame) -> pd.DataFrame:
    """Table 1 as printed in a paper: variable, men, women, all, test, p."""
    label = table["variable"].astype(str)
    has_level = table["level"].fillna("").astype(str) != ""
    label = label.where(~has_level, label + ": " + table["level"].astype(str))
    out = pd.DataFrame(
        {
            "variable": label,
            "summary": table["summary"].fillna(""),
            "men": table["male_text"],
            "women": table["female_text"],
            "all": table["all_text"],
            "test": table["test"].fillna(""),
            "p": table["p"].map(
                lambda v: "" if pd.isna(v) else (f"{v:.3f}" if v >= 0.001 else "<0.001")
            ),
        }
    )
    return out.reset_index(drop=True)


# ---------------------------------------------------------------------------------- caveats
def caveats_markdown(
    metrics_settings: Mapping[str, Any] | None = None, *, lfiar_floor_pct: float | None = None
) -> str:
    """The formulas used and their caveats, as Markdown for the reports.

    Parameters
    ----------
    metrics_settings : mapping, optional
        The ``metrics`` settings the run used (fat method, bias correction, formulas, ...):
        the CDI and LFIAR formulas stated are the ones they select
        (:func:`helpers.formulas.describe`), the fat method's description comes from
        :data:`helpers.fat_methods.METHODS`.
    lfiar_floor_pct : float, optional
        The LFIAR denominator floor (%) in force.
    """
    settings = dict(metrics_settings or {})
    if lfiar_floor_pct is not None:
        settings["lfiar_floor_pct"] = lfiar_floor_pct
    shown = ", ".join(f"`{k}: {v}`" for k, v in sorted(settings.items())) or "defaults"
    method = str(settings.get("fat_method", fat_methods.DEFAULT_FAT_METHOD))
    described = fat_methods.METHODS.get(method)
    n4 = ("after N4 bias-field correction" if settings.get("bias_correction", True)
          else "without bias-field correction")
    what = f": {described.description}" if described is not None else ""
    fat_line = f"- **Fat** (`fat_method: {method}`){what}; {n4}."
    return "\n".join(
        [
            "### Formulas and caveats",
            "",
            (
                "- **CSA** (mm2): mean per-slice muscle area over the slices where the muscle is present. "
                "**FI** (fat infiltration, %): fat share pooled over all the muscle's voxels. "
                "**FCSA** (functional CSA, mm2) = CSA x (1 - FI / 100)."
            ),
            fat_line,
            *formulas.describe(settings),
            (
                "- The original study's exact formulas are not public; the formulas above are the ones "
                "these settings select (documented defaults unless the study file's `metrics:` "
                "section sets them)."
            ),
            f"- Measurement settings used: {shown}.",
            (
                "- The fat reference (threshold or tissue intensities) is fitted once per subject over "
                "both sides, never per side, so that a side difference is not the threshold's doing."
            ),
            f"- **Psoas:** {PSOAS_CAVEAT}",
            (
                "- Correlations are Spearman (rank) correlations, pairwise complete, overall and by sex; "
                "p values are adjusted by Benjamini-Hochberg FDR within each declared family. "
                "Small samples give wide confidence intervals: read the CI, not only the p value."
            ),
        ]
    )


# ----------------------------------------------------------------------------------- output
def write_tables(
    tables: Mapping[str, pd.DataFrame],
    folder: str | Path,
    *,
    workbook: str = "esma_tables.xlsx",
    notes: str | None = None,
) -> dict[str, Path]:
    """Write every table as ``<name>.csv`` and all of them as sheets of one ``.xlsx`` workbook.

    Parameters
    ----------
    tables : mapping of str to DataFrame
        Sheet/file name -> table (names are cut to Excel's 31 characters for sheets).
    folder : path
        Output folder.
    workbook : str
        File name of the workbook.
    notes : str, optional
        Text for a first ``README`` sheet (e.g. the caveats).

    Returns
    -------
    dict of str to Path
        Name -> CSV path, plus ``"xlsx"`` -> the workbook.
    """
    folder = Path(folder)
    written: dict[str, Path] = {}
    for name, table in tables.items():
        written[name] = atomic_write_text(folder / f"{name}.csv", table.to_csv(index=False))
    target = folder / workbook
    with atomic_path(target) as tmp, pd.ExcelWriter(tmp, engine="openpyxl") as writer:
        if notes:
            lines = [line for line in notes.splitlines() if line.strip()]
            pd.DataFrame({"notes": lines}).to_excel(writer, sheet_name="README", index=False)
        for name, table in tables.items():
            table.to_excel(writer, sheet_name=name[:31], index=False)
    written["xlsx"] = target
    return written
