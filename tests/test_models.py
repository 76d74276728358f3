"""rlhf.models: families, tiny offline models, loading/saving, LoRA, reward model.

Real tiny models (a few hundred thousand parameters) built once per module in a tmp cache.
"""
from __future__ import annotations

import copy
import json
import operator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.config import LoraConfig, ModelConfig
from rlhf.models.load import resolve_family
from rlhf.models import (
    FAMILIES,
    RewardModel,
    apply_lora,
    build_tiny,
    count_params,
    family_for_model_type,
    get_family,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    lora_param_groups,
    merge_lora,
    resolve_path,
    save_hf,
    save_reward_model,
)

DEMO = "Human: What is 3 plus 4?\n Assistant: The answer is 7."
TEXTS = [DEMO] + [
    f"Human: What is {a} plus {b}?\n Assistant: The answer is {a + b}." for a in range(12) for b in range(12)
] + ["Human: Name a colour.\n Assistant: Blue, or perhaps green!"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tiny(cache):
    """spec -> built directory."""
    return {spec: build_tiny(spec, cache, TEXTS) for spec in ("tiny-opt", "tiny-llama")}


def model_cfg(spec_dir, family: str, **kw) -> ModelConfig:
    return ModelConfig(name="t", family=family, path=str(spec_dir), init="pretrained", **kw)


FAMILY_OF = {"tiny-opt": "opt", "tiny-llama": "llama"}


def batch(tokenizer, texts=(DEMO, "Human: What is 5 plus 6?")):
    tokenizer.padding_side = "right"
    return tokenizer(list(texts), return_tensors="pt", padding=True)


def logits(model, enc) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits


# ---------------------------------------------------------------- families


def test_family_lookup_and_errors():
    assert get_family("opt").lora_targets == ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    assert "gate_proj" in get_family("llama").lora_targets
    assert family_for_model_type("llama").name == "llama"
    assert all(FAMILIES[n].needs_remote_code for n in ("pangu", "glm", "chatglm"))
    assert get_family("opt").format_prompt("hi") == "Human: hi\n Assistant:"
    with pytest.raises(ValueError, match="gpt5.*known families: chatglm, glm, glm4, llama, opt, pangu"):
        get_family("gpt5")
    with pytest.raises(ValueError, match="'bert'.*opt"):
        family_for_model_type("bert")


# ---------------------------------------------------------------- tiny models


def test_tiny_build_is_deterministic_and_cached(cache, tiny, tmp_path):
    first = tiny["tiny-opt"]
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert build_tiny("tiny-opt", cache, TEXTS) == first  # cached: same dir, not rebuilt
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]  # no leftover temp dirs

    again = build_tiny("tiny-opt", tmp_path, TEXTS)  # fresh cache: rebuilt from scratch
    assert again.name == first.name
    a, b = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (first / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()

    other = build_tiny("tiny-opt", tmp_path, TEXTS, seed=1)
    assert other != again
    k = "model.decoder.embed_tokens.weight"
    assert not torch.equal(load_file(other / "model.safetensors")[k], a[k])


def test_tokenizer_round_trips_and_adds_no_special_tokens(tiny):
    for d in tiny.values():
        tok = AutoTokenizer.from_pretrained(d)
        ids = tok(DEMO)["input_ids"]
        assert tok.decode(ids) == DEMO
        assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "</s>", "<pad>", "<unk>"]
        assert not {0, 1, 2, 3} & set(ids)  # no bos/eos/pad/unk added or needed
        assert len(ids) < len(DEMO) / 2  # BPE merges learned on the corpus


@pytest.mark.parametrize("spec", ["tiny-opt", "tiny-llama"])
def test_tiny_loads_with_transformers_alone(tiny, spec):
    d = tiny[spec]
    model = AutoModelForCausalLM.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    assert model.config.model_type == FAMILY_OF[spec]
    total, trainable = count_params(model)
    assert total == trainable == sum(p.numel() for p in model.parameters()) and total < 3_000_000
    out = logits(model, batch(tok))
    assert out.shape[:2] == (2, batch(tok)["input_ids"].shape[1]) and out.shape[2] == len(tok)
    assert torch.isfinite(out).all()
    layers = operator.attrgetter(get_family(FAMILY_OF[spec]).layers_path)(model)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == model.config.num_hidden_layers


