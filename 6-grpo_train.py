"""GRPO: reinforcement learning from verifiable rewards. For every prompt the policy samples a group of answers,
a reward function (a program, not a model) scores them, and answers better than their group's mean become likelier.

    python 6-grpo_train.py --ckpt out/full_sft_512.safetensors --data_path dataset/grpo_prompts.jsonl --reward exact_match
Prompts: jsonl rows {"messages": [...]} or {"prompt": "..."}, with the fields the reward reads (e.g. "answer").
Rewards: exact_match, demo_math, demo_fact, or module:function for your own, called as
function(completion, **row fields) -> float. --loss grpo | dr_grpo | cispo (see model/rl.py). Result: out/grpo_{dim}.safetensors (with LoRA:
out/grpo_{dim}/ and out/grpo_{dim}_merged.safetensors).
"""
import argparse

from model import quiet_third_party

quiet_third_party()  # before torch and transformers load: their import-time notices mean nothing to a user

from model.errors import run_script
from model.rl import LOSSES
from model.stages import add_lora_args, grpo_task
from model.trainer import add_train_args, train_stage


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser, data_path="dataset/grpo_prompts.jsonl", learning_rate=1e-6, batch_size=4,
                   log_interval=1)
    parser.add_argument("--ckpt", default="out/full_sft_512.safetensors", help="the model to train (an SFT model)")
    parser.add_argument("--reward", default="exact_match", help="exact_match | demo_math | demo_fact | module:function")
    parser.add_argument("--loss", default="grpo", choices=LOSSES)
    parser.add_argument("--num_generations", type=int, default=8, help="completions sampled per prompt (G)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--max_prompt_length", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    parser.add_argument("--epsilon", type=float, default=0.2, help="the ratio is clipped to [1 - eps, 1 + eps_high]")
    parser.add_argument("--epsilon_high", type=float, default=None, help="default: --epsilon (CISPO: its only bound)")
    parser.add_argument("--beta", type=float, default=0.0, help="weight of the KL penalty to the reference")
    parser.add_argument("--iterations", type=int, default=1, help="optimizer steps per batch of rollouts")
    add_lora_args(parser)
    return parser


def main(argv=None):
    return train_stage(build_parser(), grpo_task, argv)


if __name__ == "__main__":
    run_script(main)
