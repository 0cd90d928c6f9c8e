"""Plumbing shared by every stage: atomic writes, tolerant streaming JSON-lines reading, terminal input."""
import contextlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_writer(path, mode: str = "wb", **kwargs):
    """Write to a temporary file beside `path`, then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class BadRows:
    """Counts rejected input rows by reason and keeps the first few line numbers of each."""

    def __init__(self, keep: int = 5):
        self.counts, self.lines, self.keep = Counter(), {}, keep

    def add(self, line_no: int, reason: str):
        self.counts[reason] += 1
        self.lines.setdefault(reason, [])
        if len(self.lines[reason]) < self.keep:
            self.lines[reason].append(line_no)

    def merge(self, other: "BadRows", line_offset: int = 0):
        """Add another report's counts; its line numbers are shifted by line_offset (a chunk's first line - 1)."""
        for reason, n in other.counts.items():
            self.counts[reason] += n
            self.lines.setdefault(reason, [])
            shifted = [line + line_offset for line in other.lines[reason]]
            self.lines[reason] = sorted(self.lines[reason] + shifted)[: self.keep]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> str:
        if not self.total:
            return "no bad rows"
        parts = [f"{n} {reason} (lines {', '.join(map(str, self.lines[reason]))}{', ...' if n > self.keep else ''})"
                 for reason, n in self.counts.most_common()]
        return f"skipped {self.total} bad rows: " + "; ".join(parts)


def text_field(obj: dict, key: str, allow_empty: bool = False) -> str:
    """obj[key] if it is a string (non-blank unless allow_empty); otherwise ValueError/KeyError, which
    parse_line counts as a bad row."""
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} is not a string")
    if not allow_empty and not value.strip():
        raise ValueError(f"empty {key!r}")
    return value


def parse_line(raw: bytes, line_no: int, bad: BadRows, normalize: Callable[[dict], object]):
    """One jsonl line -> normalized record, or None (counted in `bad`) if it is unusable."""
    if not raw.strip():
        return None  # blank lines are not data
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        bad.add(line_no, "invalid UTF-8")
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        bad.add(line_no, "malformed JSON")
        return None
    if not isinstance(obj, dict):
        bad.add(line_no, "not a JSON object")
        return None
    try:
        return normalize(obj)
    except (ValueError, KeyError, TypeError) as e:
        bad.add(line_no, str(e) if isinstance(e, ValueError) else f"missing or wrong-typed field {e}")
        return None


def iter_lines(path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of a file, streamed."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            yield n, raw


def iter_json_records(path) -> Iterator[tuple[int, bytes]]:
    """Rows of a .jsonl file, or of a .json file holding one array of objects (streamed element by element).

    Yields (row number, raw JSON bytes) so callers parse and validate both kinds the same way.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if not head.startswith(b"["):
        yield from iter_lines(path)
        return
    decoder = json.JSONDecoder()
    with open(path, "r", encoding="utf-8", errors="surrogateescape") as f:
        buf, pos, n = f.read(1 << 20), 0, 0
        pos = buf.index("[") + 1
        while True:
            while True:  # skip separators, refilling the buffer as needed
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf):
                    break
                more = f.read(1 << 20)
                if not more:
                    return
                buf, pos = more, 0
            if buf[pos] == "]":
                return
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError:
                    more = f.read(1 << 20)
                    if not more:
                        n += 1
                        yield n, buf[pos:].encode("utf-8", "surrogateescape")
                        return
                    buf, pos = buf[pos:] + more, 0
            n += 1
            yield n, json.dumps(obj, ensure_ascii=False).encode("utf-8")
            buf, pos = buf[end:], 0


def read_jsonl(path, normalize: Callable[[dict], object] = lambda o: o, bad: BadRows | None = None):
    """Stream the valid, normalized records of a jsonl (or json-array) file; bad rows go to `bad`."""
    bad = bad if bad is not None else BadRows()
    for line_no, raw in iter_json_records(path):
        record = parse_line(raw, line_no, bad, normalize)
        if record is not None:
            yield record


def read_questions(prompt: str = "👶: ") -> Iterator[str]:
    """Lines typed in the terminal until 'exit', 'quit', Ctrl-D or Ctrl-C; blank lines are skipped."""
    while True:
        try:
            line = input(prompt).strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.lower() in ("exit", "quit"):
            return
        if line:
            yield line