# ---------------------------------------------------------------- loading / saving


@pytest.mark.parametrize("spec", ["tiny-opt", "tiny-llama"])
def test_save_hf_reload_identical_logits(tiny, spec, tmp_path):
    cfg = model_cfg(tiny[spec], FAMILY_OF[spec])
    tok = load_tokenizer(str(tiny[spec]), get_family(cfg.family))
    model = load_causal_lm(cfg, str(tiny[spec]))
    enc = batch(tok)
    out = tmp_path / "hf"
    save_hf(model, tok, out)
    save_hf(model, tok, out)  # overwriting an existing directory is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(model, enc), logits(reloaded, enc))
    assert AutoTokenizer.from_pretrained(out).decode(tok(DEMO)["input_ids"]) == DEMO


def test_load_tokenizer_pad_per_family(tiny, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny["tiny-llama"])
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    llama = load_tokenizer(str(tmp_path), get_family("llama"))
    assert llama.pad_token == "<unk>" and llama.padding_side == "right"
    assert load_tokenizer(str(tmp_path), get_family("opt")).pad_token == "</s>"  # no own pad: eos
    assert load_tokenizer(str(tiny["tiny-opt"]), get_family("opt")).pad_token == "<pad>"


def test_disable_dropout(tiny):
    cfg = model_cfg(tiny["tiny-opt"], "opt")
    model = load_causal_lm(cfg, cfg.path, disable_dropout=True).train()
    assert model.config.dropout == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.equal(model(ids).logits, model(ids).logits)  # train mode, still deterministic
    assert load_causal_lm(cfg, cfg.path).config.dropout == pytest.approx(0.1)


def test_init_random_builds_real_shape_offline():
    arch = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
    cfg = ModelConfig(name="x", family="llama", path="meta-llama/Llama-2-7b-hf", init="random", arch=arch)
    assert resolve_path(cfg, "/nonexistent-cache") == "meta-llama/Llama-2-7b-hf"  # hub id passes through
    model = load_causal_lm(cfg, cfg.path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.hidden_size == 32 and model.get_input_embeddings().weight.shape == (100, 32)
    with pytest.raises(ValueError, match="model.arch"):
        load_causal_lm(ModelConfig(name="x", family="llama", path="org/m", init="random"), "org/m")


def test_resolve_path_errors(tiny, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "opt"}))
    cfg = ModelConfig(name="x", family="opt", path=str(d))
    with pytest.raises(FileNotFoundError, match=f"model.path='{d}'.*no weights"):
        resolve_path(cfg, tmp_path)
    assert resolve_path(ModelConfig(name="x", family="opt", path=str(d), init="random"), tmp_path) == str(d)
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="model.allow_pickle"):
        resolve_path(cfg, tmp_path)
    assert resolve_path(ModelConfig(name="x", family="opt", path=str(d), allow_pickle=True), tmp_path) == str(d)
    with pytest.raises(FileNotFoundError, match="model.path='./no/such/dir'"):
        resolve_path(ModelConfig(name="x", family="opt", path="./no/such/dir"), tmp_path)
    assert resolve_path(ModelConfig(name="x", family="opt", path="facebook/opt-1.3b"), tmp_path) == "facebook/opt-1.3b"
    assert resolve_path(model_cfg(tiny["tiny-opt"], "opt"), tmp_path) == str(tiny["tiny-opt"])


def test_resolve_tiny_uses_demo_corpus(tmp_path):
    demo = pytest.importorskip("rlhf.data.demo")
    path = resolve_path(ModelConfig(name="t", family="opt", path="tiny-opt", init="tiny"), tmp_path)
    assert Path(path).parent == tmp_path / "models"
    assert Path(path) == build_tiny("tiny-opt", tmp_path / "models", demo.corpus())
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.decode(tok(DEMO)["input_ids"]) == DEMO


