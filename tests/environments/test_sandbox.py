"""The sandbox against a corpus of hostile snippets, plus benign ones.

Every hostile snippet must be contained, give the model a clear error text, and leave no
process (checked by a /proc scan for the slot uids and for unique command-line markers) and no
file (checked on the host filesystem) behind. Containment of network and filesystem needs root
and namespaces; those tests are skipped (loudly) where they are unavailable.
"""
import os
import socket
import sys
import threading
import time
import uuid

import pytest

from environments import sandbox as sandbox_module
from environments.sandbox import Sandbox, SandboxConfig, _processes_matching

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECRET_VAR, SECRET_VALUE = "SPEAR_TEST_SECRET", "s3cr3t-" + uuid.uuid4().hex
FAST = dict(timeout_s=4.0, cpu_time_s=2, pool_size=2)


def _cmdline_processes(token: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def cold():
    """Workers started per call: after a call no process of a slot uid may exist at all."""
    os.environ[SECRET_VAR] = SECRET_VALUE
    with Sandbox(SandboxConfig(warm=False, **FAST)) as sb:
        yield sb
    os.environ.pop(SECRET_VAR, None)


def _assert_no_leftovers(sb: Sandbox) -> None:
    for lease in sb._leases:
        assert _processes_matching(lease.uid, None) == [], f"process of uid {lease.uid} survived"


isolated_only = pytest.mark.skipif(
    not (os.geteuid() == 0 and sandbox_module._namespaces_work()),
    reason="needs root and namespaces: network/filesystem isolation unavailable here")


# ---------------------------------------------------------------------------- benign snippets

def test_prints_and_preamble_numpy(cold):
    r = cold.run("print(np.arange(5).sum(), math.comb(5, 2), Fraction(1, 3) + Fraction(1, 6))")
    assert r.status == "ok" and r.exit_code == 0
    assert r.stdout == "10 10 1/2\n" and r.stderr == ""
    assert r.text() == "10 10 1/2\n"
    _assert_no_leftovers(cold)


def test_exception_gives_traceback_of_the_snippet_only(cold):
    r = cold.run("def f(x):\n    return 1 / x\nprint('before')\nf(0)\n")
    assert r.status == "error" and r.exit_code == 1
    assert r.stdout == "before\n"
    assert 'File "<code>", line 4' in r.stderr and 'File "<code>", line 2, in f' in r.stderr
    assert "return 1 / x" in r.stderr and r.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "sandbox.py" not in r.stderr
    assert r.text() == "before\n\n" + r.stderr


def test_syntax_error_and_sys_exit(cold):
    r = cold.run("print(1 +")
    assert r.status == "error" and "SyntaxError" in r.stderr
    r = cold.run("import sys\nprint('x')\nsys.exit(3)")
    assert r.status == "error" and r.exit_code == 3 and r.stdout == "x\n"
    r = cold.run("")
    assert r.status == "ok" and r.text() == "(no output)"


def test_sympy_importable():
    """A cold import of sympy takes about a second of CPU time: under a loaded test run that can
    exceed ``FAST``'s 2 s, so this call gets the default limits instead."""
    with Sandbox(SandboxConfig(warm=False, pool_size=1)) as sb:
        r = sb.run("import sympy\nprint(sympy.factorint(360))")
    assert r.status == "ok" and r.stdout == "{2: 3, 3: 2, 5: 1}\n", r.text()


def test_bad_code_argument_is_rejected_not_raised(cold):
    assert cold.run(None).status == "rejected"
    r = Sandbox(SandboxConfig(max_code_bytes=10, warm=False, pool_size=1))
    try:
        assert r.run("print('a long program')").status == "rejected"
    finally:
        r.close()


# ---------------------------------------------------------------------------- hostile snippets

def test_infinite_loop_hits_cpu_limit(cold):
    r = cold.run("while True:\n    pass")
    assert r.status in ("cpu_limit", "timeout"), r
    assert "limit" in r.text() and "Error:" in r.text()
    _assert_no_leftovers(cold)


def test_sleeping_loop_hits_wall_timeout(cold):
    start = time.monotonic()
    r = cold.run("import time\nprint('started', flush=True)\nwhile True:\n    time.sleep(0.1)")
    assert r.status == "timeout" and r.stdout == "started\n"
    assert "timed out" in r.text()
    assert time.monotonic() - start < FAST["timeout_s"] + 2
    _assert_no_leftovers(cold)


def test_process_ignoring_sigterm_is_killed(cold):
    r = cold.run("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                 "signal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)")
    assert r.status == "timeout"
    _assert_no_leftovers(cold)


def test_fork_bomb_is_contained(cold):
    r = cold.run("import os\nwhile True:\n    os.fork()")
    assert r.status in ("error", "killed", "timeout"), r
    assert "BlockingIOError" in r.stderr or r.status != "error"
    _assert_no_leftovers(cold)


def test_memory_bomb(cold):
    r = cold.run("x = bytearray(8 << 30)")
    assert r.status == "error" and "MemoryError" in r.stderr
    # grows without touching the pages (fast): the address-space limit must stop it
    r = cold.run("chunks = []\nwhile True:\n    chunks.append(np.empty(64 << 20, dtype=np.uint8))")
    assert r.status in ("error", "killed") and ("MemoryError" in r.stderr or r.status == "killed")
    _assert_no_leftovers(cold)


def test_gigabytes_of_output_are_cut(cold):
    start = time.monotonic()
    r = cold.run("s = 'x' * (1 << 20)\nwhile True:\n    print(s)")
    assert r.status == "output_limit"
    assert len(r.stdout) + len(r.stderr) <= cold.config.max_output_bytes
    assert "output limit exceeded" in r.text()
    assert time.monotonic() - start < 5
    _assert_no_leftovers(cold)


def test_big_file_hits_file_size_limit(cold):
    r = cold.run("open('big.bin', 'wb').write(b'0' * (64 << 20))")
    assert r.status in ("error", "killed") and ("File too large" in r.stderr or r.status == "killed")


def test_setsid_child_does_not_outlive_the_call(cold):
    token = str(900000 + int(uuid.uuid4().int % 99999))
    r = cold.run(f"import subprocess\nsubprocess.Popen(['sleep', '{token}'], start_new_session=True)\n"
                 "import os\npid = os.fork()\nif pid == 0:\n    os.setsid()\n"
                 f"    os.execvp('sleep', ['sleep', '{token}'])\nprint('spawned')")
    assert r.status == "ok" and r.stdout == "spawned\n"
    assert r.duration_s < FAST["timeout_s"]  # leftover children holding the pipes do not stall
    assert _cmdline_processes(f"sleep\0{token}") == []
    _assert_no_leftovers(cold)


def test_host_environment_is_not_readable(cold):
    assert os.environ[SECRET_VAR] == SECRET_VALUE
    r = cold.run(
        "import os, glob\n"
        f"print('env', any('{SECRET_VALUE}' in v for v in os.environ.values()))\n"
        "hits = 0\n"
        "for path in glob.glob('/proc/*/environ'):\n"
        "    try:\n"
        f"        hits += b'{SECRET_VALUE}' in open(path, 'rb').read()\n"
        "    except OSError:\n"
        "        pass\n"
        "print('proc', hits)\nprint(sorted(os.environ))")
    assert r.status == "ok", r.text()
    assert "env False" in r.stdout and "proc 0" in r.stdout
    assert SECRET_VAR not in r.stdout


@isolated_only
def test_network_is_unreachable(cold):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    try:
        for target in (f"('127.0.0.1', {port})", "('1.1.1.1', 53)"):
            r = cold.run(f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect({target})\nprint('connected')")
            assert r.status == "error" and "connected" not in r.stdout, r.text()
            assert "OSError" in r.stderr or "Error" in r.stderr
        assert accepted == []
    finally:
        server.close()


@isolated_only
def test_writes_outside_scratch_fail_or_vanish(cold):
    name = "spear-sandbox-test-" + uuid.uuid4().hex
    r = cold.run(
        "import os\n"
        f"for path in ['{REPO}/{name}', '/{name}', '/etc/{name}']:\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        print('WROTE', path)\n"
        "    except OSError as err:\n"
        "        print('denied', type(err).__name__)\n"
        f"for d in ['/tmp', '/dev/shm']:\n"
        f"    open(os.path.join(d, '{name}'), 'w').write('x')\n"
        "print('var', os.path.exists('/var'))\n"
        "open('in_scratch.txt', 'w').write('ok')\nprint(os.getcwd(), os.listdir('.'))")
    assert r.status == "ok", r.text()
    # A checkout under a directory the sandbox hides (its private /tmp, root's home) is not even
    # visible inside: the write into the repository then fails with FileNotFoundError.
    denied = r.stdout.splitlines()[:3]
    assert "WROTE" not in r.stdout and denied[1:] == ["denied PermissionError"] * 2, r.stdout
    assert denied[0] in ("denied PermissionError", "denied FileNotFoundError"), r.stdout
    assert "in_scratch.txt" in r.stdout and "var False" in r.stdout
    for directory in (REPO, "/", "/etc", "/tmp", "/var/tmp", "/dev/shm"):
        assert not os.path.exists(os.path.join(directory, name)), directory


@isolated_only
def test_root_home_and_host_tmp_are_hidden(cold):
    marker = os.path.join("/tmp", "spear-visible-" + uuid.uuid4().hex)
    open(marker, "w").close()
    try:
        r = cold.run(f"import os\nprint(os.path.exists('{marker}'), os.getuid() != 0)")
        assert r.stdout == "False True\n", r.text()
    finally:
        os.remove(marker)


# ---------------------------------------------------------------------------- the warm pool

def test_warm_pool_never_leaks_state_between_snippets():
    with Sandbox(SandboxConfig(pool_size=1, timeout_s=10)) as sb:
        first = sb.run("import math, os\nmath.pi = 3\nGLOBAL = 1\nopen('left.txt', 'w').write('x')\n"
                       "os.environ['LEAK'] = '1'\nprint(os.getpid())")
        second = sb.run("import math, os\nprint(math.pi == 3, 'GLOBAL' in globals(), "
                        "os.path.exists('left.txt'), 'LEAK' in os.environ, os.listdir('.'))")
        assert first.status == second.status == "ok"
        assert second.stdout == "False False False False []\n"


def test_warm_pool_is_faster_and_thread_safe():
    with Sandbox(SandboxConfig(pool_size=2, timeout_s=10)) as sb:
        time.sleep(1.0)  # let the pool boot
        results = []
        threads = [threading.Thread(target=lambda i=i: results.append(sb.run(f"print({i} * 2)")))
                   for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r.stdout for r in results) == sorted(f"{i * 2}\n" for i in range(6))
        uids = [lease.uid for lease in sb._leases]
    assert all(_processes_matching(uid, None) == [] for uid in uids)  # close() killed the pool


def test_concurrent_sandboxes_get_distinct_uids():
    with Sandbox(SandboxConfig(pool_size=2, warm=False)) as a, Sandbox(SandboxConfig(pool_size=2, warm=False)) as b:
        uids = [lease.uid for lease in a._leases + b._leases]
        assert len(set(uids)) == len(uids) or os.geteuid() != 0


def test_invalid_config_names_the_field():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ValueError, match="uid_base"):
        SandboxConfig(uid_base=0)


# ---------------------------------------------------------------------------- without isolation

def test_unisolated_fallback_warns_and_still_kills_escapees(monkeypatch, capsys):
    """Without root: no namespaces, no uid; the marker sweep must still catch setsid children
    and the host scratch directory must be removed."""
    monkeypatch.setattr(sandbox_module, "_namespaces_work", lambda: False)
    monkeypatch.setattr(sandbox_module.os, "geteuid", lambda: 1000)
    with pytest.raises(RuntimeError, match="NOT ISOLATED"):
        Sandbox(SandboxConfig(require_isolation=True, warm=False, pool_size=1))
    token = str(800000 + int(uuid.uuid4().int % 99999))
    with Sandbox(SandboxConfig(warm=False, pool_size=1, timeout_s=5)) as sb:
        assert "NOT ISOLATED" in capsys.readouterr().err
        r = sb.run(f"import os, subprocess\nsubprocess.Popen(['sleep', '{token}'], start_new_session=True)\n"
                   "print(os.getcwd())")
        assert r.status == "ok"
        scratch = r.stdout.strip()
        assert scratch.startswith("/") and not os.path.exists(scratch)
        assert _cmdline_processes(f"sleep\0{token}") == []


# ---------------------------------------------------------------------------- the fork server

def test_forked_workers_do_not_share_random_state():
    with Sandbox(SandboxConfig(pool_size=1, timeout_s=10)) as sb:
        draws = {sb.run("import random\nprint(random.random(), np.random.rand())").stdout for _ in range(3)}
        assert len(draws) == 3


@isolated_only
def test_dead_fork_server_is_restarted():
    with Sandbox(SandboxConfig(pool_size=1, timeout_s=10, warm=False)) as sb:
        assert sb.run("print(1)").stdout == "1\n"
        assert sb.uses_fork_server
        sb._fork_server.proc.kill()
        sb._fork_server.proc.wait()
        assert sb.run("print(2)").stdout == "2\n"


@isolated_only
def test_workers_booting_their_own_interpreter_are_isolated_too():
    with Sandbox(SandboxConfig(pool_size=1, timeout_s=4, cpu_time_s=2, fork_server=False)) as sb:
        assert not sb.uses_fork_server
        r = sb.run("import os, socket\nprint(os.getuid() != 0, os.path.exists('/root/.ssh'))\n"
                   "socket.create_connection(('1.1.1.1', 53), timeout=1)")
        assert r.stdout == "True False\n" and "OSError" in r.stderr
        token = str(700000 + int(uuid.uuid4().int % 99999))
        r = sb.run(f"import subprocess\nsubprocess.Popen(['sleep', '{token}'], start_new_session=True)\nprint('ok')")
        assert r.stdout == "ok\n" and _cmdline_processes(f"sleep\0{token}") == []
        uid = sb._leases[0].uid
    assert _processes_matching(uid, None) == []


@isolated_only
def test_warm_worker_killed_while_idle_gives_an_error_then_recovers():
    with Sandbox(SandboxConfig(pool_size=1, timeout_s=10)) as sb:
        uid = sb._leases[0].uid
        deadline = time.monotonic() + 10
        while not _processes_matching(uid, None) and time.monotonic() < deadline:
            time.sleep(0.05)  # the warm worker drops to the slot uid once booted
        for pid in _processes_matching(uid, None):
            os.kill(pid, 9)
        r = sb.run("print('never')")
        assert r.status in ("killed", "error") and "never" not in r.stdout
        assert r.text() == "Error: the process was killed by SIGKILL (a resource limit was exceeded)."
        assert sb.run("print('again')").stdout == "again\n"


@isolated_only
def test_memory_cgroup_caps_a_snippet_and_its_children_together():
    """Each process stays under RLIMIT_AS (512 MiB), but three together exceed the slot's
    512 MiB cgroup: the kernel's OOM killer must SIGKILL at least one of them."""
    with Sandbox(SandboxConfig(pool_size=1, timeout_s=20, memory_bytes=512 << 20, warm=False)) as sb:
        if not sb.limits_total_memory:
            pytest.skip("no writable memory cgroup here: memory is limited per process only")
        cgroup_dir = sb._cgroups[0].dirs["memory"]
        r = sb.run("import os, time\npids = []\nfor _ in range(3):\n    pid = os.fork()\n"
                   "    if pid == 0:\n        block = bytearray(200 << 20)\n        time.sleep(0.5)\n"
                   "        os._exit(0)\n    pids.append(pid)\n"
                   "print([os.waitpid(p, 0)[1] & 0x7f for p in pids])")
        assert r.status == "ok", r.text()
        assert "9" in r.stdout.strip("[]\n").replace(" ", "").split(","), r.stdout  # SIGKILL
        assert sb.run("print(np.ones(3).sum())").stdout == "3.0\n"
    assert not os.path.exists(cgroup_dir)


# ---------------------------------------------------------------------------- containment of the host

@pytest.fixture(scope="module")
def single():
    """One slot, warm: consecutive calls run under the same slot uid."""
    with Sandbox(SandboxConfig(pool_size=1, timeout_s=6.0, cpu_time_s=3)) as sb:
        yield sb


def test_interpreter_in_a_fresh_venv_under_tmp(tmp_path):
    """A virtual environment under a world-writable directory (here pytest's tmp dir in /tmp),
    the way a fresh clone is often set up: sandbox calls made with that interpreter must work.
    It sees the test interpreter's packages through a ``.pth`` file that adds each of its site
    directories (``--system-site-packages`` would give the base interpreter's instead, which may
    hold no numpy when the tests run in a virtual environment)."""
    import json
    import site
    import subprocess
    import sys
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    ask = "import site; print(site.getsitepackages()[0])"  # the nested venv's own site directory
    venv_site = subprocess.run([str(venv / "bin" / "python"), "-c", ask], check=True, capture_output=True,
                               text=True, timeout=60).stdout.strip()
    with open(os.path.join(venv_site, "outer_packages.pth"), "w") as pth:
        pth.writelines(f"import site; site.addsitedir({path!r})\n" for path in site.getsitepackages())
    script = ("import json, sys\nfrom environments.sandbox import Sandbox, SandboxConfig\n"
              "with Sandbox(SandboxConfig(pool_size=1, warm=False, timeout_s=10)) as sb:\n"
              "    r = sb.run('import sys\\nprint(np.arange(4).sum(), sys.prefix)')\n"
              "    print(json.dumps([sb.isolated, sys.prefix, r.status, r.text()]))\n")
    done = subprocess.run([str(venv / "bin" / "python"), "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={"PATH": os.environ["PATH"], "PYTHONPATH": REPO})
    assert done.returncode == 0, done.stderr
    isolated, prefix, status, text = json.loads(done.stdout.strip().splitlines()[-1])
    assert prefix == str(venv)
    assert status == "ok" and text == f"6 {venv}\n", text
    assert isolated == sandbox_module._namespaces_work()


@isolated_only
def test_host_processes_and_sockets_are_invisible(cold):
    import subprocess
    import sys
    token = "spear-secret-arg-" + uuid.uuid4().hex
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", token])
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port_hex = f":{server.getsockname()[1]:04X}"
    unix_path = f"/run/spear-test-{uuid.uuid4().hex[:12]}.sock"
    unix_server = socket.socket(socket.AF_UNIX)
    unix_server.bind(unix_path)
    unix_server.listen(1)
    try:
        r = cold.run(
            "import glob, os\nseen = ''\n"
            "for path in glob.glob('/proc/*/cmdline') + ['/proc/1/net/tcp', '/proc/1/net/unix',\n"
            "                                            '/proc/net/tcp', '/proc/net/unix']:\n"
            "    try:\n        seen += open(path, 'rb').read().decode('latin-1')\n"
            "    except OSError:\n        pass\n"
            f"print('{token}' in seen, '{port_hex}' in seen, '{unix_path}' in seen)\n"
            "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()) == [os.getpid()])")
        assert r.status == "ok", r.text()
        assert r.stdout == "False False False\nTrue\n", r.stdout
    finally:
        victim.kill()
        victim.wait()
        server.close()
        unix_server.close()
        os.unlink(unix_path)


_SHMGET = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
           "libc.shmget.argtypes = (ctypes.c_int, ctypes.c_size_t, ctypes.c_int)\n")


def _host_shm_keys() -> set[int]:
    with open("/proc/sysvipc/shm") as f:
        return {int(line.split()[0]) for line in f.read().splitlines()[1:]}


def _cgroup_memory_bytes(sb: Sandbox) -> int:
    directory = sb._cgroups[0].dirs["memory"]
    for name in ("memory.usage_in_bytes", "memory.current"):
        if os.path.exists(os.path.join(directory, name)):
            with open(os.path.join(directory, name)) as f:
                return int(f.read())
    raise FileNotFoundError(f"no memory usage file in {directory}")


@isolated_only
def test_sysv_shared_memory_is_private_to_a_call(single):
    import ctypes
    key = 0x5EA0000 + int(uuid.uuid4().int % 0xFFFF)
    made = single.run(_SHMGET + f"print(libc.shmget({key}, 1 << 20, 0o1666) >= 0)")
    try:
        assert made.stdout == "True\n", made.text()
        assert key not in _host_shm_keys()
        later = single.run(_SHMGET + f"print(libc.shmget({key}, 0, 0o666))")
        assert later.stdout == "-1\n", later.text()
        if single.limits_total_memory:  # a touched segment must not stay charged to the slot
            touched = single.run(_SHMGET + "libc.shmat.restype = ctypes.c_void_p\n"
                                 f"segment = libc.shmget({key + 1}, 96 << 20, 0o1600)\n"
                                 "ctypes.memset(libc.shmat(segment, None, 0), 1, 96 << 20)\nprint('touched')")
            assert touched.stdout == "touched\n", touched.text()
            deadline = time.monotonic() + 3  # the kernel frees a dead IPC namespace asynchronously
            while _cgroup_memory_bytes(single) >= 48 << 20 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _cgroup_memory_bytes(single) < 48 << 20
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        for leaked in (key, key + 1):
            segment = libc.shmget(leaked, 0, 0)
            if segment >= 0:
                libc.shmctl(segment, 0, None)  # IPC_RMID: clean up what a shared IPC namespace kept


_KEYCTL = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
           "libc.syscall.restype = ctypes.c_long\n"
           "nr = {'x86_64': (248, 250), 'aarch64': (217, 219)}[__import__('platform').machine()]\n")


@isolated_only
def test_keyrings_are_not_shared_between_calls(single):
    secret = uuid.uuid4().hex
    stored = single.run(_KEYCTL + "print(libc.syscall(nr[0], b'user', b'spear-test', "
                        f"b'{secret}', ctypes.c_size_t(32), ctypes.c_int(-4)) > 0)")
    assert stored.stdout == "False\n", stored.text()
    # KEYCTL_SEARCH (10) in the user keyring (-4), then KEYCTL_READ (11)
    read = single.run(_KEYCTL + "key = libc.syscall(nr[1], 10, ctypes.c_int(-4), b'user', b'spear-test', 0)\n"
                      "buf = ctypes.create_string_buffer(64)\n"
                      "n = libc.syscall(nr[1], 11, ctypes.c_int(key), buf, ctypes.c_size_t(64)) if key > 0 else -1\n"
                      "print(buf.raw[:max(n, 0)].decode())")
    assert secret not in read.stdout, read.text()


@isolated_only
def test_only_the_interpreter_is_visible_of_the_host_filesystem(cold):
    data_file = os.path.join(REPO, "data", "math", "aime2024.jsonl")
    assert os.path.exists(data_file)
    unix_path = f"/run/spear-test-{uuid.uuid4().hex[:12]}.sock"
    unix_server = socket.socket(socket.AF_UNIX)
    unix_server.bind(unix_path)
    unix_server.listen(1)
    os.chmod(unix_path, 0o777)
    try:
        r = cold.run(
            "import glob, os, socket, sys\n"
            f"repo = os.listdir('{REPO}') if os.path.exists('{REPO}') else None\n"
            f"print(os.path.exists('{data_file}'), repo,\n"
            "      [p for depth in range(1, 4) for p in glob.glob('/*' * depth + '/data/math/*')])\n"
            "print(sorted(os.listdir('/')))\n"
            "print([d for d in ('/run', '/var', '/etc/passwd', '/sys', '/mnt', '/opt') if os.path.exists(d)],\n"
            "      [os.path.join(d, e) for d in ('/home', '/root') if os.path.isdir(d) for e in os.listdir(d)\n"
            "       if not any(p.startswith(os.path.join(d, e) + '/') for p in (sys.prefix, sys.base_prefix))])\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            f"try:\n    s.connect('{unix_path}')\n    print('connected')\nexcept OSError as err:\n"
            "    print(type(err).__name__)\n"
            "print(os.path.exists(sys.executable), sorted(os.listdir('/dev')))")
        assert r.status == "ok", r.text()
        lines = r.stdout.splitlines()
        # the checkout is invisible; only a way through it to an interpreter inside it (a venv in
        # the clone, e.g. <clone>/venv) is there, holding nothing else
        inside = [os.path.relpath(p, REPO).split(os.sep)[0] for p in (sys.prefix, sys.executable)
                  if p.startswith(REPO + os.sep)]
        assert lines[0] == f"False {sorted(set(inside)) if inside else None} []", r.stdout
        assert set(eval(lines[1])) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin",
                                       "tmp", "usr"} | {p.split("/")[1] for p in (REPO, "/root", "/opt", "/home")}
        assert lines[2] == "[] []", r.stdout  # /root holds only the way to the interpreter (pyenv)
        assert lines[3] == "FileNotFoundError", r.stdout
        assert lines[4] == "True ['fd', 'null', 'random', 'shm', 'stderr', 'stdin', 'stdout', 'urandom', 'zero']"
    finally:
        unix_server.close()
        os.unlink(unix_path)


