"""The trainer: build → resume → fit (optimizer steps) → final checkpoint → evaluation → export.

What is trained for — data, packing, the step's loss, held-out metrics — is the objective's (objective.py; SFT
by default, sft.py); what train.method trains and how it is exported is the weights policy's (build.py). The loop
keeps what makes a run trustworthy whatever they are: the seed, exact resume, non-finite guards, checkpoints,
stop signals, metrics.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from safetensors import SafetensorError

from ..checkpoint import TOKENIZER_FILES
from ..config_io import to_dict
from ..data import ChatTemplate
from ..errors import ConfigError, TrainingError
from ..files import check_writable_dir, storage_error
from ..vocab import VocabMap
from .build import (FullWeights, build_vocab, default_allocator_settings, resolve_tokenizer_dir,
                    training_weights)
from .config import FFTConfig
from .loader import build_loader, planned_steps
from .metrics import MFU, MetricsLogger, matmul_dtype, peak_memory_bytes, plot_loss_curve, training_flops
from .objective import Objective, Step
from .optim import build_optimizer, build_scheduler
from .parallel import Dist, init_distributed, shard_model
from .sft import SFT
from .resume import (OutputLock, check_space, check_trained_settings, clean_stale_temporaries, latest_checkpoint,
                    load_checkpoint, resume_checkpoint, save_checkpoint)

log = logging.getLogger("qforge.train")


class NonFiniteLossError(TrainingError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None
    steps_done: int
    interrupted: bool = False
    skipped_steps: int = 0
    losses: list[float] = field(default_factory=list)


@dataclass
class EvalPoint:
    """What an evaluation hook (`train(config, evaluate=...)`) gets at every `train.eval_every` steps and after
    the last step, on every rank: the live model (in eval mode; sharded under FSDP) and `snapshot()`, which
    writes the current weights once as an HF-format checkpoint (every rank must call it) and returns its path.
    The hook returns metrics ({name: number}) that the loop logs at `step` (rank 0's)."""
    step: int
    model: torch.nn.Module
    template: ChatTemplate
    output_dir: Path
    distributed: bool
    is_main: bool
    snapshot: Callable[[], Path]


def optimizer_step(model, optimizer, grad_clip: float | None) -> tuple[float, bool]:
    """Clip the global gradient norm, then step unless it is non-finite; returns (norm, stepped)."""
    clip = grad_clip or float("inf")  # 0 or None: no clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    stepped = math.isfinite(grad_norm)
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stepped


class Interrupted(Exception):
    """A stop signal that arrived while the final weights were being written (the export is abandoned)."""


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (then it checkpoints and stops). Under
    torchrun, a rank whose launcher died (its parent process changed) stops the same way. Inside `immediate()`
    a signal raises `Interrupted` instead, so a half-written export is cleaned up by its own `finally`."""

    def __init__(self):
        self.received = None
        self._previous = {}
        self._raise = False
        self._launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def check(self) -> str | None:
        if self.received is None and self._launcher is not None and os.getppid() != self._launcher:
            self.received = "launcher gone"
            log.warning("the torchrun agent (pid %d) is gone: checkpointing and stopping", self._launcher)
        return self.received

    @contextlib.contextmanager
    def immediate(self):
        self._raise = True
        try:
            if self.received:
                raise Interrupted(self.received)
            yield
        finally:
            self._raise = False

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        if self._raise:
            self._raise = False
            raise Interrupted(self.received)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def precision_policy(precision: str, dist_: Dist):
    """(parameter dtype, FSDP compute dtype, autocast context) for train.precision."""
    if precision == "fp32":
        return torch.float32, None, contextlib.nullcontext
    if precision == "bf16":
        return torch.bfloat16, None, contextlib.nullcontext
    if dist_.enabled:  # bf16-mixed under FSDP2: fp32 master weights, bf16 unsharded compute copies
        return torch.float32, torch.bfloat16, contextlib.nullcontext
    return torch.float32, None, lambda: torch.autocast(dist_.device.type, dtype=torch.bfloat16)


EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def export_dtype(name: str) -> torch.dtype | None:
    """output.dtype → the dtype `final/` is written in; None ("source") keeps the loaded checkpoint's."""
    return None if name == "source" else EXPORT_DTYPES[name]


def _nonfinite_parameters(model, dist_: Dist) -> tuple[int, list[str]]:
    """(how many parameters hold a NaN/inf on any rank, the first few names on this rank)."""
    names = [name for name, p in model.named_parameters()
             if not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())]
    return int(dist_.all_reduce_sum(float(len(names)))), names[:3]


