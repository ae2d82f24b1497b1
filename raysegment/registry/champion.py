"""MLflow model registry: register checkpoints as ``raysegment-<backbone>``, move ``champion``.

A registered version holds ``checkpoint/model.pt`` (a state dict, loaded with
``weights_only=True``) and ``checkpoint/config.json`` (the ``TrainConfig``), plus an MLflow
pyfunc model defined from code (``raysegment/pyfunc_model.py``), so nothing is unpickled:

    mlflow.pyfunc.load_model("models:/raysegment-mobilenet_v2@champion").predict(volume)

Version tags: ``dice_rv, dice_myo, dice_lv, dice_mean`` (val, 3-D per volume),
``manifest_hash``, ``git_commit``, ``backbone``; ``source_trial`` and ``search_run`` for a search's
models (``epoch`` for its best trial's, ``final`` for its final run's). Each version's description says
the same in words, with why it was or was not made champion. The alias ``champion`` moves to a new
version only when its ``dice_mean`` beats the current champion's on the same manifest.

``raysegment-ensemble`` versions (``python -m raysegment.registry ensemble``) hold
``members/0``, ``members/1``, ... instead of ``checkpoint/``; their pyfunc, ``Predictor.load`` and
``raysegment.inference.batch`` average the members' softmax. Tags: ``members`` (pinned versions or file
hashes), ``flip_tta`` (how the Dice tags were measured) and the Dice of the ensemble itself.

Imports ``registry.figures``, ``registry.logged_models``, ``inference``, ``analysis``, ``model``,
``data`` and ``runtime``; not ``training``, ``service``, ``soak`` or ``cli``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from raysegment.model.checkpoint import save_checkpoint
from raysegment.registry.figures import figures_shards, log_version_figures, log_version_history
from raysegment.registry.logged_models import diagnosis_model_kwargs, log_checkpoint_model, log_model_quietly, log_pyfunc
from raysegment.runtime import disable_telemetry

CHAMPION = "champion"
DICE_KEYS = ("dice_rv", "dice_myo", "dice_lv", "dice_mean")


def model_name(backbone: str) -> str:
    return f"raysegment-{backbone}"


def git_commit() -> str:
    """The commit of the raysegment source tree, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    champion: bool  # whether the alias now points at this version
    reason: str
    new: bool = True  # False: these weights, scored the same way, were this version already


# A version below this val mean Dice segments next to nothing: it never becomes champion, even
# when there is none yet (the alias would point batch jobs at a model that writes empty masks).
MIN_CHAMPION_DICE = 0.1
# A diagnosis classifier at or below chance (5 groups) is no classifier.
MIN_CHAMPION_ACCURACY = 0.2


def _register(name: str, uri: str, *, description: str, tags: dict[str, str], tracking_uri: str,
              force_champion: bool, metric: str = "dice_mean", floor: float = MIN_CHAMPION_DICE) -> Registration:
    """Register a logged model as the next version of ``name``, tag it, decide on ``champion``."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    # register_model resolves a logged model's source (the REST store wants its model id).
    mv = _quietly(mlflow.register_model, uri, name)
    client.update_registered_model(name, description=description)
    for k, v in tags.items():
        client.set_model_version_tag(name, mv.version, k, v)
    promote, reason = should_promote(client, name, tags, metric, floor)
    if force_champion:
        promote, reason = True, "forced"
    if promote:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    client.update_model_version(name, mv.version, description=version_text(tags, promote, reason))
    return Registration(name=name, version=str(mv.version), champion=promote, reason=reason)


def version_text(tags: dict[str, str], champion: bool, reason: str) -> str:
    """A version's description in the registry (the MLflow UI shows it on the version's page): what
    it scores, where it came from, and why it was or was not made champion when registered."""
    if "dice_mean" in tags:
        dice = " / ".join(f"{c.upper()} {float(tags['dice_' + c]):.3f}" for c in ("rv", "myo", "lv"))
        parts = [f"val Dice {dice}, mean {float(tags['dice_mean']):.3f}"
                 + (" (the file's own claim, not scored here)" if tags.get("evaluated") == "false" else "")]
    else:
        parts = [f"cross-validated accuracy {float(tags['cv_accuracy']):.3f} on {tags.get('patients') or '?'} patients"]
    if tags.get("final") == "true":
        parts.append(f"final run of search run {tags['search_run']}: trial {tags['source_trial']}'s configuration "
                     "from scratch, its last epoch")
    elif "source_trial" in tags:
        parts.append(f"search run {tags.get('search_run', '?')}, trial {tags['source_trial']}, epoch {tags.get('epoch', '?')}")
    if "members" in tags:
        parts.append("members " + ", ".join(json.loads(tags["members"])))
    if tags.get("manifest_hash"):
        parts.append(f"data manifest {tags['manifest_hash'][:12]}")
    # When registered: the alias moves on later, and the version page should not say otherwise.
    parts.append(f"{'made champion' if champion else 'not made champion'} when registered: {reason}")
    return "; ".join(parts) + "."


def _quietly(fn, *args):
    """``fn(*args)`` with MLflow's event stream off: ``register_model`` prints "Successfully
    registered model …" and "Created version …" to it, and every caller says what it registered."""
    from mlflow.utils import logging_utils

    stream = logging_utils.MLFLOW_LOGGING_STREAM
    was = stream.enabled
    stream.enabled = False
    try:
        return fn(*args)
    finally:
        stream.enabled = was


