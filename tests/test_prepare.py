import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
from synth import make_h5_dataset, make_nifti_dataset, make_nifti_patient, synthetic_volume, write_h5, write_info_csv, write_nifti

from raysegment.cli.prepare import main
from raysegment.data.prepare import PrepareConfig, PrepareError, load_manifest, prepare, read_h5_volume, read_nifti_patient
from raysegment.io.studies import normalize_intensity


def read_rows(out: Path) -> list[dict]:
    rows = []
    for f in sorted(out.glob("*/*.parquet")):
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def slice_array(row, key, dtype):
    return np.asarray(row[key], dtype).reshape(row["height"], row["width"])


def test_official_nifti_layout_every_field(tmp_path):
    src = make_nifti_dataset(tmp_path / "acdc", n=4)
    out = tmp_path / "shards"
    manifest = prepare(PrepareConfig(source=src, out=out, val_fraction=0.25, progress=False))
    assert manifest["source_format"] == "acdc-nifti"
    rows = read_rows(out)
    # 4 patients x 2 phases x 4 slices; the 4-D cine file is not a labelled frame.
    assert len(rows) == 32
    assert manifest["counts"]["volumes"] == {"train": 6, "val": 2}
    by_key = {(r["patient"], r["phase"], r["slice"]): r for r in rows}
    for number in range(1, 5):
        pid = f"patient{number:03d}"
        pdir = src / "training" / pid
        for phase, frame in (("ED", 1), ("ES", 7)):
            gt = np.transpose(np.asarray(nib.load(str(pdir / f"{pid}_frame{frame:02d}_gt.nii.gz")).dataobj), (2, 1, 0))
            img = np.transpose(np.asarray(nib.load(str(pdir / f"{pid}_frame{frame:02d}.nii.gz")).dataobj), (2, 1, 0))
            norm = normalize_intensity(img)
            for k in range(4):
                r = by_key[(pid, phase, k)]
                assert r["spacing"] == pytest.approx([10.0, 1.5, 1.25])
                assert (r["height"], r["width"], r["num_slices"]) == (40, 48, 4)
                assert r["group"] == ["DCM", "HCM", "MINF", "NOR"][number - 1]
                # Orientation: shard slice k is volume[k] in (z, y, x) order, (H, W) = (y, x).
                np.testing.assert_array_equal(slice_array(r, "label", np.uint8), gt[k])
                np.testing.assert_array_equal(slice_array(r, "image", np.float32), norm[k])
                # 2.5-D context: slices k-1 and k+1, zeros beyond the stack.
                nb = np.asarray(r["neighbours"], np.float32).reshape(2, 40, 48)
                np.testing.assert_array_equal(nb[0], norm[k - 1] if k > 0 else 0)
                np.testing.assert_array_equal(nb[1], norm[k + 1] if k < 3 else 0)
    # ED and ES frame mapping from Info.cfg: ES (frame 7) has the smaller LV.
    lv = {ph: sum((slice_array(r, "label", np.uint8) == 3).sum() for r in rows
                  if r["patient"] == "patient001" and r["phase"] == ph) for ph in ("ED", "ES")}
    assert lv["ED"] > lv["ES"]
    # split by patient: both phases of a patient share the split
    splits = {}
    for r in rows:
        splits.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values())
    assert sum(s == {"val"} for s in splits.values()) == 1


def test_h5_and_nifti_readers_agree(tmp_path):
    """Round trip: an h5 volume written as NIfTI reads back as identical (z, y, x) slices."""
    image, label = synthetic_volume(3, shape=(5, 30, 44))
    label[0, 0, :5] = 1  # break symmetry so a transposed or flipped read would differ
    (tmp_path / "h5").mkdir()
    write_h5(tmp_path / "h5" / "patient042_frame01.h5", image, label)
    h5 = read_h5_volume(tmp_path / "h5" / "patient042_frame01.h5")
    pdir = make_nifti_patient(tmp_path / "nii", 42, ed=1, es=2, nframes=2, shape=(5, 30, 44))
    write_nifti(pdir / "patient042_frame01.nii.gz", image, (8.0, 1.0, 1.0))
    write_nifti(pdir / "patient042_frame01_gt.nii.gz", label, (8.0, 1.0, 1.0), np.uint8)
    nii = read_nifti_patient(pdir)[0]
    assert nii.phase == h5.phase == "ED"
    assert h5.group == "MINF" and h5.spacing is None and nii.spacing == (8.0, 1.0, 1.0)
    np.testing.assert_array_equal(nii.label, h5.label)
    np.testing.assert_array_equal(nii.image, h5.image)