def _export_bytes(model, dtype: torch.dtype | None, tokenizer_dir: Path) -> int:
    """Bytes of final/: its parameters in the export dtype (a LoRA model counts its adapters too, which stand for
    the adapter export next to it), the tokenizer files it copies, and its configs (generation_config.json of a
    restricted vocabulary lists up to every token id as suppressed: ≤ 16 bytes a vocabulary row)."""
    total = sum(p.numel() * (dtype or p.dtype).itemsize for p in model.parameters())
    total += sum(f.stat().st_size for f in map(Path(tokenizer_dir).joinpath, TOKENIZER_FILES) if f.is_file())
    return total + 16 * model.config.vocab_size + (1 << 20)


def check_inputs(config: FFTConfig, objective: Objective):
    """What can be checked before output.dir is created, so a wrong path leaves nothing behind: every data file
    named by the config is a readable file, output.dir and data.cache_dir are (or can become) writable
    directories, and the objective's own inputs (teacher, reference)
    are usable."""
    for key in ("train", "eval"):
        for path in getattr(config.data, key):
            try:
                with open(path, "rb") as f:
                    f.read(1)
            except IsADirectoryError:
                raise ConfigError(f"data.{key}: {path} is a directory, not a data file; name a .jsonl, .json or "
                                  f".parquet file") from None
            except OSError as error:
                raise ConfigError(f"data.{key}: {path}: {error.strerror.lower() if error.strerror else error}; "
                                  f"fix the path in the config or the override") from None
    check_writable_dir(config.output.dir, "output.dir")
    if Path(config.output.dir).is_dir():  # an existing run: the folders a resume writes into must be writable too
        for sub in ("checkpoints", "final"):
            if (Path(config.output.dir) / sub).is_dir():
                check_writable_dir(Path(config.output.dir) / sub, "output.dir")
    if config.data.cache_dir is not None:
        check_writable_dir(config.data.cache_dir, "data.cache_dir")
    objective.check_inputs(config)


def trained_settings(config: FFTConfig, model, vocab: VocabMap | None, objective: Objective,
                     weights: FullWeights) -> dict:
    """{key: value} of the settings that define what is trained, recorded in every checkpoint: a resume that
    changes one of them would continue other weights, another loss or another objective (see
    state.check_trained_settings; `train.resume_override` lists the keys a resume may change)."""
    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "tie_word_embeddings")
    return {"model": {key: getattr(model.config, key, None) for key in shape},
            "train.method": config.train.method, "train.precision": config.train.precision,
            "vocab.restrict": config.vocab.restrict,
            "vocab.kept": None if vocab is None else hashlib.sha256(
                vocab.kept_ids.cpu().numpy().tobytes()).hexdigest()[:16],
            **weights.trained_settings(), "objective": type(objective).__name__, **objective.trained_settings()}


@dataclass(eq=False)
class Run:
    """Everything one run holds from build to export (see `build_run`)."""
    config: FFTConfig
    dist_: Dist
    objective: Objective
    out: Path
    tokenizer_dir: Path
    template: ChatTemplate
    weights: FullWeights
    model: torch.nn.Module
    vocab: VocabMap | None
    autocast: Callable
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: object
    max_steps: int
    eval_batches: object
    data_fingerprint: dict
    trained: dict
    step: int = 0
    counters: dict = field(default_factory=lambda: {"skipped_steps": 0, "nonfinite_in_a_row": 0})


