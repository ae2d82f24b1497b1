"""ACDC volumes as read from either layout: the ``Volume`` type, the official NIfTI release
(``Info.cfg``; also written, for scoring the way held-out patients are scored), the SSL4MIS HDF5
files with ``info.csv``, and the checks a volume must pass.
Imports ``raysegment.io`` and ``config`` only."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from raysegment.io.studies import (
    ed_es_fault,
    hidden,
    info_from_cfg,
    nifti_to_zyx,
    nnunet_labels_dir,
    nnunet_labels_path,
    parse_info_cfg,
    turn_in_plane,
    turn_spacing,
    zyx_to_nifti,
)

PHASES = ("ED", "ES")
# Diagnosis group of the ACDC training release by patient number (the SSL4MIS files carry none).
_GROUP_BY_BLOCK = ("DCM", "HCM", "MINF", "NOR", "RV")
_H5_NAME = re.compile(r"^(patient\d{3})_frame0([12])\.h5$")
_PATIENT_DIR = re.compile(r"^patient\d{3}$")


class PrepareError(Exception):
    """Bad input: the message names the file and the problem, on one line (one per bad patient)."""


class MissingLabels(PrepareError):
    """A frame without its reference mask (a ``_gt`` file, an HDF5 ``label`` dataset, a file in
    nnU-Net's ``labelsXx``)."""


@dataclass(frozen=True)
class Volume:
    """One labelled 3-D frame. ``image``/``label`` are (z, y, x); ``spacing`` is (z, y, x) mm."""

    patient: str
    phase: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float] | None
    group: str
    source: str
    info: dict | None = None  # patient metadata: height_cm, weight_kg, nb_frames, ed_frame, es_frame (None: unknown)


def in_plane(volume: Volume, how: str) -> Volume:
    """The volume (image, labels and spacing alike) turned in-plane (``io.studies.turn_in_plane``)."""
    if how == "as-stored":
        return volume
    return replace(volume, image=turn_in_plane(volume.image, how), label=turn_in_plane(volume.label, how),
                   spacing=turn_spacing(volume.spacing, how))


# --------------------------------------------------------------------------- validation


def _check_volume(path: str, image: np.ndarray, label: np.ndarray, gt_path: str) -> None:
    if image.ndim != 3:
        raise PrepareError(f"{path}: image must be 3-D (slices, H, W), got {image.ndim}-D shape {image.shape}")
    if label.ndim != 3:
        raise PrepareError(f"{gt_path}: label must be 3-D, got {label.ndim}-D shape {label.shape}")
    if image.shape != label.shape:
        raise PrepareError(f"{gt_path}: label shape {label.shape} does not match image shape {image.shape}")
    if min(image.shape) == 0:
        raise PrepareError(f"{path}: empty volume, shape {image.shape} (no slices or no pixels)")
    if not np.all(np.isfinite(image)):
        raise PrepareError(f"{path}: image holds NaN or inf intensities")
    if np.issubdtype(label.dtype, np.floating) and not np.all(np.isfinite(label)):
        raise PrepareError(f"{gt_path}: label holds NaN or inf values")
    bad = np.setdiff1d(np.unique(label), np.arange(4))
    if bad.size:
        raise PrepareError(f"{gt_path}: label values {bad.tolist()[:5]} outside 0..3 (0 bg, 1 RV, 2 MYO, 3 LV)")
    if np.issubdtype(label.dtype, np.floating) and not np.all(label == np.round(label)):
        raise PrepareError(f"{gt_path}: label holds non-integer values")


def _squeeze_trailing(arr: np.ndarray) -> np.ndarray:
    # Some exporters write a 3-D frame as (x, y, z, 1); that is still one frame.
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr


# --------------------------------------------------------------------------- readers


def _group_from_number(patient: str) -> str:
    number = int(patient[-3:])
    return _GROUP_BY_BLOCK[(number - 1) // 20] if 1 <= number <= 100 else "unknown"


INFO_CSV = "info.csv"
_INFO_FLOATS = ("height_cm", "weight_kg", "pixel_spacing_mm", "slice_spacing_mm")
_INFO_INTS = ("nb_frames", "ed_frame", "es_frame", "num_slices")


def read_info_csv(path: Path) -> dict[str, dict]:
    """``info.csv`` beside an SSL4MIS-layout source → patient → {group, height_cm, weight_kg,
    nb_frames, ed_frame, es_frame, num_slices, pixel_spacing_mm, slice_spacing_mm} (mm, cm, kg)."""
    import csv

    rows: dict[str, dict] = {}
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"patient", *_INFO_FLOATS, *_INFO_INTS} - set(reader.fieldnames or ())
            if missing:
                raise PrepareError(f"{path}: missing columns {sorted(missing)}")
            for line, r in enumerate(reader, start=2):
                try:
                    info = {"group": r.get("group") or "unknown"}
                    info |= {k: float(r[k]) for k in _INFO_FLOATS}
                    info |= {k: int(r[k]) for k in _INFO_INTS}
                except (TypeError, ValueError) as exc:
                    raise PrepareError(f"{path}:{line}: {exc}") from None
                if info["pixel_spacing_mm"] <= 0 or info["slice_spacing_mm"] <= 0:
                    raise PrepareError(f"{path}:{line}: spacing must be > 0 mm")
                rows[r["patient"]] = info
    except OSError as exc:
        raise PrepareError(f"{path}: unreadable ({exc})") from None
    return rows


