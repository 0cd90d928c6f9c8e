"""trl and peft train our own model class unmodified (tiny configs, a few steps on CPU), as they do Llama."""
import copy

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from conftest import tiny_model
from model.tokenizer import load_tokenizer


def settings(tmp_path, **extra):
    # trl's defaults otherwise: gradient checkpointing on and, where there is a backbone, its fused LM-head loss.
    return dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                report_to="none", logging_steps=1, save_strategy="no", use_cpu=True, **extra)


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    return load_tokenizer(demo_data / "tokenizer")


def changed(before: dict, model) -> set:
    """The model's own weights that training changed (under peft a weight's name gains `.base_layer`)."""
    return {n for n, p in model.named_parameters()
            if "lora_" not in n and not torch.equal(before[n.replace(".base_layer", "")], p.detach())}


@pytest.mark.parametrize("lora", [False, True])
def test_sft_trainer_messages(tmp_path, tokenizer, lora):
    data = Dataset.from_list([{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                                            {"role": "assistant", "content": f"{i + 1}."}]} for i in range(8)])
    model = tiny_model(vocab_size=1000)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SFTTrainer(model=model, args=SFTConfig(**settings(tmp_path), max_length=64), train_dataset=data,
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, task_type="CAUSAL_LM") if lora else None)
    assert trainer.args.gradient_checkpointing  # trl's default, which our model now supports
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    if lora:
        assert not changed(before, model)  # the base stays frozen ...
        assert any("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)  # ... adapters learn
    else:
        assert changed(before, model)


def test_dpo_trainer(tmp_path, tokenizer):
    pairs = Dataset.from_list([{"prompt": [{"role": "user", "content": "What is the capital of France?"}],
                                "chosen": [{"role": "assistant", "content": "Paris."}],
                                "rejected": [{"role": "assistant", "content": "Rome."}]}] * 8)
    model = tiny_model(vocab_size=1000)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=DPOConfig(**settings(tmp_path), max_length=64),
                        train_dataset=pairs, processing_class=tokenizer).train()
    assert torch.isfinite(torch.tensor(result.training_loss)) and changed(before, model)


def test_grpo_trainer_samples_with_generate_and_learns_from_a_reward(tmp_path, tokenizer):
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": "Say something."}]}] * 8)
    seen = []

    def length_reward(completions, **kwargs):  # a trivial reward that still differs between completions
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        seen.extend(texts)
        return [len(t) / 10 for t in texts]

    model = tiny_model(vocab_size=1000)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = GRPOConfig(**settings(tmp_path), num_generations=2, max_completion_length=8, generation_batch_size=4)
    result = GRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=prompts,
                         processing_class=tokenizer).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert len(seen) >= 4 and changed(before, model)
