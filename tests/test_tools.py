"""Tool calling below the server: the chat template, the output parser, SFT data with tools, the demo tools, and
constrained decoding per row in the scheduler."""
import json
import threading

import jsonschema
import pytest

from conftest import ADD_TOOL, tiny_model
from model.generate import SamplingParams, generate_text
from model.processing import normalize_file
from model.tokenizer import CHAT_TEMPLATE, V1_CHAT_TEMPLATE, encode_chat, load_tokenizer, render_chat, save
from model.tool_calls import OutputParser


@pytest.fixture(scope="module")
def tok(demo_data):
    return load_tokenizer(demo_data / "tokenizer")


CALC = {"type": "function", "function": {"name": "calc", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
WITH_TOOLS = [
    {"role": "system", "content": "Be brief.", "tools": [CALC]},
    {"role": "user", "content": "What is 12*7?"},
    {"role": "assistant", "content": None, "reasoning_content": "Use calc.",
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "calc", "arguments": {"expression": "12*7"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "84"},
    {"role": "system", "content": "Answer in English."},
    {"role": "assistant", "content": "12*7 is 84."},
]
RENDERED = ('Be brief.\n<tools>\n{"name":"calc","parameters":{"type":"object","properties":'
            '{"expression":{"type":"string"}},"required":["expression"]}}\n</tools>\n'
            '<s>user\nWhat is 12*7?</s>\n<s>assistant\n<think>Use calc.</think>'
            '<tool_call>{"name":"calc","arguments":{"expression":"12*7"}}</tool_call></s>\n'
            '<s>tool\n<tool_response>84</tool_response></s>\n<s>system\nAnswer in English.</s>\n'
            '<s>assistant\n12*7 is 84.</s>\n')


def test_without_tools_the_template_renders_the_v1_string(tok):
    conversations = [[{"role": "user", "content": "Hi"}],
                     [{"role": "system", "content": "You are MiniMind."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "中国的首都是哪里？"}]]
    for messages in conversations:
        for prompt in (False, True):
            ours = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            tok.chat_template = V1_CHAT_TEMPLATE
            v1 = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            tok.chat_template = CHAT_TEMPLATE
            python = "".join(text for text, _ in render_chat(messages)) + ("<s>assistant\n" if prompt else "")
            assert ours == v1 == python
    assert tok.apply_chat_template(conversations[0], tokenize=False) == "<s>user\nHi</s>\n"


def test_tools_calls_results_and_thinking_render_and_parse_back(tok):
    assert tok.apply_chat_template(WITH_TOOLS, tokenize=False) == RENDERED
    assert "".join(text for text, _ in render_chat(WITH_TOOLS)) == RENDERED
    # The same tools as transformers' kwarg, calls as OpenAI sends them (arguments a JSON string) or bare.
    bare = [{k: v for k, v in m.items() if k != "tools"} for m in WITH_TOOLS]
    bare[2] = {**bare[2], "tool_calls": [{"name": "calc", "arguments": '{"expression":"12*7"}'}]}
    assert tok.apply_chat_template(bare, tools=[CALC], tokenize=False) == RENDERED
    assert "".join(text for text, _ in render_chat(bare, [CALC])) == RENDERED
    # Trained: exactly what the assistant wrote (thinking, calls, answers, their </s>), never the tool's result.
    ids, labels = encode_chat(tok, WITH_TOOLS)
    assert ids == tok.apply_chat_template(WITH_TOOLS, tokenize=True)["input_ids"]
    trained = tok.decode([t for t, label in zip(ids, labels) if label != -100])
    assert trained == ('<think>Use calc.</think><tool_call>{"name":"calc","arguments":{"expression":"12*7"}}'
                       '</tool_call></s>12*7 is 84.</s>')
    # What the model would write for that turn parses back into the message it came from.
    parser = OutputParser(["calc"])
    written = RENDERED.split("<s>assistant\n")[1].split("</s>")[0]
    pieces = [p for ch in written for p in parser.push(ch)]
    tail, calls = parser.finish()
    assert "".join(t for k, t in pieces + tail if k == "reasoning") == "Use calc."
    assert "".join(t for k, t in pieces + tail if k == "content") == ""
    assert calls == [{"name": "calc", "arguments": {"expression": "12*7"}}]


def test_a_saved_v1_template_is_upgraded_and_tags_are_plain_text(tok, tmp_path):
    tok.chat_template = V1_CHAT_TEMPLATE
    save(tok, tmp_path / "v1")
    tok.chat_template = CHAT_TEMPLATE
    loaded = load_tokenizer(tmp_path / "v1")
    assert loaded.chat_template == CHAT_TEMPLATE
    assert len(loaded) == len(tok)  # no tokens added: the tags are text
    for tag in ("<tool_call>", "</tool_call>", "<tool_response>", "<think>", "</think>", "<tools>"):
        assert loaded.decode(loaded.encode(tag, add_special_tokens=False)) == tag


@pytest.mark.parametrize("text,tools,reasoning,content,calls", [  # content None: the whole text, as it came
    ("plain answer", ["add"], "", None, None),
    ("<think>hmm</think>It is 5.", None, "hmm", "It is 5.", None),
    ('Sure.<tool_call>{"name":"add","arguments":{"a":1}}</tool_call>', ["add"], "", "Sure.",
     [{"name": "add", "arguments": {"a": 1}}]),
    ('<tool_call>{"name":"add","arguments":{}}</tool_call> <tool_call>{"name":"add","arguments":{"a":2}}</tool_call>',
     ["add"], "", "", [{"name": "add", "arguments": {}}, {"name": "add", "arguments": {"a": 2}}]),
    ('<tool_call>{"name":"add","arguments":{"a":}}</tool_call>', ["add"], "", None, None),
    ('<tool_call>{"name":"sub","arguments":{}}</tool_call>', ["add"], "", None, None),
    ('<tool_call>{"name":"add","arguments":[1]}</tool_call>', ["add"], "", None, None),
    ('<tool_call>{"name":"add","arguments":{}}', ["add"], "", None, None),
    ('<tool_call>{"name":"add","arguments":{}}</tool_call>', None, "", None, None),
    ("<thi", None, "", None, None),
    ("<think>never closed", None, "never closed", "", None),
], ids=["plain", "thinking", "content and a call", "two calls", "bad JSON", "unknown tool", "arguments no object",
        "unclosed", "no tools", "a tag's start", "open thinking"])
def test_output_parser_streams_the_same_as_it_splits_the_whole(text, tools, reasoning, content, calls):
    for chunks in ([text], list(text)):  # whole, and one character at a time
        parser = OutputParser(tools)
        pieces = [p for chunk in chunks for p in parser.push(chunk)]
        tail, found = parser.finish()
        assert "".join(t for k, t in pieces + tail if k == "reasoning") == reasoning
        assert "".join(t for k, t in pieces + tail if k == "content") == (text if content is None else content)
        assert found == calls
    parser = OutputParser(["add"])
    assert parser.push("It is <tool_") == [("content", "It is ")]  # a tag's start waits for what follows


GOOD_TOOL_ROWS = [
    {"conversations": [  # upstream's current form: JSON strings on the system and assistant turns
        {"role": "system", "content": "", "tools": json.dumps([CALC])},
        {"role": "user", "content": "12*7?"},
        {"role": "assistant", "content": "",
         "tool_calls": json.dumps([{"name": "calc", "arguments": {"expression": "12*7"}}])},
        {"role": "tool", "content": "84"},
        {"role": "assistant", "content": "84.", "reasoning_content": "The tool said 84."}]},
    {"messages": [  # OpenAI's objects, the tools on the row, arguments a JSON string, content null
        {"role": "user", "content": "12*7?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "calc", "arguments": '{"expression": "12*7"}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "84"},
        {"role": "assistant", "content": "84."}], "tools": [CALC]},
]
BAD_TOOL_ROWS = [
    ({"conversations": [{"role": "system", "content": "", "tools": "[{oops"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}]}, "tools is not valid JSON"),
    ({"conversations": [{"role": "system", "content": "", "tools": [CALC]}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "", "tool_calls": [{"name": "sub", "arguments": {}}]},
                        {"role": "tool", "content": "1"}, {"role": "assistant", "content": "a"}]},
     "call to undeclared tool 'sub'"),
    ({"conversations": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "", "tool_calls": [{"name": "calc", "arguments": "{x"}]},
                        {"role": "assistant", "content": "a"}], "tools": [CALC]},
     "tool_calls[0].arguments is not valid JSON"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "tool", "content": "84"},
                        {"role": "assistant", "content": "a"}]}, "a tool result without a tool call before it"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "system", "content": "s", "tools": [CALC]},
                        {"role": "assistant", "content": "a"}]}, "tools belong to the first turn"),
]


