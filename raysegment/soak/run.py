"""The soak from start to verdict (``python -m raysegment.bench soak``): the corpus, the chaos
runs, the undisturbed reference run, the checks → ``OUT/soak.json`` and a pass/fail.

Imports ``soak.corpus``, ``soak.checks``, ``soak.runner``, ``data`` and ``config``; not ``cli``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from raysegment.soak.checks import check_outcomes, leftovers, memory, results_agree
from raysegment.soak.corpus import plan, write_study
from raysegment.soak.runner import RunRecord, SoakConfig, ray_head, run_batch_job


def say(text: str) -> None:
    print(f"[soak] {text}", flush=True)


def build_corpus(config: SoakConfig, stage: Path) -> tuple[list, dict[int, list[str]]]:
    """Every study written to ``stage`` (one folder each) → (studies, DICOM series UIDs by study)."""
    from raysegment.data.sources import source_patients

    patients = list(source_patients(config.source))
    studies = plan(config.studies, config.bad, len(patients), config.waves, config.seed)
    series = {}
    for i, s in enumerate(studies):
        series[s.number] = write_study(s, patients[s.patient], stage / s.folder)
        if (i + 1) % 100 == 0:
            say(f"wrote {i + 1}/{len(studies)} studies")
    return studies, series


def chaos_runs(config: SoakConfig, studies: list, stage: Path, input_dir: Path, output: Path, env: dict) -> list[RunRecord]:
    """Batch runs until the last wave has arrived and a run settles nothing new; the first
    ``driver_kills`` runs lose their driver part-way, every run loses an actor every ``kill_every``."""
    rng = np.random.default_rng(config.seed + 1)
    input_dir.mkdir(parents=True, exist_ok=True)
    runs: list[RunRecord] = []
    for i in range(config.waves + config.driver_kills + 6):
        if i < config.waves:  # new studies arrive between runs, each folder renamed in at once
            for s in (s for s in studies if s.wave == i):
                os.rename(stage / s.folder, input_dir / s.folder)
        kill_driver = int(rng.integers(2, max(3, config.kill_every))) if i < config.driver_kills else None
        record = run_batch_job(config, input_dir, output, env, config.kill_every, kill_driver, rng)
        runs.append(record)
        s = record.summary or {}
        say(f"run {i + 1}: exit {record.returncode}, {record.wall_s:.0f} s, actor kills {record.actor_kills}"
            f"{', driver killed' if record.driver_killed else ''}; " +
            (f"segmented {s['segmented']}, failed {s['failed']}, not cine {s['not_cine']}, errors {s['errors']}"
             if s else "no summary"))
        new = s.get("segmented", 1) + s.get("failed", 1) + s.get("not_cine", 1) + s.get("errors", 1)
        if i >= config.waves - 1 and not record.driver_killed and record.returncode == 0 and new == 0:
            return runs
    return runs


def run_soak(config: SoakConfig) -> dict:
    """The whole soak → the figures written to ``OUT/soak.json`` (``passed`` says whether every check held)."""
    from raysegment.config import available_cpus

    out = Path(config.out).resolve()
    stage, input_dir, chaos, reference = out / "stage", out / "input", out / "chaos", out / "reference"
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; the soak needs a folder of its own")
    say(f"writing {config.studies} studies from {config.source} ({config.bad:.0%} bad)")
    studies, series = build_corpus(config, stage)
    with ray_head(out / "ray", max(config.actors, min(available_cpus(), config.actors))) as env:
        say(f"Ray head up; chaos runs: an actor killed every {config.kill_every} studies, "
            f"{config.driver_kills} drivers killed")
        runs = chaos_runs(config, studies, stage, input_dir, chaos, env)
        say("undisturbed run over the same studies (the reference)")
        ref = run_batch_job(config, input_dir, reference, env, None, None, np.random.default_rng(0))
        service = _service(config, env, studies, input_dir, reference, out / "service") if config.serve_requests else {}
    result = verdict(config, studies, series, input_dir, chaos, reference, runs, ref)
    if service:
        result["service"] = service
        result["passed"] = result["passed"] and service["answered"] == service["requests"] and \
            service["timeouts"] == 0 and service["wrong_masks"] == 0 and service["ok"] > 0
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    return result


def _service(config: SoakConfig, env: dict, studies: list, input_dir: Path, reference: Path, root: Path) -> dict:
    """The service under replica kills, on a good 3-D study whose undisturbed batch mask is the answer."""
    from raysegment.soak.checks import read_ledger, study_key
    from raysegment.soak.runner import serve_under_kills

    study = next(s for s in studies if s.kind == "nifti3d_float")
    key = study_key(study, input_dir, [])
    entry = next(e for e in read_ledger(reference) if e["path"] == key and e["status"] == "done")
    say(f"the service: {config.serve_requests} requests, a replica killed every {config.serve_kill_every_s:g} s")
    out = serve_under_kills(config, env, Path(key), Path(entry["rows"][0]["mask"]).read_bytes(), root)
    say(f"the service: {out['ok']}/{out['requests']} answered 200, {out['failed']} failed, {out['timeouts']} timed out, "
        f"{out['wrong_masks']} wrong masks, {out['kills']} replicas killed")
    return out


def verdict(config, studies, series, input_dir, chaos, reference, runs, ref) -> dict:
    outcomes = check_outcomes(studies, series, input_dir, chaos, reference)
    temp = leftovers(chaos)
    mem = memory(ref.samples)
    chaos_wall = sum(r.wall_s for r in runs)
    result = {"studies": len(studies), "good": sum(not s.bad for s in studies), "bad": sum(s.bad for s in studies),
              "bad_kinds": sorted({s.kind for s in studies if s.bad}), "runs": len(runs),
              "kills": sum(r.actor_kills for r in runs), "driver_kills": sum(r.driver_killed for r in runs),
              **{k: outcomes[k] for k in ("lost", "duplicated", "wrong_outcomes", "wrong_masks", "errors_left")},
              "temp_files_left": len(temp), "results_consistent": results_agree(chaos), **mem,
              "studies_per_s": round(len(studies) / ref.wall_s, 3), "studies_per_s_chaos": round(len(studies) / chaos_wall, 3),
              "reference_exit": ref.returncode, "cases": outcomes["cases"] + temp[:5],
              "model": config.model, "kill_every": config.kill_every, "date": time.strftime("%Y-%m-%d")}
    growth_ok = not mem or mem["rss_mb_final"] <= 1.2 * mem["rss_mb_after_50"]
    result["passed"] = (all(result[k] == 0 for k in ("lost", "duplicated", "wrong_outcomes", "wrong_masks", "errors_left",
                                                     "temp_files_left"))
                        and result["results_consistent"] and ref.returncode == 0 and growth_ok
                        and result["runs"] < config.waves + config.driver_kills + 6)
    return result
