"""Model configuration: upstream MiniMind's field names on a transformers config.

`LMConfig` is a `PretrainedConfig`, so `save_pretrained`, `AutoConfig` and peft/trl work with it.
The `attribute_map` lets transformers' generic code (generation caches, peft) read the Llama-style
names (`hidden_size`, `num_hidden_layers`, ...) while our code keeps upstream's (`dim`, `n_layers`, ...).
"""
from transformers import PretrainedConfig

from .errors import InputError


class LMConfig(PretrainedConfig):
    model_type = "minimind"
    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "hidden_dim",
        "max_position_embeddings": "max_seq_len",
        "rms_norm_eps": "norm_eps",
    }

    dim: int = 512
    n_layers: int = 8
    n_heads: int = 16
    n_kv_heads: int | None = 8
    vocab_size: int = 6400
    hidden_dim: int | None = None  # None: 8/3 * dim rounded up to multiple_of (upstream's rule)
    multiple_of: int = 64
    norm_eps: float = 1e-5
    max_seq_len: int = 512  # training context; inference may go past it (see rope_parameters)
    rope_theta: float = 1e4
    # transformers' RoPE dict: {"rope_type": "default", "rope_theta": ...}, or an inference-time context extension,
    # {"rope_type": "linear" | "yarn", "factor": 4.0, ...}. "yarn" (NTK-by-parts) keeps high frequencies intact;
    # "linear" divides every position by `factor`. A config saved with the older `rope_scaling` key still loads.
    rope_parameters: dict | None = None
    dropout: float = 0.0
    flash_attn: bool = True  # use scaled_dot_product_attention (False: the explicit softmax, for teaching)
    # Mixture of experts (DeepSeek-style: shared experts always on, routed experts chosen per token).
    use_moe: bool = False
    num_experts_per_tok: int = 2
    n_routed_experts: int = 4
    n_shared_experts: int = 1
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.01
    seq_aux: bool = True
    norm_topk_prob: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0

    def __post_init__(self, **kwargs):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        super().__post_init__(**kwargs)  # transformers fills rope_parameters (rope_type, rope_theta) from the fields
        if self.rope_parameters:
            self.rope_parameters.pop("type", None)  # the legacy key, now rope_type
        self.validate_shapes()

    def validate_shapes(self):
        if self.dim % self.n_heads:
            raise InputError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise InputError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if (self.dim // self.n_heads) % 2:
            raise InputError(f"head dim ({self.dim // self.n_heads}) must be even for rotary embeddings")
        if self.use_moe and not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise InputError("num_experts_per_tok must be between 1 and n_routed_experts")
        if self.scoring_func != "softmax":
            raise InputError(f"unsupported scoring_func {self.scoring_func!r} (only 'softmax')")
        if self.rope_scaling_type not in (None, "linear", "yarn"):
            raise InputError(f"rope scaling must be 'linear' or 'yarn', got {self.rope_parameters!r}")

    @property
    def rope_scaling_type(self) -> str | None:
        """None for plain RoPE, else "linear" or "yarn"."""
        kind = (self.rope_parameters or {}).get("rope_type", "default")
        return None if kind == "default" else kind

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# The seed's three models, plus a demo size that learns the demo corpus on a 2-core CPU in minutes.
PRESETS = {
    "minimind-v1-small": dict(dim=512, n_layers=8, n_heads=16, n_kv_heads=8, vocab_size=6400),
    "minimind-v1-moe": dict(dim=512, n_layers=8, n_heads=16, n_kv_heads=8, vocab_size=6400,
                            use_moe=True, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2),
    "minimind-v1": dict(dim=768, n_layers=16, n_heads=16, n_kv_heads=8, vocab_size=6400),
    "demo": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=3000, max_seq_len=128),
}


def preset_config(name: str, **overrides) -> LMConfig:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return LMConfig(**{**PRESETS[name], **overrides})