def test_remote_code_needs_opt_in(tiny, tmp_path):
    import json
    import shutil

    # a checkpoint whose config says it is ChatGLM with custom code (auto_map): nothing may load it
    # without the explicit opt-in, whatever else it holds
    d = tmp_path / "chatglm"
    shutil.copytree(tiny["tiny-opt"], d)
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="chatglm", auto_map={"AutoModelForCausalLM": "modeling_chatglm.ChatGLMForCausalLM"})
    (d / "config.json").write_text(json.dumps(config))
    cfg = ModelConfig(name="c", family="auto", path=str(d))
    for call in (
        lambda: load_causal_lm(cfg, cfg.path),
        lambda: load_reward_model(cfg, cfg.path),
        lambda: load_tokenizer(cfg.path, resolve_family(cfg, cfg.path)),
    ):
        with pytest.raises(ValueError, match=r"`model\.trust_remote_code=true`"):
            call()


def test_family_mismatch_is_an_error(tiny):
    cfg = model_cfg(tiny["tiny-opt"], "llama")
    with pytest.raises(ValueError, match="model.family='llama'.*'opt' model \\(family 'opt'\\).*drop model.family"):
        load_causal_lm(cfg, cfg.path)


# ---------------------------------------------------------------- LoRA


@pytest.mark.parametrize("spec", ["tiny-opt", "tiny-llama"])
def test_lora_train_merge_save(tiny, spec, tmp_path):
    family = get_family(FAMILY_OF[spec])
    cfg = model_cfg(tiny[spec], family.name)
    tok = load_tokenizer(cfg.path, family)
    base = load_causal_lm(cfg, cfg.path, disable_dropout=True)
    enc = batch(tok)
    base_logits = logits(base, enc)

    lcfg = LoraConfig(rank=4, alpha=8, only_optimize_lora=True, lr=1e-2)
    model = apply_lora(copy.deepcopy(base), lcfg, family)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targeted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targeted == set(family.lora_targets)
    assert count_params(model)[1] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    groups = lora_param_groups(model, lcfg, base_lr=1e-3, weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-2

    model.train()
    opt = torch.optim.AdamW(groups)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    model(**enc, labels=labels).loss.backward()
    opt.step()
    peft_logits = logits(model, enc)

    save_hf(model, tok, tmp_path / "merged")
    assert torch.equal(logits(model, enc), peft_logits)  # saving did not merge in place
    merged = merge_lora(copy.deepcopy(model))
    assert type(merged).__name__.endswith("ForCausalLM") and not any("lora_" in n for n, _ in merged.named_parameters())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    merged_logits = logits(merged, enc)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)  # the step changed the model
    torch.testing.assert_close(merged_logits, peft_logits, rtol=0, atol=1e-5)
    assert torch.equal(logits(reloaded, enc), merged_logits)


def test_scale_delta_moves_trained_weights_towards_the_start_by_hand():
    from rlhf.models.load import scale_delta

    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 6.0]]))
        model.bias.copy_(torch.tensor([5.0]))
    model.bias.requires_grad_(False)  # frozen: still its start value, never read
    start = {"weight": torch.tensor([[1.0, 2.0]])}
    assert scale_delta(model, start.get, 0.5) == 1
    assert model.weight.tolist() == [[2.0, 4.0]] and model.bias.tolist() == [5.0]  # 1 + 0.5 x (3 - 1), ...
    assert scale_delta(model, start.get, 3.0) == 1  # > 1 extrapolates: 1 + 3 x (2 - 1)
    assert model.weight.tolist() == [[4.0, 8.0]]
    with pytest.raises(ValueError, match=r"weight: the start checkpoint does not match .*missing"):
        scale_delta(model, {}.get, 0.5)
    with pytest.raises(ValueError, match=r"shape \(2,\), trained \(1, 2\)"):
        scale_delta(model, {"weight": torch.zeros(2)}.get, 0.5)


