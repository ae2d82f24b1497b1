"""DICOM in and out without servers: series found by content, geometry, skip reasons, SEG written per
frame and read back onto the NIfTI mask's voxels."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from synth import COMPRESSED, compress_dicom, rotated_orientation, synthetic_volume, write_dicom_cine

from raysegment.io import dicom
from raysegment.io import seg as dicom_seg


def _cine(shape=(5, 40, 48)):
    (ed, led), (es, les) = synthetic_volume(1, shape=shape), synthetic_volume(2, shape=shape, lv_radius=5.0)
    return np.stack([ed, es]), np.stack([led, les])


def test_series_are_found_by_content_and_read_with_their_geometry(tmp_path):
    frames, _ = _cine()
    row, col = rotated_orientation()
    write_dicom_cine(tmp_path / "in" / "x", frames, spacing_zyx=(8.0, 1.4, 1.25), origin=(-80, -60, 40))
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    series, bad = dicom.find_series(tmp_path / "in")
    assert len(series) == 1 and bad == [] and len(series[0].files) == 10
    assert all("." not in f.name for f in series[0].files)  # no extension: found by the preamble
    cine = dicom.read_cine(series[0])
    assert cine.frames.shape == (2, 5, 40, 48) and cine.spacing_zyx == pytest.approx((8.0, 1.4, 1.25))
    # Intensities survive (int16 scaling only), slices in order along the normal, frames by time.
    np.testing.assert_allclose(cine.frames / cine.frames.max(), frames / frames.max(), atol=1e-3)
    # The affine maps voxel (x, y, z) to RAS: LPS origin and directions with x and y negated.
    normal = np.cross(row, col)
    lps = lambda v: np.diag([-1, -1, 1]) @ v  # noqa: E731
    np.testing.assert_allclose(cine.affine[:3, 3], lps(np.array([-80.0, -60, 40])), atol=1e-3)
    np.testing.assert_allclose(cine.affine[:3, 0], lps(row * 1.25), atol=1e-5)
    np.testing.assert_allclose(cine.affine[:3, 1], lps(col * 1.4), atol=1e-5)
    np.testing.assert_allclose(cine.affine[:3, 2], lps(normal * 8.0), atol=1e-4)
    # The same series with its files shuffled into other names and folders reads the same.
    again = dicom.read_cine(dicom.Series(series[0].uid, series[0].study_uid, list(reversed(series[0].files))))
    np.testing.assert_array_equal(again.frames, cine.frames)


def test_a_series_stored_compressed_reads_and_segments_as_its_uncompressed_twin(tmp_path, tiny_model):
    """PACS archives and scanner exports keep MR images JPEG Lossless, JPEG-LS or JPEG 2000 compressed:
    without a decoder every such series was a failed row (``pixel data unreadable … all plugins are
    missing dependencies``). A series whose instances are in four lossless syntaxes gives the pixels,
    the mask and the SEGs of the same series uncompressed."""
    import pydicom

    from raysegment.config import PredictConfig
    from raysegment.inference.predictor import Predictor
    from raysegment.inference.study import segment_series
    from raysegment.model.checkpoint import LoadedModel

    frames, _ = _cine()
    plain = write_dicom_cine(tmp_path / "plain", frames)
    (tmp_path / "packed").mkdir()
    for i, f in enumerate(sorted(plain)):
        compress_dicom(f, tmp_path / "packed" / f.name, COMPRESSED[i % len(COMPRESSED)])
    syntaxes = {pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID.name
                for f in (tmp_path / "packed").iterdir()}
    assert len(syntaxes) == len(COMPRESSED) and not any("Little Endian" in s for s in syntaxes)
    predictor = Predictor(LoadedModel(*tiny_model, "tiny/1"), PredictConfig())
    masks = []
    for name in ("plain", "packed"):
        (series,), bad = dicom.find_series(tmp_path / name)
        assert bad == []
        masks.append(segment_series(f"dicom:{series.study_uid}/{series.uid}", series.files, predictor, "tiny",
                                    tmp_path / f"out-{name}"))
        assert [r["status"] for r in masks[-1]] == ["done", "done"]
        if name == "plain":
            reference = dicom.read_cine(series).frames
    np.testing.assert_array_equal(dicom.read_cine(series).frames, reference)
    np.testing.assert_array_equal(np.asarray(nib.load(masks[0][0]["mask"]).dataobj),
                                  np.asarray(nib.load(masks[1][0]["mask"]).dataobj))
    cine = dicom.read_cine(series)
    for t, (a, b) in enumerate(zip(*masks)):
        np.testing.assert_array_equal(dicom_seg.read_seg_labels(a["seg"], cine, t), dicom_seg.read_seg_labels(b["seg"], cine, t))
    # An Enhanced MR (one multi-frame instance) compressed: its frames decode to the same cine.
    import highdicom as hd

    (tmp_path / "enhanced").mkdir()
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage([pydicom.dcmread(f) for f in plain], series_instance_uid=pydicom.uid.generate_uid(),
                                                        series_number=6, sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1)
    enhanced.save_as(tmp_path / "enhanced.dcm")
    compress_dicom(tmp_path / "enhanced.dcm", tmp_path / "enhanced" / "cine", "JPEG2000Lossless")
    packed = pydicom.dcmread(tmp_path / "enhanced" / "cine")
    # GDCM's writer rewrites the frames' positions as one regular volume: give them back.
    packed.PerFrameFunctionalGroupsSequence = enhanced.PerFrameFunctionalGroupsSequence
    packed.save_as(tmp_path / "enhanced" / "cine")
    (multi,), _ = dicom.find_series(tmp_path / "enhanced")
    np.testing.assert_array_equal(dicom.read_cine(multi).frames, reference)


def _split_per_slice(files, slices: int, numbers=None) -> list[str]:
    """Give each slice of a cine series written by ``write_dicom_cine`` a series of its own (as many cine
    protocols store a short-axis stack: a breath-hold, a series) → the new series' UIDs."""
    import pydicom
    from pydicom.uid import generate_uid

    uids = [generate_uid() for _ in range(slices)]
    for f in files:
        ds = pydicom.dcmread(f)
        z = (int(ds.InstanceNumber) - 1) % slices
        ds.SeriesInstanceUID, ds.SeriesDescription = uids[z], f"sa_{z + 1}"
        ds.SeriesNumber = (numbers or range(10, 10 + slices))[z]
        ds.save_as(f)
    return uids


