"""Evaluation: metrics, US-JEPA corruptions, reports.

- :mod:`~usfm_core.evaluate.metrics`: accuracy / macro-F1 / AUROC, Dice / IoU / HD95, mean ± std.
- :mod:`~usfm_core.evaluate.corruptions`: blur, contrast depletion, correlated speckle (ε 1–3).
- :mod:`~usfm_core.evaluate.report`: ``evaluate_model_dir`` and ``label_efficiency_report``.
"""
