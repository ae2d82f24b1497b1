"""Where runs live: a local folder or a URI (``s3://bucket/runs``, ``gs://…``) that every node of
a cluster reaches. Ray Train and Tune take both; these helpers give the rest of raysegment the
same two kinds through pyarrow's filesystems (credentials and endpoint from the environment, as
pyarrow reads them: ``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, an instance role …).

Imports nothing of raysegment.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def join(base: str | Path, *parts: str) -> str:
    """``base/part/…``: a URI stays a URI; a local path becomes absolute (workers start elsewhere)."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base).resolve().joinpath(*parts))


def _fs(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)  # (filesystem, path inside it)


def unreachable(uri: str) -> str | None:
    """Why storage ``uri`` cannot be read (no network, no such bucket, no credentials: the first line
    of pyarrow's error), or None; a local path is never unreachable (it is made when written)."""
    if not is_uri(uri):
        return None
    try:
        fs, inner = _fs(uri)
        fs.get_file_info(inner)
    except (OSError, ValueError) as exc:  # pyarrow: OSError (network, access), ValueError/ArrowInvalid (the URI)
        return (str(exc).splitlines() or [type(exc).__name__])[0]
    return None


def read_text(path: str) -> str | None:
    """The file's text, or None when it does not exist."""
    if not is_uri(path):
        p = Path(path)
        return p.read_text() if p.exists() else None
    import pyarrow.fs

    fs, inner = _fs(path)
    if fs.get_file_info(inner).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def write_text(path: str, text: str) -> None:
    if not is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        return
    fs, inner = _fs(path)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())


@contextlib.contextmanager
def local_checkpoint(path: str, storage: str) -> Iterator[Path]:
    """A checkpoint folder as a local directory: ``path`` itself on local storage; on a URI
    ``storage``, a temporary download of ``path`` (a path inside that filesystem, as Ray
    reports it, or a full URI)."""
    if not is_uri(storage) and not is_uri(path):
        yield Path(path)
        return
    import ray.train

    fs, _ = _fs(storage)
    inner = _fs(path)[1] if is_uri(path) else path
    with ray.train.Checkpoint(inner, filesystem=fs).as_directory() as d:
        yield Path(d)
