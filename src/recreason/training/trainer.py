"""The training loop: AdamW, linear warmup and decay, bf16 autocast, early stopping.

Loss is computed on explanation tokens only. Validation loss is measured
every ``eval_every`` optimizer steps on a fixed validation subset; the best
checkpoint is kept (safetensors) and training stops after ``patience`` passes
without improvement.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from recreason.data.dataset import Dataset
from recreason.data.records import DataError
from recreason.prompts.discrete import DiscretePrompter, PromptConfig
from recreason.training.config import TrainConfig
from recreason.training.data import collate, length_bucketed_batches, target_loss
from recreason.training.run import build_examples, write_run_info

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_context(precision: str, device: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext()


def _top_layers(model, n: int | None) -> list[int] | None:
    if not n:
        return None
    total = model.config.num_hidden_layers
    return list(range(max(0, total - n), total))


def apply_method(model, cfg: TrainConfig):
    """Wrap ``model`` for the fine-tuning method; returns the model to train."""
    if cfg.method == "full":
        model.float()
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        layers_to_transform=_top_layers(model, cfg.lora_top_layers),
    )
    return get_peft_model(model, lora)  # adapter weights are kept in fp32 by peft


def _optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


@torch.no_grad()
def validation_loss(model, examples, cfg: TrainConfig, pad_id: int, device: str) -> float:
    model.eval()
    total, tokens = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    size = cfg.batch_size * 2
    for start in range(0, len(order), size):
        batch = collate([examples[i] for i in order[start : start + size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_context(cfg.precision, device):
            loss, n = target_loss(model, batch)
        total += float(loss) * n
        tokens += n
    model.train()
    return total / max(tokens, 1)


def _save_best(model, run_dir: Path) -> None:
    tmp = run_dir / ".best-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    best = run_dir / "best"
    old = run_dir / ".best-old"
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    if old.exists():
        shutil.rmtree(old)


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(folder: Path, model, optimizer, scheduler, rng: random.Random, state: dict) -> None:
    """Write the resumable state atomically: a temporary folder renamed over the old one."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": rng.getstate(),
            "state": state,
        },
        tmp / "state.pt",
    )
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)