def build_run(config: FFTConfig, dist_: Dist, objective: Objective) -> Run:
    """Data, model (the weights policy's build hook), kept vocabulary, objective, optimizer, loader, schedule."""
    out = Path(config.output.dir)
    if dist_.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True))
    torch.manual_seed(config.train.seed)
    np.random.seed(config.train.seed)
    tokenizer_dir = resolve_tokenizer_dir(config.model)
    template = ChatTemplate.from_pretrained(tokenizer_dir)
    datasets, eval_items, fingerprint = objective.load_data(config, template, dist_)
    if config.train.batch_size is not None:  # the cursor counts batch_size items a step: another size misreads it
        fingerprint = {**fingerprint, "batch_size": config.train.batch_size}
    param_dtype, compute_dtype, autocast = precision_policy(config.train.precision, dist_)
    shard = (lambda m: shard_model(m, compute_dtype, dist_.device)) if dist_.enabled else None
    weights = training_weights(config)
    model = weights.build(config.model, config.train.seed, param_dtype, dist_.device, shard)
    vocab = build_vocab(config.vocab, datasets + [eval_items], template, model.config.vocab_size)
    model.activation_checkpointing = config.train.activation_checkpointing
    objective.prepare(model, config, vocab, dist_, autocast)  # before resuming: references see the start weights
    model.train()
    optimizer = build_optimizer(model, config.optim)
    loader = build_loader(datasets, config.data, config.train, vocab, dist_.rank, dist_.world, objective=objective)
    max_steps = planned_steps(config.train, loader)
    if dist_.is_main and config.train.max_steps is None:
        log.info("train.epochs=%g: %d optimizer steps (%.2f per epoch)", config.train.epochs or 1.0, max_steps,
                 loader.steps_per_epoch)
    scheduler = build_scheduler(optimizer, max_steps, config.optim)
    eval_batches = objective.pack(eval_items, config.data.max_tokens, seed=0, overlong=config.data.overlong,
                                  loss_weighting=config.data.loss_weighting, vocab=vocab) if eval_items else None
    return Run(config, dist_, objective, out, tokenizer_dir, template, weights, model, vocab, autocast, optimizer,
               scheduler, loader, max_steps, eval_batches, fingerprint,
               trained_settings(config, model, vocab, objective, weights))


def resume(run: Run) -> None:
    """Continues from train.resume's checkpoint: weights, optimizer, schedule, counters and (same data) the data
    cursor."""
    path = resume_checkpoint(run.out, run.config.train.resume, run.dist_)
    if not path:
        return
    check_trained_settings(path, run.trained, run.config.train.resume_override, run.dist_)
    meta = load_checkpoint(path, run.model, run.optimizer, run.scheduler, run.dist_)
    run.step, run.counters = meta["step"], meta["counters"]
    if meta.get("data") in (None, run.data_fingerprint):
        run.loader.load_state_dict(meta["loader"])
        if "objective_state" in meta and hasattr(run.objective, "load_state_dict"):
            run.objective.load_state_dict(meta["objective_state"], run.dist_.world)
    elif run.step >= run.max_steps:  # nothing left to train: final/ would be the old weights under the new data's name
        raise ConfigError(f"the data changed since {path}, but that checkpoint is already at step {run.step} of "
                          f"{run.max_steps}: this run would train 0 steps on the new data; raise train.max_steps "
                          f"above {run.step} to continue on it, or start fresh in another output.dir")
    elif run.dist_.is_main:
        log.warning("data changed since %s (data.train contents, data.weights, data.max_tokens, data.overlong, "
                    "train.seed or train.batch_size): its data cursor does not apply, so the data restarts at the "
                    "first batch; model, optimizer and schedule resume at step %d", path, run.step)
    log.info("resumed from %s at step %d", path, run.step)


def checkpoint(run: Run) -> None:
    """A training checkpoint of the current step; never of weights holding NaN/inf."""
    bad, names = _nonfinite_parameters(run.model, run.dist_)
    if bad:  # never save (or later export) weights a resume or a user could mistake for a result
        raise TrainingError(f"step {run.step}: {bad} weight tensors hold NaN/inf (e.g. {', '.join(names)}); "
                            f"nothing saved, last good checkpoint: {latest_checkpoint(run.out) or 'none'}; lower "
                            f"optim.lr or optim.grad_clip, or check the data")
    state = run.objective.state_dict() if hasattr(run.objective, "state_dict") else None
    save_checkpoint(run.out, run.step, run.model, run.optimizer, run.scheduler, run.loader.state_dict(),
                    run.counters, run.dist_, run.config.train.keep_last, run.data_fingerprint, run.trained, state)


