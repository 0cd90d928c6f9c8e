"""MiniMind: model, config, data, training and generation code shared by the numbered scripts.

Imports are lazy so that light tools (data processing) start without loading torch and transformers:
`model.load_model` and `model.MiniMindLM` resolve on first use; the config lives in `model.LMConfig`.
"""
import importlib
import logging
import warnings

# transformers imports torchao (our int8 option) whenever it is installed; torchao then tries its CUDA-only kernel
# libraries and torch flags its Enum registrations, warnings a CPU user can do nothing about. Errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
# peft, on every adapter: it still reads a transformers property deprecated in v5, and it looks for a config.json
# beside the base model to see whether the vocabulary grew (ours is a safetensors file with the config inside, and
# LoRA never changes the vocabulary).
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message="Could not find a config file in .* will assume that the vocabulary",
                        category=UserWarning)

_LAZY = {"MiniMindLM": ".model", "load_model": ".loading", "preset_config": ".LMConfig", "PRESETS": ".LMConfig"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