def test_sft_rows_with_tools_are_kept_and_bad_ones_reported_by_line(tmp_path, tok, capsys):
    from conftest import load_script
    from model.dataset import SFTDataset

    src = tmp_path / "tools.jsonl"
    lines = GOOD_TOOL_ROWS[:1] + [row for row, _ in BAD_TOOL_ROWS] + GOOD_TOOL_ROWS[1:]
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    result = normalize_file(src, tmp_path / "out.jsonl", "sft")
    assert result["kept"] == 2 and result["bad"].total == len(BAD_TOOL_ROWS)
    for line, (_, reason) in enumerate(BAD_TOOL_ROWS, start=2):
        assert [lines for r, lines in result["bad"].lines.items() if r.startswith(reason)] == [[line]], reason
    load_script("data_process.py").main(["sft", "--input", str(src), "--output", str(tmp_path / "cli.jsonl")])
    said = capsys.readouterr().out
    assert said.startswith("2 rows") and "call to undeclared tool 'sub' (lines 3)" in said
    assert (tmp_path / "cli.jsonl").read_text() == (tmp_path / "out.jsonl").read_text()
    first, second = [json.loads(x)["conversations"] for x in open(tmp_path / "out.jsonl")]
    assert first[0]["tools"] == second[0]["tools"] == [CALC["function"]]
    assert first[2]["tool_calls"] == second[2]["tool_calls"] == [{"name": "calc", "arguments": {"expression": "12*7"}}]
    item = SFTDataset(tmp_path / "out.jsonl", tok, max_length=512)[0]
    trained = tok.decode([int(t) for t, label in zip(item["input_ids"], item["labels"]) if label != -100])
    assert trained == ('<tool_call>{"name":"calc","arguments":{"expression":"12*7"}}</tool_call></s>'
                       '<think>The tool said 84.</think>84.</s>')  # the result "84" itself is never a target


