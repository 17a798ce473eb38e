"""One run per workdir: an exclusive ``fcntl.flock`` on ``<workdir>/.lock``.

The lock file holds its owner's pid, host, start time and command line (JSON). A second run on
the same workdir fails at once with ``WorkdirLockedError`` naming that process, instead of
interleaving metrics and overwriting checkpoints. Stale locks recover without help:

* the kernel drops a flock when its holder exits, however it ends (even ``kill -9``); the next
  run takes the lock and notes the owner that ended without releasing it;
* a flock still held although the recorded pid no longer exists on this host (a child process
  inherited the open file) is broken: the lock file is replaced, with a note.

Locks are reentrant within one process (``main.run`` and the ``Trainer`` it builds both hold it).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time

LOCK_FILE = ".lock"
_log = logging.getLogger(__name__)
_held: dict[str, list[int]] = {}  # lock path -> [file descriptor, hold count]


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir's lock."""


def _lock_path(workdir: str) -> str:
    """``<workdir>/.lock``; process p > 0 of a multi-process run holds ``.lock.process<p>`` (every
    process of the run shares the workdir, each guards against a second run of its own rank)."""
    import jax

    process = jax.process_index()
    return os.path.join(os.path.realpath(workdir), LOCK_FILE + (f".process{process}" if process else ""))


def _read_owner(descriptor: int) -> dict:
    """The JSON owner record in the lock file ({} when empty or unreadable)."""
    os.lseek(descriptor, 0, os.SEEK_SET)
    raw = os.read(descriptor, 1 << 16)
    try:
        owner = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict) -> str:
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {when}, "
            f"command: {owner.get('command', '?')}")


def _owner_is_gone(owner: dict) -> bool:
    """True when the recorded owner ran on this host and its pid no longer exists."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by another user
        return False
    return False


def _try_lock(path: str) -> tuple[int | None, dict]:
    """(descriptor holding the flock, previous owner) or (None, current owner) when held."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _read_owner(descriptor)
        os.close(descriptor)
        return None, owner
    return descriptor, _read_owner(descriptor)


def acquire(workdir: str) -> None:
    """Takes the lock of ``workdir`` (creating the directory) or raises ``WorkdirLockedError``."""
    path = _lock_path(workdir)
    if path in _held:
        _held[path][1] += 1
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    descriptor, owner = _try_lock(path)
    if descriptor is None and _owner_is_gone(owner):
        _log.warning("workdir %s: breaking the lock of a process that no longer exists (%s); "
                     "a process it started still held the lock file", workdir, _describe(owner))
        os.unlink(path)
        descriptor, owner = _try_lock(path)
    if descriptor is None:
        raise WorkdirLockedError(
            f"workdir {os.path.realpath(workdir)} is in use by another run: {_describe(owner)}. "
            f"Wait for it to finish or stop it (kill {owner.get('pid', '<pid>')}), or pass another "
            f"--workdir.")
    if owner and owner.get("pid") != os.getpid():
        _log.warning("workdir %s: taking over the lock left by a run that ended without releasing "
                     "it (%s)", workdir, _describe(owner))
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": " ".join([sys.executable] + sys.argv)}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(record).encode("utf-8"), 0)
    os.fsync(descriptor)
    _held[path] = [descriptor, 1]


def release(workdir: str) -> None:
    """Drops one hold of ``workdir``'s lock; the last one empties the file and unlocks it."""
    path = _lock_path(workdir)
    entry = _held.get(path)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _held[path]
    descriptor = entry[0]
    try:
        os.ftruncate(descriptor, 0)  # an empty file: released cleanly, nothing to report
    except OSError:
        pass
    fcntl.flock(descriptor, fcntl.LOCK_UN)
    os.close(descriptor)


@contextlib.contextmanager
def hold(workdir: str):
    """``with hold(workdir):`` the lock is held inside the block."""
    acquire(workdir)
    try:
        yield
    finally:
        release(workdir)
