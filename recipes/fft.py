"""Full fine-tuning of a Qwen3 checkpoint on chat data (one CPU, one GPU, or `torchrun` with FSDP2).

    python recipes/fft.py --config recipes/configs/demo.yaml [key=value ...]
    torchrun --nproc_per_node=8 recipes/fft.py --config recipes/configs/qwen3-8b-8gpu.yaml

Multi-stage runs: a config may list `stages`, each a mapping of overrides (e.g. another `data` mixture);
stage k starts from stage k-1's `final` weights and writes to `output.dir/<stage name>`.
When `evaluate.data` is set, the starting model and the trained one (reloaded from `final/`) are evaluated after
training (held-out loss and greedy exact-match accuracy on rows with a checkable `answer`), both with the kept
vocabulary saved in `final/`. Exit codes: see the README (0 done, 2-6 a one-line error, 143 stopped by a signal).
With `periodic_eval.mcq` (and/or `periodic_eval.judge`), every `train.eval_every` steps and the end also score
the current weights on multiple-choice questions (and with the LLM judge); see recipes/evals/periodic_eval.py.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import field
from pathlib import Path

from qforge.engine.config_io import apply_overrides, build, read_yaml, settings
from qforge.engine.train import FFTConfig, train
from qforge.recipes.common.cli import run_recipe
from qforge.recipes.evals.before_after import BeforeAfterSettings, evaluate_checkpoint, print_before_after
from qforge.recipes.evals.periodic_eval import PeriodicEvalSettings, periodic_hook


@settings
class FFTRecipeConfig(FFTConfig):
    """The FFT recipe's config (also the base of distill's): the engine's training settings plus the before/after
    evaluation (recipes/evals/before_after.py) and the evaluation during training (recipes/evals/periodic_eval.py)."""
    evaluate: BeforeAfterSettings = field(default_factory=BeforeAfterSettings)
    periodic_eval: PeriodicEvalSettings = field(default_factory=PeriodicEvalSettings)


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


def run(configs: list[FFTRecipeConfig], make_objective=None) -> int:
    """Trains every stage in turn; 143 when a signal stopped a stage (checkpoint saved, resumable).
    `make_objective(config)`: another training objective on the same loop (recipes/distill.py)."""
    for config in configs:
        result = train(config, make_objective(config) if make_objective else None,
                       evaluate=periodic_hook(config.periodic_eval))
        if result.interrupted:
            print(f"stopped by signal at step {result.steps_done}; checkpoint saved in "
                  f"{config.output.dir}/checkpoints. Resume with train.resume=auto.", file=sys.stderr)
            return 143
        if config.evaluate.data and result.final_dir is not None:
            before = evaluate_checkpoint(config, trained=False)
            after = evaluate_checkpoint(config, trained=True)
            print_before_after(before, after, Path(config.output.dir) / "eval_before_after.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_recipe(FFTRecipeConfig, run, argv, __doc__, "train.max_steps=50",
                      load=lambda _, path, overrides: stage_configs(path, overrides), report=lambda _, code: code)


if __name__ == "__main__":
    sys.exit(main())