class Evaluation:
    """Held-out metrics (the objective's `evaluate` on data.eval) and the `evaluate` hook (see EvalPoint), logged
    at `step`."""

    def __init__(self, run: Run, logger: MetricsLogger, hook: Callable[[EvalPoint], dict] | None):
        self.run, self.logger, self.hook = run, logger, hook

    def __call__(self) -> None:
        run = self.run
        if run.eval_batches:
            self.logger.log({"step": run.step, **run.objective.evaluate(run.model, run.eval_batches, run.dist_,
                                                                        run.vocab, run.autocast)})
        if self.hook is None:
            return
        run.model.eval()
        try:
            metrics = self.hook(EvalPoint(run.step, run.model, run.template, run.out, run.dist_.enabled,
                                          run.dist_.is_main, functools.cache(self._snapshot)))
        finally:
            run.model.train()
        tables = (metrics or {}).pop("tables", None)  # per-category/per-task rows: W&B tables when it is on
        if metrics:
            self.logger.log({"step": run.step, **metrics})
        if tables:
            self.logger.log_tables(run.step, tables)

    def _snapshot(self) -> Path:
        """The current weights once as an HF checkpoint (every rank calls it; rank 0 writes)."""
        run = self.run
        state = run.weights.snapshot_state(run.model, run.dist_)
        path = run.out / "snapshots" / f"step-{run.step}"
        if run.dist_.is_main:
            run.weights.save(run.model, path, run.tokenizer_dir, run.vocab, state_dict=state)
        run.dist_.barrier()
        return path


def optimize(run: Run) -> tuple[dict, Step]:
    """One optimizer step: the objective's forwards and backwards, then clip and AdamW unless non-finite.
    Returns the step's metrics record (before timing) and the objective's Step."""
    micro_batches = run.loader.next_step()
    result = run.objective.train_step(run.model, micro_batches, run.dist_, run.vocab, run.autocast)
    loss = result.loss_sum / max(result.weight, 1e-12)
    lr = run.scheduler.get_last_lr()[0]
    if math.isfinite(loss):
        grad_norm, stepped = optimizer_step(run.model, run.optimizer, run.config.optim.grad_clip)
    else:
        run.optimizer.zero_grad(set_to_none=True)
        grad_norm, stepped = float("nan"), False
    counters = run.counters
    counters["skipped_steps"] += not stepped
    counters["nonfinite_in_a_row"] = 0 if stepped else counters["nonfinite_in_a_row"] + 1
    run.scheduler.step()
    run.step += 1
    return {"step": run.step, "loss": loss, "lr": lr, "grad_norm": grad_norm}, result


class Throughput:
    """tokens, tokens/s, MFU and peak memory of a step, from the micro-batches it trained on."""

    def __init__(self, run: Run):
        self.run = run
        self.output_rows = run.model.config.vocab_size if run.vocab is None else run.vocab.new_size
        self.flops_options = run.weights.flops_options(run.model)
        self.mfu = MFU(run.dist_.device, matmul_dtype(run.config.train.precision), run.dist_.world)

    def __call__(self, trained, elapsed: float) -> dict:
        run = self.run
        tokens = float(run.dist_.all_reduce_sum(sum(mb.num_tokens for mb in trained)))
        lengths = [int(n) for mb in trained for n in (mb.cu_seqlens[1:] - mb.cu_seqlens[:-1])]
        loss_tokens = sum(mb.num_loss_tokens for mb in trained)
        flops = float(run.dist_.all_reduce_sum(training_flops(run.model.config, lengths, loss_tokens,
                                                              self.output_rows, **self.flops_options)))
        return {"tokens": int(tokens), "tokens_per_s": tokens / elapsed, "mfu": self.mfu(flops, elapsed),
                "peak_mem_bytes": peak_memory_bytes(run.dist_.device)}


def fit(run: Run, logger: MetricsLogger, evaluation: Evaluation, stop: StopSignal, result: TrainResult) -> None:
    """Optimizer steps up to max_steps: metrics every step, evaluation every train.eval_every steps (the last
    step's comes after the final checkpoint), checkpoints every train.save_every steps and on a stop signal."""
    throughput, train = Throughput(run), run.config.train
    while run.step < run.max_steps:
        started = time.perf_counter()
        record, step = optimize(run)
        if run.counters["nonfinite_in_a_row"] >= train.max_nonfinite_steps:
            logger.close()
            raise NonFiniteLossError(
                f"step {run.step}: loss or gradient norm was non-finite for {run.counters['nonfinite_in_a_row']} "
                f"steps in a row (loss={record['loss']}, grad_norm={record['grad_norm']}); lower optim.lr, check "
                f"the data, or raise train.max_nonfinite_steps")
        if run.dist_.device.type == "cuda":
            torch.cuda.synchronize()
        record.update(throughput(step.trained, time.perf_counter() - started))
        logger.log({**record, "epoch": run.loader.epoch_progress, "skipped_steps": run.counters["skipped_steps"],
                    **step.metrics})
        result.losses.append(record["loss"])
        if train.eval_every and run.step % train.eval_every == 0 and run.step < run.max_steps:
            evaluation()
        stop_now = float(run.dist_.all_reduce_sum(1.0 if stop.check() else 0.0)) > 0
        if stop_now or (train.save_every and run.step % train.save_every == 0):
            checkpoint(run)
        if stop_now:
            result.interrupted = True
            return


