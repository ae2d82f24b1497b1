"""Typed, frozen configs. A ``TrainConfig`` travels (as JSON) with every checkpoint, weights file
and registered model, so loading a model needs nothing else; a ``PredictConfig`` says how a
model is applied and is resolved per device (``Predictor.config``).

This module imports nothing heavy (no torch), so every stage and every CLI can share it:
command-line defaults are read from these dataclasses (``default_of``), never repeated.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Literal

VERSION = "0.1.0"  # raysegment's version (package metadata, SEG software versions)
CLASS_NAMES = {1: "rv", 2: "myo", 3: "lv"}  # ACDC labels; 0 is background
CLASS_COLOURS = {1: "#e6194b", 2: "#3cb44b", 3: "#4363d8"}  # RV red, MYO green, LV blue: figures and DICOM SEG segments
CLASS_RGB = {k: tuple(int(v[i:i + 2], 16) for i in (1, 3, 5)) for k, v in CLASS_COLOURS.items()}  # the same, 0–255
NUM_CLASSES = 4

Precision = Literal["auto", "bf16", "fp16", "fp32"]
Runtime = Literal["torch", "onnx"]
# A study's in-plane orientation against the training data's (rows or columns reversed, or swapped):
# the shipped models learnt ACDC's alone. "auto" picks as-stored or rows-reversed per study
# (``Predictor.in_plane_for``): converters differ in whether NIfTI rows run down, as DICOM's, or up.
IN_PLANE = ("as-stored", "rows-reversed", "cols-reversed", "transposed")
InPlane = Literal["as-stored", "rows-reversed", "cols-reversed", "transposed", "auto"]
IN_PLANE_CHOICES = (*IN_PLANE, "auto")  # what users may give: a turn, or "auto" (as-stored or rows-reversed, chosen)
DEFAULT_PERCENTILES = (0.5, 99.5)  # per-volume intensity clip points, percent (prepare and Predictor)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow store when none is given: a file in the working directory


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model (weights come from the checkpoint, not from here)."""

    backbone: str = "mobilenet_v2"
    decoder_width: int = 32
    num_classes: int = NUM_CLASSES
    # Neighbouring slices per side fed as extra channels (0 = plain 2-D). With 1 the network
    # sees slices k-1, k, k+1 and can tell the basal slice, where ES labels often stop the RV.
    context_slices: int = 0
    # Decoder levels below full resolution (strides 2, 4, 8) that get their own 1×1 head and a
    # loss term in training, weights halving per level (nnU-Net's deep supervision). Prediction
    # uses the full-resolution head only; 0 = off (every model saved before it existed).
    deep_supervision: int = 0

    @property
    def in_channels(self) -> int:
        return 1 + 2 * self.context_slices


