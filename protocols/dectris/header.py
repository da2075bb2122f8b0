"""Plausibility of a series' header: values a detector control unit sends but cannot mean.

An uncalibrated DCU reports ``detector_distance = 0`` (LiberTEM's mocked DECTRIS detector does
too), a beam centre of (0, 0), or the X-ray energy/wavelength it was set up with. Taken literally
they divide by zero, crop the wrong window, or make the wrong wavelength; so each one is set
aside (the configuration or user_data may then supply it) and reported as a warning that names
the header key. What the configuration and user_data give is never second-guessed here.
"""

from __future__ import annotations

import math
from dataclasses import replace

from .schema import SeriesStart

#: CODATA 2018, as the engine's (gpu/geometry.py; h, c and e exact in the SI): importing
#: scipy.constants for them took ~0.1 s of every daemon and bridge start
PLANCK_J_S, LIGHT_M_S, ELEMENTARY_CHARGE_C, ELECTRON_MASS_KG = 6.62607015e-34, 299792458.0, 1.602176634e-19, 9.1093837015e-31

#: beam energies of transmission electron microscopes (30–300 keV) with a margin; a header energy,
#: or the electron energy of a header wavelength, outside this is taken for an X-ray setting
ELECTRON_ENERGY_RANGE_EV = (20e3, 400e3)


def electron_energy(wavelength_m: float | None) -> float | None:
    """Beam energy (eV) of electrons of de Broglie wavelength λ (relativistic)."""
    if wavelength_m is None or not math.isfinite(wavelength_m) or wavelength_m <= 0:
        return None
    mc2 = ELECTRON_MASS_KG * LIGHT_M_S**2
    pc = PLANCK_J_S * LIGHT_M_S / wavelength_m
    # hypot, not sqrt(mc2**2 + pc**2): a float's ** raises OverflowError for a header wavelength
    # below ~1e-160 m (hypot gives inf, which the plausibility check refuses by name)
    return float((math.hypot(mc2, pc) - mc2) / ELEMENTARY_CHARGE_C)


def _plausible_energy(energy_eV: float) -> bool:
    lo, hi = ELECTRON_ENERGY_RANGE_EV
    return lo <= energy_eV <= hi


def check_header(start: SeriesStart) -> tuple[SeriesStart, list[tuple[str, str]]]:
    """The header with implausible values removed, and one (header key, warning) per value."""
    warnings: list[tuple[str, str]] = []
    changes: dict[str, object] = {}

    distance = start.detector_distance_m
    if distance is not None and not (math.isfinite(distance) and distance > 0):
        changes["detector_distance_m"] = None
        warnings.append(("detector_distance", (f"detector_distance = {distance:g} m (an uncalibrated detector "
                         "control unit sends 0): ignored; set camera_length_m or detector_pixel_angle_rad "
                         "in the [dectris] configuration or in user_data")))
    translation = start.detector_translation_m
    if translation is not None and not (all(math.isfinite(v) for v in translation) and translation[2] > 0):
        changes["detector_translation_m"] = None
        warnings.append(("detector_translation", (f"detector_translation z = {translation[2]:g} m is no "
                         "distance: ignored")))

    centre = start.beam_center_px
    if centre is not None:
        h, w = start.image_shape or (math.inf, math.inf)
        if not all(math.isfinite(v) for v in centre) or centre == (0.0, 0.0) \
                or not (0 <= centre[0] < h and 0 <= centre[1] < w):
            changes["beam_center_px"] = None
            warnings.append(("beam_center", (f"beam centre (y, x) = ({centre[0]:g}, {centre[1]:g}) px is not "
                             "a calibrated centre on the detector: ignored; the [dectris] beam_center_px "
                             "or the frame centre is used")))

    energy = start.energy_ev
    if energy is not None and not (math.isfinite(energy) and _plausible_energy(energy)):
        changes["energy_ev"] = None
        warnings.append(("incident_energy", (f"incident_energy = {energy:g} eV is not the beam energy of an "
                         "electron microscope (30–300 keV; an X-ray setting?): ignored")))
    lam = start.wavelength_m
    if lam is not None:
        from_lam = electron_energy(lam)
        if from_lam is None or not _plausible_energy(from_lam):
            changes["wavelength_m"] = None
            shown = "none" if from_lam is None else f"{from_lam:.4g} eV"
            warnings.append(("incident_wavelength", (f"incident_wavelength = {lam * 1e10:g} Å is not an "
                             f"electron wavelength at 30–300 keV (electrons of that wavelength: {shown}; "
                             "an X-ray wavelength?): ignored")))

    saturation = start.saturation_value
    if saturation is not None and saturation < 1:
        # (a negative one stopped the daemon: NumPy cannot clip unsigned counts to it; 0 took
        # every counting pixel of the first image for a dead one)
        changes["saturation_value"] = None
        warnings.append(("saturation_value", (f"saturation_value = {saturation} counts is no count-rate "
                         "cutoff: ignored; the [dectris] saturation_value, else one below the image "
                         "dtype's maximum, is used")))

    images = start.number_of_images
    if images is not None and images < 1:
        # (V1 ntrigger/nimages or a V2 count below 1 bounded the image ids: every image of the
        # series was refused as out of range and the series skipped)
        changes["number_of_images"] = None
        warnings.append(("number_of_images", (f"number_of_images = {images} is no image count: ignored; "
                         "the scan's positions give the count")))

    size = start.pixel_size_m
    if size is not None and not all(math.isfinite(v) and v > 0 for v in size):
        changes["pixel_size_m"] = None
        warnings.append(("pixel_size", f"pixel size {size} m is not positive: ignored"))
    return (replace(start, **changes) if changes else start), warnings
