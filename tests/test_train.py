"""Training: augmentation, LR plan and the training step (fast); Ray Train integration (slow):
exactly-once sharding, DDP weight sync, fault recovery, time budget, overfitting real slices."""


import pytest
import torch
from conftest import SHARED_ACDC, interrupt_when
from synth import make_h5_dataset

from raysegment.config import PredictConfig, TrainConfig
from raysegment.data.dataset import AugmentConfig, apply_augment, centre_crop, load_volumes, resize_slice, sample_augment
from raysegment.data.prepare import PrepareConfig, prepare
from raysegment.inference.predictor import Predictor
from raysegment.model.checkpoint import load_checkpoint
from raysegment.model.losses import LossConfig, segmentation_loss
from raysegment.model.unet import ModelConfig, build_model
from raysegment.training.core import train_step
from raysegment.training.train import CKPT_SCRATCH, RunHooks, RunSpec, resumed_line, train

TINY = dict(model=ModelConfig(backbone="mobilenet_v2", decoder_width=8), batch_size=4, image_size=64, crop_size=64,
            precision="fp32", threads_per_worker=1)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from raysegment.runtime import ensure_ray

    # Started as the product starts one: the processes Ray spawns know its address. With a second Ray
    # on the host (the other xdist worker's), Ray Train's placement-group cleaner actor otherwise
    # cannot tell which cluster is its own and dies with a traceback in the commands joining this one.
    ensure_ray(num_cpus=2, verbose=True)  # verbose: this process's environment is left as it is
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    # 5 train patients x 2 phases x 3 slices = 30 slices: not a multiple of 2 workers x batch 4.
    src = make_h5_dataset(root / "src", patients=(1, 2, 3, 4, 5, 6), val=(6,), shape=(3, 40, 48))
    prepare(PrepareConfig(source=src, out=root / "shards", progress=False))
    return root / "shards"


def _stored_order(keys):
    """"patient/phase/slice" keys in the order the shards store them: patient, phase, slice number."""
    return sorted(keys, key=lambda k: (k.split("/")[0], k.split("/")[1], int(k.split("/")[2])))


@pytest.mark.slow
def test_train_blocks_come_in_a_new_seeded_order_each_epoch(ray_local, tiny_shards):
    from raysegment.training.train import _train_dataset

    def epochs(seed, n=3):
        it = _train_dataset(TrainConfig(data=str(tiny_shards), seed=seed, **TINY), RunSpec()).iterator()
        return [[f"{p}/{ph}/{s}" for b in it.iter_batches(batch_size=4, batch_format="numpy")
                 for p, ph, s in zip(b["patient"], b["phase"], b["slice"])] for _ in range(n)]

    first = epochs(seed=0)
    file_order = _stored_order(first[0])
    assert all(sorted(e) == sorted(file_order) for e in first)  # every slice, once
    assert first[0] != file_order  # not patient by patient as stored
    assert len({tuple(e) for e in first}) == 3  # a new order every epoch
    assert epochs(seed=0) == first  # reproducible from the seed
    assert epochs(seed=1) != first


@pytest.mark.slow
def test_ctrl_c_stops_a_search_before_it_registers_anything(ray_local, tiny_shards, tmp_path):
    """``python -m raysegment.tune`` stopped by SIGINT in its only trial. Tune hands that trial back
    TERMINATED, as if it had ended; the search still counts as interrupted: exit 130, one line,
    its MLflow parent run KILLED, nothing registered."""
    import os
    import sys

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "raysegment.tune", "--data", str(tiny_shards), "--num-samples", "1", "--epochs", "50",
           "--set", "decoder_width=8", "--batch-size", "4", "--image-size", "64", "--crop-size", "64", "--threads", "1",
           "--cpus-per-worker", "1", "--precision", "fp32", "--mlflow-uri", uri, "--storage", str(tmp_path / "runs"),
           "--name", "s"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    text = interrupt_when(cmd, env, tmp_path / "tune.log", lambda out: "[raysegment] epoch 1/50" in out, cwd=tmp_path)
    # (Not necessarily the last line: the stopped trial's next epoch line, forwarded late by Ray, or
    # a Ray actor's own crash report as the search's actors are killed, may follow it.)
    assert "\ninterrupted: search s stopped; its checkpoints stay in" in text, text[-3000:]
    assert "registered" not in text and "Traceback (most recent call last)" not in text, text[-3000:]
    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("raysegment-tune").experiment_id],
                                   "tags.mlflow.runName = 's'")
    assert parent.info.status == "KILLED" and client.search_registered_models() == []


