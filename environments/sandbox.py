"""Runs model-written Python in an isolated, resource-limited, throw-away process.

Model code is hostile input. Every snippet runs in its own fresh interpreter ("worker") that
is discarded afterwards, so no snippet ever sees state left by another one. Containment layers
(each degrades loudly, never silently, when the host cannot provide it):

* **Namespaces** (root, ``unshare(2)``): a new network namespace (only a downed loopback:
  no network at all, not even the host's localhost services), a new IPC namespace (SysV shared
  memory, semaphores and message queues are private to the call and die with it), a new PID
  namespace (its PID 1 is a small trusted reaper that mounts a fresh ``/proc``, runs the snippet
  as its child and reports its exit status; when it exits or is killed, the kernel kills every
  process left in the namespace, including ones that escaped with ``setsid``) and a new mount
  namespace.
* **A minimal root** (``pivot_root``): a fresh tmpfs holding only read-only binds of the system
  programs and libraries (``SYSTEM_PATHS``) and of the interpreter's own directories (prefixes,
  executable directory, ``sys.path``), wherever they live (venv, conda, pyenv, under ``/tmp``
  or a home directory); a ``/dev`` with ``null``, ``zero``, ``random``, ``urandom`` and a
  private ``/dev/shm``; a private size-limited ``/tmp`` holding the scratch directory; a
  ``/proc`` that shows only the snippet's own processes (``hidepid``, ``subset=pid``). Nothing
  else of the host exists inside: not this project's checkout or data, not ``/home``,
  ``/root``, ``/run`` (host sockets), ``/sys``, ``/var``, ``/etc/passwd``. A checkout that lies
  inside a bound directory (system Python with the checkout under ``/usr``) is covered by an
  empty tmpfs.
* **seccomp** (x86_64, aarch64; fails closed elsewhere): the snippet may not create namespaces
  (user namespaces above all), mount, use keyrings (not namespaced: a key would outlive the
  call), ptrace, eBPF, perf, io_uring, kernel modules or other administration syscalls.
* **Privilege drop** (root): the snippet runs under a dedicated unprivileged uid/gid per worker
  slot (``uid_base + slot``, allocated across processes with lock files), no supplementary
  groups, ``no_new_privs``. It cannot write the repository or anything root owns, cannot read
  other processes' environments, and ``RLIMIT_NPROC`` (not enforced for uid 0) bounds its
  process count. Every process of that uid is SIGKILLed after each call (``/proc`` scan), which
  catches escapees even without a PID namespace.
* **rlimits**: CPU seconds, address space, process count, file size, open files, no core dumps.
* **Slot cgroups** (root, cgroup v1 or delegated v2): each slot has child memory and CPU cgroups
  of this process's own. Memory is limited to ``memory_bytes`` for the snippet *and all its
  children* (RLIMIT_AS alone would allow ``max_processes`` x ``memory_bytes``); the snippet's
  processes carry ``oom_score_adj`` 1000 so the kernel's OOM killer takes them first. CPU is
  capped at ``cpu_cores`` cores and the host ends a call once all its processes together used
  ``cpu_time_s`` CPU-seconds (RLIMIT_CPU alone counts per process). Without them (warned)
  memory and CPU are limited per process only.
* ``python -I`` (no user site, no ``PYTHON*`` variables, script dir not on ``sys.path``), a
  scrubbed environment (only ``PATH``, locale, ``HOME``/``TMPDIR`` = scratch and single-thread
  BLAS settings; nothing from the host), stdin closed after the code.
* Wall-clock timeout and an output cap: the worker's process group is SIGKILLed (plus the uid
  sweep), and the output read so far is returned with a clear error line.

A failure of the sandbox's own set-up is reported to the host on a private pipe (logged, status
``sandbox_error``), never on the snippet's output; the constructor runs one snippet through the
full isolation and raises with that error if it cannot run. A snippet whose error cannot be
formatted (no memory, ``traceback`` or stderr tampered with) still ends with a clear error text.

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
import stat
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
MARKER_VAR = "SPEAR_SANDBOX_ID"
_SCRATCH_IN_NAMESPACE = "/tmp/scratch"
# The worker's private root holds read-only binds of these host paths (where they exist; a
# symlink is recreated as a symlink) plus the interpreter's own directories: system programs
# and shared libraries, and the dynamic linker's configuration. Nothing else of the host.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache",
                "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives")
DEVICES = ("null", "zero", "random", "urandom")
# Exit status of a snippet process whose set-up (privilege drop, seccomp, preamble) failed.
_SETUP_FAILED = 125
_CPU_POLL_S = 0.05  # how often the host checks a call's total CPU time

# Linux constants (mount(2), umount2(2), prctl(2), seccomp(2), clone(2)).
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_MNT_DETACH = 2
_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
_CLONE_NEWUTS, _CLONE_NEWUSER, _CLONE_NEWCGROUP = 0x04000000, 0x10000000, 0x02000000
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
_SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_TSYNC = 1, 1
_SECCOMP_RET_KILL_PROCESS, _SECCOMP_RET_ERRNO, _SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_EPERM, _ENOSYS = 1, 38

# Syscalls the snippet may not make (EPERM): new namespaces (user namespaces above all) and
# mounts, keyrings (not namespaced: a key would outlive the call), tracing, eBPF, perf,
# io_uring, kernel modules, and other administration calls it has no use for. ``clone`` is
# allowed without namespace flags; ``clone3`` (whose flags live in memory, out of the filter's
# reach) fails with ENOSYS so the C library falls back to ``clone``.
_DENIED_SYSCALLS = (
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "keyctl", "add_key", "request_key", "ptrace",
    "process_vm_readv", "process_vm_writev", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "open_by_handle_at", "name_to_handle_at", "swapon", "swapoff",
    "reboot", "acct", "quotactl", "syslog", "lookup_dcookie", "vhangup", "sethostname", "setdomainname")
_SYSCALL_NAMES = ("clone", "clone3", "seccomp") + _DENIED_SYSCALLS
# platform.machine() -> (AUDIT_ARCH_*, the numbers of _SYSCALL_NAMES in order).
_SYSCALL_TABLES = {
    "x86_64": (0xC000003E, (56, 435, 317, 272, 308, 165, 166, 155, 161, 428, 429, 430, 431, 432, 433, 442,
                            250, 248, 249, 101, 310, 311, 321, 298, 323, 425, 426, 427, 246, 320, 175, 313,
                            176, 304, 303, 167, 168, 169, 163, 179, 103, 212, 153, 170, 171)),
    "aarch64": (0xC00000B7, (220, 435, 277, 97, 268, 40, 39, 41, 51, 428, 429, 430, 431, 432, 433, 442,
                             219, 217, 218, 117, 270, 271, 280, 241, 282, 425, 426, 427, 104, 294, 105, 273,
                             106, 265, 264, 224, 225, 142, 89, 60, 116, 18, 58, 161, 162)),
}
_X32_SYSCALL_BIT = 0x40000000


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation settings of a ``Sandbox``.

    Attributes:
      timeout_s: wall-clock limit of one call (reference: 30 s).
      cpu_time_s: CPU-seconds one call may use: RLIMIT_CPU of each process (SIGXCPU at the
        limit, SIGKILL one second later) and, where the slot has a CPU cgroup, the total of the
        snippet and all its children (the call is killed as ``cpu_limit`` when it is reached).
      cpu_cores: CPU bandwidth of one call, in cores, for the snippet and all its children
        together (the slot's CPU cgroup quota); without a CPU cgroup only ``cpu_time_s`` per
        process applies.
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
    cpu_cores: float = 1.0
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
        for name in ("timeout_s", "cpu_time_s", "cpu_cores", "memory_bytes", "max_processes", "max_file_bytes",
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
        "output_limit", "rejected" (code not run) or "sandbox_error" (the sandbox itself failed
        to set the worker up; the details go to the host's log, never to the model).
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
        if self.status == "error" and not self.stderr.strip():  # e.g. stderr closed, or no memory
            note = f"Error: the program exited with status {self.exit_code} and no error message."
        if note is not None:
            parts.append(note.format(signal=_signal_name(self.exit_code)))
        return "\n".join(parts) if parts else "(no output)"


_STATUS_NOTES = {
    "timeout": "Error: execution timed out (wall-clock limit); the process was killed.",
    "cpu_limit": "Error: CPU time limit exceeded; the process was killed.",
    "killed": "Error: the process was killed by {signal} (a resource limit was exceeded).",
    "output_limit": "Error: output limit exceeded; the process was killed and output truncated.",
    "sandbox_error": "Error: the sandbox failed to start the program (an internal error, not the code's fault).",
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


def _cgroup_parents() -> dict[str, tuple[str, int]]:
    """controller ("memory", "cpu", "cpuacct") -> (this process's own cgroup directory in that
    controller's hierarchy, cgroup version). v1 hierarchies win; the v2 one serves the rest."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    parents, unified = {}, None
    for line in lines:
        _, controllers, own = line.split(":", 2)
        if controllers == "":
            unified = own
        for controller in controllers.split(","):
            for mount in (controllers, controller):
                if controller in ("memory", "cpu", "cpuacct") and os.path.isdir(f"/sys/fs/cgroup/{mount}"):
                    parents.setdefault(controller, (os.path.join("/sys/fs/cgroup", mount, own.lstrip("/")), 1))
    v2_root = "/sys/fs/cgroup"
    if unified is not None and os.path.exists(os.path.join(v2_root, "cgroup.controllers")):
        for controller in ("memory", "cpu"):
            parents.setdefault(controller, (os.path.join(v2_root, unified.lstrip("/")), 2))
    return parents


def _cgroup_limits(controller: str, version: int, memory_bytes: int, cpu_cores: float) -> tuple:
    """(file, value, required) to write into a slot's cgroup of ``controller``."""
    period = 100_000
    quota = max(1000, int(cpu_cores * period))
    return {("memory", 1): (("memory.limit_in_bytes", memory_bytes, True),
                            ("memory.memsw.limit_in_bytes", memory_bytes, False)),
            ("memory", 2): (("memory.max", memory_bytes, True), ("memory.swap.max", 0, False)),
            ("cpu", 1): (("cpu.cfs_period_us", period, True), ("cpu.cfs_quota_us", quota, True)),
            ("cpu", 2): (("cpu.max", f"{quota} {period}", True),),
            ("cpuacct", 1): ()}[(controller, version)]


class _SlotCgroups:
    """The cgroups of one worker slot (children of this process's own, v1 or v2): memory caps
    the snippet and all its children together (and the tmpfs pages they write), so
    ``max_processes`` processes cannot each take the limit; cpu caps their bandwidth at
    ``cpu_cores``; the CPU usage counter lets the host end a call at ``cpu_time_s`` CPU-seconds
    summed over all its processes. A controller that cannot be set up here (no root, read-only
    cgroupfs, v2 without delegation) is left out; ``limits_memory`` / ``limits_cpu`` say which
    layers are active.
    """

    def __init__(self, dirs: dict[str, str], usage_file: str | None):
        self.dirs, self.usage_file = dirs, usage_file
        self.procs_files = sorted({os.path.join(d, "cgroup.procs") for d in dirs.values()})
        self.limits_memory = "memory" in dirs
        self.limits_cpu = "cpu" in dirs and usage_file is not None

    @classmethod
    def create(cls, name: str, memory_bytes: int, cpu_cores: float) -> "_SlotCgroups":
        dirs = {}
        for controller, (parent, version) in _cgroup_parents().items():
            path = os.path.join(parent, name)
            try:
                if version == 2:
                    cls._delegate(parent, controller)
                os.makedirs(path, exist_ok=True)
                for filename, value, required in _cgroup_limits(controller, version, memory_bytes, cpu_cores):
                    if required or os.path.exists(os.path.join(path, filename)):
                        with open(os.path.join(path, filename), "w") as f:
                            f.write(str(value))
                dirs[controller] = path
            except OSError as err:
                _LOG.warning("sandbox: no %s cgroup (%s); %s is limited per process only", controller, err,
                             "memory" if controller == "memory" else "CPU")
                if path not in dirs.values():
                    _remove_cgroup(path, rounds=1)
        usage = None
        if "cpuacct" in dirs:
            usage = os.path.join(dirs["cpuacct"], "cpuacct.usage")
        elif "cpu" in dirs and os.path.exists(os.path.join(dirs["cpu"], "cpu.stat")):
            usage = os.path.join(dirs["cpu"], "cpu.stat")
        return cls(dirs, usage)

    @staticmethod
    def _delegate(parent: str, controller: str) -> None:
        """cgroup v2: enables ``controller`` for the children of ``parent`` (if not yet)."""
        with open(os.path.join(parent, "cgroup.subtree_control")) as f:
            if controller in f.read().split():
                return
        with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
            f.write(f"+{controller}")

    def cpu_seconds(self) -> float | None:
        """CPU time used by every process that has been in the slot's cgroup (None: unknown)."""
        if self.usage_file is None:
            return None
        try:
            with open(self.usage_file) as f:
                text = f.read()
        except OSError:
            return None
        if self.usage_file.endswith("cpuacct.usage"):
            return int(text) / 1e9
        return int(text.split("usage_usec", 1)[1].split()[0]) / 1e6

    def remove(self) -> None:
        for path in set(self.dirs.values()):
            _remove_cgroup(path)


def _remove_cgroup(path: str, rounds: int = 50) -> None:
    for _ in range(rounds):  # processes leave a cgroup shortly after they are reaped
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
    if rounds > 1:
        _LOG.error("sandbox: could not remove cgroup %s", path)


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
                 fork_server: _ForkServer | None, cgroups: _SlotCgroups | None):
        self.uid, self.cgroups = uid, cgroups
        self._killed = False
        self.failure = None  # the sandbox's own set-up error, if the worker reported one
        self.marker = None if uid is not None else uuid.uuid4().hex
        self.host_scratch = None if isolated else tempfile.mkdtemp(prefix="spear-sandbox-")
        scratch = _SCRATCH_IN_NAMESPACE if isolated else self.host_scratch
        stdin_r, self.stdin_fd = os.pipe()
        self.stdout_fd, stdout_w = os.pipe()
        self.stderr_fd, stderr_w = os.pipe()
        self.status_fd, status_w = os.pipe()
        worker_cfg = {
            "uid": uid, "isolated": isolated, "scratch": scratch, "preamble": cfg.preamble,
            "status_fd": status_w, "cgroup_procs": cgroups.procs_files if cgroups is not None else [],
            "oom_first": cgroups is not None and cgroups.limits_memory,
            "cpu_time_s": cfg.cpu_time_s, "memory_bytes": cfg.memory_bytes,
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
        """Sends ``code``, collects output until the child ends, the wall timeout, the call's
        CPU budget or the output cap; then kills everything the worker started."""
        start = time.monotonic()
        stdout_fd, stderr_fd = self.stdout_fd, self.stderr_fd
        out = {stdout_fd: bytearray(), stderr_fd: bytearray()}
        status, report = self._exchange(memoryview(code), out, cfg, start + cfg.timeout_s)
        duration = time.monotonic() - start
        self.kill()
        exit_code, self.failure = _decode_report(report)
        if self.failure is not None:
            _LOG.error("sandbox: a worker failed to set up:\n%s", self.failure)
            status = status or "sandbox_error"
        status = status or _status_from_exit(exit_code)
        stdout, stderr = (bytes(out[fd]).decode("utf-8", "replace") for fd in (stdout_fd, stderr_fd))
        return SandboxResult(status, stdout, stderr, exit_code, duration)

    def _exchange(self, pending: memoryview, out: dict, cfg: SandboxConfig, deadline: float):
        """Writes the code and reads output and the status report until the report ends; returns
        (status if the call was cut short, else None; the report's bytes)."""
        stdin_fd, status_fd, status, report = self.stdin_fd, self.status_fd, None, b""
        cgroups = self.cgroups if self.cgroups is not None and self.cgroups.limits_cpu else None
        cpu_start = cgroups.cpu_seconds() if cgroups is not None else None
        os.set_blocking(stdin_fd, False)
        with selectors.DefaultSelector() as sel:
            sel.register(stdin_fd, selectors.EVENT_WRITE)
            for fd in (*out, status_fd):
                sel.register(fd, selectors.EVENT_READ)
            while status is None and status_fd in sel.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    status = "timeout"
                elif cpu_start is not None and cgroups.cpu_seconds() - cpu_start > cfg.cpu_time_s:
                    status = "cpu_limit"
                wait = remaining if cpu_start is None else min(remaining, _CPU_POLL_S)
                for key, _ in sel.select(wait) if status is None else ():
                    if key.fd == stdin_fd:
                        try:
                            pending = pending[os.write(stdin_fd, pending):]
                        except BrokenPipeError:  # the child stopped reading (it died)
                            pending = pending[len(pending):]
                        if not pending:
                            sel.unregister(stdin_fd)
                            os.close(stdin_fd)
                            self.stdin_fd = None
                    elif key.fd == status_fd:
                        chunk = os.read(status_fd, 65536)
                        report += chunk
                        if not chunk:
                            sel.unregister(status_fd)
                    elif not self._read_into(key.fd, out, sel, cfg):
                        status = "output_limit"
                        break
            if status is None:  # the child ended: take what is still buffered in the pipes
                status = self._drain(out, sel, cfg)
        return status, report

    def _drain(self, out: dict, sel: selectors.BaseSelector, cfg: SandboxConfig) -> str | None:
        """Reads what is left in the output pipes without blocking; "output_limit" or None."""
        for fd in out:
            os.set_blocking(fd, False)
            while fd in sel.get_map():
                try:
                    if not self._read_into(fd, out, sel, cfg):
                        return "output_limit"
                except BlockingIOError:
                    break
        return None

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


def _decode_report(raw: bytes) -> tuple[int | None, str | None]:
    """(the child's exit code, negative: killed by that signal; the sandbox's own set-up error)
    from the status pipe: ``E:`` + the error + a NUL byte if set-up failed, then the exit code."""
    failure = None
    if raw.startswith(b"E:"):
        failure, _, raw = raw[2:].partition(b"\0")
        failure = failure.decode("utf-8", "replace")
    try:
        return int(raw.decode().strip()), failure
    except ValueError:
        return None, failure


def _status_from_exit(exit_code: int | None) -> str:
    if exit_code is None:
        return "killed"
    if exit_code == -signal.SIGXCPU:
        return "cpu_limit"
    if exit_code < 0:
        return "killed"
    return "ok" if exit_code == 0 else "error"


_SELF_TESTED: set = set()


class Sandbox:
    """Executes Python snippets in isolated, throw-away workers (see module docstring).

    Thread-safe: up to ``pool_size`` calls run concurrently; more wait for a free slot.
    Use as a context manager or call ``close()``.
    """

    _closed = True  # until __init__ has started the pool
    _last_failure = None  # the latest set-up error a worker reported (also logged)

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
        self._cgroups = [_SlotCgroups.create(f"spear-sandbox-{lease.uid}", self.config.memory_bytes,
                                             self.config.cpu_cores) for lease in self._leases]
        self.limits_total_memory = bool(self._cgroups) and all(c.limits_memory for c in self._cgroups)
        self.limits_total_cpu = bool(self._cgroups) and all(c.limits_cpu for c in self._cgroups)
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
        self._self_test()

    def _self_test(self) -> None:
        """Runs one snippet through the worker's full set-up (once per interpreter, preamble and
        worker kind in this process) and raises, with the worker's set-up error, if it cannot run."""
        key = (sys.executable, self.config.preamble, self.isolated, self.uses_fork_server)
        if key in _SELF_TESTED:
            return
        result = self.run("print('sandbox self-test')")
        if result.stdout != "sandbox self-test\n":
            detail = self._last_failure or f"status {result.status}: {result.text()}"
            self.close()
            raise RuntimeError(
                f"sandbox: a worker cannot run code with the interpreter {sys.executable} "
                f"(prefix {sys.prefix}): {detail}\nEvery call would fail; fix the set-up error above "
                "(the sandbox's own set-up failed, not the snippet).")
        _SELF_TESTED.add(key)

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
        cgroups = self._cgroups[slot] if self._cgroups else None
        try:
            return _Worker(self.config, uid, self.isolated, self._server(), cgroups)
        except (OSError, RuntimeError) as err:
            if not self.uses_fork_server:
                raise
            _LOG.warning("sandbox: starting a worker failed (%s); restarting the fork server", err)
            with self._server_lock:
                if self._fork_server is not None:
                    self._fork_server.close()
                    self._fork_server = None
            return _Worker(self.config, uid, self.isolated, self._server(), cgroups)

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
            result = worker.run(encoded, self.config)
            if worker.failure is not None:
                self._last_failure = worker.failure
            return result
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
        for cgroups in self._cgroups:
            cgroups.remove()
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


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _mirror(path: str, links: dict, binds: set, depth: int = 0) -> None:
    """Records how host ``path`` becomes reachable under the same name in the new root: each
    symlink on the way is recreated (``links``: link -> target, then resolution continues at the
    target) and the fully resolved directory or file is bound (``binds``)."""
    if depth > 40:
        raise OSError(f"too many levels of symbolic links resolving {path}")
    resolved, parts = "/", [p for p in os.path.normpath(path).split("/") if p]
    for i, part in enumerate(parts):
        here = os.path.join(resolved, part)
        if os.path.islink(here):
            links[here] = os.readlink(here)
            target = os.path.normpath(os.path.join(resolved, links[here]))
            _mirror(os.path.join(target, *parts[i + 1:]), links, binds, depth + 1)
            return
        resolved = here
    if os.path.exists(resolved):
        binds.add(resolved)


@functools.lru_cache(maxsize=None)
def _root_plan() -> tuple[tuple, tuple, tuple]:
    """What a worker's new root holds: (symlinks as (path, target), host paths bound read-only,
    directories hidden under an empty tmpfs). Computed once per interpreter (the fork server's
    workers inherit it). Bound: ``SYSTEM_PATHS`` and the interpreter's own directories (its
    prefixes, executable directory and ``sys.path``, minus entries of this project's checkout).
    The checkout (data, answers, code) is hidden if a bound directory contains it."""
    project = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                os.path.dirname(sys.executable)}
    real_prefixes = [os.path.realpath(p) for p in prefixes]
    on_path = {p for p in sys.path if p and os.path.exists(p)
               and (any(_within(os.path.realpath(p), r) for r in real_prefixes)
                    or not (_within(os.path.realpath(p), project) or _within(project, os.path.realpath(p))))}
    links, binds = {}, set()
    for path in (*SYSTEM_PATHS, *sorted(prefixes | on_path)):
        _mirror(path, links, binds)
    kept = []
    for path in sorted(binds):  # a bind inside another one on the same filesystem is redundant
        outer = next((k for k in kept if _within(path, k)), None)
        if outer is None or os.stat(path).st_dev != os.stat(outer).st_dev:
            kept.append(path)
    hidden = tuple(p for p in (project,) if any(_within(p, k) and p != k for k in kept))
    return tuple(sorted(links.items())), tuple(kept), hidden


