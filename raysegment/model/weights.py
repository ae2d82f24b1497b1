"""Shipped weights: one safetensors file per model, its TrainConfig in the file's metadata.

Tensors are stored fp16, except those beyond fp16's range (kept fp32).

Loading never unpickles code: safetensors holds only tensors and strings.

Imports ``model.unet``, ``model.checkpoint``, ``model.onnx`` and ``config``; nothing of ``data`` or
the stages above.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from raysegment.config import TrainConfig
from raysegment.model.checkpoint import (
    CONFIG_FILE,
    STATE_FILE,
    DamagedWeights,
    LoadedModel,
    last_checkpoint,
    read_config,
    read_state,
    read_state_dict,
    save_checkpoint,
    state_digest,
)

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "shipped"


def shipped_weights(backbone: str) -> Path:
    """The weights file bundled with raysegment for ``backbone`` (``raysegment/shipped/``)."""
    path = SHIPPED_DIR / f"{backbone}.safetensors"
    if not path.exists():
        there = ", ".join(f"shipped:{f.stem}" for f in sorted(SHIPPED_DIR.glob("*.safetensors")))
        raise FileNotFoundError(f"no shipped weights for {backbone!r} (there are {there or 'none'})")
    return path


def _metadata(path: Path) -> dict[str, str]:
    """A .safetensors file's metadata; ValueError for a file that is not one (safetensors raises
    its own error type, which callers' ``except ValueError`` missed)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except SafetensorError as exc:
        raise ValueError(f"{path}: not a .safetensors file ({exc})") from None


def saved_config(path: str | Path) -> TrainConfig:
    """The TrainConfig stored with a weights file, an exported .onnx file or a checkpoint folder."""
    path = Path(path)
    if path.is_dir():
        return read_config(path)
    if path.suffix == ".onnx":
        from raysegment.model.onnx import onnx_config

        return onnx_config(path)
    meta = _metadata(path)
    if "config" not in meta:
        raise ValueError(f"{path}: no raysegment config in the file's metadata")
    return TrainConfig.from_dict(json.loads(meta["config"]))


DIGEST_KEY = "tensors_sha256"


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A weights file's tensors, checked against the digest in its metadata (files exported before
    digests existed load unchecked, and say so once)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = _metadata(path)
    state = load_file(str(path), device=device)
    expected = meta.get(DIGEST_KEY)
    if expected is None:
        print(f"[raysegment] warning: {path.name} carries no tensor digest; it cannot be verified "
              f"(python -m raysegment.weights seal {path})", file=sys.stderr)
    elif state_digest(state) != expected:
        raise DamagedWeights(f"{path}: weights are damaged (their digest does not match the one written "
                             f"into the file); use an intact copy")
    # e.g. a file exported before tensors beyond fp16's range were kept fp32
    refuse_nonfinite(state, path, "export it again from its checkpoint")
    return state


def refuse_nonfinite(state: dict[str, torch.Tensor], source: str | Path, advice: str) -> None:
    """Raise DamagedWeights when a float tensor of ``state`` holds NaN or inf."""
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise DamagedWeights(f"{source}: {len(broken)} tensors hold NaN or inf (first: {broken[0]}); {advice}")


def saved_state(path: str | Path) -> dict:
    """The training state (epoch, metrics, history) stored with a weights file or checkpoint folder; {} if none."""
    path = Path(path)
    if path.is_dir():
        return read_state(last_checkpoint(path))  # a checkpoint, or a run folder's latest
    state = _metadata(path).get("state")
    return json.loads(state) if state else {}


def init_state_dict(path: str | Path, model_config, aux_init: dict | None = None) -> dict:
    """State dict (fp32) of a weights file or checkpoint folder, checked against ``model_config``.
    Deep-supervision heads (training only) may differ: those the saved model lacks come from
    ``aux_init`` (the new model's own fresh ones), those the run does not want are dropped."""
    path = Path(path)
    saved = saved_config(path).model
    if path.is_dir():
        state = read_state_dict(path)
    else:
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_tensors(path).items()}
    from dataclasses import replace

    if replace(saved, context_slices=model_config.context_slices, deep_supervision=model_config.deep_supervision) != model_config:
        raise ValueError(f"{path}: weights are for {saved}, the run wants {model_config}")
    if saved.context_slices != model_config.context_slices:
        state = widen_context(state, saved, model_config)
    if saved.deep_supervision != model_config.deep_supervision:
        from raysegment.model.unet import AUX_PREFIX

        kept = {k: v for k, v in state.items() if not k.startswith(AUX_PREFIX)}
        state = {**kept, **{k: v for k, v in (aux_init or {}).items() if k.startswith(AUX_PREFIX)}}
    return state


