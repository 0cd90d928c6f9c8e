"""Data processing behind `data_process.py`: streaming, parallel, tolerant of bad rows, atomic outputs.

pretrain: {"text"} jsonl -> uint16 token shards (documents joined by </s>) + index.json, with a validation shard.
sft:      deepctrl rows or {"conversations": [...]} -> one canonical {"conversations": [...]} jsonl.
dpo:      prompt/chosen/rejected (strings or message lists, jsonl or a json array) -> canonical jsonl.
"""
import json
import os
import re
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import InputError
from .io import BadRows, atomic_writer, iter_json_records, parse_line, text_field
from .tool_calls import normalize_calls, normalize_tools

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "tool": "tool"}


# ------------------------------------------------------------------------------------------------ normalizers
def normalize_text(obj) -> str:
    return text_field(obj, "text")


EXTRA_FIELDS = {"system": ("tools",), "assistant": ("tool_calls", "reasoning_content")}


def normalize_messages(messages, tools=None) -> list[dict]:
    """Turns as {"role", "content"}, and upstream's current tool format: `tools` on the first turn, a system turn
    (or the row's own `tools`, given here), `tool_calls` and `reasoning_content` on assistant turns, `tool` turns
    with the results. Tools and calls may be JSON strings or objects; a call must name a declared tool."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise ValueError("a message is not an object")
        if "from" in m and "value" in m:  # ShareGPT style
            role = SHAREGPT_ROLES.get(m["from"])
            content = m["value"]
        else:
            role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        out.append({"role": role, "content": content, **{k: m[k] for k in EXTRA_FIELDS.get(role, ()) if m.get(k)}})
    if tools is not None:
        if out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": ""})
        out[0]["tools"] = normalize_tools(tools) + normalize_tools(out[0].get("tools", []))
    declared = set()
    for i, turn in enumerate(out):
        if "tools" in turn:
            if i:
                raise ValueError("tools belong to the first turn, a system turn")
            turn["tools"] = normalize_tools(turn["tools"])
            declared = {t["name"] for t in turn["tools"]}
        if "tool_calls" in turn:
            turn["tool_calls"] = normalize_calls(turn["tool_calls"], declared)
        if "reasoning_content" in turn:
            text_field(turn, "reasoning_content")
        if turn["role"] == "tool" and not (i and ("tool_calls" in out[i - 1] or out[i - 1]["role"] == "tool")):
            raise ValueError("a tool result without a tool call before it")
        content, bare = turn["content"], "tools" in turn or "tool_calls" in turn or turn["role"] == "tool"
        if not (isinstance(content, str) and (content.strip() or bare) or content is None and bare):
            raise ValueError("empty or non-string message content")
        turn["content"] = content or ""
    return out


def normalize_sft(obj) -> dict:
    """deepctrl (instruction, input, output, history) or conversations -> {"conversations": [...]}."""
    if "conversations" in obj or "messages" in obj:
        messages = normalize_messages(obj.get("conversations", obj.get("messages")), obj.get("tools"))
    elif "instruction" in obj and "output" in obj:
        messages = []
        history = obj.get("history") or []
        if not isinstance(history, list):
            raise ValueError("history is not a list")
        for pair in history:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise ValueError("history entries must be [question, answer] pairs")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        question = text_field(obj, "instruction")
        extra = obj.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError("field 'input' is not a string")
        messages += [{"role": "user", "content": question + ("\n" + extra if extra.strip() else "")},
                     {"role": "assistant", "content": text_field(obj, "output")}]
        messages = normalize_messages(messages)
    else:
        raise ValueError("neither 'conversations' nor 'instruction'/'output'")
    if messages[-1]["role"] != "assistant":
        raise ValueError("conversation does not end with an assistant turn")
    return {"conversations": messages}


def normalize_dpo(obj) -> dict:
    """-> {"prompt": [messages before the answer], "chosen": str, "rejected": str}."""
    prompt = obj["prompt"] if "prompt" in obj else None

    def answer(key):
        value = obj[key]
        if isinstance(value, str):
            if not value.strip():
                raise ValueError(f"empty {key!r}")
            return value, None
        messages = normalize_messages(value)
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{key!r} does not end with an assistant turn")
        return messages[-1]["content"], messages[:-1]

    chosen, chosen_context = answer("chosen")
    rejected, rejected_context = answer("rejected")
    if prompt is None:  # the full-conversation form: the prompt is what precedes the answer
        if not chosen_context or chosen_context != rejected_context:
            raise ValueError("no 'prompt' and chosen/rejected do not share a conversation prefix")
        messages = chosen_context
    elif isinstance(prompt, str):
        messages = [{"role": "user", "content": text_field(obj, "prompt")}]
    else:
        messages = normalize_messages(prompt)
    if messages[-1]["role"] != "user":
        raise ValueError("the prompt does not end with a user turn")
    return {"prompt": messages, "chosen": chosen, "rejected": rejected}


def chinese_ratio(text: str) -> float:
    return len(re.findall(r"[\u4e00-\u9fff]", text)) / max(len(text), 1)


# ---------------------------------------------------------------------------------------------------- progress
def progress(path, desc):
    return tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                dynamic_ncols=True, mininterval=0.5, disable=None)  # None: no bar where stderr is a log file


# ----------------------------------------------------------------------------------------------- sft and dpo
def normalize_file(input_path, output_path, kind: str, max_chars: int = 0, min_zh_ratio: float = 0.0) -> dict:
    """Stream `input_path` into a canonical jsonl. Returns counts; bad rows are reported, never fatal alone."""
    normalize = {"sft": normalize_sft, "dpo": normalize_dpo}[kind]
    bad, kept, filtered = BadRows(), 0, 0
    bar = progress(input_path, kind)
    with atomic_writer(output_path, "w", encoding="utf-8") as out:
        for line_no, raw in iter_json_records(input_path):
            bar.update(len(raw) + 1)
            record = parse_line(raw, line_no, bad, normalize)
            if record is None:
                continue
            text = json.dumps(record, ensure_ascii=False)
            if (max_chars and len(text) > max_chars) or (min_zh_ratio and chinese_ratio(text) < min_zh_ratio):
                filtered += 1
                continue
            out.write(text + "\n")
            kept += 1
            if kept % 1000 == 0:
                bar.set_postfix(rows=kept, bad=bad.total)
        if kept == 0:
            raise InputError(f"no valid rows in {input_path}; {bad.report()}")
    bar.close()
    return {"kept": kept, "filtered": filtered, "bad": bad}


# ---------------------------------------------------------------------------------------------------- pretrain
_worker_tokenizer = None


def _load_worker_tokenizer(tokenizer_file):
    global _worker_tokenizer
    if _worker_tokenizer is None:
        from tokenizers import Tokenizer

        _worker_tokenizer = Tokenizer.from_file(str(tokenizer_file))
    return _worker_tokenizer


def split_long(text: str, max_chars: int) -> list[str]:
    """Long documents are cut into pieces (at a newline or space where possible), never dropped."""
    pieces = []
    while len(text) > max_chars:
        cut = max(text.rfind("\n", 0, max_chars), text.rfind(" ", 0, max_chars))
        cut = cut + 1 if cut > max_chars // 2 else max_chars
        pieces.append(text[:cut])
        text = text[cut:]
    return pieces + [text] if text else pieces


def encode_chunk(lines, tokenizer_file, eos_id, val_every, min_chars, max_chars, piece_chars):
    """Parse, filter and tokenize a chunk of lines; returns uint16 train and val streams and bad-row counts."""
    tokenizer = _load_worker_tokenizer(tokenizer_file)
    bad, filtered = BadRows(), 0
    pieces, owner = [], []  # owner[i]: (doc index, is_val) of pieces[i]
    docs = 0
    for line_no, raw in lines:
        text = parse_line(raw, line_no, bad, normalize_text)
        if text is None:
            continue
        if len(text) < min_chars or (max_chars and len(text) > max_chars):
            filtered += 1
            continue
        # Chosen by content, not position: any chunking picks the same documents, and exact duplicates of a
        # validation document never leak into training.
        is_val = bool(val_every) and zlib.crc32(raw) % val_every == 0
        for piece in split_long(text, piece_chars):
            pieces.append(piece)
            owner.append((docs, is_val))
        docs += 1
    streams = {False: [], True: []}
    encodings = tokenizer.encode_batch(pieces, add_special_tokens=False) if pieces else []
    for i, (enc, (doc, is_val)) in enumerate(zip(encodings, owner)):
        streams[is_val].append(np.asarray(enc.ids, dtype=np.uint16))
        if i + 1 == len(owner) or owner[i + 1][0] != doc:  # the document's last piece: close it with </s>
            streams[is_val].append(np.array([eos_id], dtype=np.uint16))
    join = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.uint16)  # noqa: E731
    return join(streams[False]), join(streams[True]), bad, filtered, docs


class ShardWriter:
    """Append-only uint16 shards of at most `shard_tokens` tokens, each renamed into place when complete."""

    def __init__(self, out_dir: Path, prefix: str, shard_tokens: int):
        self.out_dir, self.prefix, self.shard_tokens = out_dir, prefix, shard_tokens
        self.shards, self._file, self._count, self._ctx = [], None, 0, None

    def write(self, tokens: np.ndarray):
        while len(tokens):
            if self._file is None:
                name = f"{self.prefix}_{len(self.shards):03d}.bin"
                self._ctx = atomic_writer(self.out_dir / name, "wb")
                self._file, self._count, self._name = self._ctx.__enter__(), 0, name
            take = min(len(tokens), self.shard_tokens - self._count)
            self._file.write(tokens[:take].tobytes())
            self._count += take
            tokens = tokens[take:]
            if self._count >= self.shard_tokens:
                self._close()

    def _close(self):
        if self._file is not None:
            self._ctx.__exit__(None, None, None)
            self.shards.append({"file": self._name, "tokens": self._count})
            self._file = None

    def close(self):
        self._close()
        return self.shards


def byte_ranges(path, chunk_bytes: int):
    """(start, end) byte offsets of consecutive chunks of about chunk_bytes, cut at line ends."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = 0
        while start < size:
            f.seek(min(start + chunk_bytes, size))
            f.readline()
            end = f.tell()
            yield start, end
            start = end


