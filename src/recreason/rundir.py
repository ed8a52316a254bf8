"""Run directories: the only code that knows how a trained run is laid out on disk.

``recreason train`` writes a run through these functions and every later stage (inference,
evaluation, serving, export) reads it through :class:`Run`, so checkpoint formats live in one place.

Layout::

    run.json          model, method, dataset, split seed and prompt settings
    config.yaml       the full resolved configuration
    best/             best checkpoint: a peft adapter (adapter_model.safetensors), our bottleneck adapter
                      (adapter.safetensors + adapter.json) or a full model (model.safetensors), plus
                      personal.safetensors/.json when the run learned user/item vectors or heads
    last/             resumable state: trainable.safetensors + state.pt (optimizer, scheduler, RNG, position)
    summary.json      training outcome: steps, best validation loss, wall time
    train_log.jsonl   one line per validation pass
    tensorboard/      TensorBoard scalars
    snapshots/step-N/ the weights at train.snapshot_steps (benchmarks/learning_curve.py)
    ranker/           the ranking stage (ranker.json + ranker.npz)
    generated/        texts per split and system (SPLIT-SYSTEM.jsonl + .meta.json) and the generic table
    eval/             evaluation reports (SPLIT.json, SPLIT.md, report.html)
    candidates/       decoded candidates per split and decoding settings (SPLIT-DIGEST.jsonl + .meta.json)
    tuning/           trials.json: every weight setting `recreason tune` scored
    tuned.yaml        the selection weights `recreason tune` chose, a config file to layer
    serving.db        the SQLite store `recreason serve` uses when no --store is given

:class:`RunPaths` names every one of these; no other module joins path parts of a run (a test holds it).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from recreason.config import MERGEABLE, PromptConfig, TrainConfig
from recreason.data.dataset import Dataset
from recreason.errors import CheckpointMismatch, NotARun

PEFT_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS = "adapter.safetensors"  # our bottleneck adapter
FULL_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class RunPaths:
    """Where each part of a run lives, relative to the run directory ``root`` (which need not exist yet:
    ``recreason train`` writes through these names too)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def info(self) -> Path:
        return self.root / "run.json"

    @property
    def distill(self) -> Path:
        """`recreason distill`'s record of a distilled run: :attr:`distill_targets` and :attr:`distill_summary`."""
        return self.root / "distill"

    @property
    def distill_targets(self) -> Path:
        """Per training record: the chosen, rejected and greedy candidates and the review."""
        return self.distill / "targets.jsonl"

    @property
    def distill_summary(self) -> Path:
        """What the distillation decoded, chose and trained, and its cost in seconds."""
        return self.distill / "summary.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def checkpoint(self, name: str = "best") -> Path:
        """A checkpoint folder: ``best`` or a snapshot's name (:meth:`snapshot_name`)."""
        return self.root / name

    @property
    def best(self) -> Path:
        return self.checkpoint("best")

    @property
    def last(self) -> Path:
        return self.root / "last"

    @staticmethod
    def snapshot_name(step: int) -> str:
        """The checkpoint name of the weights kept at ``step`` (a ``checkpoint=`` for :meth:`Run.load_model`)."""
        return f"snapshots/step-{step}"

    def snapshots(self) -> list[tuple[int, str]]:
        """(step, checkpoint name) of every kept snapshot, by step."""
        folder = self.root / "snapshots"
        found = (p.name for p in folder.glob("step-*") if p.name[5:].isdigit()) if folder.exists() else ()
        return sorted((int(name[5:]), f"snapshots/{name}") for name in found)

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def ranker(self) -> Path:
        return self.root / "ranker"

    def generated(self, split: str, system: str) -> Path:
        return self.root / "generated" / f"{split}-{system}.jsonl"

    @property
    def generic_table(self) -> Path:
        return self.root / "generated" / "generic-table.json"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def report_dir(self, name: str) -> Path:
        """A named report folder beside the default one (eval/NAME), for benchmarks' own evaluations."""
        return self.eval / name

    def candidates(self, split: str, digest: str) -> Path:
        return self.root / "candidates" / f"{split}-{digest}.jsonl"

    @property
    def trials(self) -> Path:
        return self.root / "tuning" / "trials.json"

    @property
    def tuned_config(self) -> Path:
        return self.root / "tuned.yaml"

    @property
    def store(self) -> Path:
        return self.root / "serving.db"


def report_files(out_dir: str | Path, split: str) -> dict[str, Path]:
    """The files ``recreason evaluate`` writes into its report folder (RUN/eval unless ``--out``)."""
    out = Path(out_dir)
    return {"json": out / f"{split}.json", "md": out / f"{split}.md",
            "html": out / ("report.html" if split == "test" else f"report-{split}.html")}


