"""The streamlit chat page, through streamlit's AppTest, and the chat scripts."""
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_model
from model.checkpoint import save_weights


@pytest.fixture(scope="module")
def out_dir(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("page")
    model = tiny_model(vocab_size=1000)
    save_weights(out / "full_sft_64.safetensors", model.state_dict(), model.config,
                 {"tokenizer": str(demo_data / "tokenizer")})
    return out


def test_chat_page_answers_a_question(out_dir, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MINIMIND_OUT_DIR", str(out_dir))
    monkeypatch.chdir(ROOT)
    app = AppTest.from_file(str(ROOT / "fast_inference.py"), default_timeout=120)
    app.run()
    assert not app.exception
    assert app.sidebar.selectbox[0].value.endswith("full_sft_64.safetensors")
    app.sidebar.slider[0].set_value(0.0)  # greedy
    app.chat_input[0].set_value("What is the capital of France?").run()
    assert not app.exception
    messages = app.chat_message
    assert [m.name for m in messages] == ["user", "assistant"]
    assert messages[0].markdown[0].value == "What is the capital of France?"
    assert len(app.session_state["messages"][1]["content"]) > 0
    app.sidebar.button[0].click().run()  # clear chat
    assert app.session_state["messages"] == []


def test_eval_scripts_stream_answers(out_dir):
    ckpt = str(out_dir / "full_sft_64.safetensors")
    for script, extra in (("2-eval.py", ["--prompt", "你好", "--prompt", "Hi"]), ("0-eval_pretrain.py", ["--prompt", "Hi"])):
        done = subprocess.run([sys.executable, script, "--ckpt", ckpt, "--device", "cpu", "--max_new_tokens", "8",
                               *extra], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert ("🤖: " in done.stdout) if script == "2-eval.py" else ("[continuation] Hi" in done.stdout)


def test_interactive_chat(out_dir):
    ckpt = str(out_dir / "full_sft_64.safetensors")
    done = subprocess.run([sys.executable, "2-eval.py", "--ckpt", ckpt, "--device", "cpu", "--interactive",
                           "--history", "2", "--max_new_tokens", "4"], cwd=ROOT, input="hello\nagain\nexit\n",
                          capture_output=True, text=True, env={**os.environ})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("🤖: ") == 2


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is optional (requirements-eval.txt)")
def test_chat_with_int8_weights_and_the_compiled_step(out_dir):
    """The fast CPU flags together, through the real script: it answers, and torchao's import (CUDA-only kernel
    libraries it cannot load here) leaves no warnings on the user's terminal."""
    ckpt = str(out_dir / "full_sft_64.safetensors")
    done = subprocess.run([sys.executable, "2-eval.py", "--ckpt", ckpt, "--device", "cpu", "--max_new_tokens", "6",
                           "--prompt", "Hi", "--dtype", "bfloat16", "--quantize", "int8", "--compile"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "🤖: " in done.stdout
    assert "Failed to load" not in done.stderr + done.stdout and "Enum subclass" not in done.stderr, done.stderr[-2000:]


def test_the_chat_page_runs_the_demo_tools_and_folds_the_thinking(tool_model, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MINIMIND_OUT_DIR", str(tool_model.parent))
    monkeypatch.chdir(ROOT)
    app = AppTest.from_file(str(ROOT / "fast_inference.py"), default_timeout=120)
    app.run()
    app.sidebar.slider[0].set_value(0.0)  # greedy
    app.sidebar.checkbox[0].check()
    app.chat_input[0].set_value("What is 123*45?").run()
    assert not app.exception
    for shown in (app, app.run()):  # as it streamed, and drawn again from the session's messages
        assert [m.name for m in shown.chat_message] == ["user", "assistant", "tool", "assistant"]
        asked, called, result, answer = shown.chat_message
        assert [e.label for e in called.expander] == ["thinking"]
        assert called.expander[0].markdown[0].value == "I calculate."
        assert called.markdown[-1].value == '🔧 `calculator({"expression": "123*45"})`'
        assert result.code[0].value == "5535" and answer.markdown[0].value == "123*45 is 5535."
    assert [m["role"] for m in app.session_state["messages"]] == ["user", "assistant", "tool", "assistant"]


def test_eval_script_runs_the_demo_tools(tool_model, capsys):
    from conftest import load_script

    load_script("2-eval.py").main(["--ckpt", str(tool_model), "--device", "cpu", "--tools", "demo", "--temperature",
                                   "0", "--max_new_tokens", "160", "--prompt", "What is 123*45?"])
    assert capsys.readouterr().out.split("\n")[:4] == ["👶: What is 123*45?", "💭: I calculate.",
                                                       '🔧: calculator({"expression": "123*45"}) -> 5535',
                                                       "🤖: 123*45 is 5535."]
