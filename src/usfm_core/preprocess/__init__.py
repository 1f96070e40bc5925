"""Preprocessing of ultrasound frames for pretraining (USF-MAE §2.2, US-JEPA §4.3).

* :mod:`~usfm_core.preprocess.region` — scan-region (fan/sector) mask, bbox, crop.
* :mod:`~usfm_core.preprocess.annotations` — text / colour / marker removal + inpainting.
* :mod:`~usfm_core.preprocess.intensity` — percentile rescale, resize, normalisation.
* :mod:`~usfm_core.preprocess.frames` — 3 fps frame sampling of cines.
* :mod:`~usfm_core.preprocess.pipeline` — the whole chain over a folder (``usfm-core preprocess``).
"""

from usfm_core.preprocess.annotations import AnnotationResult, remove_annotations
from usfm_core.preprocess.frames import sample_frame_indices
from usfm_core.preprocess.intensity import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize,
    percentile_rescale,
    resize_keep_aspect,
    to_uint8,
)
from usfm_core.preprocess.pipeline import (
    MANIFEST_COLUMNS,
    PreprocessOptions,
    PreprocessSummary,
    preprocess_folder,
    run_preprocessing,
)
from usfm_core.preprocess.region import crop_to_region, region_bbox, scan_region_mask

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MANIFEST_COLUMNS",
    "AnnotationResult",
    "PreprocessOptions",
    "PreprocessSummary",
    "crop_to_region",
    "normalize",
    "percentile_rescale",
    "preprocess_folder",
    "region_bbox",
    "remove_annotations",
    "resize_keep_aspect",
    "run_preprocessing",
    "sample_frame_indices",
    "scan_region_mask",
    "to_uint8",
]
