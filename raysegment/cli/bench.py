"""Benchmarks. Numbers go in the README, never into timed test assertions.

    python -m raysegment.bench train --data /tmp/shards --backbone mobilenet_v2 --steps 30
    python -m raysegment.bench infer --data /tmp/shards --model shipped:densenet121
    python -m raysegment.bench data --data /tmp/shards --cpus 1
    python -m raysegment.bench poll --input /data/ACDC/training --exclude '*_4d.nii.gz' --copies 20
    python -m raysegment.bench ledger --series 4000

``train``: slices/s of the Ray Train path (1 worker: Ray Data shard → augment → step) against
a bare single-process loop with the same model, batch, crop, augmentation and precision, in
one run. The first epoch of each is warm-up (Ray Data start, allocator, kernel selection).
Both loops call the same ``train.train_step``.

``gpu-smoke``: a ten-minute check of a GPU node (bench train on both backbones at two batch sizes,
1 epoch then a resumed 2nd, GPU vs CPU inference masks), one JSON + markdown summary;
``--dry-run`` prints its steps anywhere.

``poll`` (``cli.bench_poll``): seconds of a cron poll that finds nothing new in an archive of N copies
of a folder, first and later polls. ``ledger``: reading a ledger of N cine series whole, and refreshing.

``infer``: per study, the Predictor's pure forward time (inside the network) next to what
``raysegment.inference.batch`` spends (its whole batch run on the same studies written as NIfTI, without
ground truth, after Ray is up), in one run.

Top layer (no stage imports it): imports the other ``cli.bench_*`` modules, ``cli.gpu_smoke``,
``cli.args``, ``training``, ``model``, ``data``, ``config`` and ``runtime``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from raysegment.cli import add_in_plane_argument, command_parser
from raysegment.cli.bench_infer import bench_infer, infer_line
from raysegment.cli.bench_poll import add_poll_bench, bench_ledger, bench_poll, ledger_line, poll_line
from raysegment.cli.bench_service import SERVICE_BENCHES, add_service_benches, run_service_bench
from raysegment.cli.gpu_smoke import gpu_smoke
from raysegment.config import ModelConfig, TrainConfig, default_of, torch_threads
from raysegment.model.unet import BACKBONES


def bare_loop(config: TrainConfig, steps: int, warmup: int = 3, device: str = "cpu") -> dict:
    """A plain PyTorch loop over pre-resized train slices held in memory, stepping with ``train_step``:
    slices/s and, on a GPU, its peak memory (MiB) and the share of the steps' wall time the GPU
    spends in kernels (profiled over up to 10 more steps)."""
    from raysegment.model.unet import build_model
    from raysegment.training.core import autocast_dtype, epoch_seed, run_steps

    torch.set_num_threads(config.threads_per_worker or torch_threads(None, 1))
    images, labels = bench_slices(config, config.batch_size * (steps + warmup))
    torch.manual_seed(config.seed)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(dev)
    model = build_model(config.model).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    dtype = autocast_dtype(config.precision, dev)
    scaler = torch.amp.GradScaler(device, enabled=cuda and dtype == torch.float16)
    gen = torch.Generator().manual_seed(epoch_seed(config, 0))
    uncapped = replace(config, max_steps_per_epoch=None)  # the steps asked for here, whatever the config caps

    def run(first: int, last: int):
        batches = ((images[s * config.batch_size:(s + 1) * config.batch_size],
                    labels[s * config.batch_size:(s + 1) * config.batch_size]) for s in range(first, last))
        loss_sum, _ = run_steps(model, opt, scaler, batches, uncapped, epoch=0, total_epochs=config.epochs,
                                steps_est=last - first, generator=gen, device=dev, dtype=dtype)
        return float(loss_sum)  # one sync at the end, as the Ray loop does per epoch

    run(0, warmup)
    t0 = time.perf_counter()
    run(warmup, warmup + steps)
    wall = time.perf_counter() - t0
    out = {"slices_per_s": steps * config.batch_size / wall, "device": str(dev)}
    if cuda:
        out["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        prof_steps = min(steps, 10)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            t1 = time.perf_counter()
            run(warmup, warmup + prof_steps)
            prof_wall = time.perf_counter() - t1
        kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
        out["gpu_busy_share"] = round(min(1.0, kernel_us / 1e6 / prof_wall), 3)
    return out


def bench_slices(config: TrainConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` train slices on the training grid (repeated when the data holds fewer), from a shards
    folder as the Ray pipeline resizes them, or from a ``diagnosis pack`` bundle (.npz: a machine
    without Ray) as the local loop does."""
    from raysegment.data.dataset import is_bundle

    if is_bundle(config.data):
        from raysegment.data.dataset import load_bundle
        from raysegment.training.local import slice_tensors

        images, labels, volumes = [], [], iter(load_bundle(config.data))
        while sum(len(i) for i in images) < n and (v := next(volumes, None)) is not None:
            i, lab = slice_tensors([v], config)
            images.append(i)
            labels.append(lab)
        images, labels = torch.cat(images), torch.cat(labels)
        take = torch.arange(n) % len(images)
        return images[take], labels[take]
    import pyarrow.parquet as pq

    from raysegment.data.dataset import resize_batch, train_columns

    table = pq.read_table(os.path.join(config.data, "train"))
    table = table.take([i % table.num_rows for i in range(n)])  # as many batches as asked, on any data
    cols = {c: table.column(c).to_numpy(zero_copy_only=False)
            for c in train_columns(config.model.context_slices, config.pixel_mm)}
    data = resize_batch(cols, config.image_size, config.model.context_slices, config.pixel_mm)
    return torch.from_numpy(data["image"]), torch.from_numpy(data["label"])


