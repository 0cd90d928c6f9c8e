"""Chat in the terminal with any OpenAI-compatible server (ours: my_openai_api.py), through the official client.

    python chat_openai_api.py [--base_url http://127.0.0.1:8998/v1] [--api_key KEY] [--model NAME] [--prompt TEXT]
Base URL, key and model default to $OPENAI_BASE_URL, $OPENAI_API_KEY (else $MINIMIND_API_KEY, the one our server
reads) and the server's first model. The model's thinking (`reasoning_content`) and the tool calls it makes are shown;
with --tools demo it is offered the demo's calculator and lookup, which run here (model/tools.py), and their results
are sent back for the answer.
"""
import argparse
import os
import sys

from openai import AuthenticationError, OpenAI, OpenAIError

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing to a user

from model.errors import run_script
from model.io import read_questions
from model.tools import DEMO_TOOLS, run_tool_call


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
    parser.add_argument("--tools", choices=["demo"], default=None, help="offer the demo tools, run here")
    args = parser.parse_args(argv)
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    try:
        model = args.model or client.models.list().data[0].id
    except AuthenticationError:
        sys.exit(f"{args.base_url} refused the API key: pass --api_key or set OPENAI_API_KEY")
    except OpenAIError as e:
        sys.exit(f"cannot reach {args.base_url}: {e}")
    history = []

    extra = {"max_tokens": args.max_tokens} if args.max_tokens is not None else {}
    if args.tools:
        extra["tools"] = DEMO_TOOLS

    def ask(question):
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        for q, a in history[-args.history:] if args.history else []:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": question})
        for _ in range(4):  # a call's result goes back to the model, which may call again
            stream = client.chat.completions.create(model=model, messages=messages, stream=True,
                                                    temperature=args.temperature, **extra)
            reply, calls = show_stream(stream)
            messages.append({"role": "assistant", "content": reply or None, **({"tool_calls": calls} if calls else {})})
            if not (calls and args.tools):
                break
            for call in calls:
                result = run_tool_call(call)
                print(f"   -> {result}", flush=True)
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        print()
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


PREFIXES = {"reasoning": "💭: ", "content": "🤖: "}


def show_stream(stream) -> tuple[str, list[dict]]:
    """Print a streamed answer, its thinking and text as they arrive and then its tool calls; return the text and
    the calls (OpenAI's form, as the next request sends them back)."""
    reply, calls, line = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        thinking = (delta.model_extra or {}).get("reasoning_content")  # no OpenAI field: servers like ours add it
        for kind, piece in (("reasoning", thinking), ("content", delta.content)):
            if piece:
                if kind != line:  # the thinking and the answer each on lines of their own
                    print(("\n" if line else "") + PREFIXES[kind], end="")
                print(piece, end="", flush=True)
                line = kind
                reply += piece if kind == "content" else ""
        for part in delta.tool_calls or []:  # the pieces of call i come with index i
            call = calls.setdefault(part.index, {"id": "", "type": "function",
                                                 "function": {"name": "", "arguments": ""}})
            call["id"] = part.id or call["id"]
            if part.function:
                call["function"]["name"] += part.function.name or ""
                call["function"]["arguments"] += part.function.arguments or ""
    print("" if line or calls else PREFIXES["content"])
    for call in calls.values():
        print(f"🔧: {call['function']['name']}({call['function']['arguments']})", flush=True)
    return reply, list(calls.values())


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
