"""What a registered version looks like in its MLflow run: outline thumbnails (RV red, MYO green, LV
blue) of the model's segmentation of the first val patient of its data, ED and ES, under
``figures/``; and, for a version registered in a run of its own (``registry import`` / ``register``),
the training history it carries as the run's metrics, which MLflow draws as learning curves. A
search's parent run gets ``figures/search.png`` (``reporting.search``), drawn from its trials' runs.

May import ``inference``, ``reporting`` and ``data``; not ``training`` or ``cli``.
"""

from __future__ import annotations

import sys
from pathlib import Path

FIGURES = "figures"  # the artifact folder of the version's run


def version_figures(models: str | list[str], shards: str | Path, out: Path, tracking_uri: str | None = None) -> list[Path]:
    """PNG thumbnails (3 slices basal to apical) of the masks ``models`` (what ``Predictor.load``
    takes: a checkpoint folder, or an ensemble's members) give the first val patient of ``shards``
    (a shards folder or a bundle), one per phase → the files written."""
    from raysegment.data.dataset import load_volumes
    from raysegment.inference.predictor import Predictor
    from raysegment.reporting.report import overlay_thumbnail

    if Path(shards, "manifest.json").is_file():  # a shards folder: read the one patient alone
        from raysegment.data.prepare import load_manifest

        volumes = load_volumes(shards, "val", patients=load_manifest(shards)["splits"]["val"][:1])
    else:
        volumes = load_volumes(shards, "val")
        volumes = [v for v in volumes if v.patient == volumes[0].patient]
    predictor = Predictor.load(models, tracking_uri=tracking_uri)
    written = []
    for v in volumes:
        mask = predictor.predict(v.image, spacing=v.spacing, normalized=True)
        written.append(overlay_thumbnail(v.image, mask, out / f"val_{v.patient}_{v.phase}.png"))
    return written


def figures_shards(checkpoint_dir: str | Path, shards: str | Path | None) -> Path | None:
    """The data to draw a version's figures on: ``shards``, else the shards the checkpoint was
    trained on (its config's ``data``) where this machine has them, else None."""
    import json

    from raysegment.data.dataset import is_bundle

    if shards is None:
        shards = json.loads((Path(checkpoint_dir) / "config.json").read_text()).get("data")
    if not shards:
        return None
    shards = Path(shards)
    return shards if (shards / "manifest.json").is_file() or (shards.is_file() and is_bundle(shards)) else None


def log_version_figures(models: str | list[str], shards: str | Path | None, tracking_uri: str | None = None) -> None:
    """Log ``version_figures`` into the active MLflow run (nothing without ``shards``); a version
    registers without them when they cannot be drawn (no val split there, say), with one line saying why."""
    import tempfile

    import mlflow

    if shards is None:
        return
    try:
        with tempfile.TemporaryDirectory() as tmp:
            version_figures(models, shards, Path(tmp), tracking_uri)
            mlflow.log_artifacts(tmp, FIGURES)
    except Exception as exc:  # the version is what matters; its pictures are a convenience
        print(f"[raysegment] registered without figures ({type(exc).__name__}: {exc})", file=sys.stderr)


HISTORY_METRICS = ("loss", "dice_rv", "dice_myo", "dice_lv", "dice_mean")


def log_history(client, run_id: str, history: list[dict]) -> int:
    """A training history (per-epoch ``HISTORY_METRICS``) as metrics of MLflow run ``run_id``, step =
    epoch from 1 as the console counts (non-finite values left out) → how many values were logged."""
    import math
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(h[k]), now, int(h["epoch"]) + 1) for h in history for k in HISTORY_METRICS
               if isinstance(h.get(k), (int, float)) and math.isfinite(h[k])]
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    return len(metrics)


def log_version_history(checkpoint_dir: str | Path) -> int:
    """The checkpoint's per-epoch history (``state.json``) as metrics of the active MLflow run."""
    import json

    import mlflow

    state_file = Path(checkpoint_dir) / "state.json"
    history = json.loads(state_file.read_text()).get("history", []) if state_file.is_file() else []
    return log_history(mlflow.MlflowClient(), mlflow.active_run().info.run_id, history)


def log_search_figure(client, experiment_id: str, parent_run_id: str, trials: list[dict], params) -> None:
    """``figures/search.png`` of a search's MLflow parent run: its trials' per-epoch val Dice (read
    from their child runs, so a resumed trial's earlier sittings count) and ``trials`` (the trial
    table, best first) against the searched ``params``. One line instead where it cannot be drawn."""
    import tempfile

    from raysegment.reporting.search import search_figure

    try:
        runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=5000)
        curves = {}
        for run in runs:
            trial = run.data.tags.get("tune_trial_id")
            if trial:  # not the final run
                by_step = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "dice_mean")}
                curves[trial] = sorted(by_step.items())
        with tempfile.TemporaryDirectory() as tmp:
            png = search_figure(trials, curves, params, Path(tmp) / "search.png")
            client.log_artifact(parent_run_id, str(png), FIGURES)
    except Exception as exc:  # the search's result is what matters; its picture is a convenience
        print(f"[raysegment] search figure not drawn ({type(exc).__name__}: {exc})", file=sys.stderr)
