"""Reward functions (reward.fn) and the step-3 settings checked before anything starts."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf.data import demo
from rlhf.rewards import RewardFunctionError, load_reward_fn
from tests.conftest import compose_cfg

ADD = "Human: What is 2 plus 3?\n Assistant:"
PARITY = "Human: Is 7 even or odd?\n Assistant:"


def boom(prompts, answers):
    """Fails on the parity prompt only (the error must name that prompt)."""
    if any("even or odd" in p for p in prompts):
        raise KeyError("no parity here")
    return [1.0] * len(prompts)


def nan_on_parity(prompts, answers):
    return [math.nan if "even or odd" in p else 0.5 for p in prompts]


def too_few(prompts, answers):
    return [0.0]


def test_demo_reward_is_the_rule_as_numbers():
    assert demo.reward([ADD, ADD, PARITY], [" 2 plus 3 is 5.", " 2 plus 3 is 6.", " It is odd."]) == [1.0, 0.0, 1.0]
    fn = load_reward_fn("rlhf.data.demo:reward", weight=2.0)
    assert fn.weight == 2.0 and fn.name == "rlhf.data.demo:reward"
    assert fn([ADD, PARITY], ["The answer is 5.", "It is even."]).tolist() == [1.0, 0.0]


def test_failing_reward_fn_names_the_function_and_the_prompt():
    fn = load_reward_fn("tests.test_rewards:boom")
    with pytest.raises(RewardFunctionError) as e:
        fn([ADD, PARITY], ["The answer is 5.", "It is odd."])
    msg = str(e.value)
    assert "reward.fn=tests.test_rewards:boom failed" in msg and repr(PARITY) in msg and "KeyError" in msg


def test_non_finite_or_missing_scores_stop_naming_the_function_and_prompt():
    with pytest.raises(RewardFunctionError, match=r"reward.fn=tests.test_rewards:nan_on_parity returned nan for "
                                                  r"prompt 'Human: Is 7 even or odd\?"):
        load_reward_fn("tests.test_rewards:nan_on_parity")([ADD, PARITY], ["a", "b"])
    with pytest.raises(RewardFunctionError, match="returned 1 scores for 2 answers"):
        load_reward_fn("tests.test_rewards:too_few")([ADD, PARITY], ["a", "b"])


@pytest.mark.parametrize("spec, words", [("rlhf.data.demo", "expected <module>:<function>"),
                                         ("rlhf.nowhere:reward", "cannot import module 'rlhf.nowhere'"),
                                         ("rlhf.data.demo:nothing", "has no callable 'nothing'")])
def test_bad_reward_fn_spec_names_the_key(spec, words):
    with pytest.raises(ValueError, match="reward.fn=") as e:
        load_reward_fn(spec)
    assert words in str(e.value)


@pytest.mark.parametrize("overrides, words", [
    (["ppo.advantage=grpo"], "ppo.samples_per_prompt >= 2"),
    (["ppo.advantage=rloo", "ppo.samples_per_prompt=2", "ppo.reward_baseline=group"], "ppo.reward_baseline=group is for"),
    (["ppo.reward_model=false", "reward.fn=null"], "set reward.fn=<module>:<function>"),
    (["ppo.reward_model=false", "reward.fn=rlhf.data.demo:reward", "ppo.advantage=grpo", "ppo.samples_per_prompt=2",
      "critic.path=/x/rm/model"], "critic.path=/x/rm/model is not used"),
    (["ppo.advantage=vtrace"], "ppo.advantage='vtrace'"),
    (["reward.fn=rlhf.data.demo"], "reward.fn='rlhf.data.demo'"),
])
def test_step3_settings_fail_at_compose_naming_the_key(overrides, words):
    with pytest.raises(ValueError) as e:
        compose_cfg("stage=ppo", *overrides)
    assert words in str(e.value)


@pytest.mark.parametrize("overrides, words", [
    (["stage=pipeline", "pipeline.algo=grpo", "ppo.reward_baseline=group"], "ppo.advantage=grpo sets its own baseline"),
    (["stage=pipeline", "pipeline.compare=[grpo]", "ppo.reward_model=false", "reward.fn=null"],
     "ppo.reward_model=false leaves nothing to score answers"),
    (["stage=pipeline", "pipeline.algo=grpo", "ppo.reward_model=false", "critic.path=/x/rm/model"],
     "critic.path=/x/rm/model is not used"),
])
def test_grpo_step3_rules_hold_for_the_stage_and_the_pipeline(overrides, words):
    with pytest.raises(ValueError) as e:
        compose_cfg(*overrides)
    assert words in str(e.value)
    compose_cfg(*[o for o in overrides if not o.startswith(("ppo.reward_baseline", "ppo.reward_model", "critic.path"))])


def test_step3_check_returns_the_estimator_and_the_weighted_function():
    from rlhf.stages.ppo import check

    est, fn = check(compose_cfg("stage=ppo", "ppo.advantage=reinforce_pp", "ppo.samples_per_prompt=2",
                                "reward.fn=rlhf.data.demo:reward", "reward.fn_weight=3"))
    assert not est.critic and fn.weight == 3.0
    assert check(compose_cfg("stage=ppo", "reward.fn=null"))[1] is None
    # the tiny demo preset adds the demo's rule to the reward model's score
    assert check(compose_cfg("stage=ppo"))[1].weight == 5.0


def test_hardware_profile_sets_the_thread_count():
    from rlhf.engine.setup import set_threads

    cfg = compose_cfg("stage=ppo")
    assert cfg.hardware.threads == 1 and compose_cfg("stage=ppo", "hardware=cpu2").hardware.threads == 1
    before = torch.get_num_threads()
    try:
        set_threads(compose_cfg("stage=ppo", "hardware.threads=2").hardware)
        assert torch.get_num_threads() == 2
        set_threads(cfg.hardware)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_planner_counts_no_critic_for_critic_free_estimators():
    from rlhf.engine.memory import stage_steps

    def roles(*overrides):
        cfg = compose_cfg(*overrides)
        (name, rs), = [s for s in stage_steps(cfg, cfg.stage.name, lambda key: None, _scenario()) if "step 3" in s[0]]
        return [r.name for r in rs]

    assert roles("stage=ppo") == ["actor", "critic", "reference", "reward"]
    assert roles("stage=ppo", "ppo.advantage=rloo", "ppo.samples_per_prompt=2") == ["actor", "reference", "reward"]
    assert roles("stage=ppo", "ppo.advantage=grpo", "ppo.samples_per_prompt=2", "ppo.reward_model=false",
                 "reward.fn=rlhf.data.demo:reward") == ["actor", "reference"]
    assert "critic" not in roles("stage=pipeline", "pipeline.algo=grpo")


def _scenario():
    from rlhf.engine.memory import Scenario, Setting

    return Scenario(Setting(0), lora_rank=0, only_lora=False, offload_reference=False, critic_lora=False, machine=None)


def always_fails(prompts, answers):
    raise RuntimeError("checker is down")


def test_preflight_wants_a_trained_reward_model_only_where_one_is_loaded():
    from rlhf.engine.preflight import critic_problem

    real = ("model=opt-1.3b", "reward=opt-350m", "hardware=a6000")
    free = ("ppo.advantage=rloo", "ppo.samples_per_prompt=2")
    assert critic_problem(compose_cfg("stage=ppo", *real, *free)) is not None  # rloo still scores with the RM
    assert critic_problem(compose_cfg("stage=ppo", *real, *free, "ppo.reward_model=false",
                                      "reward.fn=rlhf.data.demo:reward")) is None  # nothing of the RM is loaded
    assert critic_problem(compose_cfg("stage=pipeline", *real, "pipeline.algo=grpo", "pipeline.steps=[1,3]")) is not None
