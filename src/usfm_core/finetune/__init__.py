"""Label-efficient fine-tuning (OpenUS §4, US-JEPA §5).

- :mod:`~usfm_core.finetune.data`: manifests, grouped / stratified splits, label-ratio subsets.
- :mod:`~usfm_core.finetune.models`: ``Classifier`` and ``Segmenter`` heads on a backbone.
- :mod:`~usfm_core.finetune.train`: ``finetune(...)`` (folder or in-memory data, cancellable).
- :mod:`~usfm_core.finetune.infer`: ``segment_frames`` and ``measure_mask`` (mm measurements).
- :mod:`~usfm_core.finetune.suggest`: ``suggest_frames``: which frames to label next.
- :mod:`~usfm_core.finetune.propagate`: ``propagate``: quick warm-started fine-tune on a few
  painted frames, then segment the whole cine (optional temporal smoothing).
- :mod:`~usfm_core.finetune.rounds`: ``run_round``, ``save_round``, ``list_rounds``,
  ``latest_round``: each correct-and-retrain round saved as a model version.
"""
