"""Two Ray nodes on one machine: a token-auth head and a second `ray start --address` node.

A 2-worker training job submitted with `ray job submit` must put one worker on each node, give
every train slice to exactly one worker, keep the replicas in sync, write its checkpoint to the
shared storage path, and read Ray Data blocks on both nodes. This is what makes the code free of
single-node assumptions (paths only the head sees, checkpoints on one node's disk).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile

import pytest
from servers import VENV_BIN, agent_port_args, free_ports, ray_env, stop_ray, wait_http
from synth import make_h5_dataset

pytestmark = pytest.mark.slow


def ray_cli(env, *args, check=True, timeout=300):
    r = subprocess.run([f"{VENV_BIN}/ray", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Head (1 CPU, resource node_head) + worker node (1 CPU, resource node_worker), token auth."""
    root = tmp_path_factory.mktemp("twonode")
    env = ray_env(root)
    # Every port distinct (two equal ones fail `ray start`): the head's two, then 4 agents per raylet.
    gcs, dash, *agents = free_ports(10)
    ray_tmp = tempfile.mkdtemp(prefix="rs2-", dir="/tmp")
    common = ["--num-cpus", "1", "--disable-usage-stats", "--temp-dir", ray_tmp]

    try:
        # Each raylet's agents need ports of their own: the second raylet on this host, and the head beside
        # another Ray on the machine (a developer's run) holding the defaults — an agent that cannot bind
        # leaves "No available agent to submit job".
        ray_cli(env, "start", "--head", "--port", str(gcs), "--dashboard-port", str(dash), "--dashboard-host", "127.0.0.1",
                "--include-dashboard", "true", "--resources", '{"node_head": 1}', *agent_port_args(agents[:4]), *common)
        ray_cli(env, "start", "--address", f"127.0.0.1:{gcs}", "--resources", '{"node_worker": 1}', *agent_port_args(agents[4:]), *common)
        wait_http(f"http://127.0.0.1:{dash}")
        yield {"env": env, "root": root, "address": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}"}
    finally:
        stop_ray(env, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_two_node_training_spreads_workers_and_data(two_nodes):
    env, root = two_nodes["env"], two_nodes["root"]
    from raysegment.data.prepare import PrepareConfig, prepare

    # 5 train patients x 2 phases x 3 slices = 30 slices in 4 files, so reads can spread.
    src = make_h5_dataset(root / "src", patients=(1, 2, 3, 4, 5, 6), val=(6,), shape=(3, 40, 48))
    shards = root / "shards"
    prepare(PrepareConfig(source=src, out=shards, rows_per_file=8, row_group_rows=4, progress=False))
    nodes = json.loads(ray_cli(env, "list", "nodes", "--address", two_nodes["address"], "--format", "json").stdout)
    alive = {n["node_id"] for n in nodes if n["state"] == "ALIVE"}
    assert len(alive) == 2, nodes

    audit, storage = root / "audit", root / "shared-storage"
    audit.mkdir()
    cmd = [f"{VENV_BIN}/ray", "job", "submit", "--address", two_nodes["address"], "--", f"{VENV_BIN}/python", "-m",
           "raysegment.train", "--backbone", "mobilenet_v2", "--data", str(shards), "--workers", "2",
           "--cpus-per-worker", "0.5", "--placement", "STRICT_SPREAD", "--epochs", "1", "--batch-size", "4",
           "--image-size", "64", "--crop-size", "64", "--decoder-width", "8", "--precision", "fp32", "--threads", "1",
           "--storage", str(storage), "--name", "twonode", "--audit-dir", str(audit)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=root)
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]
    assert "done: twonode epochs 1" in r.stdout

    ranks = [json.loads((audit / f"epoch0-rank{k}.json").read_text()) for k in (0, 1)]
    assert ranks[0]["node_id"] != ranks[1]["node_id"], "both workers ran on one node"
    assert {ranks[0]["node_id"], ranks[1]["node_id"]} == alive
    seen = ranks[0]["seen"] + ranks[1]["seen"]
    assert len(seen) == len(set(seen)) == 30  # 30 slices, 2 workers × batch 4: uneven shares, each slice once
    stored = sorted(seen, key=lambda k: (k.split("/")[0], k.split("/")[1], int(k.split("/")[2])))
    assert ranks[0]["seen"] != [k for k in stored if k in ranks[0]["seen"]]  # not patient by patient as stored
    assert ranks[0]["weights_sum"] == ranks[1]["weights_sum"]
    checkpoints = sorted((storage / "twonode").glob("checkpoint_*/model.pt"))
    assert checkpoints, "no checkpoint in the shared storage path"

    tasks = json.loads(ray_cli(env, "list", "tasks", "--address", two_nodes["address"], "--format", "json",
                               "--detail", "--limit", "10000").stdout)
    # Ray Data's read and resample tasks (names like ReadFilesParquetV2, MapBatches(resize_batch)).
    data_tasks = [t for t in tasks if (t["name"].startswith("Read") or "resize_batch" in t["name"]) and t.get("node_id")]
    read_nodes = {t["node_id"] for t in data_tasks}
    assert read_nodes == alive, f"Ray Data read tasks ran on {len(read_nodes)} node(s): " + \
        str(sorted({t['name'] for t in tasks}))