def ray_train_slices_per_s(config, steps: int, cpus_per_worker: float, cache_data: bool = True,
                           gpu: bool = False, epochs: int = 3) -> tuple[float, float, list[dict]]:
    """Ray Train with 1 worker; slices/s of the epochs after the first (warm-up) epoch: in the
    training steps, and over the whole epoch (validation, checkpoint and report included)."""
    import tempfile

    from raysegment.runtime import ensure_ray
    from raysegment.training.train import RunSpec, train

    ensure_ray()
    cfg = replace(config, epochs=epochs, max_steps_per_epoch=steps, val_patients=config.val_patients)
    with tempfile.TemporaryDirectory() as tmp:
        result = train(cfg, RunSpec(num_workers=1, use_gpu=gpu, cpus_per_worker=cpus_per_worker, storage_path=tmp, name="bench",
                                             keep_checkpoints=None, cache_data=cache_data))
        columns = ["epoch", "train_slices", "train_seconds", "data_wait_seconds", "elapsed_s", "validated_epoch"]
        rows = result.metrics_dataframe.sort_values("epoch")[columns].to_dict("records")
    later = rows[1:]
    # The whole epoch: training, validation (when due), checkpoint and report, from the run's own clock.
    for prev, r in zip(rows, later):
        r["wall_s"] = r["elapsed_s"] - prev["elapsed_s"]
        r["validated"] = r["validated_epoch"] == r["epoch"]
    whole = sum(r["train_slices"] for r in later) / sum(r["wall_s"] for r in later)
    return sum(r["train_slices"] for r in later) / sum(r["train_seconds"] for r in later), whole, rows


def long_run_epoch_rate(rows: list[dict], val_every: int) -> float | None:
    """Slices/s of a whole epoch in a long run validating every ``val_every``-th epoch, from this
    short run's epochs: the mean training time, plus what an epoch costs beyond its steps without
    validation (checkpoint, report) and 1/``val_every`` of what validating adds. A short run
    validates its last 3 epochs, far more often than a long one; taking the steps' time from every
    epoch keeps their noise (±20 % epoch to epoch here) out of the validation's cost. None without
    epochs of both kinds."""
    later = rows[1:]
    plain = [r["wall_s"] - r["train_seconds"] for r in later if not r["validated"]]
    checked = [r["wall_s"] - r["train_seconds"] for r in later if r["validated"]]
    if not plain or not checked:
        return None
    base, extra = float(np.mean(plain)), max(float(np.mean(checked)) - float(np.mean(plain)), 0.0)
    epoch_s = float(np.mean([r["train_seconds"] for r in later])) + base + extra / val_every
    return float(np.mean([r["train_slices"] for r in later])) / epoch_s