@pytest.mark.slow
def test_a_run_whose_raylet_is_killed_ends_in_one_line_saying_what_is_kept(tiny_shards, tmp_path):
    """The OOM killer (or `kill -9`) takes the raylet of the local Ray that ``python -m
    raysegment.train`` started: Ray printed the agent's 44-line report, the controller's tracebacks
    and ended the process some 15 s later (exit 1, no word of the run). Now: one ``error:`` line,
    last, saying which epoch is saved and that the same command resumes it; exit 1."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from raysegment.training.resume import latest_checkpoint

    cmd = [sys.executable, "-m", "raysegment.train", "--backbone", "mobilenet_v2", "--data", str(tiny_shards),
           "--workers", "1", "--threads", "1", "--epochs", "40", "--batch-size", "4", "--image-size", "64",
           "--crop-size", "64", "--decoder-width", "8", "--precision", "fp32", "--storage", str(tmp_path / "runs"),
           "--name", "oom"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    env.update(RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    log = tmp_path / "oom.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        deadline = time.time() + 300
        # After epoch 2, and once Ray Train has registered a checkpoint (what a resume starts from): it
        # does so a moment after a worker's epoch line, and on a loaded machine had not at that line
        # (CI at 7e1696d, where the command rightly said "it has no saved epoch").
        while (("[raysegment] epoch 2/40" not in log.read_text() or latest_checkpoint(str(tmp_path / "runs"), "oom") is None)
               and proc.poll() is None and time.time() < deadline):
            time.sleep(0.2)
        raylets = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and _parent_and_name(d) == (proc.pid, "raylet")]
        assert proc.poll() is None and len(raylets) == 1, log.read_text()[-3000:]
        os.kill(raylets[0], signal.SIGKILL)
        assert proc.wait(timeout=120) == 1, log.read_text()[-3000:]
    text = log.read_text()
    # Neither the driver's traceback (Ray's error for the run) nor the raylet log's tail; a training
    # worker's own report of its broken pipe may stream in before the line, as a worker's output does.
    assert "ray.exceptions.Actor" not in text and "Last 20 lines of the Raylet logs" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert re.fullmatch(r"error: run oom stopped: the local Ray this command started went away \(.+: `ray stop`, a crash "
                        r"or the OOM killer\); epoch \d+ is its last saved one; the same command resumes it", last), text[-3000:]


def _parent_and_name(proc) -> tuple[int, str] | None:
    """(parent pid, name) of the process of /proc folder ``proc``; None for one that ended meanwhile."""
    try:
        name, rest = (proc / "stat").read_text().rsplit(")", 1)
        return int(rest.split()[1]), name.split("(", 1)[1]
    except (OSError, ValueError, IndexError):
        return None


def _faulted_config(shards) -> TrainConfig:
    # A 2.5-D model, so the neighbours column also goes through Ray Data, training and validation.
    tiny = {**TINY, "model": ModelConfig(backbone="mobilenet_v2", decoder_width=8, context_slices=1)}
    return TrainConfig(data=str(shards), epochs=200, time_budget_min=0.3, max_steps_per_epoch=2, val_every=2, **tiny)


def _faulted_run(shards: str, runs: str, marker: str) -> None:
    """The faulted budgeted run, in a process of its own: its result as one JSON line, then the
    process ends at once (Ray's teardown of its driver is not what the test is about)."""
    import json
    import os

    hooks = RunHooks(fail_at_epoch=2, fail_marker=marker)
    result = train(_faulted_config(shards), RunSpec(num_workers=1, storage_path=runs, name="fault", max_failures=1, hooks=hooks))
    print(json.dumps({"error": None if result.error is None else repr(result.error), "metrics": result.metrics,
                      "checkpoint": result.checkpoint.path}, default=float), flush=True)
    os._exit(0)


@pytest.mark.slow
def test_a_budgeted_run_that_faults_resumes_with_its_history_and_stops_on_plan(ray_local, tiny_shards, tmp_path):
    """One run shows both: a worker fault mid-run resumes from the last checkpoint (history kept,
    the failed epoch run again) and the time budget, not the epoch cap, ends the run on the epoch
    it planned. It runs as a driver of its own joining this module's Ray: run in this process, Ray
    2.60's core worker twice aborted the pytest worker 0.4 s after the restarted run's actors were
    destroyed (``subscriber.cc:335: Check failed: !reply.publisher_id().empty()``, CI at 7ff451e and
    c7c2828), taking the module's next test with it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    marker = tmp_path / "failed-once"
    config = _faulted_config(tiny_shards)
    code = (f"import sys; sys.path[:0] = {[str(Path(__file__).parent)]!r}; from test_train import _faulted_run; "
            f"_faulted_run({str(tiny_shards)!r}, {str(tmp_path / 'runs')!r}, {str(marker)!r})")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])  # what ``train`` returned there
    assert marker.exists(), "the fault was not injected"
    assert result["error"] is None
    done = result["metrics"]["epoch"] + 1
    assert 3 < done < 200  # past the fault; the budget, not the epoch cap, ended the run
    assert result["metrics"]["planned_epochs"] == done
    loaded = load_checkpoint(result["checkpoint"])
    saved, state = loaded.config, loaded.state
    assert saved.model == config.model and saved.model.context_slices == 1 and state["epoch"] == done - 1
    # The history survives the restart: every epoch once, epoch 2 run after the resume.
    assert [h["epoch"] for h in state["history"]] == list(range(done))
    # Validated every 2nd epoch and the last ones as planned then; the budget may end the run sooner
    # than planned, and the last epoch (what ships) is validated all the same. Others carry the latest.
    # (0.3 min, not less: on a loaded machine fewer epochs fit, and a run planned at 6 or fewer
    # validates every one, being all "last ones".)
    validated = [h["validated_epoch"] for h in state["history"]]
    assert validated[-1] == done - 1 and validated[0] == 0 and all(v <= e for v, e in zip(validated, range(done)))
    assert any(v < e for v, e in zip(validated, range(done))), validated


@pytest.mark.slow
def test_ctrl_c_stops_a_run_with_one_line_and_the_same_command_resumes_it(ray_local, tiny_shards, tmp_path):
    """``python -m raysegment.train`` stopped by SIGINT once its first checkpoint is registered: exit
    130 and one line (no traceback); the same command then goes on from there, not from epoch 1.
    Both commands join this module's Ray (``RAY_ADDRESS``), as on a cluster, instead of starting one.
    (SIGTERM: the batch test; here, to the driver alone, a worker's epoch line once printed after
    the interrupted line, in CI at e49e79e.)"""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    cmd = [sys.executable, "-m", "raysegment.train", "--backbone", "mobilenet_v2", "--data", str(tiny_shards),
           "--workers", "1", "--threads", "1", "--epochs", "6", "--batch-size", "4", "--image-size", "64",
           "--crop-size", "64", "--decoder-width", "8", "--precision", "fp32", "--storage", str(tmp_path / "runs"),
           "--name", "ctrlc"]
    # As under `ray job submit`: RAY_ADDRESS names the cluster (Ray's own state queries use it too).
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    # Ray Train resumes from the checkpoints its controller registered (this file); one a worker
    # wrote seconds before the interrupt may not be there yet, and the run then redoes that epoch.
    snapshot = tmp_path / "runs" / "ctrlc" / "checkpoint_manager_snapshot.json"
    first = interrupt_when(cmd, env, tmp_path / "first.log", lambda _: snapshot.exists(), cwd=tmp_path)
    assert "Traceback" not in first, first[-3000:]  # neither the command's nor one of Ray's own threads'
    assert "interrupted: run ctrlc stopped" in first, first[-3000:]
    assert "the same command resumes it" in first.strip().splitlines()[-1]
    done = json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["epoch"] + 1
    assert done < 6
    # A worker killed while staging a checkpoint leaves its folder; the next worker removes it. The
    # planted one names a PID above the kernel's pid_max: no process can have it, now or later (a
    # real dead worker's PID may be reused by a new process meanwhile, and its folder then waits).
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text()) if Path("/proc/sys/kernel/pid_max").exists() else 2**22
    planted = Path(tempfile.gettempdir()) / f"{CKPT_SCRATCH}{pid_max + 1}-ctrlc"
    (planted / "model").mkdir(parents=True, exist_ok=True)
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0 and "done: ctrlc epochs 6" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
    assert not planted.exists()
    epochs = [line.split()[2] for line in again.stdout.splitlines() if line.startswith("[raysegment] epoch")]
    assert epochs[0] == f"{done + 1}/6" and epochs[-1] == "6/6", (done, epochs)  # resumed, not started again
    assert resumed_line(done) in again.stdout  # counted as the epoch lines count, from 1
    state = load_checkpoint(again.stdout.split("checkpoint ")[-1].strip()).state
    assert [h["epoch"] for h in state["history"]] == list(range(6))  # each epoch once across the two commands
    # Once more: it has done its 6 epochs; the same line, from its checkpoint, without training.
    third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert third.returncode == 0 and "has done its 6 planned epochs: nothing to train" in third.stdout, third.stdout
    assert third.stdout.strip().splitlines()[-1] == again.stdout.strip().splitlines()[-1]

    # A resumed Tune trial's log starts afresh: the search table reads such a trial from its Train run.
    import pandas as pd

    from raysegment.training.tune import trial_run_name, trial_table

    class Resumed:
        config, metrics, path = {"lr": 1e-3}, {"trial_id": "t"}, "x"
        metrics_dataframe = pd.DataFrame([{"epoch": 5, "dice_mean": 0.0, "dice_rv": 0.0, "dice_myo": 0.0, "dice_lv": 0.0}])

    os.rename(tmp_path / "runs" / "ctrlc", tmp_path / "runs" / trial_run_name("search", "t"))
    (row,) = trial_table([Resumed()], lambda trial_id: str(tmp_path / "runs" / trial_run_name("search", trial_id)))
    validated = [h for h in state["history"] if h["validated_epoch"] == h["epoch"]]
    best = max(h["dice_mean"] for h in validated)
    assert (row["epochs"], row["lr"], row["dice_mean"]) == (6, 1e-3, pytest.approx(best)), row
    assert row["best_epoch"] in {h["epoch"] for h in validated if h["dice_mean"] == best}
    assert os.path.basename(row["checkpoint_path"]).startswith("checkpoint_")
    assert trial_table([Resumed()], lambda trial_id: str(tmp_path / "elsewhere" / trial_id)) == []  # no run there: no row


def _images_labels_params(n: int, seed: int, label: int):
    """n random 64² images, a labelled box in each, and augmentation parameters for 48² crops."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 64, 64, generator=gen)
    labels = torch.zeros(n, 64, 64, dtype=torch.uint8)
    labels[:, 20:30, 30:40] = label
    return images, labels, sample_augment(labels, AugmentConfig(), 48, gen)


def test_augmentation_is_deterministic_given_params():
    images, labels, params = _images_labels_params(3, seed=0, label=3)
    a = apply_augment(images, labels, params, 48)
    b = apply_augment(images, labels, params, 48)
    assert a[0].shape == (3, 1, 48, 48) and a[1].shape == (3, 48, 48)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert set(a[1].unique().tolist()) <= {0, 3}
    # identity parameters reproduce the centre crop
    ident = {**params, "zoom": torch.ones(3), "angle": torch.zeros(3), "flip": torch.zeros(3, dtype=torch.bool),
             "centre_yx": torch.full((3, 2), 31.5), "int_scale": torch.ones(3), "int_shift": torch.zeros(3),
             "gamma": torch.ones(3), "noise": torch.zeros(3, 1, 48, 48)}
    x, y = apply_augment(images, labels, ident, 48)
    cx, cy = centre_crop(images, labels, 48)
    torch.testing.assert_close(x, cx, atol=1e-5, rtol=0)
    assert torch.equal(y, cy)


def test_augmentation_warps_every_context_channel_alike():
    images, labels, params = _images_labels_params(4, seed=2, label=1)
    x1, y1 = apply_augment(images, labels, params, 48)
    stacked = torch.stack([images.flip(-1), images, images.flip(-2)], dim=1)
    x3, y3 = apply_augment(stacked, labels, params, 48)
    assert x3.shape == (4, 3, 48, 48) and torch.equal(y3, y1)
    torch.testing.assert_close(x3[:, 1:2], x1)
    x_flip, _ = apply_augment(images.flip(-1), labels, params, 48)
    torch.testing.assert_close(x3[:, 0:1], x_flip)


def test_resize_batch_builds_context_channels(tiny_shards):
    import pyarrow.parquet as pq

    from raysegment.data.dataset import resize_batch

    table = pq.read_table(tiny_shards / "train").to_pydict()
    out = resize_batch(table, 32, context_slices=1)
    flat = resize_batch(table, 32)
    assert out["image"].shape == (len(table["slice"]), 3, 32, 32) and flat["image"].shape == (len(table["slice"]), 32, 32)
    assert (out["image"][:, 1] == flat["image"]).all()
    key = {(p, ph, s): i for i, (p, ph, s) in enumerate(zip(table["patient"], table["phase"], table["slice"]))}
    for (p, ph, s), i in key.items():
        below, above = key.get((p, ph, s - 1)), key.get((p, ph, s + 1))
        assert (out["image"][i, 0] == (flat["image"][below] if below is not None else 0)).all()
        assert (out["image"][i, 2] == (flat["image"][above] if above is not None else 0)).all()


def test_time_budget_plans_the_epochs_that_fit_and_anneals_by_then():
    from raysegment.training.core import _lr_at, planned_epochs

    fixed = TrainConfig(data="x", epochs=20)
    assert planned_epochs(fixed, 3, 1e6) == 20
    budget = TrainConfig(data="x", epochs=40, time_budget_min=10.0)
    assert planned_epochs(budget, 0, 0.0) == 40  # nothing measured yet: the cap
    assert planned_epochs(budget, 1, 60.0) == 10  # 60 s per epoch, 600 s budget
    assert planned_epochs(budget, 4, 300.0) == 8  # 75 s per epoch: 4 more fit in the 300 s left
    assert planned_epochs(budget, 5, 700.0) == 5  # over budget: stop after the epochs done
    assert planned_epochs(TrainConfig(data="x", epochs=6, time_budget_min=10.0), 1, 10.0) == 6  # the cap holds
    # The cosine reaches its floor (1 % of lr) at the planned end, not at the cap.
    assert _lr_at(budget, 10.0, 10) == pytest.approx(0.01 * budget.lr)
    assert _lr_at(budget, 10.0) > 0.5 * budget.lr


def test_foreground_oversampling_centres_on_labels():
    gen = torch.Generator().manual_seed(1)
    labels = torch.zeros(200, 64, 64, dtype=torch.uint8)
    labels[:, 5:8, 50:54] = 2
    params = sample_augment(labels, AugmentConfig(foreground_prob=1.0), 32, gen)
    c = params["centre_yx"]
    assert bool(((c[:, 0] >= 5) & (c[:, 0] < 8) & (c[:, 1] >= 50) & (c[:, 1] < 54)).all())


def test_train_step_learns_a_batch():
    """The one training step (train and bench call it): augment, forward, loss, backward, step."""
    torch.manual_seed(0)
    config = TrainConfig(data="unused", **{**TINY, "crop_size": 48})
    model = build_model(config.model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images, labels, _ = _images_labels_params(4, seed=1, label=3)
    images = images * 0.2 + (labels > 0) * 0.8  # the box is bright: learnable
    gen = torch.Generator().manual_seed(0)
    losses = [float(train_step(model, opt, scaler, images, labels, config, gen, torch.device("cpu"), None))
              for _ in range(30)]
    assert losses[-1] < 0.8 * losses[0] and sum(losses[-5:]) < sum(losses[:5]), losses


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_ACDC.is_dir(), reason="needs ../shared/acdc")
def test_overfits_a_few_real_slices(tmp_path):
    src = tmp_path / "src" / "volumes"
    src.mkdir(parents=True)
    for f in ("patient003_frame01.h5", "patient003_frame02.h5"):
        (src / f).symlink_to(SHARED_ACDC / "volumes" / f)
    prepare(PrepareConfig(source=src.parent, out=tmp_path / "shards", val_fraction=0.0, progress=False))
    vol = load_volumes(tmp_path / "shards", "train")[0]
    keep = [k for k in range(vol.label.shape[0]) if (vol.label[k] > 0).sum() > 500][:4]
    size = 128
    pairs = [resize_slice(vol.image[k], vol.label[k], size) for k in keep]
    x = torch.stack([p[0] for p in pairs])[:, None]
    y = torch.stack([p[1] for p in pairs]).long()
    torch.manual_seed(0)
    config = TrainConfig(data="unused", model=ModelConfig(backbone="mobilenet_v2", decoder_width=16), image_size=size,
                         precision="fp32")
    model = build_model(config.model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = segmentation_loss(model(x), y, LossConfig())
        opt.zero_grad()
        loss.backward()
        opt.step()
    from raysegment.analysis.metrics import dice
    from raysegment.model.checkpoint import LoadedModel

    pred = Predictor(LoadedModel(model, config, "overfit"), PredictConfig(precision="fp32")).predict(
        vol.image[keep], normalized=True)
    scores = [dice(pred == c, vol.label[keep] == c) for c in (1, 2, 3)]
    assert min(scores) > 0.9, scores


def test_a_train_step_with_deep_supervision_trains_the_coarse_heads():
    from dataclasses import replace

    from raysegment.model.unet import build_model

    config = TrainConfig(data="unused", **TINY)
    config = replace(config, model=replace(config.model, deep_supervision=2))
    torch.manual_seed(0)
    model = build_model(config.model)
    before = [h.weight.detach().clone() for h in model.aux_heads]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels, _ = _images_labels_params(4, seed=0, label=3)
    loss = train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), images, labels, config, torch.Generator(),
                      torch.device("cpu"), None)
    assert torch.isfinite(loss) and all(not torch.equal(b, h.weight) for b, h in zip(before, model.aux_heads))


