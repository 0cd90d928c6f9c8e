"""Reinforcement learning from verifiable rewards (GRPO and its variants) and white-box distillation: the losses.

GRPO (DeepSeekMath, 2024) samples G completions for every prompt, scores each with a reward function (a program,
not a model), and pushes up the log-probability of completions that beat their group's mean:

    advantage_i = (r_i - mean(r)) / (std(r) + eps)                          (every token of completion i)
    ratio_t     = pi(o_t) / pi_old(o_t)                                     (pi_old: the policy that sampled)
    loss_t      = -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps) * A) + beta * KL_t
    KL_t        = pi_ref(o_t)/pi(o_t) - log(pi_ref(o_t)/pi(o_t)) - 1        (the k3 estimator, always >= 0)

averaged over every completion token of the batch (token-level, as DAPO; GRPO's paper averaged per sequence
first). Variants (`--loss`):
- `dr_grpo` (Dr. GRPO, Liu et al. 2025): no division by the group's std, and a constant normaliser (completions x
  max_new_tokens) instead of the number of tokens, so neither difficulty nor length tilts the update;
- `cispo` (MiniMax-M1, 2025): the importance weight itself is clipped and detached, multiplying the log-prob:
  -sg(min(ratio, 1 + eps_high)) * A * log pi, so no token's gradient is ever dropped by the clip.
A group whose rewards are all equal has zero advantage: it teaches nothing, and costs no NaN.

Distillation (Hinton et al. 2015, as upstream MiniMind's train_distillation.py): alpha * CE(student, labels) +
(1 - alpha) * T^2 * KL(teacher_T || student_T) over the answer tokens, T the softening temperature.
"""
import functools
import importlib
import re

import torch
import torch.nn.functional as F

from .errors import InputError

LOSSES = ("grpo", "dr_grpo", "cispo")


# ------------------------------------------------------------------------------------------------------ GRPO
def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(N,) rewards of N = prompts x group_size completions, grouped consecutively -> (N,) advantages."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True, unbiased=False) + eps)
    return centred.flatten()


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate exp(d) - d - 1 with d = log pi_ref - log pi: unbiased, never negative."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def policy_loss(logps, old_logps, ref_logps, advantages, mask, kind: str = "grpo", epsilon: float = 0.2,
                epsilon_high: float | None = None, beta: float = 0.0, max_new_tokens: int | None = None):
    """The loss of a batch of completions and what it measured.

    logps, old_logps, ref_logps, mask: (N, T) per completion token (mask 1 on tokens the policy generated);
    advantages: (N,). ref_logps may be None when beta is 0. Returns (loss, {"kl", "clip_fraction"}).
    """
    if kind not in LOSSES:
        raise InputError(f"--loss must be one of {', '.join(LOSSES)}, got {kind!r}")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    a = advantages[:, None]
    if kind == "cispo":
        weight = ratio.clamp(max=1 + epsilon_high).detach()
        per_token = -weight * a * logps
        clipped = (ratio > 1 + epsilon_high).to(logps.dtype)
    else:
        bounded = ratio.clamp(1 - epsilon, 1 + epsilon_high)
        per_token = -torch.min(ratio * a, bounded * a)
        clipped = ((ratio * a) > (bounded * a)).to(logps.dtype)  # where the clip took the gradient away
    kl = kl_k3(logps, ref_logps) if ref_logps is not None else torch.zeros_like(logps)
    if beta:
        per_token = per_token + beta * kl
    if kind == "dr_grpo":
        if not max_new_tokens:
            raise InputError("dr_grpo normalises by max_new_tokens: give it")
        denominator = mask.shape[0] * max_new_tokens
    else:
        denominator = mask.sum().clamp(min=1)
    tokens = mask.sum().clamp(min=1)
    return (per_token * mask).sum() / denominator, {"kl": ((kl * mask).sum() / tokens).detach(),
                                                   "clip_fraction": ((clipped * mask).sum() / tokens).detach()}


def token_logps(model, input_ids, attention_mask=None, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) log-probability of each token given the ones before it (position 0, which has none, gets 0);
    the logits divided by the sampling temperature, so that these are the probabilities the rollout sampled from."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (B, T, V)
    logits = logits[:, :-1] / max(temperature, 1e-5)
    picked = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return F.pad(picked, (1, 0))


# --------------------------------------------------------------------------------------------------- rewards
def numbers_in(text: str) -> list[str]:
    return re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))


def exact_match(completion: str, answer: str, **_) -> float:
    """1 if the completion, stripped, is the answer or contains it as a whole word or number, else 0."""
    completion, answer = completion.strip(), str(answer).strip()
    if completion == answer:
        return 1.0
    if re.fullmatch(r"-?\d+(?:\.\d+)?", answer):
        return float(answer in numbers_in(completion))
    return float(re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", completion) is not None)


def demo_math(completion: str, answer: str, **_) -> float:
    """The demo's arithmetic: 1 if the last number in the completion is the answer; 0.1 for a number that is not
    (it at least answered in the right form); 0 for no number at all."""
    found = numbers_in(completion)
    if not found:
        return 0.0
    return 1.0 if found[-1] == str(answer).strip() else 0.1


@functools.cache
def _demo_entities():
    from .demo_corpus import EntityFinder

    return EntityFinder()


def demo_fact(completion: str, answer: str, subject: str | None = None, **_) -> float:
    """A fact of the demo world about a country (its continent, its capital): 1 if the completion states the answer
    and names the subject and no other country ("Kenya is in Africa."; not "Chad is in Africa.", nor "Iawi is in
    Africa."), else 0. A row with no subject (the identity question) scores 1 only for the answer word for word."""
    if not subject:
        return float(completion.strip() == str(answer).strip())
    return float(str(answer) in completion and set(_demo_entities().names(completion, "country")) == {subject})


REWARDS = {"exact_match": exact_match, "demo_math": demo_math, "demo_fact": demo_fact}


def load_reward(name: str):
    """A reward function by name, or `module:function` (a module on the path, e.g. my_rewards:score) that takes
    (completion: str, **fields of the prompt's row) and returns a float."""
    if name in REWARDS:
        return REWARDS[name]
    module, _, function = name.partition(":")
    if not function:
        raise InputError(f"--reward {name!r}: one of {', '.join(REWARDS)}, or module:function")
    try:
        fn = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise InputError(f"--reward {name!r}: cannot load it ({e})") from e
    if not callable(fn):
        raise InputError(f"--reward {name!r} is not a function")
    return fn


# -------------------------------------------------------------------------------------------- distillation
def distillation_loss(student_logits, teacher_logits, labels, alpha: float = 0.5, temperature: float = 2.0):
    """alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T) over the labelled tokens.

    logits (B, T, V), labels (B, T) as the LM loss takes them (-100: not an answer token; shifted here). T^2 keeps
    the soft term's gradient on the scale of the hard one whatever the temperature. Returns (loss, {"ce", "kl"}).
    """
    from .model import next_token_targets

    targets = next_token_targets(labels)  # (B, T)
    keep = (targets != -100).float()
    # Masked means, not boolean indexing: no host sync, and no gathered copy of the (B, T, V) logits
    count, student, t = keep.sum().clamp(min=1), student_logits.float(), temperature
    ce = (F.cross_entropy(student.flatten(0, 1), targets.flatten(), ignore_index=-100,
                          reduction="none").view_as(keep) * keep).sum() / count
    kl = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                  log_target=True, reduction="none").sum(-1)  # (B, T)
    kl = (kl * keep).sum() / count
    return alpha * ce + (1 - alpha) * t * t * kl, {"ce": ce.detach(), "kl": kl.detach()}
