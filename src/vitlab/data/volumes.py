"""3D volumes: class folders of ``.npy`` / NIfTI files, and the ``mricron-brain`` patch task."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .base import DATASETS, READ_ERRORS, ArrayDataset, DataBundle, int_sizes
from .folders import check_same_classes, class_files, split_folders
from .intensity import Intensity, check_intensity, to_unit
from .locate import find_root, register_place

NIFTI = (".nii", ".nii.gz")


def _nibabel():
    try:
        import nibabel
    except ImportError:
        raise RuntimeError("reading NIfTI (.nii, .nii.gz) needs nibabel: pip install nibabel") from None
    return nibabel


def canonical(img):
    """A nibabel image reoriented to the closest canonical (RAS+) orientation: a flip and/or axis
    permutation of the voxel array, no resampling (the image itself when it is already RAS+)."""
    return _nibabel().as_closest_canonical(img)


def read_volume(path: Path) -> np.ndarray:
    """A volume as (C, H, W, D): ``.npy`` holds (H, W, D) or (C, H, W, D), read as stored; NIfTI holds
    (H, W, D) or (H, W, D, C) (channels/time last, as NIfTI stores them), reoriented first to the
    closest canonical orientation (RAS+: the array's axes run towards the subject's right, anterior
    and superior, as far as whole-axis flips and permutations allow; nibabel's
    ``as_closest_canonical``), so files of the same anatomy stored with different affines give the
    same array, not mirrored or transposed ones. Scanner scaling (``scl_slope`` / ``scl_inter``) is
    applied.

    Raises:
        ValueError: naming the file, when it cannot be read or is not 3-D/4-D.
    """
    name = path.name.lower()
    if not name.endswith((".npy",) + NIFTI):
        raise ValueError(f"volumes: {path} is neither .npy nor NIfTI ({', '.join(NIFTI)})")
    errors: Tuple[type, ...] = READ_ERRORS
    try:
        if name.endswith(".npy"):
            vol = np.load(path, allow_pickle=False)
            vol = vol[None] if vol.ndim == 3 else vol
        else:
            nib = _nibabel()
            errors += (nib.filebasedimages.ImageFileError, nib.orientations.OrientationError)
            vol = np.asanyarray(canonical(nib.load(str(path))).dataobj)
            vol = vol[None] if vol.ndim == 3 else np.moveaxis(vol, -1, 0) if vol.ndim == 4 else vol
    except errors as err:
        raise ValueError(f"volumes: cannot read {path} ({type(err).__name__}: {err})") from None
    if vol.ndim != 4 or not np.issubdtype(vol.dtype, np.number):
        raise ValueError(f"volumes: {path} has shape {vol.shape} ({vol.dtype}); expected a numeric (H, W, D) "
                         f"or (C, H, W, D) volume")
    if np.issubdtype(vol.dtype, np.complexfloating):  # a cast to float would drop the imaginary part silently
        raise ValueError(f"volumes: {path} holds complex values ({vol.dtype}); save the magnitude (np.abs) or the "
                         f"real part as a real-valued volume")
    return vol


def to_uint8(vol: np.ndarray, size: Optional[Tuple[int, int, int]], intensity: Intensity = "auto") -> torch.Tensor:
    """(C, H, W, D) -> uint8 (C, *size): mapped to 0..255 over the whole volume as ``intensity``
    says (``auto``: min-max; :mod:`vitlab.data.intensity`), then resized with trilinear interpolation.
    Non-finite voxels (NaN, +-inf: masks, divisions by zero) count as the volume's lowest finite value."""
    v = torch.from_numpy(to_unit(vol.astype(np.float32), intensity))
    if size is not None and tuple(v.shape[1:]) != tuple(size):
        v = F.interpolate(v[None], size=tuple(size), mode="trilinear", align_corners=False)[0]
    return (v * 255).round_().clamp_(0, 255).to(torch.uint8)


def _read_tree(files: Dict[str, List[Path]], size, intensity: Intensity) -> ArrayDataset:
    vols, labels = [], []
    for label, paths in enumerate(files.values()):
        for path in paths:
            vol = to_uint8(read_volume(path), size, intensity)
            if vols and vol.shape != vols[0].shape:
                raise ValueError(f"volumes: {path} is {tuple(vol.shape)} (C, H, W, D) but earlier volumes are "
                                 f"{tuple(vols[0].shape)}; pass size=(H, W, D) to resize every volume")
            vols.append(vol)
            labels.append(label)
    return ArrayDataset(torch.stack(vols), torch.tensor(labels, dtype=torch.int64), list(files), "volumes")


