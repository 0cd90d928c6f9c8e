"""A chat page: `streamlit run fast_inference.py` (options after `--`, e.g. `-- --out_dir out`, or the
environment variables MINIMIND_OUT_DIR, MINIMIND_CKPT, MINIMIND_TOKENIZER).

Pick a model found in out/ (checkpoints, exported folders, LoRA adapters), set temperature, top-p and max
tokens in the sidebar, and chat; answers stream in.
"""
import argparse
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
    if st.button("clear chat"):
        st.session_state.messages = []

try:
    engine, tokenizer = load(ckpt, args.tokenizer)
except USER_ERRORS as e:
    st.error(f"cannot load {ckpt}: {message_of(e)}")
    st.stop()
st.session_state.setdefault("messages", [])
for m in st.session_state.messages:
    with st.chat_message(m["role"]):
        st.markdown(m["content"])

if question := st.chat_input("Ask MiniMind something"):
    from model.generate import SamplingParams, stream_text

    st.session_state.messages.append({"role": "user", "content": question})
    with st.chat_message("user"):
        st.markdown(question)
    earlier = st.session_state.messages[:-1][-2 * history_turns:] if history_turns else []
    prompt = tokenizer.apply_chat_template(earlier + [st.session_state.messages[-1]], tokenize=True,
                                           add_generation_prompt=True)["input_ids"]
    params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p)

    def pieces():
        for deltas in stream_text(engine, tokenizer, [prompt], params):
            for d in deltas:
                if d.text:
                    yield d.text

    with st.chat_message("assistant"):
        answer = st.write_stream(pieces())
    st.session_state.messages.append({"role": "assistant", "content": answer})
