"""A PACS over DICOMweb: QIDO-RS (series and their instances), WADO-RS (retrieve), STOW-RS (store)
and the replacement of stale SEGs, with bounded retries. Imports ``raysegment.io.dicom`` only."""

from __future__ import annotations

import hashlib
from pathlib import Path

from raysegment.io.dicom import instances_digest

PACS_TIMEOUT_S = (5.0, 120.0)  # connect, read: an unreachable PACS fails in seconds, not minutes
PACS_ATTEMPTS, PACS_BACKOFF_MS = 3, 250  # tries per request, back-off base: waits 0.5 s, 1 s


def web_client(url: str, auth: str | None = None):
    """A DICOMweb client with bounded retries: an unreachable PACS fails after ``PACS_ATTEMPTS``
    tries (about 2 s of back-off plus connect timeouts of ``PACS_TIMEOUT_S[0]`` s), not minutes.
    ``auth``: the PACS's credentials (``check_auth``), sent with every request."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if auth:
        kind, value = check_auth(auth)
        if kind == "bearer":
            session.headers["Authorization"] = f"Bearer {value}"
        else:
            session.auth = tuple(value.split(":", 1))
    client = DICOMwebClient(url=url.rstrip("/"), session=session, timeout=PACS_TIMEOUT_S)
    client.set_http_retry_params(max_attempts=PACS_ATTEMPTS, wait_exponential_multiplier=PACS_BACKOFF_MS)
    return client


def check_auth(text: str) -> tuple[str, str]:
    """("basic", "USER:PASSWORD") or ("bearer", TOKEN) of a credentials file's text; ValueError otherwise."""
    text = text.strip()
    if text.startswith("Bearer ") and text[len("Bearer "):].strip():
        return "bearer", text[len("Bearer "):].strip()
    if "\n" not in text and ":" in text and text.split(":", 1)[0]:
        return "basic", text
    raise ValueError("expected one line, USER:PASSWORD (HTTP basic authentication) or 'Bearer TOKEN'")


class PacsUnreachable(RuntimeError):
    """The PACS did not answer (refused, timed out, a 5xx): an environment fault the next run retries."""


class PacsRefused(ValueError):
    """The PACS answered 401 or 403: no or wrong credentials, a setting to fix (``refused_line``)."""


def unreachable(exc: Exception) -> str | None:
    """Why the PACS counts as not answering — refused, no such host, timed out (the root of urllib3's
    nesting, e.g. ``[Errno 111] Connection refused``), a 5xx after the client's retries — or None."""
    import re

    import requests

    response = getattr(exc, "response", None)
    if (attempt := getattr(exc, "last_attempt", None)) is not None:  # the client's retries (``retrying``) gave up
        exc, response = (attempt.value[1], None) if attempt.has_exception else (None, attempt.value)
    status = getattr(response, "status_code", None)
    if status is not None and status >= 500:
        return f"HTTP {status}"
    if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        found = re.search(r"\[Errno -?\d+\][^'\")]*", str(exc))
        return found.group(0).strip() if found else type(exc).__name__
    return None


def http_status(exc: Exception) -> int | None:
    """The HTTP status a failed DICOMweb request got (also after the client's retries gave up), else None."""
    response = getattr(exc, "response", None)
    if (attempt := getattr(exc, "last_attempt", None)) is not None and not attempt.has_exception:
        response = attempt.value
    return getattr(response, "status_code", None)


def denied(exc: Exception) -> str | None:
    """``HTTP 401``/``HTTP 403`` when the PACS refused this client (no or wrong credentials), else None."""
    status = http_status(exc)
    return f"HTTP {status}" if status in (401, 403) else None


