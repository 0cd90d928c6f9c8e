"""lm-eval glue for ceval_local.yaml: eval_ceval.py's reader and prompt, so both score the same questions alike."""
import os
import sys
from pathlib import Path

# lm-eval loads this file by its path; the repo root on sys.path lets it reuse the project's code from any cwd.
ROOT = str(Path(__file__).resolve().parents[3])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lm_eval.api.samplers import ContextSampler  # noqa: E402

from model.errors import InputError  # noqa: E402
from model.evaluation import read_ceval_split  # noqa: E402
from model.prompts import CHOICES, ceval_question  # noqa: E402

COLUMNS = ("id", "question", *CHOICES, "answer")


def _row(subject: str, row: dict) -> dict:
    # Only the columns the prompt uses: dev's extra `explanation` would give the two splits different schemas.
    return {"subject": subject, **{k: row[k] for k in COLUMNS}}


def load_ceval(data_dir: str | None = None, **_metadata):
    """{"val": every val question of every subject}, as strings (a CSV loader would read "12" as a number), each
    with its subject's dev rows as `shots`. The folder: --metadata '{"data_dir": ...}', else $CEVAL_DIR."""
    import datasets

    data_dir = data_dir or os.environ.get("CEVAL_DIR")
    if not data_dir:
        raise InputError("ceval_local needs a C-Eval folder: --metadata '{\"data_dir\": \"DIR\"}' or CEVAL_DIR=DIR")
    dev = read_ceval_split(data_dir, "dev") if (Path(data_dir) / "dev").is_dir() else {}
    docs = []
    for subject, rows in read_ceval_split(data_dir, "val").items():
        shots = [_row(subject, r) for r in dev.get(subject, [])]
        for r in rows:
            if r["answer"].strip() not in CHOICES:
                raise InputError(f"{data_dir}/val/{subject}_val.csv: id {r['id']} has answer {r['answer']!r}, "
                                 f"not one of {', '.join(CHOICES)}")
            docs.append({**_row(subject, r), "shots": shots})
    string = datasets.Value("string")
    row = {"subject": string, **{k: string for k in COLUMNS}}
    features = datasets.Features({**row, "shots": datasets.List(row)})
    return datasets.DatasetDict({"val": datasets.Dataset.from_list(docs, features=features)})


def doc_to_target(doc: dict) -> int:
    return CHOICES.index(doc["answer"].strip())


class SubjectShots(ContextSampler):
    """The first n dev rows of the question's own subject, in file order, as eval_ceval.py --shots n takes them."""

    def sample(self, n: int, eval_doc=None, df=None, **kwargs):
        if n and not eval_doc["shots"]:
            raise InputError(f"{n}-shot needs dev/{eval_doc['subject']}_dev.csv beside val/")
        return eval_doc["shots"][:n]
