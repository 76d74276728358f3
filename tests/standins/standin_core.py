"""A small decoder-only transformer in the shape of the custom-code Chinese families.

The project's tests load Pangu, GLM and ChatGLM checkpoints through ``trust_remote_code`` without
the hub: these files play the custom code such checkpoints ship (``auto_map`` in config.json).
Module names follow each family (``layout``): Pangu's ``transformer.h[i].attn.{q,k,v,c}_proj`` and
``mlp.c_fc``; GLM/ChatGLM's ``...layers[i].attention.query_key_value``/``dense`` and
``mlp.dense_h_to_4h``/``dense_4h_to_h``. KV cache through transformers' ``Cache.update``.
"""
import math

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast


class StandinConfig(PretrainedConfig):
    """Fields as class annotations (transformers' configs are dataclasses)."""

    model_type = "standin"
    vocab_size: int = 512
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 256
    layout: str = "pangu"  # module names: pangu | glm | chatglm
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        h = config.hidden_size
        self.heads, self.layer_idx, self.split = config.num_attention_heads, layer_idx, config.layout == "pangu"
        if self.split:
            self.q_proj, self.k_proj, self.v_proj, self.c_proj = (nn.Linear(h, h) for _ in range(4))
        else:
            self.query_key_value, self.dense = nn.Linear(h, 3 * h), nn.Linear(h, h)

    def forward(self, x, bias, cache):
        B, T, H = x.shape
        if self.split:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.query_key_value(x).split(H, dim=-1)
        q, k, v = (t.view(B, T, self.heads, H // self.heads).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(H // self.heads) + bias
        out = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H)
        return self.c_proj(out) if self.split else self.dense(out)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        if config.layout == "pangu":
            self.c_fc, self.c_proj = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)
            self.up, self.down = "c_fc", "c_proj"
        else:
            self.dense_h_to_4h, self.dense_4h_to_h = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)
            self.up, self.down = "dense_h_to_4h", "dense_4h_to_h"

    def forward(self, x):
        return getattr(self, self.down)(nn.functional.gelu(getattr(self, self.up)(x)))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(config.hidden_size), nn.LayerNorm(config.hidden_size)
        attn = Attention(config, layer_idx)
        if config.layout == "pangu":
            self.attn = attn
        else:
            self.attention = attn
        self.mlp = MLP(config)

    def forward(self, x, bias, cache):
        attn = self.attn if hasattr(self, "attn") else self.attention
        x = x + attn(self.ln_1(x), bias, cache)
        return x + self.mlp(self.ln_2(x))


class Body(nn.Module):
    """Embeddings, blocks, final norm; blocks under ``h`` (Pangu) or ``layers`` (GLM, ChatGLM)."""

    def __init__(self, config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        blocks = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        if config.layout == "pangu":
            self.h = blocks
        else:
            self.layers = blocks
        self.ln_f = nn.LayerNorm(config.hidden_size)

    def forward(self, input_ids, attention_mask=None, past_key_values=None, position_ids=None):
        B, T = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:  # positions count real tokens only: any padding side works
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        x = self.wte(input_ids) + self.wpe(position_ids)
        keys = attention_mask.shape[1]
        causal = torch.ones(T, keys, dtype=torch.bool, device=x.device).tril(keys - T)
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
        bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, torch.finfo(x.dtype).min)
        for block in (self.h if hasattr(self, "h") else self.layers):
            x = block(x, bias, past_key_values)
        return self.ln_f(x)


class StandinPreTrainedModel(PreTrainedModel):
    config_class = StandinConfig
    base_model_prefix = "transformer"
    _supports_cache_class = True

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class StandinModel(StandinPreTrainedModel):
    """The base transformer (what AutoModel loads: a reward model's body)."""

    def __init__(self, config):
        super().__init__(config)
        self.transformer = Body(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, cache=None, **kwargs):
        past_key_values = cache if cache is not None else past_key_values
        hidden = self.transformer(input_ids, attention_mask, past_key_values, position_ids)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=past_key_values)


class StandinForCausalLM(StandinPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.transformer = Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, labels=None,
                use_cache=None, logits_to_keep=0, cache=None, **kwargs):
        past_key_values = cache if cache is not None else past_key_values  # transformers >= 5 passes `cache`
        hidden = self.transformer(input_ids, attention_mask, past_key_values, position_ids)
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)
