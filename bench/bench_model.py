"""Model speed on this machine, each figure against a baseline measured in the same run.

    python bench/bench_model.py [--preset minimind-v1-small] [--train_steps 3] [--skip_compile]

Training: tokens/s of one optimizer step (batch 8 x 512, AdamW included) of our model, eager and compiled,
against transformers' LlamaForCausalLM of identical dims (eager); MFU = model FLOP/s over the best fp32 4096^2
matmul rate measured here. Decoding: our generator against transformers' generate (batch 1, 32-token prompt,
256 new tokens) and against the weight-streaming bound (one matrix-vector pass over all the weights), in fp32,
bf16 and int8 weights, with greedy agreement against fp32; and batch 16 in aggregate.
"""
import argparse
import copy
import time

import torch
from common import best_time, machine, matmul_peak, table, train_flops_per_token

from model.convert import llama_config, to_llama_state_dict
from model.generate import SamplingParams, generate_ids
from model.LMConfig import preset_config
from model.model import MiniMindLM


def train_rates(models: dict, batch, seq, rounds, vocab) -> dict:
    """Best tokens/s of one optimizer step per model. The models take turns, round after round, so that a
    noisy machine (shared memory bandwidth) slows them alike instead of whichever happened to run then."""
    ids = torch.randint(0, vocab, (batch, seq))
    steps = {}
    for name, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step(model=model, opt=opt):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up (and compilation)
        steps[name] = step
    best = {name: float("inf") for name in models}
    for _ in range(rounds):
        for name, step in steps.items():
            best[name] = min(best[name], best_time(step, repeats=1, warmup=0))
    return {name: batch * seq / t for name, t in best.items()}


def our_decode(model, prompts, new_tokens) -> tuple[float, list]:
    params = SamplingParams(max_new_tokens=new_tokens)
    start = time.perf_counter()
    out = torch.stack(list(generate_ids(model, prompts, params, eos_token_id=-1)), dim=1)
    return out.numel() / (time.perf_counter() - start), out.tolist()


def hf_decode(model, prompts, new_tokens) -> float:
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / (time.perf_counter() - start)


def weight_stream_bound(model, dtype=torch.float32) -> float:
    """Tokens/s if decoding cost exactly one pass over all the weights: a matrix-vector product of that size."""
    n = sum(p.numel() for p in model.parameters())
    cols = model.config.dim
    w = torch.randn(n // cols, cols, dtype=dtype)
    x = torch.randn(cols, dtype=dtype)
    return 1 / best_time(lambda: torch.mv(w, x), repeats=20, warmup=3)


def agreement(reference: list, other: list) -> float:
    """Share of greedy tokens equal to the fp32 run, counting each row up to its first difference."""
    agree = total = 0
    for a, b in zip(reference, other):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        agree, total = agree + n, total + len(a)
    return agree / total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind-v1-small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--train_steps", type=int, default=3, help="interleaved timing rounds per model")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--skip_compile", action="store_true")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    config = preset_config(args.preset, max_seq_len=args.seq)
    torch.manual_seed(0)
    ours = MiniMindLM(config)
    from transformers import LlamaForCausalLM

    cfg = llama_config(config)
    cfg._attn_implementation = "sdpa"
    llama = LlamaForCausalLM(cfg)
    llama.load_state_dict(to_llama_state_dict(ours.state_dict(), config))
    peak = matmul_peak()
    flops = train_flops_per_token(config, args.seq)
    print(f"fp32 matmul peak (4096^2, best of 3): {peak / 1e9:.1f} GFLOP/s; {flops / 1e6:.0f} MFLOP per token")

    # ---------------------------------------------------------------------------------------------- training
    models = {"transformers Llama, eager (baseline)": copy.deepcopy(llama).train(),
              "ours, eager": copy.deepcopy(ours).train()}
    if not args.skip_compile:
        models["ours, torch.compile"] = torch.compile(copy.deepcopy(ours).train())
    rates = train_rates(models, args.batch, args.seq, args.train_steps, config.vocab_size)
    base = rates["transformers Llama, eager (baseline)"]
    rows = [(name, f"{rate:.0f}", f"{rate / base:.2f}", f"{rate * flops / peak:.2f}") for name, rate in rates.items()]
    print(f"\ntraining, batch {args.batch} x {args.seq}, one AdamW step, best of {args.train_steps} interleaved rounds:")
    table(rows, ("model", "tokens/s", "vs Llama", "MFU"))

    # ---------------------------------------------------------------------------------------------- decoding
    ours.eval()
    llama.eval()
    g = torch.Generator().manual_seed(1)
    prompt = [torch.randint(3, config.vocab_size, (32,), generator=g).tolist()]
    hf = hf_decode(llama, prompt, args.new_tokens)
    bound = weight_stream_bound(ours)
    fp32, ref = our_decode(ours, prompt, args.new_tokens)
    rows = [("transformers generate, fp32 (baseline)", f"{hf:.1f}", "1.00", f"{hf / bound:.0%}", "-"),
            ("ours, fp32", f"{fp32:.1f}", f"{fp32 / hf:.2f}", f"{fp32 / bound:.0%}", "100%")]
    agreement_prompts = [torch.randint(3, config.vocab_size, (32,), generator=g).tolist() for _ in range(8)]
    _, ref_many = our_decode(ours, agreement_prompts, 64)
    bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    rate, _ = our_decode(bf16, prompt, args.new_tokens)
    _, got = our_decode(bf16, agreement_prompts, 64)
    rows.append(("ours, bf16 weights", f"{rate:.1f}", f"{rate / hf:.2f}", f"{rate / weight_stream_bound(ours, torch.bfloat16):.0%} of bf16 bound",
                 f"{agreement(ref_many, got):.0%}"))
    int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(ours), {torch.nn.Linear}, dtype=torch.qint8)
    rate, _ = our_decode(int8, prompt, args.new_tokens)
    _, got = our_decode(int8, agreement_prompts, 64)
    rows.append(("ours, int8 weights (dynamic quantization)", f"{rate:.1f}", f"{rate / hf:.2f}", "-",
                 f"{agreement(ref_many, got):.0%}"))
    print(f"\ndecoding, batch 1, 32-token prompt, {args.new_tokens} new tokens; weight-streaming bound "
          f"{bound:.1f} tokens/s (fp32):")
    table(rows, ("generator", "tokens/s", "vs transformers", "of bound", "greedy agreement with fp32"))
    batch16 = [torch.randint(3, config.vocab_size, (32,), generator=g).tolist() for _ in range(16)]
    rate16, _ = our_decode(ours, batch16, args.new_tokens)
    print(f"\nbatch 16 (fp32): {rate16:.1f} tokens/s in aggregate = {rate16 / fp32:.1f}x single-stream")


if __name__ == "__main__":
    main()