def refused_line(url: str, why: str) -> str:
    """What to say of a PACS that refused this client: how to give it credentials."""
    return (f"the PACS at {redact(url)} refused this client ({why}): give its credentials with --pacs-auth FILE "
            f"(USER:PASSWORD or 'Bearer TOKEN') or in the URL, http://USER:PASSWORD@HOST:PORT/dicom-web")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it (``http://USER:PASSWORD@HOST``) shown as ``***``:
    error lines and ledger reasons end up in logs."""
    import re

    return re.sub(r"(\w+://[^/\s:@]+):[^/\s]*@", r"\1:***@", text)  # to the netloc's last @


def check_pacs(url: str, auth: str | None = None) -> None:
    """One QIDO-RS query (a study at most) to the DICOMweb root ``url``, before any work: raises
    ``PacsUnreachable`` when the PACS does not answer, ``PacsRefused`` when it refuses the
    credentials, ``ValueError`` when it answers but not as a DICOMweb root (a 404 of a wrong path)."""
    client = web_client(url, auth)
    try:
        client.search_for_studies(limit=1)
    except Exception as exc:
        if why := unreachable(exc):
            raise PacsUnreachable(f"the PACS at {redact(url)} does not answer ({why})") from None
        if why := denied(exc):
            raise PacsRefused(refused_line(url, why)) from None
        raise ValueError(f"{redact(url)}: not a DICOMweb root ({failure('QIDO-RS query', exc)})") from None


def failure(what: str, exc: BaseException, limit: int = 200) -> str:
    """The one-line reason a ledger row gives for a failed DICOMweb request ("WADO-RS retrieve
    failed (HTTPError: …)"): whitespace folded, at most ``limit`` characters of the error."""
    return redact(f"{what} failed ({type(exc).__name__}: {' '.join(str(exc).split())[:limit]})")


def _tag(item: dict, tag: str) -> str:
    return str(item.get(tag, {}).get("Value", [""])[0])


def web_series(client, since: str | None = None, study_uid: str | None = None) -> list[dict]:
    """MR series on a DICOMweb server (QIDO-RS): ``{"study", "series", "sha256"}`` each, the digest
    over the series' SOP Instance UIDs (one instance query per series). ``since`` (``YYYYMMDD``):
    only series of studies dated that day or later (DICOM range matching on StudyDate). A record the
    server sends without its UIDs, or whose instance query fails, gets ``"invalid"`` (the reason)
    instead of stopping the others. Single-slice series that make one short-axis stack (``io.stacks``,
    from the planes the instance query gives) are one record, with ``members``. ``study_uid``: that
    study's series only."""
    out, found = [], {}
    filters = {"Modality": "MR", **({"StudyDate": f"{since}-"} if since else {}),
               **({"StudyInstanceUID": study_uid} if study_uid else {})}
    for n, s in enumerate(_paged(client.search_for_series, search_filters=filters)):
        study, series = _tag(s, "0020000D"), _tag(s, "0020000E")
        if not study or not series:
            digest = hashlib.sha256(repr(sorted(s.items())).encode()).hexdigest()
            out.append({"study": study or "?", "series": series or f"?{n}", "sha256": digest,
                        "invalid": "PACS query record without Study or Series Instance UID"})
            continue
        try:
            found[series] = (study, series_instances(client, study, series, _count(s)))
        except Exception as exc:
            out.append({"study": study, "series": series, "sha256": "unknown",
                        "error": failure("QIDO-RS instance query", exc)})
            continue
        out.append({"study": study, "series": series, "sha256": instances_digest(found[series][1])})
    return _stacked(out, found)


def series_instances(client, study: str, series: str, expected: int | None = None) -> dict[str, list | None]:
    """A series' instances (QIDO-RS, asking for ``io.dicom.PLANE_TAGS`` too) → SOP Instance UID: its
    ``io.dicom.image_plane`` (None where the PACS does not give it). ``expected``: the series' Number of
    Series Related Instances; a PACS that answers with fewer (it caps its answers) is asked for the
    rest (``_paged``), and one that will not send them raises ``ShortListing``."""
    import pydicom
    from pydicom.datadict import tag_for_keyword

    from raysegment.io.dicom import PLANE_TAGS, image_plane

    fields = [f"{tag_for_keyword(k):08X}" for k in PLANE_TAGS]
    records = _paged(client.search_for_instances, expected, study_instance_uid=study, series_instance_uid=series,
                     fields=fields)
    if expected is not None and len(records) < expected:
        raise ShortListing(f"the PACS lists {len(records)} of the series' {expected} instances: it caps its query "
                           f"answers and does not page them by offset (raise its limit; Orthanc: LimitFindInstances)")
    out = {}
    for i in records:
        try:
            plane = image_plane(pydicom.Dataset.from_json(i))
        except Exception:  # a record that is not PS3.18 JSON: no plane, the UIDs still count
            plane = None
        out[_tag(i, "00080018")] = plane
    return out


class ShortListing(RuntimeError):
    """The PACS listed fewer instances of a series than it says the series holds."""


def _count(record: dict) -> int | None:
    """A QIDO-RS series record's Number of Series Related Instances, None where it does not give it."""
    try:
        return int(_tag(record, "00201209"))
    except ValueError:
        return None


def _no_paging_note(record) -> bool:
    return "additional results" not in record.getMessage()


def _paged(search, expected: int | None = None, **query) -> list[dict]:
    """Every record of a QIDO-RS ``search`` (a client's ``search_for_…``) from a PACS that sends at most
    so many per answer (PS3.18: the rest from an ``offset``): asked again from the number received
    while an answer brings records not seen before and, with ``expected``, fewer than that came (so
    a whole answer costs no second query). A PACS that ignores the offset ends it: nothing new."""
    import logging

    records, seen = [], set()
    # dicomweb-client logs each answer's Warning header, "There are additional results …": asked here
    logging.getLogger("dicomweb_client.web").addFilter(_no_paging_note)  # the same filter is added once
    while expected is None or len(records) < expected:
        answer = search(**query, **({"offset": len(records)} if records else {}))
        new = [r for r in answer if repr(sorted(r.items())) not in seen]
        if not new:
            break
        records += new
        seen |= {repr(sorted(r.items())) for r in new}
    return records


def _stacked(records: list[dict], found: dict[str, tuple[str, dict]]) -> list[dict]:
    """``web_series``' records with the single-slice series that make a stack as one record: the
    stack's UID as ``series``, its series in slice order as ``members``, the digest over all their instances."""
    from raysegment.io.stacks import stack_groups

    groups = stack_groups({uid: (study, list(sops.values())) for uid, (study, sops) in found.items()})
    taken = {m for _, members in groups for m in members}
    out = [r for r in records if r["series"] not in taken]
    for uid, members in groups:
        sops = [sop for m in members for sop in found[m][1]]
        out.append({"study": found[members[0]][0], "series": uid, "members": members, "sha256": instances_digest(sops)})
    return out


def push_target(client, study: str, series: str) -> tuple[str, str, tuple[str, ...]]:
    """What a pushed series is to segment → (series UID, content digest, member series): the series
    itself; or, where it lies in one plane and is a slice of a short-axis stack stored as a series
    per slice (``web_series`` of its study), the stack — its UID, digest and series."""
    from raysegment.io.stacks import single_slice

    record = client.search_for_series(study_instance_uid=study, search_filters={"SeriesInstanceUID": series})
    instances = series_instances(client, study, series, _count(record[0]) if record else None)
    if single_slice(list(instances.values())) is not None:
        for record in web_series(client, study_uid=study):
            if series in record.get("members", ()):
                return record["series"], record["sha256"], tuple(record["members"])
    return series, instances_digest(instances), ()


class IncompleteRetrieval(RuntimeError):
    """WADO-RS gave other instances than QIDO-RS listed for the series."""


def web_retrieve(client, study: str, series: str, folder: Path, digest: str | None = None,
                 members: tuple[str, ...] = ()) -> list[Path]:
    """WADO-RS: a series' instances saved under ``folder`` (one file per SOP Instance UID), in the
    transfer syntax the PACS stores them in where it offers that (``_retrieve_as_stored``; GDCM decodes
    JPEG Lossless, JPEG-LS and JPEG 2000): else the PACS must transcode, and one that cannot (Orthanc
    with JPEG 2000) breaks off its answer after a 200, which reads as a shorter series. ``digest``: the series' content
    as QIDO-RS listed it (``web_series``, ``push_target``); an answer of other instances (cut off, or the series
    still growing) raises ``IncompleteRetrieval``, so it is retried rather than segmented in part.
    ``members``: a stack's series (``web_series``), retrieved one after the other into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for part in members or (series,):
        for ds in _retrieve_as_stored(client, study, part):
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    if digest is not None and instances_digest(p.stem for p in paths) != digest:
        raise IncompleteRetrieval(f"the PACS sent {len(paths)} instance(s), not the ones its query listed "
                                  f"(an answer cut off, or the series still arriving)")
    return paths


def _retrieve_as_stored(client, study: str, series: str) -> list:
    """A series' instances as the PACS stores them; from a PACS that does not offer that (HTTP 406 or
    400 to ``transfer-syntax=*``), as it sends them by default (explicit VR little endian)."""
    try:
        return client.retrieve_series(study_instance_uid=study, series_instance_uid=series,
                                      media_types=(("application/dicom", "*"),))
    except Exception as exc:
        if http_status(exc) not in (400, 406):
            raise
    return client.retrieve_series(study_instance_uid=study, series_instance_uid=series)


def web_store(client, paths: list[Path]) -> list:
    """STOW-RS the files (SEGs) to the server → the data sets stored. Their UIDs follow the content
    they were made from (``seg_uid``), so storing again after a kill replaces, never duplicates. A
    PACS that refuses instances it holds already (HTTP 409: a rollback's SEGs, in a PACS that kept
    them) has them: that counts as stored."""
    import pydicom

    datasets = [pydicom.dcmread(p) for p in paths]
    try:
        client.store_instances(datasets=datasets)
    except Exception as exc:
        if http_status(exc) != 409:
            raise
        by_series = {(str(d.StudyInstanceUID), str(d.SeriesInstanceUID)) for d in datasets}
        held = set().union(*(_series_sops(client, study, series) for study, series in by_series))
        if not {str(d.SOPInstanceUID) for d in datasets} <= held:
            raise
    return datasets


class DeleteRefused(RuntimeError):
    """The PACS deletes nothing for this client: DICOMweb DELETE (not in the standard) refused and no
    Orthanc REST API beside it, or no permission to delete (most hospital PACS, by design or policy)."""


REFUSED = (401, 403, 404, 405, 501)  # how a PACS answers a DELETE it does not offer or allow


def web_replace_segs(client, paths: list[Path], stale: list[str] | tuple = ()) -> str:
    """STOW-RS a series' SEGs (or its indices SR), then delete from the PACS the instances of that
    series that are not among them (made from earlier content), and check the PACS holds these;
    then delete the ``stale`` series of the same study whole (other model versions' SEG or SR series)
    → "" when the PACS now holds exactly these, else what it keeps beside them and why.

    Deleting uses DICOMweb DELETE where the server has it, else Orthanc's REST API beside its
    DICOMweb root; a PACS that offers neither or refuses (``DeleteRefused``) keeps the earlier
    instances, said in the answer. Raises ``RuntimeError`` when the PACS lacks any of ``paths``, or
    still holds others after deleting them.
    """
    heads = web_store(client, paths)
    study, kept, refused = str(heads[0].StudyInstanceUID), 0, ""
    own = sorted({str(h.SeriesInstanceUID) for h in heads})
    targets = [(s, {str(h.SOPInstanceUID) for h in heads if str(h.SeriesInstanceUID) == s}) for s in own]
    for series, wanted in targets + [(s, set()) for s in stale]:  # a stale series: nothing of it wanted
        held = _series_sops(client, study, series)
        if held - wanted and not refused:
            try:
                for sop in sorted(held - wanted):
                    _delete_instance(client, study, series, sop)
            except DeleteRefused as exc:
                refused = str(exc)
            held = _series_sops(client, study, series)
        if wanted - held or (held != wanted and not refused):
            raise RuntimeError(f"the PACS holds {len(held - wanted)} stale and lacks {len(wanted - held)} "
                               f"instance(s) of series {series} after storing and deleting")
        kept += len(held - wanted)
    return f"{kept} earlier instance(s) kept in the PACS: {refused}" if kept else ""


def _series_sops(client, study: str, series: str) -> set[str]:
    return {_tag(i, "00080018") for i in _paged(client.search_for_instances, study_instance_uid=study,
                                                series_instance_uid=series)}


def _delete_instance(client, study: str, series: str, sop: str) -> None:
    """DICOMweb DELETE (not in the standard; dcm4chee has it), else Orthanc's REST API; raises
    ``DeleteRefused`` when the PACS offers neither or refuses (``REFUSED``)."""
    import requests

    http = getattr(client, "_session", None) or requests  # the client's session carries its authentication
    base = client.base_url.rstrip("/")
    # Not the client's delete_instance: it logs an ERROR line of its own at every 405.
    answer = http.delete(f"{base}/studies/{study}/series/{series}/instances/{sop}", timeout=PACS_TIMEOUT_S)
    if answer.ok:
        return
    if answer.status_code not in REFUSED:
        answer.raise_for_status()  # a 5xx: the PACS in trouble, an error retried next run
    root = base[: -len("/dicom-web")] if base.endswith("/dicom-web") else base.rsplit("/", 1)[0]
    found = http.post(f"{root}/tools/lookup", data=sop, timeout=PACS_TIMEOUT_S)
    if found.status_code in REFUSED:
        raise DeleteRefused(f"it deletes nothing (DICOMweb DELETE answered HTTP {answer.status_code})")
    found.raise_for_status()
    for item in found.json():
        if item.get("Type") == "Instance":
            gone = http.delete(f"{root}/instances/{item['ID']}", timeout=PACS_TIMEOUT_S)
            if gone.status_code in REFUSED:
                raise DeleteRefused(f"it refuses to delete (HTTP {gone.status_code})")
            gone.raise_for_status()
