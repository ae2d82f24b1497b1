"""Study I/O: discovery, reading as (frames, z, y, x), masks written on the input's exact grid."""

import nibabel as nib
import numpy as np
import pytest
from synth import make_nifti_patient

from raysegment.io.studies import (
    StudyError,
    acdc_phase,
    find_studies,
    gt_for,
    nifti_to_zyx,
    parse_info_cfg,
    read_study,
    save_mask,
    spacing_flag,
    zyx_to_nifti,
)


def test_find_studies_skips_ground_truth(tmp_path):
    pdir = make_nifti_patient(tmp_path, 3, ed=1, es=4, nframes=5)
    names = [p.name for p in find_studies(tmp_path)]
    assert names == ["patient003_4d.nii.gz", "patient003_frame01.nii.gz", "patient003_frame04.nii.gz"]
    assert gt_for(pdir / "patient003_frame01.nii.gz").name == "patient003_frame01_gt.nii.gz"
    assert gt_for(pdir / "patient003_4d.nii.gz") is None
    assert acdc_phase(pdir / "patient003_frame04.nii.gz") == "ES"
    assert acdc_phase(pdir / "patient003_frame01.nii.gz") == "ED"
    assert acdc_phase(pdir / "patient003_4d.nii.gz") is None
    assert parse_info_cfg(pdir / "Info.cfg") == {"ED": "1", "ES": "4", "Group": "NOR", "Height": "180.0",
                                                  "NbFrame": "5", "Weight": "80.0"}
    with pytest.raises(FileNotFoundError):
        find_studies(tmp_path / "missing")


def test_an_nnunet_folders_labels_are_its_cases_ground_truth_not_studies(tmp_path):
    """nnU-Net's raw layout: ``imagesTs/NAME_0000.nii.gz`` is a study whose ground truth is
    ``labelsTs/NAME.nii.gz`` (Dice in ``infer``'s report); the labels are no studies. A folder named
    ``labels`` without its ``images`` twin is ordinary input."""
    for folder in ("imagesTs", "labelsTs", "labels"):
        (tmp_path / folder).mkdir()
    image = tmp_path / "imagesTs" / "patient101_frame01_0000.nii.gz"
    for path in (image, tmp_path / "labelsTs" / "patient101_frame01.nii.gz", tmp_path / "labels" / "other.nii.gz"):
        path.write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in find_studies(tmp_path)] == [
        "imagesTs/patient101_frame01_0000.nii.gz", "labels/other.nii.gz"]
    assert gt_for(image) == tmp_path / "labelsTs" / "patient101_frame01.nii.gz"
    assert gt_for(tmp_path / "labels" / "other.nii.gz") is None
    # No Info.cfg: a patient's two frames there are its ED (the lower number) and ES, paired by patient
    from raysegment.analysis.clinical import ed_es_pairs

    es, lone = (tmp_path / "imagesTs" / f"{n}_0000.nii.gz" for n in ("patient101_frame14", "patient102_frame01"))
    es.write_bytes(b"")
    lone.write_bytes(b"")
    assert [acdc_phase(p) for p in (image, es, lone)] == ["ED", "ES", None]
    assert acdc_phase(tmp_path / "labels" / "patient101_frame01_0000.nii.gz") is None  # not an images folder
    rows = [{"study": str(p), "frame": 0, "status": "done", "phase": acdc_phase(p) or ""} for p in (image, es, lone)]
    assert {k: sorted(v) for k, v in ed_es_pairs(rows).items()} == {str(tmp_path / "imagesTs" / "patient101"): ["ED", "ES"]}


def test_transposes_round_trip_and_4d_frames_come_first(tmp_path):
    xyz = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    zyx = nifti_to_zyx(xyz)
    assert zyx.shape == (4, 3, 2) and zyx[3, 2, 1] == xyz[1, 2, 3]
    np.testing.assert_array_equal(zyx_to_nifti(zyx), xyz)
    xyzt = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    tzyx = nifti_to_zyx(xyzt)
    assert tzyx.shape == (5, 4, 3, 2) and tzyx[4, 3, 2, 1] == xyzt[1, 2, 3, 4]
    np.testing.assert_array_equal(zyx_to_nifti(tzyx), xyzt)
    cine = np.arange(9 * 10 * 4 * 5).reshape(9, 10, 4, 5)  # (x, y, z, t)
    nib.save(nib.Nifti1Image(cine.astype(np.int16), np.diag([1.5, 1.5, 8, 1])), str(tmp_path / "c.nii.gz"))
    _, frames, zooms = read_study(tmp_path / "c.nii.gz")
    assert frames.shape == (5, 4, 10, 9) and zooms == (1.5, 1.5, 8.0)
    np.testing.assert_array_equal(frames, nifti_to_zyx(cine))


