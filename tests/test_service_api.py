"""The service's pieces without a server (fast tier): its command line refuses bad settings before
Ray starts, the JSON summary, settings from a Serve config file, and a shared ledger."""

from __future__ import annotations

import json
import math
import socket
import threading

import pytest


def test_the_command_line_refuses_bad_settings_in_one_line(tmp_path, capsys, monkeypatch):
    from raysegment.cli import serve
    from raysegment.service import run as serve_run

    bad = {("--pacs", "http://pacs/dicom-web"): "--pacs and --output go together",
           ("--autoscale", "3:1"): "need 0 ≤ MIN ≤ MAX",
           ("--autoscale", "many"): "must be MIN:MAX",
           ("--runtime", "onnx", "--gpu"): "runs on the CPU",
           ("--token-file", str(tmp_path / "none")): "--token-file",
           ("--replicas", "0"): "must be > 0",
           ("--stack-settle", "-1"): "--stack-settle is seconds",
           ("--diagnosis", str(tmp_path / "none.json")): "--diagnosis",
           # a model that is not there: refused before Ray starts, not by a replica's traceback
           ("--model", "shipped:resnet"): "no such shipped model",
           ("--model", str(tmp_path / "none.safetensors")): "not a raysegment weights file",
           ("--model", "models:/nope@champion", "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"): "no such model in the registry"}
    monkeypatch.setattr(serve_run, "start", lambda *a, **k: pytest.fail("the service was started"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    bad[("--port", str(taken.getsockname()[1]))] = "is in use"  # Ray's proxy failed in ~70 lines of tracebacks
    for args, message in bad.items():
        with pytest.raises(SystemExit) as exc:
            serve.main(["--model", "shipped:mobilenet_v2", *args])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err, args
    taken.close()
    (tmp_path / "token").write_text(" abc \n")
    p = serve.build_parser()
    a = p.parse_args(["--model", "shipped:mobilenet_v2", "--token-file", str(tmp_path / "token"), "--autoscale", "1:3",
                      "--pacs", "http://pacs/dicom-web", "--output", str(tmp_path / "out")])
    config = serve.config_from_args(p, a)
    assert config.token == "abc" and config.autoscale == (1, 3) and config.host == "127.0.0.1"
    assert config.output == str((tmp_path / "out").resolve())


def _cine_rows(tmp_path, labels: list) -> list[dict]:
    """Rows as ``segment_study`` writes them for a cine NIfTI whose mask holds ``labels`` (z, y, x) per frame."""
    import nibabel as nib
    import numpy as np

    from raysegment.analysis.clinical import mark_cine_phases
    from raysegment.inference.study import frame_rows

    mask = tmp_path / "upload_seg.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([np.transpose(m, (2, 1, 0)) for m in labels], -1).astype(np.uint8),
                             np.diag([1.25, 1.5, 10.0, 1.0])), str(mask))
    common = {"study": str(tmp_path / "upload.nii.gz"), "phase": "", "mask": str(mask), "status": "done", "in_plane": "as-stored"}
    rows = frame_rows(np.stack(labels), (10.0, 1.5, 1.25), common)
    mark_cine_phases(rows)
    return rows