@pytest.mark.parametrize("only_lora", [True, False])
def test_scale_delta_on_lora_scales_the_merged_change(tiny, only_lora):
    """peft: the merged (saved) weights become start + scale x (merged trained - start): lora_B scales
    (the adapters' product starts at 0), trained base weights move towards their start."""
    from rlhf.models.load import merged_state, scale_delta

    family = get_family("opt")
    cfg = model_cfg(tiny["tiny-opt"], "opt")
    model = apply_lora(load_causal_lm(cfg, cfg.path), LoraConfig(rank=2, only_optimize_lora=only_lora), family)
    torch.manual_seed(0)
    with torch.no_grad():  # "training": every trainable tensor moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    start = dict(load_causal_lm(cfg, cfg.path).named_parameters()).get
    trained = {k: v.clone() for k, v in merged_state(model)[1].items()}
    n = scale_delta(model, start, 0.25)
    assert n == sum(1 for name, p in model.named_parameters() if p.requires_grad and ".lora_A." not in name)
    scaled = merged_state(model)[1]
    moved = 0
    for key, w in scaled.items():
        w0 = start(key)
        if w0 is None:  # tied to the embedding: one parameter, checked under that name
            assert key == "lm_head.weight"
            continue
        w0 = w0.detach()
        torch.testing.assert_close(w, w0 + 0.25 * (trained[key] - w0), rtol=0, atol=1e-6)
        moved += not torch.equal(trained[key], w0)
    assert moved >= 2 * len(family.lora_targets)  # q and v of the tiny model's 2 layers at least


def test_lora_full_training_groups_and_rank0(tiny):
    family = get_family("opt")
    cfg = model_cfg(tiny["tiny-opt"], "opt")
    base = load_causal_lm(cfg, cfg.path)
    assert apply_lora(base, LoraConfig(rank=0), family) is base

    lcfg = LoraConfig(rank=2, only_optimize_lora=False, lr=5e-4)
    base.model.decoder.embed_tokens.weight.requires_grad_(False)  # frozen by the caller: stays frozen
    model = apply_lora(base, lcfg, family)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["base_model.model.model.decoder.embed_tokens.weight"]
    decay, no_decay, lora = lora_param_groups(model, lcfg, base_lr=1e-3, weight_decay=0.1)
    assert (decay["lr"], decay["weight_decay"]) == (1e-3, 0.1)
    assert (no_decay["lr"], no_decay["weight_decay"]) == (1e-3, 0.0)
    assert (lora["lr"], lora["weight_decay"]) == (5e-4, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("bias" in names[id(p)] or "norm" in names[id(p)] for p in no_decay["params"])
    assert any("layer_norm.weight" in names[id(p)] for p in no_decay["params"])
    assert all("lora_" in names[id(p)] for p in lora["params"])
    n_groups = sum(len(g["params"]) for g in (decay, no_decay, lora))
    assert n_groups == len(list(model.parameters())) - 1  # all but the frozen embedding


def test_bad_lora_target_names_it(tiny):
    cfg = model_cfg(tiny["tiny-llama"], "llama")
    model = load_causal_lm(cfg, cfg.path)
    with pytest.raises(ValueError, match="'qkv_proj'.*gate_proj.*q_proj"):
        apply_lora(model, LoraConfig(rank=4, target_modules=["q_proj", "qkv_proj"]), get_family("llama"))


# ---------------------------------------------------------------- reward model


def padded(ids: list[int], pad: int, left: int, right: int):
    row = [pad] * left + ids + [pad] * right
    mask = [0] * left + [1] * len(ids) + [0] * right
    return torch.tensor([row]), torch.tensor([mask])


@pytest.mark.parametrize("spec", ["tiny-opt", "tiny-llama"])
def test_reward_score_padding_invariant(tiny, spec):
    cfg = model_cfg(tiny[spec], FAMILY_OF[spec])
    tok = load_tokenizer(cfg.path, get_family(cfg.family))
    rm = load_reward_model(cfg, cfg.path).eval()
    assert isinstance(rm, RewardModel) and rm.config is rm.base.config and rm.pad_token_id == tok.pad_token_id
    # the base came from the causal-LM checkpoint: same weights as the causal LM's own body
    causal = load_causal_lm(cfg, cfg.path).eval()
    body = getattr(causal, causal.base_model_prefix)
    enc = batch(tok)
    with torch.no_grad():
        assert torch.equal(rm.base(**enc).last_hidden_state, body(**enc).last_hidden_state)
    ids = tok(DEMO)["input_ids"]
    with torch.no_grad():
        ref = rm.score(*padded(ids, tok.pad_token_id, 0, 0))
        values = rm(*padded(ids, tok.pad_token_id, 0, 0))
        assert values.dtype == torch.float32 and values.shape == (1, len(ids))
        assert ref.item() == values[0, -1].item()
        scores = [rm.score(*padded(ids, tok.pad_token_id, l, r)) for l in (0, 3, 7) for r in (0, 3, 7)]
        # a batch mixing left, right and no padding in one tensor
        rows = [padded(ids, tok.pad_token_id, l, 7 - l) for l in (0, 3, 7)]
        mixed = rm.score(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]))
    for s in scores + [mixed]:
        torch.testing.assert_close(s, ref.expand_as(s), rtol=0, atol=1e-5)
    assert abs(ref.item()) > 1e-3  # fresh head is not all zeros: the check compares real values


