"""Local and cloud paths (``gs://bucket/run``) through ``etils.epath``, what orbax uses.

A ``gs://`` path stays a cloud path end to end (never ``os.path`` or ``open``, which would
make a local directory named ``gs:``); epath reads and writes it through fsspec (``gcsfs``).
"""

from __future__ import annotations

import os

from etils import epath


def is_local(path: str | os.PathLike) -> bool:
    """Whether ``path`` is on the local filesystem (not ``gs://...`` or another URI)."""
    return "://" not in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: ``gs://bucket/run`` stays a cloud path; a local path is
    made absolute."""
    path = epath.Path(path)
    return epath.Path(os.path.abspath(path)) if is_local(path) else path


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` (local or cloud) through a temporary file and a rename:
    readers see the old or the new file, never a part."""
    path = as_path(path)
    temporary = path.parent / f"{path.name}.tmp"
    temporary.write_text(text)
    temporary.replace(path)
