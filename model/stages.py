"""What each training stage trains on, what it optimises and where its result goes.

The numbered scripts parse their flags and call one of the `*_task` builders here; `Trainer` does the rest.
Outputs are named as upstream: out/pretrain_512.safetensors, out/full_sft_512_moe.safetensors, ...
"""
import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from .checkpoint import save_weights
from .dataset import DPODataset, PretrainDataset, SFTDataset, pad_collate, resolve_index
from .errors import InputError
from .model import next_token_targets
from .trainer import Task, model_config_from_args


def output_name(stage: str, config) -> str:
    return f"{stage}_{config.dim}" + ("_moe" if config.use_moe else "")


def lm_loss(model, batch):
    """Next-token cross-entropy on the labelled tokens (+ the MoE balance loss, which the model adds)."""
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    return out.loss, ({"aux_loss": out.aux_loss.detach()} if out.aux_loss is not None else {})


def tokenizer_metadata(tokenizer_dir) -> dict:
    """Recorded in the weights file, so chat scripts find the tokenizer a model was trained with."""
    from .tokenizer import DEFAULT_TOKENIZER_DIR

    return {"tokenizer": str(Path(tokenizer_dir or DEFAULT_TOKENIZER_DIR).resolve())}


def safetensors_saver(name: str, metadata: dict | None = None):
    def save(model, state, out_dir: Path) -> Path:
        path = Path(out_dir) / f"{name}.safetensors"
        save_weights(path, state, model.config, metadata)
        return path
    return save


def hold_out(dataset, every: int = 50):
    """Every n-th row for validation (deterministic), the rest for training."""
    n = len(dataset)
    val = list(range(every - 1, n, every)) if n >= 2 * every else []
    taken = set(val)
    return Subset(dataset, [i for i in range(n) if i not in taken]), (Subset(dataset, val) if val else None)


def load_tokenizer_for(args):
    from .tokenizer import load_tokenizer

    return load_tokenizer(args.tokenizer)


def init_weights_from(args, default_stage: str, config_hint):
    """The starting model of a fine-tuning stage: --init_from, else the previous stage's default output."""
    from .loading import load_model

    path = args.init_from or str(Path(args.out_dir) / f"{output_name(default_stage, config_hint)}.safetensors")
    if not Path(path).exists() and not Path(path + ".safetensors").exists() and not Path(path).is_dir():
        raise FileNotFoundError(f"no starting weights at {path}: run the {default_stage} stage first or pass --init_from")
    model = load_model(path)
    if args.dropout is not None:
        model.config.dropout = args.dropout
    return model.train(), path


# --------------------------------------------------------------------------------------------------- stages
def seed_everything(seed: int):
    """Fresh weights (a new model, LoRA matrices) come out the same in every process and every run."""
    import random

    random.seed(seed)
    torch.manual_seed(seed)


def pretrain_task(args):
    from .model import MiniMindForCausalLM

    seed_everything(args.seed)
    config = model_config_from_args(args, max_seq_len=args.max_seq_len)
    train = PretrainDataset(args.data_path, args.max_seq_len, "train")
    if train.vocab_size and train.vocab_size > config.vocab_size:
        raise InputError(f"the data was tokenized with a vocabulary of {train.vocab_size}; the model has "
                         f"{config.vocab_size} (set --vocab_size)")
    if args.val_path:  # asked for: a bad one is an error
        val = PretrainDataset(args.val_path, args.max_seq_len, "val")
    else:  # the data's own held-out split; without one, no validation
        val = PretrainDataset(args.data_path, args.max_seq_len, "val", allow_empty=True)
        val = val if len(val) else None
    if args.init_from:
        from .loading import load_model

        model = load_model(args.init_from).train()
        config = model.config
    else:
        model = MiniMindForCausalLM(config)
    name = output_name("pretrain", config)
    index_tokenizer = json.loads(resolve_index(args.data_path).read_text()).get("tokenizer")
    meta = tokenizer_metadata(args.tokenizer or index_tokenizer)
    return model, Task(name, train, lm_loss, safetensors_saver(name, meta), val_data=val)


def sft_task(args):
    seed_everything(args.seed)
    hint = model_config_from_args(args, max_seq_len=args.max_seq_len)
    model, source = init_weights_from(args, "pretrain", hint)
    print(f"initial weights: {source}")
    if args.freeze_embeddings:
        # The tied embedding/output matrix holds what pretraining learned about every word; freezing it
        # keeps small-data SFT from overwriting facts it never shows (see the demo corpus notes).
        model.get_input_embeddings().weight.requires_grad_(False)
    tokenizer = load_tokenizer_for(args)
    data = SFTDataset(args.data_path, tokenizer, args.max_seq_len)
    train, val = hold_out(data) if not args.val_path else (data, SFTDataset(args.val_path, tokenizer, args.max_seq_len))
    name = output_name("full_sft", model.config)
    collate = partial(pad_collate, pad_id=tokenizer.pad_token_id or 0)
    save = safetensors_saver(name, tokenizer_metadata(args.tokenizer))
    return model, Task(name, train, lm_loss, save, val_data=val, collate=collate)