def test_the_json_summary_is_the_batch_jobs_patient_with_ef_from_given_frames_and_no_nan(tmp_path):
    """A cine's JSON answer: the batch job's indices of its ED and ES frames (``add_patient_clinical``,
    the same numbers and diagnosis ``infer`` writes), from the frames given or its largest / smallest LV;
    an empty RV gives no EF, not NaN; swapped frames flag and withhold the diagnosis; height and weight
    index the volumes."""
    import numpy as np
    from synth import synthetic_volume

    from raysegment.analysis.diagnosis import load
    from raysegment.inference.ledger import add_patient_clinical
    from raysegment.service.answers import RequestError, summary

    labels = [synthetic_volume(s, shape=(5, 40, 48), lv_radius=r)[1] for s, r in ((1, 7.0), (2, 5.0))]
    labels = [np.where(m == 1, 0, m) for m in labels]  # no RV
    model = load("shipped")
    out = summary(_cine_rows(tmp_path, labels), "m/1", ed=0, es=1, diagnosis=model)
    batch = _cine_rows(tmp_path, labels)
    add_patient_clinical(batch, model)
    assert out["ef_lv_pct"] == batch[0]["lv_ef_pct"] > 20 and out["ef_rv_pct"] is None  # an empty RV: no EF, not NaN
    assert out["patient"]["lv_edv_ml"] == batch[0]["lv_edv_ml"] and out["diagnosis"] == batch[0]["diagnosis"]
    assert sum(out[f"p_{g}"] for g in model.classes) == pytest.approx(1.0, abs=1e-3)
    assert out["patient_qc_flags"] == ["no_height_weight"] and out["patient"]["bsa_m2"] is None
    auto = summary(_cine_rows(tmp_path, labels), "m/1", None, None, model)  # largest / smallest LV: the same frames
    assert {k: v for k, v in out.items() if k not in ("ed", "es")} == auto
    sized = summary(_cine_rows(tmp_path, labels), "m/1", 0, 1, model, {"height_cm": 180.0, "weight_kg": 80.0})
    assert sized["patient"]["bsa_m2"] == pytest.approx(2.0) and sized["patient_qc_flags"] == []
    assert sized["patient"]["lv_edv_ml_per_m2"] == pytest.approx(out["patient"]["lv_edv_ml"] / 2.0, abs=1e-3)
    swapped = summary(_cine_rows(tmp_path, labels), "m/1", ed=1, es=0, diagnosis=model)
    assert "es_above_ed_lv" in swapped["patient_qc_flags"] and swapped["diagnosis_withheld"] == "es_above_ed_lv"
    assert "diagnosis" not in swapped and "diagnosis" not in summary(_cine_rows(tmp_path, labels), "m/1", 0, 1)
    json.dumps(out, allow_nan=False)
    assert not any(isinstance(v, float) and math.isnan(v) for v in (*out.values(), *out["patient"].values()))
    for ed, es in ((0, 2), (1, 1), (0, None), (None, 1)):  # out of range, the same frame twice, one alone
        with pytest.raises(RequestError) as exc:
            summary(_cine_rows(tmp_path, labels), "m/1", ed=ed, es=es)
        assert exc.value.status == 400 and "two different frame indices" in str(exc.value), (ed, es)


def test_serve_config_file_args_build_a_config(tmp_path):
    from raysegment.service.run import config_from_dict

    (tmp_path / "pacs").write_text("raysegment:s3cret-pw\n")  # mounted Secrets
    (tmp_path / "token").write_text("t0ken-s3cret\n")
    config = config_from_dict({"model": "models:/raysegment-densenet121@champion", "autoscale": "1:4",
                               "predict": {"runtime": "onnx"}, "replicas": 2, "pacs_auth_file": str(tmp_path / "pacs"),
                               "token_file": str(tmp_path / "token")})
    assert config.autoscale == (1, 4) and config.predict.runtime == "onnx" and config.replicas == 2
    assert (config.pacs_auth, config.token) == ("raysegment:s3cret-pw", "t0ken-s3cret")
    assert "s3cret" not in repr(config)  # a traceback or log line that shows the config shows no secret
    with pytest.raises(ValueError, match="unknown service settings"):
        config_from_dict({"model": "x", "port_number": 1})
    # A Secret mounted empty or not at all, or credentials of no known form: refused at the start, the
    # secret nowhere in the message (an empty token let no request in, with 401s as the only sign).
    (tmp_path / "empty").write_text("\n")
    for args, message in (({"token_file": str(tmp_path / "empty")}, "token_file .*empty is empty"),
                          ({"token_file": str(tmp_path / "absent")}, "token_file .*absent: No such file"),
                          ({"pacs_auth_file": str(tmp_path / "token")}, "pacs_auth_file: expected one line")):
        with pytest.raises(ValueError, match=message) as exc:
            config_from_dict({"model": "x", **args})
        assert "s3cret" not in str(exc.value)


