"""The output helpers every writer shares: ``atomic_write`` (readers never see a half-written file)
and the clean-up of what a killed writer left, ``file_stat`` (what the caches key a file on) and
``json_safe``.

Imports ``runtime`` only; no stage.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tempfile
from pathlib import Path

from raysegment.runtime import pid_alive


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


PARTIAL = ".partial-"
STALE_FOREIGN_S = 3600.0  # a partial file of another host (shared storage) counts as abandoned after this


def remove_stale_partials(root: Path) -> int:
    """Delete the half-written files (``atomic_write``'s ``.partial-HOST-PID-*``) under ``root`` whose
    writer is gone: a dead process of this host, or untouched for ``STALE_FOREIGN_S`` (another host,
    or an older name without host and pid) → how many were removed."""
    import time

    removed, host = 0, socket.gethostname()
    for p in root.rglob(f"{PARTIAL}*"):
        m = re.match(rf"{re.escape(PARTIAL)}(.+)-(\d+)-", p.name)
        try:
            if m and m.group(1) == host:
                stale = not pid_alive(int(m.group(2)))
            else:
                stale = time.time() - p.stat().st_mtime > STALE_FOREIGN_S
            if stale and p.is_file():
                p.unlink()
                removed += 1
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


def json_safe(value):
    """NaN and inf (an EF of an empty ventricle) → None, in nested dicts and lists: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def file_stat(p: Path) -> list[int] | None:
    """[size, mtime_ns, ctime_ns, inode] of a file, or None when it cannot be read."""
    try:
        st = p.stat()
    except (OSError, RuntimeError):
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder (so os.replace is atomic), same suffix (nibabel picks the format by it).
    # The writer's host and pid in the name: a later run removes what a killed writer left
    # (``remove_stale_partials``) and leaves a living writer's file alone.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{PARTIAL}{socket.gethostname()}-{os.getpid()}-",
                               suffix="".join(path.suffixes))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
