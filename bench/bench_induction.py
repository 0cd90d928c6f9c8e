"""When does copying from the context (an induction head) form in a model of the demo's shape? Our model against
transformers' LlamaForCausalLM of the same shape (the baseline), trained the same way on the same rows.

    python bench/bench_induction.py [--steps 250] [--threads 1] [--seed 0]

A copy row is 64 random tokens, </s>, then the same 64 again. Copy accuracy is greedy next-token accuracy on the
repeated half of 64 fresh rows (chance 1/3000); it jumps from ~0 to ~100% within a few dozen steps (a phase
change). Both models start from their own library's init with the same seed and see the same batches.
"""
import torch

from common import copy_bench_arguments, machine, table, train_on_rows

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
    return train_on_rows(model, lambda: copy_rows(batches, BATCH, vocab_size), steps, every,
                         lambda m: copy_accuracy(m, test))


def main():
    args = copy_bench_arguments(__doc__, steps=250, threads=1)
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
