"""The Predictor: the one way raysegment applies a model to an image.

Validation during training, ``report``, ``infer``, the MLflow pyfunc, ``raysegment.segment``
and ``bench`` all call it, so the same study gives the same mask on every path. It owns what
used to live at each call site:

* normalisation (the per-volume percentiles recorded in the model's ``TrainConfig``),
* the network grid (``image_size``) and 2.5-D context (``context_slices``) of each model,
* device and precision (``auto`` resolved per device and recorded in ``Predictor.config``),
* test-time augmentation (flip TTA only for models trained with flips),
* ensembles: members' softmax averaged on the image's own grid,
* post-processing: each structure's largest 3-D component, the RV's within a contact
  distance of the myocardium/LV given in mm where the spacing is known.

    from raysegment.inference.predictor import Predictor
    predictor = Predictor.load(["a.safetensors", "models:/raysegment-densenet121@champion"])
    labels = predictor.predict(volume_zyx, spacing=(10.0, 1.4, 1.4))   # uint8 (z, y, x)
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from raysegment.analysis.postprocess import contact_pixels, keep_largest_component
from raysegment.config import Precision, PredictConfig, TrainConfig
from raysegment.io.studies import normalize_intensity, turn_in_plane, turn_spacing
from raysegment.model.checkpoint import LoadedModel, is_checkpoint, last_checkpoint, load_checkpoint
from raysegment.model.onnx import OnnxNet, load_onnx, to_onnx
from raysegment.model.unet import with_context

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}  # None: no autocast (fp32)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX). Without it oneDNN
    emulates bf16, and a MobileNetV2 step runs ~13× slower than in fp32 (AVX2-only EPYC, measured)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers moved: ask oneDNN instead
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """``auto`` → bf16 on GPUs that have it (sm_80+) and on CPUs with native bf16; fp16 on older
    GPUs; fp32 on CPUs without native bf16."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def check_flip_tta(config: TrainConfig) -> None:
    """Flip test-time augmentation averages in the mirrored image's prediction; a model trained
    without flips has never seen a mirrored heart, so refuse it."""
    if config.augment.flip_prob == 0:
        raise ValueError("flip TTA needs a model trained with left-right flips; this one was trained with "
                         "augment.flip_prob=0 (train with --flip-prob 0.5 to use --flip-tta)")


# --------------------------------------------------------------------------- loading


def is_registry_uri(ref: str) -> bool:
    return str(ref).startswith("models:/")


def model_version(ref: str, tracking_uri: str | None = None) -> str:
    """The version string results and ledgers key on, without loading the model:
    ``NAME/VERSION`` for a registry URI (an alias resolved now), ``file:NAME:SHA256[:12]`` for files."""
    from raysegment.model.weights import sha256

    ref = str(ref)
    if is_registry_uri(ref):
        from mlflow import MlflowClient

        name, _, alias = ref[len("models:/"):].partition("@")
        if alias:
            return f"{name}/{MlflowClient(tracking_uri).get_model_version_by_alias(name, alias).version}"
        return ref[len("models:/"):]
    path = _local_path(ref)
    weights = path / "model.pt" if path.is_dir() else path  # .safetensors or .onnx: the file itself
    return f"file:{path.name}:{sha256(weights)[:12]}"


def pinned(ref: str, tracking_uri: str | None = None) -> tuple[str, str]:
    """(``ref`` with a registry alias pinned to the version it points at now, that version string):
    loading the pinned reference gives the model the version names, even if the alias moves."""
    version = model_version(ref, tracking_uri)
    return (f"models:/{version}" if is_registry_uri(ref) else str(ref)), version


def _local_path(ref: str) -> Path:
    if ref.startswith("shipped:"):
        from raysegment.model.weights import shipped_weights

        return shipped_weights(ref[len("shipped:"):])
    path = Path(ref)
    if is_checkpoint(path) or (path.is_file() and path.suffix in (".safetensors", ".onnx")):
        return path
    try:
        return last_checkpoint(path)  # a training run's folder: its latest epoch (the run may go on)
    except FileNotFoundError:
        pass
    raise FileNotFoundError(f"{ref}: not a models:/ URI, a checkpoint folder (model.pt + config.json), a run "
                            f"folder holding them, a .safetensors weights file, an exported .onnx file or shipped:BACKBONE")


