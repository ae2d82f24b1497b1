"""DICOM and PACS faults: a series that grows in a real Orthanc, a failed WADO-RS retrieval, an
unreachable PACS, and a folder of bad DICOM that fails once and is not retried."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from synth import synthetic_volume, write_dicom_cine

from raysegment.runtime import free_port


def _frames(slices: int) -> np.ndarray:
    shape = (slices, 40, 48)
    return np.stack([synthetic_volume(1, shape=shape)[0], synthetic_volume(2, shape=shape, lv_radius=5.0)[0]])


def _ledger(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]


def _scheduled_run(url: str, checkpoint: Path, out: Path) -> dict:
    """One scheduled run of ``checkpoint`` on the PACS at ``url`` (a local Ray of 2 CPUs) → its counts."""
    import ray

    from raysegment.config import InferConfig
    from raysegment.inference.batch import run_batch

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        return run_batch(InferConfig(models=(str(checkpoint),), input=url, output=str(out), threads=1, actors=1,
                                     progress=False, diagnosis=None))
    finally:
        ray.shutdown()


@pytest.fixture
def pacs_urls():
    """DICOMweb roots that fail three ways: refused (nothing listens), 503 (a PACS failing) and 404
    (a wrong path), the last two from a local HTTP server."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503 if self.path.startswith("/busy/") else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_port
    yield {"refused": f"http://127.0.0.1:{free_port()}/dicom-web", "busy": f"http://127.0.0.1:{port}/busy/dicom-web",
           "wrong": f"http://127.0.0.1:{port}/wrong/dicom-web"}
    server.shutdown()


def test_a_pacs_that_does_not_answer_is_exit_1_and_a_wrong_url_exit_2(tmp_path, tiny_checkpoint, capsys, pacs_urls):
    """The input PACS down (refused) or failing (503) is an environment fault the next run retries,
    exit 1 as a study's error row; a URL it answers 404 to is a wrong argument, exit 2. Both before
    Ray starts. (A PACS down was exit 2 with urllib3's whole nested message.)"""
    from raysegment.cli import infer

    for url, code, says in ((pacs_urls["refused"], 1, "the PACS does not answer ([Errno 111] Connection refused); "
                             "nothing was segmented, the next run tries again"),
                            (pacs_urls["busy"], 1, "the PACS does not answer (HTTP 503)"),
                            (pacs_urls["wrong"], 2, "DICOMweb query failed")):
        argv = ["--model", str(tiny_checkpoint), "--input", url, "--output", str(tmp_path / "out")]
        assert infer.main(argv) == code, url
        assert f"error: --input {url}: {says}" in capsys.readouterr().err


