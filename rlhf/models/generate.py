"""Batched text generation with any causal LM the project trains (plain HF or a DeepSpeed module)."""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist


@torch.no_grad()
def generate(module, tokenizer, prompts: List[str], *, max_new_tokens: int, device, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, batch_size: int = 64) -> List[str]:
    """Answers (decoded text after the prompt) for ``prompts``; prompts left-padded.

    Under ZeRO-3 with several ranks every rank must call this with the same number of batches
    (``synced_gpus``): parameters are gathered collectively layer by layer.
    """
    synced = dist.is_initialized() and dist.get_world_size() > 1 and any(hasattr(p, "ds_id") for p in module.parameters())
    was_training = module.training
    module.eval()
    answers: List[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            out = module.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  temperature=temperature if do_sample else None,
                                  top_k=top_k if do_sample and top_k else None,
                                  top_p=top_p if do_sample else None,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                  synced_gpus=synced)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        module.train(was_training)
    return answers
