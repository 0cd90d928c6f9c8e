"""The one training loop behind every training script (pretrain, SFT, LoRA, DPO).

A script builds a model and a `Task` (datasets, a loss, how to save the result) and calls `Trainer(args,
model, task).fit()`. The loop handles the rest the same way for every stage: devices and precision, DDP /
FSDP2 / DeepSpeed, gradient accumulation, AdamW with warmup + cosine, clipping, a stop on non-finite loss,
atomic checkpoints with exact resume, validation, metrics, a loss plot, wandb, and SIGTERM / Ctrl-C.
"""
import argparse
import contextlib
import json
import math
import os
import random
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .checkpoint import CheckpointManager, check_state
from .errors import InputError, ReportedError
from .io import atomic_writer


# ------------------------------------------------------------------------------------------------ arguments
def add_model_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("model (a preset, then any dims given here override it)")
    g.add_argument("--preset", default=None, help="minimind-v1-small | minimind-v1-moe | minimind-v1 | demo")
    for name, kind in (("dim", int), ("n_layers", int), ("n_heads", int), ("n_kv_heads", int), ("vocab_size", int),
                       ("hidden_dim", int), ("n_routed_experts", int), ("num_experts_per_tok", int),
                       ("dropout", float), ("rope_theta", float), ("aux_loss_alpha", float)):
        g.add_argument(f"--{name}", type=kind, default=None)
    g.add_argument("--use_moe", action="store_true", default=None)
    return g


def model_config_from_args(args, max_seq_len: int | None = None, base=None):
    from .LMConfig import PRESETS, LMConfig

    fields = dict(PRESETS["minimind-v1-small"]) if base is None else base.to_dict()
    if args.preset:
        fields.update(PRESETS[args.preset])
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "n_routed_experts",
                 "num_experts_per_tok", "dropout", "rope_theta", "aux_loss_alpha", "use_moe"):
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    if args.dim is not None and args.hidden_dim is None:
        fields["hidden_dim"] = None  # recompute from the new dim
    if max_seq_len:
        fields["max_seq_len"] = max_seq_len
    keep = set(LMConfig.__dataclass_fields__) if hasattr(LMConfig, "__dataclass_fields__") else None
    return LMConfig(**{k: v for k, v in fields.items() if keep is None or k in keep})


def add_train_args(parser: argparse.ArgumentParser, **defaults):
    """Upstream MiniMind's flags with their names and meanings, plus what exact resume and scale need."""
    g = parser.add_argument_group("training")
    g.add_argument("--out_dir", default="out")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--batch_size", type=int, default=32, help="per device, per micro-step")
    g.add_argument("--learning_rate", type=float, default=2e-4)
    g.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine decays to learning_rate * this")
    g.add_argument("--weight_decay", type=float, default=0.1, help="applied to matrices only")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 autocast on GPUs that support it, else fp16 with a GradScaler; fp32 on CPU")
    g.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    g.add_argument("--use_wandb", action="store_true")
    g.add_argument("--wandb_project", default="MiniMind")
    g.add_argument("--num_workers", type=int, default=0)
    g.add_argument("--data_path", default=None)
    g.add_argument("--val_path", default=None, help="validation data (default: the stage's own held-out split)")
    g.add_argument("--accumulation_steps", type=int, default=1)
    g.add_argument("--grad_clip", type=float, default=1.0)
    g.add_argument("--warmup_iters", type=int, default=0)
    g.add_argument("--log_interval", type=int, default=10)
    g.add_argument("--save_interval", type=int, default=500)
    g.add_argument("--eval_interval", type=int, default=0, help="0: validate only at the end")
    g.add_argument("--eval_batches", type=int, default=20)
    g.add_argument("--keep_checkpoints", type=int, default=3)
    g.add_argument("--local_rank", type=int, default=-1, help="set by the launcher; RANK/LOCAL_RANK are read too")
    g.add_argument("--max_seq_len", type=int, default=512)
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0: all epochs)")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--resume", default="none", help="auto (newest valid checkpoint), a checkpoint path, or none")
    g.add_argument("--init_from", default=None, help="weights to start from")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder (default model/minimind_tokenizer)")
    g.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"], help="multi-process strategy")
    g.add_argument("--deepspeed", default=None, help="a DeepSpeed config (e.g. ds_config.json); use its launcher")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(**defaults)
    return g


