"""Prompt layouts shared by data generation and evaluation (kept free of torch, so data tools stay light)."""

CHOICES = "ABCD"


def ceval_question(row: dict) -> str:
    """A C-Eval row as a question whose next token should be the answer letter."""
    options = "\n".join(f"{c}. {row[c]}" for c in CHOICES)
    return f"{row['question']}\n{options}\n答案："
