"""Shipped weights: one safetensors file per model, its TrainConfig in the file's metadata.

Loading never unpickles code: safetensors holds only tensors and strings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def export_weights(checkpoint_dir: str | Path, out: str | Path, half: bool = True) -> Path:
    """Checkpoint folder → ``out`` (.safetensors; fp16 unless ``half=False``)."""
    from safetensors.torch import save_file

    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    state = torch.load(checkpoint_dir / "model.pt", map_location="cpu", weights_only=True)
    tensors = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in state.items()}
    meta = {"config": (checkpoint_dir / "config.json").read_text(), "format": "raysegment-weights-1"}
    if (checkpoint_dir / "state.json").exists():
        meta["state"] = (checkpoint_dir / "state.json").read_text()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=meta)
    return out


def load_weights_file(path: str | Path, device: str = "cpu"):
    """(model in eval mode, TrainConfig) from a .safetensors file written by ``export_weights``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from raysegment.models import build_model
    from raysegment.train import TrainConfig

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path}: no raysegment config in the file's metadata")
    config = TrainConfig.from_dict(json.loads(meta["config"]))
    model = build_model(config.model)
    state = load_file(str(path), device=device)
    ref = model.state_dict()
    model.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()})
    return model.to(device).eval(), config


def checkpoint_from_weights(path: str | Path, out_dir: str | Path) -> Path:
    """Write a checkpoint folder (model.pt + config.json) from a weights file, e.g. to register it."""
    from safetensors import safe_open

    model, config = load_weights_file(path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / "model.pt")
    (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    with safe_open(str(path), framework="pt") as f:
        state = (f.metadata() or {}).get("state")
    if state:
        (out_dir / "state.json").write_text(state)
    return out_dir