def test_mask_keeps_oblique_affine_and_grid(tmp_path):
    affine = np.array([[0.2, 1.3, 0.0, 5], [1.4, -0.1, 0.3, -7], [0.0, 0.1, 8.5, 2], [0, 0, 0, 1]])
    src = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((52, 40, 3), np.int16), affine), str(src))
    img, frames, _ = read_study(src)
    mask = np.zeros(frames.shape, np.uint8)
    mask[0, 1, 2, 3] = 2  # frame 0, slice 1, y 2, x 3
    save_mask(mask, img, tmp_path / "m" / "seg.nii.gz")
    seg = nib.load(str(tmp_path / "m" / "seg.nii.gz"))
    assert seg.shape == (52, 40, 3) and np.allclose(seg.affine, affine) and seg.get_data_dtype() == np.uint8
    assert np.asarray(seg.dataobj)[3, 2, 1] == 2 and np.asarray(seg.dataobj).sum() == 2
    assert not list((tmp_path / "m").glob(".partial-*"))


def test_bad_studies_raise_study_error(tmp_path):
    for name, data in {"zero.nii": b"", "text.nii.gz": b"not a nifti"}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(StudyError):
            read_study(tmp_path / name)
    nan = np.ones((20, 20, 3), np.float32)
    nan[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(StudyError, match="NaN"):
        read_study(tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((20, 20), np.int16), np.eye(4)), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(StudyError, match="3-D or 4-D"):
        read_study(tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 20, 3), np.int16), np.eye(4)), str(tmp_path / "thin.nii.gz"))
    with pytest.raises(StudyError, match="too small"):
        read_study(tmp_path / "thin.nii.gz")


def test_a_non_finite_spacing_is_bad_input_and_a_zero_one_is_flagged(tmp_path):
    """A NaN pixdim made the batch job's actor raise a ValueError, an environment error retried on
    every run; nibabel reads a pixdim of 0 as 1 mm, so such a study's mL and grams are flagged (and
    nibabel's warning of it, which the flag says, is not printed)."""
    image = np.ones((20, 20, 3), np.int16)
    for name, pixdim in {"nan": [np.nan, 1.5, 8.0], "zero": [0.0, 0.0, 8.0], "fine": [1.5, 1.5, 8.0]}.items():
        img = nib.Nifti1Image(image, np.diag([1.5, 1.5, 8.0, 1.0]))
        img.header["pixdim"][1:4] = pixdim
        nib.save(img, str(tmp_path / f"{name}.nii.gz"))
    with pytest.raises(StudyError, match="pixel spacing"):
        read_study(tmp_path / "nan.nii.gz")
    import logging

    said = []  # nibabel's own warning of the 0 (in each process that read the study, twice a study)
    heard = logging.Handler()
    heard.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("nibabel.global").addHandler(heard)
    try:
        zero, _, zooms = read_study(tmp_path / "zero.nii.gz")
        nib.load(str(tmp_path / "zero.nii.gz"))  # read otherwise, it still warns
    finally:
        logging.getLogger("nibabel.global").removeHandler(heard)
    assert said == ["pixdim[1,2,3] should be non-zero; setting 0 dims to 1"]  # once: nib.load's
    assert zooms == (1.0, 1.0, 8.0) and spacing_flag(zero) == "spacing_zero_1mm_assumed"
    assert spacing_flag(read_study(tmp_path / "fine.nii.gz")[0]) == ""
    assert spacing_flag(nib.Nifti1Image(image, np.eye(4))) == ""  # in memory: no file to read a header from


def test_output_inside_the_input_is_no_input_and_broken_links_are_kept(tmp_path):
    import os

    from raysegment.io.studies import StudyError, read_study

    (tmp_path / "out" / "masks").mkdir(parents=True)
    for p in (tmp_path / "a.nii.gz", tmp_path / "out" / "masks" / "a_1234_seg.nii.gz"):
        p.write_bytes(b"x")
    (tmp_path / "gone.nii").symlink_to(tmp_path / "nowhere.nii")
    (tmp_path / "loop.nii.gz").symlink_to(tmp_path / "loop.nii.gz")
    names = [p.name for p in find_studies(tmp_path, exclude=tmp_path / "out")]
    assert names == ["a.nii.gz", "gone.nii", "loop.nii.gz"]
    assert len(find_studies(tmp_path)) == 4  # without the exclusion the mask would be a study
    for name in ("gone.nii", "loop.nii.gz"):
        with pytest.raises(StudyError, match="cannot open"):
            read_study(tmp_path / name)
    assert os.path.islink(tmp_path / "loop.nii.gz")