def test_normalisation_is_scale_free(tmp_path):
    image, label = synthetic_volume(5, shape=(3, 32, 32))
    a, b = tmp_path / "a", tmp_path / "b"
    for root, scale in ((a, 1.0), (b, 2731.0)):
        (root / "volumes").mkdir(parents=True)
        for frame in (1, 2):
            write_h5(root / "volumes" / f"patient001_frame0{frame}.h5", (image * scale).astype(np.float32), label)
    for root in (a, b):
        prepare(PrepareConfig(source=root, out=tmp_path / f"out-{root.name}", val_fraction=0.0, progress=False))
    ra, rb = read_rows(tmp_path / "out-a"), read_rows(tmp_path / "out-b")
    for x, y in zip(ra, rb):
        np.testing.assert_allclose(x["image"], y["image"], atol=1e-6)
    assert 0.0 <= min(min(r["image"]) for r in ra) and max(max(r["image"]) for r in ra) <= 1.0


def test_rerun_is_identical_and_split_files_are_used(tmp_path):
    src = make_h5_dataset(tmp_path / "src", patients=(1, 2, 3, 4, 21), val=(2, 21))
    m1 = prepare(PrepareConfig(source=src, out=tmp_path / "o1", progress=False))
    m2 = prepare(PrepareConfig(source=str(src), out=str(tmp_path / "o2"), progress=False))  # str paths as from Python
    assert m1["content_hash"] == m2["content_hash"]
    for f in sorted((tmp_path / "o1").rglob("*.parquet")):
        assert f.read_bytes() == (tmp_path / "o2" / f.relative_to(tmp_path / "o1")).read_bytes()
    assert m1["splits"] == {"train": ["patient001", "patient003", "patient004"], "val": ["patient002", "patient021"]}
    assert m1["counts"]["patients_by_group"] == {"DCM": 4, "HCM": 1}
    assert m1["counts"]["slices"] == {"train": 24, "val": 16}
    manifest = json.loads((tmp_path / "o1" / "manifest.json").read_text())
    assert manifest == m1 and manifest["format_version"] == 2
    assert sum(manifest["counts"]["voxels_by_class"].values()) == 10 * 4 * 40 * 48
    # existing output needs --overwrite; with it, the result is the same
    with pytest.raises(PrepareError, match="output exists"):
        prepare(PrepareConfig(source=src, out=tmp_path / "o1", progress=False))
    m3 = prepare(PrepareConfig(source=src, out=tmp_path / "o1", overwrite=True, progress=False))
    assert m3["content_hash"] == m1["content_hash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o1", "o2", "src"]


def _nifti_src(tmp_path):
    return make_nifti_dataset(tmp_path / "src", n=2)


def _break_missing_gt(src):
    (src / "training/patient002/patient002_frame07_gt.nii.gz").unlink()
    return "patient002_frame07_gt.nii.gz", "missing gt"


def _break_shape(src):
    write_nifti(src / "training/patient001/patient001_frame01_gt.nii.gz", np.zeros((4, 40, 40), np.uint8), (10, 1.5, 1.25))
    return "patient001_frame01_gt.nii.gz", "does not match image shape"


def _break_labels(src):
    lab = np.zeros((4, 40, 48), np.uint8)
    lab[0, 0, 0] = 7
    write_nifti(src / "training/patient001/patient001_frame07_gt.nii.gz", lab, (10, 1.5, 1.25))
    return "patient001_frame07_gt.nii.gz", "outside 0..3"


def _break_nan(src):
    img = np.ones((4, 40, 48), np.float32)
    img[1, 2, 3] = np.nan
    write_nifti(src / "training/patient002/patient002_frame01.nii.gz", img, (10, 1.5, 1.25))
    return "patient002_frame01.nii.gz", "NaN or inf"


def _break_2d(src):
    nib.save(nib.Nifti1Image(np.ones((48, 40), np.int16), np.eye(4)), str(src / "training/patient001/patient001_frame01.nii.gz"))
    return "patient001_frame01.nii.gz", "must be 3-D"


def _break_5d(src):
    nib.save(nib.Nifti1Image(np.ones((48, 40, 4, 2, 2), np.int16), np.eye(4)), str(src / "training/patient001/patient001_frame01.nii.gz"))
    return "patient001_frame01.nii.gz", "must be 3-D"


def _break_gzip(src):
    path = src / "training/patient002/patient002_frame07.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "patient002_frame07.nii.gz", "unreadable NIfTI"


def _break_not_gzip(src):
    (src / "training/patient001/patient001_frame07.nii.gz").write_bytes(b"this is not a gzip file at all")
    return "patient001_frame07.nii.gz", "unreadable NIfTI"


def _break_empty(src):
    import shutil
    shutil.rmtree(src / "training")
    return "src", "empty source"


