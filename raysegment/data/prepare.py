"""Ingest ACDC (official NIfTI release, SSL4MIS HDF5 or nnU-Net's raw layout) into Parquet shards of 2-D slices.

One row per short-axis slice: ``patient, phase, slice, height, width, image (float32),
neighbours (slices k-1, k+1; float32), label (uint8), spacing (z, y, x mm or null), group,
split``. Shards land in
``OUT/train/*.parquet`` and ``OUT/val/*.parquet`` with ``OUT/manifest.json``.

The layouts' readers (``data.sources``) yield volumes as (z, y, x) arrays, the order SimpleITK
gives and the SSL4MIS files store; slice ``k`` is ``volume[k]`` of shape (H, W) = (y, x).

    python -m raysegment.prepare --source ../shared/acdc --out /tmp/shards

Imports ``data.sources``, ``data.splits``, ``data.volumes``, ``io`` and ``runtime``; nothing above
``data``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from raysegment.data.sources import PatientRef, patient_refs, read_patient
from raysegment.data.splits import stratified_val
from raysegment.data.volumes import (  # noqa: F401  (Volume, read_h5_volume, read_nifti_patient: imported from here)
    INFO_CSV,
    MissingLabels,
    PrepareError,
    Volume,
    _group_from_number,
    check_source,
    detect_format,
    read_h5_volume,
    read_info_cfg,
    read_info_csv,
    read_nifti_patient,
)
from raysegment.io.studies import normalize_intensity
from raysegment.runtime import clear_stale_scratch

FORMAT_VERSION = 2  # 2: adds the neighbours column
SourceFormat = Literal["auto", "acdc-nifti", "ssl4mis-h5", "nnunet"]
FORMATS = ("acdc-nifti", "ssl4mis-h5", "nnunet")


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


DEFAULT_VAL_FRACTION = 0.125


@dataclass(frozen=True)
class PrepareConfig:
    """What ``prepare`` reads and how it splits (``assign_splits``)."""

    source: Path
    out: Path
    source_format: SourceFormat = "auto"
    val_file: Path | None = None
    fold: int | None = None  # with nnU-Net's splits_final.json as ``val_file``: the fold whose val patients are val
    val_fraction: float | None = None  # None: the source's val.txt where it has one, else DEFAULT_VAL_FRACTION
    seed: int = 0
    rows_per_file: int = 256
    row_group_rows: int = 16
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:  # str paths from Python callers work as from the CLI
        for name in ("source", "out", "val_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))


# --------------------------------------------------------------------------- split


def _read_id_list(path: Path, fold: int | None = None) -> list[str]:
    """The patients a split file names: a text file, one per line, or fold ``fold``'s val cases of
    nnU-Net's ``splits_final.json`` (a patient is val when any of its frames is)."""
    if not path.is_file():
        raise PrepareError(f"{path}: split file missing")
    text = path.read_text()
    if text.lstrip().startswith(("[", "{")):  # nnU-Net's splits_final.json: five folds, train and val each
        return _nnunet_fold(path, text, fold)
    if fold is not None:
        raise PrepareError(f"--fold {fold}: takes nnU-Net's splits_final.json as --val-file, not the text file {path}")
    return _patient_ids(path, text.split())


def _nnunet_fold(path: Path, text: str, fold: int | None) -> list[str]:
    try:
        folds = json.loads(text)
        vals = [f["val"] for f in folds]
    except (ValueError, TypeError, KeyError):
        raise PrepareError(f"{path}: not nnU-Net's splits_final.json (a list of folds, each with 'train' and 'val')") from None
    if fold is None or not 0 <= fold < len(vals):
        raise PrepareError(f"{path}: nnU-Net's splits_final.json with {len(vals)} folds: give --fold K "
                           f"(0…{len(vals) - 1}) to take fold K's val patients as val")
    return sorted(set(_patient_ids(path, vals[fold])))


def _patient_ids(path: Path, names) -> list[str]:
    ids = []
    for name in names:
        m = re.search(r"patient\d{3}", str(name))
        if not m:
            raise PrepareError(f"{path}: {name!r} names no patientNNN")
        ids.append(m.group(0))
    return ids


def assign_splits(patients: dict[str, str], config: PrepareConfig) -> dict[str, str]:
    """Map patient → 'train'|'val'. ``patients`` maps patient → group (for stratification).

    ``--val-file``, or ``--val-fraction`` (a seeded fraction stratified by diagnosis group); with
    neither, the source's ``val.txt`` (SSL4MIS layout), else ``DEFAULT_VAL_FRACTION``.
    """
    if config.val_file is not None and config.val_fraction is not None:
        raise PrepareError(f"--val-file {config.val_file} and --val-fraction {config.val_fraction} both split: give one")
    val_file = config.val_file
    if val_file is None and config.val_fraction is None and (config.source / "val.txt").is_file():
        val_file = config.source / "val.txt"
    if val_file is not None:
        val = set(_read_id_list(val_file, config.fold))
        unknown = sorted(val - set(patients))
        if unknown:
            raise PrepareError(f"{val_file}: names patients not in the source: {unknown[:5]}")
        return {p: ("val" if p in val else "train") for p in patients}
    if config.fold is not None:
        raise PrepareError(f"--fold {config.fold}: takes nnU-Net's splits_final.json as --val-file")
    fraction = DEFAULT_VAL_FRACTION if config.val_fraction is None else config.val_fraction
    if not 0.0 <= fraction <= 1.0:
        raise PrepareError(f"--val-fraction {fraction}: must be in [0, 1]")
    val = stratified_val(patients, fraction, config.seed)
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
    if fmt not in FORMATS:
        raise PrepareError(f"--format {fmt}: must be auto, {', '.join(FORMATS)}")
    check_source(source)
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise PrepareError(f"--out {out} is, contains or lies inside --source {source}: choose a folder apart from it")
    if out.exists() and not config.overwrite:
        raise PrepareError(f"{out}: output exists (pass --overwrite to replace it)")
    if out.exists() and not (out / "manifest.json").is_file():
        # --overwrite replaces only what prepare wrote: never a user's folder of other files
        raise PrepareError(f"{out}: exists and holds no raysegment manifest.json; --overwrite replaces only "
                           f"shards raysegment wrote, so remove or rename it yourself")
    refs = patient_refs(source, fmt)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    # what a prepare killed mid-write left (SIGKILL, a machine that went away): a whole dataset's
    # shards, hundreds of MB, hidden by the dot
    clear_stale_scratch(f".{out.name}.tmp-", out.parent)
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


