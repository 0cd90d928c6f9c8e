"""How much the demo's lesson depends on the seed: the demo's learning stages (demo.py --learning_only) for N
seeds, one after the other, and the min / median / max of every held-out figure per language.

    python bench/bench_demo_seeds.py [--seeds 42,7,123] [--threads default,1] [--keep]
    python bench/bench_demo_seeds.py --collect FOLDER...   (the table of runs kept by earlier --keep runs)

Each seed changes everything random: which countries are held out, the corpus's shuffling, the weights' init,
the data order and the sampling. Each seed also runs with each --threads setting: torch with one thread sums in
another order, as another CPU does, so the minimum over the runs is what a lesson must hold at. The figures quoted
in the README are this script's output (the CPU is named).
"""
import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, table



def figures(summary: dict) -> dict:
    """{(figure, part): value} for every percentage in the summary's lines, e.g. ("held-out fact QA, after SFT", "EN")."""
    out = {}
    for name, line in summary.items():
        if not isinstance(line, str) or name == "failures":
            continue
        if name.startswith("GRPO"):  # "EN a% / ZH b% -> EN c% / ZH d% (...)"
            for part, text in zip(("before", "after"), line.split("->")):
                for lang, value in re.findall(r"(EN|ZH) (\d+)%", text):
                    out[(name, f"{part} {lang}")] = int(value)
            continue
        if name.startswith("distillation") and ";" in line:
            for part, text in (("cross-entropy alone", line.split(";")[0]), ("distilled", line.split(";")[1])):
                for lang, value in re.findall(r"(EN|ZH) (\d+)%", text):
                    out[(name, f"{part} {lang}")] = int(value)
            continue
        for part in line.split(","):  # "calls EN a% / ZH b%, answers EN c% / ZH d%": each part's word for both
            word = m.group(1) + " " if (m := re.match(r"\s*(calls|answers) ", part)) else ""
            for lang, value in re.findall(r"(EN|ZH) (\d+)%", part):
                out[(name, word + lang)] = int(value)
        if not re.search(r"(EN|ZH) \d+%", line) and (m := re.match(r"(-?\d+(?:\.\d+)?)%", line)):
            out[(name, "")] = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
    return out


def report(summaries: dict, seconds: dict | None = None):
    """The min / median / max table of every figure over the runs ({"seed/threads": summary}), then the lessons."""
    runs = {run: figures(summary) for run, summary in summaries.items()}
    lessons = {}
    for summary in summaries.values():
        for lesson in summary.get("lessons", []):
            lessons.setdefault(lesson["name"], []).append(lesson["passed"])
    keys = [k for k in runs[next(iter(runs))] if all(k in r for r in runs.values())]
    rows = []
    for name, part in keys:
        values = [runs[s][(name, part)] for s in runs]
        rows.append((name, part, f"{min(values)}%", f"{statistics.median(values):g}%", f"{max(values)}%",
                     " ".join(f"{v}%" for v in values)))
    timing = f" (demo.py --learning_only; {statistics.mean(seconds.values()):.0f} s a run)" if seconds else ""
    print(f"\nruns (seed/threads) {', '.join(runs)}{timing}:")
    table(rows, ("figure", "part", "min", "median", "max", "by run"))
    if lessons:
        print()
        table([(name, f"{sum(passed)}/{len(passed)}") for name, passed in lessons.items()], ("lesson", "runs passed"))


def collected(folders) -> dict:
    """{"seed/threads": summary} of runs kept by earlier --keep invocations (their seed_S_threads_T folders)."""
    summaries = {}
    for folder in folders:
        for out in sorted(Path(folder).glob("seed_*_threads_*")) or [Path(folder)]:
            if not (out / "summary.json").exists():
                sys.exit(f"{out} has no summary.json: not a finished demo run")
            m = re.fullmatch(r"seed_(-?\d+)_threads_(\w+)", out.name)
            summaries[f"{m.group(1)}/{m.group(2)}" if m else out.name] = json.loads((out / "summary.json").read_text())
    return summaries


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="42,7,123")
    parser.add_argument("--threads", default="default,1", help="thread counts per seed ('default': torch's own)")
    parser.add_argument("--keep", action="store_true", help="keep each seed's output folder")
    parser.add_argument("--collect", nargs="+", metavar="FOLDER",
                        help="run nothing: the table of runs kept by earlier --keep invocations (run side by side, "
                             "one seed each)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    if args.collect:
        return report(collected(args.collect))
    root = Path(tempfile.mkdtemp(prefix="demo_seeds_"))
    summaries, seconds = {}, {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for threads in args.threads.split(","):
            run = f"{seed}/{threads}"
            out = root / f"seed_{seed}_threads_{threads}"
            start = time.time()
            flags = [] if threads == "default" else ["--threads", threads]
            done = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--learning_only", "--seed", str(seed),
                                   *flags, "--out_dir", str(out)], cwd=ROOT, capture_output=True, text=True)
            seconds[run] = time.time() - start
            if not (out / "summary.json").exists():
                sys.exit(f"seed {seed}, threads {threads}: the demo failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
            summaries[run] = json.loads((out / "summary.json").read_text())
            print(f"seed {seed}, threads {threads}: {seconds[run]:.0f} s", flush=True)
    report(summaries, seconds)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"outputs in {root}")

if __name__ == "__main__":
    main()