def registered_folders(model_uri: str, tracking_uri: str | None, dst: str | Path) -> list[Path]:
    """Download a registered version's checkpoint folder(s) → ``[checkpoint]`` for a single model,
    ``[members/0, members/1, ...]`` for an ensemble (``python -m raysegment.registry ensemble``)."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri.rstrip('/')}/artifacts", dst_path=str(dst)))
    if (root / "members").is_dir():
        return sorted((p for p in (root / "members").iterdir() if p.is_dir()), key=lambda p: int(p.name))
    return [root / "checkpoint"]


def load_models(ref: str, tracking_uri: str | None = None, device: str = "cpu") -> list[LoadedModel]:
    """The model(s) of one reference: a registry URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``;
    an ensemble version gives its members), a checkpoint folder, a ``.safetensors`` weights file or
    ``shipped:BACKBONE``."""
    import tempfile

    ref = str(ref)
    if is_registry_uri(ref):
        version = model_version(ref, tracking_uri)
        with tempfile.TemporaryDirectory() as tmp:
            folders = registered_folders(f"models:/{version}", tracking_uri, tmp)
            if len(folders) == 1:
                _check_registered_digest(folders[0], version, tracking_uri)
            return [load_checkpoint(f, device, version=version) for f in folders]
    return [load_model(ref, device=device)]


def _check_registered_digest(folder: Path, version: str, tracking_uri: str | None) -> None:
    """Refuse a registered checkpoint whose weights differ from the digest tagged at registration."""
    from mlflow import MlflowClient

    from raysegment.model.checkpoint import DamagedWeights, read_state_dict, state_digest

    name, number = version.rsplit("/", 1)
    expected = MlflowClient(tracking_uri).get_model_version(name, number).tags.get("weights_sha256")
    if expected and state_digest(read_state_dict(folder)) != expected:
        raise DamagedWeights(f"models:/{version}: the stored weights do not match the digest recorded when it was "
                             f"registered (tag weights_sha256); the artifact was damaged or replaced")


def load_model(ref: str, tracking_uri: str | None = None, device: str = "cpu") -> LoadedModel:
    """One model (see ``load_models``); a registered ensemble is refused here."""
    ref = str(ref)
    if is_registry_uri(ref):
        members = load_models(ref, tracking_uri, device)
        if len(members) != 1:
            raise ValueError(f"{ref} is an ensemble of {len(members)} models; use Predictor.load")
        return members[0]
    path = _local_path(ref)
    version = model_version(str(path))
    if path.is_dir():
        return load_checkpoint(path, device, version=version)
    if path.suffix == ".onnx":
        return load_onnx(path)
    from raysegment.model.weights import load_weights_file

    return replace(load_weights_file(path, device), version=version)


# --------------------------------------------------------------------------- post-processing


# --------------------------------------------------------------------------- the Predictor


class Predictor:
    """Applies one model, or an ensemble of models, to (z, y, x) volumes on their own grid."""

    def __init__(self, members: LoadedModel | Sequence[LoadedModel], config: PredictConfig = PredictConfig(),
                 version: str | None = None):
        members = [members] if isinstance(members, LoadedModel) else list(members)
        if not members:
            raise ValueError("a Predictor needs at least one model")
        classes = {m.config.model.num_classes for m in members}
        if len(classes) > 1:
            raise ValueError(f"ensemble members disagree on the number of classes: {sorted(classes)}")
        if config.flip_tta:
            for m in members:
                check_flip_tta(m.config)
        self.device = torch.device(config.device)
        if config.runtime == "onnx":
            members = _onnx_members(members, self.device)
        if any(isinstance(m.model, OnnxNet) for m in members):
            config = replace(config, precision="fp32")  # ONNX Runtime runs the fp32 graph as exported
        self.config = replace(config, precision=resolve_precision(config.precision, self.device))
        self.dtype = AUTOCAST_DTYPES[self.config.precision]
        self.members = [replace(m, model=m.model.to(self.device).eval()) for m in members]
        self.num_classes = classes.pop()
        # What results and ledgers key on: the references' versions joined by "+" (``load``), else the members'.
        self.version = version or "+".join(m.version for m in self.members)
        self.forward_seconds = 0.0  # time spent inside the networks (bench: "pure forward")
        self.auto_turns: dict[str, int] = {}  # what "auto" chose, per turn ("report evaluate --auto-in-plane")

    @classmethod
    def load(cls, refs: str | Sequence[str], config: PredictConfig = PredictConfig(),
             tracking_uri: str | None = None) -> "Predictor":
        """From one reference or several (an ensemble); see ``load_model`` for what a reference is."""
        refs = [str(r) for r in ([refs] if isinstance(refs, (str, Path)) else refs)]
        return cls([m for r in refs for m in load_models(r, tracking_uri, config.device)], config,
                   version="+".join(model_version(r, tracking_uri) for r in refs))

    # ----------------------------------------------------------------- network passes

    def _inputs(self, image: np.ndarray, normalized: bool) -> list[torch.Tensor]:
        """Per member, its (z, C, y, x) float32 input on the device (normalised once per recipe)."""
        if image.ndim != 3:
            raise ValueError(f"expected a (z, y, x) volume, got shape {image.shape}")
        normed: dict[tuple, np.ndarray] = {}
        inputs = []
        for m in self.members:
            key = tuple(m.config.intensity_percentiles)
            if key not in normed:
                normed[key] = (np.ascontiguousarray(image, np.float32) if normalized
                               else normalize_intensity(image, key))
            x = torch.from_numpy(normed[key])
            inputs.append(with_context(x, m.model.context_slices).to(self.device, non_blocking=True))
        return inputs

    def _logits(self, member: LoadedModel, x: torch.Tensor, out_hw: tuple[int, int],
                spacing: Sequence[float] | None = None) -> torch.Tensor:
        """Logits (N, C, y, x) float32 on the image grid: network grid in, mean over TTA, resized back.

        The network grid is ``image_size``² for older models; for a ``pixel_mm`` model the slice
        resampled to that pixel size (mm), zero-padded to a multiple of 32 pixels and cropped back after.
        """
        pixel_mm = member.config.pixel_mm
        if pixel_mm:
            from raysegment.data.dataset import mm_shape

            shape = mm_shape(out_hw, None if spacing is None else spacing[1:], pixel_mm)
            padded = [-(-n // 32) * 32 for n in shape]
            pads = [(p - n) // 2 for p, n in zip(padded, shape)]
            xb = F.interpolate(x, size=shape, mode="bilinear", align_corners=False)
            xb = F.pad(xb, (pads[1], padded[1] - shape[1] - pads[1], pads[0], padded[0] - shape[0] - pads[0]))
        else:
            size = member.config.image_size
            xb = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            logits = member.model(xb).float()
            if self.config.flip_tta:
                logits = (logits + member.model(xb.flip(-1)).float().flip(-1)) / 2
        self.forward_seconds += time.perf_counter() - t0
        if pixel_mm:
            logits = logits[:, :, pads[0] : pads[0] + shape[0], pads[1] : pads[1] + shape[1]]
        return F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def _batches(self, image: np.ndarray, normalized: bool, spacing: Sequence[float] | None = None):
        """Yield (slice range, per-member logits on the image grid) batch by batch."""
        inputs = self._inputs(image, normalized)
        z, h, w = image.shape
        bs = self.config.batch_size
        for a in range(0, z, bs):
            yield slice(a, a + bs), [self._logits(m, x[a : a + bs], (h, w), spacing)
                                     for m, x in zip(self.members, inputs)]

    # ----------------------------------------------------------------- in-plane orientation

    # "auto" chooses between these: NIfTI converters differ in whether rows run down (as DICOM's) or up.
    AUTO_IN_PLANE = ("as-stored", "rows-reversed")

    def in_plane_for(self, image: np.ndarray, *, spacing: Sequence[float] | None = None, normalized: bool = False,
                     in_plane: str | None = None) -> str:
        """The in-plane turn ``predict`` applies to ``image``: ``in_plane`` (default ``config.in_plane``),
        or for "auto" whichever of ``AUTO_IN_PLANE`` the models segment the middle 3 slices in with more
        confidence (mean top softmax over the pixels they call heart; a tie keeps as-stored). On the 80
        ACDC patients' 160 volumes, stored and with rows reversed, both shipped models chose right every time."""
        how = in_plane or self.config.in_plane
        if how != "auto":
            return how
        mid = image.shape[0] // 2
        part = image[max(mid - 1, 0): mid + 2]
        scores = []
        for how in self.AUTO_IN_PLANE:
            probs = self._probabilities(turn_in_plane(part, how), spacing, normalized)
            heart = probs[1:].sum(0) > 0.5
            scores.append(float(probs.max(0)[heart].mean()) if heart.any() else 0.0)
        chosen = self.AUTO_IN_PLANE[int(np.argmax(scores))]
        self.auto_turns[chosen] = self.auto_turns.get(chosen, 0) + 1
        return chosen

    def _turned(self, image: np.ndarray, spacing, normalized: bool, in_plane: str | None):
        """(turn, turned image, its spacing) for ``predict`` and ``probabilities``."""
        how = self.in_plane_for(image, spacing=spacing, normalized=normalized, in_plane=in_plane)
        return how, turn_in_plane(image, how), turn_spacing(spacing, how)

    def probabilities(self, image: np.ndarray, *, spacing: Sequence[float] | None = None,
                      normalized: bool = False, in_plane: str | None = None) -> np.ndarray:
        """Softmax (C, z, y, x) float32, averaged over the members (and over TTA inside each);
        ``spacing`` (z, y, x mm) places the slices on a ``pixel_mm`` model's grid; ``in_plane``
        (default ``config.in_plane``) turns the image before the networks and the result back."""
        how, image, spacing = self._turned(image, spacing, normalized, in_plane)
        return turn_in_plane(self._probabilities(image, spacing, normalized), how)

    def _probabilities(self, image: np.ndarray, spacing, normalized: bool) -> np.ndarray:
        z, h, w = image.shape
        out = np.empty((self.num_classes, z, h, w), np.float32)
        for sl, member_logits in self._batches(image, normalized, spacing):
            probs = torch.stack([lg.softmax(1) for lg in member_logits]).mean(0)
            out[:, sl] = probs.permute(1, 0, 2, 3).cpu().numpy()
        return out

    def predict(self, image: np.ndarray, *, spacing: Sequence[float] | None = None, normalized: bool = False,
                in_plane: str | None = None) -> np.ndarray:
        """Labels uint8 (z, y, x) of a (z, y, x) volume (any intensity scale unless ``normalized``).

        ``spacing`` (z, y, x mm) sets the RV contact distance in mm (without it, in pixels) and a
        ``pixel_mm`` model's grid (without it, the image's pixels are taken as that size).
        One model: argmax of its logits. An ensemble: argmax of the members' mean softmax.
        ``in_plane`` (default ``config.in_plane``): the turn applied before the networks and undone after.
        """
        how, image, spacing = self._turned(image, spacing, normalized, in_plane)
        return turn_in_plane(self._predict(image, spacing, normalized), how)

    def _predict(self, image: np.ndarray, spacing, normalized: bool) -> np.ndarray:
        out = np.empty(image.shape, np.uint8)
        for sl, member_logits in self._batches(image, normalized, spacing):
            if len(member_logits) == 1:
                scores = member_logits[0]
            else:
                scores = torch.stack([lg.softmax(1) for lg in member_logits]).mean(0)
            out[sl] = scores.argmax(1).to(torch.uint8).cpu().numpy()
        if self.config.largest_component:
            out = keep_largest_component(out, contact_pixels(self.config, spacing))
        return out


