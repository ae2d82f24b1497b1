"""The patients of an ACDC source in each layout it comes in — the official NIfTI release, the SSL4MIS
HDF5 files, nnU-Net's raw layout — found (``patient_refs``) and read as labelled volumes
(``read_patient``, ``source_patients``). ``data.prepare`` writes them into shards.

Imports ``data.volumes``, ``data.nnunet`` and ``io``; nothing above ``data``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from raysegment.data.nnunet import nnunet_cases, read_nnunet_patient
from raysegment.data.volumes import (
    INFO_CSV,
    PHASES,
    PrepareError,
    Volume,
    detect_format,
    find_h5_volumes,
    find_patient_dirs,
    read_h5_volume,
    read_info_csv,
    read_nifti_patient,
    with_info,
)


@dataclass(frozen=True)
class PatientRef:
    patient: str
    paths: tuple[Path, ...]


def patient_refs(source: Path, fmt: str) -> list[PatientRef]:
    if fmt == "nnunet":
        return [PatientRef(p, tuple(path for _, path in sorted(frames))) for p, frames in nnunet_cases(source).items()]
    if fmt == "acdc-nifti":
        dirs = find_patient_dirs(source)
        if not dirs:
            raise PrepareError(f"{source}: empty source: no patientNNN/ folders")
        _check_one_folder(source, dirs)
        return [PatientRef(d.name, (d,)) for d in dirs]
    files = find_h5_volumes(source)
    if not files:
        raise PrepareError(f"{source}: empty source: no patientNNN_frame0X.h5 files")
    by_patient: dict[str, list[Path]] = {}
    for f in files:
        by_patient.setdefault(f.name[:10], []).append(f)
    refs = []
    for patient, paths in sorted(by_patient.items()):
        names = [p.name for p in paths]
        dup = [n for n, c in Counter(names).items() if c > 1]
        if dup:
            others = [str(p) for p in paths if p.name == dup[0]]
            raise PrepareError(f"{others[1]}: duplicate patient id {patient} (also {others[0]})")
        for frame in ("frame01", "frame02"):
            if f"{patient}_{frame}.h5" not in names:
                raise PrepareError(f"{paths[0].parent / f'{patient}_{frame}.h5'}: missing {frame} of {patient}")
        refs.append(PatientRef(patient, tuple(sorted(paths))))
    return refs


def _check_one_folder(source: Path, dirs: list[Path]) -> None:
    """PrepareError unless every patient folder sits in one folder: the official release's ``training/``
    and ``testing/`` under one ``--source`` would put test patients into the train split unsaid (and
    a copy of a patient elsewhere would be trained on twice)."""
    by_folder = Counter(d.parent for d in dirs)
    if len(by_folder) == 1:
        return
    folders = ", ".join(f"{_shown(folder, source)} ({n})" for folder, n in sorted(by_folder.items()))
    dup = sorted(name for name, n in Counter(d.name for d in dirs).items() if n > 1)
    raise PrepareError(f"{source}: patient folders in {len(by_folder)} folders, {folders}"
                       f"{f' ({dup[0]} in more than one)' if dup else ''}: give one of them as --source, so that "
                       f"no test patient lands in the train split (a test set is prepared on its own, with "
                       f"--val-fraction 1)")


def _shown(folder: Path, source: Path) -> str:
    """``folder`` as the user finds it under ``source``: ``training/``, ``database/testing/``."""
    rel = folder.relative_to(source) if folder.is_relative_to(source) else folder
    return "./" if rel == Path(".") else f"{rel.as_posix()}/"


def read_patient(ref: PatientRef, fmt: str, info: dict[str, dict] | None = None) -> list[Volume]:
    if fmt == "nnunet":
        return read_nnunet_patient(ref.patient, ref.paths)
    if fmt == "acdc-nifti":
        return read_nifti_patient(ref.paths[0])
    volumes = sorted((read_h5_volume(p) for p in ref.paths), key=lambda v: PHASES.index(v.phase))
    if info is not None:
        if ref.patient not in info:
            raise PrepareError(f"{ref.paths[0]}: {ref.patient} has no row in the source's {INFO_CSV}")
        volumes = [with_info(v, info[ref.patient]) for v in volumes]
    return volumes


def source_patients(source: str | Path) -> Iterator[list[Volume]]:
    """Each patient's labelled volumes (ED, ES) of an ACDC source in any of its layouts, with the true
    spacing where the source has it (``Info.cfg``/NIfTI headers, or ``info.csv``), in patient order."""
    source = Path(source)
    fmt = detect_format(source)
    csv_path = source / INFO_CSV
    info = read_info_csv(csv_path) if fmt == "ssl4mis-h5" and csv_path.is_file() else None
    for ref in patient_refs(source, fmt):
        yield read_patient(ref, fmt, info)
