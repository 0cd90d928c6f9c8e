"""What each training stage trains on, what it optimises and where its result goes.

The numbered scripts parse their flags and call one of the `*_task` builders here; `Trainer` does the rest.
Outputs are named as upstream: out/pretrain_512.safetensors, out/full_sft_512_moe.safetensors, ...
"""
import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from .checkpoint import save_weights
from .dataset import DPODataset, PretrainDataset, SFTDataset, pad_collate, resolve_index
from .errors import InputError
from .model import next_token_targets
from .trainer import Task, model_config_from_args


def output_name(stage: str, config) -> str:
    return f"{stage}_{config.dim}" + ("_moe" if config.use_moe else "")


def lm_loss(model, batch):
    """Next-token cross-entropy on the labelled tokens (+ the MoE balance loss, which the model adds)."""
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    return out.loss, ({"aux_loss": out.aux_loss.detach()} if out.aux_loss is not None else {})


def tokenizer_metadata(tokenizer_dir) -> dict:
    """Recorded in the weights file, so chat scripts find the tokenizer a model was trained with."""
    from .tokenizer import DEFAULT_TOKENIZER_DIR

    return {"tokenizer": str(Path(tokenizer_dir or DEFAULT_TOKENIZER_DIR).resolve())}


def safetensors_saver(name: str, metadata: dict | None = None):
    def save(model, state, out_dir: Path) -> Path:
        path = Path(out_dir) / f"{name}.safetensors"
        save_weights(path, state, model.config, metadata)
        return path
    return save


def hold_out(dataset, every: int = 50):
    """Every n-th row for validation (deterministic), the rest for training."""
    n = len(dataset)
    val = list(range(every - 1, n, every)) if n >= 2 * every else []
    taken = set(val)
    return Subset(dataset, [i for i in range(n) if i not in taken]), (Subset(dataset, val) if val else None)


def load_tokenizer_for(args):
    from .tokenizer import load_tokenizer

    return load_tokenizer(args.tokenizer)


def init_weights_from(args, default_stage: str, config_hint):
    """The starting model of a fine-tuning stage: --init_from, else the previous stage's default output."""
    from .loading import load_model

    path = args.init_from or str(Path(args.out_dir) / f"{output_name(default_stage, config_hint)}.safetensors")
    if not Path(path).exists() and not Path(path + ".safetensors").exists() and not Path(path).is_dir():
        raise FileNotFoundError(f"no starting weights at {path}: run the {default_stage} stage first or pass --init_from")
    model = load_model(path)
    if config_hint.max_seq_len > model.config.max_seq_len:  # trained on longer rows now: the config says so
        model.config.max_seq_len = config_hint.max_seq_len
    if args.dropout is not None:  # the modules were built with the checkpoint's rate
        set_dropout(model, args.dropout)
    return model.train(), path


def set_dropout(model, rate: float):
    from .model import Attention

    model.config.dropout = rate
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = rate
        elif isinstance(m, Attention):
            m.dropout = rate


# --------------------------------------------------------------------------------------------------- stages
def seed_everything(seed: int):
    """Fresh weights (a new model, LoRA matrices) come out the same in every process and every run."""
    import random

    random.seed(seed)
    torch.manual_seed(seed)


def pretrain_task(args):
    from .model import MiniMindForCausalLM

    seed_everything(args.seed)
    config = model_config_from_args(args, max_seq_len=args.max_seq_len)
    train = PretrainDataset(args.data_path, args.max_seq_len, "train")
    if train.vocab_size and train.vocab_size > config.vocab_size:
        raise InputError(f"the data was tokenized with a vocabulary of {train.vocab_size}; the model has "
                         f"{config.vocab_size} (set --vocab_size)")
    if args.val_path:  # asked for: a bad one is an error
        val = PretrainDataset(args.val_path, args.max_seq_len, "val")
    else:  # the data's own held-out split; without one, no validation
        val = PretrainDataset(args.data_path, args.max_seq_len, "val", allow_empty=True)
        val = val if len(val) else None
    if args.init_from:
        from .loading import load_model

        model = load_model(args.init_from).train()
        config = model.config
    else:
        model = MiniMindForCausalLM(config)
    name = output_name("pretrain", config)
    index_tokenizer = json.loads(resolve_index(args.data_path).read_text()).get("tokenizer")
    meta = tokenizer_metadata(args.tokenizer or index_tokenizer)
    return model, Task(name, train, lm_loss, safetensors_saver(name, meta), val_data=val)


