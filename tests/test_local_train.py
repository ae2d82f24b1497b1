"""Training without Ray (``python -m raysegment.train --local DEVICE``), as on a lent GPU machine that has
torch but no Ray: a ``diagnosis pack`` bundle records each volume's split, and the command trains on it
where Ray cannot be imported, writing the last epoch with its val Dice (fast)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from raysegment.analysis.metrics import dice_summary
from raysegment.cli import train as train_cli
from raysegment.data.dataset import all_volumes, load_bundle, load_volumes, pack_bundle, save_bundle
from raysegment.inference.evaluation import evaluate
from raysegment.model.weights import load_weights_file, saved_state

# Runs a module as `python -m` would, with what the lent GPU machine lacked unimportable (Ray, MLflow,
# Optuna, nibabel, highdicom).
WITHOUT_RAY = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("ray", "mlflow", "optuna", "nibabel", "highdicom"):
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__")
"""
TINY = ["--epochs", "2", "--image-size", "64", "--crop-size", "64", "--decoder-width", "8", "--precision", "fp32",
        "--threads", "1"]


@pytest.fixture(scope="module")
def bundle(sample_shards, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bundle") / "sample.npz"
    pack_bundle(sample_shards, path)
    return path


def keys(volumes):
    return [(v.patient, v.phase) for v in volumes]


def test_a_packed_bundle_reads_back_by_split_and_an_old_one_says_to_pack_again(sample_shards, bundle, tmp_path):
    for split in ("train", "val"):
        assert keys(load_volumes(bundle, split)) == keys(load_volumes(sample_shards, split))
    val = load_volumes(sample_shards, "val")
    one = val[0].patient
    assert keys(load_volumes(bundle, "val", patients=[one])) == [k for k in keys(val) if k[0] == one]
    assert sorted(keys(all_volumes(bundle))) == sorted(keys(all_volumes(sample_shards)))
    old = tmp_path / "old.npz"  # as bundles were packed before they recorded splits
    save_bundle(all_volumes(sample_shards), old)
    assert len(load_bundle(old)) == len(all_volumes(sample_shards))
    with pytest.raises(ValueError, match="pack it again"):
        load_volumes(old, "val")


def test_train_local_runs_where_ray_is_not_installed_and_writes_the_last_epoch_with_its_val_dice(bundle, tmp_path):
    script = tmp_path / "without_ray.py"
    script.write_text(WITHOUT_RAY)
    cmd = [sys.executable, str(script), "raysegment.cli.train", "--local", "cpu", "--data", str(bundle), *TINY,
           "--batch-size", "4", "--storage", str(tmp_path / "runs"), "--name", "local"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"done: local epochs 2 val dice rv ([\d.]+) myo ([\d.]+) lv ([\d.]+) mean ([\d.]+); weights (\S+)", line)
    assert m, line
    path = Path(m.group(5))
    assert path == tmp_path / "runs" / "local.safetensors"
    loaded = load_weights_file(path)
    assert (loaded.config.batch_size, loaded.config.image_size, loaded.config.data) == (4, 64, str(bundle.resolve()))
    history = saved_state(path)["history"]
    assert [h["epoch"] for h in history] == [0, 1] and history[-1]["validated_epoch"] == 1
    assert f"{history[-1]['dice_mean']:.3f}" == m.group(4)
    # The val Dice it reports is the val split's, as `report evaluate` scores the written (fp16) file.
    scored = dice_summary(evaluate(str(path), bundle, splits=("val",)))
    assert abs(scored["dice_mean"] - float(m.group(4))) <= 0.005


def test_train_local_refuses_with_one_line_what_it_cannot_do(bundle, tmp_path, capsys):
    runs = tmp_path / "runs"
    cases = [
        (["--data", str(bundle)], "a bundle trains only with --local"),
        (["--local", "cpu", "--data", str(bundle), "--workers", "2"], "no --workers above 1"),
        (["--local", "cpu", "--data", str(tmp_path / "none.npz")], "no such bundle"),
    ]
    (runs / "taken.safetensors").parent.mkdir(parents=True)
    (runs / "taken.safetensors").write_bytes(b"kept")
    cases.append((["--local", "cpu", "--data", str(bundle), "--storage", str(runs), "--name", "taken"],
                  "does not resume; give another --name"))
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            train_cli.main(args)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert (runs / "taken.safetensors").read_bytes() == b"kept"
