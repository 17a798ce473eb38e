"""Runs model-written Python in an isolated, resource-limited, throw-away process.

Model code is hostile input. Every snippet runs in its own fresh interpreter ("worker") that
is discarded afterwards, so no snippet ever sees state left by another one. Containment layers
(each degrades loudly, never silently, when the host cannot provide it):

* **Namespaces** (root, ``unshare(2)``): a new network namespace (only a downed loopback:
  no network at all, not even the host's localhost services), a new PID namespace (its PID 1 is
  a small trusted reaper that runs the snippet as its child and reports its exit status; when it
  exits or is killed, the kernel kills every process left in the namespace, including ones that
  escaped with ``setsid``) and a new mount namespace in which fresh size-limited tmpfs
  are mounted over the world-writable directories (``/tmp``, ``/var/tmp``, ``/dev/shm``,
  ``/run/lock``) and over any directory the unprivileged user could not traverse to reach the
  interpreter (e.g. ``/root`` 0700), with the interpreter re-exposed read-only inside it. The
  scratch directory lives in that private ``/tmp``; the kernel frees it with the namespace.
* **Privilege drop** (root): the snippet runs under a dedicated unprivileged uid/gid per worker
  slot (``uid_base + slot``, allocated across processes with lock files), no supplementary
  groups, ``no_new_privs``. It cannot write the repository or anything root owns, cannot read
  other processes' environments, and ``RLIMIT_NPROC`` (not enforced for uid 0) bounds its
  process count. Every process of that uid is SIGKILLed after each call (``/proc`` scan), which
  catches escapees even without a PID namespace.
* **rlimits**: CPU seconds, address space, process count, file size, open files, no core dumps.
* **Memory cgroup** (root, cgroup v1 or delegated v2): each slot has a child memory cgroup of
  this process's own, limited to ``memory_bytes`` for the snippet *and all its children*
  (RLIMIT_AS alone would allow ``max_processes`` x ``memory_bytes``); the snippet's processes
  carry ``oom_score_adj`` 1000 so the kernel's OOM killer takes them first. Without it (warned
  once) memory is limited per process only.
* ``python -I`` (no user site, no ``PYTHON*`` variables, script dir not on ``sys.path``), a
  scrubbed environment (only ``PATH``, locale, ``HOME``/``TMPDIR`` = scratch and single-thread
  BLAS settings; nothing from the host), stdin closed after the code.
* Wall-clock timeout and an output cap: the worker's process group is SIGKILLed (plus the uid
  sweep), and the output read so far is returned with a clear error line.

A warm pool keeps ``pool_size`` workers pre-started (namespaces set up, privileges dropped, the
fixed preamble imported) and blocked reading their code from stdin; a call hands its code to one,
collects the result, kills it and starts a replacement. With full isolation, workers are forked
from a **fork server**: a template interpreter (root, scrubbed environment, never runs model code)
that imported the preamble's modules once, so a worker costs a fork rather than an interpreter
boot plus the numpy import; forked workers re-seed ``random`` / ``numpy.random``. Without root
the sandbox still runs (each worker boots its own interpreter; process group + marker-variable
sweep, rlimits, ``python -I``, scrubbed env, host scratch directory removed afterwards) but warns
that network and filesystem are not isolated.

This file is also the worker program: ``python -I sandbox.py <json config>`` (one worker) or
``python -I sandbox.py --fork-server <json>`` (the template).
"""
from __future__ import annotations

import collections
import dataclasses
import fcntl
import functools
import json
import logging
import os
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Sequence

_LOG = logging.getLogger(__name__)

# Imported before the snippet runs (the reference prepends a fixed preamble of common stdlib
# modules and numpy). Modules only; the snippet's namespace gets these names.
DEFAULT_PREAMBLE = (
    "import math\nimport cmath\nimport itertools\nimport functools\nimport collections\n"
    "import fractions\nimport decimal\nimport statistics\nimport random\nimport re\n"
    "import heapq\nimport bisect\nimport string\nimport json\nimport operator\n"
    "from fractions import Fraction\nfrom decimal import Decimal\n"
    "from collections import Counter, defaultdict, deque\n"
    "from itertools import combinations, permutations, product\n"
    "from functools import lru_cache, reduce\n"
    "import numpy as np\nimport numpy\n"
)
WORLD_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
MARKER_VAR = "SPEAR_SANDBOX_ID"
_SCRATCH_IN_NAMESPACE = "/tmp/scratch"