def _in_run(run_id: str | None, run_name: str, log) -> str:
    """Call ``log()`` inside ``run_id`` (e.g. the tune parent run) or a new ``raysegment-registry`` run."""
    import mlflow

    if run_id is None:
        mlflow.set_experiment("raysegment-registry")
        with mlflow.start_run(run_name=run_name):
            return log()
    with mlflow.start_run(run_id=run_id):
        return log()


def register_checkpoint(
    checkpoint_dir: str | Path,
    *,
    metrics: dict,
    tracking_uri: str,
    run_id: str | None = None,
    force_champion: bool = False,
    extra_tags: dict[str, str] | None = None,
    shards: str | Path | None = None,
) -> Registration:
    """Register a checkpoint folder as a new version and decide on the ``champion`` alias.

    ``metrics`` must hold the four val Dice values. The model is logged into ``run_id``
    (e.g. the tune parent run) or a new run of experiment ``raysegment-registry``, with
    ``figures/`` of its masks on the first val patient of ``shards`` (default: the shards it was
    trained on, where this machine has them).
    """
    import mlflow

    disable_telemetry()
    missing = [k for k in DICE_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"metrics lack {missing}")
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    backbone = config["model"]["backbone"]
    mlflow.set_tracking_uri(tracking_uri)
    data = figures_shards(checkpoint_dir, shards)

    def log() -> str:
        uri = log_checkpoint_model(checkpoint_dir)
        log_version_figures(str(checkpoint_dir), data)
        if run_id is None:  # a search's trial and final runs have logged their epochs already
            log_version_history(checkpoint_dir)
        return uri

    uri = _in_run(run_id, f"register-{backbone}", log)
    tags = {k: f"{float(metrics[k]):.6f}" for k in DICE_KEYS}
    from raysegment.model.checkpoint import read_state_dict, state_digest

    tags.update(manifest_hash=config.get("manifest_hash", ""), git_commit=git_commit(), backbone=backbone,
                config=json.dumps(config, sort_keys=True)[:4900],
                weights_sha256=state_digest(read_state_dict(checkpoint_dir)),  # checked whenever it is loaded
                **(extra_tags or {}))
    return _register(model_name(backbone), uri, description=f"raysegment U-Net, {backbone} encoder, ACDC RV/MYO/LV",
                     tags=tags, tracking_uri=tracking_uri, force_champion=force_champion)


ENSEMBLE_NAME = "raysegment-ensemble"


