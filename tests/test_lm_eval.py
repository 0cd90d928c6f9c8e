"""lm-eval's harness on eval/lm_eval_tasks/ceval_local scores a Llama export exactly as eval_ceval.py does."""
import csv
import math

import pytest

from conftest import ROOT, load_script, tiny_model
from test_export_eval import SHARED_CEVAL

lm_eval = pytest.importorskip("lm_eval")

TASKS = ROOT / "eval" / "lm_eval_tasks"
HEADER = ["id", "question", "A", "B", "C", "D", "answer"]
# Options that a type-guessing CSV reader would turn into numbers ("007" -> 7, "3.50" -> 3.5), changing the prompt.
VAL = {
    "sums": [("5加7等于____。", "12", "007", "3.50", "-1", "A"), ("一打是____个。", "6", "10", "12", "24", "C"),
             ("0.5加0.5等于____。", "1.0", "1", "0.10", "2", "B"), ("9减9等于____。", "9", "1", "18", "0", "D")],
    "places": [("巴黎是哪国的首都？", "法国", "德国", "意大利", "西班牙", "A"),
               ("Which ocean is the largest?", "Atlantic", "Indian", "Pacific, by far", "Arctic", "C"),
               ("东京位于____。", "中国", "日本", "韩国", "越南", "B")],
}
DEV = {  # with C-Eval's extra `explanation` column, quoted across lines
    "sums": [("1加1等于____。", "2", "3", "11", "0", "A", "1. 一加一\n2. 等于二"), ("2乘3等于____。", "5", "6", "23", "1", "B", "")],
    "places": [("北京是哪国的首都？", "日本", "中国", "韩国", "蒙古", "B", "首都, 北京")],
}


def write_ceval(root):
    for split, subjects, header in (("val", VAL, HEADER), ("dev", DEV, HEADER + ["explanation"])):
        (root / split).mkdir(parents=True)
        for name, rows in subjects.items():
            with open(root / split / f"{name}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows([i, *row] for i, row in enumerate(rows))
    return root


@pytest.fixture(scope="module")
def setup(demo_data, tmp_path_factory):
    from model.export import export_llama
    from model.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = load_tokenizer(demo_data / "tokenizer")
    export_llama(tiny_model(vocab_size=1000, max_seq_len=256), tokenizer, root / "llama")
    return root / "llama", tokenizer, write_ceval(root / "ceval")


def harness(export, data_dir, shots, chat):
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(TASKS), include_defaults=False, metadata={"data_dir": str(data_dir)})
    out = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(export), "add_bos_token": True,
                                                         "max_length": 2048},
                                  tasks=["ceval_local"], num_fewshot=shots, apply_chat_template=chat,
                                  task_manager=tasks, batch_size=4, device="cpu", log_samples=True)
    return out["results"]["ceval_local"]["acc,none"], out["samples"]["ceval_local"]


@pytest.mark.parametrize("template,shots", [("plain", 0), ("plain", 2), ("chat", 0), ("chat", 2)])
def test_lm_eval_matches_eval_ceval_question_by_question(setup, template, shots):
    from model.evaluation import ceval_evaluate
    from model.loading import load_model

    export, tokenizer, data_dir = setup
    ours = ceval_evaluate(load_model(export), tokenizer, data_dir, "val", shots, template, progress=False)
    accuracy, samples = harness(export, data_dir, shots, template == "chat")
    assert len(samples) == ours["total"] == 7
    theirs = {}
    for s in samples:
        lls = [float(r[0]) for r in s["filtered_resps"]]
        total = sum(map(math.exp, lls))
        theirs[(s["doc"]["subject"], s["doc"]["id"])] = [math.exp(x) / total for x in lls]
        assert isinstance(s["doc"]["A"], str)
    for row in ours["rows"]:
        probs = theirs[(row["subject"], row["id"])]
        # The same prompt gives the same next-token distribution over the letters (ours is rounded to 4 places).
        assert probs == pytest.approx([row[f"p_{c}"] for c in "ABCD"], abs=1e-3), row
        assert "ABCD"[probs.index(max(probs))] == row["prediction"], row
    assert accuracy == ours["accuracy"]


def task_utils():
    return load_script("eval/lm_eval_tasks/ceval_local/utils.py")


def test_options_stay_strings_and_shots_come_from_the_subjects_dev_rows(tmp_path):
    docs = task_utils().load_ceval(str(write_ceval(tmp_path)))["val"]
    first = docs[0]
    assert (first["subject"], first["A"], first["B"], first["C"]) == ("places", "法国", "德国", "意大利")
    sums = [d for d in docs if d["subject"] == "sums"]
    assert (sums[0]["A"], sums[0]["B"], sums[0]["C"]) == ("12", "007", "3.50")
    assert [s["question"] for s in sums[0]["shots"]] == ["1加1等于____。", "2乘3等于____。"]
    assert "explanation" not in sums[0]["shots"][0]


def test_a_missing_folder_says_so(tmp_path, monkeypatch):
    from model.errors import InputError

    utils = task_utils()
    monkeypatch.delenv("CEVAL_DIR", raising=False)
    with pytest.raises(InputError, match="ceval_local needs a C-Eval folder"):
        utils.load_ceval()
    with pytest.raises(FileNotFoundError, match="no .*/val/<subject>_val.csv files"):
        utils.load_ceval(str(tmp_path / "absent"))
    monkeypatch.setenv("CEVAL_DIR", str(write_ceval(tmp_path / "ceval")))
    assert len(utils.load_ceval()["val"]) == 7


@pytest.mark.skipif(not SHARED_CEVAL.exists(), reason="the real C-Eval data (../shared/ceval-exam) is absent")
def test_reads_the_real_ceval_with_its_dev_explanations():
    docs = task_utils().load_ceval(str(SHARED_CEVAL))["val"]
    assert len(docs) == 1346 and len(set(docs["subject"])) == 52
    assert all(len(shots) == 5 for shots in docs["shots"])
