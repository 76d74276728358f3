"""Small checkpoints of every family the project handles, built offline by the tests.

- native transformers classes no FAMILIES entry covers (Qwen2, GPT-NeoX) and GLM-4
  (``GlmForCausalLM``, model_type glm without custom code);
- custom-code stand-ins for Pangu, GLM-10B and ChatGLM-6B: ``config.json`` carries ``auto_map`` to
  modeling code in the directory (``tests/standins``), loaded only with ``trust_remote_code``.

Every checkpoint reuses the tiny tokenizer (byte-level BPE trained on the demo task), adjusted per
family: GPT-NeoX without a pad token (padded with eos), Qwen2 with a chat template, Pangu with
``<sep>``, GLM/ChatGLM with ``[gMASK]``/``<sop>``, ChatGLM padding on the left.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

STANDINS = Path(__file__).resolve().parent / "standins"
NATIVE = ("qwen2", "gpt_neox", "glm4")
REMOTE = {"pangu": ("gptpangu", "GPTPangu"), "glm": ("glm", "GLM"), "chatglm": ("chatglm", "ChatGLM")}
KINDS = NATIVE + tuple(REMOTE)
QWEN_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tokenizer(kind: str, tiny_dir: Path, out: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    extra = {"pangu": ["<sep>"], "glm": ["[gMASK]", "<sop>"], "chatglm": ["[gMASK]", "<sop>"]}.get(kind)
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra})
    if kind == "chatglm":
        tok.padding_side = "left"
    if kind == "gpt_neox":
        tok.pad_token = None
    if kind == "qwen2":
        tok.chat_template = QWEN_TEMPLATE
    tok.save_pretrained(str(out))
    return tok


def build(kind: str, out: Path, tiny_dir: Path, seed: int = 0) -> Path:
    """Write a small ``kind`` checkpoint (a key of KINDS) to ``out``; returns ``out``."""
    from transformers import AutoModelForCausalLM, GlmConfig, GPTNeoXConfig, Qwen2Config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(kind, tiny_dir, out)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    torch.manual_seed(seed)
    if kind in NATIVE:
        shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=256)
        if kind == "qwen2":
            config = Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **shape, **ids)
        elif kind == "gpt_neox":
            config = GPTNeoXConfig(**shape, **ids)
        else:
            config = GlmConfig(num_key_value_heads=2, head_dim=16, **shape, **ids)
        model = AutoModelForCausalLM.from_config(config)
    else:
        import importlib

        module_name, prefix = REMOTE[kind]
        module = importlib.import_module(f"tests.standins.modeling_{module_name}")
        config = getattr(module, f"{prefix}Config")(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                    max_position_embeddings=256, layout=kind, **ids)
        config.auto_map = {"AutoConfig": f"modeling_{module_name}.{prefix}Config",
                           "AutoModel": f"modeling_{module_name}.{prefix}Model",
                           "AutoModelForCausalLM": f"modeling_{module_name}.{prefix}ForCausalLM"}
        model = getattr(module, f"{prefix}ForCausalLM")(config)
        for name in (f"modeling_{module_name}.py", "standin_core.py"):
            shutil.copy(STANDINS / name, out / name)
    model.save_pretrained(str(out))
    return out


def model_type(path: Path) -> str:
    return json.loads((Path(path) / "config.json").read_text())["model_type"]
