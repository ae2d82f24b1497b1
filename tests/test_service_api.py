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


def test_the_json_summary_has_ef_from_given_frames_and_no_nan():
    from raysegment.service.app import RequestError, summary

    rows = [{"frame": t, "phase": "", "qc_flags": "", "lv_myo_mass_g": 100.0, "spacing_mm": "[10, 1.5, 1.5]",
             "volume_lv_ml": lv, "volume_rv_ml": rv, "voxels_lv": 1} for t, (lv, rv) in enumerate([(150, 0.0), (60, 0.0)])]
    out = summary(rows, "m/1", ed=0, es=1)
    assert out["ef_lv_pct"] == pytest.approx(60.0) and out["ef_rv_pct"] is None  # an empty RV: no EF, not NaN
    assert out["patient_qc_flags"] == [] and summary(rows, "m/1", ed=1, es=0)["patient_qc_flags"] == ["es_above_ed_lv"]
    json.dumps(out, allow_nan=False)
    for ed, es in ((0, 2), (1, 1), (0, None), (None, 1)):  # out of range, the same frame twice, one alone
        with pytest.raises(RequestError) as exc:
            summary(rows, "m/1", ed=ed, es=es)
        assert exc.value.status == 400 and "two different frame indices" in str(exc.value), (ed, es)
    assert not any(isinstance(v, float) and math.isnan(v) for v in out.values())


def test_serve_config_file_args_build_a_config():
    from raysegment.service.run import config_from_dict

    config = config_from_dict({"model": "models:/raysegment-densenet121@champion", "autoscale": "1:4",
                               "predict": {"runtime": "onnx"}, "replicas": 2})
    assert config.autoscale == (1, 4) and config.predict.runtime == "onnx" and config.replicas == 2
    with pytest.raises(ValueError, match="unknown service settings"):
        config_from_dict({"model": "x", "port_number": 1})


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
