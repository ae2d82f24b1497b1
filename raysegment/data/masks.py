"""Masks another tool wrote (nnU-Net, MONAI, a script, or ``raysegment.infer`` itself), read onto the
shards' volumes so that they are scored exactly as a model's predictions are: a folder of NIfTI label
maps (0 background, 1 RV, 2 MYO, 3 LV), one per frame, named by the frame's ACDC case
(``patient001_frame01.nii.gz``, ``…_frame01_seg.nii.gz``, ``…_frame01_<hash>_seg.nii.gz``; or
``patient001_ED…``), searched recursively.

Imports ``data.volumes`` and ``io``; nothing above ``data``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from raysegment.data.volumes import Volume
from raysegment.io.studies import hidden, nifti_to_zyx, study_stem

# A predicted frame's file name: the ACDC case, then nothing or "_anything" (a tool's suffix). The
# reference (_gt) and nnU-Net's image channel (_0000) are not predictions.
_BY_FRAME = re.compile(r"^(patient\d{3})_frame(\d{2})(_.+)?$")
_BY_PHASE = re.compile(r"^(patient\d{3})_(ED|ES)(_.+)?$")
_NOT_MASKS = ("_gt", "_0000")
LABELS = 4  # background, RV, MYO, LV


def _key(stem: str) -> tuple[str, str] | None:
    """(patient, 'frameFF' or the phase) of a predicted mask's file stem, else None."""
    for pattern in (_BY_FRAME, _BY_PHASE):
        if (m := pattern.match(stem)) and m.group(3) not in _NOT_MASKS:
            return m.group(1), m.group(2) if pattern is _BY_PHASE else f"frame{m.group(2)}"
    return None


def mask_files(folder: Path) -> dict[tuple[str, str], Path]:
    """(patient, 'frameFF' or 'ED'/'ES') → NIfTI file under ``folder``; two files for one key are an error."""
    found: dict[tuple[str, str], Path] = {}
    for path in sorted(Path(folder).rglob("*.nii*")):
        if hidden(path, Path(folder)):
            continue
        if path.is_file() and re.search(r"\.nii(\.gz)?$", path.name) and (key := _key(study_stem(path))):
            if key in found:
                raise ValueError(f"{found[key]} and {path} are both masks of {key[0]} {key[1]}: "
                                 "give a folder holding one model's masks")
            found[key] = path
    return found


def is_mask_folder(ref: str | Path) -> bool:
    """Whether ``ref`` is a local folder holding NIfTI files named as ACDC frames (and no checkpoint)."""
    path = Path(ref)
    if not path.is_dir() or (path / "config.json").is_file():
        return False
    return any(_key(study_stem(p)) for p in path.rglob("*.nii*"))


def _frame_number(volume: Volume, patients: dict) -> int | None:
    """The ACDC frame number of ``volume`` (its info, else the manifest's patient metadata)."""
    meta = volume.info or patients.get(volume.patient) or {}
    frame = meta.get(f"{volume.phase.lower()}_frame")
    return int(frame) if frame is not None else None


def source_frames(manifest: dict) -> dict[str, Path]:
    """ACDC case (``patient001_frame01``) → a NIfTI file of that frame in the shards' source (official or
    nnU-Net layout, where it is on this machine): the axes masks are turned to. Empty otherwise (HDF5
    has no affine: masks are then read as stored, as the official files store them)."""
    source = Path(manifest.get("source", ""))
    if manifest.get("source_format") not in ("acdc-nifti", "nnunet") or not source.is_dir():
        return {}
    found = {}
    for path in source.rglob("patient*_frame*.nii*"):
        if m := re.match(r"^(patient\d{3}_frame\d{2})(_gt|_0000)?$", study_stem(path)):
            found.setdefault(m.group(1), path)
    return found


