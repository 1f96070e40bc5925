"""usfm_core: ultrasound foundation models, headless.

Readers (:mod:`usfm_core.io`), preprocessing (:mod:`usfm_core.preprocess`), a B-mode phantom
simulator (:mod:`usfm_core.sim`), models (:mod:`usfm_core.models`), pretraining
(:mod:`usfm_core.pretrain`), fine-tuning (:mod:`usfm_core.finetune`) and evaluation
(:mod:`usfm_core.evaluate`). Never imports napari or Qt.
"""

from usfm_core.errors import USFMError

__version__ = "0.1.0"
__all__ = ["USFMError", "__version__"]