def test_outputs_get_the_umask_mode_not_mkstemp_0600(tmp_path):
    import os

    from raysegment.io.files import atomic_write

    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "r.csv", lambda tmp: open(tmp, "w").write("x"))
    finally:
        os.umask(old)
    assert (tmp_path / "r.csv").stat().st_mode & 0o777 == 0o640


def test_mask_names_differ_for_scan_nii_and_scan_nii_gz(tmp_path):
    from raysegment.inference.study import mask_name

    a, b = mask_name(tmp_path / "scan.nii"), mask_name(tmp_path / "scan.nii.gz")
    assert a != b and a.startswith("scan_") and b.endswith("_seg.nii.gz")
    assert mask_name(tmp_path / "x" / "scan.nii") != a


def test_half_written_files_of_dead_writers_are_removed_and_living_ones_kept(tmp_path):
    import os
    import socket
    import subprocess
    import time

    from raysegment.io.files import remove_stale_partials

    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "dicom" / "s").mkdir(parents=True)
    files = {"dead": tmp_path / "dicom" / "s" / f".partial-{host}-{dead.pid}-ab.dcm",
             "alive": tmp_path / f".partial-{host}-{os.getpid()}-cd.nii.gz",
             "other host, fresh": tmp_path / ".partial-elsewhere-12-ef.nii.gz",
             "old name, old": tmp_path / ".partial-gh.nii.gz",
             "a mask": tmp_path / "scan_seg.nii.gz"}
    for f in files.values():
        f.write_bytes(b"x")
    past = time.time() - 2 * 3600
    os.utime(files["old name, old"], (past, past))
    assert remove_stale_partials(tmp_path) == 2
    assert {k for k, f in files.items() if f.exists()} == {"alive", "other host, fresh", "a mask"}


def test_hidden_files_and_folders_are_no_input(tmp_path):
    """A folder copied from a Mac to exFAT or a share holds a ``._NAME`` resource fork beside each file
    (and ``.DS_Store``; a zip adds ``__MACOSX/``): ``infer`` gave each a failed row (``unreadable
    NIfTI``, ``unreadable DICOM``), ``prepare`` and the mask readers counted their patients and masks
    twice. Hidden files and folders are now no input anywhere."""
    from synth import make_h5_dataset, write_dicom_cine

    from raysegment.data.masks import mask_files
    from raysegment.data.volumes import find_h5_volumes, find_patient_dirs
    from raysegment.io.dicom import find_series

    pdir = make_nifti_patient(tmp_path / "nifti", 1)
    dicom = write_dicom_cine(tmp_path / "dicom", np.ones((2, 3, 16, 16), np.float32))
    h5 = make_h5_dataset(tmp_path / "h5", patients=(1, 2), val=(2,))
    for f in dicom[:2]:  # as exports name them: a .dcm file whose twin is a .dcm without a DICOM header
        f.rename(f.with_name(f.name + ".dcm"))
    twins = [*pdir.glob("*.nii.gz"), *(tmp_path / "dicom").glob("*.dcm"), *(h5 / "volumes").glob("*.h5")]
    for f in twins:  # AppleDouble: a 4-kB header, no NIfTI, DICOM or HDF5 content
        (f.parent / f"._{f.name}").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X" + bytes(4000))
    for root in (tmp_path / "nifti", tmp_path / "dicom"):
        (root / ".DS_Store").write_bytes(bytes(100))
    mac = tmp_path / "nifti" / "__MACOSX" / "training" / "patient001"
    mac.mkdir(parents=True)
    (mac / "._patient001_frame01.nii.gz").write_bytes(bytes(100))
    (tmp_path / "nifti" / ".snapshot" / "patient002").mkdir(parents=True)  # a file server's snapshot copy

    assert [p.name for p in find_studies(tmp_path / "nifti")] == [
        "patient001_4d.nii.gz", "patient001_frame01.nii.gz", "patient001_frame07.nii.gz"]
    series, bad = find_series(tmp_path / "dicom")
    assert bad == [] and len(series) == 1 and len(series[0].files) == 6
    assert find_patient_dirs(tmp_path / "nifti") == [pdir]
    assert [p.name for p in find_h5_volumes(h5)] == [f"patient00{i}_frame0{f}.h5" for i in (1, 2) for f in (1, 2)]
    masks = tmp_path / "masks"
    (masks / ".ipynb_checkpoints").mkdir(parents=True)
    for folder in (masks, masks / ".ipynb_checkpoints"):
        (folder / "patient001_frame01_seg.nii.gz").write_bytes(b"")
    assert mask_files(masks) == {("patient001", "frame01"): masks / "patient001_frame01_seg.nii.gz"}
