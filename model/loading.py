"""`load_model`: the one way every script gets a model from disk.

Accepted: our safetensors files (config in the header), checkpoint folders (`checkpoints/step_N`), exported
folders (transformers format with `config.json`, or the `--format llama` export), peft LoRA adapter folders
(the base named in `adapter_config.json`), and upstream MiniMind `.pth` state dicts (loaded with
`weights_only=True`; give `config` or `preset` unless the default dims fit). Every load is strict.
"""
import json
import pickle
import warnings
from pathlib import Path

import torch

from .checkpoint import read_weights, strict_load
from .LMConfig import LMConfig, preset_config
from .errors import InputError
from .model import MiniMindLM, rope_inv_freq

UPSTREAM_BUFFERS = ("pos_cis", "freqs_cis", "mask")  # non-weight buffers old upstream files may carry


def clean_keys(state: dict) -> dict:
    """Drop wrapper prefixes (DDP `module.`, torch.compile `_orig_mod.`) and upstream's non-weight buffers."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        if k.split(".")[-1] in UPSTREAM_BUFFERS:
            continue
        out[k] = v
    return out


def infer_config(state: dict, **overrides) -> LMConfig:
    """Dims readable from weight shapes; the head counts are not, so upstream's (16 q, 8 kv) are assumed."""
    dim = state["tok_embeddings.weight"].shape[1]
    n_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    experts = {int(k.split(".")[4]) for k in state if ".feed_forward.experts." in k}
    hidden = (state.get("layers.0.feed_forward.w1.weight") if not experts
              else state["layers.0.feed_forward.experts.0.w1.weight"]).shape[0]
    n_heads = overrides.pop("n_heads", 16)
    head_dim = dim // n_heads
    kw = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=state["layers.0.attention.wk.weight"].shape[0] // head_dim,
              vocab_size=state["tok_embeddings.weight"].shape[0], hidden_dim=hidden, use_moe=bool(experts))
    if experts:
        kw["n_routed_experts"] = len(experts)
        kw["n_shared_experts"] = int(any(".shared_experts." in k for k in state))
    return LMConfig(**{**kw, **overrides})


def resolve_path(path) -> Path:
    path = Path(path)
    if not path.exists():
        for candidate in (path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".pth")):
            if candidate.exists():
                return candidate
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def _config_from(meta: dict, path: Path, config):
    if config is not None:
        return config
    if "minimind_config" in meta:
        return LMConfig.from_dict(json.loads(meta["minimind_config"]))
    for candidate in (path.parent / "config.json", path.parent.parent / "config.json"):
        if candidate.exists():
            return LMConfig.from_json_file(str(candidate))
    return None


def load_state(path, config: LMConfig | None = None, preset: str | None = None) -> tuple[dict, LMConfig]:
    """(state dict in our layout, config) of any supported checkpoint, without building a model."""
    path = resolve_path(path)
    if path.is_dir():
        if (path / "adapter_config.json").exists():
            raise InputError(f"{path} is a LoRA adapter; use load_model(), which applies it to its base")
        cfg_file = path / "config.json"
        if cfg_file.exists() and json.loads(cfg_file.read_text()).get("model_type") == "llama":
            from transformers import LlamaConfig

            from .convert import config_from_llama, from_llama_state_dict

            cfg = config or config_from_llama(LlamaConfig.from_pretrained(str(path)))
            state, _ = read_weights(path / "model.safetensors")
            return from_llama_state_dict(state, cfg), cfg
        state, meta = read_weights(path / "model.safetensors")
        cfg = config or _config_from(meta, path / "model.safetensors", None)
        if cfg is None:
            raise InputError(f"{path} has no config; pass config= or --preset")
        return clean_keys(state), cfg
    if path.suffix == ".safetensors":
        state, meta = read_weights(path)
        cfg = _config_from(meta, path, config)
    elif path.suffix in (".pth", ".pt", ".bin"):
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            # weights_only refuses anything but tensors and plain containers; its message says which object.
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            reason = next((line for line in lines if "unsupported" in line.lower()), lines[0])
            raise InputError(f"{path} is not a plain state dict of tensors, and unpickling anything else could run "
                             f"code, so it is not loaded ({reason})") from e
        state = raw.get("model", raw) if isinstance(raw, dict) and "model" in raw and isinstance(raw["model"], dict) else raw
        cfg = config
    else:
        raise InputError(f"unsupported checkpoint {path} (expected .safetensors, .pth, or a folder)")
    state = clean_keys(state)
    if cfg is None:
        cfg = preset_config(preset) if preset else infer_config(state)
    return state, cfg


def adapter_base(path: Path) -> str | None:
    """The base model a peft LoRA adapter folder names; None if `path` is no adapter folder."""
    if not (path.is_dir() and (path / "adapter_config.json").exists()):
        return None
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise InputError(f"{path}/adapter_config.json names no base model")
    return base


def load_model(path, config: LMConfig | None = None, device="cpu", dtype=None, preset: str | None = None,
               rope_scaling: dict | None = None, merge_lora: bool = True) -> MiniMindLM:
    """A ready model (eval mode) from any supported checkpoint. `rope_scaling` extends the context at inference."""
    path = resolve_path(path)
    base_path = adapter_base(path)
    if base_path:
        from peft import PeftModel

        base = load_model(base_path, config, device, dtype, preset, rope_scaling)
        model = PeftModel.from_pretrained(base, str(path))
        return (model.merge_and_unload() if merge_lora else model).eval()
    state, cfg = load_state(path, config, preset)
    if rope_scaling is not None:
        cfg.rope_scaling = rope_scaling
        cfg.validate_shapes()
    with torch.device("meta"):
        model = MiniMindLM(cfg)
    model = model.to_empty(device="cpu")
    model.inv_freq.copy_(rope_inv_freq(cfg)[0])
    model.tie_weights()
    strict_load(model, state, str(path))
    model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()


def quantize_int8(model: MiniMindLM) -> MiniMindLM:
    """Int8 weights for inference: every Linear's weight stored as int8 with one scale per output row (torchao's
    weight-only scheme, as gpt-fast uses it); activations stay in the model's dtype. The embedding stays as it is.

    It pays off compiled (`compile_decoding`): inductor fuses the dequantization into the product and calls torch's
    int8 matrix-vector kernel, which on CPU wants bf16 activations (fp32 ones take a slow path). Eager, every step
    dequantizes every weight and runs slower than fp32. Measured: bench/bench_model.py.
    """
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    # Compiling works; the warning says only that the compiled graph is not cached on disk for the next process.
    warnings.filterwarnings("ignore", message="Int8Tensor does not implement _stable_hash_for_caching")
    model.train().eval()  # the ordinary (out, in) layout: the int8 kernel needs contiguous rows
    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False))
    return model
