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
