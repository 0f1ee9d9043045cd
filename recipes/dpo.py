"""Direct preference optimisation of a Qwen3 checkpoint (one CPU, one GPU, or `torchrun` with FSDP2).

    python recipes/dpo.py --config recipes/configs/dpo.yaml model.path=outputs/sft/final data.train=[pairs.jsonl]
    torchrun --nproc_per_node=8 recipes/dpo.py --config recipes/configs/dpo.yaml ...

Rows: a prompt (`messages` or `prompt`) with `chosen` / `rejected` replies, TRL's implicit-prompt pairs, or
OpenAI's `input` / `preferred_output` / `non_preferred_output` (see qforge.engine.data.preference). Same
trainer as recipes/fft.py (checkpoints, exact resume, FSDP2, HF export, eval) with the DPO objective.
"""
from __future__ import annotations

import sys
from dataclasses import field
from typing import Annotated, Literal

from pydantic import Field

from qforge.engine.config_io import settings
from qforge.engine.train import FFTConfig, train
from qforge.engine.train.dpo import DPO, reference_config
from qforge.recipes.common.cli import run_recipe


@settings
class DPOSettings:
    beta: Annotated[float, Field(gt=0)] = 0.1  # strength of the implicit KL to the reference
    sft_weight: Annotated[float, Field(ge=0)] = 0.0  # α of the SFT term on the chosen replies (RPO); 0 = plain DPO
    reference: Literal["cached", "live"] = "cached"  # log-probs computed once and cached, or a frozen model
    reference_dir: str | None = None   # cache directory; default output.dir/reference
    # the reference checkpoint (e.g. the SFT model when the policy starts elsewhere); default: the starting model
    reference_model: str | None = None


@settings
class DPOConfig(FFTConfig):
    dpo: DPOSettings = field(default_factory=DPOSettings)


def run(config: DPOConfig) -> int:
    if config.dpo.reference_model is not None:
        reference_config(config.dpo.reference_model)  # a wrong path fails now, not after tokenising the pairs
    objective = DPO(config.dpo.beta, config.dpo.sft_weight, config.dpo.reference, config.dpo.reference_dir,
                    config.dpo.reference_model)
    result = train(config, objective)
    if result.interrupted:
        print(f"stopped by signal at step {result.steps_done}; checkpoint saved in {config.output.dir}/checkpoints. "
              f"Resume with train.resume=auto.", file=sys.stderr)
        return 143
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_recipe(DPOConfig, run, argv, __doc__, "dpo.beta=0.1 train.max_steps=100", report=lambda _, code: code)


if __name__ == "__main__":
    sys.exit(main())
