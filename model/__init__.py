"""MiniMind: model, config, data, training and generation code shared by the numbered scripts.

Imports are lazy so that light tools (data processing) start without loading torch and transformers:
`model.load_model` and `model.MiniMindForCausalLM` resolve on first use; the config lives in `model.LMConfig`.
Importing changes nothing process-wide: the scripts call `quiet_third_party()` at their entry point.
"""
import importlib

_LAZY = {"MiniMindForCausalLM": ".model", "MiniMindLM": ".model", "MiniMindModel": ".model", "Engine": ".engine",
         "load_model": ".loading", "preset_config": ".LMConfig", "PRESETS": ".LMConfig"}


def quiet_third_party():
    """Silence third-party messages a user of our scripts can do nothing about; errors still show.

    transformers imports torchao (our int8 option) whenever it is installed; torchao then tries its CUDA-only
    kernel libraries and torch flags its Enum registrations. peft, on every adapter: it still reads a transformers
    property deprecated in v5, and it looks for a config.json beside the base model to see whether the vocabulary
    grew (ours is a safetensors file with the config inside, and LoRA never changes the vocabulary).
    A script calls it at its entry point: it sets logging filters and one environment default."""
    import logging
    import os
    import warnings

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # DeepSpeed, imported by transformers' integrations whenever installed, announces it found no GPU; its logger
    # resets its level on creation, a filter stays.
    logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars for loading a few tensors
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Could not find a config file in .* will assume that the vocabulary",
                            category=UserWarning)
    # torch's compile cache, on our int8 weights (--quantize int8 --compile): a note for subclass authors.
    warnings.filterwarnings("ignore", message="Int8Tensor does not implement _stable_hash_for_caching",
                            category=UserWarning)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
