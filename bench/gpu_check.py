"""The GPU check: every path a GPU user takes, on a tiny model and the demo data, then the 108M preset's training
throughput and MFU. One command, a few minutes on one GPU:

    python bench/gpu_check.py [--json out/gpu_check.json] [--jobs 4] [--peak_tflops 989] [--only ROW,...]

Each row runs the real scripts as subprocesses with a timeout, up to --jobs rows at a time (the throughput row runs
alone, at the end), and reports PASS, FAIL or SKIP (a row it needs failed), its seconds and its error's last line.
The table is printed and written with every figure to the JSON; each row's output is kept in a log folder when a
row fails. Exit status 1 if a row failed. Without CUDA it says so in one line and exits 0; --rehearse_on_cpu runs
the same rows on the CPU instead (gloo for nccl, a small throughput row): slow, for working on this script.
"""
import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model.distributed import free_port  # noqa: E402
from model.io import atomic_writer  # noqa: E402

PY = sys.executable
TINY = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--vocab_size", "600",
        "--max_seq_len", "64"]
# Dense bf16 tensor-core peaks from NVIDIA's data sheets, by a part of the device name; others are measured.
PEAKS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]
TARGET_MFU = 0.40


class Failed(Exception):
    """A row's command failed or its result was wrong; the message is the line the table shows."""