def with_info(volume: Volume, info: dict | None) -> Volume:
    """The volume with its patient's ``info.csv`` row: true spacing (z, y, x mm), group, metadata."""
    if info is None:
        return volume
    if info["num_slices"] != volume.image.shape[0]:
        raise PrepareError(f"{volume.source}: {volume.image.shape[0]} slices, but {INFO_CSV} says "
                           f"{info['num_slices']} for {volume.patient}")
    spacing = (info["slice_spacing_mm"], info["pixel_spacing_mm"], info["pixel_spacing_mm"])
    meta = {k: info[k] for k in ("height_cm", "weight_kg", "nb_frames", "ed_frame", "es_frame")}
    return replace(volume, spacing=spacing, group=info["group"], info=meta)


def find_h5_volumes(source: Path) -> list[Path]:
    return sorted(p for p in source.rglob("*.h5") if _H5_NAME.match(p.name) and not hidden(p, source))


def read_h5_volume(path: Path) -> Volume:
    """Read one SSL4MIS file ``patientNNN_frame0{1,2}.h5`` (frame01 = ED, frame02 = ES)."""
    import h5py

    match = _H5_NAME.match(path.name)
    if not match:
        raise PrepareError(f"{path}: name is not patientNNN_frame01.h5 or patientNNN_frame02.h5")
    patient, frame = match.group(1), match.group(2)
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f or "label" not in f:
                missing = MissingLabels if "image" in f else PrepareError
                raise missing(f"{path}: missing dataset 'image' or 'label' (missing gt)")
            image = np.asarray(f["image"][()])
            label = np.asarray(f["label"][()])
    except PrepareError:
        raise
    except Exception as exc:  # h5py raises OSError, KeyError, ... on corrupt files
        raise PrepareError(f"{path}: unreadable HDF5 ({type(exc).__name__}: {exc})") from None
    _check_volume(str(path), image, label, str(path))
    return Volume(
        patient=patient,
        phase="ED" if frame == "1" else "ES",
        image=image,
        label=label.astype(np.uint8),
        spacing=None,
        group=_group_from_number(patient),
        source=str(path),
    )


def find_patient_dirs(source: Path) -> list[Path]:
    """Patient folders of the official release: SOURCE/[training|testing/]patientNNN/ (none in hidden
    folders, ``io.studies.hidden``)."""
    dirs = [p for p in source.rglob("patient*") if p.is_dir() and _PATIENT_DIR.match(p.name) and not hidden(p, source)]
    if source.is_dir() and _PATIENT_DIR.match(source.name):
        dirs.append(source)
    return sorted(dirs)


