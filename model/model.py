"""MiniMind: a Llama-style decoder (dense or mixture-of-experts) in one file, read top to bottom.

Structure as in transformers' Llama and upstream MiniMind's current code: `MiniMindModel` (embeddings, blocks,
final norm) returns hidden states; `MiniMindForCausalLM` adds the tied LM head and the loss. Inside a block the
names follow Meta's llama reference and upstream MiniMind v1 (`wq/wk/wv/wo`, `w1/w2/w3`, `attention_norm`), so
upstream checkpoints load with no more than a prefix (see model/loading.py). RoPE rotates *adjacent* pairs (x0,x1),
(x2,x3), ... exactly as upstream's complex-number form does.

This file holds no inference tricks: decoding speed (weight layout, the compiled step, int8) lives in
model/engine.py, which prepares a model for decoding.

Shapes: B batch, T new tokens, S = past + T keys, H query heads, K kv heads, D head dim, E routed experts.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .LMConfig import LMConfig


# ----------------------------------------------------------------------------------------------- rotary embeddings
def rope_inv_freq(config: LMConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) and the attention scale for the configured RoPE variant.

    `linear` divides every frequency by `factor` (position interpolation). `yarn` interpolates only the
    low frequencies that never completed a rotation within the training context, keeps the fast ones,
    and ramps between them (the NTK-by-parts rule of the YaRN paper, as transformers implements it).
    """
    scaling = config.rope_parameters or {}
    dim, base = config.head_dim, scaling.get("rope_theta", config.rope_theta)
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if config.rope_scaling_type is None:
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if config.rope_scaling_type == "linear":
        return inv_freq / factor, 1.0
    # yarn
    original_len = scaling.get("original_max_position_embeddings", config.max_seq_len)
    beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

    def dim_for_rotations(rotations):
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_for_rotations(beta_fast)), 0)
    high = min(math.ceil(dim_for_rotations(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attention_scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_scale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (B, T, heads, D) by angles whose cos/sin are (B, T, 1, D/2)."""
    x_even, x_odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, heads, D/2) each
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: autocast's where it is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# ------------------------------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 even under autocast: the mean of squares overflows or loses precision in 16 bits.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.wo.is_residual_out = True
        self.dropout = config.dropout
        self.flash = config.flash_attn

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, K, S, D), in the cache's dtype
            q = q.to(k.dtype)
        out = self.attend(q, k, v, mask)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, -1).to(x.dtype)  # (B, T, H*D)
        return self.wo(out)  # (B, T, dim)

    def attend(self, q, k, v, mask):
        """Each query head attends over the keys of its kv head: q (B, H, T, D), k/v (B, K, S, D)."""
        dropout = self.dropout if self.training else 0.0
        causal = mask is None and q.shape[2] > 1  # no explicit mask: plain causal attention over T tokens, no past
        if self.flash:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                  enable_gqa=self.n_kv_heads != self.n_heads)
        return self.explicit_attention(q, k, v, mask, causal, dropout)

    def explicit_attention(self, q, k, v, mask, causal, dropout):
        """softmax(q k^T / sqrt(D)) v, spelled out; the same result as the fused kernel."""
        repeat = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # (B, H, S, D)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, S)
        if causal:
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif mask is not None:
            scores = scores + mask
        probs = F.dropout(scores.float().softmax(-1).type_as(q), dropout, self.training)
        return probs @ v  # (B, H, T, D)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2.is_residual_out = True
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class MoEGate(nn.Module):
    """Softmax router: each token picks its top-k routed experts."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.top_k, self.n_experts = config.num_experts_per_tok, config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.dim))

    def forward(self, x):  # x (N, dim)
        scores = F.linear(x.float(), self.weight.float()).softmax(dim=-1)  # (N, E)
        top_weight, top_idx = scores.topk(self.top_k, dim=-1, sorted=False)  # (N, k)
        if self.norm_topk_prob and self.top_k > 1:
            top_weight = top_weight / (top_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return top_idx, top_weight, scores


class MOEFeedForward(nn.Module):
    """DeepSeek-style MoE: shared experts see every token; each token also goes to its top-k routed experts."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.experts = nn.ModuleList(
            FeedForward(config.dim, config.hidden_dim, config.dropout) for _ in range(config.n_routed_experts))
        self.gate = MoEGate(config)
        self.shared_experts = (FeedForward(config.dim, config.hidden_dim * config.n_shared_experts, config.dropout)
                               if config.n_shared_experts else None)

    def forward(self, x):
        B, T, dim = x.shape
        flat = x.reshape(-1, dim)  # (N, dim), N = B*T
        top_idx, top_weight, scores = self.gate(flat)
        routed = self.dispatch(flat, top_idx, top_weight).view(B, T, dim)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(x)
        aux_loss = self.balance_loss(top_idx, scores, B, T) if self.training else None
        return routed, aux_loss

    def dispatch(self, flat, top_idx, top_weight):
        """Group the (token, expert) pairs by expert, run each expert once on its group, scatter-add back."""
        k, n_experts = self.config.num_experts_per_tok, self.config.n_routed_experts
        expert_of_pair = top_idx.flatten()  # (N*k,)
        order = expert_of_pair.argsort(stable=True)
        token_of_pair = order // k  # which token each sorted pair belongs to
        counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(
            0, expert_of_pair, torch.ones_like(expert_of_pair))  # (E,) pairs per expert, still on the device
        inputs = flat[token_of_pair]  # (N*k, dim), grouped by expert
        if compute_dtype(flat) == torch.bfloat16:
            expert_outputs = self.grouped_experts(inputs, expert_of_pair[order], counts)
        else:  # torch's grouped matmul is bf16-only: one matmul per expert, whose sizes the host must read
            expert_outputs = torch.cat([expert(chunk) for expert, chunk in
                                        zip(self.experts, inputs.split(counts.tolist()))])
        weighted = expert_outputs * top_weight.flatten()[order, None].to(expert_outputs.dtype)
        return torch.zeros_like(flat).index_add_(0, token_of_pair, weighted.type_as(flat))

    def grouped_experts(self, x, expert_of_row, counts):
        """Every expert on its rows of x (grouped by expert) in one grouped matmul per weight: the group sizes stay
        on the device, so there is no host sync and no graph break. Each group is padded to a multiple of 8 rows
        (16 bytes of bf16, the alignment CUDA's kernel asks of a group) in a buffer of a size fixed by the shapes."""
        n, n_experts = x.shape[0], counts.shape[0]
        padded = (counts + 7) // 8 * 8
        ends = padded.cumsum(0)  # (E,) where each padded group ends: the kernel's offsets
        offsets = ends.to(torch.int32)
        first_row = counts.cumsum(0) - counts  # where each expert's rows start in x
        rows = torch.arange(n, device=x.device)
        slot = (ends - padded)[expert_of_row] + rows - first_row[expert_of_row]  # (n,) each row's place
        buffer = x.new_zeros(n + 7 * n_experts, x.shape[1], dtype=torch.bfloat16).index_copy(
            0, slot, x.to(torch.bfloat16))  # (M, dim)

        def grouped(inp, name):  # inp (M, d_in) @ each expert's weight^T, group by group
            weight = torch.stack([getattr(expert, name).weight for expert in self.experts])  # (E, d_out, d_in)
            return torch._grouped_mm(inp, weight.to(torch.bfloat16).transpose(1, 2), offs=offsets)

        hidden = F.silu(grouped(buffer, "w1")) * grouped(buffer, "w3")  # (M, hidden)
        out = F.dropout(grouped(hidden, "w2"), self.config.dropout, self.training)  # (M, dim)
        return out[slot]  # (n, dim); rows past the last group are never read

    def balance_loss(self, top_idx, scores, B, T):
        """Load-balancing loss alpha * sum_e f_e * P_e (f: share of picks, P: mean router probability).

        With seq_aux the shares are counted per sequence (DeepSeek-V2's sequence-wise balance), so a batch
        cannot look balanced while every single sequence sends all of its tokens to one expert.
        """
        cfg = self.config
        if cfg.aux_loss_alpha <= 0:
            return None
        n_experts = cfg.n_routed_experts
        groups = B if cfg.seq_aux else 1
        picks = top_idx.view(groups, -1)  # (G, tokens_per_group*k)
        share = torch.zeros(groups, n_experts, device=scores.device).scatter_add_(
            1, picks, torch.ones_like(picks, dtype=torch.float32))
        share = share / (picks.shape[1] / n_experts)  # 1.0 everywhere when perfectly balanced
        mean_prob = scores.view(groups, -1, n_experts).mean(dim=1)  # (G, E)
        return (share * mean_prob).sum(dim=1).mean() * cfg.aux_loss_alpha


class TransformerBlock(GradientCheckpointingLayer):
    """Pre-norm attention and feed-forward, each added to the residual stream. With gradient checkpointing on
    (`model.gradient_checkpointing_enable()`), training keeps only the block's input and recomputes the rest in
    the backward pass."""

    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = (MOEFeedForward(config) if config.use_moe
                             else FeedForward(config.dim, config.hidden_dim, config.dropout))

    def forward(self, x, cos, sin, mask, cache=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        out = self.feed_forward(self.ffn_norm(h))
        out, aux_loss = out if isinstance(out, tuple) else (out, None)
        return h + out, aux_loss


# --------------------------------------------------------------------------------------------------- the model
@dataclass
class MiniMindModelOutput(BaseModelOutputWithPast):
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss (training only)


@dataclass
class MiniMindOutput(CausalLMOutputWithPast):
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss, already included in `loss`


class MiniMindPreTrainedModel(PreTrainedModel):
    config_class = LMConfig
    base_model_prefix = "model"
    _no_split_modules = ["TransformerBlock"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, nn.Linear):
            # Residual-branch outputs get a smaller init so the residual stream's variance stays put with depth (GPT-2).
            if getattr(module, "is_residual_out", False):
                std = std / math.sqrt(2 * self.config.n_layers)
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.Embedding, MoEGate)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, MiniMindModel):
            init.copy_(module.inv_freq, rope_inv_freq(self.config)[0])


class MiniMindModel(MiniMindPreTrainedModel):
    """The backbone: token embeddings, the blocks and the final norm; returns the last hidden states."""

    def __init__(self, config: LMConfig):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # fp32 frequencies: whoever casts the model keeps this buffer in fp32 (model.loading.cast_model), since in
        # bf16 the angle of position 500 would be off by up to a radian.
        inv_freq, self.rope_attention_scale = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def rotary(self, position_ids: torch.Tensor):
        """cos/sin (B, T, 1, D/2) for integer positions (B, T); any position works, there is no table to outgrow."""
        angles = position_ids[..., None].float() * self.inv_freq  # (B, T, D/2)
        scale = self.rope_attention_scale
        return (angles.cos() * scale)[:, :, None], (angles.sin() * scale)[:, :, None]

    @staticmethod
    def attention_bias(attention_mask, T: int, past: int, device):
        """Boolean (B, 1, T, S) mask, or None when plain causal attention is exact (no padding, no past)."""
        padded = attention_mask is not None and not bool(attention_mask.all())
        if not padded and (past == 0 or T == 1):
            return None
        S = past + T
        query_pos = torch.arange(past, S, device=device)[:, None]
        key_pos = torch.arange(S, device=device)[None, :]
        mask = (key_pos <= query_pos)[None, None]  # (1, 1, T, S)
        if padded:
            keep = attention_mask[:, -S:].bool()[:, None, None, :]  # (B, 1, 1, S)
            # A padding query attends to itself so its (ignored) row is never all -inf, which would give NaN.
            mask = (mask & keep) | (key_pos == query_pos)[None, None]
        return mask

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, past_key_values=None, **kwargs) -> MiniMindModelOutput:
        """`cache`: anything with `update(k, v, layer_idx)` and `get_seq_length()` (transformers' caches, ours in
        model/engine.py). A 4-D `attention_mask` (B, 1, T, S), bool or additive, is used as given, with the
        caller's `position_ids`; a 2-D one marks padding."""
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        h = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, dim)
        B, T, _ = h.shape
        if attention_mask is not None and attention_mask.dim() == 4:
            if position_ids is None:
                raise ValueError("a 4-D attention_mask needs position_ids")
            mask = attention_mask
        else:
            past = cache.get_seq_length() if cache is not None else 0
            if position_ids is None:
                if attention_mask is not None:  # count only real tokens, so left padding does not shift positions
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
                else:
                    position_ids = torch.arange(past, past + T, device=h.device)[None]
            mask = self.attention_bias(attention_mask, T, past, h.device)
        cos, sin = self.rotary(position_ids)

        h = self.dropout(h)
        hidden_states, aux_losses = [], []
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(h)
            h, aux_loss = layer(h, cos, sin, mask, cache=cache)
            if aux_loss is not None:
                aux_losses.append(aux_loss)
        h = self.norm(h)
        if output_hidden_states:
            hidden_states.append(h)
        return MiniMindModelOutput(last_hidden_state=h, cache=cache,
                                   hidden_states=tuple(hidden_states) if output_hidden_states else None,
                                   aux_loss=torch.stack(aux_losses).sum() if aux_losses else None)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) targets for (B, T) logits: position t predicts label t+1, the last position nothing (-100).

    The labels are shifted, not the logits sliced: backward through a slice of the (B, T, vocab) logits would
    allocate and zero-fill a second gradient of their full size (105 MB at batch 8 x 512 x 6400)."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
    """The backbone and a language-model head tied to the token embeddings; `labels` give the next-token loss."""
    _tied_weights_keys = {"lm_head.weight": "model.tok_embeddings.weight"}

    def __init__(self, config: LMConfig):
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, labels=None, logits_to_keep=0, output_hidden_states=None, past_key_values=None,
                num_items_in_batch=None, **kwargs) -> MiniMindOutput:
        out = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache,
                         output_hidden_states, past_key_values)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)  # (B, T, vocab)

        loss = None
        if labels is not None:
            targets = next_token_targets(labels).flatten()
            if num_items_in_batch is None:  # the mean over this batch's labelled tokens (0 if there are none)
                num_items_in_batch = (targets != -100).sum().clamp(min=1)
            # a trainer that accumulates gradients divides by the labelled tokens of the whole step
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=-100,
                                   reduction="sum") / num_items_in_batch
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
        return MiniMindOutput(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states,
                              aux_loss=out.aux_loss)


MiniMindLM = MiniMindForCausalLM  # the name upstream MiniMind v1 and our earlier code use

AutoConfig.register("minimind", LMConfig, exist_ok=True)
AutoModel.register(LMConfig, MiniMindModel, exist_ok=True)
AutoModelForCausalLM.register(LMConfig, MiniMindForCausalLM, exist_ok=True)

try:  # peft picks LoRA targets by model type when none are given: ours, like Llama's, the query and value projections
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as _peft_targets

    _peft_targets.setdefault("minimind", ["wq", "wv"])
except ImportError:
    pass
