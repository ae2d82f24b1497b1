"""DICOM SR out: a cine series' clinical indices (LV and RV end-diastolic and end-systolic volumes
and ejection fractions, LV mass) as a Comprehensive 3D SR, TID 1500 measurement report, with the
series' SEGs as its evidence: what a PACS viewer shows beside the SEGs. Codes are LOINC's (pydicom's
code dictionary, from the DICOM standard), units UCUM. One SR series per source series and model
version; the SR's UID follows the values it holds, so writing it again is the same instance.

Imports ``io.seg`` (its UIDs) and ``config``; no stage.
"""

from __future__ import annotations

from pathlib import Path

from raysegment.io.seg import ALGORITHM, seg_uid

SR_SERIES_NUMBER = 9001
# (results column, LOINC concept in pydicom's codes.LN, UCUM unit, its meaning)
MEASUREMENTS = (
    ("lv_edv_ml", "LeftVentricularEndDiastolicVolume", "mL", "milliliter"),
    ("lv_esv_ml", "LeftVentricularEndSystolicVolume", "mL", "milliliter"),
    ("lv_ef_pct", "LeftVentricularEjectionFractionByMR", "%", "percent"),
    ("lv_mass_g", "LeftVentricleMass", "g", "gram"),
    ("rv_edv_ml", "RightVentricularEDVolume", "mL", "milliliter"),
    ("rv_esv_ml", "RightVentricularESVolume", "mL", "milliliter"),
    ("rv_ef_pct", "RightVentricularEjectionFractionByMR", "%", "percent"),
)


def sr_values(row: dict) -> dict[str, float] | None:
    """The measurements an SR of this patient row holds (rounded to 0.1: mL, g, %), or None when one
    is missing or not finite (no indices, or a negative EF: ES above ED, flagged, not reported)."""
    import math

    values = {}
    for key, *_ in MEASUREMENTS:
        v = row.get(key)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            return None
        values[key] = round(float(v), 1)
    return values


def sr_series_uid(source_series_uid: str, model_version: str) -> str:
    """The SR series of a source series and model version (one per pair, as the SEG series)."""
    return seg_uid(source_series_uid, model_version, "sr series")


def sr_uid(source_series_uid: str, model_version: str, values: dict[str, float]) -> str:
    """The SR's SOP Instance UID: from the series, the model and the values it reports."""
    return seg_uid(source_series_uid, model_version, "sr", repr(sorted(values.items())))


def write_indices_sr(segs: list[Path], values: dict[str, float], source_series_uid: str, model_version: str,
                     path: Path) -> Path:
    """Write the SR of ``values`` (``sr_values``) for the series whose SEGs are ``segs`` to ``path``."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from raysegment.config import VERSION
    from raysegment.io.files import atomic_write

    evidence = [pydicom.dcmread(p, stop_before_pixels=True) for p in segs]
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=seg_uid("device", model_version), name=ALGORITHM,
                                                       model_name=model_version[:64])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    measurements = [hd.sr.Measurement(name=getattr(codes.LN, concept), value=values[key],
                                      unit=hd.sr.CodedConcept(unit, "UCUM", meaning))
                    for key, concept, unit, meaning in MEASUREMENTS]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=seg_uid(source_series_uid, "tracking"),
                                                     identifier=f"cine series {source_series_uid}"[:64]),
        measurements=measurements)
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.SCT.CardiacMRI,
                                     imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=sr_series_uid(source_series_uid, model_version),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=sr_uid(source_series_uid, model_version, values),
        instance_number=1, manufacturer=ALGORITHM, manufacturer_model_name=model_version[:64],
        software_versions=VERSION, series_description=f"{ALGORITHM} {model_version} indices"[:64])
    atomic_write(path, lambda tmp: sr.save_as(tmp))
    return path


def read_indices_sr(path: Path) -> dict[str, float]:
    """The values an indices SR holds, by results column (what ``write_indices_sr`` was given)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sr = hd.sr.srread(path)
    by_code = {getattr(codes.LN, concept).value: key for key, concept, *_ in MEASUREMENTS}
    out = {}
    for item in _walk(sr.ContentSequence):
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue in by_code:
            out[by_code[item.ConceptNameCodeSequence[0].CodeValue]] = float(item.MeasuredValueSequence[0].NumericValue)
    return out


def _walk(items):
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)
