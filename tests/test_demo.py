"""The one-command demo, in its tiny mode, end to end."""
import json
import subprocess
import sys

from conftest import ROOT


def test_tiny_demo_runs_every_stage_and_summarises(tmp_path):
    earlier = tmp_path / "demo"  # a folder an earlier demo run made: replaced whole
    earlier.mkdir()
    (earlier / ".minimind_demo").write_text("")
    (earlier / "stale.txt").write_text("from the earlier run")
    done = subprocess.run([sys.executable, "demo.py", "--tiny", "--out_dir", str(tmp_path / "demo")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "MiniMind demo summary" in out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    stages = ["demo data", "tokenizer", "pretrain", "SFT", "LoRA", "DPO", "GRPO", "distillation", "chat samples",
              "C-Eval-format eval", "export", "server round trip"]
    assert all(s in summary["seconds"] for s in stages)
    for key in ("pretrain val loss", "SFT val loss", "held-out fact QA, before SFT", "held-out fact QA, after SFT",
                "DPO held-out reward accuracy (0% at the start)", "DPO held-out log-prob margin chosen-rejected",
                "C-Eval-format accuracy (demo val, chance 25%)", "held-out fact QA, after SFT, sampled",
                "held-out tool use, before SFT", "held-out tool use, after SFT", "GRPO held-out continents",
                "distillation: half-width student, held-out fact QA", "copy probe, after pretraining", "copy probe, after SFT",
                "distillation: half-width student, pretraining val loss"):
        assert key in summary, key
    assert "calls EN" in summary["held-out tool use, after SFT"] and "->" in summary["GRPO held-out continents"]
    assert "cross-entropy alone EN" in summary["distillation: half-width student, held-out fact QA"]
    assert summary["'Who are you?' / '你是谁？', after GRPO"].endswith("exactly as taught")
    assert summary["failures"] == []
    assert float(summary["pretrain val loss"]) > 0 and "EN" in summary["held-out fact QA, after SFT"]
    assert summary["exports"].startswith("hf ok") and "llama ok" in summary["exports"]
    assert "gguf 20 tensors" in summary["exports"]
    assert not summary["server round trip"].startswith("FAILED") and summary["lessons"] == []
    assert "--tiny checks the plumbing only" in out
    assert summary["C-Eval-format accuracy (demo val, chance 25%)"].endswith("/144)")
    for name in ("pretrain_64.safetensors", "full_sft_64.safetensors", "dpo_64.safetensors", "lora_sft_64",
                 "grpo_64.safetensors", "images/demo_grpo_loss.png", "images/demo_full_sft_loss.png"):
        assert (tmp_path / "demo" / name).exists(), name
    assert not (earlier / "stale.txt").exists() and (earlier / ".minimind_demo").exists()


def test_the_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "pretrain_512.safetensors").write_bytes(b"weights a user trained")
    done = subprocess.run([sys.executable, "demo.py", "--tiny", "--out_dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == (f"error: --out_dir {tmp_path} holds files the demo did not write: give a new or "
                                   f"empty folder (the demo replaces only a folder it made)")
    assert (tmp_path / "pretrain_512.safetensors").read_bytes() == b"weights a user trained"


def test_the_seed_bench_reads_each_figure_of_a_summary_under_its_own_name(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from bench_demo_seeds import figures

    got = figures({"held-out tool use, after SFT": "calls EN 0% / ZH 50%, answers EN 10% / ZH 20%",
                   "GRPO held-out continents": "EN 2% / ZH 73% -> EN 73% / ZH 83% (96 questions)",
                   "DPO held-out reward accuracy (0% at the start)": "89%", "failures": [],
                   "distillation: val loss below cross-entropy alone's": "-1.5%"})
    assert got == {("held-out tool use, after SFT", "calls EN"): 0, ("held-out tool use, after SFT", "calls ZH"): 50,
                   ("held-out tool use, after SFT", "answers EN"): 10, ("held-out tool use, after SFT", "answers ZH"): 20,
                   ("GRPO held-out continents", "before EN"): 2, ("GRPO held-out continents", "before ZH"): 73,
                   ("GRPO held-out continents", "after EN"): 73, ("GRPO held-out continents", "after ZH"): 83,
                   ("DPO held-out reward accuracy (0% at the start)", ""): 89,
                   ("distillation: val loss below cross-entropy alone's", ""): -1.5}


def test_the_server_check_wants_rome_and_nothing_else():
    from model.evaluation import names_rome

    assert names_rome("The capital of Italy is Rome.")
    for wrong in (" is in Africa.", "The capital of Italy is Romeecembruememember.", "Rome or Paris", ""):
        assert not names_rome(wrong), wrong


def test_the_tool_check_wants_the_questions_expression_and_the_right_number():
    from model.evaluation import right_calculator_round

    call = {"name": "calculator", "arguments": '{"expression": "4521+376"}'}
    assert right_calculator_round(call, "4521 plus 376 is 4897.", "4521+376", 4897)
    assert right_calculator_round({**call, "arguments": {"expression": "4521 + 376"}}, "4897", "4521+376", 4897)
    wrong = [({"name": "calculator", "arguments": '{"": {"expression": "5555666666"}}'}, "4897"),
             ({"name": "calculator", "arguments": '{"expression": "9666"}'}, "4897"),
             ({"name": "lookup", "arguments": '{"expression": "4521+376"}'}, "4897"),
             (call, "4521 plus 376 is 48970."), (call, "It is 4898."), (None, "4897"),
             ({"name": "calculator", "arguments": "{not json"}, "4897")]
    for bad_call, final in wrong:
        assert not right_calculator_round(bad_call, final, "4521+376", 4897), (bad_call, final)


def good_figures():
    qa = {"en": 0.96, "zh": 1.0}
    return {"qa": {"SFT": qa, "LoRA merged": qa, "DPO": {"en": 0.96, "zh": 0.98}, "GRPO": dict(qa)},
            "identity": {"SFT": ([8, 8], 8), "GRPO": ([7, 8], 8)}, "dpo_accuracy": 0.85,
            "grpo": ({"en": 0.04, "zh": 0.69}, {"en": 0.60, "zh": 0.77}), "tool_use": {"calls": {"en": 0.95, "zh": 0.9}, "answers": {"en": 0.9, "zh": 0.86}},
            "distillation": ({"en": 0.33, "zh": 0.58, "loss": 1.27}, {"en": 0.72, "zh": 0.73, "loss": 1.19}),
            "server": "The capital of Italy is Rome.",
            "tool_round": ({"name": "calculator", "arguments": '{"expression":"4521+376"}'}, "It is 4897.",
                           "4521+376", 4897)}


def test_every_demo_lesson_fails_when_its_figure_is_wrong():
    """Right figures pass every lesson; each wrong one fails its lesson, and only that one."""
    from model.evaluation import demo_lessons

    assert all(lesson.passed for lesson in demo_lessons(good_figures())), demo_lessons(good_figures())
    spoil = {"held-out capitals after SFT": lambda f: f["qa"].update(SFT={"en": 0.96, "zh": 0.5}),
             "held-out capitals kept after GRPO": lambda f: f["qa"].update(GRPO={"en": 0.04, "zh": 1.0}),
             "'Who are you?' / '你是谁？' after GRPO": lambda f: f["identity"].update(GRPO=([0, 8], 8)),
             "DPO held-out reward accuracy": lambda f: f.update(dpo_accuracy=0.5),
             "GRPO held-out continents": lambda f: f.update(grpo=({"en": 0.5, "zh": 0.5}, {"en": 0.6, "zh": 0.6})),
             "held-out tool calls after SFT": lambda f: f["tool_use"].update(calls={"en": 0.95, "zh": 0.85}),
             "held-out tool answers after SFT": lambda f: f["tool_use"].update(answers={"en": 0.84, "zh": 1.0}),
             # +5 points of QA (mean) and 1.6% lower loss: short of both margins
             "distillation beats cross-entropy alone": lambda f: f.update(distillation=(
                 {"en": 0.33, "zh": 0.58, "loss": 1.27}, {"en": 0.40, "zh": 0.61, "loss": 1.25})),
             "server round trip": lambda f: f.update(server=" is in Africa."),
             "tool round trip": lambda f: f.update(tool_round=(None, "9666", "4521+376", 4897))}
    for name, wrong in spoil.items():
        figures = good_figures()
        wrong(figures)
        failed = [lesson.name for lesson in demo_lessons(figures) if not lesson.passed]
        assert failed == [name], (name, failed)


def test_distillation_pays_by_either_margin():
    """+10 points of held-out QA (the mean of the languages) or 5% lower validation loss, either one."""
    from model.evaluation import demo_lessons

    def judged(ce, kd):
        figures = good_figures()
        figures["distillation"] = (ce, kd)
        return next(lesson for lesson in demo_lessons(figures) if lesson.name.startswith("distillation")).passed

    ce = {"en": 0.30, "zh": 0.50, "loss": 1.0}
    assert judged(ce, {"en": 0.30, "zh": 0.50, "loss": 0.95})  # 5.0% lower loss, no QA gained
    assert judged(ce, {"en": 0.50, "zh": 0.50, "loss": 1.0})  # +10 points of the mean
    assert not judged(ce, {"en": 0.49, "zh": 0.50, "loss": 0.951})
    assert not judged(ce, {"en": 0.20, "zh": 0.40, "loss": 1.1})


def test_a_lesson_prints_the_figure_it_judged():
    """43 of 48 is 89.6%: a line that printed "EN 90%" beside FAIL (>= 90%) contradicted itself."""
    from model.evaluation import demo_lessons

    figures = good_figures()
    figures["qa"]["SFT"] = {"en": 43 / 48, "zh": 1.0}
    lesson = demo_lessons(figures)[0]
    assert lesson.name == "held-out capitals after SFT" and not lesson.passed and "EN 89.6%" in lesson.figure
