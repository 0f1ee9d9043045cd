"""python -m qforge.tools.twin --config recipes/configs/qwen3-8b-8gpu.yaml [--gpu h100] [--json OUT]
python -m qforge.tools.twin --model qwen3-8b --gpus 8 --tokens 16384 [--grad-accum N] [--activation-checkpointing]
    [--optim-state-dtype fp32|bf16] [--objective sft|dpo [--reference live|cached]]
python -m qforge.tools.twin --config recipes/configs/grpo-qwen3-8b-8gpu.yaml   # a grpo section: objective grpo
python -m qforge.tools.twin --model qwen3-8b --gpus 8 --objective grpo [--group 8] [--prompt-tokens 512]
    [--completion-tokens 4096] [--beta 0.04] [--gather-for-sampling] --activation-checkpointing
python -m qforge.tools.twin --config recipes/configs/qwen3-8b-8gpu.yaml --distill recipes/configs/distill.yaml
    [--teacher qwen3-32b]   # a distillation config's distill section (mode, top_k, ce_weight) on the GPU config
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from .gpus import GPUS
from .export import trace_checkpoint_state, trace_export
from .load import trace_load
from .report import format_export, format_load, format_report
from .collectives import CollectiveDivergence
from .run import OBJECTIVES, TwinPlan, check_collectives, run_twin


def plan_from_config(path: str, gpus: int | None, model: str | None) -> dict:
    """TwinPlan fields from a training YAML: model (by its directory name, e.g. /models/Qwen3-8B), GPUs (the
    `--nproc_per_node` in its header comment, else 1), tokens, grad_accum, precision, checkpointing, the
    AdamW state dtype.

    A step of `train.batch_size` sequences has as many micro-batches per rank as the data needs; the twin takes
    two, the conservative case: from the second micro-batch on, the sharded gradients are held through the
    backward."""
    from qforge.engine.config_io import read_yaml

    raw = read_yaml(path)
    text = Path(path).read_text()
    model_path = (raw.get("model") or {}).get("path") or (raw.get("model") or {}).get("config")
    nproc = re.search(r"--nproc_per_node[= ](\d+)", text)
    train = raw.get("train") or {}
    return {"model": model or Path(str(model_path)).name.lower(), "gpus": gpus or (int(nproc.group(1)) if nproc else 1),
            "tokens": (raw.get("data") or {}).get("max_tokens", 16384), "grad_accum": 2 if train.get("batch_size") else train.get("grad_accum", 1),
            "precision": train.get("precision", "bf16-mixed"),
            "activation_checkpointing": bool(train.get("activation_checkpointing", False)),
            "optim_state_dtype": (raw.get("optim") or {}).get("state_dtype", "fp32")}


def distill_fields(path: str) -> dict:
    """TwinPlan fields from a distillation config's `distill` section: the objective (distill.mode), top_k and
    ce_weight (off-policy)."""
    from qforge.engine.config_io import read_yaml

    distill = read_yaml(path).get("distill") or {}
    mode = distill.get("mode", "off_policy")
    if mode == "on_policy":
        return {"objective": "distill-on-policy"}
    return {"objective": "distill-off-policy", "top_k": distill.get("top_k", 20),
            "ce_weight": distill.get("ce_weight", 0.0)}


def grpo_fields(path: str) -> dict:
    """TwinPlan fields from a GRPO config's `grpo` section (None without one): G (num_generations), the completion
    length (max_new_tokens), β, gather_for_sampling, and the longest prompt a micro-batch of data.max_tokens
    holds a group of (G × (prompt + max_new_tokens) tokens, as `GRPO.pack` reserves them)."""
    from qforge.engine.config_io import read_yaml

    raw = read_yaml(path)
    if "grpo" not in raw:
        return None
    grpo = raw.get("grpo") or {}
    group, new = grpo.get("num_generations", 8), grpo.get("max_new_tokens", 128)
    max_tokens = (raw.get("data") or {}).get("max_tokens", 16384)
    if max_tokens // group <= new:
        raise SystemExit(f"{path}: data.max_tokens {max_tokens} holds no group of {group} × (prompt + "
                         f"grpo.max_new_tokens {new}) tokens; raise data.max_tokens")
    return {"objective": "grpo", "group": group, "completion_tokens": new, "prompt_tokens": max_tokens // group - new,
            "beta": float(grpo.get("beta", 0.0)), "gather_for_sampling": bool(grpo.get("gather_for_sampling", False))}


def plan_fields(args) -> dict:
    """TwinPlan fields: the training config's (and its grpo section's, or --distill's), then the flags given."""
    fields = plan_from_config(args.config, args.gpus, args.model) if args.config else {}
    for key in ("model", "gpus", "tokens", "grad_accum", "precision", "activation_checkpointing", "optim_state_dtype"):
        value = getattr(args, key)
        if value is not None:
            fields[key] = value
    if args.distill:
        fields.update(distill_fields(args.distill))
    if args.config:
        fields.update(grpo_fields(args.config) or {})
    for key in ("objective", "teacher", "top_k", "ce_weight", "reference", "group", "prompt_tokens",
                "completion_tokens", "beta", "gather_for_sampling"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    if fields.get("objective") == "distill-on-policy":
        fields.setdefault("teacher", "qwen3-32b")
    return fields


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU twin: the trainer's step at real shapes on fake GPUs")
    parser.add_argument("--config", help="a training YAML (recipes/configs/qwen3-*.yaml)")
    parser.add_argument("--model", help="qwen3-0.6b … qwen3-32b, or a config.json / checkpoint directory")
    parser.add_argument("--gpus", type=int)
    parser.add_argument("--tokens", type=int, help="packed micro-batch tokens per GPU")
    parser.add_argument("--seq-len", type=int, default=2048, help="length of the packed sequences")
    parser.add_argument("--grad-accum", type=int)
    parser.add_argument("--activation-checkpointing", action="store_true", default=None)
    parser.add_argument("--precision", choices=("bf16-mixed", "bf16", "fp32"))
    parser.add_argument("--optim-state-dtype", choices=("fp32", "bf16"), help="AdamW's moments (optim.state_dtype)")
    parser.add_argument("--gpu", choices=tuple(GPUS), default="h100")
    parser.add_argument("--attention", choices=("flash_attn", "torch_varlen"), default="flash_attn")
    parser.add_argument("--kept-vocab", type=int, help="output rows kept by vocab.restrict")
    parser.add_argument("--loss-fraction", type=float, default=1.0, help="share of tokens with a label")
    parser.add_argument("--objective", choices=OBJECTIVES,
                        help="dpo: packed chosen+rejected pairs of --seq-len tokens per side; distill-*: the student's "
                             "KL step (on-policy: the sampled rows, teacher scoring them; sampling not traced); grpo: "
                             "the training half of a GRPO step, the rollout's memory in closed form")
    parser.add_argument("--distill", metavar="CONFIG", help="a distillation config (recipes/configs/distill*.yaml): "
                        "objective, top_k and ce_weight from its distill section")
    parser.add_argument("--teacher", help="distill-on-policy's teacher model (default qwen3-32b)")
    parser.add_argument("--top-k", type=int, help="distill-off-policy: stored teacher log-probs per position")
    parser.add_argument("--ce-weight", type=float, help="distill-off-policy: CE share of the KL+CE mix")
    parser.add_argument("--group", type=int, help="grpo: completions per prompt (grpo.num_generations)")
    parser.add_argument("--prompt-tokens", type=int, help="grpo: prompt length")
    parser.add_argument("--completion-tokens", type=int, help="grpo: completion length (grpo.max_new_tokens)")
    parser.add_argument("--beta", type=float, help="grpo: KL weight; > 0 adds the frozen reference")
    parser.add_argument("--gather-for-sampling", action="store_true", default=None,
                        help="grpo: sample with every unit gathered (grpo.gather_for_sampling)")
    parser.add_argument("--reference", choices=("live", "cached"),
                        help="dpo's reference: a frozen bf16 model (live, the default) or cached log-probs")
    parser.add_argument("--check-collectives", action="store_true",
                        help="trace the step once per rank and fail (exit 2) at the first collective two ranks "
                             "disagree on (op, shapes, dtypes, group): a hang on a real cluster")
    parser.add_argument("--trace-load", action="store_true",
                        help="trace checkpoint.load_sharded of a header-only checkpoint on every rank instead of a step")
    parser.add_argument("--trace-export", choices=("save_model", "full_state_dict", "checkpoint"),
                        help="trace a save on every rank instead of a step: save_model (full fine-tuning's final/), "
                             "full_state_dict (LoRA's export, evaluation snapshots) or checkpoint (the state DCP "
                             "writes: model + AdamW shards, planned per rank); nothing is written")
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    if not args.config and not args.model:
        parser.error("give --config or --model")
    fields = plan_fields(args)
    if args.trace_load or args.trace_export:
        gpus, precision = fields.get("gpus") or 1, fields.get("precision") or "bf16-mixed"
        try:
            if args.trace_load:
                result = trace_load(fields["model"], gpus, precision)
            elif args.trace_export == "checkpoint":
                result = trace_checkpoint_state(fields["model"], gpus, precision,
                                                fields.get("optim_state_dtype") or "fp32")
            else:
                result = trace_export(fields["model"], gpus, precision, what=args.trace_export)
        except CollectiveDivergence as error:
            print(f"rank-divergent collectives: {error}", file=sys.stderr)
            return 2
        print(format_load(result) if args.trace_load else format_export(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        return 0
    try:
        plan = TwinPlan(**fields, seq_len=args.seq_len, gpu=args.gpu, attention=args.attention,
                        kept_vocab=args.kept_vocab, loss_fraction=args.loss_fraction)
    except ValueError as error:
        parser.error(str(error))
    try:
        result = check_collectives(plan) if args.check_collectives else run_twin(plan)
    except CollectiveDivergence as error:
        print(f"rank-divergent collectives: {error}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0 if result["memory"]["fits"] and result.get("rollout", {}).get("fits", True) else 1


if __name__ == "__main__":
    sys.exit(main())
