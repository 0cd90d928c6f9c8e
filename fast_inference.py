"""A chat page: `streamlit run fast_inference.py` (options after `--`, e.g. `-- --out_dir out`, or the
environment variables MINIMIND_OUT_DIR, MINIMIND_CKPT, MINIMIND_TOKENIZER).

Pick a model found in out/ (checkpoints, exported folders, LoRA adapters), set temperature, top-p and max
tokens in the sidebar, and chat; answers stream in, a model's thinking (<think>) in a collapsed block. With "demo
tools" on, the model may call the demo's calculator and lookup (model/tools.py): each call, its result and the
answer that follows are shown.
"""
import argparse
import json
import os
import sys

import streamlit as st

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing to a user

from model.chat import find_checkpoints
from model.errors import USER_ERRORS, message_of

parser = argparse.ArgumentParser()
parser.add_argument("--out_dir", default=os.environ.get("MINIMIND_OUT_DIR", "out"))
parser.add_argument("--ckpt", default=os.environ.get("MINIMIND_CKPT"), help="preselect this checkpoint")
parser.add_argument("--tokenizer", default=os.environ.get("MINIMIND_TOKENIZER"))
args, _ = parser.parse_known_args(sys.argv[1:])


@st.cache_resource(show_spinner="loading the model ...")
def load(ckpt: str, tokenizer: str | None):
    from model.chat import add_inference_args, load_for_inference

    p = argparse.ArgumentParser()
    add_inference_args(p, ckpt=ckpt)
    return load_for_inference(p.parse_args(["--ckpt", ckpt, "--device", "cpu"] +
                                           (["--tokenizer", tokenizer] if tokenizer else [])))


st.set_page_config(page_title="MiniMind", page_icon="🤖")
st.title("MiniMind chat")
choices = find_checkpoints(args.out_dir)
if args.ckpt and args.ckpt not in choices:
    choices.insert(0, args.ckpt)
with st.sidebar:
    if not choices:
        st.error(f"no model found in {args.out_dir}/: train one first (python demo.py)")
        st.stop()
    ckpt = st.selectbox("model", choices, index=choices.index(args.ckpt) if args.ckpt in choices else 0)
    temperature = st.slider("temperature", 0.0, 1.5, 0.7, 0.05)
    top_p = st.slider("top-p", 0.05, 1.0, 0.9, 0.05)
    max_tokens = st.slider("max new tokens", 16, 1024, 256, 16)
    history_turns = st.slider("history turns sent", 0, 8, 2)
    use_tools = st.checkbox("demo tools (calculator, lookup)", help="the model may call them; they run here")
    if st.button("clear chat"):
        st.session_state.messages = []

try:
    engine, tokenizer = load(ckpt, args.tokenizer)
except USER_ERRORS as e:
    st.error(f"cannot load {ckpt}: {message_of(e)}")
    st.stop()
st.session_state.setdefault("messages", [])


def call_line(call) -> str:
    return f"🔧 `{call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})`"


class AssistantBox:
    """One assistant message on the page: its thinking in a collapsed block, its answer, the calls it made."""

    def __init__(self):
        self.box, self.text, self.slots = st.chat_message("assistant"), {"reasoning": "", "content": ""}, {}

    def add(self, kind: str, piece: str):
        self.text[kind] += piece
        if kind not in self.slots:
            with self.box:
                self.slots[kind] = (st.expander("thinking") if kind == "reasoning" else st.container()).empty()
        self.slots[kind].markdown(self.text[kind])

    def call(self, call):
        with self.box:
            st.markdown(call_line(call))


def show_result(text: str):
    with st.chat_message("tool", avatar="🔧"):
        st.code(text, language=None)


def show(message: dict):
    if message["role"] == "user":
        with st.chat_message("user"):
            st.markdown(message["content"])
    elif message["role"] == "tool":
        show_result(message["content"])
    else:
        box = AssistantBox()
        for kind in ("reasoning", "content"):
            text = message.get("reasoning_content" if kind == "reasoning" else "content")
            if text:
                box.add(kind, text)
        for call in message.get("tool_calls", []):
            box.call(call)


def recent(messages: list[dict], turns: int) -> list[dict]:
    """The last `turns` exchanges: from the turns-th last user message on (a tool round belongs to its question)."""
    starts = [i for i, m in enumerate(messages) if m["role"] == "user"]
    return messages[starts[-turns]:] if turns and len(starts) >= turns else messages if turns else []


for m in st.session_state.messages:
    show(m)

if question := st.chat_input("Ask MiniMind something"):
    from model.chat import tool_turn
    from model.generate import SamplingParams
    from model.tools import DEMO_TOOLS

    st.session_state.messages.append({"role": "user", "content": question})
    show(st.session_state.messages[-1])
    conversation = recent(st.session_state.messages[:-1], history_turns) + [st.session_state.messages[-1]]
    start = len(conversation)
    params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p)
    box = None
    for kind, piece in tool_turn(engine, tokenizer, conversation, params, DEMO_TOOLS if use_tools else None):
        box = box or AssistantBox()
        if kind == "call":  # the result comes next, then the model's next round in a box of its own
            box.call(piece[0])
            show_result(piece[1])
            box = None
        else:
            box.add(kind, piece)
    if box is None and conversation[-1]["role"] == "assistant":  # an empty answer still has its box
        AssistantBox()
    st.session_state.messages += conversation[start:]
