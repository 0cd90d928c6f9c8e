"""The whole MiniMind pipeline on the demo corpus, in one command, on a CPU in about ten minutes.

    python demo.py            (the full demo: out/demo/, loss curves in images/)
    python demo.py --tiny     (a one-minute smoke run with a tiny model: out/demo_tiny/)

Stages: demo data -> tokenizer -> pretrain -> SFT -> LoRA -> DPO -> chat samples -> C-Eval-format eval ->
export (transformers, Llama, GGUF) -> a round trip through the OpenAI-compatible server. Each stage runs the
same script a user would run, with the same flags; the closing table sums up what each one achieved.
"""
import argparse
import importlib.util
import json
import shutil
import threading
import time
from pathlib import Path

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing to a user

ROOT = Path(__file__).resolve().parent
MARKER = ".minimind_demo"  # in every --out_dir the demo makes: the only kind of folder it replaces

FULL = dict(name="demo", repeats=30, vocab=3000, model=["--preset", "demo"], seq=128, pre_steps=400, pre_lr=2e-3,
            pre_batch=16, sft_steps=300, sft_lr=3e-4, lora_steps=30, dpo_steps=40, dpo_lr=2e-5)
TINY = dict(name="demo_tiny", repeats=2, vocab=600,
            model=["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--vocab_size", "600"],
            seq=64, pre_steps=30, pre_lr=3e-3, pre_batch=8, sft_steps=15, sft_lr=1e-3, lora_steps=4, dpo_steps=4,
            dpo_lr=1e-4)


