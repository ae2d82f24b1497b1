import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Two test processes (`pytest -n 2`) and the commands they start want more torch threads than the
# machine has cores. OpenMP's threads then spin at each barrier for one that was preempted: on a
# 2-core machine the fast tier took 204 s, and 106 s with waiting threads that sleep (2026-12-05).
# Only here: on a machine of its own a training step is 20 % slower that way. Set before torch loads.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from raysegment import disable_telemetry

disable_telemetry()

SHARED_ACDC = Path(__file__).resolve().parents[1].parent / "shared" / "acdc"


@pytest.fixture(scope="session", autouse=True)
def ray_session_folders():
    """The Ray instances tests start in their own process (``ray.init``, ``runtime.ensure_ray``) keep
    their session folders (logs, sockets; 8 per suite run) under a folder of this test process that
    goes at the end, instead of piling up in /tmp/ray run after run."""
    import os
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="rs-t-", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = path
    yield path
    if before is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = before
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_session():
    """The process's one tiny model (see ``tiny_model``), for module fixtures, which must not change it."""
    import torch

    from raysegment.config import ModelConfig, TrainConfig
    from raysegment.model.unet import build_model

    torch.manual_seed(0)
    config = TrainConfig(data="unused", model=ModelConfig(backbone="mobilenet_v2", decoder_width=8), image_size=64)
    return build_model(config.model).eval(), config


@pytest.fixture
def tiny_model(tiny_model_session):
    """(model in eval mode, TrainConfig): a small random MobileNetV2 U-Net on a 64² grid, built once
    per process; each test gets its own copy, so one that changes weights leaves the others alone."""
    import copy

    model, config = tiny_model_session
    return copy.deepcopy(model), config


def write_checkpoint(folder: Path, model, config, state: dict | None = None) -> Path:
    """A checkpoint folder (model.pt, config.json, state.json) of ``model``."""
    from raysegment.model.checkpoint import save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder, model, None, config, state if state is not None else {"epoch": 0})
    return folder


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model) -> Path:
    model, config = tiny_model
    return write_checkpoint(tmp_path / "ckpt", model, config)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Per test module: a token-auth Ray head, an MLflow server and a moto S3 on 127.0.0.1 (tests/servers.py)."""
    from servers import running_cluster

    with running_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture(scope="module")
def sample_shards(tmp_path_factory):
    from raysegment.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("shards") / "sample"
    prepare(PrepareConfig(source=Path(__file__).resolve().parents[1] / "raysegment" / "sample", out=out, progress=False))
    return out




def interrupt_when(cmd: list[str], env: dict, log: Path, ready, *, cwd=None, group: bool = False,
                   timeout_s: float = 300, sig=None) -> str:
    """Run ``cmd`` with its output in ``log``; once ``ready(text so far)`` holds, send it ``sig``
    (SIGINT unless given; with ``group``, to its whole process group, as a terminal's Ctrl-C does)
    → its output. Asserts it was still running then and ended with status 130, without Ray's
    report of the signal (its abort handler's "*** SIGTERM received … PC: @ …" lines)."""
    import signal
    import subprocess
    import time

    def default_sigint():
        # A test run started in the background by a shell without job control (`cmd &` in a script,
        # as a CI runner may) has SIGINT ignored, and an ignored signal stays ignored across exec:
        # the command would never see the Ctrl-C, unless Ray installs a handler of its own.
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=group,
                                preexec_fn=default_sigint)
        deadline = time.time() + timeout_s
        while not ready(log.read_text()) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, log.read_text()[-3000:]
        sig = sig or signal.SIGINT
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert " received at time=" not in text and "PC: @" not in text, text[-3000:]
    return text
