"""The batch job's pieces without Ray: one study's rows, the ledger, results and the report."""

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import interrupt_when, write_checkpoint
from synth import drop_info_lines, make_nifti_patient, synthetic_volume

from raysegment.analysis.clinical import ejection_fraction
from raysegment.inference.ledger import Ledger, results_rows, write_results
from raysegment.inference.predictor import Predictor
from raysegment.inference.study import segment_study
from raysegment.io.files import _umask
from raysegment.reporting.batch import batch_report
from raysegment.reporting.report import overlay_thumbnail, pick_slices


@pytest.fixture
def predictor(tmp_path, tiny_model):
    model, config = tiny_model
    return Predictor.load(str(write_checkpoint(tmp_path / "ckpt", model, config)))


def test_study_rows_hold_volumes_mass_ef_dice_and_qc(tmp_path, predictor):
    pdir = make_nifti_patient(tmp_path, 2, ed=1, es=3, nframes=4, spacing=(8.0, 1.5, 1.25))
    study = pdir / "patient002_frame01.nii.gz"
    (row,) = segment_study(study, predictor, "ref", tmp_path / "out")
    seg = np.asarray(nib.load(row["mask"]).dataobj)
    assert row["phase"] == "ED" and row["model_version"] == predictor.version and row["status"] == "done"
    for lab, name in ((1, "rv"), (2, "myo"), (3, "lv")):
        assert row[f"voxels_{name}"] == int((seg == lab).sum())
        assert row[f"volume_{name}_ml"] == pytest.approx(row[f"voxels_{name}"] * 8.0 * 1.5 * 1.25 / 1000)
    assert row["lv_myo_mass_g"] == pytest.approx(1.05 * row["volume_myo_ml"])
    # Dice against the _gt file beside it, computed from the written mask here.
    gt = np.asarray(nib.load(str(pdir / "patient002_frame01_gt.nii.gz")).dataobj)
    expected = 2 * ((seg == 3) & (gt == 3)).sum() / max((seg == 3).sum() + (gt == 3).sum(), 1)
    assert row["dice_lv"] == pytest.approx(expected if (seg == 3).any() or (gt == 3).any() else 1.0)
    flags = row["qc_flags"].split(";") if row["qc_flags"] else []
    assert flags == [f"missing_{n}" for n in ("rv", "myo", "lv") if row[f"voxels_{n}"] == 0] + [
        f"implausible_volume_{n}" for n in ("rv", "myo", "lv")
        if row[f"voxels_{n}"] and not 2.0 <= row[f"volume_{n}_ml"] <= 500.0]
    # A 4-D study: one row per frame, EF from its largest and smallest LV frame.
    rows = segment_study(pdir / "patient002_4d.nii.gz", predictor, "ref", tmp_path / "out")
    assert [r["frame"] for r in rows] == [0, 1, 2, 3]
    lv = [r["volume_lv_ml"] for r in rows]
    # (NaN when the random model finds no LV in any frame: EF has no end-diastolic volume then.)
    assert rows[0]["ef_lv_pct"] == pytest.approx(ejection_fraction(max(lv), min(lv)), nan_ok=True)


def test_patient_ef_and_failed_rows_come_from_the_ledger(tmp_path):
    led = Ledger(tmp_path / "ledger.jsonl")
    ed = {"study": "/p/patient001_frame01.nii.gz", "frame": 0, "phase": "ED", "status": "done",
          "volume_lv_ml": 150.0, "volume_rv_ml": 160.0}
    es = {**ed, "study": "/p/patient001_frame09.nii.gz", "phase": "ES", "volume_lv_ml": 60.0, "volume_rv_ml": 80.0}
    led.append({"path": ed["study"], "sha256": "a", "model_version": "m/1", "status": "done", "rows": [ed]})
    led.append({"path": es["study"], "sha256": "b", "model_version": "m/1", "status": "done", "rows": [es]})
    led.append({"path": "/p/bad.nii", "sha256": "c", "model_version": "m/1", "status": "failed", "reason": "empty file"})
    rows = results_rows(Ledger(tmp_path / "ledger.jsonl"))
    assert [r["ef_lv_pct"] for r in rows[:2]] == [pytest.approx(60.0)] * 2
    assert [r["ef_rv_pct"] for r in rows[:2]] == [pytest.approx(50.0)] * 2
    assert rows[2] == {"study": "/p/bad.nii", "frame": -1, "status": "failed", "reason": "empty file",
                       "model_version": "m/1"}
    # results.csv and report.md list them by study and frame, not in the order they finished
    written = write_results(Ledger(tmp_path / "ledger.jsonl"), tmp_path)
    assert [Path(r["study"]).name for r in written] == ["bad.nii", "patient001_frame01.nii.gz", "patient001_frame09.nii.gz"]
    assert '"/p/bad.nii"' in (tmp_path / "results.csv").read_text().splitlines()[1]


def test_exclude_leaves_out_the_files_its_globs_match_and_names_a_glob_that_matches_none(tmp_path, capsys):
    """``infer --exclude GLOB``: the official layout's ``_4d`` cine files (by name, or by their path
    under the input) and a folder of DICOM files are no input; a line counts what each glob left out."""
    from synth import write_dicom_cine

    from raysegment.cli.infer import main
    from raysegment.inference.batch import discover

    for n in (1, 2):
        make_nifti_patient(tmp_path / "in", n, nframes=4, shape=(3, 40, 48))
    write_dicom_cine(tmp_path / "in" / "localizers", np.stack([synthetic_volume(1, shape=(3, 40, 48))[0]] * 2))
    ledger = Ledger(tmp_path / "out" / "ledger.jsonl")

    def found(*globs):
        return sorted(Path(i.get("file", i.get("path"))).name for i in discover(tmp_path / "in", tmp_path / "out",
                                                                                ledger, "v", globs))

    everything = found()
    assert len(everything) == 7 and "patient001_4d.nii.gz" in everything  # 2 × (4-D + ED + ES), the series
    assert capsys.readouterr().out == ""
    assert found("*_4d.nii.gz", "localizers/*", "*_4D.nii.gz") == [
        "patient001_frame01.nii.gz", "patient001_frame07.nii.gz", "patient002_frame01.nii.gz", "patient002_frame07.nii.gz"]
    assert capsys.readouterr().out == ("[raysegment] --exclude left out 2 files (*_4d.nii.gz), 6 files (localizers/*), "
                                       "nothing (*_4D.nii.gz matches no file)\n")
    assert found("training/patient002/*_4d.nii.gz") == [n for n in everything if n != "patient002_4d.nii.gz"]
    with pytest.raises(SystemExit):
        main(["--model", "shipped:mobilenet_v2", "--input", "http://pacs:8042/dicom-web", "--output", str(tmp_path / "o"),
              "--exclude", "*_4d.nii.gz"])
    assert "--exclude leaves out files of a folder input" in capsys.readouterr().err


def test_ledger_survives_a_torn_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    led = Ledger(path)
    led.append({"path": "/a", "sha256": "1", "model_version": "m/1", "status": "done"})
    with open(path, "a") as f:
        f.write('{"path": "/b", "sha2')  # killed mid-write
    again = Ledger(path)
    assert again.has("/a", "1", "m/1") and not again.has("/b", "1", "m/1")
    again.append({"path": "/b", "sha256": "2", "model_version": "m/1", "status": "failed"})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["path"] for e in lines] == ["/a", "/b"]
    # A writer that read the ledger before another was killed mid-line (the service beside a batch
    # run) appends after the torn line, not onto it: its entry survives the next repair.
    with open(path, "a") as f:
        f.write('{"path": "/c", "sha2')
    again.append({"path": "/d", "sha256": "4", "model_version": "m/1", "status": "done"})
    assert [e["path"] for e in Ledger(path).entries.values()] == ["/a", "/b", "/d"]
    assert [json.loads(line)["path"] for line in path.read_text().splitlines()] == ["/a", "/b", "/d"]