# Linux constants (mount(2), prctl(2)).
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT = 1, 2, 4, 32
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_CLONE_NEWNS, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation settings of a ``Sandbox``.

    Attributes:
      timeout_s: wall-clock limit of one call (reference: 30 s).
      cpu_time_s: RLIMIT_CPU of the worker (SIGXCPU at the limit, SIGKILL one second later).
      memory_bytes: RLIMIT_AS of each process, and (where a memory cgroup can be created) the
        total of the snippet and its children (reference: 1 GB).
      max_processes: RLIMIT_NPROC for the worker's uid (processes and threads).
      max_file_bytes: RLIMIT_FSIZE, the largest file the snippet may write.
      max_open_files: RLIMIT_NOFILE.
      max_output_bytes: stdout + stderr bytes kept; the worker is killed when it writes more.
      max_code_bytes: longer code is rejected without running.
      tmpfs_bytes: size of each private tmpfs (scratch ``/tmp`` etc.) in the mount namespace.
      pool_size: number of worker slots (the most concurrent calls) kept warm.
      warm: keep ``pool_size`` workers pre-started; False starts each worker on demand (cold).
      fork_server: fork isolated workers from a template interpreter that has imported the
        preamble (a fork instead of an interpreter boot per worker); False boots each worker.
        Only used with full isolation (root + namespaces).
      preamble: Python source run before every snippet, in the snippet's namespace.
      uid_base: first uid of the per-slot unprivileged users (root only).
      require_isolation: raise instead of warning when namespaces / privilege drop are
        unavailable.
    """

    timeout_s: float = 30.0
    cpu_time_s: int = 30
    memory_bytes: int = 1 << 30
    max_processes: int = 32
    max_file_bytes: int = 16 << 20
    max_open_files: int = 256
    max_output_bytes: int = 1 << 20
    max_code_bytes: int = 1 << 20
    tmpfs_bytes: int = 64 << 20
    pool_size: int = 2
    warm: bool = True
    fork_server: bool = True
    preamble: str = DEFAULT_PREAMBLE
    uid_base: int = 61000
    require_isolation: bool = False

    def __post_init__(self):
        for name in ("timeout_s", "cpu_time_s", "memory_bytes", "max_processes", "max_file_bytes",
                     "max_open_files", "max_output_bytes", "max_code_bytes", "tmpfs_bytes",
                     "pool_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.uid_base < 1000:
            raise ValueError(f"SandboxConfig.uid_base must be >= 1000 (a non-system uid), got {self.uid_base}")


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one snippet.

    Attributes:
      status: "ok" (exit 0), "error" (uncaught exception / non-zero exit), "timeout" (wall
        clock), "cpu_limit", "killed" (by a signal, e.g. memory or process limits),
        "output_limit", or "rejected" (code not run).
      stdout, stderr: decoded output (invalid UTF-8 replaced), at most ``max_output_bytes``.
      exit_code: the worker's exit code (negative: killed by that signal), None if not run.
      duration_s: wall time from handing over the code to the end of the worker.
    """

    status: str
    stdout: str
    stderr: str
    exit_code: int | None
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def text(self) -> str:
        """What the model sees: stdout, then stderr, then a one-line error for abnormal ends."""
        parts = [p for p in (self.stdout, self.stderr) if p]
        note = _STATUS_NOTES.get(self.status)
        if self.status == "killed" and self.exit_code is None:
            note = "Error: the sandbox worker ended without reporting a result."
        if note is not None:
            parts.append(note.format(signal=_signal_name(self.exit_code)))
        return "\n".join(parts) if parts else "(no output)"


_STATUS_NOTES = {
    "timeout": "Error: execution timed out (wall-clock limit); the process was killed.",
    "cpu_limit": "Error: CPU time limit exceeded; the process was killed.",
    "killed": "Error: the process was killed by {signal} (a resource limit was exceeded).",
    "output_limit": "Error: output limit exceeded; the process was killed and output truncated.",
}