def test_a_stack_stored_as_a_series_per_slice_is_read_and_segmented_as_one_series(tmp_path, tiny_model):
    """Short-axis slices each in a series of their own (one breath-hold each) were each skipped, "a
    single slice position": nothing of the study was segmented. Three or more parallel single-slice
    series of one study and frame of reference are one stack, in slice order: the pixels, mask and
    SEGs of the same cine stored as one series. A slice acquired again (same position, later series
    number) replaces the first; a long-axis cine (another orientation) stays a series of its own."""
    import copy
    import shutil

    import pydicom

    from raysegment.config import PredictConfig
    from raysegment.inference.predictor import Predictor
    from raysegment.inference.study import folder_cine, segment_series
    from raysegment.model.checkpoint import LoadedModel

    frames, _ = _cine()
    write_dicom_cine(tmp_path / "one", frames, patient="S1")
    shutil.copytree(tmp_path / "one", tmp_path / "split")  # the same instances, split into a series per slice
    split = sorted((tmp_path / "split").iterdir())
    members = _split_per_slice(split, 5)
    first = pydicom.dcmread(split[0])
    # Slice 3 acquired twice: the first take (series 12) blank, the repeat (series 30) the real images.
    take = pydicom.uid.generate_uid()
    for f in split:
        ds = pydicom.dcmread(f)
        if ds.SeriesInstanceUID != members[2]:
            continue
        blank = copy.deepcopy(ds)
        blank.SeriesInstanceUID, blank.SeriesNumber = take, 12
        blank.SOPInstanceUID = blank.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        blank.PixelData = np.zeros((40, 48), np.int16).tobytes()
        blank.save_as(tmp_path / "split" / f"take1-{ds.InstanceNumber}", enforce_file_format=True)
        ds.SeriesNumber = 30
        ds.save_as(f)
    row, col = rotated_orientation((70.0, 10.0, 0.0))
    lax = write_dicom_cine(tmp_path / "split" / "lax", frames[:, :1], study_uid=first.StudyInstanceUID, orientation=(row, col))
    for f in lax:
        ds = pydicom.dcmread(f)
        ds.FrameOfReferenceUID = first.FrameOfReferenceUID
        ds.save_as(f)

    found, bad = dicom.find_series(tmp_path / "split")
    assert bad == [] and len(found) == 3
    stack = next(s for s in found if s.members)
    assert stack.members == tuple(members) and len(stack.files) == 10  # slice order, the repeat of slice 3
    (single,), _ = dicom.find_series(tmp_path / "one")
    reference = dicom.read_cine(single)
    cine = dicom.read_cine(stack)
    np.testing.assert_array_equal(cine.frames, reference.frames)
    np.testing.assert_allclose(cine.affine, reference.affine, atol=1e-6)
    assert cine.description == "sa_1 (a stack of 5 series)" and cine.series_uid == stack.uid
    for other in (s for s in found if not s.members):
        with pytest.raises(dicom.SeriesSkipped, match="a single slice position"):
            dicom.read_cine(other)
    predictor = Predictor(LoadedModel(*tiny_model, "tiny/1"), PredictConfig())
    rows = segment_series(dicom.series_key(stack.study_uid, stack.uid), stack.files, predictor, "tiny", tmp_path / "out")
    want = segment_series(dicom.series_key(single.study_uid, single.uid), single.files, predictor, "tiny", tmp_path / "ref")
    np.testing.assert_array_equal(np.asarray(nib.load(rows[0]["mask"]).dataobj), np.asarray(nib.load(want[0]["mask"]).dataobj))
    for t, (r, w) in enumerate(zip(rows, want)):
        np.testing.assert_array_equal(dicom_seg.read_seg_labels(r["seg"], cine, t), dicom_seg.read_seg_labels(w["seg"], reference, t))
        seg = pydicom.dcmread(r["seg"])
        assert {s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence} == set(members)
    # raysegment.segment's folder reading finds it by the stack's UID or any of its series'.
    assert folder_cine(tmp_path / "split", members[4]).series_uid == stack.uid


