"""Study I/O: finding NIfTI studies, reading them as (frames, z, y, x), the one intensity
normalisation (prepare and the Predictor), writing masks on the
input's exact grid, the ACDC ``Info.cfg`` parser and the one (x, y, z) ↔ (z, y, x) transpose. The
output helpers every writer shares are ``io.files``.

nibabel gives voxels in (x, y, z[, t]) order; everything inside raysegment works in
SimpleITK's (z, y, x) order, so slice ``k`` is ``volume[k]`` of shape (H, W) = (y, x).

Imports ``config`` and ``io.files`` only; no stage.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import numpy as np

from raysegment.config import DEFAULT_PERCENTILES, IN_PLANE
from raysegment.io.files import atomic_write


class StudyError(ValueError):
    """Bad input in one study (the message says what); a batch records it and goes on."""


def nifti_to_zyx(data: np.ndarray) -> np.ndarray:
    """nibabel's voxel order → ours: (x, y, z) → (z, y, x), and (x, y, z, t) → (t, z, y, x)."""
    if data.ndim == 4:
        return np.ascontiguousarray(np.transpose(data, (3, 2, 1, 0)))
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0)))


def zyx_to_nifti(data: np.ndarray) -> np.ndarray:
    """The inverse of ``nifti_to_zyx``: (z, y, x) → (x, y, z), (t, z, y, x) → (x, y, z, t)."""
    return np.transpose(data, (3, 2, 1, 0) if data.ndim == 4 else (2, 1, 0))


def turn_in_plane(data: np.ndarray, how: str) -> np.ndarray:
    """``data`` (…, y, x) with its rows or columns reversed, or rows and columns swapped
    (``config.IN_PLANE``); each turn is its own inverse."""
    if how not in IN_PLANE:
        raise ValueError(f"in-plane orientation {how!r}: one of {', '.join(IN_PLANE)}")
    if how == "as-stored":
        return data
    turned = {"rows-reversed": data[..., ::-1, :], "cols-reversed": data[..., ::-1],
              "transposed": np.swapaxes(data, -1, -2)}[how]
    return np.ascontiguousarray(turned)


def turn_spacing(spacing, how: str):
    """A (z, y, x) spacing (mm) as ``turn_in_plane(…, how)`` leaves it: y and x swapped when
    transposed; None stays None."""
    return (spacing[0], spacing[2], spacing[1]) if how == "transposed" and spacing is not None else spacing


def parse_info_cfg(path: Path) -> dict[str, str]:
    """``Key: value`` lines of an ACDC ``Info.cfg`` (ED, ES, Group, Height, NbFrame, Weight)."""
    info: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    return info


def info_from_cfg(info: dict[str, str]) -> dict:
    """Patient metadata from an official ``Info.cfg`` (the keys ``read_info_csv`` gives; None when absent)."""
    def num(key, cast):
        try:
            return cast(float(info[key]))
        except (KeyError, ValueError):
            return None

    return {"height_cm": num("Height", float), "weight_kg": num("Weight", float), "nb_frames": num("NbFrame", int),
            "ed_frame": num("ED", int), "es_frame": num("ES", int)}


def hidden(path: Path, root: Path) -> bool:
    """Whether ``path`` lies under ``root`` in a hidden file or folder (a dot name: the ``._*`` files
    macOS writes beside each file on exFAT and network shares, ``.DS_Store``, ``.snapshot``) or in a
    zip's ``__MACOSX/``: never a study, patient or mask, whatever its name."""
    return any(part.startswith(".") or part == "__MACOSX" for part in path.relative_to(root).parts)


def inside(path: Path, folder: str) -> bool:
    """Whether ``path``, symlinks resolved, is ``folder`` (resolved, as a string) or lies under it: one
    ``realpath`` and a string compare per file (a poll of a large archive asks it of every file)."""
    real = os.path.realpath(path)
    return real == folder or real.startswith(folder.rstrip(os.sep) + os.sep)


def study_stem(path: Path) -> str:
    """File name without ``.nii`` / ``.nii.gz``."""
    return re.sub(r"\.nii(\.gz)?$", "", path.name)


def left_out(path: Path, root: Path, patterns) -> bool:
    """Whether ``path`` (under ``root``) matches one of the glob ``patterns``, by its path relative
    to ``root`` (``*`` crosses folders: ``*_4d.nii.gz``, ``localizers/*``) or by its name."""
    from fnmatch import fnmatchcase

    rel = path.relative_to(root).as_posix()
    return any(fnmatchcase(rel, pat) or fnmatchcase(path.name, pat) for pat in patterns)


