"""A decode step's attention in its two layouts, on this machine's device: the model's grouped-query attention
(one SDPA call with `enable_gqa` and the step's mask; baseline) against the engine's `DecodeAttention` (the query
heads that share a kv head as rows of a plain attention over it).

    python bench/bench_decode_attention.py [--device cuda] [--dtype bfloat16] [--rows 1,16] [--keys 512]

Random weights (seeded), the attention modules of minimind-v1-small alone, every row --keys long. Prints each
layout's time per step and the ratio to the baseline, and the largest difference between the two outputs; exits
1 where they disagree beyond the dtype's rounding. bench/gpu_check.py runs it on CUDA, where the baseline's mask
leaves SDPA only its math kernel.
"""
import argparse
import sys

import torch
from common import best_time, machine, table

from model import quiet_third_party

quiet_third_party()  # before transformers loads: its import-time notices mean nothing to a user

from model.engine import DecodeAttention
from model.LMConfig import preset_config
from model.model import Attention


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rows", default="1,16", help="rows decoded together, comma-separated")
    parser.add_argument("--keys", type=int, default=512, help="cached keys each row attends to")
    parser.add_argument("--preset", default="minimind-v1-small")
    args = parser.parse_args()
    print(f"machine: {machine()}; device {args.device}, {args.dtype}")
    torch.manual_seed(0)
    config = preset_config(args.preset)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    attention = Attention(config, 0).to(device, dtype).eval()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    results, worst = [], 0.0
    with torch.inference_mode():
        for n in map(int, args.rows.split(",")):
            q = torch.randn(n, config.n_heads, 1, config.head_dim, device=device, dtype=dtype)
            k = torch.randn(n, config.n_kv_heads, args.keys, config.head_dim, device=device, dtype=dtype)
            v = torch.randn_like(k)
            mask = torch.zeros(n, 1, 1, args.keys, device=device, dtype=dtype)
            mask[: n // 2, ..., : args.keys // 4] = float("-inf")  # half the rows padded on the left, as in a batch
            outputs, times = {}, {}
            for name, cls in (("grouped-query SDPA with a mask (baseline)", Attention),
                              ("DecodeAttention", DecodeAttention)):
                attention.__class__ = cls
                outputs[name] = attention.attend(q, k, v, mask)
                times[name] = best_time(lambda: attention.attend(q, k, v, mask), repeats=5, warmup=2, sync=sync)
            base, fast = outputs.values()
            worst = max(worst, (base.float() - fast.float()).abs().max().item())
            baseline = next(iter(times.values()))
            results += [(str(n), name, f"{t * 1e6:.1f}", f"{baseline / t:.2f}x") for name, t in times.items()]
    table(results, ("rows", "layout", "us per layer", "speed vs baseline"))
    print(f"\nlargest difference between the layouts: {worst:.2e} (tolerance {tolerance:g})")
    if worst > tolerance:
        sys.exit(1)


if __name__ == "__main__":
    main()
