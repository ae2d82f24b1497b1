"""What a search varies and what it found: the searched parameters (``SEARCHED``, their space,
their mapping onto a ``TrainConfig``), the table of trials ranked by val Dice and whether Tune's
results make a finished search. Imports the shared base only (Ray inside functions);
``raysegment.training.tune`` builds on it."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable

from raysegment.config import TrainConfig

SEARCHED = ("dice_fraction", "w_rv", "w_myo", "w_lv", "decoder_width", "lr")
# Default ranges: (low, high) of a float drawn uniformly (lr: log-uniformly), or the decoder widths.
# dice_fraction f: dice_weight = f, ce_weight = 1 - f.
RANGES: dict[str, tuple] = {"dice_fraction": (0.1, 0.9), "w_rv": (0.5, 2.0), "w_myo": (0.5, 2.0), "w_lv": (0.5, 2.0),
                            "decoder_width": (16, 32, 48), "lr": (3e-4, 6e-3)}
_LIMITS = {"dice_fraction": (0.0, 1.0), "lr": (0.0, 1.0)}  # where a range must lie (weights: above 0, no top)


def search_space(ranges: dict[str, tuple] | None = None) -> dict:
    """What Optuna searches: CE-vs-Dice balance, per-class weights, decoder width, learning rate;
    ``ranges`` (as ``RANGES``, checked by ``check_range``) replaces some of the default ranges."""
    from ray import tune

    bounds = {**RANGES, **(ranges or {})}
    space = {}
    for name in SEARCHED:  # this order: Optuna's seeded draws depend on it
        if name == "decoder_width":
            space[name] = tune.choice(list(bounds[name]))
        else:
            space[name] = (tune.loguniform if name == "lr" else tune.uniform)(*bounds[name])
    return space


def _limits(name: str) -> tuple[float, float, bool]:
    """(low, high, whether low itself is allowed) of searched parameter ``name``'s values."""
    lo, hi = _LIMITS.get(name, (0.0, float("inf")))
    return lo, hi, name == "dice_fraction"  # f = 0 (cross-entropy alone) is a loss; a weight or lr of 0 is not


def check_range(name: str, bounds: tuple) -> tuple:
    """``bounds`` for searched parameter ``name``, or ValueError saying why not: (low, high) with
    low < high inside the parameter's limits, or for decoder_width one or more widths ≥ 1."""
    if name not in SEARCHED:
        raise ValueError(f"{name!r} is not searched (searched: {', '.join(SEARCHED)})")
    if name == "decoder_width":
        if not bounds or any(int(w) != w or w < 1 for w in bounds):
            raise ValueError("decoder_width takes widths ≥ 1, e.g. decoder_width=16,32")
        return tuple(int(w) for w in bounds)
    lo, hi, closed = _limits(name)
    if len(bounds) != 2 or not (bounds[0] >= lo if closed else bounds[0] > lo) or not bounds[0] < bounds[1] <= hi:
        raise ValueError(f"{name} takes LOW:HIGH with {lo:g} {'≤' if closed else '<'} LOW < HIGH"
                         + (f" ≤ {hi:g}" if hi < float("inf") else ""))
    return (float(bounds[0]), float(bounds[1]))


def check_value(name: str, text: str) -> float | int:
    """``--set NAME=VALUE``'s value for searched parameter ``name``, or ValueError saying why not:
    inside the limits a range must lie in (a weight or lr above 0; dice_fraction 0 to 1)."""
    if name not in SEARCHED:
        raise ValueError(f"{name!r} is not searched (searched: {', '.join(SEARCHED)})")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} takes a number, got {text!r}") from None
    if name == "decoder_width":
        if int(value) != value or value < 1:
            raise ValueError(f"decoder_width takes a whole width ≥ 1, got {text}")
        return int(value)
    lo, hi, closed = _limits(name)
    if not (value >= lo if closed else value > lo) or value > hi:
        raise ValueError(f"{name} takes {lo:g} {'≤' if closed else '<'} VALUE" + (f" ≤ {hi:g}" if hi < float("inf") else "")
                         + f", got {text}")
    return value


def range_text(bounds: tuple) -> str:
    """A range as ``--range`` takes it: "LOW:HIGH", or the widths "W,W,…" (ints)."""
    if isinstance(bounds[0], int):
        return ",".join(str(b) for b in bounds)
    return f"{bounds[0]:g}:{bounds[1]:g}"


def space_record(fixed: dict, ranges: dict) -> dict:
    """What a search was started with (its pins and ranges), as saved beside it and compared on resume."""
    return {"fixed": {k: fixed[k] for k in sorted(fixed)}, "ranges": {k: list(ranges[k]) for k in sorted(ranges)}}


