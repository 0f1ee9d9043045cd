"""optim.state_dtype: AdamW with fp32 moments (torch's fused AdamW, unchanged) or bf16 moments over fp32 weights,
checked against an fp64 closed form, under FSDP2 with a bitwise checkpoint round trip, and in a tiny run.

Run as a script under torchrun it is one rank of the 2-rank test:  test_optim.py <result dir>
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

BETAS, EPS, WD = (0.9, 0.95), 1e-8, 0.1


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))


def _batches(steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 24, generator=generator), torch.randn(16, 8, generator=generator)) for _ in range(steps)]


def _settings(**extra):
    from qforge.engine.train.config import OptimSettings

    return OptimSettings(**{"lr": 1e-2, "betas": BETAS, "eps": EPS, "weight_decay": WD, "warmup_steps": 2,
                            "schedule": "cosine", "min_lr_ratio": 0.1} | extra)


def _fsdp_worker(results: str):
    """Rank of a 2-rank gloo run: FSDP2 + bf16-moment AdamW + LambdaLR, saved and resumed with the trainer's
    checkpoint code; the resumed run must repeat the uninterrupted one bit for bit."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from qforge.engine.train.optim import build_optimizer, build_scheduler
    from qforge.engine.train.parallel import Dist
    from qforge.engine.train.resume import load_checkpoint, save_checkpoint

    dist.init_process_group("gloo")
    dist_ = Dist(dist.get_rank(), dist.get_world_size(), torch.device("cpu"))
    out, steps, saved_at = Path(results), 6, 3
    data = _batches(steps, seed=1 + dist_.rank)  # each rank its own batches (FSDP reduces the gradients)

    def run(seed: int, start: int, resume: Path | None):
        model = _model(seed)
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        optimizer = build_optimizer(model, _settings(state_dtype="bf16"))
        scheduler = build_scheduler(optimizer, steps, _settings())
        if resume is not None:
            load_checkpoint(resume, model, optimizer, scheduler, dist_)
        losses = []
        for step in range(start, steps):
            x, y = data[step]
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            losses.append(loss.item())
            if step + 1 == saved_at and resume is None:
                save_checkpoint(out / "run", saved_at, model, optimizer, scheduler, {}, {}, dist_, keep_last=2)
        return model, optimizer, losses

    full, _, full_losses = run(seed=0, start=0, resume=None)
    resumed, optimizer, resumed_losses = run(seed=7, start=saved_at, resume=out / "run/checkpoints" / f"step-{saved_at}")
    moments = [state[key] for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
    same = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(full.parameters(), resumed.parameters()))
    result = {"full": full_losses, "resumed": resumed_losses, "same_weights": same,
              "moments": sorted({(str(m.dtype), isinstance(m, DTensor)) for m in moments}),
              "local_rows": [m.to_local().shape[0] for m in moments], "rows": [m.shape[0] for m in moments]}
    (out / f"rank{dist_.rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    _fsdp_worker(sys.argv[1])
    sys.exit(0)

import pytest  # noqa: E402  (the worker above runs without pytest)
from tiny_run import tiny_overrides, tiny_run_files  # noqa: E402,F401 (fixture)

from qforge.engine.config_io import ConfigKeyError, load_config  # noqa: E402
from qforge.engine.errors import CheckpointError  # noqa: E402
from qforge.engine.train import FFTConfig, train  # noqa: E402
from qforge.engine.train.optim import BF16StateAdamW, build_optimizer, build_scheduler  # noqa: E402


def _steps(model, optimizer, scheduler, data) -> list[dict]:
    """Trains over `data`; returns per-step lr and gradients (the closed form replays them)."""
    trace = []
    for x, y in data:
        torch.nn.functional.mse_loss(model(x), y).backward()
        trace.append({"lr": optimizer.param_groups[0]["lr"],
                      "grads": [p.grad.detach().clone() for p in model.parameters()]})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return trace


def test_fp32_states_are_torch_fused_adamw_bit_for_bit():
    model, reference = _model(0), _model(0)
    optimizer = build_optimizer(model, _settings())
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"]
    torch_adamw = torch.optim.AdamW([{"params": [reference[0].weight, reference[2].weight], "weight_decay": WD},
                                     {"params": [reference[0].bias, reference[2].bias], "weight_decay": 0.0}],
                                    lr=1e-2, betas=BETAS, eps=EPS, fused=True)
    data = _batches(5)
    _steps(model, optimizer, build_scheduler(optimizer, 5, _settings()), data)
    _steps(reference, torch_adamw, build_scheduler(torch_adamw, 5, _settings()), data)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def _closed_form(initial, trace, decays, moment_dtype):
    """AdamW in fp64 (Loshchilov & Hutter, decoupled decay; torch's bias correction), each moment stored in
    `moment_dtype` after its update and read back from it."""
    out = []
    for index, (w, weight_decay) in enumerate(zip(initial, decays)):
        w, m, v = w.double(), torch.zeros_like(w, dtype=torch.float64), torch.zeros_like(w, dtype=torch.float64)
        for t, step in enumerate(trace, start=1):
            g, lr = step["grads"][index].double(), step["lr"]
            m_new = BETAS[0] * m + (1 - BETAS[0]) * g
            v_new = BETAS[1] * v + (1 - BETAS[1]) * g * g
            m_hat, v_hat = m_new / (1 - BETAS[0] ** t), v_new / (1 - BETAS[1] ** t)
            w = w * (1 - lr * weight_decay) - lr * m_hat / (v_hat.sqrt() + EPS)
            m, v = m_new.to(moment_dtype).double(), v_new.to(moment_dtype).double()
        out.append((w, m, v))
    return out


def test_bf16_states_match_the_fp64_closed_form_with_bf16_moments():
    """Six steps through warmup and cosine decay (lr changes every step), weight decay on the matrices only."""
    model = _model(0)
    initial = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(model, _settings(state_dtype="bf16"))
    assert isinstance(optimizer, BF16StateAdamW)
    trace = _steps(model, optimizer, build_scheduler(optimizer, 6, _settings()), _batches(6))
    assert len({step["lr"] for step in trace}) == 5  # warmup 0.5, 1.0, then cosine 1.0 → 0.1
    decays = [WD if p.ndim == 2 else 0.0 for p in model.parameters()]
    expected = _closed_form(initial, trace, decays, torch.bfloat16)
    unrounded = _closed_form(initial, trace, decays, torch.float64)
    worst, worst_unrounded = 0.0, 0.0
    for param, (w, m, v), (w_fp64_moments, _, _) in zip(model.parameters(), expected, unrounded):
        state = optimizer.state[param]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16 and param.dtype == torch.float32
        assert state["step"] == 6
        # fp32 arithmetic vs fp64 may round a moment to the neighbouring bf16 value, rarely: at most one ulp
        for got, want in ((state["exp_avg"], m), (state["exp_avg_sq"], v)):
            ulp = torch.finfo(torch.bfloat16).eps * want.abs()
            assert ((got.double() - want).abs() <= ulp).all()
            assert (got.double() == want).double().mean() >= 0.99
        worst = max(worst, (param.double() - w).abs().max().item())
        worst_unrounded = max(worst_unrounded, (param.double() - w_fp64_moments).abs().max().item())
    # the weights follow the bf16-moment closed form far closer than the fp64-moment one (the test can tell them apart)
    # (here 5e-8 against 1e-4: fp32 arithmetic against fp64, vs. the moments' bf16 rounding)
    assert worst < 1e-6 and worst_unrounded > 1e-5, (worst, worst_unrounded)


def test_fsdp2_checkpoint_round_trip_with_bf16_states_is_bitwise(tmp_path):
    """2 gloo ranks: the moments are bf16 DTensors sharded like their parameters, saved by torch DCP through the
    trainer's checkpoint code and loaded back without becoming fp32; the resumed steps repeat the run exactly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["moments"] == [["torch.bfloat16", True]]
        assert result["local_rows"] == [math.ceil(rows / 2) if rank == 0 else rows - math.ceil(rows / 2)
                                        for rows in result["rows"]]
        assert result["resumed"] == result["full"][3:] and result["same_weights"]


@pytest.mark.parametrize("override, message", [
    ("optim.state_dtype=fp16", "'optim.state_dtype' must be one of ['fp32', 'bf16'], got 'fp16'"),
    ("optim.betas=[0.9, 0.999]", "optim.state_dtype: bf16 needs optim.betas ≤ 0.99"),
])
def test_bad_state_dtype_is_a_one_line_config_error(tiny_run_files, tmp_path, override, message):
    overrides = tiny_overrides(tiny_run_files, tmp_path, **{"optim.state_dtype": "bf16"}) + [override]
    with pytest.raises(ConfigKeyError) as error:
        load_config(FFTConfig, None, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_tiny_run_with_bf16_states_learns_like_fp32_states(tiny_run_files, tmp_path):
    """The trainer end to end (random-init Qwen3, real tokenizer, lr 3e-3 with warmup and cosine decay)."""
    steps = {"train.max_steps": 12}
    runs = {dtype: train(load_config(FFTConfig, None, tiny_overrides(
        tiny_run_files, tmp_path / dtype, **steps, **{"optim.state_dtype": dtype}))).losses
        for dtype in ("fp32", "bf16")}
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert fp32[0] - fp32[-1] > 0.4 and bf16 != fp32  # it learns, and the bf16 moments did change the updates
    # Rounding a moment to bf16 moves it by ≤ 2^-9 of itself, so each update moves by about that fraction of
    # itself and, to first order, the loss by that fraction of what the updates gained (here: 1.4e-5 of 0.54).
    progress = [fp32[0] - loss for loss in fp32]
    assert all(abs(a - b) <= 2**-9 * max(p, 0.01) for a, b, p in zip(bf16, fp32, progress)), (fp32, bf16)

    # Resuming the bf16-moment run's checkpoint with fp32 moments is refused by name, not as generic damage.
    with pytest.raises(CheckpointError, match="optim.state_dtype"):
        train(load_config(FFTConfig, None, tiny_overrides(tiny_run_files, tmp_path / "bf16", **{
            "train.max_steps": 13, "train.resume": "auto", "optim.state_dtype": "fp32"})))


def test_bf16_parameters_keep_torch_fused_adamw():
    """train.precision: bf16 — the moments already are bf16 (the parameter dtype): the fused kernel stays."""
    model = _model(0).to(torch.bfloat16)
    optimizer = build_optimizer(model, _settings(state_dtype="bf16"))
    assert type(optimizer) is torch.optim.AdamW
    _steps(model, optimizer, build_scheduler(optimizer, 1, _settings()), [(x.bfloat16(), y.bfloat16())
                                                                          for x, y in _batches(1)])
    assert {s["exp_avg"].dtype for s in optimizer.state.values()} == {torch.bfloat16}
