"""The experiment-directory lock: one ``speechkd`` command at a time writes an experiment's shared outputs.

Two kinds of holder, both through ``fcntl.flock`` on files in the experiment directory:

- a command that may write anything (``run``, ``prepare``, ``train``, ``evaluate``, ``report``, an un-narrowed
  ``distill`` / ``finetune`` / labelling stage) holds ``EXP/.speechkd.lock`` exclusively;
- a command narrowed to outputs of its own (``distill`` or ``evaluate --student X [--seed S]``, an SSL recipe's
  ``distill`` (it writes ``student/`` only), ``finetune --run R``,
  ``pseudo-label`` / ``hubert-targets --shard i/n``, ``export``) holds ``EXP/.speechkd.lock`` shared, so several of
  them run side by side (the documented way to use both cores), plus ``EXP/.locks/<scope>.lock`` exclusively, so
  the same run is not trained twice at once.

A second command that cannot get its lock stops at once with :class:`ExperimentLocked`, naming who holds it (pid,
host, command, start time, written into the lock file by its holder). The operating system releases a ``flock``
when its process ends, however it ends (``kill -9`` included), so a dead process never leaves a stale lock: a lock
file left on disk by one is simply taken by the next command. On network file systems ``flock`` is as reliable as
the file system's lock support (NFSv4 supports it; check yours before sharing an experiment between nodes).
Multi-process runs take the lock in global rank 0 only (every rank works under it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

from speechkd.utils import Pathlike

__all__ = ["ExperimentLocked", "LOCK_FILE", "experiment_lock"]

LOCK_FILE = ".speechkd.lock"
"""The experiment-wide lock file in the experiment directory."""


class ExperimentLocked(RuntimeError):
    """Another process holds the lock this command needs (the message says who)."""


def _holder_line(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        info = {}
    if not info:
        return f"a process (no details in {path})"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} since {started}: `{info.get('command')}`"


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


def _try(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _write_holder(fd: int, command: str) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


def _busy_scopes(exp_dir: Path) -> list[str]:
    """The holders of the narrowed locks now held (a scope file nobody holds is left over and skipped)."""
    out = []
    for f in sorted((exp_dir / ".locks").glob("*.lock")):
        fd = os.open(f, os.O_RDONLY)
        try:
            if not _try(fd, fcntl.LOCK_SH):
                out.append(_holder_line(f))
        finally:
            os.close(fd)
    return out


def _scope_file(exp_dir: Path, scope: str) -> Path:
    return exp_dir / ".locks" / (re.sub(r"[^A-Za-z0-9_.-]+", "_", scope) + ".lock")


@contextlib.contextmanager
def experiment_lock(exp_dir: Pathlike, scope: Optional[str] = None, command: Optional[str] = None) -> Iterator[None]:
    """Hold the experiment's lock for the block: exclusively (``scope`` None), or shared with a narrowed ``scope``
    (e.g. ``"distill mvq seed 0"``) held exclusively. Non-blocking.

    Args:
      exp_dir: the experiment directory (created if missing).
      scope: what a narrowed command writes alone; None for a command that may write anything.
      command: recorded for the message a refused command prints (default: this process's command line).

    Raises:
      ExperimentLocked: another process holds a conflicting lock; the message names the directory and each holder.
    """
    exp_dir = Path(exp_dir)
    command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    main = _open(exp_dir / LOCK_FILE)
    fds = [main]
    try:
        if scope is None:
            if not _try(main, fcntl.LOCK_EX):
                holders = _busy_scopes(exp_dir) or [_holder_line(exp_dir / LOCK_FILE)]
                raise ExperimentLocked(f"experiment {exp_dir} is in use by " + "; ".join(holders) + ": wait for it "
                                       "to finish, or stop it (its outputs resume)")
            _write_holder(main, command)
        else:
            if not _try(main, fcntl.LOCK_SH):
                raise ExperimentLocked(f"experiment {exp_dir} is in use by {_holder_line(exp_dir / LOCK_FILE)}: "
                                       "wait for it to finish, or stop it (its outputs resume)")
            path = _scope_file(exp_dir, scope)
            fd = _open(path)
            fds.append(fd)
            if not _try(fd, fcntl.LOCK_EX):
                raise ExperimentLocked(f"{scope} of experiment {exp_dir} is already running: {_holder_line(path)}")
            _write_holder(fd, command)
        yield
    finally:
        for fd in reversed(fds):
            os.close(fd)  # closing releases the flock
