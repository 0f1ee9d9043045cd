"""The first GPU day in one command, with a verdict that can be trusted: one PASS/FAIL line and a JSON report.

    python benchmarks/gpu_smoke.py [--out runs/gpu_smoke]     # one or two CUDA GPUs (benchmarks/gpu_smoke.sh)
    python benchmarks/gpu_smoke.py --cpu                      # the dry run: every stage that can run on CPU

Stages (each one's result, duration and log in OUT/report.json; the verdict is the AND of the `verdict` stages):
- kernel_tests: tests/kernels on the default device (CUDA tensors + compiled Triton on a GPU, the Triton
  interpreter under --cpu), all of them (no -x): one failure does not hide the rest.
- train: a tiny HF checkpoint trained through `train()` as the recipes run it: bf16-mixed (autocast on one
  device), vocab.restrict=data, activation checkpointing, checkpoints every 2 steps; resumed from step 2 in a
  second output dir (the first resumed loss bitwise equal, and on CPU every loss and the final weights; CUDA's
  flash-attn backward accumulates with atomics, so later GPU steps are compared to 1e-3); the HF export reloaded
  by transformers, its logits against qforge's on the same weights.
- dpo / distill: one DPO step (cached reference: the policy starts as its reference, so the loss is log 2) and one
  off-policy distillation step (the train stage's export teaches the base) through the recipes' `run`.
- fsdp_nccl (two or more GPUs): the same fp32 steps under torchrun with two ranks (NCCL, FSDP2): losses equal
  the one-GPU run's to 1e-4.
- throughput: bf16-mixed steps (fp32 master weights, autocast) at the Qwen3-0.6B shape (--cpu: a tiny one):
  measured tokens/s and MFU (against the measured bf16 matmul peak and the datasheet's) next to the GPU twin's
  roofline bound for the same shapes; the ratio calibrates the twin. Reported, not a verdict.
- liger (GPU): benchmarks/kernel_bench.py against Liger-Kernel and HF eager. Reported, not a verdict.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # fft_smoke's batch and model shape (PYTHONSAFEPATH keeps it off)

TINY_CHECKPOINT = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=64,
                       intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048,
                       tie_word_embeddings=False, torch_dtype="float32")
TRAIN_STEPS, SAVE_EVERY, RESUME_FROM = 4, 2, 2


class StageFailed(Exception):
    """A stage's check did not hold (its message is the report's reason)."""


def check(condition: bool, message: str):
    if not condition:
        raise StageFailed(message)


# --- the tiny run ------------------------------------------------------------------------------------------------
def tiny_checkpoint(root: Path) -> dict:
    """A random-init tiny Qwen3 saved as an HF checkpoint with the real Qwen3 tokenizer, and a data slice."""
    import torch

    from qforge.engine import Qwen3Config, save_model
    from qforge.engine.model import Qwen3
    from qforge.engine.train.build import resolve_tokenizer_dir
    from qforge.engine.train.config import ModelSettings

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(TINY_CHECKPOINT))
    model = Qwen3(Qwen3Config.from_json(root / "config.json"))
    model.init_weights(seed=0)
    tokenizer = resolve_tokenizer_dir(ModelSettings(tokenizer="qwen3", config=str(root / "config.json")))
    save_model(model.to(torch.bfloat16), root / "base", tokenizer_dir=tokenizer)
    rows = (REPO / "recipes/data/vi_arith_train.jsonl").read_text(encoding="utf-8").splitlines()
    (root / "train.jsonl").write_text("\n".join(rows[:24]) + "\n", encoding="utf-8")
    pairs = []
    for row, other in zip(rows[:16], rows[16:32]):
        messages = json.loads(row)["messages"]
        pairs.append({"messages": messages[:-1], "chosen": messages[-1]["content"],
                      "rejected": json.loads(other)["messages"][-1]["content"]})
    (root / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs),
                                      encoding="utf-8")
    return {"base": str(root / "base"), "train": str(root / "train.jsonl"), "pairs": str(root / "pairs.jsonl"),
            "cache": str(root / "cache")}


def run_overrides(files: dict, out: Path, device: str, **extra) -> list[str]:
    settings = {"model.path": files["base"], "data.train": f"[{files['train']}]", "data.max_tokens": 1024,
                "data.cache_dir": files["cache"], "vocab.restrict": "data", "optim.lr": 1e-3,
                "optim.warmup_steps": 1, "train.max_steps": TRAIN_STEPS, "train.save_every": SAVE_EVERY,
                "train.keep_last": 5, "train.precision": "bf16-mixed", "train.activation_checkpointing": True,
                "train.seed": 0, "train.device": device, "output.dir": str(out), "output.progress": False,
                "output.tensorboard": False}
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]


def stage_train(args, files) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from qforge.engine import load_model
    from qforge.engine.config_io import load_config
    from qforge.engine.train import FFTConfig, train

    device = "cpu" if args.cpu else "cuda"
    out = args.out / "train"
    full = train(load_config(FFTConfig, None, run_overrides(files, out / "full", device)))
    check(len(full.losses) == TRAIN_STEPS and all(map(math.isfinite, full.losses)), f"losses {full.losses}")
    resumed = train(load_config(FFTConfig, None, run_overrides(
        files, out / "resumed", device, **{"train.resume": str(out / f"full/checkpoints/step-{RESUME_FROM}")})))
    expected = full.losses[RESUME_FROM:]
    check(resumed.losses[:1] == expected[:1], f"first loss after resume {resumed.losses[:1]} != {expected[:1]} "
                                              "(not bitwise: the checkpoint did not restore the state exactly)")
    drift = max(abs(a - b) / abs(b) for a, b in zip(resumed.losses, expected))
    if args.cpu:
        check(resumed.losses == expected, f"resumed losses {resumed.losses} != uninterrupted {expected}")
        finals = [load_model(d, dtype=torch.float32) for d in (full.final_dir, resumed.final_dir)]
        for (name, a), (_, b) in zip(*(m.named_parameters() for m in finals)):
            check(torch.equal(a, b), f"final weights differ after resume: {name}")
    else:
        check(drift <= 1e-3, f"resumed losses drift {drift:.2e} from the uninterrupted run")
    ours = load_model(full.final_dir, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(full.final_dir, dtype=torch.float32)
    ids = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 0, 151645]])
    with torch.no_grad():
        theirs, mine = hf(ids).logits[0], ours(ids[0])
    error = float((theirs - mine).abs().max() / theirs.abs().max())
    check(error < 1e-4, f"exported checkpoint: transformers' logits differ from qforge's by {error:.2e} (relative)")
    return {"losses": full.losses, "resumed_losses": resumed.losses, "resume_bitwise": resumed.losses == expected,
            "resume_max_relative_drift": drift, "export_logits_relative_error": error,
            "final_dir": str(full.final_dir)}


def stage_dpo(args, files) -> dict:
    from qforge.engine.config_io import load_config
    from qforge.recipes.dpo import DPOConfig, run

    out = args.out / "dpo"
    overrides = run_overrides(files, out, "cpu" if args.cpu else "cuda", **{
        "data.train": f"[{files['pairs']}]", "train.max_steps": 1, "train.save_every": 0, "dpo.reference": "cached"})
    check(run(load_config(DPOConfig, None, overrides)) == 0, "the DPO recipe did not finish")
    record = next(r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r)
    # the policy starts as the reference: every margin is 0 and −log σ(0) = log 2
    check(abs(record["loss"] - math.log(2)) < 1e-3, f"first DPO loss {record['loss']} != log 2")
    return {"loss": record["loss"], "expected": math.log(2)}


def stage_distill(args, files) -> dict:
    from qforge.engine.config_io import load_config
    from qforge.recipes.distill import DistillConfig, run

    teacher = args.out / "train/full/final"  # the train stage's export: its top-k lie in the kept vocabulary
    check((teacher / "kept_ids.json").is_file(), f"{teacher}: no trained teacher (the train stage failed)")
    out = args.out / "distill"
    overrides = run_overrides(files, out, "cpu" if args.cpu else "cuda", **{
        "distill.teacher": str(teacher), "distill.top_k": 8, "train.max_steps": 1, "train.save_every": 0,
        "evaluate.data": "null"})
    check(run(load_config(DistillConfig, None, overrides)) == 0, "the distillation recipe did not finish")
    record = next(r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r)
    # the base student against its trained self: a KL that is positive and below log V
    check(0 < record["loss"] < math.log(TINY_CHECKPOINT["vocab_size"]), f"first KL {record['loss']}")
    return {"loss": record["loss"], "teacher": str(teacher)}


def stage_fsdp_nccl(args, files) -> dict:
    import torch

    if args.cpu or torch.cuda.device_count() < 2:
        return {"skipped": f"{0 if args.cpu else torch.cuda.device_count()} CUDA GPU(s): needs two"}
    runs = {}
    for name, launcher in (("one_gpu", [sys.executable]),
                           ("fsdp_2gpu", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node=2"])):
        out = args.out / "fsdp" / name
        proc = subprocess.run([*launcher, str(REPO / "recipes/fft.py"), *run_overrides(
            files, out, "cuda", **{"train.precision": "fp32", "train.max_steps": 3, "train.save_every": 0,
                                   "train.batch_size": 8, "evaluate.data": "null"})],
                              capture_output=True, text=True, timeout=900)
        (args.out / f"fsdp_{name}.log").write_text(proc.stdout + proc.stderr)
        check(proc.returncode == 0, f"{name} exited {proc.returncode}: {proc.stderr[-500:]}")
        runs[name] = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    drift = max(abs(a - b) / abs(b) for a, b in zip(runs["fsdp_2gpu"], runs["one_gpu"]))
    check(len(runs["fsdp_2gpu"]) == 3 and drift <= 1e-4, f"FSDP2 losses {runs['fsdp_2gpu']} vs one GPU {runs['one_gpu']}")
    return {**runs, "max_relative_difference": drift}


# --- throughput vs the twin ----------------------------------------------------------------------------------------
def stage_throughput(args, files) -> dict:
    import torch
    from fft_smoke import QWEN3_0_6B, TINY, random_batch

    from qforge.engine.config import Qwen3Config
    from qforge.engine.model import Qwen3
    from qforge.engine.train.config import OptimSettings
    from qforge.engine.train.loop import optimizer_step, precision_policy
    from qforge.engine.train.sft import train_step
    from qforge.engine.train.metrics import matmul_dtype, measure_matmul_peak, peak_memory_bytes, training_flops
    from qforge.engine.train.optim import build_optimizer
    from qforge.engine.train.parallel import Dist
    from qforge.tools.twin.gpus import GPUS
    from qforge.tools.twin.run import TwinPlan, run_twin

    device = torch.device("cpu" if args.cpu else "cuda")
    shape, tokens, seq_len, steps = (TINY, 512, 128, 3) if args.cpu else (QWEN3_0_6B, 16_384, 2048, 12)
    config = Qwen3Config(**shape)
    dist_ = Dist(device=device)
    param_dtype, _, autocast = precision_policy("bf16-mixed", dist_)
    torch.manual_seed(0)
    model = Qwen3(config)
    model.init_weights(seed=0)
    model = model.to(device=device, dtype=param_dtype).train()
    model.activation_checkpointing = True
    optimizer = build_optimizer(model, OptimSettings(lr=1e-5))
    batch = random_batch(tokens, seq_len, config.vocab_size, device)
    flops = training_flops(config, [seq_len] * (tokens // seq_len), batch.num_loss_tokens, config.vocab_size)
    timed = []
    for step in range(steps):
        start = time.perf_counter()
        train_step(model, [batch], dist_, autocast=autocast)
        optimizer_step(model, optimizer, 1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= min(2, steps - 1):  # compilation and allocator warm-up
            timed.append(time.perf_counter() - start)
    seconds = sum(timed) / len(timed)
    peak = measure_matmul_peak(device, matmul_dtype("bf16-mixed"))
    config_path = args.out / "throughput_config.json"
    config_path.write_text(json.dumps({**shape, "model_type": "qwen3"}))
    twin = run_twin(TwinPlan(model=str(config_path), gpus=1, tokens=tokens, seq_len=seq_len, precision="bf16-mixed",
                             activation_checkpointing=True, loss_fraction=batch.num_loss_tokens / tokens))["roofline"]
    measured = tokens / seconds
    return {"shape": "tiny (dry run)" if args.cpu else "Qwen3-0.6B", "tokens_per_step": tokens, "seq_len": seq_len,
            "tokens_per_s": measured, "mfu_vs_measured_bf16_peak": flops / seconds / peak,
            "mfu_vs_h100_datasheet": flops / seconds / GPUS["h100"].bf16_flops, "measured_bf16_peak_flops": peak,
            "peak_memory_bytes": peak_memory_bytes(device),
            "twin_tokens_per_s_bound": twin["tokens_per_s_per_gpu_bound"],
            "twin_mfu_bound": twin["predicted_mfu_bound"],
            "measured_over_twin_bound": measured / twin["tokens_per_s_per_gpu_bound"]}


# --- subprocess stages ------------------------------------------------------------------------------------------
def stage_kernel_tests(args, files) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1" if args.cpu else "0", "TRITON_DEFAULT_FP_FUSION": "1",
           "QFORGE_TEST_DEVICE": "cpu" if args.cpu else "cuda"}
    command = [sys.executable, "-m", "pytest", "-q", "tests/kernels", "-m", "not slow", "-p", "no:cacheprovider"]
    if args.kernel_tests:
        command += ["-k", args.kernel_tests]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    (args.out / "kernel_tests.log").write_text(proc.stdout + proc.stderr)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", summary)}
    failed = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    check(proc.returncode == 0 and counts.get("passed", 0) > 0, f"pytest exited {proc.returncode}: {summary}; "
                                                                f"failed: {failed[:20]}")
    return {"summary": summary, **counts}


def stage_liger(args, files) -> dict:
    if args.cpu:
        return {"skipped": "Liger-Kernel needs a GPU"}
    proc = subprocess.run([sys.executable, "benchmarks/kernel_bench.py", "--device", "cuda", "--model", "8B",
                           "--tokens", "8192"], cwd=REPO, capture_output=True, text=True, timeout=600)
    (args.out / "liger.log").write_text(proc.stdout + proc.stderr)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {"exit_code": proc.returncode, "cases": rows}


STAGES = [  # name, function, part of the verdict
    ("kernel_tests", stage_kernel_tests, True),
    ("train", stage_train, True),
    ("dpo", stage_dpo, True),
    ("distill", stage_distill, True),
    ("fsdp_nccl", stage_fsdp_nccl, True),
    ("throughput", stage_throughput, False),
    ("liger", stage_liger, False),
]


def environment(cpu: bool) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available":
            torch.cuda.is_available(), "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    try:
        import flash_attn
        info["flash_attn"] = flash_attn.__version__
    except ImportError:
        info["flash_attn"] = None
    info["mode"] = "cpu dry run" if cpu else "gpu"
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs/gpu_smoke")
    parser.add_argument("--cpu", action="store_true", help="dry run of the stages that can run without a GPU")
    parser.add_argument("--stages", help="comma-separated subset (default: all)")
    parser.add_argument("--kernel-tests", metavar="EXPR", help="pytest -k expression selecting kernel tests")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("GPU SMOKE: FAIL (no CUDA device visible; use --cpu for the dry run)")
        return 1
    chosen = set(args.stages.split(",")) if args.stages else {name for name, _, _ in STAGES}
    unknown = chosen - {name for name, _, _ in STAGES}
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}")
    report = {"environment": environment(args.cpu), "stages": {}}
    files = tiny_checkpoint(args.out / "tiny")
    for name, fn, verdict in STAGES:
        if name not in chosen:
            continue
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            details = fn(args, files)
            status = "skipped" if "skipped" in details else "passed" if verdict else "reported"
        except StageFailed as error:
            details, status = {"reason": str(error)}, "failed"
        except Exception as error:  # noqa: BLE001 (a crash is a failed stage, its traceback in the report)
            details, status = {"reason": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}, \
                "failed" if verdict else "error"
        report["stages"][name] = {"status": status, "verdict": verdict, "seconds": time.perf_counter() - start,
                                  **details}
        print(f"== {name}: {status} in {time.perf_counter() - start:.0f}s"
              + (f" ({details['reason'][:300]})" if "reason" in details else ""), flush=True)
    failed = [n for n, s in report["stages"].items() if s["verdict"] and s["status"] == "failed"]
    report["verdict"] = "FAIL" if failed else "PASS"
    (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"GPU SMOKE{' (CPU dry run)' if args.cpu else ''}: {report['verdict']}"
          + (f" — failed: {', '.join(failed)}" if failed else "") + f"; report {args.out / 'report.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