def _load_checkpoint(folder: Path, model, optimizer, scheduler, rng: random.Random) -> dict:
    from safetensors.torch import load_file

    weights = load_file(str(folder / "trainable.safetensors"))
    missing = set(_trainable_state(model)) - set(weights)
    if missing:
        raise DataError(f"{folder} does not match this model and method (missing {sorted(missing)[:3]})")
    model.load_state_dict(weights, strict=False)
    saved = torch.load(folder / "state.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    version, internal, gauss = saved["python_rng"]
    rng.setstate((version, tuple(internal), gauss))
    return saved["state"]


def train(
    dataset_dir: str | Path,
    run_dir: str | Path,
    cfg: TrainConfig,
    prompt_cfg: PromptConfig | None = None,
    full_config: dict | None = None,
    progress: bool = True,
    resume: bool = False,
    on_step=None,
) -> dict:
    """Fine-tune ``cfg.model`` on a prepared dataset; write a run directory; return the summary.

    With ``resume`` the run continues from ``run_dir/last`` (trainable weights, optimizer, scheduler, RNG
    states and the position in the epoch), so an interrupted run ends where an uninterrupted one would.
    ``on_step(step)`` is called after every optimizer step.
    """
    from recreason.models.registry import load_model

    cfg.validate()
    prompt_cfg = prompt_cfg or PromptConfig()
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    dataset = Dataset(dataset_dir)
    train_records = dataset.subset(cfg.split_seed, "train")
    valid_records = dataset.subset(cfg.split_seed, "validation")
    prompter = DiscretePrompter(train_records, prompt_cfg)
    rng = random.Random(cfg.seed)
    if cfg.max_train_records and cfg.max_train_records < len(train_records):
        train_records = rng.sample(train_records, cfg.max_train_records)
    if cfg.max_eval_records and cfg.max_eval_records < len(valid_records):
        valid_records = random.Random(cfg.seed + 1).sample(valid_records, cfg.max_eval_records)

    # Frozen base weights can live in bf16 under LoRA; full fine-tuning keeps fp32 master weights.
    load_dtype = "bf16" if cfg.precision == "bf16" and cfg.method != "full" else "fp32"
    model, tokenizer, base_path = load_model(cfg.model, dtype=load_dtype, device=device)
    model = apply_method(model, cfg)
    model.train()
    train_examples, _ = build_examples(train_records, prompter, tokenizer, cfg)
    valid_examples, _ = build_examples(valid_records, prompter, tokenizer, cfg)
    if not train_examples:
        raise DataError(f"no training examples with a non-empty {cfg.target!r} target")

    write_run_info(run_dir, str(dataset_dir), base_path, cfg, prompt_cfg)
    if full_config is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(full_config, sort_keys=False))

    steps_per_epoch = math.ceil(math.ceil(len(train_examples) / cfg.batch_size) / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    optimizer = _optimizer(model, cfg)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("training %s (%s, %d trainable parameters) for %d steps on %d examples",
             cfg.model, cfg.method, trainable, total_steps, len(train_examples))

    pad_id = tokenizer.pad_token_id
    state = {"step": 0, "micro": 0, "tokens_seen": 0, "best_loss": float("inf"), "best_step": 0,
             "bad_passes": 0, "stopped_early": False, "running": None, "batches": [], "elapsed": 0.0}
    if resume and (run_dir / "last" / "state.pt").exists():
        state = _load_checkpoint(run_dir / "last", model, optimizer, scheduler, rng)
        log.info("resumed from %s at step %d", run_dir / "last", state["step"])
    start = time.time() - state["elapsed"]
    bar = tqdm(total=total_steps, initial=state["step"], desc="training", unit="step", disable=not progress)
    log_file = open(run_dir / "train_log.jsonl", "a" if resume else "w")
    save_every = cfg.checkpoint_every or cfg.eval_every
    try:
        while state["step"] < total_steps and not state["stopped_early"]:
            if not state["batches"]:
                state["batches"] = length_bucketed_batches(train_examples, cfg.batch_size, rng)
            batch = collate([train_examples[i] for i in state["batches"].pop()], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast_context(cfg.precision, device):
                loss, n_tokens = target_loss(model, batch)
            (loss / cfg.grad_accum).backward()
            state["tokens_seen"] += int(batch["attention_mask"].sum())
            value = loss.item()
            state["running"] = value if state["running"] is None else 0.9 * state["running"] + 0.1 * value
            state["micro"] += 1
            if state["micro"] % cfg.grad_accum:
                continue
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            step = state["step"]
            elapsed = time.time() - start
            writer.add_scalar("train/loss", value, step)
            writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
            bar.set_postfix(loss=f"{state['running']:.3f}", tok_s=f"{state['tokens_seen'] / elapsed:.0f}")
            bar.update(1)
            if step % cfg.eval_every == 0 or step == total_steps:
                val = validation_loss(model, valid_examples, cfg, pad_id, device)
                writer.add_scalar("validation/loss", val, step)
                improved = val < state["best_loss"]
                if improved:
                    state.update(best_loss=val, best_step=step, bad_passes=0)
                    _save_best(model, run_dir)
                else:
                    state["bad_passes"] += 1
                    state["stopped_early"] = state["bad_passes"] >= cfg.patience
                entry = {"step": step, "train_loss": state["running"], "validation_loss": val, "best": improved,
                         "elapsed_s": round(time.time() - start, 1)}
                log_file.write(json.dumps(entry) + "\n")
                log_file.flush()
                bar.write(f"step {step}: validation loss {val:.4f}{' (best)' if improved else ''}")
            if step % save_every == 0 or step == total_steps or state["stopped_early"]:
                state["elapsed"] = time.time() - start
                _save_checkpoint(run_dir / "last", model, optimizer, scheduler, rng, state)
            if on_step is not None:
                on_step(step)
    finally:
        bar.close()
        log_file.close()
        writer.close()
    step, best_loss, best_step = state["step"], state["best_loss"], state["best_step"]
    stopped_early, tokens_seen = state["stopped_early"], state["tokens_seen"]
    elapsed = time.time() - start
    summary = {
        "steps": step,
        "best_step": best_step,
        "best_validation_loss": best_loss,
        "stopped_early": stopped_early,
        "train_examples": len(train_examples),
        "validation_examples": len(valid_examples),
        "trainable_parameters": trainable,
        "tokens_seen": tokens_seen,
        "tokens_per_second": tokens_seen / elapsed if elapsed else 0.0,
        "wall_seconds": elapsed,
        "config": asdict(cfg),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
