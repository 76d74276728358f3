"""FAMILIES: every per-model-family difference in one table, and the family of a checkpoint.

Stages and data code read these fields; nothing else in the project checks ``model_type``.
The family of a model comes from its checkpoint (``config.json``'s ``model_type``, plus
``auto_map``/``architectures`` where one ``model_type`` names two code bases), never by default:
``family_for_config``. A causal LM of an unregistered type gets a *derived* family
(``derive_family``): LoRA targets from peft's own per-architecture defaults, pad token and padding
side from its tokenizer, chat format from the tokenizer's ``chat_template`` (else DeepSpeed-Chat's
``Human: ... Assistant:``).

Field notes
- ``lora_targets``: peft ``target_modules`` used when ``lora.target_modules`` is empty. A name
  matches a module whose dotted name equals it or ends with ``.<name>`` (peft's rule).
- ``padding_side``: side used for *training* batches. Generation always left-pads prompts; that is
  the generation code's job, not a family field.
- ``pad_from``: where ``load_tokenizer`` takes a pad token from when the tokenizer has none:
  ``pad`` (the tokenizer ships its own), ``eos`` or ``unk``.
- ``prompt_template`` / ``turn_separator``: how chat wraps one user turn and joins the history;
  ``chat_template``: the tokenizer's own Jinja template is used instead (derived families).
- ``needs_remote_code``: loading needs ``<key>.trust_remote_code=true`` (an explicit opt-in).
- ``remote_code``: the checkpoint must carry ``auto_map`` (custom code) to be this family; False:
  it must not (transformers' native class). Tells the two ``model_type: glm`` code bases apart.
- ``layers_path``: dotted path from the causal-LM model (``AutoModelForCausalLM`` instance, peft
  wrapper removed) to its decoder-layer ``ModuleList``; empty = found from the model's structure
  (``decoder_layers``).
- ``special_tokens``: tokens that must stay one token each (Pangu's ``<sep>``, ChatGLM's ``[gMASK]``);
  the tokenizer is checked (and taught them when it splits them).
- ``generation``: generation defaults of the family's own toolkit (chat uses them unless set).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    name: str  # key in FAMILIES and value of model.family
    model_types: tuple[str, ...]  # HF config.model_type values this family covers
    lora_targets: tuple[str, ...]  # default peft target_modules
    padding_side: str  # padding side of training batches
    pad_from: str  # "pad" | "eos" | "unk": pad token source when the tokenizer has none
    prompt_template: str  # wraps one user turn in chat, "{prompt}" is replaced
    turn_separator: str  # joins turns of a multi-turn history
    needs_remote_code: bool = False  # loading requires <key>.trust_remote_code=true
    remote_code: Optional[bool] = None  # None: either; True: needs auto_map; False: must have none
    layers_path: str = ""  # causal LM -> decoder layer ModuleList ("" = found from the structure)
    special_tokens: tuple[str, ...] = ()  # kept whole by the tokenizer
    generation: tuple[tuple[str, Any], ...] = ()  # (key, value) generation defaults for chat
    chat_template: Optional[str] = None  # the tokenizer's Jinja chat template (derived families)
    derived: bool = False  # built from an unregistered checkpoint, not a FAMILIES entry

    def format_prompt(self, prompt: str) -> str:
        """One user turn in this family's chat format."""
        return self.prompt_template.format(prompt=prompt)

    def generation_default(self, key: str, fallback: Any) -> Any:
        return dict(self.generation).get(key, fallback)


_DSCHAT_TEMPLATE = "Human: {prompt}\n Assistant:"  # DeepSpeed-Chat conversation format
# The Chinese toolkit's generation defaults (max_length 512, max_length_generation 100, top_k 10,
# temperature 0.8, do_sample) for its Pangu / GLM / ChatGLM models.
_TOOLKIT_GENERATION = (("max_length", 512), ("max_new_tokens", 100), ("top_k", 10), ("temperature", 0.8),
                       ("do_sample", True))

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
            name="pangu",  # sunzeyeah/pangu-350M, -2.6B, -13B (custom code)
            model_types=("gpt_pangu",),
            lora_targets=("q_proj", "k_proj", "v_proj", "c_proj", "c_fc"),
            padding_side="right",
            pad_from="pad",  # Pangu's tokenizer has <pad> and <sep>
            prompt_template="{prompt}<sep>回答:",
            turn_separator="<sep>",
            needs_remote_code=True,
            remote_code=True,
            layers_path="transformer.h",
            special_tokens=("<sep>",),
            generation=_TOOLKIT_GENERATION,
        ),
        Family(
            name="glm",  # THUDM/glm-large-chinese (GLM-350M), glm-10b-chinese: custom code, model_type glm
            model_types=("glm",),
            lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
            padding_side="right",
            pad_from="pad",
            prompt_template="{prompt}回答:",
            turn_separator="\n",
            needs_remote_code=True,
            remote_code=True,
            layers_path="",  # found from the structure (GLM-10B's code: glm.transformer.layers)
            special_tokens=("[gMASK]",),
            generation=_TOOLKIT_GENERATION,
        ),
        Family(
            name="glm4",  # THUDM/glm-4-9b-hf: transformers' native GlmForCausalLM, also model_type glm
            model_types=("glm",),
            lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),
            padding_side="right",
            pad_from="eos",
            prompt_template=_DSCHAT_TEMPLATE,
            turn_separator=" ",
            remote_code=False,
            layers_path="model.layers",
        ),
        Family(
            name="chatglm",  # THUDM/chatglm-6b (custom code)
            model_types=("chatglm",),
            lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
            # ChatGLM-6B's own code derives positions from the <bos>/[gMASK] location and its
            # tokenizer only supports left padding.
            padding_side="left",
            pad_from="pad",
            prompt_template="问：{prompt}\n答：",
            turn_separator="\n",
            needs_remote_code=True,
            remote_code=True,
            layers_path="transformer.layers",
            special_tokens=("[gMASK]",),
            generation=_TOOLKIT_GENERATION,
        ),
    )
}

