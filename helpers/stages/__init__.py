"""The pipeline's stages, one module each, in the order a run executes them.

=================  ==========================================================  ===============
module             what it does                                                notebook
=================  ==========================================================  ===============
``s0_ingest``      DICOM export -> NIfTI images (studies with ``ingest:``)     (before a run)
``s1_segment``     a mask per subject (model, given or corrected)              ``01_segment``
``s2_measure``     CSA, fat and asymmetry per subject (cached in ``work/``)    ``02_qc``
``s3_qc``          checks, mosaics, outlier checks, the reviewer's decisions   ``02_qc``
``s4_metrics``     the cohort tables, QC exclusions honoured                   ``03_metrics``
``s5_statistics``  scores, Table 1, correlations, interactions                 ``04_statistics``
=================  ==========================================================  ===============

Each stage reads the declared outputs of the stages before it (never their internals) and
records itself through :mod:`helpers.runs`; :mod:`helpers.stages.cached` is the one
cached-per-subject-task helper.  :mod:`helpers.runner` executes the notebooks that call them.
"""
