"""Training throughput of the real training loop (1-pretrain.py's Trainer) and its MFU.

    python bench/bench_train.py [--preset minimind-v1-small] [--seq 512] [--batch 8] [--steps 6]
    python bench/bench_train.py --device cuda --preset minimind-v1 --dtype bfloat16 --batch 32 --steps 50

Runs the loop eager and with --compile on random token shards and reports tokens/s (steady state: the first
steps, which include compilation, are left out) and MFU: model FLOP/s over the best matmul rate of a 4096^2
product in the training precision, measured in the same run (the eager run is the baseline).
"""
import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import ROOT, machine, matmul_peak, table, train_flops_per_token


def random_shards(folder: Path, tokens: int, vocab: int):
    folder.mkdir(parents=True, exist_ok=True)
    np.random.default_rng(0).integers(3, vocab, tokens, dtype=np.uint16).tofile(folder / "train_000.bin")
    index = {"format": "minimind-tokens-v1", "dtype": "uint16", "eos_id": 2, "vocab_size": vocab,
             "train": [{"file": "train_000.bin", "tokens": tokens}], "val": []}
    (folder / "index.json").write_text(json.dumps(index))


def run(args, data: Path, out: Path, compile_: bool) -> float:
    spec = importlib.util.spec_from_file_location("pretrain", ROOT / "1-pretrain.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--data_path", str(data), "--out_dir", str(out), "--preset", args.preset, "--max_seq_len", str(args.seq),
            "--batch_size", str(args.batch), "--max_steps", str(args.steps), "--log_interval", "1", "--save_interval",
            "0", "--device", args.device, "--dtype", args.dtype, "--quiet", "--warmup_iters", "1"]
    script.main(argv + (["--compile"] if compile_ else []))
    rows = [json.loads(line) for line in open(out / f"pretrain_{script_dim(args)}" / "metrics.jsonl")]
    steady = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][args.skip:]
    return float(np.median(steady))


def script_dim(args):
    from model.LMConfig import preset_config

    cfg = preset_config(args.preset)
    return f"{cfg.dim}" + ("_moe" if cfg.use_moe else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind-v1-small")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip", type=int, default=2, help="first steps left out (warm-up, compilation)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip_compile", action="store_true")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    from model.LMConfig import preset_config

    config = preset_config(args.preset, max_seq_len=args.seq)
    peak_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    peak = matmul_peak(dtype=peak_dtype, device=args.device.split(":")[0])
    flops = train_flops_per_token(config, args.seq)
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    random_shards(work / "data", args.batch * args.seq * (args.steps + 2) * 2, config.vocab_size)
    rows = []
    eager = run(args, work / "data", work / "eager", False)
    rows.append(("eager (baseline)", f"{eager:.0f}", "1.00", f"{eager * flops / peak:.2f}"))
    if not args.skip_compile:
        compiled = run(args, work / "data", work / "compiled", True)
        rows.append(("--compile", f"{compiled:.0f}", f"{compiled / eager:.2f}", f"{compiled * flops / peak:.2f}"))
    print(f"\n{args.preset}, batch {args.batch} x {args.seq}, {args.dtype} on {args.device}; "
          f"{args.dtype} matmul peak {peak / 1e12:.3f} TFLOP/s; {flops / 1e6:.0f} MFLOP per token")
    table(rows, ("training loop", "tokens/s", "vs eager", "MFU"))


if __name__ == "__main__":
    main()
