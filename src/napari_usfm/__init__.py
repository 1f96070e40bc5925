"""napari-usfm: the napari plugin of the ultrasound foundation-model toolkit.

Only wires widgets, readers and writers to :mod:`usfm_core`; holds no model logic. Heavy
imports (torch) happen inside the commands, never at napari start-up.
"""

__version__ = "0.1.0"
