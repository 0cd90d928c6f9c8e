"""Serve a model over the OpenAI chat-completions API (FastAPI + uvicorn).

    python my_openai_api.py --ckpt out/full_sft_512.safetensors [--host 127.0.0.1] [--port 8998] [--api-key KEY]
Then point any OpenAI client at http://127.0.0.1:8998/v1 (see chat_openai_api.py).
"""
import argparse
import os

import uvicorn

from model.chat import add_inference_args, load_for_inference, parse_rope_scaling, sampling_from_args
from model.errors import run_script
from model.server import create_app


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inference_args(parser, ckpt="out/full_sft_512.safetensors")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 keeps it private; 0.0.0.0 opens it to the network")
    parser.add_argument("--port", type=int, default=8998)
    parser.add_argument("--api-key", "--api_key", dest="api_key", default=os.environ.get("MINIMIND_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $MINIMIND_API_KEY, else no key)")
    parser.add_argument("--model-name", "--model_name", dest="model_name", default="minimind")
    parser.add_argument("--max_batch", type=int, default=16, help="requests decoded together at most")
    parser.add_argument("--context_length", type=int, default=None,
                        help="prompt + completion limit (default: max_seq_len, times the --rope_scaling factor)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    defaults = sampling_from_args(args)  # for what a request leaves out
    model, tokenizer = load_for_inference(args)
    scaling = parse_rope_scaling(args.rope_scaling)
    context = args.context_length or int(model.config.max_seq_len * (scaling["factor"] if scaling else 1))
    app = create_app(model, tokenizer, args.model_name, args.api_key, args.max_batch, context, defaults)
    print(f"serving {args.ckpt} as '{args.model_name}' on http://{args.host}:{args.port}/v1 "
          f"(context {context} tokens, API key {'required' if args.api_key else 'off'})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_script(main)
