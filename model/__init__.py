"""MiniMind: model, config, data, training and generation code shared by the numbered scripts.

Imports are lazy so that light tools (data processing) start without loading torch and transformers:
`model.load_model` and `model.MiniMindLM` resolve on first use; the config lives in `model.LMConfig`.
"""
import importlib
import logging

# transformers imports torchao (our int8 option) whenever it is installed; torchao then tries its CUDA-only kernel
# libraries and torch flags its Enum registrations, warnings a CPU user can do nothing about. Errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

_LAZY = {"MiniMindLM": ".model", "load_model": ".loading", "preset_config": ".LMConfig", "PRESETS": ".LMConfig"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
