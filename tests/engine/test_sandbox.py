"""The code sandbox with real child processes and real limits: every escape attempt is contained and reported."""

import os
import socket
import time
import uuid

import pytest

from configs.schema import SandboxConfig
from engine.rewards.sandbox import _pids_of_uid, run_python

pytestmark = pytest.mark.timeout(60)

LIMITS = SandboxConfig(cpu_s=1, wall_s=3, memory_mb=256, max_processes=8)
ROOT = os.geteuid() == 0


def _assert_nothing_left(result):
    if ROOT:  # every process of the sandbox uid is gone
        assert _pids_of_uid(result.isolation["uid"]) == []


def test_sandbox_runs_code_in_a_private_directory_and_reports_isolation():
    r = run_python("import os\nopen('out.txt', 'w').write('hi')\nprint(os.getcwd(), open('out.txt').read())",
                   limits=LIMITS)
    assert r.status == "ok" and r.stdout.split()[1] == "hi", r.stderr
    assert "everyprompt-sandbox-" in r.stdout.split()[0]
    assert r.isolation["audit_hook"] and r.isolation["network"] in ("netns", "audit")
    assert r.isolation["max_processes"] >= 8 and r.isolation["memory_bytes"] == 256 * 1024 * 1024
    if ROOT:
        assert isinstance(r.isolation["uid"], int) and r.isolation["uid"] != 0 and r.isolation["no_new_privs"]


def test_sandbox_infinite_loop_is_stopped_by_the_cpu_limit():
    t0 = time.monotonic()
    r = run_python("while True:\n    pass", limits=LIMITS)
    assert r.status == "timeout" and time.monotonic() - t0 < LIMITS.wall_s + 2
    _assert_nothing_left(r)


def test_sandbox_sleeping_forever_is_stopped_by_the_wall_limit():
    r = run_python("import time\ntime.sleep(600)", limits=SandboxConfig(wall_s=1.0))
    assert r.status == "timeout" and r.wall_s < 3


def test_sandbox_memory_bomb_hits_the_address_space_limit():
    r = run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(32 * 1024 * 1024))", limits=LIMITS)
    assert r.status == "memory_limit" and "MemoryError" in r.stderr


def test_sandbox_fork_bomb_is_bounded_by_the_process_limit_and_cleaned_up():
    # count how many children it can make; they would sleep forever if not killed
    probe = ("import os, time\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
             "    except OSError:\n        break\n    if pid == 0:\n        os.setsid()\n        time.sleep(600)\n"
             "        os._exit(0)\n    n += 1\nprint(n)")
    r = run_python(probe, limits=LIMITS)
    assert r.status == "ok", r.stderr
    assert int(r.stdout) < LIMITS.max_processes  # RLIMIT_NPROC stopped it
    _assert_nothing_left(r)  # even children that left the process group (setsid) are gone
    bomb = run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                      limits=LIMITS)
    assert bomb.status == "timeout" and bomb.wall_s < LIMITS.wall_s + 3
    _assert_nothing_left(bomb)


def _listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    return srv


@pytest.mark.parametrize("network", ["auto", "audit"])
def test_sandbox_network_call_is_refused(network):
    srv = _listener()
    port = srv.getsockname()[1]
    try:
        code = (f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
                "print('connected')")
        r = run_python(code, limits=SandboxConfig(network=network))
        assert r.status == "error" and "connected" not in r.stdout
        with pytest.raises(TimeoutError):
            srv.accept()  # nothing ever reached the listener
        if r.isolation["network"] == "netns":  # a fresh namespace: no interface is up
            assert "Network is unreachable" in r.stderr or "OSError" in r.stderr
        else:  # the documented fallback: the audit hook refuses sockets
            assert "network access is not allowed" in r.stderr
        if network == "audit":
            assert r.isolation["network"] == "audit"
    finally:
        srv.close()


def test_sandbox_write_outside_its_directory_is_refused(tmp_path):
    targets = [tmp_path / "outside.txt", f"/tmp/everyprompt-sandbox-probe-{uuid.uuid4().hex}", "../escape.txt"]
    for target in targets:
        r = run_python(f"open({str(target)!r}, 'w').write('x')", limits=LIMITS)
        assert r.status == "error" and "PermissionError" in r.stderr, (target, r.stderr)
    for target in targets[:2]:
        assert not os.path.exists(target)
    r = run_python(f"import os\nos.rename('a', {str(tmp_path / 'moved')!r})", limits=LIMITS)
    assert r.status == "error" and "PermissionError" in r.stderr
    r = run_python("import os\nos.system('touch /tmp/x')", limits=LIMITS)  # exec would shed the audit hook
    assert r.status == "error" and "not allowed" in r.stderr


def test_sandbox_unit_tests_report_one_by_one_and_exit_zero_does_not_pass():
    r = run_python("def f(x):\n    return x + 1", tests=["assert f(1) == 2", "assert f(2) == 4", "assert f(0) == 1"],
                   limits=LIMITS)
    assert [x["passed"] for x in r.reports] == [True, False, True]
    r = run_python("import os\nos._exit(0)", tests=["assert True"], limits=LIMITS)  # a classic reward hack
    assert r.reports == []
    r = run_python("def f():\n    while True:\n        pass", tests=["assert 1", "f()", "assert 1"], limits=LIMITS)
    assert r.status == "timeout" and [x["passed"] for x in r.reports] == [True]  # tests before the hang count
    r = run_python("print('forged')\nimport sys\nprint(sorted(vars(sys.modules['__main__'])))", tests=["assert 0"],
                   limits=LIMITS)
    assert [x["passed"] for x in r.reports] == [False]
