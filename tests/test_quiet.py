"""Quiet use as a library: importing `model.*`, building a model, and loading the native Llama export with
transformers print nothing on a CPU machine, change no warning filter or log level, and a real warning still
reaches the user. (Scripts opt in to more silence at their entry point: model.quiet_third_party.)"""
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, tiny_model

SCRIPT = textwrap.dedent("""
    import logging, sys, warnings
    sys.path.insert(0, {root!r})
    import accelerate, fastapi, peft, torch, transformers, trl, xgrammar  # they set filters of their own on import
    filters, levels = list(warnings.filters), {{n: logging.getLogger(n).level for n in ("torchao", "transformers",
                                                                                     "torch.utils._pytree")}}
    import model.chat, model.dataset, model.engine, model.export, model.generate, model.loading, model.model
    import model.scheduler, model.server, model.stages, model.trainer
    from model.LMConfig import LMConfig
    from model.model import MiniMindForCausalLM
    assert warnings.filters == filters, "importing model changed the warning filters"
    assert levels == {{n: logging.getLogger(n).level for n in levels}}, "importing model changed log levels"
    net = MiniMindForCausalLM(LMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=6400, max_seq_len=64))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained({out!r})
    AutoTokenizer.from_pretrained({out!r})
    print("loaded")
    warnings.warn("a warning of the user's own")
""")


@pytest.mark.skipif(__import__("importlib").util.find_spec("torchao") is not None,
                    reason="torchao is installed: its CUDA-only kernel libraries announce their failed loads")
def test_library_use_prints_nothing_and_real_warnings_still_show(tmp_path):
    from model.export import export_llama
    from model.tokenizer import load_tokenizer

    export_llama(tiny_model(vocab_size=6400), load_tokenizer(), tmp_path / "llama")
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT), out=str(tmp_path / "llama"))],
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "loaded\n"
    # transformers' own progress bar while it loads weights is its interface, not a message: it may stay
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].endswith("UserWarning: a warning of the user's own"), done.stderr[-3000:]
