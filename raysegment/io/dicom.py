"""DICOM in: cine MR series → (frames, z, y, x) volumes with their geometry (the SEGs going back
are ``io.seg``'s), and the series' keys and content digest.

Discovery is by content (the ``DICM`` preamble), whatever the file names. Instances are grouped
into series, and single-slice series that make one short-axis stack into one (``io.stacks``); a
series is segmented when it is a short-axis cine MR: MR Image Storage (one file per slice and frame)
or Enhanced MR (one multi-frame file), one orientation, slices evenly spaced along the slice normal,
the same frames at every slice. Anything else is skipped with its reason.
Slices are sorted by position along the normal, frames by temporal position / trigger time, else
instance number.

Bad input is ``StudyError`` (failed for good, with a one-line reason); input that is valid DICOM
but no short-axis cine is ``SeriesSkipped``.

Imports ``io.studies``, ``io.stacks`` and ``config``; no stage.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raysegment.io.stacks import MIN_SLICES, position_levels, stack_groups
from raysegment.io.studies import StudyError

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.4"  # legacy converted: same functional groups
# Names that say "DICOM": such a file that is not readable DICOM gets a failed row (other files
# without a DICOM header are not input, e.g. notes beside the series).
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def series_key(study_uid: str, series_uid: str) -> str:
    """A DICOM series' study key in the ledger, the results and the service: ``dicom:STUDY/SERIES``."""
    return f"dicom:{study_uid}/{series_uid}"


def series_uids(key: str) -> tuple[str, str]:
    """(Study Instance UID, Series Instance UID) of a ``series_key``."""
    study, series = key.removeprefix("dicom:").split("/", 1)
    return study, series


class SeriesSkipped(Exception):
    """A series that is not a segmentable short-axis cine MR; the message says why (one line)."""


def is_dicom_file(path: Path) -> bool:
    """True when the file carries the DICOM preamble (``DICM`` at byte 128), or starts like a DICOM
    data set written without it (little-endian group 0002 or 0008 tag first)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3] == 0


@dataclass
class Series:
    """The instances of one series (headers read, pixels not), and what grouping learnt of them. A
    short-axis stack stored as a series per slice is one Series: ``uid`` derived (``stack_uid``),
    ``members`` the source series' UIDs in slice order."""

    uid: str
    study_uid: str
    files: list[Path] = field(default_factory=list)
    sop_uids: list[str] = field(default_factory=list)
    members: tuple[str, ...] = ()

    def digest(self) -> str:
        return instances_digest(self.sop_uids)


def find_series(root: Path, exclude: Path | None = None, skip_globs=(),
                cache: dict | None = None) -> tuple[list[Series], list[tuple[Path, str]]]:
    """DICOM series under ``root`` (files found by content) and the DICOM files that could not be
    read as (path, reason). Files under ``exclude`` (the output folder), ``studies.hidden`` or matched
    by ``skip_globs`` (``studies.left_out``) are no input. ``cache`` (path → its ``file_stat`` and
    ``_file_kind``): a file whose stat is unchanged is not opened; left holding this call's files."""
    from raysegment.io.files import file_stat
    from raysegment.io.studies import hidden, inside, left_out

    root = Path(root)
    skip = str(Path(exclude).resolve()) if exclude else None
    known = dict(cache or {})
    if cache is not None:
        cache.clear()
    series: dict[str, Series] = {}
    planes: dict[str, list] = {}  # series UID → its instances' planes (``_file_kind``)
    bad = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if skip is not None and inside(path, skip):
            continue
        if hidden(path, root) or (skip_globs and left_out(path, root, skip_globs)):
            continue
        stat, hit = file_stat(path), known.get(str(path))
        # A DICOM file's entry of 4 items was cached before planes were kept: read again.
        fresh = stat is not None and hit is not None and hit[0] == stat and len(hit[1]) != 4
        kind = hit[1] if fresh else _file_kind(path)
        if cache is not None and stat is not None:
            cache[str(path)] = [stat, kind]
        if kind[0] == "bad":
            bad.append((path, kind[1]))
        if kind[0] != "dicom":
            continue
        uid, study, sop, plane = kind[1:]
        s = series.setdefault(uid, Series(uid, study))
        if sop in s.sop_uids:  # the same instance exported twice: one copy is the series
            continue
        s.files.append(path)
        s.sop_uids.append(sop)
        planes.setdefault(uid, []).append(plane)
    return _stacked(series, planes), bad


