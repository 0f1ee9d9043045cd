"""The full fine-tuning loop: data → packed micro-batches → Σ w·CE / Σ w → AdamW → checkpoints → HF export.

The loss of an optimizer step is normalised by the weight sum of the *whole* step (every micro-batch on every
rank), so the update does not depend on how the step is split into micro-batches or ranks.
"""
from __future__ import annotations

import contextlib
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

from ..checkpoint import TOKENIZER_FILES, save_model
from ..config_io import to_dict
from ..data import ChatTemplate, pack
from ..data.cache import load_examples, row_kinds, row_thinking
from ..data.formats import RowError, read_conversations
from ..errors import ConfigError, DataError, TrainingError
from ..files import check_writable_dir, storage_error
from ..lora import export_lora, merged_state_dict
from ..vocab import VocabMap
from .config import FFTConfig
from .objective import Objective
from .loader import build_loader, planned_steps
from .metrics import MFU, MetricsLogger, matmul_dtype, peak_memory_bytes, plot_loss_curve, training_flops
from .build import (build_lora_model, build_model, build_vocab, default_allocator_settings, refuse_untrainable,
                    resolve_tokenizer_dir)
from .optim import build_optimizer, build_scheduler
from .parallel import Dist, full_state_dict, init_distributed, shard_model
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


def step_weight(micro_batches) -> float:
    """Σ w of the supervised positions of this rank's micro-batches."""
    return float(sum(mb.loss_weight[mb.labels != -100].double().sum() for mb in micro_batches))


def _loss_tables(vocab: VocabMap | None, device) -> dict:
    vocab_index, target_index = vocab.loss_tables(device) if vocab is not None else (None, None)
    return {"vocab_index": vocab_index, "target_index": target_index}


def train_step(model, micro_batches, dist_: Dist, vocab: VocabMap | None = None, autocast=contextlib.nullcontext):
    """Forward/backward over this rank's micro-batches; returns (Σ w·CE, Σ w) of the whole global step.

    Each micro-batch's gradient is scaled by world / global Σ w: FSDP averages gradients over ranks, so the
    accumulated result is exactly ∇(Σ w·CE / Σ w) of the global step."""
    global_weight = float(dist_.all_reduce_sum(step_weight(micro_batches)))
    scale = dist_.world / max(global_weight, 1e-12)
    tables = _loss_tables(vocab, dist_.device)
    loss_sum = None  # stays on the device: a float() per micro-batch would stall the GPU between them
    for batch in micro_batches:
        with autocast():
            loss = model.loss(batch.to(dist_.device, non_blocking=True), **tables)
        (loss * scale).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    return float(dist_.all_reduce_sum(loss_sum)), global_weight


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


@torch.no_grad()
def evaluate_loss(model, batches, dist_: Dist, vocab: VocabMap | None = None,
                  autocast=contextlib.nullcontext) -> float:
    """Σ w·CE / Σ w over held-out batches; ranks take turns and run equally many forwards (FSDP needs that)."""
    model.eval()
    rounds = math.ceil(len(batches) / dist_.world)
    tables = _loss_tables(vocab, dist_.device)
    loss_sum, weight_sum = 0.0, 0.0
    for r in range(rounds):
        index = r * dist_.world + dist_.rank
        batch = batches[min(index, len(batches) - 1)].to(dist_.device)
        with autocast():
            loss = float(model.loss(batch, **tables))
        if index < len(batches):
            loss_sum += loss
            weight_sum += step_weight([batch])
    model.train()
    return float(dist_.all_reduce_sum(loss_sum) / dist_.all_reduce_sum(weight_sum).clamp_min(1e-12))


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
    dtype = dtype or getattr(model, "source_dtype", None)
    total = sum(p.numel() * (dtype or p.dtype).itemsize for p in model.parameters())
    total += sum(f.stat().st_size for f in map(Path(tokenizer_dir).joinpath, TOKENIZER_FILES) if f.is_file())
    return total + 16 * model.config.vocab_size + (1 << 20)