def test_a_service_with_a_pacs_that_does_not_answer_starts_nothing(tmp_path, tiny_checkpoint, capsys, pacs_urls):
    """``serve --pacs``: a PACS down or failing is exit 1 before Ray starts, a wrong path exit 2.
    (The service started, and each pushed series only logged its failure.)"""
    import ray

    from raysegment.cli import serve

    base = ["--model", str(tiny_checkpoint), "--port", str(free_port()), "--output", str(tmp_path / "out")]
    for key, says in (("refused", "[Errno 111] Connection refused"), ("busy", "HTTP 503")):
        assert serve.main([*base, "--pacs", pacs_urls[key]]) == 1
        assert (f"error: --pacs: the PACS at {pacs_urls[key]} does not answer ({says}); nothing was started, the "
                f"same command tries again") in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        serve.main([*base, "--pacs", pacs_urls["wrong"]])
    assert stop.value.code == 2
    assert f"--pacs {pacs_urls['wrong']}: not a DICOMweb root (QIDO-RS query failed" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bad_dicom_fails_once_and_the_next_run_adds_nothing_and_starts_no_ray(tmp_path, tiny_checkpoint):
    """A truncated instance fails its series once, with a one-line reason; a double export is one
    series; an empty .dcm gets its row; the unchanged folder's next run writes no ledger line and
    does not start Ray."""
    import shutil

    import ray

    from raysegment.config import InferConfig
    from raysegment.inference.batch import run_batch
    from raysegment.inference.ledger import Ledger, results_rows

    inp, out = tmp_path / "in", tmp_path / "out"
    bad = write_dicom_cine(inp / "truncated", _frames(3), patient="T1")
    bad[2].write_bytes(bad[2].read_bytes()[:-300])
    write_dicom_cine(inp / "export1", _frames(3), patient="D1")
    shutil.copytree(inp / "export1", inp / "export2")
    (inp / "empty.dcm").write_bytes(b"")
    config = InferConfig(models=(str(tiny_checkpoint),), input=str(inp), output=str(out), threads=1, actors=1,
                         progress=False, diagnosis=None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        first = run_batch(config)
    finally:
        ray.shutdown()
    assert first["studies"] == 2 and first["segmented"] == 1 and first["failed"] == 1 and first["errors"] == 0
    ledger = _ledger(out)
    failed = [e for e in ledger if e["status"] == "failed"]
    assert sorted(Path(e["path"]).name for e in failed if not e["path"].startswith("dicom:")) == ["empty.dcm"]
    (series_fail,) = [e for e in failed if e["path"].startswith("dicom:")]
    assert "pixel data unreadable" in series_fail["reason"] and "\n" not in series_fail["reason"]
    done = [r for r in results_rows(Ledger(out / "ledger.jsonl")) if r["status"] == "done"]
    assert [r["frame"] for r in done] == [0, 1] and len({r["seg"] for r in done}) == 2  # not 4 frames

    second = run_batch(config)  # Ray is down: a run that needs it would start it
    assert not ray.is_initialized()
    assert second["already_done"] == 2 and second["segmented"] == second["failed"] == 0
    assert len(_ledger(out)) == len(ledger)


@pytest.mark.slow
def test_a_series_that_grows_in_the_pacs_ends_with_the_segs_of_its_latest_content(tmp_path, tiny_checkpoint, capsys,
                                                                                   monkeypatch):
    """Slices 0–5 first, 6–8 later: the PACS ends with exactly one SEG per cine frame, each the
    latest run's (SOP Instance UID and 9 slices × 3 segments of frames), the stale ones removed.
    Then a WADO-RS retrieval that fails is an error line, exit code 1, and starts no Ray."""
    import highdicom as hd
    import pydicom
    import ray
    from servers import orthanc_available, running_orthanc

    from raysegment.cli import infer
    from raysegment.config import InferConfig
    from raysegment.inference.batch import run_batch
    from raysegment.inference.ledger import Ledger, results_rows
    from raysegment.io import dicomweb

    if not orthanc_available():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt install orthanc orthanc-dicomweb)")
    files = write_dicom_cine(tmp_path / "src", _frames(9), patient="G1")  # frame-major: t * 9 + z
    first_part = [f for i, f in enumerate(files) if i % 9 < 6]
    rest = [f for f in files if f not in first_part]
    out = tmp_path / "out"
    with running_orthanc(tmp_path / "orthanc") as url:
        client = dicomweb.web_client(url)
        client.store_instances([pydicom.dcmread(f) for f in first_part])
        config = InferConfig(models=(str(tiny_checkpoint),), input=url, output=str(out), threads=1, actors=1,
                             progress=False, diagnosis=None)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            assert run_batch(config)["segmented"] == 1
            client.store_instances([pydicom.dcmread(f) for f in rest])
            assert run_batch(config)["segmented"] == 1
        finally:
            ray.shutdown()
        latest = [r for r in results_rows(Ledger(out / "ledger.jsonl")) if r["status"] == "done"]
        assert len(latest) == 2 and all(r["stored"] for r in latest)
        local = {hd.seg.segread(r["seg"]).SOPInstanceUID: hd.seg.segread(r["seg"]) for r in latest}
        held = client.search_for_instances(search_filters={"Modality": "SEG"})
        assert len(held) == 2
        for item in held:
            sop = item["00080018"]["Value"][0]
            assert sop in local
            stored = client.retrieve_instance(study_instance_uid=local[sop].StudyInstanceUID,
                                              series_instance_uid=local[sop].SeriesInstanceUID, sop_instance_uid=sop)
            assert int(stored.NumberOfFrames) == int(local[sop].NumberOfFrames) == 27

        # A new series whose retrieval fails: an error line, counted, exit code 1, no Ray started.
        write_dicom_cine(tmp_path / "src2", _frames(3), patient="W1")
        client.store_instances([pydicom.dcmread(f) for f in (tmp_path / "src2").iterdir()])

        def refuse(*args, **kwargs):
            raise ConnectionError("the PACS reset the connection")

        monkeypatch.setattr(dicomweb, "web_retrieve", refuse)
        code = infer.main(["--model", str(tiny_checkpoint), "--input", url, "--output", str(out), "--diagnosis", "none"])
        text = capsys.readouterr().out
        assert code == 1 and not ray.is_initialized()
        assert "ERROR (retried next run): WADO-RS retrieve failed (ConnectionError" in text
        assert "1 error to retry" in text and json.loads((out / "last_run.json").read_text())["actors"] == 0


