"""Batch inference over new studies with a registered (or local) model, resumable and idempotent.

    python -m raysegment.infer --model models:/raysegment-mobilenet_v2@champion \\
        --input /data/new_studies --output /data/segmentations --mlflow-uri http://127.0.0.1:5000

A study is one NIfTI file (3-D, or 4-D with every frame segmented); files ending ``_gt`` are
ground truth, used for Dice/HD95 when present. Outputs per study: a uint8 mask NIfTI with the
input's affine and grid (``OUTPUT/masks/<name>_seg.nii.gz``). Per batch: ``results.parquet``
and ``results.csv`` (one row per study frame), ``ledger.jsonl`` (one line per study: path,
content hash, model version, status) and ``report.md`` with overlay PNGs.

A study whose (content hash, model version) is in the ledger is skipped; a killed run resumes
where it stopped. A bad study is recorded as failed with its reason and does not stop the rest.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from raysegment.config import CLASS_NAMES
from raysegment.runtime import disable_telemetry
from raysegment.analysis.clinical import add_cine_ef, add_patient_ef, myocardial_mass_g, qc_flags, voxel_counts, volumes_ml
from raysegment.config import PredictConfig, torch_threads
from raysegment.io.dicom import SeriesSkipped
from raysegment.io.studies import (StudyError, acdc_phase, atomic_write, find_studies, gt_for, normalize_intensity, read_study,
                                save_mask, study_stem)
from raysegment.model.weights import sha256


@dataclass(frozen=True)
class InferConfig:
    """One batch run. ``models`` are references ``Predictor.load`` takes (several: an ensemble)."""

    models: tuple[str, ...]  # models:/NAME@ALIAS, models:/NAME/VERSION, checkpoint folders, .safetensors files
    input: str
    output: str
    tracking_uri: str | None = None
    predict: PredictConfig = field(default_factory=PredictConfig)
    # Inference actors; None: as many as the cluster's free CPUs (or GPUs, with gpus_per_actor)
    # hold, at most one per study. On 2 cores two 1-thread actors finished 20 studies in 0.70× the
    # time one 2-thread actor took (README, Benchmarks).
    actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # > 0: each actor holds (a share of) a GPU and predicts on it
    threads: int | None = None  # torch threads per actor; None: ``torch_threads`` policy
    report_figures: int = 4  # overlay PNGs in report.md (flagged studies first; flagged studies always get one)
    limit: int | None = None  # process at most this many new studies (then stop)
    max_attempts: int = 2  # tries of a study whose worker process dies (then: failed, "worker died")
    retry_failed: bool = False  # segment again studies that failed for good in earlier runs
    # Diagnosis of patients with ED and ES: "shipped", a JSON file, models:/raysegment-diagnosis@…, or None
    diagnosis: str | None = "shipped"
    store: bool = True  # DICOMweb input: STOW-RS the SEGs back to the server
    progress: bool = True
    crash_on: str | None = None  # test hook: the worker process exits on a study whose name contains this


# --------------------------------------------------------------------------- one study


def segment_study(path: Path, predictor, model_uri: str, out_dir: Path, figure: bool = False) -> list[dict]:
    """Segment one study file → result rows (one per frame). Raises StudyError on bad input.

    With ``figure`` (or when a frame gets a QC flag) an overlay PNG of frame 0 is written to
    ``out_dir/figures`` from the arrays already in memory, and its path goes in the rows."""
    from raysegment.analysis.metrics import score_records

    img, frames, zooms = read_study(path)
    spacing_zyx = (zooms[2], zooms[1], zooms[0])
    masks = np.stack([predictor.predict(f, spacing=spacing_zyx) for f in frames])
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
              "model_version": predictor.version, "status": "done", "reason": ""}
    rows = frame_rows(masks, spacing_zyx, common)
    if gt_frames is not None:
        for t, row in enumerate(rows):
            for rec in score_records(masks[t], gt_frames[t], spacing_zyx):
                row[f"dice_{rec['class']}"] = rec["dice"]
                row[f"hd95_{rec['class']}_mm"] = rec["hd95"]
    finish_rows(rows, frames[0], masks[0], figure, out_dir / "figures" / name.replace(".nii.gz", ".png"),
                [gt_flag] if gt_flag else [])
    return rows


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
    import nibabel as nib

    from raysegment.io.dicom import Series, read_cine, write_segs

    study_uid, series_uid = key.removeprefix("dicom:").split("/", 1)
    cine = read_cine(Series(series_uid, study_uid, files))
    masks = np.stack([predictor.predict(f, spacing=cine.spacing_zyx) for f in cine.frames])
    mask_path = out_dir / "masks" / f"{series_uid}_seg.nii.gz"
    ref = nib.Nifti1Image(np.zeros((1, 1, 1, 1), np.uint8), cine.affine)  # 4-D: one volume per cine frame
    ref.set_qform(cine.affine, code=1)
    ref.set_sform(cine.affine, code=1)
    save_mask(masks, ref, mask_path)
    segs = write_segs(cine, masks, predictor.version, out_dir / "dicom" / series_uid)
    common = {"study": key, "phase": "", "mask": str(mask_path), "model_uri": model_uri,
              "model_version": predictor.version, "status": "done", "reason": "", "series_description": cine.description,
              **_patient_size(cine.sources[0][0]["ds"])}
    rows = frame_rows(masks, cine.spacing_zyx, common)
    for row, seg in zip(rows, segs):
        row["seg"] = str(seg)
    if len(rows) >= 2:
        lv = [r["volume_lv_ml"] for r in rows]
        ed, es = int(np.argmax(lv)), int(np.argmin(lv))
        if ed != es:
            rows[ed]["phase"], rows[es]["phase"] = "ED", "ES"
    finish_rows(rows, cine.frames[0], masks[0], figure, out_dir / "figures" / f"{series_uid}.png")
    return rows


def _patient_size(ds) -> dict:
    """Height (cm) and weight (kg) from the DICOM patient module, when there (for BSA)."""
    out = {}
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


# --------------------------------------------------------------------------- Ray actors


class SegmentActor:
    """One inference worker (a Ray actor in ``run_batch``): loads the Predictor once, then
    segments one study per call and returns its ledger entry."""

    def __init__(self, config: InferConfig):
        import torch

        from raysegment.inference.predictor import Predictor

        disable_telemetry()
        torch.set_num_threads(torch_threads(config.threads, config.actors or 1, config.cpus_per_actor))
        self.config = config
        self.predictor = Predictor.load(list(config.models), config.predict, config.tracking_uri)
        self.model_uri = " + ".join(config.models)

    def ready(self) -> str:
        return self.predictor.version

    def segment(self, path: str, digest: str, figure: bool, files: list[str] | None = None) -> dict:
        if self.config.crash_on and self.config.crash_on in Path(path).name:
            os._exit(1)  # test hook: the worker process dies as on a segfault or the OOM killer
        t0, f0 = time.perf_counter(), self.predictor.forward_seconds
        try:
            if files is not None:  # a DICOM series
                rows = segment_series(path, [Path(f) for f in files], self.predictor, self.model_uri,
                                      Path(self.config.output), figure)
            else:
                rows = segment_with_backoff(Path(path), self.predictor, self.model_uri, Path(self.config.output), figure)
            status, reason = "done", ""
        except SeriesSkipped as exc:  # not a short-axis cine MR: settled, with the reason
            rows, status, reason = [], "skipped", str(exc)
        except StudyError as exc:  # bad input: failed for good (until --retry-failed)
            rows, status, reason = [], "failed", str(exc)
        except Exception as exc:  # the environment (disk full, read-only output, …): retried next run
            rows, status, reason = [], "error", f"{type(exc).__name__}: {exc}"
        return {"path": path, "sha256": digest, "model_version": self.predictor.version, "status": status,
                "reason": reason, "seconds": time.perf_counter() - t0,
                "forward_seconds": self.predictor.forward_seconds - f0, "rows": rows}


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


# --------------------------------------------------------------------------- ledger


class Ledger:
    """Append-only JSONL of finished studies; the last line for a (path, hash, version) wins."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[tuple[str, str, str], dict] = {}
        if path.exists():
            good = []
            for line in path.read_text().splitlines():
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a killed run
                good.append(line)
                self.entries[(e["path"], e["sha256"], e["model_version"])] = e
            # Drop torn lines for good, so every line of the ledger stays valid JSON.
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(g + "\n" for g in good)))

    def has(self, path: str, digest: str, version: str, retry_failed: bool = False) -> bool:
        """Whether this study content is settled for ``version``: done, or failed for good (bad
        input, a worker it killed). Environment errors (status ``error``) are retried by the next
        run; ``retry_failed`` retries failures too."""
        e = self.entries.get((path, digest, version))
        return e is not None and (e["status"] in ("done", "skipped") or (e["status"] == "failed" and not retry_failed))

    def append(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries[(entry["path"], entry["sha256"], entry["model_version"])] = entry


# --------------------------------------------------------------------------- the batch job


def pinned_models(config: InferConfig) -> tuple[tuple[str, ...], str]:
    """(references with registry aliases pinned to today's version, the version string results key on).

    Pinning makes every actor load the version the ledger records, even if an alias moves mid-batch.
    """
    from raysegment.inference.predictor import is_registry_uri, model_version

    refs, versions = [], []
    for ref in config.models:
        version = model_version(ref, config.tracking_uri)
        refs.append(f"models:/{version}" if is_registry_uri(ref) else ref)
        versions.append(version)
    return tuple(refs), "+".join(versions)


def run_batch(config: InferConfig) -> dict:
    """Segment every new study under ``config.input``; returns counts.

    The actors start first (torch import, model load), while the driver hashes the studies and
    reads the ledger. Each finished study is appended to the ledger at once. A study whose worker
    process dies is tried ``max_attempts`` times, then recorded as failed; the batch goes on.
    """
    import ray

    from raysegment.runtime import ensure_ray

    disable_telemetry()
    # Absolute paths, decided here: actors on other nodes or in other working directories write
    # and read exactly these (a relative --output would land in each worker's own cwd).
    web = is_dicomweb(config.input)
    config = replace(config, input=config.input if web else str(Path(config.input).resolve()),
                     output=str(Path(config.output).resolve()))
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out / "ledger.jsonl")
    refs, version = pinned_models(config)
    config = replace(config, models=refs)
    diagnosis = None
    if config.diagnosis:
        from raysegment.analysis.diagnosis import load as load_diagnosis

        try:  # before any study is segmented: a wrong reference costs nothing
            diagnosis = load_diagnosis(config.diagnosis, config.tracking_uri)
        except Exception as exc:
            raise ValueError(f"--diagnosis {config.diagnosis}: cannot load ({type(exc).__name__}: {exc})") from None
    client = None
    if web:
        from raysegment.io import dicom

        client = dicom.web_client(config.input)
        try:
            items = [{"path": f"dicom:{s['study']}/{s['series']}", "sha256": s["sha256"], "web": (s["study"], s["series"]),
                      **{k: s[k] for k in ("invalid", "error") if k in s}}
                     for s in dicom.web_series(client)]
        except Exception as exc:
            raise RuntimeError(f"--input {config.input}: DICOMweb query failed ({type(exc).__name__}: {exc})") from None
    else:
        items = discover(Path(config.input), out, ledger, version)

    def new(item) -> bool:
        return not ledger.has(item["path"], item["sha256"], version, retry_failed=config.retry_failed)

    counts = {"segmented": 0, "failed": 0, "not_cine": 0, "errors": 0}
    progress = _Progress(counts, config.progress)
    todo = []
    if web:  # known by their instances already: what is new is retrieved before any Ray starts
        todo = [item for item in items if new(item)][: config.limit]
        progress.total = len(todo)
        print(f"[raysegment] {len(items)} studies, {len(items) - len(todo)} already done with {version}, "
              f"{len(todo)} to segment", flush=True)
        todo = _retrieve(client, todo, out, version, lambda e: progress(ledger, e))
    actors = []
    # A poll that finds nothing new starts no Ray at all. NIfTI files are hashed while the actors start.
    if todo if web else any("file" in item or new(item) for item in items):
        ensure_ray()
        config = plan_actors(config, ray.available_resources(), len(items))
        remote = ray.remote(SegmentActor).options(**actor_options(config))
        actors = [remote.remote(config) for _ in range(config.actors)]
    if not web:
        _hash_files(items)
        todo = [item for item in items if new(item)][: config.limit]
        progress.total = len(todo)
        print(f"[raysegment] {len(items)} studies, {len(items) - len(todo)} already done with {version}, "
              f"{len(todo)} to segment", flush=True)
    if todo:
        try:
            ray.get([a.ready.remote() for a in actors])
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"the inference actor could not load {' + '.join(refs)}: {exc}") from None
        for i, item in enumerate(todo):  # the report's overlays are drawn in the actor, from memory
            item["figure"] = i < config.report_figures
        for entry in _segment_all(actors, todo, config.max_attempts, version):
            if web and config.store and entry["status"] == "done":
                _store(client, entry)
            progress(ledger, entry)
    for a in actors:
        ray.kill(a)
    table = write_results(ledger, out, diagnosis)
    from raysegment.reporting.report import batch_report

    batch_report(table, out, n_figures=config.report_figures)
    return {"studies": len(items), **counts, "already_done": len(items) - progress.total,
            "version": version, "actors": len(actors)}


