"""Exports (transformers folder, native Llama, GGUF) and C-Eval scoring."""
import csv
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, tiny_model
from model.checkpoint import save_weights
from model.evaluation import ceval_evaluate
from model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def checkpoint(demo_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "model.safetensors"
    model = tiny_model(vocab_size=1000)
    save_weights(path, model.state_dict(), model.config)
    return path


def export(checkpoint, tokenizer, out, fmt):
    done = subprocess.run([sys.executable, "export_model.py", "--ckpt", str(checkpoint), "--tokenizer", str(tokenizer),
                           "--out_dir", str(out), "--format", fmt], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def logits_in_a_fresh_process(tmp_path, loader_code: str, ids) -> torch.Tensor:
    """Load and run the export from another directory, where this repository is not importable."""
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(loader_code) + textwrap.dedent(f"""
        import torch
        ids = torch.tensor({ids.tolist()})
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, "logits.pt")
    """))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, str(script)], cwd=elsewhere, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(elsewhere / "logits.pt", weights_only=True)


def our_logits(checkpoint, ids):
    from model.loading import load_model

    with torch.no_grad():
        return load_model(checkpoint)(ids).logits


def test_hf_export_loads_with_auto_classes_without_this_repo(checkpoint, demo_data, tmp_path):
    out = export(checkpoint, demo_data / "tokenizer", tmp_path / "hf", "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "model.py",
            "LMConfig.py"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "default" and "rope_scaling" not in config  # transformers 5
    ids = torch.randint(3, 1000, (2, 16))
    theirs = logits_in_a_fresh_process(tmp_path, f"""
        import warnings
        warnings.simplefilter("error", FutureWarning)  # no deprecated key in what we wrote
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained("{out}", trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained("{out}")
        assert tok.apply_chat_template([{{"role": "user", "content": "hi"}}], tokenize=False,
                                       add_generation_prompt=True) == "<s>user\\nhi</s>\\n<s>assistant\\n"
        import importlib.util
        assert importlib.util.find_spec("model") is None  # this repository is not importable here
    """, ids)
    torch.testing.assert_close(theirs, our_logits(checkpoint, ids), atol=1e-4, rtol=0)


def test_llama_export_needs_no_remote_code(checkpoint, demo_data, tmp_path):
    out = export(checkpoint, demo_data / "tokenizer", tmp_path / "llama", "llama")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and not (out / "model.py").exists()
    ids = torch.randint(3, 1000, (2, 16))
    theirs = logits_in_a_fresh_process(tmp_path, f"""
        from transformers import LlamaForCausalLM
        model = LlamaForCausalLM.from_pretrained("{out}").eval()
    """, ids)
    torch.testing.assert_close(theirs, our_logits(checkpoint, ids), atol=1e-4, rtol=0)
    from model.loading import load_model  # and our loader takes the Llama folder back

    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids).logits, our_logits(checkpoint, ids), atol=1e-5, rtol=0)


def test_gguf_export_reads_back(checkpoint, demo_data, tmp_path):
    import gguf

    out = export(checkpoint, demo_data / "tokenizer", tmp_path / "gguf", "gguf")
    reader = gguf.GGUFReader(str(out / "minimind.gguf"))
    fields = {name: f for name, f in reader.fields.items()}

    def scalar(name):
        f = fields[name]
        return f.parts[f.data[0]].tolist()[0]

    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert scalar("llama.embedding_length") == 64 and scalar("llama.block_count") == 2
    assert scalar("llama.attention.head_count") == 4 and scalar("llama.attention.head_count_kv") == 2
    assert scalar("tokenizer.ggml.eos_token_id") == 2
    tok = load_tokenizer(demo_data / "tokenizer")
    tokens = [bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in fields["tokenizer.ggml.tokens"].data]
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and len(tokens) == 1000
    assert tokens[500] == tok.convert_ids_to_tokens(500)
    from model.loading import load_model

    state = load_model(checkpoint).state_dict()
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 9 * 2  # embeddings, final norm, 9 per layer (output tied to embeddings)
    for ours, theirs in [("model.tok_embeddings.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"),
                         ("model.layers.1.attention.wq.weight", "blk.1.attn_q.weight"),
                         ("model.layers.0.feed_forward.w2.weight", "blk.0.ffn_down.weight")]:
        data = torch.from_numpy(tensors[theirs].data.copy()).reshape(state[ours].shape)
        torch.testing.assert_close(data, state[ours], atol=0, rtol=0)