def test_two_writers_share_one_ledger_without_losing_a_line(tmp_path):
    from raysegment.inference.ledger import Ledger

    path = tmp_path / "ledger.jsonl"
    path.write_text('{"path": "a", "sha256": "1", "model_version": "v", "status": "done"}\n{"torn')

    def write(name: str) -> None:
        for i in range(40):
            with open(path, "a") as f:
                f.write('{"torn by a killed writer\n')
            Ledger(path)  # repairs (rewrites) the ledger, racing the other writer's appends
            Ledger(path).append({"path": f"{name}{i}", "sha256": "h", "model_version": "v", "status": "done"})

    threads = [threading.Thread(target=write, args=(n,)) for n in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = Ledger(path).entries
    assert len(entries) == 81 and all(json.loads(line) for line in path.read_text().splitlines())


def test_a_pushed_series_status_is_its_latest_contents_ledger_entry_for_the_version_served(tmp_path):
    """What GET /v1/pacs/series answers from the ledger: the entry of the series' latest content for
    the version served, its SEG series where SEGs were stored; nothing for another version or series."""
    from raysegment.inference.ledger import Ledger
    from raysegment.inference.pacs import series_status
    from raysegment.io.seg import seg_series_uid

    ledger = Ledger(tmp_path / "ledger.jsonl")
    reader = Ledger(tmp_path / "ledger.jsonl")  # as the service's: refreshed, reading what was appended since

    def status(version: str, series: str = "1.2.3") -> dict | None:
        reader.refresh()
        return series_status(reader, "1.2", series, version)

    key = "dicom:1.2/1.2.3"
    ledger.append({"path": key, "sha256": "old", "model_version": "m/1", "status": "error", "reason": "STOW-RS failed",
                   "seconds": 0.0, "rows": []})
    ledger.append({"path": "dicom:1.2/9.9", "sha256": "x", "model_version": "m/1", "status": "done", "reason": "",
                   "seconds": 1.0, "rows": [{"stored": True}]})
    assert status("m/1")["status"] == "error"
    ledger.append({"path": key, "sha256": "new", "model_version": "m/1", "status": "done", "reason": "", "seconds": 2.5,
                   "finished": "2026-12-07T15:00:00", "rows": [{"frame": 0, "stored": True}, {"frame": 1, "stored": True}]})
    with open(tmp_path / "ledger.jsonl", "a") as f:
        f.write('{"path": "dicom:1.2/1.2.3", "torn by a killed wri')
    assert status("m/1") == {
        "series": key, "status": "done", "reason": "", "model_version": "m/1", "finished": "2026-12-07T15:00:00",
        "seconds": 2.5, "frames": 2, "segs_stored": 2, "seg_series_uid": seg_series_uid("1.2.3", "m/1")}
    assert status("m/2") is None  # another version has not done it
    assert '"torn' not in (tmp_path / "ledger.jsonl").read_text()  # the reader dropped the torn line
    Ledger(tmp_path / "ledger.jsonl").append(
        {"path": key, "sha256": "new", "model_version": "m/2", "status": "done", "reason": "", "rows": []})
    assert status("m/1") is None  # rolled back to m/1: m/2's result is the PACS's
    assert status("m/1", "4.5") is None
    # Another writer rewrote the file (here by hand, as a compaction does): the reader reads it afresh.
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    (tmp_path / "ledger.jsonl").unlink()
    (tmp_path / "ledger.jsonl").write_text(lines[0] + "\n")
    assert status("m/1")["status"] == "error" and status("m/2") is None
    nowhere = Ledger(tmp_path / "nowhere" / "ledger.jsonl")
    assert series_status(nowhere, "1.2", "1.2.3", "m/1") is None and not (tmp_path / "nowhere").exists()


def test_a_push_with_a_long_lived_reader_reads_only_what_was_appended_and_records_into_it(tmp_path, monkeypatch):
    """The service's pushes share one reader of the ledger: each push refreshes it (another writer's
    result counts) and appends its own entry to it, opening no reader of its own — a fresh one read a
    year's ledger whole at every push. A PACS that lists the series' instances and fails to send them."""
    from types import SimpleNamespace

    from raysegment.inference import pacs
    from raysegment.inference.ledger import Ledger
    from raysegment.io.dicom import instances_digest

    class Pacs:
        def search_for_series(self, study_instance_uid, search_filters):
            return [{"0020000D": {"vr": "UI", "Value": [study_instance_uid]}, "0020000E": {"vr": "UI", "Value": [
                search_filters["SeriesInstanceUID"]]}, "00201209": {"vr": "IS", "Value": [3]}}]

        def search_for_instances(self, study_instance_uid, series_instance_uid, fields=None, offset=0):
            return [{"00080018": {"vr": "UI", "Value": [f"{series_instance_uid}.{i}"]}} for i in range(3)][offset:]

        def retrieve_series(self, study_instance_uid, series_instance_uid, media_types=None):
            raise ConnectionError("the PACS went away")

    path, predictor = tmp_path / "ledger.jsonl", SimpleNamespace(version="m/1")
    reader = Ledger(path)
    Ledger(path).append({"path": "dicom:1.2/1.2.3", "sha256": instances_digest(f"1.2.3.{i}" for i in range(3)),
                         "model_version": "m/1", "status": "done", "reason": "", "rows": []})  # the scheduled job's
    monkeypatch.setattr(pacs, "Ledger", lambda p: pytest.fail(f"a push opened its own reader of {p}"))
    done = pacs.segment_pacs_series(Pacs(), "1.2", "1.2.3", predictor, "m", tmp_path, ledger=reader)
    assert done["status"] == "already_done"
    entry = pacs.segment_pacs_series(Pacs(), "1.2", "4.5.6", predictor, "m", tmp_path, ledger=reader)
    assert entry["status"] == "error" and "WADO-RS" in entry["reason"] and "went away" in entry["reason"]
    assert reader.entries[reader.latest["dicom:1.2/4.5.6"]] == entry
    assert reader._read[1] < path.stat().st_size  # its own line is held, not read back
    reader.refresh()
    assert list(reader.entries) == list(Ledger(path).entries)  # and the file agrees


def test_retrieval_folders_a_killed_process_left_are_removed_after_a_day(tmp_path):
    """A batch run or replica killed while it held a series' WADO-RS copy left it in OUTPUT/dicom-in;
    the next batch run removes such a folder once it is a day old, and leaves younger ones (another
    process may be segmenting that series now)."""
    import os
    import time

    from raysegment.inference.pacs import clear_stale_retrievals, retrieval_folder

    old, young = retrieval_folder(tmp_path, "1.2.3"), tmp_path / "dicom-in" / "4.5.6-99999"
    for folder in (old, young):
        folder.mkdir(parents=True)
        (folder / "x.dcm").write_bytes(b"")
    past = time.time() - 25 * 3600
    os.utime(old, (past, past))
    clear_stale_retrievals(tmp_path)
    assert not old.exists() and young.exists()
    clear_stale_retrievals(tmp_path / "nothing-here")  # no output yet: nothing to do


def test_pacs_credentials_from_a_file_reach_the_server_as_basic_or_bearer_authorization():
    """``--pacs-auth``'s two forms, against a local HTTP server that answers QIDO-RS only when the
    Authorization header is right (and 401 otherwise, as a PACS does)."""
    import base64
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from raysegment.io.dicomweb import PacsRefused, check_auth, check_pacs

    accepted = {"Bearer t0k", "Basic " + base64.b64encode(b"alice:pw:with:colons").decode()}

    class Pacs(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.headers.get("Authorization") in accepted
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/dicom+json")
            self.end_headers()
            self.wfile.write(b"[]" if ok else b"")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Pacs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/dicom-web"
    try:
        check_pacs(url, "Bearer t0k")
        check_pacs(url, "alice:pw:with:colons")  # the password may hold colons: the user is up to the first
        for wrong in (None, "Bearer nope", "alice:nope"):
            with pytest.raises(PacsRefused, match=r"refused this client \(HTTP 401\)"):
                check_pacs(url, wrong)
    finally:
        server.shutdown()
    for bad in ("just-a-password", "Bearer ", ":pw", "alice:pw\nbob:pw"):
        with pytest.raises(ValueError, match="expected one line"):
            check_auth(bad)


def test_a_settle_timer_fires_once_per_key_after_the_last_add_with_everything_added():
    """The service's wait for a stack stored as a series per slice: slices pushed one after the other
    are segmented once, after the last, not at every push; another study keeps its own clock."""
    from raysegment.service.settle import SettleTimer

    fired, done = [], threading.Event()

    def fire(key, items):
        fired.append((key, items))
        if len(fired) == 2:
            done.set()

    timer = SettleTimer(1.0, fire)
    timer.add("study-a", "s1")
    timer.add("study-b", "t1")
    for series in ("s3", "s2", "s3"):
        threading.Event().wait(0.1)  # each add within the wait: the clock starts again
        timer.add("study-a", series)
    assert timer.pending("study-a") == {"s1", "s2", "s3"}
    assert done.wait(10)
    assert fired == [("study-b", ["t1"]), ("study-a", ["s1", "s2", "s3"])]
    assert timer.pending("study-a") == set()
    threading.Event().wait(1.5)  # the earlier adds' timers found their clocks moved: nothing more
    assert len(fired) == 2
