"""Supervised fine-tuning: chat turns, loss on the assistant's answers only.

    python 3-full_sft.py --data_path dataset/sft_data.jsonl --out_dir out   (starts from out/pretrain_{dim}...)
    torchrun --nproc_per_node N 3-full_sft.py ...
Result: out/full_sft_{dim}[_moe].safetensors.
"""
import argparse

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing to a user

from model.errors import run_script
from model.stages import sft_task
from model.trainer import add_model_args, add_train_args, train_stage


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser, data_path="dataset/sft_data.jsonl", learning_rate=5e-5, batch_size=16, epochs=1)
    add_model_args(parser)
    parser.add_argument("--freeze_embeddings", action="store_true",
                        help="keep the (tied) embedding matrix fixed; helps small SFT sets keep pretraining knowledge")
    parser.add_argument("--pretrain_mix", default=None, metavar="DIR",
                        help="tokenized pretraining data to replay among the chat rows (keeps what pretraining taught)")
    parser.add_argument("--pretrain_mix_ratio", type=float, default=0.3, help="share of the rows that are replayed text")
    parser.add_argument("--pretrain_mix_length", type=int, default=64, help="tokens per replayed window")
    return parser


def main(argv=None):
    return train_stage(build_parser(), sft_task, argv)


if __name__ == "__main__":
    run_script(main)
