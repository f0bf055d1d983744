"""Whether a process still runs: how a later start tells a killed run from a live one."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def stop_signals() -> list[signal.Signals]:
    """The signals that ask a stage to stop, each as SIGTERM does (a checkpoint, the
    run ended KILLED, exit 130): Ctrl-C, SIGTERM, a closed terminal or ssh session
    (SIGHUP, POSIX) and Ctrl-Break or CTRL_BREAK_EVENT (SIGBREAK, Windows: how a
    multi-process training's console group is stopped there)."""
    names = ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK")
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


def pid_alive(pid: int) -> bool:
    """True while process `pid` of this machine runs (a zombie has ended)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # QUERY_LIMITED
        if not handle:
            return False
        ctypes.windll.kernel32.CloseHandle(handle)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): alive as far as we can tell
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