def _groups(config: PrepareConfig, refs: list[PatientRef], fmt: str, problems: dict) -> tuple[dict, dict | None]:
    """(patient → ACDC group, the SSL4MIS info.csv rows or None): the split needs each patient's group,
    and NIfTI groups live in Info.cfg, read up front (one that cannot be read goes into ``problems``)."""
    if fmt == "acdc-nifti":
        groups = {}
        for r in refs:
            try:
                groups[r.patient] = read_info_cfg(r.paths[0] / "Info.cfg").get("Group", "unknown")
            except PrepareError as exc:
                groups[r.patient], problems[r.patient] = "unknown", exc
        return groups, None
    if fmt == "nnunet":  # the conversion kept no Info.cfg: the group follows the patient number
        return {r.patient: _group_from_number(r.patient) for r in refs}, None
    csv_path = Path(config.source) / INFO_CSV
    info = read_info_csv(csv_path) if csv_path.is_file() else None
    return {r.patient: (info or {}).get(r.patient, {}).get("group") or _group_from_number(r.patient) for r in refs}, info


def _write_shards(config: PrepareConfig, refs: list[PatientRef], fmt: str, tmp: Path) -> dict:
    problems: dict[str, PrepareError] = {}  # patient → what is wrong with it: all of them are told at the end
    groups, info = _groups(config, refs, fmt, problems)
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
    # Into a log file (nohup, `ray job logs`) a bar redrawn ten times a second is one endless line.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    for ref in tqdm(refs, desc="prepare", unit="patient", disable=not config.progress, file=sys.stderr,
                    mininterval=interval):
        split = splits[ref.patient]
        if ref.patient in problems:
            continue
        try:
            volumes = read_patient(ref, fmt, info)
        except PrepareError as exc:
            problems[ref.patient] = exc
            continue
        patients[ref.patient] = {"group": volumes[0].group, **(volumes[0].info or {}),
                                 "spacing_mm": {v.phase: v.spacing and [round(s, 6) for s in v.spacing] for v in volumes}}
        counts["patients"][split] += 1
        counts["patients_by_group"][volumes[0].group] += 1
        for vol in volumes:
            spacing_known &= vol.spacing is not None
            _add_volume(vol, split, writers[split], digest, counts)
    if problems:
        raise _all_problems(list(problems.values()), len(refs), config.source)
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


def _add_volume(vol: Volume, split: str, writer: _ShardWriter, digest, counts: dict) -> None:
    """``vol``'s slices into ``writer`` and the content hash, its voxels and slices into ``counts``."""
    counts["volumes"][split] += 1
    values, n = np.unique(vol.label, return_counts=True)
    for v, c in zip(values.tolist(), n.tolist()):
        counts["voxels_by_class"][str(v)] += c
    for row in _rows(vol, split):
        counts["slices"][split] += 1
        counts["slices_by_phase"][f"{split}/{vol.phase}"] += 1
        _hash_row(digest, row)
        writer.add(row)


MAX_PROBLEMS_SHOWN = 20  # a source of the wrong kind altogether would fill the screen


def _all_problems(problems: list[PrepareError], n_patients: int, source: Path) -> PrepareError:
    """One error for every bad patient of a source (a user fixing 100 patients learns them in one run);
    one line where no patient has reference masks (an unlabelled test set: ``infer``'s input)."""
    if len(problems) == n_patients and all(isinstance(p, MissingLabels) for p in problems):
        return PrepareError(f"{source}: no patient has reference masks ({problems[0]}); prepare makes shards to train "
                            f"and score on. Segment these studies unscored with `python -m raysegment.infer --input "
                            f"{source} --output OUT`")
    if len(problems) == 1:
        return problems[0]
    shown = [str(p) for p in problems[:MAX_PROBLEMS_SHOWN]] + ([f"… and {len(problems) - MAX_PROBLEMS_SHOWN} more"]
                                                              if len(problems) > MAX_PROBLEMS_SHOWN else [])
    return PrepareError(f"{len(problems)} of {n_patients} patients cannot be prepared (nothing was written; fix them "
                        f"or move them out of the source):\n  " + "\n  ".join(shown))


def load_manifest(shards: Path | str) -> dict:
    path = Path(shards) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {shards} a folder written by raysegment.data.prepare?")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- CLI


def sample_shards(out: Path) -> Path:
    """The bundled sample (6 patients) prepared into ``out`` once: the embedded default's data."""
    exists = (out / "manifest.json").exists()
    # Shards written by an older raysegment (another format version) are made again.
    if not exists or load_manifest(out).get("format_version") != FORMAT_VERSION:
        prepare(PrepareConfig(source=Path(__file__).parents[1] / "sample", out=out, progress=False, overwrite=exists))
    return out
