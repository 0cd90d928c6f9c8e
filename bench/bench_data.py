"""`data_process.py pretrain` throughput and memory on generated {"text"} jsonl files.

    python bench/bench_data.py [--small_mb 100] [--large_mb 400]

Throughput: all cores against one worker (baseline) on the small file, MB/s and the ratio. Memory: the peak
resident memory of the whole process tree (main process and workers) for the small and the large file; flat
memory means the larger input costs about the same.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from common import ROOT, machine

from model.demo_corpus import DemoWorld


def make_jsonl(path: Path, megabytes: int, seed: int = 0):
    """Realistic-length documents (a few hundred to a few thousand characters), bilingual, until the size."""
    world, rng = DemoWorld(seed=seed), random.Random(seed)
    sentences = world.sentences("en") + world.sentences("zh")
    target = megabytes * 1024 * 1024
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < target:
            doc = " ".join(rng.choice(sentences) for _ in range(rng.randint(5, 60)))
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")


def run(input_path: Path, out_dir: Path, tokenizer: Path, workers: int) -> tuple[float, float]:
    """(seconds, peak RSS of the process tree in MB) of one data_process.py pretrain run."""
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "data_process.py"), "pretrain", "--input", str(input_path), "--out_dir",
           str(out_dir), "--tokenizer", str(tokenizer), "--workers", str(workers)]
    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc] + proc.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed")
    return seconds, peak / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small_mb", type=int, default=100)
    parser.add_argument("--large_mb", type=int, default=400)
    parser.add_argument("--tokenizer", default=str(ROOT / "model" / "minimind_tokenizer"))
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    small, large = work / f"text_{args.small_mb}mb.jsonl", work / f"text_{args.large_mb}mb.jsonl"
    for path, mb in ((small, args.small_mb), (large, args.large_mb)):
        if not path.exists():
            make_jsonl(path, mb)
    size = small.stat().st_size / 2**20
    cores = os.cpu_count() or 1
    one_s, one_mem = run(small, work / "out1", args.tokenizer, 1)
    all_s, all_mem = run(small, work / "outN", args.tokenizer, cores)
    big_s, big_mem = run(large, work / "outL", args.tokenizer, cores)
    print(f"\n{size:.0f} MB input, throughput:")
    print(f"  1 worker (baseline): {size / one_s:6.2f} MB/s ({one_s:.1f} s)")
    print(f"  {cores} workers:           {size / all_s:6.2f} MB/s ({all_s:.1f} s) = {one_s / all_s:.2f}x the baseline")
    print(f"\npeak memory of the process tree with {cores} workers:")
    print(f"  {args.small_mb} MB input: {all_mem:.0f} MB")
    print(f"  {args.large_mb} MB input: {big_mem:.0f} MB = {big_mem / all_mem:.2f}x the {args.small_mb} MB run "
          f"({large.stat().st_size / 2**20 / big_s:.2f} MB/s)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
