"""FAMILIES: every per-model-family difference in one table.

Stages and data code read these fields; nothing else in the project checks ``model_type``.

Field notes
- ``lora_targets``: peft ``target_modules`` used when ``lora.target_modules`` is empty. A name
  matches a module whose dotted name equals it or ends with ``.<name>`` (peft's rule).
- ``padding_side``: side used for *training* batches. Generation always left-pads prompts; that is
  the generation code's job, not a family field.
- ``pad_from``: where ``load_tokenizer`` takes a pad token from when the tokenizer has none:
  ``pad`` (the tokenizer ships its own), ``eos`` or ``unk``.
- ``prompt_template`` / ``turn_separator``: how chat wraps one user turn and joins the history.
- ``needs_remote_code``: loading needs ``model.trust_remote_code=true`` (an explicit opt-in).
- ``layers_path``: dotted path from the causal-LM model (``AutoModelForCausalLM`` instance, peft
  wrapper removed) to its decoder-layer ``ModuleList``; used by per-layer gathering and by
  layer freezing.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # key in FAMILIES and value of model.family
    model_types: tuple[str, ...]  # HF config.model_type values this family covers
    lora_targets: tuple[str, ...]  # default peft target_modules
    padding_side: str  # padding side of training batches
    pad_from: str  # "pad" | "eos" | "unk": pad token source when the tokenizer has none
    prompt_template: str  # wraps one user turn in chat, "{prompt}" is replaced
    turn_separator: str  # joins turns of a multi-turn history
    needs_remote_code: bool = False  # loading requires model.trust_remote_code=true
    layers_path: str = ""  # causal LM -> decoder layer ModuleList

    def format_prompt(self, prompt: str) -> str:
        """One user turn in this family's chat format."""
        return self.prompt_template.format(prompt=prompt)


_DSCHAT_TEMPLATE = "Human: {prompt}\n Assistant:"  # DeepSpeed-Chat conversation format

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="opt",
            model_types=("opt",),
            lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
            padding_side="right",
            pad_from="pad",  # OPT's tokenizer has <pad> (id 1)
            prompt_template=_DSCHAT_TEMPLATE,
            turn_separator=" ",  # DeepSpeed-Chat chat.py joins turns with a space
            layers_path="model.decoder.layers",
        ),
        Family(
            name="llama",
            model_types=("llama",),
            lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            padding_side="right",
            pad_from="unk",  # Llama ships no pad token; <unk> (id 0) is never a training target
            prompt_template=_DSCHAT_TEMPLATE,
            turn_separator=" ",
            layers_path="model.layers",
        ),
        Family(
            name="pangu",
            model_types=("gpt_pangu",),
            lora_targets=("q_proj", "k_proj", "v_proj", "c_proj", "c_fc"),
            padding_side="right",
            pad_from="pad",  # Pangu's tokenizer has <pad> and <sep>
            prompt_template="{prompt}<sep>回答:",
            turn_separator="<sep>",
            needs_remote_code=True,
            layers_path="transformer.h",
        ),
        Family(
            name="glm",
            model_types=("glm",),
            lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
            padding_side="right",
            pad_from="pad",
            prompt_template="{prompt}回答:",
            turn_separator="\n",
            needs_remote_code=True,
            layers_path="glm.transformer.layers",
        ),
        Family(
            name="chatglm",
            model_types=("chatglm",),
            lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
            # ChatGLM-6B's own code derives positions from the <bos>/[gMASK] location and its
            # tokenizer only supports left padding.
            padding_side="left",
            pad_from="pad",
            prompt_template="问：{prompt}\n答：",
            turn_separator="\n",
            needs_remote_code=True,
            layers_path="transformer.layers",
        ),
    )
}


def get_family(name: str) -> Family:
    """The family registered as ``name``; ValueError listing the known names otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown model family {name!r} (model.family); known families: {', '.join(sorted(FAMILIES))}"
        ) from None


def family_for_model_type(model_type: str) -> Family:
    """The family covering HF ``config.model_type``; ValueError listing the known types otherwise."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(
        f"no model family covers model_type {model_type!r}; known model types: {', '.join(known)} "
        f"(families: {', '.join(sorted(FAMILIES))})"
    )
