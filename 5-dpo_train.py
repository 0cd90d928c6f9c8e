"""DPO: prefer the chosen answer over the rejected one, relative to a frozen reference model.

    python 5-dpo_train.py --ckpt out/full_sft_512.safetensors --data_path dataset/dpo_data.jsonl --out_dir out [--beta 0.1]
The reference is a frozen copy of --ckpt; with --lora_rank N the policy is a LoRA adapter and the reference is
the same model with the adapter switched off. Result: out/dpo_{dim}.safetensors (with LoRA: out/dpo_{dim}/ and
out/dpo_{dim}_merged.safetensors).
"""
import argparse

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing to a user

from model.errors import run_script
from model.stages import add_lora_args, dpo_task
from model.trainer import add_train_args, train_stage


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser, data_path="dataset/dpo_data.jsonl", learning_rate=1e-5, batch_size=8)
    parser.add_argument("--ckpt", default="out/full_sft_512.safetensors", help="the SFT model to align")
    parser.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference")
    parser.add_argument("--label_smoothing", type=float, default=0.0, help="assumed share of flipped preferences")
    parser.add_argument("--rpo_alpha", type=float, default=0.0,
                        help="weight of an NLL term on the chosen answers (RPO; 0: plain DPO)")
    parser.add_argument("--max_prompt_length", type=int, default=256)
    add_lora_args(parser)
    return parser


def main(argv=None):
    return train_stage(build_parser(), dpo_task, argv)


if __name__ == "__main__":
    run_script(main)
