"""Shared by the scripts that talk to a model: loading a model with its tokenizer, sampling flags, streaming."""
import argparse
import sys
from pathlib import Path

import torch

from .errors import InputError
from .generate import SamplingParams, stream_text


def add_inference_args(parser: argparse.ArgumentParser, ckpt: str):
    g = parser.add_argument_group("model and sampling")
    g.add_argument("--ckpt", default=ckpt, help="a checkpoint, exported folder, LoRA adapter or upstream .pth")
    g.add_argument("--tokenizer", default=None, help="default: the checkpoint's own, else model/minimind_tokenizer")
    g.add_argument("--preset", default=None, help="dims for an upstream .pth (see model/LMConfig.py)")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="int8: int8 weights (torchao, weight-only, per row), fast on CPU with --dtype bfloat16 "
                        "--compile; int4: 4-bit weights in groups of 32, CPU only (see model/engine.py)")
    g.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile: faster tokens after a one-time compilation of "
                        "tens of seconds on CPU (see model/engine.py)")
    g.add_argument("--rope_scaling", default=None, metavar="TYPE:FACTOR",
                   help="extend the context at inference, e.g. yarn:4 (trained at 512, chat at 2048) or linear:4")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top_p", type=float, default=0.9)
    g.add_argument("--top_k", type=int, default=0)
    g.add_argument("--repetition_penalty", type=float, default=1.0)
    g.add_argument("--max_new_tokens", type=int, default=256)
    g.add_argument("--seed", type=int, default=None)
    return g


def sampling_from_args(args, stop=()) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=tuple(stop),
                          seed=args.seed)


def parse_rope_scaling(text: str | None):
    if not text:
        return None
    kind, _, factor = text.partition(":")
    return {"rope_type": kind, "factor": float(factor or 4)}


def find_tokenizer(ckpt, explicit=None):
    """--tokenizer, else the tokenizer saved with the checkpoint (exported folders, training metadata; for a LoRA
    adapter, its base model's), else default."""
    from .loading import adapter_base, resolve_path
    from .tokenizer import DEFAULT_TOKENIZER_DIR

    if explicit:
        return Path(explicit)
    path = resolve_path(ckpt)
    folder = path if path.is_dir() else path.parent
    if (folder / "tokenizer.json").exists():
        return folder
    if base := adapter_base(path):
        return find_tokenizer(base)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            saved = (f.metadata() or {}).get("tokenizer")
        if saved and (Path(saved) / "tokenizer.json").exists():
            return Path(saved)
    return DEFAULT_TOKENIZER_DIR


def load_for_inference(args, rows=(1,)):
    """(engine, tokenizer) ready for generation, as the flags of add_inference_args ask: the model is prepared for
    decoding by model/engine.py (products tuned for this CPU; int8 and the compiled step when asked; compiled for
    each row count in `rows`). `engine.model` is the model itself."""
    from .engine import Engine
    from .loading import load_model
    from .tokenizer import load_tokenizer
    from .trainer import pick_device

    device = pick_device(args.device)
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = load_model(args.ckpt, device=device, dtype=dtype, preset=args.preset,
                       rope_scaling=parse_rope_scaling(args.rope_scaling))
    tokenizer = load_tokenizer(find_tokenizer(args.ckpt, args.tokenizer))
    if len(tokenizer) > model.config.vocab_size:
        raise InputError(f"the tokenizer ({len(tokenizer)} tokens) does not fit the model (vocab "
                         f"{model.config.vocab_size}); pass the --tokenizer the model was trained with")
    if args.quantize == "int8" and device.type == "cpu" and not (args.compile and args.dtype == "bfloat16"):
        print("note: int8 weights decode fast on CPU only with --dtype bfloat16 --compile; without them, slower "
              "than the plain model", file=sys.stderr)
    engine = Engine(model, compile=args.compile, tune=True, quantize=args.quantize, rows=rows)
    return engine, tokenizer


def parsed_stream(model, tokenizer, prompt, params, parser, calls: list):
    """(kind, text) pieces of one generation through `parser`; the calls it found are appended to `calls`."""
    for deltas in stream_text(model, tokenizer, [prompt], params):
        for d in deltas:
            yield from parser.push(d.text)
    tail, found = parser.finish()
    calls.extend(found or [])
    yield from tail


def tool_turn(model, tokenizer, messages: list[dict], params, tools=None, run=None, max_rounds: int = 4):
    """The assistant's answer to the last message, running the tools it calls on this machine (demo: model/tools.py).

    Yields ("reasoning" | "content", text) as the model writes, and ("call", (call, result)) for each call it makes,
    whose result goes back to the model for another round (at most `max_rounds`). `messages` grows by the
    assistant's turns and the tool results, as the chat template renders them."""
    from .tool_calls import OutputParser, normalize_tools
    from .tools import run_tool_call

    run = run or run_tool_call
    names = [t["name"] for t in normalize_tools(tools)] if tools else None
    for _ in range(max_rounds):
        # Earlier thinking is not sent back, as OpenAI clients do not send it (it is no field of theirs).
        sent = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]
        prompt = tokenizer.apply_chat_template(sent, tools=tools, tokenize=True,
                                               add_generation_prompt=True)["input_ids"]
        parser, written, calls = OutputParser(names), {"reasoning": "", "content": ""}, []
        for kind, text in parsed_stream(model, tokenizer, prompt, params, parser, calls):
            if text:
                written[kind] += text
                yield kind, text
        turn = {"role": "assistant", "content": written["content"]}
        if written["reasoning"]:
            turn["reasoning_content"] = written["reasoning"]
        if calls:
            turn["tool_calls"] = calls
        messages.append(turn)
        if not calls:
            return
        for call in calls:
            result = run(call)
            messages.append({"role": "tool", "content": result})
            yield "call", (call, result)


def stream_to(out, model, tokenizer, prompt_ids, params) -> str:
    """Generate for one prompt, writing text as it arrives; returns the whole answer."""
    text = ""
    for deltas in stream_text(model, tokenizer, [prompt_ids], params):
        for d in deltas:
            text += d.text
            out.write(d.text)
            out.flush()
    return text



def find_checkpoints(root="out") -> list[str]:
    """Loadable models under `root`: final .safetensors files, exported folders and LoRA adapters (newest first)."""
    root = Path(root)
    if not root.exists():
        return []
    found = [p for p in root.glob("*.safetensors")]
    found += [p.parent for p in root.glob("**/config.json") if (p.parent / "model.safetensors").exists()
              and "checkpoints" not in p.parts]
    found += [p.parent for p in root.glob("**/adapter_config.json") if "checkpoints" not in p.parts]
    return [str(p) for p in sorted(set(found), key=lambda p: p.stat().st_mtime, reverse=True)]
