"""Hyper-parameter search: Ray Tune (Optuna TPE + ASHA) over the Ray Train loop, tracked in MLflow.

    ray job submit -- python -m raysegment.tune --backbone densenet121 --data SHARDS \\
        --mlflow-uri http://127.0.0.1:5000

Without ``--data`` the bundled ACDC sample is prepared into ``./runs/sample-shards``; without
``--mlflow-uri`` runs go to ``sqlite:///mlflow.db`` in the working directory. One MLflow parent
run per invocation, one child run per trial (params, per-epoch loss and Dice, config). The best
trial's best checkpoint is registered as ``raysegment-<backbone>``; the ``champion`` alias moves
only if it beats the current champion on the same data manifest.

Imports ``training.train``, ``training.trials``, ``training.callbacks``, ``training.resume``,
``registry``, ``model``, ``data``, ``io``, ``config`` and ``runtime``; not ``service``, ``soak`` or
``cli``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace

from raysegment.config import DEFAULT_TRACKING_URI, TrainConfig
from raysegment.data.prepare import load_manifest
from raysegment.io import storage
from raysegment.runtime import disable_telemetry
from raysegment.training.callbacks import MlflowTrialLogger, TrialLines, mlflow_client
from raysegment.training.resume import (  # noqa: F401 (the search's API)
    MARKER,
    SUMMARY,
    SearchSpaceChanged,
    finished_search,
    saved_search,
)
from raysegment.training.train import RunSpec, make_trainer
from raysegment.training.trials import (  # noqa: F401 (the search's API)
    DICE,
    SEARCHED,
    apply_params,
    range_text,
    search_space,
    space_record,
    space_text,
    trial_run_name,
    trial_table,
    unfinished,
)


@dataclass(frozen=True)
class TuneSpec:
    """One search: what to train, how many trials, where results go."""

    base: TrainConfig
    run: RunSpec = field(default_factory=RunSpec)
    num_samples: int = 4
    concurrency: int = 1
    grace_period: int = 1  # epochs before ASHA may stop a trial
    trial_cpus: float = 0.01  # the trial driver only waits; its Train workers reserve their own resources
    fixed: dict = field(default_factory=dict)  # searched names pinned to a value
    ranges: dict = field(default_factory=dict)  # searched names → their range (trials.check_range), else RANGES
    tracking_uri: str = DEFAULT_TRACKING_URI
    experiment: str = "raysegment-tune"
    seed: int = 0
    register: bool = True
    # After the trials, train the best trial's configuration again from scratch for this many wall
    # minutes (one Ray Train run on ``run``'s resources) and register its last epoch as a final model.
    final_minutes: float | None = None
    final_max_epochs: int = 300  # the most epochs of the final run (the time budget usually ends it first)


def run_trial(params: dict, base: TrainConfig, run: RunSpec) -> None:
    """Tune function trainable: one Ray Train run whose reports flow back to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    config = apply_params(base, params)
    trial = tune.get_context().get_trial_id()
    spec = replace(run, name=trial_run_name(run.name, trial))
    make_trainer(config, spec, run_callbacks=[TuneReportCallback()]).fit()
    _wait_until_tune_has_every_report()


def _wait_until_tune_has_every_report(timeout_s: float = 120.0) -> None:
    """Return from a trial only after Tune has taken Train's last report.

    Ray 2.60 passes Train's reports to Tune through a one-item queue actor. If the trial function
    returns while the last report still sits there, the trial's own end-of-function result fills
    the session's result queue first and the trial hangs for ever when Tune then moves the report
    over (seen here: a 3-epoch trial stuck in ``Queue.put`` after its last epoch). Both queues
    empty means Tune has every report.
    """
    from ray.train._internal.session import get_session

    session = get_session()
    queue = getattr(session, "_inter_actor_queue", None)
    deadline = time.time() + timeout_s
    while queue is not None and time.time() < deadline:
        if queue.empty() and session.result_queue.empty():
            return
        time.sleep(0.2)


# --------------------------------------------------------------------------- MLflow tracking


