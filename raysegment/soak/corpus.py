"""The soak's input: a month of studies made from an ACDC source — NIfTI 3-D and 4-D, int16 and
float, oblique affines, official-layout folders with ``Info.cfg``, DICOM cine series — with a share
of bad inputs of ten kinds, each study with the outcome the batch job must settle it with.

Every study lies in its own folder ``sNNNN/``, written to a staging area and renamed into the input
tree when its wave arrives (a rename is atomic: a run never sees half a study).

Imports ``soak.dicom_cine`` only; not ``cli``.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GOOD_KINDS = ("nifti3d_float", "nifti3d_int16", "nifti3d_oblique", "nifti4d", "official", "dicom")
# kind → (ledger status it must settle with, words its reason must hold)
BAD_KINDS = {
    "truncated_gzip": ("failed", "unreadable NIfTI"),
    "zero_byte": ("failed", "empty file"),
    "not_nifti": ("failed", "unreadable NIfTI"),
    "two_d": ("failed", "3-D or 4-D"),
    "nan": ("failed", "NaN or inf"),
    "tiny": ("failed", "too small"),
    "symlink_loop": ("failed", "cannot open"),
    "gt_wrong_shape": ("done", ""),  # the image is fine: segmented, the ground truth flagged and not scored
    "dicom_missing_slice": ("skipped", "an instance is missing"),
    "dicom_not_mr": ("skipped", "not MR"),
}


@dataclass(frozen=True)
class Study:
    """One soak study: its folder (``sNNNN``), kind, arrival wave and the outcome it must get."""

    number: int
    kind: str
    wave: int
    patient: int  # index into the source's patients
    status: str  # done, failed or skipped
    reason: str  # words the ledger reason must hold ("" for done)

    @property
    def folder(self) -> str:
        return f"s{self.number:04d}"

    @property
    def bad(self) -> bool:
        return self.kind in BAD_KINDS


def plan(n_studies: int, bad_share: float, n_patients: int, waves: int, seed: int = 0) -> list[Study]:
    """``n_studies`` studies (an ``official`` folder and a 4-D file count one each), ``bad_share`` of
    them bad, every bad kind at least once when there is room, spread over ``waves`` arrivals."""
    rng = np.random.default_rng(seed)
    n_bad = int(round(n_studies * bad_share))
    bad = [list(BAD_KINDS)[i % len(BAD_KINDS)] for i in range(n_bad)]
    kinds = bad + [GOOD_KINDS[i % len(GOOD_KINDS)] for i in range(n_studies - n_bad)]
    rng.shuffle(kinds)
    out = []
    for i, kind in enumerate(kinds):
        status, reason = BAD_KINDS.get(kind, ("done", ""))
        out.append(Study(i, kind, wave=i * waves // n_studies, patient=int(rng.integers(n_patients)),
                         status=status, reason=reason))
    return out


def write_study(study: Study, volumes: list, folder: Path) -> list[str]:
    """Write ``study`` from its patient's (ED, ES) ``volumes`` into ``folder`` → the DICOM series UIDs
    it holds (``study:series``), none for NIfTI."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    ed = volumes[0]
    spacing = ed.spacing or (10.0, 1.5, 1.5)
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    name = folder / f"study{study.number:04d}.nii.gz"

    def save(data_zyx: np.ndarray, path: Path, aff=affine, dtype=np.float32) -> None:
        data = np.transpose(data_zyx, tuple(range(data_zyx.ndim))[::-1])  # (t,) z, y, x → x, y, z (, t)
        img = nib.Nifti1Image(np.asarray(data, dtype), aff)
        nib.save(img, str(path))

    kind, image = study.kind, ed.image * 1000.0
    if kind in ("nifti3d_float", "gt_wrong_shape"):
        save(image, name)
        if kind == "gt_wrong_shape":
            save(ed.label[:, :-4], folder / f"study{study.number:04d}_gt.nii.gz", dtype=np.uint8)
    elif kind == "nifti3d_int16":
        save(np.round(image), name, dtype=np.int16)
    elif kind == "nifti3d_oblique":
        save(image, name, aff=_oblique(affine))
    elif kind == "nifti4d":
        es = volumes[1].image * 1000.0 if volumes[1].image.shape == ed.image.shape else image[::-1]
        save(np.stack([np.round(image), np.round(es)]), name, dtype=np.int16)  # (t, z, y, x)
    elif kind == "official":
        _official(study, volumes, folder, save)
    elif kind in ("dicom", "dicom_missing_slice", "dicom_not_mr"):
        return [_dicom(study, volumes, folder)]
    else:
        _bad_file(kind, image, name, save)
    return []


def _oblique(affine: np.ndarray) -> np.ndarray:
    from raysegment.soak.dicom_cine import rotated_orientation

    row, col = rotated_orientation()
    rot = np.stack([row, col, np.cross(row, col)], axis=1)
    out = affine.copy()
    out[:3, :3] = rot @ affine[:3, :3]
    return out


def _official(study: Study, volumes: list, folder: Path, save) -> None:
    """``patientNNN/`` with ``Info.cfg`` (no Group line, as held-out data comes) and the ED frame
    with its ground truth: one study."""
    patient = folder / f"patient{900 + study.number % 100:03d}"
    patient.mkdir()
    (patient / "Info.cfg").write_text("ED: 1\nES: 12\nHeight: 172.0\nNbFrame: 30\nWeight: 74.0\n")
    ed = volumes[0]
    save(ed.image * 1000.0, patient / f"{patient.name}_frame01.nii.gz")
    save(ed.label, patient / f"{patient.name}_frame01_gt.nii.gz", dtype=np.uint8)


def _dicom(study: Study, volumes: list, folder: Path) -> str:
    from pydicom.uid import generate_uid

    from raysegment.soak.dicom_cine import write_dicom_cine

    frames = np.stack([v.image for v in volumes]) if volumes[0].image.shape == volumes[1].image.shape \
        else np.stack([volumes[0].image] * 2)
    spacing = volumes[0].spacing or (10.0, 1.5, 1.5)
    skip = {(1, frames.shape[1] // 2)} if study.kind == "dicom_missing_slice" else ()
    study_uid, series_uid = generate_uid(), generate_uid()
    write_dicom_cine(folder, frames, spacing_zyx=spacing, patient=f"SOAK{study.number:04d}", study_uid=study_uid,
                     series_uid=series_uid, modality="OT" if study.kind == "dicom_not_mr" else "MR", skip=skip)
    return f"{study_uid}/{series_uid}"


def _bad_file(kind: str, image: np.ndarray, name: Path, save) -> None:
    if kind == "truncated_gzip":
        save(image, name)
        data = name.read_bytes()
        name.write_bytes(data[: len(data) // 2])
    elif kind == "zero_byte":
        name.write_bytes(b"")
    elif kind == "not_nifti":
        name.write_bytes(gzip.compress(b"patient notes, not an image\n" * 40))
    elif kind == "two_d":
        save(image[0], name)  # one slice as a 2-D image
    elif kind == "nan":
        bad = image.copy()
        bad[0, 0, 0] = np.nan
        save(bad, name)
    elif kind == "tiny":
        save(image[:, :4, :4], name)
    elif kind == "symlink_loop":
        os.symlink(name.name, name)  # points at itself
    else:
        raise ValueError(f"unknown study kind {kind!r}")
