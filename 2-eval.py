"""Chat with a model: a scripted set of questions, one --prompt, or an interactive session with history.

    python 2-eval.py --ckpt out/full_sft_512.safetensors                 (the built-in questions)
    python 2-eval.py --ckpt out/lora_sft_512 --interactive --history 2   (chat; 'exit' or Ctrl-D to leave)
    python 2-eval.py --ckpt out/demo/full_sft_256.safetensors --tools demo   (the model may call the demo tools)
With --tools demo the model sees the demo's calculator and lookup (model/tools.py); each call it makes is run here,
shown with its result, and answered by the model again.
"""
import argparse
import json
import sys
from pathlib import Path

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing to a user

from model.chat import add_inference_args, load_for_inference, sampling_from_args, tool_turn
from model.errors import run_script
from model.io import read_questions
from model.tools import DEMO_TOOLS

# The seed README's sample questions; a model the demo trained gets the demo world's instead (it knows nothing else).
QUESTIONS = ["你知道长江吗？", "Which country launched the first artificial satellite?", "你知道泰山在哪里吗？",
             "What is the highest mountain in the world?", "万有引力是谁提出的？", "你知道大熊猫的主要食物是什么吗？",
             "What is the capital of France?", "日本的首都是哪里？", "你是谁？"]
DEMO_QUESTIONS = ["What is the capital of Japan?", "法国的首都是哪里？", "Which continent is Kenya in?", "3加5等于多少？",
                  "How many days are there in a week?", "水在多少度结冰？", "Who are you?", "你是谁？"]
PREFIXES = {"reasoning": "💭: ", "content": "🤖: ", "call": "🔧: "}
TOOL_QUESTIONS = ["What is 123*45?", "What is 4521 plus 376?", "What is the population of Japan?", "法国有多少人口？"]


def trained_by_the_demo(ckpt) -> bool:
    """A checkpoint in a folder demo.py made (or one level inside it)."""
    from model.demo_corpus import DEMO_MARKER

    path = Path(ckpt).resolve()
    return any((folder / DEMO_MARKER).exists() for folder in (path.parent, path.parent.parent))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inference_args(parser, ckpt="out/full_sft_512.safetensors")
    parser.add_argument("--prompt", action="append", help="a question (repeatable); default: the built-in set")
    parser.add_argument("--interactive", action="store_true", help="chat in the terminal")
    parser.add_argument("--history", type=int, default=0, help="earlier turns the model sees (0: single-turn)")
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument("--tools", choices=["demo"], default=None,
                        help="demo: the model may call the demo's calculator and lookup, run here (model/tools.py)")
    args = parser.parse_args(argv)
    params = sampling_from_args(args)  # checked before the model loads
    engine, tokenizer = load_for_inference(args)
    history = []

    def answer(question):
        earlier = [m for turn in history[-args.history:] for m in turn] if args.history else []
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + earlier
        messages.append({"role": "user", "content": question})
        start, line = len(messages) - 1, None  # line: what the terminal line being written shows
        for kind, piece in tool_turn(engine, tokenizer, messages, params, DEMO_TOOLS if args.tools else None):
            if kind != line or kind == "call":  # the thinking, the answer and each call get lines of their own
                sys.stdout.write(("\n" if line else "") + PREFIXES[kind])
                line = kind
            if kind == "call":
                call, result = piece
                piece = f"{call['name']}({json.dumps(call['arguments'], ensure_ascii=False)}) -> {result}"
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write(("" if line else PREFIXES["content"]) + "\n\n")
        history.append(messages[start:])  # this question's turns: the question, calls, results, answers

    if not args.interactive:
        for q in args.prompt or (TOOL_QUESTIONS if args.tools else DEMO_QUESTIONS if trained_by_the_demo(args.ckpt)
                                 else QUESTIONS):
            print(f"👶: {q}")
            answer(q)
        return
    print("Chat with MiniMind ('exit' or Ctrl-D to leave).")
    for question in read_questions():
        answer(question)


if __name__ == "__main__":
    run_script(main)
