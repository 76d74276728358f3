"""Tiny default models built offline and deterministically, cached on disk.

``build_tiny("tiny-opt", cache_dir)`` trains a byte-level BPE tokenizer on the demo corpus, builds a
randomly initialised model of a few hundred thousand parameters from a fixed seed and writes a
plain HF directory (config.json, model.safetensors, tokenizer files) that
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load with no project
code. Same spec + texts + seed -> same directory, bit-identical weights.

Tokenizer special tokens: ``<s>`` (bos), ``</s>`` (eos), ``<pad>``, ``<unk>``, ids 0-3 in that
order. The tokenizer adds **no** special tokens when encoding (no bos prepended, no eos
appended): the data layer appends eos itself, identically for every family.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<unk>")
_BUILD_VERSION = 2  # bump when the build procedure changes: invalidates every cached tiny model

TINY_SPECS: dict[str, dict] = {
    "tiny-opt": {
        "family": "opt",
        "model_type": "opt",
        "config": {  # OPTConfig kwargs; vocab_size and special token ids come from the tokenizer
            "hidden_size": 128,
            "word_embed_proj_dim": 128,
            "ffn_dim": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "max_position_embeddings": 512,
            "do_layer_norm_before": True,
            "dropout": 0.1,  # OPT defaults, so disable_dropout has something to disable
            "attention_dropout": 0.0,
            "activation_function": "relu",
            "tie_word_embeddings": True,
        },
    },
    "tiny-llama": {
        "family": "llama",
        "model_type": "llama",
        "config": {  # LlamaConfig kwargs
            "hidden_size": 128,
            "intermediate_size": 344,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,  # exercises grouped-query attention like Llama-2-70B
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
        },
    },
}


def build_tokenizer(out_dir: str | Path, texts: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on ``texts`` and save it in transformers' format.

    Deterministic: the same texts give the same vocabulary and merges. The vocabulary may be
    smaller than ``vocab_size`` when the corpus has fewer merges to learn. Returns the
    ``PreTrainedTokenizerFast`` (loadable again with ``AutoTokenizer.from_pretrained(out_dir)``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    # Digits split one per token (as Llama's tokenizer does): number facts such as parity or a
    # successor then depend on digit tokens the model can generalise over, not on memorised ids.
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk>
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=512,
        clean_up_tokenization_spaces=False,  # decode(encode(s)) == s exactly
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _cache_key(spec: str, texts: list[str], seed: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": _BUILD_VERSION, "spec": TINY_SPECS[spec], "seed": seed}, sort_keys=True).encode())
    for t in texts:
        h.update(len(t.encode()).to_bytes(8, "little"))
        h.update(t.encode())
    return f"{spec}-{h.hexdigest()[:12]}-seed{seed}"


def build_tiny(spec: str, cache_dir: str | Path, texts: Iterable[str] | None = None, seed: int = 0) -> Path:
    """Directory of the tiny model ``spec`` (a key of TINY_SPECS), building it if not cached.

    ``texts`` trains the tokenizer (default: ``rlhf.data.demo.corpus()``). The cache directory
    is keyed on spec + texts + seed; it is built in a temporary directory and renamed into place,
    so an interrupted build never leaves a partial cache and concurrent ranks agree on one copy.
    """
    if spec not in TINY_SPECS:
        raise ValueError(f"unknown tiny model {spec!r} (model.path); known: {', '.join(sorted(TINY_SPECS))}")
    if texts is None:
        from rlhf.data.demo import corpus

        texts = corpus()
    texts = list(texts)
    cache_dir = Path(cache_dir)
    final = cache_dir / _cache_key(spec, texts, seed)
    if final.is_dir():
        return final

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
    try:
        _build_into(tmp, TINY_SPECS[spec], texts, seed)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another rank: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_into(out: Path, spec: dict, texts: list[str], seed: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer(out, texts)
    config = AutoConfig.for_model(
        spec["model_type"],
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **spec["config"],
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out))