@dataclass(frozen=True)
class LossConfig:
    """Loss = ce_weight · CE(class_weights) + dice_weight · Σ_c w_c·(1 − softDice_c) / Σ_c w_c.

    ``class_weights`` are (RV, MYO, LV); background has weight 1 in the CE and no Dice term.
    """

    ce_weight: float = 1.0
    dice_weight: float = 1.0
    class_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    smooth: float = 1e-5


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random augmentation. Angles in degrees, scale as a zoom factor."""

    scale: tuple[float, float] = (0.85, 1.2)
    rotation_deg: float = 20.0
    # Left-right flips are off by default: short-axis cine comes in one orientation (RV on the
    # image's left in ACDC), a mirrored heart does not occur, and learning it cost a from-scratch
    # MobileNetV2 .010 val mean Dice at 24 CPU-minutes (README, Results). Data of mixed
    # orientation: set it to 0.5.
    flip_prob: float = 0.0
    intensity_scale: tuple[float, float] = (0.9, 1.1)
    intensity_shift: tuple[float, float] = (-0.1, 0.1)
    gamma: tuple[float, float] = (0.7, 1.5)
    noise_std: float = 0.02
    foreground_prob: float = 0.67  # share of crops centred on a foreground pixel


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; it travels (as JSON) with every checkpoint and registered model."""

    data: str
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    epochs: int = 20  # with time_budget_min: the most epochs
    # Wall minutes for training + validation; after each epoch the LR schedule is re-planned to
    # the number of epochs that fit, so the run ends annealed inside the budget.
    time_budget_min: float | None = None
    # Slices per worker step; MobileNetV2 from scratch: 8 beat 16 in equal CPU time (README).
    batch_size: int = 8
    lr: float = 2e-3  # for one worker's batch; with N data-parallel workers × lr_scaling's factor
    lr_scaling: Literal["none", "sqrt", "linear"] = "sqrt"  # factor √N / N / 1 for N workers
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    image_size: int = 256  # pixels, the square grid every slice is resampled to (256 beat 224, README)
    # In-plane pixel size (mm) of the network grid. None: every slice is stretched to
    # image_size² whatever its field of view (older models). Set: slices are resampled to this
    # spacing, keeping the heart's true shape and size, then centre-padded/cropped to image_size²
    # for training; prediction runs on the whole resampled slice.
    pixel_mm: float | None = None
    crop_size: int = 128  # pixels, the training crop (heart-centred with foreground_prob)
    # Per-volume intensity normalisation the model was trained with: clip to these percentiles
    # and map them to 0/1 (prepare writes the shards so; the Predictor applies it to new images).
    intensity_percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    # auto: bf16 autocast where the hardware computes bf16 (GPUs sm_80+, CPUs with AVX512-BF16 or
    # AMX), fp16 AMP on older GPUs, fp32 on other CPUs (emulated bf16 is ~13× slower there).
    precision: Precision = "auto"
    weights: Literal["imagenet"] | None = None  # encoder init
    init_weights: str | None = None  # .safetensors file or checkpoint folder to start from (fine-tuning)
    seed: int = 0
    threads_per_worker: int | None = None  # torch threads; None: the CPUs Ray gave the worker
    max_steps_per_epoch: int | None = None  # cap for smoke tests and benchmarks
    # Slices held in each worker's shuffle buffer (on top of a per-epoch random block order):
    # shards are stored volume by volume, and batches from one volume train far worse.
    shuffle_buffer_slices: int = 256
    val_patients: tuple[str, ...] | None = None  # None: every val patient
    # Validate every k-th epoch and each of the last VAL_LAST planned ones (what ships is the last
    # epoch, always validated); an epoch between reports the Dice of the latest validation.
    val_every: int = 1
    manifest_hash: str = ""

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        if isinstance(d.get("model"), dict):
            # Model fields added later, at the value that rebuilds a model saved before them
            # (whatever today's default): 2-D input, no deep-supervision heads.
            d["model"] = {"context_slices": 0, "deep_supervision": 0, **d["model"]}
        nested = {"model": ModelConfig, "loss": LossConfig, "augment": AugmentConfig}
        for key, typ in nested.items():
            if key in d and isinstance(d[key], dict):
                d[key] = _from_plain(typ, d[key])
        for key in ("val_patients", "intensity_percentiles"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# What a resumed run may take from its new command: where the shards lie and the threads (the
# machine may change between sittings), and how long it goes on (re-planning its schedule).
RESUMABLE = ("data", "threads_per_worker", "epochs", "time_budget_min", "max_steps_per_epoch", "val_every")


def changed_settings(began: TrainConfig, now: TrainConfig, may_change: tuple = RESUMABLE) -> list[str]:
    """``"NAME OLD, now NEW"`` for each setting outside ``may_change`` (a nested one by its own name)
    in which ``now`` differs from the run that ``began``: a resume would crash or mix the two."""
    old, new = began.to_dict(), now.to_dict()
    pairs = [(k, old[k], new[k]) for k in old if k not in may_change and not isinstance(old[k], dict)]
    pairs += [(k, v, new[group].get(k)) for group in ("model", "loss", "augment") for k, v in old[group].items()]
    return [f"{k} {a}, now {b}" for k, a, b in pairs if a != b]


def _from_plain(typ, d: dict):
    # JSON turns tuples into lists; frozen configs want tuples back. Unknown keys (from a newer
    # raysegment) are dropped rather than refused.
    known = {f.name for f in fields(typ)}
    return typ(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class PredictConfig:
    """How a model is applied to an image. ``Predictor`` resolves ``precision`` for its device."""

    device: str = "cpu"
    # auto: as TrainConfig.precision (bf16 where the hardware has it, else fp16 on GPUs, fp32 on
    # CPUs). The shipped models' README figures were measured in bf16 on a CPU with native bf16.
    precision: Precision = "auto"
    batch_size: int = 16  # slices per forward pass
    flip_tta: bool = False  # average with the left-right mirrored image (models trained with flips only)
    largest_component: bool = True  # keep each structure's largest 3-D component
    # The RV keeps its largest component within this in-plane distance of the myocardium/LV:
    # in mm where the image's spacing is known, else ``rv_contact_px`` pixels (7 mm ≈ 5 px at
    # ACDC's typical 1.4 mm pixels).
    rv_contact_mm: float = 7.0
    rv_contact_px: int = 5
    # torch, or onnx: each network exported in memory and run by ONNX Runtime on the CPU (fp32);
    # normalisation, grid, TTA and post-processing stay the Predictor's.
    runtime: Runtime = "torch"
    # How the image is turned before the networks (and the labels back after): shards and training
    # data are as-stored; ``infer``, ``serve`` and ``segment()`` default to "auto" for users' studies.
    in_plane: InPlane = "as-stored"


@dataclass(frozen=True)
class InferConfig:
    """One batch run. ``models`` are references ``Predictor.load`` takes (several: an ensemble)."""

    models: tuple[str, ...]  # models:/NAME@ALIAS, models:/NAME/VERSION, checkpoint folders, .safetensors files
    input: str
    output: str
    tracking_uri: str | None = None
    predict: PredictConfig = field(default_factory=lambda: PredictConfig(in_plane="auto"))  # users' studies
    # Inference actors; None: as many as the cluster's free CPUs (or GPUs, with gpus_per_actor)
    # hold, at most one per study. On 2 cores two 1-thread actors finished 20 studies in 0.70× the
    # time one 2-thread actor took (docs/benchmarks.md).
    actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # > 0: each actor holds (a share of) a GPU and predicts on it
    threads: int | None = None  # torch threads per actor; None: ``torch_threads`` policy
    report_figures: int = 4  # overlay PNGs in report.md (flagged studies first; flagged studies always get one)
    limit: int | None = None  # process at most this many new studies (then stop)
    max_attempts: int = 2  # tries of a study whose worker process dies (then: failed, "worker died")
    retry_failed: bool = False  # segment again studies that failed for good in earlier runs
    # Diagnosis of patients with ED and ES: "shipped", a JSON file, models:/raysegment-diagnosis@…, or None
    diagnosis: str | None = "shipped"
    store: bool = True  # DICOMweb input: STOW-RS the SEGs back to the server
    sr: bool = True  # DICOM input: each cine series' indices SR, stored with the SEGs (a PACS may take none)
    # DICOMweb input: the PACS's credentials, "USER:PASSWORD" (HTTP basic) or "Bearer TOKEN" (``--pacs-auth FILE``)
    pacs_auth: str | None = field(default=None, repr=False)
    # DICOMweb input: only series of studies dated within this many days before today (QIDO-RS
    # StudyDate range); None: every MR series, each asked for its instances at every poll.
    since_days: int | None = None
    # Folder input: files whose path under it (or name) matches one of these globs are no input
    # (e.g. ``*_4d.nii.gz``: the official layout's cine files beside the ED and ES frame files).
    exclude: tuple[str, ...] = ()
    progress: bool = True
    crash_on: str | None = None  # test hook: the worker process exits on a study whose name contains this


@dataclass(frozen=True)
class ServeConfig:
    """The online service (``python -m raysegment.serve``); travels to every replica."""

    model: str  # models:/NAME@ALIAS (followed as it moves), models:/NAME/VERSION or a local reference
    tracking_uri: str | None = None
    predict: PredictConfig = field(default_factory=lambda: PredictConfig(in_plane="auto"))  # users' studies
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; None: ``replicas`` fixed
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    threads: int | None = None  # torch threads per replica; None: its CPUs
    poll_s: float = 10.0  # how often each replica asks the registry where the alias points (s)
    token: str | None = field(default=None, repr=False)  # bearer token every request must carry; None: none asked
    max_body_mb: float = 512.0  # larger request bodies get 413 (a 4-D cine NIfTI is ~10–100 MB)
    request_timeout_s: float = 300.0  # end-to-end, at the HTTP proxy (then 408)
    pacs: str | None = None  # DICOMweb URL the PACS push retrieves series from and stores SEGs to
    output: str | None = None  # with ``pacs``: masks, SEGs and the ledger shared with the scheduled job
    store: bool = True  # with ``pacs``: STOW-RS the SEGs back
    pacs_auth: str | None = field(default=None, repr=False)  # with ``pacs``: "USER:PASSWORD" or "Bearer TOKEN"
    # with ``pacs``: a pushed slice of a stack stored as a series per slice waits until no slice of its
    # study was pushed for this long (s), so the stack is segmented once, whole; 0: at each push
    stack_settle_s: float = 60.0
    sr: bool = True  # with ``pacs`` and ``store``: each series' indices SR stored with its SEGs
    # ``?format=json``'s diagnosis of a cine: "shipped", a JSON file, models:/raysegment-diagnosis@…, or None
    diagnosis: str | None = "shipped"


def default_of(cls, name: str):
    """A dataclass field's default (also for ``default_factory``), for CLI defaults."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise ValueError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask, which containers narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def torch_threads(threads: int | None, processes: int, cpus_per_process: float = 1.0) -> int:
    """The one thread policy: torch threads for each of ``processes`` workers/actors on a node.

    An explicit ``threads`` wins; otherwise the node's cores are shared among the processes,
    and never fewer than the CPUs Ray reserves for each (``cpus_per_process``).
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be ≥ 1, got {threads}")
        return threads
    return max(1, int(round(cpus_per_process)), available_cpus() // max(1, processes))
