"""MLflow model registry: register checkpoints as ``raysegment-<backbone>``, move ``champion``.

A registered version holds ``checkpoint/model.pt`` (a state dict, loaded with
``weights_only=True``) and ``checkpoint/config.json`` (the ``TrainConfig``), plus an MLflow
pyfunc model defined from code (``raysegment/pyfunc_model.py``), so nothing is unpickled:

    mlflow.pyfunc.load_model("models:/raysegment-mobilenet_v2@champion").predict(volume)

Version tags: ``dice_rv, dice_myo, dice_lv, dice_mean`` (val, 3-D per volume),
``manifest_hash``, ``git_commit``, ``backbone``. The alias ``champion`` moves to a new
version only when its ``dice_mean`` beats the current champion's on the same manifest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raysegment import disable_telemetry
from raysegment.checkpoint import LoadedModel, load_checkpoint

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


def _signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
        # (z, y, x) mm of the volume, when known: the RV contact distance is then in mm, as in infer.
        params=ParamSchema([ParamSpec("spacing_mm", "double", [], (-1,))]),
    )


def log_checkpoint_model(checkpoint_dir: str | Path) -> str:
    """Log the checkpoint (state dict + config) as a pyfunc model in the active/new run → model URI."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        # Only weights and config travel; the optimizer state is training-only.
        ckpt = Path(tmp) / "checkpoint"
        ckpt.mkdir()
        for f in ("model.pt", "config.json", "state.json"):
            if (Path(checkpoint_dir) / f).exists():
                shutil.copy(Path(checkpoint_dir) / f, ckpt / f)
        code = Path(__file__).with_name("pyfunc_model.py")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code),
            artifacts={"checkpoint": str(ckpt)},
            signature=_signature(),
            pip_requirements=["raysegment", "torch", "torchvision", "numpy"],
        )
    return info.model_uri


def register_checkpoint(
    checkpoint_dir: str | Path,
    *,
    metrics: dict,
    tracking_uri: str,
    run_id: str | None = None,
    force_champion: bool = False,
) -> Registration:
    """Register a checkpoint folder as a new version and decide on the ``champion`` alias.

    ``metrics`` must hold the four val Dice values. The model is logged into ``run_id``
    (e.g. the tune parent run) or a new run of experiment ``raysegment-registry``.
    """
    import mlflow
    from mlflow import MlflowClient

    disable_telemetry()
    missing = [k for k in DICE_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"metrics lack {missing}")
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    backbone = config["model"]["backbone"]
    name = model_name(backbone)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    if run_id is None:
        mlflow.set_experiment("raysegment-registry")
        with mlflow.start_run(run_name=f"register-{backbone}") as run:
            run_id = run.info.run_id
            uri = log_checkpoint_model(checkpoint_dir)
    else:
        with mlflow.start_run(run_id=run_id):
            uri = log_checkpoint_model(checkpoint_dir)
    # register_model resolves a logged model's source (the REST store wants its model id).
    mv = mlflow.register_model(uri, name)
    client.update_registered_model(name, description=f"raysegment U-Net, {backbone} encoder, ACDC RV/MYO/LV")
    tags = {k: f"{float(metrics[k]):.6f}" for k in DICE_KEYS}
    tags.update(manifest_hash=config.get("manifest_hash", ""), git_commit=git_commit(), backbone=backbone,
                config=json.dumps(config, sort_keys=True)[:4900])
    for k, v in tags.items():
        client.set_model_version_tag(name, mv.version, k, v)

    promote, reason = _should_promote(client, name, float(metrics["dice_mean"]), tags["manifest_hash"])
    if force_champion:
        promote, reason = True, "forced"
    if promote:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    return Registration(name=name, version=str(mv.version), champion=promote, reason=reason)


def _should_promote(client, name: str, dice_mean: float, manifest_hash: str) -> tuple[bool, str]:
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:
        return True, "no champion yet"
    cur_dice = float(current.tags.get("dice_mean", "nan"))
    if current.tags.get("manifest_hash") != manifest_hash:
        return False, f"champion v{current.version} was scored on another data manifest; not comparable"
    if dice_mean > cur_dice:
        return True, f"dice_mean {dice_mean:.4f} beats champion v{current.version} ({cur_dice:.4f})"
    return False, f"dice_mean {dice_mean:.4f} does not beat champion v{current.version} ({cur_dice:.4f})"


def download_checkpoint(model_uri: str, tracking_uri: str | None, dst: str | Path) -> Path:
    """Fetch ``checkpoint/`` (state dict + config) of a registered model → local folder."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri.rstrip('/')}/artifacts/checkpoint",
                                                dst_path=str(dst))
    return Path(local)


def load_registered(model_uri: str, tracking_uri: str | None = None, device: str = "cpu",
                    version: str | None = None) -> LoadedModel:
    """The model of a registry URI such as ``models:/raysegment-x@champion``."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = download_checkpoint(model_uri, tracking_uri, tmp)
        return load_checkpoint(folder, device, version=version or model_uri[len("models:/"):])


def import_weights(weights_file: str | Path, tracking_uri: str, force_champion: bool = False) -> Registration:
    """Register a shipped ``.safetensors`` weights file (its val Dice comes from its metadata)."""
    from raysegment.weights import checkpoint_from_weights

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint_from_weights(weights_file, Path(tmp) / "checkpoint")
        state = json.loads((ckpt / "state.json").read_text()) if (ckpt / "state.json").exists() else {}
        metrics = state.get("metrics", {})
        if any(k not in metrics for k in DICE_KEYS):
            raise ValueError(f"{weights_file}: no val Dice in the file's metadata; cannot rank it for '{CHAMPION}'")
        return register_checkpoint(ckpt, metrics=metrics, tracking_uri=tracking_uri, force_champion=force_champion)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m raysegment.registry`` command line (also used to dry-run job specs)."""
    p = argparse.ArgumentParser(prog="python -m raysegment.registry", description="raysegment model registry tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="register a shipped weights file (.safetensors)")
    imp.add_argument("weights")
    imp.add_argument("--mlflow-uri", default="sqlite:///mlflow.db")
    imp.add_argument("--force-champion", action="store_true")
    reg = sub.add_parser("register", help="register a training checkpoint folder")
    reg.add_argument("checkpoint")
    reg.add_argument("--mlflow-uri", default="sqlite:///mlflow.db")
    reg.add_argument("--force-champion", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    disable_telemetry()
    if a.cmd == "import":
        r = import_weights(a.weights, a.mlflow_uri, a.force_champion)
    else:
        state = json.loads((Path(a.checkpoint) / "state.json").read_text())
        r = register_checkpoint(a.checkpoint, metrics=state["metrics"], tracking_uri=a.mlflow_uri,
                                force_champion=a.force_champion)
    print(f"registered {r.name} v{r.version}; champion: {r.champion} ({r.reason})")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
