"""Checkpoints: safetensors weights with their config, training state beside them, atomic and verified.

A training checkpoint is a folder `checkpoints/step_00000100/` holding `model.safetensors`, `train_state.pt`
(optimizer, scheduler, step, data position, RNG states of every rank) and `manifest.json` (sha256 of every file).
Every rank writes into one temporary folder (a DeepSpeed run adds its partitioned state under `deepspeed/`); rank 0
then writes the manifest and renames the folder into place, so a kill at any moment leaves either the whole
checkpoint or none; a folder whose files do not match their manifest is reported and skipped on resume.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import InputError
from .io import atomic_writer

EMBEDDINGS = "model.tok_embeddings.weight"  # tied to lm_head.weight


class CheckpointMismatch(InputError):
    """Weights that do not fit the model: names what is missing, unexpected or mis-shaped."""

    def __init__(self, missing, unexpected, mismatched, source=""):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"checkpoint {source} does not match the model:".replace("  ", " ")]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
        for key, want, got in mismatched[:10]:
            lines.append(f"  shape of {key}: model {tuple(want)}, checkpoint {tuple(got)}")
        super().__init__("\n".join(lines))


def upgrade_keys(state: dict) -> dict:
    """Upstream MiniMind v1's flat names (`tok_embeddings.weight`, `layers.0...`, `norm.weight`, `output.weight`),
    which our files used before the backbone/head split, as this model's (`model.tok_embeddings.weight`, ...,
    `lm_head.weight`); names already in the new layout pass unchanged."""
    if not any(k == "tok_embeddings.weight" or k.startswith("layers.") for k in state):
        return state
    renamed = {}
    for k, v in state.items():
        if k == "output.weight":
            k = "lm_head.weight"
        elif k.split(".")[0] in ("tok_embeddings", "layers", "norm"):
            k = "model." + k
        renamed[k] = v
    return renamed


def check_state(model: torch.nn.Module, state: dict, source: str = "") -> dict:
    """The state dict in this model's names, completed with tied weights, or CheckpointMismatch naming every
    difference."""
    own, state = model.state_dict(), upgrade_keys(state)
    if "lm_head.weight" in own and "lm_head.weight" not in state and EMBEDDINGS in state \
            and getattr(model.config, "tie_word_embeddings", False):
        state = {**state, "lm_head.weight": state[EMBEDDINGS]}
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = [(k, own[k].shape, state[k].shape) for k in sorted(own) if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointMismatch(missing, unexpected, mismatched, source)
    return state


def strict_load(model: torch.nn.Module, state: dict, source: str = ""):
    """load_state_dict(strict=True) with a report that names every difference, shapes included."""
    model.load_state_dict(check_state(model, state, source), strict=True)


def save_weights(path, state: dict, config=None, metadata: dict | None = None):
    """Atomic safetensors file; the model config rides along in the header so the file loads on its own."""
    # safetensors stores each tensor once: tied weights (output = embeddings) are kept as aliases.
    kept, aliases, seen = {}, {}, {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.device.type != "meta" else k
        if key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            kept[k] = v.detach().contiguous().cpu()
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in kept and EMBEDDINGS in kept \
            and torch.equal(kept["lm_head.weight"], kept[EMBEDDINGS]):
        del kept["lm_head.weight"]  # gathered shards of a tied matrix arrive as two equal tensors
        aliases["lm_head.weight"] = EMBEDDINGS
    state = kept
    meta = {"format": "pt", **(metadata or {})}
    if aliases:
        meta["aliases"] = json.dumps(aliases)
    if config is not None:
        meta["minimind_config"] = config.to_json_string(use_diff=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_weights(path) -> tuple[dict, dict]:
    """(state dict, header metadata) of a safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            state, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as e:
        raise InputError(f"{path} is not a readable safetensors file ({e})") from e
    for alias, original in json.loads(meta.get("aliases", "{}")).items():
        state[alias] = state[original]
    return state, meta


def sha256(path, block=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class CheckpointManager:
    def __init__(self, run_dir, keep: int = 3):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def staging(self, step: int) -> Path:
        """The temporary folder a checkpoint is written into: one name for every rank, which all write into it."""
        return self.dir / f".step_{step:08d}.tmp"

    @staticmethod
    def begin(tmp: Path):
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed run left
        tmp.mkdir(parents=True)

    @staticmethod
    def write(tmp: Path, model_state: dict, train_state: dict, config=None):
        save_weights(tmp / "model.safetensors", model_state, config)
        torch.save(train_state, tmp / "train_state.pt")

    def commit(self, step: int, tmp: Path) -> Path:
        """Once every rank's files are in: a manifest of all of them, then the rename that makes the checkpoint."""
        final = self.dir / f"step_{step:08d}"
        manifest = {"step": step, "files": {str(f.relative_to(tmp)): sha256(f) for f in sorted(tmp.rglob("*"))
                                            if f.is_file()}}
        with atomic_writer(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=2)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self.prune()
        return final

    def prune(self):
        """Keep the newest `keep` checkpoints; drop the temporary folders of killed runs (no rank is writing now)."""
        for old in self.list()[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in self.dir.glob(".step_*.tmp*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def list(self) -> list[Path]:
        if not self.dir.exists():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith("step_"))

    @staticmethod
    def verify(path: Path) -> str | None:
        """None if the checkpoint is whole, else what is wrong with it."""
        manifest = path / "manifest.json"
        if not manifest.exists():
            return "no manifest (half-written?)"
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError):
            return "unreadable manifest"
        for name, digest in files.items():
            if not (path / name).exists():
                return f"{name} is missing"
            if sha256(path / name) != digest:
                return f"{name} does not match its checksum"
        return None

    def latest_valid(self, log=print) -> Path | None:
        for path in reversed(self.list()):
            problem = self.verify(path)
            if problem is None:
                return path
            log(f"skipping damaged checkpoint {path}: {problem}")
        return None

    @staticmethod
    def load(path: Path) -> tuple[dict, dict]:
        problem = CheckpointManager.verify(Path(path))
        if problem:
            raise InputError(f"checkpoint {path} is damaged: {problem}")
        state, _ = read_weights(Path(path) / "model.safetensors")
        train_state = torch.load(Path(path) / "train_state.pt", weights_only=True, map_location="cpu")
        return state, train_state
