"""Argument checks and options shared by the commands: counts and files checked before Ray
starts (one ``error:`` line, exit 2; an MLflow registry or Ray cluster that does not answer, exit
1), the recipe options of ``train`` and ``tune``. Top layer.

Imports ``training``, ``inference``, ``model``, ``data``, ``io``, ``config`` and ``runtime``; no
stage imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from raysegment.cli import INTERRUPTED
from raysegment.config import AugmentConfig, ModelConfig, TrainConfig, default_of
from raysegment.data.dataset import is_bundle
from raysegment.io import storage
from raysegment.model.unet import BACKBONES
from raysegment.runtime import ClusterUnreachable, check_cluster, leave_ray, stop_signal
from raysegment.training.train import RunSpec

# Numeric options by what they may be, across every command (the dest names mean the same everywhere).
COUNTS = ("workers", "val_every", "epochs", "batch_size", "crop_size", "image_size", "decoder_width", "num_samples", "concurrency",
          "threads", "actors", "limit", "max_steps_per_epoch", "max_attempts", "grace_period", "final_epochs", "repeats",
          "resamples", "steps", "volumes", "clients", "requests", "studies", "waves", "last",
          "copies", "series", "frames")
POSITIVE = ("cpus_per_worker", "minutes", "final_minutes", "gpus_per_worker", "cpus_per_actor", "lr", "poll_s", "max_body_mb",
            "pixel_mm", "step_timeout")
NON_NEGATIVE = ("report_figures", "since", "context_slices", "deep_supervision", "ce_weight", "dice_weight", "driver_kills")
ZERO_OK = ("final_minutes", "gpus_per_worker")  # 0: no final stage, no GPU


def check_data(p: argparse.ArgumentParser, data: str | None) -> None:
    """``--data``, when given: a `diagnosis pack` bundle (.npz) that exists, or a local folder of
    shards (its manifest.json); a remote URI is left to the reader. ``p.error`` otherwise."""
    if not data or storage.is_uri(data):
        return
    if is_bundle(data):
        if not Path(data).is_file():
            p.error(f"--data {data}: no such bundle")
    elif not (Path(data) / "manifest.json").is_file():
        p.error(f"--data {data}: no shards there (no manifest.json; {_make_shards(data)})")


def _make_shards(data: str) -> str:
    """How to make shards, in words; the exact command where ``data`` is an ACDC dataset itself."""
    from raysegment.data.volumes import PrepareError, detect_format, find_patient_dirs

    try:
        layout = detect_format(Path(data))
    except (PrepareError, OSError):
        return "make them with python -m raysegment.prepare"
    source = data
    if layout == "acdc-nifti" and len(folders := {d.parent for d in find_patient_dirs(Path(data))}) > 1:
        # The release's root: prepare takes one of its folders (training/; testing/ scores on its own).
        source = str(next((f for f in sorted(folders) if f.name == "training"), sorted(folders)[0]))
    return (f"it holds an ACDC dataset, {layout} layout: make shards of it with python -m raysegment.prepare "
            f"--source {source} --out SHARDS, then give --data SHARDS")


def check_models(p: argparse.ArgumentParser, refs, tracking_uri: str | None) -> None:
    """Each ``--model`` reference names a model that is there — a registry version or alias, or what
    the Predictor resolves locally (``shipped:BACKBONE``, a weights file, a checkpoint or a run
    folder's latest) with a config that reads — checked before Ray starts; ``p.error`` otherwise (a
    replica or actor failing to load it printed a traceback and stopped)."""
    from raysegment.inference.predictor import _local_path
    from raysegment.model.weights import saved_config

    for ref in refs:
        try:
            if ref.startswith("models:/"):
                from mlflow import MlflowClient

                name, _, alias = ref[len("models:/"):].partition("@")
                client = MlflowClient(tracking_uri)
                if alias:
                    client.get_model_version_by_alias(name, alias)
                else:
                    client.get_model_version(*name.rsplit("/", 1))
            else:
                saved_config(_local_path(ref))
        except Exception as exc:
            what = (f"no such model in the registry {tracking_uri or '(MLflow default)'}" if ref.startswith("models:/")
                    else "no such shipped model" if ref.startswith("shipped:")
                    else "not a raysegment weights file or checkpoint")
            p.error(f"--model {ref}: {what} ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})")


def check_registry(a: argparse.Namespace) -> None:
    """``check_registry_answers`` of ``--mlflow-uri`` when any argument names a ``models:/`` reference
    (``--model``, ``--diagnosis``, ``--basal-check``, ``--a``/``--b``, ``NAME=models:/…``)."""
    values = [v for value in vars(a).values() for v in (value if isinstance(value, list) else [value])]
    if any(isinstance(v, str) and v.split("=", 1)[-1].startswith("models:/") for v in values):
        check_registry_answers(getattr(a, "mlflow_uri", None))


def check_registry_answers(tracking_uri: str | None, timeout_s: float = 10.0) -> None:
    """An HTTP tracking server that does not answer within ``timeout_s`` is an environment fault:
    one ``error:`` line and exit 1 (a scheduler retries; exit 2 is bad input). MLflow's own client
    retried for about 4 minutes and then said the model was not in the registry."""
    import urllib.error
    import urllib.request

    # MLflow's own default, without importing it here (an import before ``quiet_environment`` set
    # its log level printed its INFO lines of creating a store's tables): the variable, else a file store.
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    check_not_file_store(uri)
    if not uri.startswith(("http://", "https://")):
        return  # a local store, or Databricks: MLflow's client reads it
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answers (a proxy may refuse /health): the lookup says the rest
    except (OSError, ValueError) as exc:  # refused, no route, timed out, no such host, a malformed URL
        print(f"error: the MLflow registry at {uri} does not answer ({getattr(exc, 'reason', exc)}); nothing was "
              f"done, the same command tries again", file=sys.stderr)
        raise SystemExit(1) from None


def check_not_file_store(uri: str) -> None:
    """A file store (``./mlruns``, ``file:///…``) is bad input: MLflow 3 refuses to open one (unless
    ``MLFLOW_ALLOW_FILE_STORE`` says so), and ``tune`` met that only after Ray had started, with a
    traceback. One ``error:`` line, exit 2."""
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme
    if not uri or uri in ("databricks", "databricks-uc") or (scheme not in ("", "file") and len(scheme) > 1):
        return  # (a one-letter scheme is a Windows drive)
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1"):
        return
    folder = Path(urlparse(uri).path if scheme == "file" else uri)
    print(f"error: --mlflow-uri {uri} is a file store, which MLflow 3 no longer opens; give a database such as "
          f"sqlite:///{(folder.parent / 'mlflow.db').resolve()} (`mlflow migrate-filestore` moves an old store's runs "
          f"into one) or an http:// server; nothing was done", file=sys.stderr)
    raise SystemExit(2)


def read_secret(p: argparse.ArgumentParser, option: str, path: str | None) -> str | None:
    """The stripped text of a secret's file (``--token-file``, ``--pacs-auth``), or None without one;
    ``p.error`` when it cannot be read or is empty. A file, not the command line: ``ps`` shows that."""
    from raysegment.runtime import read_secret as read

    if not path:
        return None
    try:
        return read(path)
    except ValueError as exc:
        p.error(f"{option} {exc}")


def pacs_auth(p: argparse.ArgumentParser, path: str | None) -> str | None:
    """``--pacs-auth FILE``'s credentials, their form checked (``io.dicomweb.check_auth``)."""
    from raysegment.io.dicomweb import check_auth

    text = read_secret(p, "--pacs-auth", path)
    if text is not None:
        try:
            check_auth(text)
        except ValueError as exc:
            p.error(f"--pacs-auth {path}: {exc}")
    return text