def test_positions_that_differ_by_micrometres_are_one_slice(tmp_path):
    """Positions of one slice written a few micrometres apart (a header re-written from floats) were
    grouped by rounding to 0.01 mm: those either side of a rounding line became two slices, and nine
    series in ten were skipped, "slices hold different numbers of frames (an instance is missing)"."""
    import pydicom

    frames = np.stack([synthetic_volume(s, shape=(5, 40, 48))[0] for s in range(3)])
    files = write_dicom_cine(tmp_path / "cine", frames)
    (series,), _ = dicom.find_series(tmp_path / "cine")
    reference = dicom.read_cine(series)
    rng = np.random.default_rng(0)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [round(float(v) + rng.uniform(-0.004, 0.004), 4) for v in ds.ImagePositionPatient]
        ds.save_as(f)
    cine = dicom.read_cine(series)
    np.testing.assert_array_equal(cine.frames, reference.frames)
    assert cine.spacing_zyx == pytest.approx(reference.spacing_zyx, abs=0.01)


def test_frames_without_a_time_are_ordered_by_instance_number_and_without_that_skipped(tmp_path):
    """An export without trigger time and temporal position (an anonymiser's, a converter's) left each
    slice's frames in the order of the files' names, so frame t of one slice could be another phase of
    the next, without a word. Now they follow the instance number; with none either, it is skipped."""
    import pydicom

    frames = np.stack([synthetic_volume(s, shape=(4, 40, 48))[0] for s in range(3)])
    files = write_dicom_cine(tmp_path / "cine", frames)
    (series,), _ = dicom.find_series(tmp_path / "cine")
    reference = dicom.read_cine(series).frames
    for f in files:
        ds = pydicom.dcmread(f)
        del ds.TriggerTime, ds.TemporalPositionIdentifier
        ds.save_as(f)
    np.testing.assert_array_equal(dicom.read_cine(series).frames, reference)
    for f in files:
        ds = pydicom.dcmread(f)
        del ds.InstanceNumber
        ds.save_as(f)
    with pytest.raises(dicom.SeriesSkipped, match="cannot be ordered"):
        dicom.read_cine(series)


@pytest.mark.parametrize("case,reason", [
    ("secondary_capture", r"not MR \(modality OT"),
    ("missing_slice", "not evenly spaced"),
    ("missing_instance", "different numbers of frames"),
    ("single_slice", "a single slice position"),
])
def test_series_that_are_not_a_short_axis_cine_are_skipped_with_the_reason(tmp_path, case, reason):
    frames, _ = _cine()
    kwargs = {"secondary_capture": {"modality": "OT"}, "missing_slice": {"skip": {(0, 2), (1, 2)}},
              "missing_instance": {"skip": {(1, 3)}}, "single_slice": {}}[case]
    if case == "single_slice":
        frames = frames[:, :1]
    write_dicom_cine(tmp_path / "s", frames, **kwargs)
    (series,), _ = dicom.find_series(tmp_path / "s")
    with pytest.raises(dicom.SeriesSkipped, match=reason):
        dicom.read_cine(series)


def test_a_corrupt_dicom_file_is_reported_and_the_rest_still_found(tmp_path):
    frames, _ = _cine()
    write_dicom_cine(tmp_path / "in", frames)
    (tmp_path / "in" / "broken").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    series, bad = dicom.find_series(tmp_path / "in")
    assert len(series) == 1 and len(bad) == 1
    assert bad[0][0].name == "broken" and "unreadable DICOM" in bad[0][1]


def test_one_seg_per_frame_reads_back_onto_the_mask_voxels(tmp_path):
    frames, labels = _cine()
    write_dicom_cine(tmp_path / "in", frames)
    (series,), _ = dicom.find_series(tmp_path / "in")
    cine = dicom.read_cine(series)
    paths = dicom_seg.write_segs(cine, labels, "raysegment-mobilenet_v2/3", tmp_path / "seg")
    assert [p.name for p in paths] == ["seg_frame01.dcm", "seg_frame02.dcm"]
    import highdicom as hd

    seg = hd.seg.segread(paths[1])
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == series.study_uid
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["RV cavity", "LV myocardium", "LV cavity"]
    assert [d.SegmentedPropertyTypeCodeSequence[0].CodeValue for d in seg.SegmentSequence] == ["53085002", "49848007", "87878005"]
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "raysegment"
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {p["ds"].SOPInstanceUID for p in cine.sources[1]}  # exactly frame 2's instances
    for t in range(2):
        np.testing.assert_array_equal(dicom_seg.read_seg_labels(paths[t], cine, t), labels[t])
    # Written again (a rerun after a kill): the same UIDs, so a PACS keeps one copy.
    again = dicom_seg.write_segs(cine, labels, "raysegment-mobilenet_v2/3", tmp_path / "seg2")
    assert hd.seg.segread(again[1]).SOPInstanceUID == seg.SOPInstanceUID
    other = dicom_seg.write_segs(cine, labels, "raysegment-mobilenet_v2/4", tmp_path / "seg3")
    assert hd.seg.segread(other[1]).SOPInstanceUID != seg.SOPInstanceUID


