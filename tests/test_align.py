"""LoRA (peft) and DPO on the shared trainer."""
import random
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import load_script
from model.chat import find_tokenizer
from model.loading import load_model
from model.stages import dpo_objective, sequence_logps
from test_train import TINY, pretrain_args, run_script_process, wait_for


@pytest.fixture(scope="module")
def tiny_sft(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("align")
    load_script("1-pretrain.py").main(pretrain_args(demo_data, out, "--max_steps", "30", "--save_interval", "0"))
    load_script("3-full_sft.py").main(sft_flags(demo_data, out, "--max_steps", "20", "--learning_rate", "1e-3"))
    return out / "full_sft_64.safetensors"


def sft_flags(demo_data, out, *extra):
    return ["--data_path", str(demo_data / "data" / "sft_data.jsonl"), "--out_dir", str(out), "--tokenizer",
            str(demo_data / "tokenizer"), *TINY, "--batch_size", "8", "--save_interval", "0", *extra]


def lora_flags(demo_data, base, out, *extra):
    return ["--ckpt", str(base), "--data_path", str(demo_data / "data" / "sft_data.jsonl"), "--out_dir", str(out),
            "--tokenizer", str(demo_data / "tokenizer"), "--max_seq_len", "64", "--device", "cpu", "--quiet",
            "--batch_size", "8", "--learning_rate", "5e-3", "--lora_rank", "4", *extra]


def dpo_flags(demo_data, base, out, *extra):
    return ["--ckpt", str(base), "--data_path", str(demo_data / "data" / "dpo_data.jsonl"), "--out_dir", str(out),
            "--tokenizer", str(demo_data / "tokenizer"), "--max_seq_len", "64", "--device", "cpu", "--quiet",
            "--batch_size", "8", "--learning_rate", "2e-3", "--beta", "0.5", *extra]


def test_lora_changes_only_adapters_and_merges_exactly(demo_data, tiny_sft, tmp_path):
    result = load_script("4-lora_sft.py").main(lora_flags(demo_data, tiny_sft, tmp_path, "--max_steps", "8",
                                                          "--save_interval", "0", "--merge"))
    adapter_dir = tmp_path / "lora_sft_64"
    assert result["output"] == str(adapter_dir) and (adapter_dir / "adapter_config.json").exists()
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
    assert find_tokenizer(adapter_dir).resolve() == (demo_data / "tokenizer").resolve()  # its base's, for --ckpt

    base = load_model(tiny_sft)
    with_adapter = load_model(adapter_dir, merge_lora=False)  # base + adapter, unmerged (peft)
    base_after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                  for k, v in with_adapter.state_dict().items() if "lora_" not in k}
    for k, v in base.state_dict().items():
        assert torch.equal(v, base_after[k]), f"{k} changed"

    merged = load_model(tmp_path / "lora_sft_64_merged.safetensors")
    ids = torch.randint(3, 1000, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(input_ids=ids).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-4)


def test_dpo_objective_matches_the_formula():
    pc, pr = torch.tensor([-2.0, -5.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.5, -4.0]), torch.tensor([-2.5, -2.0])
    loss, chosen, rejected = dpo_objective(pc, pr, rc, rr, beta=0.5)
    margins = 0.5 * torch.tensor([(-2.0 + 2.5) - (-3.0 + 2.5), (-5.0 + 4.0) - (-1.0 + 2.0)])  # [0.5, -1.0]
    torch.testing.assert_close(loss, torch.log1p(torch.exp(-margins)).mean())
    torch.testing.assert_close(chosen - rejected, margins)
    smoothed, _, _ = dpo_objective(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)
    expected = (0.8 * torch.log1p(torch.exp(-margins)) + 0.2 * torch.log1p(torch.exp(margins))).mean()
    torch.testing.assert_close(smoothed, expected)