class _Progress:
    """Appends a finished entry to the ledger, counts it under one status each (``segmented``,
    ``failed`` = bad input, ``not_cine`` = valid DICOM that is no short-axis cine, ``errors`` =
    environment, retried next run) and prints its line."""

    KEYS = {"done": "segmented", "failed": "failed", "skipped": "not_cine", "error": "errors"}
    WORDS = {"done": "ok", "failed": "FAILED", "skipped": "skipped", "error": "ERROR (retried next run)"}

    def __init__(self, counts: dict, verbose: bool):
        self.counts, self.verbose, self.n, self.total = counts, verbose, 0, 0

    def __call__(self, ledger: "Ledger", entry: dict) -> None:
        entry.setdefault("finished", _now())
        ledger.append(entry)
        self.counts[self.KEYS[entry["status"]]] += 1
        self.n += 1
        if self.verbose or entry["status"] == "error":
            what = self.WORDS[entry["status"]] + (f": {entry['reason']}" if entry["reason"] else "")
            print(f"[raysegment] {self.n}/{max(self.total, self.n)} {_display(entry['path'])} {what} "
                  f"({entry['seconds']:.1f}s)", flush=True)


def is_dicomweb(source: str) -> bool:
    return str(source).startswith(("http://", "https://"))


def _display(path: str) -> str:
    return path if path.startswith("dicom:") else Path(path).name