def register_ensemble(members: list[str], *, shards: str | Path, tracking_uri: str, flip_tta: bool = False,
                      force_champion: bool = False) -> Registration:
    """Register ``members`` (registry URIs, checkpoint folders or weights files) as the next version of
    ``raysegment-ensemble``: its pyfunc averages the members' softmax (``Predictor``). The version's
    Dice tags come from evaluating the ensemble on the val split of ``shards`` here, with or without
    flip TTA as asked (tag ``flip_tta``); ``members`` lists the pinned member versions."""
    import mlflow

    from raysegment.analysis.metrics import dice_summary
    from raysegment.data.prepare import load_manifest
    from raysegment.inference.evaluation import evaluate
    from raysegment.inference.predictor import is_registry_uri, load_models, model_version

    disable_telemetry()
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two members")
    mlflow.set_tracking_uri(tracking_uri)
    versions = [model_version(m, tracking_uri) for m in members]
    pinned = [f"models:/{v}" if is_registry_uri(m) else m for m, v in zip(members, versions)]
    manifest_hash = load_manifest(shards)["content_hash"]
    wanted = {"members": json.dumps(versions), "manifest_hash": manifest_hash, "flip_tta": str(flip_tta).lower()}
    same = _existing_version(ENSEMBLE_NAME, lambda t: all(t.get(k) == v for k, v in wanted.items()),
                             "these members, scored the same way, are this version", tracking_uri, force_champion)
    if same:
        return same
    summary = dice_summary(evaluate(pinned, shards, splits=("val",), tracking_uri=tracking_uri, flip_tta=flip_tta))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "members"
        for i, ref in enumerate(pinned):
            (loaded,) = load_models(ref, tracking_uri)  # a member that is itself an ensemble is refused here
            (folder / str(i)).mkdir(parents=True)
            save_checkpoint(folder / str(i), loaded.model, None, loaded.config, loaded.state)
        def log() -> str:
            uri = log_pyfunc({"members": str(folder)})
            log_version_figures(pinned, shards, tracking_uri)
            return uri

        uri = _in_run(None, "register-ensemble", log)
    tags = {k: f"{float(summary[k]):.6f}" for k in DICE_KEYS}
    tags.update(wanted, git_commit=git_commit())
    return _register(ENSEMBLE_NAME, uri, description="raysegment ensemble: the members' softmax averaged",
                     tags=tags, tracking_uri=tracking_uri, force_champion=force_champion)


def should_promote(client, name: str, tags: dict[str, str], metric: str = "dice_mean",
                   floor: float = MIN_CHAMPION_DICE) -> tuple[bool, str]:
    """The one champion rule, for every registered model (segmenters: ``dice_mean``; the diagnosis:
    ``cv_accuracy``): measured here, at least ``floor``, and strictly better than the champion's
    ``metric`` on the same data manifest — or no champion yet."""
    value, manifest_hash = float(tags[metric]), tags.get("manifest_hash", "")
    if tags.get("evaluated") == "false":
        return False, "its score is the file's own claim, not an evaluation run here (pass --data to score it on your val split)"
    if not value >= floor:  # NaN fails too
        return False, f"fails the sanity check: {metric} {value:.4f} < {floor}"
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:
        return True, "no champion yet"
    cur = float(current.tags.get(metric, "nan"))
    if current.tags.get("manifest_hash", "") != manifest_hash:
        return False, f"champion v{current.version} was scored on another data manifest; not comparable"
    if value > cur:
        return True, f"{metric} {value:.4f} beats champion v{current.version} ({cur:.4f})"
    return False, f"{metric} {value:.4f} does not beat champion v{current.version} ({cur:.4f})"


def register_scored(checkpoint_dir: str | Path, tracking_uri: str, shards: str | Path | None = None,
                    force_champion: bool = False) -> Registration:
    """Register a checkpoint folder made elsewhere. Its Dice tags come from scoring it here on the
    val split of ``shards`` (whose manifest the champion rule then compares on); without ``shards``
    its own ``state.json`` fills them, tagged ``evaluated=false``, and it never becomes champion
    (a file can claim any Dice)."""
    if shards is not None:
        from raysegment.analysis.metrics import dice_summary
        from raysegment.data.prepare import load_manifest
        from raysegment.inference.evaluation import evaluate

        manifest_hash = load_manifest(shards)["content_hash"]
        same = _registered_already(checkpoint_dir, tracking_uri, manifest_hash, True, force_champion)
        if same:
            return same
        with tempfile.TemporaryDirectory() as tmp:  # a copy: its config gets the manifest it was scored on
            ckpt = Path(tmp) / "checkpoint"
            shutil.copytree(checkpoint_dir, ckpt)
            metrics = dice_summary(evaluate(str(ckpt), shards, splits=("val",)))
            config = json.loads((ckpt / "config.json").read_text())
            config["manifest_hash"] = manifest_hash
            (ckpt / "config.json").write_text(json.dumps(config))
            return register_checkpoint(ckpt, metrics=metrics, tracking_uri=tracking_uri, force_champion=force_champion,
                                       shards=shards)
    state_file = Path(checkpoint_dir) / "state.json"
    metrics = json.loads(state_file.read_text()).get("metrics", {}) if state_file.exists() else {}
    if any(k not in metrics for k in DICE_KEYS):
        raise ValueError(f"{checkpoint_dir}: no val Dice recorded with it; pass --data to score it")
    manifest = json.loads((Path(checkpoint_dir) / "config.json").read_text()).get("manifest_hash", "")
    same = _registered_already(checkpoint_dir, tracking_uri, manifest, False, force_champion)
    if same:
        return same
    return register_checkpoint(checkpoint_dir, metrics=metrics, tracking_uri=tracking_uri, force_champion=force_champion,
                               extra_tags={"evaluated": "false"})