def _syscall_table() -> tuple[int, dict[str, int]]:
    """(AUDIT_ARCH of this machine, syscall name -> number); fails closed elsewhere."""
    import platform
    machine = platform.machine()
    if machine not in _SYSCALL_TABLES:
        raise OSError(f"no syscall table for the {machine!r} architecture (known: "
                      f"{', '.join(_SYSCALL_TABLES)}): the sandbox cannot filter syscalls here")
    arch, numbers = _SYSCALL_TABLES[machine]
    return arch, dict(zip(_SYSCALL_NAMES, numbers))


def _bind_read_only(libc, source: str, target: str, is_dir: bool) -> None:
    if is_dir:
        os.makedirs(target, mode=0o755, exist_ok=True)
    elif not os.path.exists(target):
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
    _mount(libc, source, target, None, _MS_BIND, None)
    _mount(libc, None, target, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, None)


def _build_root(cfg: dict) -> None:
    """In the private mount namespace: a new root (tmpfs) with read-only binds of the system
    libraries and the interpreter only (``_root_plan``), a minimal ``/dev``, a private
    size-limited ``/tmp`` holding the scratch directory and an empty ``/proc`` (mounted by the
    PID namespace's init); then ``pivot_root`` into it and detach the host's tree."""
    libc = _libc()
    links, binds, hidden = _root_plan()
    sources = {p: os.open(p, os.O_PATH | os.O_CLOEXEC) for p in (*binds, *(f"/dev/{d}" for d in DEVICES))}
    root = "/tmp"  # any directory: the host's files are reached through ``sources``
    _mount(libc, "tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=1m")
    targets = dict(links)
    entries = [(p, "link") for p in targets] + [(p, "bind") for p in binds] + [(p, "hide") for p in hidden]
    for path, kind in sorted(entries + [("/dev", "dev"), ("/tmp", "tmp")]):  # /tmp before a venv in it
        if kind == "dev":
            _make_dev(libc, root + path, sources, cfg["tmpfs_bytes"])
        elif kind == "tmp":
            os.makedirs(root + path, mode=0o755, exist_ok=True)
            _mount(libc, "tmpfs", root + path, "tmpfs", _MS_NOSUID | _MS_NODEV,
                   f"mode=1777,size={cfg['tmpfs_bytes']}")
            os.mkdir(root + cfg["scratch"], 0o700)
        elif kind == "bind":
            is_dir = stat.S_ISDIR(os.fstat(sources[path]).st_mode)
            _bind_read_only(libc, f"/proc/self/fd/{sources[path]}", root + path, is_dir)
        elif kind == "hide":
            _mount(libc, "tmpfs", root + path, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "mode=0755,size=4k")
        elif not os.path.lexists(root + path):
            os.makedirs(os.path.dirname(root + path), mode=0o755, exist_ok=True)
            os.symlink(targets[path], root + path)
    os.mkdir(root + "/proc", 0o555)
    for fd in sources.values():
        os.close(fd)
    os.chdir(root)
    if libc.syscall(_syscall_table()[1]["pivot_root"], b".", b".") != 0 or libc.umount2(b".", _MNT_DETACH) != 0:
        err = _ctypes_errno()
        raise OSError(err, f"pivot_root into the new root: {os.strerror(err)}")
    os.chdir("/")


