"""Tool calling in text: the checks of tools and calls that data processing and the server share, and the parser
that splits what a model generates into OpenAI's message fields (reasoning_content, content, tool_calls).

The format (model/tokenizer.py, CHAT_TEMPLATE) is plain text, so it is parsed by hand here:
    <think>reasoning</think>content<tool_call>{"name": "...", "arguments": {...}}</tool_call>...
"""
import json
import re
import uuid

from .tokenizer import CALL_CLOSE, CALL_OPEN, THINK_CLOSE, THINK_OPEN

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


class ToolError(ValueError):
    """A malformed tool or call; `param` says where (e.g. 'tools[1].function.name'), for the server's 400."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def parsed(value, where: str):
    """A value that may arrive as a JSON string (OpenAI sends arguments so, upstream's data tools and calls too)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ToolError(f"{where} is not valid JSON ({e.msg})", where) from e


def normalize_tools(tools, where: str = "tools") -> list[dict]:
    """OpenAI's [{"type": "function", "function": {...}}] or bare functions, as a list or a JSON string ->
    [{"name", "description"?, "parameters"?}], what the chat template renders."""
    tools = parsed(tools, where)
    if not isinstance(tools, list):
        raise ToolError(f"{where} must be a list of functions", where)
    out, names = [], set()
    for i, tool in enumerate(tools):
        at = f"{where}[{i}]"
        if not isinstance(tool, dict):
            raise ToolError(f"{at} must be an object", at)
        if "function" in tool:
            if tool.get("type", "function") != "function":
                raise ToolError(f"{at}.type must be 'function'", f"{at}.type")
            tool, at = tool["function"], f"{at}.function"
            if not isinstance(tool, dict):
                raise ToolError(f"{at} must be an object", at)
        name, description, parameters = tool.get("name"), tool.get("description"), tool.get("parameters")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ToolError(f"{at}.name must be 1-64 letters, digits, '_' or '-'", f"{at}.name")
        if name in names:
            raise ToolError(f"{at}.name: the tool {name!r} is declared twice", f"{at}.name")
        if description is not None and not isinstance(description, str):
            raise ToolError(f"{at}.description must be a string", f"{at}.description")
        if parameters is not None and not isinstance(parameters, dict):
            raise ToolError(f"{at}.parameters must be a JSON schema object", f"{at}.parameters")
        names.add(name)
        out.append({"name": name, **({"description": description} if description else {}),
                    **({"parameters": parameters} if parameters is not None else {})})
    return out


def normalize_calls(calls, declared: set[str] | None, where: str = "tool_calls") -> list[dict]:
    """OpenAI's [{"id", "type", "function": {"name", "arguments": "<json>"}}] or bare {"name", "arguments"} ->
    [{"name", "arguments": {...}}]; with `declared`, a call to any other tool is refused."""
    calls = parsed(calls, where)
    if not isinstance(calls, list) or not calls:
        raise ToolError(f"{where} must be a non-empty list of calls", where)
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        if isinstance(call, dict) and "function" in call:
            call, at = call["function"], f"{at}.function"
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ToolError(f"{at} must be an object with a function name", at)
        if declared is not None and call["name"] not in declared:
            raise ToolError(f"call to undeclared tool {call['name']!r}", f"{at}.name")
        arguments = parsed(call.get("arguments", {}), f"{at}.arguments")
        if not isinstance(arguments, dict):
            raise ToolError(f"{at}.arguments must be a JSON object", f"{at}.arguments")
        out.append({"name": call["name"], "arguments": arguments})
    return out


def openai_call(call: dict) -> dict:
    """A parsed call as OpenAI returns it: an id, and the arguments as a JSON string."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def parse_calls(text: str, names: set[str]) -> list[dict] | None:
    """`<tool_call>{json}</tool_call>` one or more times (whitespace between allowed) -> [{"name", "arguments"}];
    None if anything is off: bad JSON, an unknown tool, arguments that are no object, other text, an open tag."""
    calls, rest = [], text.strip()
    while rest:
        end = rest.find(CALL_CLOSE)
        if not rest.startswith(CALL_OPEN) or end < 0:
            return None
        try:
            call = json.loads(rest[len(CALL_OPEN):end])
        except json.JSONDecodeError:
            return None
        if not (isinstance(call, dict) and call.get("name") in names and isinstance(call.get("arguments", {}), dict)):
            return None
        calls.append({"name": call["name"], "arguments": call.get("arguments", {})})
        rest = rest[end + len(CALL_CLOSE):].lstrip()
    return calls or None


def held_tail(text: str, tag: str) -> int:
    """How many characters at the end of `text` may be the start of `tag` (held back until the next delta)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class OutputParser:
    """Generated text, as it streams, split into ("reasoning" | "content", text) deltas and, at the end, calls.

    `<think>` at the very start opens the reasoning, `</think>` ends it. With tools, the text from the first
    `<tool_call>` on is held back: at the end it becomes the calls if every call parses, else plain content (a
    garbled call is text, never an error). A tail that may be the start of a tag is held back, as stop strings are.
    """

    def __init__(self, tools=None):
        self.names = set(tools) if tools else None
        self.state, self.buffer = "start", ""

    def push(self, text: str) -> list[tuple[str, str]]:
        self.buffer += text
        out = []
        while True:
            if self.state == "start":
                if self.buffer.startswith(THINK_OPEN):
                    self.state, self.buffer = "reasoning", self.buffer[len(THINK_OPEN):]
                elif THINK_OPEN.startswith(self.buffer):
                    return out
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                end = self.buffer.find(THINK_CLOSE)
                if end < 0:
                    return out + self._emit("reasoning", held_tail(self.buffer, THINK_CLOSE))
                out.append(("reasoning", self.buffer[:end]))
                self.state, self.buffer = "content", self.buffer[end + len(THINK_CLOSE):]
            elif self.state == "content":
                start = self.buffer.find(CALL_OPEN) if self.names else -1
                if start < 0:
                    return out + self._emit("content", held_tail(self.buffer, CALL_OPEN) if self.names else 0)
                out.append(("content", self.buffer[:start]))
                self.state, self.buffer = "calls", self.buffer[start:]
            else:  # "calls": everything waits for the end
                return out

    def _emit(self, kind: str, hold: int) -> list[tuple[str, str]]:
        text, self.buffer = self.buffer[:len(self.buffer) - hold], self.buffer[len(self.buffer) - hold:]
        return [(kind, text)]

    def finish(self) -> tuple[list[tuple[str, str]], list[dict] | None]:
        """The deltas still held back, and the calls (None when the text holds none that parse)."""
        calls = parse_calls(self.buffer, self.names) if self.state == "calls" else None
        kind = "reasoning" if self.state == "reasoning" else "content"
        tail = [] if calls else [(kind, self.buffer)]
        self.buffer = ""
        return tail, calls
