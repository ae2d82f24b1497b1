"""ONNX: a model exported with its ``TrainConfig`` in the file's metadata, and ``OnnxNet``, the
ONNX Runtime session that stands in for the torch network inside the Predictor (same
normalisation, grid, context slices and post-processing: only the network pass changes).

    python -m raysegment.weights export-onnx shipped:densenet121 --out densenet121.onnx

The graph takes (N, C, H, W) float32 with H and W multiples of 32 (``OnnxNet`` pads like the
torch U-Net does and crops back), N, H and W dynamic. Imports ``config`` and ``model`` only;
``onnx``/``onnxruntime`` are imported when used.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raysegment.config import TrainConfig
from raysegment.model.checkpoint import LoadedModel

CONFIG_KEY, VERSION_KEY = "raysegment_config", "raysegment_source_version"
OPSET = 17


def onnx_bytes(loaded: LoadedModel) -> bytes:
    """The fp32 graph of a loaded model, its config and source version in the metadata."""
    import copy
    import warnings

    import onnx

    net = copy.deepcopy(loaded.model).float().cpu().eval()
    c = loaded.config.model.in_channels
    buf = io.BytesIO()
    axes = {0: "slices", 2: "height", 3: "width"}
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, c, 256, 256),), buf, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": axes, "logits": axes}, opset_version=OPSET, dynamo=False)
    graph = onnx.load_from_string(buf.getvalue())
    for key, value in ((CONFIG_KEY, json.dumps(loaded.config.to_dict())), (VERSION_KEY, loaded.version)):
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    return graph.SerializeToString()


def export_onnx(loaded: LoadedModel, out: str | Path) -> Path:
    """Write ``onnx_bytes(loaded)`` to ``out`` → its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(onnx_bytes(loaded))
    return out


class OnnxNet:
    """An ONNX Runtime session called like the torch U-Net: (N, C, H, W) tensor → logits tensor.

    Pads H and W to multiples of 32 as ``UNet.forward`` does (the exported graph was traced on
    such sizes) and crops the logits back. ``threads``: ONNX Runtime intra-op threads."""

    def __init__(self, model_bytes: bytes, context_slices: int, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        self.context_slices = context_slices
        self.digest = hashlib.sha256(model_bytes).hexdigest()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % 32, (-w) % 32
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "constant")
        out = self.session.run(None, {"image": np.ascontiguousarray(x.detach().float().cpu().numpy())})[0]
        return torch.from_numpy(out[..., :h, :w])

    # The Predictor moves and switches its networks; a session lives on the CPU and has no modes.
    def to(self, *args, **kwargs) -> "OnnxNet":
        return self

    def eval(self) -> "OnnxNet":
        return self


def to_onnx(loaded: LoadedModel, threads: int | None = None) -> LoadedModel:
    """A loaded torch model as the same model on ONNX Runtime (exported in memory)."""
    if isinstance(loaded.model, OnnxNet):
        return loaded
    return replace(loaded, model=OnnxNet(onnx_bytes(loaded), loaded.config.model.context_slices, threads))


def _metadata(path: Path, data: bytes) -> dict[str, str]:
    import onnx

    meta = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path}: an ONNX file without a raysegment config in its metadata "
                         f"(export it with `python -m raysegment.weights export-onnx`)")
    return meta


def onnx_config(path: str | Path) -> TrainConfig:
    """The TrainConfig an exported ``.onnx`` file carries."""
    path = Path(path)
    return TrainConfig.from_dict(json.loads(_metadata(path, path.read_bytes())[CONFIG_KEY]))


def load_onnx(path: str | Path, threads: int | None = None) -> LoadedModel:
    """An exported ``.onnx`` file → a LoadedModel (config from the file's metadata; version
    ``file:NAME:SHA256[:12]`` of the file). Raises ValueError for an ONNX file without it."""
    path = Path(path)
    data = path.read_bytes()
    meta = _metadata(path, data)
    config = TrainConfig.from_dict(json.loads(meta[CONFIG_KEY]))
    net = OnnxNet(data, config.model.context_slices, threads)
    return LoadedModel(net, config, version=f"file:{path.name}:{hashlib.sha256(data).hexdigest()[:12]}",
                       state={"source_version": meta.get(VERSION_KEY, "")})