def _make_dev(libc, dev: str, sources: dict, tmpfs_bytes: int) -> None:
    """A minimal /dev: ``DEVICES`` (bound from the host), a private /dev/shm and the fd links."""
    os.makedirs(dev, mode=0o755, exist_ok=True)
    _mount(libc, "tmpfs", dev, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "mode=0755,size=64k")
    for name in DEVICES:
        os.close(os.open(f"{dev}/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
        _mount(libc, f"/proc/self/fd/{sources[f'/dev/{name}']}", f"{dev}/{name}", None, _MS_BIND, None)
    os.mkdir(f"{dev}/shm", 0o755)
    _mount(libc, "tmpfs", f"{dev}/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, f"mode=1777,size={tmpfs_bytes}")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")


def _mount_proc() -> None:
    """A fresh /proc for the new PID namespace (run by its init): only the processes of the
    caller's own uid are visible (``hidepid``) and none of the host-wide files (``subset=pid``)."""
    libc = _libc()
    try:
        _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "hidepid=invisible,subset=pid")
    except OSError:  # kernels before 5.8: per-process directories of other users hidden only
        _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "hidepid=2")


def _ctypes_errno() -> int:
    import ctypes
    return ctypes.get_errno()


@functools.lru_cache(maxsize=None)
def _seccomp_program() -> bytes:
    """The classic-BPF filter (``struct sock_filter[]``): another architecture or an x32 syscall
    kills the process; ``_DENIED_SYSCALLS`` and ``clone`` with any namespace flag fail with
    EPERM; ``clone3`` fails with ENOSYS (its flags are out of the filter's reach); the rest is
    allowed. Jumps are forward offsets resolved from labels."""
    import struct
    arch, numbers = _syscall_table()
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|{JEQ,JGE,JSET}|K, BPF_RET|K
    namespaces = (_CLONE_NEWNS | _CLONE_NEWUTS | _CLONE_NEWIPC | _CLONE_NEWUSER | _CLONE_NEWPID
                  | _CLONE_NEWNET | _CLONE_NEWCGROUP)
    program = [(ld, 4, None, None), (jeq, arch, None, "kill"), (ld, 0, None, None),  # arch, nr
               (jge, _X32_SYSCALL_BIT, "kill", None), (jeq, numbers["clone3"], "enosys", None),
               (jeq, numbers["clone"], "clone", None)]
    program += [(jeq, numbers[name], "eperm", None) for name in _DENIED_SYSCALLS]
    program.append((ret, _SECCOMP_RET_ALLOW, None, None))
    labels = {"clone": len(program)}
    program += [(ld, 16, None, None), (jset, namespaces, "eperm", None), (ret, _SECCOMP_RET_ALLOW, None, None)]
    for label, value in (("eperm", _SECCOMP_RET_ERRNO | _EPERM), ("enosys", _SECCOMP_RET_ERRNO | _ENOSYS),
                         ("kill", _SECCOMP_RET_KILL_PROCESS)):
        labels[label] = len(program)
        program.append((ret, value, None, None))
    offset = lambda i, label: 0 if label is None else labels[label] - i - 1  # noqa: E731
    return b"".join(struct.pack("<HBBI", code, offset(i, jt), offset(i, jf), k)
                    for i, (code, k, jt, jf) in enumerate(program))