@isolated_only
def test_user_namespaces_and_mounts_are_denied(cold):
    r = cold.run("import ctypes, errno\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                 "for flags in (0x10000000, 0x10000000 | 0x00020000):\n"
                 "    print(libc.unshare(flags), errno.errorcode[ctypes.get_errno()])\n"
                 "print(libc.mount(b'none', b'/tmp', b'tmpfs', 0, None), errno.errorcode[ctypes.get_errno()])\n"
                 "print(libc.setns(0, 0x10000000), errno.errorcode[ctypes.get_errno()])\n"
                 "import os, platform\nlibc.syscall.restype = ctypes.c_long\n"
                 "clone = {'x86_64': 56, 'aarch64': 220}[platform.machine()]\n"
                 "child = libc.syscall(clone, ctypes.c_ulong(0x10000000 | 17), 0, 0, 0, 0)  # CLONE_NEWUSER | SIGCHLD\n"
                 "if child == 0:\n    os._exit(0)\n"
                 "print(child, errno.errorcode.get(ctypes.get_errno()))")
    assert r.status == "ok", r.text()
    assert r.stdout == "-1 EPERM\n" * 5, r.stdout
    r = cold.run("import subprocess, os\nprint(subprocess.run(['true']).returncode, os.cpu_count() > 0)")
    assert r.stdout == "0 True\n", r.text()