def _break_shards(src):  # shards given back as a source: what to do with them instead
    import shutil
    shutil.rmtree(src / "training")
    (src / "manifest.json").write_text("{}")
    return "src", "holds shards already (its manifest.json), not an ACDC dataset: give it as --data to train"


def _break_duplicate(src):
    import shutil
    shutil.copytree(src / "training/patient001", src / "testing/patient001")
    return "patient001 in more than one", "patient folders in 2 folders"


def _break_testing_beside_training(src):  # the official release's root: its test patients would be trained on
    import shutil
    shutil.copytree(src / "training/patient001", src / "testing/patient101")
    return "testing/ (1), training/ (2)", "give one of them as --source"


def _break_ed_equals_es(src):  # both phases would be the same volume, an EF of 0 %
    cfg = src / "training/patient002/Info.cfg"
    cfg.write_text(cfg.read_text().replace("ES: 7", "ES: 1"))
    return "patient002/Info.cfg", "ED and ES are the same frame (1)"


BAD = [_break_missing_gt, _break_shape, _break_labels, _break_nan, _break_2d, _break_5d,
       _break_gzip, _break_not_gzip, _break_empty, _break_shards, _break_duplicate, _break_testing_beside_training,
       _break_ed_equals_es]


@pytest.mark.parametrize("breaker", BAD, ids=[b.__name__[7:] for b in BAD])
def test_bad_input_one_line_error_nothing_written(tmp_path, breaker, capsys):
    src = _nifti_src(tmp_path)
    fname, problem = breaker(src)
    out = tmp_path / "out" / "shards"
    code = main(["--source", str(src), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert fname in err and problem in err, err
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == [] if (tmp_path / "out").exists() else True


def test_every_bad_patient_is_named_in_one_run(tmp_path, capsys):
    """A source with several bad patients: one run names each (it stopped at the first, so a user
    fixing a 100-patient release learnt them one run at a time); nothing is written."""
    src = make_nifti_dataset(tmp_path / "src", n=4)
    (src / "training/patient001/Info.cfg").unlink()
    (src / "training/patient002/patient002_frame07_gt.nii.gz").unlink()
    (src / "training/patient004/patient004_frame07.nii.gz").write_bytes(b"this is not a gzip file at all")
    out = tmp_path / "out"
    assert main(["--source", str(src), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == ("error: 3 of 4 patients cannot be prepared (nothing was written; fix them or move them out "
                      "of the source):")
    assert len(err) == 4 and "patient001/Info.cfg: missing Info.cfg" in err[1]
    assert "patient002/patient002_frame07_gt.nii.gz: missing gt for the ES frame" in err[2]
    assert "patient004/patient004_frame07.nii.gz: unreadable NIfTI" in err[3]
    assert not out.exists()


def test_a_source_without_any_reference_masks_says_infer_segments_it(tmp_path, capsys):
    """An unlabelled test set (ACDC's testing folder without _gt files): one line saying that no
    patient has reference masks and the command that segments it, not "N of N patients cannot be
    prepared … fix them" (one patient with them: each other one is named, as before)."""
    src = make_nifti_dataset(tmp_path / "src", n=3)
    for gt in sorted((src / "training").rglob("*_gt.nii.gz"))[2:]:  # patient001 keeps its two
        gt.unlink()
    assert main(["--source", str(src / "training"), "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("error: 2 of 3 patients cannot be prepared")
    for gt in (src / "training").rglob("*_gt.nii.gz"):
        gt.unlink()
    assert main(["--source", str(src / "training"), "--out", str(tmp_path / "b"), "--val-fraction", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no patient has reference masks (" in err, err
    assert err.endswith(f"`python -m raysegment.infer --input {src / 'training'} --output OUT`")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_source_that_is_a_file_or_not_there_is_named_as_such(tmp_path):
    (tmp_path / "patient001_frame01.nii.gz").write_bytes(b"")
    for source, message in ((tmp_path / "patient001_frame01.nii.gz", "a file; give the ACDC folder"),
                            (tmp_path / "none", "source folder does not exist")):
        for fmt in ("auto", "acdc-nifti"):
            with pytest.raises(PrepareError, match=message):
                prepare(PrepareConfig(source=source, out=tmp_path / "out", source_format=fmt, progress=False))
    assert not (tmp_path / "out").exists()


def test_bad_h5_inputs(tmp_path):
    src = make_h5_dataset(tmp_path / "src", patients=(1, 2), val=(2,))
    (src / "volumes" / "patient002_frame02.h5").write_bytes(b"")
    with pytest.raises(PrepareError, match=r"patient002_frame02.h5: unreadable HDF5"):
        prepare(PrepareConfig(source=src, out=tmp_path / "out", progress=False))
    (src / "volumes" / "patient002_frame02.h5").unlink()
    with pytest.raises(PrepareError, match=r"missing frame02 of patient002"):
        prepare(PrepareConfig(source=src, out=tmp_path / "out", progress=False))
    assert not (tmp_path / "out").exists()


def test_cli_runs_as_module(tmp_path):
    src = make_h5_dataset(tmp_path / "src", patients=(1, 2), val=(2,))
    r = subprocess.run([sys.executable, "-m", "raysegment.prepare", "--source", str(src), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "patient" in r.stderr  # tqdm progress bar over patients
    assert "slices {'train': 8, 'val': 8}" in r.stdout


def test_a_given_val_fraction_splits_a_source_with_val_txt_and_a_val_file_beside_it_is_refused(tmp_path, capsys):
    """``--val-fraction`` given: it splits even a source with its own val.txt (the file won, and
    ``--val-fraction 1`` of an SSL4MIS-layout test set was ignored without a word); with
    ``--val-file`` as well, refused in one line."""
    src = make_h5_dataset(tmp_path / "src", patients=(1, 2, 3), val=(2,))
    assert main(["--source", str(src), "--out", str(tmp_path / "own"), "--no-progress"]) == 0
    assert "patients {'train': 2, 'val': 1}" in capsys.readouterr().out  # its val.txt
    assert main(["--source", str(src), "--out", str(tmp_path / "all"), "--val-fraction", "1", "--no-progress"]) == 0
    assert "patients {'val': 3}" in capsys.readouterr().out
    assert main(["--source", str(src), "--out", str(tmp_path / "x"), "--val-fraction", "0.5",
                 "--val-file", str(src / "val.txt")]) == 2
    assert "both split: give one" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_val_split_is_stratified_by_group_and_seeded():
    from raysegment.data.prepare import assign_splits

    groups = ("DCM", "HCM", "MINF", "NOR", "RV")
    patients = {f"patient{i:03d}": groups[(i - 1) // 20] for i in range(1, 101)}  # 20 per group, as ACDC
    config = PrepareConfig(source=Path("/nowhere"), out=Path("/nowhere-out"), val_fraction=0.2, seed=3)
    split = assign_splits(patients, config)
    val = [p for p, s in split.items() if s == "val"]
    assert len(val) == 20
    assert {g: sum(patients[p] == g for p in val) for g in groups} == {g: 4 for g in groups}
    assert assign_splits(patients, config) == split  # the same seed, the same split
    other = assign_splits(patients, PrepareConfig(source=Path("/nowhere"), out=Path("/x"), val_fraction=0.2, seed=4))
    assert other != split
    # Small, uneven groups: still round(N * fraction) patients, every group represented first.
    small = {"patient001": "DCM", "patient002": "DCM", "patient003": "DCM", "patient021": "HCM", "patient041": "MINF"}
    val_small = [p for p, s in assign_splits(small, PrepareConfig(source=Path("/n"), out=Path("/o"), val_fraction=0.6)).items()
                 if s == "val"]
    assert len(val_small) == 3 and {small[p] for p in val_small} == {"DCM", "HCM", "MINF"}


def test_overwrite_never_deletes_the_source_or_a_folder_prepare_did_not_write(tmp_path):
    src = make_h5_dataset(tmp_path / "src", patients=(1, 2), val=(2,), shape=(3, 40, 48))
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    for out in (src, src / "shards", tmp_path):  # is, inside, contains the source
        with pytest.raises(PrepareError, match="apart from it"):
            prepare(PrepareConfig(source=src, out=out, overwrite=True, progress=False))
    mine = tmp_path / "my-results"
    mine.mkdir()
    (mine / "thesis.docx").write_text("years of work")
    with pytest.raises(PrepareError, match="no raysegment manifest.json"):
        prepare(PrepareConfig(source=src, out=mine, overwrite=True, progress=False))
    assert (mine / "thesis.docx").read_text() == "years of work"
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before
    assert main(["--source", str(src), "--out", str(src), "--overwrite"]) == 2  # one line, exit 2


def test_an_empty_volume_and_an_unwritable_out_give_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    import shutil

    from synth import write_h5

    src = make_h5_dataset(tmp_path / "src", patients=(1, 2), val=(2,), shape=(3, 40, 48))
    empty = tmp_path / "empty"
    shutil.copytree(src, empty)
    write_h5(empty / "volumes" / "patient001_frame01.h5", np.zeros((0, 40, 48), np.float32), np.zeros((0, 40, 48), np.uint8))
    assert main(["--source", str(empty), "--out", str(tmp_path / "o1")]) == 2
    assert "empty volume" in capsys.readouterr().err

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("raysegment.data.prepare._write_shards", disk_full)
    assert main(["--source", str(src), "--out", str(tmp_path / "o2")]) == 1  # an environment fault, as train's
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err and not (tmp_path / "o2").exists()
    assert err.strip().endswith("free space there and run the same command again"), err

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("raysegment.data.prepare._write_shards", read_only)
    assert main(["--source", str(src), "--out", str(tmp_path / "o3")]) == 2  # a place one cannot write: bad input
    assert "Read-only file system" in capsys.readouterr().err


def test_ctrl_c_during_prepare_leaves_out_as_it_was_and_no_temporary_folder(tmp_path, capsys, monkeypatch):
    import raysegment.data.prepare as prep

    src = make_h5_dataset(tmp_path / "src", patients=(1, 2), val=(2,), shape=(3, 40, 48))
    assert main(["--source", str(src), "--out", str(tmp_path / "o")]) == 0
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "o").rglob("*"))
    write = prep._write_shards

    def ctrl_c_after_writing(*a, **k):  # the temporary folder holds shards when the interrupt comes
        write(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_write_shards", ctrl_c_after_writing)
    assert main(["--source", str(src), "--out", str(tmp_path / "o"), "--overwrite"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"interrupted: nothing written, {tmp_path / 'o'} is as it was; the same command starts again"
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "o").rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "src"]  # no .o.tmp-PID left
    # What a prepare killed outright (SIGKILL) left goes at the next one; a live process's stays.
    # The dead one names a PID above the kernel's pid_max: no process can have it.
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text()) if Path("/proc/sys/kernel/pid_max").exists() else 2**22
    import os

    for pid in (pid_max + 1, os.getppid()):
        (tmp_path / f".o.tmp-{pid}" / "train").mkdir(parents=True)
    monkeypatch.setattr(prep, "_write_shards", write)
    assert main(["--source", str(src), "--out", str(tmp_path / "o"), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".o.tmp-{os.getppid()}", "o", "src"]


def test_info_csv_gives_h5_volumes_their_spacing_and_patient_metadata(tmp_path):
    src = make_h5_dataset(tmp_path / "src", patients=(1, 2), val=(2,))
    write_info_csv(src, {"patient001": ("HCM", 170, 65, 30, 1, 12, 4, 1.40625, 10.0),
                          "patient002": ("NOR", 182.5, 90, 25, 1, 9, 4, 1.5625, 5.0)})
    out = tmp_path / "shards"
    manifest = prepare(PrepareConfig(source=src, out=out, progress=False))
    assert manifest["spacing_known"] is True
    assert manifest["patients"]["patient002"] == {
        "group": "NOR", "height_cm": 182.5, "weight_kg": 90.0, "nb_frames": 25, "ed_frame": 1, "es_frame": 9,
        "spacing_mm": {"ED": [5.0, 1.5625, 1.5625], "ES": [5.0, 1.5625, 1.5625]}}
    rows = read_rows(out)
    assert {tuple(r["spacing"]) for r in rows if r["patient"] == "patient001"} == {(10.0, 1.40625, 1.40625)}
    assert {r["group"] for r in rows if r["patient"] == "patient001"} == {"HCM"}  # the csv's group, not the number's
    # Without info.csv the h5 layout has no spacing, as before.
    (src / "info.csv").unlink()
    bare = prepare(PrepareConfig(source=src, out=tmp_path / "bare", progress=False))
    assert bare["spacing_known"] is False and bare["patients"]["patient001"]["spacing_mm"]["ED"] is None


def test_info_csv_that_disagrees_with_the_volumes_is_refused(tmp_path):
    src = make_h5_dataset(tmp_path / "src", patients=(1, 2), val=(2,))
    write_info_csv(src, {"patient001": ("DCM", 170, 65, 30, 1, 12, 4, 1.4, 10.0),
                          "patient002": ("DCM", 170, 65, 30, 1, 12, 9, 1.4, 10.0)})
    with pytest.raises(PrepareError, match=r"patient002_frame01.h5: 4 slices, but info.csv says 9"):
        prepare(PrepareConfig(source=src, out=tmp_path / "o", progress=False))
    write_info_csv(src, {"patient001": ("DCM", 170, 65, 30, 1, 12, 4, 1.4, 10.0)})
    with pytest.raises(PrepareError, match=r"patient002 has no row in the source's info.csv"):
        prepare(PrepareConfig(source=src, out=tmp_path / "o", progress=False))
    write_info_csv(src, {"patient001": ("DCM", 170, 65, 30, 1, 12, 4, 0, 10.0)})
    with pytest.raises(PrepareError, match=r"info.csv:2: spacing must be > 0 mm"):
        prepare(PrepareConfig(source=src, out=tmp_path / "o", progress=False))
    assert not (tmp_path / "o").exists()


def test_official_layout_records_info_cfg_metadata(tmp_path):
    src = make_nifti_dataset(tmp_path / "src", n=2)
    manifest = prepare(PrepareConfig(source=src, out=tmp_path / "o", progress=False))
    meta = manifest["patients"]["patient001"]
    assert (meta["height_cm"], meta["weight_kg"], meta["ed_frame"], meta["es_frame"], meta["nb_frames"]) == (180.0, 80.0, 1, 7, 10)
    assert meta["spacing_mm"]["ED"] == [10.0, 1.5, 1.25]


def test_shards_load_back_as_the_volumes_they_were_made_from(tmp_path):
    from raysegment.data.dataset import load_volumes

    src = make_h5_dataset(tmp_path / "src", patients=(1, 2, 3), val=(3,), shape=(5, 40, 48))
    write_info_csv(src, {f"patient00{p}": ("NOR", 170, 70, 20, 1, 8, 5, 1.5, 10.0) for p in (1, 2, 3)})
    out = tmp_path / "shards"
    prepare(PrepareConfig(source=src, out=out, progress=False))
    train = load_volumes(out, "train")
    assert [(v.patient, v.phase) for v in train] == [(f"patient00{p}", ph) for p in (1, 2) for ph in ("ED", "ES")]
    for v in train:
        read = read_h5_volume(src / "volumes" / f"{v.patient}_frame0{1 if v.phase == 'ED' else 2}.h5")
        np.testing.assert_array_equal(v.label, read.label)
        np.testing.assert_allclose(v.image, normalize_intensity(read.image), atol=1e-6)
        assert v.image.dtype == np.float32 and v.label.dtype == np.uint8
        assert v.spacing == (10.0, 1.5, 1.5) and v.group == "NOR"
    only = load_volumes(out, "train", ["patient002"])
    assert [(v.patient, v.phase) for v in only] == [("patient002", "ED"), ("patient002", "ES")]
    np.testing.assert_array_equal(only[1].image, train[3].image)
    assert load_volumes(out, "train", []) == []


def test_an_ssl4mis_patient_written_in_the_official_layout_reads_back_as_itself(tmp_path):
    from raysegment.data.volumes import read_info_csv, with_info, write_official_patient

    src = make_h5_dataset(tmp_path / "src", patients=(1,), val=(), shape=(5, 40, 48))
    write_info_csv(src, {"patient001": ("HCM", 171, 66, 25, 1, 11, 5, 1.4, 8.0)})
    info = read_info_csv(src / "info.csv")["patient001"]
    h5 = [with_info(read_h5_volume(src / "volumes" / f"patient001_frame0{i}.h5"), info) for i in (1, 2)]
    files = write_official_patient(tmp_path / "acdc", h5[::-1], info)  # ED is written first whatever the order
    assert [f.name for f in files] == ["patient001_frame01.nii.gz", "patient001_frame11.nii.gz"]
    # The held-out patients' Info.cfg has no Group line, so neither has this one unless asked.
    assert "Group" not in (files[0].parent / "Info.cfg").read_text()
    back = read_nifti_patient(files[0].parent)
    assert [v.phase for v in back] == ["ED", "ES"] and back[0].group == "unknown"
    for v, orig in zip(back, h5):
        assert v.image.dtype == np.int16 and v.spacing == pytest.approx((8.0, 1.4, 1.4))
        np.testing.assert_array_equal(v.label, orig.label)
        np.testing.assert_array_equal(v.image, np.round(orig.image * 1800.0 - 20.0).astype(np.int16))
        assert v.info == {"height_cm": 171.0, "weight_kg": 66.0, "nb_frames": 25, "ed_frame": 1, "es_frame": 11}
    write_official_patient(tmp_path / "g", h5, info, group=True)
    assert read_nifti_patient(tmp_path / "g" / "training" / "patient001")[0].group == "HCM"


def _as_nnunet(official: Path, dst: Path, labels=None) -> Path:
    """An official-layout source laid out as nnU-Net v2's Dataset027_ACDC conversion does."""
    import shutil

    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    for f in sorted(official.glob("training/patient*/*_frame??.nii.gz")):
        shutil.copy(f, dst / "imagesTr" / f.name.replace(".nii.gz", "_0000.nii.gz"))
    for f in sorted(official.glob("training/patient*/*_gt.nii.gz")):
        shutil.copy(f, dst / "labelsTr" / f.name.replace("_gt", ""))
    (dst / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "cineMRI"}, "file_ending": ".nii.gz",
        "labels": labels or {"background": 0, "RV": 1, "MLV": 2, "LVC": 3}}))
    return dst


def test_nnunet_raw_layout_prepares_to_the_official_layouts_slices(tmp_path, capsys):
    """An nnU-Net user's ``Dataset027_ACDC`` (imagesTr/labelsTr/dataset.json, no Info.cfg) gives the
    shards of the official release it came from: the same slices, labels, spacing, phases and split;
    ED is the lower frame number. The group follows the patient number (the conversion drops Info.cfg)."""
    official = make_nifti_dataset(tmp_path / "acdc", n=4)
    nn = _as_nnunet(official, tmp_path / "Dataset027_ACDC")
    (tmp_path / "val.txt").write_text("patient002\n")
    common = dict(val_file=tmp_path / "val.txt", progress=False)
    a = prepare(PrepareConfig(source=official, out=tmp_path / "a", **common))
    b = prepare(PrepareConfig(source=nn, out=tmp_path / "b", **common))
    assert (a["source_format"], b["source_format"]) == ("acdc-nifti", "nnunet")
    rows_a, rows_b = read_rows(tmp_path / "a"), read_rows(tmp_path / "b")
    assert len(rows_a) == len(rows_b) == 32
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k != "group"} == {k: v for k, v in rb.items() if k != "group"}
    assert {r["group"] for r in rows_b} == {"DCM"}  # ACDC's patients 1-20 (Info.cfg here says otherwise)
    assert b["patients"]["patient001"]["ed_frame"] == 1 and b["patients"]["patient001"]["es_frame"] == 7
    assert main(["--source", str(nn), "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    # nnU-Net v1's dataset.json ({"value": name}, "modality") describes the same dataset
    (nn / "dataset.json").write_text(json.dumps({"modality": {"0": "MRI"},
                                                 "labels": {"0": "background", "1": "RV", "2": "MLV", "3": "LVC"}}))
    assert prepare(PrepareConfig(source=nn, out=tmp_path / "d", **common))["content_hash"] == b["content_hash"]
    # nnU-Net's splits_final.json as --val-file, with --fold K: fold K's val patients are val (a
    # patient is val when any of its frames is); without --fold, or with a fold it lacks, refused.
    splits = tmp_path / "splits_final.json"
    splits.write_text(json.dumps([{"train": ["patient001_frame01"], "val": ["patient002_frame01", "patient002_frame07"]},
                                  {"train": ["patient002_frame01"], "val": ["patient001_frame07", "patient003_frame01"]}]))
    assert main(["--source", str(nn), "--out", str(tmp_path / "e"), "--val-file", str(splits), "--fold", "1",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["splits"]["val"] == ["patient001", "patient003"]
    for args, says in ((["--val-file", str(splits)], "2 folds: give --fold K (0…1)"),
                       (["--val-file", str(splits), "--fold", "2"], "give --fold K (0…1)"),
                       (["--val-file", str(tmp_path / "val.txt"), "--fold", "0"], "takes nnU-Net's splits_final.json"),
                       (["--fold", "0"], "takes nnU-Net's splits_final.json as --val-file")):
        assert main(["--source", str(nn), "--out", str(tmp_path / "f"), *args]) == 2
        assert says in capsys.readouterr().err, args
    assert not (tmp_path / "f").exists()


def test_an_nnunet_images_folder_prepares_its_own_patients(tmp_path, capsys):
    """``--source Dataset027_ACDC/imagesTs``: the test patients the conversion put in imagesTs/labelsTs
    (what an nnU-Net user's test predictions are of), all val with ``--val-fraction 1`` (what
    ``report`` scores by default); the dataset itself still means imagesTr."""
    official = make_nifti_dataset(tmp_path / "acdc", n=4)
    nn = _as_nnunet(official, tmp_path / "Dataset027_ACDC")
    for kind in ("images", "labels"):
        (nn / f"{kind}Ts").mkdir()
        for f in (nn / f"{kind}Tr").glob("patient00[34]_*"):
            f.rename(nn / f"{kind}Ts" / f.name)
    assert main(["--source", str(nn / "imagesTs"), "--out", str(tmp_path / "ts"), "--val-fraction", "1",
                 "--no-progress"]) == 0
    assert "patients {'val': 2}" in capsys.readouterr().out
    ts = load_manifest(tmp_path / "ts")
    assert ts["source_format"] == "nnunet" and sorted(ts["patients"]) == ["patient003", "patient004"]
    prepare(PrepareConfig(source=official, out=tmp_path / "all", val_fraction=0.0, progress=False))
    ours = [{k: v for k, v in r.items() if k != "group"} | {"split": "val"} for r in read_rows(tmp_path / "all")
            if r["patient"] in ("patient003", "patient004")]
    assert [{k: v for k, v in r.items() if k != "group"} for r in read_rows(tmp_path / "ts")] == ours
    tr = prepare(PrepareConfig(source=nn, out=tmp_path / "tr", val_fraction=0.0, progress=False))
    assert sorted(tr["patients"]) == ["patient001", "patient002"]
    # nnU-Net's own ACDC conversion writes imagesTs without labelsTs: said so, with what to do.
    (nn / "labelsTs").rename(tmp_path / "labelsTs")
    assert main(["--source", str(nn / "imagesTs"), "--out", str(tmp_path / "x"), "--val-fraction", "1"]) == 2
    err = capsys.readouterr().err
    assert "an nnU-Net imagesTs/ without labelsTs/ beside it" in err and "writes no labelsTs" in err
    assert f"python -m raysegment.infer --input {nn / 'imagesTs'}" in err and not (tmp_path / "x").exists()
    # An empty labelsTs (made, not yet filled): one line too, not a line per patient to "fix".
    (nn / "labelsTs").mkdir()
    assert main(["--source", str(nn / "imagesTs"), "--out", str(tmp_path / "x"), "--val-fraction", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no patient has reference masks (" in err and "missing labels of" in err, err
    assert err.endswith(f"`python -m raysegment.infer --input {nn / 'imagesTs'} --output OUT`") and not (tmp_path / "x").exists()


@pytest.mark.parametrize("breaker, says", [
    (lambda nn: (nn / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "LV": 1, "RV": 2, "MYO": 3}})),
     "are not ACDC's (1 RV, 2 MLV/MYO, 3 LVC/LV"),
    (lambda nn: (nn / "dataset.json").unlink(), "dataset.json: unreadable nnU-Net dataset.json (FileNotFoundError"),
    (lambda nn: (nn / "imagesTr" / "case_0001.nii.gz").write_bytes(b""), "case_0001.nii.gz: not an ACDC case"),
    (lambda nn: (nn / "labelsTr" / "patient002_frame07.nii.gz").unlink(), "patient002_frame07.nii.gz: missing labels of"),
    (lambda nn: (nn / "imagesTr" / "patient003_frame07_0000.nii.gz").unlink(), "patient003 has 1 frames"),
])
def test_a_bad_nnunet_source_is_one_line_and_nothing_is_written(tmp_path, capsys, breaker, says):
    nn = _as_nnunet(make_nifti_dataset(tmp_path / "acdc", n=3), tmp_path / "Dataset027_ACDC")
    breaker(nn)
    assert main(["--source", str(nn), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert says in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_nnunet_layout_job_gives_what_prepare_reads_with_its_folds(tmp_path, capsys):
    """``jobs/nnunet-layout.py`` (docs/nnunet.md's check) on the bundled sample: nnU-Net's Dataset027
    with a patient-grouped splits_final.json; ``prepare --fold K`` makes fold K's patients val and
    reads the source's val patients back from imagesTs/labelsTs, as the SSL4MIS source has them."""
    import runpy

    from raysegment.data.dataset import load_volumes

    sample = Path(__file__).resolve().parents[1] / "raysegment" / "sample"
    job = runpy.run_path(str(Path(__file__).resolve().parents[1] / "jobs" / "nnunet-layout.py"))
    job["main"](sample, tmp_path / "nn", test_from_val=True)
    ds = tmp_path / "nn" / "nnUNet_raw" / "Dataset027_ACDC"
    splits = json.loads((tmp_path / "nn" / "nnUNet_preprocessed" / "Dataset027_ACDC" / "splits_final.json").read_text())
    assert len(splits) == 5 and sorted(c for f in splits for c in f["val"]) == sorted(p.stem[:-4] for p in (ds / "labelsTr").iterdir())
    fold = next(k for k, f in enumerate(splits) if f["val"])
    val = sorted({c[:10] for c in splits[fold]["val"]})
    assert main(["--source", str(ds), "--out", str(tmp_path / "f"), "--val-file",
                 str(tmp_path / "nn" / "nnUNet_preprocessed" / "Dataset027_ACDC" / "splits_final.json"),
                 "--fold", str(fold), "--no-progress"]) == 0
    assert load_manifest(tmp_path / "f")["splits"]["val"] == val
    assert main(["--source", str(ds / "imagesTs"), "--out", str(tmp_path / "t"), "--val-fraction", "0", "--no-progress"]) == 0
    prepare(PrepareConfig(source=sample, out=tmp_path / "s", progress=False))
    ours, theirs = load_volumes(tmp_path / "t", "train"), load_volumes(tmp_path / "s", "val")
    assert [(v.patient, v.phase) for v in ours] == [(v.patient, v.phase) for v in theirs] and len(ours) == 4
    for a, b in zip(ours, theirs):  # the same reference masks and spacing, through NIfTI and nnU-Net's names
        np.testing.assert_array_equal(a.label, b.label)
        np.testing.assert_allclose(a.spacing, b.spacing, atol=1e-4)
