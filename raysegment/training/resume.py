"""What a run or a search began with, read back from its storage folder, and the check a re-run
under its name must pass. Ray Train and Tune resume with what they saved, so a re-run asking for
other settings would crash or silently mix two (``config.RESUMABLE`` says what may change); the
CLIs refuse it before Ray starts. Imports the shared base, io, data and model layout only (no Ray,
no torch)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from raysegment.config import RESUMABLE, TrainConfig, changed_settings
from raysegment.data.prepare import load_manifest
from raysegment.io import storage
from raysegment.model.checkpoint import CONFIG_FILE
from raysegment.training.trials import space_record, space_text

# Ray Train's record, in a run's folder, of the checkpoints it registered (what a resume reads).
SNAPSHOT = "checkpoint_manager_snapshot.json"
# Beside each search (in its storage folder): its MLflow parent run, pins, ranges, trial count and base config.
MARKER = "mlflow_parent_run.json"
# Beside a search that has ended (its registration and final stage included): what ``run_search`` returned.
SUMMARY = "search_summary.json"
# What a resumed search's trials may take from its new command: a run's length may change, but
# not a search's epochs (Tune's restored ASHA keeps the first count as its last rung).
SEARCH_RESUMABLE = tuple(k for k in RESUMABLE if k != "epochs")


class SearchSpaceChanged(ValueError):
    """A resume asked for other pins, ranges, trial count or trial settings than the saved search began with."""


def _snapshot(folder: str) -> tuple[dict | None, bool]:
    """(Ray Train's record of the checkpoints it registered in run folder ``folder``, None where there
    is none; whether a full disk cut it short — empty or not JSON: Ray Train cannot resume from it)."""
    text = storage.read_text(storage.join(folder, SNAPSHOT))
    if text is None:
        return None, False
    try:
        return json.loads(text), False
    except json.JSONDecodeError:
        return None, True


def latest_checkpoint(storage_path: str, name: str) -> tuple[str, dict] | None:
    """(the folder, the metrics) of the latest checkpoint Ray Train registered for run ``name``
    under ``storage_path`` (what a resume starts from); None for a run not begun, or whose record a
    full disk cut short."""
    folder = storage.join(storage_path, name)
    latest = (_snapshot(folder)[0] or {}).get("latest_checkpoint_result")
    return (storage.join(folder, latest["checkpoint_dir_name"]), latest.get("metrics", {})) if latest else None


def remove_unsaved_checkpoints(storage_path: str, name: str) -> int:
    """Delete the checkpoint folders of run ``name`` (local storage) that Ray Train never
    registered — uploads that failed part-way, e.g. on a full disk: they hold space and no resume
    reads them → how many. A record of them that the full disk cut short (Ray Train cannot start
    the run again from it) goes too, and the run starts afresh. Nothing is deleted when the
    record is whole but not in the form this expects."""
    if storage.is_uri(storage_path):
        return 0
    folder = Path(storage.join(storage_path, name))
    snapshot, cut_short = _snapshot(str(folder))
    if cut_short:
        (folder / SNAPSHOT).unlink()
    snapshot = snapshot or {"checkpoint_results": []}
    if not isinstance(snapshot.get("checkpoint_results"), list):
        return 0
    kept = {r.get("checkpoint_dir_name") for r in snapshot["checkpoint_results"]}
    kept.add((snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name"))
    unsaved = [d for d in folder.glob("checkpoint_*") if d.is_dir() and d.name not in kept]
    for d in unsaved:
        shutil.rmtree(d, ignore_errors=True)
    return len(unsaved)


def begun_config(storage_path: str, name: str) -> TrainConfig | None:
    """The config of run ``name`` under ``storage_path``, from its latest checkpoint; None for a run not begun."""
    latest = latest_checkpoint(storage_path, name)
    saved = storage.read_text(storage.join(latest[0], CONFIG_FILE)) if latest else None
    return TrainConfig.from_dict(json.loads(saved)) if saved else None


def changes(began: TrainConfig, now: TrainConfig, may_change: tuple = RESUMABLE) -> list[str]:
    """``changed_settings`` of ``now`` against the run that ``began``, ``now`` taken with its shards'
    content hash (a command's config has none yet: the shards may move, their content may not)."""
    now = replace(now, manifest_hash=now.manifest_hash or load_manifest(now.data)["content_hash"])
    return changed_settings(began, now, may_change)


def run_changes(config: TrainConfig, storage_path: str, name: str) -> list[str]:
    """What ``config`` changes of run ``name`` under ``storage_path`` ([] for a run not begun)."""
    began = begun_config(storage_path, name)
    return changes(began, config) if began is not None else []


def saved_search(spec) -> dict:
    """What is saved beside the search ``spec`` (a ``training.tune.TuneSpec``) names: its MLflow
    parent run, pins, ranges, trial count and base config ({} for a new search). Tune resumes a
    search with the space and count it began with, so a resume asking for others, or for other
    trial settings than ``SEARCH_RESUMABLE`` allows, raises ``SearchSpaceChanged``."""
    text = storage.read_text(storage.join(spec.run.storage_path, spec.run.name, MARKER))
    saved = json.loads(text) if text else {}
    space = space_record(spec.fixed, spec.ranges)
    if saved.get("space", space) != space:
        raise SearchSpaceChanged(f"search {spec.run.name} began with {space_text(saved['space'])}, not "
                                 f"{space_text(space)}: resume it with those, or give a new --name")
    if saved.get("num_samples", spec.num_samples) != spec.num_samples:
        raise SearchSpaceChanged(f"search {spec.run.name} began with --num-samples {saved['num_samples']}, not "
                                 f"{spec.num_samples}: resume it with that, or give a new --name")
    if "base" in saved:  # its trials' other settings (resumed and new trials would take the new ones)
        if changed := changes(TrainConfig.from_dict(saved["base"]), spec.base, SEARCH_RESUMABLE):
            raise SearchSpaceChanged(f"search {spec.run.name} began with other settings ({'; '.join(changed)}): "
                                     "resume it with those, or give a new --name")
    return saved


def finished_search(spec) -> dict | None:
    """The summary a finished search ``spec`` names left, or None while it has work left: not
    begun, not ended, or now asked for a stage it did not run (a registration, a final run) or to
    log to another registry. A re-run of a finished search then needs no Ray."""
    saved = saved_search(spec)
    text = storage.read_text(storage.join(spec.run.storage_path, spec.run.name, SUMMARY)) if saved else None
    if not text or saved.get("tracking_uri") != spec.tracking_uri:
        return None
    try:
        summary = json.loads(text)
    except json.JSONDecodeError:  # cut short (a full disk): the search through Ray writes it again
        return None
    if (spec.register and "registered" not in summary) or (spec.final_minutes and "final" not in summary):
        return None
    return summary
