"""Model speed on this machine, each figure against a baseline measured in the same run.

    python bench/bench_model.py [--preset minimind-v1-small] [--train_steps 3] [--skip_compile]

Training: tokens/s of one optimizer step (batch 8 x 512, AdamW included) of our model, eager and compiled,
against transformers' LlamaForCausalLM of identical dims (eager); MFU = model FLOP/s over the best fp32 4096^2
matmul rate measured here. Decoding: our generator against transformers' generate (batch 1, 32-token prompt,
256 new tokens) and against the weight-streaming bound (one matrix-vector pass over all the weights), in fp32,
bf16 and int8 weights, eager and with the compiled decode step (--compile in the chat scripts), with greedy
agreement against fp32; and batch 16 in aggregate.
"""
import argparse
import copy
import time

import torch
from common import best_time, machine, matmul_peak, table, train_flops_per_token, weight_passes

from model import quiet_third_party

quiet_third_party()  # before transformers loads: its import-time notices mean nothing to a user

from model.convert import llama_config, to_llama_state_dict
from model.engine import Engine
from model.generate import SamplingParams, generate_ids
from model.LMConfig import preset_config
from model.loading import cast_model
from model.model import MiniMindForCausalLM
from model.trainer import keep_freed_memory


def train_rates(models: dict, batch, seq, rounds, vocab) -> tuple[dict, float]:
    """Best tokens/s of one optimizer step per model, and the best fp32 matmul rate (the MFU denominator). They
    take turns, round after round, so that a noisy machine (shared memory bandwidth, neighbours) slows them
    alike instead of whichever happened to run then."""
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
    peak = matmul_peak()
    for _ in range(rounds):
        for name, step in steps.items():
            best[name] = min(best[name], best_time(step, repeats=1, warmup=0))
        peak = max(peak, matmul_peak(repeats=1))
    return {name: batch * seq / t for name, t in best.items()}, peak


def our_decode(model, prompts, new_tokens) -> tuple[float, list]:
    params = SamplingParams(max_new_tokens=new_tokens)
    start = time.perf_counter()
    out = torch.stack(list(generate_ids(model, prompts, params, eos_token_id=-1)), dim=1)
    return out.numel() / (time.perf_counter() - start), out.tolist()