def _signal_name(exit_code: int | None) -> str:
    if exit_code is None or exit_code >= 0:
        return "a signal"
    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return f"signal {-exit_code}"


# --------------------------------------------------------------------------------------------
# Host capabilities.


@functools.lru_cache(maxsize=None)
def _namespaces_work() -> bool:
    """True when a worker can enter new network, PID and mount namespaces here (needs root).
    Probed once per process."""
    if os.geteuid() != 0:
        return False
    try:
        done = subprocess.run([sys.executable, "-I", os.path.abspath(__file__), "--probe"],
                              capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _processes_matching(uid: int | None, marker: str | None) -> list[int]:
    """Live (non-zombie) PIDs whose real uid is ``uid`` or whose environment has ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                status = f.read()
            state = status[status.index(b"\nState:") + 7:].split(None, 1)[0]
            if state in (b"Z", b"X"):
                continue
            if uid is not None and int(status[status.index(b"\nUid:") + 5:].split(None, 1)[0]) == uid:
                found.append(int(entry))
            elif marker is not None:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if f"{MARKER_VAR}={marker}".encode() in f.read():
                        found.append(int(entry))
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return found


def _kill_all(uid: int | None, marker: str | None, rounds: int = 50) -> None:
    """SIGKILLs every process of ``uid`` (or carrying ``marker``) until none is left."""
    for _ in range(rounds):
        pids = _processes_matching(uid, marker)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.002)
    _LOG.error("sandbox: processes of uid %s survived %d kill rounds", uid, rounds)


class _UidLease:
    """An exclusive claim on one sandbox uid, held as an flock'ed file for the owner's lifetime."""

    def __init__(self, uid_base: int, span: int = 1000):
        lock_dir = os.path.join(tempfile.gettempdir(), "spear-sandbox-uids")
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        for uid in range(uid_base, uid_base + span):
            fd = os.open(os.path.join(lock_dir, str(uid)), os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if _processes_matching(uid, None):  # used by something else on this host
                os.close(fd)
                continue
            self.uid, self._fd = uid, fd
            return
        raise RuntimeError(f"sandbox: no free uid in [{uid_base}, {uid_base + span})")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _MemoryCgroup:
    """A child memory cgroup (v1 or v2) of this process's own, capping a slot's total memory.

    RLIMIT_AS bounds each process; this bounds the snippet and all its children together (and
    the tmpfs pages they write), so ``max_processes`` processes cannot each take the limit.
    ``create`` returns None when the host does not let us create one (no root, read-only
    cgroupfs, v2 without the memory controller delegated).
    """

    def __init__(self, path: str, procs_file: str):
        self.path, self.procs_file = path, procs_file

    @classmethod
    def create(cls, name: str, limit_bytes: int) -> "_MemoryCgroup | None":
        try:
            with open("/proc/self/cgroup") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        for line in lines:
            _, controllers, own = line.split(":", 2)
            if "memory" in controllers.split(","):  # cgroup v1
                path = os.path.join("/sys/fs/cgroup/memory", own.lstrip("/"), name)
                limits = (("memory.limit_in_bytes", limit_bytes), ("memory.memsw.limit_in_bytes", limit_bytes))
                break
            if controllers == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # v2
                path = os.path.join("/sys/fs/cgroup", own.lstrip("/"), name)
                limits = (("memory.max", limit_bytes), ("memory.swap.max", 0))
                break
        else:
            return None
        try:
            os.makedirs(path, exist_ok=True)
            for filename, value in limits:
                if filename == limits[0][0] or os.path.exists(os.path.join(path, filename)):
                    with open(os.path.join(path, filename), "w") as f:
                        f.write(str(value))
        except OSError as err:
            _LOG.warning("sandbox: no memory cgroup (%s); memory is limited per process only", err)
            try:
                os.rmdir(path)
            except OSError:
                pass
            return None
        return cls(path, os.path.join(path, "cgroup.procs"))

    def remove(self) -> None:
        for _ in range(50):  # processes leave a cgroup shortly after they are reaped
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)
        _LOG.error("sandbox: could not remove cgroup %s", self.path)


# --------------------------------------------------------------------------------------------
# The host side: one worker process and the pool.


def _worker_environment(scratch: str, marker: str | None) -> dict:
    """The complete environment of a worker: nothing is inherited from the host."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
           "HOME": scratch, "TMPDIR": scratch, "OPENBLAS_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if marker is not None:
        env[MARKER_VAR] = marker
    return env


class _ForkServer:
    """A template interpreter (root, scrubbed environment) that has imported the preamble's
    modules and forks isolated workers on request, so a worker costs a fork instead of an
    interpreter boot plus numpy import. It never runs model code, so forked workers start from
    a clean state. Requests carry the worker's config and its stdio + status pipe ends
    (SCM_RIGHTS); the reply carries a pidfd of the forked supervisor (no pid-reuse races)."""

    def __init__(self, preamble: str):
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._lock = threading.Lock()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__), "--fork-server",
                 json.dumps({"sock_fd": theirs.fileno(), "preamble": preamble})],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=_worker_environment(_SCRATCH_IN_NAMESPACE, None), start_new_session=True,
                close_fds=True, pass_fds=(theirs.fileno(),), cwd="/")
        finally:
            theirs.close()

    def spawn(self, worker_cfg: dict, fds: Sequence[int]) -> int:
        """Forks a worker with ``fds`` = (stdin, stdout, stderr, status); returns its pidfd."""
        payload = json.dumps(worker_cfg).encode()
        with self._lock:
            socket.send_fds(self._sock, [len(payload).to_bytes(4, "big") + payload], list(fds))
            _, pidfds, _, _ = socket.recv_fds(self._sock, 16, 1)
        if len(pidfds) != 1:
            raise RuntimeError("sandbox fork server did not return a worker")
        return pidfds[0]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self._sock.close()  # the server exits on EOF
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Worker:
    """One started worker: a supervisor process whose child waits for its code on stdin.

    The supervisor (trusted, root) enters the namespaces, forks the child that runs the code,
    waits for it and writes its wait status to a private status pipe. The host reads stdout and
    stderr until that status arrives, so processes the snippet left behind holding the pipes
    cannot stall a call. The supervisor is forked by the ``_ForkServer`` when there is one, else
    started as its own interpreter; either way the host holds a pidfd to signal it safely.
    """

    def __init__(self, cfg: SandboxConfig, uid: int | None, isolated: bool,
                 fork_server: _ForkServer | None, cgroup_procs: str | None):
        self.uid = uid
        self._killed = False
        self.marker = None if uid is not None else uuid.uuid4().hex
        self.host_scratch = None if isolated else tempfile.mkdtemp(prefix="spear-sandbox-")
        scratch = _SCRATCH_IN_NAMESPACE if isolated else self.host_scratch
        stdin_r, self.stdin_fd = os.pipe()
        self.stdout_fd, stdout_w = os.pipe()
        self.stderr_fd, stderr_w = os.pipe()
        self.status_fd, status_w = os.pipe()
        worker_cfg = {
            "uid": uid, "isolated": isolated, "scratch": scratch, "preamble": cfg.preamble,
            "status_fd": status_w, "cgroup_procs": cgroup_procs, "cpu_time_s": cfg.cpu_time_s, "memory_bytes": cfg.memory_bytes,
            "max_processes": cfg.max_processes, "max_file_bytes": cfg.max_file_bytes,
            "max_open_files": cfg.max_open_files, "tmpfs_bytes": cfg.tmpfs_bytes,
        }
        self._popen = None
        try:
            if fork_server is not None:
                self._pidfd = fork_server.spawn(worker_cfg, (stdin_r, stdout_w, stderr_w, status_w))
            else:
                self._popen = subprocess.Popen(
                    [sys.executable, "-I", os.path.abspath(__file__), json.dumps(worker_cfg)],
                    stdin=stdin_r, stdout=stdout_w, stderr=stderr_w,
                    env=_worker_environment(scratch, self.marker), start_new_session=True,
                    close_fds=True, pass_fds=(status_w,), cwd="/")
                self._pidfd = os.pidfd_open(self._popen.pid)
        finally:
            for fd in (stdin_r, stdout_w, stderr_w, status_w):
                os.close(fd)

    def run(self, code: bytes, cfg: SandboxConfig) -> SandboxResult:
        """Sends ``code``, collects output until the child ends, the wall timeout or the output
        cap; then kills everything the worker started."""
        start = time.monotonic()
        deadline = start + cfg.timeout_s
        stdin_fd, stdout_fd, stderr_fd = self.stdin_fd, self.stdout_fd, self.stderr_fd
        out = {stdout_fd: bytearray(), stderr_fd: bytearray()}
        status, wait_status = None, b""
        pending = memoryview(code)
        os.set_blocking(stdin_fd, False)
        with selectors.DefaultSelector() as sel:
            sel.register(stdin_fd, selectors.EVENT_WRITE)
            for fd in (stdout_fd, stderr_fd, self.status_fd):
                sel.register(fd, selectors.EVENT_READ)
            child_done = False
            while status is None and not child_done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    status = "timeout"
                    break
                for key, _ in sel.select(remaining):
                    if key.fd == stdin_fd:
                        try:
                            pending = pending[os.write(stdin_fd, pending):]
                        except BrokenPipeError:  # the child stopped reading (it died)
                            pending = pending[len(pending):]
                        if not pending:
                            sel.unregister(stdin_fd)
                            os.close(stdin_fd)
                            self.stdin_fd = None
                    elif key.fd == self.status_fd:
                        chunk = os.read(self.status_fd, 4096)
                        wait_status += chunk
                        child_done = child_done or not chunk
                    elif not self._read_into(key.fd, out, sel, cfg):
                        status = "output_limit"
                        break
            if status is None:  # the child ended: take what is still buffered in the pipes
                for fd in (stdout_fd, stderr_fd):
                    os.set_blocking(fd, False)
                    while status is None and fd in sel.get_map():
                        try:
                            if not self._read_into(fd, out, sel, cfg):
                                status = "output_limit"
                        except BlockingIOError:
                            break
        duration = time.monotonic() - start
        self.kill()
        exit_code = _decode_wait_status(wait_status)
        if status is None:
            status = _status_from_exit(exit_code)
        stdout, stderr = (bytes(out[fd]).decode("utf-8", "replace") for fd in (stdout_fd, stderr_fd))
        return SandboxResult(status, stdout, stderr, exit_code, duration)

    @staticmethod
    def _read_into(fd: int, out: dict, sel: selectors.BaseSelector, cfg: SandboxConfig) -> bool:
        """Reads one chunk of ``fd`` into ``out``; False once the output cap is exceeded."""
        chunk = os.read(fd, 65536)
        if not chunk:
            sel.unregister(fd)
            return True
        total = sum(len(v) for v in out.values())
        out[fd] += chunk[:max(0, cfg.max_output_bytes - total)]
        return total + len(chunk) <= cfg.max_output_bytes

    def kill(self) -> None:
        """Kills the supervisor and every process of the worker's uid (or marker): escapees in
        new sessions included. The supervisor's PID-namespace init dies with it (parent-death
        signal) and takes the namespace's processes along. Idempotent."""
        if self._killed:
            return
        self._killed = True
        if self._popen is not None:  # its own session; the unreaped leader pins the group id
            try:
                os.killpg(self._popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _kill_all(self.uid, self.marker)
        select.select([self._pidfd], [], [], 5.0)  # readable once the supervisor has exited
        os.close(self._pidfd)
        if self._popen is not None:
            self._popen.wait()
        _kill_all(self.uid, self.marker)
        for fd in (self.stdin_fd, self.stdout_fd, self.stderr_fd, self.status_fd):
            if fd is not None:
                os.close(fd)
        self.stdin_fd = self.stdout_fd = self.stderr_fd = self.status_fd = None
        if self.host_scratch is not None:
            shutil.rmtree(self.host_scratch, ignore_errors=True)
            self.host_scratch = None


def _decode_wait_status(raw: bytes) -> int | None:
    """The child's exit code (negative: killed by that signal) from the supervisor's report."""
    try:
        return int(raw.decode().strip())
    except ValueError:
        return None


def _status_from_exit(exit_code: int | None) -> str:
    if exit_code is None:
        return "killed"
    if exit_code == -signal.SIGXCPU:
        return "cpu_limit"
    if exit_code < 0:
        return "killed"
    return "ok" if exit_code == 0 else "error"


class Sandbox:
    """Executes Python snippets in isolated, throw-away workers (see module docstring).

    Thread-safe: up to ``pool_size`` calls run concurrently; more wait for a free slot.
    Use as a context manager or call ``close()``.
    """

    _closed = True  # until __init__ has started the pool

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        self.isolated = _namespaces_work()
        self.drops_privileges = os.geteuid() == 0
        if not (self.isolated and self.drops_privileges):
            missing = ", ".join(n for n, ok in (("namespaces (root)", self.isolated),
                                                ("privilege drop (root)", self.drops_privileges))
                                if not ok)
            message = (f"SANDBOX IS NOT ISOLATED: {missing} unavailable. Model code will run with "
                       "network access and the current user's filesystem rights.")
            if self.config.require_isolation:
                raise RuntimeError(message)
            _LOG.warning(message)
            print(f"WARNING: {message}", file=sys.stderr)
        self._leases = ([_UidLease(self.config.uid_base) for _ in range(self.config.pool_size)]
                        if self.drops_privileges else [])
        self._cgroups = ([_MemoryCgroup.create(f"spear-sandbox-{lease.uid}", self.config.memory_bytes)
                          for lease in self._leases] if self.drops_privileges else [])
        self.limits_total_memory = bool(self._cgroups) and all(self._cgroups)
        self._free_slots = collections.deque(range(self.config.pool_size))  # round robin
        self._warm: dict[int, _Worker] = {}
        self._cond = threading.Condition()
        self._server_lock = threading.Lock()
        self._fork_server = None
        self.uses_fork_server = self.config.fork_server and self.isolated and self.drops_privileges
        self._closed = False
        if self.config.warm:
            for slot in self._free_slots:
                self._warm[slot] = self._start(slot)

    def _server(self) -> _ForkServer | None:
        """The fork server, (re)started when needed; None when workers boot their own
        interpreter (no isolation, or ``fork_server=False``)."""
        if not self.uses_fork_server:
            return None
        with self._server_lock:
            if self._fork_server is None or not self._fork_server.alive():
                if self._fork_server is not None:
                    _LOG.warning("sandbox fork server died; restarting it")
                    self._fork_server.close()
                self._fork_server = _ForkServer(self.config.preamble)
            return self._fork_server

    def _start(self, slot: int) -> _Worker:
        uid = self._leases[slot].uid if self._leases else None
        cgroup = self._cgroups[slot] if self._cgroups else None
        procs_file = cgroup.procs_file if cgroup is not None else None
        try:
            return _Worker(self.config, uid, self.isolated, self._server(), procs_file)
        except (OSError, RuntimeError) as err:
            if not self.uses_fork_server:
                raise
            _LOG.warning("sandbox: starting a worker failed (%s); restarting the fork server", err)
            with self._server_lock:
                if self._fork_server is not None:
                    self._fork_server.close()
                    self._fork_server = None
            return _Worker(self.config, uid, self.isolated, self._server(), procs_file)

    def run(self, code: str) -> SandboxResult:
        """Runs ``code`` in a fresh worker and returns its result. Never raises on bad code."""
        if not isinstance(code, str):
            return SandboxResult("rejected", "", f"Error: code must be a string, got {type(code).__name__}.", None, 0.0)
        encoded = code.encode("utf-8", "replace")
        if len(encoded) > self.config.max_code_bytes:
            return SandboxResult("rejected", "", f"Error: code is {len(encoded)} bytes, more than "
                                 f"the limit of {self.config.max_code_bytes}.", None, 0.0)
        with self._cond:
            while not self._free_slots:
                if self._closed:
                    raise RuntimeError("Sandbox is closed")
                self._cond.wait()
            if self._closed:
                raise RuntimeError("Sandbox is closed")
            slot = self._free_slots.popleft()
            worker = self._warm.pop(slot, None)
        try:
            if worker is None:
                worker = self._start(slot)
            return worker.run(encoded, self.config)
        finally:
            if worker is not None:
                worker.kill()
            with self._cond:
                if self.config.warm and not self._closed:
                    try:
                        self._warm[slot] = self._start(slot)
                    except (OSError, RuntimeError) as err:  # the next call starts one on demand
                        _LOG.error("sandbox: could not start a warm worker: %s", err)
                self._free_slots.append(slot)
                self._cond.notify()

    def close(self) -> None:
        """Kills all warm workers and releases the slot uids."""
        with self._cond:
            self._closed = True
            workers, self._warm = list(self._warm.values()), {}
            self._cond.notify_all()
        for worker in workers:
            worker.kill()
        with self._server_lock:
            if self._fork_server is not None:
                self._fork_server.close()
                self._fork_server = None
        for cgroup in self._cgroups:
            if cgroup is not None:
                cgroup.remove()
        for lease in self._leases:
            lease.release()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not self._closed:
            self.close()


# --------------------------------------------------------------------------------------------
# The worker side (runs as ``python -I sandbox.py <json>``; stdlib only, nothing from the repo).


def _libc():
    import ctypes
    return ctypes.CDLL(None, use_errno=True)


def _mount(libc, source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    import ctypes
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source!r} on {target!r}: {os.strerror(err)}")


def _untraversable_ancestors(paths: Sequence[str]) -> dict[str, list[str]]:
    """Topmost directory above each path that others cannot traverse (mode o-x) -> the paths."""
    hidden: dict[str, list[str]] = {}
    for path in paths:
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts) + 1):
            ancestor = "/" + "/".join(parts[:depth])
            if not os.stat(ancestor).st_mode & 0o001:
                hidden.setdefault(ancestor, []).append(path)
                break
    return hidden