def test_rpo_alpha_adds_the_chosen_answers_mean_token_nll(demo_data, tiny_sft):
    import torch.nn.functional as F

    from model.dataset import DPODataset
    from model.model import next_token_targets
    from model.stages import dpo_collate, dpo_loss
    from model.tokenizer import load_tokenizer

    model = load_model(tiny_sft)
    data = DPODataset(demo_data / "data" / "dpo_data.jsonl", load_tokenizer(demo_data / "tokenizer"), 64)
    batch = dpo_collate([data[i] for i in range(4)])
    with torch.no_grad():
        plain, stats = dpo_loss(0.1, 0.0)(model, batch, reference=model)
        with_nll, _ = dpo_loss(0.1, 0.0, rpo_alpha=0.5)(model, batch, reference=model)
        logits = model(input_ids=batch["input_ids"][:4]).logits
    targets = next_token_targets(batch["labels"][:4])
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    nll = (per_token.sum(1) / (targets != -100).sum(1)).mean()  # each chosen answer's mean, then the batch's
    torch.testing.assert_close(plain, torch.log(torch.tensor(2.0)))  # policy = reference: every margin is 0
    torch.testing.assert_close(with_nll - plain, 0.5 * nll)
    torch.testing.assert_close(stats["chosen_nll"], nll)


# Pairs whose wrong capitals are drawn at random (the demo's held-out pairs): some capitals are rejected more
# often than chosen, a preference the tiny model learns in a few dozen steps. (The demo's training pairs reject each
# capital as often as they choose it, so only the country-capital pairing is left to learn: too much for it.)
RANDOM_PAIRS = "dpo_held_out.jsonl"


def held_out_pairs(path, demo_data):
    """The training pairs asked in another phrasing: prompts the DPO run never saw."""
    import json
    import re

    from model.demo_corpus import QUESTION_EN, QUESTION_ZH

    rows = []
    for line in open(demo_data / "data" / RANDOM_PAIRS, encoding="utf-8"):
        row = json.loads(line)
        en = re.fullmatch(r"The capital of (.+) is .+\.", row["chosen"])
        country = en.group(1) if en else row["chosen"].split("的首都是")[0]
        templates = QUESTION_EN if en else QUESTION_ZH
        unseen = [t.format(c=country) for t in templates if t.format(c=country) != row["prompt"]]
        rows.append({**row, "prompt": unseen[len(rows) % len(unseen)]})
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return path


def mean_margin(model_path, pairs, tokenizer):
    from model.dataset import DPODataset
    from model.stages import dpo_collate

    model = load_model(model_path)
    data = DPODataset(pairs, tokenizer, 64)
    batch = dpo_collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        chosen, rejected = sequence_logps(model, batch["input_ids"], batch["labels"]).chunk(2)
    return (chosen - rejected).mean().item(), (chosen > rejected).float().mean().item()


def test_dpo_raises_the_held_out_margin_and_reports_reward_accuracy(demo_data, tiny_sft, tmp_path):
    from model.tokenizer import load_tokenizer

    pairs = held_out_pairs(tmp_path / "held_out_pairs.jsonl", demo_data)
    result = load_script("5-dpo_train.py").main(dpo_flags(demo_data, tiny_sft, tmp_path, "--max_steps", "60",
                                                          "--epochs", "2", "--save_interval", "0",
                                                          "--data_path", str(demo_data / "data" / RANDOM_PAIRS),
                                                          "--val_path", str(pairs)))
    tok = load_tokenizer(demo_data / "tokenizer")
    before, acc_before = mean_margin(tiny_sft, pairs, tok)
    after, acc_after = mean_margin(result["output"], pairs, tok)
    assert after > before + 0.5, (before, after)  # nats, averaged over the pairs
    assert acc_after > acc_before
    import json

    rows = [json.loads(line) for line in open(tmp_path / "dpo_64" / "metrics.jsonl")]
    final = [r for r in rows if "val_reward_accuracy" in r][-1]
    assert final["val_reward_accuracy"] > 0.5 and final["val_reward_margin"] > 0
    assert all("reward_accuracy" in r for r in rows if "loss" in r)