def bench_train(args) -> dict:
    config = TrainConfig(data=os.path.abspath(args.data), model=ModelConfig(backbone=args.backbone, context_slices=args.context_slices),
                         batch_size=args.batch_size, crop_size=args.crop_size, image_size=args.image_size,
                         precision=args.precision, threads_per_worker=torch_threads(args.threads, 1), val_every=args.val_every)
    head = {"backbone": args.backbone, "context_slices": args.context_slices, "batch_size": args.batch_size, "crop_size": args.crop_size,
            "precision": args.precision, "threads": config.threads_per_worker, "steps": args.steps}
    if args.bare_only:  # no Ray needed: e.g. a GPU machine with a bundle and torch alone
        bare = bare_loop(config, args.steps, device="cuda" if args.gpu else "cpu")
        return {**head, "bare_slices_per_s": round(bare["slices_per_s"], 2),
                **{k: bare[k] for k in ("peak_mem_mib", "gpu_busy_share") if k in bare}}
    from raysegment.data.dataset import is_bundle, load_volumes

    if is_bundle(args.data):
        raise SystemExit("error: the Ray Train arm reads shards; with a .npz bundle use --bare-only")
    from raysegment.runtime import ensure_ray

    val_one = tuple(sorted({v.patient for v in load_volumes(args.data, "val")}))[:1]  # a short bench: one patient
    config = replace(config, val_patients=val_one if args.val_patients == 1 else None)

    # Ray's daemons (raylet, GCS, dashboard) run during both measurements, as on a real node.
    ensure_ray()
    if args.gpu:  # the bare loop on a GPU worker too: the driver (a cluster's head) may have none
        import ray

        bare = ray.get(ray.remote(num_gpus=1, num_cpus=args.cpus_per_worker)(bare_loop).remote(
            config, args.steps, device="cuda"))
    else:
        bare = bare_loop(config, args.steps, device="cpu")
    ray_rate, whole_rate, rows = ray_train_slices_per_s(config, args.steps, args.cpus_per_worker, gpu=args.gpu,
                                                        epochs=args.epochs)
    out = {**head, "bare_slices_per_s": round(bare["slices_per_s"], 2), "ray_slices_per_s": round(ray_rate, 2),
           "ratio": round(ray_rate / bare["slices_per_s"], 3), "ray_epoch_slices_per_s": round(whole_rate, 2),
           "ratio_epoch": round(whole_rate / bare["slices_per_s"], 3), "val_every": args.val_every, "ray_epochs": rows,
           **_long_run(rows, args.val_every, bare["slices_per_s"]),
           **{k: bare[k] for k in ("peak_mem_mib", "gpu_busy_share") if k in bare}}
    return out


def _long_run(rows: list[dict], val_every: int, bare: float) -> dict:
    rate = long_run_epoch_rate(rows, val_every)
    return {} if rate is None else {"long_run_epoch_slices_per_s": round(rate, 2), "ratio_long_run": round(rate / bare, 3)}