def test_demo_tools():
    from model.tools import DEMO_TOOLS, calculator, lookup, run_tool_call

    assert calculator("12*(3+4)") == "84" and calculator("-5 - -3") == "-2"
    assert calculator("123456789*987654321") == str(123456789 * 987654321)
    assert lookup("France", "capital") == "Paris" and lookup("法国", "capital") == "巴黎"
    assert lookup("japan", "continent") == "Asia"
    assert run_tool_call({"id": "c", "type": "function",
                          "function": {"name": "calculator", "arguments": '{"expression": "7*6"}'}}) == "42"
    for bad in ["2**10", "__import__('os').system('echo hi')", "1/2", "1.5+1", "True+1", "x", "", "1+" * 150 + "1"]:
        assert run_tool_call({"name": "calculator", "arguments": {"expression": bad}}).startswith("error: ")
    assert "no country" in run_tool_call({"name": "lookup", "arguments": {"country": "Atlantis", "field": "capital"}})
    assert "not valid JSON" in run_tool_call({"name": "lookup", "arguments": "{oops"})
    assert "bad arguments" in run_tool_call({"name": "lookup", "arguments": {"place": "France"}})
    assert "no tool called 'sudo'" in run_tool_call({"name": "sudo", "arguments": {}})
    assert [t["function"]["name"] for t in DEMO_TOOLS] == ["calculator", "lookup"]


# ----------------------------------------------------------------------------------- constrained decoding per row
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},  # xgrammar's bounded strings
                                           "population": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["city", "population", "tags"]}


class Collect:
    def __init__(self, prompt, params, grammar=None):
        from model.scheduler import Request

        self.text, self.finish, self.done = "", None, threading.Event()
        self.request = Request(prompt, params, self.emit, grammar=grammar)

    def emit(self, index, item):
        if index is None:
            self.done.set()
        else:
            assert not isinstance(item, Exception), item
            self.text += item.text
            self.finish = item.finish_reason or self.finish


def test_grammar_rows_are_masked_alone_and_always_parse(tok):
    """Constrained and free rows decode in one batch: each free row says what it says alone, each constrained row
    what it says alone, and every constrained output parses and fits its schema, however short its budget."""
    from model.grammar import Grammars
    from model.scheduler import Scheduler

    model = tiny_model(dim=64, n_layers=2, vocab_size=1000, max_seq_len=256)
    grammars = Grammars(tok, 1000)
    schema, anything = grammars.json(SCHEMA), grammars.json()
    calls = grammars.tool_calls([ADD_TOOL["function"], CALC["function"]])
    shortest = grammars.closing_length(schema, 100)

    def ask(text):
        return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                       add_generation_prompt=True)["input_ids"]

    jobs = [("Tell me a story", None, 30), ("A city as JSON", schema, shortest), ("A city as JSON", schema, 40),
            ("Say something", None, 25), ("Anything as JSON", anything, 12), ("add 2 and 3", calls, 90)]
    jobs = [(ask(q), SamplingParams(max_new_tokens=budget, temperature=1.0, seed=i), compiled)
            for i, (q, compiled, budget) in enumerate(jobs)]

    def run(batch):
        scheduler = Scheduler(model, tok, max_batch=len(batch))
        clients = [Collect(p, params, compiled and (lambda c=compiled: grammars.matcher(c)))
                   for p, params, compiled in batch]
        for c in clients:
            scheduler.submit(c.request)
        for c in clients:
            assert c.done.wait(60)
        scheduler.stop()
        return clients

    together = run(jobs)
    alone = [run([job])[0] for job in jobs]
    assert [c.text for c in together] == [c.text for c in alone]
    free = [generate_text(model, tok, [p], params)[0]["text"] for p, params, compiled in jobs if compiled is None]
    assert [c.text for c, job in zip(together, jobs) if job[2] is None] == free  # no mask ever reached a free row
    jsonschema.validate(json.loads(together[1].text), SCHEMA)
    jsonschema.validate(json.loads(together[2].text), SCHEMA)
    assert isinstance(json.loads(together[4].text), dict)
    parser = OutputParser(["add", "calc"])
    parser.push(together[5].text)
    _, found = parser.finish()
    assert found and all(jsonschema.validate(c["arguments"], {"add": ADD_TOOL, "calc": CALC}[c["name"]]["function"]
                                             ["parameters"]) is None for c in found)
    assert all(c.finish == "stop" for c in together if c.request.grammar)  # complete, however short the budget
    assert len(together[2].text) > len(together[1].text)  # a larger budget lets the model say more
