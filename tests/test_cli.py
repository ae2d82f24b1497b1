"""The command names users type: every ``python -m raysegment.<command>`` of the README and the
``raysegment`` console script reach the same command lines."""

import importlib
import re
from pathlib import Path

import pytest

from raysegment.cli.main import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]


def test_every_documented_command_module_has_its_command_line():
    documented = set(re.findall(r"python -m (raysegment\.[a-z_]+)", (REPO / "README.md").read_text()))
    for page in (REPO / "docs").glob("*.md"):
        documented |= set(re.findall(r"python -m (raysegment\.[a-z_]+)", page.read_text()))
    assert {f"raysegment.{name}" for name in COMMANDS} >= documented - {"raysegment.segment"}, documented
    for name, (module, _) in COMMANDS.items():
        if name == "registry":  # a package: `python -m raysegment.registry` runs its __main__
            assert f"from {module} import main" in (REPO / "raysegment" / "registry" / "__main__.py").read_text()
            continue
        shim = importlib.import_module(f"raysegment.{name}")
        assert shim.main is importlib.import_module(module).main
        assert shim.build_parser().prog.split()[-1].endswith(name)


def test_the_console_script_dispatches_and_explains(capsys):
    assert main([]) == 0 and "commands:" in capsys.readouterr().out
    assert main(["no-such-command"]) == 2 and "unknown command" in capsys.readouterr().err
    from importlib import metadata

    from raysegment.config import VERSION

    assert main(["--version"]) == 0  # what a bug report quotes: ours and the stack's versions
    assert capsys.readouterr().out.startswith(f"raysegment {VERSION} (python ") and VERSION == metadata.version("raysegment")
    assert main(["-V"]) == 0 and f"torch {metadata.version('torch')}, " in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0 and "--backbone" in capsys.readouterr().out


