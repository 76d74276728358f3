"""Benchmark evaluation (C-Eval, MMLU, CLUE) with lm-eval as the engine; CLUE task YAMLs in tasks/."""