def bench_data(args) -> dict:
    """Input-pipeline rates for capacity planning (slices/s).

    * ``pipeline``: Ray Data read_parquet → resample to ``image_size`` (what ``cache_data=False``
      does every epoch, and ``cache_data=True`` once), on ``cpus`` Ray CPUs; the second pass is
      timed, the first starts Ray's workers.
    * ``augment``: sample_augment + apply_augment with one torch thread (what every train worker
      does per step; on a GPU worker apply_augment runs on the GPU).
    """
    import ray

    from raysegment.data.dataset import apply_augment, read_split, sample_augment
    from raysegment.runtime import quiet_ray_data

    # A Ray of its own with exactly --cpus CPUs (not a cluster named by RAY_ADDRESS): a rate per CPU.
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             logging_config=ray.LoggingConfig(log_level="WARNING"))
    quiet_ray_data()
    try:
        ds = read_split(args.data, "train", args.image_size)
        rates, batch = [], None
        for _ in range(2):
            t0, n = time.perf_counter(), 0
            for b in ds.iter_batches(batch_size=args.batch_size, batch_format="numpy"):
                n += len(b["image"])
                batch = batch or b
            rates.append(n / (time.perf_counter() - t0))
    finally:
        ray.shutdown()
    torch.set_num_threads(1)
    aug = TrainConfig(data=args.data).augment
    # Ray Data's numpy batches are read-only, and torch warns on tensors that share their memory.
    images, labels = (torch.from_numpy(np.array(batch[k])) for k in ("image", "label"))
    gen = torch.Generator().manual_seed(0)
    t0, reps = time.perf_counter(), 20
    for _ in range(reps):
        apply_augment(images, labels, sample_augment(labels, aug, args.crop_size, gen), args.crop_size)
    augment = reps * len(images) / (time.perf_counter() - t0)
    return {"cpus": args.cpus, "image_size": args.image_size, "crop_size": args.crop_size, "slices": n,
            "pipeline_slices_per_s": round(rates[1], 1), "pipeline_slices_per_s_per_cpu": round(rates[1] / args.cpus, 1),
            "augment_slices_per_s_one_thread": round(augment, 1)}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m raysegment.bench`` command line (also used to dry-run job specs)."""
    from raysegment.config import PredictConfig

    td = lambda name: default_of(TrainConfig, name)  # noqa: E731
    p = command_parser(
        "bench",
        "Speed and memory benchmarks; each prints JSON lines (the figures in docs/benchmarks.md come from these).",
        "python -m raysegment.bench train --data /data/shards --steps 30",
        "python -m raysegment.bench infer --data /data/shards --model shipped:densenet121")
    sub = p.add_subparsers(dest="what", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="Ray Train path vs bare PyTorch loop, slices/s")
    t.add_argument("--data", required=True, help="shards folder, or a `diagnosis pack` bundle (.npz) with --bare-only")
    t.add_argument("--bare-only", action="store_true", help="the bare loop alone, no Ray (a machine with torch only)")
    t.add_argument("--backbone", default=default_of(ModelConfig, "backbone"), choices=BACKBONES)
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=td("batch_size"))
    t.add_argument("--crop-size", type=int, default=td("crop_size"))
    t.add_argument("--context-slices", type=int, default=default_of(ModelConfig, "context_slices"), choices=[0, 1],
                   help="2.5-D input (neighbouring slices)")
    t.add_argument("--image-size", type=int, default=td("image_size"))
    t.add_argument("--precision", default=td("precision"), choices=["auto", "bf16", "fp16", "fp32"])
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--cpus-per-worker", type=float, default=1.0)
    t.add_argument("--gpu", action="store_true", help="both loops on one GPU")
    t.add_argument("--epochs", type=int, default=3, help="epochs of the Ray run (the first is warm-up)")
    t.add_argument("--val-every", type=int, default=1, help="validate every K-th epoch (and the last 3) in the Ray run")
    t.add_argument("--val-patients", type=int, default=1, choices=[1, 0],
                   help="1: validate on one val patient (a quick bench); 0: every val patient, as a real run")
    d = sub.add_parser("data", help="Ray Data pipeline and augmentation slices/s (capacity planning)")
    d.add_argument("--data", required=True)
    d.add_argument("--cpus", type=int, default=1, help="Ray CPUs for the pipeline")
    d.add_argument("--batch-size", type=int, default=td("batch_size"))
    d.add_argument("--image-size", type=int, default=td("image_size"))
    d.add_argument("--crop-size", type=int, default=td("crop_size"))
    i = sub.add_parser("infer", help="seconds per study: the Predictor's forward pass vs the batch job (raysegment.infer) end to end")
    i.add_argument("--data", required=True, help="shards; their val (then train) volumes become the studies")
    i.add_argument("--backbone", default=default_of(ModelConfig, "backbone"), choices=BACKBONES,
                   help="shipped weights of this backbone, unless --model is given")
    i.add_argument("--model", default=None, help="any reference raysegment.infer --model takes")
    i.add_argument("--volumes", type=int, default=20)
    i.add_argument("--batch-size", type=int, default=default_of(PredictConfig, "batch_size"))
    i.add_argument("--precision", default=default_of(PredictConfig, "precision"), choices=["auto", "bf16", "fp16", "fp32"])
    i.add_argument("--threads", type=int, default=None, help="torch threads of the in-process Predictor (default: all cores)")
    i.add_argument("--actors", type=int, default=None, help="the batch job's actors (default: its own policy)")
    add_in_plane_argument(i)
    add_poll_bench(sub)
    add_service_benches(sub)
    g = sub.add_parser("gpu-smoke", help="ten-minute check of a GPU node: bench, train + resume, GPU vs CPU inference")
    g.add_argument("--out", default="gpu-smoke", help="folder for the sample, runs, logs and the summary")
    g.add_argument("--dry-run", action="store_true", help="print the steps and their commands; run nothing")
    g.add_argument("--step-timeout", type=float, default=300, help="seconds per step")
    return p


def main(argv: list[str] | None = None) -> int:
    from raysegment.cli.args import check_numbers

    p = build_parser()
    a = p.parse_args(argv)
    check_numbers(p, a)
    if a.what == "poll" and not Path(a.input).is_dir():
        p.error(f"--input {a.input}: no such folder")
    if a.what in ("infer", "poll") or (a.what == "train" and not a.bare_only):  # they join RAY_ADDRESS's cluster if set
        from raysegment.runtime import ClusterUnreachable, check_cluster

        try:
            check_cluster(None)
        except ClusterUnreachable as exc:  # before minutes of in-process timing that would be lost
            print(f"error: {exc}; nothing was measured", file=sys.stderr)
            return 1
    if a.what == "train":
        out = bench_train(a)
        print(json.dumps(out))
        if a.bare_only:
            print(f"{out['backbone']} batch {out['batch_size']}: bare loop {out['bare_slices_per_s']:.1f} slices/s"
                  + (f", peak {out['peak_mem_mib']} MiB, GPU busy {out['gpu_busy_share']:.0%}" if "peak_mem_mib" in out else ""))
            return 0
        print(f"{out['backbone']}: bare {out['bare_slices_per_s']:.1f} slices/s, Ray Train {out['ray_slices_per_s']:.1f} "
              f"slices/s in its steps (ratio {out['ratio']:.2f}), {out['ray_epoch_slices_per_s']:.1f} over whole epochs with "
              f"validation every {out['val_every']} (ratio {out['ratio_epoch']:.2f})"
              + (f"; a long run's whole epoch {out['long_run_epoch_slices_per_s']:.1f} slices/s (ratio "
                 f"{out['ratio_long_run']:.2f})" if "ratio_long_run" in out else ""))
    elif a.what == "data":
        out = bench_data(a)
        print(json.dumps(out))
        print(f"data pipeline {out['pipeline_slices_per_s_per_cpu']:.1f} slices/s per CPU; augmentation "
              f"{out['augment_slices_per_s_one_thread']:.1f} slices/s per thread")
    elif a.what in ("poll", "ledger"):
        out = bench_poll(a) if a.what == "poll" else bench_ledger(a)
        print(json.dumps(out))
        print(poll_line(out) if a.what == "poll" else ledger_line(out))
    elif a.what in SERVICE_BENCHES:
        return run_service_bench(a)
    elif a.what == "gpu-smoke":
        out = gpu_smoke(a)
        if not out.get("dry_run"):
            print(json.dumps(out))
            return 0 if out["passed"] else 1
    else:
        out = bench_infer(a)
        print(json.dumps(out))
        print(infer_line(out))
    return 0


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: Ray pickles functions and classes
    # of __main__ by value (with every global they touch, e.g. torch.backends.cudnn, which cannot
    # be pickled), those of raysegment.cli.bench by reference.
    from raysegment.cli.bench import main as _main

    sys.exit(_main())