def test_python_dash_m_raysegment_is_the_console_script():
    """``python -m raysegment`` said "No module named raysegment.__main__"."""
    import subprocess
    import sys

    listed = subprocess.run([sys.executable, "-m", "raysegment"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and all(f"  {name} " in listed.stdout for name in COMMANDS), listed
    wrong = subprocess.run([sys.executable, "-m", "raysegment", "trian"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "unknown command 'trian' (did you mean train?)" in wrong.stderr, wrong


def test_progress_line_reports_at_most_every_interval_and_always_the_end(capsys):
    from raysegment.cli.args import progress_line

    quiet = progress_line("m", every_s=3600)
    for k in range(1, 6):
        quiet(k, 5)
    assert capsys.readouterr().err.splitlines() == ["m: 5/5 volumes (0 s)"]
    chatty = progress_line("m", every_s=0)
    for k in range(1, 4):
        chatty(k, 3)
    assert [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()] == ["m: 1/3 volumes", "m: 2/3 volumes",
                                                                                     "m: 3/3 volumes"]


def test_an_interrupted_command_says_how_to_resume_and_exits_130(capsys, monkeypatch):
    """Ray Train ends the driver's wait with ``SystemExit(1)`` after Ctrl-C, Ray's SIGTERM handler
    raises ``SystemExit(15)``, Tune a ``KeyboardInterrupt``: each becomes one line and 130, printed
    after the driver has left Ray (so no worker's line follows it); a ``SystemExit`` with a message
    is ours, and Ray stays."""
    import sys
    import types

    from raysegment.cli import INTERRUPTED
    from raysegment.cli.args import run_until_interrupted

    said = []  # what happened, in order: Ray left, lines printed
    ray = types.SimpleNamespace(is_initialized=lambda: "left" not in said, shutdown=lambda: said.append("left"))
    monkeypatch.setitem(sys.modules, "ray", ray)  # this process's own Ray, if a test started one, stays up

    def raise_(exc):
        raise exc

    for exc in (SystemExit(1), SystemExit(15), KeyboardInterrupt()):
        said.clear()
        assert run_until_interrupted("run r", "/runs/r", raise_, exc) == INTERRUPTED == 130
        said.append(capsys.readouterr().err)
        assert said == ["left", "interrupted: run r stopped; its checkpoints stay in /runs/r and the same command resumes it\n"]
    said.clear()
    with pytest.raises(SystemExit, match="error: no such file"):
        run_until_interrupted("run r", "/runs/r", raise_, SystemExit("error: no such file"))
    assert run_until_interrupted("run r", "/runs/r", lambda x: x + 1, 1) == 2
    assert said == []


def test_any_command_stopped_by_ctrl_c_ends_with_one_line_and_130(capsys, monkeypatch):
    """``cli.run``, which every ``python -m raysegment.X`` and the console script go through."""
    from raysegment.cli import run
    from raysegment.cli.main import main as console

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run(interrupted, ["x"]) == 130
    assert capsys.readouterr().err == "interrupted: stopped before it finished\n"
    assert run(lambda argv: len(argv), ["a", "b"]) == 2
    with pytest.raises(ValueError):  # other errors are not swallowed
        run(lambda argv: int("x"))
    monkeypatch.setattr("raysegment.cli.weights.main", interrupted)
    assert console(["weights", "verify"]) == 130


def test_sigterm_ends_a_command_as_ctrl_c_does_and_the_caller_keeps_its_handler():
    """A scheduler's stop (SIGTERM) killed a command outright: ``prepare`` left its temporary folder
    of shards beside ``--out``. Through ``cli.run`` it is Ctrl-C: the command's own clean-up, one
    line, exit 130 (commands that start Ray get Ray's handler, tested with them)."""
    import signal
    import subprocess
    import sys

    code = ("import time; from raysegment.cli import run\n"
            "def main(argv):\n    print('up', flush=True); time.sleep(60)\n"
            "raise SystemExit(run(main))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 130
    assert proc.stderr.read() == "interrupted: stopped before it finished\n"
    before = signal.getsignal(signal.SIGTERM)
    from raysegment.cli import run

    run(lambda argv: 0)
    assert signal.getsignal(signal.SIGTERM) is before  # restored: a caller's (pytest's) own is kept


def test_every_commands_help_says_what_it_does_and_its_examples_parse(capsys):
    """``--help`` is for users: a description without the module docstring's notes for developers,
    and examples that are valid command lines of that command."""
    import shlex

    for name, (module, _) in COMMANDS.items():
        parser = importlib.import_module(module).build_parser()
        text = parser.format_help()
        assert "Top layer" not in text and "``" not in text and "examples:" in text, name
        examples = [line.strip() for line in parser.epilog.splitlines()[1:]]
        ours = [shlex.split(e.split(" -- ", 1)[-1]) for e in examples if f"python -m raysegment.{name} " in e]
        assert ours, name
        for argv in ours:
            assert argv[:3] == ["python", "-m", f"raysegment.{name}"]
            parser.parse_args(argv[3:])  # an invalid example exits 2 here
        # A bad command line: the short usage and the error, not argparse's whole usage (~30 lines for train).
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["--no-such-option"])
        err = capsys.readouterr().err.splitlines()
        assert exit_.value.code == 2 and len(err) == 2 and err[0].startswith("usage: ") and "error: " in err[1], (name, err)



def test_help_gives_every_options_default_and_what_each_main_option_does():
    """A user reads the learning rate, batch size and epochs a run will take from ``--help``, as the
    configs give them, and every option of the five main commands says what it is."""
    from raysegment.cli import train, tune
    from raysegment.config import TrainConfig

    parser = train.build_parser()
    text = " ".join(parser.format_help().split())
    cfg = TrainConfig(data="shards")
    helps = {a.dest: a.help for a in parser._actions}
    for dest in ("lr", "batch_size", "epochs"):
        assert helps[dest].endswith(f"(default: {getattr(cfg, dest)})") and helps[dest] in text, dest
    assert "--gpu one GPU per worker --gpus" in text  # a switch: no default shown
    assert "--scale LO HI augmentation: zoom factor range (default: 0.85 1.2)" in text
    parser = tune.build_parser()
    assert parser.format_help() == parser.format_help()  # shown once, however often it is formatted
    assert "(default: )" not in parser.format_help()  # --set's empty list
    for name in ("prepare", "train", "tune", "infer", "serve"):
        module = importlib.import_module(COMMANDS[name][0])
        bare = [a.option_strings[0] for a in module.build_parser()._actions
                if a.option_strings and not a.help and a.dest != "help" and not a.choices]
        assert not bare, (name, bare)


@pytest.mark.parametrize("command", ["infer", "serve", "report-diagnosis", "tune", "registry"])
def test_a_registry_that_does_not_answer_is_one_line_and_exit_1_at_once(command, tmp_path, capsys, monkeypatch):
    """A ``models:/`` model, or a search or registration, on a tracking server that is down: an
    environment fault a scheduler retries (exit 1), said as such, before any work. MLflow's client
    retried for about 4 minutes, then said the model was not in the registry (exit 2, bad input) or
    printed a traceback."""
    from raysegment.runtime import free_port

    port = free_port()  # nothing listens on it: refused
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    model = ["--model", "models:/raysegment-mobilenet_v2@champion", "--mlflow-uri", f"http://127.0.0.1:{port}"]
    argv = {"infer": [*model, "--input", str(tmp_path), "--output", str(tmp_path / "out")], "serve": model,
            # a registry reference that is not --model: the diagnosis model scored on shipped masks
            "report-diagnosis": ["clinical", "--model", "shipped:mobilenet_v2", "--diagnosis",
                                 "models:/raysegment-diagnosis@champion", *model[2:], "--out", str(tmp_path / "out"),
                                 "--data", str(REPO / "raysegment" / "sample")],
            "tune": model[2:] + ["--storage", str(tmp_path / "out")],
            "registry": ["import", str(REPO / "raysegment" / "shipped" / "mobilenet_v2.safetensors"), *model[2:]]}[command]
    if command.startswith("report"):  # it checks --data first: shards
        from raysegment.data.prepare import PrepareConfig, prepare

        prepare(PrepareConfig(source=REPO / "raysegment" / "sample", out=tmp_path / "shards", progress=False))
        argv[-1] = str(tmp_path / "shards")
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(COMMANDS[command.split("-")[0]][0]).main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: the MLflow registry at http://127.0.0.1:{port} does not answer ([Errno 111] Connection "
                   "refused); nothing was done, the same command tries again"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("uri", ["./mlruns", "file:///srv/old/mlruns"])
def test_a_file_store_is_one_line_and_exit_2_before_ray(uri, tmp_path, capsys, monkeypatch):
    """An MLflow 2 user's ``./mlruns``: MLflow 3 refuses a file store, and ``tune`` met that after Ray
    had started, with a 40-line traceback. Now one line naming a database to use; MLflow's own
    opt-out (``MLFLOW_ALLOW_FILE_STORE``) still lets one through."""
    from raysegment.cli.args import check_not_file_store
    from raysegment.cli.tune import main as tune_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(SystemExit) as exc:
        tune_main(["--mlflow-uri", uri, "--storage", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --mlflow-uri {uri} is a file store") and "sqlite:///" in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlruns").exists()
    for fine in ("sqlite:///x.db", "http://mlflow:5000", "databricks", "postgresql://h/db", "databricks-uc", ""):
        check_not_file_store(fine)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_not_file_store(uri)


def test_a_storage_uri_that_cannot_be_read_is_one_line_before_ray(tmp_path, capsys):
    """A ``--storage`` URI pyarrow cannot open: one ``error:`` line with its reason, exit 2, before Ray
    and before ``--data`` is looked at (it was a pyarrow traceback from the resume check). With an
    object store that is down the same line took 6–10 s, pyarrow's retries; too slow for this tier:
    ``train --storage s3://nosuchbucket-rs/runs`` without network said ``cannot be read (When resolving
    region for bucket 'nosuchbucket-rs': AWS Error NETWORK_CONNECTION …)``."""
    from raysegment.cli import train

    with pytest.raises(SystemExit) as exc:
        train.main(["--data", str(tmp_path / "none"), "--storage", "foo://bucket/runs", "--name", "r"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "python -m raysegment.train: error: --storage foo://bucket/runs: cannot be read (Unrecognized filesystem type "
        "in URI: foo://bucket/runs)")


def test_a_ray_cluster_that_does_not_answer_is_one_line_and_exit_1(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """``train --address HOST:PORT`` (or RAY_ADDRESS, as ``infer`` under a scheduler has it) naming a
    cluster that is down: one line, exit 1, in seconds. ``ray.init`` retried for minutes with a
    warning every 30 s, and the command ended in ``interrupted: run … stopped`` when killed."""
    from synth import make_nifti_patient

    from raysegment.cli import infer, train
    from raysegment.runtime import free_port

    port = free_port()  # nothing listens on it: refused
    says = f"error: the Ray cluster at 127.0.0.1:{port} does not answer ([Errno 111] Connection refused); "
    with pytest.raises(SystemExit) as exc:
        train.main(["--data", str(tmp_path / "shards"), "--address", f"127.0.0.1:{port}", "--storage", str(tmp_path)])
    # (before --data is looked at: these shards are not there)
    assert exc.value.code == 1 and capsys.readouterr().err.strip() == says + "nothing was started"
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    make_nifti_patient(tmp_path / "in", 1)
    assert infer.main(["--model", str(tiny_checkpoint), "--input", str(tmp_path / "in"), "--output",
                       str(tmp_path / "out"), "--diagnosis", "none"]) == 1
    assert capsys.readouterr().err.strip() == says + "nothing was segmented, the next run tries again"
    from raysegment.cli import bench

    for what in ("train", "infer"):  # before minutes of in-process timing (a traceback after them)
        assert bench.main([what, "--data", str(tmp_path / "shards")]) == 1
        assert capsys.readouterr().err.strip() == says + "nothing was measured"


def test_the_registry_check_of_a_local_store_does_not_load_mlflow():
    """``tune`` checks its registry before ``quiet_environment`` sets MLflow's log level: importing
    MLflow there brought back its INFO lines (``Creating initial MLflow database tables…``) as the
    first lines of the README's main job."""
    import subprocess
    import sys

    code = ("import sys; from raysegment.cli.args import check_registry_answers; "
            "check_registry_answers('sqlite:///x.db'); check_registry_answers(None); print('mlflow' in sys.modules)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_every_command_switches_off_rays_abort_on_sigterm_before_it_imports_ray():
    """Ray reads ``RAY_DISABLE_FAILURE_SIGNAL_HANDLER`` when it is imported; set later (``train``
    imports Ray with its own module), its handler still printed six lines on SIGTERM and aborted the
    driver 3 s in (exit 134). The slow train and batch tests send the signal itself."""
    import os
    import subprocess
    import sys

    code = """
import importlib.abc, os, sys
seen = []
class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "ray":
            seen.append(os.environ.get("RAY_DISABLE_FAILURE_SIGNAL_HANDLER"))
sys.meta_path.insert(0, Spy())
import raysegment.train, raysegment.tune, raysegment.infer, raysegment.serve, raysegment.bench
print(set(seen) <= {"1"}, os.environ.get("RAY_DISABLE_FAILURE_SIGNAL_HANDLER"))
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    # set by the time a command's module is loaded (Ray, if imported then, saw it), so before its main runs
    assert out.stdout.strip() == "True 1", out.stdout + out.stderr[-2000:]


def test_a_run_that_fills_its_disk_ends_in_one_line_and_leaves_only_saved_checkpoints(tmp_path):
    """A Ray Train run whose checkpoint upload meets a full disk (seen on a 50 MB tmpfs: 115 lines
    of tracebacks ending in ``WorkerGroupError``'s own, and the failed uploads' folders left holding
    the space): one line that says so and how to go on, the unfinished folders removed, the saved
    ones kept; another worker failure is one line after the workers' tracebacks; a driver's own
    error keeps its traceback (None)."""
    import errno
    import json

    from ray.train import WorkerGroupError

    from raysegment.cli.train import failed_line
    from raysegment.training.train import RunSpec

    run = tmp_path / "runs" / "r"
    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_c"):
        (run / name).mkdir(parents=True)
        (run / name / "model.pt").write_bytes(b"x" * 10)
    saved = {"checkpoint_dir_name": "checkpoint_a", "metrics": {"epoch": 4}}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"checkpoint_results": [saved], "latest_checkpoint_result": saved}))
    spec = RunSpec(storage_path=str(tmp_path / "runs"), name="r")
    full = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert failed_line(spec, WorkerGroupError("…", {0: full})) == (
        f"error: run r stopped: its storage {run} is full (No space left on device; epoch 5 is its last saved one; "
        "2 unfinished checkpoint folders removed); free space there and the same command resumes it")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_a", "checkpoint_manager_snapshot.json"]
    bug = WorkerGroupError("…", {1: ValueError("Traceback …\nValueError: bad shape"), 0: KeyError("x")})
    assert failed_line(spec, bug) == ("error: run r failed in its workers after 2 restarts ('x'; their tracebacks are "
                                      "above); epoch 5 is its last saved one")
    assert failed_line(spec, RuntimeError("the driver's own")) is None
    assert (run / "checkpoint_a" / "model.pt").exists()
    # A search: Tune's last error may be a later one (a state file it wrote truncated), raised
    # during the full disk's; each trial's run loses its unfinished folders.
    from raysegment.cli.args import disk_full
    from raysegment.cli.tune import _full_disk_line
    from raysegment.config import TrainConfig
    from raysegment.training.tune import TuneSpec

    trial = tmp_path / "runs" / "s" / "train" / "s-trial-1"
    (trial / "checkpoint_x").mkdir(parents=True)
    (trial / "checkpoint_manager_snapshot.json").write_text('{"checkpoint_res')  # cut short: Ray cannot resume it
    try:
        try:
            raise full
        except OSError:
            raise EOFError("Ran out of input")  # noqa: B904 (as Tune raises it)
    except EOFError as exc:
        why = disk_full(exc, str(tmp_path / "runs" / "s"))
    search = TuneSpec(base=TrainConfig(data="x"), run=RunSpec(storage_path=str(tmp_path / "runs"), name="s"))
    assert _full_disk_line(search, why) == (
        f"error: search s stopped: its storage {tmp_path / 'runs' / 's'} is full (No space left on device; 1 "
        "unfinished checkpoint folder removed); free space there and run the same command again")
    assert not (trial / "checkpoint_x").exists() and not (trial / "checkpoint_manager_snapshot.json").exists()
    # the record as the full disk first left it, in the tune run of this session: 0 bytes
    (trial / "checkpoint_y").mkdir()
    (trial / "checkpoint_manager_snapshot.json").write_text("")
    assert "1 unfinished checkpoint folder removed" in _full_disk_line(search, why)
    assert not (trial / "checkpoint_y").exists() and not (trial / "checkpoint_manager_snapshot.json").exists()
    assert disk_full(EOFError("Ran out of input"), str(tmp_path)) is None  # a disk with room: not its fault


def test_data_that_is_an_acdc_dataset_gets_the_prepare_command_that_makes_its_shards(tmp_path, capsys):
    """``train --data ../shared/acdc`` (the dataset, not its shards) said only "make them with python
    -m raysegment.prepare"; now the command, with the layout it found."""
    from synth import make_h5_dataset, make_nifti_dataset

    from raysegment.cli.train import main as train

    nifti = make_nifti_dataset(tmp_path / "nifti", n=1)
    h5 = make_h5_dataset(tmp_path / "h5", patients=(1, 2), val=(2,), shape=(3, 40, 48))
    (tmp_path / "empty").mkdir()
    for data, layout in ((nifti, "acdc-nifti"), (h5, "ssl4mis-h5"), (tmp_path / "empty", None)):
        with pytest.raises(SystemExit) as exit_:
            train(["--data", str(data)])
        said = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_.value.code == 2 and said.startswith(f"python -m raysegment.train: error: --data {data}: no shards there")
        if layout:
            assert f"ACDC dataset, {layout} layout: make shards of it with python -m raysegment.prepare --source {data} " \
                   "--out SHARDS, then give --data SHARDS)" in said, said
        else:
            assert said.endswith("(no manifest.json; make them with python -m raysegment.prepare)"), said
    # The release's root (training/ and testing/): the command names training/, which prepare takes.
    import shutil

    shutil.copytree(nifti / "training" / "patient001", nifti / "testing" / "patient101")
    with pytest.raises(SystemExit):
        train(["--data", str(nifti)])
    assert f"prepare --source {nifti / 'training'} --out SHARDS" in capsys.readouterr().err


def test_imagenet_weights_are_checked_before_ray_and_a_search_trains_from_them(tmp_path, capsys, monkeypatch,
                                                                               sample_shards):
    """``--weights imagenet`` (``train`` and, new, ``tune``): a hub cache without the file is one line
    naming it and its URL, exit 2, before Ray (each worker failed and restarted first, 63 lines of
    tracebacks in 35 s); beside ``--init-weights`` it is refused. With the file there, the search's
    configuration carries it, and the run it starts builds its encoder from that file."""
    import torch
    import torchvision

    from raysegment.cli import train, tune
    from raysegment.model.unet import imagenet_file
    from raysegment.training.train import restore_run

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path, url = imagenet_file("mobilenet_v2")
    for command, args in ((train, ["--data", str(sample_shards)]), (tune, [])):
        with pytest.raises(SystemExit) as exc:
            command.main([*args, "--backbone", "mobilenet_v2", "--weights", "imagenet", "--storage", str(tmp_path / "r")])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"error: --weights imagenet: {path} is missing on this machine; download {url} there" in err
    with pytest.raises(SystemExit):
        tune.main(["--weights", "imagenet", "--init-weights", "shipped", "--storage", str(tmp_path / "r")])
    assert "both set the initial weights: give one" in capsys.readouterr().err

    torch.manual_seed(1)
    imagenet = torchvision.models.mobilenet_v2(weights=None).state_dict()  # stands in for the download
    path.parent.mkdir(parents=True)
    torch.save(imagenet, path)
    started = {}
    monkeypatch.setattr(tune, "check_registry_answers", lambda uri: None)
    monkeypatch.setattr(tune, "run_until_interrupted", lambda what, where, fn, address, spec: started.setdefault("spec", spec) and 0)
    assert tune.main(["--weights", "imagenet", "--data", str(sample_shards), "--storage", str(tmp_path / "r")]) == 0
    config = started["spec"].base
    assert config.weights == "imagenet"
    run = restore_run(config, None, prepare=lambda m: m, device=torch.device("cpu"))
    first = dict(run.model.named_parameters())["encoder.stages.0.0.0.weight"]
    torch.testing.assert_close(first, imagenet["features.0.0.weight"].sum(1, keepdim=True))


@pytest.mark.parametrize("args, says", [
    (["--ce-weight", "0", "--dice-weight", "0"], "--ce-weight and --dice-weight are both 0"),
    (["--class-weights", "0", "0", "0"], "--class-weights RV MYO LV must be ≥ 0 with a positive sum, got 0.0 0.0 0.0"),
    (["--class-weights", "-1", "1", "1"], "with a positive sum, got -1.0 1.0 1.0"),
    (["--scale", "0", "1.2"], "--scale LO HI needs 0 < LO ≤ HI (zoom factors), got 0.0 1.2"),
    (["--flip-prob", "2"], "--flip-prob is a probability, 0 to 1, got 2.0"),
    (["--rotation-deg", "400"], "--rotation-deg is the largest angle either way, 0 to 180 degrees, got 400.0"),
])
def test_a_recipe_no_run_can_use_is_one_line_before_ray(args, says, tmp_path, capsys):
    """A zero loss crashed every worker after Ray started; all-zero class weights trained on NaN."""
    from raysegment.cli import train

    with pytest.raises(SystemExit) as exc:
        train.main(["--data", str(tmp_path / "none"), "--storage", str(tmp_path / "r"), *args])
    assert exc.value.code == 2 and says in capsys.readouterr().err.strip().splitlines()[-1]