def find_studies(root: str | Path, exclude: str | Path | None = None, skip_globs=()) -> list[Path]:
    """Every ``*.nii``/``*.nii.gz`` under ``root`` that is not ground truth (``*_gt``, or in an nnU-Net
    ``labelsXx`` folder), ``hidden``, under ``exclude`` (the job's own output folder, when it lies inside the
    input) nor matched by ``skip_globs`` (``left_out``). Broken or looping symlinks are kept, so
    they get a failed row rather than vanish."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder does not exist")
    skip = str(Path(exclude).resolve()) if exclude is not None else None
    files = []
    for p in root.rglob("*"):
        if not (p.name.endswith(".nii.gz") or p.name.endswith(".nii")) or study_stem(p).endswith("_gt"):
            continue
        if hidden(p, root):
            continue
        if is_nnunet_label(p) or (skip_globs and left_out(p, root, skip_globs)):
            continue
        if p.is_symlink() and not p.exists():
            files.append(p)
        elif p.is_file() and not (skip and inside(p, skip)):
            files.append(p)
    return sorted(files)


def nnunet_labels_path(images: Path) -> Path:
    """Where nnU-Net keeps the labels of an ``imagesXx`` folder: ``labelsXx`` beside it (imagesTr →
    labelsTr, imagesTs → labelsTs), whether or not it is there."""
    return images.with_name("labels" + images.name[len("images"):])


def nnunet_labels_dir(folder: Path) -> Path | None:
    """``labelsXx`` beside an nnU-Net ``imagesXx`` folder where it is there, else None."""
    if folder.name.startswith("images") and (labels := nnunet_labels_path(folder)).is_dir():
        return labels
    return None


def is_nnunet_label(path: Path) -> bool:
    """A file in an nnU-Net ``labelsXx`` folder that has its ``imagesXx`` beside it: ground truth."""
    folder = path.parent
    return folder.name.startswith("labels") and folder.with_name("images" + folder.name[6:]).is_dir()


def gt_for(path: Path) -> Path | None:
    """The ground truth of a study, if any: ``<stem>_gt.nii[.gz]`` beside it, or for an nnU-Net case
    ``imagesXx/NAME_0000.nii.gz`` its ``labelsXx/NAME.nii.gz``."""
    for ext in (".nii.gz", ".nii"):
        cand = path.with_name(study_stem(path) + "_gt" + ext)
        if cand.is_file():
            return cand
    labels = nnunet_labels_dir(path.parent)
    if labels is not None and study_stem(path).endswith("_0000"):
        for ext in (".nii.gz", ".nii"):
            if (cand := labels / (study_stem(path)[:-5] + ext)).is_file():
                return cand
    return None


# An official ACDC frame file's stem, e.g. ``patient001_frame01`` (group 1: the frame number).
OFFICIAL_FRAME = re.compile(r"^patient\d{3}_frame(\d+)$")


def _official_frame(path: Path) -> tuple[int, dict[str, str]] | None:
    """(frame number, its folder's Info.cfg values) of an official-layout frame file, else None."""
    m = OFFICIAL_FRAME.match(study_stem(path))
    info = path.parent / "Info.cfg"
    return (int(m.group(1)), parse_info_cfg(info)) if m and info.is_file() else None


# nnU-Net's name of an ACDC frame in an ``imagesXx`` folder, e.g. ``patient101_frame01_0000`` (channel 0).
NNUNET_FRAME = re.compile(r"^(patient\d{3})_frame(\d+)_0000$")


def nnunet_patient(path: Path) -> str | None:
    """``…/imagesXx/patientNNN`` for an ACDC frame in an nnU-Net images folder (the key its ED and ES
    pair under: the folder holds every patient), else None."""
    m = NNUNET_FRAME.match(study_stem(path))
    return str(path.parent / m.group(1)) if m and path.parent.name.startswith("images") else None


def acdc_phase(path: Path) -> str | None:
    """'ED'/'ES' for an official-layout frame named in its folder's Info.cfg, or for one of the two
    frames of a patient in an nnU-Net images folder (no Info.cfg there: ED is the lower frame number,
    as in all 80 ACDC patients here); else None."""
    frame, values = _official_frame(path) or (None, {})
    for phase in ("ED", "ES"):
        if values.get(phase, "").isdigit() and int(values[phase]) == frame:
            return phase
    if nnunet_patient(path) is not None:
        m = NNUNET_FRAME.match(study_stem(path))
        frames = sorted(int(n.group(2)) for f in path.parent.glob(f"{m.group(1)}_frame*_0000.nii*")
                        if (n := NNUNET_FRAME.match(study_stem(f))))
        if len(frames) == 2:
            return "ED" if int(m.group(2)) == frames[0] else "ES"
    return None


def ed_es_fault(info: dict[str, str]) -> tuple[str, str] | None:
    """(QC flag, reason) when an Info.cfg's ED / ES lines name no usable pair of frames: one is not
    an integer, or both give the same frame; None when they do. ``prepare`` refuses such a patient,
    ``infer`` segments its frames and flags them (no indices)."""
    for key in ("ED", "ES"):
        if not info.get(key, "").isdigit():
            return "info_cfg_without_ed_es", f"no integer '{key}:' line"
    if int(info["ED"]) == int(info["ES"]):
        return "info_cfg_ed_equals_es", f"ED and ES are the same frame ({info['ED']})"
    return None


def info_cfg_flag(path: Path) -> str:
    """For an official-layout frame file whose folder's Info.cfg names no usable ED / ES pair
    (``ed_es_fault``): its QC flag (the patient then gets no indices). Else ''."""
    found = _official_frame(path)
    fault = ed_es_fault(found[1]) if found else None
    return fault[0] if fault else ""


def normalize_intensity(image: np.ndarray, percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> np.ndarray:
    """Scale-free intensity normalisation of one volume to roughly [0, 1].

    Clips to the given percentiles (default 0.5th/99.5th) and maps them to 0/1, so an int16
    export with an arbitrary range and a float file in [0, 1] of the same scan give the same values.
    """
    x = image.astype(np.float64)
    lo, hi = np.percentile(x, list(percentiles))
    if hi <= lo:
        return np.zeros(x.shape, np.float32)
    return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def read_study(path: Path):
    """(nibabel image, data as (frames, z, y, x) float64, zooms (x, y, z) mm). Raises StudyError."""
    import nibabel as nib

    try:
        size = path.stat().st_size
    except OSError as exc:  # a broken or looping symlink, a file gone since discovery
        raise StudyError(f"cannot open ({exc.strerror or exc})") from None
    if size == 0:
        raise StudyError("empty file (0 bytes)")
    nib_log = logging.getLogger("nibabel.global")
    nib_log.addFilter(_SPACING_FLAGGED)
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise StudyError(f"unreadable NIfTI ({type(exc).__name__}: {exc})") from None
    finally:
        nib_log.removeFilter(_SPACING_FLAGGED)
    frames, zooms = study_arrays(img)
    return img, frames, zooms


class _SpacingFlagged(logging.Filter):
    """Drops nibabel's "pixdim[1,2,3] should be non-zero; setting 0 dims to 1", which the study's QC
    flag ``spacing_zero_1mm_assumed`` says (``spacing_flag``): it printed twice per such study, from
    the actor and from the driver reading its mask, the actor's with 300 characters of Ray's ids."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pixdim[1,2,3] should be non-zero" not in record.getMessage()


_SPACING_FLAGGED = _SpacingFlagged()


def study_arrays(img):
    """(data as (frames, z, y, x) float64, zooms (x, y, z) mm) of a loaded NIfTI image, checked:
    3-D or 4-D, in-plane ≥ 8 pixels, finite. Raises StudyError."""
    try:
        data = np.asarray(img.dataobj, dtype=np.float64)
    except Exception as exc:
        raise StudyError(f"unreadable NIfTI ({type(exc).__name__}: {exc})") from None
    if data.ndim not in (3, 4):
        raise StudyError(f"expected a 3-D or 4-D volume, got {data.ndim}-D shape {data.shape}")
    frames = nifti_to_zyx(data if data.ndim == 4 else data[..., None])
    if min(frames.shape[2:4]) < 8:
        raise StudyError(f"in-plane size {frames.shape[2:4]} too small for a short-axis image")
    if not np.all(np.isfinite(frames)):
        raise StudyError("image holds NaN or inf intensities")
    return frames, nifti_zooms(img)


def nifti_zooms(img) -> tuple[float, float, float]:
    """(x, y, z) pixel spacing of a loaded NIfTI image, mm. Raises StudyError unless positive and finite."""
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        raise StudyError(f"pixel spacing (pixdim) {zooms} mm is not positive and finite")
    return zooms


def spacing_flag(img) -> str:
    """``spacing_zero_1mm_assumed`` for an image loaded from a NIfTI file whose header gives a pixel
    spacing of 0 (nibabel reads it as 1 mm: the mask is right, its volumes in mL and mass in g are
    not), else ''."""
    import nibabel as nib

    source = img.file_map.get("header") or img.file_map.get("image")
    if source is None or source.filename is None:
        return ""
    with nib.openers.ImageOpener(source.filename) as f:
        raw = type(img.header).from_fileobj(f, check=False)
    return "spacing_zero_1mm_assumed" if any(float(z) == 0 for z in raw["pixdim"][1:4]) else ""


def save_mask(mask_fzyx: np.ndarray, ref_img, path: Path) -> None:
    """Write (frames, z, y, x) labels as uint8 NIfTI on exactly ``ref_img``'s grid and affine."""
    import nibabel as nib

    data = zyx_to_nifti(mask_fzyx)  # → (x, y, z, frames)
    if len(ref_img.shape) == 3:
        data = data[..., 0]
    out = mask_image(data.astype(np.uint8), ref_img)
    atomic_write(path, lambda tmp: nib.save(out, tmp))


def mask_image(data_xyz: np.ndarray, ref_img):
    """A uint8 NIfTI image of ``data_xyz`` with ``ref_img``'s header, affine, qform and sform."""
    import nibabel as nib

    header = ref_img.header.copy()
    header.set_data_dtype(np.uint8)
    out = nib.Nifti1Image(data_xyz.astype(np.uint8), ref_img.affine, header)
    out.set_qform(ref_img.get_qform(), code=int(ref_img.header["qform_code"]))
    out.set_sform(ref_img.get_sform(), code=int(ref_img.header["sform_code"]))
    out.header["scl_slope"], out.header["scl_inter"] = 1.0, 0.0
    return out
