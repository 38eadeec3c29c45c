"""How image and volume intensities in the file's own units (16-bit PNG/TIFF, float, CT Hounsfield
units, MRI signal) become the uint8 pixels vitlab keeps in memory: the ``intensity`` option of the
``imagefolder`` and ``volumes`` sources.

- ``auto`` (the default): 8-bit images as they are; anything deeper (16-bit, 32-bit, float, every
  volume) min-max scaled per image, as ``minmax``.
- ``minmax``: each image (volume) from its own minimum to its own maximum. Removes the scanner's
  and the protocol's scale, and with it any absolute meaning; one bright outlier voxel compresses
  everything else.
- ``percentile``: each image from its own 0.5th to its 99.5th percentile, clipped: minmax that
  ignores a few outliers (hot pixels, metal, contrast agent), as nnU-Net's intensity clipping does.
- ``[low, high]``: one fixed window in the file's units for every image, clipped outside, e.g.
  ``[-1000, 400]`` (a CT lung-to-soft-tissue window in Hounsfield units) or ``[0, 4095]`` (12-bit
  data): absolute intensities stay comparable between images and classes.
"""
from __future__ import annotations

import math
from typing import Tuple, Union

import numpy as np

Intensity = Union[str, Tuple[float, float]]
MODES = ("auto", "minmax", "percentile")
PERCENTILES = (0.5, 99.5)


def check_intensity(value, source: str) -> Intensity:
    """``value`` as ``auto``, ``minmax``, ``percentile`` or a (low, high) window of floats.

    Raises:
        ValueError: one line naming ``source`` and the valid forms.
    """
    if isinstance(value, str) and value in MODES:
        return value
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            and value[0] < value[1]):
        return float(value[0]), float(value[1])
    raise ValueError(f"{source} option intensity={value!r}; valid: 'auto', 'minmax', 'percentile', or a window "
                     f"[low, high] in the files' units with low < high (e.g. [-1000, 400] for CT)")


def to_unit(values: np.ndarray, intensity: Intensity) -> np.ndarray:
    """Floating-point ``values`` (any shape) mapped to [0, 1] as ``intensity`` says, in their own
    dtype; a constant image under ``minmax``/``percentile`` becomes all zeros. Non-finite values
    (NaN, +-inf: masked backgrounds, divisions by zero) count as the lowest finite one, so they
    neither poison the scaling nor stretch it (as 0 would, for data far from 0)."""
    dtype = values.dtype.type
    finite = np.isfinite(values)
    if not finite.all():
        values = np.where(finite, values, values[finite].min() if finite.any() else 0).astype(dtype, copy=False)
    if isinstance(intensity, tuple):
        lo, hi = intensity
    elif intensity == "percentile":
        lo, hi = np.percentile(values, PERCENTILES)
    else:  # auto, minmax
        lo, hi = values.min(), values.max()
    lo, hi = dtype(lo), dtype(hi)
    if not hi > lo:
        return np.zeros_like(values)
    out = (values - lo) / (hi - lo)
    return out if intensity in ("auto", "minmax") else np.clip(out, 0, 1, out=out)
