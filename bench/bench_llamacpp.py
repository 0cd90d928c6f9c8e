"""Our CPU decoding against llama.cpp on the same weights, precision by precision, in one run.

    python bench/bench_llamacpp.py [--preset minimind-v1-small] [--new_tokens 256] [--repeats 3] [--threads 2]

Random weights (seeded), batch 1, a 32-token prompt, greedy, EOS ignored, best of --repeats. llama.cpp gets this
project's own GGUF export (f32), quantized by llama.cpp's quantizer to F16, Q8_0 and Q4_0; we decode the same
weights with model/engine.py as the chat scripts prepare it (`--dtype`, `--quantize`, `--compile`), llama.cpp's
file measured just before ours in each row (the speed of a shared machine drifts over minutes). Each row also
prints the bound of that precision: the bytes one step must read (every weight matrix and the output head) over
this machine's read bandwidth, measured here. Agreement: the share of our greedy tokens that equal fp32's (random
weights repeat a token, so it shows breakage, not closeness).

Needs llama-cpp-python (requirements-bench.txt); where it is not installed, says so in one line and stops.
"""
import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import machine, table

from model import quiet_third_party

quiet_third_party()  # before transformers loads: its import-time notices mean nothing to a user

from model.engine import Engine
from model.export import export_gguf
from model.generate import SamplingParams, generate_ids
from model.LMConfig import preset_config
from model.loading import cast_model
from model.model import MiniMindForCausalLM
from model.tokenizer import load_tokenizer

# (our row, llama.cpp's file type, our engine's options, bytes per weight)
PRECISIONS = [("fp32", "F32", dict(tune=True), 4.0),
              ("fp32 compiled", "F32", dict(tune=True, compile=True), 4.0),
              ("bf16 compiled", "F16", dict(dtype=torch.bfloat16, tune=True, compile=True), 2.0),
              ("int8 compiled", "Q8_0", dict(dtype=torch.bfloat16, tune=True, compile=True, quantize="int8"), 34 / 32),
              # int4 products take bf16 in and out themselves; the rest of the step is faster in fp32 on CPU
              ("int4", "Q4_0", dict(tune=True, quantize="int4"), 18 / 32),
              ("int4 compiled", "Q4_0", dict(tune=True, compile=True, quantize="int4"), 18 / 32)]


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s of one pass reading a buffer far larger than the caches (a sum: reads only)."""
    x = torch.ones(mib * 2**18)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def step_weights(config) -> int:
    """Numbers one decode step reads: the weight matrices and the (tied) output head; the embedding lookup is a row."""
    attention = 2 * config.dim * (config.n_heads + config.n_kv_heads) * config.head_dim
    per_layer = attention + 3 * config.dim * config.hidden_dim
    return config.n_layers * per_layer + config.vocab_size * config.dim


QUANTIZE = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
params.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


def quantize_gguf(src: Path, dst: Path, ftype: str, threads: int) -> Path:
    """llama.cpp's own quantizer (what its llama-quantize tool runs), in a process of its own: it logs every tensor,
    and a Llama loaded after it in the same process crashed."""
    done = subprocess.run([sys.executable, "-c", QUANTIZE, str(src), str(dst), ftype, str(threads)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp could not quantize to {ftype}: {done.stderr[-500:]}")
    return dst


LLAMACPP_RATE = """
import json, sys, time, llama_cpp
path, threads, repeats, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
prompt = json.loads(sys.argv[5])
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
def run(n):
    start, out = time.perf_counter(), []
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        out.append(token)
        if len(out) == n:
            break
    return n / (time.perf_counter() - start)
run(8)  # warm-up
print(json.dumps(max(run(new_tokens) for _ in range(repeats))))
llm.close()
"""


def llamacpp_rate(path: Path, prompt, new_tokens, repeats, threads) -> float | str:
    """Best tokens/s of llama.cpp on one file, in a process of its own (in this one, beside torch's threads, its
    first decode crashed), or why there is none."""
    done = subprocess.run([sys.executable, "-c", LLAMACPP_RATE, str(path), str(threads), str(repeats),
                           str(new_tokens), json.dumps(prompt)], capture_output=True, text=True)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return f"failed: {last[0][:60]}"
    return float(done.stdout.strip().splitlines()[-1])


def our_rate(engine, prompt, new_tokens) -> tuple[float, list]:
    params = SamplingParams(max_new_tokens=new_tokens)
    start = time.perf_counter()
    out = [int(t) for t in generate_ids(engine, [prompt], params, eos_token_id=-1)]
    return new_tokens / (time.perf_counter() - start), out


def agreement(tokens, reference) -> float:
    return sum(a == b for a, b in zip(tokens, reference)) / len(reference)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind-v1-small")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("bench_llamacpp: llama_cpp is not installed (pip install -r requirements-bench.txt); nothing measured")
        return
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; {args.threads} threads; llama-cpp-python {llama_cpp.__version__}")
    torch.manual_seed(0)
    config = preset_config(args.preset)
    model = MiniMindForCausalLM(config).eval()
    tokenizer = load_tokenizer(Path(__file__).resolve().parents[1] / "model" / "minimind_tokenizer")
    prompt = torch.randint(3, config.vocab_size, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    bandwidth = read_bandwidth()
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s; one step reads {step_weights(config) / 1e6:.1f}M weights")

    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        f32 = export_gguf(model, tokenizer, Path(tmp) / "model-f32.gguf")
        files = {"F32": f32}
        for ftype in ("F16", "Q8_0", "Q4_0"):
            files[ftype] = quantize_gguf(f32, Path(tmp) / f"model-{ftype}.gguf", ftype, args.threads)
        for name, ftype, options, nbytes in PRECISIONS:
            bound = bandwidth / (step_weights(config) * nbytes)
            options = dict(options)
            dtype = options.pop("dtype", None)
            prepared = copy.deepcopy(model) if dtype is None else cast_model(copy.deepcopy(model), dtype)
            engine = Engine(prepared, rows=(1,), **options)
            our_rate(engine, prompt, 8)  # warm-up
            # llama.cpp just before ours, row by row: a shared machine's speed drifts over minutes
            ref = llamacpp_rate(files[ftype], prompt, args.new_tokens, args.repeats, args.threads)
            runs = [our_rate(engine, prompt, args.new_tokens) for _ in range(args.repeats)]
            ours, tokens = max(r[0] for r in runs), runs[0][1]
            reference = tokens if reference is None else reference
            rows.append([name, ftype, ref if isinstance(ref, str) else f"{ref:.0f}", f"{ours:.0f}",
                         "-" if isinstance(ref, str) else f"{ours / ref:.2f}x",
                         f"{bound:.0f}", f"{agreement(tokens, reference):.0%}",
                         f"{min(r[0] for r in runs) / ours:.2f}"])
    print(f"\ndecode tok/s, batch 1, {len(prompt)}-token prompt, {args.new_tokens} new tokens, best of {args.repeats}")
    table(rows, ["ours", "llama.cpp", "llama.cpp tok/s", "ours tok/s", "ours / llama.cpp", "bound tok/s",
                 "agrees with fp32", "worst / best"])


if __name__ == "__main__":
    main()