def encode_range(path, start, end, *args):
    """A worker reads its own chunk of the file (the main process only writes), then encodes it.
    Line numbers are counted from the chunk's start; the caller shifts them."""
    with open(path, "rb") as f:
        f.seek(start)
        lines = f.read(end - start).split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return (*encode_chunk(list(enumerate(lines, start=1)), *args), len(lines), end - start)


def tokenize_pretrain(input_path, out_dir, tokenizer_dir, workers: int = 0, val_every: int = 100,
                      min_chars: int = 1, max_chars: int = 0, shard_tokens: int = 500_000_000,
                      chunk_bytes: int = 4 << 20, piece_chars: int = 50_000) -> dict:
    """Tokenize a {"text"} jsonl into shards. Memory is bounded by (workers x 2) chunks in flight."""
    from tokenizers import Tokenizer

    with open(input_path, "rb") as f:
        if f.read(64).lstrip().startswith(b"["):
            raise InputError(f"{input_path} is one JSON array; pretraining text must be JSON lines (one object a line)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
    tok = Tokenizer.from_file(str(tokenizer_file))
    if tok.get_vocab_size() > 65535:
        raise InputError(f"vocab of {tok.get_vocab_size()} does not fit uint16 shards")
    eos_id = tok.token_to_id("</s>")
    workers = workers or os.cpu_count() or 1
    writers = {False: ShardWriter(out_dir, "train", shard_tokens), True: ShardWriter(out_dir, "val", shard_tokens)}
    bad, totals = BadRows(), {"docs": 0, "filtered": 0, "train_tokens": 0, "val_tokens": 0}
    args = (str(tokenizer_file), eos_id, val_every, min_chars, max_chars, piece_chars)
    bar = progress(input_path, "pretrain")
    started = time.time()

    lines_before = 0

    def consume(result):
        nonlocal lines_before
        train, val, chunk_bad, filtered, docs, n_lines, nbytes = result
        writers[False].write(train)
        writers[True].write(val)
        bad.merge(chunk_bad, line_offset=lines_before)
        lines_before += n_lines
        totals["docs"] += docs
        totals["filtered"] += filtered
        totals["train_tokens"] += len(train)
        totals["val_tokens"] += len(val)
        bar.update(nbytes)
        bar.set_postfix(docs=totals["docs"], bad=bad.total)

    ranges = byte_ranges(input_path, chunk_bytes)
    if workers == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker means one core
        for first, last in ranges:
            consume(encode_range(input_path, first, last, *args))
    else:
        with ProcessPoolExecutor(workers, initializer=os.environ.__setitem__,
                                 initargs=("TOKENIZERS_PARALLELISM", "false")) as pool:
            pending = []  # in order; bounded so a huge input never piles up in memory
            for first, last in ranges:
                pending.append(pool.submit(encode_range, input_path, first, last, *args))
                if len(pending) >= 2 * workers:
                    consume(pending.pop(0).result())
            for future in pending:
                consume(future.result())
    bar.close()
    if totals["docs"] == 0:
        raise InputError(f"no valid documents in {input_path}; {bad.report()}")
    index = {"format": "minimind-tokens-v1", "dtype": "uint16", "eos_id": eos_id, "vocab_size": tok.get_vocab_size(),
             "tokenizer": str(tokenizer_dir), "source": str(input_path), **totals,
             "train": writers[False].close(), "val": writers[True].close(),
             "bad_rows": dict(bad.counts), "seconds": round(time.time() - started, 2)}
    with atomic_writer(out_dir / "index.json", "w") as f:
        json.dump(index, f, indent=2, ensure_ascii=False)
    index["bad"] = bad
    return index
