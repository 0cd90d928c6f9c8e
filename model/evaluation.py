"""Measurements: held-out fact QA on the demo world, C-Eval style multiple choice, DPO preference margins."""
import csv
import json
from dataclasses import dataclass, replace
from collections import defaultdict
from pathlib import Path

import torch

from .errors import InputError
from .generate import SamplingParams, generate_text
from .prompts import CHOICES, ceval_question


def chat_prompt(tokenizer, question: str, history=(), system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else [])
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]


def fact_qa(model, tokenizer, rows: list[dict], batch_size: int = 32, max_new_tokens: int = 24,
            params: SamplingParams | None = None) -> dict:
    """Answers to held-out questions, greedy unless `params` say otherwise; a hit names exactly one capital, the
    right one.

    Returns {"en": accuracy, "zh": accuracy, "all": accuracy, "answers": [...]}.
    """
    from .demo_corpus import EntityFinder

    finder = EntityFinder()
    answers, hits = [], defaultdict(list)
    params = params or SamplingParams(max_new_tokens=max_new_tokens)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [chat_prompt(tokenizer, r["question"]) for r in chunk]
        seeded = params if params.seed is None else [replace(params, seed=params.seed + start + i)
                                                     for i in range(len(chunk))]
        outputs = generate_text(model, tokenizer, prompts, seeded)
        for r, out in zip(chunk, outputs):
            hit = finder.exact_match(out["text"], r["answer"])
            hits[r["lang"]].append(hit)
            answers.append({**r, "response": out["text"], "hit": hit})
    result = {lang: sum(v) / len(v) for lang, v in hits.items()}
    result["all"] = sum(sum(v) for v in hits.values()) / max(1, sum(len(v) for v in hits.values()))
    result["answers"] = answers
    return result