# ------------------------------------------------------------------------------------------------- helpers
@dataclass
class Task:
    """What differs between stages. `loss(model, batch)` returns the mean loss and extra metrics (tensors)."""
    name: str
    train_data: Dataset
    loss: Callable
    save_final: Callable  # (raw model, its full state dict, out_dir) -> path of the result
    val_data: Dataset | None = None
    collate: Callable | None = None
    count_tokens: Callable = lambda batch: int(batch["input_ids"].numel())


class NonFiniteLoss(ReportedError, RuntimeError):
    """The loss turned NaN or infinite; the message names the step, the checkpoint kept and what to change."""


def pick_device(flag: str, local_rank: int = 0) -> torch.device:
    if flag == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(flag)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def keep_freed_memory():
    """Make glibc keep large freed blocks for reuse instead of handing them back to the OS.

    By default every block over 32 MB is mmapped when allocated and unmapped when freed, so a CPU training step,
    which allocates the same large buffers each time (logits and their gradient: 105 MB each at batch 8 x 512 x
    6400), pays a page fault for every 4 KB of them, every step. jemalloc and tcmalloc, which Intel's PyTorch CPU
    tuning guide recommends, keep freed memory by default; this is the same for glibc, in-process. Measured on the
    26M model (batch 8 x 512, one AdamW step, Intel Xeon): 12-14% faster steps eager, 5-7% compiled. The process
    keeps its peak memory.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return  # not glibc: nothing to set
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt(M_MMAP_MAX, 0)  # large blocks come from the heap too
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # and freed ones stay there


def resolve_precision(device_type: str, flag: str, bf16_supported: bool | None = None):
    """(autocast dtype or None for fp32, whether a GradScaler is needed)."""
    if flag == "auto":
        if device_type != "cuda":
            return None, False
        bf16 = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
        return (torch.bfloat16, False) if bf16 else (torch.float16, True)
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[flag]
    return dtype, dtype is torch.float16


def autocast_context(device_type: str, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def rank_info():
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def cosine_schedule(warmup: int, total: int, min_ratio: float):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def param_groups(model, weight_decay):
    """Weight decay on matrices (and embeddings); none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, a disjoint slice per rank) that can skip what a run
    already consumed, so a resumed epoch continues with exactly the next batch."""

    def __init__(self, dataset, num_replicas, rank, seed, shuffle=True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start, self.end = 0, self.num_samples

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:self.end])

    def __len__(self):
        return self.end - self.start


def plot_metrics(metrics_file: Path, png: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            train.append((row["step"], row["loss"]))
        if "val_loss" in row:
            val.append((row["step"], row["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_writer(png, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, args, model: torch.nn.Module, task: Task):
        self.args, self.task = args, task
        self.rank, self.world, self.local_rank = rank_info()
        self.device = pick_device(args.device, self.local_rank)
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, device_id=self.device if backend == "nccl" else None)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.master = self.rank == 0
        self.amp_dtype, use_scaler = resolve_precision(self.device.type, args.dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.run_dir = Path(args.out_dir) / task.name
        self.checkpoints = CheckpointManager(self.run_dir, args.keep_checkpoints)
        self.metrics_file = self.run_dir / "metrics.jsonl"

        self.raw_model = model.to(self.device)
        self.model = self.wrap(self.raw_model)
        self.accum = max(1, args.accumulation_steps)
        self.steps_per_epoch = len(self.make_sampler(0)) // args.batch_size // self.accum
        if self.steps_per_epoch == 0:
            raise InputError(f"{len(task.train_data)} training samples give no full step of batch_size "
                             f"{args.batch_size} x accumulation {self.accum} x {self.world} processes")
        total = self.steps_per_epoch * args.epochs
        self.total_steps = min(total, args.max_steps) if args.max_steps else total
        self.optimizer, self.scheduler = self.make_optimizer()
        self.step = self.epoch = self.consumed = 0
        self.wandb_id, self.wandb = None, None
        self.stop_requested = False
        self.last_val_loss = None

    # -- setup
    def wrap(self, model):
        args = self.args
        if args.deepspeed:
            return model  # the DeepSpeed engine wraps it when the optimizer exists
        if args.compile:
            model = torch.compile(model)
        if self.world > 1 and args.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            blocks = set(getattr(self.raw_model, "_no_split_modules", None) or ())
            for layer in [m for m in self.raw_model.modules() if type(m).__name__ in blocks]:
                fully_shard(layer)
            fully_shard(self.raw_model)
            return model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        return model

    def make_optimizer(self):
        """AdamW and its warmup + cosine schedule; under DeepSpeed the engine then takes over the optimizer
        (ZeRO-2 partitions its state) while the schedule keeps driving the learning rate."""
        args = self.args
        groups = param_groups(self.raw_model, args.weight_decay)
        fused = self.device.type in ("cuda", "cpu") and not args.deepspeed
        opt = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, cosine_schedule(args.warmup_iters, self.total_steps, args.min_lr_ratio))
        if args.deepspeed:
            import deepspeed

            with open(self.args.deepspeed) as f:
                ds_config = json.load(f)
            ds_config.update(train_micro_batch_size_per_gpu=self.args.batch_size,
                             gradient_accumulation_steps=self.accum, gradient_clipping=self.args.grad_clip)
            if self.amp_dtype is torch.bfloat16:
                ds_config["bf16"] = {"enabled": True}
            elif self.amp_dtype is torch.float16:
                ds_config["fp16"] = {"enabled": True}
            self.model, opt, _, _ = deepspeed.initialize(model=self.raw_model, optimizer=opt, config=ds_config)
        return opt, scheduler

    def make_sampler(self, epoch):
        sampler = ResumableSampler(self.task.train_data, self.world, self.rank, self.args.seed)
        sampler.set_epoch(epoch)
        return sampler

    def make_loader(self, dataset, sampler, seed):
        generator = torch.Generator()
        generator.manual_seed(seed)  # the loader's own RNG: creating it never disturbs the training RNG
        return DataLoader(dataset, batch_size=self.args.batch_size, sampler=sampler, collate_fn=self.task.collate,
                          num_workers=self.args.num_workers, pin_memory=self.device.type == "cuda",
                          drop_last=True, generator=generator)

    def log(self, msg):
        if self.master:
            print(msg, flush=True)

    # -- distributed helpers
    def any_rank(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean_over_ranks(self, values: dict) -> dict:
        if self.world == 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], device=self.device)
        dist.all_reduce(t)
        return {k: v / self.world for k, v in zip(keys, t.tolist())}

    def micro_step_context(self, sync: bool):
        if self.world > 1 and not sync and not self.args.deepspeed:
            if self.args.strategy == "fsdp":
                self.raw_model.set_requires_gradient_sync(False)
                return contextlib.nullcontext()
            return self.model.no_sync()
        if self.world > 1 and self.args.strategy == "fsdp" and not self.args.deepspeed:
            self.raw_model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()

    # -- checkpoints
    def rng_state(self):
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.world > 1:
            everyone = [None] * self.world
            dist.all_gather_object(everyone, state)
            return everyone
        return [state]

    def set_rng_state(self, states):
        mine = states[self.rank] if len(states) > self.rank else states[0]
        torch.set_rng_state(mine["torch"])
        random.setstate(tuple(mine["python"]))
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda"], self.device)

    def full_state(self, with_optimizer=True):
        """Whole (unsharded) model and optimizer state on rank 0; a collective call under FSDP."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if with_optimizer:
            return get_state_dict(self.raw_model, self.optimizer, options=options)
        return get_model_state_dict(self.raw_model, options=options)

    def save_checkpoint(self):
        rng = self.rng_state()
        if self.args.deepspeed:  # ZeRO partitions the optimizer state: every rank saves its part, DeepSpeed's way
            ds_dir = self.checkpoints.dir / f"deepspeed_step_{self.step:08d}"
            self.model.save_checkpoint(str(ds_dir), tag="state")
            model_state, optim_state = self.full_state(with_optimizer=False), {"deepspeed_dir": str(ds_dir)}
        else:
            model_state, optim_state = self.full_state()
        if self.master:
            train_state = {"step": self.step, "epoch": self.epoch, "consumed": self.consumed, "optimizer": optim_state,
                           "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng,
                           "wandb_id": self.wandb_id or "", "world": self.world, "total_steps": self.total_steps}
            path = self.checkpoints.save(self.step, model_state, train_state, getattr(self.raw_model, "config", None))
            self.log(f"checkpoint saved: {path}")
        if self.world > 1:
            dist.barrier()

    def resume(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        choice = self.args.resume
        if not choice or choice == "none":
            return
        path = self.checkpoints.latest_valid(log=self.log) if choice == "auto" else Path(choice)
        if path is None:
            self.log(f"--resume auto: no valid checkpoint in {self.checkpoints.dir}, starting fresh")
            return
        model_state, state = CheckpointManager.load(path)
        model_state = check_state(self.raw_model, model_state, str(path))  # names any difference
        if "deepspeed_dir" in state["optimizer"]:
            self.model.load_checkpoint(state["optimizer"]["deepspeed_dir"], tag="state")
        else:
            set_state_dict(self.raw_model, self.optimizer, model_state_dict=model_state,
                           optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.consumed = state["step"], state["epoch"], state["consumed"]
        self.wandb_id = state.get("wandb_id") or None
        self.set_rng_state(state["rng"])
        if self.master and self.metrics_file.exists():  # forget metrics logged after this checkpoint
            rows = [r for r in self.metrics_file.read_text().splitlines() if json.loads(r)["step"] <= self.step]
            with atomic_writer(self.metrics_file, "w") as f:
                f.write("".join(r + "\n" for r in rows))
        self.log(f"resumed from {path} at step {self.step} (epoch {self.epoch}, {self.consumed} samples into it)")

    # -- logging
    def record(self, row: dict):
        if not self.master:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def start_wandb(self):
        if not (self.args.use_wandb and self.master):
            return
        import wandb

        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.wandb_id = self.wandb_id or uuid.uuid4().hex[:8]  # kept in checkpoints: a resumed run continues it
        self.wandb = wandb.init(project=self.args.wandb_project, name=self.task.name, id=self.wandb_id,
                                resume="allow", mode=mode, dir=str(self.run_dir), config=vars(self.args))

    # -- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        if self.task.val_data is None or len(self.task.val_data) == 0:
            return None
        self.model.eval()
        sampler = DistributedSampler(self.task.val_data, self.world, self.rank, shuffle=False)
        loader = self.make_loader(self.task.val_data, sampler, 0)
        sums, n = {}, 0
        for i, batch in enumerate(loader):
            if i >= self.args.eval_batches:
                break
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with autocast_context(self.device.type, self.amp_dtype):
                loss, metrics = self.task.loss(self.model, batch)
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        self.model.train()
        if n == 0:
            return None
        return self.mean_over_ranks({f"val_{k}": v / n for k, v in sums.items()})

    # -- the loop
    def fit(self) -> dict:
        args = self.args
        torch.manual_seed(args.seed + self.rank)
        random.seed(args.seed + self.rank)
        self.resume()
        self.start_wandb()
        if self.master:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = None
        if self.master and not args.quiet:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=self.task.name, dynamic_ncols=True)
        start, tokens_seen, t_log = time.time(), 0, time.time()
        self.model.train()
        try:
            while self.step < self.total_steps and self.epoch < args.epochs:
                sampler = self.make_sampler(self.epoch)
                # Only whole optimizer steps: a partial accumulation group would leak gradients into the next epoch.
                sampler.start, sampler.end = self.consumed, self.steps_per_epoch * self.accum * args.batch_size
                loader = self.make_loader(self.task.train_data, sampler, args.seed + self.epoch)
                micro, bad_loss, window = 0, False, {}
                for batch in loader:
                    sync = (micro + 1) % self.accum == 0
                    batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                    with self.micro_step_context(sync), autocast_context(self.device.type, self.amp_dtype):
                        loss, metrics = self.task.loss(self.model, batch)
                    bad_loss |= not bool(torch.isfinite(loss.detach()))
                    if args.deepspeed:
                        self.model.backward(loss)
                    else:
                        self.scaler.scale(loss / self.accum).backward()
                    tokens_seen += self.task.count_tokens(batch) * self.world
                    for k, v in {"loss": loss.detach(), **metrics}.items():
                        window[k] = window.get(k, 0.0) + float(v) / self.accum
                    micro += 1
                    if not sync:
                        if args.deepspeed:
                            self.model.step()
                        continue
                    if self.any_rank(bad_loss):
                        self.optimizer.zero_grad(set_to_none=True)
                        self.save_checkpoint()
                        raise NonFiniteLoss(
                            f"loss became non-finite at step {self.step + 1}; the last good state is saved in "
                            f"{self.checkpoints.dir}. Lower --learning_rate, raise --warmup_iters or use --dtype "
                            f"bfloat16/float32, then resume with --resume auto.")
                    self.optimizer_step()
                    self.consumed += self.accum * args.batch_size
                    if self.step % args.log_interval == 0 or self.step == self.total_steps:
                        elapsed = time.time() - t_log
                        row = {"step": self.step, "epoch": self.epoch, **self.mean_over_ranks(window),
                               "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                               "elapsed_s": round(time.time() - start, 2)}
                        self.record(row)
                        tokens_seen, t_log = 0, time.time()
                        if bar is not None:
                            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                            tok_s=f"{row['tokens_per_s']:.0f}")
                    window = {}
                    if bar is not None:
                        bar.update(1)
                    if args.eval_interval and self.step % args.eval_interval == 0:
                        self.run_eval()
                    stop = self.any_rank(self.stop_requested)
                    if stop or (args.save_interval and self.step % args.save_interval == 0):
                        self.save_checkpoint()
                    if stop:
                        self.log(f"stopped by signal at step {self.step}; resume with --resume auto")
                        return {"stopped": True, "step": self.step}
                    if self.step >= self.total_steps:
                        break
                    bad_loss = False
                else:  # the epoch ran out
                    self.epoch, self.consumed = self.epoch + 1, 0
                    self.save_checkpoint()
                    continue
                break
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if bar is not None:
                bar.close()
        return self.finish(time.time() - start)

    def optimizer_step(self):
        args = self.args
        if args.deepspeed:
            self.model.step()
        else:
            if args.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_([p for p in self.raw_model.parameters() if p.requires_grad],
                                               args.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    def run_eval(self):
        val = self.evaluate()
        if val is not None:
            self.last_val_loss = val["val_loss"]
            self.record({"step": self.step, **val})
            self.log(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
            if self.master:
                plot_metrics(self.metrics_file, self.run_dir / "loss.png", self.task.name)

    def finish(self, seconds: float) -> dict:
        if not (self.args.eval_interval and self.step % self.args.eval_interval == 0):
            self.run_eval()
        output = None
        state = self.full_state(with_optimizer=False)
        if self.master:
            output = self.task.save_final(self.raw_model, state, Path(self.args.out_dir))
            self.log(f"saved {output}")
            if self.metrics_file.exists():
                plot_metrics(self.metrics_file, self.run_dir / "loss.png", self.task.name)
        if self.wandb is not None:
            self.wandb.finish()
        if self.world > 1:
            dist.barrier()
        return {"stopped": False, "step": self.step, "seconds": seconds, "val_loss": self.last_val_loss,
                "output": str(output) if output else None}

    def _on_signal(self, signum, frame):
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.stop_requested = True
        self.log(f"signal {signum}: finishing this step, saving a checkpoint, then stopping")