def _isolate_filesystem(cfg: dict) -> None:
    """In the private mount namespace: tmpfs over world-writable and non-traversable dirs."""
    libc = _libc()
    size = f"size={cfg['tmpfs_bytes']}"
    for directory in WORLD_WRITABLE_DIRS:
        if os.path.isdir(directory) and not os.path.islink(directory):
            _mount(libc, "tmpfs", directory, "tmpfs", _MS_NOSUID | _MS_NODEV, f"mode=1777,{size}")
    needed = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                   os.path.dirname(os.path.realpath(sys.executable)))})
    for ancestor, paths in _untraversable_ancestors(needed).items():
        fds = {p: os.open(p, os.O_PATH) for p in paths}
        _mount(libc, "tmpfs", ancestor, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
        for path, fd in fds.items():
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(libc, f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC, None)
            _mount(libc, None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY, None)
            os.close(fd)
    os.mkdir(cfg["scratch"], 0o700)


def _drop_privileges(cfg: dict) -> None:
    import resource
    if cfg["cgroup_procs"] is not None:  # at the cgroup's limit the snippet's processes die first
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    uid = cfg["uid"]
    if uid is not None:
        os.chown(cfg["scratch"], uid, uid)
    os.chdir(cfg["scratch"])
    limits = {resource.RLIMIT_CPU: (cfg["cpu_time_s"], cfg["cpu_time_s"] + 1),
              resource.RLIMIT_AS: (cfg["memory_bytes"],) * 2,
              resource.RLIMIT_NPROC: (cfg["max_processes"],) * 2,
              resource.RLIMIT_FSIZE: (cfg["max_file_bytes"],) * 2,
              resource.RLIMIT_NOFILE: (cfg["max_open_files"],) * 2,
              resource.RLIMIT_CORE: (0, 0)}
    for which, limit in limits.items():
        resource.setrlimit(which, limit)
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    libc = _libc()
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the uid change cleared it


def _enter_namespaces() -> None:
    """New mount, network and PID namespaces (the next fork becomes PID 1 of the latter)."""
    import ctypes
    libc = _libc()
    if libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE, None)  # no mount leaks to the host