def test_the_series_of_a_stack_have_no_rows_of_their_own_once_the_stack_is_segmented(tmp_path):
    """Slice series skipped one by one before the rest of their stack arrived are the stack's rows
    once it is segmented (its entry names them as ``members``); a series of no stack keeps its row."""
    from raysegment.inference.ledger import results_rows

    led = Ledger(tmp_path / "ledger.jsonl")
    skipped = {"sha256": "s", "model_version": "m/1", "status": "skipped", "reason": "a single slice position"}
    for series in ("sa1", "sa2", "lax"):
        led.append({"path": f"dicom:1.2/{series}", **skipped})
    assert [r["study"] for r in results_rows(led)] == ["dicom:1.2/sa1", "dicom:1.2/sa2", "dicom:1.2/lax"]
    led.append({"path": "dicom:1.2/stack", "sha256": "t", "model_version": "m/1", "status": "done", "reason": "",
                "members": ["dicom:1.2/sa1", "dicom:1.2/sa2", "dicom:1.2/sa3"],
                "rows": [{"study": "dicom:1.2/stack", "frame": t, "status": "done"} for t in (0, 1)]})
    assert [(r["study"], r["frame"]) for r in results_rows(led)] == [
        ("dicom:1.2/lax", -1), ("dicom:1.2/stack", 0), ("dicom:1.2/stack", 1)]


def test_a_refreshed_ledger_reads_what_others_appended_in_the_order_written(tmp_path):
    """Two writers on one ledger: a refresh reads only the new lines, and each ends with the entries in
    the file's order, as a ledger read afresh has them (the last-written entry of a path is its latest)."""
    path = tmp_path / "ledger.jsonl"
    a, b = Ledger(path), Ledger(path)

    def entry(p: str, version: str) -> dict:
        return {"path": p, "sha256": "1", "model_version": version, "status": "done", "rows": []}

    a.append(entry("/s", "m/1"))
    b.append(entry("/t", "m/1"))
    b.append(entry("/s", "m/2"))
    a.append(entry("/t", "m/2"))
    for led in (a, b):
        led.refresh()
    fresh = Ledger(path)
    assert list(a.entries) == list(b.entries) == list(fresh.entries) == [
        ("/s", "1", "m/1"), ("/t", "1", "m/1"), ("/s", "1", "m/2"), ("/t", "1", "m/2")]
    assert a.latest == b.latest == fresh.latest == {"/s": ("/s", "1", "m/2"), "/t": ("/t", "1", "m/2")}


def test_the_actor_draws_an_overlay_of_frame_0_when_asked_or_flagged(tmp_path, predictor):
    import matplotlib.image

    pdir = make_nifti_patient(tmp_path / "in", 1, ed=1, es=2, nframes=2, shape=(3, 40, 48))
    rows = segment_study(pdir / "patient001_frame01.nii.gz", predictor, "ref", tmp_path / "out", figure=True)
    png = matplotlib.image.imread(rows[0]["figure"])  # a PNG another reader decodes
    mask = np.transpose(np.asarray(nib.load(rows[0]["mask"]).dataobj), (2, 1, 0))
    n = len(pick_slices(mask, 3))
    assert png.shape == (40, 48 * n + 4 * (n - 1), 3)
    rows = segment_study(pdir / "patient001_frame02.nii.gz", predictor, "ref", tmp_path / "out", figure=False)
    assert ("figure" in rows[0]) == bool(rows[0]["qc_flags"])


def test_thumbnail_outlines_each_structure_in_its_colour(tmp_path):
    import matplotlib.image

    image = np.full((1, 30, 30), 0.5)
    mask = np.zeros((1, 30, 30), np.uint8)
    mask[0, 5:15, 5:15] = 3  # LV: outline blue, inside grey
    mask[0, 20:26, 20:26] = 1  # RV: outline red
    rgb = (matplotlib.image.imread(overlay_thumbnail(image, mask, tmp_path / "t.png")) * 255).round().astype(int)
    assert rgb.shape == (30, 30, 3)
    assert tuple(rgb[5, 9]) == tuple(rgb[14, 9]) == (0x43, 0x63, 0xD8) and tuple(rgb[10, 10]) == (127, 127, 127)
    assert tuple(rgb[20, 22]) == (0xE6, 0x19, 0x4B) and tuple(rgb[0, 0]) == (127, 127, 127)
    edges = ((rgb != 127).any(axis=2))
    assert edges.sum() == 36 + 20  # the two squares' boundary pixels, nothing else


def test_report_shows_a_few_figures_flagged_first_and_keeps_its_table_intact(tmp_path):
    out = tmp_path / "out"
    rows = []
    for n, flags in ((1, ""), (2, ""), (3, "missing_rv"), (4, "")):
        png = out / "figures" / f"s{n}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(b"png")
        rows.append({"study": f"/in/s{n}.nii.gz", "frame": 0, "status": "done", "volume_rv_ml": 1.0,
                     "volume_myo_ml": 2.0, "volume_lv_ml": 3.0, "qc_flags": flags, "figure": str(png)})
    rows[3].pop("figure")  # a study the actor did not draw
    rows.append({"study": "/x/broken.nii", "frame": -1, "status": "failed", "reason": "line one\nline | two"})
    text = batch_report(rows, out, n_figures=2).read_text()
    assert "Overlays (2 of 4 studies)" in text
    assert [line for line in text.splitlines() if line.startswith("![")] == ["![s3](figures/s3.png)", "![s1](figures/s1.png)"]
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 5 and all(line.count(" | ") == 9 for line in table[1:] if "broken" not in line)
    assert "failed: line one line \\| two" in text  # one table row, the pipe escaped


def test_an_archive_larger_than_the_table_lists_its_failed_and_flagged_frames_and_says_so(tmp_path, monkeypatch):
    """Up to ``MAX_TABLE_ROWS`` study frames the table lists them all; beyond, the failed and flagged
    ones, with a line that says how many there are and that results.csv has them all."""
    import raysegment.reporting.batch as batch_module

    monkeypatch.setattr(batch_module, "MAX_TABLE_ROWS", 5)
    base = {"frame": 0, "status": "done", "volume_rv_ml": 1.0, "volume_myo_ml": 2.0, "volume_lv_ml": 3.0, "qc_flags": ""}
    rows = [{**base, "study": f"/in/s{n}.nii.gz"} for n in range(5)]
    def listed(text: str) -> list[str]:
        return [line.split(" |")[0][2:] for line in text.splitlines() if line.startswith("| ") and ".nii" in line]

    assert listed(batch_report(rows, tmp_path / "a", 0).read_text()) == [f"s{n}.nii.gz" for n in range(5)]
    rows += [{**base, "study": "/in/t.nii.gz", "qc_flags": "missing_rv"},
             {"study": "/in/bad.nii", "frame": -1, "status": "failed", "reason": "empty file"}]
    text = batch_report(rows, tmp_path / "b", 0).read_text()
    assert listed(text) == ["t.nii.gz", "bad.nii"]
    assert "7 study frames, more than the 5 this table lists: it lists the failed and flagged ones (2)." in text
    rows += [{**base, "study": f"/in/u{n}.nii.gz", "qc_flags": "missing_lv"} for n in range(5)]
    text = batch_report(rows, tmp_path / "c", 0).read_text()
    assert "flagged ones (the first 5 of 7)" in text and listed(text) == ["t.nii.gz", "bad.nii", "u0.nii.gz", "u1.nii.gz", "u2.nii.gz"]


