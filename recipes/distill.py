"""Strong-to-weak distillation of a Qwen3 student from a teacher with the same tokenizer.

    python recipes/distill.py --config recipes/configs/distill.yaml                 # off-policy (CPU demo)
    python recipes/distill.py --config recipes/configs/distill-on-policy.yaml       # then on-policy
    torchrun --nproc_per_node=8 recipes/distill.py --config ... model.path=STUDENT distill.teacher=TEACHER

distill.mode=off_policy: the teacher scores the SFT data once (its top-k log-probs per supervised position,
stored under distill.teacher_dir) and the student minimises forward KL to them, mixed with CE by
distill.ce_weight. The teacher is a checkpoint (distill.teacher) or an OpenAI-compatible server that scores
token-id prompts with echo + logprobs (distill.teacher_endpoint: vLLM, qforge's own server;
recipes/configs/distill-endpoint.yaml). distill.mode=on_policy: the student samples completions of the
data's prompts, the teacher scores them, the student minimises reverse KL on its own samples. Same trainer as
recipes/fft.py (checkpoints, exact resume, FSDP2, HF export); with `evaluate.data`, greedy exact match before
and after.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from qforge.engine.serve.client import ChatClient
from qforge.engine.config_io import settings
from qforge.engine.errors import ConfigError
from qforge.engine.train.distill import OffPolicyDistill, OnPolicyDistill
from qforge.engine.train.teacher_endpoint import EndpointTeacher
from qforge.recipes.common.cli import run_recipe
from qforge.recipes.fft import FFTRecipeConfig
from qforge.recipes.common.endpoint import ClientSettings, EndpointSettings, suppressed_ids
from qforge.recipes.fft import run as run_stages


@settings
class DistillSettings:
    teacher: str | None = None         # teacher checkpoint directory (HF format, same tokenizer as the student)
    # off-policy: or an OpenAI-compatible server scoring the data (base_url + model; suppress_ids: ids it never
    # produces, dropped from its top-k), e.g. `vllm serve TEACHER --max-logprobs 20`
    teacher_endpoint: EndpointSettings | None = None
    teacher_token_ids: bool = True     # teacher_endpoint: tokens as "token_id:N" (vLLM's return_tokens_as_token_ids)
    mode: Literal["off_policy", "on_policy"] = "off_policy"
    top_k: Annotated[int, Field(ge=1, le=128)] = 20  # off-policy: teacher log-probs kept per supervised position
    ce_weight: Annotated[float, Field(ge=0, le=1)] = 0.0  # off-policy: (1 − ce_weight)·KL + ce_weight·CE on labels
    teacher_dir: str | None = None     # off-policy: where the teacher's top-k are stored; default output.dir/teacher
    max_new_tokens: Annotated[int, Field(ge=1)] = 128  # on-policy: sampled completion length
    temperature: Annotated[float, Field(gt=0)] = 1.0  # on-policy: sampling temperature
    gather_for_sampling: bool = False  # on-policy under FSDP: the student samples with its weights gathered (one
    #                                    unsharded copy per GPU instead of an all-gather of the model per token)

    def __post_init__(self):
        if (self.teacher is None) == (self.teacher_endpoint is None):
            raise ValueError("set exactly one of distill.teacher (the teacher's checkpoint directory) or "
                             "distill.teacher_endpoint (base_url + model of an OpenAI-compatible server)")
        if self.teacher_endpoint is not None:
            if self.mode == "on_policy":
                raise ValueError("distill.mode=on_policy needs a local distill.teacher: its reverse KL needs the "
                                 "teacher's full distribution at every sampled token, an endpoint gives a top-k")
            if self.teacher_endpoint.path is not None:
                raise ValueError("distill.teacher_endpoint.path: a local teacher is distill.teacher; the endpoint "
                                 "takes base_url + model")
            self.teacher_endpoint.check("distill.teacher_endpoint")


@settings
class DistillConfig(FFTRecipeConfig):
    distill: DistillSettings = field(default_factory=DistillSettings)
    client: ClientSettings = field(default_factory=ClientSettings)  # distill.teacher_endpoint's requests


def endpoint_teacher(config: DistillConfig) -> EndpointTeacher:
    """The endpoint's client: its `suppress_ids` are dropped from the top-k here, not sent as logit_bias (which
    does not touch prompt log-probs); scored chunks make a rerun resume, so client.cache_dir is opt-in."""
    endpoint = config.distill.teacher_endpoint
    try:
        suppress = suppressed_ids(endpoint.suppress_ids) if endpoint.suppress_ids else ()
        client = ChatClient(endpoint.base_url, endpoint.model, api_key_env=endpoint.api_key_env,
                            **asdict(config.client))
    except ValueError as error:
        raise ConfigError(f"distill.teacher_endpoint: {error}") from None
    return EndpointTeacher(client, suppress, config.distill.teacher_token_ids)


def objective_for(config: DistillConfig):
    settings_ = config.distill
    if settings_.teacher_endpoint is not None:
        return OffPolicyDistill(None, settings_.top_k, settings_.ce_weight, settings_.teacher_dir,
                                endpoint=endpoint_teacher(config))
    if not (Path(settings_.teacher) / "config.json").is_file():
        raise ConfigError(f"distill.teacher={settings_.teacher}: no config.json (an HF-format checkpoint directory, "
                          f"e.g. outputs/demo/final from `make demo`)")
    if settings_.mode == "off_policy":
        return OffPolicyDistill(settings_.teacher, settings_.top_k, settings_.ce_weight, settings_.teacher_dir)
    return OnPolicyDistill(settings_.teacher, settings_.max_new_tokens, settings_.temperature,
                           config.data.enable_thinking, settings_.gather_for_sampling)


def run(config: DistillConfig) -> int:
    return run_stages([config], objective_for)


def main(argv: list[str] | None = None) -> int:
    return run_recipe(DistillConfig, run, argv, __doc__, "distill.teacher=outputs/demo/final train.max_steps=50",
                      report=lambda _, code: code)


if __name__ == "__main__":
    sys.exit(main())
