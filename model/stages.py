"""What each training stage trains on, what it optimises and where its result goes.

The numbered scripts parse their flags and call one of the `*_task` builders here; `Trainer` does the rest.
Outputs are named as upstream: out/pretrain_512.safetensors, out/full_sft_512_moe.safetensors, ...
"""
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import Subset

from .checkpoint import save_weights
from .dataset import DPODataset, PretrainDataset, SFTDataset, pad_collate
from .trainer import Task, model_config_from_args


def output_name(stage: str, config) -> str:
    return f"{stage}_{config.dim}" + ("_moe" if config.use_moe else "")


def lm_loss(model, batch):
    """Next-token cross-entropy on the labelled tokens (+ the MoE balance loss, which the model adds)."""
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    return out.loss, ({"aux_loss": out.aux_loss.detach()} if out.aux_loss is not None else {})


def target_tokens(batch):
    return int((batch["labels"] != -100).sum())


def safetensors_saver(name: str):
    def save(model, state, out_dir: Path) -> Path:
        path = Path(out_dir) / f"{name}.safetensors"
        save_weights(path, state, model.config)
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
def pretrain_task(args):
    from .model import MiniMindLM

    config = model_config_from_args(args, max_seq_len=args.max_seq_len)
    train = PretrainDataset(args.data_path, args.max_seq_len, "train")
    if train.vocab_size and train.vocab_size > config.vocab_size:
        raise ValueError(f"the data was tokenized with a vocabulary of {train.vocab_size}; the model has "
                         f"{config.vocab_size} (set --vocab_size)")
    try:
        val = PretrainDataset(args.val_path or args.data_path, args.max_seq_len, "val")
    except ValueError:
        val = None
    torch.manual_seed(args.seed)  # identical initial weights on every rank and every resume
    if args.init_from:
        from .loading import load_model

        model = load_model(args.init_from).train()
        config = model.config
    else:
        model = MiniMindLM(config)
    name = output_name("pretrain", config)
    return model, Task(name, train, lm_loss, safetensors_saver(name), val_data=val)


def sft_task(args):
    hint = model_config_from_args(args, max_seq_len=args.max_seq_len)
    model, source = init_weights_from(args, "pretrain", hint)
    print(f"initial weights: {source}")
    if args.freeze_embeddings:
        # The tied embedding/output matrix holds what pretraining learned about every word; freezing it
        # keeps small-data SFT from overwriting facts it never shows (see the demo corpus notes).
        model.tok_embeddings.weight.requires_grad_(False)
    tokenizer = load_tokenizer_for(args)
    data = SFTDataset(args.data_path, tokenizer, args.max_seq_len)
    train, val = hold_out(data) if not args.val_path else (data, SFTDataset(args.val_path, tokenizer, args.max_seq_len))
    name = output_name("full_sft", model.config)
    collate = partial(pad_collate, pad_id=tokenizer.pad_token_id or 0)
    return model, Task(name, train, lm_loss, safetensors_saver(name), val_data=val, collate=collate)
