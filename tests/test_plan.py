"""Memory planner: model-state bytes checked against hand arithmetic and DeepSpeed's own estimators;
the plan stage prints every ZeRO x offload choice and names the smallest change that fits."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rlhf.engine.memory import (GB, DoesNotFit, Machine, Role, Setting, Shape, check_fits, frozen_states,
                                make_plan, model_shape, role_states, step_states, trained_states)
from tests.conftest import ROOT, compose_cfg

P = 1_000_000_000  # a 1B-parameter model
L = 100_000_000  # its largest layer
B = 1.5  # DeepSpeed's additional_buffer_factor


def states(stage, opt=False, par=False, g=8, m=1, w=2):
    return trained_states(P, stage=stage, offload_optimizer=opt, offload_param=par, gpus_per_node=g, nodes=m,
                          largest_layer=L, weight_bytes=w)


@pytest.mark.parametrize("stage,opt,par,gpu_bytes", [
    # 16-bit weights on 8 GPUs. Per parameter: weights 2, gradients 2, optimizer side 16
    # (fp32 master 4 + fp32 gradient 4 + Adam moments 8).
    (0, False, False, 20 * P),                    # 2 + 2 + 16 = 20 bytes, nothing sharded
    (1, False, False, 4 * P + 16 * P / 8),        # weights + grads replicated, 16/8 = 2: 6e9
    (2, False, False, 2 * P + 18 * P / 8),        # weights replicated, (2 + 16)/8: 4.25e9
    (2, True, False, 2 * P),                      # optimizer and gradients on the CPU: 2e9
    (3, False, False, 4 * L + 18 * P / 8),        # 4L gather buffer + everything / 8: 0.4e9 + 2.25e9
    (3, True, False, 4 * L + 2 * P / 8),          # weights' share stays: 0.4e9 + 0.25e9
    (3, True, True, 4 * L),                       # only the gather buffer: 0.4e9
])
def test_trained_gpu_bytes_by_hand(stage, opt, par, gpu_bytes):
    assert states(stage, opt, par).gpu == pytest.approx(gpu_bytes, abs=8)


def test_trained_host_bytes_by_hand():
    load8 = 2 * P * 8  # 8 ranks each load the model in the dtype it is loaded in (16-bit): 16e9
    assert states(0).host == pytest.approx(load8)
    assert states(2, opt=True).host == pytest.approx(16 * P * B)  # each rank offloads 1/8 of 16 bytes: 24e9
    one = dict(g=1)
    assert states(2, opt=True, **one).host == pytest.approx(16 * P * B)  # 24e9 of offloaded optimizer
    assert states(3, opt=True, **one).host == pytest.approx(16 * P * B)  # 24e9
    assert states(3, opt=True, par=True, **one).host == pytest.approx(18 * P * B)  # + 16-bit weights: 27e9
    two_nodes = states(3, opt=True, par=True, g=1, m=2)
    assert two_nodes.host_states == pytest.approx(18 * P / 2 * B)  # each node keeps half: 13.5e9
    # ZeRO-3 builds the model already sharded (deepspeed.zero.Init): a node loads 1/nodes of it, not 8 copies
    assert states(3).host_load == pytest.approx(2 * P)
    assert trained_states(P, stage=3, gpus_per_node=8, zero_init=False).host_load == pytest.approx(load8)
    assert states(3, w=4).host_load == pytest.approx(4 * P)  # fp32 runs load fp32 weights


def test_fp32_training_by_hand():
    # weights 4 + gradients 4 + Adam 8 = 16 bytes without a master copy; DeepSpeed's partitions add 16 per
    # parameter sharded under ZeRO 1-3
    assert states(0, w=4).gpu == pytest.approx(16 * P)
    assert states(2, w=4, g=4).gpu == pytest.approx(4 * P + (4 + 16) * P / 4)  # 9e9
    assert states(3, w=4, g=4).gpu == pytest.approx(4 * L + 20 * P / 4)  # 5.4e9


@pytest.mark.parametrize("g,m", [(1, 1), (8, 1), (8, 2), (4, 4)])
def test_same_gpu_numbers_as_deepspeeds_estimators(g, m):
    """GPU bytes are DeepSpeed's own estimators'. Host bytes are not: its estimators assume every rank loads
    an fp32 copy (x 1.5), we count the dtype actually loaded and ZeRO-3's sharded construction."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    for off in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(P, g, m, cpu_offload=off, additional_buffer_factor=B)
        ours = states(2, opt=off, g=g, m=m)
        assert ours.gpu == pytest.approx(gpu, abs=8)
        assert ours.host <= cpu  # 16-bit loads and per-node shares of the offloaded states
    for opt, par in ((False, False), (True, False), (True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(P, L, g, m, cpu_offload=opt, cpu_offload_params=par,
                                                            zero_init=True, additional_buffer_factor=B)
        assert states(3, opt, par, g=g, m=m).gpu == pytest.approx(gpu, abs=8)


def test_frozen_models_hold_weights_only():
    assert frozen_states(P, stage=0, gpus_per_node=8).gpu == 2 * P  # replicated 16-bit weights
    assert frozen_states(P, stage=3, gpus_per_node=8, largest_layer=L).gpu == pytest.approx(4 * L + 2 * P / 8)
    off = frozen_states(P, stage=3, offload=True, gpus_per_node=8, largest_layer=L)
    assert off.gpu == 4 * L and off.host_states == pytest.approx(2 * P * B)


def test_lora_trains_only_the_adapters():
    shape = Shape("m", P, L, lora_per_rank=1_000_000)
    machine = Machine("x", 1, 1, 80, 512, 2)
    full = role_states(Role("model", shape, True), Setting(0), machine)
    lora = role_states(Role("model", shape, True, lora_rank=8, only_lora=True), Setting(0), machine)
    assert full.gpu == 20 * P
    # 8 x 1e6 adapter params trained (20 bytes each) + 1e9 frozen 16-bit weights: 0.16e9 + 2e9
    assert lora.gpu == pytest.approx(20 * 8e6 + 2 * P)
    # without only_optimize_lora the base trains too: LoRA adds memory
    both = role_states(Role("model", shape, True, lora_rank=8), Setting(0), machine)
    assert both.gpu == pytest.approx(20 * (P + 8e6))


def test_step3_four_models_stack():
    shape = Shape("m", P, L)
    machine = Machine("x", 1, 1, 80, 512, 2)
    roles = [Role("actor", shape, True), Role("critic", shape, True),
             Role("reference", shape, False), Role("reward", shape, False)]
    total, parts = step_states(roles, Setting(0), machine)
    assert total.gpu == pytest.approx(20 * P + 20 * P + 2 * P + 2 * P)  # 44e9
    assert [round(p.gpu / P) for p in parts] == [20, 20, 2, 2]
    # ZeRO-2 offload on one GPU: each trained model keeps 16 x 1.5 = 24e9 on the host; the second's
    # (24e9) comes on top of the first's; the frozen loads (2e9, 16-bit) on top of both
    total, _ = step_states(roles, Setting(2, True), machine)
    assert total.host == pytest.approx(24e9 + 24e9 + 2e9)


def test_parameter_count_from_arch_matches_hand_count():
    cfg = compose_cfg("model=opt-13b", "model.params_b=0")
    shape = model_shape(cfg.model)
    # OPT-13B: embeddings 50272 x 5120; positions 2050 x 5120; 40 layers of attention (4 x (5120^2 + 5120)),
    # fc1 (5120 x 20480 + 20480), fc2 (20480 x 5120 + 5120), two layer norms (4 x 5120); final norm 2 x 5120
    layer = 4 * (5120 * 5120 + 5120) + (5120 * 20480 + 20480) + (20480 * 5120 + 5120) + 4 * 5120
    assert shape.params == 50272 * 5120 + 2050 * 5120 + 40 * layer + 2 * 5120 == 12_853_473_280
    assert shape.largest_layer == 50272 * 5120  # the (tied) embedding
    assert shape.lora_per_rank == 40 * (4 * (5120 + 5120) + 2 * (5120 + 20480))  # q,k,v,out + fc1,fc2
    assert model_shape(compose_cfg("model=opt-13b").model).params == 12_853_000_000  # params_b wins


def test_tiny_model_is_counted_from_its_build(tmp_path):
    cfg = compose_cfg()
    shape = model_shape(cfg.model, cfg.cache_dir)
    assert shape.source == "tiny" and 100_000 < shape.params < 10_000_000


SMALL_PASS = ("sft.micro_batch_size=1", "sft.gradient_checkpointing=true")  # activations ~0.5 GB: states dominate


def test_check_fits_stops_with_the_smallest_change():
    cfg = compose_cfg("stage=sft", "model=opt-13b", "hardware=dgx8", "zero=2", "lora=none", *SMALL_PASS)
    with pytest.raises(DoesNotFit, match=r"smallest change that fits: zero=3\b") as err:
        check_fits(cfg)
    # 4.25 bytes x 12.853e9 = 50.87 GiB of states + 0.52 GiB for one checkpointed sequence (blocks' inputs
    # 40 x 512 x 5120 x 2, one block 34 x 512 x 5120, logits 512 x 50272 x (2 + 8))
    assert "51.4 GB per GPU" in str(err.value) and "36.0 of 40 GB" in str(err.value)
    check_fits(compose_cfg("stage=sft", "model=opt-13b", "hardware=dgx8", "zero=3", *SMALL_PASS))
    check_fits(compose_cfg("stage=sft", "model=opt-13b", "hardware=dgx8", "zero=2", "plan.check=false"))


def test_activations_are_counted_and_checkpointing_is_suggested():
    # DeepSpeed-Chat's step-1 defaults (batch 16 x 512 tokens) without checkpointing: 40 blocks x 34 bytes x
    # 16 x 512 x 5120 = 53 GiB of activations on top of ZeRO-3's 27.9 GiB
    with pytest.raises(DoesNotFit, match=r"step 1 \(sft\) needs 84.9 GB per GPU.*smallest change that fits: "
                                         r"sft.gradient_checkpointing=true"):
        check_fits(compose_cfg("stage=sft", "model=opt-13b", "hardware=dgx8", "zero=3", "lora=none"))


def test_check_fits_covers_every_step_of_a_pipeline():
    # the reward/critic follows model=: step 3 holds four 13B models
    with pytest.raises(DoesNotFit, match=r"step 3 \(ppo\) needs \d+\.\d GB per GPU"):
        check_fits(compose_cfg("stage=pipeline", "model=opt-13b", "hardware=dgx8", "zero=3"))
    # DeepSpeed-Chat's setting: a 350M reward model (its preset)
    check_fits(compose_cfg("experiment=dschat/opt-13b-dgx8"))
    # SFT -> DPO has no reward model: policy + frozen reference
    check_fits(compose_cfg("stage=pipeline", "pipeline.algo=dpo", "model=opt-13b", "hardware=dgx8", "zero=3",
                           "lora=r128", "sft.micro_batch_size=4", "sft.gradient_checkpointing=true",
                           "dpo.micro_batch_size=2", "dpo.gradient_checkpointing=true"))


def test_a_model_of_unknown_size_is_not_blocked():
    cfg = compose_cfg("stage=sft", "model=opt-1.3b", "model.params_b=0", "hardware=a6000")
    cfg.model.arch = {}
    check_fits(cfg)  # a hub id without params_b or arch: the check is skipped with a warning
    with pytest.raises(ValueError, match="model.params_b"):
        make_plan(cfg)


def test_check_fits_on_cpu_checks_host_memory():
    check_fits(compose_cfg())  # the tiny default
    with pytest.raises(DoesNotFit, match="host memory"):
        check_fits(compose_cfg("stage=sft", "model=opt-13b", "hardware=cpu"))  # 16 bytes x 12.9B in fp32 > 21.6 GB


def test_plan_lists_every_setting_and_step():
    plan = make_plan(compose_cfg("stage=plan", "experiment=dschat/opt-13b-dgx8"))
    assert [r["setting"] for r in plan["rows"]] == ["zero=0", "zero=1", "zero=2", "zero=3", "zero=2-offload",
                                                    "zero=3 zero.offload_optimizer=true", "zero=3-offload"]
    assert [s["title"] for s in plan["rows"][0]["steps"]] == ["step 1 (sft)", "step 2 (rm)", "step 3 (ppo)"]
    step3 = plan["current"]["steps"][2]
    assert list(step3["models"]) == ["actor", "critic", "reference", "reward"]
    assert plan["fits"] and plan["suggestion"] is None  # DeepSpeed-Chat's OPT-13B + 350M setting on 8x A100-40G
    # model states add up; the busiest phase (generation or one model's training pass) comes on top
    states = sum(m["gpu_gb"] for m in step3["models"].values())
    assert step3["gpu_gb"] == pytest.approx(states + max(m["work_gb"] for m in step3["models"].values()))


def test_plan_stage_prints_table_and_writes_summary(tmp_path):
    out = subprocess.run([sys.executable, "run.py", "stage=plan", "model=opt-13b", "hardware=dgx8", "zero=2",
                          "lora=none", f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| zero=3-offload |" in out.stdout and "does NOT fit" in out.stdout
    assert "Smallest change that fits: " in out.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["fits"] is False and len(summary["rows"]) == 7
    zero2 = next(r for r in summary["rows"] if r["setting"] == "zero=2")
    # step 1 under ZeRO-2 on 8 GPUs: 2 + 18/8 = 4.25 bytes x 12.853e9 params of model states
    assert zero2["steps"][0]["models"]["actor"]["gpu_gb"] == pytest.approx(4.25 * 12.853e9 / GB, rel=1e-6)
    assert (tmp_path / "plan.md").exists()


def test_planner_reads_the_stage_descriptions():
    """The models of each step and whether they train come from rlhf.stages.STAGES; the sections
    whose settings the plan may change are the stages the run really executes."""
    from rlhf.engine.memory import Planner, stage_steps
    from rlhf.stages import STAGES

    for stage in ("sft", "rm", "ppo", "dpo", "pretrain"):
        cfg = compose_cfg(f"stage={stage}")
        planner = Planner(cfg)
        (_, roles), = stage_steps(cfg, stage, planner.shape, planner.current())
        held = dict(STAGES[stage].models)
        assert sorted(r.trained for r in roles) == sorted(held.values()), stage
    sections = {args: Planner(compose_cfg(*args))._sections() for args in [
        ("stage=pretrain",), ("stage=pipeline", "pipeline.algo=dpo"), ("stage=pipeline", "pipeline.algo=grpo"),
        ("stage=plan",), ("stage=chat",)]}
    assert sections == {("stage=pretrain",): ["pretrain"],  # its own section, not sft's
                        ("stage=pipeline", "pipeline.algo=dpo"): ["sft", "dpo"],  # no reward model is trained
                        ("stage=pipeline", "pipeline.algo=grpo"): ["sft", "rm", "ppo"],  # grpo is ppo's section
                        ("stage=plan",): ["sft", "rm", "ppo"], ("stage=chat",): []}