def _stacked(series: dict[str, Series], planes: dict[str, list]) -> list[Series]:
    """The series, with the single-slice series that make a short-axis stack (``io.stacks``) as one."""
    groups = stack_groups({uid: (s.study_uid, planes[uid]) for uid, s in series.items()})
    for uid, members in groups:
        parts = [series.pop(m) for m in members]
        series[uid] = Series(uid, parts[0].study_uid, [f for p in parts for f in p.files],
                             [u for p in parts for u in p.sop_uids], tuple(members))
    return list(series.values())


def _file_kind(path: Path) -> list:
    """What a file is to ``find_series``: ``["dicom", SERIES_UID, STUDY_UID, SOP_UID, PLANE]``, ``["bad",
    REASON]`` (a DICOM file that cannot be read) or ``["other"]`` (no DICOM, e.g. notes beside a series).
    PLANE: ``image_plane``."""
    import pydicom

    if not is_dicom_file(path):
        if path.suffix.lower() in DICOM_SUFFIXES:
            empty = path.stat().st_size == 0
            return ["bad", "unreadable DICOM (an empty file)" if empty else "unreadable DICOM (no DICOM header)"]
        return ["other"]
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                             specific_tags=["SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID", *PLANE_TAGS])
        return ["dicom", str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), image_plane(ds)]
    except Exception as exc:  # truncated, no UIDs
        return ["bad", f"unreadable DICOM ({type(exc).__name__}: {exc})"]


PLANE_TAGS = ["SOPClassUID", "FrameOfReferenceUID", "ImageOrientationPatient", "ImagePositionPatient", "Rows", "Columns",
              "SeriesNumber"]


def image_plane(ds) -> list | None:
    """Where a single-frame MR image lies (``io.stacks``' plane): [frame of reference, orientation
    (6), position (3; mm), rows, columns, series number]; None for another image or one without its
    geometry. ``ds``: a header read from a file or a PACS's instance record (``io.dicomweb``)."""
    if str(getattr(ds, "SOPClassUID", "")) != MR_IMAGE:
        return None
    try:
        return [str(getattr(ds, "FrameOfReferenceUID", "")), as_floats(ds.ImageOrientationPatient).tolist(),
                as_floats(ds.ImagePositionPatient).tolist(), int(ds.Rows), int(ds.Columns),
                int(getattr(ds, "SeriesNumber", 0) or 0)]
    except (AttributeError, TypeError, ValueError):
        return None


@dataclass
class CineVolume:
    """A short-axis cine series as arrays: ``frames`` (T, Z, Y, X) float; ``spacing_zyx`` mm;
    ``affine`` voxel (x, y, z) → RAS mm for NIfTI; ``sources[t]``: the datasets of frame t in slice
    order (pixels included; what a SEG of that frame references)."""

    frames: np.ndarray
    spacing_zyx: tuple[float, float, float]
    affine: np.ndarray
    sources: list[list]
    series_uid: str
    study_uid: str
    description: str
    content: str = ""  # ``instances_digest`` of the instances read: what the SEG UIDs follow


def as_floats(values) -> np.ndarray:
    """A DICOM multi-valued DS (positions, orientations, spacings; mm) as a float64 array."""
    return np.array([float(v) for v in values])


