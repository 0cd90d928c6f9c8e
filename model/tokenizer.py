"""Tokenizer: byte-level BPE trained with `tokenizers`, used through transformers' `PreTrainedTokenizerFast`.

Special tokens are upstream MiniMind's: <unk>=0 (also padding), <s>=1, </s>=2. The chat format is upstream v1's:
the system text first, then every turn as `<s>{role}\n{content}</s>\n`; tools, tool calls, tool results and
reasoning are plain-text tags inside it (CHAT_TEMPLATE).
"""
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from .io import BadRows, iter_json_records, parse_line, text_field


SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parent / "minimind_tokenizer"

# Upstream v1's format, extended for tools as plain-text tags (no new special tokens, so the upstream v1 tokenizer,
# tokenizer training and the GGUF export are unchanged). A conversation without tools, tool turns, later system
# messages or reasoning renders exactly the v1 string. Compact on purpose: the demo model's context is 128-256 tokens.
#   {system}\n<tools>\n{one JSON line per function}\n</tools>\n      tools: the `tools=` kwarg, else the system turn's
#   <s>assistant\n<think>{reasoning}</think>{content}<tool_call>{"name":...,"arguments":{...}}</tool_call></s>\n
#   <s>tool\n<tool_response>{result}</tool_response></s>\n
#   <s>system\n{content}</s>\n                                     a system message after the first
# `render_chat` below is the same format in Python (for SFT labels); a test checks that the two agree.
_JSON = "tojson(separators=(',', ':'))"
CHAT_TEMPLATE = (
    "{% set tools = tools or (messages and messages[0]['role'] == 'system' and messages[0]['tools']) or [] %}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
    "{% if tools %}{% if messages[0]['role'] == 'system' and messages[0]['content'] %}{{ '\\n' }}{% endif %}"
    "{{ '<tools>\\n' }}{% for tool in tools %}"
    "{{ (tool['function'] if tool['function'] is defined else tool) | " + _JSON + " }}{{ '\\n' }}"
    "{% endfor %}{{ '</tools>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<s>user\\n' + message['content'] + '</s>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<s>assistant\\n' }}"
    "{% if message['reasoning_content'] %}{{ '<think>' + message['reasoning_content'] + '</think>' }}{% endif %}"
    "{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% set call = call['function'] if call['function'] is defined else call %}"
    "{{ '<tool_call>{\"name\":' }}{{ call['name'] | tojson }}{{ ',\"arguments\":' }}"
    "{% if call['arguments'] is string %}{{ call['arguments'] }}{% else %}{{ call['arguments'] | " + _JSON + " }}"
    "{% endif %}{{ '}</tool_call>' }}{% endfor %}{{ '</s>\\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<s>tool\\n<tool_response>' + message['content'] + '</tool_response></s>\\n' }}"
    "{% elif message['role'] == 'system' and not loop.first %}{{ '<s>system\\n' + message['content'] + '</s>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)
# The template this project and its saved tokenizers had before tools; load_tokenizer upgrades it (same output).
V1_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<s>user\\n' + message['content'] + '</s>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<s>assistant\\n' + message['content'] + '</s>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)
ASSISTANT_PREFIX = "<s>assistant\n"
TURN_END = "</s>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


CJK = "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"


