"""The online service as an operator runs it: ``python -m raysegment.serve`` (its own Ray, Ray Serve)
over a champion in a real SQLite MLflow registry, with a real Orthanc that pushes stable series to
it through the shipped Lua script (``jobs/orthanc/raysegment-push.lua``).

The tests share one service and run in file order: requests, the PACS push, then the alias move
and a replica kill (they change what is served).
"""

from __future__ import annotations

import gzip
import json
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from servers import free_port, orthanc_available, running_orthanc, running_service
from synth import synthetic_volume, write_dicom_cine

pytestmark = pytest.mark.slow
TOKEN = "s3cret-test-token"
NAME = "raysegment-mobilenet_v2"
LUA = Path(__file__).resolve().parents[1] / "jobs" / "orthanc" / "raysegment-push.lua"
STACK_SETTLE_S = 8.0  # the service's --stack-settle here (Orthanc's StableAge is 2 s)


def _register(tiny_model, root: Path, uri: str, seed: int) -> str:
    import torch

    from raysegment.model.checkpoint import save_checkpoint
    from raysegment.model.unet import build_model
    from raysegment.registry.champion import register_checkpoint

    _, config = tiny_model
    torch.manual_seed(seed)
    folder = root / f"ckpt{seed}"
    folder.mkdir(parents=True)
    save_checkpoint(folder, build_model(config.model).eval(), None, config, {"epoch": 0})
    metrics = {"dice_rv": 0.5, "dice_myo": 0.5, "dice_lv": 0.5, "dice_mean": 0.5}
    return register_checkpoint(folder, metrics=metrics, tracking_uri=uri, force_champion=True).version


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_session):
    """(service URL, Orthanc DICOMweb URL, tracking URI, output folder, root) of one running stack."""
    from mlflow import MlflowClient

    if not orthanc_available():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt install orthanc orthanc-dicomweb)")
    root = tmp_path_factory.mktemp("service")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("raysegment-registry", artifact_location=str(root / "artifacts"))
    assert _register(tiny_model_session, root, uri, seed=1) == "1"
    (root / "token").write_text(TOKEN + "\n")
    port = free_port()
    lua = root / "push.lua"
    lua.write_text(LUA.read_text().replace('"http://127.0.0.1:8000"', f'"http://127.0.0.1:{port}"')
                   .replace('local TOKEN = ""', f'local TOKEN = "{TOKEN}"'))
    with running_orthanc(root / "orthanc", {"LuaScripts": [str(lua)], "StableAge": 2}) as pacs:
        out = root / "out"
        with running_service(root / "svc", "--model", f"models:/{NAME}@champion", "--mlflow-uri", uri, "--poll-s", "1",
                             "--token-file", str(root / "token"), "--pacs", pacs, "--output", str(out),
                             "--stack-settle", str(STACK_SETTLE_S),
                             "--threads", "1", "--max-body-mb", "1", port=port) as url:
            yield url, pacs, uri, out, root
    # Stopped (SIGTERM, as Ctrl-C): our line last; the raylet's note that the Serve controller's
    # graceful_shutdown "failed" followed it on every stop until 2026-12-07.
    lines = (root / "svc" / "serve.log").read_text().splitlines()
    assert lines[-1] == "[raysegment] stopping the service", lines[-5:]


def _post(url: str, body: bytes, params: str = "", token: str = TOKEN, ctype: str = "application/octet-stream",
          timeout: float = 120) -> requests.Response:
    return requests.post(f"{url}/v1/segment{params}", data=body, timeout=timeout,
                         headers={"Authorization": f"Bearer {token}", "Content-Type": ctype})


def _nifti(data: np.ndarray, zooms=(1.5, 1.5, 8.0)) -> bytes:
    img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    img.header.set_zooms((zooms + (1.0,) * data.ndim)[: data.ndim])
    return gzip.compress(img.to_bytes(), mtime=0)


def _study(seed: int = 3) -> np.ndarray:
    """(x, y, z) float32 of a synthetic short-axis stack."""
    image, _ = synthetic_volume(seed, shape=(6, 64, 72))
    return np.transpose(image * 900.0, (2, 1, 0)).astype(np.float32)


