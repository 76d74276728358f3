"""Data layer: named sources -> blended step shares -> tokenised cache -> padded batches.

- ``demo``:     the embedded rule-checkable task (prompts, ``verify``, ``make_demo``, held-out
                prompts, the tokenizer corpus); imports neither torch nor datasets.
- ``sources``:  ``SOURCES`` registry and ``load_source`` (hub id or local copy -> uniform rows).
- ``blend``:    ``build_step_data`` (data_split shares per step, blending) and ``load_unsupervised``.
- ``tokenize``: ``tokenize_sft/pairs/prompts/text`` -> ``(Dataset, stats)``, cached Arrow files.
- ``collate``:  ``SFTCollator``, ``PairCollator``, ``PromptCollator``.

Submodules are imported explicitly (``from rlhf.data.blend import build_step_data``) so that
importing ``rlhf.data.demo`` stays cheap.
"""
