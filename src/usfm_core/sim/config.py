"""Settings of the B-mode phantom simulator.

Every physical quantity is in millimetres, MHz, dB or seconds; the defaults give a 256×256
frame that looks like an abdominal/breast scan from a 5 MHz curvilinear probe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from usfm_core.errors import ConfigError

GEOMETRIES = ("sector", "linear")
LESION_KINDS = ("hypo", "hyper", "mixed")


@dataclass
class SimConfig:
    """What to simulate; pass to :func:`usfm_core.sim.simulate_frame` or ``simulate_cine``.

    Geometry:
        height, width: output frame size in pixels.
        geometry: ``"sector"`` (curvilinear/phased fan, scan-converted) or ``"linear"``
            (rectangle).
        depth_mm: imaging depth from the probe face.
        sector_angle_deg: full opening angle of the fan (sector only).
        apex_radius_mm: radius of the curved probe face (sector only; 0 = phased array apex).
        aperture_mm: width of the linear array (linear only).

    Tissue:
        n_lesions: inclusive range ``(min, max)`` of lesions (an int means exactly that many).
        lesion_kind: ``"hypo"`` (cysts, dark solids), ``"hyper"`` (bright) or ``"mixed"``.
        lesion_radius_mm: inclusive range of the mean lesion radius.
        lesion_irregularity: 0 = ellipses, ~0.4 = lobulated/spiculated outlines.
        n_layers: number of tissue layers below the skin (fat, gland, muscle ...).
        scatterer_density: mean scatterers per tissue cell; < 1 gives sparse, grainy speckle.
        posterior_effects: cysts enhance and bright lesions shadow what lies behind them.

    Imaging:
        frequency_mhz: centre frequency (attenuation and the on-screen label).
        psf_axial_mm, psf_lateral_mm: Gaussian sigma of the pulse envelope and of the beam
            at the focus.
        lateral_widening: extra fractional beam widening at full depth (sector only).
        focus_depth_mm: transmit focus; None = 45 % of the depth.
        attenuation_db_cm_mhz: tissue attenuation (one way).
        tgc_compensation: fraction of the mean attenuation the TGC curve gives back.
        tgc_jitter_db: size of the random slider ripple of the TGC curve.
        dynamic_range_db: log-compression window mapped onto the 8-bit range.
        gain_db: overall gain (brightness).
        noise_db: electronic noise level relative to RMS speckle of unit echogenicity.
        speckle_smoothing: intensity averaged over this fraction of the PSF (compounding,
            persistence); 0 = raw Rayleigh speckle.

    Annotations (drawn after the image, with exact masks):
        text: scanner labels (frequency, depth, measurement, time), depth ticks.
        calipers: ``+`` markers joined by dotted lines, across the largest lesion.
        colour_overlay: colour-Doppler box and colour scale bar; frames become RGB.

    Motion (cines only):
        motion_amplitude_mm: peak tissue displacement.

    seed: random seed; None draws a fresh one (recorded in ``SimFrame.meta["seed"]``).
    """

    height: int = 256
    width: int = 256
    geometry: str = "sector"
    depth_mm: float = 60.0
    sector_angle_deg: float = 60.0
    apex_radius_mm: float = 12.0
    aperture_mm: float = 40.0

    n_lesions: tuple[int, int] = (1, 3)
    lesion_kind: str = "mixed"
    lesion_radius_mm: tuple[float, float] = (3.0, 8.0)
    lesion_irregularity: float = 0.25
    n_layers: int = 3
    scatterer_density: float = 10.0
    posterior_effects: bool = True

    frequency_mhz: float = 5.0
    psf_axial_mm: float = 0.25
    psf_lateral_mm: float = 0.45
    lateral_widening: float = 1.0
    focus_depth_mm: float | None = None
    attenuation_db_cm_mhz: float = 0.6
    tgc_compensation: float = 0.9
    tgc_jitter_db: float = 2.0
    dynamic_range_db: float = 55.0
    gain_db: float = 0.0
    noise_db: float = -60.0
    speckle_smoothing: float = 0.6

    text: bool = False
    calipers: bool = False
    colour_overlay: bool = False

    motion_amplitude_mm: float = 3.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.n_lesions, int):
            self.n_lesions = (self.n_lesions, self.n_lesions)
        self.n_lesions = tuple(int(n) for n in self.n_lesions)  # type: ignore[assignment]
        self.lesion_radius_mm = tuple(float(r) for r in self.lesion_radius_mm)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad value and its accepted range."""

        def bad(name: str, hint: str) -> ConfigError:
            return ConfigError(f"SimConfig.{name} = {getattr(self, name)!r} is invalid", hint=hint)

        if self.height < 32 or self.width < 32:
            raise bad("height" if self.height < 32 else "width", "frames must be ≥ 32 px a side")
        if self.geometry not in GEOMETRIES:
            raise bad("geometry", f"use one of {GEOMETRIES}")
        if self.lesion_kind not in LESION_KINDS:
            raise bad("lesion_kind", f"use one of {LESION_KINDS}")
        if not 5.0 <= self.depth_mm <= 300.0:
            raise bad("depth_mm", "use a depth between 5 and 300 mm")
        if not 5.0 <= self.sector_angle_deg <= 150.0:
            raise bad("sector_angle_deg", "use an opening angle between 5 and 150 degrees")
        if self.apex_radius_mm < 0 or self.aperture_mm <= 0:
            name = "apex_radius_mm" if self.apex_radius_mm < 0 else "aperture_mm"
            raise bad(name, "must be positive (apex radius may be 0)")
        if len(self.n_lesions) != 2 or not 0 <= self.n_lesions[0] <= self.n_lesions[1] <= 20:
            raise bad("n_lesions", "give (min, max) with 0 ≤ min ≤ max ≤ 20, or one int")
        r_lo, r_hi = self.lesion_radius_mm
        if not 0 < r_lo <= r_hi:
            raise bad("lesion_radius_mm", "give (min, max) radii in mm with 0 < min ≤ max")
        if not 0 <= self.lesion_irregularity <= 0.6:
            raise bad("lesion_irregularity", "use a value between 0 and 0.6")
        if self.scatterer_density <= 0:
            raise bad("scatterer_density", "must be > 0 scatterers per cell")
        for name in ("frequency_mhz", "psf_axial_mm", "psf_lateral_mm", "dynamic_range_db"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be > 0")
        if self.n_layers < 0:
            raise bad("n_layers", "must be ≥ 0")
        for name in (
            "lateral_widening",
            "attenuation_db_cm_mhz",
            "tgc_jitter_db",
            "speckle_smoothing",
        ):
            if getattr(self, name) < 0:
                raise bad(name, "must be ≥ 0")
        if self.motion_amplitude_mm < 0:
            raise bad("motion_amplitude_mm", "must be ≥ 0")

    @property
    def focus_mm(self) -> float:
        """Transmit focus depth in mm (default: 45 % of the imaging depth)."""
        return self.focus_depth_mm if self.focus_depth_mm is not None else 0.45 * self.depth_mm

    def with_overrides(self, **overrides: Any) -> SimConfig:
        """A copy with some fields replaced; unknown names raise :class:`ConfigError`."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(
                f"unknown simulator setting(s) {unknown}",
                hint=f"valid SimConfig fields: {', '.join(sorted(names))}",
            )
        return dataclasses.replace(self, **overrides)