@torch.no_grad()
def text_loss(model, data_path, seq_len: int, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy over every window of a tokenized folder's validation split: the same figure
    for any two models of one vocabulary, however they were trained."""
    from .dataset import PretrainDataset

    data = PretrainDataset(data_path, seq_len, "val")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        ids = torch.stack([data[i]["input_ids"] for i in range(start, min(start + batch_size, len(data)))]).to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    return total / count


def copy_probe(model, tokenizer, rows: list[dict], batch_size: int = 32) -> dict:
    """In-context copying on held-out recall passages (model/demo_corpus.py: a number or a country is noted, then
    asked back): greedy, from plain text as pretraining sees it. A hit continues with exactly the span, then the
    sentence's end; nothing else in the passage or the model's memory says what the span is.

    Returns {lang: share, "answers": [...]}.
    """
    from .demo_corpus import RECALL_END

    answers, hits = [], defaultdict(list)
    params = SamplingParams(max_new_tokens=16)
    start_id = tokenizer.eos_token_id  # a pretraining document follows the previous one's </s>
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [[start_id] + tokenizer.encode(r["prompt"], add_special_tokens=False) for r in chunk]
        for r, out in zip(chunk, generate_text(model, tokenizer, prompts, params)):
            text = out["text"].removeprefix(" ") if r["lang"] == "en" else out["text"]
            hit = text.startswith(r["answer"] + RECALL_END[r["lang"]])
            hits[r["lang"]].append(hit)
            answers.append({**r, "response": out["text"], "hit": hit})
    return {**{lang: sum(v) / len(v) for lang, v in hits.items()}, "answers": answers}


def tool_use(model, tokenizer, rows: list[dict], batch_size: int = 32, max_new_tokens: int = 48) -> dict:
    """Held-out tool questions (the demo's calculator and population lookup), greedy, with the demo tools in the
    prompt: a right call names the right tool with arguments that give the right result; a right answer, after the
    call's result comes back, ends with the right number. A question answered without a call counts for neither
    (the model cannot know these numbers).

    Returns {"calls": {lang: share}, "answers": {lang: share}, "rows": [...]}.
    """
    from .rl import numbers_in
    from .tool_calls import parse_calls
    from .tools import DEMO_FUNCTIONS, DEMO_TOOLS, run_tool_call

    names, params = set(DEMO_FUNCTIONS), SamplingParams(max_new_tokens=max_new_tokens)
    out, calls, answers = [], defaultdict(list), defaultdict(list)

    def prompt(messages):
        return tokenizer.apply_chat_template(messages, tools=DEMO_TOOLS, tokenize=True,
                                             add_generation_prompt=True)["input_ids"]

    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        firsts = generate_text(model, tokenizer, [prompt([{"role": "user", "content": r["question"]}]) for r in chunk],
                               params)
        follow, results = [], []
        for r, first in zip(chunk, firsts):
            made = parse_calls(first["text"], names)
            result = run_tool_call(made[0]) if made and len(made) == 1 else None
            results.append((made, result))
            if result is not None:
                follow.append(prompt([{"role": "user", "content": r["question"]},
                                      {"role": "assistant", "content": "", "tool_calls": made},
                                      {"role": "tool", "content": result}]))
        finals = iter(generate_text(model, tokenizer, follow, params) if follow else [])
        for r, first, (made, result) in zip(chunk, firsts, results):
            final = next(finals)["text"] if result is not None else first["text"]
            right_call = result is not None and made[0]["name"] == r["call"]["name"] and result == r["result"]
            found = numbers_in(final)
            right_answer = right_call and bool(found) and found[-1] == r["result"]
            calls[r["lang"]].append(right_call)
            answers[r["lang"]].append(right_answer)
            out.append({**r, "first": first["text"], "final": final, "right_call": right_call,
                        "right_answer": right_answer})
    share = lambda d: {lang: sum(v) / len(v) for lang, v in d.items()}  # noqa: E731
    return {"calls": share(calls), "answers": share(answers), "rows": out}


# ------------------------------------------------------------------------------------------------------ C-Eval
def read_ceval_split(data_dir, split: str) -> dict[str, list[dict]]:
    """{subject: rows} from <data_dir>/<split>/<subject>_<split>.csv (columns id,question,A,B,C,D,answer)."""
    folder = Path(data_dir) / split
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise FileNotFoundError(f"no {folder}/<subject>_{split}.csv files (C-Eval layout expected)")
    subjects = {}
    for f in files:
        with open(f, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
        missing = {"id", "question", *CHOICES, "answer"} - set(rows[0] if rows else {})
        if missing:
            raise InputError(f"{f} lacks columns {sorted(missing)}")
        subjects[f.name[: -len(f"_{split}.csv")]] = rows
    return subjects


def ceval_prompt(tokenizer, row: dict, shots: list[dict], template: str) -> list[int]:
    """The question (after k solved examples) laid out so the next token is the answer letter."""
    if template == "chat":
        history = [(ceval_question(s), s["answer"]) for s in shots]
        return chat_prompt(tokenizer, ceval_question(row), history)
    text = "".join(f"{ceval_question(s)}{s['answer']}\n\n" for s in shots) + ceval_question(row)
    return [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)


@torch.no_grad()
def ceval_evaluate(model, tokenizer, data_dir, split: str = "val", shots: int = 0, template: str = "chat",
                   batch_size: int = 16, max_length: int = 2048, progress: bool = True) -> dict:
    """Accuracy by the seed's method: the argmax over the next-token probabilities of A, B, C and D.

    Returns {"subjects": {name: {"correct", "total", "accuracy"}}, "correct", "total", "accuracy", "rows"}.
    """
    from tqdm import tqdm

    from .engine import left_pad

    letter_ids = [tokenizer.encode(c, add_special_tokens=False)[0] for c in CHOICES]
    dev = read_ceval_split(data_dir, "dev") if shots else {}
    subjects = read_ceval_split(data_dir, split)
    device = next(model.parameters()).device
    jobs = [(name, row) for name, rows in subjects.items() for row in rows]
    results, per_subject = [], defaultdict(lambda: [0, 0])
    bar = tqdm(total=len(jobs), desc=f"C-Eval {split}", disable=None if progress else True,
               dynamic_ncols=True)  # None: no bar where stderr is a log file
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        prompts = [ceval_prompt(tokenizer, row, dev.get(name, [])[:shots], template)[-max_length:]
                   for name, row in chunk]
        ids, mask = left_pad(prompts, tokenizer.pad_token_id or 0, device)
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1].float()
        probs = logits[:, letter_ids].softmax(dim=-1).cpu()
        for (name, row), p in zip(chunk, probs):
            prediction = CHOICES[int(p.argmax())]
            correct = prediction == row["answer"].strip()
            per_subject[name][0] += correct
            per_subject[name][1] += 1
            results.append({"subject": name, "id": row["id"], "answer": row["answer"], "prediction": prediction,
                            "correct": correct, **{f"p_{c}": round(float(x), 4) for c, x in zip(CHOICES, p)}})
        bar.update(len(chunk))
    bar.close()
    correct, total = sum(v[0] for v in per_subject.values()), sum(v[1] for v in per_subject.values())
    return {"subjects": {k: {"correct": c, "total": t, "accuracy": c / t} for k, (c, t) in sorted(per_subject.items())},
            "correct": correct, "total": total, "accuracy": correct / max(total, 1), "rows": results}


def ceval_markdown(result: dict, title: str) -> str:
    lines = [f"# {title}", "", "| subject | correct | total | accuracy |", "|:--|--:|--:|--:|"]
    for name, s in result["subjects"].items():
        lines.append(f"| {name} | {s['correct']} | {s['total']} | {s['accuracy']:.2%} |")
    lines.append(f"| **total** | **{result['correct']}** | **{result['total']}** | **{result['accuracy']:.2%}** |")
    return "\n".join(lines) + "\n"


def write_ceval_report(result: dict, out_dir, title: str):
    """Per-subject CSVs of every answer, plus the summary in Markdown and JSON."""
    from .io import atomic_writer

    out = Path(out_dir)
    by_subject = defaultdict(list)
    for r in result["rows"]:
        by_subject[r["subject"]].append(r)
    for name, rows in by_subject.items():
        with atomic_writer(out / "subjects" / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    with atomic_writer(out / "summary.md", "w", encoding="utf-8") as f:
        f.write(ceval_markdown(result, title))
    with atomic_writer(out / "summary.json", "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in result.items() if k != "rows"}, f, indent=2, ensure_ascii=False)


@torch.no_grad()
def preference_accuracy(model, tokenizer, pairs_path, batch_size: int = 32, max_length: int = 256) -> dict:
    """How often the model gives the chosen answer a higher log-probability than the rejected one, and the
    mean log-probability margin, over a prompt/chosen/rejected file."""
    from .dataset import DPODataset
    from .stages import dpo_collate, sequence_logps

    data = DPODataset(pairs_path, tokenizer, max_length)
    device = next(model.parameters()).device
    margins = []
    for start in range(0, len(data), batch_size):
        batch = dpo_collate([data[i] for i in range(start, min(start + batch_size, len(data)))],
                            tokenizer.pad_token_id or 0)
        chosen, rejected = sequence_logps(model, batch["input_ids"].to(device), batch["labels"].to(device)).chunk(2)
        margins.append(chosen - rejected)
    margins = torch.cat(margins)
    return {"accuracy": (margins > 0).float().mean().item(), "margin": margins.mean().item()}


# ----------------------------------------------------------------------------------------------- the demo's report
@dataclass
class Lesson:
    """One thing a stage must have taught, judged: the figure, the target it is held to, and whether it holds."""
    name: str
    figure: str
    target: str
    passed: bool


def names_rome(text: str) -> bool:
    """The server round trip's question is the capital of Italy: the answer must name Rome, and no other capital."""
    import re

    return bool(re.search(r"\bRome\b", text)) and not re.search(r"\b(Paris|Madrid|Berlin|Athens|Vienna)\b", text)


def right_calculator_round(call: dict | None, final: str, expression: str, answer: int) -> bool:
    """The tool round trip: one call of `calculator` whose expression is the question's (spaces aside), then a
    final answer that holds the right number (as a whole number, not inside a longer one)."""
    import re

    if not call or call.get("name") != "calculator":
        return False
    arguments = call.get("arguments")
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        return False
    if not isinstance(arguments, dict) or set(arguments) != {"expression"} or \
            str(arguments["expression"]).replace(" ", "") != expression.replace(" ", ""):
        return False
    return str(answer) in re.findall(r"\d+", final)


def within(after: dict, before: dict, points: float) -> bool:
    """Every language's accuracy `after` at most `points` below `before` (accuracies as shares)."""
    return all(after[lang] >= before[lang] - points / 100 for lang in before)


def demo_lessons(f: dict) -> list[Lesson]:
    """The demo's lessons from its figures (`f`, see demo.py): what each stage must achieve, and that no later
    stage undoes what SFT taught."""
    pct = lambda d: f"EN {d['en']:.1%} / ZH {d['zh']:.1%}"  # noqa: E731  (89.6% must not print as 90%)
    sft = f["qa"]["SFT"]
    lessons = [Lesson("held-out capitals after SFT", pct(sft), ">= 90% each", min(sft.values()) >= 0.9)]
    for stage in ("LoRA merged", "DPO", "GRPO"):
        if stage in f["qa"]:
            after = f["qa"][stage]
            change = ", ".join(f"{lang.upper()} {100 * (after[lang] - sft[lang]):+.1f}" for lang in sft)
            lessons.append(Lesson(f"held-out capitals kept after {stage}", f"{pct(after)} ({change} points)",
                                  "within 2 points of after SFT, each", within(after, sft, 2)))
    for stage, (hits, samples) in f["identity"].items():
        lessons.append(Lesson(f"'Who are you?' / '你是谁？' after {stage}", " / ".join(f"{h}/{samples}" for h in hits),
                              f">= {samples - 1}/{samples} each", min(hits) >= samples - 1))
    if "dpo_accuracy" in f:
        lessons.append(Lesson("DPO held-out reward accuracy", f"{f['dpo_accuracy']:.0%}", ">= 75%",
                              f["dpo_accuracy"] >= 0.75))
    if "grpo" in f:
        before, after = f["grpo"]
        gain = 100 * sum(after[k] - before[k] for k in before) / len(before)
        lessons.append(Lesson("GRPO held-out continents", f"{pct(before)} -> {pct(after)} ({gain:+.1f} points)",
                              "+25 points (mean), or >= 85% each", gain >= 25 or min(after.values()) >= 0.85))
    if "tool_use" in f:
        for part, target in (("calls", 0.9), ("answers", 0.85)):
            shares = f["tool_use"][part]
            lessons.append(Lesson(f"held-out tool {part} after SFT", pct(shares), f">= {target:.0%} each",
                                  min(shares.values()) >= target))
    if "distillation" in f:
        ce, kd = f["distillation"]
        gain = 100 * ((kd["en"] + kd["zh"]) - (ce["en"] + ce["zh"])) / 2
        lower = 1 - kd["loss"] / ce["loss"]
        lessons.append(Lesson("distillation beats cross-entropy alone",
                              f"held-out QA {pct(ce)} -> {pct(kd)} ({gain:+.1f} points, mean); val loss "
                              f"{ce['loss']:.3f} -> {kd['loss']:.3f} ({lower:.1%} lower)",
                              "+10 points of QA (mean) or 5% lower val loss",
                              round(gain, 6) >= 10 or round(lower, 6) >= 0.05))  # 0.5 + 0.5 - 0.8 is 9.99...
    if "server" in f:
        lessons.append(Lesson("server round trip", repr(f["server"]), "names Rome", names_rome(f["server"])))
    if "tool_round" in f:
        call, final, expression, answer = f["tool_round"]
        shown = f"{call['name']}({call['arguments']}) -> {final!r}" if call else f"no call: {final!r}"
        lessons.append(Lesson("tool round trip", shown, f"calculator({expression}), then {answer}",
                              right_calculator_round(call, final, expression, answer)))
    return lessons
