"""Regenerate images/chat_page.png: the streamlit chat page with one question answered.

    pip install playwright==1.65.2   # a tool for this script only; it drives the system's Chromium
    python images/screenshot.py --ckpt out/demo/dpo_256.safetensors [--chromium /usr/bin/chromium]
"""
import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="out/demo/dpo_256.safetensors")
    parser.add_argument("--out_dir", default="out/demo")
    parser.add_argument("--question", default="What is the capital of Japan?")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--output", default=str(ROOT / "images" / "chat_page.png"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MINIMIND_OUT_DIR": args.out_dir, "MINIMIND_CKPT": args.ckpt}
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "fast_inference.py", "--server.headless",
                               "true", "--server.port", str(port), "--server.address", "127.0.0.1",
                               "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            for _ in range(100):
                try:
                    page.goto(f"http://127.0.0.1:{port}", timeout=5000)
                    break
                except Exception:
                    time.sleep(0.5)
            box = page.get_by_placeholder("Ask MiniMind something")
            box.wait_for(timeout=120_000)
            for question in (args.question, "法国的首都是哪里？"):
                box.fill(question)
                box.press("Enter")
                time.sleep(1)
                page.wait_for_function("document.querySelectorAll('[data-testid=\"stChatMessage\"]').length > 0")
                page.wait_for_timeout(4000)
            page.screenshot(path=args.output)
            browser.close()
        print(f"wrote {args.output}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
