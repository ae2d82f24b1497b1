"""The HTTP API of ``python -m raysegment.serve``, one ``SegmentService`` per Ray Serve replica.

    POST /v1/segment            body: a NIfTI file (.nii or .nii.gz bytes, 3-D or 4-D)
                                → the mask (.nii.gz bytes) on the input's grid and affine
    POST /v1/segment?format=json[&ed=F&es=F][&height_cm=H&weight_kg=W]
                                → per-frame volumes (mL), voxels, LV mass (g), QC flags; of a cine
                                  the batch job's patient indices (EF %, …) and diagnosis
    POST /v1/pacs/series        body: {"study": UID, "series": UID} → 202; the series is pulled
                                (WADO-RS), segmented, its SEGs stored back (STOW-RS), ledger written
    GET  /v1/pacs/series?study=UID&series=UID
                                → how that series stands (queued, done, failed, …; its SEG series);
                                a slice of a stack stored as a series per slice is queued until the
                                study's slices stop arriving (``stack_settle_s``), then the stack's
    GET  /v1/health (no token asked: for probes), GET /v1/model

Bad requests get a 4xx with a one-line JSON ``{"error": reason}``; the replica goes on serving.
Each replica follows a registry alias (``models:/NAME@ALIAS``): every ``poll_s`` it asks where the
alias points and, when it moved, loads the new version beside the old and switches; a request holds
the Predictor it started with, so none in flight fails.

Imports ``inference``, ``analysis``, ``model``, ``io``, ``config`` and ``runtime``; not
``training``, ``soak`` or ``cli``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode

from raysegment.config import ServeConfig, torch_threads
from raysegment.inference.predictor import Predictor, is_registry_uri, pinned
from raysegment.io.dicom import series_key
from raysegment.io.studies import StudyError
from raysegment.runtime import HeapTrimmer, clear_stale_scratch, disable_telemetry, scratch_dir
from raysegment.service.answers import MiB, RequestError, check_frames, frame_param, read_body, size_param, summary
from raysegment.service.settle import SettleTimer

log = logging.getLogger("ray.serve")
NIFTI_TYPES = {"application/octet-stream", "application/gzip", "application/x-gzip", "application/x-nifti",
               "application/nifti", "image/nifti", ""}
SCRATCH = "raysegment-serve-"  # a request's upload and mask: the temp folder's raysegment-serve-<pid>-…


class ModelHolder:
    """The Predictor a replica serves now, and the thread that follows a registry alias."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.follows = is_registry_uri(config.model) and "@" in config.model
        ref, self.version = pinned(config.model, config.tracking_uri)
        self.predictor = self._load(ref)
        if self.follows:
            threading.Thread(target=self._poll, name="alias-poll", daemon=True).start()

    def _load(self, ref: str) -> Predictor:
        return Predictor.load(ref, self.config.predict, self.config.tracking_uri)

    def _poll(self) -> None:
        while True:
            time.sleep(self.config.poll_s)
            try:
                ref, version = pinned(self.config.model, self.config.tracking_uri)
                if version != self.version:
                    predictor = self._load(ref)  # the old one serves meanwhile
                    self.predictor, self.version = predictor, version
                    log.warning("raysegment: %s now serves %s", self.config.model, version)
            except Exception as exc:  # the registry unreachable: keep serving what is loaded
                log.warning("raysegment: alias check of %s failed (%s: %s)", self.config.model, type(exc).__name__, exc)