def space_text(record: dict) -> str:
    """A ``space_record`` as the options that give it (a pin may come from ``--init-weights``)."""
    words = [f"--set {k}={v:g}" for k, v in record["fixed"].items()]
    words += [f"--range {k}={range_text(tuple(v))}" for k, v in record["ranges"].items()]
    return " ".join(words) or "no --set or --range"


def apply_params(base: TrainConfig, params: dict) -> TrainConfig:
    """The TrainConfig of one trial: ``base`` with the searched (or fixed) parameters applied."""
    cw = base.loss.class_weights
    loss = replace(base.loss, class_weights=(float(params.get("w_rv", cw[0])), float(params.get("w_myo", cw[1])),
                                             float(params.get("w_lv", cw[2]))))
    if "dice_fraction" in params:
        f = float(params["dice_fraction"])
        loss = replace(loss, ce_weight=1.0 - f, dice_weight=f)
    model = replace(base.model, decoder_width=int(params.get("decoder_width", base.model.decoder_width)))
    return replace(base, loss=loss, model=model, lr=float(params.get("lr", base.lr)))


DICE = ("dice_rv", "dice_myo", "dice_lv", "dice_mean")


def trial_run_name(search: str, trial_id: str) -> str:
    """The name of one trial's Ray Train run (its checkpoints; under the search's ``train`` folder)."""
    return f"{search}-trial-{trial_id}"


def trial_table(results, trial_run_path: Callable[[str], str] | None = None) -> list[dict]:
    """One row per trial: searched params → best val Dice over its epochs.

    A trial whose Tune log lacks its first epochs — Tune starts the log of a resumed trial afresh,
    as our trials keep their checkpoints in their own Ray Train run — is read from that run
    (``trial_run_path(trial_id)``) instead."""
    rows = []
    for r in results:
        df = r.metrics_dataframe
        trial_id = (getattr(r, "metrics", None) or {}).get("trial_id") or Path(str(getattr(r, "path", ""))).name
        if df is None or "dice_mean" not in df or df["epoch"].min() > 0:
            found = _row_from_trial_run(trial_run_path(trial_id)) if trial_run_path else None
        else:
            # Of equal scores the latest epoch, as Ray Train ranks them when it keeps its best
            # checkpoints: an earlier one's folder may be gone (a collapsed trial's Dice of 0 at
            # every epoch, or epochs without validation that carry the last Dice).
            best = df.loc[df["dice_mean"][::-1].idxmax()]
            found = _row(int(df["epoch"].max()) + 1, best, best.get("checkpoint_path"))
        if found:
            rows.append({"trial_id": trial_id, **{k: r.config.get(k) for k in SEARCHED if k in r.config}, **found})
    return sorted(rows, key=lambda r: -r["dice_mean"])


def _row(epochs: int, best, checkpoint_path) -> dict:
    """A trial's epochs and its best epoch's Dice (``best``: that epoch's metrics) and checkpoint."""
    return {"epochs": epochs, "best_epoch": int(best["epoch"]), **{k: float(best[k]) for k in DICE},
            "checkpoint_path": checkpoint_path}


def _row_from_trial_run(path: str) -> dict | None:
    """Epochs and best validated epoch of the Ray Train run at ``path`` (its kept checkpoints
    include the best by dice_mean), or None where it left no checkpoint."""
    import ray.train

    # Ray warns, on reading a run's checkpoint record, that a new run of that name would resume it.
    quiet = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        result = ray.train.Result.from_path(path)
    except (RuntimeError, FileNotFoundError):
        return None
    finally:
        quiet.setLevel(level)
    kept = [(c, m) for c, m in result.best_checkpoints or [] if "dice_mean" in m]
    # An epoch that skipped validation carries older Dice: only validated epochs are scored.
    scored = [(c, m) for c, m in kept if m.get("validated_epoch", m["epoch"]) == m["epoch"]] or kept
    if not scored:
        return None
    checkpoint, best = max(scored, key=lambda cm: cm[1]["dice_mean"])
    return _row(int(result.metrics["epoch"]) + 1, best, checkpoint.path)


def unfinished(results, planned: int) -> bool:
    """Whether Tune returned from a search it stopped on Ctrl-C: fewer trials than ``planned``, or a
    trial that neither ended (Tune marks a last result ``done`` when a trial returns or its scheduler
    stops it) nor failed. The status does not tell: Tune marks the trials it stops TERMINATED."""
    return len(results) < planned or any(r.error is None and not r.metrics.get("done") for r in results)
