"""The trainer's backends, one small class each: one device, DDP, FSDP2 and DeepSpeed ZeRO-2.

A strategy owns what differs between them: placing and wrapping the model (and the frozen modules a loss reads),
the context of a micro-step inside a gradient-accumulation group, backward and the optimizer step (clipping, fp16
loss scaling), saving and loading its state, and the few exchanges between processes the loop needs.
`Trainer.fit` calls these and names no backend.
"""
import contextlib
import json
import os
import socket

import torch
import torch.distributed as dist

from .errors import InputError


def transformer_blocks(model: torch.nn.Module) -> list:
    """The model's repeated blocks: modules whose class its `_no_split_modules` names (found through peft and
    torch.compile wrappers, which forward the attribute to the model they hold)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def is_sharded(model) -> bool:
    """Whether `model` is an FSDP2 module (its weights sharded over the processes)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gathered_copy(model, copy=None):
    """A plain module holding an FSDP2 model's current weights whole, on every rank: what generation runs on. Each
    rank then decodes alone, for as many steps as its own rows need, with no collective inside the loop (through
    the sharded model, a rank whose rows ended early would stop all-gathering and the others would wait forever),
    and generation's inference mode never touches the parameters the optimizer updates. One gather per call, the
    same on every rank; `copy` (from the last call) is refilled in place."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    if hasattr(model, "peft_config"):
        raise InputError("GRPO with LoRA under --strategy fsdp is not supported: use --strategy ddp")
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if copy is None:
        plain = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
        copy = plain(model.config).to(next(iter(state.values())).device).requires_grad_(False)
    copy.load_state_dict(state)
    return copy.eval()


def launched() -> bool:
    """Started by torchrun, deepspeed or accelerate (they set WORLD_SIZE), even with a single process."""
    return "WORLD_SIZE" in os.environ


def close_process_group():
    """Leave the process group before the interpreter exits: left to exit-time destructors, gloo's threads can
    abort a rank that has finished its work (std::terminate)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def make_strategy(args, device: torch.device, amp_dtype, accum: int):
    if args.deepspeed:
        return DeepSpeed(args, device, amp_dtype, accum)
    if not launched():
        return SingleDevice(args, device, amp_dtype, accum)
    return {"ddp": DDP, "fsdp": FSDP2}[args.strategy](args, device, amp_dtype, accum)


