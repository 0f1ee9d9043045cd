"""Code answers verified by running them: APPS/TACO tests (stdin → stdout, or call-based: a function name and
argument lists) against the completion's last fenced code block, each test in a sandboxed subprocess.

The sandbox, layer by layer (docs/reasoning-data.md says what each one does and does not stop):
- a fresh temporary working directory, removed afterwards; the environment is PATH, LANG, HOME/TMPDIR (the
  directory) and PYTHONHASHSEED only, so no secret of the parent reaches the program;
- `unshare --net --pid --mount --fork --kill-child --mount-proc` when the machine allows it: a network
  namespace with only a down loopback (no socket reaches anything, 127.0.0.1 included), a PID namespace whose
  processes all die with it (children that call setsid() too) and a private /proc (other processes and their
  environments are invisible); without it, sockets are refused by the audit hook below and the process group
  is killed;
- resource limits: RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE (stdout/stderr and files: output beyond the
  limit is cut and the test fails), RLIMIT_NPROC, RLIMIT_CORE=0, plus a wall-clock timeout after which the
  whole process group is killed;
- a Python audit hook installed before the program runs: no writes outside the working directory, no reads of
  other processes' /proc entries, no exec/spawn/system/subprocess (a child can only be a fork of the program,
  which inherits the hook), at most `max_processes` forks over the whole tree (Linux does not enforce
  RLIMIT_NPROC for root), no foreign function lookups or calls through ctypes. Audit hooks are not a security
  boundary (Python's docs say so): they stop accidents and naive escapes of model-written code, not a
  determined attacker.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace

from qforge.engine.thinking import split_think
from qforge.recipes.verifiers import Verdict

FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.S)
PARSE_ERROR_EXIT = 97
UNSHARE = ["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc"]


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 6.0  # wall clock per test (interpreter start included)
    cpu_s: int = 4  # RLIMIT_CPU per process
    memory_mb: int = 512  # RLIMIT_AS
    output_bytes: int = 1 << 20  # stdout and stderr each; also the largest file the program may write
    max_processes: int = 16  # forks over the whole tree, and RLIMIT_NPROC


@dataclass(frozen=True)
class Run:
    status: str  # ok | timeout | crash | parse_error
    stdout: str
    stderr: str
    returncode: int | None
    seconds: float
    truncated: bool = False  # output hit Limits.output_bytes


@dataclass(frozen=True)
class CaseVerdict:
    status: str  # pass | fail | timeout | crash | parse_error
    seconds: float
    detail: str = ""


# Runs inside the sandbox as `python -I -c HARNESS CONFIG`: limits, the audit hook, then the program.
HARNESS = r'''
import json, os, resource, sys
if os.getpid() == 1:  # init of the PID namespace ignores signals it has no handler for (SIGXCPU): run as its child
    child = os.fork()
    while child:
        pid, status = os.wait()  # init also reaps the orphans
        if pid == child:
            os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
config = json.loads(sys.argv[1])
limits = config["limits"]
resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] << 20,) * 2)
resource.setrlimit(resource.RLIMIT_FSIZE, (limits["output_bytes"] + 1,) * 2)
resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"],) * 2)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
root = os.path.realpath(config["root"])
with open(os.path.join(root, "solution.py"), encoding="utf-8") as file:
    source = file.read()
try:
    code = compile(source, "solution.py", "exec")
except (SyntaxError, ValueError) as error:
    print(f"{type(error).__name__}: {error}", file=sys.stderr)
    sys.exit(97)
call_args = None
if config["fn_name"]:
    with open(os.path.join(root, "args.json"), encoding="utf-8") as file:
        call_args = json.load(file)
forks = os.open(os.path.join(root, ".forks"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
result_path = os.path.join(root, "result.json")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1, "os.truncate": 1,
               "os.utime": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2, "shutil.rmtree": 1,
               "shutil.copyfile": 2, "shutil.copymode": 2, "shutil.copystat": 2, "shutil.move": 2}
NO_PROGRAMS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "pty.spawn",
               "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function"}  # importing ctypes (numpy does) is fine
NO_MODULES = {"_posixsubprocess"}
SOCKETS = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto"}
block_sockets = config["block_sockets"]


def inside(path):
    if isinstance(path, int):
        return True
    path = os.path.realpath(os.fsdecode(path))
    return path == root or path.startswith(root + os.sep)


def foreign_proc(path):
    if isinstance(path, int):
        return False
    parts = os.path.realpath(os.fsdecode(path)).split(os.sep)
    return len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and int(parts[2]) != os.getpid()


def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS
        if path is not None and writes and not inside(path):
            raise PermissionError(f"sandbox: no writes outside the working directory ({path})")
        if path is not None and foreign_proc(path):
            raise PermissionError(f"sandbox: no access to other processes ({path})")
    elif event in PATH_EVENTS:
        for path in args[:PATH_EVENTS[event]]:
            if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                raise PermissionError(f"sandbox: {event} outside the working directory ({path})")
    elif event in NO_PROGRAMS or (event == "import" and args[0] in NO_MODULES):
        raise PermissionError(f"sandbox: {event} {args[0] if args else ''} is not allowed")
    elif event in ("os.fork", "os.forkpty"):
        os.write(forks, b"x")
        if os.fstat(forks).st_size > limits["max_processes"]:
            raise PermissionError("sandbox: process limit reached")
    elif block_sockets and event in SOCKETS:
        raise PermissionError(f"sandbox: no network ({event})")


sys.addaudithook(hook)
del hook
namespace = {"__name__": "__main__" if call_args is None else "solution", "__builtins__": __builtins__}
exec(code, namespace)
if call_args is not None:
    name = config["fn_name"]
    function = namespace.get(name)
    if function is None and "Solution" in namespace:
        function = getattr(namespace["Solution"](), name, None)
    if function is None:
        raise NameError(f"the program defines no function {name!r}")
    value = function(*call_args)
    with open(result_path, "w", encoding="utf-8") as file:
        json.dump(list(value) if isinstance(value, tuple) else value, file, default=repr)
'''


def _isolation() -> list[str]:
    """The namespace wrapper this machine allows (root: plain unshare; others: with a user namespace), or []."""
    global _PREFIX
    with _PREFIX_LOCK:
        if _PREFIX is None:
            _PREFIX = []
            if shutil.which("unshare"):
                for prefix in (UNSHARE, UNSHARE[:1] + ["--user", "--map-root-user"] + UNSHARE[1:]):
                    probe = subprocess.run(prefix + ["true"], capture_output=True, timeout=30)
                    if probe.returncode == 0:
                        _PREFIX = prefix
                        break
        return _PREFIX


_PREFIX: list[str] | None = None
_PREFIX_LOCK = threading.Lock()


def network_isolation() -> str:
    """"namespace" (a fresh network namespace) or "audit_hook" (sockets refused by the harness)."""
    return "namespace" if _isolation() else "audit_hook"


def _read(path: str, limit: int) -> tuple[str, bool]:
    with open(path, "rb") as file:
        data = file.read(limit + 1)
    return data[:limit].decode("utf-8", "replace"), len(data) > limit


def run_program(source: str, stdin: str = "", *, fn_name: str | None = None, args: list | None = None,
                limits: Limits = Limits(), block_sockets: bool | None = None) -> Run:
    """Runs `source` once in the sandbox: as a script reading `stdin`, or (with fn_name) calling
    fn_name(*args), whose JSON return value becomes `stdout`. block_sockets: refuse sockets in the audit hook
    (default: when no network namespace is available)."""
    prefix = _isolation()
    if block_sockets is None:
        block_sockets = not prefix
    root = tempfile.mkdtemp(prefix="qforge-sandbox-")
    try:
        with open(os.path.join(root, "solution.py"), "w", encoding="utf-8") as file:
            file.write(source)
        if fn_name is not None:
            with open(os.path.join(root, "args.json"), "w", encoding="utf-8") as file:
                json.dump(list(args or []), file)
        with open(os.path.join(root, "stdin"), "w", encoding="utf-8") as file:
            file.write(stdin)
        config = json.dumps({"root": root, "fn_name": fn_name, "limits": asdict(limits),
                             "block_sockets": block_sockets})
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": root, "TMPDIR": root, "PYTHONHASHSEED": "0"}
        out, err = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        start = time.perf_counter()
        with open(os.path.join(root, "stdin"), "rb") as i, open(out, "wb") as o, open(err, "wb") as e:
            process = subprocess.Popen(prefix + [sys.executable, "-I", "-c", HARNESS, config], stdin=i, stdout=o,
                                       stderr=e, cwd=root, env=env, start_new_session=True)
        timed_out = False
        try:
            process.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # the whole group goes, whether the program ended or not (children it left behind)
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        seconds = time.perf_counter() - start
        stdout, cut_out = _read(out, limits.output_bytes)
        stderr, cut_err = _read(err, limits.output_bytes)
        code = process.returncode
        if fn_name is not None and code == 0:
            result = os.path.join(root, "result.json")
            stdout = open(result, encoding="utf-8").read() if os.path.exists(result) else ""
        cpu_killed = code in (-signal.SIGXCPU, 128 + signal.SIGXCPU)
        if timed_out or cpu_killed:
            status = "timeout"
        elif code == PARSE_ERROR_EXIT:
            status = "parse_error"
        else:
            status = "ok" if code == 0 and not (cut_out or cut_err) else "crash"
        return Run(status, stdout, stderr, None if timed_out else code, seconds, cut_out or cut_err)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _as_text(value) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _number(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


def stdout_matches(got: str, expected) -> bool:
    """APPS-style: the same whitespace-separated tokens, numbers equal to 1e-6 (relative or absolute)."""
    mine, theirs = got.split(), _as_text(expected).split()
    if len(mine) != len(theirs):
        return False
    for a, b in zip(mine, theirs):
        if a == b:
            continue
        x, y = _number(a), _number(b)
        if x is None or y is None or abs(x - y) > 1e-6 * max(1.0, abs(y)):
            return False
    return True


def call_matches(got, expected) -> bool:
    """APPS call-based: the return value equals the expected output, or its only element (APPS wraps it)."""
    if got == expected:
        return True
    return isinstance(expected, list) and len(expected) == 1 and got == expected[0]


def extract_code(completion: str) -> str | None:
    """The last fenced code block of the completion's answer (after any think block)."""
    blocks = FENCE.findall(split_think(completion)[1])
    return blocks[-1][1] if blocks else None