def test_report_and_summary_give_the_mean_dice_of_the_frames_scored_against_gt(tmp_path):
    from raysegment.analysis.metrics import rows_dice_summary

    base = {"frame": 0, "status": "done", "volume_rv_ml": 1.0, "volume_myo_ml": 2.0, "volume_lv_ml": 3.0, "qc_flags": ""}
    rows = [{**base, "study": "/in/a_frame01.nii.gz", "dice_rv": 0.9, "dice_myo": 0.8, "dice_lv": 0.95, "in_plane": "as-stored"},
            {**base, "study": "/in/a_frame07.nii.gz", "dice_rv": 0.7, "dice_myo": 0.9, "dice_lv": 0.85,
             "in_plane": "rows-reversed"},
            {**base, "study": "/in/no_gt.nii.gz"},  # no _gt beside it: not in the means
            {"study": "/in/bad.nii", "frame": -1, "status": "failed", "reason": "empty file"}]
    summary = rows_dice_summary(rows)
    assert summary == pytest.approx({"volumes": 2, "dice_rv": 0.8, "dice_myo": 0.85, "dice_lv": 0.9, "dice_mean": 0.85})
    text = batch_report(rows, tmp_path / "out", n_figures=0).read_text()
    assert ("Against the reference masks (`_gt` files, nnU-Net's `labelsXx`) of 2 study frames, mean 3-D Dice: "
            "RV 0.800, MYO 0.850, LV 0.900 (mean 0.850).") in text
    # --in-plane auto turned one of them: named, so that a folder converted another way is seen
    assert "in-plane orientation than stored (1 study; results' `in_plane` column): a_frame07.nii.gz." in text
    assert rows_dice_summary(rows[2:]) is None and "Against the" not in batch_report(rows[2:], tmp_path / "o2", 0).read_text()


def test_report_gives_the_mean_dice_per_level_over_the_frames_that_draw_the_structure_there(tmp_path):
    from raysegment.analysis.levels import rows_level_dice

    def levels(rv_apex):
        return {f"dice_{c}_{lev}": 0.9 for c in ("rv", "myo", "lv") for lev in ("base", "mid", "apex")} | {"dice_rv_apex": rv_apex}

    base = {"frame": 0, "status": "done", "volume_rv_ml": 1.0, "volume_myo_ml": 2.0, "volume_lv_ml": 3.0, "qc_flags": "",
            "dice_rv": 0.9, "dice_myo": 0.9, "dice_lv": 0.9}
    rows = [{**base, "study": "/in/a_frame01.nii.gz", **levels(0.5)},
            {**base, "study": "/in/a_frame07.nii.gz", **levels(float("nan"))},  # no RV at its apex in either mask
            {**base, "study": "/in/b_frame01.nii.gz", **levels(0.7)},
            {**base, "study": "/in/no_gt.nii.gz"}]
    by_level = rows_level_dice(rows)
    assert by_level["apex"]["rv"] == pytest.approx(0.6) and by_level["base"] == pytest.approx({"rv": .9, "myo": .9, "lv": .9})
    text = batch_report(rows, tmp_path / "out", n_figures=0).read_text()
    assert ("mean Dice RV / MYO / LV: base 0.900 / 0.900 / 0.900; mid 0.900 / 0.900 / 0.900; "
            "apex 0.600 / 0.900 / 0.900.") in text
    assert rows_level_dice(rows[3:]) is None and "By level" not in batch_report(rows[3:], tmp_path / "o2", 0).read_text()


def test_an_ensemble_segments_a_study_with_the_members_mean_softmax(tmp_path, tiny_model):
    import torch

    from raysegment.config import PredictConfig
    from raysegment.inference.predictor import keep_largest_component
    from raysegment.model.unet import build_model

    model, config = tiny_model
    torch.manual_seed(7)
    other = build_model(config.model).eval()
    refs = [str(write_checkpoint(tmp_path / "a", model, config)), str(write_checkpoint(tmp_path / "b", other, config))]
    ensemble = Predictor.load(refs, PredictConfig(precision="fp32"))
    assert len(ensemble.members) == 2 and ensemble.version.count("+") == 1
    pdir = make_nifti_patient(tmp_path / "in", 5, ed=1, es=2, nframes=2, spacing=(8.0, 1.4, 1.4))
    (row,) = segment_study(pdir / "patient005_frame02.nii.gz", ensemble, " + ".join(refs), tmp_path / "out")
    seg = np.transpose(np.asarray(nib.load(row["mask"]).dataobj), (2, 1, 0))
    frame = np.transpose(np.asarray(nib.load(str(pdir / "patient005_frame02.nii.gz")).dataobj, np.float64), (2, 1, 0))
    probs = [Predictor.load(r, PredictConfig(precision="fp32")).probabilities(frame) for r in refs]
    np.testing.assert_array_equal(seg, keep_largest_component(((probs[0] + probs[1]) / 2).argmax(0).astype(np.uint8), 5))
    assert row["model_version"] == ensemble.version


def test_gpu_flag_gives_each_actor_a_gpu_and_predicts_on_cuda():
    from raysegment.cli.infer import build_parser
    from raysegment.config import InferConfig
    from raysegment.inference.actors import actor_options

    a = build_parser().parse_args(["--model", "m", "--input", "i", "--output", "o", "--gpu"])
    assert a.gpus_per_actor == 1.0
    opts = actor_options(InferConfig(models=("m",), input="i", output="o", gpus_per_actor=0.5, cpus_per_actor=2))
    assert opts["num_gpus"] == 0.5 and opts["num_cpus"] == 2
    assert actor_options(InferConfig(models=("m",), input="i", output="o"))["num_gpus"] == 0


def test_a_rerun_with_nothing_new_in_a_folder_starts_no_ray_and_changed_content_is_segmented(tmp_path, tiny_checkpoint,
                                                                                                monkeypatch):
    """A cron poll of a settled folder: its files are hashed first, nothing starts (no actors to
    kill half-created, whose Ray errors the console showed). A file whose content changed under the
    same path still starts the actors, once hashing has found it."""
    import ray

    from raysegment.config import InferConfig
    from raysegment.inference.batch import pinned_models, run_batch
    from raysegment.inference.ledger import _entry
    from raysegment.model.weights import sha256

    inp = tmp_path / "in"
    inp.mkdir()
    study = inp / "a.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.float32), np.eye(4)), str(study))
    config = InferConfig(models=(str(tiny_checkpoint),), input=str(inp), output=str(tmp_path / "out"), progress=False)
    version = pinned_models(config)[1]
    Ledger(tmp_path / "out" / "ledger.jsonl").append(
        {**_entry(str(study.resolve()), sha256(study), version, "failed", "too small"), "finished": "2026-12-06T10:00:00"})
    summary = run_batch(config)
    assert (summary["already_done"], summary["actors"]) == (1, 0) and not ray.is_initialized()

    class Started(Exception):
        pass

    def start(*args, **kwargs):
        raise Started

    monkeypatch.setattr("raysegment.runtime.ensure_ray", start)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 2), np.float32), np.eye(4)), str(study))
    with pytest.raises(Started):
        run_batch(config)