class SingleDevice:
    """One process on one device: a GPU, Apple's mps or the CPU."""
    rank, world = 0, 1
    name = "one process"

    def __init__(self, args, device, amp_dtype, accum):
        self.args, self.device, self.amp_dtype, self.accum = args, device, amp_dtype, accum
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # fp16 gradients can overflow: the scaler scales the loss up and skips the steps whose gradients overflowed
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)

    def describe(self) -> str:
        return f"{self.name} on {self.device}"

    # -- placement
    def setup(self, model, make_optimizer):
        """(the module the loop calls, the optimizer); the optimizer is made once the parameters are final."""
        self.raw = model.to(self.device)
        self.model = self.compile_and_wrap(model)
        self.optimizer = make_optimizer(model)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        return self.model, self.optimizer

    def wrap(self, model):
        return model

    def compile_and_wrap(self, model):
        """torch.compile over the wrapper (`compile(DDP(model))`, the supported order: compiled DDP splits its graph
        at the gradient buckets, so their all-reduce overlaps the backward)."""
        wrapped = self.wrap(model)
        return torch.compile(wrapped) if self.args.compile else wrapped

    def place_frozen(self, module):
        """A module the loss reads and never trains (DPO's reference, a teacher): on the device, in eval mode."""
        return module.to(self.device).eval().requires_grad_(False)

    # -- one optimizer step
    def micro_step(self, sync: bool):
        """The context of one forward and backward; `sync` is False inside an accumulation group."""
        return contextlib.nullcontext()

    def backward(self, loss, sync: bool):
        self.scaler.scale(loss / self.accum).backward()

    def step(self):
        """Clip, step (skipped on the device for an fp16 overflow or while the optimizer's skip flag is set) and
        clear the gradients."""
        if self.args.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, self.args.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    # -- between processes: with one there is nothing to exchange
    def max_over_ranks(self, value: int) -> int:
        """The largest of every process's value, on the host (the stop signal)."""
        return value

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor's elementwise maximum over the processes, in place on the device (no host sync)."""
        return tensor

    def mean(self, values: dict) -> dict:
        """Floats: each value's mean over the processes. Reading them is a sync, so only at log steps."""
        keys = sorted(values)
        return dict(zip(keys, self.reduce_mean(torch.stack([values[k].float() for k in keys])).tolist()))

    def reduce_mean(self, tensor):
        return tensor

    def gather(self, obj) -> list:
        return [obj]

    def barrier(self):
        pass

    # -- state
    def model_state(self) -> dict:
        """The whole model's state dict on the CPU, complete on rank 0 (a collective under FSDP2 and DeepSpeed)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.raw, options=self.full_on_cpu())

    def save(self, folder) -> tuple[dict, dict]:
        """(model state, optimizer state) for rank 0 to write into the checkpoint folder."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(self.raw, self.optimizer, options=self.full_on_cpu())

    def load(self, folder, model_state: dict, optimizer_state: dict):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        if "deepspeed" in optimizer_state:
            raise InputError(f"{folder} was written by a DeepSpeed run: resume it with --deepspeed")
        set_state_dict(self.raw, self.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=StateDictOptions(full_state_dict=True))

    @staticmethod
    def full_on_cpu():
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiProcess(SingleDevice):
    """What the multi-process backends share: the process group and the exchanges between processes."""

    def __init__(self, args, device, amp_dtype, accum):
        super().__init__(args, device, amp_dtype, accum)
        if not dist.is_initialized():
            nccl = device.type == "cuda"
            # The launchers say where to meet (MASTER_ADDR); a lone process without one is a group of one.
            init = "env://" if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{free_port()}"
            dist.init_process_group("nccl" if nccl else "gloo", init_method=init, rank=int(os.environ.get("RANK", 0)),
                                    world_size=int(os.environ.get("WORLD_SIZE", 1)), device_id=device if nccl else None)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # The stop signal is agreed on every step over a CPU group: that exchange never waits for the GPU.
        self.host_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def describe(self) -> str:
        return f"{self.name} over {self.world} process{'es' if self.world > 1 else ''} ({dist.get_backend()}), " \
               f"rank 0 on {self.device}"

    def max_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return int(t.item())

    def max_(self, tensor):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def reduce_mean(self, tensor):
        dist.all_reduce(tensor)
        return tensor / self.world

    def gather(self, obj) -> list:
        everyone = [None] * self.world
        dist.all_gather_object(everyone, obj)
        return everyone

    def barrier(self):
        dist.barrier()


class DDP(MultiProcess):
    """Every process holds the whole model; backward averages the gradients (all-reduce, in buckets)."""
    name = "DDP"

    def wrap(self, model):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def micro_step(self, sync):
        return contextlib.nullcontext() if sync else self.model.no_sync()


class FSDP2(MultiProcess):
    """Weights, gradients and optimizer state sharded over the processes (torch's fully_shard); each transformer
    block's weights are gathered just before it runs.

    Frozen modules are replicated, not sharded: their forward then needs no collective (ranks need not run it in
    lockstep, no per-layer all-gathers), at the cost of one copy per GPU, which the presets' sizes afford.
    """
    name = "FSDP2"

    def __init__(self, args, device, amp_dtype, accum):
        if amp_dtype is torch.float16:
            raise InputError("--strategy fsdp trains in bfloat16 or float32 here (fp16's GradScaler would see only "
                             "this process's shard of the gradients): pass --dtype bfloat16, or use DDP for fp16")
        super().__init__(args, device, amp_dtype, accum)

    def compile_and_wrap(self, model):
        """Each block compiled in place, then sharded (torchtitan's order): the all-gathers stay between blocks."""
        if self.args.compile:
            for block in transformer_blocks(self.raw):
                block.compile()
        return self.wrap(model)

    def wrap(self, model):
        from torch.distributed.fsdp import fully_shard

        for block in transformer_blocks(self.raw):
            fully_shard(block)
        fully_shard(self.raw)
        return model

    def micro_step(self, sync):
        self.raw.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()