LORA_TARGETS = "wq,wk,wv,wo,w1,w2,w3"  # attention and FFN projections


def add_lora(model, base_path: str, rank: int, alpha: float, dropout: float, targets: str):
    from peft import LoraConfig, get_peft_model

    model.name_or_path = str(base_path)  # peft records it as the adapter's base model
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets.split(","),
                        bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_path)
    return peft_model


def adapter_saver(name: str, merge: bool, metadata: dict | None = None):
    """peft's adapter folder (adapter_config.json + adapter_model.safetensors); with merge, a full model too."""
    def save(model, state, out_dir: Path) -> Path:
        folder = Path(out_dir) / name
        model.save_pretrained(str(folder))
        if merge:
            merged = model.merge_and_unload()
            save_weights(Path(out_dir) / f"{name}_merged.safetensors", merged.state_dict(), merged.config, metadata)
        return folder
    return save


def lora_task(args):
    from .loading import load_model

    seed_everything(args.seed)
    base = load_model(args.ckpt).train()
    model = add_lora(base, args.ckpt, args.lora_rank, args.lora_alpha, args.lora_dropout, args.target_modules)
    tokenizer = load_tokenizer_for(args)
    data = SFTDataset(args.data_path, tokenizer, args.max_seq_len)
    train, val = hold_out(data) if not args.val_path else (data, SFTDataset(args.val_path, tokenizer, args.max_seq_len))
    name = output_name("lora_sft", base.config)
    collate = partial(pad_collate, pad_id=tokenizer.pad_token_id or 0)
    save = adapter_saver(name, args.merge, tokenizer_metadata(args.tokenizer))
    return model, Task(name, train, lm_loss, save, val_data=val, collate=collate)


# ------------------------------------------------------------------------------------------------------- DPO
def sequence_logps(model, input_ids, labels):
    """Sum of log p(token) over the labelled tokens of each row: (B,)."""
    logits = model(input_ids=input_ids).logits.float()  # (B, T, V)
    targets = next_token_targets(labels)  # (B, T)
    mask = targets != -100
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (logps * mask).sum(dim=-1)


def dpo_objective(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * [(pi_c - ref_c) - (pi_r - ref_r)]).

    With label_smoothing e the preference is trusted with probability 1 - e (conservative DPO).
    Returns the mean loss and the implicit rewards beta * (pi - ref) of chosen and rejected answers.
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses.mean(), chosen_reward, rejected_reward


def dpo_collate(batch, pad_id=0):
    """Chosen rows first, then rejected rows, all padded to one width: a single forward scores both."""
    rows = [{"input_ids": b["chosen_input_ids"], "labels": b["chosen_labels"]} for b in batch]
    rows += [{"input_ids": b["rejected_input_ids"], "labels": b["rejected_labels"]} for b in batch]
    return pad_collate(rows, pad_id)


def reference_logps(model, reference, input_ids, labels):
    with torch.no_grad():
        if reference is None:  # LoRA: the base model with the adapter switched off is the reference
            with model.disable_adapter():
                return sequence_logps(model, input_ids, labels)
        return sequence_logps(reference, input_ids, labels)


def dpo_loss(beta, label_smoothing):
    def loss(model, batch, reference=None):  # the trainer passes Task.frozen["reference"], placed with the model
        ids, labels = batch["input_ids"], batch["labels"]
        policy = sequence_logps(model, ids, labels)
        ref = reference_logps(getattr(model, "module", model), reference, ids, labels)
        (pc, pr), (rc, rr) = policy.chunk(2), ref.chunk(2)
        value, chosen_reward, rejected_reward = dpo_objective(pc, pr, rc, rr, beta, label_smoothing)
        return value, {"reward_accuracy": (chosen_reward > rejected_reward).float().mean().detach(),
                       "chosen_reward": chosen_reward.mean().detach(),
                       "rejected_reward": rejected_reward.mean().detach(),
                       "reward_margin": (chosen_reward - rejected_reward).mean().detach()}
    return loss


def dpo_task(args):
    import copy

    from .loading import load_model

    seed_everything(args.seed)
    model = load_model(args.ckpt).train()
    config = model.config
    if args.lora_rank > 0:
        model, reference = add_lora(model, args.ckpt, args.lora_rank, args.lora_alpha, 0.0, LORA_TARGETS), None
    else:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    tokenizer = load_tokenizer_for(args)
    data = DPODataset(args.data_path, tokenizer, args.max_seq_len, args.max_prompt_length)
    train, val = hold_out(data) if not args.val_path else (
        data, DPODataset(args.val_path, tokenizer, args.max_seq_len, args.max_prompt_length))
    name = output_name("dpo", config)
    meta = tokenizer_metadata(args.tokenizer)
    save = adapter_saver(name, True, meta) if reference is None else safetensors_saver(name, meta)
    return model, Task(name, train, dpo_loss(args.beta, args.label_smoothing), save, val_data=val,
                       collate=partial(dpo_collate, pad_id=tokenizer.pad_token_id or 0),
                       frozen={} if reference is None else {"reference": reference})