def _onnx_members(members: list[LoadedModel], device: torch.device) -> list[LoadedModel]:
    if device.type != "cpu":
        raise ValueError(f"runtime onnx runs on the CPU (ONNX Runtime's CPU provider); got device {device}")
    return [to_onnx(m, torch.get_num_threads()) for m in members]


def predict_volumes(predictor: Predictor, volumes) -> Iterator[tuple[object, np.ndarray]]:
    """(volume, predicted labels) for shard volumes (already normalised; spacing when they carry it)."""
    for v in volumes:
        yield v, predictor.predict(v.image, spacing=v.spacing, normalized=True)


def predicted_masks(predictor: Predictor, volumes, cache: str | Path | None = None, progress=None) -> dict:
    """(patient, phase) → predicted labels of shard volumes. With ``cache`` (a folder), the masks of
    the same model version, prediction settings and volumes are read back from there, or saved there.
    ``progress(done, total)`` is called after each volume segmented."""
    volumes = list(volumes)
    path = None
    if cache is not None:
        import hashlib
        from dataclasses import asdict

        key = hashlib.sha256(json.dumps([predictor.version, asdict(predictor.config)], sort_keys=True, default=str).encode())
        for v in volumes:
            key.update(f"{v.patient}/{v.phase}/{v.image.shape}".encode())
            key.update(np.ascontiguousarray(v.image).tobytes())
        path = Path(cache) / f"masks-{key.hexdigest()[:20]}.npz"
        if path.is_file():
            with np.load(path) as z:
                return {tuple(k.split("/")): z[k] for k in z.files}
    masks = {}
    for v, pred in predict_volumes(predictor, volumes):
        masks[(v.patient, v.phase)] = pred
        if progress:
            progress(len(masks), len(volumes))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial.npz")
        np.savez_compressed(tmp, **{f"{p}/{ph}": m for (p, ph), m in masks.items()})
        tmp.replace(path)
    return masks
