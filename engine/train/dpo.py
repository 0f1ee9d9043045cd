"""Direct preference optimisation as a trainer objective (see objective.py).

Loss of an optimizer step over its N pairs (all micro-batches, all ranks), with log-ratios
ρ = log π(y|x) − log π_ref(y|x) summed over each reply's supervised tokens:

    L = (1/N) Σ_pairs −log σ(β · (ρ_chosen − ρ_rejected))  +  α · (Σ chosen-token NLL) / (chosen tokens)

the second term being the optional SFT term on the chosen replies (RPO; TRL's loss_type=["sigmoid", "sft"]
with loss_weights=[1, α]). Both normalisers are the step's totals, so the update does not depend on how the
step is split into micro-batches or ranks. Per-sequence log-probs come from the fused linear + cross-entropy
(reduction="none") over packed chosen and rejected sequences: no [T, V] logits.

The reference model is the starting checkpoint, or `reference_model` (e.g. the SFT model while the policy
starts from another checkpoint). Reference log-probs: "cached" computes them once before training (before
any resume) and stores them under reference_dir, keyed by the tokenised pairs, the reference's identity, the
kept vocabulary and the precision; "live" keeps the frozen reference model and scores every micro-batch with it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qforge.kernels import fused_linear_cross_entropy

from ..data.example import zero_weight
from ..data.packing import PackedBatch
from ..data.preference import PreferenceBatch, PreferencePair, fitting, load_pairs, pack_pairs
from ..config import Qwen3Config
from ..errors import ConfigError, DataError
from ..files import atomic_write, check_writable_dir
from ..model import Qwen3
from ..precision import autocast_weight
from .build import build_frozen, frozen_dtype, release
from .config import ModelSettings
from .config import cache_dir_of
from ..model import bind_forward_method
from .objective import Step, weights_identity
from .sft import load_once, loss_tables
from .parallel import shard_model

log = logging.getLogger("qforge.train.dpo")
REFERENCES = ("cached", "live")
STATS = ("loss", "dpo_loss", "sft_loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
         "rewards/accuracies", "logps/chosen", "logps/rejected")


def sequence_logps(model, packed, vocab_index=None, target_index=None) -> torch.Tensor:
    """Σ log p(token) over each packed sequence's supervised tokens: fp32 [sequences]. Bound to the model as a
    forward method (FSDP2 gathers the weights around it), so it calls the class's `hidden`, not the patched one."""
    hidden = Qwen3.hidden(model, packed.input_ids, packed.position_ids, packed.cu_seqlens, packed.max_seqlen)
    weight = autocast_weight(model.output_weight, hidden)  # the head in the compute dtype, as `Qwen3.loss`
    nll = fused_linear_cross_entropy(hidden.to(weight.dtype), weight, packed.labels, reduction="none",
                                     vocab_index=vocab_index, target_index=target_index)
    lengths = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).long()
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=nll.device), lengths,
                                       output_size=nll.shape[0])  # known: no host sync for the device's lengths
    return -torch.zeros(len(lengths), dtype=torch.float32, device=nll.device).index_add(0, sequence, nll)


def chosen_token_count(batch: PreferenceBatch) -> int:
    packed = batch.packed
    lengths = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).long()
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    return int(((packed.labels != -100) & (sequence % 2 == 0)).sum())