@pytest.mark.slow
def test_a_series_the_pacs_keeps_compressed_is_retrieved_whole_and_a_cut_off_answer_is_retried(tmp_path, tiny_model):
    """A PACS keeps MR images JPEG Lossless, JPEG-LS, JPEG 2000 compressed. Asked for them uncompressed,
    Orthanc (which cannot transcode JPEG 2000) broke off its 200 answer: the series was segmented from
    the instances before the break, its SEGs stored and the ledger said done for good. Now they come as
    stored and are decoded here (the mask of the uncompressed series), and an answer that misses
    instances is an error the next run retries: the old request, against the same Orthanc."""
    import nibabel as nib
    import pydicom
    from servers import orthanc_available, running_orthanc
    from synth import COMPRESSED, compress_dicom

    from raysegment.config import PredictConfig
    from raysegment.inference.pacs import segment_pacs_series
    from raysegment.inference.predictor import Predictor
    from raysegment.inference.study import segment_series
    from raysegment.io import dicom, dicomweb
    from raysegment.model.checkpoint import LoadedModel

    if not orthanc_available():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt install orthanc orthanc-dicomweb)")
    plain = sorted(write_dicom_cine(tmp_path / "plain", _frames(4), patient="Z1"))
    (tmp_path / "packed").mkdir()
    for i, f in enumerate(plain):
        compress_dicom(f, tmp_path / "packed" / f.name, COMPRESSED[i % len(COMPRESSED)])
    predictor = Predictor(LoadedModel(*tiny_model, "tiny/1"), PredictConfig())
    (series,), _ = dicom.find_series(tmp_path / "plain")
    reference = segment_series(dicom.series_key(series.study_uid, series.uid), series.files, predictor, "tiny",
                               tmp_path / "ref")[0]["mask"]
    with running_orthanc(tmp_path / "orthanc") as url:
        client = dicomweb.web_client(url)
        # A JPEG Lossless instance first: Orthanc sends in that order, and transcodes it before it fails.
        client.store_instances([pydicom.dcmread(tmp_path / "packed" / f.name) for f in plain])
        entry = segment_pacs_series(client, series.study_uid, series.uid, predictor, "tiny", tmp_path / "out")
        assert entry["status"] == "done" and [r["stored"] for r in entry["rows"]] == [True, True]
        np.testing.assert_array_equal(np.asarray(nib.load(entry["rows"][0]["mask"]).dataobj),
                                      np.asarray(nib.load(reference).dataobj))
        assert len(client.search_for_instances(search_filters={"Modality": "SEG"})) == 2

        retrieve = client.retrieve_series  # the request before: the PACS transcodes to Explicit VR Little Endian
        client.retrieve_series = lambda study_instance_uid, series_instance_uid, media_types=None: retrieve(
            study_instance_uid=study_instance_uid, series_instance_uid=series_instance_uid)
        entry = segment_pacs_series(client, series.study_uid, series.uid, predictor, "tiny", tmp_path / "cut")
        assert entry["status"] == "error" and "IncompleteRetrieval" in entry["reason"], entry["reason"]
        assert "not the ones its query listed" in entry["reason"] and not (tmp_path / "cut" / "masks").exists()


