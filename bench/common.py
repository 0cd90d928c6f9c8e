"""Helpers shared by the benchmarks: the machine's matmul peak, model FLOPs, timing, a printed table."""
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}")


def best_time(fn, repeats=3, warmup=1, sync=None) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak(n=4096, dtype=torch.float32, device="cpu", repeats=3) -> float:
    """FLOP/s of the best of `repeats` n x n @ n x n products: the machine's practical peak for that dtype."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else None
    return 2 * n ** 3 / best_time(lambda: a @ b, repeats, sync=sync)


def weight_passes(model, dtype=torch.float32) -> dict:
    """One pass over as many numbers as the model has weights, as one product (what a decode step would cost if
    that were all it did): {"mv": torch.mv on the usual (out, in) layout, the weight-streaming bound} and, for
    fp32, {"x @ W": the (in, out) layout, which some CPUs' fp32 GEMV streams faster, "two rows": a two-row product,
    which others' BLAS runs faster than its GEMV}; for int8, "mv" is torch's
    int8-weight kernel with bf16 activations (what --quantize int8 compiles to). Callables, so a
    benchmark can time them between its other measurements."""
    n = sum(p.numel() for p in model.parameters())
    cols = model.config.dim
    if dtype == torch.int8:  # the kernel of our int8 option: int8 weights, a scale per row, bf16 activations
        w8 = torch.randint(-128, 128, (n // cols, cols), dtype=torch.int8)
        scales, x16 = torch.rand(n // cols, dtype=torch.bfloat16), torch.randn(1, cols, dtype=torch.bfloat16)
        return {"mv": lambda: torch._weight_int8pack_mm(x16, w8, scales)}
    w = torch.randn(n // cols, cols, dtype=dtype)
    x = torch.randn(cols, dtype=dtype)
    passes = {"mv": lambda: torch.mv(w, x)}
    if dtype == torch.float32:
        w_in_out, two = w.t().contiguous(), torch.randn(2, cols)
        passes["x @ W"] = lambda: x @ w_in_out
        passes["two rows"] = lambda: w @ two.T  # what the engine's `padded` product costs (model/engine.py)
    return passes


def train_flops_per_token(config, seq_len: int) -> float:
    """6 N for the weight matmuls (forward + backward; the tied embedding is counted once, as the output head)
    plus 12 L T d for attention scores and values (PaLM's accounting)."""
    n = config.dim * config.vocab_size  # output head
    per_layer = 2 * config.dim * config.n_heads * config.head_dim + 2 * config.dim * config.n_kv_heads * config.head_dim
    ffn = 3 * config.dim * config.hidden_dim
    if config.use_moe:  # active experts only
        ffn = ffn * (config.num_experts_per_tok + config.n_shared_experts) + config.dim * config.n_routed_experts
    n += config.n_layers * (per_layer + ffn)
    return 6 * n + 12 * config.n_layers * seq_len * config.dim


def table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def copy_bench_arguments(doc: str, steps: int, threads: int):
    """The copy benchmarks' command line: --steps, --every (how often to measure), --threads, --seed."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def train_on_rows(model, next_rows, steps: int, every: int, measure):
    """The copy benchmarks' training: AdamW lr 2e-3 with a 20-step warm-up, gradients clipped at 1.0, on
    next_rows() -> (batch, T + 1) token ids; measure(model) every `every` steps. ({step: measure}, seconds)."""
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    curve, start = {}, time.perf_counter()
    for step in range(1, steps + 1):
        x = next_rows()
        loss = F.cross_entropy(model(input_ids=x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        warmup.step()
        if step % every == 0:
            curve[step] = measure(model)
    return curve, time.perf_counter() - start