def chat_data(args, tokenizer):
    """(train, validation, collate) of SFT data: --val_path, else every 50th row held out."""
    data = SFTDataset(args.data_path, tokenizer, args.max_seq_len)
    train, val = hold_out(data) if not args.val_path else (data, SFTDataset(args.val_path, tokenizer, args.max_seq_len))
    return train, val, partial(pad_collate, pad_id=tokenizer.pad_token_id or 0)


def sft_task(args):
    seed_everything(args.seed)
    hint = model_config_from_args(args, max_seq_len=args.max_seq_len)
    model, source = init_weights_from(args, "pretrain", hint)
    print(f"initial weights: {source}")
    if args.freeze_embeddings:
        # The tied embedding/output matrix holds what pretraining learned about every word; freezing it
        # keeps small-data SFT from overwriting facts it never shows (see the demo corpus notes).
        model.get_input_embeddings().weight.requires_grad_(False)
    train, val, collate = chat_data(args, load_tokenizer_for(args))
    if args.pretrain_mix:
        from .dataset import Mixture

        windows = PretrainDataset(args.pretrain_mix, args.pretrain_mix_length, "train")
        train = Mixture(train, windows, args.pretrain_mix_ratio)
        print(f"pretraining mix: {train.extra} windows of {args.pretrain_mix_length} tokens among {len(train.chat)} "
              f"chat rows")
    name = output_name("full_sft", model.config)
    save = safetensors_saver(name, tokenizer_metadata(args.tokenizer))
    return model, Task(name, train, lm_loss, save, val_data=val, collate=collate, plot_note=SFT_NOTE)


# Why an SFT run's training loss ends below its validation loss: the training rows come round every epoch.
SFT_NOTE = "train: batches of rows seen again every epoch; validation: held-out rows, never trained on"

LORA_TARGETS = "wq,wk,wv,wo,w1,w2,w3"  # attention and FFN projections


def add_lora_args(parser, rank: int = 0):
    """--lora_rank and --lora_alpha, as the stages that can train an adapter instead of every weight take them."""
    parser.add_argument("--lora_rank", type=int, default=rank,
                        help="train a LoRA adapter of this rank instead of all weights" + (" (0: all weights)" if not rank else ""))
    parser.add_argument("--lora_alpha", type=float, default=16)


def add_lora(model, base_path: str, rank: int, alpha: float, dropout: float, targets: str):
    from peft import LoraConfig, get_peft_model

    model.name_or_path = str(base_path)  # peft records it as the adapter's base model
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets.split(","),
                        bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_path)
    return peft_model


def whole_adapter_model(model, state: dict):
    """A peft model on the CPU, built afresh and filled from `state`, the gathered state dict of `model`: under
    FSDP2 rank 0's live model holds only its shard, which peft would save (or merge) as if it were the model."""
    import copy

    from peft import get_peft_model
    from torch.distributed.fsdp import FSDPModule

    base = model.get_base_model()
    plain = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))
    whole = get_peft_model(plain(base.config), copy.deepcopy(model.peft_config["default"]))
    whole.load_state_dict(state)
    return whole


def adapter_saver(name: str, merge: bool, metadata: dict | None = None):
    """peft's adapter folder (adapter_config.json + adapter_model.safetensors); with merge, a full model too."""
    def save(model, state, out_dir: Path) -> Path:
        from .distributed import is_sharded

        if is_sharded(model):
            model = whole_adapter_model(model, state)
        folder = Path(out_dir) / name
        model.save_pretrained(str(folder))
        if merge:
            merged = model.merge_and_unload()
            save_weights(Path(out_dir) / f"{name}_merged.safetensors", merged.state_dict(), merged.config, metadata)
        return folder
    return save


