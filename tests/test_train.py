"""The shared trainer through the real scripts: learning, exact resume, distributed runs, precision, safety."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, load_script, tiny_model
from model.checkpoint import CheckpointMismatch, save_weights
from model.distributed import transformer_blocks
from model.trainer import NonFiniteLoss, Task, Trainer, autocast_context, resolve_precision

TINY = ["--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--vocab_size", "1000",
        "--max_seq_len", "64", "--device", "cpu", "--quiet"]


def pretrain_args(demo_data, out, *extra):
    return ["--data_path", str(demo_data / "tokens"), "--out_dir", str(out), *TINY, "--batch_size", "8",
            "--learning_rate", "3e-3", "--warmup_iters", "2", "--log_interval", "1", *extra]


def metrics(out, name="pretrain_64"):
    return [json.loads(line) for line in open(Path(out) / name / "metrics.jsonl")]


def same_weights(a, b, atol=0.0):
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, worst


def test_pretraining_loss_falls(demo_data, tmp_path):
    result = load_script("1-pretrain.py").main(pretrain_args(demo_data, tmp_path, "--max_steps", "40",
                                                             "--save_interval", "0"))
    losses = [r["loss"] for r in metrics(tmp_path) if "loss" in r]
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
    assert result["val_loss"] is not None and result["val_loss"] < losses[0]
    assert (tmp_path / "pretrain_64.safetensors").exists() and (tmp_path / "pretrain_64" / "loss.png").exists()


def run_script_process(script, args, env=None):
    return subprocess.Popen([sys.executable, script, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})


def wait_for(path: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.02)


def test_kill_9_and_resume_gives_bitwise_equal_weights(demo_data, tmp_path):
    flags = ["--max_steps", "30", "--save_interval", "3", "--dropout", "0.1"]  # dropout: the RNG must resume too
    pretrain = load_script("1-pretrain.py")
    pretrain.main(pretrain_args(demo_data, tmp_path / "straight", *flags))

    killed = tmp_path / "killed"
    proc = run_script_process("1-pretrain.py", pretrain_args(demo_data, killed, *flags))
    k = random.Random().choice([3, 6, 9, 12])
    wait_for(killed / "pretrain_64" / "checkpoints" / f"step_{k:08d}", proc)
    time.sleep(random.random() * 0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "pretrain_64.safetensors").exists()

    result = pretrain.main(pretrain_args(demo_data, killed, *flags, "--resume", "auto"))
    assert result["step"] == 30
    same_weights(tmp_path / "straight" / "pretrain_64.safetensors", killed / "pretrain_64.safetensors")
    steps = [r["step"] for r in metrics(killed) if "loss" in r]
    assert steps == sorted(set(steps))  # rows logged after the checkpoint by the killed run were dropped


def test_damaged_newest_checkpoint_is_skipped(demo_data, tmp_path, capsys):
    pretrain = load_script("1-pretrain.py")
    pretrain.main(pretrain_args(demo_data, tmp_path, "--max_steps", "6", "--save_interval", "2"))
    ckpts = tmp_path / "pretrain_64" / "checkpoints"
    newest = ckpts / "step_00000006" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, as by a full disk
    (ckpts / ".step_00000008.tmp999").mkdir()  # a half-written one from a killed run
    result = pretrain.main(pretrain_args(demo_data, tmp_path, "--max_steps", "8", "--save_interval", "2",
                                         "--resume", "auto"))
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint" in out and "step_00000006" in out
    assert "resumed from" in out and "step_00000004" in out
    assert result["step"] == 8


def launch(args, launcher="torchrun", nproc=2):
    port = str(29500 + random.randint(0, 2000))
    if launcher == "deepspeed":  # on CPU it gives a gloo CPU accelerator; its first start builds a small op
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port,
               *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
def test_two_processes_match_one_with_the_same_global_batch(demo_data, tmp_path, strategy):
    flags = ["--max_steps", "6", "--save_interval", "2", "--keep_checkpoints", "2"]
    extra = ["--deepspeed", "ds_config.json"] if strategy == "deepspeed" else ["--strategy", strategy]
    launcher = "deepspeed" if strategy == "deepspeed" else "torchrun"
    launch(["1-pretrain.py", *pretrain_args(demo_data, tmp_path / "two", *flags, *extra)], launcher)
    args = pretrain_args(demo_data, tmp_path / "one", *flags)
    args[args.index("--batch_size") + 1] = "16"  # 2 processes x 8 = 16
    load_script("1-pretrain.py").main(args)
    # Equal up to float summation order (DeepSpeed reduces gradients in buckets: up to 1.2e-5 seen after 4 steps);
    # processes that each stepped on their own half of the batch (no gradient reduction) differ by about a step, lr 3e-3.
    same_weights(tmp_path / "one" / "pretrain_64.safetensors", tmp_path / "two" / "pretrain_64.safetensors", 1e-4)
    losses = [r["loss"] for r in metrics(tmp_path / "two") if "loss" in r]
    assert losses[-1] < losses[0]
    if strategy == "ddp":
        return
    # Resuming the sharded state (FSDP2's, DeepSpeed's partitions) from step 4 ends bitwise where the run ended.
    ckpts = tmp_path / "two" / "pretrain_64" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000004", "step_00000006"]  # pruned, nothing left over
    if strategy == "deepspeed":  # its partitions live inside the checkpoint, under the manifest
        manifest = json.loads((ckpts / "step_00000004" / "manifest.json").read_text())["files"]
        assert any(f.startswith("deepspeed/state/") and "optim_states" in f for f in manifest), manifest
        assert sorted(p.name for p in (tmp_path / "two" / "pretrain_64").iterdir()) == ["checkpoints", "loss.png",
                                                                                      "metrics.jsonl"]
    launch(["1-pretrain.py", *pretrain_args(demo_data, tmp_path / "resumed", *flags, *extra, "--resume",
                                            str(ckpts / "step_00000004"))], launcher)
    same_weights(tmp_path / "two" / "pretrain_64.safetensors", tmp_path / "resumed" / "pretrain_64.safetensors")


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_and_exits_as_the_shell_expects(demo_data, tmp_path, signum, status):
    flags = ["--max_steps", "400", "--save_interval", "0"]
    proc = run_script_process("1-pretrain.py", pretrain_args(demo_data, tmp_path, *flags))
    wait_for(tmp_path / "pretrain_64" / "metrics.jsonl", proc)
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == status, output  # 128 + the signal's number, not 0: the run did not finish
    assert f"stopped by {signal.Signals(signum).name} at step" in output and "Traceback" not in output
    assert "CPU run: glibc keeps freed memory" in output  # the script's opt-in says so
    saved = list((tmp_path / "pretrain_64" / "checkpoints").iterdir())
    assert len(saved) == 1
    stopped_at = int(saved[0].name.split("_")[1])
    assert 0 < stopped_at < 400
    assert not (tmp_path / "pretrain_64.safetensors").exists()
    if signum == signal.SIGTERM:
        result = load_script("1-pretrain.py").main(
            pretrain_args(demo_data, tmp_path, "--max_steps", str(stopped_at + 3), "--save_interval", "0",
                          "--resume", "auto"))
        assert result["step"] == stopped_at + 3


def test_sft_starts_from_pretrain_weights_and_trains_on_answers_only(demo_data, tmp_path):
    load_script("1-pretrain.py").main(pretrain_args(demo_data, tmp_path, "--max_steps", "3", "--save_interval", "0"))
    sft = load_script("3-full_sft.py")
    sft_flags = ["--data_path", str(demo_data / "data" / "sft_data.jsonl"), "--out_dir", str(tmp_path),
                 "--tokenizer", str(demo_data / "tokenizer"), *TINY, "--batch_size", "4", "--max_steps", "3",
                 "--save_interval", "0", "--freeze_embeddings"]
    result = sft.main(sft_flags)
    assert result["output"].endswith("full_sft_64.safetensors")
    pre = load_file(str(tmp_path / "pretrain_64.safetensors"))
    post = load_file(str(tmp_path / "full_sft_64.safetensors"))
    assert torch.equal(pre["model.tok_embeddings.weight"], post["model.tok_embeddings.weight"])  # frozen
    assert not torch.equal(pre["model.layers.0.attention.wq.weight"], post["model.layers.0.attention.wq.weight"])

    # The loss is the cross-entropy over answer tokens only.
    from model.stages import sft_task

    model, task = sft_task(sft.build_parser().parse_args(sft_flags))
    batch = task.collate([task.train_data[i] for i in range(3)])
    loss, _ = task.loss(model, batch)
    logits = model(batch["input_ids"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    assert 0 < keep.sum() < labels.numel() / 2
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[keep], labels[keep]))

    # --dropout reaches the modules of the loaded model (they were built with the checkpoint's rate, 0)
    model, _ = sft_task(sft.build_parser().parse_args(sft_flags + ["--dropout", "0.25"]))
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.25} and {m.attention.dropout for m in model.model.layers} == {0.25}

    # Strict loading: a pretrain checkpoint of other dims is refused with the keys and shapes named.
    with pytest.raises(CheckpointMismatch, match="shape of model.layers.0.attention.wq.weight"):
        from model.checkpoint import strict_load

        strict_load(tiny_model(dim=32, n_heads=4, n_kv_heads=2, vocab_size=1000), pre, "pretrain_64")


@pytest.fixture
def small_sft(demo_data, tmp_path):
    """40 SFT rows (10 steps of batch 4 per epoch, no held-out split) and a tiny base model with dropout."""
    rows = tmp_path / "sft_40.jsonl"
    rows.write_text("".join(open(demo_data / "data" / "sft_data.jsonl").readlines()[:40]))
    model = tiny_model(vocab_size=1000, dropout=0.1)  # dropout: the RNG must resume too
    save_weights(tmp_path / "base_64.safetensors", model.state_dict(), model.config)
    return rows, tmp_path / "base_64.safetensors"


def sft_run(demo_data, small_sft, out, *extra):
    rows, base = small_sft
    return ["--data_path", str(rows), "--init_from", str(base), "--out_dir", str(out), "--tokenizer",
            str(demo_data / "tokenizer"), "--max_seq_len", "64", "--device", "cpu", "--quiet", "--batch_size", "4",
            "--learning_rate", "1e-3", "--log_interval", "1", *extra]


def test_a_run_whose_epochs_end_before_max_steps_saves_a_final_checkpoint(demo_data, small_sft, tmp_path):
    result = load_script("3-full_sft.py").main(sft_run(demo_data, small_sft, tmp_path, "--max_steps", "100",
                                                       "--save_interval", "0"))
    assert result["step"] == 10 and Path(result["output"]).exists()  # one epoch of 10 steps, then the output
    saved = tmp_path / "full_sft_64" / "checkpoints"
    assert [p.name for p in saved.iterdir()] == ["step_00000010"]
    state = torch.load(saved / "step_00000010" / "train_state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["consumed"]) == (10, 1, 0)


def test_sft_resumes_bitwise_across_an_epoch_boundary(demo_data, small_sft, tmp_path):
    sft = load_script("3-full_sft.py")
    flags = ["--epochs", "2", "--save_interval", "6", "--keep_checkpoints", "0"]
    sft.main(sft_run(demo_data, small_sft, tmp_path / "straight", *flags))
    mid_epoch = tmp_path / "straight" / "full_sft_64" / "checkpoints" / "step_00000006"
    result = sft.main(sft_run(demo_data, small_sft, tmp_path / "resumed", *flags, "--resume", str(mid_epoch)))
    assert result["step"] == 20
    same_weights(tmp_path / "straight" / "full_sft_64.safetensors", tmp_path / "resumed" / "full_sft_64.safetensors")


def test_deepspeed_bf16_saves_a_frozen_embedding_as_it_was(demo_data, small_sft, tmp_path):
    """DeepSpeed casts every weight to bf16 and keeps fp32 masters of the trained ones only: the frozen tied
    embedding was saved rounded to bf16 (issue 37 #13). It must come out bit for bit as it went in, in fp32,
    while the trained weights move."""
    launch(["3-full_sft.py", *sft_run(demo_data, small_sft, tmp_path, "--max_steps", "2", "--save_interval", "0",
                                      "--freeze_embeddings", "--deepspeed", "ds_config.json", "--dtype", "bfloat16")],
           "deepspeed", nproc=1)
    before, after = load_file(str(small_sft[1])), load_file(str(tmp_path / "full_sft_64.safetensors"))
    name = "model.tok_embeddings.weight"
    assert after[name].dtype == torch.float32 and torch.equal(before[name], after[name])
    assert not torch.equal(before["model.layers.0.attention.wq.weight"], after["model.layers.0.attention.wq.weight"])


def test_precision_choice_and_autocast():
    assert resolve_precision("cpu", "auto") is None
    assert resolve_precision("cuda", "auto", bf16_supported=True) is torch.bfloat16
    assert resolve_precision("cuda", "auto", bf16_supported=False) is torch.float16
    assert resolve_precision("cpu", "bfloat16") is torch.bfloat16
    assert resolve_precision("cuda", "float16") is torch.float16
    assert resolve_precision("cuda", "float32") is None
    model = tiny_model()
    seen = {}
    first_linear = next(m for m in transformer_blocks(model)[0].modules() if isinstance(m, torch.nn.Linear))
    first_linear.register_forward_hook(
        lambda m, i, o: seen.update(on=torch.is_autocast_enabled("cpu"), dtype=o.dtype))
    with autocast_context("cpu", torch.bfloat16):
        model(torch.randint(0, 128, (1, 8)))
    assert seen == {"on": True, "dtype": torch.bfloat16}
    with autocast_context("cpu", None):
        model(torch.randint(0, 128, (1, 8)))
    assert seen == {"on": False, "dtype": torch.float32}


class Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def nan_at(call: int | None):
    """The LM loss, NaN at the given call (micro-step) of the run."""
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        out = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        return (out * float("nan") if calls["n"] == call else out), {}
    return loss


def train_numbers(out, loss, *flags):
    import argparse

    from model.trainer import add_train_args

    parser = argparse.ArgumentParser()
    add_train_args(parser)
    args = parser.parse_args(["--out_dir", str(out), "--batch_size", "4", "--device", "cpu", "--quiet", *flags])
    return Trainer(args, tiny_model().train(), Task("nan_test", Numbers(), loss, lambda m, s, o: None)).fit()


@pytest.mark.parametrize("log_interval", [1, 10])
def test_non_finite_loss_stops_with_a_checkpoint_of_the_last_good_state(tmp_path, log_interval):
    # The flag is read at log steps only: with --log_interval 10 the NaN of step 4 is seen at step 10, and the
    # steps between were skipped on the device, so the state saved is still step 3's.
    with pytest.raises(NonFiniteLoss, match="non-finite at step 4; the last good state .step 3."):
        train_numbers(tmp_path / "nan", nan_at(4), "--save_interval", "0", "--log_interval", str(log_interval))
    saved = list((tmp_path / "nan" / "nan_test" / "checkpoints").iterdir())
    assert [p.name for p in saved] == ["step_00000003"]
    weights = load_file(str(saved[0] / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())

    train_numbers(tmp_path / "clean", nan_at(None), "--save_interval", "3", "--keep_checkpoints", "0")
    clean = tmp_path / "clean" / "nan_test" / "checkpoints" / "step_00000003"
    same_weights(clean / "model.safetensors", saved[0] / "model.safetensors")
    state, clean_state = (torch.load(p / "train_state.pt", weights_only=True) for p in (saved[0], clean))
    assert (state["step"], state["epoch"], state["consumed"]) == (3, 0, 12)
    assert state["scheduler"]["last_epoch"] == 3
    assert state["scheduler"]["_last_lr"] == clean_state["scheduler"]["_last_lr"]
    moments = [(a[k], b[k]) for a, b in zip(state["optimizer"]["state"].values(),
                                            clean_state["optimizer"]["state"].values()) for k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(torch.equal(a, b) for a, b in moments)


# Whether glibc mmaps a 64 MB block (its default) or takes it from the heap (after keep_freed_memory), in a child
# process whose allocator nothing else has touched.
ALLOCATOR_PROBE = """
import ctypes, sys
sys.path[:0] = [{root!r}, {tests!r}]
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
                                              "keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = Info, ctypes.c_void_p, [ctypes.c_void_p]
def mmapped():
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(64 << 20)
    grown = libc.mallinfo2().hblkhd - before
    libc.free(block)
    return grown >= 64 << 20
from conftest import load_script, tiny_model
from test_train import Numbers
from model.trainer import Task, Trainer, keep_freed_memory_if_asked
parser = load_script("1-pretrain.py").build_parser()
Trainer(parser.parse_args(["--device", "cpu", "--batch_size", "4"]), tiny_model(), Task("t", Numbers(), None, None))
print("after a Trainer:", mmapped())
keep_freed_memory_if_asked(parser.parse_args(["--device", "cpu", "--no-keep_freed_memory"]))
print("after --no-keep_freed_memory:", mmapped())
keep_freed_memory_if_asked(parser.parse_args(["--device", "cpu"]))
print("after the default:", mmapped())
"""


def test_keeping_freed_memory_is_the_scripts_visible_opt_in():
    done = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE.format(root=str(ROOT), tests=str(ROOT / "tests"))],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:] == [  # after the Trainer's line naming its backend
        "after a Trainer: True", "after --no-keep_freed_memory: True",
        "CPU run: glibc keeps freed memory for reuse (faster steps; --no-keep_freed_memory turns it off)",
        "after the default: False"]
    assert "--keep_freed_memory, --no-keep_freed_memory" in load_script("1-pretrain.py").build_parser().format_help()


def test_wandb_logs_offline_without_an_api_key(demo_data, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    load_script("1-pretrain.py").main(pretrain_args(demo_data, tmp_path, "--max_steps", "3", "--save_interval", "0",
                                                    "--use_wandb", "--wandb_project", "test"))
    runs = list((tmp_path / "pretrain_64" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_a_launched_run_leaves_its_process_group(demo_data, tmp_path, monkeypatch):
    """A finished rank destroys its group: left to exit-time destructors, gloo's threads aborted a rank that had
    saved its work (std::terminate, CI of 2026-12-07)."""
    import torch.distributed as dist

    made, init = [], dist.init_process_group

    def recorded(backend, **kwargs):
        made.append(backend)
        return init(backend, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", recorded)
    monkeypatch.setenv("WORLD_SIZE", "1")  # launched as by torchrun: a group of one
    monkeypatch.setenv("RANK", "0")
    result = load_script("1-pretrain.py").main(pretrain_args(demo_data, tmp_path, "--max_steps", "2",
                                                             "--save_interval", "0"))
    assert result["step"] == 2 and made == ["gloo"]
    assert not dist.is_initialized()
