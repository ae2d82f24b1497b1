"""One study → its masks and result rows: a NIfTI study (3-D or 4-D) or a DICOM cine series (NIfTI
mask + one DICOM SEG per frame), volumes (mL), QC flags, overlay. Used by the batch job's actors
and by tests; imports no Ray."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from raysegment.analysis.clinical import add_cine_ef, mark_cine_phases, myocardial_mass_g, qc_flags, volumes_ml, voxel_counts
from raysegment.config import CLASS_NAMES
from raysegment.io.studies import (
    StudyError,
    acdc_phase,
    gt_for,
    info_cfg_flag,
    normalize_intensity,
    read_study,
    save_mask,
    spacing_flag,
    study_stem,
)

# --------------------------------------------------------------------------- one study


def segment_study(path: Path, predictor, model_uri: str, out_dir: Path, figure: bool = False) -> list[dict]:
    """Segment one study file → result rows (one per frame). Raises StudyError on bad input.

    With ``figure`` (or when a frame gets a QC flag) an overlay PNG of frame 0 is written to
    ``out_dir/figures`` from the arrays already in memory, and its path goes in the rows."""
    from raysegment.analysis.levels import level_records
    from raysegment.analysis.metrics import score_records

    img, frames, zooms = read_study(path)
    spacing_zyx = (zooms[2], zooms[1], zooms[0])
    masks, turn = predict_frames(predictor, frames, zooms)
    name = mask_name(path)
    mask_path = out_dir / "masks" / name
    save_mask(masks, img, mask_path)

    gt = gt_for(path)
    gt_frames, gt_flag = None, ""
    if gt is not None:  # unusable ground truth is flagged, never silently ignored
        try:
            _, g, _ = read_study(gt)
            if g.shape == frames.shape:
                gt_frames = g.astype(np.uint8)
            else:
                gt_flag = f"gt_ignored_shape_{'x'.join(map(str, g.shape[1:]))}"
        except StudyError:
            gt_flag = "gt_ignored_unreadable"
    common = {"study": str(path), "phase": acdc_phase(path) or "", "mask": str(mask_path), "model_uri": model_uri,
              "model_version": predictor.version, "status": "done", "reason": "", "in_plane": turn}
    rows = frame_rows(masks, spacing_zyx, common)
    # In an official-layout folder ED and ES are the frame files Info.cfg names: its 4-D file keeps
    # only its frame-volume EF, so that the patient has one set of indices and one diagnosis.
    if not (path.parent / "Info.cfg").is_file():
        mark_cine_phases(rows)
    if gt_frames is not None:
        for t, row in enumerate(rows):
            for rec in score_records(masks[t], gt_frames[t], spacing_zyx):
                row[f"dice_{rec['class']}"] = rec["dice"]
                row[f"hd95_{rec['class']}_mm"] = rec["hd95"]
            for rec in level_records(masks[t], gt_frames[t], spacing_zyx):  # NaN: neither draws it there
                row[f"dice_{rec['class']}_{rec['level']}"] = rec["dice"]
    finish_rows(rows, frames[0], masks[0], figure, out_dir / "figures" / name.replace(".nii.gz", ".png"),
                [f for f in (gt_flag, info_cfg_flag(path), spacing_flag(img)) if f])
    return rows


def predict_frames(predictor, frames: np.ndarray, zooms) -> tuple[np.ndarray, str]:
    """(labels uint8 (frames, z, y, x), the in-plane turn used) of (frames, z, y, x) intensities;
    ``zooms`` (x, y, z) mm. One turn for the whole study, chosen on its first frame."""
    spacing = tuple(zooms)[::-1]
    how = predictor.in_plane_for(frames[0], spacing=spacing)
    return np.stack([predictor.predict(f, spacing=spacing, in_plane=how) for f in frames]), how


def frame_rows(masks: np.ndarray, spacing_zyx, common: dict) -> list[dict]:
    """One result row per frame of (frames, z, y, x) labels: voxels, volumes (mL) and LV mass (g) of
    each structure, the spacing (z, y, x mm), and the ``common`` fields."""
    zooms = tuple(spacing_zyx)[::-1]
    rows = []
    for t, m in enumerate(masks):
        counts = voxel_counts(m)
        vols = volumes_ml(m, zooms, counts)
        rows.append({**common, "frame": t, "spacing_mm": json.dumps([round(z, 4) for z in spacing_zyx]),
                     **{f"voxels_{n}": int(counts[lab]) for lab, n in CLASS_NAMES.items()},
                     **{f"volume_{n}_ml": vols[n] for n in CLASS_NAMES.values()},
                     "lv_myo_mass_g": myocardial_mass_g(vols["myo"])})
    return rows


def finish_rows(rows: list[dict], image0: np.ndarray, mask0: np.ndarray, figure: bool, png: Path,
                extra_flags: list[str] = ()) -> None:
    """A study's rows completed: cine EF, QC flags (and ``extra_flags``) and, when asked or flagged,
    an overlay PNG of frame 0 drawn from the arrays in memory."""
    add_cine_ef(rows)
    for row in rows:
        row["qc_flags"] = ";".join(qc_flags(row) + list(extra_flags))
    if figure or any(row["qc_flags"] for row in rows):
        from raysegment.reporting.report import overlay_thumbnail

        png = overlay_thumbnail(normalize_intensity(image0), mask0, png)
        for row in rows:
            row["figure"] = str(png)


def segment_series(key: str, files: list[Path], predictor, model_uri: str, out_dir: Path, figure: bool = False) -> list[dict]:
    """Segment one DICOM cine series (``key`` = ``dicom:STUDY_UID/SERIES_UID``) → result rows, one per
    frame. Writes the NIfTI mask (the series' geometry as its affine) and one DICOM SEG per frame under
    ``out_dir/dicom/<series uid>/``. ED / ES are the frames of largest / smallest LV volume.
    Raises ``SeriesSkipped`` for a series that is not a short-axis cine MR."""
    from raysegment.io.dicom import Series, read_cine, series_uids
    from raysegment.io.seg import write_segs

    study_uid, series_uid = series_uids(key)
    cine = read_cine(Series(series_uid, study_uid, files))
    masks, turn = predict_frames(predictor, cine.frames, tuple(cine.spacing_zyx)[::-1])
    mask_path = out_dir / "masks" / f"{series_uid}_seg.nii.gz"
    save_mask(masks, cine_reference(cine), mask_path)
    segs = write_segs(cine, masks, predictor.version, out_dir / "dicom" / series_uid)
    common = {"study": key, "phase": "", "mask": str(mask_path), "model_uri": model_uri,
              "model_version": predictor.version, "status": "done", "reason": "", "in_plane": turn,
              "series_description": cine.description,
              **_patient_module(cine.sources[0][0]["ds"])}
    rows = frame_rows(masks, cine.spacing_zyx, common)
    for row, seg in zip(rows, segs):
        row["seg"] = str(seg)
    mark_cine_phases(rows)
    finish_rows(rows, cine.frames[0], masks[0], figure, out_dir / "figures" / f"{series_uid}.png")
    return rows


def cine_reference(cine):
    """A 4-D nibabel image (one volume per cine frame) whose affine, qform and sform are the DICOM
    series' geometry (RAS mm): what a series' NIfTI mask is written on."""
    import nibabel as nib

    ref = nib.Nifti1Image(np.zeros((1, 1, 1, 1), np.uint8), cine.affine)
    ref.set_qform(cine.affine, code=1)
    ref.set_sform(cine.affine, code=1)
    return ref


def folder_cine(folder: Path, series_uid: str | None = None):
    """The short-axis cine series of a DICOM folder, read (``io.dicom.CineVolume``): the one whose
    ``SeriesInstanceUID`` is ``series_uid``, else the folder's only cine series. Raises StudyError
    saying what the folder holds (no DICOM, no cine series and why, several cine series and their UIDs)."""
    from raysegment.io.dicom import SeriesSkipped, find_series, read_cine

    found, bad = find_series(folder)
    if not found:
        why = f"{len(bad)} unreadable, e.g. {bad[0][0].name}: {bad[0][1]}" if bad else "a NIfTI study is given as its file"
        raise StudyError(f"{folder}: no DICOM series under it ({why})")
    if series_uid is not None:
        chosen = [s for s in found if s.uid == series_uid or series_uid in s.members]  # a stack by any of its series
        if not chosen:
            raise StudyError(f"{folder}: no series {series_uid}; it holds {', '.join(s.uid for s in found[:10])}")
        found = chosen
    first, listed, skipped = None, [], []
    for s in found:
        try:
            cine = read_cine(s)
        except SeriesSkipped as exc:
            skipped.append(f"{s.uid}: {exc}")
            continue
        first = first or cine  # the others' pixels are let go: a cine series may hold 100s of MB
        listed.append(f"{cine.series_uid} ({cine.description or 'no description'}, {cine.frames.shape[0]} frames × "
                      f"{cine.frames.shape[1]} slices)")
    if first is None:
        raise StudyError(f"{folder}: no short-axis cine MR series; " + "; ".join(skipped[:5]))
    if len(listed) > 1:
        raise StudyError(f"{folder}: {len(listed)} short-axis cine series; name one (series=UID): {'; '.join(listed)}")
    return first


def _patient_module(ds) -> dict:
    """Patient ID (names the patient in the report), height (cm) and weight (kg, for BSA) from the
    DICOM patient module, when there."""
    out = {"patient_id": str(ds.PatientID)} if str(getattr(ds, "PatientID", "") or "").strip() else {}
    try:
        if float(getattr(ds, "PatientSize", 0) or 0) > 0:
            out["height_cm"] = float(ds.PatientSize) * 100.0  # PatientSize is in metres
        if float(getattr(ds, "PatientWeight", 0) or 0) > 0:
            out["weight_kg"] = float(ds.PatientWeight)
    except (TypeError, ValueError):
        pass
    return out


def mask_name(path: Path) -> str:
    """``<stem>_<hash of the full path>_seg.nii.gz``: unique per input file, so same-named files in
    other folders and ``scan.nii`` beside ``scan.nii.gz`` each keep their own mask."""
    import hashlib

    tag = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return f"{study_stem(path)}_{tag}_seg.nii.gz"


def segment_with_backoff(path: Path, predictor, model_uri: str, out_dir: Path, figure: bool) -> list[dict]:
    """``segment_study``; when the GPU runs out of memory (a large study, or another process on the
    GPU) the predictor's batch is halved and the study tried again, down to 1 slice per pass: an
    environment limit, not a fault of the study. The smaller batch is kept for later studies."""
    import torch

    while True:
        try:
            return segment_study(path, predictor, model_uri, out_dir, figure=figure)
        except torch.cuda.OutOfMemoryError:
            if predictor.config.batch_size <= 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            predictor.config = replace(predictor.config, batch_size=predictor.config.batch_size // 2)
            print(f"[raysegment] out of GPU memory on {path.name}: batch {predictor.config.batch_size} slices now",
                  flush=True)


def settle_study(path: str, digest: str, predictor, model_uri: str, out_dir: Path, figure: bool = False,
                 files: list[str] | None = None) -> dict:
    """Segment one study (``files``: a DICOM series keyed ``dicom:STUDY/SERIES``) → its ledger entry:
    ``done`` with rows, ``skipped`` (not a short-axis cine), ``failed`` (bad input) or ``error`` (the
    environment, retried next run). Every path that segments studies for a ledger calls this."""
    import time

    from raysegment.io.dicom import SeriesSkipped
    t0, f0 = time.perf_counter(), predictor.forward_seconds
    try:
        if files is not None:
            rows = segment_series(path, [Path(f) for f in files], predictor, model_uri, out_dir, figure)
        else:
            rows = segment_with_backoff(Path(path), predictor, model_uri, out_dir, figure)
        status, reason = "done", ""
    except SeriesSkipped as exc:  # not a short-axis cine MR: settled, with the reason
        rows, status, reason = [], "skipped", str(exc)
    except StudyError as exc:  # bad input: failed for good (until --retry-failed)
        rows, status, reason = [], "failed", str(exc)
    except Exception as exc:  # the environment (disk full, read-only output, …): retried next run
        rows, status, reason = [], "error", f"{type(exc).__name__}: {exc}"
    return {"path": path, "sha256": digest, "model_version": predictor.version, "status": status,
            "reason": reason, "seconds": time.perf_counter() - t0,
            "forward_seconds": predictor.forward_seconds - f0, "rows": rows}