def test_gguf_greedy_continuation_matches_llama_cpp(checkpoint, demo_data, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from model.generate import SamplingParams, generate_ids
    from model.loading import load_model

    out = export(checkpoint, demo_data / "tokenizer", tmp_path / "gguf", "gguf")
    llm = llama_cpp.Llama(model_path=str(out / "minimind.gguf"), n_ctx=128, verbose=False)
    prompt = [1, 5, 77, 300, 41]
    theirs = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        theirs.append(token)
        if len(theirs) == 32:
            break
    ours = [int(t) for t in generate_ids(load_model(checkpoint), [prompt], SamplingParams(max_new_tokens=32),
                                         eos_token_id=-1)]
    assert ours == theirs


def write_fixture(root, subjects):
    for split, rows_by_subject in subjects.items():
        for name, rows in rows_by_subject.items():
            path = root / split / f"{name}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=["id", "question", "A", "B", "C", "D", "answer"])
                w.writeheader()
                for i, (q, answer) in enumerate(rows):
                    w.writerow({"id": i, "question": q, "A": "a", "B": "b", "C": "c", "D": "d", "answer": answer})


class AlwaysPrefers(torch.nn.Module):
    """A stand-in model whose next-token logits rank the four answer letters in a fixed order."""

    def __init__(self, tokenizer, order):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.bias = torch.full((len(tokenizer),), -10.0)
        for rank, letter in enumerate(order):
            self.bias[tokenizer.encode(letter, add_special_tokens=False)[0]] = 5.0 - rank

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        logits = self.bias.expand(input_ids.shape[0], 1, -1)
        return type("Out", (), {"logits": logits})()


def test_ceval_scoring_gives_the_hand_computed_accuracy(demo_data, tmp_path):
    write_fixture(tmp_path, {"val": {"algebra": [("1+1=?", "B"), ("2+2=?", "B"), ("3+3=?", "A")],
                                     "history": [("who?", "C"), ("when?", "B")]},
                             "dev": {"algebra": [("0+0=?", "A")], "history": [("where?", "D")]}})
    tok = load_tokenizer(demo_data / "tokenizer")
    result = ceval_evaluate(AlwaysPrefers(tok, "BCAD"), tok, tmp_path, "val", progress=False)
    assert result["subjects"]["algebra"] == {"correct": 2, "total": 3, "accuracy": 2 / 3}
    assert result["subjects"]["history"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert (result["correct"], result["total"]) == (3, 5)
    one_shot = ceval_evaluate(AlwaysPrefers(tok, "ABCD"), tok, tmp_path, "val", shots=1, progress=False)
    assert (one_shot["correct"], one_shot["total"]) == (1, 5)


def test_eval_ceval_script_runs_on_the_demo_format(checkpoint, demo_data, tmp_path):
    done = subprocess.run([sys.executable, "eval_ceval.py", "--ckpt", str(checkpoint), "--tokenizer",
                           str(demo_data / "tokenizer"), "--data_dir", str(demo_data / "data" / "ceval"),
                           "--out_dir", str(tmp_path / "ceval"), "--device", "cpu", "--shots", "2"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("total accuracy: ") and last.endswith("/144)")
    summary = json.loads((tmp_path / "ceval" / "summary.json").read_text())
    assert summary["total"] == 144 and set(summary["subjects"]) == {"world_capitals", "world_continents", "arithmetic"}
    assert (tmp_path / "ceval" / "subjects" / "arithmetic.csv").exists()
    assert "| **total** |" in (tmp_path / "ceval" / "summary.md").read_text()


SHARED_CEVAL = ROOT.parent / "shared" / "ceval-exam"


@pytest.mark.skipif(not SHARED_CEVAL.exists(), reason="the real C-Eval data (../shared/ceval-exam) is absent")
def test_real_ceval_val_split_reads_1346_questions():
    from model.evaluation import read_ceval_split

    subjects = read_ceval_split(SHARED_CEVAL, "val")
    assert len(subjects) == 52 and sum(len(rows) for rows in subjects.values()) == 1346
