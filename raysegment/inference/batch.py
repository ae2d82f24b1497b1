"""Batch inference over new studies with a registered (or local) model, resumable and idempotent.

    python -m raysegment.infer --model models:/raysegment-mobilenet_v2@champion \\
        --input /data/new_studies --output /data/segmentations --mlflow-uri http://127.0.0.1:5000

A study is one NIfTI file (3-D, or 4-D with every frame segmented); files ending ``_gt`` are
ground truth, used for Dice/HD95 when present. Outputs per study: a uint8 mask NIfTI with the
input's affine and grid (``OUTPUT/masks/<name>_seg.nii.gz``). Per batch: ``results.parquet``
and ``results.csv`` (one row per study frame), ``ledger.jsonl`` (one line per study: path,
content hash, model version, status), ``report.md`` with overlay PNGs, and ``last_run.json``
(the latest run's counts, as ``run_batch`` returns them).

A study whose (content hash, model version) is in the ledger is skipped; a killed run resumes
where it stopped. A bad study is recorded as failed with its reason and does not stop the rest.

Imports ``inference.actors``, ``inference.ledger``, ``inference.pacs``, ``inference.predictor``,
``reporting``, ``analysis``, ``model``, ``io``, ``config`` and ``runtime``; nothing above
``inference`` (not ``training``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from raysegment.config import InferConfig
from raysegment.inference.actors import WORKER_DIED, SegmentActor, _segment_all, actor_options, plan_actors
from raysegment.inference.ledger import Ledger, _entry, _now, read_cache, write_cache, write_results
from raysegment.inference.pacs import clear_stale_retrievals, drop_retrieved, retrieval_folder, store_entry
from raysegment.io.dicomweb import PacsUnreachable
from raysegment.io.files import atomic_write, file_stat, remove_stale_partials
from raysegment.io.studies import find_studies
from raysegment.model.weights import sha256
from raysegment.runtime import disable_telemetry, stop_signal

LAST_RUN = "last_run.json"
HASH_CACHE = "hashes.json"  # folder input: each file's stat and hash when last hashed (``_hash_files``)
DICOM_CACHE = "dicom.json"  # folder input: each file's stat and what it was, DICOM UIDs or not (``find_series``)

# --------------------------------------------------------------------------- the batch job


def pinned_models(config: InferConfig) -> tuple[tuple[str, ...], str]:
    """(references with registry aliases pinned to today's version, the version string results key on).

    Pinning makes every actor load the version the ledger records, even if an alias moves mid-batch.
    A turn other than the default ``auto`` (``--in-plane``) is part of that string: its masks are other
    results, so a folder segmented before is segmented again with it.
    """
    from raysegment.inference.predictor import pinned

    refs, versions = zip(*(pinned(ref, config.tracking_uri) for ref in config.models))
    turn = config.predict.in_plane
    return tuple(refs), "+".join(versions) + ("" if turn == "auto" else f" in-plane {turn}")


def run_batch(config: InferConfig) -> dict:
    """Segment every new study under ``config.input``; returns counts (with ``interrupted``: True
    when a Ctrl-C stopped the segmentation; the results and report still cover what was done).

    The actors start first (torch import, model load), while the driver hashes the studies and
    reads the ledger. Each finished study is appended to the ledger at once. A study whose worker
    process dies is tried ``max_attempts`` times, then recorded as failed; the batch goes on.
    """
    import ray

    disable_telemetry()
    # Absolute paths, decided here: actors on other nodes or in other working directories write
    # and read exactly these (a relative --output would land in each worker's own cwd).
    web = is_dicomweb(config.input)
    config = replace(config, input=config.input if web else str(Path(config.input).resolve()),
                     output=str(Path(config.output).resolve()))
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)  # what writers killed mid-write left (the soak found a SEG's)
    clear_stale_retrievals(out)
    ledger = Ledger(out / "ledger.jsonl")
    refs, version = pinned_models(config)
    config = replace(config, models=refs)
    diagnosis = _load_diagnosis(config)
    client, items = _find_items(config, out, ledger, version)
    progress = _Progress({"segmented": 0, "failed": 0, "not_cine": 0, "errors": 0}, config.progress)
    todo, actors = _plan(config, items, ledger, version, progress, client)
    interrupted = bool(todo) and _run_actors(config, actors, todo, ledger, version, progress, client)
    for a in actors:
        ray.kill(a)
    table = write_results(ledger, out, diagnosis)
    from raysegment.analysis.metrics import rows_dice_summary
    from raysegment.inference.clinical_sr import write_srs
    from raysegment.reporting.batch import batch_report

    srs = (write_srs(table, out, client if config.store else None, ledger) if config.sr
           else {"written": 0, "stored": 0, "kept": 0, "errors": []})
    for line in srs["errors"][:5]:
        print(f"[raysegment] retried next run: {line}", flush=True)

    batch_report(table, out, n_figures=config.report_figures)
    scored = rows_dice_summary(table)
    summary = {"studies": len(items), **progress.counts, "already_done": len(items) - progress.total - progress.later,
               **({"later": progress.later} if progress.later else {}),
               "version": version, "actors": len(actors), **({"interrupted": True} if interrupted else {}),
               "srs_written": srs["written"], "srs_stored": srs["stored"], "sr_errors": len(srs["errors"]),
               **({"pacs_kept": progress.kept + srs["kept"]} if progress.kept + srs["kept"] else {}),
               **({"dice_vs_gt": scored} if scored else {})}
    # For a scheduler's checks (and the soak): the console line is for people. A run killed before
    # this point leaves the previous run's file, which its "finished" time tells apart.
    record = {"finished": _now(), **summary}  # local time, as the ledger's
    if scored:  # rounded for people reading the file; the console line rounds the unrounded means, as report.md
        record["dice_vs_gt"] = {k: v if k == "volumes" else round(v, 4) for k, v in scored.items()}
    atomic_write(out / LAST_RUN, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))
    return summary


def _run_actors(config: InferConfig, actors, todo: list[dict], ledger: Ledger, version: str, progress, client) -> bool:
    """Segment ``todo`` on the started ``actors``, each finished entry into the ledger (and the PACS)
    at once → True when Ctrl-C or SIGTERM stopped it."""
    import ray

    by_path = {item["path"]: item for item in todo}
    for i, item in enumerate(todo):  # the report's overlays are drawn in the actor, from memory
        item["figure"] = i < config.report_figures
    died = frozenset((e["path"], e["sha256"]) for e in ledger.entries.values()
                     if e["model_version"] == version and e["status"] == "error" and e["reason"].startswith(WORKER_DIED))

    def retrieve(item: dict) -> dict | None:  # a PACS series, as an actor falls free for it
        return None if "web" not in item or "files" in item else _retrieve_one(client, item, Path(config.output), version)

    try:
        try:
            ray.get([a.ready.remote() for a in actors])
        except ray.exceptions.RayActorError as exc:
            raise RuntimeError(f"the inference actor could not load {' + '.join(config.models)}: {exc}") from None
        for entry in _segment_all(actors, todo, config.max_attempts, version, died, prepare=retrieve):
            if client is not None and config.store and entry["status"] == "done":
                progress.kept += bool(store_entry(client, entry, ledger))  # beside earlier SEGs it keeps
            if members := by_path[entry["path"]].get("members"):  # a stack: its series have no rows of their own
                entry["members"] = members
            progress(ledger, entry)
            if folder := by_path[entry["path"]].pop("retrieved", None):  # recorded: the PACS keeps the images
                drop_retrieved(folder)
    except (KeyboardInterrupt, SystemExit) as exc:
        # Ctrl-C or SIGTERM: what is in the ledger goes into the results and the report
        # before the command ends; the studies left are new to the next run.
        if not stop_signal(exc):
            raise
        return True
    finally:
        for item in todo:  # retrieved, not recorded: the next run retrieves them again
            if "retrieved" in item:
                drop_retrieved(item.pop("retrieved"))
    return False


def _load_diagnosis(config: InferConfig):
    """The diagnosis model, loaded before any study is segmented: a wrong reference costs nothing."""
    if not config.diagnosis:
        return None
    from raysegment.analysis.diagnosis import load as load_diagnosis

    try:
        return load_diagnosis(config.diagnosis, config.tracking_uri)
    except Exception as exc:
        raise ValueError(f"--diagnosis {config.diagnosis}: cannot load ({type(exc).__name__}: {exc})") from None


def _find_items(config: InferConfig, out: Path, ledger: Ledger, version: str):
    """(the DICOMweb client or None, the work items: MR series of the PACS, or NIfTI studies and
    DICOM series under the input folder)."""
    if not is_dicomweb(config.input):
        return None, discover(Path(config.input), out, ledger, version, config.exclude)
    from raysegment.io import dicomweb
    from raysegment.io.dicom import series_key
    from raysegment.io.dicomweb import PacsRefused, denied, failure, redact, refused_line, unreachable

    client = dicomweb.web_client(config.input, config.pacs_auth)
    try:
        items = [{"path": series_key(s["study"], s["series"]), "sha256": s["sha256"], "web": (s["study"], s["series"]),
                  **({"members": [series_key(s["study"], m) for m in s["members"]]} if s.get("members") else {}),
                  **{k: s[k] for k in ("invalid", "error") if k in s}}
                 for s in dicomweb.web_series(client, _since(config.since_days))]
    except Exception as exc:
        if why := unreachable(exc):
            raise PacsUnreachable(f"--input {redact(config.input)}: the PACS does not answer ({why})") from None
        if why := denied(exc):
            raise PacsRefused(f"--input: {refused_line(config.input, why)}") from None
        raise RuntimeError(f"--input {redact(config.input)}: {failure('DICOMweb query', exc)}") from None
    return client, items


def _since(days: int | None) -> str | None:
    """The first StudyDate (``YYYYMMDD``, this machine's calendar) of ``--since DAYS``, or None."""
    import datetime

    return None if days is None else (datetime.date.today() - datetime.timedelta(days=days)).strftime("%Y%m%d")


def _plan(config: InferConfig, items: list[dict], ledger: Ledger, version: str, progress: "_Progress", client):
    """(the items to segment, the actors started for them). A poll that finds nothing new starts
    no Ray at all, nor one whose PACS series all fail to arrive; new NIfTI files are hashed while
    the actors start."""
    import ray

    from raysegment.runtime import ensure_ray

    def new(item) -> bool:
        return not ledger.has(item["path"], item["sha256"], version, retry_failed=config.retry_failed)

    def select() -> list[dict]:
        fresh = [item for item in items if new(item)]
        todo = fresh[: config.limit]
        progress.total, progress.later = len(todo), len(fresh) - len(todo)
        later = f" ({progress.later} more left to later runs by --limit {config.limit})" if progress.later else ""
        print(f"[raysegment] {len(items)} studies, {len(items) - len(fresh)} already done with {version}, "
              f"{len(todo)} to segment{later}", flush=True)
        return todo

    def start() -> list:
        nonlocal config
        ensure_ray()
        config = plan_actors(config, ray.available_resources(), len(items))
        remote = ray.remote(SegmentActor).options(**actor_options(config))
        return [remote.remote(config) for _ in range(config.actors)]

    web, todo, actors = client is not None, [], []
    if web:
        # A series is retrieved when an actor is free for it (``_run_actors``): the output holds a few
        # at a time, not the whole to-do list. The first is retrieved here: a run whose retrievals all
        # fail starts no Ray.
        todo = select()
        while todo and (failed := _retrieve_one(client, todo[0], Path(config.output), version)) is not None:
            progress(ledger, failed)
            todo.pop(0)
        return todo, start() if todo else []
    # A file whose path the ledger has settled for this version is likely unchanged: it is hashed
    # before anything starts, so a re-run with nothing new starts no Ray (cron polls so).
    settled = {p for p, d, v in ledger.entries if v == version and ledger.has(p, d, v, config.retry_failed)}
    if any(_path_key(item["file"]) not in settled if "file" in item else new(item) for item in items):
        actors = start()
    _hash_files(items, Path(config.output) / HASH_CACHE)
    todo = select()
    return todo, actors or (start() if todo else [])


class _Progress:
    """Appends a finished entry to the ledger, counts it under one status each (``segmented``,
    ``failed`` = bad input, ``not_cine`` = valid DICOM that is no short-axis cine, ``errors`` =
    environment, retried next run) and prints its line."""

    KEYS = {"done": "segmented", "failed": "failed", "skipped": "not_cine", "error": "errors"}
    WORDS = {"done": "ok", "failed": "FAILED", "skipped": "skipped", "error": "ERROR (retried next run)"}

    def __init__(self, counts: dict, verbose: bool):
        # total: studies to segment this run; later: new ones that --limit leaves to later runs
        self.counts, self.verbose, self.n, self.total, self.later = counts, verbose, 0, 0, 0
        self.kept = 0  # series stored beside earlier SEGs that the PACS does not delete

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


def discover(root: Path, out: Path, ledger: "Ledger", version: str, skip_globs=()) -> list[dict]:
    """Work items under a folder: every NIfTI study file (``file``: hashed by ``_hash_files``) and every
    DICOM series (files found by content), but for files ``skip_globs`` match (``--exclude``; a line
    says how many). A DICOM file that cannot be read gets its failed entry here, once."""
    from raysegment.io.dicom import find_series, series_key

    # NIfTI files are hashed later (``_hash_files``), while the actors start.
    items = [{"file": p} for p in find_studies(root, exclude=out, skip_globs=skip_globs)]  # nor is an output inside it
    before = read_cache(out / DICOM_CACHE)
    headers = dict(before)
    series, bad = find_series(root, exclude=out, skip_globs=skip_globs, cache=headers)
    write_cache(out / DICOM_CACHE, headers, before)
    if skip_globs:
        print(_excluded_line(root, out, skip_globs), flush=True)
    for s in series:
        items.append({"path": series_key(s.study_uid, s.uid), "sha256": s.digest(), "files": [str(f) for f in s.files],
                      **({"members": [series_key(s.study_uid, m) for m in s.members]} if s.members else {})})
    for path, reason in bad:
        key, digest = _identity(path)
        if not ledger.has(key, digest, version):
            ledger.append({**_entry(key, digest, version, "failed", reason), "finished": _now()})
    if not items and not bad and (note := _none_readable(root, out)):
        print(note, flush=True)
    return items


def _excluded_line(root: Path, out: Path, skip_globs) -> str:
    """How many files under ``root`` (not the output) each ``--exclude`` glob left out: a glob that
    matches nothing is named (a typo would otherwise segment what it meant to leave out)."""
    from raysegment.io.studies import left_out

    files = _input_files(root, out)
    counts = {g: sum(left_out(p, root, [g]) for p in files) for g in skip_globs}
    return "[raysegment] --exclude left out " + ", ".join(
        f"{n} file{'s' * (n != 1)} ({g})" if n else f"nothing ({g} matches no file)" for g, n in counts.items())


def _none_readable(root: Path, out: Path) -> str | None:
    """A note for a folder of files none of which is a study (NIfTI, DICOM): what they are, and for
    SSL4MIS ``.h5`` volumes where they go instead. None for an empty folder (a poll with nothing new)."""
    from collections import Counter

    kinds = Counter("".join(p.suffixes[-2:]) or p.name for p in _input_files(root, out))
    if not kinds:
        return None
    found = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common(3)) + (", …" if len(kinds) > 3 else "")
    n = sum(kinds.values())
    note = f"[raysegment] {root} holds {n} file{'s' * (n != 1)} ({found}) but no NIfTI study or DICOM series"
    if kinds.get(".h5"):
        note += (f"; .h5 volumes (the SSL4MIS layout) are a source of shards: python -m raysegment.prepare --source "
                 f"{root} --out SHARDS, then python -m raysegment.report evaluate --model M --data SHARDS segments "
                 f"and scores them")
    return note


def _input_files(root: Path, out: Path) -> list[Path]:
    """The files under ``root`` that are input: not hidden (``studies.hidden``), not under ``out``."""
    from raysegment.io.studies import hidden, inside

    skip = str(out.resolve())
    return [p for p in root.rglob("*") if p.is_file() and not hidden(p, root) and not inside(p, skip)]


def _hash_files(items: list[dict], cache_path: Path) -> None:
    """``path`` and ``sha256`` of each file item. A file whose size, times and inode are those the
    cache (``OUTPUT/hashes.json``) recorded when it was last hashed keeps that hash unread, so a cron
    poll of a large archive reads only what is new or changed (a changed file changes its ctime, which
    no tool sets back). The cache is only that: deleted or damaged, every file is hashed again."""
    cache, fresh = read_cache(cache_path), {}
    for item in items:
        if "file" not in item:
            continue
        file = item.pop("file")
        stat, key = file_stat(file), _path_key(file)
        known = cache.get(key)
        if stat is not None and known is not None and known[0] == stat:
            item["path"], item["sha256"] = key, known[1]
        else:
            item["path"], item["sha256"] = _identity(file)
        if stat is not None:
            fresh[item["path"]] = [stat, item["sha256"]]
    write_cache(cache_path, fresh, cache)


def _retrieve_one(client, item: dict, out: Path, version: str) -> dict | None:
    """WADO-RS a series to its ``retrieval_folder`` (``item["files"]``) → None, or the entry of a series
    that cannot be segmented: ``failed`` when the PACS described it without its UIDs, ``error`` when its
    query or retrieval failed (retried by the next run)."""
    from raysegment.io.dicom import series_uids
    from raysegment.io.dicomweb import failure, web_retrieve

    study, series = item["web"]
    members = tuple(series_uids(m)[1] for m in item.get("members", ()))  # a stack's series
    if "invalid" in item or "error" in item:
        status = "failed" if "invalid" in item else "error"
        return _entry(item["path"], item["sha256"], version, status, item.get("invalid") or item["error"])
    item["retrieved"] = retrieval_folder(out, series)
    try:
        item["files"] = [str(p) for p in web_retrieve(client, study, series, item["retrieved"], item["sha256"], members)]
    except Exception as exc:
        drop_retrieved(item.pop("retrieved"))
        return _entry(item["path"], item["sha256"], version, "error", failure("WADO-RS retrieve", exc))
    return None


def _path_key(p: Path) -> str:
    """The path part of ``_identity`` without reading the file (a looping symlink: as given)."""
    try:
        return str(p.resolve())
    except (OSError, RuntimeError):
        return str(p.absolute())


def _identity(p: Path) -> tuple[str, str]:
    """(absolute path, content hash) a study is known by; an unreadable file (broken or looping
    symlink) gets a placeholder hash so it still gets its failed row."""
    try:
        return str(p.resolve()), sha256(p)
    except (OSError, RuntimeError):
        return str(p.absolute()), "unreadable"
