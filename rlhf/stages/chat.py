"""Chat with a trained actor in the terminal: ``python run.py stage=chat model.path=<actor dir>``.

Multi-turn, with the model family's prompt template; ``quit`` exits, ``clear`` resets the history.
When stdin is not a terminal, one prompt per line is read and one answer per line is printed, so
the stage can be scripted and tested.

Steps:
  1. load the tokenizer and model (no DeepSpeed needed for one process);
  2. for each user turn: build the prompt from the history, generate, print, remember.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, TextIO

import torch

from rlhf.models.families import Family, get_family


def build_prompt(family: Family, history: List[tuple], user: str) -> str:
    """Earlier (question, answer) turns followed by the new question, in the family's template."""
    turns = [family.format_prompt(q) + a for q, a in history]
    return family.turn_separator.join([*turns, family.format_prompt(user)])


def trim_history(history: List[tuple], family: Family, tokenizer, limit: int) -> List[tuple]:
    while history and len(tokenizer(build_prompt(family, history, ""), add_special_tokens=False)["input_ids"]) > limit:
        history = history[1:]
    return history


def run(cfg, run_dir=None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> Dict[str, Any]:
    from rlhf.models.load import load_causal_lm, load_tokenizer, resolve_path
    from rlhf.stages.common import generate

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    # 1. model
    family = get_family(cfg.model.family)
    path = resolve_path(cfg.model, Path(cfg.cache_dir))
    tokenizer = load_tokenizer(path, family, trust_remote_code=cfg.model.trust_remote_code)
    init = "pretrained" if cfg.model.init == "tiny" else None
    device = torch.device("cuda") if cfg.hardware.accelerator == "cuda" else torch.device("cpu")
    model = load_causal_lm(cfg.model, path, disable_dropout=True, init=init).to(device).eval()
    c = cfg.chat
    interactive = stdin.isatty()
    history: List[tuple] = []
    turns = 0
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
        history = trim_history(history, family, tokenizer, c.max_history_tokens)
        prompt = build_prompt(family, history, user)
        with torch.no_grad():
            answer = generate(model, tokenizer, [prompt], max_new_tokens=c.max_new_tokens, device=device,
                              do_sample=c.do_sample, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)[0]
        history.append((user, answer))
        turns += 1
        text = answer.replace("\n", " ").strip()
        print(f"Assistant: {text}" if interactive else text, file=stdout, flush=True)
    return {"stage": "chat", "turns": turns}
