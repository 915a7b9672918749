"""esma: paraspinal muscle asymmetry from lumbar MRI.

Modules
-------
nifti      NIfTI I/O and geometry checks
labels     label files; left/right from anatomy
fat        the fat step: fraction map and record from image, mask, affine, settings
  tissue_geometry  body outline, subcutaneous band, perimuscular shell (once per scan)
  bias             N4 bias-field correction
  intensity        Rician noise, histogram modes, noise level
  fat_methods      registry of fat classification methods and the reference fit
  arrays           fast connected components, near distance maps, C-order copies
metrics    CSA, fat infiltration, FCSA per slice / level / stack; CDI and LFIAR
formulas   registry of the asymmetry formulas: computed by metrics, stated by the reports
dixon      fat fraction F / (W + F) from a Dixon water/fat pair
contrast   each subject's contrast in the tables and stratified correlations
synthetic  phantoms and cohorts with planted truth (synthetic_dixon: as water/fat pairs)
scores     ODI, SRS-22r, VAS, JOA from item-level answers
stats      Table 1, correlations, FDR, agreement
segment    nnU-Net v2 prediction
config     the validated study (one source of truth for settings)
runs       run bookkeeping: folders, IDs, exit codes, failures, stage records
stages     the pipeline's stages in order: s0_ingest, s1_segment, s2_measure, s3_qc,
           s4_metrics, s5_statistics (what the notebooks call)
provenance manifest.json and index.html of a run
runner     papermill: executes the four notebooks of a run
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("esma")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