def diagnosis_ref(value: str) -> str | None:
    """``--diagnosis``'s value as the configs take it: the word ``none`` is no diagnosis model (None)."""
    return None if value == "none" else value


def check_numbers(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Numeric options out of range (``COUNTS`` ≥ 1, ``POSITIVE`` > 0, ``NON_NEGATIVE`` ≥ 0): ``p.error``.
    Unchecked, ``infer --limit 0`` segmented nothing, ``serve --poll-s 0`` asked the registry in a
    busy loop, ``train --lr -1`` trained uphill."""
    for names, low, ok in ((COUNTS, "≥ 1", lambda v, n: v >= 1), (NON_NEGATIVE, "≥ 0", lambda v, n: v >= 0),
                           (POSITIVE, "> 0", lambda v, n: v > 0 or (v == 0 and n in ZERO_OK))):
        for name in names:
            value = getattr(a, name, None)
            if isinstance(value, (int, float)) and not ok(value, name):
                p.error(f"--{name.replace('_', '-')} must be {low}, got {value}")


def check_recipe(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Augmentation and loss options outside their meaning: ``p.error``. Unchecked,
    ``--ce-weight 0 --dice-weight 0`` failed in every worker after Ray started (a loss without a
    gradient), ``--class-weights 0 0 0`` trained on a NaN loss (its Dice term is normalised by their
    sum), ``--scale 0 1`` shrank hearts to specks and ``--flip-prob 2`` flipped every crop."""
    flip, rotation, scale = (getattr(a, n, None) for n in ("flip_prob", "rotation_deg", "scale"))
    if flip is not None and not 0 <= flip <= 1:
        p.error(f"--flip-prob is a probability, 0 to 1, got {flip}")
    if rotation is not None and not 0 <= rotation <= 180:
        p.error(f"--rotation-deg is the largest angle either way, 0 to 180 degrees, got {rotation}")
    if scale is not None and not 0 < scale[0] <= scale[1]:
        p.error(f"--scale LO HI needs 0 < LO ≤ HI (zoom factors), got {scale[0]} {scale[1]}")
    if getattr(a, "ce_weight", None) == 0 and getattr(a, "dice_weight", None) == 0:
        p.error("--ce-weight and --dice-weight are both 0: the loss would be 0 everywhere")
    weights = getattr(a, "class_weights", None)
    if weights is not None and (min(weights) < 0 or sum(weights) <= 0):
        p.error(f"--class-weights RV MYO LV must be ≥ 0 with a positive sum, got {' '.join(map(str, weights))}")


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Counts and input files checked before Ray starts: ``p.error`` (one line, exit 2) names the
    first problem, instead of a traceback from inside Ray minutes later."""
    check_numbers(p, a)
    check_recipe(p, a)
    data = getattr(a, "data", None)
    if not data and storage.is_uri(getattr(a, "storage", "") or ""):  # tune's bundled sample is local
        p.error(f"--storage {a.storage} is remote: give --data (shards every node reads)")
    if getattr(a, "storage", None) and (why := storage.unreachable(a.storage)):  # (it was a pyarrow traceback)
        p.error(f"--storage {a.storage}: cannot be read ({why})")
    if hasattr(a, "address") and not getattr(a, "local", False):
        try:
            check_cluster(a.address)
        except ClusterUnreachable as exc:  # an environment fault, as with the registry (exit 2: a wrong argument)
            print(f"error: {exc}; nothing was started", file=sys.stderr)
            raise SystemExit(1) from None
    if data and is_bundle(data) and not getattr(a, "local", None):  # read in-process, never by Ray Data
        p.error(f"--data {data}: a bundle trains only with --local (in this process); Ray reads shards")
    check_data(p, data)
    _check_train_patients(p, data)
    check_imagenet(p, a)
    init = getattr(a, "init_weights", None)
    if init and init != "shipped":
        from raysegment.model.weights import saved_config

        try:
            saved_config(resolve_init_weights(init, a.backbone))  # a missing file: its own SystemExit
        except Exception as exc:
            p.error(f"--init-weights {init}: not a raysegment weights file or checkpoint ({type(exc).__name__}: {exc})")


def _check_train_patients(p: argparse.ArgumentParser, data: str | None) -> None:
    """Local shards with train patients: a test set's (``prepare --val-fraction 1``) has none."""
    from raysegment.data.prepare import load_manifest

    if not data or is_bundle(data) or storage.is_uri(data):
        return
    splits = load_manifest(data).get("splits", {})
    if "train" in splits and not splits["train"]:
        p.error(f"--data {data}: holds no train patients (a test set, prepared with --val-fraction 1?): "
                "train on shards with train patients")


def check_imagenet(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """``--weights imagenet``: not beside ``--init-weights`` (which replaces every weight), and the
    cached file present here; without it each worker failed and restarted before the run gave up."""
    if getattr(a, "weights", None) != "imagenet":
        return
    if getattr(a, "init_weights", None):
        p.error(f"--weights imagenet and --init-weights {a.init_weights} both set the initial weights: give one")
    from raysegment.model.unet import imagenet_file

    path, url = imagenet_file(a.backbone)
    if not path.is_file():
        p.error(f"--weights imagenet: {path} is missing on this machine; download {url} there (every node that "
                f"trains needs it in its torch hub cache, $TORCH_HOME/hub/checkpoints), or leave --weights out")


def run_until_interrupted(what: str, where: str, fn, *args):
    """``fn(*args)``; a Ctrl-C (or ``ray job stop``) ends it with one line saying the same command
    resumes ``what`` from ``where``, and the result ``INTERRUPTED`` instead of a traceback.

    Ray Train aborts its run on SIGINT and then ends the driver's wait with ``SystemExit(1)``; Tune
    checkpoints its search and raises ``KeyboardInterrupt`` (raysegment.training.tune). A
    ``SystemExit`` with a message is one of ours (``error: …``) and passes."""
    try:
        return fn(*args)
    except (KeyboardInterrupt, SystemExit) as exc:
        if not stop_signal(exc):
            raise
        try:
            leave_ray()  # before the line, which is then the last one
        except (KeyboardInterrupt, SystemExit):  # a second Ctrl-C: the line all the same
            pass
        print(f"interrupted: {what} stopped; its checkpoints stay in {where} and the same command resumes it",
              file=sys.stderr, flush=True)
        return INTERRUPTED


def unfinished_removed(n: int) -> str:
    """What a run or search stopped by a full disk says of the checkpoint folders it removed."""
    return f"{n} unfinished checkpoint folder{'s' * (n != 1)} removed"


def no_space(exc: BaseException) -> bool:
    """Whether ``exc`` comes of a full disk (``ENOSPC``): itself, what it was raised from or during
    (Tune's own error while saving a search's state), or a Ray Train worker's failure."""
    import errno

    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            return True
        todo += [e.__cause__, e.__context__, *(getattr(e, "worker_failures", None) or {}).values()]
    return False


def disk_full(exc: BaseException, path: str) -> str | None:
    """Why a failed run or search counts as stopped by a full disk — ``ENOSPC`` in the error
    (``no_space``), or, as Tune's error may be a later one (a state file it wrote truncated), its
    local ``path``'s filesystem left with under 100 MiB or 1 % free — else None."""
    import shutil

    if no_space(exc):
        return "No space left on device"
    if storage.is_uri(path):
        return None
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:  # the nearest folder that is there
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    if usage.free < max(100 * 2**20, usage.total // 100):
        return f"{usage.free // 2**20} MiB free; {type(exc).__name__}: {' '.join(str(exc).split())[:120]}"
    return None


def progress_line(label: str, every_s: float = 30.0):
    """A ``progress(done, total)`` callback: one stderr line at most every ``every_s`` seconds and
    one at the end, so a segmentation of minutes says how far it is."""
    t0 = last = time.perf_counter()

    def report(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if done == total or now - last >= every_s:
            last = now
            print(f"{label}: {done}/{total} volumes ({now - t0:.0f} s)", file=sys.stderr, flush=True)

    return report


def resolve_init_weights(value: str | None, backbone: str) -> str | None:
    """CLI value → absolute path ('shipped' → the weights bundled with raysegment for ``backbone``)."""
    if not value:
        return None
    if value == "shipped":
        from raysegment.model.weights import shipped_weights

        return str(shipped_weights(backbone))
    path = Path(value).resolve()
    if not path.exists():
        raise SystemExit(f"error: --init-weights {value}: no such file or folder")
    return str(path)


def _td(name: str):
    return default_of(TrainConfig, name)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Options ``train`` and ``tune`` share: the recipe and where the run goes; defaults from the configs."""
    p.add_argument("--backbone", default=default_of(ModelConfig, "backbone"), choices=BACKBONES)
    p.add_argument("--workers", type=int, default=default_of(RunSpec, "num_workers"), help="Ray Train workers (per trial)")
    p.add_argument("--cpus-per-worker", type=float, default=default_of(RunSpec, "cpus_per_worker"),
                   help="CPUs Ray reserves per training worker (leave some unreserved: Ray Data reads on them)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: this node's cores shared among the workers)")
    p.add_argument("--batch-size", type=int, default=_td("batch_size"), help="slices per worker step")
    p.add_argument("--crop-size", type=int, default=_td("crop_size"), help="training crop, pixels")
    p.add_argument("--flip-prob", type=float, default=default_of(AugmentConfig, "flip_prob"),
                   help="probability of a left-right flip in augmentation (0: keep the scanner's orientation)")
    aug = AugmentConfig()
    p.add_argument("--rotation-deg", type=float, default=aug.rotation_deg, help="augmentation: rotations up to ± this, degrees")
    p.add_argument("--scale", type=float, nargs=2, default=aug.scale, metavar=("LO", "HI"),
                   help="augmentation: zoom factor range")
    p.add_argument("--pixel-mm", type=float, default=_td("pixel_mm"),
                   help="network grid pixel size, mm (default: every slice stretched to --image-size²)")
    p.add_argument("--max-steps-per-epoch", type=int, default=_td("max_steps_per_epoch"), metavar="N",
                   help="cap on training steps per epoch (quick checks; default: the whole train split)")
    p.add_argument("--val-every", type=int, default=_td("val_every"), metavar="K",
                   help="validate every K-th epoch and each of the last 3 (what ships is the last epoch)")
    p.add_argument("--precision", default=_td("precision"), choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 where the hardware has it, fp16 AMP on older GPUs, fp32 on other CPUs")
    p.add_argument("--weights", default=_td("weights"), choices=["imagenet"],
                   help="encoder init: torchvision's ImageNet weights, read from the torch hub cache of every node "
                        "that trains, this one included (default: random)")
    p.add_argument("--init-weights", default=None, metavar="FILE|shipped",
                   help="start from a .safetensors file or checkpoint folder ('shipped': the bundled weights)")
    p.add_argument("--seed", type=int, default=_td("seed"), help="seed of the initial weights, shuffling and augmentation")
    p.add_argument("--storage", default=default_of(RunSpec, "storage_path"),
                   help="shared storage for checkpoints (local dir or URI)")
    p.add_argument("--name", default=None, help="run name; re-running the same name resumes it")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a new local Ray)")
    p.add_argument("--verbose", action="store_true", help="Ray's own progress bars and INFO lines on the console")


def augment_from_args(a: argparse.Namespace) -> AugmentConfig:
    """The augmentation options of ``add_run_arguments`` as a config."""
    return AugmentConfig(flip_prob=a.flip_prob, rotation_deg=a.rotation_deg, scale=tuple(a.scale))