class SegmentService:
    """One replica: a loaded model, one volume at a time (its threads are the replica's CPUs)."""

    def __init__(self, config: ServeConfig):
        import torch

        disable_telemetry()
        clear_stale_scratch(SCRATCH)  # uploads of a replica killed mid-request
        torch.set_num_threads(config.threads or torch_threads(None, 1, config.cpus_per_replica))
        self.config = config
        self.holder = ModelHolder(config)
        self.diagnosis = None
        if config.diagnosis:  # checked by the command before Ray started
            from raysegment.analysis.diagnosis import load

            self.diagnosis = load(config.diagnosis, config.tracking_uri)
        self.lock = threading.Lock()
        self.pacs_jobs = ThreadPoolExecutor(1, thread_name_prefix="pacs")
        self.queued: set[str] = set()  # pushed series keys this replica has not finished
        self.ledger, self.status_lock = None, threading.Lock()  # GET /v1/pacs/series' reader of the ledger
        self.push_ledger = None  # the pushes' own reader (under ``lock``: a push holds it for seconds)
        self.stacks = SettleTimer(config.stack_settle_s, self._stack_settled)  # study → its waiting slice series
        self.heap = HeapTrimmer()

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        try:
            return await self._route(request)
        except RequestError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        except Exception as exc:  # a fault of ours: 500 with the reason, the replica goes on
            log.exception("raysegment: request failed")
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)

    async def _route(self, request):
        from starlette.responses import JSONResponse

        path, method = request.url.path.rstrip("/") or "/", request.method
        if path != "/v1/health":  # liveness probes carry no secrets
            self._authorize(request)
        routes = {"/v1/segment": ("POST",), "/v1/pacs/series": ("POST", "GET"), "/v1/health": ("GET",),
                  "/v1/model": ("GET",)}
        if path not in routes:
            raise RequestError(404, f"no route {path}; routes: {', '.join(sorted(routes))}")
        if method not in routes[path]:
            raise RequestError(405, f"{path} takes {' or '.join(routes[path])}, not {method}")
        if path == "/v1/health":
            return JSONResponse({"status": "ok", "model_version": self.holder.version})
        if path == "/v1/model":
            return JSONResponse(await asyncio.to_thread(self.model_info))
        if path == "/v1/pacs/series" and method == "GET":
            return JSONResponse(await asyncio.to_thread(self.series_status, request.query_params))
        if path == "/v1/pacs/series":
            return self._accept_series(await request.body())
        return await self._segment_request(request)

    def _authorize(self, request) -> None:
        import hmac

        if self.config.token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.config.token}".encode()):
            raise RequestError(401, "missing or wrong bearer token (header 'Authorization: Bearer TOKEN')")

    # ----------------------------------------------------------------- POST /v1/segment

    async def _segment_request(self, request):
        from starlette.responses import JSONResponse, Response

        params = request.query_params
        model = params.get("model")
        if model is not None and model not in self.model_names():
            raise RequestError(404, f"unknown model {model!r}; this service serves {self.config.model} ({self.holder.version})")
        fmt = params.get("format", "nifti")
        if fmt not in ("nifti", "json"):
            raise RequestError(400, f"format must be nifti or json, not {fmt!r}")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in NIFTI_TYPES:
            raise RequestError(415, f"content type {ctype!r} is not a NIfTI body; send the file's bytes as "
                                    f"application/octet-stream")
        body = await read_body(request, int(self.config.max_body_mb * MiB))
        ed, es = frame_param(params, "ed"), frame_param(params, "es")
        check_frames(ed, es)  # before the body is segmented
        size = {k: size_param(params, k) for k in ("height_cm", "weight_kg")}
        predictor, version = self.holder.predictor, self.holder.version
        t0 = time.perf_counter()
        result, turn = await asyncio.to_thread(self.segment_bytes, body, predictor, fmt == "json", ed, es, size)
        headers = {"X-Model-Version": version, "X-In-Plane": turn, "X-Seconds": f"{time.perf_counter() - t0:.3f}"}
        if fmt == "json":
            return JSONResponse(result, headers=headers)
        return Response(result, media_type="application/gzip", headers=headers)

    def segment_bytes(self, body: bytes, predictor: Predictor, as_json: bool, ed: int | None = None,
                      es: int | None = None, size: dict | None = None):
        """A NIfTI file's bytes → (the mask's .nii.gz bytes, or the JSON summary; the in-plane turn it
        was segmented in); raises RequestError (400) for a body that is no usable NIfTI. The batch
        job's per-study code does the work. ``size``: the patient's height_cm and weight_kg, if known."""
        from raysegment.inference.study import segment_study

        with scratch_dir(SCRATCH) as tmp:
            path = tmp / ("upload.nii.gz" if body[:2] == b"\x1f\x8b" else "upload.nii")
            path.write_bytes(body)
            try:
                with self.lock:
                    rows = segment_study(path, predictor, self.config.model, tmp / "out")
            except StudyError as exc:
                raise RequestError(400, f"not a usable NIfTI image: {str(exc).replace(str(path), 'the body')}") from None
            finally:
                self.heap.study_done()
            turn = rows[0].get("in_plane", "")
            if as_json:
                return summary(rows, predictor.version, ed, es, self.diagnosis, size), turn
            return Path(rows[0]["mask"]).read_bytes(), turn

    # ----------------------------------------------------------------- POST /v1/pacs/series

    def _accept_series(self, body: bytes):
        from starlette.responses import JSONResponse

        if not (self.config.pacs and self.config.output):
            raise RequestError(409, "this service was started without --pacs and --output; it takes no PACS pushes")
        try:
            doc = json.loads(body)
            study, series = str(doc["study"]), str(doc["series"])
        except (ValueError, KeyError, TypeError):
            raise RequestError(400, 'body must be JSON {"study": StudyInstanceUID, "series": SeriesInstanceUID}') from None
        if not study or not series:
            raise RequestError(400, "empty Study or Series Instance UID")
        self.queued.add(series_key(study, series))
        self.pacs_jobs.submit(self.pacs_series, study, series)
        status = f"/v1/pacs/series?{urlencode({'study': study, 'series': series})}"
        return JSONResponse({"accepted": series_key(study, series), "model_version": self.holder.version,
                             "status": status}, status_code=202, headers={"Location": status})

    def pacs_series(self, study: str, series: str, settled: bool = False) -> dict:
        """Pull, segment, store and record one pushed series (``inference.pacs``); logs its outcome. A
        slice of a stack stored as a series per slice waits (``stack_settle_s``, still ``queued``) until
        no slice of its study was pushed for that long, then the stack is segmented once (``settled``)."""
        from raysegment.inference.ledger import Ledger
        from raysegment.inference.pacs import segment_pacs_series
        from raysegment.io.dicomweb import web_client

        entry = {}
        try:
            with self.lock:  # pushes run one at a time: one reader of the ledger serves them all
                out = Path(self.config.output)
                self.push_ledger = self.push_ledger or Ledger(out / "ledger.jsonl")
                entry = segment_pacs_series(web_client(self.config.pacs, self.config.pacs_auth), study, series,
                                            self.holder.predictor, self.config.model, out, store=self.config.store,
                                            ledger=self.push_ledger, diagnosis=self.diagnosis, sr=self.config.sr,
                                            stack_waits=not settled and self.config.stack_settle_s > 0)
                if entry["status"] == "waiting":
                    self.stacks.add(study, series)
                    log.warning("raysegment: PACS series %s: a slice of a stack, segmented with it once no slice of "
                                "its study came for %g s", series, self.config.stack_settle_s)
                    return entry
                self.heap.study_done()
        except Exception:  # nothing recorded: the scheduled job segments the series on its next run
            log.exception("raysegment: PACS series %s/%s", study, series)
            return {}
        finally:
            if entry.get("status") != "waiting":
                self.queued.discard(series_key(study, series))
        log.warning("raysegment: PACS series %s: %s %s%s", series, entry["status"], entry.get("reason", ""),
                    f"; {entry['sr_error']}" if entry.get("sr_error") else "")
        return entry

    def _stack_settled(self, study: str, series: list[str]) -> None:
        """No slice of ``study`` was pushed for ``stack_settle_s``: its waiting slices, one after the
        other (the first segments the stack, the rest find it done)."""
        for one in series:
            self.pacs_jobs.submit(self.pacs_series, study, one, True)

    def series_status(self, params) -> dict:
        """GET /v1/pacs/series: a pushed series for the version served now — ``queued`` on this
        replica, else its ledger entry (``inference.pacs.series_status``); 404 when neither."""
        from raysegment.inference.ledger import Ledger
        from raysegment.inference.pacs import series_status

        study, series = params.get("study", ""), params.get("series", "")
        if not (study and series):
            raise RequestError(400, "give ?study=StudyInstanceUID&series=SeriesInstanceUID")
        if not self.config.output:
            raise RequestError(409, "this service was started without --output; it keeps no ledger")
        key, version = series_key(study, series), self.holder.version
        if key in self.queued:
            return {"series": key, "status": "queued", "model_version": version}
        with self.status_lock:  # one reader that reads only what was appended since (a ledger of a year)
            if self.ledger is None:
                self.ledger = Ledger(Path(self.config.output) / "ledger.jsonl")
            else:
                self.ledger.refresh()
            found = series_status(self.ledger, study, series, version)
        if found is None:
            raise RequestError(404, f"{key} has no result of {version} in the ledger: not pushed yet, queued on "
                                    f"another replica, its push lost or another version's result the latest (the "
                                    f"next scheduled run segments it)")
        return found

    # ----------------------------------------------------------------- GET /v1/model

    def model_names(self) -> set[str]:
        ref = self.config.model
        name = ref[len("models:/"):].split("@")[0].split("/")[0] if is_registry_uri(ref) else ref
        return {ref, name, self.holder.version, f"models:/{self.holder.version}"}

    def model_info(self) -> dict:
        """Name, version, per-class val Dice and weights digest (registry tags), runtime, backbones; the
        diagnosis model's reference, cross-validated accuracy and median BSA (m²)."""
        predictor, version = self.holder.predictor, self.holder.version
        info = {"model": self.config.model, "version": version, "runtime": predictor.config.runtime,
                "precision": predictor.config.precision,
                "backbones": [m.config.model.backbone for m in predictor.members], "dice": {}, "weights_sha256": ""}
        if is_registry_uri(self.config.model):
            from mlflow import MlflowClient

            name, number = version.rsplit("/", 1)
            tags = MlflowClient(self.config.tracking_uri).get_model_version(name, number).tags
            info["dice"] = {k[len("dice_"):]: float(v) for k, v in tags.items() if k.startswith("dice_")}
            info["weights_sha256"] = tags.get("weights_sha256", "")
        else:
            from raysegment.inference.predictor import _local_path
            from raysegment.model.weights import sha256

            path = _local_path(self.config.model)
            info["weights_sha256"] = sha256(path / "model.pt" if path.is_dir() else path)
        if self.diagnosis is not None:  # what ?format=json's diagnosis comes from
            accuracy = self.diagnosis.meta.get("accuracy")
            info["diagnosis"] = {"model": self.config.diagnosis, "bsa_m2": self.diagnosis.bsa_m2,
                                 "cv_accuracy": None if accuracy is None else round(accuracy, 4)}
        return info