def test_reward_save_load_identical_scores(tiny, tmp_path):
    cfg = model_cfg(tiny["tiny-opt"], "opt")
    tok = load_tokenizer(cfg.path, get_family("opt"))
    rm = load_reward_model(cfg, cfg.path, disable_dropout=True)
    assert torch.equal(rm.v_head.weight, load_reward_model(cfg, cfg.path).v_head.weight)  # seeded head
    enc = batch(tok)
    # one training step so the saved head and base differ from a fresh load
    opt = torch.optim.SGD(rm.parameters(), lr=0.1)
    rm.score(enc["input_ids"], enc["attention_mask"]).sum().backward()
    opt.step()
    rm.eval()
    save_reward_model(rm, tok, tmp_path / "rm")
    assert (tmp_path / "rm" / "value_head.safetensors").is_file()
    loaded = load_reward_model(model_cfg(tmp_path / "rm", "opt"), str(tmp_path / "rm")).eval()
    with torch.no_grad():
        assert torch.equal(rm.score(**enc), loaded.score(**enc))
    # the saved base is a plain HF directory
    assert AutoTokenizer.from_pretrained(tmp_path / "rm").pad_token == "<pad>"


def test_reward_lora_keeps_head_trainable_and_merges_on_save(tiny, tmp_path):
    cfg = model_cfg(tiny["tiny-llama"], "llama")
    tok = load_tokenizer(cfg.path, get_family("llama"))
    rm = apply_lora(load_reward_model(cfg, cfg.path), LoraConfig(rank=4, only_optimize_lora=True), get_family("llama"))
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert "v_head.weight" in trainable and all("lora_" in n or n == "v_head.weight" for n in trainable)
    rm.gradient_checkpointing_enable()
    enc = batch(tok)
    opt = torch.optim.SGD([p for p in rm.parameters() if p.requires_grad], lr=0.5)
    rm.train()
    rm.score(**enc).sum().backward()
    opt.step()
    rm.eval()
    with torch.no_grad():
        before = rm.score(**enc)
    save_reward_model(rm, tok, tmp_path / "rm")
    loaded = load_reward_model(model_cfg(tmp_path / "rm", "llama"), str(tmp_path / "rm")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(**enc), before, rtol=1e-5, atol=1e-5)
        assert torch.equal(merge_lora(rm).score(**enc), loaded.score(**enc))


def test_lora_adapters_train_at_the_roles_rate_unless_lora_lr_is_set(tiny):
    """With only adapters trained, the role's rate (ppo.actor_lr, sft.lr) must still move them."""
    family = get_family("opt")
    model = apply_lora(load_causal_lm(model_cfg(tiny["tiny-opt"], "opt"), str(tiny["tiny-opt"])),
                       LoraConfig(rank=2, only_optimize_lora=True), family)
    (group,) = lora_param_groups(model, LoraConfig(rank=2, only_optimize_lora=True), 3e-4, 0.0)
    assert group["lr"] == 3e-4
    (group,) = lora_param_groups(model, LoraConfig(rank=2, only_optimize_lora=True, lr=5e-4), 3e-4, 0.0)
    assert group["lr"] == 5e-4
