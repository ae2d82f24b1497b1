"""Benchmarks. Numbers go in the README, never into timed test assertions.

    python -m raysegment.bench train --data /tmp/shards --backbone mobilenet_v2 --steps 30
    python -m raysegment.bench infer --data /tmp/shards --backbone densenet121
    python -m raysegment.bench data --data /tmp/shards --cpus 1

``train``: slices/s of the Ray Train path (1 worker: Ray Data shard → augment → step) against
a bare single-process loop with the same model, batch, crop, augmentation and precision, in
one run. The first epoch of each is warm-up (Ray Data start, allocator, kernel selection).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from raysegment.train import DEFAULT_BATCH_SIZE, DEFAULT_IMAGE_SIZE


def bare_loop_slices_per_s(config, steps: int, warmup: int = 3, device: str = "cpu") -> float:
    """A plain PyTorch loop over pre-resized train slices held in memory."""
    import pyarrow.parquet as pq

    from raysegment.dataset import apply_augment, resize_batch, sample_augment, train_columns
    from raysegment.losses import segmentation_loss
    from raysegment.models import build_model
    from raysegment.train import autocast_dtype

    torch.set_num_threads(config.threads_per_worker or os.cpu_count())
    n = config.batch_size * (steps + warmup)
    table = pq.read_table(os.path.join(config.data, "train")).slice(0, n)
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in train_columns(config.model.context_slices)}
    data = resize_batch(cols, config.image_size, config.model.context_slices)
    images, labels = torch.from_numpy(data["image"]), torch.from_numpy(data["label"])
    torch.manual_seed(config.seed)
    model = build_model(config.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    dtype = autocast_dtype(config.precision, torch.device(device))
    scaler = torch.amp.GradScaler(device, enabled=device == "cuda" and dtype == torch.float16)
    gen = torch.Generator().manual_seed(0)
    t0 = None
    for step in range((len(images) + config.batch_size - 1) // config.batch_size):
        if step == warmup:
            t0 = time.perf_counter()
        sl = slice(step * config.batch_size, (step + 1) * config.batch_size)
        params = sample_augment(labels[sl], config.augment, config.crop_size, gen)
        x, y = apply_augment(images[sl].to(device), labels[sl].to(device), params, config.crop_size)
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        loss = segmentation_loss(logits, y, config.loss)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        float(loss.detach())  # one sync per step, as the Ray loop does
    return steps * config.batch_size / (time.perf_counter() - t0)


def ray_train_slices_per_s(config, steps: int, cpus_per_worker: float, cache_data: bool = True, gpu: bool = False) -> tuple[float, list[dict]]:
    """Ray Train with 1 worker; slices/s of the epochs after the first (warm-up) epoch."""
    import tempfile

    from raysegment.train import RunSpec, ensure_ray, train

    ensure_ray()
    cfg = replace(config, epochs=3, max_steps_per_epoch=steps, val_patients=config.val_patients)
    with tempfile.TemporaryDirectory() as tmp:
        result = train(cfg, RunSpec(num_workers=1, use_gpu=gpu, cpus_per_worker=cpus_per_worker, storage_path=tmp, name="bench",
                                             keep_checkpoints=None, cache_data=cache_data))
        rows = result.metrics_dataframe.sort_values("epoch")[["epoch", "train_slices", "train_seconds", "data_wait_seconds"]].to_dict("records")
    later = rows[1:]
    return sum(r["train_slices"] for r in later) / sum(r["train_seconds"] for r in later), rows


def bench_train(args) -> dict:
    from raysegment.dataset import load_volumes
    from raysegment.models import ModelConfig
    from raysegment.train import TrainConfig

    val_one = tuple(sorted({v.patient for v in load_volumes(args.data, "val")}))[:1]
    config = TrainConfig(data=os.path.abspath(args.data), model=ModelConfig(backbone=args.backbone, context_slices=args.context_slices),
                         batch_size=args.batch_size, crop_size=args.crop_size, image_size=args.image_size,
                         precision=args.precision, threads_per_worker=args.threads or os.cpu_count(),
                         val_patients=val_one)
    from raysegment.train import ensure_ray

    # Ray's daemons (raylet, GCS, dashboard) run during both measurements, as on a real node.
    ensure_ray()
    bare = bare_loop_slices_per_s(config, args.steps, device="cuda" if args.gpu else "cpu")
    ray_rate, rows = ray_train_slices_per_s(config, args.steps, args.cpus_per_worker, gpu=args.gpu)
    out = {"backbone": args.backbone, "context_slices": args.context_slices, "batch_size": args.batch_size, "crop_size": args.crop_size,
           "precision": args.precision, "threads": config.threads_per_worker, "steps": args.steps,
           "bare_slices_per_s": round(bare, 2), "ray_slices_per_s": round(ray_rate, 2),
           "ratio": round(ray_rate / bare, 3), "ray_epochs": rows}
    return out


def bench_data(args) -> dict:
    """Input-pipeline rates for capacity planning (slices/s).

    * ``pipeline``: Ray Data read_parquet → resample to ``image_size`` (what ``cache_data=False``
      does every epoch, and ``cache_data=True`` once), on ``cpus`` Ray CPUs; the second pass is
      timed, the first starts Ray's workers.
    * ``augment``: sample_augment + apply_augment with one torch thread (what every train worker
      does per step; on a GPU worker apply_augment runs on the GPU).
    """
    import ray

    from raysegment.dataset import apply_augment, read_split, sample_augment
    from raysegment.train import TrainConfig

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
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
    images, labels = torch.from_numpy(batch["image"]), torch.from_numpy(batch["label"])
    gen = torch.Generator().manual_seed(0)
    t0, reps = time.perf_counter(), 20
    for _ in range(reps):
        apply_augment(images, labels, sample_augment(labels, aug, args.crop_size, gen), args.crop_size)
    augment = reps * len(images) / (time.perf_counter() - t0)
    return {"cpus": args.cpus, "image_size": args.image_size, "crop_size": args.crop_size, "slices": n,
            "pipeline_slices_per_s": round(rates[1], 1), "pipeline_slices_per_s_per_cpu": round(rates[1] / args.cpus, 1),
            "augment_slices_per_s_one_thread": round(augment, 1)}


def bench_infer(args) -> dict:
    """Seconds per volume: batched slices (what ``raysegment.infer`` does) vs one slice at a time."""
    from raysegment.dataset import load_volumes
    from raysegment.models import ModelConfig, build_model, predict_volume

    torch.set_num_threads(args.threads or os.cpu_count())
    if args.model:
        from raysegment.infer import load_model

        model, config, _ = load_model(args.model)
        image_size, backbone = config.image_size, config.model.backbone
    else:  # speed does not depend on the weights
        model, image_size, backbone = build_model(ModelConfig(backbone=args.backbone)).eval(), args.image_size, args.backbone
    volumes = [v.image for v in load_volumes(args.data, "val")][: args.volumes]
    dtype = None if args.precision == "fp32" else torch.bfloat16
    predict_volume(model, volumes[0], image_size, autocast_dtype=dtype)  # warm-up
    timings = {}
    for name, bs in (("batched", args.batch_size), ("one_slice", 1)):
        t0 = time.perf_counter()
        for v in volumes:
            predict_volume(model, v, image_size, batch_size=bs, autocast_dtype=dtype)
        timings[name] = (time.perf_counter() - t0) / len(volumes)
    slices = float(np.mean([v.shape[0] for v in volumes]))
    return {"backbone": backbone, "volumes": len(volumes), "mean_slices": round(slices, 1),
            "precision": args.precision, "s_per_volume_batched": round(timings["batched"], 3),
            "s_per_volume_one_slice": round(timings["one_slice"], 3),
            "speedup": round(timings["one_slice"] / timings["batched"], 2)}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m raysegment.bench`` command line (also used to dry-run job specs)."""
    p = argparse.ArgumentParser(prog="python -m raysegment.bench")
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="Ray Train path vs bare PyTorch loop, slices/s")
    t.add_argument("--data", required=True)
    t.add_argument("--backbone", default="mobilenet_v2", choices=["densenet121", "mobilenet_v2"])
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    t.add_argument("--crop-size", type=int, default=128)
    t.add_argument("--context-slices", type=int, default=0, choices=[0, 1], help="2.5-D input (neighbouring slices)")
    t.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    t.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--cpus-per-worker", type=float, default=1.0)
    t.add_argument("--gpu", action="store_true", help="both loops on one GPU (fp16 AMP with --precision auto)")
    d = sub.add_parser("data", help="Ray Data pipeline and augmentation slices/s (capacity planning)")
    d.add_argument("--data", required=True)
    d.add_argument("--cpus", type=int, default=1, help="Ray CPUs for the pipeline")
    d.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    d.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    d.add_argument("--crop-size", type=int, default=128)
    i = sub.add_parser("infer", help="seconds per volume, batched vs one slice at a time")
    i.add_argument("--data", required=True, help="shards; the val volumes are segmented")
    i.add_argument("--backbone", default="mobilenet_v2", choices=["densenet121", "mobilenet_v2"])
    i.add_argument("--model", default=None, help="a trained model (default: random weights, same speed)")
    i.add_argument("--volumes", type=int, default=10)
    i.add_argument("--batch-size", type=int, default=16)
    i.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    i.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    i.add_argument("--threads", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    from raysegment import disable_telemetry

    disable_telemetry()
    p = build_parser()
    a = p.parse_args(argv)
    if a.what == "train":
        out = bench_train(a)
        print(json.dumps(out))
        print(f"{out['backbone']}: bare {out['bare_slices_per_s']:.1f} slices/s, Ray Train {out['ray_slices_per_s']:.1f} "
              f"slices/s, ratio {out['ratio']:.2f}")
    elif a.what == "data":
        out = bench_data(a)
        print(json.dumps(out))
        print(f"data pipeline {out['pipeline_slices_per_s_per_cpu']:.1f} slices/s per CPU; augmentation "
              f"{out['augment_slices_per_s_one_thread']:.1f} slices/s per thread")
    else:
        out = bench_infer(a)
        print(json.dumps(out))
        print(f"{out['backbone']}: {out['s_per_volume_batched']:.2f} s/volume batched, "
              f"{out['s_per_volume_one_slice']:.2f} s/volume one slice at a time ({out['mean_slices']} slices/volume)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
