"""`load_model`: the one way every script gets a model from disk.

Accepted: our safetensors files (config in the header), checkpoint folders (`checkpoints/step_N`), exported
folders (transformers format with `config.json`, or the `--format llama` export), peft LoRA adapter folders
(the base named in `adapter_config.json`), and upstream MiniMind `.pth` state dicts (loaded with
`weights_only=True`; give `config` or `preset` unless the default dims fit). Every load is strict.
"""
import json
import pickle
from pathlib import Path

import torch

from .checkpoint import read_weights, strict_load, upgrade_keys
from .LMConfig import LMConfig, preset_config
from .errors import InputError
from .model import MiniMindForCausalLM, rope_inv_freq

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
    """Dims readable from weight shapes (names as `upgrade_keys` gives them); the head counts are not, so upstream's
    (16 q, 8 kv) are assumed."""
    embeddings, first = state["model.tok_embeddings.weight"], "model.layers.0."
    dim = embeddings.shape[1]
    n_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.layers."))
    experts = {int(k.split(".")[5]) for k in state if ".feed_forward.experts." in k}
    hidden = (state.get(first + "feed_forward.w1.weight") if not experts
              else state[first + "feed_forward.experts.0.w1.weight"]).shape[0]
    n_heads = overrides.pop("n_heads", 16)
    head_dim = dim // n_heads
    kw = dict(dim=dim, n_layers=n_layers, n_heads=n_heads,
              n_kv_heads=state[first + "attention.wk.weight"].shape[0] // head_dim,
              vocab_size=embeddings.shape[0], hidden_dim=hidden, use_moe=bool(experts))
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
        return upgrade_keys(clean_keys(state)), cfg
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
    state = upgrade_keys(clean_keys(state))
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


def cast_model(model, dtype):
    """model.to(dtype) with the RoPE frequencies kept in fp32: in bf16 the angle of position 500 would be off by up
    to a radian (model.py's MiniMindModel.inv_freq)."""
    model = model.to(dtype)
    backbone = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone.model.inv_freq = rope_inv_freq(backbone.config)[0].to(backbone.model.inv_freq.device)
    return model


def load_adapter(base, path: Path):
    """A peft LoRA adapter folder on its base model. Adapters saved before the backbone/head split name their
    weights in the old flat layout (`base_model.model.layers.0...`): they are renamed, and every LoRA weight of
    the model must be found in the file."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        raise InputError(f"{path} has no adapter_model.safetensors")
    config = PeftConfig.from_pretrained(str(path))
    config.inference_mode = True
    base.name_or_path = config.base_model_name_or_path  # peft records it as the adapter's base model
    model = get_peft_model(base, config)
    prefix = "base_model.model."
    state = {prefix + k: v for k, v in upgrade_keys({k.removeprefix(prefix): v
                                                     for k, v in load_file(str(weights)).items()}).items()}
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise InputError(f"adapter {path} does not fit its base model: missing {missing[:5]}, unexpected "
                         f"{list(result.unexpected_keys)[:5]}")
    return model


def load_model(path, config: LMConfig | None = None, device="cpu", dtype=None, preset: str | None = None,
               rope_scaling: dict | None = None, merge_lora: bool = True) -> MiniMindForCausalLM:
    """A ready model (eval mode) from any supported checkpoint. `rope_scaling` extends the context at inference."""
    path = resolve_path(path)
    base_path = adapter_base(path)
    if base_path:
        base = load_model(base_path, config, device, dtype, preset, rope_scaling)
        model = load_adapter(base, path)
        return (model.merge_and_unload() if merge_lora else model).eval()
    state, cfg = load_state(path, config, preset)
    if rope_scaling is not None:  # {"rope_type", "factor", ...} over the checkpoint's own RoPE
        cfg.rope_parameters = {**(cfg.rope_parameters or {}), **rope_scaling}
        cfg.validate_shapes()
    with torch.device("meta"):
        model = MiniMindForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    model.model.inv_freq.copy_(rope_inv_freq(cfg)[0])
    model.tie_weights()
    strict_load(model, state, str(path))
    model.tie_weights()
    if dtype is not None:
        model = cast_model(model, dtype)
    return model.to(device).eval()