def read_cine(series: Series) -> CineVolume:
    """Read a series' pixels and build its cine volume; raises ``SeriesSkipped`` with the reason."""
    import pydicom

    datasets, sops = [], set()
    for f in series.files:
        try:
            ds = pydicom.dcmread(f, force=True)
        except Exception as exc:
            raise StudyError(f"{f.name}: unreadable DICOM ({type(exc).__name__}: {exc})") from None
        if str(getattr(ds, "SOPInstanceUID", "")) in sops:
            continue  # the same instance twice (exported twice): read once
        _fill_transfer_syntax(ds)
        sops.add(str(getattr(ds, "SOPInstanceUID", "")))
        datasets.append(ds)
    first = datasets[0]
    modality = str(getattr(first, "Modality", ""))
    sop = str(getattr(first, "SOPClassUID", ""))
    if modality != "MR":
        raise SeriesSkipped(f"not MR (modality {modality or 'missing'}, SOP class {sop})")
    if sop in (ENHANCED_MR, LEGACY_ENHANCED_MR):
        if len(datasets) != 1:
            raise SeriesSkipped(f"{len(datasets)} enhanced MR instances in one series (one expected)")
        planes = _enhanced_planes(first)
    elif sop == MR_IMAGE:
        planes = [_plane(ds, ds, None) for ds in datasets]
    else:
        raise SeriesSkipped(f"MR but not an image storage class this reads (SOP class {sop})")
    description = str(getattr(first, "SeriesDescription", ""))
    if (n := len({str(getattr(ds, "SeriesInstanceUID", "")) for ds in datasets})) > 1:
        description = f"{description} (a stack of {n} series)".strip()
    cine = _assemble(planes, series, description)
    cine.content = instances_digest(sops)
    return cine


