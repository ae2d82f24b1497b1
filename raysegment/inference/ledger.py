"""The batch job's ledger (append-only JSONL, one entry per study content and model version)
and the results table built from it (one row per study frame, per-patient clinical indices and
diagnosis). No Ray.

Imports ``analysis`` and ``io``; nothing above ``inference`` (not ``training``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from raysegment.analysis.clinical import add_patient_ef
from raysegment.io.files import atomic_write, file_stat
from raysegment.io.studies import StudyError, read_study

COMPACT_AT = 3  # lines per entry above which ``refresh`` rewrites the ledger with each key's last line
CLINICAL_CACHE = "clinical.json"  # per patient: what its indices were computed from, and them

# --------------------------------------------------------------------------- ledger


class Ledger:
    """Append-only JSONL of finished studies; the last line for a (path, hash, version) wins, and a
    path's last line says whose masks (and SEGs) the output holds for it.

    Several writers may share one ledger (the scheduled job and the online service): every read,
    append and repair holds an exclusive ``flock`` on ``<ledger>.lock``, so no line is lost to a
    repair racing an append. ``refresh`` reads what the others appended. Not for several threads."""

    def __init__(self, path: Path):
        self.path = path
        self._forget()
        self.refresh()

    def _forget(self) -> None:
        self.entries: dict[tuple[str, str, str], dict] = {}  # in the order last written
        self.latest: dict[str, tuple[str, str, str]] = {}  # path → its last-written entry's key
        self._keys: dict[str, set[tuple[str, str, str]]] = {}  # path → the keys of its entries
        self.member_of: dict[str, str] = {}  # a slice series' path → the stack's it is one slice of
        self._read = (None, 0, 0)  # the file read so far: inode, bytes, lines

    def refresh(self) -> None:
        """Read what was appended since the last read (the whole file when it was replaced); drop a
        torn last line, and when most lines are superseded (a study retried at every poll while its
        PACS was down) rewrite it with the last line of each key, in the same order: what the ledger
        says is unchanged, each poll reads less. A long-lived reader (the service) so reads only
        what is new."""
        if not self.path.exists():  # nothing written yet (and no folder made for a lock by a reader)
            return self._forget()
        with self._locked():
            try:
                st = self.path.stat()
            except FileNotFoundError:
                return self._forget()
            inode, offset, count = self._read
            if st.st_ino != inode or st.st_size < offset:  # rewritten (compacted, repaired) by a writer
                self._forget()
                inode, offset, count = st.st_ino, 0, 0
            with open(self.path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            lines = chunk.split(b"\n")
            torn = lines.pop() != b""  # a last line without its newline: a writer killed mid-line
            for line in lines:
                try:
                    self._put(json.loads(line))
                except json.JSONDecodeError:
                    torn = True
            self._read = (inode, offset + len(chunk), count + len(lines))
            if torn or self._read[2] > COMPACT_AT * len(self.entries) + 100:
                text = "".join(json.dumps(e) + "\n" for e in self.entries.values())
                atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))
                self._read = (self.path.stat().st_ino, len(text.encode()), len(self.entries))

    @contextmanager
    def _locked(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _put(self, e: dict) -> None:
        key = (e["path"], e["sha256"], e["model_version"])
        self.entries.pop(key, None)  # written again: now the latest
        self.entries[key] = e
        self.latest[e["path"]] = key
        self._keys.setdefault(e["path"], set()).add(key)
        for member in e.get("members", ()):
            self.member_of[member] = e["path"]

    def has(self, path: str, digest: str, version: str, retry_failed: bool = False) -> bool:
        """Whether this study content is settled for ``version``: done, or failed for good (bad
        input, a worker it killed), and nothing written for the path since — after a champion's
        rollback the output holds the replaced version's masks, which the version rolled back to
        segments again. Environment errors (status ``error``) are retried by the next run;
        ``retry_failed`` retries failures too."""
        e = self.entries.get((path, digest, version))
        if e is None or self.latest.get(path) != (path, digest, version):
            return False
        return e["status"] in ("done", "skipped") or (e["status"] == "failed" and not retry_failed)

    def stored_versions(self, path: str) -> set[str]:
        """The model versions whose SEGs of study ``path`` (a PACS series) went to the PACS."""
        return {self.entries[k]["model_version"] for k in self._keys.get(path, ())
                if any(r.get("stored") for r in self.entries[k].get("rows", []))}

    def append(self, entry: dict) -> None:
        """Write ``entry`` (fsync'd). The next ``refresh`` reads it back in its place among the lines
        other writers appended meanwhile. After a line another writer left torn (killed mid-write since
        this one last read) it starts a new line, so the torn one alone is dropped, not this entry."""
        with self._locked(), open(self.path, "a+b") as f:
            size = f.seek(0, os.SEEK_END)
            torn = size > 0 and f.seek(size - 1) >= 0 and f.read(1) != b"\n"
            f.write((b"\n" if torn else b"") + json.dumps(entry).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self._put(entry)


def read_cache(path: Path) -> dict:
    """A JSON cache of the output folder (``hashes.json``, ``dicom.json``, ``clinical.json``); {} when
    it is missing or damaged: a cache only saves reading what it describes again."""
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def write_cache(path: Path, cache: dict, before: dict) -> None:
    """Write ``cache`` atomically where it differs from what was read (``before``)."""
    if cache != before:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(cache)))


def _entry(path: str, digest: str, version: str, status: str, reason: str) -> dict:
    """A ledger entry for a study that produced no rows (failed, error)."""
    return {"path": path, "sha256": digest, "model_version": version, "status": status, "reason": reason,
            "seconds": 0.0, "rows": []}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def results_rows(ledger: Ledger) -> list[dict]:
    """One row per study frame, from each study file's latest ledger entry (a file replaced in
    place supersedes its earlier content; its mask was overwritten too). A series that is now one
    slice of a stack (an entry's ``members``) has no row of its own: skipped as a single slice
    before the stack's other series arrived, it is the stack's now."""
    rows = []
    latest = [e for key, e in ledger.entries.items() if ledger.latest[e["path"]] == key]  # in the order last written
    stacked = {m for e in latest for m in e.get("members", ())}
    for e in latest:
        if e["path"] in stacked:
            continue
        if e["status"] == "done":
            rows.extend(e["rows"])
        else:
            rows.append({"study": e["path"], "frame": -1, "status": e["status"], "reason": e["reason"],
                         "model_version": e["model_version"]})
    add_patient_ef(rows)
    return rows


def add_patient_clinical(rows: list[dict], diagnosis=None, cache: dict | None = None) -> None:
    """Per patient with ED and ES segmented — an official-layout folder (Info.cfg names them) or a
    cine study, DICOM series or 4-D NIfTI (its largest / smallest LV frame): ``analysis.patient.assess``
    of the masks on disk (height and weight from Info.cfg or the DICOM patient module give the
    BSA-indexed indices; ``diagnosis``: its basal ES check, group and ``p_<GROUP>``) on both rows; the
    rows' ``ef_lv_pct``/``ef_rv_pct`` become these EFs. Info.cfg's ``Group`` is copied as
    ``group_reference``, for scoring only: it is never an input.

    ``cache`` (patient key → its ``_clinical_stamp`` and indices): a patient whose stamp is unchanged
    keeps its indices unread; left holding this call's patients only."""
    from raysegment.analysis.clinical import ed_es_pairs
    from raysegment.io.studies import info_from_cfg, parse_info_cfg

    known, model = dict(cache or {}), _model_digest(diagnosis)
    by_study: dict[str, list[dict]] = {}  # a cine study's frame rows (every row once: not a scan per patient)
    for r in rows:
        by_study.setdefault(r.get("study"), []).append(r)
    if cache is not None:
        cache.clear()
    for key, phases in ed_es_pairs(rows).items():
        folder = Path(key)
        info = parse_info_cfg(folder / "Info.cfg") if (folder / "Info.cfg").is_file() else {}  # a folder's, not a cine's
        # Info.cfg's height and weight, else the DICOM patient module's on the row
        size = {k: v for k, v in info_from_cfg(info).items() if v is not None}
        height, weight = (size.get(k, phases["ED"].get(k)) for k in ("height_cm", "weight_kg"))
        stamp = _clinical_stamp(phases, height, weight, model)
        hit = known.get(key)
        if stamp is not None and hit is not None and hit["stamp"] == stamp:
            extra = hit["indices"]
        else:
            try:
                extra = _assess_masks(phases, height, weight, diagnosis)
            except (StudyError, OSError, ValueError, KeyError) as exc:
                for r in phases.values():
                    r["clinical_error"] = f"{type(exc).__name__}: {exc}"
                continue
        if cache is not None and stamp is not None:
            cache[key] = {"stamp": stamp, "indices": extra}
        extra = dict(extra)
        if info.get("Group"):
            extra["group_reference"] = info["Group"]
        for r in phases.values():
            r.update(extra)
        # One EF per patient: the frame-volume EF (``add_patient_ef`` / ``add_cine_ef``) of every row of
        # this patient — for a cine study each of its frames — becomes the checked one.
        for r in by_study.get(key) or phases.values():
            r["ef_lv_pct"], r["ef_rv_pct"] = extra["lv_ef_pct"], extra["rv_ef_pct"]


def _assess_masks(phases: dict, height, weight, diagnosis) -> dict:
    """``analysis.patient.assess`` of one patient's ED and ES masks, read from disk."""
    from raysegment.analysis.patient import assess

    # A cine's ED and ES are two frames of one mask file: read it once.
    studies = {path: read_study(Path(path)) for path in {r["mask"] for r in phases.values()}}
    masks = {ph: studies[r["mask"]][1][r["frame"]].astype(np.uint8) for ph, r in phases.items()}
    spacing = tuple(float(z) for z in studies[phases["ED"]["mask"]][2])[::-1]  # the mask's own zooms (mm)
    # The ES mask file stays the network's output; the indices leave out the basal excess.
    return assess(masks["ED"], masks["ES"], spacing, height, weight, diagnosis)


def _model_digest(diagnosis) -> str | None:
    """What identifies the diagnosis model (its JSON's hash) and the code that computes the indices."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        code = version("raysegment")
    except PackageNotFoundError:
        code = "?"
    if diagnosis is None:
        return code
    return f"{code}:{hashlib.sha256(diagnosis.to_json().encode()).hexdigest()[:16]}"


def _clinical_stamp(phases: dict, height, weight, model: str | None) -> list | None:
    """All a patient's indices depend on: each phase's mask file (path, frame; ``file_stat``),
    height (cm), weight (kg) and ``_model_digest``; None when a mask is unnamed or cannot be stat'ed."""
    stamp = [height, weight, model]
    for ph in ("ED", "ES"):
        r = phases[ph]
        stat = file_stat(Path(r["mask"])) if r.get("mask") else None
        if stat is None:
            return None
        stamp += [r["mask"], r.get("frame"), *stat]
    return stamp


def write_results(ledger: Ledger, out: Path, diagnosis=None) -> list[dict]:
    """Rewrite results.parquet/.csv from the ledger (atomically): one row per study frame, with the
    per-patient clinical indices and diagnosis (``add_patient_clinical``; those of patients whose masks,
    size and models are unchanged come from ``OUTPUT/clinical.json``, so a poll that finds nothing new
    reads no mask)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    # By study and frame (the ledger's order is the order studies finished in, which differs per run).
    rows = sorted(results_rows(ledger), key=lambda r: (str(r.get("study", "")), r.get("frame") or 0))
    before = read_cache(out / CLINICAL_CACHE)
    cache = dict(before)
    add_patient_clinical(rows, diagnosis, cache)
    write_cache(out / CLINICAL_CACHE, cache, before)
    if not rows:
        return rows
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("study", "frame", "status"), k))
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
    atomic_write(out / "results.parquet", lambda tmp: pq.write_table(table, tmp))
    atomic_write(out / "results.csv", lambda tmp: pacsv.write_csv(table, tmp))
    return rows