def train_bpe(texts: Iterable[str], vocab_size: int = 6400, show_progress: bool = True, isolate_cjk: bool = False,
              individual_digits: bool = False, name_spaces: bool = False):
    """Train byte-level BPE on an iterator of texts (streamed: only word counts are kept in memory).

    isolate_cjk: Chinese has no spaces, so BPE merges runs of characters freely (upstream's behaviour, good
    compression on real text). On a small templated corpus that goes as far as whole phrases: with 6400 tokens
    "尼泊尔的首都是加德满都" became one token of the demo text. Isolating each CJK character keeps merges inside
    a character (one token per character); the learned merges then never join two characters, so plain
    GPT-2-style pre-tokenization (llama.cpp's) encodes the same. On the demo it cost more than it gained:
    60% more tokens per epoch and lower held-out accuracy in the same time, so it is off by default.

    individual_digits: one token per digit, as Llama's and Qwen's tokenizers do: a number reads the same digit
    tokens wherever it stands (" 49", "(49" and '"49' share "4" "9"). A small model learns to copy such numbers
    later, though: among ten digit tokens the one before a digit rarely tells which comes next, where merged chunks
    are nearly unique keys (bench/bench_copy_digits.py). As with isolate_cjk, no merge ever joins a digit, so GPT-2-style
    pre-tokenization still encodes the same ids.

    name_spaces: the space before a capitalised word or a digit is a token of its own. Byte-level BPE glues a word's
    leading space into its first token, so " Estonia" in a question and "Estonia" in a tool call's JSON or at the
    start of a line are different token sequences, and a small model cannot copy a name from one into the other.
    Lower-case words keep their space: one token more per name or number, not per word. No merge joins that space
    to what follows, so GPT-2-style pre-tokenization again encodes the same ids.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    splits = [pre_tokenizers.Split(Regex(CJK), "isolated")] if isolate_cjk else []
    if individual_digits:
        splits.append(pre_tokenizers.Digits(individual_digits=True))
    if name_spaces:
        splits.append(pre_tokenizers.Split(Regex(" (?=[A-Z0-9])"), "isolated"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level]) if splits else byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i, f"{token} must have id {i}"
    return tokenizer


def wrap(tokenizer, model_max_length: int = 32768):
    """The trained tokenizer as transformers' PreTrainedTokenizerFast, with the chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>", model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save(fast, out_dir) -> None:
    """tokenizer.json + tokenizer_config.json (chat template inside, as upstream ships it), written atomically."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    fast.save_pretrained(tmp, save_jinja_files=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, out_dir / f.name)
    tmp.rmdir()


def load_tokenizer(path=None):
    from transformers import AutoTokenizer

    path = Path(path) if path else DEFAULT_TOKENIZER_DIR
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer.json in {path}; train one with `python train_tokenizer.py` "
                                f"or pass --tokenizer DIR")
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.chat_template in (None, V1_CHAT_TEMPLATE):  # v1's renders what ours does, without tools
        tok.chat_template = CHAT_TEMPLATE
    return tok


def chars_per_token(tokenizer, texts: list[str]) -> float:
    chars = sum(len(t) for t in texts)
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return chars / max(tokens, 1)


def read_texts(path, field: str = "text", every: int = 1, skip_every: int = 0,
               bad: BadRows | None = None) -> Iterator[str]:
    """Stream the `field` of a jsonl file; unusable rows are counted in `bad`.
    every/skip_every pick or skip every n-th row (held-out sampling)."""
    bad = bad if bad is not None else BadRows()
    for n, (line_no, raw) in enumerate(iter_json_records(path)):
        if (every > 1 and n % every) or (skip_every and n % skip_every == 0):
            continue
        text = parse_line(raw, line_no, bad, lambda obj: text_field(obj, field))
        if text is not None:
            yield text


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def render_chat(messages: list[dict], tools: list | None = None) -> list[tuple[str, bool]]:
    """CHAT_TEMPLATE in Python, as (text, trained) pieces: trained are an assistant turn's reasoning, content,
    calls and closing </s> (never a tool's result). The pieces end at special tokens or newlines."""
    pieces = []
    first_system = bool(messages) and messages[0]["role"] == "system"
    tools = tools or (first_system and messages[0].get("tools")) or []
    head = messages[0]["content"] if first_system else ""
    if tools:
        head += ("\n" if head else "") + "<tools>\n"
        head += "".join(_json(t["function"] if "function" in t else t) + "\n" for t in tools) + "</tools>\n"
    if head:
        pieces.append((head, False))
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "user":
            pieces.append((f"<s>user\n{m['content']}{TURN_END}\n", False))
        elif role == "assistant":
            text = f"<think>{m['reasoning_content']}</think>" if m.get("reasoning_content") else ""
            text += m.get("content") or ""
            for call in m.get("tool_calls") or []:
                call = call["function"] if "function" in call else call
                args = call["arguments"] if isinstance(call["arguments"], str) else _json(call["arguments"])
                name = json.dumps(call["name"], ensure_ascii=False)
                text += f'{CALL_OPEN}{{"name":{name},"arguments":{args}}}{CALL_CLOSE}'
            pieces += [(ASSISTANT_PREFIX, False), (text + TURN_END, True), ("\n", False)]
        elif role == "tool":
            pieces.append((f"<s>tool\n<tool_response>{m['content']}</tool_response>{TURN_END}\n", False))
        elif role == "system":
            if i:
                pieces.append((f"<s>system\n{m['content']}{TURN_END}\n", False))
        else:
            raise ValueError(f"unknown role {role!r}")
    return pieces


def encode_chat(tokenizer, messages: list[dict], max_length: int | None = None, tools: list | None = None):
    """Token ids of a conversation and a label per token: the token itself on what the assistant wrote and its
    closing </s>, -100 elsewhere. Each piece is tokenized alone; the pieces end at special tokens or newlines,
    where byte-level pre-tokenization splits anyway, so the ids equal those of the whole rendered text."""
    ids, labels = [], []
    for text, train in render_chat(messages, tools):
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids.extend(piece)
        labels.extend(piece if train else [-100] * len(piece))
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels
