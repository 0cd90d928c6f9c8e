"""LoRA fine-tuning with peft: only low-rank adapters on the projections train; the base stays frozen.

    python 4-lora_sft.py --ckpt out/full_sft_512.safetensors --data_path dataset/sft_data.jsonl --out_dir out [--merge]
Result: out/lora_sft_{dim}/ (peft adapter folder, loadable by every script's --ckpt); with --merge also
out/lora_sft_{dim}_merged.safetensors.
"""
import argparse

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing to a user

from model.errors import run_script
from model.stages import LORA_TARGETS, add_lora_args, lora_task
from model.trainer import add_train_args, train_stage


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser, data_path="dataset/sft_data.jsonl", learning_rate=1e-3, batch_size=16)
    parser.add_argument("--ckpt", default="out/full_sft_512.safetensors", help="base model (anything load_model takes)")
    add_lora_args(parser, rank=8)
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument("--target_modules", default=LORA_TARGETS, help="comma-separated module names")
    parser.add_argument("--merge", action="store_true", help="also write the adapter merged into a full model")
    return parser


def main(argv=None):
    return train_stage(build_parser(), lora_task, argv)


if __name__ == "__main__":
    run_script(main)