def _load_data(config: FFTConfig, template: ChatTemplate, dist_: Dist):
    """Tokenises once (rank 0 fills the cache, the others read it) and reports skipped rows. Also returns what
    identifies the data stream (cache keys and packing settings), which a checkpoint's data cursor refers to."""
    data = config.data
    cache_dir = cache_dir_of(config)

    def load(paths):
        loaded = []
        for path in paths:
            if dist_.is_main:
                load_examples([path], template, config.data, cache_dir=cache_dir, progress=config.output.progress)
            dist_.barrier()
            examples, summary = load_examples([path], template, config.data, cache_dir=cache_dir, progress=False)
            if dist_.is_main:
                log.info("%s: %s", path, summary)
            if summary.skipped and not summary.num_rows:
                raise DataError(f"{path}: all {len(summary.skipped)} rows were skipped (data.on_error=skip), first: "
                                f"{summary.skipped[0]}; fix the rows or the data.format")
            check_row_warnings(path, summary, config.data, dist_.is_main)
            loaded.append(examples)
            keys.append(Path(summary.cache_path).name)
        return loaded

    keys = []
    train = load(data.train)
    fingerprint = {"train": keys[:], "weights": data.weights, "max_tokens": data.max_tokens,
                   "overlong": data.overlong, "seed": config.train.seed}
    return train, [e for examples in load(data.eval) for e in examples], fingerprint


ROW_WARNING_TEXT = {
    "undeclared-tool-call": "call a tool their `tools` do not declare (the model learns to call a function it was "
                            "never shown); declare it in the row's tools",
    "reasoning-dropped": "carry reasoning but are rendered with thinking off, so the reasoning is left out of the "
                         "loss; set data.enable_thinking=auto (or true), or remove the reasoning",
}


def check_row_warnings(path, summary, data, warn: bool):
    """Rows that train something other than they seem to (cache.ROW_WARNINGS): a warning with their count, or
    under data.strict a DataError naming the first one (found by reading the file again: the error path only)."""
    for kind, advice in ROW_WARNING_TEXT.items():
        count = summary.kinds.get(kind, 0)
        if not count:
            continue
        if not data.strict:
            if warn:
                log.warning("%s: %d rows %s (data.strict=true makes this an error)", path, count, advice)
            continue
        line = next((line for line, row in read_conversations(path, data.format, data.max_row_bytes)
                     if not isinstance(row, RowError) and kind in row_kinds(row_thinking(row, data.enable_thinking))),
                    "?")
        raise DataError(f"{path}:{line}: {count} rows (this one first) {advice}, or unset data.strict")


def cache_dir_of(config: FFTConfig) -> str:
    """data.cache_dir, by default output.dir/cache."""
    return config.data.cache_dir or str(Path(config.output.dir) / "cache")


def check_inputs(config: FFTConfig, objective: Objective | None = None):
    """What can be checked before output.dir is created, so a wrong path leaves nothing behind: every data file
    named by the config is a readable file, output.dir and data.cache_dir are (or can become) writable
    directories, the model is one the trainer can train, and the objective's own inputs (teacher, reference)
    are usable."""
    refuse_untrainable(config.model)
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
    if objective is not None and hasattr(objective, "check_inputs"):
        objective.check_inputs(config)


def trained_settings(config: FFTConfig, model, vocab: VocabMap | None, objective: Objective | None) -> dict:
    """{key: value} of the settings that define what is trained, recorded in every checkpoint: a resume that
    changes one of them would continue other weights, another loss or another objective (see
    state.check_trained_settings; `train.resume_override` lists the keys a resume may change)."""
    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "tie_word_embeddings")
    settings = {"model": {key: getattr(model.config, key, None) for key in shape},
                "train.method": config.train.method, "train.precision": config.train.precision,
                "vocab.restrict": config.vocab.restrict,
                "vocab.kept": None if vocab is None else hashlib.sha256(
                    vocab.kept_ids.cpu().numpy().tobytes()).hexdigest()[:16]}
    if config.train.method == "lora":
        lora = config.train.lora
        settings.update({"train.lora.rank": lora.rank, "train.lora.alpha": lora.alpha,
                         "train.lora.target_modules": sorted(lora.target_modules)})
    settings["objective"] = type(objective).__name__ if objective is not None else "SFT"
    if objective is not None and hasattr(objective, "trained_settings"):
        settings.update(objective.trained_settings())
    return settings