def test_resume_loads_the_optimizer_moments_onto_the_parameters_device(tmp_path):
    """The order a GPU resume needs, shown on CPU: the model moves ("meta" stands in for CUDA)
    before the optimizer state loads, so Adam's moments follow the parameters."""
    from raysegment.model.checkpoint import save_checkpoint
    from raysegment.model.unet import build_model
    from raysegment.training.train import restore_run

    config = TrainConfig(data="unused", **TINY)
    model = build_model(config.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels, _ = _images_labels_params(4, seed=0, label=3)
    train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), images, labels, config, torch.Generator(),
               torch.device("cpu"), None)
    save_checkpoint(tmp_path, model, opt, config, {"epoch": 3, "history": [{"epoch": e} for e in range(4)]})
    run = restore_run(config, tmp_path, prepare=lambda m: m.to("meta"), device=torch.device("cpu"))
    moments = [v for st in run.optimizer.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
    assert len(moments) == 2 * len(list(model.parameters()))
    assert {t.device.type for t in moments} == {"meta"}
    assert run.start_epoch == 4 and len(run.history) == 4
    fresh = restore_run(config, None, prepare=lambda m: m, device=torch.device("cpu"))
    assert fresh.start_epoch == 0 and not fresh.optimizer.state


def test_lr_scales_with_the_workers_and_fp16_gpu_runs_get_equal_shards():
    from raysegment.training.core import lr_scale_for
    from raysegment.training.train import RunSpec, needs_equal_shards

    config = TrainConfig(data="unused", **TINY)
    assert lr_scale_for(config, 1) == 1.0 and lr_scale_for(config, 4) == 2.0  # sqrt by default
    assert lr_scale_for(TrainConfig(data="u", lr_scaling="linear"), 4) == 4.0
    assert lr_scale_for(TrainConfig(data="u", lr_scaling="none"), 4) == 1.0
    gpus = RunSpec(num_workers=2, use_gpu=True)
    assert needs_equal_shards(TrainConfig(data="u", precision="fp16"), gpus)
    assert needs_equal_shards(TrainConfig(data="u", precision="auto"), gpus)  # may resolve to fp16 there
    assert not needs_equal_shards(TrainConfig(data="u", precision="bf16"), gpus)
    assert not needs_equal_shards(TrainConfig(data="u", precision="fp16"), RunSpec(num_workers=2))  # CPU: no scaler
    assert not needs_equal_shards(TrainConfig(data="u", precision="fp16"), RunSpec(num_workers=1, use_gpu=True))


def test_worker_threads_follow_the_cpus_ray_assigned_on_the_workers_node():
    from raysegment.config import available_cpus
    from raysegment.training.train import worker_threads

    auto = TrainConfig(data="u")
    node = available_cpus()
    assert worker_threads(auto, processes_on_node=1, assigned_cpus=1) == max(1, node)
    assert worker_threads(auto, processes_on_node=node * 4, assigned_cpus=3) == 3  # never fewer than assigned
    assert worker_threads(TrainConfig(data="u", threads_per_worker=5), 1, assigned_cpus=1) == 5


INFER = ["--input", "TMP", "--output", "TMP/o"]


@pytest.mark.parametrize("module, args, message", [
    ("train", ["--data", "SHARDS", "--workers", "0"], "--workers must be ≥ 1"),
    ("train", ["--data", "SHARDS", "--epochs", "-1"], "--epochs must be ≥ 1"),
    ("train", ["--data", "SHARDS", "--minutes", "0"], "--minutes must be > 0"),
    ("train", ["--data", "SHARDS", "--max-steps-per-epoch", "0"], "--max-steps-per-epoch must be ≥ 1"),
    ("train", ["--data", "SHARDS", "--cpus-per-worker", "0"], "--cpus-per-worker must be > 0"),
    ("train", ["--data", "/nonexistent"], "no shards there"),
    ("tune", ["--data", "SHARDS", "--num-samples", "0"], "--num-samples must be ≥ 1"),
    ("tune", ["--data", "SHARDS", "--init-weights", "BROKEN"], "not a raysegment weights file"),
    ("tune", ["--storage", "s3://bucket/runs"], "is remote: give --data"),
    ("tune", ["--data", "SHARDS", "--set", "batch=3"], "expected NAME=VALUE"),
    ("tune", ["--data", "SHARDS", "--range", "lr=0:1e-2"], "lr takes LOW:HIGH with 0 < LOW < HIGH ≤ 1"),
    ("tune", ["--data", "SHARDS", "--set", "lr=1e-3", "--range", "lr=1e-4:1e-2"], "--set pins lr"),
    ("tune", ["--data", "SHARDS", "--init-weights", "shipped", "--range", "decoder_width=16,32"],
     "--init-weights has decoder_width 32; --set/--range decoder_width cannot load it"),
    ("tune", ["--data", "SHARDS", "--init-weights", "shipped", "--set", "decoder_width=16"], "cannot load it"),
    ("tune", ["--data", "SHARDS", "--storage", "TMP", "--name", "saved", "--num-samples", "3"],
     "search saved began with --num-samples 2, not 3: resume it with that, or give a new --name"),
    ("infer", ["--model", "shipped:mobilenet_v2", *INFER, "--actors", "0"], "--actors must be ≥ 1"),
    # Numeric options of every command (cli.args.check_numbers); each of these was taken before.
    ("infer", ["--model", "shipped:mobilenet_v2", *INFER, "--limit", "0"], "--limit must be ≥ 1"),
    ("infer", ["--model", "shipped:mobilenet_v2", *INFER, "--max-attempts", "0"], "--max-attempts must be ≥ 1"),
    ("infer", ["--model", "shipped:mobilenet_v2", *INFER, "--report-figures", "-1"], "--report-figures must be ≥ 0"),
    ("infer", ["--model", "shipped:mobilenet_v2", *INFER, "--since", "2"], "--since picks a PACS's series"),
    ("infer", ["--model", "shipped:mobilenet_v2", *INFER, "--pacs-auth", "TMP"], "--pacs-auth gives a PACS's credentials"),
    ("serve", ["--model", "shipped:mobilenet_v2", "--pacs-auth", "TMP"], "--pacs-auth gives the credentials of --pacs"),
    ("infer", ["--model", "shipped:mobilenet_v2", "--input", "http://127.0.0.1:9/dicom-web", "--output", "TMP/o",
               "--since", "-1"], "--since must be ≥ 0"),
    ("train", ["--data", "SHARDS", "--lr", "-1"], "--lr must be > 0"),
    ("train", ["--data", "SHARDS", "--dice-weight", "-1"], "--dice-weight must be ≥ 0"),
    ("tune", ["--data", "SHARDS", "--grace-period", "0"], "--grace-period must be ≥ 1"),
    ("serve", ["--model", "shipped:mobilenet_v2", "--poll-s", "0"], "--poll-s must be > 0"),
    ("report", ["compare", "--a", "shipped:mobilenet_v2", "--b", "shipped:densenet121", "--data", "SHARDS",
                "--resamples", "0"], "--resamples must be ≥ 1"),
    ("diagnosis", ["fit", "--data", "SHARDS", "--model", "shipped:mobilenet_v2", "--out", "TMP/o", "--repeats", "0"],
     "--repeats must be ≥ 1"),
    ("infer", ["--model", "BROKEN", *INFER], "not a raysegment weights file"),
    ("infer", ["--model", "shipped:resnet", *INFER], "no such shipped model"),
    ("infer", ["--model", "shipped:mobilenet_v2", "--input", "TMP", "--output", "BROKEN"], "a file, not a folder"),
    ("infer", ["--model", "shipped:mobilenet_v2", "--input", "BROKEN", "--output", "TMP/o"], "a file; give the folder"),
])
def test_bad_arguments_fail_before_ray_with_one_line(module, args, message, tmp_path, capsys, monkeypatch):
    import importlib

    import ray

    broken = tmp_path / "w.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")  # a header that is not JSON
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    (tmp_path / "saved").mkdir()  # a search begun with 2 trials
    (tmp_path / "saved" / "mlflow_parent_run.json").write_text(
        '{"tracking_uri": null, "run_id": "r", "space": {"fixed": {}, "ranges": {}}, "num_samples": 2}')
    fill = {"BROKEN": str(broken), "SHARDS": str(shards), "TMP": str(tmp_path), "TMP/o": str(tmp_path / "o")}
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"raysegment.{module}").main([fill.get(x, x) for x in args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err.strip().splitlines()[-1]  # argparse: usage, then one error line


def test_a_run_resumes_only_with_the_settings_it_began_with(tmp_path, capsys, monkeypatch):
    """A re-run under a run's name takes the settings saved with its latest registered checkpoint:
    another model (the resume crashed on loading its weights) or lr (the run silently mixed two) is
    refused in one line before Ray starts; other threads, shards' folder or length are a resume. A run
    that has done what it planned is not started again."""
    import json
    from dataclasses import replace

    import ray

    from raysegment.cli import train as train_cli
    from raysegment.config import changed_settings

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"content_hash": "abc"}))
    began = TrainConfig(data=str(shards), manifest_hash="abc")  # the CLI's defaults
    ckpt = tmp_path / "runs" / "r" / "checkpoint_1"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps(began.to_dict()))
    (ckpt.parent / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_1", "metrics": {"epoch": 0}}}))
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    args = ["--data", str(shards), "--storage", str(tmp_path / "runs"), "--name", "r"]
    with pytest.raises(SystemExit) as exit_:
        train_cli.main([*args, "--lr", "1e-3", "--decoder-width", "16"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "python -m raysegment.train: error: run r began with other settings (lr 0.002, now 0.001; decoder_width 32, "
        "now 16): re-run it as it began, or give a new --name (with --init-weights CHECKPOINT_FOLDER of this run, it "
        "starts from those weights)")
    # A run that has done what it planned: the same command again says so, without Ray; more epochs or
    # minutes than it has done go on with it (decided as the resumed run decides: planned_epochs).
    dice = {"dice_rv": 0.8, "dice_myo": 0.7, "dice_lv": 0.9, "dice_mean": 0.8}
    (ckpt.parent / "checkpoint_manager_snapshot.json").write_text(json.dumps({"latest_checkpoint_result": {
        "checkpoint_dir_name": "checkpoint_1", "metrics": {"epoch": 1, "elapsed_s": 10.0, **dice}}}))
    assert train_cli.main([*args, "--epochs", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["[raysegment] run r has done its 2 planned epochs: nothing to train (a larger --epochs or --minutes "
                   "goes on with it)", f"done: r epochs 2 val dice rv 0.800 myo 0.700 lv 0.900 mean 0.800; checkpoint {ckpt}"]
    assert train_cli.main([*args, "--epochs", "100", "--minutes", "0.2"]) == 0  # 5 s an epoch, 2 s left
    spec = RunSpec(storage_path=str(tmp_path / "runs"), name="r")
    assert train_cli._finished(replace(began, epochs=3), spec) is None
    assert train_cli._finished(replace(began, epochs=100, time_budget_min=1.0), spec) is None
    moved = replace(began, data="/elsewhere", threads_per_worker=2, epochs=50, time_budget_min=60.0, val_every=5)
    assert changed_settings(began, moved) == []
    turned = replace(began, manifest_hash="def", augment=replace(began.augment, rotation_deg=99.0))
    assert changed_settings(began, turned) == ["manifest_hash abc, now def",
                                                f"rotation_deg {began.augment.rotation_deg}, now 99.0"]


def test_the_one_training_core_steps_as_the_loop_it_replaced_bit_for_bit():
    """``run_steps`` (the Ray workers', the local loop's and the benchmark's loop) gives the weights
    the per-worker loop gave before it was shared: per step ``_lr_at`` × the worker-count factor,
    then ``train_step`` — compared to that loop written out, on the same batches, bit for bit."""
    from raysegment.config import ModelConfig
    from raysegment.model.unet import build_model
    from raysegment.training.core import _lr_at, epoch_seed, run_steps

    config = TrainConfig(data="u", model=ModelConfig(backbone="mobilenet_v2", decoder_width=8), image_size=64,
                         crop_size=32, batch_size=2, epochs=3, precision="fp32")
    images = torch.rand(6, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 4, (6, 64, 64), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    cpu = torch.device("cpu")

    def fresh():
        torch.manual_seed(0)
        model = build_model(config.model)
        return model, torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay), \
            torch.amp.GradScaler("cuda", enabled=False)

    m1, o1, s1 = fresh()
    gen = torch.Generator().manual_seed(config.seed * 100_003 + 1 * 101 + 0)  # the formula each loop used to copy
    for step in range(3):
        for g in o1.param_groups:
            g["lr"] = _lr_at(config, 1 + min(step / 3, 1.0), 3) * 1.0
        train_step(m1, o1, s1, images[2 * step : 2 * step + 2], labels[2 * step : 2 * step + 2], config, gen, cpu, None)
    m2, o2, s2 = fresh()
    loss, steps = run_steps(m2, o2, s2, ((images[i : i + 2], labels[i : i + 2]) for i in (0, 2, 4)), config, epoch=1,
                            total_epochs=3, steps_est=3, generator=torch.Generator().manual_seed(epoch_seed(config, 1)),
                            device=cpu, dtype=None)
    assert steps == 3 and torch.isfinite(loss)
    for (name, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), name


def test_validation_every_k_epochs_and_always_the_last_ones():
    from raysegment.training.core import VAL_LAST, validation_due

    config = TrainConfig(data="x", val_every=4)
    due = [e for e in range(20) if validation_due(config, e, total_epochs=20, validated_before=e > 0)]
    assert due == [0, 3, 7, 11, 15] + list(range(20 - VAL_LAST, 20))
    assert validation_due(config, 5, 20, validated_before=False)  # nothing to carry: validate
    assert all(validation_due(TrainConfig(data="x"), e, 20, True) for e in range(20))  # the default: every epoch
