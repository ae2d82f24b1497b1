"""What the registry holds, and the champion moved by hand: ``version_rows`` lists a registered
model's versions with their scores and where they came from (``registry list``); ``promote`` points
``@champion`` at a version a person chose (``registry promote``: a rollback when a new champion
misbehaves), and writes who-asked-why on it, since every service and scheduled job that follows the
alias switches to it.

Imports ``registry.champion``; nothing above ``registry``.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from raysegment.registry.champion import CHAMPION, Registration

PREFIX = "raysegment-"


@dataclass(frozen=True)
class VersionRow:
    """One registered version as ``registry list`` prints it."""

    version: str
    champion: bool
    created: str  # UTC, minutes
    score: str  # val Dice, or the diagnosis' CV accuracy, in words
    origin: str  # search trial, final run, ensemble members, or by hand


def registered_names(client) -> list[str]:
    """The registry's raysegment models (``raysegment-<backbone>``, ``-ensemble``, ``-diagnosis``)."""
    return sorted(m.name for m in client.search_registered_models() if m.name.startswith(PREFIX))


def _score(tags: dict[str, str]) -> str:
    if "dice_mean" in tags:
        dice = " / ".join(f"{float(tags['dice_' + c]):.3f}" for c in ("rv", "myo", "lv"))
        claim = " (the file's claim)" if tags.get("evaluated") == "false" else ""
        data = f" on data {tags['manifest_hash'][:12]}" if tags.get("manifest_hash") else ""
        return f"val Dice {dice}, mean {float(tags['dice_mean']):.3f}{claim}{data}"
    if "cv_accuracy" in tags:
        return f"CV accuracy {float(tags['cv_accuracy']):.3f} on {tags.get('patients') or '?'} patients"
    return "unscored"


def _origin(tags: dict[str, str]) -> str:
    if tags.get("final") == "true":
        return f"final run of search {tags.get('search_run', '?')[:8]}"
    if "source_trial" in tags:
        return f"search {tags.get('search_run', '?')[:8]}, trial {tags['source_trial']}, epoch {tags.get('epoch', '?')}"
    if "members" in tags:
        return "ensemble of " + ", ".join(json.loads(tags["members"]))
    if "cv_accuracy" in tags:
        return f"registry diagnosis; its masks: {tags.get('segmenter') or '?'}"
    return "registry import or register"


def version_rows(client, name: str) -> list[VersionRow]:
    """``name``'s versions, newest first; ValueError naming the registry's models where it has no ``name``."""
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        names = registered_names(client)
        raise ValueError(f"no registered model {name!r} (this registry has {', '.join(names) or 'none of raysegment'})")
    champion = _champion(client, name)
    rows = []
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        tags = dict(v.tags)
        created = dt.datetime.fromtimestamp(v.creation_timestamp / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
        origin = _origin(tags) + (f"; made champion by hand: {tags['promoted_by_hand']}" if "promoted_by_hand" in tags else "")
        rows.append(VersionRow(str(v.version), str(v.version) == champion, created, _score(tags), origin))
    return rows


def _champion(client, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except Exception:  # MLflow raises a RestException/MlflowException for an alias that is not set
        return None


def promote(name: str, version: str, *, reason: str, tracking_uri: str) -> Registration:
    """Point ``name@champion`` at ``version`` by a person's decision, not the champion rule; the version
    gets a ``promoted_by_hand`` tag and a sentence in its description (when, from which version, why)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    rows = version_rows(client, name)
    if version not in {r.version for r in rows}:
        raise ValueError(f"{name} has no version {version} (it has v{', v'.join(r.version for r in reversed(rows))})")
    before = next((r.version for r in rows if r.champion), None)
    if before == version:
        return Registration(name, version, True, "it is the champion already", new=False)
    if not reason.strip():
        raise ValueError("--reason must say why (it is written on the version, for whoever looks next)")
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    note = f"{when}, replacing {f'v{before}' if before else 'no champion'}: {reason.strip().rstrip('.')}"
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promoted_by_hand", note)
    text = client.get_model_version(name, version).description or ""
    client.update_model_version(name, version, description=f"{text} Made champion by hand on {note}.".strip())
    return Registration(name, version, True, f"by hand on {note}")
