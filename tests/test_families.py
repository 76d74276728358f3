"""Bring your own model: every family through every stage, the model named is the model trained.

Each family's checkpoint is built by the test (tests/model_zoo.py): tiny OPT and Llama (the
embedded defaults), transformers' Qwen2 and GPT-NeoX (no registered family: derived), native
GLM-4 (``GlmForCausalLM``), and custom-code stand-ins for Pangu, GLM-10B and ChatGLM-6B loaded
through ``trust_remote_code``. Each runs SFT -> RM -> PPO (LoRA r8) -> DPO -> chat on a few steps
given only as ``model.path=<dir>``, and every saved model must be of the class and size it was given.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.models.families import decoder_layers, family_for_config, read_config
from rlhf.models.load import describe_saved, resolve_family
from rlhf.stages import run_stage
from tests.conftest import ROOT, compose_cfg, shared_cache
from tests.model_zoo import KINDS, REMOTE, build

_COMMON = ("logger=none", "logger.progress=false", "debug=fast", "data.heldout_prompts=4", "data.heldout_samples=1",
           "data.demo_size=200")
_SECTION = {"sft": ("sft.eval_every=0", "sft.max_steps=3", "sft.max_seq_len=64"),
            "rm": ("rm.eval_every=0", "rm.max_steps=3", "rm.max_seq_len=64"),
            "dpo": ("dpo.eval_every=0", "dpo.max_steps=3", "dpo.max_seq_len=64"),
            "ppo": ("ppo.max_steps=1", "ppo.generation_batch_size=8", "ppo.train_batch_size=8", "ppo.max_answer_len=8",
                    "ppo.max_prompt_len=32")}


def fast(*sections: str) -> tuple:
    """Few steps and short texts for the stage sections a run reads (a key of another one is an error)."""
    return (*_COMMON, *(k for s in sections for k in _SECTION[s]))


FAST_PIPELINE = fast("sft", "rm", "ppo")  # the default pipeline: SFT -> RM -> PPO


def _tiny_dir(spec: str) -> Path:
    from rlhf.models.tiny import build_tiny

    return build_tiny(spec, shared_cache() / "models")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    out = {"tiny-opt": _tiny_dir("tiny-opt"), "tiny-llama": _tiny_dir("tiny-llama")}
    for kind in KINDS:
        out[kind] = build(kind, root / kind, _tiny_dir("tiny-opt"))
    return out


def _given(path: Path) -> dict:
    facts = describe_saved(path)
    assert facts["saved_params"] > 0 and facts["architecture"]
    return facts


# ---------------------------------------------------------------- family from the checkpoint


def test_family_comes_from_the_checkpoint(zoo):
    """Registered families by model_type (GLM-4 vs custom-code GLM by auto_map); others derived."""
    expected = {"tiny-opt": "opt", "tiny-llama": "llama", "glm4": "glm4", "pangu": "pangu", "glm": "glm",
                "chatglm": "chatglm"}
    for kind, name in expected.items():
        assert family_for_config(read_config(zoo[kind])).name == name, kind
    for kind, targets, side in (("qwen2", ("q_proj", "v_proj"), "right"), ("gpt_neox", ("query_key_value",), "right")):
        cfg = compose_cfg(f"model.path={zoo[kind]}").model
        family = resolve_family(cfg, str(zoo[kind]))
        assert family.derived and family.name == kind and family.lora_targets == targets  # peft's own table
        assert family.padding_side == side
    qwen = resolve_family(compose_cfg(f"model.path={zoo['qwen2']}").model, str(zoo["qwen2"]))
    assert qwen.chat_template and "<|assistant|>" in qwen.chat_template  # the tokenizer's template


def test_unknown_architecture_fails_naming_its_model_type(zoo, tmp_path):
    import shutil

    d = tmp_path / "odd"
    shutil.copytree(zoo["qwen2"], d)
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "my_new_arch"
    (d / "config.json").write_text(json.dumps(config))
    cfg = compose_cfg(f"model.path={d}").model
    with pytest.raises(ValueError, match="'my_new_arch' model: no registered family.*Register a Family"):
        resolve_family(cfg, str(d))


def test_a_declared_family_that_disagrees_names_the_role_key(zoo):
    cfg = compose_cfg("stage=ppo", f"actor.path={zoo['tiny-llama']}", "actor.family=opt").actor
    with pytest.raises(ValueError, match="actor.family='opt' but .* is a 'llama' model.*drop actor.family"):
        resolve_family(cfg, cfg.path)


def test_decoder_layers_found_for_every_family(zoo):
    from transformers import AutoModelForCausalLM

    for kind in ("qwen2", "gpt_neox", "pangu", "chatglm"):
        model = AutoModelForCausalLM.from_pretrained(str(zoo[kind]), trust_remote_code=True)
        family = resolve_family(compose_cfg(f"model.path={zoo[kind]}", "model.trust_remote_code=true").model,
                                str(zoo[kind]))
        assert len(decoder_layers(model, family)) == 2, kind


def test_special_tokens_stay_whole(zoo):
    from rlhf.models.load import load_tokenizer

    family = family_for_config(read_config(zoo["pangu"]))
    tok = load_tokenizer(str(zoo["pangu"]), family, trust_remote_code=True)
    assert len(tok("问题<sep>回答:", add_special_tokens=False)["input_ids"]) == \
        len(tok("问题", add_special_tokens=False)["input_ids"]) + 1 + len(tok("回答:", add_special_tokens=False)["input_ids"])
    assert family.format_prompt("你好") == "你好<sep>回答:"
    chatglm = family_for_config(read_config(zoo["chatglm"]))
    assert load_tokenizer(str(zoo["chatglm"]), chatglm, trust_remote_code=True).padding_side == "left"
    # a tokenizer that splits the family's special token is refused
    with pytest.raises(ValueError, match="splits the pangu special token '<sep>'"):
        load_tokenizer(str(zoo["qwen2"]), family, trust_remote_code=True)


def test_remote_code_stays_an_explicit_opt_in(zoo, tmp_path):
    cfg = compose_cfg("stage=sft", f"model.path={zoo['pangu']}", *fast("sft"), run_dir=tmp_path)
    with pytest.raises(ValueError, match="family 'pangu' runs custom code.*`model.trust_remote_code=true`"):
        run_stage(cfg)


# ---------------------------------------------------------------- every family through every stage


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tiny-opt", "tiny-llama", *KINDS])
def test_every_family_through_every_stage(zoo, kind, tmp_path):
    src = zoo[kind]
    given = _given(src)
    remote = ("model.trust_remote_code=true",) if kind in REMOTE else ()
    # SFT -> RM -> PPO with LoRA, from model.path alone
    cfg = compose_cfg(f"model.path={src}", *remote, *FAST_PIPELINE, "lora=r8", run_dir=tmp_path / "pipe")
    assert cfg.actor.path == cfg.reward.path == str(src) and cfg.model.family == "auto"
    summary = run_stage(cfg)
    for step in ("sft", "ppo"):
        out = summary["steps"][step]
        assert (out["architecture"], out["saved_params"]) == (given["architecture"], given["saved_params"]), step
        assert out["model_type"] == given["model_type"]
    sft_dir = tmp_path / "pipe" / "sft" / "model"
    # the reward model: the same body (transformers' base class of the checkpoint) plus a value head
    from transformers import AutoModel

    from rlhf.models.reward import _hidden_size

    body = AutoModel.from_pretrained(str(src), trust_remote_code=bool(remote))
    rm = summary["steps"]["rm"]
    assert (rm["model_type"], rm["architecture"]) == (given["model_type"], type(body).__name__)
    assert rm["saved_params"] == sum(p.numel() for p in body.parameters()) + _hidden_size(body.config)  # + v_head
    if kind in ("qwen2", "gpt_neox"):  # stage=ppo on model.path alone (critic from the RM) keeps the class too
        ppo = run_stage(compose_cfg("stage=ppo", f"model.path={sft_dir}", f"critic.path={tmp_path / 'pipe' / 'rm' / 'model'}",
                                    *fast("ppo"), run_dir=tmp_path / "ppo"))
        assert (ppo["architecture"], ppo["saved_params"]) == (given["architecture"], given["saved_params"])
    dpo = run_stage(compose_cfg("stage=dpo", f"model.path={sft_dir}", *remote, *fast("dpo"), run_dir=tmp_path / "dpo"))
    assert (dpo["architecture"], dpo["saved_params"]) == (given["architecture"], given["saved_params"])
    # chat on the PPO actor: two questions, two answers
    chat_cfg = compose_cfg("stage=chat", f"model.path={tmp_path / 'pipe' / 'ppo' / 'model'}", *remote,
                           "chat.max_new_tokens=6")
    from rlhf.stages import chat

    stdout = io.StringIO()
    out = chat.run(chat_cfg, stdin=io.StringIO("What is 2 plus 3?\nIs 14 even or odd?\nquit\n"), stdout=stdout)
    assert out["turns"] == 2 and len(stdout.getvalue().splitlines()) == 2


@pytest.mark.slow
def test_cli_trains_the_named_checkpoint_and_files_the_run_under_its_name(zoo, tmp_path):
    """`python run.py model.path=<a user's Qwen2>`: the run directory and summary name the Qwen2."""
    env = {k: v for k, v in __import__("os").environ.items()}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "run.py", f"model.path={zoo['qwen2']}", "pipeline.steps=[1]",
                          f"cache_dir={shared_cache()}", *fast("sft"), f"hydra.run.dir={tmp_path}/outputs/pipeline/tiny-opt/t0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "outputs" / "pipeline" / "qwen2" / "t0"  # renamed from the preset's name
    assert not (tmp_path / "outputs" / "pipeline" / "tiny-opt" / "t0").exists()
    summary = json.loads((run / "sft" / "summary.json").read_text())
    given = _given(zoo["qwen2"])
    assert summary["model"] == "qwen2" and summary["model_type"] == "qwen2"
    assert summary["architecture"] == "Qwen2ForCausalLM" and summary["saved_params"] == given["saved_params"]
    assert "derived one" in out.stdout + out.stderr  # the one line saying how the unregistered family was handled


def test_chat_drops_old_turns_to_fit_the_context(tmp_path, caplog):
    """A long conversation never overflows max_position_embeddings: old turns go, with a line saying so."""
    import logging

    from rlhf.stages import chat

    cfg = compose_cfg("stage=chat", "chat.max_new_tokens=16", "chat.max_history_tokens=100000")
    long_q = "What is 2 plus 3? " * 60  # ~360 tokens a turn; the tiny models take 512
    stdin = io.StringIO("".join(f"{long_q}\n" for _ in range(4)) + "quit\n")
    with caplog.at_level(logging.INFO, logger="rlhf.stages.chat"):
        out = chat.run(cfg, stdin=stdin, stdout=io.StringIO())
    assert out["turns"] == 4 and out["dropped_turns"] >= 3
    assert any("dropped the" in r.message for r in caplog.records)


def test_step3_roles_take_their_family_from_the_checkpoints_given(zoo):
    """`stage=ppo actor.path=<llama> critic.path=<llama>` needs no family key at all."""
    cfg = compose_cfg("stage=ppo", f"actor.path={zoo['tiny-llama']}", f"critic.path={zoo['tiny-llama']}")
    assert resolve_family(cfg.actor, cfg.actor.path).name == "llama"
    assert resolve_family(cfg.reward, cfg.critic.path).name == "llama"
    assert cfg.model.key == "actor" and cfg.actor.name != "tiny-opt"


def test_an_unreachable_hub_id_says_so(tmp_path, monkeypatch):
    """Offline: a hub id is not a tiny model, and the error says what to do instead."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries against the network
    cfg = compose_cfg("stage=sft", "model.path=EleutherAI/pythia-70m")
    assert cfg.model.init == "pretrained" and cfg.model.name == "pythia-70m"
    with pytest.raises(ValueError, match="model.path='EleutherAI/pythia-70m'.*hub could not be reached"):
        resolve_family(cfg.model, cfg.model.path)
