"""The preflight's checks, and the guard that the checkout root never shadows an installed `kernels`/`engine`."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qforge.engine import preflight
from qforge.engine.errors import SetupError

ROOT = Path(__file__).resolve().parents[2]


def clean_env(**extra) -> dict:
    """The environment a user's shell gives a command: no PYTHONSAFEPATH/PYTHONPATH from this test run."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    return {**env, **extra}


def run(args, env=None, cwd=ROOT):
    return subprocess.run(args, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=180)


def test_this_process_imports_installed_packages_not_the_checkout():
    assert all(Path(entry or ".").resolve() != ROOT for entry in sys.path)
    for name in preflight.SHADOWABLE:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.has_location:  # a regular package or module (HF's `kernels` with transformers 5.x)
            assert not Path(spec.origin).resolve().is_relative_to(ROOT)
    preflight.check_import_root()


def test_preflight_refuses_a_shadowing_launch_and_passes_the_documented_ones():
    """`python -m` from the repository root puts the root first on sys.path: the preflight must stop it with
    one line; the launches the Makefile and README use must pass it."""
    shadowed = run([sys.executable, "-m", "qforge.recipes.fft", "--config", "no-such.yaml"])
    assert shadowed.returncode == SetupError.exit_code, shadowed.stderr
    assert "import kernels` resolves to" in shadowed.stderr and "Traceback" not in shadowed.stderr
    assert len(shadowed.stderr.strip().splitlines()) == 1

    # The same command as the Makefile runs it (PYTHONSAFEPATH=1), the script form and the console script:
    # preflight passes, so the run gets as far as the config file (exit 2, ConfigError).
    for args, env in (([sys.executable, "-m", "qforge.recipes.fft"], clean_env(PYTHONSAFEPATH="1")),
                      ([sys.executable, str(ROOT / "recipes/fft.py")], None),
                      ([str(Path(sys.executable).parent / "qforge"), "fft"], None)):
        if not Path(args[0]).exists():
            pytest.skip(f"{args[0]} is not installed (pip install -e .)")
        done = run([*args, "--config", "no-such.yaml"], env=env)
        assert done.returncode == 2 and "config file no-such.yaml does not exist" in done.stderr, (args, done.stderr)


def test_plain_python_m_pytest_from_the_root_collects_with_transformers_importing_kernels():
    """`python -m pytest` (pytest's documented form) from the root: conftest takes the root off sys.path
    before transformers is imported."""
    done = run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                "tests/engine/test_rope_scaling.py"])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_makefile_keeps_the_root_off_sys_path():
    text = (ROOT / "Makefile").read_text()
    assert "export PYTHONSAFEPATH := 1" in text


@pytest.mark.parametrize("version", ["2.9.1+cu128", "2.12.0", "1.13.1"])
def test_an_older_torch_is_refused_in_one_line_naming_both_versions(monkeypatch, version):
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(SetupError) as caught:
        preflight.preflight()
    message = str(caught.value)
    assert f"torch {version} is installed" in message and "torch>=2.13" in message and "\n" not in message


def test_the_floor_in_the_metadata_is_the_floor_the_preflight_checks():
    import tomllib
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_req = next(req for req in meta["project"]["dependencies"] if req.startswith("torch"))
    assert torch_req == "torch>=" + ".".join(map(str, preflight.TORCH_FLOOR))
    assert preflight.version_tuple(torch.__version__) >= preflight.TORCH_FLOOR


def test_preflight_logs_versions_and_backends_once(caplog):
    caplog.set_level("INFO", logger="qforge.preflight")
    found = preflight.preflight(torch.device("cpu"), torch.float32)
    assert found["backends"] == {"attention": "sdpa", "rms_norm": "torch", "rope": "torch", "swiglu": "torch",
                                 "cross_entropy": "torch", "kl": "torch"}
    assert found["versions"]["torch"] == torch.__version__
    lines = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("versions: python") for line in lines)
    assert any(line.startswith("backends on cpu/float32: attention sdpa") for line in lines)


def test_cuda_backends_follow_the_installed_libraries(monkeypatch):
    """On CUDA in bf16 the kernels are Triton's and attention takes the best varlen kernel installed."""
    from qforge.engine import attention
    monkeypatch.setattr(attention, "_flash_attn_varlen", lambda: None)
    found = preflight.op_backends(torch.device("cuda"), torch.bfloat16)
    assert found["rms_norm"] == "triton" and found["attention"] in ("torch_varlen", "sdpa")
    monkeypatch.setattr(attention, "_flash_attn_varlen", lambda: object())
    assert preflight.op_backends(torch.device("cuda"), torch.bfloat16)["attention"] == "flash_attn"
    assert preflight.op_backends(torch.device("cuda"), torch.float32)["attention"] == "sdpa"
