"""Writes that either complete or leave nothing: every stage output goes through here."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import SpamloraError
from .process import pid_alive


class OutputExistsError(SpamloraError, FileExistsError):
    pass


def _temp_owner_alive(tmp: Path, prefix: str) -> bool:
    """Whether the writer of temporary folder `tmp` (named `prefix<pid>-...`) still runs."""
    pid = tmp.name[len(prefix):].split("-", 1)[0]
    return pid.isdigit() and pid_alive(int(pid))


def _replace_folder(tmp: Path, dest: Path, record: str | None) -> None:
    """`tmp` onto `dest`: renamed where `dest` is absent or empty; where it holds a
    previous output of ours (its `record` file), each of `tmp`'s files replaces its
    namesake and the rest of `dest` is left alone; anything else is refused."""
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    if not dest.exists():
        os.replace(tmp, dest)
        return
    if not dest.is_dir() or record is None or not (dest / record).is_file():
        what = "a file" if not dest.is_dir() else "a folder spamlora did not write"
        hint = f" (no {record} in it)" if record and dest.is_dir() else ""
        raise OutputExistsError(f"{dest}: is {what}{hint}; nothing in it was changed. "
                                f"Choose a new or empty folder.")
    files = sorted(tmp.iterdir(), key=lambda p: p.name == record)  # the record last
    for file in files:
        os.replace(file, dest / file.name)
    tmp.rmdir()


@contextlib.contextmanager
def atomic_path(dest: str | Path, is_dir: bool = False,
                record: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it is renamed onto `dest`, on any
    error it is removed, so readers never see a half-written output.

    A folder is never put in place of one the project did not write: `dest` may be
    absent or empty, or (given `record`, the file a writer of `dest` always leaves in
    it) a previous output, whose files of the same names are then replaced one by one;
    anything else raises `OutputExistsError` and changes nothing."""
    dest = Path(dest).absolute()  # `.` too has a name and a parent
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}.tmp-"
    if is_dir:
        # Folders killed writers left behind (they can hold GBs of weights); the pid in
        # the name keeps a running writer's folder out of this.
        for stale in dest.parent.glob(prefix + "*"):
            if stale.is_dir() and not _temp_owner_alive(stale, prefix):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f"{prefix}{os.getpid()}-"))
    else:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=prefix)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        # mkstemp's 0600 and mkdtemp's 0700 would hide outputs from other users.
        tmp.chmod(_default_mode(0o777 if is_dir else 0o666))
        if is_dir:
            _replace_folder(tmp, dest, record)
        else:
            os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _default_mode(mode: int) -> int:
    """`mode` less the process's umask, as a plain `open`/`mkdir` would create it."""
    try:  # Linux says it without changing it
        status = Path("/proc/self/status").read_text()
        umask = int(status.split("Umask:", 1)[1].split()[0], 8)
    except (OSError, IndexError, ValueError):
        umask = os.umask(0)
        os.umask(umask)
    return mode & ~umask


class NoSpaceError(SpamloraError, OSError):
    pass


# Left free beyond what a write needs: SQLite's journal, DVC's lock and state files.
SPACE_MARGIN = 64 << 20


def free_bytes(path: str | Path) -> int:
    """Free bytes on the file system of `path` (or of its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def ensure_space(folder: str | Path, needed: int, what: str) -> None:
    """Refuse, before writing, `needed` bytes into `folder` that its file system cannot
    hold (with SPACE_MARGIN to spare): a disk that fills half-way leaves DVC's and
    SQLite's own files cut short too."""
    free = free_bytes(folder)
    if free < needed + SPACE_MARGIN:
        raise NoSpaceError(f"{folder}: {what} needs {needed:,} bytes (and "
                           f"{SPACE_MARGIN >> 20} MiB to spare), but {free:,} are free "
                           f"there")


def no_space_message(error: BaseException) -> str | None:
    """One line for a full disk met anywhere (errno ENOSPC, or SQLite's "database or
    disk is full"), naming the file and what is free; None for any other error."""
    name = getattr(error, "filename", None)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = Path(name) if name else Path.cwd()
        return (f"no space left on device writing {name or 'a file'} ({free_bytes(where):,}"
                f" bytes free there): free some, then rerun; nothing half-written is used")
    if "database or disk is full" in str(error):
        return ("no space left on device for the MLflow store (SQLite: database or disk "
                "is full): free some, then rerun")
    return None


def link_or_copy(src: str | Path, dest: str | Path) -> None:
    """`dest` as a hard link to `src` (no second copy of a large file), or a copy where
    the two lie on different file systems or links are not allowed."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def write_text(path: str | Path, text: str) -> None:
    """`text` as UTF-8 with "\n" line ends on every OS. A plain text-mode write would end
    lines with "\r\n" on Windows and encode with its code page: DVC hashes the bytes,
    so an output written there would differ from the same output written here."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")


def write_json(path: str | Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> object:
    return json.loads(Path(path).read_text(encoding="utf-8"))
