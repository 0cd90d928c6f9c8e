"""White-box distillation: a student learns the answers of SFT data and, on the same tokens, the full next-token
distribution of a frozen teacher: alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T).

    python 7-distill.py --teacher out/full_sft_768.safetensors --init_from out/pretrain_512.safetensors \\
        --data_path dataset/sft_data.jsonl [--alpha 0.5 --temperature 2]
The teacher is any model we load (dense or MoE, another size) with the student's vocabulary; the student starts
from --init_from or is a new model of --preset / the dims given. Result: out/distill_{dim}.safetensors.
"""
import argparse

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing to a user

from model.errors import run_script
from model.stages import distill_task
from model.trainer import add_model_args, add_train_args, train_stage


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser, data_path="dataset/sft_data.jsonl", learning_rate=5e-5, batch_size=16)
    add_model_args(parser)
    parser.add_argument("--teacher", required=True, help="the frozen teacher (anything load_model takes)")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the hard-label loss (1: plain SFT)")
    parser.add_argument("--temperature", type=float, default=2.0, help="softens both distributions in the KL")
    parser.add_argument("--freeze_embeddings", action="store_true", help="keep the student's embedding matrix fixed")
    return parser


def main(argv=None):
    return train_stage(build_parser(), distill_task, argv)


if __name__ == "__main__":
    run_script(main)