def lora_task(args):
    from .loading import load_model

    seed_everything(args.seed)
    base = load_model(args.ckpt).train()
    model = add_lora(base, args.ckpt, args.lora_rank, args.lora_alpha, args.lora_dropout, args.target_modules)
    train, val, collate = chat_data(args, load_tokenizer_for(args))
    name = output_name("lora_sft", base.config)
    save = adapter_saver(name, args.merge, tokenizer_metadata(args.tokenizer))
    return model, Task(name, train, lm_loss, save, val_data=val, collate=collate, plot_note=SFT_NOTE)


# ------------------------------------------------------------------------------------------------------- DPO
def sequence_logps(model, input_ids, labels, with_counts: bool = False):
    """Sum of log p(token) over the labelled tokens of each row: (B,); with_counts: and how many there are, (B,)."""
    logits = model(input_ids=input_ids).logits.float()  # (B, T, V)
    targets = next_token_targets(labels)  # (B, T)
    mask = targets != -100
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    sums = (logps * mask).sum(dim=-1)
    return (sums, mask.sum(dim=-1)) if with_counts else sums


def dpo_objective(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * [(pi_c - ref_c) - (pi_r - ref_r)]).

    With label_smoothing e the preference is trusted with probability 1 - e (conservative DPO).
    Returns the mean loss and the implicit rewards beta * (pi - ref) of chosen and rejected answers.
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses.mean(), chosen_reward, rejected_reward


def dpo_collate(batch, pad_id=0):
    """Chosen rows first, then rejected rows, all padded to one width: a single forward scores both."""
    rows = [{"input_ids": b["chosen_input_ids"], "labels": b["chosen_labels"]} for b in batch]
    rows += [{"input_ids": b["rejected_input_ids"], "labels": b["rejected_labels"]} for b in batch]
    return pad_collate(rows, pad_id)


def reference_logps(model, reference, input_ids, labels):
    with torch.no_grad():
        if reference is None:  # LoRA: the base model with the adapter switched off is the reference
            with model.disable_adapter():
                return sequence_logps(model, input_ids, labels)
        return sequence_logps(reference, input_ids, labels)


def dpo_loss(beta, label_smoothing, rpo_alpha: float = 0.0):
    """DPO's loss on a dpo_collate batch; rpo_alpha > 0 adds that weight times the chosen answers' mean token
    NLL (RPO, Pang et al. 2024; trl's loss_type ["sigmoid", "sft"]), which keeps the chosen answers likely."""
    def loss(model, batch, reference=None):  # the trainer passes Task.frozen["reference"], placed with the model
        ids, labels = batch["input_ids"], batch["labels"]
        policy, counts = sequence_logps(model, ids, labels, with_counts=True)
        ref = reference_logps(getattr(model, "module", model), reference, ids, labels)
        (pc, pr), (rc, rr) = policy.chunk(2), ref.chunk(2)
        value, chosen_reward, rejected_reward = dpo_objective(pc, pr, rc, rr, beta, label_smoothing)
        nll = -(pc / counts.chunk(2)[0].clamp(min=1)).mean()
        if rpo_alpha:
            value = value + rpo_alpha * nll
        return value, {"reward_accuracy": (chosen_reward > rejected_reward).float().mean().detach(),
                       "chosen_nll": nll.detach(),
                       "chosen_reward": chosen_reward.mean().detach(),
                       "rejected_reward": rejected_reward.mean().detach(),
                       "reward_margin": (chosen_reward - rejected_reward).mean().detach()}
    return loss


