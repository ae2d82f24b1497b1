"""DICOM SEG out: a cine's masks → one DICOM SEG per cine frame (highdicom refuses a SEG whose source
planes repeat a position, and every frame repeats the slice positions), each referencing that frame's
source instances (a stack of a series per slice: all of them, each SEG frame placed by its plane, as
highdicom derives frames from one series only), with three segments: RV cavity, LV myocardium, LV cavity (SNOMED CT, our figures'
colours), in one SEG series per source series and model version, described by that version. A SEG's
UID follows the content it was made from (the source instances, the model, the frame); a PACS ends
holding exactly the SEGs of a series' latest content (``io.dicomweb.web_replace_segs``).

Imports ``io.dicom``, ``io.studies`` and ``config``; no stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raysegment.io.dicom import CineVolume, as_floats

# Series-level attributes are one value per series (a SEG per frame shares them); the frame is each
# instance's number and content label.
SEG_SERIES_NUMBER = 9000
ALGORITHM = "raysegment"


def segment_descriptions(model_version: str):
    """The three segments (RV cavity, LV myocardium, LV cavity), SNOMED CT coded, with the algorithm."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algo = hd.AlgorithmIdentificationSequence(name=ALGORITHM, version=model_version[:64],
                                              family=codes.cid7162.ArtificialIntelligence)
    structures = [("RV cavity", codes.SCT.RightVentricle), ("LV myocardium", codes.SCT.LeftVentricleMyocardium),
                  ("LV cavity", codes.SCT.LeftVentricle)]
    return [hd.seg.SegmentDescription(segment_number=i, segment_label=label,
                                      segmented_property_category=codes.SCT.AnatomicalStructure,
                                      segmented_property_type=code, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                      algorithm_identification=algo, display_color=_display_colour(i))
            for i, (label, code) in enumerate(structures, start=1)]


def _display_colour(label: int):
    """A segment's recommended display colour (CIELab), our figures' colour for it (``CLASS_RGB``),
    so a viewer that honours it draws RV red, MYO green, LV blue."""
    import highdicom as hd

    from raysegment.config import CLASS_RGB

    return hd.color.CIELabColor.from_rgb(*CLASS_RGB[label])


def seg_uid(*parts: str) -> str:
    """A UID derived from its parts: the same source content, frame and model give the same SEG
    UIDs, so a SEG written twice (a rerun after a kill) is the same instance, not a duplicate."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[ALGORITHM, *parts])


def seg_series_uid(source_series_uid: str, model_version: str) -> str:
    """The SEG series of a source series and model: one per pair, whatever the content (so a PACS
    query by it finds the SEGs of earlier content too)."""
    return seg_uid(source_series_uid, model_version, "series")


def seg_series_description(model_version: str) -> str:
    """What a PACS lists for a SEG series: the model version that made it (a SEG series per version,
    so the SEGs of a champion rolled back from are told apart from the champion's)."""
    return f"{ALGORITHM} {model_version}"[:64]


def _ds_values(values) -> list[float]:
    """Floats whose text fits a DS (≤ 16 characters): raw float64 positions would not."""
    from pydicom.valuerep import format_number_as_ds

    return [float(format_number_as_ds(float(v))) for v in values]


def write_segs(cine: CineVolume, masks: np.ndarray, model_version: str, out_dir: Path) -> list[Path]:
    """One DICOM SEG per cine frame (``masks``: (T, Z, Y, X) labels) under ``out_dir`` → the files."""
    import highdicom as hd

    from raysegment.config import VERSION as __version__
    from raysegment.io.files import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    descriptions = segment_descriptions(model_version)
    paths = []
    for t, planes in enumerate(cine.sources):
        sources = [p["ds"] for p in planes]
        kwargs = {}
        if planes[0]["frame"] is not None:  # enhanced MR: the planes are frames of one instance
            sources = [planes[0]["ds"]]
        elif len({str(ds.SeriesInstanceUID) for ds in sources}) > 1:
            # A stack of a series per slice: highdicom takes one series as the planes' source; the
            # others are referenced beside it, and every frame is placed by its plane.
            sources, kwargs["further_source_images"] = sources[:1], sources[1:]
        labels = masks[t]
        pixel = np.stack([(labels == k) for k in (1, 2, 3)], axis=-1).astype(np.uint8)  # (Z, Y, X, segments)
        if len(sources) < len(planes):
            # Placed by their planes: a multi-frame source's frames of this temporal position, or a stack's slices.
            kwargs["plane_positions"] = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, _ds_values(p["ipp"]))
                                         for p in planes]
            kwargs["plane_orientation"] = hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT,
                                                                      _ds_values(planes[0]["iop"]))
            step = _ds_values([cine.spacing_zyx[0]])[0]
            kwargs["pixel_measures"] = hd.PixelMeasuresSequence(pixel_spacing=_ds_values(planes[0]["spacing"]),
                                                                slice_thickness=step, spacing_between_slices=step)
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=pixel, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=seg_series_uid(cine.series_uid, model_version), series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=seg_uid(cine.series_uid, model_version, cine.content, str(t)), instance_number=t + 1,
            manufacturer=ALGORITHM, manufacturer_model_name=model_version[:64], software_versions=__version__,
            device_serial_number="0", series_description=seg_series_description(model_version),
            content_label=f"CINE_FRAME_{t + 1}", content_description=f"cine frame {t + 1} of {len(cine.sources)}",
            omit_empty_frames=False, **kwargs)
        path = out_dir / f"seg_frame{t + 1:02d}.dcm"
        atomic_write(path, lambda tmp, seg=seg: seg.save_as(tmp))
        paths.append(path)
    return paths


def read_seg_labels(path: Path, cine: CineVolume, t: int) -> np.ndarray:
    """Labels (Z, Y, X) of a SEG placed back on frame ``t``'s slices by each SEG frame's position."""
    import highdicom as hd

    seg = hd.seg.segread(path)
    out = np.zeros(cine.frames.shape[1:], np.uint8)
    planes = cine.sources[t]
    normal = np.cross(planes[0]["iop"][:3], planes[0]["iop"][3:])
    level = {round(float(p["ipp"] @ normal), 2): z for z, p in enumerate(planes)}
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        pos = as_floats(fg.PlanePositionSequence[0].ImagePositionPatient)
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        z = level[round(float(pos @ normal), 2)]
        out[z][seg.pixel_array[i] > 0] = number
    return out
