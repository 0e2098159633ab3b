"""Writing a file so that no reader ever sees half of one, and writers side by side (folds of
one cross-validation trained at once, threads of one process) never share a temporary file."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, content: str | bytes | Callable[[Path], None]) -> None:
    """Writes `content` (text, bytes, or a function that writes the file it is given) to a
    temporary file beside `path`, then renames it over `path`. The temporary name keeps the
    suffix (writers that choose the format by it) and is this process's and thread's; it is
    removed if the write fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp{path.suffix}")
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
