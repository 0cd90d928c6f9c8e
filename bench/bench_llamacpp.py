"""Our CPU decoding against llama.cpp on the same weights, precision by precision, in one run.

    python bench/bench_llamacpp.py [--preset minimind-v1-small] [--new_tokens 256] [--repeats 3] [--threads 2]

Random weights (seeded), batch 1, a 32-token prompt, greedy, EOS ignored, best of --repeats. llama.cpp gets this
project's own GGUF export (f32), quantized by llama.cpp's quantizer to F16, Q8_0 and Q4_0; we decode the same
weights with model/engine.py as the chat scripts prepare it (`--dtype`, `--quantize`, `--compile`). Each row also
prints the bound of that precision: the bytes one step must read (every weight matrix and the output head) over
this machine's read bandwidth, measured here. Agreement: the share of our greedy tokens that equal fp32's.

Needs llama-cpp-python (requirements-bench.txt); where it is not installed, says so in one line and stops.
"""
import argparse
import copy
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
              ("int4", "Q4_0", dict(dtype=torch.bfloat16, tune=True, quantize="int4"), 18 / 32),
              ("int4 compiled", "Q4_0", dict(dtype=torch.bfloat16, tune=True, compile=True, quantize="int4"), 18 / 32)]


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


def quantize_gguf(llama_cpp, src: Path, dst: Path, ftype: str, threads: int) -> Path:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize to {ftype}")
    return dst


def llamacpp_rate(llm, prompt, new_tokens) -> tuple[float, list]:
    start, out = time.perf_counter(), []
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        out.append(token)
        if len(out) == new_tokens:
            break
    return new_tokens / (time.perf_counter() - start), out


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
    print(llama_cpp.llama_print_system_info().decode().strip())
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
            files[ftype] = quantize_gguf(llama_cpp, f32, Path(tmp) / f"model-{ftype}.gguf", ftype, args.threads)
        theirs = {}
        for ftype, path in files.items():
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=args.threads,
                                  n_threads_batch=args.threads, verbose=False)
            llamacpp_rate(llm, prompt, 8)  # warm-up
            theirs[ftype] = max(llamacpp_rate(llm, prompt, args.new_tokens)[0] for _ in range(args.repeats))
            del llm
        for name, ftype, options, nbytes in PRECISIONS:
            bound = bandwidth / (step_weights(config) * nbytes)
            options = dict(options)
            dtype = options.pop("dtype", None)
            prepared = copy.deepcopy(model) if dtype is None else cast_model(copy.deepcopy(model), dtype)
            engine = Engine(prepared, rows=(1,), **options)
            our_rate(engine, prompt, 8)  # warm-up
            runs = [our_rate(engine, prompt, args.new_tokens) for _ in range(args.repeats)]
            ours, tokens = max(r[0] for r in runs), runs[0][1]
            reference = tokens if reference is None else reference
            rows.append([name, ftype, f"{theirs[ftype]:.0f}", f"{ours:.0f}", f"{ours / theirs[ftype]:.2f}x",
                         f"{bound:.0f}", f"{agreement(tokens, reference):.0%}",
                         f"{min(r[0] for r in runs) / ours:.2f}"])
    print(f"\ndecode tok/s, batch 1, {len(prompt)}-token prompt, {args.new_tokens} new tokens, best of {args.repeats}")
    print(table(rows, ["ours", "llama.cpp", "llama.cpp tok/s", "ours tok/s", "ours / llama.cpp",
                       "bound tok/s", "agrees with fp32", "worst / best"]))


if __name__ == "__main__":
    main()
