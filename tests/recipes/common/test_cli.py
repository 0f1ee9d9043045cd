"""Every recipe config is read by the one config system (engine/config_io.py `@settings`): a typo'd key in a
shipped YAML file ends the recipe with exit code 2 and one line naming the file, the dotted key and the key it
was probably meant to be, however deep the key sits (sections, lists of sections, sections inside those)."""
import importlib

import pytest
import yaml
from pydantic import ValidationError

# (recipe module, shipped config, path to a key that exists in that config, the key misspelled)
TYPOS = [
    ("curate", "curate", ["quality", "prompt", "min_chars"], "min_char"),
    ("curate", "curate", ["tasks", "classifier"], "clasifier"),
    ("curate", "curate", ["tasks", "rules", 0, "patterns"], "pattern"),
    ("judge", "judge", ["judge", "prompts", "retry"], "retyr"),
    ("judge", "judge", ["candidates", 1, "endpoint", "path"], "pth"),
    ("judge", "judge", ["bootstrap", "confidence"], "confidense"),
    ("eval", "eval", ["eval", "temperature"], "temprature"),
    ("eval", "eval", ["model", "path"], "paht"),
    ("eval", "eval", ["client", "concurrency"], "concurency"),
    ("synth", "synth", ["backends", 0, "endpoint", "dtype"], "dtpye"),
    ("synth", "synth", ["stages", "responses", "max_tokens"], "max_token"),
    ("synth", "synth", ["filters", "reasoning", "allow_cjk"], "allow_cjkk"),
    ("synth", "synth", ["pairs", "per_question"], "per_questions"),
    ("fft", "demo", ["evaluate", "max_new_tokens"], "max_new_token"),
    ("fft", "demo", ["periodic_eval", "eval", "mode"], "mod"),
    ("distill", "distill", ["client", "timeout"], "timout"),
    ("prune", "prune", ["output", "dir"], "dri"),
]


def dotted(path) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")


def misspell(raw: dict, path: list, typo: str) -> dict:
    """The config with the key at `path` renamed to `typo` (created with a null value if the config omits it)."""
    node = raw
    for part in path[:-1]:
        if isinstance(part, str) and node.get(part) is None:
            node[part] = {}
        node = node[part]
    node[typo] = node.pop(path[-1], None)
    return raw


@pytest.mark.parametrize("recipe, config, path, typo", TYPOS, ids=[f"{c}:{dotted(p[:-1] + [t])}" for _, c, p, t in TYPOS])
def test_a_typo_in_a_shipped_config_names_file_key_and_close_match(tmp_path, capsys, recipe, config, path, typo):
    raw = yaml.safe_load(open(f"recipes/configs/{config}.yaml", encoding="utf-8"))
    bad = tmp_path / f"{config}.yaml"
    bad.write_text(yaml.safe_dump(misspell(raw, path, typo), allow_unicode=True), encoding="utf-8")
    code = importlib.import_module(f"qforge.recipes.{recipe}").main(["--config", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"error: {bad}: unknown key '{dotted(path[:-1] + [typo])}'; did you mean '{dotted(path)}'?"


@pytest.mark.parametrize("make", [
    lambda: importlib.import_module("qforge.recipes.common.endpoint").ClientSettings(timeout="soon"),
    lambda: importlib.import_module("qforge.recipes.eval").EvalSettings(mode="loglikelihood"),
    lambda: importlib.import_module("qforge.recipes.judge").GenerationSettings(max_tokens=[1]),
    lambda: importlib.import_module("qforge.recipes.curate").InputFile(path="a.jsonl", format="csv"),
    lambda: importlib.import_module("qforge.recipes.synth").StageSettings(retries="twice"),
    lambda: importlib.import_module("qforge.recipes.evals.periodic_eval").PeriodicEvalSettings(where="remote"),
], ids=["client", "eval", "judge", "curate", "synth", "periodic_eval"])
def test_settings_built_in_code_are_validated_too(make):
    """Settings classes check their values whoever builds them (periodic_eval builds EvalSettings in code)."""
    with pytest.raises(ValidationError):
        make()
