"""Typed settings of a full fine-tuning run (the FFT recipe's YAML maps onto these one to one)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelSettings:
    path: str | None = None           # HF checkpoint directory to fine-tune
    config: str | None = None         # or: a config.json to train from random init (the embedded demo)
    tokenizer: str | None = None      # tokenizer directory; default model.path; "qwen3" = the packaged real one
    init_seed: int = 0                # seed of the random init (model.config only)

    def __post_init__(self):
        if (self.path is None) == (self.config is None):
            raise ValueError("set exactly one of model.path (a checkpoint) or model.config (random init)")
        if self.config is not None and self.tokenizer is None:
            raise ValueError("model.config (random init) needs model.tokenizer (a directory, or 'qwen3')")


@dataclass
class DataSettings:
    train: list[str] = field(default_factory=list)  # JSONL/JSON/Parquet files (messages or ShareGPT)
    weights: list[float] | None = None  # per-file epoch multiplier: 1 = every row once per epoch, 0.5 = half
    eval: list[str] = field(default_factory=list)   # held-out files for the eval loss
    format: Literal["auto", "messages", "sharegpt"] = "auto"
    max_tokens: int = 16384            # token budget of one packed micro-batch
    enable_thinking: bool = True
    multi_turn: Literal["all", "last", "split"] = "all"
    train_on_reasoning: bool = True
    loss_weighting: Literal["token", "sample", "sqrt"] = "token"
    overlong: Literal["truncate", "drop"] = "truncate"
    on_error: Literal["raise", "skip"] = "raise"
    cache_dir: str | None = None       # tokenised-data cache; default output.dir/cache

    def __post_init__(self):
        if not self.train:
            raise ValueError("data.train must name at least one file")
        if self.weights is not None and len(self.weights) != len(self.train):
            raise ValueError(f"data.weights has {len(self.weights)} entries for {len(self.train)} data.train files")


@dataclass
class VocabSettings:
    # "all": the full output vocabulary; "data": only tokens that occur as labels in the data (plus special
    # tokens); or a path to a kept-id JSON list (e.g. the CJK-free set written by tools/vocab_report).
    restrict: str = "all"
    drop_unkept_labels: bool = False   # labels outside the kept set: error (default) or ignore them


@dataclass
class OptimSettings:
    lr: float = 1e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    decay_norms_and_embeddings: bool = False
    grad_clip: float = 1.0             # global grad-norm clip; 0 disables
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1          # floor of the decay, as a fraction of lr


@dataclass
class TrainSettings:
    max_steps: int = 100
    seed: int = 0
    grad_accum: int = 1                # micro-batches per optimizer step on each rank
    save_every: int = 0                # steps between checkpoints (0: only at the end and on SIGTERM/SIGINT)
    keep_last: int = 2
    resume: str | None = None          # "auto" = latest checkpoint in output.dir, or a checkpoint path
    eval_every: int = 0
    precision: Literal["fp32", "bf16-mixed", "bf16"] = "bf16-mixed"
    activation_checkpointing: bool = False
    max_nonfinite_steps: int = 3       # stop after this many non-finite steps in a row
    device: str = "auto"               # "auto": cuda when available, else cpu
    dist_timeout_s: float = 7200.0     # collective timeout; covers rank 0 tokenising a large first run


@dataclass
class OutputSettings:
    dir: str = "outputs/run"
    tensorboard: bool = True           # when the tensorboard package is installed
    progress: bool = True
    dtype: Literal["source", "bf16", "fp16", "fp32"] = "source"  # final/ weights: the loaded checkpoint's dtype


@dataclass
class FFTConfig:
    model: ModelSettings
    data: DataSettings
    vocab: VocabSettings = field(default_factory=VocabSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
