"""The OpenAI-compatible server under load: requests/s, aggregate tokens/s and time to first token (median, p90)
at 1, 4, 16 and 32 concurrent streaming clients, for continuous batching (the server's default, --max_batch 16)
against one request at a time (--max_batch 1, the baseline), measured one after the other in the same run.

    python bench/bench_serve.py [--ckpt out/demo/full_sft_256.safetensors] [--requests 64] [--max_tokens 64]

Without --ckpt it serves a randomly initialised minimind-v1-small (26M) with the default tokenizer.
"""
import argparse
import concurrent.futures
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import ROOT, machine, table

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing here


def start(ckpt, extra):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "my_openai_api.py"), "--ckpt", str(ckpt), "--port", str(port),
                             "--device", "cpu", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


# One client for every request, its connections kept open (as a load generator's session): creating a client and
# a connection per request costs milliseconds of the two cores the server needs too.
HTTP = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))


def one_request(url, i, max_tokens):
    body = {"model": "minimind", "messages": [{"role": "user", "content": f"Question {i}: what is the capital?"}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    with HTTP.stream("POST", url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return first or (time.perf_counter() - start), time.perf_counter() - start, tokens


def answer_length(i: int, mean: int) -> int:
    """Request i's max_tokens: from half to one and a half times the mean, spread evenly. Answers of one length
    would all end in the same step and come back as one burst (as no real load does)."""
    return mean // 2 + (i * 37) % (mean + 1)


def load(url, clients, requests, max_tokens):
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one_request(url, i, answer_length(i, max_tokens)), range(requests)))
    wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    return {"rps": requests / wall, "ttft": statistics.median(ttft), "p90": ttft[int(0.9 * (len(ttft) - 1))],
            "tps": sum(r[2] for r in results) / wall}


def burst(url, clients, max_tokens):
    """Median time to first token of `clients` streams sent at the same instant, and of one stream alone (the
    median of as many, one after another)."""
    gate = threading.Barrier(clients)

    def together(i):
        gate.wait()
        return one_request(url, i, max_tokens)[0]

    alone = statistics.median(one_request(url, i, max_tokens)[0] for i in range(clients))
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        burst = statistics.median(pool.map(together, range(clients)))
    return alone, burst


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--max_tokens", type=int, default=64, help="the mean answer length (from half to 1.5x)")
    parser.add_argument("--clients", default="1,4,16,32")
    parser.add_argument("--dtype", default="float32", help="the servers' --dtype (bfloat16: bf16 weights)")
    parser.add_argument("--burst", type=int, default=16, help="streams that arrive at once, for the burst's TTFT")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    ckpt = args.ckpt
    if ckpt is None:
        import torch

        from model.checkpoint import save_weights
        from model.LMConfig import preset_config
        from model.model import MiniMindForCausalLM

        torch.manual_seed(0)
        model = MiniMindForCausalLM(preset_config("minimind-v1-small"))
        ckpt = Path(tempfile.mkdtemp()) / "random_26m.safetensors"
        save_weights(ckpt, model.state_dict(), model.config)
    levels = [int(c) for c in args.clients.split(",")]
    results = {}
    for name, extra in (("one at a time (--max_batch 1, baseline)", ["--max_batch", "1"]),
                        ("continuous batching (--max_batch 16)", ["--max_batch", "16"])):
        proc, url = start(ckpt, ["--context_length", "1024", "--max_queue", "256", "--dtype", args.dtype, *extra])
        try:
            one_request(url, -1, 4)  # warm-up
            results[name] = {clients: load(url, clients, args.requests, args.max_tokens) for clients in levels}
            if "continuous" in name:
                bursts = [burst(url, args.burst, 32) for _ in range(3)]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\n{args.requests} streaming requests per level, {args.max_tokens // 2}-{args.max_tokens * 3 // 2} new tokens "
          f"each (mean {args.max_tokens}), greedy, {args.dtype}:")
    rows = []
    for name, by_level in results.items():
        single = by_level[levels[0]]
        for clients, r in by_level.items():
            rows.append((name, clients, f"{r['rps']:.2f}", f"{r['tps']:.0f}", f"{r['tps'] / single['tps']:.1f}",
                         f"{r['ttft'] * 1000:.0f}", f"{r['p90'] * 1000:.0f}", f"{r['ttft'] / single['ttft']:.1f}"))
    table(rows, ("server", "clients", "requests/s", "tokens/s", f"tokens/s vs {levels[0]} client",
                 "median TTFT ms", "p90 TTFT ms", f"median TTFT vs {levels[0]} client"))
    print(f"\n{args.burst} streams arriving at once (32 new tokens each), continuous batching, three bursts:")
    table([(f"{alone * 1000:.0f}", f"{together * 1000:.0f}", f"{together / alone:.1f}") for alone, together in bursts],
          ("median TTFT alone ms (baseline)", f"median TTFT in the burst of {args.burst} ms", "burst vs alone"))


if __name__ == "__main__":
    main()
