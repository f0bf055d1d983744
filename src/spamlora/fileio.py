"""Writes that either complete or leave nothing: every stage output goes through here."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(dest: str | Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it is renamed onto `dest`, on any
    error it is removed, so readers never see a half-written output."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}.tmp-"
    if is_dir:
        # A folder a killed writer left behind (it can hold GBs of weights): no writer of
        # `dest` is running now, so none of these is anyone's work in progress.
        for stale in dest.parent.glob(prefix + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=prefix))
    else:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=prefix)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if not is_dir:
            tmp.chmod(0o644)  # mkstemp's 0600 would hide outputs from other users
        if is_dir and dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def link_or_copy(src: str | Path, dest: str | Path) -> None:
    """`dest` as a hard link to `src` (no second copy of a large file), or a copy where
    the two lie on different file systems or links are not allowed."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def write_json(path: str | Path, obj: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> object:
    return json.loads(Path(path).read_text(encoding="utf-8"))
