"""Datasets for every training stage.

PretrainDataset: fixed-length windows over memory-mapped uint16 token shards (O(1) random access).
SFTDataset:      conversations through the chat template; labels only on assistant content and its </s>.
DPODataset:      a prompt with a chosen and a rejected answer, each labelled only on the answer.

Map-style datasets: a DistributedSampler gives each DDP rank its own indices and DataLoader workers split
a rank's batches, so every process sees its own part. Text files are indexed by line offsets once and read
with seek, so a 10 GB jsonl costs 8 bytes of memory per row.
"""
import bisect
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .errors import InputError
from .io import BadRows, parse_line
from .processing import normalize_dpo, normalize_sft
from .tokenizer import encode_chat


def resolve_index(data_path) -> Path:
    path = Path(data_path)
    if path.is_dir():
        path = path / "index.json"
    if path.suffix == ".jsonl" or path.suffix == ".json" and path.name != "index.json":
        raise InputError(f"{data_path} is raw text; tokenize it first: "
                         f"python data_process.py pretrain --input {data_path} --out_dir DIR")
    if not path.exists():
        raise FileNotFoundError(f"no token index at {path} (run `python data_process.py pretrain` first)")
    return path


class PretrainDataset(Dataset):
    """Windows of `seq_len` tokens; consecutive windows overlap by one token so every token is a target once."""

    def __init__(self, data_path, seq_len: int, split: str = "train", allow_empty: bool = False):
        index_path = resolve_index(data_path)
        index = json.loads(index_path.read_text())
        self.seq_len, self.stride = seq_len, seq_len - 1
        self.shards, self.starts, total = [], [], 0
        for shard in index.get(split, []):
            tokens = np.memmap(index_path.parent / shard["file"], dtype=np.uint16, mode="r")
            windows = max(0, (len(tokens) - 1) // self.stride)
            if windows:
                self.shards.append(tokens)
                self.starts.append(total)
                total += windows
        self.length = total
        self.vocab_size = index.get("vocab_size")
        if total == 0 and not allow_empty:
            raise InputError(f"{index_path} has no {split} window of {seq_len} tokens")

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        shard = bisect.bisect_right(self.starts, i) - 1
        offset = (i - self.starts[shard]) * self.stride
        window = torch.from_numpy(self.shards[shard][offset:offset + self.seq_len].astype(np.int64))
        return {"input_ids": window, "labels": window}


class JsonlRows:
    """Random access to the rows of a jsonl file through a byte-offset index."""

    def __init__(self, path):
        self.path = Path(path)
        offsets, pos = [], 0
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        if not offsets:
            raise InputError(f"{path} has no rows")
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self._file, self._pid = None, None

    def __len__(self):
        return len(self.offsets)

    def sizes(self) -> np.ndarray:
        """Each row's size in bytes (with any blank lines after it): a free stand-in for its length in tokens."""
        return np.diff(self.offsets, append=self.path.stat().st_size)

    def raw(self, i) -> bytes:
        if self._pid != os.getpid():  # each DataLoader worker opens its own handle
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        self._file.seek(int(self.offsets[i]))
        return self._file.readline()

    def line_number(self, i) -> int:
        """The 1-based line of row i (blank lines are no rows), counted from the start of the file: only a bad row
        needs it, so the index keeps no line numbers."""
        remaining, lines = int(self.offsets[i]), 1
        with open(self.path, "rb") as f:
            while remaining:
                chunk = f.read(min(remaining, 1 << 24))
                lines, remaining = lines + chunk.count(b"\n"), remaining - len(chunk)
        return lines

    def parse(self, i, normalize):
        bad = BadRows()
        record = parse_line(self.raw(i), 0, bad, normalize)  # 0: the line number is looked up only if it is bad
        if record is None:
            raise InputError(f"{self.path}, line {self.line_number(i)}: {next(iter(bad.counts))}. Clean the file with "
                             f"`python data_process.py sft|dpo` first: it skips bad rows and reports them.")
        return record

    def __getstate__(self):  # file handles do not cross process boundaries
        return {**self.__dict__, "_file": None, "_pid": None}


class SFTDataset(Dataset):
    def __init__(self, path, tokenizer, max_length: int = 512):
        self.rows, self.tokenizer, self.max_length = JsonlRows(path), tokenizer, max_length

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        messages = self.rows.parse(i, normalize_sft)["conversations"]
        ids, labels = encode_chat(self.tokenizer, messages, self.max_length)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


def row_sizes(dataset) -> np.ndarray | None:
    """A size per row that orders rows as their token lengths do (rows of a jsonl file, through Subsets), else
    None."""
    if isinstance(dataset, Subset):
        inner = row_sizes(dataset.dataset)
        return None if inner is None else inner[np.asarray(dataset.indices, dtype=np.int64)]
    rows = getattr(dataset, "rows", None)
    return rows.sizes() if isinstance(rows, JsonlRows) else None


class DPODataset(Dataset):
    def __init__(self, path, tokenizer, max_length: int = 512, max_prompt_length: int = 256):
        self.rows, self.tokenizer = JsonlRows(path), tokenizer
        self.max_length, self.max_prompt_length = max_length, max_prompt_length

    def __len__(self):
        return len(self.rows)

    def encode(self, prompt, answer):
        ids, labels = encode_chat(self.tokenizer, prompt + [{"role": "assistant", "content": answer}])
        answer_start = next((k for k, label in enumerate(labels) if label != -100), len(ids))
        # Keep the end of a long prompt (it holds the question), then cut the answer to fit.
        drop = max(0, answer_start - self.max_prompt_length)
        ids, labels = ids[drop:][: self.max_length], labels[drop:][: self.max_length]
        return torch.tensor(ids), torch.tensor(labels)

    def __getitem__(self, i):
        row = self.rows.parse(i, normalize_dpo)
        chosen_ids, chosen_labels = self.encode(row["prompt"], row["chosen"])
        rejected_ids, rejected_labels = self.encode(row["prompt"], row["rejected"])
        return {"chosen_input_ids": chosen_ids, "chosen_labels": chosen_labels,
                "rejected_input_ids": rejected_ids, "rejected_labels": rejected_labels}


def pad_collate(batch, pad_id: int = 0):
    """Right-pad every *_input_ids with pad_id and every *labels with -100 to the longest in the batch."""
    out = {}
    for key in batch[0]:
        seqs = [row[key] for row in batch]
        width = max(len(s) for s in seqs)
        fill = -100 if key.endswith("labels") else pad_id
        padded = torch.full((len(seqs), width), fill, dtype=torch.long)
        for r, s in enumerate(seqs):
            padded[r, :len(s)] = s
        out[key] = padded
    return out


def normalize_prompt(obj) -> dict:
    """A GRPO prompt row: {"messages": [...]} or {"prompt": "..."}, with any other fields (an answer, ...) kept
    for the reward function -> {"messages": [...], "fields": {...}}."""
    from .processing import normalize_messages

    if "messages" in obj:
        messages = normalize_messages(obj["messages"])
    elif isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
        messages = [{"role": "user", "content": obj["prompt"]}]
    else:
        raise ValueError("no messages and no prompt")
    if messages[-1]["role"] != "user":
        raise ValueError("the last message is not the user's")
    return {"messages": messages, "fields": {k: v for k, v in obj.items() if k not in ("messages", "prompt")}}


class PromptDataset(Dataset):
    """Prompts to sample completions for (GRPO): each item is the prompt's ids and its row number, by which the
    loss finds the row's fields for the reward."""

    def __init__(self, path, tokenizer, max_prompt_length: int = 256):
        self.rows, self.tokenizer, self.max_prompt_length = JsonlRows(path), tokenizer, max_prompt_length

    def __len__(self):
        return len(self.rows)

    def row(self, i) -> dict:
        return self.rows.parse(i, normalize_prompt)

    def __getitem__(self, i):
        messages = self.row(i)["messages"]
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
        return {"input_ids": torch.tensor(ids[-self.max_prompt_length:]), "row": torch.tensor(i)}


def prompt_collate(batch, pad_id: int = 0):
    """Right-padded prompt ids and row numbers; and the same prompts and rows as host lists, which the rollout
    reads (read back from the device, they cost a sync each)."""
    padded = pad_collate([{"input_ids": b["input_ids"]} for b in batch], pad_id)
    return {**padded, "row": torch.stack([b["row"] for b in batch]),
            "prompts": [b["input_ids"].tolist() for b in batch], "rows": [int(b["row"]) for b in batch]}


class Mixture(Dataset):
    """Chat rows with pretraining windows among them: `len(chat)` chat rows, then enough windows (spread evenly over
    the pretraining data) that they are `ratio` of the whole. Replaying pretraining text during fine-tuning keeps
    what pretraining taught (InstructGPT's pretraining mix); the sampler shuffles the two together."""

    def __init__(self, chat: Dataset, windows: Dataset, ratio: float):
        if not 0 <= ratio < 1:
            raise InputError(f"--pretrain_mix_ratio must be in [0, 1), got {ratio}")
        self.chat, self.windows = chat, windows
        self.extra = round(len(chat) * ratio / (1 - ratio))
        self.step = max(1, len(windows) // max(self.extra, 1))

    def __len__(self):
        return len(self.chat) + self.extra

    def __getitem__(self, i):
        if i < len(self.chat):
            return self.chat[i]
        return self.windows[((i - len(self.chat)) * self.step) % len(self.windows)]
