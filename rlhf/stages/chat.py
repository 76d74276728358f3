"""Chat with a trained actor in the terminal: ``python run.py stage=chat model.path=<actor dir>``.

Multi-turn, in the model's chat format (its family's prompt template, or the tokenizer's own
``chat_template`` for a derived family); ``quit`` exits, ``clear`` resets the history. When stdin is
not a terminal, one prompt per line is read and one answer per line is printed, so the stage can be
scripted and tested. History plus the answer never exceed the model's context: the oldest turns
are dropped, with one line saying so.

Steps:
  1. load the tokenizer and model (no DeepSpeed needed for one process);
  2. for each user turn: build the prompt from the history, generate, print, remember.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, TextIO

import torch

from rlhf.models.families import Family

log = logging.getLogger(__name__)


def build_prompt(family: Family, history: List[tuple], user: str, tokenizer=None) -> str:
    """Earlier (question, answer) turns followed by the new question, in the family's format."""
    if family.chat_template and tokenizer is not None:
        messages = [m for q, a in history for m in ({"role": "user", "content": q},
                                                    {"role": "assistant", "content": a})]
        messages.append({"role": "user", "content": user})
        return tokenizer.apply_chat_template(messages, chat_template=family.chat_template, tokenize=False,
                                             add_generation_prompt=True)
    turns = [family.format_prompt(q) + a for q, a in history]
    return family.turn_separator.join([*turns, family.format_prompt(user)])


def context_length(model) -> int:
    """The longest sequence the model takes (``max_position_embeddings`` or its equivalent)."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def trim_history(history: List[tuple], family: Family, tokenizer, user: str, limit: int) -> tuple[List[tuple], int]:
    """Drop the oldest turns until the prompt for ``user`` fits in ``limit`` tokens.
    Returns (kept history, turns dropped)."""
    dropped = 0
    while history and len(tokenizer(build_prompt(family, history, user, tokenizer),
                                     add_special_tokens=False)["input_ids"]) > limit:
        history, dropped = history[1:], dropped + 1
    return history, dropped


def run(cfg, run_dir=None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> Dict[str, Any]:
    from rlhf.engine.setup import device_for
    from rlhf.models.build import load_trainable
    from rlhf.models.load import config_key, load_tokenizer, resolve_family, resolve_path
    from rlhf.models.generate import generate

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    # 1. model
    path = resolve_path(cfg.model, Path(cfg.cache_dir), key=config_key(cfg.model))
    family = resolve_family(cfg.model, path)
    tokenizer = load_tokenizer(path, family, trust_remote_code=cfg.model.trust_remote_code, key=config_key(cfg.model))
    device = device_for(cfg.hardware)
    model = load_trainable(cfg.model, path, disable_dropout=True).to(device).eval()
    c = cfg.chat
    setting = {k: (c[k] if c[k] is not None else family.generation_default(k, default))
               for k, default in (("max_new_tokens", 256), ("do_sample", False), ("temperature", 0.8), ("top_k", 10))}
    context = context_length(model)
    if setting["max_new_tokens"] >= context:
        raise ValueError(f"chat.max_new_tokens={setting['max_new_tokens']} leaves no room for a prompt in the "
                         f"model's context of {context} tokens")
    limit = min(int(c.max_history_tokens), context - int(setting["max_new_tokens"]))
    interactive = stdin.isatty()
    history: List[tuple] = []
    turns = dropped_total = 0
    # 2. conversation
    if interactive:
        print(f"chatting with {path} ('quit' exits, 'clear' resets the history)", file=stdout)
    while True:
        if interactive:
            print("Human: ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        user = line.rstrip("\n").strip()
        if user == "quit":
            break
        if user == "clear":
            history = []
            continue
        if not user:
            continue
        history, dropped = trim_history(history, family, tokenizer, user, limit)
        if dropped:
            dropped_total += dropped
            log.info("chat: dropped the %d oldest turn(s) to stay within %d tokens", dropped, limit)
        prompt = build_prompt(family, history, user, tokenizer)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > limit:  # a single turn longer than the context: keep its end
            prompt = tokenizer.decode(ids[-limit:])
            log.info("chat: the question alone is %d tokens; kept its last %d", len(ids), limit)
        with torch.no_grad():
            answer = generate(model, tokenizer, [prompt], max_new_tokens=int(setting["max_new_tokens"]),
                              device=device, do_sample=bool(setting["do_sample"]),
                              temperature=float(setting["temperature"]), top_k=int(setting["top_k"]),
                              top_p=float(c.top_p))[0]
        history.append((user, answer))
        turns += 1
        text = " ".join(answer.splitlines()).strip()  # one line, also for \r, \x1d, \u2028 ... in the answer
        print(f"Assistant: {text}" if interactive else text, file=stdout, flush=True)
    return {"stage": "chat", "turns": turns, "dropped_turns": dropped_total}
