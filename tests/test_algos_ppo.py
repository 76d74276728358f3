"""PPO pieces against hand-computed numbers (arithmetic written out next to each expectation)."""

import math

import pytest
import torch

from rlhf.algos.logprobs import masked_whiten
from rlhf.algos.ppo import (AdaptiveKLController, FixedKLController, gae_advantages,
                            kl_estimates, kl_penalized_rewards, last_true_index, leave_one_out_scores,
                            policy_loss, total_scores, value_loss)
from tests.numeric import close

T = torch.tensor



# ---------------------------------------------------------------- rewards


def test_last_true_index():
    mask = T([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert last_true_index(mask).tolist() == [2, 3, -1]


def test_kl_penalized_rewards_placement():
    logprobs = T([[-1.0, -2.0, -0.5, -3.0],
                  [-0.2, -0.2, -0.2, -0.2],
                  [-1.0, -1.0, -1.0, -1.0]])
    ref = T([[-1.5, -1.0, -1.0, -4.0],
             [-0.4, -0.2, -0.1, -0.2],
             [-1.0, -1.0, -1.0, -1.0]])
    mask = T([[0, 1, 1, 0],   # prompt token, 2 answer tokens, after EOS
              [1, 1, 1, 1],   # answer fills the row
              [1, 1, 0, 0]])  # ends early
    scores = T([7.0, -9.0, 2.5])
    rewards = kl_penalized_rewards(logprobs, ref, scores, mask, kl_ctl=0.1)
    expected = [
        # logp - ref = [0.5, -1, 0.5, 1]; -0.1 * that on mask; score 7 at index 2 (clipping is total_scores')
        [0.0, -0.1 * -1.0, -0.1 * 0.5 + 7.0, 0.0],
        # logp - ref = [0.2, 0, -0.1, 0]; score -9 at index 3
        [-0.1 * 0.2, 0.0, -0.1 * -0.1, 0.0 - 9.0],
        # logp == ref: no KL; score 2.5 at index 1
        [0.0, 2.5, 0.0, 0.0],
    ]
    close(rewards, expected)


def test_kl_penalized_rewards_empty_answer_gets_nothing():
    rewards = kl_penalized_rewards(T([[-1.0, -2.0]]), T([[-3.0, -3.0]]), T([4.0]),
                                   T([[0, 0]]), kl_ctl=0.1)
    close(rewards, [[0.0, 0.0]])


# ---------------------------------------------------------------- GAE


def test_gae_hand_unrolled_with_eos_and_prompt():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    rewards = T([[5.0, 0.5, -1.0, 2.0, 50.0],
                 [9.0, 1.0, 0.0, 0.0, 1.0]])
    values = T([[7.0, 1.0, 2.0, 3.0, 100.0],   # 7 (prompt) and 100 (after EOS) must be ignored
                [9.0, 0.5, 0.5, 0.5, 0.5]])
    mask = T([[0, 1, 1, 1, 0],
              [0, 1, 1, 1, 1]])
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    # row 0, masked r = [0, .5, -1, 2, 0], v = [0, 1, 2, 3, 0]
    a3 = 2.0 + 0.9 * 0.0 - 3.0                  # -1.0 (value after EOS counts as 0)
    a2 = (-1.0 + 0.9 * 3.0 - 2.0) + 0.72 * a3   # -0.3 - 0.72 = -1.02
    a1 = (0.5 + 0.9 * 2.0 - 1.0) + 0.72 * a2    # 1.3 - 0.7344 = 0.5656
    # row 1, r = [0, 1, 0, 0, 1], v = [0, .5, .5, .5, .5]
    b4 = 1.0 + 0.0 - 0.5                        # 0.5
    b3 = (0.0 + 0.9 * 0.5 - 0.5) + 0.72 * b4    # -0.05 + 0.36 = 0.31
    b2 = (0.0 + 0.9 * 0.5 - 0.5) + 0.72 * b3    # -0.05 + 0.2232 = 0.1732
    b1 = (1.0 + 0.9 * 0.5 - 0.5) + 0.72 * b2    # 0.95 + 0.124704 = 1.074704
    close(adv, [[0.0, 0.5656, -1.02, -1.0, 0.0], [0.0, 1.074704, 0.1732, 0.31, 0.5]])
    close(adv, [[0.0, a1, a2, a3, 0.0], [0.0, b1, b2, b3, b4]])
    close(ret, [[0.0, 0.5656 + 1.0, -1.02 + 2.0, -1.0 + 3.0, 0.0],
                [0.0, 1.074704 + 0.5, 0.1732 + 0.5, 0.31 + 0.5, 0.5 + 0.5]])


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rewards, values = T([[1.0, 2.0, 3.0, 4.0]]), T([[0.5, 0.25, 1.0, 8.0]])
    adv, ret = gae_advantages(rewards, values, T([[1, 1, 1, 0]]), gamma=1.0, lam=1.0)
    # A_t = sum of rewards from t to the end of the answer (index 2) - v_t; R_t = reward to go
    close(adv, [[6.0 - 0.5, 5.0 - 0.25, 3.0 - 1.0, 0.0]])
    close(ret, [[6.0, 5.0, 3.0, 0.0]])


def test_gae_outputs_are_detached():
    values = T([[1.0, 2.0]], requires_grad=True)
    adv, ret = gae_advantages(T([[0.0, 1.0]]), values, T([[1, 1]]), 1.0, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


# ---------------------------------------------------------------- losses


def test_policy_loss_clips_both_sides():
    ratios = [1.5, 0.5, 1.5, 0.5, 1.1, 3.0]
    old = T([[-1.0, -2.0, -1.5, -0.7, -1.2, -2.0]])
    logprobs = (old + torch.log(T([ratios]))).requires_grad_()
    adv = T([[2.0, -1.0, -1.0, 2.0, 3.0, 10.0]])
    mask = T([[1, 1, 1, 1, 1, 0]])  # last token masked: ratio 3 and A=10 must not count
    loss, stats = policy_loss(logprobs, old, adv, mask, cliprange=0.2)
    # per token max(-A*r, -A*clip(r, .8, 1.2)):
    #  r=1.5, A=+2: max(-3.0, -2.4) = -2.4  (clipped above)
    #  r=0.5, A=-1: max( 0.5,  0.8) =  0.8  (clipped below)
    #  r=1.5, A=-1: max( 1.5,  1.2) =  1.5  (unclipped: pessimistic side)
    #  r=0.5, A=+2: max(-1.0, -1.6) = -1.0  (unclipped)
    #  r=1.1, A=+3: max(-3.3, -3.3) = -3.3  (inside the range)
    close(loss, (-2.4 + 0.8 + 1.5 - 1.0 - 3.3) / 5)  # -0.88
    close(stats["clipfrac"], 2 / 5)
    k3 = [(r - 1) - math.log(r) for r in ratios[:5]]
    close(stats["approx_kl"], sum(k3) / 5)
    loss.backward()
    # gradient flows only through unclipped tokens: d/dlogp (-A*r) = -A*r / 5
    close(logprobs.grad, [[0.0, 0.0, 1.0 * 1.5 / 5, -2.0 * 0.5 / 5, -3.0 * 1.1 / 5, 0.0]],
          tol=1e-5)


def test_policy_loss_ignores_inf_at_masked_positions():
    loss, _ = policy_loss(T([[-1.0, -math.inf]]), T([[-1.0, -2.0]]), T([[1.0, 1.0]]),
                          T([[1, 0]]), cliprange=0.2)
    close(loss, -1.0)  # ratio 1, A 1 on the only real token


def test_value_loss_clipping():
    values = T([[1.5, 0.5, 1.5, 1.1, 50.0]])
    old = T([[1.0, 1.0, 1.0, 1.0, 1.0]])
    returns = T([[2.0, 0.0, 1.0, 3.0, 0.0]])
    mask = T([[1, 1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2)
    # v_clip = clamp(v, 0.8, 1.2); per token max((v-R)^2, (v_clip-R)^2):
    #  v=1.5, R=2: max(0.25, (1.2-2)^2=0.64) = 0.64  clipped
    #  v=0.5, R=0: max(0.25, (0.8-0)^2=0.64) = 0.64  clipped
    #  v=1.5, R=1: max(0.25, (1.2-1)^2=0.04) = 0.25
    #  v=1.1, R=3: max(3.61, 3.61)           = 3.61
    close(loss, 0.5 * (0.64 + 0.64 + 0.25 + 3.61) / 4)  # 0.6425
    close(stats["clipfrac"], 2 / 4)


def test_kl_estimates():
    logprobs = T([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    ref = T([[-1.5, -1.0, -1.0], [-1.0, -0.5, 0.0]])
    mask = T([[1, 1, 0], [1, 0, 0]])
    est = kl_estimates(logprobs, ref, mask)
    # k1 = logp - ref on mask: row 0 [0.5, -1.0], row 1 [0.5]
    close(est["kl"], ((0.5 - 1.0) + 0.5) / 2)           # per-sequence sums -0.5, 0.5 -> 0.0
    close(est["kl_token_mean"], (0.5 - 1.0 + 0.5) / 3)  # 0.0
    # k3 = exp(d) - 1 - d, d = ref - logp: d = -0.5 (k3 = e^-0.5 - 0.5), d = 1 (k3 = e - 2)
    row0 = (math.exp(-0.5) - 1 + 0.5) + (math.exp(1.0) - 1 - 1.0)
    row1 = math.exp(-0.5) - 1 + 0.5
    close(est["k3"], (row0 + row1) / 2)


def test_masked_whiten_for_advantages():
    x = T([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, -7.0]])
    mask = T([[1, 1, 1, 0], [1, 1, 0, 0]])
    # masked values 1..5: mean 3, unbiased var = (4+1+0+1+4)/4 = 2.5
    s = math.sqrt(2.5 + 1e-8)
    close(masked_whiten(x, mask), [[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]])
    close(masked_whiten(x, mask, shift_mean=False),
          [[-2 / s + 3, -1 / s + 3, 3.0, 0.0], [1 / s + 3, 2 / s + 3, 0.0, 0.0]])


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_update_and_resume():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)   # 9/6 - 1 = 0.5 -> clipped to 0.2
    close(ctl.value, 0.1 * (1 + 0.2 * 256 / 10000), tol=1e-12)       # 0.100512
    ctl.update(current_kl=5.4, n_steps=100)   # 5.4/6 - 1 = -0.1 (inside the clip)
    close(ctl.value, 0.100512 * (1 - 0.1 * 100 / 10000), tol=1e-12)  # 0.100411488
    ctl.update(current_kl=0.0, n_steps=50)    # -1 -> clipped to -0.2
    expected = 0.100411488 * (1 - 0.2 * 50 / 10000)
    close(ctl.value, expected, tol=1e-12)

    resumed = AdaptiveKLController(init_kl_coef=1.0, target=1.0, horizon=1.0)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.state_dict() == ctl.state_dict()
    for c in (ctl, resumed):
        c.update(current_kl=7.0, n_steps=10)  # 7/6 - 1 = 1/6
    close(resumed.value, expected * (1 + (1 / 6) * 10 / 10000), tol=1e-12)
    assert resumed.value == ctl.value


def test_fixed_kl_controller():
    ctl = FixedKLController(0.1)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.1
    other = FixedKLController(0.5)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.1


def test_adaptive_kl_controller_rejects_bad_target():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_total_scores_clip_the_reward_model_only():
    # clip 5, weight 5: rm 8 -> 5 (+5 for a passing answer = 10), rm -7 -> -5, rm 1 stays
    rm, fn = T([8.0, 8.0, -7.0, 1.0]), T([1.0, 0.0, 1.0, 0.0])
    close(total_scores(rm, fn, 5.0, 5.0), T([10.0, 5.0, 0.0, 1.0]))
    # the function still separates two answers the reward model scores at the clip: 10 vs 5
    # (clipping the sum would give 5 and 5)
    # no function (weight 0): DeepSpeed-Chat's clipped reward model score
    close(total_scores(rm, fn, 0.0, 5.0), T([5.0, 5.0, -5.0, 1.0]))


def test_leave_one_out_scores_hand_computed():
    # two prompts x three answers: each score minus the mean of its group's other two
    scores = torch.tensor([1.0, 2.0, 6.0, -3.0, 0.0, 3.0])
    out = leave_one_out_scores(scores, 3)
    close(out, torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, -3 - 1.5, 0 - 0.0, 3 - (-1.5)]))
    # identical answers to a prompt carry no signal: all zero
    close(leave_one_out_scores(torch.tensor([5.0, 5.0, 5.0, 5.0]), 4), torch.zeros(4))
    # group size 1: unchanged
    close(leave_one_out_scores(scores, 1), scores)


def test_leave_one_out_scores_skips_invalid_rows():
    # invalid rows (dropped answers) never enter another row's baseline; a row whose group has no
    # other valid answer keeps its score
    scores = torch.tensor([1.0, 9.0, 3.0, 4.0, 5.0, 6.0])
    valid = torch.tensor([True, False, True, False, False, True])
    close(leave_one_out_scores(scores, 3, valid),
          torch.tensor([1 - 3.0, 9 - (1 + 3) / 2, 3 - 1.0, 4 - 6.0, 5 - 6.0, 6.0]))


def test_leave_one_out_scores_rejects_ragged_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        leave_one_out_scores(torch.zeros(6), 4)


# ---------------------------------------------------------------- critic-free estimators


def _inputs(scores, logprobs, ref, mask, group_size, kl_coef=0.1, gamma=1.0, valid=None):
    from rlhf.algos.ppo import AdvantageInputs

    scores = T(scores)
    return AdvantageInputs(scores=scores, logprobs=T(logprobs), ref_logprobs=T(ref), values=None, mask=T(mask),
                           valid=torch.ones_like(scores, dtype=torch.bool) if valid is None else T(valid),
                           group_size=group_size, kl_coef=kl_coef, gamma=gamma, lam=0.95)


def test_reward_to_go_discounted_and_masked():
    from rlhf.algos.ppo import reward_to_go

    rewards = T([[9.0, 1.0, 2.0, 4.0, 7.0]])
    mask = T([[0, 1, 1, 1, 0]])  # prompt, 3 answer tokens, after EOS
    # gamma 0.5: R3 = 4, R2 = 2 + 0.5 * 4 = 4, R1 = 1 + 0.5 * 4 = 3; 0 off the mask
    close(reward_to_go(rewards, mask, 0.5), [[0.0, 3.0, 4.0, 4.0, 0.0]])


def test_group_normalized_scores_hand_computed():
    from rlhf.algos.ppo import group_normalized_scores

    # group 1: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> -1, 0, 1; group 2 all equal -> 0
    close(group_normalized_scores(T([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3), [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], tol=1e-5)
    # only valid rows count: group 1 keeps {1, 3}: mean 2, std sqrt((1 + 1) / 1) = sqrt(2);
    # group 2 has one valid row: no comparison, all 0
    valid = T([True, False, True, True, False, False])
    s = math.sqrt(2.0)
    close(group_normalized_scores(T([1.0, 9.0, 3.0, 4.0, 8.0, 0.0]), 3, valid), [-1 / s, 0.0, 1 / s, 0.0, 0.0, 0.0],
          tol=1e-5)
    with pytest.raises(ValueError, match="groups of 4"):
        group_normalized_scores(torch.zeros(6), 4)


def test_grpo_advantage_is_the_group_normalised_score_on_every_answer_token():
    from rlhf.algos.ppo import ADVANTAGES

    est = ADVANTAGES["grpo"]
    assert not est.critic and est.kl_in_loss
    # one prompt, two answers scored 3 and 1: mean 2, unbiased std sqrt(2) -> +-1/sqrt(2)
    x = _inputs([3.0, 1.0], [[-1.0, -1.0, -1.0]] * 2, [[-2.0, -2.0, -2.0]] * 2, [[0, 1, 1], [0, 1, 0]], 2)
    adv, ret = est.fn(x)
    a = 1 / math.sqrt(2.0)
    close(adv, [[0.0, a, a], [0.0, -a, 0.0]], tol=1e-5)  # the KL is not in the advantage (a loss term)
    close(ret, adv)


def test_rloo_advantage_leave_one_out_then_kl_penalised_reward_to_go():
    from rlhf.algos.ppo import ADVANTAGES

    est = ADVANTAGES["rloo"]
    assert not est.critic and not est.kl_in_loss
    # scores 2, 0 (one prompt): baselines 0 and 2 -> shaped +2, -2
    # row 0: logp - ref = [., 0.5, -1] -> KL rewards -0.05, +0.1; +2 on the last token: [0, -0.05, 2.1]
    # row 1: logp == ref: [0, 0, -2]
    x = _inputs([2.0, 0.0], [[-1.0, -0.5, -2.0], [-1.0, -1.0, -1.0]], [[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]],
                [[0, 1, 1], [0, 1, 1]], 2)
    adv, ret = est.fn(x)
    # reward to go (gamma 1): row 0 [0, -0.05 + 2.1, 2.1], row 1 [0, -2, -2]
    close(adv, [[0.0, 2.05, 2.1], [0.0, -2.0, -2.0]], tol=1e-6)
    close(ret, adv)


def test_reinforce_pp_advantage_whitens_kl_penalised_returns_over_the_batch():
    from rlhf.algos.ppo import ADVANTAGES

    est = ADVANTAGES["reinforce_pp"]
    assert not est.critic
    # raw scores (no baseline) 2, 0; same KL as the RLOO test: returns row 0 [0, 2.05, 2.1], row 1 [0, 0, 0]
    x = _inputs([2.0, 0.0], [[-1.0, -0.5, -2.0], [-1.0, -1.0, -1.0]], [[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]],
                [[0, 1, 1], [0, 1, 1]], 2)
    adv, ret = est.fn(x)
    close(ret, [[0.0, 2.05, 2.1], [0.0, 0.0, 0.0]], tol=1e-6)
    # whitened over the 4 answer tokens: mean (2.05 + 2.1) / 4 = 1.0375,
    # unbiased var = (1.0125^2 + 1.0625^2 + 2 * 1.0375^2) / 3
    mean = 1.0375
    s = math.sqrt((1.0125 ** 2 + 1.0625 ** 2 + 2 * 1.0375 ** 2) / 3 + 1e-8)
    close(adv, [[0.0, (2.05 - mean) / s, (2.1 - mean) / s], [0.0, -mean / s, -mean / s]], tol=1e-5)


def test_gae_estimator_matches_kl_rewards_then_gae():
    from rlhf.algos.ppo import ADVANTAGES, AdvantageInputs

    assert ADVANTAGES["gae"].critic
    x = _inputs([1.0], [[-1.0, -1.5, -1.0]], [[-1.0, -1.0, -1.0]], [[0, 1, 1]], 1)
    x = AdvantageInputs(**{**x.__dict__, "values": T([[0.0, 0.5, 0.25]])})
    adv, ret = ADVANTAGES["gae"].fn(x)
    # rewards: token 1 KL -0.1 * -0.5 = 0.05; token 2 the score 1. gamma 1, lam 0.95:
    # A2 = 1 - 0.25 = 0.75; A1 = (0.05 + 0.25 - 0.5) + 0.95 * 0.75 = 0.5125
    close(adv, [[0.0, 0.5125, 0.75]], tol=1e-6)
    close(ret, [[0.0, 0.5125 + 0.5, 0.75 + 0.25]], tol=1e-6)


def test_kl_loss_k3_hand_computed():
    from rlhf.algos.ppo import kl_loss

    # d = ref - logp on the mask: -0.5 and 1.0 -> k3 = e^-0.5 - 1 + 0.5 and e - 1 - 1; third token masked
    loss = kl_loss(T([[-1.0, -2.0, -9.0]]), T([[-1.5, -1.0, 0.0]]), T([[1, 1, 0]]))
    close(loss, ((math.exp(-0.5) - 0.5) + (math.exp(1.0) - 2.0)) / 2, tol=1e-6)


def test_unknown_estimator_names_the_key():
    from rlhf.algos.ppo import get_estimator

    with pytest.raises(ValueError, match="ppo.advantage='vtrace'.*gae, grpo, rloo, reinforce_pp"):
        get_estimator("vtrace")
