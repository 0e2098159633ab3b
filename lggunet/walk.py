"""Listing and reading input folders without surprises.

`list_files(root, wanted)` returns every regular file under `root` whose relative path
`wanted` accepts, and one named problem for each such entry it will not read:

- symlinks are followed while they stay inside `root` (each folder is listed once, so a link
  loop is named, not followed forever); a link that leaves `root` or leads nowhere is named;
- FIFOs, sockets and devices are named and never opened (opening a FIFO would block);
- a file larger than `max_bytes` (a slice is ~200 KB; sparse files included) is named before
  anything is read;
- a name that is not valid UTF-8 is named (shown with the bad bytes escaped).

`read_file(path)` reads one listed file the same careful way (never blocking on a file that
was swapped for a FIFO since it was listed).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from lggunet.errors import DataError

MAX_FILE_BYTES = 64 * 2**20  # far above any slice (~200 KB), far below trouble


@dataclasses.dataclass(frozen=True)
class Found:
    rel: PurePosixPath  # relative to the root, as the user sees it (links not resolved)
    path: Path  # where to read it


def shown(path: str | os.PathLike) -> str:
    """A path for messages, on one line: bytes that are not UTF-8 and control characters (a
    newline in a file name) are escaped, never an encoding error or a forged line."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def list_files(
    root: Path,
    wanted: Callable[[PurePosixPath], bool] = lambda rel: True,
    max_bytes: int = MAX_FILE_BYTES,
) -> tuple[list[Found], list[str]]:
    """(the wanted regular files under `root`, sorted by path; problems, one line each)."""
    real_root = root.resolve()
    found: list[Found] = []
    problems: list[str] = []
    listed: set[tuple[int, int]] = set()

    def inside(target: Path) -> bool:
        return target == real_root or real_root in target.parents

    def visit(folder: Path, rel: PurePosixPath) -> None:
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in listed:
            problems.append(
                f"{shown(folder)}: a symlink loop (this folder is listed already); not followed"
            )
            return
        listed.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            problems.append(f"{shown(folder)}: cannot list this folder ({e.strerror or e})")
            return
        for entry in entries:
            path, child = Path(entry.path), rel / entry.name
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError:
                is_dir = False
            broken_link = entry.is_symlink() and not is_dir and not os.path.exists(path)
            # A broken link is named when it could have been an input: a wanted name, or a
            # name without an extension (a folder, say a patient's).
            if not is_dir and not wanted(child) and not (broken_link and "." not in entry.name):
                continue  # not an input: left alone, not even opened
            if not _is_utf8(entry.name):
                problems.append(f"{shown(path)}: the name is not valid UTF-8; rename it")
                continue
            if entry.is_symlink():
                try:
                    os.stat(path)
                except OSError as e:
                    if e.errno == errno.ELOOP:
                        problems.append(f"{shown(path)}: a symlink loop (it leads to itself)")
                    else:
                        problems.append(
                            f"{shown(path)}: a symlink to {shown(os.readlink(path))}, which is "
                            "missing"
                        )
                    continue
                target = Path(os.path.realpath(path))
                if not inside(target):
                    problems.append(
                        f"{shown(path)}: a symlink out of {shown(root)} (to {shown(target)}); "
                        "not followed: copy the file in, or pass the folder it points to"
                    )
                    continue
            try:
                st = os.stat(path)
            except OSError as e:
                problems.append(f"{shown(path)}: cannot read ({e.strerror or e})")
                continue
            if stat.S_ISDIR(st.st_mode):
                visit(path, child)
            elif not stat.S_ISREG(st.st_mode):
                problems.append(f"{shown(path)}: {_kind(st.st_mode)}, not a file; never opened")
            elif st.st_size > max_bytes:
                problems.append(
                    f"{shown(path)}: {st.st_size} bytes, far larger than a slice (limit "
                    f"{max_bytes}); not read"
                )
            else:
                found.append(Found(child, path))

    visit(root, PurePosixPath())
    return sorted(found, key=lambda f: f.rel), problems


def read_file(path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; DataError naming it otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise DataError(f"{shown(path)}: cannot read file: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{shown(path)}: {_kind(st.st_mode)}, not a file; never read")
        if st.st_size > max_bytes:
            raise DataError(f"{shown(path)}: {st.st_size} bytes, far larger than a slice")
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            return f.read(max_bytes + 1)
    except OSError as e:
        raise DataError(f"{shown(path)}: cannot read file: {e.strerror or e}") from e
    finally:
        if fd >= 0:
            os.close(fd)