def last_line(output: str) -> str:
    """The line that says what went wrong: a script's 'error: ...', else an exception's last line, else the last."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    exceptions = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line)
                  and "ChildFailedError" not in line]
    return (errors or exceptions or lines or ["(no output)"])[-1][:240]


class Check:
    """The rows and what they share: the work folder, the device, the logs."""

    def __init__(self, work: Path, device: str, nproc: int = 1):
        self.work, self.device, self.nproc = work, device, nproc
        self.tok = work / "tokenizer"
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def run(self, name: str, cmd: list, timeout: int, expect: int = 0) -> str:
        """A command in the repository (its whole process group ended on timeout); its output, or Failed."""
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            self.keep_log(name, cmd, out)
            raise Failed(f"timed out after {timeout} s: {last_line(out)}") from None
        self.keep_log(name, cmd, out)
        if proc.returncode != expect:
            raise Failed(f"exit status {proc.returncode}: {last_line(out)}")
        return out

    def keep_log(self, name, cmd, out):
        with open(self.work / "logs" / f"{name}.log", "a") as f:
            f.write(f"$ {' '.join(map(str, cmd))}\n{out}\n")

    def train(self, script: str, out: str, *flags, launcher=()) -> list:
        return [*launcher, script, "--out_dir", self.work / out, "--tokenizer", self.tok, "--device", self.device,
                "--quiet", "--save_interval", "0", "--log_interval", "5", *flags]

    def pretrain(self, out: str, *flags, launcher=()) -> list:
        return self.train("1-pretrain.py", out, "--data_path", self.work / "tokens", *TINY, "--batch_size", "16",
                          "--learning_rate", "3e-3", "--warmup_iters", "2", *flags, launcher=launcher)

    def torchrun(self):
        return [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(self.nproc), "--master_port", free_port()]

    def trained(self, out: str, run: str, output: str) -> list:
        """The run's logged losses, after checking that it wrote its output and that every loss is finite."""
        if not (self.work / out / output).exists():
            raise Failed(f"no {output} written")
        rows = map(json.loads, open(self.work / out / run / "metrics.jsonl"))
        losses = [row["loss"] for row in rows if "loss" in row]
        if not losses or not all(math.isfinite(x) for x in losses):
            raise Failed(f"losses {losses[:3]}...: none, or not all finite")
        return losses

    @property
    def backend(self):
        return "nccl" if self.device == "cuda" else "gloo"

    @property
    def sft(self):
        return self.work / "run" / "full_sft_64.safetensors"

    # ------------------------------------------------------------------------------------------------------ rows
    def data(self):
        data = self.work / "data"
        self.run("data", [PY, "data_process.py", "demo", "--out_dir", data, "--pretrain_repeats", "3"], 120)
        self.run("data", [PY, "train_tokenizer.py", "--data", data / "tokenizer_train.jsonl", "--vocab_size", "600",
                          "--out_dir", self.tok], 180)
        self.run("data", [PY, "data_process.py", "pretrain", "--input", data / "pretrain_data.jsonl", "--out_dir",
                          self.work / "tokens", "--tokenizer", self.tok, "--val_every", "50", "--workers", "2"], 180)

    def pretrain_bf16_compiled(self):
        self.run("pretrain", [PY, *self.pretrain("run", "--dtype", "bfloat16", "--compile", "--max_steps", "40")], 400)
        losses = self.trained("run", "pretrain_64", "pretrain_64.safetensors")
        if not sum(losses[-2:]) < sum(losses[:2]):
            raise Failed(f"the loss did not fall: {losses}")

    def moe_bf16_compiled(self):
        """MoE in bf16 takes torch._grouped_mm (no host sync, one graph): CUDA's kernel and its alignment here."""
        self.run("moe", [PY, *self.pretrain("moe", "--use_moe", "--dtype", "bfloat16", "--compile", "--max_steps",
                                            "20")], 400)
        losses = self.trained("moe", "pretrain_64_moe", "pretrain_64_moe.safetensors")
        if not sum(losses[-2:]) < sum(losses[:2]):
            raise Failed(f"the loss did not fall: {losses}")

    def fp16(self):
        self.run("fp16", [PY, *self.pretrain("fp16", "--dtype", "float16", "--max_steps", "2", "--log_interval", "1")],
                 180)
        self.trained("fp16", "pretrain_64", "pretrain_64.safetensors")

    def sft_stage(self):
        pretrained = self.work / "run" / "pretrain_64.safetensors"
        self.run("sft", [PY, *self.train("3-full_sft.py", "run", "--init_from", pretrained, "--data_path",
                                         self.work / "data" / "sft_data.jsonl", "--max_seq_len", "64",
                                         "--batch_size", "8", "--max_steps", "10", "--freeze_embeddings")], 180)
        self.trained("run", "full_sft_64", "full_sft_64.safetensors")

    def lora(self):
        self.run("lora", [PY, *self.train("4-lora_sft.py", "run", "--ckpt", self.sft, "--data_path",
                                          self.work / "data" / "sft_data.jsonl", "--max_seq_len", "64",
                                          "--batch_size", "8", "--max_steps", "6", "--lora_rank", "4", "--merge")], 180)
        self.trained("run", "lora_sft_64", "lora_sft_64_merged.safetensors")

    def dpo(self, lora: bool):
        out = "dpo_lora" if lora else "run"
        self.run(out, [PY, *self.train("5-dpo_train.py", out, "--ckpt", self.sft, "--data_path",
                                       self.work / "data" / "dpo_data.jsonl", "--max_seq_len", "64", "--batch_size",
                                       "4", "--max_steps", "6", *(["--lora_rank", "4"] if lora else []))], 180)
        self.trained(out, "dpo_64", "dpo_64_merged.safetensors" if lora else "dpo_64.safetensors")

    def launched(self, name: str, describes: str, *flags, launcher):
        out = self.run(name, self.pretrain(name, "--max_steps", "6", *flags, launcher=launcher), 240)
        processes = f"{self.nproc} process" + ("es" if self.nproc > 1 else "")
        if f"{describes} over {processes} ({self.backend})" not in out:
            raise Failed(f"the run did not say it used {describes} over {self.backend}")
        self.trained(name, "pretrain_64", "pretrain_64.safetensors")

    def deepspeed(self):
        launcher = [PY, "-m", "deepspeed.launcher.runner", "--num_gpus", str(self.nproc), "--master_port", free_port()]
        self.launched("deepspeed", "DeepSpeed ZeRO-2", "--deepspeed", "ds_config.json", "--save_interval", "3",
                      launcher=launcher)
        if not (self.work / "deepspeed" / "pretrain_64" / "checkpoints" / "step_00000006" / "deepspeed").is_dir():
            raise Failed("no DeepSpeed state inside checkpoints/step_00000006")

    def kill_and_resume(self):
        cmd = [PY, *self.pretrain("resume", "--max_steps", "400", "--save_interval", "20", "--log_interval", "20")]
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        first = self.work / "resume" / "pretrain_64" / "checkpoints" / "step_00000040"
        deadline = time.time() + 240
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not first.exists():
            raise Failed("the first run wrote no checkpoint at step 40")
        out = self.run("resume", [*cmd, "--resume", "auto"], 240)
        resumed = re.search(r"resumed from .* at step (\d+)", out)
        if not resumed or not 40 <= int(resumed.group(1)) < 400:
            raise Failed(f"did not resume from a checkpoint between steps 40 and 400: {last_line(out)}")
        self.trained("resume", "pretrain_64", "pretrain_64.safetensors")

    def grpo_prompts(self) -> Path:
        prompts = self.work / "grpo_prompts.jsonl"
        if not prompts.exists():
            with open(self.work / "data" / "held_out.jsonl") as f, atomic_writer(prompts, "w") as out:
                for line in f:
                    row = json.loads(line)
                    out.write(json.dumps({"prompt": row["question"], "answer": row["answer"]}, ensure_ascii=False)
                              + "\n")
        return prompts

    def grpo(self, *flags, out="run"):
        self.run(out, [PY, *self.train("6-grpo_train.py", out, "--ckpt", self.sft, "--data_path",
                                       self.grpo_prompts(), "--reward", "exact_match", "--num_generations", "4",
                                       "--batch_size", "4", "--max_new_tokens", "16", "--max_steps", "4",
                                       "--iterations", "2", "--beta", "0.04", *flags)], 400)
        self.trained(out, "grpo_64", "grpo_64.safetensors")

    def fsdp_grpo(self):
        """GRPO under FSDP2 with greedy validation: rollouts sample from a gathered copy (ranks whose completions end
        at different steps must not issue different numbers of collectives)."""
        prompts = self.grpo_prompts()
        self.run("fsdp_grpo", self.train("6-grpo_train.py", "fsdp_grpo", "--strategy", "fsdp", "--ckpt", self.sft,
                                         "--data_path", prompts, "--val_path", prompts, "--eval_interval", "2",
                                         "--reward", "exact_match", "--num_generations", "4", "--batch_size", "4",
                                         "--max_new_tokens", "16", "--max_steps", "4", "--beta", "0.04",
                                         launcher=self.torchrun()), 300)
        self.trained("fsdp_grpo", "grpo_64", "grpo_64.safetensors")

    def fsdp_lora(self):
        """LoRA under FSDP2, its adapter and merged model written from the gathered state."""
        self.run("fsdp_lora", self.train("4-lora_sft.py", "fsdp_lora", "--strategy", "fsdp", "--ckpt", self.sft,
                                         "--data_path", self.work / "data" / "sft_data.jsonl", "--max_seq_len", "64",
                                         "--batch_size", "8", "--max_steps", "4", "--lora_rank", "4", "--merge",
                                         launcher=self.torchrun()), 300)
        self.trained("fsdp_lora", "lora_sft_64", "lora_sft_64_merged.safetensors")

    def distill(self, *flags, out="run"):
        self.run(out, [PY, *self.train("7-distill.py", out, "--teacher", self.sft, "--init_from",
                                       self.work / "run" / "pretrain_64.safetensors", "--data_path",
                                       self.work / "data" / "sft_data.jsonl", "--max_seq_len", "64",
                                       "--batch_size", "8", "--max_steps", "6", *flags)], 400)
        self.trained(out, "distill_64", "distill_64.safetensors")

    def generate(self, *flags):
        out = self.run("generate", [PY, "2-eval.py", "--ckpt", self.sft, "--device", self.device, "--prompt",
                                    "What is the capital of France?", "--max_new_tokens", "16", "--temperature", "0",
                                    *flags], 240)
        if "🤖: " not in out:
            raise Failed(f"no answer printed: {last_line(out)}")

    def decode_attention(self):
        """The engine's decode attention layout against the model's, on this device (bench_decode_attention.py)."""
        dtype = "float32" if self.device == "cpu" else "bfloat16"
        out = self.run("decode_attention", [PY, "bench/bench_decode_attention.py", "--device", self.device,
                                            "--dtype", dtype], 240)
        print(out[out.index("| rows"):].rstrip(), flush=True)

    def server(self):
        import httpx

        port = free_port()
        cmd = [PY, "my_openai_api.py", "--ckpt", self.sft, "--device", self.device, "--port", port]
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                if proc.poll() is not None:
                    raise Failed(f"the server exited {proc.returncode}: {last_line(proc.stdout.read())}")
                if time.time() > deadline:
                    raise Failed("the server did not answer /health within 120 s")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.5)
            reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": "minimind", "messages": [{"role": "user", "content": "What is the capital of Italy?"}],
                "max_tokens": 16, "temperature": 0})
            if reply.status_code != 200 or not isinstance(reply.json()["choices"][0]["message"]["content"], str):
                raise Failed(f"POST /v1/chat/completions: {reply.status_code} {reply.text[:200]}")
            self.constrained_beside_greedy(url, reply.json()["choices"][0]["message"]["content"])
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def constrained_beside_greedy(self, url, alone: str):
        """A json_object request (its grammar's bitmask applied to logits on the GPU) beside four greedy ones: it
        parses, and each greedy answer is the one the same question got alone."""
        import httpx

        ask = {"model": "minimind", "messages": [{"role": "user", "content": "What is the capital of Italy?"}],
               "max_tokens": 16, "temperature": 0}
        as_json = {**ask, "response_format": {"type": "json_object"}, "temperature": 0.7, "max_tokens": 24}
        with ThreadPoolExecutor(5) as pool:
            replies = list(pool.map(lambda body: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60),
                                    [as_json, ask, ask, ask, ask]))
        if any(r.status_code != 200 for r in replies):
            raise Failed(f"constrained beside greedy: {[r.status_code for r in replies]} {replies[0].text[:200]}")
        try:
            json.loads(replies[0].json()["choices"][0]["message"]["content"])
        except ValueError as e:
            raise Failed(f"the json_object answer does not parse: {e}") from None
        changed = [r.json()["choices"][0]["message"]["content"] for r in replies[1:]]
        if any(text != alone for text in changed):
            raise Failed(f"greedy answers beside a constrained row changed: {alone!r} -> {changed}")

    def ceval(self):
        out = self.run("ceval", [PY, "eval_ceval.py", "--ckpt", self.sft, "--device", self.device, "--data_dir",
                                 self.work / "data" / "ceval", "--out_dir", self.work / "ceval"], 240)
        if "total accuracy:" not in out:
            raise Failed(f"no accuracy printed: {last_line(out)}")

    def export(self):
        for fmt in ("hf", "llama", "gguf"):
            self.run("export", [PY, "export_model.py", "--ckpt", self.work / "run" / "dpo_64.safetensors",
                                "--tokenizer", self.tok, "--out_dir", self.work / "export" / fmt, "--format", fmt], 180)

    def bad_device(self):
        index = torch.cuda.device_count()
        out = self.run("bad_device", [PY, "2-eval.py", "--ckpt", self.work / "nowhere", "--device", f"cuda:{index}",
                                      "--prompt", "Hi"], 120, expect=1)
        if "Traceback" in out or not out.strip().splitlines()[-1].startswith(f"error: --device cuda:{index} asks for"):
            raise Failed(f"not a line naming the device: {last_line(out)}")

    def throughput(self, rehearse: bool, peak_tflops: float | None) -> dict:
        """Tokens/s of the real training loop (steady state: the first log interval, with compilation, left out)
        and MFU against the GPU's bf16 peak."""
        from bench_train import random_shards
        from common import matmul_peak, train_flops_per_token

        from model.LMConfig import preset_config

        preset, batch, seq, steps = throughput_plan(rehearse)
        interval = steps // 4
        config = preset_config(preset, max_seq_len=seq)
        random_shards(self.work / "random", batch * seq * (steps + 4), config.vocab_size)
        cmd = [PY, "1-pretrain.py", "--data_path", self.work / "random", "--out_dir", self.work / "throughput",
               "--preset", preset, "--max_seq_len", seq, "--batch_size", batch, "--max_steps", steps,
               "--log_interval", interval, "--save_interval", "0", "--device", self.device, "--dtype", "bfloat16",
               "--quiet", "--warmup_iters", "1", *([] if rehearse else ["--compile"])]
        self.run("throughput", cmd, 480)
        name = f"pretrain_{config.dim}"
        rows = [json.loads(line) for line in open(self.work / "throughput" / name / "metrics.jsonl")]
        steady = sorted([r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]) or [0.0]
        tokens_per_s = steady[len(steady) // 2]  # the median
        flops = train_flops_per_token(config, seq)
        measured = matmul_peak(n=1024 if rehearse else 8192, dtype=torch.bfloat16, device=self.device)
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        listed = next((p for part, p in PEAKS if part in gpu), None)
        peak = peak_tflops * 1e12 if peak_tflops else listed or measured
        source = "--peak_tflops" if peak_tflops else "data sheet" if listed else "measured bf16 matmul"
        return {"preset": preset, "batch": batch, "seq": seq, "steps": steps, "compile": not rehearse,
                "tokens_per_s": round(tokens_per_s), "flops_per_token": flops, "peak_flops": peak,
                "peak_source": source, "mfu": tokens_per_s * flops / peak, "measured_matmul_flops": measured,
                "mfu_vs_measured": tokens_per_s * flops / measured, "target_mfu": TARGET_MFU}


def throughput_plan(rehearse: bool):
    """(preset, batch, sequence length, steps) of the throughput row: the 108M model at a realistic batch."""
    return ("demo", 4, 128, 6) if rehearse else ("minimind-v1", 32, 512, 40)


def rows_of(check: Check):
    """(id, what the table calls it, what it needs, the check)."""
    return [
        ("data", "demo data, tokenizer, tokens", (), check.data),
        ("pretrain", "pretrain, bf16, --compile", ("data",), check.pretrain_bf16_compiled),
        ("fp16", "pretrain, fp16 + GradScaler, 2 steps", ("data",), check.fp16),
        ("moe", "MoE pretrain, bf16, --compile (grouped experts)", ("data",), check.moe_bf16_compiled),
        ("ddp", f"torchrun --nproc_per_node {check.nproc}, DDP ({check.backend})", ("data",),
         lambda: check.launched("ddp", "DDP", launcher=check.torchrun())),
        ("fsdp", f"torchrun --nproc_per_node {check.nproc}, FSDP2 ({check.backend})", ("data",),
         lambda: check.launched("fsdp", "FSDP2", "--strategy", "fsdp", launcher=check.torchrun())),
        ("deepspeed", f"deepspeed --num_gpus {check.nproc}, ZeRO-2", ("data",), check.deepspeed),
        ("resume", "kill -9, then --resume auto", ("data",), check.kill_and_resume),
        ("bad_device", "--device cuda:N beyond the count", (), check.bad_device),
        ("fsdp_grpo", f"torchrun --nproc_per_node {check.nproc}, FSDP2, GRPO with validation", ("sft",),
         check.fsdp_grpo),
        ("fsdp_lora", f"torchrun --nproc_per_node {check.nproc}, FSDP2, LoRA --merge", ("sft",), check.fsdp_lora),
        ("sft", "SFT", ("pretrain",), check.sft_stage),
        ("lora", "LoRA (--merge)", ("sft",), check.lora),
        ("dpo", "full DPO", ("sft",), lambda: check.dpo(lora=False)),
        ("dpo_lora", "DPO with LoRA", ("sft",), lambda: check.dpo(lora=True)),
        ("grpo", "GRPO, --iterations 2, KL to the reference", ("sft",), check.grpo),
        ("distill", "distillation from the SFT model", ("sft",), check.distill),
        ("grpo_compiled", "GRPO, bf16, --compile", ("sft",),
         lambda: check.grpo("--dtype", "bfloat16", "--compile", out="grpo_compiled")),
        ("distill_compiled", "distillation, bf16, --compile", ("sft",),
         lambda: check.distill("--dtype", "bfloat16", "--compile", out="distill_compiled")),
        ("gen_fp32", "generate, fp32", ("sft",), check.generate),
        ("gen_bf16", "generate, bf16, --compile", ("sft",), lambda: check.generate("--dtype", "bfloat16", "--compile")),
        ("decode_attention", "decode attention: DecodeAttention vs GQA SDPA with a mask", (),
         check.decode_attention),
        ("server", "server round trip; json_object beside greedy requests", ("sft",), check.server),
        ("ceval", "C-Eval (demo set)", ("sft",), check.ceval),
        ("export", "export hf, llama, gguf", ("dpo",), check.export),
    ]


def run_rows(rows, jobs: int) -> list:
    """Every row once its needs are done, up to `jobs` at a time; a row whose need did not pass is skipped."""
    results, pending, running = {}, list(rows), {}

    def execute(row):
        start = time.time()
        try:
            row[3]()
            return "PASS", time.time() - start, ""
        except Failed as e:
            return "FAIL", time.time() - start, str(e)
        except Exception as e:  # a bug in a check is a failed row, not a lost table
            return "FAIL", time.time() - start, f"{type(e).__name__}: {e}"[:240]

    with ThreadPoolExecutor(jobs) as pool:
        while pending or running:
            for row in list(pending):
                if not all(n in results for n in row[2]) or len(running) >= jobs:
                    continue
                pending.remove(row)
                missing = [n for n in row[2] if results[n][0] != "PASS"]
                if missing:
                    results[row[0]] = ("SKIP", 0.0, f"needs {', '.join(missing)}")
                    report(row, results[row[0]])
                else:
                    running[pool.submit(execute, row)] = row
            if running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    row = running.pop(future)
                    results[row[0]] = future.result()
                    report(row, results[row[0]])
    return [{"id": r[0], "name": r[1], "status": results[r[0]][0], "seconds": round(results[r[0]][1], 1),
             "error": results[r[0]][2]} for r in rows]


def report(row, result):
    print(f"  {result[0]:<4} {result[1]:6.1f} s  {row[1]}" + (f": {result[2]}" if result[2] else ""), flush=True)


def needed(rows, only: set) -> list:
    """The rows named in --only and every row they need."""
    by_id, keep = {r[0]: r for r in rows}, set()
    todo = [name for name in only if name in by_id]
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(by_id[name][2])
    return [r for r in rows if r[0] in keep]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=str(ROOT / "out" / "gpu_check.json"), help="where the figures go")
    parser.add_argument("--jobs", type=int, default=4, help="rows run at a time (the throughput row runs alone)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak for MFU (default: the data sheet's for H100/H200/A100, else "
                             "a measured bf16 matmul)")
    parser.add_argument("--only", default=None, help="comma-separated row ids (and what they need); "
                                                     "'throughput' for the MFU row")
    parser.add_argument("--rehearse_on_cpu", action="store_true", help="run the rows on the CPU (slow)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes for the multi-process rows (DDP, FSDP2, DeepSpeed): one per GPU, or gloo "
                             "processes with --rehearse_on_cpu")
    parser.add_argument("--keep", action="store_true", help="keep the work folder even when every row passed")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.rehearse_on_cpu:
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU seen"
        print(f"gpu_check: no CUDA GPU here (torch {torch.__version__}, {build}); nothing to check (README: GPU)")
        return 0
    start = time.time()
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    if not args.rehearse_on_cpu and args.nproc > torch.cuda.device_count():
        parser.error(f"--nproc {args.nproc}: this machine has {torch.cuda.device_count()} GPU(s)")
    check = Check(work, "cpu" if args.rehearse_on_cpu else "cuda", args.nproc)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.rehearse_on_cpu else "CPU rehearsal"
    print(f"gpu_check on {gpu}: torch {torch.__version__}, CUDA {torch.version.cuda}; work folder {work}", flush=True)
    rows = rows_of(check)
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - {r[0] for r in rows} - {"throughput"}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; rows: {', '.join(r[0] for r in rows)}, throughput")
    results = run_rows(needed(rows, only) if only else rows, max(1, args.jobs))
    figures = None
    if only is None or "throughput" in only:
        row_start = time.time()
        try:
            figures = check.throughput(args.rehearse_on_cpu, args.peak_tflops)
            status, error = "PASS", ""
        except Failed as e:
            status, error = "FAIL", str(e)
        preset, batch, seq, _ = throughput_plan(args.rehearse_on_cpu)
        results.append({"id": "throughput", "name": f"training throughput: {preset}, bf16, {batch} x {seq}",
                        "status": status, "seconds": round(time.time() - row_start, 1), "error": error})
        report((None, results[-1]["name"]), (status, results[-1]["seconds"], error))

    width = max(len(r["name"]) for r in results)
    print(f"\n{'check':<{width}}  result  seconds  error")
    for r in results:
        print(f"{r['name']:<{width}}  {r['status']:<6}  {r['seconds']:7.1f}  {r['error']}")
    if figures:
        verdict = "meets" if figures["mfu"] >= TARGET_MFU else "below"
        print(f"\n{figures['preset']}, batch {figures['batch']} x {figures['seq']}, bf16"
              f"{', --compile' if figures['compile'] else ''}: {figures['tokens_per_s']} tokens/s, "
              f"{figures['flops_per_token'] / 1e9:.2f} GFLOP per token; MFU {figures['mfu']:.1%} of "
              f"{figures['peak_flops'] / 1e12:.3g} TFLOP/s ({figures['peak_source']}; {verdict} the "
              f"{TARGET_MFU:.0%} target), {figures['mfu_vs_measured']:.1%} of a measured bf16 matmul "
              f"({figures['measured_matmul_flops'] / 1e12:.3g} TFLOP/s)")
    failed = [r for r in results if r["status"] == "FAIL"]
    summary = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "rows": results,
               "throughput": figures, "seconds": round(time.time() - start, 1)}
    with atomic_writer(Path(args.json), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\n{len(results) - len(failed)}/{len(results)} passed in {summary['seconds']:.0f} s; figures in {args.json}")
    if failed or args.keep:
        print(f"the rows' output: {work / 'logs'}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