@pytest.mark.parametrize("stage", ["lora", "dpo"])
def test_alignment_stages_resume_exactly_after_kill_9(demo_data, tiny_sft, tmp_path, stage):
    script, flags, output = {
        "lora": ("4-lora_sft.py", lora_flags, "lora_sft_64/adapter_model.safetensors"),
        "dpo": ("5-dpo_train.py", dpo_flags, "dpo_64.safetensors")}[stage]
    name = output.split("/")[0].removesuffix(".safetensors")
    common = ["--max_steps", "12", "--save_interval", "2"]
    module = load_script(script)
    module.main(flags(demo_data, tiny_sft, tmp_path / "straight", *common))
    proc = run_script_process(script, flags(demo_data, tiny_sft, tmp_path / "killed", *common))
    k = random.Random().choice([2, 4, 6])
    wait_for(tmp_path / "killed" / name / "checkpoints" / f"step_{k:08d}", proc)
    time.sleep(random.random() * 0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    module.main(flags(demo_data, tiny_sft, tmp_path / "killed", *common, "--resume", "auto"))
    a, b = load_file(str(tmp_path / "straight" / output)), load_file(str(tmp_path / "killed" / output))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, (k, differ[:5])


@pytest.mark.parametrize("stage", ["sft", "lora"])
def test_gradient_checkpointing_trains_the_same_weights(demo_data, tiny_sft, tmp_path, stage):
    """--gradient_checkpointing recomputes each block in the backward pass instead of keeping its activations:
    the same weights come out, also where the blocks' input needs no gradient (frozen embeddings, LoRA)."""
    def run(out, *extra):
        if stage == "sft":
            load_script("3-full_sft.py").main(sft_flags(demo_data, out, "--max_steps", "3", "--init_from",
                                                        str(tiny_sft), "--freeze_embeddings", *extra))
            return load_file(str(out / "full_sft_64.safetensors"))
        load_script("4-lora_sft.py").main(lora_flags(demo_data, tiny_sft, out, "--max_steps", "3", "--save_interval",
                                                     "0", "--lora_dropout", "0", *extra))
        return load_file(str(out / "lora_sft_64" / "adapter_model.safetensors"))

    plain, checkpointed = run(tmp_path / "plain"), run(tmp_path / "ckpt", "--gradient_checkpointing")
    assert plain.keys() == checkpointed.keys()
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], atol=1e-6, rtol=1e-5, msg=k)
    before = load_file(str(tiny_sft))
    assert any(not torch.equal(plain[k], before[k]) for k in plain if k in before) or stage == "lora"


def test_lora_on_two_processes_saves_and_merges_the_whole_model_under_ddp_and_fsdp(demo_data, tiny_sft, tmp_path):
    """The final adapter and merged model are written from the gathered state: under FSDP2 rank 0 holds only its
    shard of the live model, so saving or merging that would write a shard (or fail). Both strategies save the
    same adapter and merged weights."""
    from test_train import launch, same_weights

    for strategy in ("ddp", "fsdp"):
        launch(["4-lora_sft.py", *lora_flags(demo_data, tiny_sft, tmp_path / strategy, "--max_steps", "3",
                                             "--save_interval", "0", "--merge", "--strategy", strategy)])
    for name in ("lora_sft_64/adapter_model.safetensors", "lora_sft_64_merged.safetensors"):
        same_weights(tmp_path / "ddp" / name, tmp_path / "fsdp" / name, 1e-5)
    merged = load_file(str(tmp_path / "fsdp" / "lora_sft_64_merged.safetensors"))
    base = load_file(str(tiny_sft))
    assert any(not torch.equal(merged[k], base[k]) for k in base if "wq" in k)  # the adapter is in it
