import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Nothing is fetched from a hub in tests (huggingface_hub reads these once, on import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from model.LMConfig import LMConfig  # noqa: E402
from model.model import MiniMindLM  # noqa: E402


def tiny_config(**overrides) -> LMConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64, multiple_of=16)
    return LMConfig(**{**base, **overrides})


def tiny_model(seed=0, **overrides) -> MiniMindLM:
    """A random tiny model whose weights are large enough that greedy output is not one repeated token."""
    torch.manual_seed(seed)
    model = MiniMindLM(tiny_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.eval()


@pytest.fixture
def model():
    return tiny_model()


def load_script(name: str):
    """A numbered script as a module (its file name is not an identifier), to call its main(argv) in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.replace("-", "_").removesuffix(".py"), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small demo corpus, a tokenizer trained on it and the tokenized pretraining shards."""
    from model.demo_corpus import write_demo
    from model.processing import tokenize_pretrain
    from model.tokenizer import read_texts, save, train_bpe, wrap

    root = tmp_path_factory.mktemp("demo")
    write_demo(root / "data", seed=7, pretrain_repeats=3)
    tokenizer = wrap(train_bpe(read_texts(root / "data" / "tokenizer_train.jsonl"), 1000, show_progress=False))
    save(tokenizer, root / "tokenizer")
    tokenize_pretrain(root / "data" / "pretrain_data.jsonl", root / "tokens", root / "tokenizer", workers=1,
                      val_every=20)
    return root


# The tool a LangChain `@tool def add(a: int, b: int) -> int: """Add two integers."""` becomes (a test checks it).
ADD_TOOL = {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"], "type": "object"}}}


GARBLED = {"add 2 and three": '<tool_call>{"name":"add","arguments":{"a":2,"b":three}}</tool_call>',  # bad JSON
           "times 2 and 3": '<tool_call>{"name":"times","arguments":{"a":2,"b":3}}</tool_call>'}  # an unknown tool


def tool_conversations():
    """(tools, conversation) pairs that `tool_model` learns by heart: calls, answers after a result, garbled calls."""
    from model.tools import DEMO_TOOLS

    def user(text):
        return {"role": "user", "content": text}

    def call(name, arguments, think=None):
        return {"role": "assistant", "content": "", **({"reasoning_content": think} if think else {}),
                "tool_calls": [{"name": name, "arguments": arguments}]}

    def said(text):
        return {"role": "assistant", "content": text}

    # Clients send a call back without its thinking (reasoning_content is no OpenAI field), so the history has none.
    add_call, product = call("add", {"a": 2, "b": 3}), call("calculator", {"expression": "123*45"})
    return [
        ([ADD_TOOL], [user("add 2 and 3"), call("add", {"a": 2, "b": 3}, "I add.")]),
        ([ADD_TOOL], [user("add 2 and 3"), add_call, {"role": "tool", "content": "5"}, said("2 plus 3 is 5.")]),
        ([ADD_TOOL], [user("add 2 and three"), said(GARBLED["add 2 and three"])]),
        ([ADD_TOOL], [user("times 2 and 3"), said(GARBLED["times 2 and 3"])]),
        (None, [user("add 4 and 5"), said('<tool_call>{"name":"add","arguments":{"a":4,"b":5}}</tool_call>')]),
        (DEMO_TOOLS, [user("What is 123*45?"), call("calculator", {"expression": "123*45"}, "I calculate.")]),
        (DEMO_TOOLS, [user("What is 123*45?"), product, {"role": "tool", "content": "5535"}, said("123*45 is 5535.")]),
    ]


@pytest.fixture(scope="session")
def tool_model(demo_data, tmp_path_factory):
    """A tiny model trained until it says each of tool_conversations()' answers greedily: a model that emits calls."""
    from model.checkpoint import save_weights
    from model.generate import SamplingParams, generate_text
    from model.tokenizer import encode_chat, load_tokenizer, render_chat

    tok = load_tokenizer(demo_data / "tokenizer")
    model = tiny_model(dim=64, n_layers=1, vocab_size=1000, max_seq_len=512).train()  # one layer learns them fastest
    groups = {}  # one batch per tool set: their conversations are of about one length, so little padding
    for tools, messages in tool_conversations():
        groups.setdefault(json.dumps(tools), []).append(encode_chat(tok, messages, tools=tools))
    batches = []
    for rows in groups.values():
        width = max(len(ids) for ids, _ in rows)
        ids, labels = torch.zeros(len(rows), width, dtype=torch.long), torch.full((len(rows), width), -100)
        for r, (row_ids, row_labels) in enumerate(rows):
            ids[r, :len(row_ids)], labels[r, :len(row_labels)] = torch.tensor(row_ids), torch.tensor(row_labels)
        batches.append((ids, labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def says_every_answer():
        model.eval()
        for tools, messages in tool_conversations():
            prompt = tok.apply_chat_template(messages[:-1], tools=tools, tokenize=True, add_generation_prompt=True)
            answer = render_chat(messages)[-2][0].removesuffix("</s>")  # the last answer, as trained
            budget = len(tok.encode(answer, add_special_tokens=False)) + 1
            said = generate_text(model, tok, [prompt["input_ids"]], SamplingParams(max_new_tokens=budget))[0]["text"]
            if said != answer:
                return model.train() and False
        return True

    for step in range(300):
        optimizer.zero_grad()
        losses = [model(ids, labels=labels).loss for ids, labels in batches]
        sum(losses).backward()
        optimizer.step()
        if max(loss.item() for loss in losses) < 0.05 and step % 5 == 0 and says_every_answer():
            break
    else:
        raise AssertionError("the tool model did not learn its conversations")
    path = tmp_path_factory.mktemp("tools") / "tool_model.safetensors"
    save_weights(path, model.state_dict(), model.config, {"tokenizer": str(demo_data / "tokenizer")})
    return path



# Ops that make a GPU wait for the host: a Python read of a value, or an output whose shape depends on the data.
SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten.bincount")


def host_syncs(fn, *args, **kwargs) -> list[str]:
    """The ops of fn(*args) that would sync a GPU with the host (seen on any device: a dispatch mode records the
    ops, and Tensor.tolist, which reads memory without an op, is wrapped)."""
    from unittest import mock

    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            bool_index = name == "aten.index" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or ())
            if name in SYNC_OPS or bool_index:
                seen.append(name)
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist

    def recorded_tolist(self):
        seen.append("tolist")
        return tolist(self)

    with mock.patch.object(torch.Tensor, "tolist", recorded_tolist), Record():
        fn(*args, **kwargs)
    return seen