def _parent_run(spec: TuneSpec) -> tuple[str, str, int]:
    """(experiment_id, parent run id, the trial count the search began with); a resumed search
    reuses its parent run."""
    saved = saved_search(spec)
    client = mlflow_client(spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(spec.experiment)
    if saved and saved.get("tracking_uri") == spec.tracking_uri:
        # a marker written before the count was kept: the parent run's parameter has it
        began = saved.get("num_samples") or client.get_run(saved["run_id"]).data.params.get("num_samples")
        return exp_id, saved["run_id"], int(began or spec.num_samples)
    run = client.create_run(exp_id, run_name=spec.run.name,
                            tags={"backbone": spec.base.model.backbone, "manifest_hash": spec.base.manifest_hash})
    for k, v in {"num_samples": spec.num_samples, "max_epochs": spec.base.epochs, "backbone": spec.base.model.backbone,
                 "data": spec.base.data, **{f"fixed_{k}": v for k, v in spec.fixed.items()},
                 **{f"range_{k}": range_text(v) for k, v in spec.ranges.items()}}.items():
        client.log_param(run.info.run_id, k, v)
    client.log_text(run.info.run_id, json.dumps(spec.base.to_dict(), indent=2), "base_config.json")
    record = {"tracking_uri": spec.tracking_uri, "run_id": run.info.run_id,
              "space": space_record(spec.fixed, spec.ranges), "num_samples": spec.num_samples, "base": spec.base.to_dict()}
    storage.write_text(storage.join(spec.run.storage_path, spec.run.name, MARKER), json.dumps(record))
    return exp_id, run.info.run_id, spec.num_samples


# --------------------------------------------------------------------------- the search


def _no_restore_hint(record: logging.LogRecord) -> bool:
    return "Tuner.restore(" not in record.getMessage()


class SearchInterrupted(KeyboardInterrupt):
    """Tune stopped the search on Ctrl-C (its state saved); re-running it resumes."""


def run_search(spec: TuneSpec) -> dict:
    """Run (or resume) a search, track it, register the best checkpoint → summary dict.

    Raises ``SearchInterrupted`` when Ctrl-C stopped it (the MLflow parent run is then KILLED);
    running it again resumes, and registers nothing twice."""
    disable_telemetry()
    if not spec.run.verbose:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # its INFO line per created study
    manifest = load_manifest(spec.base.data)
    spec = replace(spec, base=replace(spec.base, manifest_hash=manifest["content_hash"]))
    root = storage.join(spec.run.storage_path)  # a local folder or a URI (s3://…) every node reaches
    exp_id, parent_id, planned = _parent_run(spec)
    tuner = _tuner(spec, exp_id, parent_id, root)
    client = mlflow_client(spec.tracking_uri)
    client.update_run(parent_id, status="RUNNING")  # a resumed search was KILLED when interrupted
    if not spec.run.verbose:  # Tune's own resume hint names its Python API; ours names the command
        logging.getLogger("ray.tune.tune").addFilter(_no_restore_hint)  # once: the same filter is not added twice
    try:
        results = tuner.fit()
        if unfinished(results, planned):
            # Tune stops on Ctrl-C, saves the search and returns what it has: no registration, no final run.
            raise SearchInterrupted(f"search {spec.run.name} interrupted; the same command resumes it")
        summary = _after_search(spec, results, exp_id, parent_id, root)
    except (KeyboardInterrupt, SystemExit):
        client.set_terminated(parent_id, "KILLED")
        raise
    except Exception:  # e.g. a full disk: the MLflow UI showed the search RUNNING for ever
        _mark(client, parent_id, "FAILED")
        raise
    client.set_terminated(parent_id, "FINISHED")
    storage.write_text(storage.join(root, spec.run.name, SUMMARY), json.dumps(summary, indent=1, default=str))
    return summary


def _tuner(spec: TuneSpec, exp_id: str, parent_id: str, root: str):
    """A new ``Tuner`` for the search, or the saved one when ``root/name`` holds it (resume)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    space = {k: v for k, v in search_space(spec.ranges).items() if k not in spec.fixed}
    space.update(spec.fixed)
    trial_run = replace(spec.run, storage_path=storage.join(root, spec.run.name, "train"))
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=spec.base, run=trial_run),
                                    {"CPU": spec.trial_cpus})
    tune_path = storage.join(root, spec.run.name)
    if tune.Tuner.can_restore(tune_path):
        print(f"[raysegment] resuming search {tune_path}", flush=True)
        return tune.Tuner.restore(tune_path, trainable=trainable, resume_errored=True, param_space=space)
    searcher = ConcurrencyLimiter(OptunaSearch(seed=spec.seed), max_concurrent=spec.concurrency)
    # A trial at its last epoch ends by returning: stopped by Tune instead, its Train controller was
    # killed before its own shutdown, and Ray Train's placement-group cleaner logged a WARNING that
    # the controller was dead, once per trial. Stopping a weak trial at a rung is unchanged.
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=spec.base.epochs,
                              grace_period=min(spec.grace_period, spec.base.epochs), reduction_factor=2,
                              stop_last_trials=False)
    callbacks = [MlflowTrialLogger(spec.tracking_uri, exp_id, parent_id, spec.base)]
    if not spec.run.verbose:
        callbacks.append(TrialLines(spec.num_samples, spec.base.epochs))
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(metric="dice_mean", mode="max", search_alg=searcher, scheduler=scheduler,
                                    num_samples=spec.num_samples),  # the ConcurrencyLimiter bounds it
        run_config=tune.RunConfig(name=spec.run.name, storage_path=root, callbacks=callbacks,
                                  verbose=1 if spec.run.verbose else 0),
    )


def _mark(client, run_id: str, status: str) -> None:
    """End MLflow run ``run_id`` with ``status`` while an error propagates; a registry that fails
    too must not hide that error."""
    try:
        client.set_terminated(run_id, status)
    except Exception:
        logging.getLogger(__name__).warning("could not mark MLflow run %s %s", run_id, status)


def _register_once(client, run_id: str, register) -> dict:
    """``register()`` (→ a ``Registration``) unless run ``run_id`` records that it did so already
    (a resumed search or final run) → the registration as a dict, recorded in tag ``registered``."""
    done = client.get_run(run_id).data.tags.get("registered")
    if done:
        return json.loads(done)
    reg = asdict(register())
    client.set_tag(run_id, "registered", json.dumps(reg))
    return reg


def _after_search(spec: TuneSpec, results, exp_id: str, parent_id: str, root: str) -> dict:
    """The finished search's table logged, the best trial registered, the final stage run → summary."""
    trials = storage.join(root, spec.run.name, "train")  # run_trial's storage path
    table = trial_table(results, lambda trial_id: storage.join(trials, trial_run_name(spec.run.name, trial_id)))
    client = mlflow_client(spec.tracking_uri)
    client.log_text(parent_id, json.dumps(table, indent=2, default=str), "trials.json")
    summary: dict = {"parent_run_id": parent_id, "trials": table, "errors": len(results.errors)}
    if not table:
        client.set_terminated(parent_id, "FAILED")
        raise RuntimeError(f"no trial reported a result ({len(results.errors)} errors); see {storage.join(root, spec.run.name)}")
    best = table[0]
    for k in DICE:
        client.log_metric(parent_id, f"best_{k}", best[k])
    from raysegment.registry.figures import log_search_figure

    log_search_figure(client, exp_id, parent_id, table, SEARCHED)
    if spec.register and best.get("checkpoint_path"):
        from raysegment.registry.champion import register_checkpoint

        def register():
            with storage.local_checkpoint(best["checkpoint_path"], root) as folder:
                return register_checkpoint(folder, metrics=best, tracking_uri=spec.tracking_uri, run_id=parent_id,
                                           extra_tags={"source_trial": str(best["trial_id"]), "search_run": parent_id,
                                                       "epoch": str(best["best_epoch"] + 1)})

        summary["registered"] = _register_once(client, parent_id, register)
    if spec.final_minutes:
        summary["final"] = run_final(spec, best, exp_id, parent_id)
    return summary


def run_final(spec: TuneSpec, best: dict, experiment_id: str, parent_run_id: str) -> dict:
    """Train the best trial's configuration from scratch within ``spec.final_minutes`` and register
    its last epoch (tags ``final=true``, ``source_trial``). Tracked as a child run of the search;
    running the same search again resumes an interrupted final run."""
    from raysegment.model.checkpoint import read_state

    params = {k: best[k] for k in SEARCHED if k in best}
    config = replace(apply_params(spec.base, params), epochs=spec.final_max_epochs, time_budget_min=spec.final_minutes)
    run = replace(spec.run, name=f"{spec.run.name}-final", sharing=1,
                  storage_path=storage.join(spec.run.storage_path, spec.run.name, "train"))
    client = mlflow_client(spec.tracking_uri)
    found = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.final = 'true'")
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")  # KILLED if it was interrupted
    else:
        run_id = client.create_run(experiment_id, run_name="final", tags={
            "mlflow.parentRunId": parent_run_id, "final": "true", "source_trial": str(best["trial_id"])}).info.run_id
        for k, v in {**params, "minutes": spec.final_minutes, "backbone": config.model.backbone}.items():
            client.log_param(run_id, k, v)
        client.log_text(run_id, json.dumps(config.to_dict(), indent=2), "config.json")
    print(f"[raysegment] final run: trial {best['trial_id']}'s configuration from scratch for "
          f"{spec.final_minutes:g} min ({run.name})", flush=True)
    try:
        result = make_trainer(config, run).fit()
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C: Ray Train aborted the run, its checkpoints kept
        client.set_terminated(run_id, "KILLED")
        raise
    except Exception:  # Ray Train's fit raises a run's error
        _mark(client, run_id, "FAILED")
        raise
    if result.checkpoint is None:
        client.set_terminated(run_id, "FAILED")
        raise RuntimeError("final run failed: it left no checkpoint")
    with result.checkpoint.as_directory() as d:  # local or remote storage alike
        history = read_state(d).get("history", [])
    from raysegment.registry.figures import log_history

    log_history(client, run_id, history)
    metrics = result.metrics
    out = {"trial_id": best["trial_id"], "epochs": int(metrics["epoch"]) + 1,
           **{k: float(metrics[k]) for k in ("dice_rv", "dice_myo", "dice_lv", "dice_mean")},
           "checkpoint_path": result.checkpoint.path}
    if spec.register:
        from raysegment.registry.champion import register_checkpoint

        def register():
            with result.checkpoint.as_directory() as folder:  # local or remote storage alike
                return register_checkpoint(folder, metrics=metrics, tracking_uri=spec.tracking_uri, run_id=run_id,
                                           extra_tags={"final": "true", "source_trial": str(best["trial_id"]),
                                                       "search_run": parent_run_id})

        out["registered"] = _register_once(client, run_id, register)
    client.set_terminated(run_id, "FINISHED")
    return out
