"""What a run reports: a progress bar, metrics.jsonl, TensorBoard (when installed), a loss-curve PNG, MFU."""
from __future__ import annotations

import json
import logging
import math
import sys
import time
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

from ..files import write_text


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """This process's peak memory: `max_memory_allocated` on CUDA, the RSS high-water mark (VmHWM) on CPU.

    VmHWM belongs to the process's own address space. getrusage's ru_maxrss does not: Linux carries it over
    from the parent through fork/exec, so a child started by a large process (a test runner) reports the
    parent's peak, not its own."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, seconds: float = 0.5) -> float:
    """The device's achievable matmul FLOP/s, measured (the denominator of MFU; no vendor datasheet figure)."""
    size = size or (8192 if device.type == "cuda" else 1024)
    # values don't matter, and the global RNG must not move: a (re)measurement mid-run would shift dropout masks
    a = torch.ones(size, size, device=device, dtype=dtype)
    b = torch.ones(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        torch.matmul(a, b)
        count += 1
    _sync(device)
    return 2 * size ** 3 * count / (time.perf_counter() - start)


def matmul_dtype(precision: str) -> torch.dtype:
    """The dtype a run's matmuls execute in, whose peak MFU is measured against: bf16 for train.precision bf16 and
    bf16-mixed (under FSDP the compute copies, on one GPU autocast; the fp32 master weights do no matmul), fp32
    only for fp32 (TF32 off, torch's default)."""
    return torch.float32 if precision == "fp32" else torch.bfloat16


class MFU:
    """Model FLOPs utilisation against the measured matmul peak of `dtype` (`matmul_dtype`). The peak is measured at start, on a machine that
    may be busy; when a step then runs faster than that peak allows, the peak is measured again (up to
    `remeasure` times) and the highest measurement kept. A figure that still exceeds 1 is reported as None:
    not shown rather than wrong."""

    def __init__(self, device: torch.device, dtype: torch.dtype, world: int = 1, remeasure: int = 3):
        self.device, self.dtype, self.world, self.remeasure = device, dtype, world, remeasure
        self.peak = measure_matmul_peak(device, dtype)

    def __call__(self, flops: float, seconds: float) -> float | None:
        mfu = flops / (seconds * self.peak * self.world)
        while mfu > 1 and self.remeasure > 0:
            self.remeasure -= 1
            self.peak = max(self.peak, measure_matmul_peak(self.device, self.dtype))
            mfu = flops / (seconds * self.peak * self.world)
        return mfu if math.isfinite(mfu) and mfu <= 1 else None


def training_flops(config, seq_lengths, loss_tokens: float, output_rows: int, adapter_params: int | None = None,
                   train_router: bool = True) -> float:
    """Forward+backward FLOPs a packed batch needs: 6 × (block matmul params a token runs through) per token plus
    causal attention (QKᵀ and PV, 4·Hq·D per query-key pair, halved by the mask, ×3 for backward) per sequence,
    and the output layer (`output_rows` kept rows) only on the tokens that carry a loss, which is all the fused
    loss computes. A Qwen3-MoE layer counts its router (H·E) and the top_k experts a token is routed to, not all E.

    A frozen weight's backward computes only the input gradient (4× instead of 6×): the router when
    `train_router` is off, every base weight under LoRA (`adapter_params` not None; the router is frozen too),
    whose adapters add 6 × adapter_params per token (the adapter parameters one token runs through: an expert
    adapter counts top_k/E of its size)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    q_dim, kv_dim = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    sparse = sum(map(config.is_sparse_layer, range(layers)))
    active = (layers * h * (2 * q_dim + 2 * kv_dim) + (layers - sparse) * 3 * h * config.intermediate_size
              + sparse * config.num_experts_per_tok * 3 * h * config.moe_intermediate_size)
    router = sparse * h * config.num_experts
    tokens = sum(int(n) for n in seq_lengths)
    attention = sum(int(n) ** 2 for n in seq_lengths) * layers * 6 * q_dim  # 3 × (4·q_dim·n²/2)
    weight_passes = 6 if adapter_params is None else 4
    router_passes = 6 if adapter_params is None and train_router else 4
    adapters = 0 if adapter_params is None else 6 * adapter_params * tokens
    body = (weight_passes * active + router_passes * router) * tokens + attention + adapters
    return body + weight_passes * output_rows * h * loss_tokens


class MetricsLogger:
    """Appends one JSON record per line to `metrics.jsonl`. On a resume from step N, records after N (written by
    the interrupted run after its last checkpoint) and a half-written last line are dropped first, so the file
    holds each step once."""

    def __init__(self, output_dir: str | Path, max_steps: int, start_step: int, *, enabled: bool, progress: bool,
                 tensorboard: bool, wandb: dict | None = None):
        """`wandb`: {"project", "name", "config"} to also log to Weights & Biases (when installed; WANDB_MODE=offline
        keeps the run local); None: TensorBoard only."""
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        if enabled:
            truncate_metrics(self.path, start_step)
        self.bar = tqdm(total=max_steps, initial=start_step, disable=not (enabled and progress), unit="step",
                        dynamic_ncols=True)
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:
                pass
        self.wandb = _start_wandb(output_dir, wandb) if enabled and wandb is not None else None

    def log(self, record: dict):
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                           step=record["step"])
        if "loss" in record:
            self.bar.update(1)
            figures = dict(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", gnorm=f"{record['grad_norm']:.3f}",
                           tok_s=f"{record['tokens_per_s']:.0f}")
            if record.get("mfu") is not None:
                figures["mfu"] = f"{100 * record['mfu']:.1f}%"
            self.bar.set_postfix(**figures)
        else:
            self.bar.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def log_tables(self, step: int, tables: dict[str, list[dict]]):
        """Evaluation tables (e.g. accuracy per category) to W&B; on disk they are the evaluation's own reports."""
        if not (self.enabled and self.wandb is not None and tables):
            return
        import wandb

        for name, rows in tables.items():
            if rows:
                columns = list(rows[0])
                self.wandb.log({name: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])},
                               step=step)

    def close(self):
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(output_dir, options: dict):
    """A W&B run resumed by id across restarts of the same output dir (the id is kept in output_dir/wandb_id)."""
    try:
        import wandb
    except ImportError:
        logging.getLogger("qforge.train").warning("output.wandb is on but wandb is not installed (pip install "
                                                  "wandb); logging to metrics.jsonl/TensorBoard only")
        return None
    id_file = Path(output_dir) / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    return wandb.init(project=options.get("project"), name=options.get("name"), config=options.get("config"),
                      dir=str(output_dir), id=run_id, resume="allow")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; lines that do not parse (a write cut short by a kill) are left out."""
    records = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def truncate_metrics(path: Path, last_step: int):
    """Rewrites metrics.jsonl (atomically) without records after `last_step` or lines that do not parse."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    kept = [r for r in read_metrics(path) if r["step"] <= last_step]
    lines = "".join(json.dumps(r) + "\n" for r in kept)
    if lines == text:
        return
    dropped = len([line for line in text.splitlines() if line.strip()]) - len(kept)
    logging.getLogger("qforge.train").info("%s: dropped %d records after step %d or cut short", path, dropped,
                                           last_step)
    write_text(path, lines)


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Train (and eval) loss against step, from metrics.jsonl; evaluation scores logged during training
    (`eval_*` keys other than eval_loss, e.g. eval_mcq_accuracy, all in [0, 1]) on a second axis."""
    records = read_metrics(metrics_path)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (Σ w·CE / Σ w)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    scores = sorted({k for r in records for k in r if k.startswith("eval_") and k != "eval_loss"})
    if scores:
        right = ax.twinx()
        for key in scores:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            right.plot(*zip(*points), "s--", label=key.removeprefix("eval_"), linewidth=1.0)
        right.set_ylabel("evaluation score")
        right.set_ylim(0, 1)
        right.legend(loc="upper right")
    ax.legend(loc="upper left" if scores else "best")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return Path(out_path)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
