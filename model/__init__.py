"""MiniMind: model, config, data, training and generation code shared by the numbered scripts.

Imports are lazy so that light tools (data processing) start without loading torch and transformers:
`model.load_model` and `model.MiniMindLM` resolve on first use; the config lives in `model.LMConfig`.
"""
import importlib

_LAZY = {"MiniMindLM": ".model", "load_model": ".loading", "preset_config": ".LMConfig", "PRESETS": ".LMConfig"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