def discover(root: Path, out: Path, ledger: "Ledger", version: str) -> list[dict]:
    """Work items under a folder: every NIfTI study file (``file``: hashed by ``_hash_files``) and every
    DICOM series (files found by content). A DICOM file that cannot be read gets its failed entry
    here, once."""
    from raysegment.io.dicom import find_series

    # NIfTI files are hashed later (``_hash_files``), while the actors start.
    items = [{"file": p} for p in find_studies(root, exclude=out)]  # an output folder inside the input is not input
    series, bad = find_series(root, exclude=out)
    for s in series:
        items.append({"path": f"dicom:{s.study_uid}/{s.uid}", "sha256": s.digest(), "files": [str(f) for f in s.files]})
    for path, reason in bad:
        key, digest = _identity(path)
        if not ledger.has(key, digest, version):
            ledger.append({**_entry(key, digest, version, "failed", reason), "finished": _now()})
    return items


def _entry(path: str, digest: str, version: str, status: str, reason: str) -> dict:
    """A ledger entry for a study that produced no rows (failed, error)."""
    return {"path": path, "sha256": digest, "model_version": version, "status": status, "reason": reason,
            "seconds": 0.0, "rows": []}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _hash_files(items: list[dict]) -> None:
    for item in items:
        if "file" in item:
            item["path"], item["sha256"] = _identity(item.pop("file"))


