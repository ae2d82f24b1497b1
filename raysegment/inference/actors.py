"""The batch job's Ray actors: one Predictor each, sized to the free CPUs/GPUs, and the loop that
hands them studies (a study whose worker dies is retried a bounded number of times).

Imports ``inference.predictor``, ``inference.study``, ``inference.ledger``, ``config`` and
``runtime``; nothing above ``inference`` (not ``training``).
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from raysegment.config import InferConfig, torch_threads
from raysegment.inference.ledger import _entry
from raysegment.inference.study import settle_study
from raysegment.runtime import HeapTrimmer, disable_telemetry

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
        self.heap = HeapTrimmer()

    def ready(self) -> str:
        return self.predictor.version

    def segment(self, path: str, digest: str, figure: bool, files: list[str] | None = None) -> dict:
        if self.config.crash_on and self.config.crash_on in Path(path).name:
            os._exit(1)  # test hook: the worker process dies as on a segfault or the OOM killer
        entry = settle_study(path, digest, self.predictor, self.model_uri, Path(self.config.output), figure, files)
        self.heap.study_done()
        return entry


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


WORKER_DIED = "worker died on this study"


def _segment_all(actors: list, todo: list[dict], max_attempts: int, version: str,
                 died_before: frozenset = frozenset(), prepare=None) -> Iterator[dict]:
    """Ledger entries as the actors finish them, one study in flight per actor. A call whose actor
    died is given to the (restarted) actors again, ``max_attempts`` times in all. Then the study is
    an ``error`` (retried next run: its workers may have died of something else — the OOM killer
    taking the node's largest process, an operator, a crashed node), unless it already killed its
    workers ``max_attempts`` times in an earlier run — (path, sha256) in ``died_before`` — which
    makes it ``failed`` for good: a study that kills every worker it meets. ``prepare(item)``, called as
    an actor falls free for the item (a PACS series' retrieval), returns None or the item's entry
    (it cannot be segmented), which is yielded instead."""
    import ray

    queue = deque((item, 1) for item in todo)
    idle, pending = list(actors), {}
    while queue or pending:
        while idle and queue:
            item, attempt = queue.popleft()
            if prepare is not None and (entry := prepare(item)) is not None:
                yield entry
                continue
            actor = idle.pop()
            pending[actor.segment.remote(item["path"], item["sha256"], item["figure"], item.get("files"))] = \
                (actor, item, attempt)
        if not pending:  # every item left was answered by ``prepare``
            continue
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        actor, item, attempt = pending.pop(ref)
        idle.append(actor)
        try:
            yield ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            _await_restart(actor)
            if attempt < max_attempts:
                queue.appendleft((item, attempt + 1))
                continue
            cause = " ".join(str(exc).split())[:300]
            again = (item["path"], item["sha256"]) in died_before
            yield _entry(item["path"], item["sha256"], version, "failed" if again else "error",
                         f"{WORKER_DIED} ({attempt} attempts{', and in an earlier run' if again else ''}): {cause}")


def _await_restart(actor, tries: int = 60) -> None:
    """Wait until a dead actor is serving again before it gets the next study: a call sent before
    Ray has learnt of the death goes to the dead process and fails too, and on a loaded node that
    charged an innocent study with the death (and a bounded attempt). Gives up after ``tries``
    half-second waits (an actor that cannot restart then fails its next calls, which are counted)."""
    import ray

    for _ in range(tries):
        try:
            ray.get(actor.ready.remote())
            return
        except ray.exceptions.RayActorError:
            time.sleep(0.5)
