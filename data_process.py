"""Prepare data for every stage.

    python data_process.py demo     --out_dir dataset/demo [--pretrain_repeats 30] [--seed 42]
    python data_process.py pretrain --input FILE.jsonl --out_dir DIR --tokenizer DIR [--workers N]
    python data_process.py sft      --input FILE.jsonl --output FILE.jsonl [--max_chars N] [--min_zh_ratio R]
    python data_process.py dpo      --input FILE(.jsonl|.json) --output FILE.jsonl
"""
import argparse

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing to a user

from model.errors import run_script
from model.processing import normalize_file, tokenize_pretrain


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="write the demo corpus (all stages' formats)")
    demo.add_argument("--out_dir", default="dataset/demo")
    demo.add_argument("--seed", type=int, default=42)
    demo.add_argument("--pretrain_repeats", type=int, default=30,
                      help="regroupings of the fact sentences in the pretraining file (its size: ~0.15 MB each)")
    demo.add_argument("--held_out", type=int, default=48, help="countries whose facts SFT never answers")
    demo.add_argument("--transcript_repeats", type=int, default=3,
                      help="copies of each SFT chat, as a chat transcript, among the pretraining documents")
    demo.add_argument("--copy_passages", type=int, default=0,
                      help="recall passages (a number or country noted, then asked back) among the pretraining "
                           "documents")
    demo.add_argument("--tool_transcripts", type=int, default=0,
                      help="tool conversations per language (fresh numbers) among the pretraining documents")

    pre = sub.add_parser("pretrain", help="tokenize {'text'} jsonl into uint16 shards")
    pre.add_argument("--input", required=True)
    pre.add_argument("--out_dir", required=True)
    pre.add_argument("--tokenizer", default=None, help="tokenizer folder (default model/minimind_tokenizer)")
    pre.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    pre.add_argument("--val_every", type=int, default=100, help="one document in N goes to the validation shard (chosen by a hash of its text)")
    pre.add_argument("--min_chars", type=int, default=1)
    pre.add_argument("--max_chars", type=int, default=0, help="drop documents longer than this (0: keep all)")
    pre.add_argument("--shard_tokens", type=int, default=500_000_000)

    for name, kind in (("sft", "SFT"), ("dpo", "preference")):
        p = sub.add_parser(name, help=f"normalize {kind} data into the canonical jsonl")
        p.add_argument("--input", required=True)
        p.add_argument("--output", required=True)
        p.add_argument("--max_chars", type=int, default=0, help="drop rows longer than this (0: keep all)")
        p.add_argument("--min_zh_ratio", type=float, default=0.0, help="drop rows with fewer Chinese characters")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from model.demo_corpus import write_demo

        for name, rows in write_demo(args.out_dir, args.seed, args.pretrain_repeats, args.held_out,
                                      args.transcript_repeats, args.copy_passages, args.tool_transcripts).items():
            print(f"{rows:>8}  {name}")
        print(f"demo corpus written to {args.out_dir}")
    elif args.command == "pretrain":
        from model.tokenizer import DEFAULT_TOKENIZER_DIR

        index = tokenize_pretrain(args.input, args.out_dir, args.tokenizer or DEFAULT_TOKENIZER_DIR, args.workers,
                                  args.val_every, args.min_chars, args.max_chars, args.shard_tokens)
        print(f"{index['docs']} documents -> {index['train_tokens']} train + {index['val_tokens']} val tokens "
              f"in {args.out_dir} ({index['seconds']} s); {index['filtered']} filtered by length; "
              f"{index['bad'].report()}")
    else:
        result = normalize_file(args.input, args.output, args.command, args.max_chars, args.min_zh_ratio)
        print(f"{result['kept']} rows -> {args.output}; {result['filtered']} filtered; {result['bad'].report()}")


if __name__ == "__main__":
    run_script(main)