def parse_tests(tests) -> dict:
    """APPS/TACO `input_output` (a dict or its JSON string): inputs, outputs, optional fn_name."""
    if isinstance(tests, str):
        tests = json.loads(tests)
    if not isinstance(tests, dict) or not isinstance(tests.get("inputs"), list) \
            or not isinstance(tests.get("outputs"), list) or len(tests["inputs"]) != len(tests["outputs"]):
        raise ValueError("code tests must be {'inputs': [...], 'outputs': [...] of the same length, "
                         "optional 'fn_name'} (APPS/TACO input_output)")
    return tests


def run_tests(source: str, tests, limits: Limits = Limits()) -> list[CaseVerdict]:
    """Every test of one problem, in order. A program that does not compile fails each test as parse_error
    without being started."""
    tests = parse_tests(tests)
    try:
        compile(source, "solution.py", "exec")
    except (SyntaxError, ValueError) as error:
        return [CaseVerdict("parse_error", 0.0, f"{type(error).__name__}: {error}")] * len(tests["inputs"])
    fn_name, results = tests.get("fn_name"), []
    for given, expected in zip(tests["inputs"], tests["outputs"]):
        if fn_name:
            run = run_program(source, fn_name=fn_name, args=given, limits=limits)
        else:
            run = run_program(source, _as_text(given), limits=limits)
        if run.status != "ok":
            why = "output limit exceeded (truncated)" if run.truncated else (run.stderr.strip().splitlines()
                                                                            or [f"exit {run.returncode}"])[-1]
            results.append(CaseVerdict(run.status, run.seconds, why[:300]))
            continue
        if fn_name:
            try:
                ok = call_matches(json.loads(run.stdout), expected)
            except ValueError:
                ok = False
        else:
            ok = stdout_matches(run.stdout, expected)
        results.append(CaseVerdict("pass" if ok else "fail", run.seconds,
                                  "" if ok else f"expected {_as_text(expected)[:80]!r}, got {run.stdout[:80]!r}"))
    return results


