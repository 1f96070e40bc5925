"""B-mode phantom simulator: fast, seeded ultrasound frames and cines with exact ground truth.

No acoustic wave simulation: random scatterers × tissue echogenicity, convolved with a
separable pulse-echo PSF, attenuated, TGC-compensated, log-compressed and scan-converted;
star-shaped lesions; optional burned-in text, calipers and colour overlays with exact masks.

Example::

    frame = simulate_frame(seed=0, geometry="linear", text=True, calipers=True)
    frame.image            # (256, 256) uint8
    frame.lesion_mask > 0  # binary lesion ground truth
    cine = simulate_cine(16, seed=0, motion="breathing")
    export_cine(cine, "out/cine.dcm")  # + out/ground_truth/cine.dcm/lesions.tif, ...
"""

from usfm_core.sim.config import SimConfig
from usfm_core.sim.export import export_cine, export_frame
from usfm_core.sim.simulate import SimCine, SimFrame, simulate_cine, simulate_frame

__all__ = [
    "SimCine",
    "SimConfig",
    "SimFrame",
    "export_cine",
    "export_frame",
    "simulate_cine",
    "simulate_frame",
]