def _fill_transfer_syntax(ds) -> None:
    """A data set saved without its file meta (no preamble) names no transfer syntax; pydicom
    needs one to decode pixels: the encoding it was read in."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little in (True, None) else ExplicitVRBigEndian)


def _pixels(ds, frame_index: int | None) -> np.ndarray:
    """The pixels of one image; undecodable pixel data (truncated, wrong length) is bad input."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        name = Path(str(getattr(ds, "filename", "") or "")).name or str(getattr(ds, "SOPInstanceUID", "?"))
        raise StudyError(f"{name}: pixel data unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if frame_index is not None and int(getattr(ds, "NumberOfFrames", 1)) > 1:
        return pixels[frame_index]
    return pixels


def _plane(ds, geometry, frame_index: int | None) -> dict:
    """One 2-D image: its pixels (y, x), orientation, position, pixel spacing, time."""
    try:
        iop = as_floats(geometry.ImageOrientationPatient)
        ipp = as_floats(geometry.ImagePositionPatient)
        spacing = as_floats(geometry.PixelSpacing)
    except AttributeError as exc:
        raise SeriesSkipped(f"no geometry ({exc})") from None
    pixels = _pixels(ds, frame_index)
    if frame_index is None:
        t = float(getattr(ds, "TemporalPositionIdentifier", 0) or 0), float(getattr(ds, "TriggerTime", 0) or 0)
    else:
        t = geometry.temporal
    slope = float(getattr(geometry, "RescaleSlope", getattr(ds, "RescaleSlope", 1)) or 1)
    intercept = float(getattr(geometry, "RescaleIntercept", getattr(ds, "RescaleIntercept", 0)) or 0)
    number = frame_index if frame_index is not None else int(getattr(ds, "InstanceNumber", 0) or 0)
    return {"ds": ds, "frame": frame_index, "iop": iop, "ipp": ipp, "spacing": spacing, "time": t, "number": number,
            "pixels": pixels.astype(np.float64) * slope + intercept}


class _Geometry:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def _enhanced_planes(ds) -> list[dict]:
    """The frames of an Enhanced MR instance, each with its per-frame (or shared) geometry and time."""
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    planes = []
    for i, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        def pick(name, fg=fg, i=i):
            for group in (fg, shared):
                if group is not None and name in group:
                    return group[name].value[0]
            raise SeriesSkipped(f"frame {i + 1}: no {name}")

        orient, pos, measures = pick("PlaneOrientationSequence"), pick("PlanePositionSequence"), pick("PixelMeasuresSequence")
        content = fg.FrameContentSequence[0] if "FrameContentSequence" in fg else None
        temporal = float(getattr(content, "TemporalPositionIndex", 0) or 0) if content is not None else 0.0
        trigger = 0.0
        if "CardiacSynchronizationSequence" in fg:
            trigger = float(getattr(fg.CardiacSynchronizationSequence[0], "NominalCardiacTriggerDelayTime", 0) or 0)
        if "UnassignedPerFrameConvertedAttributesSequence" in fg:  # legacy converted: the source's own tags
            legacy = fg.UnassignedPerFrameConvertedAttributesSequence[0]
            temporal = temporal or float(getattr(legacy, "TemporalPositionIdentifier", 0) or 0)
            trigger = trigger or float(getattr(legacy, "TriggerTime", 0) or 0)
        geom = _Geometry(ImageOrientationPatient=orient.ImageOrientationPatient, ImagePositionPatient=pos.ImagePositionPatient,
                         PixelSpacing=measures.PixelSpacing, temporal=(temporal, trigger))
        if "PixelValueTransformationSequence" in fg or (shared is not None and "PixelValueTransformationSequence" in shared):
            pvt = pick("PixelValueTransformationSequence")
            geom.RescaleSlope, geom.RescaleIntercept = pvt.RescaleSlope, pvt.RescaleIntercept
        planes.append(_plane(ds, geom, i))
    return planes


def _assemble(planes: list[dict], series: Series, description: str) -> CineVolume:
    iop = planes[0]["iop"]
    if any(not np.allclose(p["iop"], iop, atol=1e-3) for p in planes):
        raise SeriesSkipped("more than one orientation (not one short-axis stack)")
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    shapes = {p["pixels"].shape for p in planes}
    if len(shapes) != 1:
        raise SeriesSkipped(f"images of different sizes {sorted(shapes)}")
    # Slice positions along the normal (mm), one level per slice (``io.stacks.position_levels``).
    labels, levels = position_levels([float(p["ipp"] @ normal) for p in planes])
    levels = np.round(levels, 2)  # the slice step from positions to 0.01 mm, as it always was
    if len(levels) < 2:
        raise SeriesSkipped(f"a single slice position (not a short-axis stack; {MIN_SLICES} or more such series of one "
                            f"study, parallel, are read as one)")
    # Frames by time; where a series gives none (no trigger time or temporal position), by instance number.
    by_level = {lv: sorted((p for p, n in zip(planes, labels) if n == z), key=lambda p: (p["time"], p["number"]))
                for z, lv in enumerate(levels)}
    counts = {len(v) for v in by_level.values()}
    if len(counts) != 1:
        repeated = [lv for lv, ps in by_level.items() if len({p["time"] for p in ps}) < len(ps)]
        if repeated:
            raise SeriesSkipped(f"slice at {repeated[0]:g} mm holds two images of the same time "
                                f"(an instance repeated under another UID)")
        raise SeriesSkipped(f"slices hold different numbers of frames {sorted(counts)} (an instance is missing)")
    for lv, ps in by_level.items():
        if len({(p["time"], p["number"]) for p in ps}) < len(ps):
            raise SeriesSkipped(f"the frames of the slice at {lv:g} mm cannot be ordered (no trigger time, temporal "
                                f"position or instance number tells them apart)")
    gaps = np.diff(levels)
    step = float(np.median(gaps))
    if np.any(np.abs(gaps - step) > 0.1 * step + 0.05):
        raise SeriesSkipped(f"slice positions not evenly spaced (gaps {sorted(set(np.round(gaps, 2).tolist()))} mm: "
                            f"a missing slice?)")
    n_frames = counts.pop()
    ordered = [by_level[lv] for lv in levels]  # slice order: along the normal
    frames = np.stack([np.stack([ordered[z][t]["pixels"] for z in range(len(levels))]) for t in range(n_frames)])
    dy, dx = float(planes[0]["spacing"][0]), float(planes[0]["spacing"][1])
    origin = ordered[0][0]["ipp"]
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * dx, col * dy, normal * step, origin
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM LPS → NIfTI RAS
    sources = [[ordered[z][t] for z in range(len(levels))] for t in range(n_frames)]
    return CineVolume(frames=frames, spacing_zyx=(step, dy, dx), affine=affine, sources=sources,
                      series_uid=series.uid, study_uid=series.study_uid, description=description)


# --------------------------------------------------------------------------- DICOMweb (a PACS)


def instances_digest(sop_uids) -> str:
    """What the ledger keys a series' content on: SHA-256 of its sorted SOP Instance UIDs (an
    instance added or removed is new content; the same instances read again are not)."""
    return hashlib.sha256("\n".join(sorted(set(sop_uids))).encode()).hexdigest()