def test_a_series_segments_to_a_nifti_mask_and_segs_that_agree(tmp_path, tiny_model):
    from raysegment.config import PredictConfig
    from raysegment.inference.predictor import Predictor
    from raysegment.inference.study import segment_series
    from raysegment.model.checkpoint import LoadedModel

    frames, _ = _cine()
    write_dicom_cine(tmp_path / "in", frames, patient="P9")
    (series,), _ = dicom.find_series(tmp_path / "in")
    predictor = Predictor(LoadedModel(*tiny_model, "tiny/1"), PredictConfig())
    rows = segment_series(f"dicom:{series.study_uid}/{series.uid}", series.files, predictor, "tiny", tmp_path / "out")
    assert [r["frame"] for r in rows] == [0, 1] and json.loads(rows[0]["spacing_mm"]) == [8.0, 1.4, 1.4]
    assert {r["patient_id"] for r in rows} == {"P9"}  # names the patient in report.md's Patients table
    mask = nib.load(rows[0]["mask"])
    assert mask.shape == (48, 40, 5, 2)
    cine = dicom.read_cine(series)
    np.testing.assert_allclose(mask.affine, cine.affine, atol=1e-4)
    data = np.transpose(np.asarray(mask.dataobj), (3, 2, 1, 0))  # → (t, z, y, x)
    for t, r in enumerate(rows):
        np.testing.assert_array_equal(dicom_seg.read_seg_labels(r["seg"], cine, t), data[t])