def _as_stored_image(mask_img, image: Path | None):
    """``mask_img`` turned to the axes of its frame's source ``image`` where they differ (a tool that
    saved RAS, e.g. MONAI's Orientationd); as it is without one."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    if image is None:
        return mask_img
    image_affine = nib.load(str(image)).affine
    turn = ornt_transform(io_orientation(mask_img.affine), io_orientation(image_affine))
    if (turn == [[i, 1] for i in range(3)]).all():
        return mask_img
    data = apply_orientation(np.asanyarray(mask_img.dataobj), turn)
    return nib.Nifti1Image(data, mask_img.affine @ inv_ornt_aff(turn, mask_img.shape))


def load_label_map(path):
    """A NIfTI file's image, trailing length-1 axes dropped; ValueError naming the file if unreadable."""
    import nibabel as nib

    try:
        return nib.squeeze_image(nib.load(str(path)))
    except Exception as exc:  # truncated gzip, not NIfTI
        raise ValueError(f"{path}: unreadable NIfTI ({type(exc).__name__}: {exc})") from None


def label_map(img, name) -> np.ndarray:
    """A 3-D NIfTI label map (0 bg, 1 RV, 2 MYO, 3 LV) as (z, y, x) uint8; ValueError naming ``name``
    for anything else (4-D one-hot, an image's intensities)."""
    data = np.asanyarray(img.dataobj)
    if data.ndim != 3:
        raise ValueError(f"{name}: a mask is 3-D, this is {data.ndim}-D {data.shape}"
                         + (" (one channel per class? save the argmax)" if data.ndim == 4 and LABELS in data.shape else ""))
    values = np.unique(data)
    if not np.all((values >= 0) & (values < LABELS) & (values == np.round(values))):
        bad = values[(values < 0) | (values >= LABELS) | (values != np.round(values))]
        raise ValueError(f"{name}: not a label map (values 0–3 expected; it holds {bad[:3].tolist()}…): "
                         "give the predicted masks, not the images")
    return nifti_to_zyx(data.astype(np.uint8))


def read_mask(path: Path, volume: Volume, image: Path | None = None) -> np.ndarray:
    """One predicted mask as (z, y, x) uint8 on ``volume``'s grid (turned to the axes of the frame's
    source ``image``, where known), checked: labels 0–3, the volume's shape."""
    mask = label_map(_as_stored_image(load_label_map(path), image), path)
    if mask.shape != volume.label.shape:
        raise ValueError(f"{path}: shape (z, y, x) {mask.shape}, but {volume.patient} {volume.phase} in the "
                         f"shards is {volume.label.shape}: masks must be on the original frame's grid")
    return mask


def read_masks(folder: Path, volumes: list[Volume], manifest: dict | None = None) -> dict[tuple[str, str], np.ndarray]:
    """(patient, phase) → the mask under ``folder`` of each of ``volumes`` (``read_mask``), matched by
    ACDC frame number (the shards' ``manifest`` has them where volumes carry none) or by phase name.
    A volume without a mask is an error naming how many and which."""
    manifest = manifest or {}
    patients, images = manifest.get("patients", {}), source_frames(manifest)
    if not Path(folder).is_dir():
        raise ValueError(f"{folder}: no such folder of masks")
    files = mask_files(folder)
    if not files:
        raise ValueError(f"{folder}: no NIfTI masks named as ACDC frames (patient001_frame01[_suffix].nii.gz)")
    masks, missing = {}, []
    for v in volumes:
        frame = _frame_number(v, patients)
        path = files.get((v.patient, f"frame{frame:02d}")) if frame is not None else None
        path = path or files.get((v.patient, v.phase))
        if path is None:
            missing.append(f"{v.patient}_frame{frame:02d}" if frame is not None else f"{v.patient} {v.phase}")
            continue
        image = images.get(f"{v.patient}_frame{frame:02d}") if frame is not None else None
        masks[(v.patient, v.phase)] = read_mask(path, v, image)
    if missing:
        raise ValueError(f"{folder}: no mask for {len(missing)} of {len(volumes)} volumes ({', '.join(missing[:3])}"
                         f"{', …' if len(missing) > 3 else ''}); score only the splits it covers (--splits)")
    return masks
