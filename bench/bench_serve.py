"""The OpenAI-compatible server under load: requests/s, time to first token and tokens/s at 1, 4 and 16
concurrent streaming clients (1 client is the baseline).

    python bench/bench_serve.py [--ckpt out/demo/full_sft_256.safetensors] [--requests 32] [--max_tokens 64]

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
import time
from pathlib import Path

import httpx
from common import ROOT, machine, table


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


def one_request(url, i, max_tokens):
    body = {"model": "minimind", "messages": [{"role": "user", "content": f"Question {i}: what is the capital?"}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return first or (time.perf_counter() - start), time.perf_counter() - start, tokens


def load(url, clients, requests, max_tokens):
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one_request(url, i, max_tokens), range(requests)))
    wall = time.perf_counter() - start
    ttft = [r[0] for r in results]
    return requests / wall, statistics.median(ttft), max(ttft), sum(r[2] for r in results) / wall


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--max_tokens", type=int, default=64)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    ckpt, extra = args.ckpt, ["--context_length", "1024"]
    if ckpt is None:
        import torch

        from model.checkpoint import save_weights
        from model.LMConfig import preset_config
        from model.model import MiniMindLM

        torch.manual_seed(0)
        model = MiniMindLM(preset_config("minimind-v1-small"))
        ckpt = Path(tempfile.mkdtemp()) / "random_26m.safetensors"
        save_weights(ckpt, model.state_dict(), model.config)
    proc, url = start(ckpt, extra)
    try:
        one_request(url, -1, 4)  # warm-up
        rows, base = [], None
        for clients in (1, 4, 16):
            rps, ttft, worst, tps = load(url, clients, args.requests, args.max_tokens)
            base = base or rps
            rows.append((clients, f"{rps:.2f}", f"{rps / base:.2f}", f"{ttft * 1000:.0f}", f"{worst * 1000:.0f}",
                         f"{tps:.0f}"))
        print(f"\n{args.requests} streaming requests per level, {args.max_tokens} new tokens each, greedy:")
        table(rows, ("clients", "requests/s", "vs 1 client", "median TTFT ms", "worst TTFT ms", "tokens/s"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