def _install_seccomp() -> None:
    """Applies ``_seccomp_program`` to every thread of this process (needs ``no_new_privs``)."""
    import ctypes

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    program = _seccomp_program()
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.addressof(buffer))
    if _libc().syscall(_syscall_table()[1]["seccomp"], _SECCOMP_SET_MODE_FILTER,
                       _SECCOMP_FILTER_FLAG_TSYNC, ctypes.byref(fprog)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"installing the seccomp filter: {os.strerror(err)}")


def _drop_privileges(cfg: dict) -> None:
    import resource
    if cfg["oom_first"]:  # at the cgroup's limit the snippet's processes die first
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
    """New mount, network, IPC and PID namespaces (the next fork becomes PID 1 of the latter)."""
    import ctypes
    libc = _libc()
    if libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWPID) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE, None)  # no mount leaks to the host


def _report_setup_failure(status_fd: int) -> None:
    """Sends the current exception to the host over the status pipe (never to the snippet's
    output, which the model reads)."""
    import traceback
    try:
        os.write(status_fd, b"E:" + traceback.format_exc().encode("utf-8", "replace")[-60000:] + b"\0")
    except OSError:
        pass


def _report_error(err: BaseException, format_exception) -> None:
    """Writes the snippet's uncaught exception to fd 2 like a script would (frames of the snippet
    only); degrades to the exception's type and message when formatting fails (no memory, the
    snippet tampered with ``traceback``); nothing at all only if fd 2 itself is gone."""
    try:  # tb_next skips _run_snippet's frame: the model sees only its own code's frames
        text = "".join(format_exception(type(err), err, err.__traceback__.tb_next))
    except BaseException:  # noqa: B036
        try:
            text = f"{type(err).__name__}: {err}\n"
        except BaseException:  # noqa: B036
            text = f"{type(err).__name__}\n"
    _write_stderr(text)


