"""The one training loop behind every training script (pretrain, SFT, LoRA, DPO).

A script builds a model and a `Task` (datasets, a loss, the frozen modules it reads, how to save the result) and
calls `Trainer(args, model, task).fit()`. The loop handles the rest the same way for every stage: devices and
precision, gradient accumulation, AdamW with warmup + cosine, a stop on non-finite loss, atomic checkpoints with
exact resume, validation, metrics, a loss plot, wandb, and SIGTERM / Ctrl-C. What differs between one device, DDP,
FSDP2 and DeepSpeed lives in model/distributed.py. Between log steps the loop never waits for the device: losses
and the non-finite flag stay there until a log, checkpoint or stop step reads them.
"""
import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .checkpoint import CheckpointManager, check_state
from .distributed import close_process_group, make_strategy
from .errors import InputError, ReportedError, Stopped
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
    g.add_argument("--group_by_length", action="store_true",
                   help="batch rows of similar length (less padding; transformers' Trainer flag of that name)")
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
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="keep only each block's input for the backward pass and recompute the rest: less memory for "
                        "about a third more compute")
    g.add_argument("--resume", default="none", help="auto (newest valid checkpoint), a checkpoint path, or none")
    g.add_argument("--init_from", default=None, help="weights to start from")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder (default model/minimind_tokenizer)")
    g.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"],
                   help="under torchrun (or another launcher): ddp, or fsdp for FSDP2")
    g.add_argument("--deepspeed", default=None, help="a DeepSpeed config (e.g. ds_config.json); use its launcher")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--keep_freed_memory", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU runs: glibc keeps freed memory for reuse instead of returning it to the OS, which makes "
                        "steps faster and keeps the process at its peak memory")
    parser.set_defaults(**defaults)
    return g


# ------------------------------------------------------------------------------------------------- helpers
@dataclass
class Task:
    """What differs between stages. `loss(model, batch, **frozen)` returns the mean loss and extra metrics (tensors).

    `frozen` holds the modules the loss reads but never trains (DPO's reference, a teacher), by the name the loss
    takes them as: the trainer places and casts them with the model, so a stage never leaves one where it built it.
    """
    name: str
    train_data: Dataset
    loss: Callable
    save_final: Callable  # (raw model, its full state dict, out_dir) -> path of the result
    val_data: Dataset | None = None
    collate: Callable | None = None
    count_tokens: Callable = lambda batch: int(batch["input_ids"].numel())
    frozen: dict[str, torch.nn.Module] = field(default_factory=dict)
    # GRPO's --iterations: every optimizer step's batches are seen `repeat` times in a row (several updates from
    # one set of rollouts); what the loss keeps between them is its `state`, saved with every checkpoint.
    repeat: int = 1
    state: Callable | None = None  # () -> a picklable dict of tensors and plain values
    load_state: Callable | None = None  # (that dict) -> None
    plot_note: str = ""  # under the loss plot's title: what its curves are
    plot_metric: str | None = None  # a metric drawn beside the loss (DPO's reward accuracy, GRPO's reward)


class NonFiniteLoss(ReportedError, RuntimeError):
    """The loss turned NaN or infinite; the message names the step, the checkpoint kept and what to change."""


CUDA_INSTALL = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"


def to_device(batch: dict, device, non_blocking: bool = False) -> dict:
    """A batch's tensors on the device; what a collate function kept on the host (lists) stays there."""
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def pick_device(flag: str, local_rank: int = 0) -> torch.device:
    """The device --device names (auto: cuda, then mps, then cpu); InputError if this torch cannot use it."""
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise InputError(f"--device {flag}: not a device (cpu, cuda, cuda:N, mps or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            have = (f"a CPU-only build ({torch.__version__})" if torch.version.cuda is None else
                    f"built for CUDA {torch.version.cuda} but finds no GPU (is the NVIDIA driver loaded? nvidia-smi)")
            raise InputError(f"--device {flag} asks for an NVIDIA GPU; this torch is {have}. For the CUDA build: "
                             f"{CUDA_INSTALL} (README: GPU)")
        index = local_rank if device.index is None else device.index
        count = torch.cuda.device_count()
        if index >= count:
            asked = f"cuda:{index}" + (" (LOCAL_RANK)" if device.index is None else "")
            raise InputError(f"--device {flag} asks for {asked}; this machine has {count} CUDA device"
                             f"{'s' if count > 1 else ''} (cuda:0 to cuda:{count - 1})")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {flag} asks for Apple's GPU (mps); this torch ({torch.__version__}) on this "
                         f"machine has none: use --device cpu")
    return device