def script(name: str):
    """A numbered script as a module, to run its main(argv) in this process (imports are paid once)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py").replace("-", "_"), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Timer:
    def __init__(self):
        self.rows = []

    def stage(self, name):
        timer = self

        class Stage:
            def __enter__(self):
                print(f"\n=== {name} ===", flush=True)
                self.start = time.time()
                return self

            def __exit__(self, *exc):
                timer.rows.append((name, time.time() - self.start))

        return Stage()


def fresh_out_dir(out: Path) -> Path:
    """`out`, emptied for a new run; a folder with files the demo did not write (`--out_dir out`, where real
    checkpoints live) is refused, never deleted."""
    from model.errors import InputError

    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise InputError(f"--out_dir {out} holds files the demo did not write: give a new or empty folder (the "
                             f"demo replaces only a folder it made)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by demo.py, which replaces this folder on its next run\n")
    return out


def serve_in_thread(model, tokenizer):
    import socket

    import uvicorn

    from model.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(model, tokenizer), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}/v1"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model and a few steps: a smoke run")
    parser.add_argument("--out_dir", default=None, help="default: out/demo (out/demo_tiny with --tiny)")
    parser.add_argument("--images_dir", default=None, help="where the loss curves go (default: images/, not with --tiny)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    cfg = TINY if args.tiny else FULL
    out = fresh_out_dir(Path(args.out_dir or ROOT / "out" / cfg["name"]))
    data, tok = out / "data", out / "tokenizer"
    images = Path(args.images_dir) if args.images_dir else (None if args.tiny else ROOT / "images")
    common = ["--out_dir", str(out), "--tokenizer", str(tok), "--max_seq_len", str(cfg["seq"]), "--quiet",
              "--seed", str(args.seed), "--device", "cpu", "--save_interval", "100000", "--log_interval", "10"]
    timer, summary = Timer(), {}

    import torch

    torch.manual_seed(args.seed)
    with timer.stage("demo data"):
        script("data_process.py").main(["demo", "--out_dir", str(data), "--pretrain_repeats", str(cfg["repeats"]),
                                        "--seed", str(args.seed)])
    with timer.stage("tokenizer"):
        script("train_tokenizer.py").main(["--data", str(data / "tokenizer_train.jsonl"), "--vocab_size",
                                           str(cfg["vocab"]), "--out_dir", str(tok)])
        script("data_process.py").main(["pretrain", "--input", str(data / "pretrain_data.jsonl"), "--out_dir",
                                        str(out / "pretrain_data"), "--tokenizer", str(tok), "--val_every", "50"])

    with timer.stage("pretrain"):
        result = script("1-pretrain.py").main(
            ["--data_path", str(out / "pretrain_data"), *cfg["model"], *common, "--batch_size", str(cfg["pre_batch"]),
             "--learning_rate", str(cfg["pre_lr"]), "--warmup_iters", "20", "--max_steps", str(cfg["pre_steps"]),
             "--eval_interval", str(max(cfg["pre_steps"] // 4, 1))])
        pretrained = Path(result["output"])
        summary["pretrain val loss"] = f"{result['val_loss']:.3f}"

    from model.evaluation import fact_qa
    from model.io import read_jsonl
    from model.loading import load_model
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok)
    held_out = list(read_jsonl(data / "held_out.jsonl"))

    def accuracy(path):
        r = fact_qa(load_model(path), tokenizer, held_out)
        return r, f"EN {r['en']:.0%} / ZH {r['zh']:.0%}"

    with timer.stage("held-out fact QA before SFT"):
        _, summary["held-out fact QA, before SFT"] = accuracy(pretrained)

    with timer.stage("SFT"):
        result = script("3-full_sft.py").main(
            ["--data_path", str(data / "sft_data.jsonl"), "--init_from", str(pretrained), *common, "--batch_size", "16",
             "--learning_rate", str(cfg["sft_lr"]), "--warmup_iters", "10", "--max_steps", str(cfg["sft_steps"]),
             "--epochs", "1000", "--freeze_embeddings", "--eval_interval", str(max(cfg["sft_steps"] // 3, 1))])
        sft = Path(result["output"])
        summary["SFT val loss"] = f"{result['val_loss']:.3f}"
    with timer.stage("held-out fact QA after SFT"):
        qa, summary["held-out fact QA, after SFT"] = accuracy(sft)
        for a in qa["answers"][:3] + qa["answers"][-3:]:
            print(f"  {'✓' if a['hit'] else '✗'} {a['question']} -> {a['response']}")

    with timer.stage("LoRA"):
        result = script("4-lora_sft.py").main(
            ["--ckpt", str(sft), "--data_path", str(data / "sft_data.jsonl"), *common, "--batch_size", "16",
             "--learning_rate", "1e-4", "--max_steps", str(cfg["lora_steps"]), "--epochs", "100", "--merge"])
        summary["LoRA val loss"] = f"{result['val_loss']:.3f}"
        _, summary["held-out fact QA, LoRA merged"] = accuracy(Path(str(result["output"]) + "_merged.safetensors"))

    with timer.stage("DPO"):
        from model.evaluation import preference_accuracy

        before = preference_accuracy(load_model(sft), tokenizer, data / "dpo_held_out.jsonl")
        result = script("5-dpo_train.py").main(
            ["--ckpt", str(sft), "--data_path", str(data / "dpo_data.jsonl"), "--val_path",
             str(data / "dpo_held_out.jsonl"), *common, "--batch_size", "8", "--learning_rate", str(cfg["dpo_lr"]),
             "--max_steps", str(cfg["dpo_steps"]), "--epochs", "100", "--beta", "0.1"])
        dpo = Path(result["output"])
        after = preference_accuracy(load_model(dpo), tokenizer, data / "dpo_held_out.jsonl")
        metrics = [json.loads(line) for line in open(out / dpo.stem / "metrics.jsonl")]
        final = [m for m in metrics if "val_reward_accuracy" in m][-1]
        summary["DPO held-out reward accuracy (0% at the start)"] = f"{final['val_reward_accuracy']:.0%}"
        summary["DPO held-out log-prob margin chosen-rejected"] = \
            f"{before['margin']:.2f} -> {after['margin']:.2f} (prefers chosen {before['accuracy']:.0%} -> " \
            f"{after['accuracy']:.0%})"
        _, summary["held-out fact QA, after DPO"] = accuracy(dpo)

    with timer.stage("chat samples"):
        chat = script("2-eval.py")
        chat.main(["--ckpt", str(dpo), "--tokenizer", str(tok), "--device", "cpu", "--temperature", "0",
                   "--max_new_tokens", "40", "--prompt", "What is the capital of Japan?", "--prompt", "法国的首都是哪里？",
                   "--prompt", "How many days are there in a week?", "--prompt", "你是谁？"])

    with timer.stage("C-Eval-format eval"):
        result = script("eval_ceval.py").main(["--ckpt", str(dpo), "--tokenizer", str(tok), "--device", "cpu",
                                               "--data_dir", str(data / "ceval"), "--out_dir", str(out / "ceval")])
        summary["C-Eval-format accuracy (demo val, chance 25%)"] = \
            f"{result['accuracy']:.1%} ({result['correct']}/{result['total']})"

    with timer.stage("export"):
        summary["exports"] = export_checks(dpo, tok, out / "export")

    with timer.stage("server round trip"):
        from openai import OpenAI

        server, thread, url = serve_in_thread(load_model(dpo), tokenizer)
        try:
            reply = OpenAI(base_url=url, api_key="none").chat.completions.create(
                model="minimind", messages=[{"role": "user", "content": "What is the capital of Italy?"}],
                max_tokens=24, temperature=0)
            text = reply.choices[0].message.content
            print(f"POST {url}/chat/completions -> {text!r}")
            summary["server round trip"] = f"ok: {text!r}"
        finally:
            server.should_exit = True
            thread.join(timeout=10)

    if images:
        images.mkdir(parents=True, exist_ok=True)
        for run in ("pretrain", "full_sft", "dpo"):
            for png in out.glob(f"{run}_*/loss.png"):
                shutil.copy(png, images / f"demo_{run}_loss.png")
    print_summary(timer.rows, summary, out)
    return summary


def export_checks(ckpt, tok, out) -> str:
    """Export three ways and check each: logits of the reloaded hf and llama folders, the GGUF tensor count."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from model.loading import load_model

    exporter = script("export_model.py")
    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        ours = load_model(ckpt)(ids).logits
        checks = []
        for fmt, cls in (("hf", AutoModelForCausalLM), ("llama", LlamaForCausalLM)):
            exporter.main(["--ckpt", str(ckpt), "--tokenizer", str(tok), "--out_dir", str(out / fmt), "--format", fmt])
            theirs = cls.from_pretrained(str(out / fmt), trust_remote_code=True)(ids).logits
            diff = (ours - theirs).abs().max().item()
            checks.append(f"{fmt} {'ok' if diff < 1e-4 else 'MISMATCH'} (max diff {diff:.1e})")
    exporter.main(["--ckpt", str(ckpt), "--tokenizer", str(tok), "--out_dir", str(out / "gguf"), "--format", "gguf"])
    reader = gguf.GGUFReader(str(out / "gguf" / "minimind.gguf"))
    checks.append(f"gguf {len(reader.tensors)} tensors")
    return "; ".join(checks)


def print_summary(rows, summary, out):
    width = max(len(k) for k in list(summary) + [r[0] for r in rows]) + 2
    print("\n" + "=" * 78 + "\nMiniMind demo summary\n" + "=" * 78)
    print(f"{'stage':<{width}} seconds")
    for name, seconds in rows:
        print(f"{name:<{width}} {seconds:7.1f}")
    print(f"{'total':<{width}} {sum(s for _, s in rows):7.1f}\n")
    for k, v in summary.items():
        print(f"{k:<{width}} {v}")
    print(f"\noutputs in {out}")
    with open(out / "summary.json", "w") as f:
        json.dump({"seconds": dict(rows), **summary}, f, indent=2, ensure_ascii=False)


if __name__ == "__main__":
    from model.errors import run_script

    run_script(main)
