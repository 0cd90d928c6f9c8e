"""Bad input through the real scripts: one line that says what is wrong, exit status 1, never a traceback."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_model
from model.checkpoint import save_weights
from model.errors import InputError
from model.loading import load_model


class RunsShellCommand:
    """A pickle that runs a shell command when loaded (what an untrusted .pth can carry)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    torch.save({"model": RunsShellCommand(f"touch {root / 'payload_ran'}")}, root / "payload.pth")
    (root / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a json header}")
    model = tiny_model(vocab_size=1000)
    save_weights(root / "page" / "full_sft_64.safetensors", model.state_dict(), model.config)
    state = model.state_dict()
    del state["model.norm.weight"]
    torch.save(state, root / "missing_norm.pth")
    return root


def run(script, *args):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("script, args, message", [
    ("2-eval.py", ["--ckpt", "{root}/nowhere.safetensors", "--prompt", "Hi"], "no checkpoint at {root}/nowhere"),
    ("2-eval.py", ["--ckpt", "{root}/garbage.safetensors", "--prompt", "Hi"], "{root}/garbage.safetensors is not a readable safetensors file (Error while deserializing header"),
    ("0-eval_pretrain.py", ["--ckpt", "{root}/missing_norm.pth"],
     "checkpoint {root}/missing_norm.pth does not match the model:\n  missing keys (1): model.norm.weight\n"),
    ("eval_ceval.py", ["--ckpt", "{root}/missing_norm.pth", "--data_dir", "{root}"],
     "checkpoint {root}/missing_norm.pth does not match the model:\n  missing keys (1): model.norm.weight\n"),
    ("2-eval.py", ["--ckpt", "{root}/page/full_sft_64.safetensors", "--prompt", "Hi", "--temperature", "-1"],
     "temperature must be 0 (greedy) or more, got -1.0"),
    ("1-pretrain.py", ["--data_path", "{root}/no_tokens", "--preset", "demo", "--out_dir", "{root}/out"],
     "no token index at {root}/no_tokens"),
    # A --val_path that cannot be used is an error, not a run without validation.
    ("1-pretrain.py", ["--data_path", "{demo}/tokens", "--val_path", "{demo}/data/pretrain_data.jsonl", "--out_dir",
                       "{root}/out", "--device", "cpu", "--dim", "64", "--n_layers", "1", "--n_heads", "4",
                       "--n_kv_heads", "2", "--vocab_size", "1000", "--max_seq_len", "64", "--max_steps", "1", "--quiet"],
     "{demo}/data/pretrain_data.jsonl is raw text; tokenize it first"),
])
def test_scripts_report_bad_input_in_one_line(bad_inputs, demo_data, script, args, message):
    done = run(script, *(a.format(root=bad_inputs, demo=demo_data) for a in args))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert f"error: {message.format(root=bad_inputs, demo=demo_data)}" in done.stderr


@pytest.mark.skipif(torch.version.cuda is not None or torch.backends.mps.is_available(),
                    reason="the messages of a CPU-only torch")
@pytest.mark.parametrize("script, device, args", [
    ("1-pretrain.py", "cuda", ["--data_path", "{root}/no_tokens"]),
    ("2-eval.py", "cuda:3", ["--ckpt", "{root}/page/full_sft_64.safetensors", "--prompt", "Hi"]),
    ("eval_ceval.py", "mps", ["--ckpt", "{root}/page/full_sft_64.safetensors", "--data_dir", "{root}"]),
])
def test_a_device_this_torch_lacks_is_one_line_that_says_how_to_get_it(bad_inputs, script, device, args):
    done = run(script, "--device", device, *(a.format(root=bad_inputs) for a in args))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    if device == "mps":
        assert lines[0] == (f"error: --device mps asks for Apple's GPU (mps); this torch ({torch.__version__}) on "
                            f"this machine has none: use --device cpu")
    else:
        assert lines[0] == (f"error: --device {device} asks for an NVIDIA GPU; this torch is a CPU-only build "
                            f"({torch.__version__}). For the CUDA build: pip install torch==2.13.0 --index-url "
                            f"https://download.pytorch.org/whl/cu130 (README: GPU)")


def test_a_bad_row_found_by_a_dataloader_worker_is_reported_without_its_traceback(bad_inputs, demo_data):
    rows = [json.dumps({"instruction": f"question {i}", "output": f"answer {i}"}) for i in range(3)]
    (bad_inputs / "sft.jsonl").write_text("\n".join(rows[:2] + ['{"instruction": "q", "output"', rows[2]]) + "\n")
    done = run("3-full_sft.py", "--init_from", bad_inputs / "page" / "full_sft_64.safetensors", "--data_path",
               bad_inputs / "sft.jsonl", "--tokenizer", demo_data / "tokenizer", "--out_dir", bad_inputs / "sft_out",
               "--device", "cpu", "--batch_size", "2", "--max_steps", "4", "--num_workers", "1", "--quiet")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"error: {bad_inputs / 'sft.jsonl'}, line 3: malformed JSON. Clean "
                                                    "the file with `python data_process.py sft|dpo` first: it skips bad "
                                                    "rows and reports them.")


def test_a_pickle_that_runs_code_is_refused_unexecuted(bad_inputs):
    done = run("2-eval.py", "--ckpt", bad_inputs / "payload.pth", "--prompt", "Hi")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "is not a plain state dict of tensors" in done.stderr and "system" in done.stderr
    assert not (bad_inputs / "payload_ran").exists()
    with pytest.raises(InputError, match="could run code"):  # the same through the library
        load_model(bad_inputs / "payload.pth")
    assert not (bad_inputs / "payload_ran").exists()


def test_chat_page_shows_a_load_error(bad_inputs, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MINIMIND_OUT_DIR", str(bad_inputs / "page"))
    monkeypatch.setenv("MINIMIND_CKPT", str(bad_inputs / "garbage.safetensors"))
    monkeypatch.chdir(ROOT)
    app = AppTest.from_file(str(ROOT / "fast_inference.py"), default_timeout=120)
    app.run()
    assert not app.exception
    assert "is not a readable safetensors file" in app.error[0].value