def read_info_cfg(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise PrepareError(f"{path}: missing Info.cfg (needed for the ED/ES frame numbers)")
    info = parse_info_cfg(path)
    if fault := ed_es_fault(info):
        raise PrepareError(f"{path}: {fault[1]}")
    return info


def _load_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    import nibabel as nib

    if not path.is_file():
        raise PrepareError(f"{path}: file missing")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
        zooms = tuple(float(z) for z in img.header.get_zooms())
    except Exception as exc:  # corrupt gzip, truncated file, not NIfTI at all
        raise PrepareError(f"{path}: unreadable NIfTI ({type(exc).__name__}: {exc})") from None
    return data, zooms


def read_nifti_patient(patient_dir: Path) -> list[Volume]:
    """Read ED and ES (image + gt) of one official-layout patient folder."""
    patient = patient_dir.name
    info = read_info_cfg(patient_dir / "Info.cfg")
    volumes = []
    for phase in PHASES:
        frame = int(info[phase])
        img_path = patient_dir / f"{patient}_frame{frame:02d}.nii.gz"
        gt_path = patient_dir / f"{patient}_frame{frame:02d}_gt.nii.gz"
        if not img_path.is_file():
            raise PrepareError(f"{img_path}: image of the {phase} frame named in Info.cfg is missing")
        if not gt_path.is_file():
            raise MissingLabels(f"{gt_path}: missing gt for the {phase} frame")
        volumes.append(read_labelled_nifti(img_path, gt_path, patient, phase, info.get("Group", "unknown"),
                                           info_from_cfg(info)))
    return volumes


def read_labelled_nifti(img_path: Path, gt_path: Path, patient: str, phase: str, group: str, info: dict | None) -> Volume:
    """One frame and its labels from two NIfTI files (spacing from the image's header), checked."""
    image, zooms = _load_nifti(img_path)
    label, _ = _load_nifti(gt_path)
    image, label = _squeeze_trailing(image), _squeeze_trailing(label)
    if image.ndim != 3 or label.ndim != 3:
        _check_volume(str(img_path), image, label, str(gt_path))
    image, label = nifti_to_zyx(image), nifti_to_zyx(label)
    _check_volume(str(img_path), image, label, str(gt_path))
    return Volume(patient=patient, phase=phase, image=image, label=label.astype(np.uint8),
                  spacing=(zooms[2], zooms[1], zooms[0]), group=group, source=str(img_path), info=info)


def write_official_patient(root: Path, volumes: list[Volume], info: dict, scale: float = 1800.0,
                           offset: float = -20.0, group: bool = False) -> list[Path]:
    """One patient's ED and ES ``volumes`` (spacing known) in the official ACDC layout under
    ``root/training/<patient>/``: ``Info.cfg`` (ED, ES, Height, NbFrame, Weight from ``info``, an
    ``info.csv`` row; its Group line only with ``group``, as the held-out patients come without it),
    int16 images ``round(image × scale + offset)`` and uint8 ``_gt`` masks, spacing (mm) in the header.
    Returns the image files, ED first."""
    import nibabel as nib

    patient = volumes[0].patient
    folder = root / "training" / patient
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"ED": info["ed_frame"], "ES": info["es_frame"], **({"Group": info["group"]} if group else {}),
           "Height": info["height_cm"], "NbFrame": info["nb_frames"], "Weight": info["weight_kg"]}
    (folder / "Info.cfg").write_text("".join(f"{k}: {v}\n" for k, v in cfg.items()))
    images = []
    for v in sorted(volumes, key=lambda v: PHASES.index(v.phase)):
        if v.spacing is None:
            raise PrepareError(f"{v.source}: {v.patient} {v.phase} has no spacing to write")
        xyz = tuple(float(z) for z in v.spacing[::-1])
        stem = folder / f"{patient}_frame{int(cfg[v.phase]):02d}"
        for arr, tail in ((np.round(v.image * scale + offset).astype(np.int16), ""), (v.label.astype(np.uint8), "_gt")):
            img = nib.Nifti1Image(zyx_to_nifti(arr), np.diag(xyz + (1.0,)))
            img.header.set_zooms(xyz)
            nib.save(img, f"{stem}{tail}.nii.gz")
        images.append(Path(f"{stem}.nii.gz"))
    return images


def check_source(source: Path) -> None:
    """PrepareError unless ``source`` is a folder (a file given for it is named as one)."""
    if not source.is_dir():
        raise PrepareError(f"{source}: " + ("a file; give the ACDC folder that holds the patients" if source.is_file()
                                            else "source folder does not exist"))


def _nnunet_images(source: Path) -> Path | None:
    """The nnU-Net images folder ``source`` names, where its dataset.json is beside it: a dataset's
    ``imagesTr``, or one of its ``imagesXx`` folders itself (``imagesTs``: the ACDC test patients)."""
    images = source / "imagesTr" if (source / "imagesTr").is_dir() else source
    return images if images.name.startswith("images") and (images.parent / "dataset.json").is_file() else None


def detect_format(source: Path) -> Literal["acdc-nifti", "ssl4mis-h5", "nnunet"]:
    check_source(source)
    if (source / "imagesTr").is_dir() and (source / "labelsTr").is_dir():  # read by ``data.nnunet``
        return "nnunet"
    images = _nnunet_images(source)
    if images is not None and nnunet_labels_dir(images) is not None:
        return "nnunet"  # one of a dataset's imagesXx folders: imagesTs, the ACDC test patients
    if find_patient_dirs(source):
        return "acdc-nifti"
    if find_h5_volumes(source):
        return "ssl4mis-h5"
    if images is not None:  # nnU-Net's ACDC conversion writes imagesTs and no labelsTs
        raise PrepareError(f"{source}: an nnU-Net {images.name}/ without {nnunet_labels_path(images).name}/ beside it; "
                           f"prepare needs the reference masks (nnU-Net's ACDC conversion writes no labelsTs: copy the "
                           f"testing folder's *_gt.nii.gz files there named as the cases, patientNNN_frameFF.nii.gz), or "
                           f"segment it unscored with `python -m raysegment.infer --input {images} --output OUT`")
    if (source / "manifest.json").is_file():
        raise PrepareError(f"{source}: holds shards already (its manifest.json), not an ACDC dataset: give it as "
                           f"--data to train, tune, report or diagnosis")
    raise PrepareError(f"{source}: empty source: no patientNNN/ folders, no patientNNN_frame0X.h5 files and no "
                       f"nnU-Net imagesTr/ + labelsTr/")
