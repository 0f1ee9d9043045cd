"""`qforge`: one command for every recipe and tool (`qforge fft --config demo`, `qforge serve --model DIR`).

Each subcommand hands its arguments to the module's own `main`, so `qforge fft ...` and `python
recipes/fft.py ...` are the same program. Modules are imported only when their subcommand runs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

CONFIGS = Path(__file__).resolve().parent / "configs"

# subcommand → (module with a `main(argv)`, one-line description)
COMMANDS = {
    "fft": ("qforge.recipes.fft", "full fine-tuning (SFT) of a Qwen3 checkpoint on chat data"),
    "dpo": ("qforge.recipes.dpo", "direct preference optimisation after SFT"),
    "distill": ("qforge.recipes.distill", "strong-to-weak distillation (off- or on-policy)"),
    "grpo": ("qforge.recipes.grpo", "online RL (GRPO) with verifiable or LLM-judge rewards after SFT"),
    "prune": ("qforge.recipes.prune", "CJK-free export: a smaller head and a rewritten tokenizer"),
    "eval": ("qforge.recipes.eval", "multiple-choice evaluation (VMLU format)"),
    "judge": ("qforge.recipes.judge", "LLM-as-judge: pairwise win rates or 1-10 ratings per task"),
    "synth": ("qforge.recipes.synth", "synthetic SFT data: syllabus → questions → answers → reasoning"),
    "curate": ("qforge.recipes.curate", "curate a public SFT corpus: language, quality, dedup, quotas"),
    "report": ("qforge.recipes.report", "reports (Markdown, plots) from evaluation and judge results"),
    "demo-data": ("qforge.recipes.make_demo_data", "regenerate the demo's arithmetic data set"),
    "serve": ("qforge.engine.serve.__main__", "an OpenAI-compatible server for a checkpoint"),
    "twin": ("qforge.tools.twin.__main__", "GPU twin: trace a training step at 8B/32B shapes on fake CUDA"),
    "estimate": ("qforge.tools.estimate", "plan memory and step time of a run before renting hardware"),
    "roofline": ("qforge.tools.kernel_roofline", "bytes and FLOPs of every kernel against the H100 roofline"),
    "aot-check": ("qforge.tools.aot_check", "compile every Triton kernel for sm_80/sm_90 without a GPU"),
    "vocab-report": ("qforge.tools.vocab_report", "count a tokenizer's CJK tokens and write the kept ids"),
}


def shipped_configs() -> dict[str, Path]:
    """The configs that ship with qforge, by name (file name without .yaml)."""
    return {path.stem: path for path in sorted(CONFIGS.glob("*.yaml"))}


def describe(path: Path) -> str:
    """A config's first comment line (every shipped config starts with one)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            text = line.lstrip("# ").strip()
            return text if len(text) <= 90 else text[:89].rstrip() + "…"
        if line.strip():
            break
    return ""


def configs_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="qforge configs", description="List, show or copy a shipped config.")
    parser.add_argument("action", nargs="?", choices=("list", "show", "copy"), default="list")
    parser.add_argument("name", nargs="?", help="config name (see `qforge configs`)")
    parser.add_argument("dest", nargs="?", help="where `copy` writes it (default: ./NAME.yaml)")
    args = parser.parse_args(argv)
    configs = shipped_configs()
    if args.action == "list":
        width = max(map(len, configs))
        for name, path in configs.items():
            print(f"{name:<{width}}  {describe(path)}")
        print(f"\nrun one with `qforge <recipe> --config NAME`; start your own with `qforge configs copy NAME`"
              f"\n(files in {CONFIGS})")
        return 0
    if args.name not in configs:
        print(f"error: no shipped config {args.name!r}; `qforge configs` lists them", file=sys.stderr)
        return 2
    if args.action == "show":
        print(configs[args.name].read_text(encoding="utf-8"), end="")
        return 0
    dest = Path(args.dest or f"{args.name}.yaml")
    if dest.exists():
        print(f"error: {dest} exists; give another destination", file=sys.stderr)
        return 2
    shutil.copyfile(configs[args.name], dest)
    print(f"wrote {dest}")
    return 0


def preflight_command(argv: Sequence[str]) -> int:
    argparse.ArgumentParser(prog="qforge preflight",
                            description="Print library versions and the backend of every swappable op.").parse_args(argv)
    from qforge.engine.errors import QforgeError
    from qforge.engine.preflight import preflight
    try:
        found = preflight()
    except QforgeError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(" · ".join(f"{name} {value or '—'}" for name, value in found["versions"].items()))
    print(" · ".join(f"{op} {impl}" for op, impl in found["backends"].items()))
    return 0


def usage() -> str:
    width = max(map(len, [*COMMANDS, "configs", "preflight"]))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += [f"  {'configs':<{width}}  list, show or copy the shipped configs",
              f"  {'preflight':<{width}}  library versions and the backend each op will use"]
    return ("usage: qforge <command> [args]   (qforge <command> --help for its options)\n\ncommands:\n"
            + "\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "configs":
        return configs_command(rest)
    if command == "preflight":
        return preflight_command(rest)
    if command not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(command, [*COMMANDS, "configs", "preflight"], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"error: unknown command {command!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv[0] = f"qforge {command}"  # argparse's prog: `qforge fft --help` prints "usage: qforge fft ..."
    code = module.main(rest)
    return code if isinstance(code, int) else 0


def entry_point() -> int:
    """The console script: `main`, quiet when its output is piped into a reader that stops early (`| head`)."""
    try:
        return main()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(entry_point())