class DeepSpeed(MultiProcess):
    """ZeRO-2 through DeepSpeed's engine: gradients and optimizer state partitioned over the processes, weights
    whole on each. The engine divides the loss for accumulation, clips, casts to bf16/fp16 and scales fp16 losses;
    its partitioned state goes into the checkpoint folder, under `deepspeed/`."""
    name = "DeepSpeed ZeRO-2"

    def __init__(self, args, device, amp_dtype, accum):
        if args.compile:
            raise InputError("--compile does not combine with --deepspeed here: drop one of them")
        super().__init__(args, device, amp_dtype, accum)
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)  # DeepSpeed scales fp16 losses itself

    def setup(self, model, make_optimizer):
        import deepspeed

        try:
            with open(self.args.deepspeed) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise InputError(f"--deepspeed {self.args.deepspeed}: not a readable DeepSpeed config ({e})") from e
        config.update(train_micro_batch_size_per_gpu=self.args.batch_size, gradient_accumulation_steps=self.accum,
                      gradient_clipping=self.args.grad_clip)
        if self.amp_dtype is not None:
            config["bf16" if self.amp_dtype is torch.bfloat16 else "fp16"] = {"enabled": True}
        self.raw = model.to(self.device)
        # The engine casts every weight to bf16/fp16 but keeps fp32 masters only of those it trains: a frozen weight
        # (--freeze_embeddings, LoRA's base) would be saved rounded. Frozen, it never changes: keep it as it came.
        self.frozen = {name: p.detach().to("cpu", copy=True)
                       for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        # The engine steps our AdamW on its fp32 partitions: the schedule and the skip flag act on that optimizer.
        self.optimizer = make_optimizer(model)
        self.model, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=config)
        return self.model, self.optimizer

    def place_frozen(self, module):
        # The engine runs the policy with its weights cast to bf16/fp16; a frozen reference in another precision
        # would make DPO compare log-probs of two different models.
        # Cast as loading.cast_model casts: RoPE's frequencies stay fp32, as the engine's policy keeps its buffers.
        from .loading import cast_model

        module = super().place_frozen(module)
        return cast_model(module, self.amp_dtype) if self.amp_dtype is not None else module

    def backward(self, loss, sync):
        self.model.backward(loss)
        if not sync:
            self.model.step()  # DeepSpeed counts micro-steps in step() and updates only at the group's end

    def step(self):
        self.model.step()

    def model_state(self) -> dict:
        from deepspeed.utils import safe_get_full_fp32_param

        # The fp32 master weights (gathered from the partitions, a collective per parameter), not the bf16 copies
        state = self.raw.state_dict()
        for name, p in self.raw.named_parameters(remove_duplicate=False):
            master = safe_get_full_fp32_param(p) if p.requires_grad else self.frozen.get(name)
            if master is not None:
                state[name] = master
        return {k: v.detach().cpu() for k, v in state.items()}

    def save(self, folder):
        model_state = self.model_state()
        self.model.save_checkpoint(str(folder / "deepspeed"), tag="state")  # every rank writes its partition
        return model_state, {"deepspeed": "deepspeed"}

    def load(self, folder, model_state, optimizer_state):
        if "deepspeed" not in optimizer_state:
            raise InputError(f"{folder} was not written by a DeepSpeed run: resume it without --deepspeed")
        self.model.checkpoint_engine.load = load_weights_only  # DeepSpeed's own reader unpickles anything
        path, _ = self.model.load_checkpoint(str(folder / optimizer_state["deepspeed"]), tag="state",
                                             load_lr_scheduler_states=False)
        if path is None:
            raise InputError(f"{folder}: DeepSpeed found no state to load")


def load_weights_only(path, map_location=None):
    """DeepSpeed's checkpoint files read with weights_only=True: tensors, plain containers and the three small
    DeepSpeed classes its optimizer state holds, never code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]):
        return torch.load(path, map_location=map_location, weights_only=True)
