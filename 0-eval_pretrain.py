"""Continue text with a pretrained model (no chat template): what did pretraining teach it?

    python 0-eval_pretrain.py --ckpt out/pretrain_512.safetensors [--prompt "The capital of France is"]
"""
import argparse
import sys

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing to a user

from model.chat import add_inference_args, load_for_inference, sampling_from_args, stream_to
from model.errors import run_script

PROMPTS = ["The capital of France is", "中国的首都是", "Water boils at", "一年有", "The day after Monday is",
           "长江是", "The highest mountain in the world is", "万有引力定律是"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inference_args(parser, ckpt="out/pretrain_512.safetensors")
    parser.add_argument("--prompt", action="append", help="a text to continue (repeatable); default: a built-in set")
    parser.set_defaults(max_new_tokens=64, temperature=0.0)
    args = parser.parse_args(argv)
    params = sampling_from_args(args)  # checked before the model loads
    engine, tokenizer = load_for_inference(args)
    for prompt in args.prompt or PROMPTS:
        ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
        sys.stdout.write(f"\n[prompt] {prompt}\n[continuation] {prompt}")
        stream_to(sys.stdout, engine, tokenizer, ids, params)
        sys.stdout.write("\n")


if __name__ == "__main__":
    run_script(main)
