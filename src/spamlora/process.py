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


def start_time(pid: int) -> str | None:
    """When process `pid` started, as an opaque token that a later process reusing the
    pid will not share; None where it cannot be told (no /proc, no such process)."""
    if os.name == "nt":
        return _windows_start_time(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22: starttime, in clock ticks


def _windows_start_time(pid: int) -> str | None:
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return None
    try:
        times = [wintypes.FILETIME() for _ in range(4)]
        if not kernel32.GetProcessTimes(handle, *[ctypes.byref(t) for t in times]):
            return None
        return f"{times[0].dwHighDateTime}:{times[0].dwLowDateTime}"  # creation time
    finally:
        kernel32.CloseHandle(handle)


def pid_alive(pid: int, started: str | None = None) -> bool:
    """True while process `pid` of this machine runs (a zombie has ended). With
    `started` (its `start_time` when it was recorded), a process that now holds the same
    pid but started at another time is another process: not alive. Containers and
    Windows hand out pids again quickly."""
    if pid == os.getpid():
        return started is None or started == start_time(pid)
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # QUERY_LIMITED
        if not handle:
            return False
        try:
            code = ctypes.c_ulong()
            # OpenProcess also succeeds on a process that has exited but is still held
            # open somewhere: only STILL_ACTIVE (259) means running.
            if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value != 259:
                return False
        finally:
            kernel32.CloseHandle(handle)
        return started is None or started == start_time(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive, unless /proc says otherwise
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): alive as far as we can tell
    fields = stat.rsplit(")", 1)[-1].split()
    if fields[0] == "Z":
        return False
    return started is None or started == fields[19]