def dpo_task(args):
    import copy

    from .loading import load_model

    seed_everything(args.seed)
    model = load_model(args.ckpt).train()
    config = model.config
    if args.lora_rank > 0:
        model, reference = add_lora(model, args.ckpt, args.lora_rank, args.lora_alpha, 0.0, LORA_TARGETS), None
    else:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    tokenizer = load_tokenizer_for(args)
    data = DPODataset(args.data_path, tokenizer, args.max_seq_len, args.max_prompt_length)
    train, val = hold_out(data) if not args.val_path else (
        data, DPODataset(args.val_path, tokenizer, args.max_seq_len, args.max_prompt_length))
    name = output_name("dpo", config)
    meta = tokenizer_metadata(args.tokenizer)
    save = adapter_saver(name, True, meta) if reference is None else safetensors_saver(name, meta)
    return model, Task(name, train, dpo_loss(args.beta, args.label_smoothing, args.rpo_alpha), save, val_data=val,
                       collate=partial(dpo_collate, pad_id=tokenizer.pad_token_id or 0),
                       frozen={} if reference is None else {"reference": reference},
                       plot_note="reward accuracy: how often the chosen answer gets the larger implicit reward",
                       plot_metric="reward_accuracy")


# ------------------------------------------------------------------------------------------------------ GRPO
def unwrap(model):
    """The model inside DDP / DeepSpeed (`.module`) and torch.compile (`._orig_mod`) wrappers: what generation
    runs on (a decode step through DDP would wait for a gradient all-reduce that never comes)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or not isinstance(inner, torch.nn.Module):
            return model
        model = inner


class GRPOLoss:
    """GRPO's loss for one batch of prompts: sample G completions of each with the current policy (our batched
    generator), score them with the reward function, and apply model/rl.py's policy_loss.

    With --iterations k every batch comes k times in a row (Task.repeat): the first time samples, keeps the rollout
    and its log-probs (then the sampling policy's, the `old` of the ratio), the next k-1 update from the same
    rollout. The kept rollouts are the task's state, saved with each checkpoint, so a resumed run is the same run.
    In validation (no gradient) it answers each prompt greedily once and reports the reward.
    """

    def __init__(self, prompts, val_prompts, tokenizer, reward, args, per_step_batches: int):
        from .rl import load_reward

        self.prompts, self.val_prompts, self.tokenizer = prompts, val_prompts, tokenizer
        self.reward = load_reward(reward)
        self.args, self.per_step = args, per_step_batches
        self.kept = {}  # prompt rows of a batch -> its rollout, while its iterations last
        self.tokens = 0  # prompt + completion tokens of the last rollout, for the trainer's tokens/s
        self.rollouts = 0  # rollouts sampled so far: part of every completion's seed
        self.replica = None  # under FSDP2, the whole copy of the policy that rollouts sample from

    # -- the trainer's hooks
    def state(self) -> dict:
        return {"kept": [(list(k), v) for k, v in self.kept.items()], "rollouts": self.rollouts}

    def load_state(self, state: dict):
        self.kept = {tuple(k): v for k, v in state["kept"]}
        self.rollouts = state.get("rollouts", 0)

    def count_tokens(self, batch) -> int:
        return self.tokens

    # -- one batch
    def __call__(self, model, batch, reference=None):
        rows, prompts = batch["rows"], batch["prompts"]
        if not torch.is_grad_enabled():
            return self.validate(model, prompts, rows)
        key = tuple(rows)
        rollout = self.kept.get(key)
        if rollout is None:
            if len(self.kept) >= self.per_step:  # a new optimizer step's batches: the previous ones are done
                self.kept.clear()
            rollout = self.rollout(model, prompts, rows, reference)
        ids, mask = rollout["ids"].to(batch["row"].device), rollout["mask"].to(batch["row"].device)
        logps = self.token_logps(model, ids)
        if "old" not in rollout:  # the first pass: the policy that sampled is this one
            rollout["old"] = logps.detach().cpu()
            if self.args.iterations > 1:
                self.kept[key] = rollout
        from .rl import policy_loss

        ref = rollout["ref"].to(ids.device) if rollout.get("ref") is not None else None
        loss, stats = policy_loss(logps, rollout["old"].to(ids.device), ref, rollout["advantages"].to(ids.device),
                                  mask, self.args.loss, self.args.epsilon, self.args.epsilon_high, self.args.beta,
                                  self.args.max_new_tokens)
        rewards = rollout["rewards"].to(ids.device)
        return loss, {"reward": rewards.mean(), "reward_std": rewards.std(unbiased=False),
                      "accuracy": (rewards >= 1).float().mean(), **stats,
                      "completion_length": mask.sum(1).float().mean()}

    def token_logps(self, model, ids):
        from .rl import token_logps

        return token_logps(model, ids, temperature=self.args.temperature)

    @torch.no_grad()
    def sample(self, model, prompts, per_prompt: int, temperature: float) -> list[list[int]]:
        """per_prompt completions of each prompt (consecutive), each ending at its </s> or at max_new_tokens."""
        from .generate import SamplingParams, generate_ids, row_generator

        from .distributed import gathered_copy, is_sharded

        policy = unwrap(model)
        if is_sharded(policy):  # FSDP2: generate on a whole copy of the weights (distributed.gathered_copy)
            policy = self.replica = gathered_copy(policy, self.replica)
        was_training = policy.training
        policy.eval()
        rows = [p for p in prompts for _ in range(per_prompt)]
        # The rollout draws from one stream seeded by (--seed, rank, rollout): what a run samples depends on nothing
        # else it did (validation, logging), a resumed run samples the same, and a step is one draw for every row.
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        stream = row_generator(hash((self.args.seed, rank, self.rollouts)), next(policy.parameters()).device)
        params = SamplingParams(max_new_tokens=self.args.max_new_tokens, temperature=temperature)
        eos = self.tokenizer.eos_token_id
        done, completions = [False] * len(rows), [[] for _ in rows]
        for tokens in generate_ids(policy, rows, params, eos_token_id=eos, generator=stream):
            for i, t in enumerate(tokens.tolist()):
                if not done[i]:
                    completions[i].append(t)
                    done[i] = t == eos
        policy.train(was_training)
        return completions

    def score(self, rows, completions, per_prompt: int, prompts=None) -> torch.Tensor:
        """The reward of each completion, given the fields of its prompt's row."""
        fields = {r: (prompts or self.prompts).row(r)["fields"] for r in set(rows)}
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        return torch.tensor([float(self.reward(t, **fields[rows[i // per_prompt]])) for i, t in enumerate(texts)])

    def pack(self, prompts, completions, per_prompt: int):
        """(ids, mask), (N, T) each: every sequence its prompt, then its completion, right-padded, so positions and
        causal attention of the real tokens are what they were when sampled; the mask marks the completion's."""
        seqs = [p + c for p, c in zip((p for p in prompts for _ in range(per_prompt)), completions)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, (s, c) in enumerate(zip(seqs, completions)):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, len(s) - len(c):len(s)] = 1
        return ids, mask

    def rollout(self, model, prompts, rows, reference):
        from .rl import group_advantages

        G = self.args.num_generations
        completions = self.sample(model, prompts, G, self.args.temperature)
        self.rollouts += 1
        rewards = self.score(rows, completions, G)
        advantages = group_advantages(rewards, G, scale=self.args.loss != "dr_grpo")
        ids, mask = self.pack(prompts, completions, G)
        self.tokens = G * sum(map(len, prompts)) + sum(map(len, completions))
        ref = None
        if self.args.beta:
            device = next(unwrap(model).parameters()).device
            with torch.no_grad():
                if reference is None:  # LoRA: the base model with the adapter switched off
                    with unwrap(model).disable_adapter():
                        ref = self.token_logps(unwrap(model), ids.to(device)).cpu()
                else:
                    ref = self.token_logps(reference, ids.to(device)).cpu()
        return {"ids": ids, "mask": mask, "rewards": rewards, "advantages": advantages, "ref": ref}

    def validate(self, model, prompts, rows):
        completions = self.sample(model, prompts, 1, 0.0)
        rewards = self.score(rows, completions, 1, self.val_prompts)
        device = next(unwrap(model).parameters()).device
        return -rewards.mean().to(device), {"reward": rewards.mean().to(device),
                                            "accuracy": (rewards >= 1).float().mean().to(device)}


def grpo_task(args):
    """GRPO from an SFT model: --data_path prompts (jsonl: messages or prompt, with the fields the --reward reads);
    the reference for the KL penalty is a frozen copy (--beta > 0), or with LoRA the model without its adapter."""
    import copy

    from .dataset import PromptDataset, prompt_collate
    from .loading import load_model

    if args.num_generations < 2:
        raise InputError("--num_generations must be at least 2: advantages compare completions of one prompt")
    seed_everything(args.seed)
    model = load_model(args.ckpt).train()
    config = model.config
    reference = None
    if args.lora_rank > 0:
        model = add_lora(model, args.ckpt, args.lora_rank, args.lora_alpha, 0.0, LORA_TARGETS)
    elif args.beta:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    tokenizer = load_tokenizer_for(args)
    train = PromptDataset(args.data_path, tokenizer, args.max_prompt_length)
    val = PromptDataset(args.val_path, tokenizer, args.max_prompt_length) if args.val_path else None
    loss = GRPOLoss(train, val, tokenizer, args.reward, args, per_step_batches=max(1, args.accumulation_steps))
    name = output_name("grpo", config)
    meta = tokenizer_metadata(args.tokenizer)
    save = adapter_saver(name, True, meta) if args.lora_rank > 0 else safetensors_saver(name, meta)
    return model, Task(name, train, loss, save, val_data=val, collate=partial(prompt_collate,
                                                                             pad_id=tokenizer.pad_token_id or 0),
                       count_tokens=loss.count_tokens, frozen={"reference": reference} if reference is not None else {},
                       repeat=args.iterations, state=loss.state, load_state=loss.load_state,
                       plot_note="the loss is about 0 by construction (advantages are centred); the reward rises",
                       plot_metric="reward")


# -------------------------------------------------------------------------------------------- distillation
def distill_loss(alpha: float, temperature: float):
    def loss(model, batch, teacher=None):
        from .rl import distillation_loss

        student = model(input_ids=batch["input_ids"]).logits
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["input_ids"]).logits
        return distillation_loss(student, teacher_logits, batch["labels"], alpha, temperature)
    return loss


def pretraining_data(path) -> bool:
    """Whether `path` is tokenized pretraining text (data_process.py pretrain's folder) rather than chat rows."""
    candidate = Path(path)
    return (candidate / "index.json").exists() or candidate.name == "index.json"


def distill_task(args):
    """White-box distillation: the student (--init_from, else a new model of the --preset / dims given) learns from
    the frozen --teacher's next-token distribution. On SFT data (upstream's mode) over the answer tokens; on a
    tokenized pretraining folder over every token of the text, which is where a student learns the facts."""
    from .loading import load_model
    from .model import MiniMindForCausalLM

    seed_everything(args.seed)
    teacher = load_model(args.teacher).eval().requires_grad_(False)
    hint = model_config_from_args(args, max_seq_len=args.max_seq_len)
    on_text = pretraining_data(args.data_path)
    stage = "pretrain" if on_text else "full_sft"
    student = init_weights_from(args, stage, hint)[0] if args.init_from else MiniMindForCausalLM(hint).train()
    if student.config.vocab_size != teacher.config.vocab_size:
        raise InputError(f"the teacher's vocabulary ({teacher.config.vocab_size}) is not the student's "
                         f"({student.config.vocab_size}): distillation compares their next-token distributions")
    if args.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
    if on_text:
        train = PretrainDataset(args.data_path, args.max_seq_len, "train")
        val = PretrainDataset(args.data_path, args.max_seq_len, "val", allow_empty=True)
        val, collate = (val if len(val) else None), None
    else:
        train, val, collate = chat_data(args, load_tokenizer_for(args))
    name = output_name("distill", student.config)
    save = safetensors_saver(name, tokenizer_metadata(args.tokenizer))
    return student, Task(name, train, distill_loss(args.alpha, args.temperature), save, val_data=val,
                         collate=collate, frozen={"teacher": teacher})
