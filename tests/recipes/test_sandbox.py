"""The code verifier's sandbox refuses what it must, one test per threat: each program below would do harm
(or hang) outside it. Every check is local: the network test connects only to a socket this test listens on."""
import os
import socket
import textwrap
import time

import pytest

from qforge.recipes.verifiers.code import Limits, network_isolation, run_program

FAST = Limits(timeout_s=3.0, cpu_s=2)


def sandbox_processes() -> list[int]:
    """Live processes whose working directory is (or was) a sandbox directory."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if "qforge-sandbox-" in os.readlink(f"/proc/{pid}/cwd"):
                found.append(int(pid))
        except OSError:
            continue
    return found


def leftover_processes(grace_s: float = 3.0) -> list[int]:
    """Sandbox processes still alive after `grace_s` (SIGKILL of a namespace's processes lands asynchronously)."""
    deadline = time.monotonic() + grace_s
    while (found := sandbox_processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def program(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


def test_a_plain_program_runs_with_its_stdin():
    run = run_program("import sys\nprint(sum(map(int, sys.stdin.read().split())))", "2 3 4\n", limits=FAST)
    assert (run.status, run.stdout, run.returncode) == ("ok", "9\n", 0)


def test_an_infinite_loop_times_out():
    start = time.perf_counter()
    run = run_program("while True:\n    pass\n", limits=Limits(timeout_s=1.5, cpu_s=1))
    assert run.status == "timeout" and time.perf_counter() - start < 10
    assert leftover_processes() == []


def test_the_cpu_limit_stops_a_busy_program_before_the_wall_clock():
    run = run_program("while True:\n    pass\n", limits=Limits(timeout_s=60, cpu_s=1))
    assert run.status == "timeout" and run.returncode in (-24, 128 + 24) and run.seconds < 60  # SIGXCPU


def test_a_sleeping_program_hits_the_wall_clock_not_the_cpu_limit():
    run = run_program("import time\ntime.sleep(30)\n", limits=Limits(timeout_s=1.0, cpu_s=10))
    assert run.status == "timeout" and run.seconds < 5 and run.returncode is None


def test_a_fork_bomb_is_bounded_and_killed_with_its_group():
    limits = Limits(timeout_s=3.0, cpu_s=2, max_processes=8)
    run = run_program(program("""
        import os
        while True:
            if os.fork() == 0:
                print("child", flush=True)
    """), limits=limits)
    assert run.status in ("crash", "timeout")
    assert 0 < run.stdout.count("child") <= limits.max_processes  # forks beyond the budget were refused
    assert "process limit reached" in run.stderr
    assert leftover_processes() == []


def test_children_that_leave_the_group_die_with_the_sandbox():
    run = run_program(program("""
        import os, time
        for _ in range(3):
            if os.fork() == 0:
                os.setsid()  # a new session: killpg alone would miss it
                time.sleep(60)
                os._exit(0)
        print("parent done")
    """), limits=FAST)
    assert run.status == "ok" and run.stdout == "parent done\n"
    assert leftover_processes() == []


def test_new_programs_cannot_be_started():
    run = run_program("import os\nos.system('echo escaped')\n", limits=FAST)
    assert run.status == "crash" and "escaped" not in run.stdout and "os.system" in run.stderr
    run = run_program("import subprocess\nsubprocess.run(['echo', 'escaped'])\n", limits=FAST)
    assert run.status == "crash" and "escaped" not in run.stdout
    run = run_program("import ctypes\nctypes.CDLL(None).system(b'echo escaped')\n", limits=FAST)
    assert run.status == "crash" and "escaped" not in run.stdout


def test_a_memory_hog_hits_the_limit():
    run = run_program("x = bytearray(3 * 1024 ** 3)\nprint('allocated')\n", limits=Limits(memory_mb=256))
    assert run.status == "crash" and "MemoryError" in run.stderr and "allocated" not in run.stdout


def test_huge_output_is_truncated():
    limits = Limits(timeout_s=5.0, output_bytes=64 * 1024)
    run = run_program("while True:\n    print('x' * 10000)\n", limits=limits)
    assert run.truncated and run.status == "crash"
    assert len(run.stdout) == limits.output_bytes and set(run.stdout) <= {"x", "\n"}


def test_writes_outside_the_working_directory_are_refused(tmp_path):
    outside, keep = tmp_path / "escaped.txt", tmp_path / "keep.txt"
    keep.write_text("precious")
    for code in (f"open({str(outside)!r}, 'w').write('x')",
                 f"import os\nos.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT)",
                 f"import os\nos.remove({str(keep)!r})",
                 f"import os\nos.rename({str(keep)!r}, 'stolen.txt')",
                 f"import shutil\nshutil.copyfile('solution.py', {str(outside)!r})"):
        run = run_program(code, limits=FAST)
        assert run.status == "crash" and "PermissionError" in run.stderr, code
    assert not outside.exists() and keep.read_text() == "precious"
    # inside its own directory the program may write (and read back) files
    run = run_program("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())", limits=FAST)
    assert (run.status, run.stdout) == ("ok", "ok\n")


def test_environment_secrets_do_not_reach_the_program(monkeypatch):
    monkeypatch.setenv("QFORGE_TEST_SECRET", "hunter2-do-not-leak")
    run = run_program(program("""
        import os
        print(dict(os.environ))
        for pid in os.listdir('/proc'):
            if pid.isdigit():
                try:
                    print(open(f'/proc/{pid}/environ', 'rb').read())
                except OSError as error:
                    print('refused', pid, type(error).__name__)
        try:
            print(open(f'/proc/{os.getppid()}/environ', 'rb').read())
        except OSError as error:
            print('refused parent', type(error).__name__)
    """), limits=FAST)
    assert run.status == "ok", run.stderr
    assert "hunter2" not in run.stdout and "QFORGE_TEST_SECRET" not in run.stdout
    assert "'PATH': '/usr/bin:/bin'" in run.stdout


@pytest.mark.parametrize("block_sockets", [None, True])
def test_a_network_socket_reaches_nothing(block_sockets):
    """None: the default (a fresh network namespace when available); True: the audit hook as well/instead."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        run = run_program(program(f"""
            import socket
            s = socket.create_connection(('127.0.0.1', {port}), timeout=2)
            s.sendall(b'leak')
            print('connected')
        """), limits=FAST, block_sockets=block_sockets)
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()
    assert run.status == "crash" and "connected" not in run.stdout
    if block_sockets:
        assert "sandbox: no network" in run.stderr
    elif network_isolation() == "namespace":
        assert "Network is unreachable" in run.stderr  # the namespace, not the hook, refused it


def test_scientific_python_still_imports_inside_the_limits():
    run = run_program("import numpy as np\nprint(int(np.arange(5).sum()))", limits=Limits(timeout_s=10))
    assert (run.status, run.stdout) == ("ok", "10\n"), run.stderr
