"""GRPO's cost on the demo model: rollout tokens/s of the batched generator against sampling the same completions
one at a time (the baseline, same run), and where one training step's time goes (rollout, reward, reference
log-probs, the policy's forward and backward, the optimizer).

    python bench/bench_grpo.py [--ckpt out/demo/dpo_256.safetensors --tokenizer out/demo/tokenizer]
                               [--batch_size 8] [--num_generations 8] [--max_new_tokens 16]

Without --ckpt it times a randomly initialised demo-preset model (the same shapes) with the default tokenizer;
the prompts are the demo's GRPO questions either way. Sampling runs to max_new_tokens (no EOS) so that both
ways generate the same number of tokens.
"""
import argparse
import copy
import time
from types import SimpleNamespace

import torch
from common import machine, table

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing here


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per step (the demo's)")
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="steps timed (after one warm-up step)")
    args = parser.parse_args()
    torch.manual_seed(0)

    from model.demo_corpus import DemoWorld
    from model.evaluation import chat_prompt
    from model.LMConfig import preset_config
    from model.loading import load_model
    from model.model import MiniMindForCausalLM
    from model.rl import demo_fact, policy_loss, token_logps
    from model.stages import GRPOLoss
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    if args.ckpt:
        model = load_model(args.ckpt)
    else:
        model = MiniMindForCausalLM(preset_config("demo", vocab_size=len(tokenizer)))
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    world = DemoWorld()
    rows = world.continent_prompts(world.train)[:args.batch_size]
    prompts = [chat_prompt(tokenizer, r["prompt"]) for r in rows]
    G, T = args.num_generations, args.max_new_tokens
    print(f"machine: {machine()}")
    print(f"model: {args.ckpt or 'demo preset, random weights'} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters); {len(prompts)} prompts x {G} completions x {T} tokens a step")

    # Both ways sample with no EOS, so that every completion is T tokens long.
    hyper = SimpleNamespace(max_new_tokens=T, num_generations=G, temperature=1.0, loss="grpo", beta=0.02,
                            epsilon=0.2, epsilon_high=None, iterations=1)
    grpo = GRPOLoss(None, None, SimpleNamespace(eos_token_id=-1, pad_token_id=tokenizer.pad_token_id,
                                                decode=tokenizer.decode), "exact_match", hyper, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    parts = {k: [] for k in ("rollout", "reward", "reference", "policy forward + backward", "optimizer")}
    for step in range(args.steps + 1):
        model.train()
        completions, t_roll = timed(lambda: grpo.sample(model, prompts, G, 1.0))
        texts, t_text = timed(lambda: [tokenizer.decode(c, skip_special_tokens=True) for c in completions])
        rewards, t_score = timed(lambda: torch.tensor([demo_fact(t, **rows[i // G]) for i, t in enumerate(texts)]))
        ids, mask = grpo.pack(prompts, completions, G)
        with torch.no_grad():
            ref, t_ref = timed(lambda: token_logps(reference, ids))

        def update():
            logps = token_logps(model, ids)
            advantages = torch.randn(len(ids))  # the cost does not depend on the values
            loss, _ = policy_loss(logps, logps.detach(), ref, advantages, mask, beta=0.02)
            loss.backward()

        _, t_update = timed(update)
        _, t_opt = timed(lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
        if step:  # the first step warms up the allocator and the kernels
            for k, seconds in zip(parts, (t_roll, t_text + t_score, t_ref, t_update, t_opt)):
                parts[k].append(seconds)
    step_time = sum(min(v) for v in parts.values())
    generated = len(prompts) * G * T

    # The baseline: the same completions one at a time (what a loop over prompts and samples would do).
    single = [p for p in prompts for _ in range(G)]
    _, t_one = timed(lambda: [grpo.sample(model, [p], 1, 1.0) for p in single[:16]])
    one_rate = 16 * T / t_one
    batched_rate = generated / min(parts["rollout"])
    print(f"\nrollout: batched {batched_rate:.0f} tokens/s ({len(single)} rows at once) vs one row at a time "
          f"{one_rate:.0f} tokens/s (16 rows timed): {batched_rate / one_rate:.1f}x")
    table([(k, f"{min(v) * 1000:.0f}", f"{min(v) / step_time:.0%}") for k, v in parts.items()] +
          [("step", f"{step_time * 1000:.0f}", "100%")], ("part of a GRPO step", "ms (best)", "share"))


if __name__ == "__main__":
    main()