def test_segment_api_reads_a_dicom_folder_to_the_mask_infer_writes_and_says_which_series_to_name(tmp_path, tiny_model):
    """``raysegment.segment(folder)``: the folder's one cine series → the same 4-D mask (data, affine)
    the batch job writes for it; with a second cine series beside it, an error listing both UIDs
    until ``series=`` names one; a folder without DICOM says so."""
    import raysegment
    from raysegment.config import PredictConfig
    from raysegment.inference.predictor import Predictor
    from raysegment.inference.study import segment_series
    from raysegment.io.studies import StudyError
    from raysegment.model.checkpoint import LoadedModel

    frames, _ = _cine()
    write_dicom_cine(tmp_path / "in" / "a", frames, patient="P1")
    (tmp_path / "in" / "a" / "notes.txt").write_text("not DICOM")
    predictor = Predictor(LoadedModel(*tiny_model, "tiny/1"), PredictConfig(in_plane="auto"))
    mask = raysegment.segment(tmp_path / "in", model=predictor)
    (series,), _ = dicom.find_series(tmp_path / "in")
    rows = segment_series(f"dicom:{series.study_uid}/{series.uid}", series.files, predictor, "tiny", tmp_path / "out")
    written = nib.load(rows[0]["mask"])
    assert mask.shape == written.shape == (48, 40, 5, 2) and mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(written.dataobj))
    np.testing.assert_allclose(mask.affine, written.affine, atol=1e-6)
    assert (np.asarray(mask.dataobj) > 0).any()

    write_dicom_cine(tmp_path / "in" / "b", frames[:, ::-1].copy(), patient="P1", study_uid=series.study_uid)
    with pytest.raises(StudyError, match=r"2 short-axis cine series; name one \(series=UID\)") as err:
        raysegment.segment(tmp_path / "in", model=predictor)
    (other,) = [s for s in dicom.find_series(tmp_path / "in")[0] if s.uid != series.uid]
    assert series.uid in str(err.value) and other.uid in str(err.value)
    again = raysegment.segment(tmp_path / "in", model=predictor, series=series.uid)
    np.testing.assert_array_equal(np.asarray(again.dataobj), np.asarray(mask.dataobj))
    with pytest.raises(StudyError, match=rf"no series 1\.2\.3; it holds .*{series.uid}"):
        raysegment.segment(tmp_path / "in", model=predictor, series="1.2.3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudyError, match=r"no DICOM series under it \(a NIfTI study is given as its file\)"):
        raysegment.segment(tmp_path / "empty", model=predictor)
    with pytest.raises(ValueError, match="image is not a folder"):
        raysegment.segment(rows[0]["mask"], model=predictor, series=series.uid)


def test_a_series_whose_rows_run_the_other_way_gets_segs_of_the_stored_ones_masks_turned_back(tmp_path):
    """A PACS series of a bundled sample patient, as stored and with its rows reversed: ``auto``
    segments the second turned (a result row says so) and its SEGs, read back onto the series'
    voxels, are the first one's masks with their rows reversed."""
    from synth import sample_cine

    from raysegment.config import PredictConfig
    from raysegment.inference.predictor import Predictor
    from raysegment.inference.study import segment_series

    frames, labels, spacing = sample_cine("patient003")
    predictor = Predictor.load("shipped:mobilenet_v2", PredictConfig(in_plane="auto"))
    segs = {}
    for name, images in (("stored", frames), ("reversed", np.ascontiguousarray(frames[:, :, ::-1]))):
        write_dicom_cine(tmp_path / name, images, spacing_zyx=spacing, patient=name)
        (series,), _ = dicom.find_series(tmp_path / name)
        rows = segment_series(f"dicom:{series.study_uid}/{series.uid}", series.files, predictor, "shipped",
                              tmp_path / f"out-{name}")
        assert {r["in_plane"] for r in rows} == {"as-stored" if name == "stored" else "rows-reversed"}
        cine = dicom.read_cine(series)
        segs[name] = np.stack([dicom_seg.read_seg_labels(r["seg"], cine, t) for t, r in enumerate(rows)])
    assert (segs["stored"] == 3).sum() > 1000  # the LV is there
    np.testing.assert_array_equal(segs["reversed"], segs["stored"][:, :, ::-1])


def test_a_cine_series_gets_an_sr_of_its_indices_beside_its_segs_written_once(tmp_path):
    """A segmented DICOM cine's patient indices (results.csv's, after the basal check) go into a DICOM
    SR with LOINC codes and units, its SEGs as evidence; a poll with the same values writes nothing,
    other values (a new model version) a new SR; a patient with no whole indices gets none."""
    import pydicom
    from synth import sample_cine

    from raysegment.config import PredictConfig
    from raysegment.inference.clinical_sr import write_srs
    from raysegment.inference.ledger import add_patient_clinical
    from raysegment.inference.predictor import Predictor
    from raysegment.inference.study import segment_series
    from raysegment.io.sr import MEASUREMENTS, read_indices_sr, sr_values

    frames, _, spacing = sample_cine("patient003")
    write_dicom_cine(tmp_path / "in", frames, spacing_zyx=spacing, patient="P3")
    (series,), _ = dicom.find_series(tmp_path / "in")
    out = tmp_path / "out"
    rows = segment_series(dicom.series_key(series.study_uid, series.uid), series.files,
                          Predictor.load("shipped:mobilenet_v2", PredictConfig()), "shipped", out)
    add_patient_clinical(rows)
    ed = next(r for r in rows if r["phase"] == "ED")
    assert write_srs(rows, out) == {"written": 1, "stored": 0, "kept": 0, "errors": []}
    path = out / "dicom" / series.uid / "indices_sr.dcm"
    assert read_indices_sr(path) == {k: round(ed[k], 1) for k, *_ in MEASUREMENTS} and 0 < ed["lv_ef_pct"] < 90  # a DCM patient
    sr = pydicom.dcmread(path)
    assert sr.Modality == "SR" and sr.PatientID == "P3" and sr.SeriesDescription.endswith(" indices")
    assert {s.SeriesInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence} == \
        {pydicom.dcmread(rows[0]["seg"]).SeriesInstanceUID}
    assert write_srs(rows, out)["written"] == 0

    class Down:  # a PACS that fails the STOW-RS: a line, and the next run stores it
        def store_instances(self, datasets):
            raise ConnectionError("PACS down")

    got = write_srs(rows, out, Down())
    assert got["stored"] == 0 and "STOW-RS of its indices SR failed (ConnectionError: PACS down)" in got["errors"][0]
    assert json.loads((out / "sr.json").read_text())[ed["study"]] == {"uid": sr.SOPInstanceUID, "stored": False}
    for r in rows:
        r["model_version"] = "other/2"
    assert write_srs(rows, out)["written"] == 1 and pydicom.dcmread(path).SOPInstanceUID != sr.SOPInstanceUID
    assert sr_values({**ed, "rv_ef_pct": -3.0}) is None and sr_values({**ed, "lv_mass_g": float("nan")}) is None


def test_an_enhanced_multiframe_mr_reads_like_its_single_frame_series_and_gets_its_segs(tmp_path):
    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    frames, labels = _cine(shape=(4, 40, 48))
    files = write_dicom_cine(tmp_path / "single", frames)
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage([pydicom.dcmread(f) for f in files], series_instance_uid=generate_uid(),
                                                        series_number=6, sop_instance_uid=generate_uid(), instance_number=1)
    (tmp_path / "multi").mkdir()
    enhanced.save_as(tmp_path / "multi" / "cine")
    (multi,), _ = dicom.find_series(tmp_path / "multi")
    (single,), _ = dicom.find_series(tmp_path / "single")
    a, b = dicom.read_cine(multi), dicom.read_cine(single)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)
    paths = dicom_seg.write_segs(a, labels, "v1", tmp_path / "seg")
    seg = hd.seg.segread(paths[0])
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
    for t in range(2):
        np.testing.assert_array_equal(dicom_seg.read_seg_labels(paths[t], a, t), labels[t])


