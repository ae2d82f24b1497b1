"""A PACS series from its UIDs to SEGs stored back, recorded in the batch job's ledger: what the
online service does when the PACS pushes a stable series (``serve``), with the same retrieval,
per-study code, SEG UIDs, STOW-RS and ledger keys as ``batch`` — so a later scheduled run finds
the series settled and stores nothing. Imports no Ray."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from raysegment.inference.clinical_sr import store_entry_sr
from raysegment.inference.ledger import Ledger, _entry, _now
from raysegment.inference.study import settle_study
from raysegment.io.dicom import series_key, series_uids

RETRIEVED = "dicom-in"  # under the output: WADO-RS copies of the series being segmented
STALE_RETRIEVAL_S = 24 * 3600  # a retrieval folder this old was left by a killed process


def retrieval_folder(out: Path, series: str) -> Path:
    """Where this process puts a series' retrieved instances: a folder of its own (the service and a
    scheduled run may retrieve one series at once), removed (``drop_retrieved``) once the series'
    entry is recorded — the PACS keeps the images; the output keeps no copy of them."""
    return out / RETRIEVED / f"{series}-{os.getpid()}"


def drop_retrieved(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def clear_stale_retrievals(out: Path) -> None:
    """Remove retrieval folders a killed process left (older than a day: no series takes that long)."""
    root = out / RETRIEVED
    if root.is_dir():
        for folder in root.iterdir():
            try:
                if time.time() - folder.stat().st_mtime > STALE_RETRIEVAL_S:
                    drop_retrieved(folder)
            except OSError:  # removed meanwhile by its own process
                pass


def store_entry(client, entry: dict, ledger: Ledger) -> str:
    """STOW-RS a finished series' SEGs, remove the SEGs of its earlier content from the PACS, then
    the SEG series of the other model versions the ``ledger`` stored for it (the replaced champion's,
    or after a rollback the version rolled back from): the PACS holds one raysegment SEG series per
    series, that of the model that segmented it last, as the output folder does. ``stored`` once the
    PACS holds these; one that deletes nothing keeps the earlier ones beside them, said in the entry's
    ``reason`` and returned ("" when it holds exactly these). A failure turns the entry into an error
    (retried next run; the SEG UIDs follow the content, so nothing is ever stored twice)."""
    from raysegment.io.dicomweb import failure, web_replace_segs
    from raysegment.io.seg import seg_series_uid

    segs = [Path(r["seg"]) for r in entry["rows"] if r.get("seg")]
    series = series_uids(entry["path"])[1]
    others = sorted(ledger.stored_versions(entry["path"]) - {entry["model_version"]})
    try:
        kept = web_replace_segs(client, segs, [seg_series_uid(series, version) for version in others])
        for r in entry["rows"]:
            r["stored"] = True
        if kept:  # a PACS that deletes nothing: done, and said (not an error retried at every run)
            entry["reason"] = kept
        return kept
    except Exception as exc:
        entry["status"], entry["reason"] = "error", failure("STOW-RS", exc, 300)
        return ""


def segment_pacs_series(client, study: str, series: str, predictor, model_uri: str, out: Path,
                        store: bool = True, ledger: Ledger | None = None, diagnosis=None,
                        stack_waits: bool = False, sr: bool = True) -> dict:
    """Segment one PACS series (QIDO-RS its instances, WADO-RS them to a ``retrieval_folder``,
    ``settle_study``, STOW-RS the SEGs) unless the ledger ``out/ledger.jsonl`` already holds it
    for ``predictor.version`` → the ledger entry (``{"status": "already_done", ...}`` when settled).
    ``ledger``: a long-lived reader of that file (the service's), refreshed here, so a push reads
    only what was appended since the last one, not a year's ledger whole. With ``store`` and ``sr``,
    the SEGs' series gets its indices SR too (``diagnosis``: its basal ES check, as the results table's);
    one that fails is ``sr_error`` on the returned entry (the next scheduled run stores it).
    ``stack_waits``: a slice of a stack not yet settled is left alone → ``{"status": "waiting", ...}``,
    nothing recorded (the service segments the stack once its slices stopped arriving)."""
    from raysegment.io.dicomweb import failure, push_target, web_retrieve

    key, version = series_key(study, series), predictor.version
    if ledger is None:
        ledger = Ledger(out / "ledger.jsonl")
    else:
        ledger.refresh()
    try:
        series, digest, members = push_target(client, study, series)  # a slice of a stack: the stack
    except Exception as exc:
        return _finish(ledger, _entry(key, "unknown", version, "error", failure("QIDO-RS instance query", exc)))
    key = series_key(study, series)
    if ledger.has(key, digest, version):
        return {"path": key, "sha256": digest, "model_version": version, "status": "already_done", "reason": ""}
    if members and stack_waits:
        return {"path": key, "sha256": digest, "model_version": version, "status": "waiting", "reason": ""}
    folder = retrieval_folder(out, series)
    try:
        try:
            files = [str(p) for p in web_retrieve(client, study, series, folder, digest, members)]
        except Exception as exc:
            return _finish(ledger, _entry(key, digest, version, "error", failure("WADO-RS retrieve", exc)))
        entry = settle_study(key, digest, predictor, model_uri, out, False, files)
        if members:  # its series have no rows of their own (``results_rows``)
            entry["members"] = [series_key(study, m) for m in members]
        if store and entry["status"] == "done":
            store_entry(client, entry, ledger)
        entry = _finish(ledger, entry)
        if sr and store and entry["status"] == "done" and (errors := store_entry_sr(client, entry, out, ledger,
                                                                                     diagnosis)):
            entry = {**entry, "sr_error": errors[0]}
        return entry
    finally:
        drop_retrieved(folder)


def _finish(ledger: Ledger, entry: dict) -> dict:
    entry.setdefault("finished", _now())
    ledger.append(entry)
    return entry


def series_status(ledger: Ledger, study: str, series: str, version: str) -> dict | None:
    """How a PACS series stands in the ``ledger`` (as last refreshed) for ``version``: its last entry,
    when ``version`` wrote it → ``status`` (done, failed, skipped, error: retried by the next run),
    ``reason``, when it finished, the frames segmented and SEGs stored, and the SEG series a viewer
    opens; None when the ledger has no entry for it, or another version's is the last (a rollback:
    that version's SEGs are what the PACS holds until ``version`` segments the series again). A
    slice series of a segmented stack stands as the stack does (its ``series`` is the stack's key)."""
    from raysegment.io.seg import seg_series_uid

    key = series_key(study, series)
    key = ledger.member_of.get(key, key)  # one slice of a stack stored as a series per slice: the stack's
    series = series_uids(key)[1]
    entry = ledger.entries[ledger.latest[key]] if key in ledger.latest else None
    if entry is None or entry["model_version"] != version:
        return None
    rows = entry.get("rows", [])
    stored = sum(1 for r in rows if r.get("stored"))
    return {"series": key, "status": entry["status"], "reason": entry.get("reason", ""), "model_version": version,
            "finished": entry.get("finished"), "seconds": entry.get("seconds"), "frames": len(rows),
            "segs_stored": stored, "seg_series_uid": seg_series_uid(series, version) if stored else None}
