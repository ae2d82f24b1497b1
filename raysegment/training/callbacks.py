"""The search's Tune callbacks: the quiet console's line per trial (``TrialLines``) and the mirror of
every trial into an MLflow child run of the search (``MlflowTrialLogger``). Both are built lazily, so
Tune is imported only when a search runs.

Imports the shared base and ``training.trials``; not ``training.tune`` (which uses these), nor ``cli``.
"""

from __future__ import annotations

import json
import math

from raysegment.config import TrainConfig
from raysegment.training.trials import SEARCHED, apply_params


def mlflow_client(uri: str):
    """An MlflowClient of ``uri``, also made the process's tracking URI (MLflow's fluent calls use it)."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


class TrialLines:
    """A Tune callback (built lazily) printing one line per trial that starts and ends: the quiet
    console's view of the search (``--verbose`` shows Tune's own status tables instead)."""

    def __new__(cls, total: int, max_epochs: int):
        from ray import tune

        class _Lines(tune.Callback):
            def __init__(self):
                self.started = self.ended = 0

            def on_trial_start(self, iteration, trials, trial, **info):
                self.started += 1
                params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items())
                print(f"[raysegment] trial {self.started}/{total} started: {params}", flush=True)

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.ended += 1
                r = trial.last_result or {}
                dice = " ".join(f"{c} {r[f'dice_{c}']:.3f}" for c in ("rv", "myo", "lv", "mean") if f"dice_{c}" in r)
                # 'epoch' (from 0) counts the epochs of a resumed trial's earlier sittings too
                epochs = r["epoch"] + 1 if "epoch" in r else r.get("training_iteration", 0)
                how = (f"stopped by ASHA after {epochs} of {max_epochs} epochs" if 0 < epochs < max_epochs
                       else f"ended after {epochs} epoch{'' if epochs == 1 else 's'}")
                print(f"[raysegment] trial {trial.trial_id} {how}: "
                      f"{dice or 'no result'} ({self.ended} of {total} done)", flush=True)

        return _Lines()


class MlflowTrialLogger:
    """A Tune callback (built lazily, Tune is imported late) that mirrors trials into MLflow."""

    def __new__(cls, tracking_uri: str, experiment_id: str, parent_run_id: str, base: TrainConfig):
        from ray import tune

        class _Logger(tune.Callback):
            def __init__(self):
                self.client = mlflow_client(tracking_uri)
                self.runs: dict[str, str] = {}

            def _run_for(self, trial) -> str:
                if trial.trial_id in self.runs:
                    return self.runs[trial.trial_id]
                # A resumed experiment finds the child run it made before.
                found = self.client.search_runs(
                    [experiment_id],
                    f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.tune_trial_id = '{trial.trial_id}'",
                )
                if found:
                    run_id = found[0].info.run_id
                else:
                    run = self.client.create_run(experiment_id, run_name=f"trial-{trial.trial_id}",
                                                 tags={"mlflow.parentRunId": parent_run_id,
                                                       "tune_trial_id": trial.trial_id})
                    run_id = run.info.run_id
                    config = apply_params(base, trial.config)
                    for k in SEARCHED:
                        if k in trial.config:
                            self.client.log_param(run_id, k, trial.config[k])
                    self.client.log_param(run_id, "backbone", config.model.backbone)
                    self.client.log_text(run_id, json.dumps(config.to_dict(), indent=2), "config.json")
                self.runs[trial.trial_id] = run_id
                return run_id

            def on_trial_start(self, iteration, trials, trial, **info):
                self.client.update_run(self._run_for(trial), status="RUNNING")  # a resumed trial was KILLED

            def on_trial_result(self, iteration, trials, trial, result, **info):
                run_id = self._run_for(trial)
                # Steps count epochs from 1, as the console's epoch lines and trial table do.
                step = int(result["epoch"]) + 1 if "epoch" in result else int(result.get("training_iteration", 0))
                for k in ("loss", "dice_rv", "dice_myo", "dice_lv", "dice_mean", "train_seconds"):
                    v = result.get(k)
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        self.client.log_metric(run_id, k, float(v), step=step)

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.client.set_terminated(self._run_for(trial), "FINISHED")

            def on_trial_error(self, iteration, trials, trial, **info):
                self.client.set_terminated(self._run_for(trial), "FAILED")

            def on_experiment_end(self, trials, **info):
                for trial in trials:  # a search stopped by Ctrl-C leaves trials paused or pending
                    if trial.trial_id in self.runs and trial.status not in ("TERMINATED", "ERROR"):
                        self.client.set_terminated(self.runs[trial.trial_id], "KILLED")

        return _Logger()