# --------------------------------------------------------------------------- bad and unusual input


def test_a_series_exported_twice_is_one_series_of_its_own_frames(tmp_path, tiny_model):
    """The same instances in two folders (a double export): one series, one row and one SEG per
    cine frame, each SEG referencing each source instance once."""
    import shutil

    from raysegment.config import PredictConfig
    from raysegment.inference.predictor import Predictor
    from raysegment.inference.study import segment_series
    from raysegment.model.checkpoint import LoadedModel

    frames, _ = _cine()
    write_dicom_cine(tmp_path / "in" / "a", frames)
    shutil.copytree(tmp_path / "in" / "a", tmp_path / "in" / "b")
    (series,), bad = dicom.find_series(tmp_path / "in")
    assert bad == [] and len(series.files) == 10 and len(set(series.sop_uids)) == 10
    predictor = Predictor(LoadedModel(*tiny_model, "tiny/1"), PredictConfig())
    rows = segment_series(f"dicom:{series.study_uid}/{series.uid}", series.files, predictor, "tiny", tmp_path / "out")
    assert [r["frame"] for r in rows] == [0, 1] and len({r["seg"] for r in rows}) == 2
    import highdicom as hd

    refs = [r.ReferencedSOPInstanceUID for r in hd.seg.segread(rows[0]["seg"]).ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    assert len(refs) == len(set(refs)) == 5
    # Reading the duplicated file list (as a PACS folder might hold it) gives the same cine.
    again = dicom.read_cine(dicom.Series(series.uid, series.study_uid, sorted(p for p in (tmp_path / "in").rglob("*") if p.is_file())[1:]))
    assert again.frames.shape == (2, 5, 40, 48) and again.content == series.digest()


def test_truncated_pixel_data_is_bad_input_with_a_one_line_reason(tmp_path):
    from raysegment.io.studies import StudyError

    frames, _ = _cine()
    files = write_dicom_cine(tmp_path / "in", frames)
    files[3].write_bytes(files[3].read_bytes()[:-500])  # pixel data cut short (a broken transfer)
    (series,), bad = dicom.find_series(tmp_path / "in")  # the header is fine: it is part of the series
    assert bad == [] and len(series.files) == 10
    with pytest.raises(StudyError, match="pixel data unreadable") as info:
        dicom.read_cine(series)
    assert "\n" not in str(info.value) and files[3].name in str(info.value)


def test_empty_and_preambleless_files_get_a_row_or_are_read(tmp_path):
    """A zero-byte .dcm is reported (not silently dropped); a series saved without the 128-byte
    preamble is found and read like any other."""
    import pydicom

    frames, _ = _cine()
    files = write_dicom_cine(tmp_path / "in" / "raw", frames)
    for f in files:  # rewrite each file as a bare data set: no preamble, no file meta
        ds = pydicom.dcmread(f)
        f.unlink()
        del ds.file_meta
        ds.preamble = None
        pydicom.dcmwrite(f.with_suffix(".dcm"), ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
        assert f.with_suffix(".dcm").read_bytes()[128:132] != b"DICM"
    (tmp_path / "in" / "empty.dcm").write_bytes(b"")
    (tmp_path / "in" / "garbage.dcm").write_bytes(b"not dicom at all " * 20)
    (tmp_path / "in" / "notes.txt").write_text("not input")
    series, bad = dicom.find_series(tmp_path / "in")
    assert len(series) == 1 and len(series[0].files) == 10
    assert sorted((p.name, r) for p, r in bad) == [("empty.dcm", "unreadable DICOM (an empty file)"),
                                                   ("garbage.dcm", "unreadable DICOM (no DICOM header)")]
    assert dicom.read_cine(series[0]).frames.shape == (2, 5, 40, 48)


def test_an_instance_repeated_under_another_uid_is_named_as_such(tmp_path):
    import pydicom
    from pydicom.uid import generate_uid

    frames, _ = _cine()
    files = write_dicom_cine(tmp_path / "in", frames)
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "in" / "copy", enforce_file_format=True)
    (series,), _ = dicom.find_series(tmp_path / "in")
    with pytest.raises(dicom.SeriesSkipped, match="two images of the same time"):
        dicom.read_cine(series)


def _ds_texts(ds):
    for elem in ds.iterall():
        if elem.VR == "DS" and elem.value is not None:
            values = elem.value if elem.VM > 1 else [elem.value]
            yield from (str(v) for v in values)


def test_segs_of_an_enhanced_mr_keep_decimal_strings_within_16_characters(tmp_path):
    import shutil
    import subprocess

    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    frames, labels = _cine(shape=(4, 40, 48))
    files = write_dicom_cine(tmp_path / "single", frames, origin=(-80.123456789, -60.987654321, 40.5555555))
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage([pydicom.dcmread(f) for f in files], series_instance_uid=generate_uid(),
                                                        series_number=6, sop_instance_uid=generate_uid(), instance_number=1)
    (tmp_path / "multi").mkdir()
    enhanced.save_as(tmp_path / "multi" / "cine")
    (multi,), _ = dicom.find_series(tmp_path / "multi")
    paths = dicom_seg.write_segs(dicom.read_cine(multi), labels, "v1", tmp_path / "seg")
    for p in paths:
        texts = list(_ds_texts(pydicom.dcmread(p)))
        assert texts and max(len(t) for t in texts) <= 16, [t for t in texts if len(t) > 16]
    if shutil.which("dciodvfy"):  # dicom3tools' validator, where installed
        report = subprocess.run(["dciodvfy", str(paths[0])], capture_output=True, text=True)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert errors == []


def test_the_segs_of_a_series_agree_on_its_series_attributes_name_the_model_and_colour_as_our_figures(tmp_path):
    """A SEG per frame in one SEG series: series number and description are one value per series
    (a PACS lists the series by them; they said "frame 1" … "frame N"), and the description names
    the model version; the frame is each instance's number and content label."""
    import shutil
    import subprocess

    import highdicom as hd
    import pydicom

    from raysegment.config import CLASS_COLOURS

    frames, labels = _cine()
    write_dicom_cine(tmp_path / "in", frames)
    (series,), _ = dicom.find_series(tmp_path / "in")
    paths = dicom_seg.write_segs(dicom.read_cine(series), labels, "raysegment-densenet121/3", tmp_path / "seg")
    heads = [pydicom.dcmread(p) for p in paths]
    assert {(h.SeriesInstanceUID, h.SeriesNumber, h.SeriesDescription) for h in heads} == {
        (heads[0].SeriesInstanceUID, 9000, "raysegment raysegment-densenet121/3")}
    assert [(h.InstanceNumber, h.ContentLabel, h.ContentDescription) for h in heads] == [
        (1, "CINE_FRAME_1", "cine frame 1 of 2"), (2, "CINE_FRAME_2", "cine frame 2 of 2")]
    # Each segment's recommended display colour is its colour in our figures (RV red, MYO green, LV blue).
    colours = [hd.color.CIELabColor.from_dicom_value(s.RecommendedDisplayCIELabValue).to_rgb()
               for s in heads[0].SegmentSequence]
    assert ["#%02x%02x%02x" % c for c in colours] == [CLASS_COLOURS[k] for k in (1, 2, 3)]
    if shutil.which("dcentvfy"):  # dicom3tools' check that a series' files agree, where installed
        report = subprocess.run(["dcentvfy", *map(str, paths)], capture_output=True, text=True)
        assert [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")] == []


def test_seg_uids_follow_the_content_they_were_made_from(tmp_path):
    """A series that gained instances gets new SEG instance UIDs (so a PACS cannot keep the stale
    SEG under the old one), in the same SEG series."""
    import highdicom as hd

    frames, labels = _cine()
    files = write_dicom_cine(tmp_path / "in", frames)
    part = dicom.Series("s", "t", [f for f in files if "3" not in f.name])
    (series,), _ = dicom.find_series(tmp_path / "in")
    full = dicom.read_cine(series)
    a = hd.seg.segread(dicom_seg.write_segs(full, labels, "v1", tmp_path / "a")[0])
    full.content = dicom.instances_digest(part.sop_uids or ["other"])
    b = hd.seg.segread(dicom_seg.write_segs(full, labels, "v1", tmp_path / "b")[0])
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID


def test_a_malformed_pacs_record_gets_its_own_row_and_the_rest_go_on():
    """A QIDO-RS series record without UIDs, or a failing instance query, marks that series only."""

    class Pacs:  # the records a DICOMweb server answers with (JSON as in PS3.18)
        def search_for_series(self, search_filters, offset=0):
            return [{"0020000D": {"Value": ["1.2"]}, "0020000E": {"Value": ["1.2.3"]}},
                    {"0020000D": {"Value": ["1.2"]}},
                    {"0020000D": {"Value": ["1.2"]}, "0020000E": {"Value": ["1.2.4"]}}][offset:]

        def search_for_instances(self, study_instance_uid, series_instance_uid, fields=None, offset=0):
            if series_instance_uid == "1.2.4":
                raise ConnectionError("reset by peer")
            return [{"00080018": {"Value": ["1.2.3.1"]}}][offset:]

    from raysegment.io import dicomweb

    found = dicomweb.web_series(Pacs())
    assert [s["series"] for s in found] == ["1.2.3", "?1", "1.2.4"]
    assert found[0]["sha256"] == dicom.instances_digest(["1.2.3.1"]) and "invalid" not in found[0]
    assert "without Study or Series Instance UID" in found[1]["invalid"]
    assert "QIDO-RS instance query failed (ConnectionError" in found[2]["error"]


def test_replacing_segs_in_a_pacs_that_deletes_nothing_keeps_them_and_a_5xx_is_an_error(tmp_path):
    """``web_replace_segs`` against a PACS that answers DELETE 405 and has no Orthanc REST API: the new
    instance is stored, the earlier one kept and said; stored again, the PACS's 409 for a duplicate is
    no error where it holds the instance. One whose DELETE fails with a 503 (the PACS in trouble)
    raises, so the series is an error retried next run, not settled with stale SEGs."""
    from types import SimpleNamespace

    import pydicom
    import requests
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from raysegment.io.dicomweb import web_replace_segs

    study, series = generate_uid(), generate_uid()

    def instance(name: str) -> str:
        ds = pydicom.Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.SOPClassUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.66.4", "SEG"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID, ds.file_meta.MediaStorageSOPClassUID = ExplicitVRLittleEndian, ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(tmp_path / name, enforce_file_format=True)
        return ds.SOPInstanceUID

    class Pacs:
        base_url = "http://pacs.example/dicom-web"

        def __init__(self, delete_status: int):
            self.held = {instance("old.dcm")}
            self.other_version = {generate_uid(): {generate_uid()}}  # another model version's SEG series
            self.calls = []
            self._session = SimpleNamespace(delete=self._answer, post=self._answer)
            self.delete_status, self.strict = delete_status, True

        def _answer(self, url, **kwargs):
            self.calls.append(url)
            status = self.delete_status if "/studies/" in url else 404  # no /tools/lookup here

            def raise_for_status():
                raise RuntimeError(f"HTTP {status}")

            return SimpleNamespace(ok=False, status_code=status, raise_for_status=raise_for_status)

        def store_instances(self, datasets):
            sops = {str(ds.SOPInstanceUID) for ds in datasets}
            if self.strict and sops <= self.held:  # a PACS that refuses duplicates
                raise requests.HTTPError("409 Client Error: Conflict", response=SimpleNamespace(status_code=409))
            self.held |= sops

        def search_for_instances(self, study_instance_uid, series_instance_uid, offset=0):
            held = self.held if series_instance_uid == series else self.other_version.get(series_instance_uid, set())
            return [{"00080018": {"vr": "UI", "Value": [sop]}} for sop in sorted(held)][offset:]

    new = instance("new.dcm")
    refusing = Pacs(405)
    kept = web_replace_segs(refusing, [tmp_path / "new.dcm"])
    assert kept == "1 earlier instance(s) kept in the PACS: it deletes nothing (DICOMweb DELETE answered HTTP 405)"
    assert new in refusing.held and len(refusing.held) == 2
    # stored again (a rollback's SEGs in a PACS that kept them): refused as a duplicate, held, done
    assert web_replace_segs(refusing, [tmp_path / "new.dcm"], stale=list(refusing.other_version)).startswith("2 earlier")
    refusing.held.discard(new)  # a 409 for an instance the PACS does not hold stays an error

    def conflict(datasets):
        raise requests.HTTPError("409 Client Error: Conflict", response=SimpleNamespace(status_code=409))

    refusing.store_instances = conflict
    with pytest.raises(requests.HTTPError):
        web_replace_segs(refusing, [tmp_path / "new.dcm"])
    troubled = Pacs(503)
    with pytest.raises(RuntimeError, match="HTTP 503"):
        web_replace_segs(troubled, [tmp_path / "new.dcm"])
    assert not any("tools/lookup" in url for url in troubled.calls)  # no fallback on a 5xx


def test_a_pacs_that_caps_its_query_answers_is_paged_and_one_that_cannot_page_says_so():
    """A series of 20 instances from a PACS that answers at most 8 records a query: asked again from the
    offset, 3 queries in all (the series record's Number of Series Related Instances says when to
    stop); one that ignores the offset gives the series an error saying what to change, not a digest
    over its first 8 instances (then an `IncompleteRetrieval` at every run)."""
    from raysegment.io.dicom import instances_digest
    from raysegment.io.dicomweb import web_series

    sops = [f"1.2.3.{i}" for i in range(20)]

    class Pacs:
        def __init__(self, pages: bool):
            self.pages, self.queries = pages, 0

        def search_for_series(self, search_filters=None, offset=None):
            rows = [{"0020000D": {"vr": "UI", "Value": ["1.2"]}, "0020000E": {"vr": "UI", "Value": ["1.2.3"]},
                     "00201209": {"vr": "IS", "Value": [20]}}]
            return rows[offset or 0:]

        def search_for_instances(self, study_instance_uid, series_instance_uid, fields=None, offset=None):
            self.queries += 1
            start = (offset or 0) if self.pages else 0
            return [{"00080018": {"vr": "UI", "Value": [sop]}} for sop in sops[start: start + 8]]

    paging = Pacs(pages=True)
    assert web_series(paging) == [{"study": "1.2", "series": "1.2.3", "sha256": instances_digest(sops)}]
    assert paging.queries == 3
    (record,) = web_series(Pacs(pages=False))
    assert record["sha256"] == "unknown" and "the PACS lists 8 of the series' 20 instances" in record["error"]