def test_a_poll_reads_no_file_whose_size_times_and_inode_were_recorded_when_it_was_hashed(tmp_path, tiny_checkpoint,
                                                                                         monkeypatch):
    """A cron poll of a large archive hashed every file again; now a file whose stat is the one the
    output's hash cache recorded keeps its hash unread. A file rewritten (same size, new bytes) is
    read, and is new; a damaged cache only costs reading every file again."""
    from raysegment.config import InferConfig
    from raysegment.inference import batch
    from raysegment.inference.batch import pinned_models, run_batch
    from raysegment.model.weights import sha256

    inp = tmp_path / "in"
    inp.mkdir()
    studies = [inp / f"{n}.nii.gz" for n in ("a", "b")]
    for n, study in enumerate(studies):
        nib.save(nib.Nifti1Image(np.full((8, 8, 2), n, np.float32), np.eye(4)), str(study))
    config = InferConfig(models=(str(tiny_checkpoint),), input=str(inp), output=str(tmp_path / "out"), progress=False)
    version = pinned_models(config)[1]
    ledger = Ledger(tmp_path / "out" / "ledger.jsonl")
    for study in studies:  # as a run that segmented them wrote them
        ledger.append({"path": str(study.resolve()), "sha256": sha256(study), "model_version": version, "status": "done",
                       "reason": "", "rows": []})
    read = []
    monkeypatch.setattr(batch, "sha256", lambda p: read.append(Path(p).name) or sha256(p))
    assert (run_batch(config)["already_done"], read) == (2, ["a.nii.gz", "b.nii.gz"])  # no cache yet
    read.clear()
    summary = run_batch(config)
    assert (summary["already_done"], summary["actors"], read) == (2, 0, [])
    (tmp_path / "out" / "hashes.json").write_text('{"torn')
    assert (run_batch(config)["already_done"], read) == (2, ["a.nii.gz", "b.nii.gz"])
    read.clear()

    class Started(Exception):
        pass

    monkeypatch.setattr("raysegment.runtime.ensure_ray", lambda *a, **k: (_ for _ in ()).throw(Started()))
    data = bytearray(studies[1].read_bytes())
    data[-5] ^= 0xFF  # same size, other bytes (the gzip trailer)
    studies[1].write_bytes(bytes(data))
    with pytest.raises(Started):
        run_batch(config)
    assert read == ["b.nii.gz"]


def test_a_poll_of_a_settled_dicom_folder_opens_no_file_and_one_rewritten_instance_alone(tmp_path, monkeypatch):
    """``discover`` keeps what each file was (DICOM UIDs and plane, a bad DICOM's reason, no DICOM) in the output's
    ``dicom.json`` with its stat: a settled folder is stat'ed, not opened; a rewritten instance is read
    again and changes its series' content; a damaged cache only costs opening every file again."""
    import pydicom

    import raysegment.io.dicom as dicom_module
    from raysegment.inference.batch import discover
    from raysegment.soak.dicom_cine import write_dicom_cine

    inp, out = tmp_path / "in", tmp_path / "out"
    files = write_dicom_cine(inp / "cine", np.random.default_rng(0).random((2, 3, 16, 16)))
    (inp / "notes.txt").write_text("not DICOM")
    (inp / "broken.dcm").write_bytes(b"")
    opened = []
    real_kind = dicom_module._file_kind
    monkeypatch.setattr(dicom_module, "_file_kind", lambda p: opened.append(p.name) or real_kind(p))
    ledger = Ledger(out / "ledger.jsonl")

    def poll() -> tuple[list[dict], int]:
        opened.clear()
        return discover(inp, out, ledger, "m/1"), len(opened)

    first, n = poll()
    assert n == 8 and len(first) == 1 and len(first[0]["files"]) == 6
    assert [e["reason"] for e in ledger.entries.values()] == ["unreadable DICOM (an empty file)"]
    assert poll() == (first, 0)
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(files[0])
    again, n = poll()
    assert n == 1 and again[0]["path"] == first[0]["path"] and again[0]["sha256"] != first[0]["sha256"]
    (out / "dicom.json").write_text("[1, 2")
    assert poll() == (again, 8)
    # A cache written before the planes were kept (4 items per DICOM file): those files are read again.
    cache = json.loads((out / "dicom.json").read_text())
    (out / "dicom.json").write_text(json.dumps({k: [st, kind[:4]] for k, (st, kind) in cache.items()}))
    assert poll() == (again, 6)


def test_a_folder_of_files_none_a_study_says_what_they_are_and_an_empty_one_says_nothing(tmp_path, tiny_checkpoint,
                                                                                         capsys):
    """``infer --input`` a folder of SSL4MIS ``.h5`` volumes said only "0 studies"; now a note names
    what is there and, for ``.h5``, the commands that segment and score them. An empty folder (a
    poll with nothing new) and the job's own output inside its input give no note."""
    from raysegment.config import InferConfig
    from raysegment.inference.batch import run_batch

    inp = tmp_path / "in"
    (inp / "out").mkdir(parents=True)
    config = InferConfig(models=(str(tiny_checkpoint),), input=str(inp), output=str(inp / "out"), progress=False)
    (inp / "out" / "results.csv").write_text("")  # the job's own, not its input
    assert run_batch(config)["actors"] == 0
    assert "holds" not in capsys.readouterr().out
    for name in ("patient002_frame01.h5", "patient002_frame02.h5", "notes.txt"):
        (inp / name).write_bytes(b"x")
    run_batch(config)
    assert f"[raysegment] {inp} holds 3 files (2 .h5, 1 .txt) but no NIfTI study or DICOM series; .h5 volumes (the " \
           f"SSL4MIS layout) are a source of shards: python -m raysegment.prepare --source {inp} --out SHARDS" \
           in capsys.readouterr().out


def test_the_done_line_says_what_happened_in_words():
    from raysegment.cli.infer import done_line

    summary = {"studies": 9, "segmented": 1, "failed": 2, "not_cine": 0, "errors": 3, "already_done": 2, "later": 1,
               "version": "raysegment-mobilenet_v2/4", "actors": 2,
               "dice_vs_gt": {"volumes": 2, "dice_rv": 0.8, "dice_myo": 0.85, "dice_lv": 0.9, "dice_mean": 0.85}}
    assert done_line(summary, "/data/seg") == (
        "done: 1 segmented, 2 failed, 0 not cine, 3 errors to retry; 2 already done by raysegment-mobilenet_v2/4; "
        "1 left to later runs (--limit). Dice against the reference masks (2 frames): RV 0.800, MYO 0.850, LV 0.900, "
        "mean 0.850. Results: /data/seg/report.md")
    del summary["later"], summary["dice_vs_gt"]
    assert done_line(summary, "out").endswith("already done by raysegment-mobilenet_v2/4. Results: out/report.md")


