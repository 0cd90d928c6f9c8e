"""Pretraining: next-token prediction on tokenized text shards.

    python 1-pretrain.py --data_path dataset/pretrain_data --out_dir out
    torchrun --nproc_per_node N 1-pretrain.py ...        (DDP; add --strategy fsdp for FSDP2)
    deepspeed --num_gpus N 1-pretrain.py --deepspeed ds_config.json ...
Result: out/pretrain_{dim}[_moe].safetensors; run folder out/pretrain_{dim}[_moe]/ (checkpoints, metrics, loss.png).
"""
import argparse

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing to a user

from model.errors import run_script
from model.stages import pretrain_task
from model.trainer import add_model_args, add_train_args, train_stage


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser, data_path="dataset/pretrain_data", learning_rate=5e-4, batch_size=32, warmup_iters=100)
    add_model_args(parser)
    return parser


def main(argv=None):
    return train_stage(build_parser(), pretrain_task, argv)


if __name__ == "__main__":
    run_script(main)
