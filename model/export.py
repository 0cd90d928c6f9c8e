"""Exports: a transformers folder (our code travels with it), native Llama, and GGUF for llama.cpp."""
import json
import shutil
from pathlib import Path

import torch

from .convert import llama_config, to_llama_state_dict
from .errors import InputError

CODE_FILES = ("LMConfig.py", "model.py", "errors.py")  # what trust_remote_code imports


def generation_config(tokenizer, config):
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.7, top_p=0.9,
                            max_new_tokens=min(512, config.max_seq_len))


def _replace_folder(tmp: Path, out: Path):
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def export_hf(model, tokenizer, out_dir) -> Path:
    """config.json with auto_map + model.safetensors + tokenizer + the model code: loads with
    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) without this repository."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.auto_map = {"AutoConfig": "LMConfig.LMConfig", "AutoModel": "model.MiniMindModel",
                             "AutoModelForCausalLM": "model.MiniMindForCausalLM"}
    model.config.architectures = ["MiniMindForCausalLM"]
    model.save_pretrained(tmp, safe_serialization=True)
    for name in CODE_FILES:
        shutil.copy(Path(__file__).parent / name, tmp / name)
    tokenizer.save_pretrained(tmp, save_jinja_files=False)
    generation_config(tokenizer, model.config).save_pretrained(tmp)
    _replace_folder(tmp, out)
    return out


def export_llama(model, tokenizer, out_dir) -> Path:
    """A native LlamaForCausalLM folder: no remote code, so vLLM and every Llama tool accept it."""
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = llama_config(model.config)
    with torch.device("meta"):
        llama = LlamaForCausalLM(cfg)
    llama.load_state_dict(to_llama_state_dict(model.state_dict(), model.config), strict=True, assign=True)
    llama.tie_weights()
    llama.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp, save_jinja_files=False)
    generation_config(tokenizer, model.config).save_pretrained(tmp)
    _replace_folder(tmp, out)
    return out


# llama.cpp's tensor names. Its "normal" RoPE rotates adjacent pairs, our layout, so q/k need no permutation.
GGUF_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
              "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
              "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def gguf_tensors(model) -> dict:
    state = model.state_dict()
    out = {"token_embd.weight": state["model.tok_embeddings.weight"], "output_norm.weight": state["model.norm.weight"]}
    if not model.config.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    for i in range(model.config.n_layers):
        for ours, theirs in GGUF_NAMES.items():
            out[f"blk.{i}.{theirs}.weight"] = state[f"model.layers.{i}.{ours}.weight"]
    return out


def export_gguf(model, tokenizer, path, dtype: str = "f32") -> Path:
    """A GGUF file (Llama architecture, our byte-level BPE as a gpt2-style vocabulary) that llama.cpp loads."""
    import gguf
    import numpy as np

    cfg = model.config
    if cfg.use_moe:
        raise InputError("GGUF export covers dense models")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name("MiniMind")
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    if cfg.rope_scaling_type:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if cfg.rope_scaling_type == "linear"
                                     else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(cfg.rope_parameters["factor"]))

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [None] * cfg.vocab_size
    for token, i in vocab.items():
        if i < cfg.vocab_size:
            tokens[i] = token
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    for i, t in enumerate(tokens):
        if t is None:  # the model's vocabulary is larger than the tokenizer's: unused padding entries
            tokens[i], special = f"[PAD{i}]", special | {i}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    np_dtype = np.float32 if dtype == "f32" else np.float16
    for name, tensor in gguf_tensors(model).items():
        array = tensor.detach().float().cpu().numpy()
        writer.add_tensor(name, array.astype(np.float32 if array.ndim == 1 else np_dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path
