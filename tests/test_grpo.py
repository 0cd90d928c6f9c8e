"""6-grpo_train.py and 7-distill.py through the real scripts: GRPO learns a toy reward, resumes bitwise after
kill -9 (rollout sampling and kept rollouts included), runs on 2 processes; distillation trains a student."""
import json
import random
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import load_script, tiny_model
from model.checkpoint import save_weights
from test_train import launch, run_script_process, same_weights, wait_for

REWARDS = '''
def has_digit(completion, **fields):
    """1 if the completion has a digit: a random model samples one now and then, so there is something to learn."""
    return float(any(ch.isdigit() for ch in completion))
'''


@pytest.fixture(scope="module")
def grpo_setup(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    model = tiny_model(vocab_size=1000)
    save_weights(root / "base.safetensors", model.state_dict(), model.config,
                 {"tokenizer": str(demo_data / "tokenizer")})
    rng = random.Random(0)
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(64):
            row = {"prompt": f"Say a number {i}"} if i % 2 else {"messages": [{"role": "user", "content": f"Count {i}"}]}
            f.write(json.dumps({**row, "answer": str(rng.randint(0, 9))}) + "\n")
    (root / "toy_rewards.py").write_text(REWARDS)
    return root


def grpo_flags(demo_data, setup, out, *extra):
    return ["--ckpt", str(setup / "base.safetensors"), "--data_path", str(setup / "prompts.jsonl"), "--tokenizer",
            str(demo_data / "tokenizer"), "--out_dir", str(out), "--device", "cpu", "--quiet", "--reward",
            "toy_rewards:has_digit", "--num_generations", "8", "--batch_size", "2", "--max_new_tokens", "4",
            "--learning_rate", "3e-3", "--log_interval", "1", "--save_interval", "0", *extra]


def rewards(out):
    rows = [json.loads(line) for line in open(out / "grpo_64" / "metrics.jsonl")]
    return [r["reward"] for r in rows if "reward" in r]


def test_grpo_raises_the_reward_of_a_toy_task(demo_data, grpo_setup, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(grpo_setup))
    result = load_script("6-grpo_train.py").main(grpo_flags(demo_data, grpo_setup, tmp_path, "--max_steps", "30",
                                                            "--beta", "0.05"))
    seen = rewards(tmp_path)
    assert len(seen) == 30 and sum(seen[-5:]) / 5 > sum(seen[:5]) / 5 + 0.3, seen
    rows = [json.loads(line) for line in open(tmp_path / "grpo_64" / "metrics.jsonl")]
    assert {"reward_std", "accuracy", "kl", "clip_fraction", "completion_length"} <= set(rows[-1])
    assert rows[-1]["kl"] > 0  # the policy moved away from the reference
    assert result["output"].endswith("grpo_64.safetensors")


@pytest.mark.parametrize("loss", ["dr_grpo", "cispo"])
def test_grpo_variants_and_lora_run(demo_data, grpo_setup, tmp_path, monkeypatch, loss):
    monkeypatch.syspath_prepend(str(grpo_setup))
    extra = ["--lora_rank", "4"] if loss == "cispo" else []
    result = load_script("6-grpo_train.py").main(grpo_flags(demo_data, grpo_setup, tmp_path, "--max_steps", "3",
                                                            "--loss", loss, *extra))
    assert all(torch.isfinite(torch.tensor(r)) for r in rewards(tmp_path))
    if extra:
        assert result["output"].endswith("grpo_64") and (tmp_path / "grpo_64_merged.safetensors").exists()


def test_grpo_kill_9_and_resume_is_the_same_run(demo_data, grpo_setup, tmp_path):
    """With --iterations 2 every rollout serves two updates: a checkpoint between them keeps the rollout, and the
    resumed run samples what the uninterrupted one sampled."""
    flags = ["--max_steps", "8", "--iterations", "2", "--save_interval", "3", "--beta", "0.05"]
    env = {"PYTHONPATH": str(grpo_setup)}
    straight = run_script_process("6-grpo_train.py", grpo_flags(demo_data, grpo_setup, tmp_path / "straight", *flags),
                                  env)
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    killed = tmp_path / "killed"
    proc = run_script_process("6-grpo_train.py", grpo_flags(demo_data, grpo_setup, killed, *flags), env)
    wait_for(killed / "grpo_64" / "checkpoints" / "step_00000003", proc, timeout=300)  # between two iterations
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_script_process("6-grpo_train.py", grpo_flags(demo_data, grpo_setup, killed, *flags, "--resume",
                                                                "auto"), env)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    a, b = load_file(str(tmp_path / "straight" / "grpo_64.safetensors")), load_file(str(killed / "grpo_64.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rewards(tmp_path / "straight") == rewards(killed)


def test_grpo_samples_the_same_whether_it_validates_often_or_not(demo_data, grpo_setup, tmp_path, monkeypatch):
    """Validation between steps (greedy answers on the held-out prompts) must not change what training samples:
    the same seed gives the same rollouts, so the same weights, whatever --eval_interval is."""
    monkeypatch.syspath_prepend(str(grpo_setup))
    weights = {}
    for interval in ("1", "0"):
        out = tmp_path / interval
        load_script("6-grpo_train.py").main(grpo_flags(demo_data, grpo_setup, out, "--max_steps", "4", "--val_path",
                                                       str(grpo_setup / "prompts.jsonl"), "--eval_interval", interval))
        weights[interval] = load_file(str(out / "grpo_64.safetensors"))
    assert all(torch.equal(weights["1"][k], weights["0"][k]) for k in weights["1"])


def test_grpo_on_two_processes_ddp_and_fsdp(demo_data, grpo_setup, tmp_path):
    """Rollouts and greedy validation on two processes: under FSDP2 they run on a gathered copy of the policy, so
    every rank issues the same collectives however long its own completions are, and nothing the rollout touched
    in inference mode is a parameter the next step updates. Both strategies train the same weights."""
    import os

    os.environ["PYTHONPATH"] = str(grpo_setup) + os.pathsep + os.environ.get("PYTHONPATH", "")
    try:
        for strategy in ("ddp", "fsdp"):
            launch(["6-grpo_train.py", *grpo_flags(demo_data, grpo_setup, tmp_path / strategy, "--max_steps", "4",
                                                   "--beta", "0.05", "--strategy", strategy, "--val_path",
                                                   str(grpo_setup / "prompts.jsonl"), "--eval_interval", "2")])
            assert len(rewards(tmp_path / strategy)) == 4
    finally:
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]
    same_weights(tmp_path / "ddp" / "grpo_64.safetensors", tmp_path / "fsdp" / "grpo_64.safetensors", 1e-4)


def test_distillation_brings_a_smaller_student_closer_to_its_teacher_than_sft(demo_data, tmp_path):
    from model.errors import InputError

    teacher = tiny_model(vocab_size=1000)
    save_weights(tmp_path / "teacher.safetensors", teacher.state_dict(), teacher.config)

    def run(alpha, out, *extra):
        flags = ["--teacher", str(tmp_path / "teacher.safetensors"), "--data_path",
                 str(demo_data / "data" / "sft_data.jsonl"), "--tokenizer", str(demo_data / "tokenizer"),
                 "--out_dir", str(out), "--device", "cpu", "--quiet", "--dim", "32", "--n_layers", "2", "--n_heads",
                 "2", "--n_kv_heads", "1", "--vocab_size", "1000", "--max_seq_len", "64", "--batch_size", "8",
                 "--learning_rate", "1e-2", "--max_steps", "15", "--save_interval", "0", "--alpha", str(alpha), *extra]
        return load_script("7-distill.py").main(flags)

    distilled, sft = run(0.2, tmp_path / "distilled"), run(1.0, tmp_path / "sft")
    val = {name: [json.loads(line) for line in open(tmp_path / name / "distill_32" / "metrics.jsonl")
                  if "val_kl" in line][-1] for name in ("distilled", "sft")}
    # the same student, the same steps: learning the teacher's distribution too leaves it closer to the teacher
    assert val["distilled"]["val_kl"] < val["sft"]["val_kl"], val
    assert distilled["output"].endswith("distill_32.safetensors") and sft["output"]
    with pytest.raises(InputError, match="vocabulary"):
        run(0.5, tmp_path / "other", "--vocab_size", "500")


def test_a_grpo_micro_step_reads_nothing_back_from_the_device(demo_data, grpo_setup, tmp_path, monkeypatch):
    """The prompts and rows come with the batch as host lists, so a pass over a kept rollout (the loss, its
    statistics) makes no host sync (issue 37 #11: B+2 reads of the device batch a micro-step)."""
    from conftest import host_syncs
    from model.stages import grpo_task

    monkeypatch.syspath_prepend(str(grpo_setup))
    args = load_script("6-grpo_train.py").build_parser().parse_args(grpo_flags(demo_data, grpo_setup, tmp_path, "--iterations", "2"))
    model, task = grpo_task(args)
    batch = task.collate([task.train_data[i] for i in range(2)])
    assert batch["prompts"] == [task.train_data[i]["input_ids"].tolist() for i in range(2)] and batch["rows"] == [0, 1]
    task.loss(model, batch, **task.frozen)  # samples the rollout: generation reads tokens back, as it must
    assert host_syncs(task.loss, model, batch, **task.frozen) == []


def test_distillation_on_pretraining_text_trains_on_every_token_of_the_folder(demo_data, tmp_path):
    """7-distill.py given a tokenized pretraining folder learns the teacher's distribution over the text: the same
    student and steps end closer to the teacher (validation KL) than with cross-entropy alone (alpha 1)."""
    teacher = tiny_model(vocab_size=1000)
    save_weights(tmp_path / "teacher.safetensors", teacher.state_dict(), teacher.config)

    def run(alpha, out):
        flags = ["--teacher", str(tmp_path / "teacher.safetensors"), "--data_path", str(demo_data / "tokens"),
                 "--tokenizer", str(demo_data / "tokenizer"), "--out_dir", str(out), "--device", "cpu", "--quiet",
                 "--dim", "32", "--n_layers", "2", "--n_heads", "2", "--n_kv_heads", "1", "--vocab_size", "1000",
                 "--max_seq_len", "64", "--batch_size", "8", "--learning_rate", "1e-2", "--max_steps", "15",
                 "--save_interval", "0", "--alpha", str(alpha), "--temperature", "1"]
        load_script("7-distill.py").main(flags)
        return [json.loads(line) for line in open(out / "distill_32" / "metrics.jsonl") if "val_kl" in line][-1]

    distilled, ce = run(0.0, tmp_path / "distilled"), run(1.0, tmp_path / "ce")
    assert distilled["val_kl"] < ce["val_kl"], (distilled, ce)
