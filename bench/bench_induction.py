"""When does copying from the context (an induction head) form in a model of the demo's shape? Our model against
transformers' LlamaForCausalLM of the same shape (the baseline), trained the same way on the same rows.

    python bench/bench_induction.py [--steps 250] [--threads 1] [--seed 0]

A copy row is 64 random tokens, </s>, then the same 64 again. Copy accuracy is greedy next-token accuracy on the
repeated half of 64 fresh rows (chance 1/3000); it jumps from ~0 to ~100% within a few dozen steps (a phase
change). Both models start from their own library's init with the same seed and see the same batches.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from common import machine, table

from model.convert import llama_config
from model.LMConfig import preset_config
from model.model import MiniMindForCausalLM
from model.tokenizer import SPECIAL_TOKENS

HALF, BATCH = 64, 16


def copy_rows(generator, n, vocab_size):
    x = torch.randint(len(SPECIAL_TOKENS), vocab_size, (n, HALF), generator=generator)
    return torch.cat([x, torch.full((n, 1), 2), x], 1)  # (n, 129): 128 inputs, each with its next token


def copy_accuracy(model, rows):
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=rows[:, :-1]).logits  # (n, 128, vocab)
    model.train()
    return (logits[:, HALF:].argmax(-1) == rows[:, HALF + 1:]).float().mean().item()


def train(model, steps, seed, vocab_size, every):
    test = copy_rows(torch.Generator().manual_seed(123), 64, vocab_size)
    batches = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    curve, start = {}, time.perf_counter()
    for step in range(1, steps + 1):
        x = copy_rows(batches, BATCH, vocab_size)
        loss = F.cross_entropy(model(input_ids=x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        warmup.step()
        if step % every == 0:
            curve[step] = copy_accuracy(model, test)
    return curve, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    config = preset_config("demo")
    builders = {"transformers LlamaForCausalLM (baseline)": lambda: LlamaForCausalLM(llama_config(config)),
                "MiniMind (model/model.py)": lambda: MiniMindForCausalLM(config)}
    print(machine())
    print(f"demo preset (dim {config.dim}, {config.n_layers} layers), AdamW lr 2e-3, batch {BATCH} x 128, "
          f"seed {args.seed}")
    rows, first = [], {}
    for name, build in builders.items():
        torch.manual_seed(args.seed)
        curve, seconds = train(build().train(), args.steps, args.seed, config.vocab_size, args.every)
        first[name] = next((s for s, a in curve.items() if a >= 0.9), None)
        rows.append([name, *(f"{a:.1%}" for a in curve.values()), first[name] or f"> {args.steps}",
                     f"{seconds:.0f}"])
    table(rows, ["model", *(f"step {s}" for s in range(args.every, args.steps + 1, args.every)),
                 "first step >= 90%", "seconds"])
    base, ours = first.values()
    if base and ours:
        print(f"steps to 90% copy accuracy, MiniMind / Llama: {ours / base:.2f}")


if __name__ == "__main__":
    main()