def _write_stderr(text: str) -> None:
    """Flushes the snippet's streams (whatever it replaced them with), then writes ``text``
    straight to fd 2."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: B036 (replaced or closed by the snippet)
            pass
    data = text.encode("utf-8", "replace")
    try:
        while data:
            data = data[os.write(2, data):]
    except OSError:
        pass


def _run_snippet(cfg: dict) -> int:
    """The sandboxed child: drop privileges, filter syscalls, run the preamble (a failure of
    any of these is the sandbox's, reported on the status pipe), then read and run the code."""
    import linecache
    import platform
    import traceback
    status_fd = cfg["status_fd"]
    try:
        _drop_privileges(cfg)
        if cfg["isolated"] or platform.machine() in _SYSCALL_TABLES:  # best effort when not isolated
            _install_seccomp()
        namespace = {"__name__": "__main__", "__builtins__": __builtins__}
        exec(compile(cfg["preamble"], "<preamble>", "exec"), namespace)
    except BaseException:  # noqa: B036
        _report_setup_failure(status_fd)
        return _SETUP_FAILED
    os.close(status_fd)
    format_exception = traceback.format_exception  # taken before the snippet can replace it
    code = sys.stdin.buffer.read().decode("utf-8", "replace")
    sys.stdin.close()
    try:
        exec(compile(code, "<code>", "exec"), namespace)
    except SystemExit:
        raise
    except BaseException as err:  # the snippet's own error: report it like a script would
        linecache.cache["<code>"] = (len(code), None, code.splitlines(True), "<code>")
        _report_error(err, format_exception)
        return 1
    return 0


def _run_and_report(cfg: dict) -> None:
    """Forks the snippet's process, waits for it and writes its exit code (negative: killed by
    that signal) to the status pipe."""
    status_fd = cfg["status_fd"]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _run_snippet(cfg)
        except SystemExit as stop:  # sys.exit("message") prints the message, as Python does
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, (int, type(None))):
                _write_stderr(f"{stop.code}\n")
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:  # noqa: B036 (replaced or closed by the snippet)
                    pass
            os._exit(code & 0xFF)
    _, wait_status = os.waitpid(pid, 0)
    code = (-os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status)
            else os.WEXITSTATUS(wait_status))
    os.write(status_fd, str(code).encode())