def _evaluate(objective, model, batches, dist_, vocab, autocast) -> dict:
    if objective is not None:
        return objective.evaluate(model, batches, dist_, vocab, autocast)
    return {"eval_loss": evaluate_loss(model, batches, dist_, vocab, autocast)}


def train(config: FFTConfig, objective: Objective | None = None,
          evaluate: Callable[[EvalPoint], dict] | None = None) -> TrainResult:
    """Runs (or resumes) a fine-tuning run; holds the lock on output.dir throughout. `objective`: see
    objective.py; `evaluate` is called at every train.eval_every steps and after the last step (see EvalPoint)."""
    default_allocator_settings()  # before CUDA initialises
    dist_ = init_distributed(config.train.device, config.train.dist_timeout_s)
    check_inputs(config, objective)
    with OutputLock(config.output.dir, dist_):
        if dist_.is_main:
            clean_stale_temporaries(config.output.dir)
        return _train(config, dist_, objective, evaluate)


def _train(config: FFTConfig, dist_: Dist, objective: Objective | None,
           evaluate: Callable[[EvalPoint], dict] | None) -> TrainResult:
    """`objective` (DPO, distillation; see objective.py) replaces the SFT data, packing, step loss and eval."""
    out = Path(config.output.dir)
    if dist_.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True))
    torch.manual_seed(config.train.seed)
    np.random.seed(config.train.seed)

    tokenizer_dir = resolve_tokenizer_dir(config.model)
    template = ChatTemplate.from_pretrained(tokenizer_dir)
    datasets, eval_examples, data_fingerprint = (objective.load_data if objective else _load_data)(config, template,
                                                                                                   dist_)
    if config.train.batch_size is not None:  # the cursor counts batch_size items a step: another size misreads it
        data_fingerprint = {**data_fingerprint, "batch_size": config.train.batch_size}
    param_dtype, compute_dtype, autocast = precision_policy(config.train.precision, dist_)
    adapter_params = None  # LoRA: the only trainable parameters (MFU counts no weight gradients of the base)
    shard = (lambda m: shard_model(m, compute_dtype, dist_.device)) if dist_.enabled else None
    if config.train.method == "lora":  # adapters wrap the block linears; FSDP shards the whole, the base read sharded
        model = build_lora_model(config.model, config.train.lora, config.train.seed, param_dtype, dist_.device, shard)
        adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:  # under FSDP each rank reads only its own shards of the checkpoint
        model = build_model(config.model, param_dtype, dist_.device, shard=shard)
    vocab = build_vocab(config.vocab, datasets + [eval_examples], template, model.config.vocab_size)
    model.activation_checkpointing = config.train.activation_checkpointing
    if objective is not None:  # before resuming: a reference model or log-probs come from the starting weights
        objective.prepare(model, config, vocab, dist_, autocast)
    model.train()
    optimizer = build_optimizer(model, config.optim)
    pack_fn = objective.pack if objective else pack
    loader = build_loader(datasets, config.data, config.train, vocab, dist_.rank, dist_.world, objective)
    max_steps = planned_steps(config.train, loader)
    if dist_.is_main and config.train.max_steps is None:
        log.info("train.epochs=%g: %d optimizer steps (%.2f per epoch)", config.train.epochs or 1.0, max_steps,
                 loader.steps_per_epoch)
    scheduler = build_scheduler(optimizer, max_steps, config.optim)
    eval_batches = pack_fn(eval_examples, config.data.max_tokens, seed=0, overlong=config.data.overlong,
                           loss_weighting=config.data.loss_weighting, vocab=vocab) if eval_examples else None

    step, counters = 0, {"skipped_steps": 0, "nonfinite_in_a_row": 0}
    trained = trained_settings(config, model, vocab, objective)
    resume = resume_checkpoint(out, config.train.resume, dist_)
    if resume:
        check_trained_settings(resume, trained, config.train.resume_override, dist_)
        meta = load_checkpoint(resume, model, optimizer, scheduler, dist_)
        step, counters = meta["step"], meta["counters"]
        if meta.get("data") in (None, data_fingerprint):
            loader.load_state_dict(meta["loader"])
        elif step >= max_steps:  # nothing left to train: final/ would be the old weights under the new data's name
            raise ConfigError(f"the data changed since {resume}, but that checkpoint is already at step {step} of "
                              f"{max_steps}: this run would train 0 steps on the new data; raise train.max_steps "
                              f"above {step} to continue on it, or start fresh in another output.dir")
        elif dist_.is_main:
            log.warning("data changed since %s (data.train contents, data.weights, data.max_tokens, data.overlong, "
                        "train.seed or train.batch_size): its data cursor does not apply, so the data restarts at the first batch; "
                        "model, optimizer and schedule resume at step %d", resume, step)
        log.info("resumed from %s at step %d", resume, step)

    output_rows = model.config.vocab_size if vocab is None else vocab.new_size
    mfu = MFU(dist_.device, matmul_dtype(config.train.precision), dist_.world)
    wandb = ({"project": config.output.wandb_project, "name": out.name, "config": to_dict(config)}
             if config.output.wandb else None)
    logger = MetricsLogger(out, max_steps, step, enabled=dist_.is_main,
                           progress=config.output.progress, tensorboard=config.output.tensorboard, wandb=wandb)
    result = TrainResult(out, None, step)

    def checkpoint(at_step):
        bad, names = _nonfinite_parameters(model, dist_)
        if bad:  # never save (or later export) weights a resume or a user could mistake for a result
            last = latest_checkpoint(out)
            raise TrainingError(f"step {at_step}: {bad} weight tensors hold NaN/inf (e.g. {', '.join(names)}); "
                                f"nothing saved, last good checkpoint: {last or 'none'}; lower optim.lr or "
                                f"optim.grad_clip, or check the data")
        save_checkpoint(out, at_step, model, optimizer, scheduler, loader.state_dict(), counters, dist_,
                        config.train.keep_last, data_fingerprint, trained)

    def run_evaluation(at_step):
        """The evaluation hook on the current weights; its metrics go to metrics.jsonl / TensorBoard."""
        if evaluate is None:
            return
        snapshots = {}

        def snapshot() -> Path:
            if "path" not in snapshots:
                state = full_state_dict(model) if dist_.enabled else None
                if config.train.method == "lora":  # the merged weights, as the final export
                    state = merged_state_dict(model, state)
                path = out / "snapshots" / f"step-{at_step}"
                if dist_.is_main:
                    save_model(model, path, tokenizer_dir=tokenizer_dir, state_dict=state, vocab=vocab)
                dist_.barrier()
                snapshots["path"] = path
            return snapshots["path"]

        model.eval()
        try:
            metrics = evaluate(EvalPoint(at_step, model, template, out, dist_.enabled, dist_.is_main, snapshot))
        finally:
            model.train()
        tables = (metrics or {}).pop("tables", None)  # per-category/per-task rows: W&B tables when it is on
        if metrics:
            logger.log({"step": at_step, **metrics})
        if tables:
            logger.log_tables(at_step, tables)

    with StopSignal() as stop:
        while step < max_steps:
            started = time.perf_counter()
            micro_batches = loader.next_step()
            extra = {}
            if objective is None:
                loss_sum, weight = train_step(model, micro_batches, dist_, vocab, autocast)
            else:
                loss_sum, weight, extra = objective.train_step(model, micro_batches, dist_, vocab, autocast)
            loss = loss_sum / max(weight, 1e-12)
            lr = scheduler.get_last_lr()[0]
            if math.isfinite(loss):
                grad_norm, stepped = optimizer_step(model, optimizer, config.optim.grad_clip)
            else:
                optimizer.zero_grad(set_to_none=True)
                grad_norm, stepped = float("nan"), False
            if stepped:
                counters["nonfinite_in_a_row"] = 0
            else:
                counters["skipped_steps"] += 1
                counters["nonfinite_in_a_row"] += 1
            scheduler.step()
            step += 1
            if counters["nonfinite_in_a_row"] >= config.train.max_nonfinite_steps:
                logger.close()
                raise NonFiniteLossError(
                    f"step {step}: loss or gradient norm was non-finite for {counters['nonfinite_in_a_row']} steps "
                    f"in a row (loss={loss}, grad_norm={grad_norm}); lower optim.lr, check the data, or raise "
                    f"train.max_nonfinite_steps")

            if dist_.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            tokens = float(dist_.all_reduce_sum(sum(mb.num_tokens for mb in micro_batches)))
            lengths = [int(n) for mb in micro_batches for n in (mb.cu_seqlens[1:] - mb.cu_seqlens[:-1])]
            loss_tokens = sum(mb.num_loss_tokens for mb in micro_batches)
            flops = float(dist_.all_reduce_sum(training_flops(model.config, lengths, loss_tokens, output_rows,
                                                              adapter_params)))
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(tokens),
                      "tokens_per_s": tokens / elapsed, "mfu": mfu(flops, elapsed),
                      "peak_mem_bytes": peak_memory_bytes(dist_.device), "epoch": loader.epoch_progress,
                      "skipped_steps": counters["skipped_steps"], **extra}
            logger.log(record)
            result.losses.append(loss)
            if config.train.eval_every and step % config.train.eval_every == 0 and step < max_steps:
                if eval_batches:  # (the last step is evaluated once, after the final save)
                    logger.log({"step": step, **_evaluate(objective, model, eval_batches, dist_, vocab, autocast)})
                run_evaluation(step)
            stop_now = float(dist_.all_reduce_sum(1.0 if stop.check() else 0.0)) > 0
            if stop_now or (config.train.save_every and step % config.train.save_every == 0):
                checkpoint(step)
            if stop_now:
                result.interrupted = True
                break

        result.steps_done, result.skipped_steps = step, counters["skipped_steps"]
        if not result.interrupted:
            if latest_checkpoint(out) is None or latest_checkpoint(out).name != f"step-{step}":
                checkpoint(step)
            if eval_batches:
                logger.log({"step": step, **_evaluate(objective, model, eval_batches, dist_, vocab, autocast)})
            run_evaluation(step)
            dtype = export_dtype(config.output.dtype)
            check_space(out, _export_bytes(model, dtype, tokenizer_dir), f"the export {out / 'final'}", dist_)
            try:
                with stop.immediate():
                    if config.train.method == "lora":  # merged weights for the HF export (+ the adapter alone)
                        state = full_state_dict(model) if dist_.enabled else None
                        if dist_.is_main:
                            state = export_lora(model, out, config.model.path, state)
                            result.final_dir = save_model(model, out / "final", tokenizer_dir=tokenizer_dir,
                                                          state_dict=state, vocab=vocab, dtype=dtype)
                    else:  # every rank takes part: parameters gathered one at a time, files written by turns
                        final = save_model(model, out / "final", tokenizer_dir=tokenizer_dir, vocab=vocab,
                                           dtype=dtype, dist_=dist_)
                        if dist_.is_main:
                            result.final_dir = final
            except Interrupted:
                result.interrupted = True
            except (OSError, RuntimeError, SafetensorError) as error:  # a short write (disk full): the staged
                # export is gone, an earlier final/ is untouched
                raise storage_error(error, "the export", out / "final",
                                    f"free some space, then rerun with train.resume=auto (the checkpoint of step "
                                    f"{step} is kept)") from error
            if dist_.is_main:
                plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png")
            result.interrupted = float(dist_.all_reduce_sum(1.0 if result.interrupted else 0.0)) > 0
    logger.close()
    trailing = counters["nonfinite_in_a_row"]
    if trailing and not result.interrupted:
        raise TrainingError(f"the last {trailing} of {step} steps were skipped (non-finite loss or gradient norm), "
                            f"so {out / 'final'} holds the weights of step {step - trailing}; lower optim.lr, "
                            f"check the data, or train longer")
    if counters["skipped_steps"] and dist_.is_main:
        log.warning("%d of %d steps were skipped (non-finite loss or gradient norm); see skipped_steps in "
                    "metrics.jsonl", counters["skipped_steps"], step)
    return result