def _run_snippet(cfg: dict) -> int:
    """The sandboxed child: drop privileges, run the preamble, read and run the code."""
    import linecache
    import traceback
    _drop_privileges(cfg)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(cfg["preamble"], "<preamble>", "exec"), namespace)
    code = sys.stdin.buffer.read().decode("utf-8", "replace")
    sys.stdin.close()
    try:
        exec(compile(code, "<code>", "exec"), namespace)
    except SystemExit:
        raise
    except BaseException as err:  # the snippet's own error: report it like a script would
        sys.stdout.flush()
        linecache.cache["<code>"] = (len(code), None, code.splitlines(True), "<code>")
        # tb_next skips this function's frame: the model sees only its own code's frames.
        sys.stderr.write("".join(traceback.format_exception(type(err), err, err.__traceback__.tb_next)))
        return 1
    return 0


def _run_and_report(cfg: dict) -> None:
    """Forks the snippet's process, waits for it and writes its exit code (negative: killed by
    that signal) to the status pipe."""
    status_fd = cfg["status_fd"]
    pid = os.fork()
    if pid == 0:
        os.close(status_fd)
        code = 1
        try:
            code = _run_snippet(cfg)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code & 0xFF)
    _, wait_status = os.waitpid(pid, 0)
    code = (-os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status)
            else os.WEXITSTATUS(wait_status))
    os.write(status_fd, str(code).encode())