def _retrieve(client, todo: list[dict], out: Path, version: str, finish) -> list[dict]:
    """WADO-RS each series to ``out/dicom-in/<series uid>/`` → the series that arrived. A series
    the PACS described without its UIDs is ``failed``; one whose query or retrieval failed is an
    ``error`` (retried by the next run); each goes to ``finish`` and the others go on."""
    from raysegment.io.dicom import web_retrieve

    ready = []
    for item in todo:
        study, series = item["web"]
        if "invalid" in item or "error" in item:
            status = "failed" if "invalid" in item else "error"
            finish(_entry(item["path"], item["sha256"], version, status, item.get("invalid") or item["error"]))
            continue
        try:
            item["files"] = [str(p) for p in web_retrieve(client, study, series, out / "dicom-in" / series)]
            ready.append(item)
        except Exception as exc:
            reason = f"WADO-RS retrieve failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
            finish(_entry(item["path"], item["sha256"], version, "error", reason))
    return ready


def _store(client, entry: dict) -> None:
    """STOW-RS a finished series' SEGs and remove the SEGs of its earlier content from the PACS;
    ``stored`` only once the PACS holds exactly these. A failure turns the entry into an error
    (retried next run; the SEG UIDs follow the content, so nothing is ever stored twice)."""
    from raysegment.io.dicom import web_replace_segs

    segs = [Path(r["seg"]) for r in entry["rows"] if r.get("seg")]
    try:
        web_replace_segs(client, segs)
        for r in entry["rows"]:
            r["stored"] = True
    except Exception as exc:
        entry["status"], entry["reason"] = "error", f"STOW-RS failed ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"