@pytest.mark.slow
def test_a_stack_stored_in_the_pacs_as_a_series_per_slice_is_segmented_as_one(tmp_path, tiny_model, tiny_checkpoint):
    """Single-slice cine series of one study (a breath-hold each) and a long-axis series in a real
    Orthanc. Two slices in: each is skipped, a single slice. All four in: the scheduled job segments
    them as one stack (the instance query gives each image's plane), stores its SEGs in one SEG
    series, and the results keep no row of the two slices' own; the long-axis series stays skipped;
    a third run does nothing. Before, each of the five was skipped ("a single slice position")."""
    import nibabel as nib
    import pydicom
    import ray
    from servers import orthanc_available, running_orthanc
    from synth import rotated_orientation
    from test_dicom import _split_per_slice

    from raysegment.config import InferConfig, PredictConfig
    from raysegment.inference.batch import run_batch
    from raysegment.inference.ledger import Ledger, results_rows
    from raysegment.inference.predictor import Predictor
    from raysegment.inference.study import segment_series
    from raysegment.io import dicom, dicomweb
    from raysegment.model.checkpoint import LoadedModel

    if not orthanc_available():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt install orthanc orthanc-dicomweb)")
    files = write_dicom_cine(tmp_path / "one", _frames(4), patient="K1")
    (series,), _ = dicom.find_series(tmp_path / "one")
    predictor = Predictor(LoadedModel(*tiny_model, "tiny/1"), PredictConfig())  # the checkpoint's weights
    want = segment_series(dicom.series_key(series.study_uid, series.uid), series.files, predictor, "m", tmp_path / "ref")
    members = _split_per_slice(files, 4)
    first = pydicom.dcmread(files[0])
    lax = write_dicom_cine(tmp_path / "lax", _frames(1), study_uid=first.StudyInstanceUID,
                           orientation=rotated_orientation((70.0, 10.0, 0.0)))
    out = tmp_path / "out"
    with running_orthanc(tmp_path / "orthanc") as url:
        client = dicomweb.web_client(url)
        config = InferConfig(models=(str(tiny_checkpoint),), input=url, output=str(out), threads=1, actors=1,
                             progress=False, diagnosis=None)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            parts = {True: [], False: []}
            for f in files:
                parts[str(pydicom.dcmread(f).SeriesInstanceUID) in members[:2]].append(f)
            client.store_instances([pydicom.dcmread(f) for f in [*parts[True], *lax]])
            summary = run_batch(config)
            assert summary["segmented"] == 0 and summary["not_cine"] == 3, summary
            client.store_instances([pydicom.dcmread(f) for f in parts[False]])
            summary, again = run_batch(config), run_batch(config)
        finally:
            ray.shutdown()
        assert summary["segmented"] == 1 and again["segmented"] == 0 and again["studies"] == 2
        results = results_rows(Ledger(out / "ledger.jsonl"))
        assert [r["status"] for r in results] == ["skipped", "done", "done"]  # the long-axis series, the stack's frames
        rows = results[1:]
        assert all(r["stored"] for r in rows) and not any(r["study"].endswith(members[0]) for r in results)
        assert rows[0]["series_description"] == "sa_1 (a stack of 4 series)"
        np.testing.assert_array_equal(np.asarray(nib.load(rows[0]["mask"]).dataobj), np.asarray(nib.load(want[0]["mask"]).dataobj))
        segs = client.search_for_instances(search_filters={"Modality": "SEG"})
        assert len(segs) == 2 and len({s["0020000E"]["Value"][0] for s in segs}) == 1
        seg = pydicom.dcmread(rows[0]["seg"])
        assert {r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence} == set(members)
        assert not any((out / "dicom-in").iterdir())


@pytest.mark.slow
def test_a_pushed_slice_series_segments_its_stack_and_stands_as_the_stack(tmp_path, tiny_checkpoint):
    """The service's push path (``segment_pacs_series``) given one slice series of a stack stored as a
    series per slice: with two slices in the PACS it is a single slice (skipped); once four are in, a
    push of any of them segments the stack, the pushed series' status is the stack's, a push of
    another slice finds it done, and the scheduled run then has nothing to do. Before, every push was
    skipped, "a single slice position"."""
    import pydicom
    from servers import orthanc_available, running_orthanc
    from test_dicom import _split_per_slice

    from raysegment.config import PredictConfig
    from raysegment.inference.ledger import Ledger
    from raysegment.inference.pacs import segment_pacs_series, series_status
    from raysegment.inference.predictor import Predictor
    from raysegment.io import dicomweb
    from raysegment.io.dicom import series_key

    if not orthanc_available():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt install orthanc orthanc-dicomweb)")
    files = write_dicom_cine(tmp_path / "src", _frames(4), patient="Q1")
    members = _split_per_slice(files, 4)
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    by_slice = {m: [f for f in files if str(pydicom.dcmread(f).SeriesInstanceUID) == m] for m in members}
    predictor = Predictor.load(str(tiny_checkpoint), PredictConfig())  # the version the scheduled run pins
    out = tmp_path / "out"
    ledger = Ledger(out / "ledger.jsonl")
    with running_orthanc(tmp_path / "orthanc") as url:
        client = dicomweb.web_client(url)

        def push(series: str, stack_waits: bool = False) -> dict:
            return segment_pacs_series(client, study, series, predictor, "tiny", out, ledger=ledger,
                                       stack_waits=stack_waits)

        client.store_instances([pydicom.dcmread(f) for m in members[:2] for f in by_slice[m]])
        first = push(members[0])
        assert first["status"] == "skipped" and "a single slice position" in first["reason"]
        client.store_instances([pydicom.dcmread(f) for m in members[2:] for f in by_slice[m]])
        lines = len(ledger.entries)
        waiting = push(members[2], stack_waits=True)  # the service's first look: the stack may still grow
        assert waiting["status"] == "waiting"
        assert len(ledger.entries) == lines and not client.search_for_instances(search_filters={"Modality": "SEG"})
        entry = push(members[2])
        assert entry["status"] == "done" and len(entry["rows"]) == 2 and all(r["stored"] for r in entry["rows"])
        assert entry["members"] == [series_key(study, m) for m in members] and entry["path"] == waiting["path"]
        status = series_status(ledger, study, members[0], predictor.version)
        assert status["status"] == "done" and status["series"] == entry["path"] and status["segs_stored"] == 2
        assert push(members[3])["status"] == "already_done"
        assert len(client.search_for_instances(search_filters={"Modality": "SEG"})) == 2
        summary = _scheduled_run(url, tiny_checkpoint, out)
        assert summary["segmented"] == 0 and summary["already_done"] == 1, summary