def export(run: Run, stop: StopSignal, result: TrainResult) -> None:
    """final/ in output.dtype, written by the weights policy (merged weights + adapter for LoRA); a stop signal
    during the write abandons it, a failed write leaves an earlier final/ untouched."""
    dtype = export_dtype(run.config.output.dtype)
    check_space(run.out, _export_bytes(run.model, dtype or run.weights.export_default_dtype, run.tokenizer_dir), f"the export {run.out / 'final'}",
                run.dist_)
    try:
        with stop.immediate():
            result.final_dir = run.weights.export(run.model, run.out / "final", run.tokenizer_dir, run.vocab, dtype,
                                                  run.dist_)
    except Interrupted:
        result.interrupted = True
    except (OSError, RuntimeError, SafetensorError) as error:  # a short write (disk full): the staged export is
        # gone, an earlier final/ is untouched
        raise storage_error(error, "the export", run.out / "final",
                            f"free some space, then rerun with train.resume=auto (the checkpoint of step "
                            f"{run.step} is kept)") from error
    if run.dist_.is_main:
        plot_loss_curve(run.out / "metrics.jsonl", run.out / "loss_curve.png")


def train(config: FFTConfig, objective: Objective | None = None,
          evaluate: Callable[[EvalPoint], dict] | None = None) -> TrainResult:
    """Runs (or resumes) a fine-tuning run; holds the lock on output.dir throughout. `objective`: see objective.py
    (default SFT); `evaluate` is called at every train.eval_every steps and after the last step (see EvalPoint)."""
    objective = objective or SFT()
    default_allocator_settings()  # before CUDA initialises
    dist_ = init_distributed(config.train.device, config.train.dist_timeout_s)
    check_inputs(config, objective)
    with OutputLock(config.output.dir, dist_):
        if dist_.is_main:
            clean_stale_temporaries(config.output.dir)
        run = build_run(config, dist_, objective)
        resume(run)
        return _run(run, evaluate)


def _run(run: Run, evaluate: Callable[[EvalPoint], dict] | None) -> TrainResult:
    """fit → final checkpoint → evaluation → export, then the verdict on skipped steps."""
    config, dist_ = run.config, run.dist_
    wandb = ({"project": config.output.wandb_project, "name": run.out.name, "config": to_dict(config)}
             if config.output.wandb else None)
    logger = MetricsLogger(run.out, run.max_steps, run.step, enabled=dist_.is_main, progress=config.output.progress,
                           tensorboard=config.output.tensorboard, wandb=wandb)
    result, evaluation = TrainResult(run.out, None, run.step), Evaluation(run, logger, evaluate)
    with StopSignal() as stop:
        fit(run, logger, evaluation, stop, result)
        result.steps_done, result.skipped_steps = run.step, run.counters["skipped_steps"]
        if not result.interrupted:
            if latest_checkpoint(run.out) is None or latest_checkpoint(run.out).name != f"step-{run.step}":
                checkpoint(run)
            evaluation()
            export(run, stop, result)
            result.interrupted = float(dist_.all_reduce_sum(1.0 if result.interrupted else 0.0)) > 0
    logger.close()
    trailing = run.counters["nonfinite_in_a_row"]
    if trailing and not result.interrupted:
        raise TrainingError(f"the last {trailing} of {run.step} steps were skipped (non-finite loss or gradient "
                            f"norm), so {run.out / 'final'} holds the weights of step {run.step - trailing}; lower "
                            f"optim.lr, check the data, or train longer")
    if run.counters["skipped_steps"] and dist_.is_main:
        log.warning("%d of %d steps were skipped (non-finite loss or gradient norm); see skipped_steps in "
                    "metrics.jsonl", run.counters["skipped_steps"], run.step)
    return result
