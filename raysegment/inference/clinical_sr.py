"""The clinical indices of each segmented DICOM cine series as a DICOM SR (``io.sr``), written beside
its SEGs (``OUTPUT/dicom/SERIES/indices_sr.dcm``) and, where the input is a PACS, stored there. Runs
after the results table (the indices, with the basal ES check, are computed there), at every run:
an SR not yet written or stored (a STOW-RS that failed) is done by the next; the service's push
stores its series' SR at once (``store_entry_sr``). ``OUTPUT/sr.json`` keeps, per series, the SR's
UID and whether the PACS holds it.

Imports ``io`` and ``inference.ledger``; no Ray.
"""

from __future__ import annotations

from pathlib import Path

from raysegment.inference.ledger import Ledger, read_cache, write_cache

SR_CACHE = "sr.json"
SR_FILE = "indices_sr.dcm"


def _series_rows(rows: list[dict]) -> dict[str, tuple[dict, list[Path]]]:
    """DICOM cine series done → (their ED row, which carries the patient's indices; their SEG files)."""
    found: dict[str, tuple[dict | None, list[Path]]] = {}
    for r in rows:
        key = str(r.get("study", ""))
        if not key.startswith("dicom:") or r.get("status") != "done":
            continue
        ed, segs = found.get(key, (None, []))
        if r.get("seg"):
            segs.append(Path(r["seg"]))
        found[key] = (r if r.get("phase") == "ED" else ed, segs)
    return {k: (ed, segs) for k, (ed, segs) in found.items() if ed is not None and segs}


def write_srs(rows: list[dict], out: Path, client=None, ledger: Ledger | None = None, every: bool = True) -> dict:
    """Write (and with ``client``, store) the SR of every DICOM cine series in the results ``rows``
    whose indices are whole → {"written": n, "stored": n, "kept": n stored beside earlier SRs the
    PACS does not delete, "errors": [one line each]}. An SR is
    written again only when its values or model version changed, and stored until the PACS has it.
    ``every``: ``rows`` are the whole results (``sr.json`` keeps their series only); False: one push's
    series (the others are kept; beside a scheduled run, a lost mark only stores the same SR again)."""
    from raysegment.io.dicom import series_uids
    from raysegment.io.dicomweb import failure
    from raysegment.io.sr import sr_uid, sr_values, write_indices_sr

    before = read_cache(out / SR_CACHE)
    cache, counts = ({} if every else dict(before)), {"written": 0, "stored": 0, "kept": 0, "errors": []}
    for key, (ed, segs) in sorted(_series_rows(rows).items()):
        values = sr_values(ed)
        if values is None:
            continue
        study, series = series_uids(key)
        version, path = ed["model_version"], out / "dicom" / series / SR_FILE
        uid = sr_uid(series, version, values)
        known = before.get(key) if isinstance(before.get(key), dict) else {}
        if known.get("uid") != uid or not path.exists():
            try:
                write_indices_sr(sorted(set(segs)), values, series, version, path)
            except Exception as exc:  # a SEG gone from the output, a full disk: the results stand
                counts["errors"].append(f"{key}: its indices SR was not written ({type(exc).__name__}: {exc})")
                continue
            known = {"uid": uid, "stored": False}
            counts["written"] += 1
        if client is not None and not known.get("stored"):
            try:
                counts["kept"] += bool(_store(client, study, series, version, path, ledger))
                known = {**known, "stored": True}
                counts["stored"] += 1
            except Exception as exc:
                counts["errors"].append(f"{key}: {failure('STOW-RS of its indices SR', exc)}")
        cache[key] = known
    write_cache(out / SR_CACHE, cache, before)
    return counts


def _store(client, study: str, series: str, version: str, path: Path, ledger: Ledger | None) -> str:
    """STOW-RS the SR, remove the SR series' older SRs (earlier content) and the SR series of the other
    versions whose SEGs the ledger stored for the series (a replaced champion's, or after a rollback)
    → what a PACS that deletes nothing keeps beside it ("" when nothing)."""
    from raysegment.io.dicom import series_key
    from raysegment.io.dicomweb import web_replace_segs
    from raysegment.io.sr import sr_series_uid

    others = ledger.stored_versions(series_key(study, series)) - {version} if ledger is not None else set()
    return web_replace_segs(client, [path], [sr_series_uid(series, other) for other in sorted(others)])


def store_entry_sr(client, entry: dict, out: Path, ledger: Ledger, diagnosis=None) -> list[str]:
    """The SR of one series just segmented and stored (a service push): its indices as the results
    table computes them (``add_patient_clinical``, on copies of its rows), written and stored → the
    error lines (none when it went, or when the indices are not whole)."""
    from raysegment.inference.ledger import add_patient_clinical

    rows = [dict(r) for r in entry.get("rows", [])]
    add_patient_clinical(rows, diagnosis)
    return write_srs(rows, out, client, ledger, every=False)["errors"]