@pytest.mark.slow
def test_a_pushed_series_gets_its_indices_sr_at_once_and_the_scheduled_run_stores_it_no_more(tmp_path):
    """The service's push path (``segment_pacs_series``) on a bundled sample patient in a real Orthanc:
    the SEGs and, with them, the SR of the patient's indices, the values the scheduled job's results
    then hold; that run stores no SR again. Before, the SR waited for the next scheduled run."""
    import pyarrow.parquet as pq
    import pydicom
    import ray
    from servers import orthanc_available, running_orthanc
    from synth import sample_cine

    from raysegment.analysis.diagnosis import load as load_diagnosis
    from raysegment.config import InferConfig, PredictConfig
    from raysegment.inference.batch import run_batch
    from raysegment.inference.ledger import Ledger
    from raysegment.inference.pacs import segment_pacs_series
    from raysegment.inference.predictor import Predictor
    from raysegment.io import dicom, dicomweb
    from raysegment.io.sr import MEASUREMENTS, read_indices_sr

    if not orthanc_available():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt install orthanc orthanc-dicomweb)")
    images, _, spacing = sample_cine("patient063")
    files = write_dicom_cine(tmp_path / "src", images, spacing_zyx=spacing, patient="S63")
    (series,), _ = dicom.find_series(tmp_path / "src")
    out = tmp_path / "out"
    with running_orthanc(tmp_path / "orthanc") as url:
        client = dicomweb.web_client(url)
        client.store_instances([pydicom.dcmread(f) for f in files])
        entry = segment_pacs_series(client, series.study_uid, series.uid, Predictor.load("shipped:mobilenet_v2", PredictConfig()),
                                    "shipped:mobilenet_v2", out, ledger=Ledger(out / "ledger.jsonl"),
                                    diagnosis=load_diagnosis("shipped"))
        assert entry["status"] == "done" and "sr_error" not in entry
        (sr,) = client.search_for_instances(search_filters={"Modality": "SR"})
        client.retrieve_instance(study_instance_uid=series.study_uid, series_instance_uid=sr["0020000E"]["Value"][0],
                                 sop_instance_uid=sr["00080018"]["Value"][0]).save_as(tmp_path / "sr.dcm")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            summary = run_batch(InferConfig(models=("shipped:mobilenet_v2",), input=url, output=str(out), threads=1,
                                            actors=1, progress=False))
            # --no-sr (a PACS that takes no Comprehensive 3D SR): the SEGs, no SR written or stored
            without = run_batch(InferConfig(models=("shipped:mobilenet_v2",), input=url, output=str(tmp_path / "no-sr"),
                                            threads=1, actors=1, progress=False, sr=False))
        finally:
            ray.shutdown()
        assert (without["segmented"], without["srs_written"], without["srs_stored"]) == (1, 0, 0), without
        assert not list((tmp_path / "no-sr").rglob("indices_sr.dcm"))
        assert summary["already_done"] == 1 and summary["srs_written"] == 0 and summary["srs_stored"] == 0
        ed = next(r for r in pq.read_table(out / "results.parquet").to_pylist() if r.get("phase") == "ED")
        assert read_indices_sr(tmp_path / "sr.dcm") == {k: round(ed[k], 1) for k, *_ in MEASUREMENTS}
        assert len(client.search_for_instances(search_filters={"Modality": "SR"})) == 1


