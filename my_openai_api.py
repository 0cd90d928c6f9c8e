"""Serve a model over the OpenAI chat-completions API (FastAPI + uvicorn), with continuous batching.

    python my_openai_api.py --ckpt out/full_sft_512.safetensors [--host 127.0.0.1] [--port 8998] [--api_key KEY]
Then point any OpenAI client at http://127.0.0.1:8998/v1 (see chat_openai_api.py).
"""
import argparse
import os
import signal
import socket
import threading

import uvicorn

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing to a user

from model.chat import add_inference_args, load_for_inference, parse_rope_scaling, sampling_from_args
from model.errors import InputError, run_script
from model.server import create_app


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inference_args(parser, ckpt="out/full_sft_512.safetensors")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 keeps it private; 0.0.0.0 opens it to the network")
    parser.add_argument("--port", type=int, default=8998)
    parser.add_argument("--api_key", default=os.environ.get("MINIMIND_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $MINIMIND_API_KEY, else no key)")
    parser.add_argument("--model_name", default="minimind")
    parser.add_argument("--max_batch", type=int, default=16, help="sequences decoded together at most (KV-cache rows)")
    parser.add_argument("--max_queue", type=int, default=64, help="requests waiting for a row; beyond: HTTP 429")
    parser.add_argument("--prefill_chunk", type=int, default=512,
                        help="prompt tokens prefilled per step: a longer prompt is prefilled in chunks between steps")
    parser.add_argument("--gather_ms", type=float, default=3.0,
                        help="a burst of requests shares one prefill: prompts wait until none arrived for this long "
                             "(at most 10x; 0: admit at once)")
    parser.add_argument("--context_length", type=int, default=None,
                        help="prompt + completion limit (default: max_seq_len, times the --rope_scaling factor)")
    for dashed in ("--api-key", "--model-name"):  # the spelling earlier versions showed, still accepted
        parser.add_argument(dashed, dest=dashed[2:].replace("-", "_"), default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)
    return parser


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use is one clear line, at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror} (another server there? pick --port)") from e
    return sock


def main(argv=None):
    args = build_parser().parse_args(argv)
    defaults = sampling_from_args(args)  # for what a request leaves out
    sock = bind(args.host, args.port)
    engine, tokenizer = load_for_inference(args, rows=(1, 2))
    scaling = parse_rope_scaling(args.rope_scaling)
    context = args.context_length or int(engine.config.max_seq_len * (scaling["factor"] if scaling else 1))
    app = create_app(engine, tokenizer, args.model_name, args.api_key, args.max_batch, context, defaults,
                     args.max_queue, args.prefill_chunk, scheduler_in_thread=False, gather_ms=args.gather_ms)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {args.ckpt} as '{args.model_name}' on http://{host}:{args.port}/v1 "
          f"(context {context} tokens, {args.max_batch} rows, API key {'required' if args.api_key else 'off'})",
          flush=True)
    # HTTP in a thread, the model in the main thread: torch's CPU kernels run about twice as fast there
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    http.start()
    signal.signal(signal.SIGTERM, lambda *_: app.state.scheduler.stop())  # a clean stop, as uvicorn gives
    try:
        app.state.scheduler.run()  # until Ctrl-C / SIGTERM
    finally:
        server.should_exit = True
        http.join(timeout=5)


if __name__ == "__main__":
    run_script(main)