def keep_freed_memory() -> bool:
    """Make glibc keep large freed blocks for reuse instead of handing them back to the OS; False if not glibc.

    By default every block over 32 MB is mmapped when allocated and unmapped when freed, so a CPU training step,
    which allocates the same large buffers each time (the logits and their gradient), pays a page fault for every
    4 KB of them, every step. jemalloc and tcmalloc, which Intel's PyTorch CPU tuning guide recommends, keep freed
    memory by default; this does the same for glibc, in-process (README: Benchmarks). The process keeps its peak
    memory. It changes the whole process, so only scripts call it, at their start (`keep_freed_memory_if_asked`).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False  # not glibc: nothing to set
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt(M_MMAP_MAX, 0)  # large blocks come from the heap too
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # and freed ones stay there
    return True


def keep_freed_memory_if_asked(args):
    """The training scripts' opt-in, at their start: `keep_freed_memory` for CPU runs unless --no-keep_freed_memory.
    Resolving --device here also reports a device this torch cannot use before any data or weights load."""
    rank, _, local_rank = rank_info()
    if pick_device(args.device, local_rank).type == "cpu" and args.keep_freed_memory and keep_freed_memory():
        if rank == 0:
            print("CPU run: glibc keeps freed memory for reuse (faster steps; --no-keep_freed_memory turns it off)")


def train_stage(parser: argparse.ArgumentParser, make_task: Callable, argv=None) -> dict:
    """What every training script's main does: parse its flags, opt in to the CPU allocator setting, build the
    stage's model and task, and train."""
    args = parser.parse_args(argv)
    keep_freed_memory_if_asked(args)
    model, task = make_task(args)
    result = Trainer(args, model, task).fit()
    close_process_group()  # after a clean finish only: a rank that failed may leave the others inside a collective
    return result


def resolve_precision(device_type: str, flag: str, bf16_supported: bool | None = None):
    """The autocast dtype, or None for fp32. fp16 also gets a GradScaler (see distributed.SingleDevice)."""
    if flag == "auto":
        if device_type != "cuda":
            return None
        # Native bf16 only: emulated bf16 (V100, T4) runs slower than fp16 with a GradScaler
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False) if bf16_supported is None else bf16_supported
        return torch.bfloat16 if bf16 else torch.float16
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[flag]


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


class AdamW(torch.optim.AdamW):
    """torch's AdamW, whose step is skipped while `skip` (a 0-d float tensor on the device, 1 = skip) is set.

    The fused kernel skips a step whose `found_inf` is set without the host reading it: GradScaler's mechanism for
    fp16 overflows, here also carrying the loop's non-finite-loss flag. Without a fused kernel for the device the
    flag is read on the host.
    """
    skip: torch.Tensor | None = None

    def step(self, closure=None):
        if self.skip is None:
            return super().step(closure)
        if not self.defaults["fused"]:
            return None if self.skip.item() else super().step(closure)
        scaler_flag = self.__dict__.get("found_inf")  # GradScaler.step sets its overflow flag here (fp16)
        self.found_inf = self.skip if scaler_flag is None else torch.maximum(scaler_flag, self.skip)
        try:
            return super().step(closure)
        finally:
            if scaler_flag is None:
                del self.found_inf
            else:
                self.found_inf = scaler_flag


class DeviceSums:
    """Running sums of tensors, kept on their device: adding never waits for it, `read` does (at log steps)."""

    def __init__(self):
        self.sums = {}

    def add(self, values: dict, weight: float = 1.0):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float() * weight

    def read(self, strategy) -> dict:
        return strategy.mean(self.sums) if self.sums else {}