@pytest.mark.slow
def test_a_rolled_back_champion_leaves_its_own_masks_and_seg_series_only(tmp_path, tiny_model, capsys):
    """v1, then v2 (a new champion), then v1 again (a rollback) on one PACS series: each run leaves the
    output's mask and results and the PACS's one raysegment SEG series those of the model that ran
    (the replaced version's SEG series deleted); before, the rolled-back run found the series "already
    done" and the output and PACS kept v2's. A fourth run finds nothing to do."""
    import time
    from dataclasses import replace

    import nibabel as nib
    import pydicom
    import ray
    import torch
    from conftest import write_checkpoint
    from servers import orthanc_available, running_orthanc

    from raysegment.config import InferConfig
    from raysegment.inference.batch import pinned_models, run_batch
    from raysegment.inference.ledger import Ledger, results_rows
    from raysegment.io import dicomweb
    from raysegment.io.seg import seg_series_uid

    if not orthanc_available():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt install orthanc orthanc-dicomweb)")
    model, config = tiny_model
    v1 = write_checkpoint(tmp_path / "v1", model, config)
    with torch.no_grad():  # another model: another version string, and it draws LV where v1 draws MYO
        model.head.bias[3] += 10.0
    v2 = write_checkpoint(tmp_path / "v2", model, config)
    files = write_dicom_cine(tmp_path / "src", _frames(4), patient="R1")
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    out = tmp_path / "out"
    with running_orthanc(tmp_path / "orthanc") as url:
        client = dicomweb.web_client(url)
        client.store_instances([pydicom.dcmread(f) for f in files])
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            masks = {}
            for ckpt, segmented in ((v1, 1), (v2, 1), (v1, 1), (v1, 0)):
                run = InferConfig(models=(str(ckpt),), input=url, output=str(out), threads=1, actors=1, progress=False,
                                  diagnosis=None)
                version = pinned_models(run)[1]
                assert run_batch(run)["segmented"] == segmented, (ckpt.name, segmented)
                rows = [r for r in results_rows(Ledger(out / "ledger.jsonl")) if r["status"] == "done"]
                assert {r["model_version"] for r in rows} == {version} and all(r["stored"] for r in rows)
                mask = np.asarray(nib.load(rows[0]["mask"]).dataobj)
                np.testing.assert_array_equal(mask, masks.setdefault(version, mask))  # v1's again after the rollback
                held = {s["0020000E"]["Value"][0] for s in client.search_for_series(search_filters={"Modality": "SEG"})}
                assert held == {seg_series_uid(source.SeriesInstanceUID, version)}
            # --since 1: a series of a study dated today is listed and segmented; the series above
            # (its study dated 2026-01-01) is not even asked about.
            today = [pydicom.dcmread(f) for f in write_dicom_cine(tmp_path / "today", _frames(4), patient="R2")]
            for ds in today:
                ds.StudyDate = time.strftime("%Y%m%d")
            client.store_instances(today)
            summary = run_batch(replace(run, since_days=1))
            assert (summary["studies"], summary["segmented"], summary["already_done"]) == (1, 1, 0)
        finally:
            ray.shutdown()
    assert len(masks) == 2 and not np.array_equal(*masks.values())