register_place("volumes", lambda p: p if p.is_dir() else None,
               how="give data.root= a folder with one sub-folder per class of .npy or .nii/.nii.gz volumes "
                   "(optionally under Training/ and Testing/, train/ and test/, or train/ and val/)",
               in_data_root=False)


def check_volume_options(*, size, intensity):
    """The volumes options' values (one-line ValueErrors); returns (size as a tuple or None, intensity)."""
    sizes = None if size is None else int_sizes(size, (3,))
    if size is not None and sizes is None:
        raise ValueError(f"volumes option size={size!r}; expected three positive ints (H, W, D) or None")
    return sizes, check_intensity(intensity, "volumes")


@DATASETS.register("volumes", "3D volumes: class folders of .npy (H, W, D)/(C, H, W, D) or NIfTI files, "
                              "scaled to uint8 (min-max, percentile or a fixed window)", check=check_volume_options,
                   size=lambda **options: check_volume_options(**options)[0])
def volumes(root: Optional[str], seed: int, *, size: Optional[Tuple[int, int, int]] = None,
            intensity: Intensity = "auto") -> DataBundle:
    """Options: ``size``, (H, W, D) to resize every volume (trilinear), or None to keep the files'
    size, which must then agree; ``intensity``, how a volume's values become 0..255: ``auto`` (=
    ``minmax``, per volume), ``percentile`` (0.5th-99.5th, per volume) or a fixed ``[low, high]``
    window in the files' units, e.g. Hounsfield units for CT (:mod:`vitlab.data.intensity`)."""
    size, intensity = check_volume_options(size=size, intensity=intensity)
    folder = find_root("volumes", root)
    train_dir, test_dir = split_folders(folder, "volumes")
    train_files = class_files(train_dir, "volumes")
    test_files = class_files(test_dir, "volumes") if test_dir is not None else None
    if test_files is not None:
        check_same_classes("volumes", list(train_files), list(test_files), folder)
    train = _read_tree(train_files, size, intensity)
    test = _read_tree(test_files, size, intensity) if test_files is not None else None
    return DataBundle(train, test, str(folder))


# --- mricron-brain: 3D patches of the Colin27 ("ch2") T1 template labelled by AAL lobe -------------------

# AAL (Tzourio-Mazoyer et al. 2002, NeuroImage 15:273) region names grouped into coarse classes after
# the paper's Table 2 lobes, with two changes: the "central region" is split (precentral and Rolandic
# operculum -> frontal, postcentral -> parietal), and the insula joins the limbic lobe (paralimbic
# cortex) instead of being a class of its own; the cerebellum (not in Table 2) is a class. Matched by
# name prefix; every one of the 116 AAL names must match exactly one group.
AAL_GROUPS: Dict[str, Tuple[str, ...]] = {
    "frontal": ("Precentral", "Frontal_", "Rolandic_Oper", "Supp_Motor_Area", "Olfactory", "Rectus",
                "Paracentral_Lobule"),
    "parietal": ("Postcentral", "Parietal_", "SupraMarginal", "Angular", "Precuneus"),
    "temporal": ("Heschl", "Temporal_Sup_", "Temporal_Mid_", "Temporal_Inf_"),
    "occipital": ("Calcarine", "Cuneus", "Lingual", "Occipital_", "Fusiform"),
    "limbic": ("Temporal_Pole_", "Cingulum_", "Hippocampus", "ParaHippocampal", "Insula"),
    "subcortical": ("Amygdala", "Caudate", "Putamen", "Pallidum", "Thalamus"),
    "cerebellum": ("Cerebelum_", "Vermis_"),  # sic: AAL spells it "Cerebelum"
}
MRICRON_FILES = ("ch2.nii.gz", "aal.nii.gz", "aal.nii.txt")


def aal_group(region: str) -> str:
    """The coarse class of one AAL region name, e.g. ``Frontal_Sup_L`` -> ``frontal``."""
    hits = [g for g, prefixes in AAL_GROUPS.items() if region.startswith(prefixes)]
    if len(hits) != 1:
        raise ValueError(f"AAL region {region!r} matches {len(hits)} coarse groups {hits}; expected exactly one")
    return hits[0]