class FiniteCheck:
    """Whether the loss stayed finite, tracked on the device so the loop never waits for it.

    From the first optimizer step with a non-finite loss on, every step is skipped on the device (AdamW.skip), so
    the weights stay those of the last good step until the loop reads the flag at a log, checkpoint or stop step.
    """

    def __init__(self, device):
        self.bad_since = torch.zeros((), dtype=torch.long, device=device)  # the first bad optimizer step; 0: none
        self.pending = torch.zeros((), dtype=torch.bool, device=device)  # a bad micro-step in the current step

    def observe(self, loss):
        self.pending = self.pending | ~torch.isfinite(loss)

    def skip_flag(self, step: int, strategy) -> torch.Tensor:
        """The skip flag for optimizer step `step`, the same on every process (so all skip the same steps)."""
        bad = strategy.max_(self.pending.float())
        self.bad_since = torch.where((self.bad_since == 0) & (bad > 0), step, self.bad_since)
        self.pending = torch.zeros_like(self.pending)
        return (self.bad_since > 0).float()

    def first_bad_step(self) -> int:
        return int(self.bad_since)  # the host waits for the device here


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, a disjoint slice per rank) that can skip what a run
    already consumed, so a resumed epoch continues with exactly the next batch."""

    def __init__(self, dataset, num_replicas, rank, seed, shuffle=True, repeat: int = 1, group: int = 1,
                 sizes=None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.repeat, self.group = repeat, group  # each run of `group` indices comes `repeat` times in a row
        self.sizes = sizes  # given: batch rows of similar size (--group_by_length)
        self.start, self.end = 0, self.num_samples // group * group * repeat

    def __iter__(self):
        order = list(super().__iter__())
        if self.sizes is not None:
            order = self.grouped_by_size(order)
        if self.repeat > 1:
            groups = [order[i:i + self.group] for i in range(0, len(order) - self.group + 1, self.group)]
            order = [i for g in groups for _ in range(self.repeat) for i in g]
        return iter(order[self.start:self.end])

    def grouped_by_size(self, order: list[int], megabatch: int = 50) -> list[int]:
        """transformers' length-grouped sampling: the shuffled order cut into runs of 50 batches, each run sorted
        by size, so that a batch pads to little more than its own rows; then the batches shuffled, so that long
        and short ones keep alternating through the learning-rate schedule. Seeded by the epoch, as the order."""
        span = self.group * megabatch
        runs = [sorted(order[i:i + span], key=lambda j: -self.sizes[j]) for i in range(0, len(order), span)]
        batches = [run[i:i + self.group] for run in runs for i in range(0, len(run), self.group)]
        partial = batches.pop() if len(batches[-1]) < self.group else []  # stays last: the epoch drops it
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(batches)
        return [i for b in batches for i in b] + partial

    def __len__(self):
        return self.end - self.start


def plot_metrics(metrics_file: Path, png: Path, title: str, note: str = "", second: str | None = None):
    """The loss curves of a run, training and validation; `second` names a metric (e.g. DPO's reward accuracy)
    drawn on a right-hand axis, training and validation too; `note` says under the title what the curves are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"train loss": [], "validation loss": [], f"train {second}": [], f"validation {second}": []}
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        for key, name in (("loss", "train loss"), ("val_loss", "validation loss"), (second, f"train {second}"),
                          (f"val_{second}", f"validation {second}")):
            if key and key in row:
                series[name].append((row["step"], row[key]))
    fig, ax = plt.subplots(figsize=(7, 4.3 if note else 4), dpi=100)
    for name, style in (("train loss", "-"), ("validation loss", "o-")):
        if series[name]:
            ax.plot(*zip(*series[name]), style, label=name, lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=10)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if second and (series[f"train {second}"] or series[f"validation {second}"]):
        right = ax.twinx()
        for name, style in ((f"train {second}", "-"), (f"validation {second}", "s-")):
            if series[name]:
                right.plot(*zip(*series[name]), style, label=name.replace("_", " "), lw=1.0, color="tab:green",
                           alpha=0.6 if name.startswith("train") else 1.0)
        right.set_ylabel(second.replace("_", " "))
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    with atomic_writer(png, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, args, model: torch.nn.Module, task: Task, device: torch.device | None = None):
        """`device` overrides --device (the placement test uses the meta device)."""
        self.args, self.task = args, task
        self.device = device or pick_device(args.device, rank_info()[2])
        if self.device.type == "cuda":  # before anything asks the current device: each rank its own GPU, not cuda:0
            torch.cuda.set_device(self.device)
        self.amp_dtype = resolve_precision(self.device.type, args.dtype)
        self.accum = max(1, args.accumulation_steps)
        self.strategy = make_strategy(args, self.device, self.amp_dtype, self.accum)
        self.rank, self.world = self.strategy.rank, self.strategy.world
        self.master = self.rank == 0
        self.run_dir = Path(args.out_dir) / task.name
        self.checkpoints = CheckpointManager(self.run_dir, args.keep_checkpoints)
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self.row_sizes = None
        if getattr(args, "group_by_length", False):
            from .dataset import row_sizes

            self.row_sizes = row_sizes(task.train_data)
            if self.row_sizes is None:
                raise InputError(f"--group_by_length: {task.name}'s data has no row lengths (rows of a jsonl file "
                                 f"only)")

        self.steps_per_epoch = len(self.make_sampler(0)) // args.batch_size // self.accum
        if self.steps_per_epoch == 0:
            raise InputError(f"{len(task.train_data)} training samples give no full step of batch_size "
                             f"{args.batch_size} x accumulation {self.accum} x {self.world} processes")
        # Only whole optimizer steps: a partial accumulation group would leak gradients into the next epoch.
        self.epoch_samples = self.steps_per_epoch * self.accum * args.batch_size
        total = self.steps_per_epoch * args.epochs
        self.total_steps = min(total, args.max_steps) if args.max_steps else total
        self.raw_model = model
        if getattr(args, "gradient_checkpointing", False):
            # The non-reentrant kind, which PyTorch recommends: it needs no input that requires a gradient
            # (frozen embeddings, LoRA) and works with torch.compile.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model, self.optimizer = self.strategy.setup(model, self.make_optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_schedule(args.warmup_iters, self.total_steps, args.min_lr_ratio))
        self.frozen = {name: self.strategy.place_frozen(m) for name, m in task.frozen.items()}
        self.finite = FiniteCheck(self.device)
        self.step = self.epoch = self.consumed = 0
        self.wandb_id, self.wandb = None, None
        self.stop_signal = 0
        self.last_val_loss = None
        self.bar, self.tokens_seen = None, 0
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16 with loss scaling"}[self.amp_dtype]
        self.log(f"{task.name}: {self.strategy.describe()}, {precision}, {self.total_steps} steps")

    # -- setup
    def make_optimizer(self, model):
        fused = self.device.type in ("cuda", "cpu", "mps")
        return AdamW(param_groups(model, self.args.weight_decay), lr=self.args.learning_rate, betas=(0.9, 0.95),
                     eps=1e-8, fused=fused)

    def make_sampler(self, epoch):
        sampler = ResumableSampler(self.task.train_data, self.world, self.rank, self.args.seed,
                                   repeat=self.task.repeat, group=self.args.batch_size * self.accum,
                                   sizes=self.row_sizes)
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

    # -- checkpoints
    def rng_state(self):
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, states):
        mine = states[self.rank] if len(states) > self.rank else states[0]
        torch.set_rng_state(mine["torch"])
        random.setstate(tuple(mine["python"]))
        if "cuda" in mine and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], self.device)

    def save_checkpoint(self):
        """A collective: every rank writes its part into one temporary folder, then rank 0 the weights, the
        training state and the manifest, and renames the folder into place."""
        rng = self.strategy.gather(self.rng_state())
        task_state = self.strategy.gather(self.task.state()) if self.task.state else None
        tmp = self.checkpoints.staging(self.step)
        if self.master:
            self.checkpoints.begin(tmp)
        self.strategy.barrier()
        model_state, optim_state = self.strategy.save(tmp)
        if self.master:
            train_state = {"step": self.step, "epoch": self.epoch, "consumed": self.consumed, "optimizer": optim_state,
                           "scheduler": self.scheduler.state_dict(), "scaler": self.strategy.scaler.state_dict(),
                           "rng": rng, "wandb_id": self.wandb_id or "", "world": self.world,
                           "total_steps": self.total_steps}
            if task_state is not None:
                train_state["task"] = task_state
            self.checkpoints.write(tmp, model_state, train_state, getattr(self.raw_model, "config", None))
        self.strategy.barrier()  # every rank's files are in
        if self.master:
            self.log(f"checkpoint saved: {self.checkpoints.commit(self.step, tmp)}")
        self.strategy.barrier()  # no rank leaves (and maybe exits) before the checkpoint is in place

    def resume(self):
        choice = self.args.resume
        if not choice or choice == "none":
            return
        path = self.checkpoints.latest_valid(log=self.log) if choice == "auto" else Path(choice)
        if path is None:
            self.log(f"--resume auto: no valid checkpoint in {self.checkpoints.dir}, starting fresh")
            return
        model_state, state = CheckpointManager.load(path)
        model_state = check_state(self.raw_model, model_state, str(path))  # names any difference
        self.strategy.load(path, model_state, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.strategy.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.consumed = state["step"], state["epoch"], state["consumed"]
        self.wandb_id = state.get("wandb_id") or None
        self.set_rng_state(state["rng"])
        if self.task.load_state and "task" in state:
            self.task.load_state(state["task"][self.rank] if len(state["task"]) > self.rank else state["task"][0])
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

    def log_step(self, window: DeviceSums):
        elapsed = time.time() - self.t_log
        row = {"step": self.step, "epoch": self.epoch, **window.read(self.strategy),
               "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": self.tokens_seen / max(elapsed, 1e-9),
               "elapsed_s": round(time.time() - self.t_start, 2)}
        self.record(row)
        self.tokens_seen, self.t_log = 0, time.time()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        elif not self.args.quiet:
            extra = "".join(f", {k} {row[k]:.3f}" for k in ("reward", "reward_accuracy") if k in row)
            self.log(f"{self.task.name} step {self.step}/{self.total_steps}: loss {row['loss']:.4f}{extra}, "
                     f"lr {row['lr']:.2e}, {row['tokens_per_s']:.0f} tokens/s")

    # -- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        if self.task.val_data is None or len(self.task.val_data) == 0:
            return None
        self.model.eval()
        sampler = DistributedSampler(self.task.val_data, self.world, self.rank, shuffle=False)
        loader = self.make_loader(self.task.val_data, sampler, 0)
        sums, n = DeviceSums(), 0
        for batch in loader:
            if n >= self.args.eval_batches:
                break
            batch = to_device(batch, self.device)
            with autocast_context(self.device.type, self.amp_dtype):
                loss, metrics = self.task.loss(self.model, batch, **self.frozen)
            sums.add({"loss": loss, **metrics})
            n += 1
        self.model.train()
        if n == 0:
            return None
        return {f"val_{k}": v / n for k, v in sums.read(self.strategy).items()}

    def run_eval(self):
        val = self.evaluate()
        if val is not None:
            self.last_val_loss = val["val_loss"]
            self.record({"step": self.step, **val})
            self.log(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
            if self.master:
                plot_metrics(self.metrics_file, self.run_dir / "loss.png", self.task.name, self.task.plot_note,
                             self.task.plot_metric)

    # -- the loop
    def fit(self) -> dict:
        """Train to --max_steps or the last epoch and save the result. A stop signal saves a checkpoint and raises
        Stopped; a non-finite loss saves the last good state and raises NonFiniteLoss."""
        args = self.args
        torch.manual_seed(args.seed + self.rank)
        random.seed(args.seed + self.rank)
        self.resume()
        self.start_wandb()
        if self.master:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.bar = None
        if self.master and not args.quiet and sys.stderr.isatty():  # elsewhere (a log file): a line per log step
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, initial=self.step, desc=self.task.name, dynamic_ncols=True)
        self.t_start = self.t_log = time.time()
        self.model.train()
        try:
            while self.step < self.total_steps:
                self.train_epoch()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.bar is not None:
                self.bar.close()
        return self.finish(time.time() - self.t_start)

    def train_epoch(self):
        """From the current data position to the end of the epoch, or of training."""
        args = self.args
        sampler = self.make_sampler(self.epoch)
        sampler.start, sampler.end = self.consumed, self.epoch_samples
        window = DeviceSums()  # this optimizer step's loss and metrics, on the device until a log step reads them
        for micro, batch in enumerate(self.make_loader(self.task.train_data, sampler, args.seed + self.epoch)):
            sync = (micro + 1) % self.accum == 0
            loss, metrics = self.micro_step(batch, sync)
            window.add({"loss": loss, **metrics}, 1 / self.accum)
            if not sync:
                continue
            self.optimizer_step()
            epoch_done, last = self.consumed == self.epoch_samples, self.step == self.total_steps
            log = self.step % args.log_interval == 0 or last
            stop = self.strategy.max_over_ranks(self.stop_signal)
            save = stop or epoch_done or last or (args.save_interval and self.step % args.save_interval == 0)
            if log or save:  # the only places the host waits for the device
                self.check_finite()
            if log:
                self.log_step(window)
            window = DeviceSums()
            if self.bar is not None:
                self.bar.update(1)
            if epoch_done:
                self.epoch, self.consumed = self.epoch + 1, 0
            if args.eval_interval and self.step % args.eval_interval == 0:
                self.run_eval()
            if save:
                self.save_checkpoint()
            if stop:
                raise Stopped(f"stopped by {signal.Signals(stop).name} at step {self.step}, checkpoint saved; "
                              f"resume with --resume auto", stop)
            if last:
                return

    def micro_step(self, batch, sync: bool):
        """Forward and backward of one batch; returns the loss and metrics, detached, on the device."""
        batch = to_device(batch, self.device, non_blocking=True)
        with self.strategy.micro_step(sync):
            with autocast_context(self.device.type, self.amp_dtype):
                loss, metrics = self.task.loss(self.model, batch, **self.frozen)
            self.strategy.backward(loss, sync)
        self.finite.observe(loss.detach())
        self.tokens_seen += self.task.count_tokens(batch) * self.world
        return loss.detach(), metrics

    def optimizer_step(self):
        self.optimizer.skip = self.finite.skip_flag(self.step + 1, self.strategy)
        self.strategy.step()
        self.scheduler.step()
        self.step += 1
        self.consumed += self.accum * self.args.batch_size

    def check_finite(self):
        """Read the non-finite flag (a sync). If a loss went bad, the steps since were skipped on the device: rewind
        the counters to the last good step, save that state and raise NonFiniteLoss."""
        bad = self.finite.first_bad_step()
        if not bad:
            return
        good = bad - 1
        self.consumed -= (self.step - good) * self.accum * self.args.batch_size  # the same epoch: checked at its end
        self.step = good
        self.scheduler.last_epoch = good - 1
        self.scheduler.step()  # the schedule is a function of the step: back to its value at the good one
        self.save_checkpoint()
        raise NonFiniteLoss(
            f"loss became non-finite at step {bad}; the last good state (step {good}) is saved in "
            f"{self.checkpoints.dir}. Lower --learning_rate, raise --warmup_iters or use --dtype bfloat16/float32, "
            f"then resume with --resume auto.")

    def finish(self, seconds: float) -> dict:
        if not (self.args.eval_interval and self.step % self.args.eval_interval == 0):
            self.run_eval()
        output = None
        state = self.strategy.model_state()
        if self.master:
            output = self.task.save_final(self.raw_model, state, Path(self.args.out_dir))
            self.log(f"saved {output}")
            if self.metrics_file.exists():
                plot_metrics(self.metrics_file, self.run_dir / "loss.png", self.task.name, self.task.plot_note,
                             self.task.plot_metric)
        if self.wandb is not None:
            self.wandb.finish()
        self.strategy.barrier()
        return {"step": self.step, "seconds": seconds, "val_loss": self.last_val_loss,
                "output": str(output) if output else None}

    def _on_signal(self, signum, frame):
        if self.stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.stop_signal = self.stop_signal or signum
        self.log(f"signal {signum}: finishing this step, saving a checkpoint, then stopping")
