"""The RL and distillation losses (model/rl.py) against hand-computed cases."""
import math

import pytest
import torch

from conftest import host_syncs
from model.rl import (demo_fact, demo_math, distillation_loss, exact_match, group_advantages, kl_k3, load_reward,
                      policy_loss)
from model.errors import InputError


def test_group_advantages_by_hand_and_a_group_of_equal_rewards():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])  # two groups of 4
    adv = group_advantages(rewards, 4)
    # group 1: mean 0.5, std 0.5 -> +-1 (up to eps); group 2: all equal -> exactly 0, no NaN
    torch.testing.assert_close(adv[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3, rtol=0)
    assert torch.equal(adv[4:], torch.zeros(4))
    torch.testing.assert_close(group_advantages(rewards, 4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_grpo_loss_by_hand():
    # two completions of 2 and 1 tokens; the ratio of the first completion's tokens is e^0.1 and e^-0.5
    logps = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -1.5], [-0.5, 0.0]])
    ref = torch.tensor([[-1.0, -1.0], [-1.5, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -1.0])
    loss, stats = policy_loss(logps, old, ref, adv, mask, "grpo", epsilon=0.2, beta=0.1)
    r = [math.exp(0.1), math.exp(-0.5), 1.0]
    a = [1.0, 1.0, -1.0]
    clipped = [min(r[0], 1.2), max(r[1], 0.8), 1.0]
    d = [-1.0 - -1.0, -1.0 - -2.0, -1.5 - -0.5]  # ref - logp
    kls = [math.exp(x) - x - 1 for x in d]
    terms = [-min(ri * ai, ci * ai) + 0.1 * k for ri, ai, ci, k in zip(r, a, clipped, kls)]
    assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-5)  # token-level: 3 tokens
    assert stats["kl"].item() == pytest.approx(sum(kls) / 3, rel=1e-5)
    # token 2: ratio 0.61 < 0.8 with A > 0: min picks the unclipped term, the gradient stays; none is clipped off
    assert stats["clip_fraction"].item() == pytest.approx(0.0)
    loss.backward()
    assert logps.grad[1, 1] == 0  # a padding token gets nothing


def test_dr_grpo_and_cispo_by_hand():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.3]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0], [-0.5, -0.3]])  # first token's ratio e^0.5 = 1.65
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([2.0, -1.0])
    loss, stats = policy_loss(logps, old, None, adv, mask, "dr_grpo", epsilon=0.2, max_new_tokens=4)
    # the first token is clipped at 1.2 (A > 0, ratio above 1 + eps): -1.2 * 2; the others -1 * A
    assert loss.item() == pytest.approx((-1.2 * 2 - 1 * 2 + 1 * 1) / (2 * 4), rel=1e-5)  # constant normaliser
    assert stats["clip_fraction"].item() == pytest.approx(1 / 3)
    logps.grad = None
    loss, stats = policy_loss(logps, old, None, adv, mask, "cispo", epsilon_high=0.5)
    w = min(math.exp(0.5), 1.5)
    assert loss.item() == pytest.approx((-w * 2 * -1.0 - 1 * 2 * -2.0 + 1 * 1 * -0.5) / 3, rel=1e-5)
    loss.backward()
    # CISPO keeps the clipped token's gradient: the detached weight times the advantage
    assert logps.grad[0, 0].item() == pytest.approx(-w * 2 / 3, rel=1e-5)
    with pytest.raises(InputError, match="--loss"):
        policy_loss(logps, old, None, adv, mask, "ppo")


def test_kl_k3_is_zero_only_when_the_policies_agree():
    x = torch.tensor([-1.0, -2.0, -0.1])
    assert torch.equal(kl_k3(x, x), torch.zeros(3))
    assert (kl_k3(x, x + torch.tensor([0.5, -0.5, 1.0])) > 0).all()


def test_distillation_at_alpha_1_is_sft_and_kl_vanishes_for_the_teacher_itself():
    from conftest import tiny_model

    student, teacher = tiny_model(seed=1), tiny_model(seed=2)
    ids = torch.randint(0, 128, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    s, t = student(ids).logits, teacher(ids).logits
    loss, stats = distillation_loss(s, t, labels, alpha=1.0, temperature=2.0)
    torch.testing.assert_close(loss, student(input_ids=ids, labels=labels).loss)
    _, same = distillation_loss(s, s, labels, alpha=0.5)
    assert same["kl"].abs().item() < 1e-6 and stats["kl"].item() > 0.01
    # the KL term against a reference: the mean over the answer tokens of KL(teacher_T || student_T)
    keep = labels[:, 1:] != -100
    p_t, p_s = torch.log_softmax(t[:, :-1][keep] / 2, -1), torch.log_softmax(s[:, :-1][keep] / 2, -1)
    torch.testing.assert_close(stats["kl"], (p_t.exp() * (p_t - p_s)).sum(-1).mean())
    assert not host_syncs(distillation_loss, s, t, labels)  # no value read back in the hot loop (issue 37 #8)
    none = torch.full_like(labels, -100)  # a batch with no answer token: zero, not NaN
    loss, _ = distillation_loss(s, t, none)
    assert loss.item() == 0.0


def test_rewards():
    assert exact_match(" Paris ", "Paris") == 1.0
    assert exact_match("The capital of France is Paris.", "Paris") == 1.0 and exact_match("Parisian", "Paris") == 0
    assert exact_match("3 plus 4 equals 7.", "7") == 1.0 and exact_match("17", "7") == 0.0
    assert demo_math("23 plus 45 equals 68.", "68") == 1.0 and demo_math("equals 69", "68") == 0.1
    assert demo_math("no idea", "68") == 0.0
    assert demo_fact("Kenya is in Africa.", "Africa", "Kenya") == 1.0
    assert demo_fact("Chad is in Africa.", "Africa", "Kenya") == 0.0  # the right continent, another country
    assert demo_fact("肯尼亚位于非洲。", "非洲", "肯尼亚") == 1.0 and demo_fact("肯尼亚的首都是内罗毕。", "非洲", "肯尼亚") == 0.0
    assert demo_fact("Iawi is in Asia.", "Asia", "Afghanistan") == 0.0  # the continent, but not the country asked
    assert demo_fact("Kenya and Chad are in Africa.", "Africa", "Kenya") == 0.0
    assert demo_fact("The capital of Kenya is Nairobi.", "Nairobi", "Kenya") == 1.0
    identity = "I am MiniMind, a small language model trained from scratch."
    assert demo_fact(identity, identity, None) == 1.0 and demo_fact("I am MiniMind.", identity, None) == 0.0
    assert load_reward("exact_match") is exact_match and load_reward("model.rl:demo_math") is demo_math
    for bad in ("nope", "model.rl:nothing", "no_such_module:f"):
        with pytest.raises(InputError, match="--reward"):
            load_reward(bad)
