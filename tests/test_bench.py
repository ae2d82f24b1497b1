"""Benchmarks run (their numbers go in the README, never into assertions on speed)."""

import json

import pytest
from conftest import write_checkpoint
from synth import make_h5_dataset

from raysegment.cli import bench, gpu_smoke
from raysegment.config import ModelConfig, TrainConfig
from raysegment.data.prepare import PrepareConfig, prepare


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    src = make_h5_dataset(root / "src", patients=(1, 2, 3), val=(3,), shape=(3, 40, 48))
    prepare(PrepareConfig(source=src, out=root / "shards", progress=False))
    return root / "shards"


def test_bare_training_loop_runs_the_train_step(shards):
    config = TrainConfig(data=str(shards), model=ModelConfig(decoder_width=8), batch_size=2, image_size=64,
                         crop_size=64, precision="fp32", threads_per_worker=1)
    out = bench.bare_loop(config, steps=2, warmup=1)
    assert out["slices_per_s"] > 0 and out["device"] == "cpu" and "peak_mem_mib" not in out


def test_bare_only_bench_reads_a_bundle_without_ray(shards, tmp_path):
    """`bench train --bare-only` on a `diagnosis pack` bundle: a GPU machine with torch and no Ray."""
    import subprocess
    import sys

    from raysegment.data.dataset import all_volumes, save_bundle

    save_bundle(all_volumes(shards), tmp_path / "b.npz")
    config = TrainConfig(data=str(tmp_path / "b.npz"), image_size=64)
    images, labels = bench.bench_slices(config, 50)  # more than the 18 slices there: repeated
    assert images.shape == (50, 64, 64) and labels.shape == (50, 64, 64) and labels.max() > 0
    args = ["train", "--data", str(tmp_path / "b.npz"), "--bare-only", "--steps", "1", "--batch-size", "2",
            "--image-size", "64", "--crop-size", "64", "--threads", "1"]
    no_ray = ("import sys; sys.modules.update(ray=None, mlflow=None, optuna=None); "  # an import of them fails
              "from raysegment.cli import bench; sys.exit(bench.main(sys.argv[1:]))")
    run = subprocess.run([sys.executable, "-c", no_ray, *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("{")))
    assert result["bare_slices_per_s"] > 0 and "ray_slices_per_s" not in result
    with pytest.raises(SystemExit, match="--bare-only"):
        bench.main(["train", "--data", str(tmp_path / "b.npz"), "--steps", "1"])


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
    assert result["studies"] == 3 and result["segmented"] == 3  # 2 val volumes, then 1 train volume
    assert result["precision"] in ("fp32", "bf16")
    assert result["in_plane"] == "auto" and sum(result["auto_turns"].values()) == 3  # infer's default: once a study
    assert 0 < result["forward_s_per_study"] <= result["predict_s_per_study"]
    fwd = result["forward_s_per_study"]  # rounded to 0.1 ms: the ratio from the rounded figures is close
    assert result["infer_over_forward"] == pytest.approx(result["infer_s_per_study"] / fwd, rel=0.01 + 1e-4 / fwd)
    assert result["infer_fixed_s"] > 0  # actor start etc.: the end-to-end time minus the actors' per-study seconds
    assert result["infer_s_per_study"] * 3 == pytest.approx(
        result["infer_actor_s_per_study"] * 3 / result["actors"] + result["infer_fixed_s"], abs=0.02)
    assert any("× forward (of which" in line for line in out)


@pytest.mark.slow
def test_bench_poll_times_polls_of_settled_copies_that_segment_nothing(tmp_path, tiny_model, capsys):
    """`bench poll`: one real segmentation, then copies that the ledger settles (a poll of them that
    segmented anything would fail the bench), two polls timed; a missing --input is refused."""
    import ray
    from synth import make_nifti_patient

    for n in (1, 2):
        make_nifti_patient(tmp_path / "acdc", n, nframes=8)
    ckpt = write_checkpoint(tmp_path / "ckpt", *tiny_model)
    try:
        assert bench.main(["poll", "--input", str(tmp_path / "acdc"), "--model", str(ckpt), "--copies", "3",
                           "--exclude", "*_4d.nii.gz"]) == 0
    finally:
        ray.shutdown()
    out = capsys.readouterr().out.splitlines()
    result = json.loads(next(line for line in out if line.startswith("{")))
    assert result["studies_per_copy"] == 4 and result["studies"] == 12 and result["copies"] == 3
    assert result["input_files"] == 12  # per patient: Info.cfg, the 4-D file, two frames and their _gt files
    assert result["poll_s"] > 0 and result["first_poll_s"] > 0
    assert "12 settled studies in 36 files (3 copies of 12 files, 4 studies;" in out[-1]
    with pytest.raises(SystemExit):
        bench.main(["poll", "--input", str(tmp_path / "nowhere")])
    assert "--input" in capsys.readouterr().err