def _registered_already(checkpoint_dir: str | Path, tracking_uri: str, manifest_hash: str, evaluated: bool,
                        force_champion: bool) -> Registration | None:
    """The version that holds these weights (``weights_sha256``) scored the same way — on the same
    data manifest, or unscored — so that importing a file again registers nothing twice;
    ``force_champion`` moves the alias to that version."""
    from raysegment.model.checkpoint import read_state_dict, state_digest

    name = model_name(json.loads((Path(checkpoint_dir) / "config.json").read_text())["model"]["backbone"])
    digest = state_digest(read_state_dict(checkpoint_dir))
    return _existing_version(
        name, lambda t: (t.get("weights_sha256"), t.get("manifest_hash", ""), t.get("evaluated") != "false")
        == (digest, manifest_hash, evaluated), "these weights, scored the same way, are this version",
        tracking_uri, force_champion)


def _existing_version(name: str, same, why: str, tracking_uri: str, force_champion: bool) -> Registration | None:
    """The first version of ``name`` whose tags ``same(tags)`` accepts, as a Registration that made
    nothing new (``force_champion`` moves the alias to it); None when there is none."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    for v in client.search_model_versions(f"name='{name}'"):
        if same(v.tags):
            if force_champion:
                client.set_registered_model_alias(name, CHAMPION, v.version)
            aliases = client.get_registered_model(name).aliases
            return Registration(name=name, version=str(v.version), champion=str(aliases.get(CHAMPION)) == str(v.version),
                                reason="forced" if force_champion else why, new=False)
    return None


def import_weights(weights_file: str | Path, tracking_uri: str, shards: str | Path | None = None,
                   force_champion: bool = False) -> Registration:
    """Register a ``.safetensors`` weights file (digest checked), scored as ``register_scored``."""
    from raysegment.model.weights import checkpoint_from_weights

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint_from_weights(weights_file, Path(tmp) / "checkpoint")
        return register_scored(ckpt, tracking_uri, shards, force_champion)


DIAGNOSIS_MODEL = "raysegment-diagnosis"


def register_diagnosis(model_file: str | Path, *, tracking_uri: str) -> Registration:
    """Register a ``python -m raysegment.diagnosis fit`` JSON as the next version of ``raysegment-diagnosis``,
    tagged with its cross-validated accuracy and the segmenter whose masks it learnt from. The one
    champion rule (``should_promote``) decides on ``champion`` by that accuracy."""
    import mlflow

    from raysegment.analysis.diagnosis import load

    model = load(model_file)
    acc = float(model.meta.get("accuracy", float("nan")))
    mlflow.set_tracking_uri(tracking_uri)

    def log() -> str:
        mlflow.log_metrics({"cv_accuracy": acc, "cv_accuracy_sd": float(model.meta.get("accuracy_sd", float("nan")))})
        return log_model_quietly(name="model", **diagnosis_model_kwargs(model_file))

    uri = _in_run(None, "diagnosis", log)
    tags = {"cv_accuracy": f"{acc:.4f}", "segmenter": str(model.meta.get("segmenter", "")),
            "patients": str(model.meta.get("patients", "")), "manifest_hash": str(model.meta.get("manifest_hash", "")),
            "git_commit": git_commit()}
    return _register(DIAGNOSIS_MODEL, uri, description="ACDC diagnosis (NOR/MINF/DCM/HCM/RV) from segmentation-derived "
                     "features; JSON classifier (raysegment.analysis.diagnosis)", tags=tags, tracking_uri=tracking_uri,
                     force_champion=False, metric="cv_accuracy", floor=MIN_CHAMPION_ACCURACY)
