"""Chat in the terminal with any OpenAI-compatible server (ours: my_openai_api.py), through the official client.

    python chat_openai_api.py [--base_url http://127.0.0.1:8998/v1] [--api_key KEY] [--model NAME] [--prompt TEXT]
Base URL, key and model default to $OPENAI_BASE_URL, $OPENAI_API_KEY (else $MINIMIND_API_KEY, the one our server
reads) and the server's first model.
"""
import argparse
import os
import sys

from openai import AuthenticationError, OpenAI, OpenAIError

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing to a user

from model.errors import run_script
from model.io import read_questions


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8998/v1"))
    key = os.environ.get("OPENAI_API_KEY", os.environ.get("MINIMIND_API_KEY", "none"))
    parser.add_argument("--api_key", default=key)
    parser.add_argument("--model", default=os.environ.get("OPENAI_MODEL"))
    parser.add_argument("--system", default=None)
    parser.add_argument("--history", type=int, default=4, help="earlier turns sent along (0: none)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max_tokens", type=int, default=None, help="default: the server's (what fits the context)")
    for dashed in ("--base-url", "--api-key", "--max-tokens"):  # the other spelling, accepted
        parser.add_argument(dashed, dest=dashed[2:].replace("-", "_"), default=argparse.SUPPRESS,
                            type=int if dashed == "--max-tokens" else str, help=argparse.SUPPRESS)
    parser.add_argument("--prompt", action="append", help="ask this and exit (repeatable) instead of chatting")
    args = parser.parse_args(argv)
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    try:
        model = args.model or client.models.list().data[0].id
    except AuthenticationError:
        sys.exit(f"{args.base_url} refused the API key: pass --api_key or set OPENAI_API_KEY")
    except OpenAIError as e:
        sys.exit(f"cannot reach {args.base_url}: {e}")
    history = []

    def ask(question):
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        for q, a in history[-args.history:] if args.history else []:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": question})
        extra = {"max_tokens": args.max_tokens} if args.max_tokens is not None else {}
        stream = client.chat.completions.create(model=model, messages=messages, stream=True,
                                                temperature=args.temperature, **extra)
        reply = ""
        print("🤖: ", end="", flush=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                reply += chunk.choices[0].delta.content
                print(chunk.choices[0].delta.content, end="", flush=True)
        print("\n")
        history.append((question, reply))
        return reply

    if args.prompt:
        try:
            for q in args.prompt:
                print(f"👶: {q}")
                ask(q)
        except OpenAIError as e:
            sys.exit(f"request failed: {failure(e)}")
        return
    print(f"chatting with '{model}' at {args.base_url} ('exit' or Ctrl-D to leave)")
    for question in read_questions():
        try:
            ask(question)
        except OpenAIError as e:  # say what went wrong and keep the conversation going
            print(f"\nerror: {failure(e)}\n", flush=True)


def failure(error: OpenAIError) -> str:
    """The server's own message where it sent one (OpenAI's error body), else the client's."""
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict) and body.get("message"):
            return body["message"]
    return str(error)


if __name__ == "__main__":
    run_script(main)