def test_unformattable_errors_still_give_a_clear_error(cold):
    r = cold.run("import sys, traceback\ntraceback.format_exception = None\nsys.stderr = None\n1 / 0")
    assert r.status == "error" and "ZeroDivisionError" in r.text(), r.text()
    r = cold.run("import os\nprint('partial', flush=True)\nos.close(2)\nraise ValueError('x')")
    assert r.status == "error"
    assert r.text().startswith("partial\n") and "exited with status 1" in r.text(), r.text()
    r = cold.run("import sys\nsys.exit('bad input')")
    assert r.status == "error" and r.exit_code == 1 and r.text() == "bad input\n", r.text()
    r = cold.run("import sys\nsys.exit(2)")
    assert r.text() == "Error: the program exited with status 2 and no error message."


@isolated_only
def test_total_cpu_of_a_call_and_its_children_is_capped():
    """30 spinning children: the slot's CPU cgroup holds them to ``cpu_cores`` and the parent
    ends the call once they have used ``cpu_time_s`` CPU-seconds together."""
    with Sandbox(SandboxConfig(pool_size=1, timeout_s=20, cpu_time_s=1, cpu_cores=0.5, warm=False)) as sb:
        if not sb.limits_total_cpu:
            pytest.skip("no writable CPU cgroup here: CPU time is limited per process only")
        before, start = sb._cgroups[0].cpu_seconds(), time.monotonic()
        r = sb.run("import os\nfor _ in range(30):\n    if os.fork() == 0:\n        while True:\n            pass\n"
                   "os.wait()")
        wall = time.monotonic() - start
        used = sb._cgroups[0].cpu_seconds() - before
    assert r.status == "cpu_limit" and "CPU time limit exceeded" in r.text(), r.text()
    assert used <= 1.0 + 0.4, used
    assert used <= 0.5 * wall + 0.3, (used, wall)