def test_bench_ledger_reads_a_ledger_of_cine_series_whole_then_refreshes_a_reader(capsys):
    assert bench.main(["ledger", "--series", "20", "--frames", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    result = json.loads(out[0])
    assert (result["series"], result["frames"]) == (20, 3) and result["read_whole_s"] >= 0 and result["refresh_s"] >= 0
    assert out[1].startswith("ledger of 20 cine series × 3 frames")
    with pytest.raises(SystemExit):
        bench.main(["ledger", "--series", "0"])


def test_gpu_smoke_dry_run_prints_every_step_without_a_gpu(tmp_path, capsys):
    assert bench.main(["gpu-smoke", "--dry-run", "--out", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
    assert len(lines) == 2 * 2 + 2 + 2  # 2 backbones × 2 batch sizes, train + resume, infer GPU + CPU
    for backbone in ("mobilenet_v2", "densenet121"):
        assert sum(f"--backbone {backbone}" in line and "--gpu" in line for line in lines) == 2
    train = [line for line in lines if "raysegment.train" in line]
    assert "--epochs 1" in train[0] and "--epochs 2" in train[1] and all("--name smoke --" in t for t in train)
    assert [("--gpu" in line) for line in lines if "raysegment.infer" in line] == [True, False]
    assert not (tmp_path / "gpu-smoke.json").exists()  # nothing ran


def test_mask_agreement_counts_equal_voxels_of_same_named_masks(tmp_path):
    import nibabel as nib
    import numpy as np

    for run, flip in (("a", 0), ("b", 10)):
        (tmp_path / run / "masks").mkdir(parents=True)
        m = np.zeros((10, 10, 2), np.uint8)
        m.flat[:flip] = 1
        nib.save(nib.Nifti1Image(m, np.eye(4)), str(tmp_path / run / "masks" / "s_seg.nii.gz"))
    assert gpu_smoke.mask_agreement(tmp_path / "a", tmp_path / "b") == pytest.approx(190 / 200)
    with pytest.raises(ValueError, match="no masks"):
        gpu_smoke.mask_agreement(tmp_path / "empty", tmp_path / "b")


@pytest.mark.slow
def test_bench_train_and_data_commands_print_their_figures(shards, capsys):
    """``bench data`` and ``bench train`` (the Ray Train path beside the bare loop) run end to end on
    tiny shards and print their JSON lines; the figures themselves go to the docs, not into asserts."""
    import subprocess
    import sys

    import ray

    # As a user runs it: one JSON line and one sentence, none of Ray Data's per-plan INFO lines or notes,
    # nor Ray's notice of how to switch off the token authentication of the local Ray it starts.
    data = subprocess.run([sys.executable, "-m", "raysegment.bench", "data", "--data", str(shards), "--batch-size", "2",
                           "--image-size", "64", "--crop-size", "32"], capture_output=True, text=True, timeout=300)
    assert data.returncode == 0, data.stderr[-3000:]
    assert not any(s in data.stdout + data.stderr for s in ("streaming_executor", "Progress bars disabled",
                                                                   "Token authentication is enabled")), data.stderr
    assert json.loads(data.stdout.splitlines()[0])["pipeline_slices_per_s"] > 0
    try:
        assert bench.main(["train", "--data", str(shards), "--steps", "2", "--batch-size", "2", "--image-size", "64",
                           "--crop-size", "32", "--precision", "fp32", "--threads", "1", "--epochs", "5",
                           "--val-every", "4"]) == 0
    finally:
        ray.shutdown()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines and all(any(isinstance(v, (int, float)) and v > 0 for v in line.values()) for line in lines)
    train = next(line for line in lines if "ray_epochs" in line)
    # Epoch 1 skips validation (--val-every 4); 0 (nothing before it) and the last 3 do it.
    assert [e["validated"] for e in train["ray_epochs"][1:]] == [False, True, True, True]
    assert train["ratio_long_run"] > 0 and train["ratio_epoch"] > 0