def _digest(pairs, *extra) -> str:
    """Identifies tokenised pairs (plus `extra` strings or bytes): the reference cache key."""
    digest = hashlib.sha256()
    for item in extra:
        digest.update(item.encode() if isinstance(item, str) else item)
    for pair in pairs:
        for example in (pair.chosen, pair.rejected):
            digest.update(example.input_ids.tobytes())
            digest.update(example.labels.tobytes())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def reference_config(path) -> Qwen3Config:
    """`dpo.reference_model`'s config (the recipe asks before tokenising the pairs), or a one-line error."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"dpo.reference_model={path}: no config.json there (expected an HF checkpoint directory, "
                          f"e.g. outputs/sft/final)")
    return Qwen3Config.from_json(file)


class DPO:
    def __init__(self, beta: float = 0.1, sft_weight: float = 0.0, reference: str = "cached",
                 reference_dir: str | None = None, reference_model: str | None = None):
        if beta <= 0 or sft_weight < 0:
            raise ValueError(f"dpo.beta must be > 0 and dpo.sft_weight ≥ 0, got beta={beta}, sft_weight={sft_weight}")
        if reference not in REFERENCES:
            raise ValueError(f"dpo.reference={reference!r}: expected one of {REFERENCES}")
        self.beta, self.sft_weight, self.reference, self.reference_dir = beta, sft_weight, reference, reference_dir
        self.reference_path = reference_model  # None: the starting weights
        self.reference_model = None
        self.reference_logps = None  # [pairs, 2] fp32, by PreferencePair.index
        self._pairs = []
        self.tables = {}  # vocab_index / target_index of the kept vocabulary

    def check_inputs(self, config):
        if self.reference_dir is not None:
            check_writable_dir(self.reference_dir, "dpo.reference_dir")

    def trained_settings(self) -> dict:
        """What a resume must not change silently (see loop.trained_settings): the reference the policy is held to."""
        return {"dpo.reference_model": self.reference_path and str(Path(self.reference_path).resolve())}

    # --- data -------------------------------------------------------------------------------------------------
    def load_data(self, config, template, dist_):
        """Tokenised pairs per data.train file, cached like SFT data: rank 0 tokenises a first run's files while
        the others wait (train.dist_timeout_s covers it), then every rank reads the cache."""
        data, datasets, eval_pairs, keys, lengths = config.data, [], [], [], []
        options = dict(enable_thinking=data.enable_thinking, train_on_reasoning=data.train_on_reasoning,
                       empty_think=data.empty_think, on_error=data.on_error, cache_dir=cache_dir_of(config), max_row_bytes=data.max_row_bytes)
        for paths, into in [([p], datasets) for p in data.train] + [(data.eval, None)]:
            if not paths:
                continue
            loaded, summary = load_once(dist_, lambda _: load_pairs(paths, template, **options))
            if summary.skipped and not summary.num_rows:
                raise DataError(f"{', '.join(paths)}: all {len(summary.skipped)} rows were skipped (data.on_error="
                                f"skip), first: {summary.skipped[0]}; fix the rows")
            # pairs that cannot be packed whole are left out here, once, so a train.batch_size step holds N pairs
            pairs = [PreferencePair(p.chosen, p.rejected, len(self._pairs) + i)
                     for i, p in enumerate(fitting(loaded, data.max_tokens))]
            if dist_.is_main:
                log.info("%s: %s", ", ".join(paths), summary)
                if len(pairs) < len(loaded):
                    log.warning("%s: %d preference pairs left out: longer than data.max_tokens=%d (both sides "
                                "together) or with an empty reply; raise data.max_tokens to keep them",
                                ", ".join(paths), len(loaded) - len(pairs), data.max_tokens)
            self._pairs += pairs
            if into is None:
                eval_pairs = pairs
            else:
                into.append(pairs)
                lengths += [len(p) for p in loaded if p.num_loss_tokens > 0]
                keys.append(Path(summary.cache_path).name)
        if lengths and not any(datasets):  # (pairs without a supervised reply are named by the loader)
            raise DataError(f"{', '.join(data.train)}: every pair is longer than data.max_tokens={data.max_tokens} "
                            f"(both sides together; the shortest has {min(lengths)}); raise data.max_tokens to at "
                            f"least {min(lengths)}")
        fingerprint = {"pairs": keys, "weights": data.weights, "max_tokens": data.max_tokens,
                       "seed": config.train.seed}
        return datasets, eval_pairs, fingerprint

    def pack(self, items, max_tokens: int, seed: int = 0, *, overlong: str = "truncate", loss_weighting: str = "token",
             vocab=None):
        return pack_pairs(items, max_tokens, seed, vocab=vocab)

    def filler(self, pair: PreferencePair, max_tokens: int) -> PreferenceBatch:
        """`pair`'s two sequences without supervised tokens and without a pair: a micro-batch that runs the policy
        (and live reference) forwards and the backward of a real one but adds nothing (train.batch_size steps)."""
        sides = [zero_weight(example, max_tokens) for example in (pair.chosen, pair.rejected)]
        return PreferenceBatch(PackedBatch.from_examples(sides), torch.zeros(0, dtype=torch.long))

    # --- reference ----------------------------------------------------------------------------------------------
    def prepare(self, model, config, vocab, dist_, autocast):
        self.tables = loss_tables(vocab, dist_.device)
        bind_forward_method(model, "sequence_logps", sequence_logps)
        if self.reference == "live":
            self.reference_model = self._reference_model(model, config, dist_)
            return
        directory = Path(self.reference_dir or Path(config.output.dir) / "reference")
        path = directory / f"{self._cache_key(config)}.pt"
        if path.is_file():
            self.reference_logps = torch.load(path, weights_only=True)
            if dist_.is_main:
                log.info("reference log-probs of %d pairs read from %s", len(self._pairs), path)
            return
        scorer = model if self.reference_path is None else self._reference_model(model, config, dist_)
        self.reference_logps = self._score_all(scorer, config.data.max_tokens, dist_, vocab, autocast,
                                               progress=config.output.progress and dist_.is_main)
        if scorer is not model:
            release(scorer)
        del scorer
        if dist_.is_main:
            atomic_write(path, lambda tmp: torch.save(self.reference_logps, tmp))
            log.info("reference log-probs of %d pairs computed with %s, cached in %s", len(self._pairs),
                     self.reference_path or "the starting weights", path)
        dist_.barrier()

    def _reference_model(self, model, config, dist_):
        """The frozen reference: `reference_model`, else the starting checkpoint; built (and sharded) like the
        policy, stored in the compute dtype (`frozen_dtype`: bf16 unless train.precision=fp32)."""
        settings = config.model if self.reference_path is None else ModelSettings(path=self.reference_path)
        if self.reference_path is not None:
            vocab_size = reference_config(self.reference_path).vocab_size
            if vocab_size != model.config.vocab_size:
                raise ConfigError(f"dpo.reference_model={self.reference_path}: vocabulary size {vocab_size} differs "
                                  f"from the policy's {model.config.vocab_size}; the reference must share the "
                                  f"policy's tokenizer")
        shard = (lambda m: shard_model(m, None, dist_.device)) if dist_.enabled else None
        reference = build_frozen(settings, frozen_dtype(config.train.precision), dist_.device, shard=shard)
        bind_forward_method(reference, "sequence_logps", sequence_logps)
        return reference

    def _cache_key(self, config) -> str:
        vocab_index = self.tables.get("vocab_index")
        return _digest(self._pairs, json.dumps({"weights": weights_identity(self.reference_path or config.model),
                                                "precision": config.train.precision,
                                                "drop_unkept": config.vocab.drop_unkept_labels}),
                       b"all" if vocab_index is None else vocab_index.cpu().numpy().tobytes())

    @torch.no_grad()
    def _score_all(self, model, max_tokens, dist_, vocab, autocast, progress: bool = False) -> torch.Tensor:
        """Every pair's log-probs with the current (starting) weights; ranks take turns over the batches and
        run equally many forwards, then sum their disjoint results."""
        batches = pack_pairs(self._pairs, max_tokens, seed=0, vocab=vocab)
        scores = torch.zeros(len(self._pairs), 2, dtype=torch.float64)
        was_training = model.training
        model.eval()
        for r in tqdm(range(math.ceil(len(batches) / dist_.world)), desc="reference log-probs", unit="batch",
                      disable=not progress):
            index = r * dist_.world + dist_.rank
            batch = batches[min(index, len(batches) - 1)].to(dist_.device)
            with autocast():
                logps = model.sequence_logps(batch.packed, **self.tables).float().view(-1, 2)
            if index < len(batches):
                scores[batch.pair_index.cpu()] = logps.double().cpu()
        model.train(was_training)
        if hasattr(model, "reshard"):  # FSDP2 leaves the root unit unsharded after a forward without backward: the
            model.reshard()            # optimizer built next must hold the sharded parameters
        return dist_.all_reduce_sum(scores.to(dist_.device)).float().cpu()

    def _reference_of(self, batch, autocast) -> torch.Tensor:
        if self.reference_model is None:
            return self.reference_logps[batch.pair_index.cpu()].to(batch.pair_index.device)
        with torch.no_grad(), autocast():
            return self.reference_model.sequence_logps(batch.packed, **self.tables).float().view(-1, 2)

    # --- loss -----------------------------------------------------------------------------------------------------
    def _pair_loss(self, model, batch, autocast, pairs_total, chosen_total):
        """(this micro-batch's share of the step loss, its statistics summed over its pairs)."""
        pairs = batch.num_pairs  # 0 in a filler, whose two sequences are no pair (see `filler`)
        reference = self._reference_of(batch, autocast)[:pairs]
        with autocast():
            policy = model.sequence_logps(batch.packed, **self.tables).float().view(-1, 2)[:pairs]
        rewards = self.beta * (policy - reference)
        margins = rewards[:, 0] - rewards[:, 1]
        dpo = -F.logsigmoid(margins)
        sft = -policy[:, 0].sum() / max(chosen_total, 1.0)
        loss = dpo.sum() / pairs_total + self.sft_weight * sft
        rewards, margins = rewards.detach(), margins.detach()
        stats = torch.stack([loss.detach() * pairs_total, dpo.detach().sum(), sft.detach() * pairs_total,
                             rewards[:, 0].sum(), rewards[:, 1].sum(), margins.sum(), (margins > 0).float().sum(),
                             policy[:, 0].detach().sum(), policy[:, 1].detach().sum()]).double()
        return loss, stats

    def train_step(self, model, micro_batches, dist_, vocab, autocast):
        pairs_total = float(dist_.all_reduce_sum(float(sum(b.num_pairs for b in micro_batches))))
        chosen_total = float(dist_.all_reduce_sum(float(sum(chosen_token_count(b) for b in micro_batches))))
        stats = torch.zeros(len(STATS), dtype=torch.float64, device=dist_.device)
        for batch in micro_batches:  # gradients reduce-scattered after each (see parallel.shard_model)
            loss, batch_stats = self._pair_loss(model, batch.to(dist_.device), autocast, pairs_total, chosen_total)
            (loss * dist_.world).backward()  # FSDP averages gradients over ranks
            stats += batch_stats.to(stats.device)
        totals = dist_.all_reduce_sum(stats) / max(pairs_total, 1.0)
        metrics = dict(zip(STATS, totals.tolist()))
        return Step(metrics.pop("loss"), 1.0, metrics, micro_batches)

    @torch.no_grad()
    def evaluate(self, model, batches, dist_, vocab, autocast) -> dict:
        model.eval()
        pairs = sum(b.num_pairs for b in batches)
        chosen = sum(chosen_token_count(b) for b in batches)
        stats = torch.zeros(len(STATS), dtype=torch.float64, device=dist_.device)
        for r in range(math.ceil(len(batches) / dist_.world)):
            index = r * dist_.world + dist_.rank
            _, batch_stats = self._pair_loss(model, batches[min(index, len(batches) - 1)].to(dist_.device),
                                             autocast, float(pairs), float(chosen))
            if index < len(batches):
                stats += batch_stats.to(stats.device)
        model.train()
        totals = dist_.all_reduce_sum(stats) / max(pairs, 1)
        return {f"eval_{name}": value for name, value in zip(STATS, totals.tolist())}
