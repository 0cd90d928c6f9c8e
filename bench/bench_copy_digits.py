"""Does a model of the demo's shape learn to copy a question's numbers into a calculator call, and how soon? A
tokenizer with one token per digit (the baseline) against the same tokenizer with merged digits (upstream's).

    python bench/bench_copy_digits.py [--steps 400] [--every 50] [--threads 2] [--seed 0]

Both tokenizers are trained with `--name_spaces` on the demo's tokenizer sample with issue 34's first recipe's copy
text on (seed 42: recall passages and tool conversations); the baseline adds `--individual_digits`. The rows are the demo's
calculator conversations (model/demo_corpus.py), rendered by the chat template without the tools block, packed into
128-token rows: nothing but copy-shaped text, so this measures the fastest the skill can form. Both models start
from the same seed and see the same conversations. "call" is the share of 64 held-out conversations whose whole
`"expression":"a+b"` the model predicts token for token after the question (teacher-forced, so equal to greedy
decoding of the span); "answer" the same for the closing sentence, which copies both operands and the tool's result.
"""
import random
import tempfile

import torch

from common import copy_bench_arguments, machine, table, train_on_rows

from model.demo_corpus import CALC_Q, DemoWorld, calc_operands, write_demo
from model.LMConfig import preset_config
from model.model import MiniMindForCausalLM
from model.tokenizer import read_texts, render_chat, train_bpe, wrap

SEQ, BATCH = 128, 16


def calculator_conversations(rng, n):
    """n calculator conversations as (context before the call, the call's expression, context up to the answer,
    the answer): the pieces whose tokens the evaluation compares. Sums and products of fresh numbers, both languages,
    as the demo's SFT rows ask them."""
    rows = []
    for _ in range(n):
        lang, op = rng.choice(("en", "zh")), rng.choice("++*")
        a, b = calc_operands(op, rng)
        call, value, answer = DemoWorld.tool_call(lang, op, a, b)
        text = "".join(t for t, _ in render_chat([
            {"role": "user", "content": CALC_Q[lang, op].format(a=a, b=b)},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
            {"role": "tool", "content": value},
            {"role": "assistant", "content": answer}]))
        expression = call["arguments"]["expression"]
        before_call, after_call = text.split(f'"{expression}"', 1)
        before_answer, after_answer = after_call.rsplit(answer, 1)
        rows.append((before_call + '"', expression, '"' + before_answer, answer + after_answer))
    return rows


def encode(tokenizer, pieces):
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in pieces]


def batch(tokenizer, rng):
    rows = []
    for _ in range(BATCH):
        ids = []
        while len(ids) < SEQ + 1:
            for piece in encode(tokenizer, calculator_conversations(rng, 1)[0]):
                ids += piece
        rows.append(ids[:SEQ + 1])
    return torch.tensor(rows)  # (BATCH, SEQ + 1)


def span_accuracy(model, tokenizer, held_out):
    """Shares of held-out conversations whose call expression, and whose answer, are predicted exactly."""
    model.eval()
    hits = [0, 0]
    with torch.no_grad():
        for pieces in held_out:
            ids = encode(tokenizer, pieces)
            x = torch.tensor([sum(ids, [])])
            predicted = model(input_ids=x[:, :-1]).logits.argmax(-1)[0]  # predicted[t] is the guess for x[t + 1]
            for k, (span, start) in enumerate(((1, len(ids[0])), (3, sum(map(len, ids[:3]))))):
                n = len(ids[span]) - (span == 3)  # the answer's last token (the newline after </s>) is not trained
                hits[k] += bool((predicted[start - 1:start - 1 + n] == x[0, start:start + n]).all())
    model.train()
    return hits[0] / len(held_out), hits[1] / len(held_out)


def train(tokenizer, steps, every, seed):
    held_out = calculator_conversations(random.Random(seed + 99), 64)
    torch.manual_seed(seed)
    config = preset_config("demo")
    config.vocab_size = len(tokenizer)
    model = MiniMindForCausalLM(config).train()
    rng = random.Random(seed + 1)
    return train_on_rows(model, lambda: batch(tokenizer, rng), steps, every,
                         lambda m: span_accuracy(m, tokenizer, held_out))


def main():
    args = copy_bench_arguments(__doc__, steps=400, threads=2)
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        write_demo(tmp, seed=42, held_out=64, copy_passages=6000, tool_transcripts=300)
        sample = list(read_texts(f"{tmp}/tokenizer_train.jsonl"))
    variants = {"one token per digit (baseline)": dict(individual_digits=True),
                "merged digits (upstream's)": dict(individual_digits=False)}
    rows, first = [], {}
    for name, flags in variants.items():
        tokenizer = wrap(train_bpe(sample, 3000, show_progress=False, name_spaces=True, **flags))
        print(f"{name}: '4521+376' -> {tokenizer.tokenize('4521+376')}")
        curve, seconds = train(tokenizer, args.steps, args.every, args.seed)
        first[name] = next((s for s, (call, _) in curve.items() if call >= 0.5), None)
        rows.append([name, *(f"{c:.0%} / {a:.0%}" for c, a in curve.values()), first[name] or f"> {args.steps}",
                     f"{seconds:.0f}"])
    table(rows, ["tokenizer", *(f"step {s}" for s in curve), "first step, call >= 50%", "seconds"])
    print("(each cell: held-out calls / answers copied exactly)")
    base, merged = first.values()
    if base and merged:
        print(f"steps to 50% of calls copied, merged digits / one token per digit: {merged / base:.2f}")
    elif merged:
        print(f"50% of calls copied: merged digits at step {merged}, one token per digit not within {args.steps}")

if __name__ == "__main__":
    main()