def _supervise(cfg: dict) -> None:
    """The worker's main process. Isolated: enter the namespaces and fork the PID namespace's
    init, which runs and reports the snippet (the snippet is not PID 1, so kernel signals such
    as SIGXCPU keep their default action; when the init exits, the kernel kills whatever the
    snippet left in the namespace). Otherwise: run and report the snippet directly."""
    if cfg["cgroup_procs"] is not None:
        with open(cfg["cgroup_procs"], "w") as f:
            f.write(str(os.getpid()))
    if not cfg["isolated"]:
        _run_and_report(cfg)
        return
    _enter_namespaces()
    _isolate_filesystem(cfg)
    init_pid = os.fork()
    if init_pid == 0:
        _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        try:
            _run_and_report(cfg)
        finally:
            os._exit(0)
    os.close(cfg["status_fd"])
    os.waitpid(init_pid, 0)


def _reseed_random_modules() -> None:
    """Forked workers would share the template's random state: draw fresh seeds."""
    if "random" in sys.modules:
        sys.modules["random"].seed()
    if "numpy.random" in sys.modules:
        sys.modules["numpy.random"].seed()


def _fork_server_main(cfg: dict) -> None:
    """The template: import the preamble's modules, then fork one worker per request."""
    sock = socket.socket(fileno=cfg["sock_fd"])
    exec(compile(cfg["preamble"], "<preamble>", "exec"), {"__name__": "__preamble__"})

    def reap(*_):
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass

    signal.signal(signal.SIGCHLD, reap)
    while True:
        header, fds, _, _ = socket.recv_fds(sock, 4, 4)
        while header and len(header) < 4:
            header += sock.recv(4 - len(header))
        if len(header) < 4 or len(fds) != 4:
            return  # the host closed the socket (or broke the protocol)
        size, payload = int.from_bytes(header, "big"), b""
        while len(payload) < size:
            chunk = sock.recv(size - len(payload))
            if not chunk:
                return
            payload += chunk
        worker_cfg = json.loads(payload)
        # SIGCHLD blocked until the pidfd exists, so a child that dies at once is not reaped
        # (and its pid reused) before the pidfd pins it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        pid = os.fork()
        if pid == 0:
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                os.setsid()
                for target, fd in enumerate(fds[:3]):
                    os.dup2(fd, target)
                worker_cfg["status_fd"] = fds[3]
                os.closerange(3, fds[3])
                os.closerange(fds[3] + 1, 65536)
                _reseed_random_modules()
                _supervise(worker_cfg)
            except BaseException:  # a failure of the sandbox itself: say so on stderr
                import traceback
                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(0)
        pidfd = os.pidfd_open(pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        socket.send_fds(sock, [b"ok"], [pidfd])
        for fd in (*fds, pidfd):
            os.close(fd)


def _probe() -> int:
    """Exit 0 iff namespaces, the private mounts and the fork into them work here."""
    _enter_namespaces()
    _mount(_libc(), "tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m")
    pid = os.fork()
    if pid == 0:
        os._exit(0 if os.getpid() == 1 else 1)
    return os.WEXITSTATUS(os.waitpid(pid, 0)[1])


if __name__ == "__main__":
    if sys.argv[1] == "--probe":
        sys.exit(_probe())
    if sys.argv[1] == "--fork-server":
        _fork_server_main(json.loads(sys.argv[2]))
        sys.exit(0)
    _supervise(json.loads(sys.argv[1]))