def plan_actors(config: InferConfig, free: dict, n_studies: int) -> InferConfig:
    """``config`` with its actor count and torch threads fixed: an explicit ``actors`` shares one
    node's cores (``torch_threads``); ``None`` fills the cluster's ``free`` resources (Ray's
    ``available_resources``), one actor per ``cpus_per_actor`` CPUs (or ``gpus_per_actor`` GPUs), at
    most ``n_studies``, each with as many threads as CPUs it holds."""
    if config.actors is not None:
        if config.actors < 1:
            raise ValueError(f"actors must be ≥ 1, got {config.actors}")
        return config
    if config.gpus_per_actor > 0:
        fits = int(free.get("GPU", 0) // config.gpus_per_actor)
    else:
        fits = int(free.get("CPU", 0) // config.cpus_per_actor)
    return replace(config, actors=max(1, min(fits, n_studies)),
                   threads=config.threads or max(1, int(round(config.cpus_per_actor))))


def actor_options(config: InferConfig) -> dict:
    """Ray options of each inference actor: its CPUs and GPU share; restarted whenever its process
    dies, while the study it held is retried by ``run_batch`` (not by Ray), so the tries are counted."""
    return {"num_cpus": config.cpus_per_actor, "num_gpus": config.gpus_per_actor, "max_restarts": -1,
            "max_task_retries": 0}


def _identity(p: Path) -> tuple[str, str]:
    """(absolute path, content hash) a study is known by; an unreadable file (broken or looping
    symlink) gets a placeholder hash so it still gets its failed row."""
    try:
        return str(p.resolve()), sha256(p)
    except (OSError, RuntimeError):
        return str(p.absolute()), "unreadable"


def _segment_all(actors: list, todo: list[dict], max_attempts: int, version: str) -> Iterator[dict]:
    """Ledger entries as the actors finish them, one study in flight per actor. A call whose actor
    died is given to the (restarted) actors again, ``max_attempts`` times in all."""
    import ray

    queue = deque((item, 1) for item in todo)
    idle, pending = list(actors), {}
    while queue or pending:
        while idle and queue:
            actor = idle.pop()
            item, attempt = queue.popleft()
            pending[actor.segment.remote(item["path"], item["sha256"], item["figure"], item.get("files"))] = \
                (actor, item, attempt)
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        actor, item, attempt = pending.pop(ref)
        idle.append(actor)
        try:
            yield ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            if attempt < max_attempts:
                queue.appendleft((item, attempt + 1))
                continue
            cause = " ".join(str(exc).split())[:300]
            yield _entry(item["path"], item["sha256"], version, "failed",
                         f"worker died on this study ({attempt} attempts): {cause}")


def results_rows(ledger: Ledger) -> list[dict]:
    """One row per study frame, from each study file's latest ledger entry (a file replaced in
    place supersedes its earlier content; its mask was overwritten too)."""
    latest = {}
    for e in ledger.entries.values():  # in the order they were first written
        latest.pop(e["path"], None)
        latest[e["path"]] = e
    rows = []
    for e in latest.values():
        if e["status"] == "done":
            rows.extend(e["rows"])
        else:
            rows.append({"study": e["path"], "frame": -1, "status": e["status"], "reason": e["reason"],
                         "model_version": e["model_version"]})
    add_patient_ef(rows)
    return rows


def add_patient_clinical(rows: list[dict], diagnosis=None) -> None:
    """Per patient with ED and ES segmented — an official-layout folder (Info.cfg names them) or a
    DICOM cine series (its largest / smallest LV frame): ``clinical.patient_indices`` from the masks
    on disk (height and weight from Info.cfg or the DICOM patient module give the BSA-indexed ones)
    and, with a ``diagnosis`` model, its basal ES check applied first, the predicted group and
    ``p_<GROUP>`` on both rows; the rows' ``ef_lv_pct``/``ef_rv_pct`` become these EFs. Info.cfg's
    ``Group`` is copied as ``group_reference``, for scoring only: it is never an input."""
    from raysegment.analysis.clinical import checked_indices, ed_es_pairs
    from raysegment.analysis.diagnosis import features
    from raysegment.io.studies import info_from_cfg, parse_info_cfg

    for key, phases in ed_es_pairs(rows).items():
        folder = Path(key)
        info = parse_info_cfg(folder / "Info.cfg") if not key.startswith("dicom:") and (folder / "Info.cfg").is_file() else {}
        # Info.cfg's height and weight, else the DICOM patient module's on the row
        size = {k: v for k, v in info_from_cfg(info).items() if v is not None}
        height, weight = (size.get(k, phases["ED"].get(k)) for k in ("height_cm", "weight_kg"))
        try:
            masks = {ph: read_study(Path(r["mask"]))[1][r["frame"]].astype(np.uint8) for ph, r in phases.items()}
            spacing = json.loads(phases["ED"]["spacing_mm"])
            ind, basal = checked_indices(masks["ED"], masks["ES"], spacing, height, weight,
                                         diagnosis.basal_rv if diagnosis else None)
        except (StudyError, OSError, ValueError, KeyError) as exc:
            for r in phases.values():
                r["clinical_error"] = f"{type(exc).__name__}: {exc}"
            continue
        # The ES mask file stays the network's output; the indices leave out the basal excess.
        extra = {k: round(v, 4) for k, v in ind.items()} | basal
        if diagnosis is not None:
            p = diagnosis.predict_proba(features(ind))[0]
            extra["diagnosis"] = diagnosis.classes[int(p.argmax())]
            extra |= {f"p_{c}": round(float(q), 4) for c, q in zip(diagnosis.classes, p)}
        if info.get("Group"):
            extra["group_reference"] = info["Group"]
        for r in phases.values():
            r.update(extra)
        # One EF per patient: the frame-volume EF (``add_patient_ef`` / ``add_cine_ef``) of every row of
        # this patient — for a DICOM series each of its frames — becomes the checked one.
        for r in (x for x in rows if x.get("study") == key) if key.startswith("dicom:") else phases.values():
            r["ef_lv_pct"], r["ef_rv_pct"] = extra["lv_ef_pct"], extra["rv_ef_pct"]


def write_results(ledger: Ledger, out: Path, diagnosis=None) -> list[dict]:
    """Rewrite results.parquet/.csv from the ledger (atomically): one row per study frame, with the
    per-patient clinical indices and diagnosis (``add_patient_clinical``)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rows = results_rows(ledger)
    add_patient_clinical(rows, diagnosis)
    if not rows:
        return rows
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("study", "frame", "status"), k))
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
    atomic_write(out / "results.parquet", lambda tmp: pq.write_table(table, tmp))
    atomic_write(out / "results.csv", lambda tmp: pacsv.write_csv(table, tmp))
    return rows
