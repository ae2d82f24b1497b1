"""The soak: its corpus and checks (fast: each check catches what it names), and a short soak —
30 studies, ten bad kinds, actors and a driver SIGKILLed — that must lose nothing and do nothing
twice (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raysegment.soak.corpus import BAD_KINDS, GOOD_KINDS, plan

SAMPLE = Path(__file__).resolve().parents[1] / "raysegment" / "sample"


def test_the_plan_holds_every_bad_kind_and_spreads_the_waves():
    studies = plan(40, 0.25, n_patients=6, waves=3, seed=1)
    bad = [s for s in studies if s.bad]
    assert len(bad) == 10 and {s.kind for s in bad} == set(BAD_KINDS)
    assert {s.kind for s in studies if not s.bad} == set(GOOD_KINDS)
    assert sorted({s.wave for s in studies}) == [0, 1, 2]
    assert all(s.reason for s in bad if s.status != "done")


def test_every_kind_is_written_and_read_as_intended(tmp_path):
    from raysegment.data.sources import source_patients
    from raysegment.inference.batch import discover
    from raysegment.inference.ledger import Ledger
    from raysegment.io.studies import StudyError, read_study
    from raysegment.soak.checks import study_key
    from raysegment.soak.corpus import Study, write_study

    patients = list(source_patients(SAMPLE))
    kinds = [*GOOD_KINDS, *BAD_KINDS]
    series = {}
    for i, kind in enumerate(kinds):
        status, reason = BAD_KINDS.get(kind, ("done", ""))
        s = Study(i, kind, 0, i % len(patients), status, reason)
        series[i] = write_study(s, patients[s.patient], tmp_path / "in" / s.folder)
    items = discover(tmp_path / "in", tmp_path / "out", Ledger(tmp_path / "out" / "ledger.jsonl"), "v")
    keys = {it.get("path") or str(it["file"]) for it in items}
    for i, kind in enumerate(kinds):
        s = Study(i, kind, 0, 0, *BAD_KINDS.get(kind, ("done", "")))
        key = study_key(s, tmp_path / "in", series[i])
        assert key in keys or kind == "symlink_loop", (kind, key)
        if kind in ("truncated_gzip", "zero_byte", "not_nifti", "two_d", "nan", "tiny"):
            with pytest.raises(StudyError, match=BAD_KINDS[kind][1]):
                read_study(Path(key))
    from raysegment.io.dicom import SeriesSkipped, find_series, read_cine

    for kind in ("dicom", "dicom_missing_slice", "dicom_not_mr"):
        (found,), _ = find_series(tmp_path / "in" / f"s{kinds.index(kind):04d}")
        if kind == "dicom":
            assert read_cine(found).frames.shape[0] == 2
        else:
            with pytest.raises(SeriesSkipped, match=BAD_KINDS[kind][1]):
                read_cine(found)


def _entry(path, status="done", mask=None, reason=""):
    rows = [{"mask": str(mask), "qc_flags": ""}] if mask else []
    return {"path": path, "sha256": "h", "model_version": "v", "status": status, "reason": reason, "rows": rows}


def test_the_checks_catch_lost_duplicated_wrong_and_left_errors(tmp_path):
    from raysegment.soak.checks import check_outcomes
    from raysegment.soak.corpus import Study

    studies = [Study(i, "nifti3d_float", 0, 0, "done", "") for i in range(5)] + [Study(5, "zero_byte", 0, 0, "failed", "empty file")]
    inp = tmp_path / "in"
    for s in studies:
        (inp / s.folder).mkdir(parents=True)
        (inp / s.folder / f"study{s.number:04d}.nii.gz").write_bytes(b"x")
    key = {s.number: str((inp / s.folder / f"study{s.number:04d}.nii.gz").resolve()) for s in studies}
    for name, data in (("a", b"1"), ("b", b"2")):
        (tmp_path / f"{name}.nii.gz").write_bytes(data)
    chaos = [_entry(key[0], mask=tmp_path / "a.nii.gz"),                                  # fine
             _entry(key[1], mask=tmp_path / "a.nii.gz"), _entry(key[1], mask=tmp_path / "a.nii.gz"),  # twice
             _entry(key[3], mask=tmp_path / "b.nii.gz"),                                  # wrong mask
             _entry(key[4], "error", reason="disk full"),                                  # error left
             _entry(key[5], "failed", reason="something else")]                            # wrong reason
    reference = [_entry(key[i], mask=tmp_path / "a.nii.gz") for i in range(5)]
    for folder, entries in (("chaos", chaos), ("ref", reference)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    out = check_outcomes(studies, {}, inp, tmp_path / "chaos", tmp_path / "ref")
    assert (out["lost"], out["duplicated"], out["wrong_masks"], out["errors_left"], out["wrong_outcomes"]) == (1, 1, 1, 1, 1)


@pytest.mark.slow
def test_a_short_soak_loses_nothing_and_does_nothing_twice(tmp_path, tiny_checkpoint):
    from raysegment.soak.run import run_soak
    from raysegment.soak.runner import SoakConfig

    result = run_soak(SoakConfig(source=str(SAMPLE), out=str(tmp_path / "soak"), model=str(tiny_checkpoint), studies=30,
                                 bad=1 / 3, kill_every=5, driver_kills=1, waves=2, serve_requests=0))
    # (the service under replica kills: tests/test_service.py; in the full soak, bench soak)
    assert result["passed"], result
    assert result["kills"] >= 3 and result["driver_kills"] == 1 and len(result["bad_kinds"]) == len(BAD_KINDS)
    assert json.loads((tmp_path / "soak" / "soak.json").read_text())["passed"]
