"""The demo corpus, the tokenizer, data processing and the datasets."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from model.dataset import DPODataset, PretrainDataset, SFTDataset, pad_collate
from model.errors import InputError
from model.io import BadRows, read_jsonl
from model.processing import normalize_dpo, normalize_file, tokenize_pretrain
from model.tokenizer import encode_chat, load_tokenizer


def rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_demo_files_parse_in_their_upstream_formats(demo_data):
    d = demo_data / "data"
    pre = rows(d / "pretrain_data.jsonl")
    assert pre and all(set(r) == {"text"} and isinstance(r["text"], str) and r["text"] for r in pre)
    every = rows(d / "sft_data.jsonl")
    sft = [r for r in every if "messages" not in r]  # deepctrl's rows; the tool rows are OpenAI conversations
    tools = [r for r in every if "messages" in r]
    assert all(set(r) == {"id", "instruction", "input", "output", "history"} for r in sft)
    assert tools and all(set(r) == {"id", "tools", "messages"} and r["messages"][1]["tool_calls"] and
                         r["messages"][2]["role"] == "tool" for r in tools)
    assert all(isinstance(p, list) and len(p) == 2 for r in sft for p in r["history"])
    assert any(r["history"] for r in sft) and any(not r["history"] for r in sft)  # single- and multi-turn
    dpo = rows(d / "dpo_data.jsonl")
    assert all(set(r) == {"prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"] for r in dpo)
    for split in ("dev", "val"):
        files = sorted((d / "ceval" / split).glob(f"*_{split}.csv"))
        assert len(files) >= 3
        for f in files:
            table = list(csv.DictReader(open(f, encoding="utf-8")))
            assert table and list(table[0])[:7] == ["id", "question", "A", "B", "C", "D", "answer"]
            assert all(r["answer"] in "ABCD" and r[r["answer"]] for r in table)
    text = " ".join(r["text"] for r in pre)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text) and "The capital of" in text  # bilingual


def check_held_out(d):
    from model.demo_corpus import EntityFinder

    held = rows(d / "held_out.jsonl")
    assert {h["lang"] for h in held} == {"en", "zh"} and len(held) >= 40
    pretrain_text = "\n".join(r["text"] for r in rows(d / "pretrain_data.jsonl"))
    answers = []
    for r in rows(d / "sft_data.jsonl"):
        if "messages" in r:  # a tool conversation: what the assistant says and what the tools return
            answers += [m["content"] for m in r["messages"] if m["role"] in ("assistant", "tool")]
            continue
        answers.append(r["output"])
        answers += [a for _, a in r["history"]]
    taught = set(EntityFinder().capitals("\n".join(answers)))
    for h in held:
        assert h["answer"] in pretrain_text, h
        assert h["answer"] not in taught, h


def test_held_out_answers_are_in_pretraining_text_but_never_in_sft_answers(demo_data, tmp_path):
    from model.demo_corpus import write_demo

    check_held_out(demo_data / "data")
    write_demo(tmp_path, pretrain_repeats=1)  # the default seed, which the demo uses
    check_held_out(tmp_path)


def test_pretraining_answers_every_sft_question_form_about_each_country_as_sft_does(demo_data):
    """The FAQ habit: each question form SFT asks is, in pretraining, followed by SFT's answer restating the
    country, for the held-out countries too (what a chat answer copies its subject by)."""
    from model.demo_corpus import (CONTINENT_Q_EN, CONTINENT_Q_ZH, QUESTION_EN, QUESTION_ZH, DemoWorld, capital_answer,
                                   continent_answer, fill)

    text = "\n".join(r["text"] for r in rows(demo_data / "data" / "pretrain_data.jsonl"))
    for c in DemoWorld(seed=7).held_out[:5]:
        for lang, questions, continent, sep in (("en", QUESTION_EN, CONTINENT_Q_EN, " "),
                                                ("zh", QUESTION_ZH, CONTINENT_Q_ZH, "")):
            for q in questions:
                assert fill(q, c, lang) + sep + capital_answer(c, lang) in text, (lang, q, c.name)
            assert fill(continent, c, lang) + sep + continent_answer(c, lang) in text, (lang, c.name)


def test_pretraining_holds_each_sft_chat_as_a_transcript_and_no_held_out_country_in_one(demo_data):
    from collections import Counter

    from model.demo_corpus import DemoWorld, EntityFinder, chat_text

    docs = Counter(r["text"] for r in rows(demo_data / "data" / "pretrain_data.jsonl"))
    chats = [r for r in rows(demo_data / "data" / "sft_data.jsonl") if "instruction" in r]
    for r in chats:
        text = chat_text(r)
        assert text.startswith("<s>user\n") and text.endswith(f"<s>assistant\n{r['output']}</s>\n")
        assert docs[text] >= 3, r  # three copies each (a row asked twice has more)
    transcripts = [t for t in docs if t.startswith("<s>user")]
    assert sum(docs[t] for t in transcripts) == 3 * len(chats)
    held = {c.name for c in DemoWorld(seed=7).held_out} | {c.name_zh for c in DemoWorld(seed=7).held_out}
    finder = EntityFinder()
    assert not any(set(finder.names(t, "country")) & held for t in transcripts)


def test_grpo_questions_are_held_out_by_country_and_scored_by_the_reward(demo_data):
    from model.rl import demo_fact

    train, held = rows(demo_data / "data" / "grpo_prompts.jsonl"), rows(demo_data / "data" / "grpo_held_out.jsonl")
    assert held and not {r["subject"] for r in train} & {r["subject"] for r in held}
    sft_questions = {r["instruction"] for r in rows(demo_data / "data" / "sft_data.jsonl") if "instruction" in r}
    assert not sft_questions & {r["prompt"] for r in held}  # SFT never asks GRPO's held-out questions
    for r in held:
        right = f"The country {r['subject']} is in {r['answer']}." if r["lang"] == "en" else f"{r['subject']}位于{r['answer']}。"
        assert r["subject"] in r["prompt"] and demo_fact(right, **r) == 1.0
    # GRPO's mixture: the continents it teaches, and the capitals and identity it must keep, each scored
    kinds = {"continent": 0, "capital": 0, "identity": 0}
    for r in train:
        kind = "identity" if r["subject"] is None else "capital" if "apital" in r["prompt"] or "首都" in r["prompt"] \
            else "continent"
        kinds[kind] += 1
        if kind == "capital":
            right = f"The capital of {r['subject']} is {r['answer']}." if r["lang"] == "en" else \
                f"{r['subject']}的首都是{r['answer']}。"
            assert demo_fact(right, **r) == 1.0 and demo_fact(right.replace(r["answer"], "Nowhere"), **r) == 0.0
        elif kind == "identity":
            assert demo_fact(r["answer"], **r) == 1.0 and demo_fact(r["answer"][:-1], **r) == 0.0
    assert kinds["capital"] == kinds["continent"] and kinds["identity"] >= 2, kinds


def test_dpo_training_pairs_reject_each_capital_as_often_as_they_choose_it(demo_data):
    from collections import Counter

    from model.demo_corpus import EntityFinder

    finder, chosen, rejected = EntityFinder(), Counter(), Counter()
    for r in rows(demo_data / "data" / "dpo_data.jsonl"):
        (good,), (bad,) = finder.capitals(r["chosen"]), finder.capitals(r["rejected"])
        assert good != bad
        chosen[good] += 1
        rejected[bad] += 1
    assert chosen == rejected


def test_entity_finder_prefers_the_longest_name():
    from model.demo_corpus import EntityFinder

    finder = EntityFinder()
    assert finder.capitals("罗马尼亚位于欧洲。") == []
    assert finder.capitals("科威特的首都是科威特城。") == ["科威特城"]
    assert finder.exact_match("The capital of Guinea-Bissau is Bissau.", "Bissau")
    assert not finder.exact_match("It is Rome, or maybe Paris.", "Rome")
    assert finder.exact_match("罗马。罗马！", "罗马")


def test_demo_generator_is_deterministic(tmp_path):
    from model.demo_corpus import write_demo

    write_demo(tmp_path / "a", seed=3, pretrain_repeats=1)
    write_demo(tmp_path / "b", seed=3, pretrain_repeats=1)
    for name in ("pretrain_data.jsonl", "sft_data.jsonl", "dpo_data.jsonl", "held_out.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("text", ["你好，世界！今天天气很好。", "The quick brown fox jumps over the lazy dog.",
                                  "emoji 🚀🎉 and ünïcödé", "def f(x):\n    return {'a': x ** 2}  # 注释\n\tend"])
def test_tokenizer_round_trips(demo_data, text):
    tok = load_tokenizer(demo_data / "tokenizer")
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_default_tokenizer_has_upstream_special_tokens():
    tok = load_tokenizer()
    assert len(tok) == 6400
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]


CONVERSATION = [{"role": "system", "content": "You are MiniMind."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "中国的首都是哪里？"}]


def test_chat_template_renders_upstream_format(demo_data):
    tok = load_tokenizer(demo_data / "tokenizer")
    body = "You are MiniMind.<s>user\nHi</s>\n<s>assistant\nHello!</s>\n<s>user\n中国的首都是哪里？</s>\n"
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == body
    assert tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == body + "<s>assistant\n"


def three_turns():
    msgs = [{"role": "system", "content": "Be brief."}]
    for q, a in [("1+1?", "2"), ("Capital of France?", "The capital of France is Paris."), ("你好", "你好！")]:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def assistant_spans(tok, msgs):
    """Expected targets built from the rendered text: the tokens of each answer plus its </s>."""
    expected = []
    for m in msgs:
        if m["role"] == "assistant":
            expected.append(tok.encode(m["content"], add_special_tokens=False) + [tok.eos_token_id])
    return expected


def test_sft_labels_are_exactly_the_assistant_spans(demo_data):
    tok = load_tokenizer(demo_data / "tokenizer")
    msgs = three_turns()
    ids, labels = encode_chat(tok, msgs)
    assert ids == tok.apply_chat_template(msgs, tokenize=True)["input_ids"]  # same ids as the template
    spans, current = [], []
    for i, label in enumerate(labels):
        if label != -100:
            assert label == ids[i]
            current.append(label)
        elif current:
            spans.append(current)
            current = []
    assert spans == assistant_spans(tok, msgs)
    # Truncated in the middle of the second answer: earlier targets intact, nothing else becomes a target.
    cut = [i for i, label in enumerate(labels) if label != -100][len(spans[0]) + 2]
    t_ids, t_labels = encode_chat(tok, msgs, max_length=cut)
    assert t_ids == ids[:cut] and t_labels == labels[:cut]
    assert all(label == -100 for label, full in zip(t_labels, labels) if full == -100)


BAD_LINES = [
    b'{"text": "first good document"}',
    b'{"text": "broken json"',
    b'\xff\xfe{"text": "bad utf8"}',
    b'{"txt": "missing field"}',
    b'{"text": 42}',
    b'{"text": "   "}',
    b'["not", "an", "object"]',
    b'',
    b'{"text": "second good document"}',
]


def test_bad_pretrain_lines_are_counted_with_line_numbers(tmp_path, demo_data):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    index = tokenize_pretrain(src, tmp_path / "tok", demo_data / "tokenizer", workers=1, val_every=0)
    bad = index["bad"]
    assert index["docs"] == 2 and bad.total == 6
    assert bad.lines["malformed JSON"] == [2]
    assert bad.lines["invalid UTF-8"] == [3]
    assert bad.lines["empty 'text'"] == [6]
    assert bad.lines["not a JSON object"] == [7]
    assert bad.lines["field 'text' is not a string"] == [5]
    assert any(lines == [4] for reason, lines in bad.lines.items() if "missing" in reason)
    assert "lines 2" in bad.report()
    tok = load_tokenizer(demo_data / "tokenizer")
    tokens = np.fromfile(tmp_path / "tok" / "train_000.bin", dtype=np.uint16)
    assert tok.decode(tokens.tolist()) == "first good document</s>second good document</s>"


def test_tokenizer_training_reports_bad_lines(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    done = subprocess.run([sys.executable, "train_tokenizer.py", "--data", str(src), "--vocab_size", "300",
                           "--out_dir", str(tmp_path / "tok"), "--held_out_every", "0"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "skipped 6 bad rows" in done.stdout and "malformed JSON (lines 2)" in done.stdout


def test_pretrain_shards_decode_back_to_the_input(tmp_path, demo_data):
    texts = ["Hello world.", "你好，世界。", "x" * 3000 + " tail of a long document", "🚀 emoji"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    index = tokenize_pretrain(src, tmp_path / "tok", demo_data / "tokenizer", workers=2, val_every=0,
                              shard_tokens=500, piece_chars=1000)
    assert len(index["train"]) > 1  # several shards
    tokens = np.concatenate([np.fromfile(tmp_path / "tok" / s["file"], dtype=np.uint16) for s in index["train"]])
    docs = load_tokenizer(demo_data / "tokenizer").decode(tokens.tolist()).split("</s>")
    assert docs[:-1] == texts  # the long document was cut for encoding, never dropped


def test_validation_shard_and_pretrain_windows(demo_data):
    train = PretrainDataset(demo_data / "tokens", 64, "train")
    val = PretrainDataset(demo_data / "tokens", 64, "val")
    assert len(train) > len(val) > 0
    a, b = train[0]["input_ids"], train[1]["input_ids"]
    assert a.shape == (64,) and a[-1] == b[0]  # windows overlap by one token: every token is a target once
    last = train[len(train) - 1]["input_ids"]
    assert last.shape == (64,)
    with pytest.raises(ValueError, match="tokenize it first"):
        PretrainDataset(demo_data / "data" / "pretrain_data.jsonl", 64)


def test_sft_normalization_and_bad_rows(tmp_path):
    lines = [
        {"id": 1, "instruction": "Q1", "input": "", "output": "A1", "history": [["q0", "a0"]]},
        {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"instruction": "Q", "output": 5},
        {"conversations": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"conversations": [{"role": "user", "content": "only a question"}]},
    ]
    src = tmp_path / "sft.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in lines) + "\n{oops\n")
    result = normalize_file(src, tmp_path / "out.jsonl", "sft")
    assert result["kept"] == 2 and result["bad"].total == 4
    assert result["bad"].lines["malformed JSON"] == [6]
    out = rows(tmp_path / "out.jsonl")
    assert out[0]["conversations"] == [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"},
                                       {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]


def test_dpo_normalization_accepts_message_lists_and_json_arrays(tmp_path):
    plain = {"prompt": "Q", "chosen": "good", "rejected": "bad"}
    messages = {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
                "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]}
    assert normalize_dpo(plain) == normalize_dpo(messages) == {
        "prompt": [{"role": "user", "content": "Q"}], "chosen": "good", "rejected": "bad"}
    src = tmp_path / "dpo.json"
    src.write_text(json.dumps([plain, messages, {"prompt": "Q", "chosen": ""}], indent=1))
    bad = BadRows()
    assert len(list(read_jsonl(src, normalize_dpo, bad))) == 2 and bad.total == 1


def test_cli_exit_status_is_nonzero_only_without_valid_rows(tmp_path):
    good, empty = tmp_path / "good.jsonl", tmp_path / "empty.jsonl"
    good.write_text('{"instruction": "q", "output": "a"}\n{bad\n')
    empty.write_text('{bad\n{"x": 1}\n')
    run = lambda src: subprocess.run([sys.executable, "data_process.py", "sft", "--input", str(src), "--output",  # noqa
                                      str(tmp_path / "o.jsonl")], cwd=ROOT, capture_output=True, text=True)
    ok, fail = run(good), run(empty)
    assert ok.returncode == 0 and "1 rows" in ok.stdout and "malformed JSON (lines 2)" in ok.stdout
    assert fail.returncode == 1 and "no valid rows" in fail.stderr


def test_sft_and_dpo_datasets(demo_data):
    tok = load_tokenizer(demo_data / "tokenizer")
    sft = SFTDataset(demo_data / "data" / "sft_data.jsonl", tok, max_length=64)
    item = sft[0]
    assert item["input_ids"].shape == item["labels"].shape and (item["labels"] != -100).any()
    batch = pad_collate([sft[i] for i in range(4)])
    assert batch["input_ids"].shape == batch["labels"].shape
    dpo = DPODataset(demo_data / "data" / "dpo_data.jsonl", tok)
    pair = dpo[0]
    prompt_len = int((pair["chosen_labels"] == -100).sum())
    assert torch.equal(pair["chosen_input_ids"][:prompt_len], pair["rejected_input_ids"][:prompt_len])


def test_a_bad_row_met_in_training_names_its_file_line(demo_data, tmp_path):
    """SFT/DPO rows are parsed as they are read; one that cannot be is reported at its line (blank lines count)."""
    tok = load_tokenizer(demo_data / "tokenizer")
    src = tmp_path / "sft.jsonl"
    src.write_text('{"instruction": "q", "output": "a"}\n\n\n{"instruction": "q"\n{"instruction": "q", "output": "b"}\n')
    sft = SFTDataset(src, tok, max_length=64)
    assert len(sft) == 3 and sft[2]["input_ids"].numel() > 0
    with pytest.raises(InputError, match=f"{src}, line 4: malformed JSON. Clean the file"):
        sft[1]


def test_stop_strings_and_max_new_tokens(demo_data):
    """Text-level generation: stop strings cut the text (never streamed past), max_new_tokens counts new tokens."""
    from conftest import tiny_model
    from model.generate import SamplingParams, generate_text, stream_text

    tok = load_tokenizer(demo_data / "tokenizer")
    model = tiny_model(vocab_size=1000)
    prompt = tok.encode("The capital of", add_special_tokens=False)
    free = generate_text(model, tok, [prompt], SamplingParams(max_new_tokens=20))[0]
    assert free["finish_reason"] == "length" and free["completion_tokens"] == 20
    text = free["text"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    streamed = ""
    for deltas in stream_text(model, tok, [prompt], SamplingParams(max_new_tokens=20, stop=[stop])):
        for d in deltas:
            streamed += d.text
            assert stop not in streamed
            finish = d.finish_reason
    assert finish == "stop" and streamed == text[: text.index(stop)]
    short = generate_text(model, tok, [prompt, prompt[:1]], SamplingParams(max_new_tokens=3))
    assert [r["completion_tokens"] for r in short] == [3, 3]


def test_ranks_and_workers_see_disjoint_parts(demo_data):
    from torch.utils.data import DataLoader

    from model.trainer import ResumableSampler

    data = PretrainDataset(demo_data / "tokens", 64)
    seen = []
    for rank in range(2):
        sampler = ResumableSampler(data, 2, rank, seed=3)
        sampler.set_epoch(1)
        seen.append(list(sampler))
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(seen[1]) == len(data) // 2
    def windows(workers):
        loader = DataLoader(data, batch_size=4, sampler=ResumableSampler(data, 1, 0, seed=3), num_workers=workers)
        return [row.tolist() for batch in loader for row in batch["input_ids"]]

    assert windows(2) == windows(0)  # two workers split the batches: nothing repeated, nothing lost


def test_group_by_length_pads_less_and_still_sees_every_row_once(demo_data):
    """--group_by_length: the same rows each epoch, each once, in batches of similar length; seeded like the order."""
    from torch.utils.data import Subset

    from model.dataset import row_sizes
    from model.trainer import ResumableSampler

    tok = load_tokenizer(demo_data / "tokenizer")
    data = SFTDataset(demo_data / "data" / "sft_data.jsonl", tok, 256)
    train = Subset(data, list(range(0, len(data) // 16 * 16, 2)))  # as hold_out() gives it; whole batches
    sizes = row_sizes(train)
    assert len(sizes) == len(train) and sizes[1] == len(data.rows.raw(2))

    def padded_tokens(sampler):
        order = list(sampler)
        lengths = [len(train[i]["input_ids"]) for i in order]
        return order, sum(max(lengths[i:i + 8]) * 8 for i in range(0, len(lengths) - 7, 8))

    def sampler(grouped, epoch=1):
        s = ResumableSampler(train, 1, 0, seed=3, group=8, sizes=sizes if grouped else None)
        s.set_epoch(epoch)
        return s

    grouped, grouped_pad = padded_tokens(sampler(True))
    plain, plain_pad = padded_tokens(sampler(False))
    assert sorted(grouped) == sorted(plain) and len(set(grouped)) == len(grouped)
    assert grouped_pad < 0.8 * plain_pad
    assert list(sampler(True)) == grouped and list(sampler(True, epoch=2)) != grouped


def test_individual_digits_tokenizer_keeps_one_token_per_digit(demo_data):
    """train_bpe(individual_digits=True): every digit is its own token wherever it stands, and GPT-2-style
    pre-tokenization (the GGUF export's) gives the same ids, since no merge joins a digit."""
    from tokenizers import pre_tokenizers

    from model.tokenizer import read_texts, train_bpe

    tokenizer = train_bpe(read_texts(demo_data / "data" / "tokenizer_train.jsonl"), 600, show_progress=False,
                          individual_digits=True)
    digits = {str(d): tokenizer.token_to_id(str(d)) for d in range(10)}
    for text in ("What is 4521 plus 376?", '{"expression":"4521+376"}', "计算4521乘376"):
        pieces = [tokenizer.id_to_token(i) for i in tokenizer.encode(text).ids]
        assert [p for p in pieces if any(c in "0123456789" for c in p)] == list("4521376")
    assert None not in digits.values()
    ours = tokenizer.pre_tokenizer
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain_ids = tokenizer.encode("What is 4521 plus 376? 12.5% of 80").ids
    tokenizer.pre_tokenizer = ours
    assert tokenizer.encode("What is 4521 plus 376? 12.5% of 80").ids == plain_ids


def test_name_spaces_make_a_copied_name_or_number_the_same_tokens(demo_data):
    """train_bpe(name_spaces=True): a country or a number in a question and in a tool call's JSON (or at a line's
    start) is the same token sequence; upstream's pre-tokenization glues the space in and they differ. GPT-2-style
    pre-tokenization still gives the same ids."""
    from tokenizers import pre_tokenizers

    from model.tokenizer import read_texts, train_bpe

    def tokens(tokenizer, text, span):
        ids, at = tokenizer.encode(text).ids, text.index(span)
        pieces = tokenizer.encode(text).offsets
        return [i for i, (a, b) in zip(ids, pieces) if at <= a and b <= at + len(span)]

    texts = lambda: read_texts(demo_data / "data" / "tokenizer_train.jsonl")  # noqa: E731
    ours = train_bpe(texts(), 1000, show_progress=False, name_spaces=True)
    upstream = train_bpe(texts(), 1000, show_progress=False)
    pairs = [("What is the population of Estonia?", '{"country":"Estonia","field":"population"}', "Estonia"),
             ("What is 4521 plus 376?", '{"expression":"4521+376"}', "4521"), ("The country Peru is", "Peru is", "Peru")]
    for question, answer, span in pairs:
        assert tokens(ours, question, span) == tokens(ours, answer, span), span
        assert tokens(ours, question, span)  # the span is whole tokens, not part of one with its space
    assert any(tokens(upstream, q, s) != tokens(upstream, a, s) for q, a, s in pairs)
    text = "The capital of Estonia is Tallinn, 4521 people. 北京"
    mine = ours.pre_tokenizer
    ours.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain = ours.encode(text).ids
    ours.pre_tokenizer = mine
    assert ours.encode(text).ids == plain


def test_a_copy_probe_passage_asks_back_one_of_its_own_notes(demo_data):
    """The probe's answer is in its passage, as one person's note, and never a country the pretraining passages name."""
    from model.demo_corpus import DemoWorld, RECALL_ASK
    from model.io import read_jsonl

    rows = list(read_jsonl(demo_data / "data" / "copy_probe.jsonl"))
    world = DemoWorld(seed=7, held_out=48)
    trained = {c.name for c in world.train} | {c.name_zh for c in world.train}
    assert {r["lang"] for r in rows} == {"en", "zh"}
    for r in rows:
        asked = r["prompt"].rsplit("?" if r["lang"] == "en" else "？", 1)[0]
        who = asked.rsplit("What did ", 1)[1].removesuffix(" write down") if r["lang"] == "en" else \
            asked.rsplit("。", 1)[1].removesuffix("写下了什么")
        assert RECALL_ASK[r["lang"]].format(who=who) in r["prompt"]
        note = f"{who} wrote down {r['answer']}." if r["lang"] == "en" else f"{who}写下了{r['answer']}。"
        assert note in r["prompt"] and r["answer"] not in trained