def test_bad_requests_get_a_4xx_with_a_reason_and_the_service_keeps_serving(stack):
    url, *_ = stack
    good = _nifti(_study())
    nan = _study()
    nan[3, 3, 1] = np.nan
    bad = {
        "not NIfTI": (_post(url, b"this is no image at all" * 20), 400),
        "empty body": (_post(url, b""), 400),
        "2-D image": (_post(url, _nifti(_study()[:, :, 0])), 400),
        "5-D image": (_post(url, _nifti(_study()[..., None, None])), 400),
        "NaN voxels": (_post(url, _nifti(nan)), 400),
        "truncated gzip": (_post(url, good[: len(good) // 2]), 400),
        "over the size limit": (_post(url, b"\0" * (2 * 1024 * 1024)), 413),  # the service takes ≤ 1 MiB here
        "wrong content type": (_post(url, good, ctype="application/json"), 415),
        "unknown model": (_post(url, good, params="?model=raysegment-densenet121"), 404),
        "unknown format": (_post(url, good, params="?format=png"), 400),
        "no token": (_post(url, good, token="wrong"), 401),
        "GET on segment": (requests.get(f"{url}/v1/segment", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30), 405),
        "no such route": (requests.get(f"{url}/", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30), 404),
        "ES frame out of range": (_post(url, _nifti(np.stack([_study(), _study(4)], -1)), params="?format=json&ed=0&es=5"), 400),
        "ED and ES the same frame": (_post(url, good, params="?format=json&ed=1&es=1"), 400),
        "height not a number": (_post(url, good, params="?format=json&height_cm=tall"), 400),
        "height in metres": (_post(url, good, params="?format=json&height_cm=1.8&weight_kg=80"), 400),
    }
    for kind, (response, status) in bad.items():
        assert response.status_code == status, (kind, response.status_code, response.text)
        reason = response.json()["error"]
        assert reason and "\n" not in reason and "/tmp/" not in reason, (kind, reason)
    assert bad["no such route"][0].json()["error"].startswith("no route /; routes: /v1/health, ")
    assert bad["height in metres"][0].json()["error"] == "height_cm must be a number from 100 to 250 (cm), not '1.8'"
    ok = _post(url, good)
    assert ok.status_code == 200 and ok.headers["X-Model-Version"] == f"{NAME}/1"
    assert requests.get(f"{url}/v1/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()["status"] == "ok"


def test_the_service_mask_is_byte_for_byte_raysegment_segment(stack, tmp_path):
    import raysegment

    url, _, uri, _, _ = stack
    data = np.stack([_study(3), _study(5)], -1)  # 4-D: two cine frames
    body = _nifti(data)
    answer = _post(url, body)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/gzip"
    (tmp_path / "in.nii.gz").write_bytes(body)
    local = raysegment.segment(tmp_path / "in.nii.gz", model=f"models:/{NAME}/1", tracking_uri=uri)
    nib.save(local, tmp_path / "local.nii.gz")
    assert answer.content == (tmp_path / "local.nii.gz").read_bytes()
    served = nib.Nifti1Image.from_bytes(gzip.decompress(answer.content))
    assert served.shape == data.shape and np.allclose(served.affine, np.diag([1.5, 1.5, 8.0, 1.0]))

    summary = _post(url, body, params="?format=json&ed=0&es=1").json()
    assert answer.headers["X-In-Plane"] == summary["in_plane"] in ("as-stored", "rows-reversed")  # auto's choice
    assert summary["model_version"] == f"{NAME}/1" and len(summary["frames"]) == 2 and (summary["ed"], summary["es"]) == (0, 1)
    counts = np.asarray(local.dataobj)[..., 0]
    assert summary["frames"][0]["voxels_lv"] == int((counts == 3).sum())
    assert {"ef_lv_pct", "ef_rv_pct", "spacing_mm"} <= set(summary)
    # the batch job's indices and diagnosis (the shipped classifier, the service's default)
    assert summary["patient"]["lv_edv_ml"] == pytest.approx(summary["frames"][0]["volume_lv_ml"], abs=1e-3)
    assert ("diagnosis" in summary) != ("diagnosis_withheld" in summary), summary
    sized = _post(url, body, params="?format=json&ed=0&es=1&height_cm=180&weight_kg=80").json()
    assert sized["patient"]["bsa_m2"] == 2.0 and "no_height_weight" in summary["patient_qc_flags"]
    info = requests.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    assert info["version"] == f"{NAME}/1" and info["dice"]["mean"] == 0.5 and len(info["weights_sha256"]) == 64
    assert info["diagnosis"] == {"model": "shipped", "cv_accuracy": 0.92, "bsa_m2": 1.8708}


def test_a_stable_series_in_orthanc_gets_its_segs_without_cron_and_the_job_then_stores_nothing(stack, tmp_path):
    import pydicom

    from raysegment.config import InferConfig
    from raysegment.inference.batch import run_batch
    from raysegment.inference.predictor import Predictor
    from raysegment.inference.study import segment_series
    from raysegment.io import dicomweb
    from raysegment.io.dicom import find_series

    url, pacs, uri, out, _ = stack
    frames = np.stack([synthetic_volume(7, shape=(6, 48, 56))[0], synthetic_volume(8, shape=(6, 48, 56), lv_radius=5.0)[0]])
    files = write_dicom_cine(tmp_path / "src", frames, patient="PUSH1")
    (series,), _ = find_series(tmp_path / "src")
    predictor = Predictor.load(f"models:/{NAME}/1", tracking_uri=uri)
    t0 = time.perf_counter()
    segment_series(f"dicom:{series.study_uid}/{series.uid}", series.files, predictor, "local", tmp_path / "local")
    in_process = time.perf_counter() - t0

    client = dicomweb.web_client(pacs)
    status_url = f"{url}/v1/pacs/series?study={series.study_uid}&series={series.uid}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    before = requests.get(status_url, headers=auth, timeout=30)
    assert before.status_code == 404 and "has no result of raysegment-mobilenet_v2/1" in before.json()["error"]
    assert requests.get(f"{url}/v1/pacs/series?study={series.study_uid}", headers=auth, timeout=30).status_code == 400
    client.store_instances([pydicom.dcmread(f) for f in files])
    stored_at, stable_age = time.perf_counter(), 2.0
    deadline = stored_at + 120
    # Two SEGs (one per frame) are stored one after the other: wait for both, not the first.
    segs = client.search_for_instances(search_filters={"Modality": "SEG"})
    while time.perf_counter() < deadline and len(segs) < 2:
        time.sleep(0.25)
        segs = client.search_for_instances(search_filters={"Modality": "SEG"})
    took = time.perf_counter() - stored_at
    assert len(segs) == 2, (out / "ledger.jsonl").read_text() if (out / "ledger.jsonl").exists() else "no ledger"
    # Orthanc checks stability about once a second: marked stable at most ~1 s after StableAge.
    assert took - stable_age - 1.0 <= 1.5 * in_process + 5.0, (took, in_process)
    # The service stores the SEGs first and writes its ledger row after (a crash in between only
    # re-stores the same UIDs next time), so the SEGs can be visible a moment before the row: a
    # viewer asks the service how the series stands until it is settled.
    status = requests.get(status_url, headers=auth, timeout=30)
    while time.perf_counter() < deadline and status.json().get("status") == "queued":
        time.sleep(0.1)
        status = requests.get(status_url, headers=auth, timeout=30)
    assert status.status_code == 200, status.text
    seg_series = {s["0020000E"]["Value"][0] for s in client.search_for_series(search_filters={"Modality": "SEG"})}
    assert status.json() | {"finished": None, "seconds": None} == {
        "series": f"dicom:{series.study_uid}/{series.uid}", "status": "done", "reason": "", "model_version": f"{NAME}/1",
        "finished": None, "seconds": None, "frames": 2, "segs_stored": 2, "seg_series_uid": seg_series.pop()}
    assert not any((out / "dicom-in").iterdir())  # the retrieved images are not kept
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert [(e["path"], e["status"]) for e in ledger] == [(f"dicom:{series.study_uid}/{series.uid}", "done")]

    summary = run_batch(InferConfig(models=(f"models:/{NAME}@champion",), input=pacs, output=str(out), tracking_uri=uri,
                                    diagnosis=None, progress=False))
    assert summary["already_done"] == 1 and summary["segmented"] == 0 and summary["actors"] == 0
    assert len(client.search_for_instances(search_filters={"Modality": "SEG"})) == 2
    assert len((out / "ledger.jsonl").read_text().splitlines()) == 1


def test_a_stack_pushed_slice_by_slice_is_segmented_once_whole_after_its_last_slice(stack, tmp_path):
    """A short-axis stack stored as a series per slice, its last slice arriving after the others had
    turned stable and been pushed: the service waits (``--stack-settle``; the slices' status stays
    ``queued``) and segments the whole stack once. Before, the first push segmented the three slices
    there were and stored their SEGs, and the last slice's push segmented the stack again."""
    import pydicom
    from test_dicom import _split_per_slice

    from raysegment.io import dicomweb

    url, pacs, _, out, _ = stack
    frames = np.stack([synthetic_volume(9, shape=(4, 48, 56))[0], synthetic_volume(10, shape=(4, 48, 56), lv_radius=5.0)[0]])
    files = write_dicom_cine(tmp_path / "src", frames, patient="PUSH2")
    members = _split_per_slice(files, 4)
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    by_slice = {m: [pydicom.dcmread(f) for f in files if str(pydicom.dcmread(f).SeriesInstanceUID) == m] for m in members}
    client, auth = dicomweb.web_client(pacs), {"Authorization": f"Bearer {TOKEN}"}
    segs_before = len(client.search_for_instances(search_filters={"Modality": "SEG"}))

    def status(series: str) -> requests.Response:
        return requests.get(f"{url}/v1/pacs/series?study={study}&series={series}", headers=auth, timeout=30)

    client.store_instances([ds for m in members[:3] for ds in by_slice[m]])
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline and status(members[0]).status_code == 404:  # until Orthanc pushed it
        time.sleep(0.25)
    time.sleep(2.0)  # by now the old service had segmented the three slices
    assert status(members[0]).json()["status"] == "queued"
    client.store_instances(by_slice[members[3]])
    deadline = time.perf_counter() + 90
    # every slice: the first settled job segments the stack, the others find it done a moment later
    while time.perf_counter() < deadline and any(status(m).json().get("status") in ("queued", None) for m in members):
        time.sleep(0.25)
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    mine = [e for e in ledger if e["path"].startswith(f"dicom:{study}/")]
    assert [(e["status"], len(e["members"]), len(e["rows"])) for e in mine] == [("done", 4, 2)], mine
    assert all(status(m).json()["series"] == mine[0]["path"] for m in members)
    assert len(client.search_for_instances(search_filters={"Modality": "SEG"})) == segs_before + 2


def _hammer(url: str, body: bytes, stop: threading.Event, results: list, timeout: float = 60) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            r = _post(url, body, timeout=timeout)
            results.append((r.status_code, r.headers.get("X-Model-Version"), time.perf_counter() - t0))
        except requests.RequestException as exc:
            results.append((type(exc).__name__, None, time.perf_counter() - t0))


def _served(results: list, version: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not any(v == f"{NAME}/{version}" for _, v, _ in results[-3:]):
        time.sleep(0.5)
    time.sleep(2)


def test_the_alias_moves_under_load_without_a_failed_request(stack, tiny_model, capsys):
    """A new champion registered, then rolled back by hand (``registry promote``), while two clients
    keep asking: every request answered, by v1, then v2, then v1 again."""
    from raysegment.cli import registry as registry_cli

    url, _, uri, _, root = stack
    body, stop, results = _nifti(_study()), threading.Event(), []
    clients = [threading.Thread(target=_hammer, args=(url, body, stop, results)) for _ in range(2)]
    for c in clients:
        c.start()
    try:
        time.sleep(3)
        assert _register(tiny_model, root, uri, seed=2) == "2"
        _served(results, "2")
        at_v2 = len(results)
        assert registry_cli.main(["promote", NAME, "1", "--reason", "v2 misbehaves", "--mlflow-uri", uri]) == 0
        assert capsys.readouterr().out.startswith(f"{NAME}@champion is v1 (by hand on ")
        _served(results, "1")
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=120)
    assert results and all(status == 200 for status, _, _ in results), [r for r in results if r[0] != 200][:5]
    versions = [v for _, v, _ in results]
    assert versions[0] == f"{NAME}/1" and f"{NAME}/2" in versions[:at_v2] and versions[-1] == f"{NAME}/1"


def test_a_killed_replica_fails_only_its_requests_and_serving_resumes_in_seconds(stack):
    url, *_ = stack
    body, stop, results = _nifti(_study()), threading.Event(), []
    client = threading.Thread(target=_hammer, args=(url, body, stop, results, 30))
    client.start()
    try:
        time.sleep(2)
        pid = int(subprocess.run(["pgrep", "-f", "ServeReplica:raysegment:segmenter"], capture_output=True,
                                 text=True).stdout.split()[0])
        subprocess.run(["kill", "-9", str(pid)], check=True)
        killed_at = len(results)
        deadline = time.time() + 60
        while time.time() < deadline and not any(s == 200 for s, _, _ in results[killed_at + 1:]):
            time.sleep(0.5)
    finally:
        stop.set()
        client.join(timeout=60)
    assert all(seconds < 30 + 5 for _, _, seconds in results), "a request hung past its timeout"
    assert any(s == 200 for s, _, _ in results[killed_at + 1:]), results[killed_at:]
    assert sum(s != 200 for s, _, _ in results) <= 2, results
    # the replica that replaced it removed the upload folder the killed one held mid-request
    assert not list(Path(tempfile.gettempdir()).glob(f"raysegment-serve-{pid}-*"))