def read_json(path: Path, what: str = "file") -> Any:
    """Parse a JSON artifact; damage becomes one message naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotARun(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointMismatch(f"{path} is damaged ({what} is not valid JSON: {exc}); "
                                 "retrain or restore the run directory") from None


def checkpoint_kind(folder: Path) -> str:
    """What a checkpoint folder holds, read from its files: ``peft``, ``adapter`` or ``full``."""
    if (folder / ADAPTER_WEIGHTS).exists():
        return "adapter"
    if (folder / PEFT_WEIGHTS).exists():
        return "peft"
    if (folder / FULL_WEIGHTS).exists() or any(folder.glob("model-*.safetensors")):
        return "full"
    raise CheckpointMismatch(f"{folder} holds no model or adapter weights ({PEFT_WEIGHTS}, {ADAPTER_WEIGHTS} or "
                             f"{FULL_WEIGHTS}); retrain the run")


def checkpoint_stamp(run: "Run", checkpoint: str = "best") -> str:
    """Names, sizes and modification times of a checkpoint's files: changes whenever the run is retrained."""
    best = run.paths.checkpoint(checkpoint)
    files = sorted(f for f in best.rglob("*") if f.is_file()) if best.exists() else []
    return ";".join(f"{f.relative_to(run.dir)}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def write_run_info(run_dir: Path, dataset_dir: str, base_path: str, cfg: TrainConfig, prompt: PromptConfig) -> None:
    info = {
        "model": cfg.model,
        "base_model_path": base_path,
        "method": cfg.method,
        "dataset": str(Path(dataset_dir).resolve()),
        "split_seed": cfg.split_seed,
        "target": cfg.target,
        "train": asdict(cfg),
        "prompt": asdict(prompt),
    }
    RunPaths(run_dir).info.write_text(json.dumps(info, indent=2) + "\n")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` over ``final`` so that a reader sees the old folder or the new one, never a mix."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def save_best(model, run_dir: Path, state: dict | None = None, folder: str = "best") -> None:
    """Write RUN/best (or another checkpoint folder of the same format, such as ``snapshots/step-100``)
    atomically. ``state``: the trainable weights by name, when they were gathered from shards."""
    from recreason.models.methods import save_adapter

    final = RunPaths(run_dir).checkpoint(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    lm_state = None if state is None else {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
    if hasattr(model.lm, "recreason_adapter"):
        save_adapter(model.lm, tmp, lm_state)
    elif lm_state is not None:
        model.lm.save_pretrained(tmp, safe_serialization=True, state_dict=lm_state)
    else:
        model.lm.save_pretrained(tmp, safe_serialization=True)
    if model.uses_ids:
        model.save_personal(tmp, state)
    _replace_dir(tmp, final)


def load_best_into(model, run_dir: Path) -> None:
    """Load RUN/best (personal weights and adapter or model weights) back into a model being trained."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    best = RunPaths(run_dir).best
    if model.uses_ids and (best / "personal.safetensors").exists():
        model.load_state_dict(_load_safetensors(best / "personal.safetensors", load_file), strict=False)
    kind = checkpoint_kind(best)
    if kind == "adapter":
        model.lm.load_state_dict(_load_safetensors(best / ADAPTER_WEIGHTS, load_file), strict=False)
    elif kind == "peft":
        set_peft_model_state_dict(model.lm, _load_safetensors(best / PEFT_WEIGHTS, load_file))
    else:
        model.lm.load_state_dict(_load_safetensors(best / FULL_WEIGHTS, load_file), strict=False)


def _load_safetensors(path: Path, load_file):
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise NotARun(f"{path} is missing; retrain the run") from None
    except Exception as exc:  # safetensors raises its own error type for a bad header or a short file
        raise CheckpointMismatch(f"{path} is damaged ({exc}); retrain the run or restore the file") from None


def save_checkpoint(folder: Path, weights: dict, optimizer_state: dict, scheduler, rng: random.Random,
                    state: dict) -> None:
    """Write the resumable state atomically: a temporary folder renamed over the old one."""
    import torch
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                "python_rng": rng.getstate(), "state": state}, tmp / "state.pt")
    _replace_dir(tmp, folder)


def load_checkpoint(folder: Path, parameter_names: set[str]) -> tuple[dict, dict]:
    """(trainable weights, the rest of the saved state) from a RUN/last folder, checked against the model."""
    import torch
    from safetensors.torch import load_file

    weights = _load_safetensors(folder / "trainable.safetensors", load_file)
    unknown = set(weights) - parameter_names
    if unknown:
        raise CheckpointMismatch(f"{folder} does not match this model and method (unexpected {sorted(unknown)[:3]})")
    path = folder / "state.pt"
    if not path.exists():
        raise NotARun(f"{path} is missing, so the run cannot resume; restore it or train again without --resume")
    try:
        saved = torch.load(path, weights_only=True)
    except Exception as exc:
        raise CheckpointMismatch(f"{path} is damaged ({type(exc).__name__}); restore it or train again") from None
    return weights, saved


class Run:
    """A trained run loaded from disk."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.paths = RunPaths(self.dir)
        info_path = self.paths.info
        if not info_path.exists():
            raise NotARun(f"{self.dir} is not a training run (no run.json); run 'recreason train' first")
        self.info = read_json(info_path, "run.json")
        self.train_config = TrainConfig(**self.info["train"])
        self.prompt_config = PromptConfig(**self.info["prompt"])

    @property
    def method(self) -> str:
        return self.info["method"]

    def fingerprint(self, checkpoint: str = "best") -> str:
        """A digest of what the run's reasons depend on: run.json and every byte of the checkpoint's files (not
        their paths or times), so the same run copied to another machine has the same fingerprint and a
        retrained one another (stored reasons are matched to the run that wrote them by it)."""
        import hashlib

        digest = hashlib.sha256(self.paths.info.read_bytes())
        folder = self.paths.checkpoint(checkpoint)
        for f in sorted(f for f in folder.rglob("*") if f.is_file()) if folder.exists() else []:
            digest.update(str(f.relative_to(folder)).encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()[:16]

    @property
    def split_seed(self) -> int:
        return self.info["split_seed"]

    @property
    def prompt_mode(self) -> str:
        return self.train_config.prompt_mode

    def dataset(self) -> Dataset:
        return Dataset(self.info["dataset"])

    def load_model(self, dtype: str = "float32", device: str = "cpu", merge: bool = True, checkpoint: str = "best"):
        """(RecReasonModel, tokenizer) with a checkpoint folder applied (RUN/best by default, or e.g.
        ``snapshots/step-100``); LoRA is merged for fast inference."""
        import torch
        from safetensors.torch import load_file

        from recreason.models.methods import load_adapter, uses_position_ids
        from recreason.models.personalized import RecReasonModel
        from recreason.models.registry import attention_for, load_model, load_tokenizer

        best = self.paths.checkpoint(checkpoint)
        if not best.exists():
            raise NotARun(f"{self.dir} has no {checkpoint} checkpoint" +
                          ("; training did not finish a validation pass" if checkpoint == "best" else ""))
        kind = checkpoint_kind(best)
        if kind == "full":
            from transformers import AutoModelForCausalLM

            torch_dtype = torch.bfloat16 if dtype in ("bf16", "bfloat16") else torch.float32
            read_json(best / "config.json", "the model config")
            try:
                lm = AutoModelForCausalLM.from_pretrained(best, dtype=torch_dtype,
                                                          attn_implementation=attention_for(device)).to(device)
            except OSError as exc:
                raise CheckpointMismatch(f"{best} could not be loaded ({exc}); retrain the run") from None
            tokenizer = load_tokenizer(self.info["base_model_path"])
        elif kind == "adapter":
            read_json(best / "adapter.json", "the adapter settings")
            base, tokenizer, _ = load_model(self.info["base_model_path"], dtype=dtype, device=device)
            lm = load_adapter(base, best).to(device)
        else:
            from peft import PeftModel

            read_json(best / "adapter_config.json", "the adapter config")
            _load_safetensors(best / PEFT_WEIGHTS, load_file)  # a damaged file gets one clear line, not peft's trace
            base, tokenizer, _ = load_model(self.info["base_model_path"], dtype=dtype, device=device)
            lm = PeftModel.from_pretrained(base, best)
            if merge and self.method in MERGEABLE:
                lm = lm.merge_and_unload()
        if (best / "personal.json").exists():
            read_json(best / "personal.json", "the user/item tables' settings")
            model = RecReasonModel.load_personal(lm, best).to(device)
        else:
            model = RecReasonModel(lm)
        model.pass_position_ids = uses_position_ids(self.method)
        return model.eval(), tokenizer

    def export_merged(self, out_dir: str | Path) -> Path:
        """Write the fine-tuned model with its LoRA-family adapter merged into the base weights."""
        if self.method not in MERGEABLE + ("full",):
            raise CheckpointMismatch(f"a {self.method!r} run cannot be merged into the base weights; only "
                                     f"{', '.join(MERGEABLE)} and full runs can")
        model, tokenizer = self.load_model(dtype="fp32", merge=True)
        out = Path(out_dir)
        model.lm.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        if model.uses_ids:
            model.save_personal(out)
        return out