def hf_decode(model, prompts, new_tokens) -> float:
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / (time.perf_counter() - start)


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
    parser.add_argument("--decode_rounds", type=int, default=3, help="interleaved timing rounds of every decoder")
    parser.add_argument("--skip_compile", action="store_true", help="leave out compiled training (not decoding)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    keep_freed_memory()  # as the trainer does on CPU; every model below runs with it
    config = preset_config(args.preset, max_seq_len=args.seq)
    torch.manual_seed(0)
    ours = MiniMindForCausalLM(config)
    from transformers import LlamaForCausalLM

    cfg = llama_config(config)
    cfg._attn_implementation = "sdpa"
    llama = LlamaForCausalLM(cfg)
    llama.load_state_dict(to_llama_state_dict(ours.state_dict(), config))
    flops = train_flops_per_token(config, args.seq)

    # ---------------------------------------------------------------------------------------------- training
    models = {"transformers Llama, eager (baseline)": copy.deepcopy(llama).train(),
              "ours, eager": copy.deepcopy(ours).train()}
    if not args.skip_compile:
        models["ours, torch.compile"] = torch.compile(copy.deepcopy(ours).train())
    rates, peak = train_rates(models, args.batch, args.seq, args.train_steps, config.vocab_size)
    print(f"fp32 matmul peak (4096^2, best of {3 + args.train_steps}, between the rounds): {peak / 1e9:.1f} GFLOP/s; "
          f"{flops / 1e6:.0f} MFLOP per token")
    base = rates["transformers Llama, eager (baseline)"]
    rows = [(name, f"{rate:.0f}", f"{rate / base:.2f}", f"{rate * flops / peak:.2f}") for name, rate in rates.items()]
    print(f"\ntraining, batch {args.batch} x {args.seq}, one AdamW step, best of {args.train_steps} interleaved rounds:")
    table(rows, ("model", "tokens/s", "vs Llama", "MFU"))

    # ---------------------------------------------------------------------------------------------- decoding
    del models  # the training copies and their optimizer states
    ours.eval()
    llama.eval()
    g = torch.Generator().manual_seed(1)
    prompt = [torch.randint(3, config.vocab_size, (32,), generator=g).tolist()]
    batch16 = [torch.randint(3, config.vocab_size, (32,), generator=g).tolist() for _ in range(16)]
    agreement_prompts = [torch.randint(3, config.vocab_size, (32,), generator=g).tolist() for _ in range(8)]
    # Each decoder prepared as the chat scripts prepare it (model/engine.py): products tuned for this CPU, then
    # --dtype bfloat16, --quantize int8 and --compile as asked. Every engine has its own copy of the weights.
    variants = {"fp32": {}, "bf16": {"dtype": torch.bfloat16},
                "int8": {"dtype": torch.bfloat16, "quantize": "int8"}, "batch16": {}}
    engines, compile_seconds = {}, {}
    for name, options in variants.items():
        for compiled in (False, True):
            model = copy.deepcopy(ours)
            if "dtype" in options:
                model = cast_model(model, options["dtype"])
            start = time.perf_counter()
            engines[name + (" compiled" if compiled else "")] = Engine(
                model, compile=compiled, tune=True, quantize=options.get("quantize"),
                rows=(16,) if name == "batch16" else (1,))
            if compiled:
                compile_seconds[name] = time.perf_counter() - start
    print("\nproducts tuned for this CPU (ms for one pass over the weights): " + "; ".join(
        f"{rows} row{'s' if rows > 1 else ''}: {choice} ({', '.join(f'{k} {v:.2f}' for k, v in times.items())})"
        for rows, (choice, times) in engines["fp32"].tuning.items()))
    runs = {"hf": lambda: hf_decode(llama, prompt, args.new_tokens)}
    for name, engine in engines.items():
        runs[name] = lambda engine=engine, name=name: our_decode(
            engine, batch16 if name.startswith("batch16") else prompt, args.new_tokens)[0]
    hf_decode(llama, prompt, 4)  # warm-up
    for name, engine in engines.items():
        our_decode(engine, batch16 if name.startswith("batch16") else prompt, 4)
    # Everything is measured once per round and the best round kept, bounds included: this machine's memory
    # bandwidth moves with its neighbours, and interleaving makes every row see the same weather.
    passes = {**weight_passes(ours), "mv bf16": weight_passes(ours, torch.bfloat16)["mv"],
              "int8 pass": weight_passes(ours, torch.int8)["mv"]}
    fp32_passes = [name for name in passes if name in ("mv", "x @ W", "two rows")]
    best = {name: 0.0 for name in runs}
    bounds = {name: 0.0 for name in passes}
    for _ in range(args.decode_rounds):
        for name, one_pass in passes.items():
            bounds[name] = max(bounds[name], 1 / best_time(one_pass, repeats=10, warmup=2))
        for name, run in runs.items():
            best[name] = max(best[name], run())
    _, ref_many = our_decode(ours, agreement_prompts, 64)  # the plain model, not prepared
    agree = {name: agreement(ref_many, our_decode(engines[name], agreement_prompts, 64)[1])
             for name in ("fp32", "fp32 compiled", "bf16", "bf16 compiled", "int8", "int8 compiled")}
    hf, bound = best["hf"], bounds["mv"]
    fastest = max(fp32_passes, key=bounds.get)
    strict = bounds[fastest]
    rows = [("transformers generate, fp32 (baseline)", f"{hf:.1f}", "1.00", f"{hf / bound:.0%}", f"{hf / strict:.0%}", "-")]
    for name, label in (("fp32", "ours, fp32"), ("fp32 compiled", "ours, fp32, compiled step"),
                        ("bf16", "ours, bf16 weights"), ("bf16 compiled", "ours, bf16 weights, compiled step"),
                        ("int8", "ours, int8 weights (torchao), bf16 activations"),
                        ("int8 compiled", "ours, int8 weights, bf16 activations, compiled step")):
        rate = best[name]
        if name.startswith("fp32"):
            of_bound = (f"{rate / bound:.0%}", f"{rate / strict:.0%}")
        elif name.startswith("bf16"):
            of_bound = (f"{rate / bounds['mv bf16']:.0%} of bf16 mv", "-")
        else:
            of_bound = (f"{rate / bounds['int8 pass']:.0%} of int8 pass", "-")
        rows.append((label, f"{rate:.1f}", f"{rate / hf:.2f}", *of_bound, f"{agree[name]:.0%}"))
    print(f"\ndecoding, batch 1, 32-token prompt, {args.new_tokens} new tokens, best of {args.decode_rounds} interleaved "
          f"rounds; one pass over all weights (fp32): " + ", ".join(f"{name} {bounds[name]:.1f}" for name in fp32_passes)
          + " passes/s; 'of mv bound' is torch.mv's, 'of fastest pass' the fastest of these:")
    table(rows, ("generator", "tokens/s", "vs transformers", "of mv bound", "of fastest pass",
                 "greedy agreement with the plain fp32 model"))
    print("compiling the decode step took " + ", ".join(f"{name} {t:.0f} s" for name, t in compile_seconds.items())
          + " (once per process and batch size; not in the timed runs)")
    print()
    for name, single in (("batch16", "fp32"), ("batch16 compiled", "fp32 compiled")):
        print(f"{name} (fp32): {best[name]:.1f} tokens/s in aggregate = {best[name] / best[single]:.1f}x "
              f"single-stream ({single})")

if __name__ == "__main__":
    main()
