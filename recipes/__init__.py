"""Recipes: one entry point per `qforge` subcommand at this level (fft, dpo, distill, prune, eval, judge, synth,
curate, report, make_demo_data; main is the `qforge` command) and their configs/ and data/. Helpers live in
subpackages: evals/ (evaluation), sft_data/ (synthesis and curation), verifiers/ (answer checks, the reward
interface), common/ (the recipe command line, model endpoints, JSONL files)."""
