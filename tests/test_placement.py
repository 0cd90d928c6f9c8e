"""Every stage's loss runs where the trainer puts the model, checked without a GPU.

The trainer's device is PyTorch's `meta` device while each stage builds its modules on the CPU, as it does for a
GPU run; a forward pre-hook on every module fails on any parameter, buffer or argument not on the trainer's device
(a meta tensor mixed with a CPU one does not always raise by itself).
"""
import pytest
import torch

from conftest import load_script, tiny_model
from model.checkpoint import save_weights
from model.trainer import Trainer
from test_align import dpo_flags, lora_flags, sft_flags
from test_train import pretrain_args

STAGES = {
    "pretrain": ("1-pretrain.py", lambda data, base, out: pretrain_args(data, out)),
    "sft": ("3-full_sft.py", lambda data, base, out: sft_flags(data, out, "--init_from", str(base))),
    "lora": ("4-lora_sft.py", lambda data, base, out: lora_flags(data, base, out)),
    "dpo": ("5-dpo_train.py", lambda data, base, out: dpo_flags(data, base, out)),
    "dpo_lora": ("5-dpo_train.py", lambda data, base, out: dpo_flags(data, base, out, "--lora_rank", "4")),
}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    model = tiny_model(vocab_size=1000)
    path = tmp_path_factory.mktemp("placement") / "base_64.safetensors"
    save_weights(path, model.state_dict(), model.config)
    return path


def on_device(device):
    def check(module, inputs):
        named = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False),
                 *((f"argument {i}", x) for i, x in enumerate(inputs) if isinstance(x, torch.Tensor))]
        for name, tensor in named:
            assert tensor.device == device, f"{type(module).__name__} {name} is on {tensor.device}, the trainer's " \
                                            f"device is {device}"
    return check


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_training_micro_step_touches_only_the_trainers_device(stage, demo_data, base_model, tmp_path):
    script, flags = STAGES[stage]
    module = load_script(script)
    args = module.build_parser().parse_args(flags(demo_data, base_model, tmp_path))
    model, task = getattr(module, f"{stage.split('_')[0]}_task")(args)
    meta = torch.device("meta")
    trainer = Trainer(args, model, task, device=meta)
    batch = (task.collate or torch.utils.data.default_collate)([task.train_data[i] for i in range(2)])
    handle = torch.nn.modules.module.register_module_forward_pre_hook(on_device(meta))
    try:
        loss, _ = trainer.micro_step(batch, sync=True)
    finally:
        handle.remove()
    assert loss.device == meta
    trained = [p for p in trainer.raw_model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.device == meta for p in trained)


def test_deepspeed_casts_a_frozen_reference_as_the_policy_is_cast():
    """Under DeepSpeed the engine runs the policy in bf16 with its RoPE frequencies in fp32 (buffers stay as they
    are); a frozen reference (DPO's, GRPO's, a teacher) must be the same function, or DPO's rewards and GRPO's KL
    are non-zero before any step."""
    from model.distributed import DeepSpeed
    from model.model import rope_inv_freq

    strategy = object.__new__(DeepSpeed)  # the placement alone: no process group, no engine
    strategy.device, strategy.amp_dtype = torch.device("cpu"), torch.bfloat16
    reference = strategy.place_frozen(tiny_model())
    assert reference.model.tok_embeddings.weight.dtype == torch.bfloat16
    assert reference.model.inv_freq.dtype == torch.float32
    assert torch.equal(reference.model.inv_freq, rope_inv_freq(reference.config)[0])


def test_auto_precision_asks_for_native_bf16_on_the_runs_own_gpu(monkeypatch):
    """--dtype auto takes bf16 only where the GPU has it natively (emulated bf16 is slower than fp16 + GradScaler),
    and asks after the process has picked its GPU."""
    from model.trainer import resolve_precision

    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: asked.append(kw) or False)
    assert resolve_precision("cuda", "auto") is torch.float16
    assert asked == [{"including_emulation": False}]


def test_compile_wraps_ddp_not_the_other_way_round(monkeypatch):
    """`torch.compile(DDP(model))`: compiled DDP splits its graph at the gradient buckets, so their all-reduce
    overlaps the backward; `DDP(torch.compile(model))` all-reduces only after the whole backward (issue 37 #10)."""
    import socket
    from types import SimpleNamespace

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from model.distributed import DDP

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **_: compiled.append(module) or module)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        strategy = object.__new__(DDP)  # the placement alone
        strategy.args, strategy.device = SimpleNamespace(compile=True), torch.device("cpu")
        strategy.raw = model = tiny_model()
        out = strategy.compile_and_wrap(model)
        assert compiled == [out] and isinstance(out, DistributedDataParallel) and out.module is model
    finally:
        dist.destroy_process_group()
