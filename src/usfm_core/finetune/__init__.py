"""Label-efficient fine-tuning (OpenUS §4, US-JEPA §5).

- :mod:`~usfm_core.finetune.data`: manifests, grouped / stratified splits, label-ratio subsets.
- :mod:`~usfm_core.finetune.models`: ``Classifier`` and ``Segmenter`` heads on a backbone.
- :mod:`~usfm_core.finetune.train`: ``finetune(...)`` (folder or in-memory data, cancellable).
- :mod:`~usfm_core.finetune.infer`: ``segment_frames`` and ``measure_mask`` (mm measurements).
"""
