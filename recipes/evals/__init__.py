"""Evaluation helpers of the recipes: multiple choice, judge verdicts, instruction following, function calling,
exact match, the before/after evaluation of a fine-tuning run and the evaluation during training."""