def _supervise(cfg: dict) -> None:
    """The worker's main process: join the slot's cgroups; isolated, enter the namespaces, build
    and enter the new root, and fork the PID namespace's init, which mounts its /proc and runs
    and reports the snippet (the snippet is not PID 1, so kernel signals such as SIGXCPU keep
    their default action; when the init exits, the kernel kills whatever the snippet left in
    the namespace). Otherwise run and report the snippet directly. A set-up failure is
    reported to the host on the status pipe."""
    status_fd = cfg["status_fd"]
    try:
        for procs_file in cfg["cgroup_procs"]:
            with open(procs_file, "w") as f:
                f.write(str(os.getpid()))
        if cfg["isolated"]:
            _enter_namespaces()
            _build_root(cfg)
    except BaseException:  # noqa: B036
        _report_setup_failure(status_fd)
        return
    if not cfg["isolated"]:
        _run_and_report(cfg)
        return
    init_pid = os.fork()
    if init_pid == 0:
        try:
            _libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            _mount_proc()
            _run_and_report(cfg)
        except BaseException:  # noqa: B036
            _report_setup_failure(status_fd)
        finally:
            os._exit(0)
    os.close(status_fd)
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
    def preamble():
        exec(compile(cfg["preamble"], "<preamble>", "exec"), {"__name__": "__preamble__"})

    for prepare in (preamble, _root_plan, _seccomp_program):  # done once, inherited by every worker
        try:
            prepare()
        except Exception:  # each worker tries again and reports the failure to the host
            pass

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
            except BaseException:  # noqa: B036 (a failure of the sandbox itself: tell the host)
                _report_setup_failure(fds[3])
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
