"""``bench infer``: per study, the Predictor's pure forward time (inside the network) next to what
``raysegment.inference.batch`` spends on the same studies (written as NIfTI, without ground truth,
after Ray is up), in one run. Top layer (it runs the batch job).

Top layer (no stage imports it): imports ``cli.gpu_smoke``, ``inference``, ``data``, ``io``,
``config`` and ``runtime``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from raysegment.cli.gpu_smoke import write_studies
from raysegment.config import torch_threads


def bench_infer(args) -> dict:
    """Seconds per study: the Predictor's pure forward pass vs ``raysegment.inference.batch`` end to end."""
    import tempfile

    from raysegment.config import PredictConfig
    from raysegment.data.dataset import load_volumes
    from raysegment.inference.batch import InferConfig, run_batch
    from raysegment.inference.predictor import Predictor
    from raysegment.inference.study import predict_frames
    from raysegment.io.studies import read_study
    from raysegment.runtime import ensure_ray

    model = args.model or f"shipped:{args.backbone}"
    predict = PredictConfig(batch_size=args.batch_size, precision=args.precision, in_plane=args.in_plane)
    threads = torch_threads(args.threads, 1)
    volumes = load_volumes(args.data, "val")[: args.volumes]
    if len(volumes) < args.volumes:  # a larger batch: train volumes after the val ones
        volumes += load_volumes(args.data, "train")[: args.volumes - len(volumes)]
    with tempfile.TemporaryDirectory() as tmp:
        studies = write_studies(volumes, Path(tmp) / "in")
        # In-process: the same studies, read and predicted as the actor does, forward time counted.
        torch.set_num_threads(threads)
        predictor = Predictor.load(model, predict)
        _, frames, zooms = read_study(studies[0])
        predictor.predict(frames[0], in_plane="as-stored")  # warm-up (allocator, kernel selection)
        predictor.forward_seconds = 0.0
        t0 = time.perf_counter()
        for path in studies:
            _, frames, zooms = read_study(path)
            predict_frames(predictor, frames, zooms)  # as the actor: "auto" decides once per study
        predict_s = (time.perf_counter() - t0) / len(studies)
        forward_s = predictor.forward_seconds / len(studies)
        # The batch job: local Ray up first (not counted), then one run over the folder.
        ensure_ray()
        config = InferConfig(models=(model,), input=str(Path(tmp) / "in"), output=str(Path(tmp) / "out"),
                             predict=predict, actors=args.actors, progress=False)
        t0 = time.perf_counter()
        summary = run_batch(config)
        infer_total = time.perf_counter() - t0
        infer_s = infer_total / len(studies)
        ledger = [json.loads(line) for line in (Path(tmp) / "out" / "ledger.jsonl").read_text().splitlines()]
    actor_s = float(np.mean([e["seconds"] for e in ledger]))
    actor_forward_s = float(np.mean([e["forward_seconds"] for e in ledger]))
    # Actor start, hashing, results, report: what the actors' study time (run side by side) leaves.
    fixed_s = infer_total - sum(e["seconds"] for e in ledger) / summary["actors"]
    return {"model": model, "backbone": predictor.members[0].config.model.backbone, "studies": len(studies),
            "mean_slices": round(float(np.mean([v.image.shape[0] for v in volumes])), 1),
            "precision": predictor.config.precision, "in_plane": args.in_plane,
            **({"auto_turns": predictor.auto_turns} if args.in_plane == "auto" else {}),
            "threads": threads, "actors": summary["actors"],
            "segmented": summary["segmented"],
            "forward_s_per_study": round(forward_s, 4), "predict_s_per_study": round(predict_s, 4),
            "infer_actor_forward_s_per_study": round(actor_forward_s, 4), "infer_actor_s_per_study": round(actor_s, 4),
            "infer_s_per_study": round(infer_s, 4),
            "infer_fixed_s": round(fixed_s, 2), "infer_over_forward": round(infer_s / forward_s, 2)}


def infer_line(out: dict) -> str:
    """``bench_infer``'s figures in one line."""
    return (f"{out['backbone']} ({out['precision']}, in-plane {out['in_plane']}, {out['threads']} threads in-process, "
            f"{out['actors']} actors, {out['studies']} studies of {out['mean_slices']} slices): forward "
            f"{out['forward_s_per_study']:.3f} s/study | Predictor {out['predict_s_per_study']:.3f} | per study in one of "
            f"the {out['actors']} actors {out['infer_actor_s_per_study']:.3f} | infer {out['infer_s_per_study']:.3f} "
            f"s/study = {out['infer_over_forward']:.2f}× forward (of which {out['infer_fixed_s']:.1f} s per batch: actor "
            f"start, results, report)")