def read_aal_names(path: Path) -> Dict[int, str]:
    """{label number: region name} from MRIcron's ``aal.nii.txt`` (lines ``number name code``)."""
    names = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    if not names:
        raise ValueError(f"mricron-brain: {path} lists no AAL regions")
    return names


def _probe_mricron(path: Path) -> Optional[Path]:
    for folder in (path, path / "templates"):
        if all((folder / f).is_file() for f in MRICRON_FILES):
            return folder
    return None


register_place("mricron-brain", _probe_mricron, system=("/usr/share/mricron/templates",),
               how="`apt-get install mricron-data` (Debian/Ubuntu, installs /usr/share/mricron/templates with "
                   "ch2.nii.gz, aal.nii.gz and aal.nii.txt), and `pip install nibabel`")


def check_mricron_options(*, patch, per_class) -> Tuple[int, int, int]:
    """The mricron-brain options' values (one-line ValueErrors); returns the patch size as a tuple."""
    size = int_sizes(patch, (3,))
    if size is None:
        raise ValueError(f"mricron-brain option patch={patch!r}; expected three positive ints")
    if not (isinstance(per_class, int) and not isinstance(per_class, bool) and per_class > 0):
        raise ValueError(f"mricron-brain option per_class={per_class!r}; expected a positive int")
    return size


@DATASETS.register("mricron-brain", "3D T1 patches (Colin27 ch2 template, Debian mricron-data) labelled by AAL "
                                    "lobe: 7 classes", check=check_mricron_options, size=check_mricron_options)
def mricron_brain(root: Optional[str], seed: int, *, patch: Tuple[int, int, int] = (16, 16, 16),
                  per_class: int = 200) -> DataBundle:
    """Patches of ``patch`` voxels (1 mm) cut from the ch2 T1 template around ``per_class`` centres per
    class, drawn (seeded) without replacement from the voxels of each coarse AAL group (see
    ``AAL_GROUPS``); the label is the group at the centre. Intensities: the template min-max scaled
    to uint8. No official test split; note that nearby patches overlap, so a random split shares
    voxels between train and test (spatial leakage): compare methods on the same split."""
    patch = check_mricron_options(patch=patch, per_class=per_class)
    nib = _nibabel()
    folder = find_root("mricron-brain", root)
    t1 = np.asanyarray(canonical(nib.load(str(folder / "ch2.nii.gz"))).dataobj)  # RAS+, as read_volume
    aal = np.asanyarray(canonical(nib.load(str(folder / "aal.nii.gz"))).dataobj).astype(np.int64)
    if t1.shape != aal.shape:
        raise ValueError(f"mricron-brain: ch2 {t1.shape} and aal {aal.shape} are not on the same grid")
    classes = list(AAL_GROUPS)
    lut = np.full(int(aal.max()) + 1, -1, dtype=np.int64)  # AAL label -> coarse class (-1: background)
    for number, region in read_aal_names(folder / "aal.nii.txt").items():
        if number < len(lut):
            lut[number] = classes.index(aal_group(region))
    coarse = lut[aal]
    t1 = to_uint8(t1[None], None)[0].numpy()  # (H, W, D) uint8
    lo = [p // 2 for p in patch]
    padded = np.pad(t1, [(lo_i, p - lo_i) for lo_i, p in zip(lo, patch)])  # a patch never leaves the grid
    rng = np.random.default_rng(seed)
    images = np.empty((per_class * len(classes), 1, *patch), dtype=np.uint8)
    labels = np.repeat(np.arange(len(classes)), per_class)
    for k, name in enumerate(classes):
        voxels = np.flatnonzero(coarse == k)
        if len(voxels) < per_class:
            raise ValueError(f"mricron-brain: class {name} has {len(voxels)} voxels, fewer than per_class={per_class}")
        centres = np.stack(np.unravel_index(rng.choice(voxels, per_class, replace=False), t1.shape), 1)
        for j, (x, y, z) in enumerate(centres):  # centre c spans [c - p//2, c - p//2 + p) = padded[c : c + p]
            images[k * per_class + j, 0] = padded[x:x + patch[0], y:y + patch[1], z:z + patch[2]]
    train = ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), classes, "mricron-brain")
    return DataBundle(train, None, str(folder))
