"""Typed settings of a full fine-tuning run (the FFT recipe's YAML maps onto these one to one).

Every value's domain is part of its type, so `load_config` rejects an out-of-range value with the key and the
allowed range before anything runs (see engine/config_io.py).
"""
from __future__ import annotations

from dataclasses import field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from ..config_io import settings
from ..data.cache import TokenizeSettings
from ..lora import LoRASettings

NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]
Beta = Annotated[float, Field(ge=0, lt=1)]
BF16_STATE_MAX_BETA = 0.99  # bf16 moments: each EMA step must move a moment by more than bf16's half-ulp


@settings
class ModelSettings:
    path: str | None = None           # HF checkpoint directory to fine-tune
    config: str | None = None         # or: a config.json to train from random init (the embedded demo)
    tokenizer: str | None = None      # tokenizer directory; default model.path; "qwen3" = the packaged real one
    init_seed: int = 0                # seed of the random init (model.config only)
    # Qwen3-MoE (docs/moe.md "Training"): the load-balancing loss's coefficient (null: the checkpoint's
    # router_aux_loss_coef; 0: off), whether it balances each micro-batch (HF's loss, averaged over the step) or
    # the whole step's expert counts ("global_batch": all micro-batches and ranks; one extra forward per step),
    # and whether the router's weights train
    router_aux_loss_coef: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    router_aux_loss_scope: Literal["micro_batch", "global_batch"] = "micro_batch"
    train_router: bool = True

    def __post_init__(self):
        if (self.path is None) == (self.config is None):
            raise ValueError("set exactly one of model.path (a checkpoint) or model.config (random init)")
        if self.config is not None and self.tokenizer is None:
            raise ValueError("model.config (random init) needs model.tokenizer (a directory, or 'qwen3')")


@settings
class DataSettings(TokenizeSettings):  # format, enable_thinking, multi_turn, train_on_reasoning, on_error
    train: list[str] = field(default_factory=list)  # JSONL/JSON/Parquet files (messages or ShareGPT)
    # per-file epoch multiplier: 1 = every row once per epoch, 0.5 = half
    weights: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = None
    eval: list[str] = field(default_factory=list)   # held-out files for the eval loss
    max_tokens: Annotated[int, Field(ge=2)] = 16384  # token budget of one packed micro-batch
    loss_weighting: Literal["token", "sample", "sqrt"] = "token"  # applied when packing (see data/example.py)
    overlong: Literal["truncate", "drop"] = "truncate"
    cache_dir: str | None = None       # tokenised-data cache; default output.dir/cache
    # rows that train something other than they seem to (a tool call to a function the row's `tools` do not
    # declare; reasoning dropped because thinking is off for the row): counted and warned about, or with
    # strict: true an error naming the first such row
    strict: bool = False

    def __post_init__(self):
        if not self.train:
            raise ValueError("data.train must name at least one file")
        if self.weights is not None and len(self.weights) != len(self.train):
            raise ValueError(f"data.weights has {len(self.weights)} entries for {len(self.train)} data.train files")
        if self.weights is not None and not any(self.weights):
            raise ValueError("data.weights are all 0: no data file contributes to an epoch")


@settings
class VocabSettings:
    # "all": the full output vocabulary; "data": only tokens that occur as labels in the data (plus special
    # tokens); or a kept-id file {"kept_ids": [...]} (e.g. the CJK-free set written by tools/vocab_report)
    restrict: str = "all"
    drop_unkept_labels: bool = False   # labels outside the kept set: error (default) or leave them out of the loss


@settings
class OptimSettings:
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-5
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.1
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    eps: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-8
    decay_norms_and_embeddings: bool = False
    grad_clip: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = 1.0  # global grad-norm clip; 0/null: off
    warmup_steps: NonNegativeInt = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1  # floor of the decay, as a fraction of lr
    # AdamW's two moments: fp32 (torch's fused AdamW), or bf16 over fp32 weights and gradients (4 B instead of
    # 8 B per parameter; what fits Qwen3-32B on 8×H100, see README "GPU twin")
    state_dtype: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self):
        if self.state_dtype == "bf16" and max(self.betas) > BF16_STATE_MAX_BETA:
            raise ValueError(f"optim.state_dtype: bf16 needs optim.betas ≤ {BF16_STATE_MAX_BETA} (a bf16 moment "
                             f"cannot move by less than its half-ulp, 0.39%), got {list(self.betas)}; lower "
                             f"optim.betas or use optim.state_dtype: fp32")


@settings
class TrainSettings:
    max_steps: PositiveInt | None = None  # optimizer steps; wins over `epochs` when both are set
    epochs: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None  # passes over the data; neither set: 1
    batch_size: PositiveInt | None = None  # sequences per optimizer step (all ranks); default: grad_accum token budgets
    seed: int = 0
    grad_accum: PositiveInt = 1        # micro-batches per optimizer step on each rank (token-budget steps)
    method: Literal["full", "lora"] = "full"   # full fine-tuning, or LoRA adapters on the block linears
    lora: LoRASettings = field(default_factory=LoRASettings)  # rank, alpha, dropout, target_modules (method: lora)
    save_every: NonNegativeInt = 0     # steps between checkpoints (0: only at the end and on SIGTERM/SIGINT)
    keep_last: NonNegativeInt = 2
    resume: str | None = None          # "auto" = latest checkpoint in output.dir, or a checkpoint path
    # keys of the settings that define what is trained (train.precision, train.lora.alpha, vocab.kept, …) that a
    # resume may change from what its checkpoint recorded; any other change is refused (see state.py)
    resume_override: list[str] = field(default_factory=list)
    eval_every: NonNegativeInt = 0
    precision: Literal["fp32", "bf16-mixed", "bf16"] = "bf16-mixed"
    activation_checkpointing: bool = False
    max_nonfinite_steps: PositiveInt = 3  # stop after this many non-finite steps in a row
    device: Literal["auto", "cpu", "cuda"] = "auto"  # "auto": cuda when available, else cpu
    dist_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 7200.0  # collectives; covers first-run tokenising

    def __post_init__(self):
        if self.batch_size is not None and self.grad_accum != 1:
            raise ValueError(f"train.batch_size={self.batch_size} sequences per step needs train.grad_accum=1 (it "
                             f"replaces the token-budget step); got grad_accum={self.grad_accum}")


@settings
class OutputSettings:
    dir: str = "outputs/run"
    tensorboard: bool = True           # when the tensorboard package is installed
    progress: bool = True
    wandb: bool = False                # also log config and metrics to Weights & Biases (pip install wandb)
    wandb_project: str = "qforge"
    dtype: Literal["source", "bf16", "fp16", "fp32"] = "source"  # final/ weights: the loaded checkpoint's dtype


@settings
class FFTConfig:
    model: ModelSettings
    data: DataSettings
    vocab: VocabSettings = field(default_factory=VocabSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    output: OutputSettings = field(default_factory=OutputSettings)


def cache_dir_of(config: FFTConfig) -> str:
    """data.cache_dir, by default output.dir/cache."""
    return config.data.cache_dir or str(Path(config.output.dir) / "cache")
