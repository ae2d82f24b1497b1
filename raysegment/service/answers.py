"""What ``/v1/segment`` reads from a request and answers: its errors (``RequestError``: an HTTP
status and a one-line reason), the body within its size limit, the frame and body-size parameters,
and the JSON summary of a segmented study. Imports ``inference``, ``analysis`` and ``io``; no Ray.
"""

from __future__ import annotations

import json

from raysegment.io.files import json_safe

MiB = 1024 * 1024


class RequestError(Exception):
    """A bad request: its HTTP status and one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (before reading, when the client says
    its length) and with 400 when empty."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body of {int(declared) / MiB:.1f} MiB exceeds the limit of {limit / MiB:.0f} MiB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body exceeds the limit of {limit / MiB:.0f} MiB")
        chunks.append(chunk)
    if size == 0:
        raise RequestError(400, "empty body; send a NIfTI file's bytes")
    return b"".join(chunks)


def frame_param(params, name: str) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if not value.isdigit():
        raise RequestError(400, f"{name} must be a frame index (0, 1, ...), not {value!r}")
    return int(value)


def size_param(params, name: str) -> float | None:
    """``height_cm``/``weight_kg`` of a request: absent, or a number an adult can have in that unit (a
    height in metres would index every volume by a BSA of 0.2 m²); else RequestError (400)."""
    from raysegment.analysis.clinical import PLAUSIBLE_HEIGHT_CM, PLAUSIBLE_WEIGHT_KG

    value = params.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    low, high = PLAUSIBLE_HEIGHT_CM if name == "height_cm" else PLAUSIBLE_WEIGHT_KG
    if not low <= number <= high:  # NaN fails too
        raise RequestError(400, f"{name} must be a number from {low:g} to {high:g} ({name.split('_')[1]}), "
                                f"not {value!r}")
    return number


def check_frames(ed: int | None, es: int | None, n_frames: int | None = None) -> None:
    """Raises RequestError (400) unless ``ed`` and ``es`` are both absent, or two different frame
    indices (below ``n_frames`` when known): one without the other, or the same frame twice, gave
    no EF or an EF of 0 %."""
    if ed is None and es is None:
        return
    if ed is None or es is None or ed == es or (n_frames is not None and max(ed, es) >= n_frames):
        below = f" below {n_frames}" if n_frames is not None else ""
        raise RequestError(400, f"ed and es must both be given, as two different frame indices{below}")


def summary(rows: list[dict], version: str, ed: int | None, es: int | None, diagnosis=None,
            size: dict | None = None) -> dict:
    """The JSON answer: one entry per frame (volumes mL, voxels, LV mass g, QC flags) and, for a cine,
    the batch job's patient indices (``inference.ledger.add_patient_clinical``) of its ED and ES frames
    — ``ed``/``es`` when given, else its largest/smallest LV — under ``patient``, EF (%) of the LV and
    RV, ``patient_qc_flags`` and, with a ``diagnosis`` model, its group and ``p_<GROUP>``. ``size``:
    height_cm and weight_kg (the BSA-indexed indices; without them the diagnosis uses its median BSA)."""
    from raysegment.inference.ledger import add_patient_clinical

    check_frames(ed, es, len(rows))
    if ed is not None:
        for r in rows:
            r["phase"] = "ED" if r["frame"] == ed else "ES" if r["frame"] == es else ""
    keys = ("frame", "phase", "qc_flags", "lv_myo_mass_g")
    frames = [{k: r.get(k) for k in keys} | {k: v for k, v in r.items() if k.startswith(("volume_", "voxels_"))}
              for r in rows]
    out = {"model_version": version, "spacing_mm": json.loads(rows[0]["spacing_mm"]), "in_plane": rows[0].get("in_plane"),
           "frames": frames}
    if ed is not None:
        out["ed"], out["es"] = ed, es
    if len(rows) < 2:
        return json_safe(out)
    for r in rows:
        r.update({k: v for k, v in (size or {}).items() if v is not None})
    before = [set(r) for r in rows]
    add_patient_clinical(rows, diagnosis)
    at = next((i for i, r in enumerate(rows) if r.get("phase") == "ED"), 0)
    patient, added = rows[at], set(rows[at]) - before[at]
    out.update({f"ef_{n}_pct": patient.get(f"ef_{n}_pct") for n in ("lv", "rv")})
    if added:  # ED and ES found: the indices, their flags and the diagnosis
        answer = {"patient_qc_flags", "diagnosis", "diagnosis_withheld"}
        out["patient"] = {k: patient[k] for k in sorted(added - answer) if not k.startswith("p_")}
        out["patient_qc_flags"] = [f for f in patient.get("patient_qc_flags", "").split(";") if f]
        out |= {k: patient[k] for k in sorted(added) if k in answer - {"patient_qc_flags"} or k.startswith("p_")}
    return json_safe(out)
