"""C-Eval by the seed's method: after each question and its options, the most probable of the next tokens
A, B, C, D is the model's answer.

    python eval_ceval.py --ckpt out/full_sft_512.safetensors --data_dir ceval-exam [--split val] [--shots 0]
Data: any folder in C-Eval's layout, <root>/{dev,val,test}/<subject>_<split>.csv. The real set:
https://huggingface.co/datasets/ceval/ceval-exam (dev and val carry answers). The demo writes its own.
"""
import argparse
from pathlib import Path

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing to a user

from model.chat import add_inference_args, load_for_inference
from model.errors import run_script
from model.evaluation import ceval_evaluate, ceval_markdown, write_ceval_report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inference_args(parser, ckpt="out/full_sft_512.safetensors")
    parser.add_argument("--data_dir", default="dataset/ceval-exam")
    parser.add_argument("--split", default="val", choices=["dev", "val", "test"])
    parser.add_argument("--shots", type=int, default=0, help="solved dev examples shown before each question")
    parser.add_argument("--template", default="chat", choices=["chat", "plain"],
                        help="chat: through the chat template (SFT models); plain: raw text (pretrained models)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--out_dir", default=None, help="default: out/ceval_<checkpoint name>")
    args = parser.parse_args(argv)
    engine, tokenizer = load_for_inference(args)
    result = ceval_evaluate(engine.model, tokenizer, args.data_dir, args.split, args.shots, args.template, args.batch_size)
    name = Path(args.ckpt).name.removesuffix(".safetensors")
    out_dir = Path(args.out_dir or f"out/ceval_{name}")
    write_ceval_report(result, out_dir, f"C-Eval {args.split} ({args.shots}-shot): {name}")
    print(ceval_markdown(result, f"C-Eval {args.split} ({args.shots}-shot): {name}"))
    print(f"per-subject answers and summary: {out_dir}")
    print(f"total accuracy: {result['accuracy']:.2%} ({result['correct']}/{result['total']})")
    return result


if __name__ == "__main__":
    run_script(main)