@pytest.mark.slow
def test_a_pacs_that_deletes_nothing_and_pages_its_answers_gets_each_series_done_once(tmp_path, tiny_model):
    """A PACS as many hospitals run: no DICOMweb DELETE (it is not in the standard) and no Orthanc REST
    API, query answers of one record (PS3.18: the rest from an ``offset``; 2 MR series, of 8–12 and 8
    instances), and no retrieval of instances as stored (406 to ``transfer-syntax=*``). Every
    series is listed whole and segmented; a series that grew, then a new champion, each store the new
    SEGs beside the earlier ones, which the PACS keeps: the series is done (the entry says what was
    kept) and the next run has nothing to do; a rollback stores v1's again. Before, every series was
    an error at every run: each retrieval `HTTPError: 406`, with it served `IncompleteRetrieval: the
    PACS sent 8 instance(s), not the ones its query listed` (its first listed), the second series
    never seen, and with paging too each replaced result `STOW-RS failed (HTTPError: 404 …)`."""
    import pydicom
    import ray
    import torch
    from conftest import write_checkpoint
    from servers import hospital_pacs, orthanc_available, running_orthanc

    from raysegment.cli.infer import done_line
    from raysegment.config import InferConfig
    from raysegment.inference.batch import run_batch
    from raysegment.inference.ledger import Ledger
    from raysegment.io import dicomweb
    from raysegment.io.dicom import series_key

    if not orthanc_available():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt install orthanc orthanc-dicomweb)")
    model, config = tiny_model
    v1 = write_checkpoint(tmp_path / "v1", model, config)
    with torch.no_grad():
        model.head.bias[3] += 10.0
    v2 = write_checkpoint(tmp_path / "v2", model, config)
    files = write_dicom_cine(tmp_path / "src", _frames(6), patient="K1")  # frame-major: t * 6 + z
    first_part = [f for i, f in enumerate(files) if i % 6 < 4]
    others = write_dicom_cine(tmp_path / "other", _frames(4), patient="K2")
    out = tmp_path / "out"
    with running_orthanc(tmp_path / "orthanc") as orthanc, hospital_pacs(orthanc, page=1, as_stored=False) as url:
        client = dicomweb.web_client(url)
        client.store_instances([pydicom.dcmread(f) for f in first_part + others])
        head = pydicom.dcmread(files[0], stop_before_pixels=True)
        study, grown_key = str(head.StudyInstanceUID), series_key(head.StudyInstanceUID, head.SeriesInstanceUID)

        def run(ckpt) -> dict:
            return run_batch(InferConfig(models=(str(ckpt),), input=url, output=str(out), threads=1, actors=1,
                                         progress=False, diagnosis=None))

        def segs() -> list[int]:  # instances per SEG series of the growing series' study in the PACS
            return sorted(len(dicomweb._series_sops(client, s["0020000D"]["Value"][0], s["0020000E"]["Value"][0]))
                          for s in dicomweb._paged(client.search_for_series, search_filters={"Modality": "SEG"})
                          if s["0020000D"]["Value"][0] == study)

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            first = run(v1)
            assert (first["studies"], first["segmented"], first["errors"]) == (2, 2, 0), first
            assert segs() == [2]
            client.store_instances([pydicom.dcmread(f) for f in files if f not in first_part])
            grown = run(v1)
            assert (grown["segmented"], grown["errors"], grown.get("pacs_kept")) == (1, 0, 1), grown
            assert segs() == [4]  # the new content's two SEGs beside the first two
            replaced = run(v2)
            assert (replaced["segmented"], replaced["errors"]) == (2, 0) and replaced["pacs_kept"] >= 2, replaced
            assert segs() == [2, 4]  # v2's SEG series beside v1's
            assert "the PACS deletes nothing" in done_line(replaced, str(out))
            again = run(v2)
            assert (again["segmented"], again["errors"], again["already_done"]) == (0, 0, 2), again
            back = run(v1)  # a rollback: v1's SEGs, which the PACS kept, stored again
            assert (back["segmented"], back["errors"]) == (2, 0) and segs() == [2, 4], back
        finally:
            ray.shutdown()
    entry = Ledger(out / "ledger.jsonl").entries
    entry = [e for e in entry.values() if e["path"] == grown_key][-1]
    assert entry["status"] == "done" and "kept in the PACS: it deletes nothing (DICOMweb DELETE answered HTTP 405)" \
        in entry["reason"], entry
    assert all(r["stored"] for r in entry["rows"])


