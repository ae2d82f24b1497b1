"""Benchmarks run (their numbers go in the README, never into assertions on speed)."""

import json

import pytest

from conftest import write_checkpoint
from raysegment import bench
from raysegment.config import ModelConfig, TrainConfig
from raysegment.prepare import PrepareConfig, prepare
from synth import make_h5_dataset


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    src = make_h5_dataset(root / "src", patients=(1, 2, 3), val=(3,), shape=(3, 40, 48))
    prepare(PrepareConfig(source=src, out=root / "shards", progress=False))
    return root / "shards"


def test_bare_training_loop_runs_the_train_step(shards):
    config = TrainConfig(data=str(shards), model=ModelConfig(decoder_width=8), batch_size=2, image_size=64,
                         crop_size=64, precision="fp32", threads_per_worker=1)
    rate = bench.bare_loop_slices_per_s(config, steps=2, warmup=1)
    assert rate > 0


@pytest.mark.slow
def test_bench_infer_prints_forward_and_batch_job_per_study(shards, tmp_path, tiny_model, capsys):
    import ray

    ckpt = write_checkpoint(tmp_path / "ckpt", *tiny_model)
    try:  # bench starts a local Ray in this process; later tests start their own
        assert bench.main(["infer", "--data", str(shards), "--model", str(ckpt), "--volumes", "3", "--threads", "1"]) == 0
    finally:
        ray.shutdown()
    out = capsys.readouterr().out.splitlines()
    result = json.loads(next(line for line in out if line.startswith("{")))
    assert result["studies"] == 3 and result["segmented"] == 3  # 2 val volumes, then 1 train volume and result["precision"] in ("fp32", "bf16")
    assert 0 < result["forward_s_per_study"] <= result["predict_s_per_study"]
    fwd = result["forward_s_per_study"]  # rounded to 0.1 ms: the ratio from the rounded figures is close
    assert result["infer_over_forward"] == pytest.approx(result["infer_s_per_study"] / fwd, rel=0.01 + 1e-4 / fwd)
    assert result["infer_fixed_s"] > 0  # actor start etc.: the end-to-end time minus the actors' per-study seconds
    assert result["infer_s_per_study"] * 3 == pytest.approx(
        result["infer_actor_s_per_study"] * 3 / result["actors"] + result["infer_fixed_s"], abs=0.02)
    assert any("× forward (of which" in line for line in out)