def problem_verdict(results: list[CaseVerdict]) -> Verdict:
    """Passed when every test passed; otherwise the status of the first test that did not."""
    passed = sum(r.status == "pass" for r in results)
    failed = next((i, r) for i, r in enumerate(results) if r.status != "pass") if passed < len(results) else None
    if failed is None:
        return Verdict(bool(results), 1.0 if results else 0.0, "pass" if results else "fail",
                       f"{passed}/{len(results)} tests passed")
    index, first = failed
    return Verdict(False, passed / len(results), first.status,
                   f"{passed}/{len(results)} tests passed; test {index}: {first.status} {first.detail}".strip())


def verify(completion: str, reference: dict) -> Verdict:
    """reference: {"tests": APPS input_output, optional "limits": {Limits field: value}}."""
    if "tests" not in reference:
        raise ValueError(f"verifier 'code': the reference has no 'tests' (keys: {sorted(reference)})")
    source = extract_code(completion)
    if source is None:
        return Verdict.of(None, "no fenced code block")
    try:
        limits = replace(Limits(), **reference.get("limits", {}))
    except TypeError:
        raise ValueError(f"verifier 'code': reference limits {sorted(reference['limits'])} must be among "
                         f"{sorted(asdict(Limits()))}") from None
    return problem_verdict(run_tests(source, reference["tests"], limits))
