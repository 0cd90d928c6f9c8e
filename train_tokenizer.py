"""Train the byte-level BPE tokenizer (vocab 6400, <unk>=0 <s>=1 </s>=2) with the chat template.

    python train_tokenizer.py --data dataset/demo/tokenizer_train.jsonl --vocab_size 6400 --out_dir model/minimind_tokenizer
"""
import argparse
import itertools
import time
import sys

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing to a user

from model.errors import run_script
from model.io import BadRows
from model.tokenizer import chars_per_token, read_texts, save, train_bpe, wrap


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="dataset/demo/tokenizer_train.jsonl", help='jsonl with a "text" field')
    parser.add_argument("--vocab_size", type=int, default=6400)
    parser.add_argument("--out_dir", default="model/minimind_tokenizer")
    parser.add_argument("--isolate_cjk", action="store_true",
                        help="one token per Chinese character at most (default: BPE merges characters, as upstream)")
    parser.add_argument("--individual_digits", action="store_true",
                        help="one token per digit, as Llama's tokenizer (default: BPE merges digits, as upstream)")
    parser.add_argument("--name_spaces", action="store_true",
                        help="the space before a capitalised word or a number is a token of its own, so a name is the "
                             "same tokens after a space, a quote or a line break (default: glued, as upstream)")
    parser.add_argument("--held_out_every", type=int, default=50,
                        help="every n-th row is kept out of training to measure characters per token")
    args = parser.parse_args(argv)

    start = time.time()
    n = args.held_out_every
    bad = BadRows()
    tokenizer = train_bpe(read_texts(args.data, skip_every=n, bad=bad), args.vocab_size, isolate_cjk=args.isolate_cjk,
                          individual_digits=args.individual_digits,
                          name_spaces=args.name_spaces, show_progress=sys.stderr.isatty())  # in a log file its bars are only blank lines
    if bad.total:
        print(f"{args.data}: {bad.report()}")
    fast = wrap(tokenizer)
    save(fast, args.out_dir)
    held_out = list(itertools.islice(read_texts(args.data, every=n), 2000))
    print(f"vocab {tokenizer.get_vocab_size()} trained in {time.time() - start:.1f} s -> {args.out_dir}")
    if held_out:
        print(f"held-out text: {chars_per_token(fast, held_out):.2f} characters per token ({len(held_out)} rows)")


if __name__ == "__main__":
    run_script(main)