@pytest.mark.slow
def test_a_pacs_that_wants_credentials_gets_them_from_the_url_and_no_line_shows_the_password(tmp_path, tiny_checkpoint,
                                                                                                capsys):
    """Orthanc with HTTP basic authentication: without credentials, or with a wrong password, one line
    saying how to give them (exit 2); with them in the URL the series is segmented and its SEGs
    stored. No line and no ledger reason shows the password (they go to cron logs): before, an
    unreachable PACS was `error: --input http://alice:secret@…`, a refusal `DICOMweb query failed
    (HTTPError: 401 … for url: http://alice:wrong@…)`."""
    import pydicom
    import ray
    from servers import orthanc_available, running_orthanc

    from raysegment.cli import infer
    from raysegment.config import InferConfig
    from raysegment.inference.batch import run_batch
    from raysegment.io import dicomweb

    if not orthanc_available():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt install orthanc orthanc-dicomweb)")
    users = {"AuthenticationEnabled": True, "RegisteredUsers": {"alice": "s3cret-pw"}}
    with running_orthanc(tmp_path / "orthanc", users) as url:
        with_user = url.replace("http://", "http://alice:s3cret-pw@")
        files = write_dicom_cine(tmp_path / "src", _frames(4), patient="A1")
        dicomweb.web_client(with_user).store_instances([pydicom.dcmread(f) for f in files])
        base = ["--model", str(tiny_checkpoint), "--output", str(tmp_path / "out"), "--diagnosis", "none"]
        for given in (url, url.replace("http://", "http://alice:wrong-pw@")):
            assert infer.main([*base, "--input", given]) == 2
            err = capsys.readouterr().err
            assert "refused this client (HTTP 401): give its credentials with --pacs-auth FILE" in err, err
            assert "wrong-pw" not in err
        down = f"http://alice:s3cret-pw@127.0.0.1:{free_port()}/dicom-web"
        assert infer.main([*base, "--input", down]) == 1
        err = capsys.readouterr().err
        assert "http://alice:***@127.0.0.1" in err and "s3cret-pw" not in err, err
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            summary = run_batch(InferConfig(models=(str(tiny_checkpoint),), input=with_user, output=str(tmp_path / "out"),
                                            threads=1, actors=1, progress=False, diagnosis=None))
        finally:
            ray.shutdown()
        assert summary["segmented"] == 1 and summary["errors"] == 0
        segs = dicomweb.web_client(with_user).search_for_instances(search_filters={"Modality": "SEG"})
        assert len(segs) == 2
        # The credentials from a file (what ps does not show): the next poll finds the series settled.
        (tmp_path / "pacs-auth").write_text("alice:s3cret-pw\n")
        assert infer.main([*base, "--input", url, "--pacs-auth", str(tmp_path / "pacs-auth")]) == 0
        assert "1 studies, 1 already done" in capsys.readouterr().out
        (tmp_path / "pacs-auth").write_text("s3cret-pw\n")
        with pytest.raises(SystemExit):
            infer.main([*base, "--input", url, "--pacs-auth", str(tmp_path / "pacs-auth")])
        err = capsys.readouterr().err
        assert "expected one line, USER:PASSWORD" in err and "s3cret-pw" not in err, err
    assert dicomweb.redact("STOW-RS failed (HTTPError: 500 for url: https://bob:p@ss:w0rd@pacs/dicom-web/studies)") == \
        "STOW-RS failed (HTTPError: 500 for url: https://bob:***@pacs/dicom-web/studies)"
    assert "s3cret-pw" not in (tmp_path / "out" / "ledger.jsonl").read_text()


@pytest.mark.slow
def test_pacs_series_are_retrieved_as_an_actor_falls_free_not_all_before_the_first_is_segmented(
        tmp_path, tiny_checkpoint, monkeypatch):
    """Three new series, one actor: each retrieval finds no other series' copy in OUTPUT/dicom-in (the
    one before it was segmented, recorded and removed first). Before, all three were retrieved before
    the first was segmented: the whole to-do list on disk at once, the first result after the last
    retrieval."""
    import pydicom
    from servers import orthanc_available, running_orthanc

    from raysegment.io import dicomweb

    if not orthanc_available():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt install orthanc orthanc-dicomweb)")
    out, seen = tmp_path / "out", []
    real = dicomweb.web_retrieve

    def retrieve(client, study, series, folder, *rest):
        seen.append(sum(1 for f in (out / "dicom-in").iterdir() if f.name != folder.name) if (out / "dicom-in").exists() else 0)
        return real(client, study, series, folder, *rest)

    monkeypatch.setattr(dicomweb, "web_retrieve", retrieve)
    with running_orthanc(tmp_path / "orthanc") as url:
        client = dicomweb.web_client(url)
        for n in range(3):
            client.store_instances([pydicom.dcmread(f) for f in write_dicom_cine(tmp_path / f"s{n}", _frames(3), patient=f"L{n}")])
        summary = _scheduled_run(url, tiny_checkpoint, out)
    assert summary["segmented"] == 3 and seen == [0, 0, 0], (summary, seen)
    assert not any((out / "dicom-in").iterdir())