def widen_context(state: dict, saved, wanted) -> dict:
    """A state dict for ``saved.context_slices`` → one for ``wanted.context_slices`` (more, not fewer).

    The input conv's kernels for the added outer neighbours are zero, so the widened model
    computes exactly what the saved one does; fine-tuning then learns to use the neighbours.
    """
    from raysegment.model.unet import first_conv_key

    if wanted.context_slices < saved.context_slices:
        raise ValueError(f"cannot narrow context_slices {saved.context_slices} → {wanted.context_slices}")
    key = first_conv_key(wanted.backbone)
    pad = wanted.context_slices - saved.context_slices
    state = dict(state)
    state[key] = torch.nn.functional.pad(state[key], (0, 0, 0, 0, pad, pad))
    return state


FP16_MAX = torch.finfo(torch.float16).max  # 65504


def _storage(v: torch.Tensor, half: bool) -> torch.Tensor:
    """fp16 for a float tensor that fits its range; fp32 for one that does not (a BatchNorm
    running variance above 65504 would become inf and the model would predict nothing)."""
    if not (half and v.is_floating_point()) or v.numel() == 0:
        return v.contiguous()
    return (v.half() if v.abs().max().item() <= FP16_MAX else v.float()).contiguous()


def export_weights(checkpoint_dir: str | Path, out: str | Path, half: bool = True) -> Path:
    """Checkpoint folder → ``out`` (.safetensors; fp16 unless ``half=False``, and fp32 for the
    tensors beyond fp16's range). A checkpoint holding NaN or inf is refused."""
    checkpoint_dir = Path(checkpoint_dir)
    state_file = checkpoint_dir / STATE_FILE
    return save_weights(read_state_dict(checkpoint_dir), (checkpoint_dir / CONFIG_FILE).read_text(), out, half=half,
                        run_state=state_file.read_text() if state_file.exists() else None, source=checkpoint_dir)


def save_weights(state: dict, config_json: str, out: str | Path, *, half: bool = True, run_state: str | None = None,
                 source: str | Path = "the model") -> Path:
    """A state dict and its TrainConfig (JSON) → ``out`` (.safetensors), as ``export_weights`` writes
    it; ``run_state``: the run's state.json text (epoch, history). NaN or inf is refused."""
    out = Path(out)
    refuse_nonfinite(state, source, "nothing exported")
    tensors = {k: _storage(v.detach().cpu(), half) for k, v in state.items()}
    meta = {"config": config_json, "format": "raysegment-weights-1", DIGEST_KEY: state_digest(tensors)}
    if run_state is not None:
        meta["state"] = run_state
    out.parent.mkdir(parents=True, exist_ok=True)
    _write(out, tensors, meta)
    return out


def _write(path: Path, tensors: dict, meta: dict) -> None:
    """A .safetensors file written whole or not at all, with the umask's permissions (safetensors'
    own ``save_file`` leaves 0600: a weights file then unreadable to the rest of a team)."""
    from safetensors.torch import save

    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(save(tensors, metadata=meta))
    tmp.replace(path)


def load_weights_file(path: str | Path, device: str = "cpu") -> LoadedModel:
    """The model (eval mode) of a .safetensors file written by ``export_weights`` (digest checked)."""
    from raysegment.model.unet import build_model

    path = Path(path)
    config = saved_config(path)
    model = build_model(config.model)
    state = load_tensors(path, device)
    ref = model.state_dict()
    model.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()})
    return LoadedModel(model.to(device).eval(), config, f"file:{path.name}", saved_state(path))


def checkpoint_from_weights(path: str | Path, out_dir: str | Path) -> Path:
    """Write a checkpoint folder (model.pt + config.json) from a weights file, e.g. to register it."""
    loaded = load_weights_file(path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out_dir, loaded.model, None, loaded.config, loaded.state)
    return out_dir


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def seal(path: str | Path) -> str:
    """Write the tensor digest into a weights file exported before digests existed (tensors and the
    rest of the metadata unchanged) → the digest."""
    from safetensors.torch import load_file

    path = Path(path)
    meta, state = _metadata(path), load_file(str(path))
    meta[DIGEST_KEY] = state_digest(state)
    _write(path, state, meta)
    return meta[DIGEST_KEY]


def verify(folder: str | Path = SHIPPED_DIR) -> dict[str, bool]:
    """Check every file listed in ``folder/SHA256SUMS`` → {file name: matches}."""
    folder = Path(folder)
    out = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        name = name.lstrip("*")
        out[name] = (folder / name).exists() and sha256(folder / name) == digest
    return out
