"""The checkpoint folder layout and the one shape every model loader returns (``LoadedModel``).

A checkpoint folder holds ``model.pt`` (a state dict, read with ``weights_only=True``),
``config.json`` (the ``TrainConfig``), ``state.json`` (epoch, metrics, history) and, for
training checkpoints, ``optimizer.pt``.

Imports ``model.unet`` and ``config``; nothing of ``data`` or the stages above.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from raysegment.config import TrainConfig

if TYPE_CHECKING:
    from torch import nn

MODEL_FILE, OPTIM_FILE, CONFIG_FILE, STATE_FILE = "model.pt", "optimizer.pt", "config.json", "state.json"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to predict (eval mode), the config it was trained with, and where it came from."""

    model: "nn.Module"
    config: TrainConfig
    version: str  # what results and ledgers key on: ``NAME/VERSION`` or ``file:NAME:SHA256[:12]``
    state: dict = field(default_factory=dict)  # training state (epoch, metrics, history); {} if none


def is_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and (folder / MODEL_FILE).is_file() and (folder / CONFIG_FILE).is_file()


def last_checkpoint(folder: str | Path) -> Path:
    """``folder`` itself when it is a checkpoint; for a run folder (``--storage``/``--name``), its
    checkpoint of the latest epoch — what a run ships. FileNotFoundError, saying which, otherwise."""
    folder = Path(folder)
    if is_checkpoint(folder):
        return folder
    found = [c for c in folder.glob("checkpoint_*") if is_checkpoint(c)] if folder.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{folder}: neither a checkpoint folder ({MODEL_FILE}, {CONFIG_FILE}) "
                                f"nor a run folder holding checkpoint_* folders")
    return max(found, key=lambda c: (read_state(c).get("epoch", -1), c.name))


def read_config(folder: str | Path) -> TrainConfig:
    return TrainConfig.from_dict(json.loads((Path(folder) / CONFIG_FILE).read_text()))


def read_state(folder: str | Path) -> dict:
    path = Path(folder) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def read_state_dict(folder: str | Path, device: str = "cpu") -> dict:
    import torch

    return torch.load(Path(folder) / MODEL_FILE, map_location=device, weights_only=True)


def save_checkpoint(folder: Path, model, optimizer, config: TrainConfig, state: dict) -> None:
    """Write a checkpoint folder (``optimizer`` may be None)."""
    import torch

    torch.save(model.state_dict(), folder / MODEL_FILE)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), folder / OPTIM_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))


class DamagedWeights(ValueError):
    """Weights whose tensors no longer match the digest recorded for them."""


def state_digest(state: dict) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes: what a weights file or a registered
    version records, and what every load recomputes (a damaged copy anywhere is refused)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_checkpoint(folder: str | Path, device: str = "cpu", version: str | None = None) -> LoadedModel:
    """Rebuild the model of a checkpoint folder from its own config."""
    from raysegment.model.unet import build_model

    folder = Path(folder)
    if not is_checkpoint(folder):
        raise FileNotFoundError(f"{folder}: not a checkpoint folder (needs {MODEL_FILE} and {CONFIG_FILE})")
    config = read_config(folder)
    model = build_model(config.model)
    model.load_state_dict(read_state_dict(folder, device))
    return LoadedModel(model.to(device).eval(), config, version or f"file:{folder.name}", read_state(folder))
