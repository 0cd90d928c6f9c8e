"""Chat with a model: a scripted set of questions, one --prompt, or an interactive session with history.

    python 2-eval.py --ckpt out/full_sft_512.safetensors                 (the built-in questions)
    python 2-eval.py --ckpt out/lora_sft_512 --interactive --history 2   (chat; 'exit' or Ctrl-D to leave)
"""
import argparse
import sys

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing to a user

from model.chat import add_inference_args, load_for_inference, sampling_from_args, stream_to
from model.errors import run_script
from model.evaluation import chat_prompt
from model.io import read_questions

# The seed README's sample questions, and a few from the demo world.
QUESTIONS = ["你知道长江吗？", "Which country launched the first artificial satellite?", "你知道泰山在哪里吗？",
             "What is the highest mountain in the world?", "万有引力是谁提出的？", "你知道大熊猫的主要食物是什么吗？",
             "What is the capital of France?", "日本的首都是哪里？", "你是谁？"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inference_args(parser, ckpt="out/full_sft_512.safetensors")
    parser.add_argument("--prompt", action="append", help="a question (repeatable); default: the built-in set")
    parser.add_argument("--interactive", action="store_true", help="chat in the terminal")
    parser.add_argument("--history", type=int, default=0, help="earlier turns the model sees (0: single-turn)")
    parser.add_argument("--system", default=None, help="a system message")
    args = parser.parse_args(argv)
    params = sampling_from_args(args)  # checked before the model loads
    engine, tokenizer = load_for_inference(args)
    history = []

    def answer(question):
        ids = chat_prompt(tokenizer, question, history[-args.history:] if args.history else (), args.system)
        sys.stdout.write("🤖: ")
        reply = stream_to(sys.stdout, engine, tokenizer, ids, params)
        sys.stdout.write("\n\n")
        history.append((question, reply))

    if not args.interactive:
        for q in args.prompt or QUESTIONS:
            print(f"👶: {q}")
            answer(q)
        return
    print("Chat with MiniMind ('exit' or Ctrl-D to leave).")
    for question in read_questions():
        answer(question)


if __name__ == "__main__":
    run_script(main)
