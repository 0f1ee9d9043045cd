"""Full fine-tuning of a Qwen3 checkpoint on chat data (one CPU, one GPU, or `torchrun` with FSDP2).

    python recipes/fft.py --config recipes/configs/demo.yaml [key=value ...]
    torchrun --nproc_per_node=8 recipes/fft.py --config recipes/configs/qwen3-8b-8gpu.yaml

Multi-stage runs: a config may list `stages`, each a mapping of overrides (e.g. another `data` mixture);
stage k starts from stage k-1's `final` weights and writes to `output.dir/<stage name>`.
When `evaluate.data` is set, the model is evaluated before and after training (held-out loss and greedy
exact-match accuracy on rows with a checkable `answer`), from the saved and reloaded final checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path


from qforge.engine.config_io import ConfigKeyError, apply_overrides, build, read_yaml
from qforge.engine.train import train
from qforge.recipes.demo_eval import FFTRecipeConfig, evaluate_checkpoint, print_before_after


def stage_configs(path: str, overrides: list[str]) -> list[FFTRecipeConfig]:
    """The run's config, or one config per entry of `stages` (each starting from the previous final)."""
    raw = apply_overrides(read_yaml(path), overrides)
    stages = raw.pop("stages", None)
    if not stages:
        return [build(FFTRecipeConfig, raw, path)]
    configs, previous_final = [], None
    for i, stage in enumerate(stages):
        name = stage.pop("name", f"stage{i + 1}")
        merged = _merge(copy.deepcopy(raw), stage)
        merged.setdefault("output", {})["dir"] = str(Path(raw.get("output", {}).get("dir", "outputs/run")) / name)
        if previous_final is not None:
            merged["model"] = {"path": str(previous_final)}
        config = build(FFTRecipeConfig, merged, f"{path} (stage '{name}')")
        configs.append(config)
        previous_final = Path(config.output.dir) / "final"
    return configs


def _merge(base: dict, override: dict) -> dict:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see recipes/configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=50")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        configs = stage_configs(args.config, args.overrides)
    except ConfigKeyError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    for config in configs:
        before = evaluate_checkpoint(config, trained=False) if config.evaluate.data else None
        result = train(config)
        if result.interrupted:
            print(f"stopped by signal at step {result.steps_done}; checkpoint saved in "
                  f"{config.output.dir}/checkpoints. Resume with train.resume=auto.", file=sys.stderr)
            return 143
        if before is not None and result.final_dir is not None:
            after = evaluate_checkpoint(config, trained=True)
            print_before_after(before, after, Path(config.output.dir) / "eval_before_after.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