def test_broken_worker_setup_is_noticed_at_construction():
    with pytest.raises(RuntimeError, match="(?s)a worker cannot run code.*No module named 'no_such_module_xyz'"):
        Sandbox(SandboxConfig(pool_size=1, warm=False, preamble="import no_such_module_xyz\n"))


def test_setup_failure_later_gives_the_model_one_line_without_host_paths(cold):
    import dataclasses
    with Sandbox(SandboxConfig(pool_size=1, warm=False, **{k: v for k, v in FAST.items() if k != "pool_size"})) as sb:
        object.__setattr__(sb, "config", dataclasses.replace(sb.config, preamble="import no_such_module_xyz\n"))
        r = sb.run("print('never')")
    assert r.status == "sandbox_error" and r.stdout == r.stderr == ""
    assert r.text() == "Error: the sandbox failed to start the program (an internal error, not the code's fault)."
    assert "no_such_module_xyz" in sb._last_failure


@isolated_only
def test_a_checkout_inside_a_bound_system_directory_stays_hidden():
    """A checkout under /usr (system Python images often use /usr/src/app) is inside a directory
    the sandbox binds whole: its data must still be invisible to snippets."""
    import shutil
    import subprocess
    import sys
    checkout = f"/usr/local/src/spear-checkout-{uuid.uuid4().hex[:12]}"
    try:
        os.makedirs(f"{checkout}/environments")
        os.makedirs(f"{checkout}/data/math")
    except OSError as err:
        pytest.skip(f"/usr/local/src is not writable here: {err}")
    try:
        shutil.copy(sandbox_module.__file__, f"{checkout}/environments/sandbox.py")
        with open(f"{checkout}/data/math/answers.jsonl", "w") as f:
            f.write('{"answer": "42"}\n')
        script = ("import sys\nsys.path.insert(0, sys.argv[1] + '/environments')\nimport sandbox\n"
                  "with sandbox.Sandbox(sandbox.SandboxConfig(pool_size=1, warm=False, timeout_s=10)) as sb:\n"
                  "    print(sb.run(f'import os\\nprint(os.path.exists({sys.argv[1]!r}), os.listdir({sys.argv[1]!r}), "
                  "os.path.exists(\"/usr/bin\"))').text())\n")
        done = subprocess.run([sys.executable, "-c", script, checkout], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "True [] True\n\n", done.stdout
    finally:
        shutil.rmtree(checkout)