AUTO = "auto"  # model.family value: take the family from the checkpoint

def get_family(name: str, key: str = "model") -> Family:
    """The family registered as ``name``; ValueError naming ``<key>.family`` and the known names."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown model family {name!r} ({key}.family); known families: {', '.join(sorted(FAMILIES))} "
            f"(or {key}.family=auto: from the checkpoint)"
        ) from None


def family_for_model_type(model_type: str) -> Family:
    """The (first) family covering HF ``config.model_type``; ValueError listing the known types."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted({t for f in FAMILIES.values() for t in f.model_types})
    raise ValueError(
        f"no model family covers model_type {model_type!r}; known model types: {', '.join(known)} "
        f"(families: {', '.join(sorted(FAMILIES))})"
    )


def read_config(path: str | Path) -> Optional[dict]:
    """``config.json`` of a local model directory as plain JSON (no code runs), else None."""
    file = Path(str(path)).expanduser() / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a readable config.json ({e})") from None


def family_for_config(config: Mapping[str, Any]) -> Optional[Family]:
    """The registered family of a checkpoint's config (dict), or None when none covers it.

    One ``model_type`` can name two code bases (``glm``: GLM-10B's custom code and transformers'
    native GLM-4): ``auto_map`` (custom code shipped with the checkpoint) tells them apart.
    """
    model_type = config.get("model_type")
    has_code = bool(config.get("auto_map"))
    for family in FAMILIES.values():
        if model_type in family.model_types and family.remote_code in (None, has_code):
            return family
    return None


def _peft_targets(model_type: str) -> Optional[tuple[str, ...]]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as targets

    found = targets.get(model_type)
    return tuple(found) if found else None


def _tokenizer_config(path: str | Path) -> dict:
    """tokenizer_config.json (+ chat_template.jinja) of a local directory as plain data."""
    d = Path(str(path)).expanduser()
    out: dict = {}
    if (d / "tokenizer_config.json").is_file():
        try:
            out = json.loads((d / "tokenizer_config.json").read_text())
        except (OSError, json.JSONDecodeError):
            out = {}
    if (d / "chat_template.jinja").is_file():
        out["chat_template"] = (d / "chat_template.jinja").read_text()
    return out


def derive_family(config: Mapping[str, Any], path: str | Path, key: str = "model") -> Family:
    """A family for a causal LM no FAMILIES entry covers, from the checkpoint itself:

    - LoRA targets: peft's default target modules for its ``model_type``;
    - pad token / padding side: the tokenizer's (a tokenizer without pad pads with eos);
    - chat format: the tokenizer's ``chat_template`` when it has one, else DeepSpeed-Chat's;
    - decoder layers: found from the model's structure (``decoder_layers``).
    Raises naming ``model_type`` and how to register a family when peft knows no targets.
    """
    model_type = str(config.get("model_type") or "?")
    targets = _peft_targets(model_type)
    if targets is None:
        raise ValueError(
            f"{key}.path={str(path)!r} is a {model_type!r} model: no registered family covers it and peft has no "
            f"default LoRA targets for it. Register a Family for {model_type!r} in rlhf/models/families.py "
            f"(FAMILIES), or set lora.target_modules=[...] (and {key}.family=<a registered family> to borrow "
            f"its padding and template)")
    tok = _tokenizer_config(path)
    side = tok.get("padding_side") if tok.get("padding_side") in ("left", "right") else "right"
    template = tok.get("chat_template") if isinstance(tok.get("chat_template"), str) else None
    family = Family(name=model_type, model_types=(model_type,), lora_targets=targets, padding_side=side,
                    pad_from="eos", prompt_template=_DSCHAT_TEMPLATE, turn_separator=" ",
                    needs_remote_code=bool(config.get("auto_map")), chat_template=template, derived=True)
    log.info("%s: model_type %r has no registered family; derived one: LoRA targets %s (peft's defaults), "
             "%s padding, pad from the tokenizer (else eos), chat format %s", key, model_type,
             ",".join(targets), side, "from the tokenizer's chat_template" if template else "Human: ... Assistant:")
    return family


def with_lora_targets(family: Family, targets) -> Family:
    return replace(family, lora_targets=tuple(targets))


def decoder_layers(model, family: Optional[Family] = None):
    """The decoder-layer ``ModuleList`` of a causal LM (peft wrapper removed): ``family.layers_path``
    when set, else the first ``ModuleList`` with ``config.num_hidden_layers`` entries (or, failing
    that, the longest ``ModuleList``)."""
    from torch import nn

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if family is not None and family.layers_path:
        node = base
        for part in family.layers_path.split("."):
            node = getattr(node, part)
        return node
    n = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for m in lists:
        if n and len(m) == n:
            return m
    if not lists:
        raise ValueError(f"{type(base).__name__} has no ModuleList of decoder layers")
    return max(lists, key=len)


def planning_family(model_cfg) -> Optional[Family]:
    """The family of a model for offline planning: ``<key>.family`` when set, else from the
    ``config.json`` of a local ``<key>.path`` (registered or derived); None when neither is known."""
    declared = str(getattr(model_cfg, "family", AUTO) or AUTO)
    if declared != AUTO:
        return get_family(declared, str(getattr(model_cfg, "key", "model") or "model"))
    config = read_config(str(model_cfg.path))
    if config is None:
        return None
    return family_for_config(config) or derive_family(config, str(model_cfg.path), str(model_cfg.key))
