"""Ingest ACDC (official NIfTI release or SSL4MIS HDF5) into Parquet shards of 2-D slices.

One row per short-axis slice: ``patient, phase, slice, height, width, image (float32),
neighbours (slices k-1, k+1; float32), label (uint8), spacing (z, y, x mm or null), group,
split``. Shards land in
``OUT/train/*.parquet`` and ``OUT/val/*.parquet`` with ``OUT/manifest.json``.

Both readers yield volumes as (z, y, x) arrays, the order SimpleITK gives and the SSL4MIS
files store; slice ``k`` is ``volume[k]`` of shape (H, W) = (y, x).

    python -m raysegment.prepare --source ../shared/acdc --out /tmp/shards
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from raysegment.io.studies import info_from_cfg, nifti_to_zyx, normalize_intensity, parse_info_cfg

FORMAT_VERSION = 2  # 2: adds the neighbours column
PHASES = ("ED", "ES")
SourceFormat = Literal["auto", "acdc-nifti", "ssl4mis-h5"]

# Diagnosis group of the ACDC training release by patient number (the SSL4MIS files carry none).
_GROUP_BY_BLOCK = ("DCM", "HCM", "MINF", "NOR", "RV")
_H5_NAME = re.compile(r"^(patient\d{3})_frame0([12])\.h5$")
_PATIENT_DIR = re.compile(r"^patient\d{3}$")

SCHEMA = pa.schema(
    [
        ("patient", pa.string()),
        ("phase", pa.string()),
        ("slice", pa.int32()),
        ("num_slices", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image", pa.list_(pa.float32())),
        # Slices k-1 and k+1 (2·H·W, zeros beyond the stack) for 2.5-D models.
        ("neighbours", pa.list_(pa.float32())),
        ("label", pa.list_(pa.uint8())),
        ("spacing", pa.list_(pa.float32())),  # (z, y, x) mm, null when unknown
        ("group", pa.string()),
        ("split", pa.string()),
    ]
)


class PrepareError(Exception):
    """Bad input: the message names the file and the problem, on one line."""


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


@dataclass(frozen=True)
class PrepareConfig:
    """What ``prepare`` reads and how it splits. ``val_fraction`` applies when no split file exists."""

    source: Path
    out: Path
    source_format: SourceFormat = "auto"
    val_file: Path | None = None
    val_fraction: float = 0.125
    seed: int = 0
    rows_per_file: int = 256
    row_group_rows: int = 16
    overwrite: bool = False
    progress: bool = True


# --------------------------------------------------------------------------- normalisation


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
    return sorted(p for p in source.rglob("*.h5") if _H5_NAME.match(p.name))


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
                raise PrepareError(f"{path}: missing dataset 'image' or 'label' (missing gt)")
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
    """Patient folders of the official release: SOURCE/[training|testing/]patientNNN/."""
    dirs = [p for p in source.rglob("patient*") if p.is_dir() and _PATIENT_DIR.match(p.name)]
    if source.is_dir() and _PATIENT_DIR.match(source.name):
        dirs.append(source)
    return sorted(dirs)


def read_info_cfg(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise PrepareError(f"{path}: missing Info.cfg (needed for the ED/ES frame numbers)")
    info = parse_info_cfg(path)
    for key in ("ED", "ES"):
        if not info.get(key, "").isdigit():
            raise PrepareError(f"{path}: no integer '{key}:' line")
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
            raise PrepareError(f"{gt_path}: missing gt for the {phase} frame")
        image, zooms = _load_nifti(img_path)
        label, _ = _load_nifti(gt_path)
        image, label = _squeeze_trailing(image), _squeeze_trailing(label)
        if image.ndim != 3 or label.ndim != 3:
            _check_volume(str(img_path), image, label, str(gt_path))
        image, label = nifti_to_zyx(image), nifti_to_zyx(label)
        _check_volume(str(img_path), image, label, str(gt_path))
        volumes.append(
            Volume(
                patient=patient,
                phase=phase,
                image=image,
                label=label.astype(np.uint8),
                spacing=(zooms[2], zooms[1], zooms[0]),
                group=info.get("Group", "unknown"),
                source=str(img_path),
                info=info_from_cfg(info),
            )
        )
    return volumes


def detect_format(source: Path) -> Literal["acdc-nifti", "ssl4mis-h5"]:
    if not source.is_dir():
        raise PrepareError(f"{source}: source folder does not exist")
    if find_patient_dirs(source):
        return "acdc-nifti"
    if find_h5_volumes(source):
        return "ssl4mis-h5"
    raise PrepareError(f"{source}: empty source: no patientNNN/ folders and no patientNNN_frame0X.h5 files")


# --------------------------------------------------------------------------- iteration by patient


@dataclass(frozen=True)
class _PatientRef:
    patient: str
    paths: tuple[Path, ...]


def _patient_refs(source: Path, fmt: str) -> list[_PatientRef]:
    if fmt == "acdc-nifti":
        dirs = find_patient_dirs(source)
        if not dirs:
            raise PrepareError(f"{source}: empty source: no patientNNN/ folders")
        seen: dict[str, Path] = {}
        for d in dirs:
            if d.name in seen:
                raise PrepareError(f"{d}: duplicate patient id {d.name} (also {seen[d.name]})")
            seen[d.name] = d
        return [_PatientRef(d.name, (d,)) for d in dirs]
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
        refs.append(_PatientRef(patient, tuple(sorted(paths))))
    return refs


def _read_patient(ref: _PatientRef, fmt: str, info: dict[str, dict] | None = None) -> list[Volume]:
    if fmt == "acdc-nifti":
        return read_nifti_patient(ref.paths[0])
    volumes = sorted((read_h5_volume(p) for p in ref.paths), key=lambda v: PHASES.index(v.phase))
    if info is not None:
        if ref.patient not in info:
            raise PrepareError(f"{ref.paths[0]}: {ref.patient} has no row in the source's {INFO_CSV}")
        volumes = [with_info(v, info[ref.patient]) for v in volumes]
    return volumes


# --------------------------------------------------------------------------- split


def _read_id_list(path: Path) -> list[str]:
    if not path.is_file():
        raise PrepareError(f"{path}: split file missing")
    ids = []
    for line in path.read_text().split():
        m = re.search(r"patient\d{3}", line)
        if not m:
            raise PrepareError(f"{path}: line {line!r} names no patientNNN")
        ids.append(m.group(0))
    return ids


def assign_splits(patients: dict[str, str], config: PrepareConfig) -> dict[str, str]:
    """Map patient → 'train'|'val'. ``patients`` maps patient → group (for stratification).

    Order of precedence: ``--val-file``; the source's ``val.txt`` (SSL4MIS layout); a seeded
    fraction stratified by diagnosis group.
    """
    val_file = config.val_file
    if val_file is None and (config.source / "val.txt").is_file():
        val_file = config.source / "val.txt"
    if val_file is not None:
        val = set(_read_id_list(val_file))
        unknown = sorted(val - set(patients))
        if unknown:
            raise PrepareError(f"{val_file}: names patients not in the source: {unknown[:5]}")
        return {p: ("val" if p in val else "train") for p in patients}
    if not 0.0 <= config.val_fraction < 1.0:
        raise PrepareError(f"--val-fraction {config.val_fraction}: must be in [0, 1)")
    rng = random.Random(config.seed)
    by_group: dict[str, list[str]] = {}
    for p, g in sorted(patients.items()):
        by_group.setdefault(g, []).append(p)
    for group in sorted(by_group):
        rng.shuffle(by_group[group])
    # Round-robin over groups, so the val set is stratified by diagnosis and has exactly
    # round(N * fraction) patients even when groups are small.
    order = [m for rank in range(max(map(len, by_group.values()))) for g in sorted(by_group)
             for m in by_group[g][rank : rank + 1]]
    val = set(order[: int(round(len(order) * config.val_fraction))])
    return {p: ("val" if p in val else "train") for p in patients}


# --------------------------------------------------------------------------- writing


class _ShardWriter:
    """Writes rows of one split into files of ``rows_per_file`` rows, hashing the content."""

    def __init__(self, folder: Path, rows_per_file: int, row_group_rows: int, digest):
        self.folder = folder
        self.rows_per_file = rows_per_file
        self.row_group_rows = row_group_rows
        self.digest = digest
        self.buffer: list[dict] = []
        self.files = 0
        folder.mkdir(parents=True)

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        table = pa.Table.from_pylist(self.buffer, schema=SCHEMA)
        pq.write_table(
            table,
            self.folder / f"part-{self.files:05d}.parquet",
            row_group_size=self.row_group_rows,
            compression="zstd",
        )
        self.files += 1
        self.buffer = []


def _rows(volume: Volume, split: str) -> Iterator[dict]:
    image = normalize_intensity(volume.image)
    padded = np.pad(image, ((1, 1), (0, 0), (0, 0)))
    for k in range(image.shape[0]):
        yield {
            "patient": volume.patient,
            "phase": volume.phase,
            "slice": k,
            "num_slices": int(image.shape[0]),
            "height": int(image.shape[1]),
            "width": int(image.shape[2]),
            "image": image[k].ravel(),
            "neighbours": np.concatenate([padded[k].ravel(), padded[k + 2].ravel()]),
            "label": volume.label[k].ravel(),
            "spacing": None if volume.spacing is None else [float(s) for s in volume.spacing],
            "group": volume.group,
            "split": split,
        }


def _hash_row(digest, row: dict) -> None:
    meta = f"{row['patient']}|{row['phase']}|{row['slice']}|{row['height']}|{row['width']}|{row['spacing']}|{row['group']}|{row['split']}"
    digest.update(meta.encode())
    digest.update(np.ascontiguousarray(row["image"], np.float32).tobytes())
    digest.update(np.ascontiguousarray(row["label"], np.uint8).tobytes())


def prepare(config: PrepareConfig) -> dict:
    """Read the source, validate everything, write shards atomically; returns the manifest."""
    source, out = Path(config.source), Path(config.out)
    fmt = detect_format(source) if config.source_format == "auto" else config.source_format
    if fmt not in ("acdc-nifti", "ssl4mis-h5"):
        raise PrepareError(f"--format {fmt}: must be auto, acdc-nifti or ssl4mis-h5")
    if not source.is_dir():
        raise PrepareError(f"{source}: source folder does not exist")
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise PrepareError(f"--out {out} is, contains or lies inside --source {source}: choose a folder apart from it")
    if out.exists() and not config.overwrite:
        raise PrepareError(f"{out}: output exists (pass --overwrite to replace it)")
    if out.exists() and not (out / "manifest.json").is_file():
        # --overwrite replaces only what prepare wrote: never a user's folder of other files
        raise PrepareError(f"{out}: exists and holds no raysegment manifest.json; --overwrite replaces only "
                           f"shards raysegment wrote, so remove or rename it yourself")
    refs = _patient_refs(source, fmt)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        manifest = _write_shards(config, refs, fmt, tmp)
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_shards(config: PrepareConfig, refs: list[_PatientRef], fmt: str, tmp: Path) -> dict:
    # The split needs each patient's group; NIfTI groups live in Info.cfg, read up front.
    info = None
    if fmt == "acdc-nifti":
        groups = {r.patient: read_info_cfg(r.paths[0] / "Info.cfg").get("Group", "unknown") for r in refs}
    else:
        csv_path = Path(config.source) / INFO_CSV
        info = read_info_csv(csv_path) if csv_path.is_file() else None
        groups = {r.patient: (info or {}).get(r.patient, {}).get("group") or _group_from_number(r.patient) for r in refs}
    splits = assign_splits(groups, config)

    digest = hashlib.sha256()
    tmp.mkdir(parents=True)
    writers = {s: _ShardWriter(tmp / s, config.rows_per_file, config.row_group_rows, digest) for s in ("train", "val")}
    counts: dict = {
        "patients": Counter(),
        "volumes": Counter(),
        "slices": Counter(),
        "slices_by_phase": Counter(),
        "patients_by_group": Counter(),
        "voxels_by_class": Counter(),
    }
    spacing_known, patients = True, {}
    for ref in tqdm(refs, desc="prepare", unit="patient", disable=not config.progress, file=sys.stderr):
        split = splits[ref.patient]
        volumes = _read_patient(ref, fmt, info)
        patients[ref.patient] = {"group": volumes[0].group, **(volumes[0].info or {}),
                                 "spacing_mm": {v.phase: v.spacing and [round(s, 6) for s in v.spacing] for v in volumes}}
        counts["patients"][split] += 1
        counts["patients_by_group"][volumes[0].group] += 1
        for vol in volumes:
            spacing_known &= vol.spacing is not None
            counts["volumes"][split] += 1
            values, n = np.unique(vol.label, return_counts=True)
            for v, c in zip(values.tolist(), n.tolist()):
                counts["voxels_by_class"][str(v)] += c
            for row in _rows(vol, split):
                counts["slices"][split] += 1
                counts["slices_by_phase"][f"{split}/{vol.phase}"] += 1
                _hash_row(digest, row)
                writers[split].add(row)
    for w in writers.values():
        w.flush()
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": str(Path(config.source).resolve()),
        "source_format": fmt,
        "spacing_known": spacing_known,
        "patients": patients,
        "splits": {s: sorted(p for p, sp in splits.items() if sp == s) for s in ("train", "val")},
        "counts": {k: dict(sorted(v.items())) for k, v in counts.items()},
        "files": {s: w.files for s, w in writers.items()},
        "content_hash": digest.hexdigest(),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def load_manifest(shards: Path | str) -> dict:
    path = Path(shards) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {shards} a folder written by raysegment.data.prepare?")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- CLI