@pytest.mark.slow
def test_batch_job_faults_bad_neighbours_and_reruns(tmp_path, tiny_checkpoint, monkeypatch):
    """One folder with every awkward case, three runs: a study that kills its worker fails after
    bounded attempts; an environment fault (the masks folder blocked) is an ``error`` that the next
    run retries; the output folder inside the input and a relative --output are no input;
    ``scan.nii`` beside ``scan.nii.gz`` keep their own masks; a looping symlink gets a failed row."""
    from dataclasses import replace

    import ray

    from raysegment.config import InferConfig
    from raysegment.inference.batch import run_batch

    inp = tmp_path / "in"
    inp.mkdir()
    img = np.random.default_rng(0).random((40, 48, 3)).astype(np.float32)
    for name in ("a.nii.gz", "crash_me.nii.gz", "scan.nii", "scan.nii.gz"):
        nib.save(nib.Nifti1Image(img, np.diag([1.5, 1.5, 8, 1])), str(inp / name))
    (inp / "loop.nii.gz").symlink_to(inp / "loop.nii.gz")
    # DICOM beside them: a cine series (files named by hash), a secondary capture, a corrupt file.
    from synth import write_dicom_cine

    cine = np.stack([synthetic_volume(1, shape=(3, 40, 48))[0], synthetic_volume(2, shape=(3, 40, 48))[0]])
    write_dicom_cine(inp / "dicom" / "cine", cine)
    write_dicom_cine(inp / "dicom" / "sc", cine[:, :2], modality="OT")
    (inp / "dicom" / "broken").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    monkeypatch.chdir(tmp_path)
    (inp / "out").mkdir()
    (inp / "out" / "masks").write_text("in the way")  # masks cannot be written: an environment fault
    config = InferConfig(models=(str(tiny_checkpoint),), input="in", output="in/out", threads=1, actors=1,
                         crash_on="crash_me", max_attempts=2, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        first = run_batch(config)
        (inp / "out" / "masks").unlink()  # the operator fixes the disk
        second = run_batch(config)
        for name in ("new_study.nii.gz", "new_study2.nii.gz"):  # arrive later; --limit 1 takes one of them
            nib.save(nib.Nifti1Image(img, np.diag([1.5, 1.5, 8, 1])), str(inp / name))
        third = run_batch(replace(config, limit=1))
    finally:
        ray.shutdown()
    out = inp / "out"
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    by_name = {}
    for e in ledger:
        by_name.setdefault(Path(e["path"]).name, []).append(e["status"])
    # 5 NIfTI files and 2 DICOM series; 4 writes blocked (3 NIfTI, the cine), crash, loop, the capture skipped
    # The study that kills its worker: an error in the first run (its worker might have died of
    # something else), failed for good when it kills them again in the next.
    assert first["studies"] == 7 and first["errors"] == 5 and first["failed"] == 1 and first["not_cine"] == 1
    assert by_name["crash_me.nii.gz"] == ["error", "failed"] and by_name["loop.nii.gz"] == ["failed"]
    assert by_name["broken"] == ["failed"]  # the corrupt DICOM file: one row, not one per run
    crash = [e["reason"] for e in ledger if "crash_me" in e["path"]]
    assert crash[0].startswith("worker died on this study (2 attempts)") and "and in an earlier run" in crash[1]
    assert second["segmented"] == 4 and second["failed"] == 1 and second["already_done"] == 2  # errors retried
    # The next run: its own masks and SEGs under in/out are no studies, what is settled is skipped,
    # the study that arrived since is segmented.
    assert third["studies"] == 9 and third["already_done"] == 7 and third["segmented"] == 1 and third["later"] == 1
    last = json.loads((inp / "out" / "last_run.json").read_text())  # the latest run's, for a scheduler's checks
    assert last.pop("finished")[:4].isdigit() and last == third
    skipped = [e for e in ledger if e["status"] == "skipped"]
    assert len(skipped) == 1 and "not MR (modality OT" in skipped[0]["reason"]
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert len(masks) == 5 and len({m.split("_")[0] for m in masks}) == 4  # scan.nii and scan.nii.gz apart
    series_rows = [r for r in results_rows(Ledger(out / "ledger.jsonl")) if r["study"].startswith("dicom:")]
    assert [r["frame"] for r in series_rows if r["status"] == "done"] == [0, 1]
    assert all(Path(r["seg"]).is_file() for r in series_rows if r["status"] == "done")
    rows = [r for r in results_rows(Ledger(out / "ledger.jsonl")) if r["status"] == "done"]
    assert all(Path(r["mask"]).is_absolute() and Path(r["mask"]).exists() for r in rows)
    assert oct((out / "results.csv").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


@pytest.mark.slow
def test_ctrl_c_or_sigterm_ends_a_batch_with_one_line_and_keeps_what_it_finished(tmp_path):
    """Ctrl-C in the terminal (SIGINT to the command's process group, its local Ray's processes too),
    then SIGTERM to the next run's driver: each exit 130, one ``interrupted:`` line and no traceback;
    what finished is in the ledger and in report.md and results.csv, and the line counts what the
    next run has left."""
    import os
    import sys

    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(24):
        nib.save(nib.Nifti1Image(synthetic_volume(i, shape=(3, 40, 48))[0].transpose(2, 1, 0), np.diag([1.5, 1.5, 8, 1])),
                 str(inp / f"s{i:02d}.nii.gz"))
    cmd = [sys.executable, "-m", "raysegment.infer", "--model", "shipped:mobilenet_v2", "--input", str(inp),
           "--output", str(tmp_path / "out"), "--actors", "1", "--threads", "1", "--diagnosis", "none"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0"}
    text = interrupt_when(cmd, env, tmp_path / "log", lambda out: " ok (" in out, group=True)
    assert "Traceback" not in text and "done:" not in text, text[-3000:]
    line = next(x for x in text.splitlines() if x.startswith("interrupted: "))
    finished, left = (int(w) for w in (line.split()[1], line.split()[-1]))
    ledger = [json.loads(x) for x in (tmp_path / "out" / "ledger.jsonl").read_text().splitlines()]
    assert 1 <= finished == len(ledger) and finished + left == 24, line
    assert all(e["status"] == "done" for e in ledger)  # the study it was on is new to the next run, not an error
    assert (tmp_path / "out" / "report.md").read_text().count("| done |") == finished
    assert (tmp_path / "out" / "results.csv").read_text().count('"done"') == finished
    # A scheduler's stop (SIGTERM to the driver alone) the same way: Ray's handler ended the loop
    # with SystemExit and the command with exit 1 and no line, results and report unwritten.
    import signal

    again = interrupt_when(cmd, env, tmp_path / "log2", lambda out: " ok (" in out, sig=signal.SIGTERM)
    line = next(x for x in again.splitlines() if x.startswith("interrupted: "))
    now = int(line.split()[1])
    assert 1 <= now and finished + now == len((tmp_path / "out" / "ledger.jsonl").read_text().splitlines()), line
    assert (tmp_path / "out" / "report.md").read_text().count("| done |") == finished + now


def test_actor_plan_fills_the_free_cpus_or_gpus_at_most_one_per_study():
    from raysegment.config import InferConfig
    from raysegment.inference.actors import plan_actors

    base = InferConfig(models=("m",), input="i", output="o")
    auto = plan_actors(base, {"CPU": 8.0}, n_studies=100)
    assert (auto.actors, auto.threads) == (8, 1)
    assert plan_actors(base, {"CPU": 8.0}, n_studies=3).actors == 3
    wide = plan_actors(InferConfig(models=("m",), input="i", output="o", cpus_per_actor=4), {"CPU": 8.0}, 100)
    assert (wide.actors, wide.threads) == (2, 4)
    gpu = plan_actors(InferConfig(models=("m",), input="i", output="o", gpus_per_actor=0.5), {"CPU": 8.0, "GPU": 2.0}, 100)
    assert gpu.actors == 4
    assert plan_actors(base, {}, 5).actors == 1  # nothing free now: one actor, which waits for a CPU
    explicit = InferConfig(models=("m",), input="i", output="o", actors=2)
    assert plan_actors(explicit, {"CPU": 64.0}, 100) == explicit  # the node's cores shared, as before
    with pytest.raises(ValueError, match="actors must be ≥ 1"):
        plan_actors(InferConfig(models=("m",), input="i", output="o", actors=0), {"CPU": 2.0}, 5)


def test_out_of_gpu_memory_halves_the_batch_and_tries_the_study_again(tmp_path, predictor, monkeypatch):
    import torch

    from raysegment.inference.study import segment_with_backoff

    pdir = make_nifti_patient(tmp_path / "in", 1, ed=1, es=2, nframes=2, shape=(3, 40, 48))
    tries = []
    real = Predictor.predict

    def predict_on_a_small_gpu(self, image, **kw):  # CUDA's OOM, raised for batches over 2 slices
        tries.append(self.config.batch_size)
        if self.config.batch_size > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, image, **kw)

    monkeypatch.setattr(Predictor, "predict", predict_on_a_small_gpu)
    rows = segment_with_backoff(pdir / "patient001_frame01.nii.gz", predictor, "ref", tmp_path / "out", False)
    assert rows[0]["status"] == "done" and tries == [16, 8, 4, 2] and predictor.config.batch_size == 2
    monkeypatch.setattr(Predictor, "predict", lambda self, image, **kw: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(torch.cuda.OutOfMemoryError):  # even 1 slice does not fit: the study fails
        segment_with_backoff(pdir / "patient001_frame02.nii.gz", predictor, "ref", tmp_path / "out", False)
    assert predictor.config.batch_size == 1


def test_ledger_settles_done_and_failed_studies_but_retries_errors(tmp_path):
    led = Ledger(tmp_path / "ledger.jsonl")
    for path, status in (("/a", "done"), ("/b", "failed"), ("/c", "error")):
        led.append({"path": path, "sha256": "1", "model_version": "m/1", "status": status, "reason": ""})
    assert led.has("/a", "1", "m/1") and led.has("/b", "1", "m/1") and not led.has("/c", "1", "m/1")
    assert not led.has("/b", "1", "m/1", retry_failed=True) and led.has("/a", "1", "m/1", retry_failed=True)
    assert not led.has("/a", "2", "m/1")  # new content


def test_results_keep_only_the_latest_content_of_a_study_file(tmp_path):
    led = Ledger(tmp_path / "ledger.jsonl")
    row = {"study": "/s.nii.gz", "frame": 0, "status": "done", "volume_lv_ml": 1.0}
    led.append({"path": "/s.nii.gz", "sha256": "old", "model_version": "m/1", "status": "done", "rows": [row]})
    led.append({"path": "/t.nii.gz", "sha256": "t", "model_version": "m/1", "status": "failed", "reason": "bad"})
    led.append({"path": "/s.nii.gz", "sha256": "new", "model_version": "m/1", "status": "done",
                "rows": [{**row, "volume_lv_ml": 2.0}]})
    rows = results_rows(Ledger(tmp_path / "ledger.jsonl"))
    assert [(r["study"], r.get("volume_lv_ml")) for r in rows] == [("/t.nii.gz", None), ("/s.nii.gz", 2.0)]


def test_after_a_rollback_the_version_rolled_back_to_segments_again_what_another_wrote_last(tmp_path):
    """v1, then v2 (a new champion), then v1 again (rolled back): the output holds v2's masks, so v1's
    old entry no longer settles the study; once v1 has written it again the results are v1's, in the
    order last written, also for a ledger read afresh."""
    led = Ledger(tmp_path / "ledger.jsonl")

    def done(version: str, lv: float) -> dict:
        return {"path": "/s.nii.gz", "sha256": "1", "model_version": version, "status": "done",
                "rows": [{"study": "/s.nii.gz", "frame": 0, "status": "done", "model_version": version, "volume_lv_ml": lv}]}

    led.append(done("m/1", 1.0))
    led.append({"path": "/t.nii.gz", "sha256": "t", "model_version": "m/1", "status": "done", "rows": []})
    led.append(done("m/2", 2.0))
    assert led.has("/s.nii.gz", "1", "m/2") and not led.has("/s.nii.gz", "1", "m/1")
    assert led.has("/t.nii.gz", "t", "m/1")  # what v2 has not written is still v1's
    led.append(done("m/1", 1.0))
    for ledger in (led, Ledger(tmp_path / "ledger.jsonl")):
        assert ledger.has("/s.nii.gz", "1", "m/1") and not ledger.has("/s.nii.gz", "1", "m/2")
        assert [(r["study"], r["model_version"]) for r in results_rows(ledger)] == [("/s.nii.gz", "m/1")]
        assert ledger.stored_versions("/s.nii.gz") == set()
    led.append({**done("m/2", 2.0), "rows": [{"stored": True}]})
    assert led.stored_versions("/s.nii.gz") == {"m/2"}


def test_a_ledger_mostly_of_superseded_lines_is_rewritten_with_the_same_meaning(tmp_path):
    """A series retried at every poll while its PACS was down appends an error line each time: read
    again, a ledger of more than ``COMPACT_AT`` lines per entry keeps each key's last line, in the
    order last written, so it says what it said and each later poll reads a little file."""
    from raysegment.inference.ledger import COMPACT_AT

    path = tmp_path / "ledger.jsonl"
    led = Ledger(path)
    first = {"path": "/a", "sha256": "1", "model_version": "m/1", "status": "done", "rows": [{"stored": True}]}
    led.append(first)
    tries = COMPACT_AT * 3 + 120
    for i in range(tries):
        led.append({"path": "/b", "sha256": "2", "model_version": "m/1", "status": "error", "reason": f"try {i}", "rows": []})
    led.append(last := {"path": "/a", "sha256": "1", "model_version": "m/2", "status": "done", "rows": []})
    assert len(path.read_text().splitlines()) == tries + 2
    rows = results_rows(led)
    after = Ledger(path)
    b = {"path": "/b", "sha256": "2", "model_version": "m/1", "status": "error", "reason": f"try {tries - 1}", "rows": []}
    assert [json.loads(line) for line in path.read_text().splitlines()] == [first, b, last]
    assert list(after.entries.values()) == list(led.entries.values()) and after.latest == led.latest
    assert results_rows(after) == rows and after.stored_versions("/a") == {"m/1"}
    assert not after.has("/a", "1", "m/1") and after.has("/a", "1", "m/2")
    small = path.read_text()
    Ledger(path)
    assert path.read_text() == small  # a ledger of live lines is left as it is


def test_unusable_ground_truth_is_flagged(tmp_path, predictor):
    pdir = make_nifti_patient(tmp_path, 3, ed=1, es=2, nframes=2, shape=(3, 40, 48))
    gt = pdir / "patient003_frame01_gt.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 3), np.uint8), np.eye(4)), str(gt))  # wrong shape
    (row,) = segment_study(pdir / "patient003_frame01.nii.gz", predictor, "ref", tmp_path / "out")
    assert "gt_ignored_shape_3x20x20" in row["qc_flags"].split(";") and "dice_lv" not in row


def test_model_repeated_on_the_command_line_makes_an_ensemble():
    from raysegment.cli.infer import build_parser

    a = build_parser().parse_args(["--model", "models:/a@champion", "--model", "b.safetensors", "--input", "i",
                                   "--output", "o"])
    assert a.models == ["models:/a@champion", "b.safetensors"]


def _patient_rows(pdir: Path) -> list[dict]:
    """Result rows as ``segment_study`` writes them for ED and ES, the reference labels as the masks."""
    rows = []
    for phase, frame in (("ED", 1), ("ES", 7)):
        study = pdir / f"{pdir.name}_frame{frame:02d}.nii.gz"
        rows.append({"study": str(study), "frame": 0, "phase": phase, "status": "done",
                     "mask": str(pdir / f"{pdir.name}_frame{frame:02d}_gt.nii.gz"),
                     "spacing_mm": json.dumps([10.0, 1.5, 1.25])})
    return rows


def test_a_dicom_cine_series_has_one_ef_on_every_frame_row(tmp_path):
    from raysegment.analysis.diagnosis import load
    from raysegment.inference.ledger import add_patient_clinical

    labels = [synthetic_volume(s, shape=(5, 40, 48), lv_radius=r)[1] for s, r in ((1, 7.0), (2, 6.0), (3, 5.0))]
    mask = tmp_path / "series_seg.nii.gz"
    img = nib.Nifti1Image(np.stack([np.transpose(m, (2, 1, 0)) for m in labels], axis=-1).astype(np.uint8),
                          np.diag([1.25, 1.5, 10.0, 1.0]))
    nib.save(img, str(mask))
    key = "dicom:1.2.3/1.2.3.4"
    rows = [{"study": key, "frame": f, "phase": ph, "status": "done", "mask": str(mask),
             "spacing_mm": json.dumps([10.0, 1.5, 1.25]), "ef_lv_pct": -1.0, "ef_rv_pct": -1.0}
            for f, ph in ((0, "ED"), (1, ""), (2, "ES"))]
    add_patient_clinical(rows, load("shipped"))
    assert rows[0]["lv_ef_pct"] == rows[2]["lv_ef_pct"] and "lv_ef_pct" not in rows[1]
    for r in rows:  # the frame-volume EF of every frame's row is the patient's checked EF
        assert (r["ef_lv_pct"], r["ef_rv_pct"]) == (rows[0]["lv_ef_pct"], rows[0]["rv_ef_pct"])
    # In report.md the series is named by its patient ID and description, not by its UID alone.
    for r in rows:
        r.update(patient_id="P7", series_description="SA cine", volume_rv_ml=1.0, volume_myo_ml=1.0, volume_lv_ml=1.0)
    text = batch_report(rows, tmp_path, 0).read_text()
    assert f"| P7 SA cine (series …{'1.2.3.4'[-8:]}) | {rows[0]['lv_edv_ml']:.1f} |" in text
    # The flags the table shows are explained below it (a DICOM series without PatientSize/Weight here).
    assert "no_height_weight |" in text and "QC: `no_height_weight`: height or weight unknown" in text


def test_patients_with_ed_and_es_get_clinical_indices_and_a_diagnosis_never_from_their_group(tmp_path):
    from raysegment.analysis.basal import checked_indices
    from raysegment.analysis.diagnosis import GROUPS, features, load
    from raysegment.inference.ledger import add_patient_clinical
    from raysegment.io.studies import read_study

    pdir = make_nifti_patient(tmp_path, 5, group="HCM")
    model = load("shipped")
    rows = _patient_rows(pdir)
    add_patient_clinical(rows, model)
    ed, es = (rows[0], rows[1])
    masks = [read_study(Path(r["mask"]))[1][0].astype(np.uint8) for r in rows]
    ind, basal = checked_indices(masks[0], masks[1], (10.0, 1.5, 1.25), 180.0, 80.0, model.basal_rv)
    assert ed["lv_ef_pct"] == es["lv_ef_pct"] == pytest.approx(ind["lv_ef_pct"], abs=1e-3)
    assert (ed["ef_lv_pct"], ed["ef_rv_pct"]) == (es["ef_lv_pct"], es["ef_rv_pct"]) == (ed["lv_ef_pct"], ed["rv_ef_pct"])
    assert ed["rv_esv_ml"] == pytest.approx(ind["rv_esv_ml"], abs=1e-3)
    assert ed["bsa_m2"] == pytest.approx(2.0, abs=1e-3)  # Info.cfg: 180 cm, 80 kg
    assert basal and all(ed[k] == v for k, v in basal.items())  # what the basal ES check did, on the rows
    probs = [ed[f"p_{g}"] for g in GROUPS]
    assert sum(probs) == pytest.approx(1.0, abs=1e-3)
    assert ed["diagnosis"] == GROUPS[int(np.argmax(model.predict_proba(features(ind))[0]))]
    assert ed["group_reference"] == "HCM"
    # Without height and weight the diagnosis indexes the volumes by the model's training median BSA
    # (its features are those of a patient of that BSA), not by each indexed volume's median.
    info = pdir / "Info.cfg"
    plain_info = info.read_text()
    drop_info_lines(pdir, "Height", "Weight")
    unsized = _patient_rows(pdir)
    add_patient_clinical(unsized, model)
    no_bsa, _ = checked_indices(masks[0], masks[1], (10.0, 1.5, 1.25), None, None, model.basal_rv)
    assert "no_height_weight" in unsized[0]["patient_qc_flags"] and np.isnan(unsized[0]["bsa_m2"])
    sized = no_bsa | {k: v * 2.0 / model.bsa_m2 for k, v in ind.items() if k.endswith("_per_m2")}
    p = model.predict_proba(features(sized))[0]
    assert [unsized[0][f"p_{g}"] for g in GROUPS] == pytest.approx(p.round(4).tolist(), abs=1e-4)
    assert not np.allclose(p, model.predict_proba(features(no_bsa))[0], atol=1e-3)  # what each median gave
    info.write_text(plain_info)
    # The Group line is for scoring only: another group there changes nothing else.
    info = pdir / "Info.cfg"
    info.write_text(info.read_text().replace("Group: HCM", "Group: NOR"))
    again = _patient_rows(pdir)
    add_patient_clinical(again, model)
    assert again[0]["group_reference"] == "NOR"
    assert {k: v for k, v in again[0].items() if k != "group_reference"} == {k: v for k, v in ed.items() if k != "group_reference"}
    # Without a diagnosis model: indices, no diagnosis; a lone ED frame gets nothing.
    plain = _patient_rows(pdir)
    add_patient_clinical(plain, None)
    assert "diagnosis" not in plain[0] and plain[0]["lv_edv_ml"] > 0 and "rv_es_basal_excess_ml" not in plain[0]
    lone = _patient_rows(pdir)[:1]
    add_patient_clinical(lone, model)
    assert "lv_ef_pct" not in lone[0]


def test_a_poll_reads_the_masks_of_no_settled_patient_and_of_each_whose_mask_size_or_model_changed(tmp_path, monkeypatch):
    """``write_results`` keeps each patient's indices in ``OUTPUT/clinical.json`` with what they came from
    (mask files, height, weight, diagnosis model): a poll that finds nothing new reads no mask and writes
    the same results; a rewritten mask, a new height or another diagnosis model recomputes that patient."""
    import raysegment.inference.ledger as ledger_module
    from raysegment.analysis.diagnosis import load

    reads = []
    real_read = ledger_module.read_study
    monkeypatch.setattr(ledger_module, "read_study", lambda path: reads.append(Path(path).name) or real_read(path))
    out, model = tmp_path / "out", load("shipped")
    out.mkdir()
    led = Ledger(out / "ledger.jsonl")
    pdirs = [make_nifti_patient(tmp_path, n, group="HCM") for n in (5, 6)]
    for pdir in pdirs:
        for i, row in enumerate(_patient_rows(pdir)):
            led.append({"path": row["study"], "sha256": f"{pdir.name}{i}", "model_version": "m/1", "status": "done",
                        "rows": [row | {"volume_lv_ml": 1.0, "volume_rv_ml": 1.0}]})

    def poll(diagnosis=model) -> list[str]:
        reads.clear()
        write_results(Ledger(out / "ledger.jsonl"), out, diagnosis)
        return sorted({name.split("_")[0] for name in reads})

    assert poll() == ["patient005", "patient006"]
    first = (out / "results.csv").read_bytes()
    assert poll() == [] and (out / "results.csv").read_bytes() == first  # unread, and the same to the byte
    (out / "clinical.json").write_text("{not json")
    assert poll() == ["patient005", "patient006"] and (out / "results.csv").read_bytes() == first
    es = pdirs[0] / "patient005_frame07_gt.nii.gz"  # the ES mask, rewritten: that patient only
    img = nib.load(str(es))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(es))
    assert poll() == ["patient005"]
    assert (out / "results.csv").read_bytes() != first
    drop_info_lines(pdirs[1], "Height")
    assert poll() == ["patient006"]
    assert poll(None) == ["patient005", "patient006"]
    # A patient gone from the results leaves the cache too.
    Ledger(out / "ledger.jsonl").append({"path": str(pdirs[1] / "patient006_frame07.nii.gz"), "sha256": "x",
                                         "model_version": "m/1", "status": "failed", "reason": "gone", "rows": []})
    assert poll(None) == [] and list(json.loads((out / "clinical.json").read_text())) == [str(pdirs[0])]


def test_clinical_api_gives_what_the_batch_job_writes_for_the_same_masks(tmp_path):
    """``raysegment.clinical(ed, es)`` is the batch job's patient (one function, ``analysis.patient.assess``):
    the same indices, flags and diagnosis as ``add_patient_clinical`` on rows of the same mask files;
    a nibabel image works as a path does; an image, two grids or a 4-D one-hot mask are refused."""
    import nibabel as nib

    import raysegment
    from raysegment.analysis.diagnosis import load
    from raysegment.inference.ledger import add_patient_clinical

    pdir = make_nifti_patient(tmp_path, 5, group="HCM")
    rows = _patient_rows(pdir)
    add_patient_clinical(rows, load("shipped"))
    ed, es = (Path(r["mask"]) for r in rows)
    api = raysegment.clinical(ed, es, height_cm=180.0, weight_kg=80.0)  # Info.cfg's
    batch = {k: v for k, v in rows[0].items() if k in api}
    assert set(api) - set(batch) == set() and "diagnosis" in api and api["bsa_m2"] == pytest.approx(2.0)
    for k, v in api.items():  # every key the same (NaN: unknown in both)
        assert batch[k] == v or (isinstance(v, float) and np.isnan(v) and np.isnan(batch[k])), k
    assert raysegment.clinical(nib.load(ed), nib.load(es), height_cm=180.0, weight_kg=80.0)["lv_ef_pct"] == api["lv_ef_pct"]
    plain = raysegment.clinical(ed, es, diagnosis=None)
    assert "diagnosis" not in plain and plain["patient_qc_flags"] == "no_height_weight" and np.isnan(plain["bsa_m2"])
    image = pdir / f"{pdir.name}_frame01.nii.gz"
    with pytest.raises(ValueError, match="not a label map"):
        raysegment.clinical(image, es)
    small = nib.Nifti1Image(np.asanyarray(nib.load(es).dataobj)[:-2], nib.load(es).affine)
    with pytest.raises(ValueError, match="must be on one grid"):
        raysegment.clinical(ed, small)
    onehot = nib.Nifti1Image(np.stack([np.asanyarray(nib.load(es).dataobj) == k for k in range(4)], -1).astype(np.uint8),
                             nib.load(es).affine)
    with pytest.raises(ValueError, match="save the argmax"):
        raysegment.clinical(ed, onehot)


def test_a_patient_without_indices_is_named_with_why_and_es_above_ed_is_flagged(tmp_path, predictor, monkeypatch):
    """Official-layout folders that get no indices are listed in report.md with the reason (an
    Info.cfg without integer ED / ES, which also flags its frames, or with ED = ES; a frame that failed;
    a missing frame file); a patient whose ES volume exceeds its ED volume (Info.cfg's ED and ES swapped) has
    a patient QC flag and no diagnosis (its group would be made up); a sound patient neither."""
    from raysegment.analysis.clinical import unpaired_patients
    from raysegment.analysis.diagnosis import load as load_diagnosis
    from raysegment.inference.ledger import add_patient_clinical
    from raysegment.io.studies import acdc_phase, info_cfg_flag

    sound, swapped, broken, lone, failed, same = (make_nifti_patient(tmp_path, n) for n in range(1, 7))
    (same / "Info.cfg").write_text((same / "Info.cfg").read_text().replace("ES: 7", "ES: 1"))
    (swapped / "Info.cfg").write_text((swapped / "Info.cfg").read_text().replace("ED: 1\nES: 7", "ED: 7\nES: 1"))
    (broken / "Info.cfg").write_text((broken / "Info.cfg").read_text().replace("ED: 1", "ED: one"))
    (swapped / "Info.cfg").write_text((swapped / "Info.cfg").read_text().replace("Height: 180.0\n", ""))
    (lone / "patient004_frame07.nii.gz").unlink()
    rows = []
    for study in sorted(tmp_path.glob("training/*/*_frame??.nii.gz")):
        gt = study.with_name(study.name.replace(".nii.gz", "_gt.nii.gz"))
        rows.append({"study": str(study), "frame": 0, "phase": acdc_phase(study) or "", "status": "done",
                     "mask": str(gt), "spacing_mm": json.dumps([10.0, 1.5, 1.25]), "qc_flags": info_cfg_flag(study),
                     "volume_rv_ml": 1.0, "volume_myo_ml": 1.0, "volume_lv_ml": 1.0})
    rows[-3] = {"study": rows[-3]["study"], "frame": -1, "status": "failed", "reason": "unreadable NIfTI"}
    add_patient_clinical(rows, load_diagnosis("shipped"))
    flags = {Path(r["study"]).parent.name: r.get("patient_qc_flags") for r in rows}
    assert flags["patient001"] == "" and flags["patient002"] == "es_above_ed_lv;es_above_ed_rv;no_height_weight"
    # No group from a negative LV EF: it would be made up.
    diagnosed = {Path(r["study"]).parent.name: (r.get("diagnosis"), r.get("diagnosis_withheld")) for r in rows
                 if "lv_ef_pct" in r}
    assert diagnosed["patient001"][0] in ("NOR", "MINF", "DCM", "HCM", "RV") and diagnosed["patient001"][1] is None
    assert diagnosed["patient002"] == (None, "es_above_ed_lv")
    assert {Path(f).name: why for f, why in unpaired_patients(rows).items()} == {
        "patient003": "Info.cfg has no integer ED or ES line",
        "patient004": "its ED or ES frame file is not among the studies",
        "patient005": "patient005_frame07.nii.gz was not segmented (failed)",
        "patient006": "Info.cfg gives ED and ES the same frame"}
    text = batch_report(rows, tmp_path, 0).read_text()
    assert "No patient indices for 4 folders: patient003 (Info.cfg has no integer ED or ES line); patient004 (" in text
    table = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in text.splitlines()
             if re.match(r"\| patient\d{3} \|", line)}  # the patients table: its QC column
    assert table == {"patient001": "", "patient002": flags["patient002"]}
    assert "| withheld (es_above_ed_lv) |" in text and f"| {diagnosed['patient001'][0]} (0." in text
    # An archive of more patients than the table lists: the flagged ones, and a count of the folders without.
    import raysegment.reporting.batch as batch_module

    monkeypatch.setattr(batch_module, "MAX_TABLE_ROWS", 1)
    monkeypatch.setattr(batch_module, "MAX_NAMED", 3)
    text = batch_report(rows, tmp_path / "capped", 0).read_text()
    assert [line.split("|")[1].strip() for line in text.splitlines() if re.match(r"\| patient\d{3} \|", line)] == ["patient002"]
    assert ("2 patients, more than the 1 this table lists: it lists those with a QC flag or a withheld diagnosis (1). "
            "Every one is in `results.csv`.") in text
    assert ("patient005 (patient005_frame07.nii.gz was not segmented (failed)); and 1 more (their rows in results.csv "
            "have no lv_ef_pct).") in text
    assert "patient006" not in text
    # The batch's own rows: a frame of the folder with the broken Info.cfg carries the flag.
    seg = segment_study(broken / "patient003_frame01.nii.gz", predictor, "m", tmp_path / "out")
    assert "info_cfg_without_ed_es" in seg[0]["qc_flags"].split(";")
    assert info_cfg_flag(sound / "patient001_frame01.nii.gz") == "" and info_cfg_flag(sound / "patient001_4d.nii.gz") == ""


def test_a_diagnosis_reference_that_cannot_load_stops_the_batch_before_segmenting(tmp_path, tiny_checkpoint, capsys):
    from raysegment.cli.infer import main

    make_nifti_patient(tmp_path / "in", 1)
    code = main(["--model", str(tiny_checkpoint), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--diagnosis", str(tmp_path / "missing.json")])
    assert code == 2
    assert "--diagnosis" in capsys.readouterr().err
    assert not (tmp_path / "out" / "ledger.jsonl").exists()


def test_a_turn_asked_for_is_part_of_the_version_the_ledger_keys_on():
    """``--in-plane rows-reversed`` on a folder segmented before (with ``auto``) gives other masks:
    the ledger must not call them already done."""
    from raysegment.config import InferConfig, PredictConfig
    from raysegment.inference.batch import pinned_models

    default = InferConfig(models=("shipped:mobilenet_v2",), input="in", output="out")
    assert default.predict.in_plane == "auto"
    _, version = pinned_models(default)
    _, turned = pinned_models(InferConfig(models=default.models, input="in", output="out",
                                          predict=PredictConfig(in_plane="rows-reversed")))
    assert turned == f"{version} in-plane rows-reversed" and "in-plane" not in version
