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
import resource
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
from recreason.training.data import collate, joint_loss, length_bucketed_batches
from recreason.training.methods import (apply_method, compile_layers, orthogonality_penalty, save_adapter,
                                        uses_position_ids)
from recreason.training.sharding import (load_optimizer_state, load_weights, optimizer_state, shard_model,
                                         trainable_state)
from recreason.training.run import build_examples, write_run_info

log = logging.getLogger(__name__)


class _NullWriter:
    """Stands in for the log file and TensorBoard writer on non-main processes."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _Writers:
    """Sends every scalar to each logger in ``report_to``."""

    def __init__(self, writers):
        self.writers = writers

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for w in self.writers:
            w.add_scalar(tag, value, step)

    def close(self) -> None:
        for w in self.writers:
            w.close()


class _WandbWriter:
    def __init__(self, run_dir: Path, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(dir=str(run_dir), name=run_dir.name, config=config)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: value}, step=step)

    def close(self) -> None:
        self.run.finish()


def make_writer(report_to, run_dir: Path, config: dict) -> _Writers:
    """TensorBoard by default; Weights & Biases when installed and asked for (``train.report_to``)."""
    writers = []
    for name in report_to or []:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writers.append(SummaryWriter(str(run_dir / "tensorboard")))
        elif name == "wandb":
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ValueError("train.report_to asks for wandb, which is not installed: pip install wandb")
            writers.append(_WandbWriter(run_dir, config))
        else:
            raise ValueError(f"train.report_to: unknown logger {name!r}; use tensorboard and/or wandb")
    return _Writers(writers)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_context(precision: str, device: str):
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.split(":")[0], dtype=dtype)
    return nullcontext()


def _optimizer(model, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    decay, no_decay, personal = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if not name.startswith("lm."):
            personal.append(param)  # user/item tables and heads: own rate, no decay (sparse rows)
            continue
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": personal, "weight_decay": 0.0, "lr": cfg.personal_lr or lr}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=lr)


@torch.no_grad()
def validation_loss(model, examples, cfg: TrainConfig, pad_id: int, device: str, rank: int = 0,
                    world: int = 1) -> dict[str, float]:
    """Token-weighted text loss, mean head losses, and the objective used for early stopping.

    With several processes each scores its share of the examples and the sums are all-reduced. Sharded
    forwards are collective, so under FSDP every process gets the same count (up to world-1 left out).
    """
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # text*tokens, tokens, rating_mse*rows, interest_ce*rows, rows
    seen = set()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    if cfg.fsdp and world > 1:
        order = order[: len(order) - len(order) % world]
    order = order[rank::world]
    size = cfg.batch_size * 2
    for start in range(0, len(order), size):
        batch = collate([examples[i] for i in order[start : start + size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_context(cfg.precision, device):
            _, parts = joint_loss(model, batch, cfg.rating_weight)
        n = len(batch["input_ids"])
        sums[0] += parts["text"] * parts["tokens"]
        sums[1] += parts["tokens"]
        for slot, key in ((2, "rating_mse"), (3, "interest_ce")):
            if key in parts:
                sums[slot] += parts[key] * n
                seen.add(key)
        sums[4] += n
    if world > 1:
        torch.distributed.all_reduce(sums)
    model.train()
    result = {"text": float(sums[0] / max(sums[1], 1))}
    core = getattr(model, "module", model)
    if getattr(core, "rating_head_kind", None):
        result["rating_mse"] = float(sums[2] / max(sums[4], 1))
    if getattr(core, "interest", None) is not None:
        result["interest_ce"] = float(sums[3] / max(sums[4], 1))
    result["objective"] = result["text"] + cfg.rating_weight * (result.get("rating_mse", 0.0) + result.get("interest_ce", 0.0))
    return result


def _save_best(model, run_dir: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write RUN/best atomically. ``state``: the trainable weights by name, when they were gathered from shards."""
    tmp = run_dir / ".best-tmp"
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
    best = run_dir / "best"
    old = run_dir / ".best-old"
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    if old.exists():
        shutil.rmtree(old)


def _trainable_state(model, names: set[str], gathered: dict | None = None) -> dict[str, torch.Tensor]:
    source = gathered.items() if gathered is not None else model.named_parameters()
    return {n: p.detach().cpu().contiguous() for n, p in source if n in names}


def _save_checkpoint(folder: Path, model, names: set[str], optimizer_state: dict, scheduler, rng: random.Random,
                     state: dict, gathered: dict | None = None) -> None:
    """Write the resumable state atomically: a temporary folder renamed over the old one."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_trainable_state(model, names, gathered), str(tmp / "trainable.safetensors"))
    torch.save(
        {
            "optimizer": optimizer_state,
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


def _load_checkpoint(folder: Path, model) -> dict:
    """Load the trainable weights into ``model``; return the rest of the saved state."""
    from safetensors.torch import load_file

    weights = load_file(str(folder / "trainable.safetensors"))
    unknown = set(weights) - {n for n, _ in model.named_parameters()}
    if unknown:
        raise DataError(f"{folder} does not match this model and method (unexpected {sorted(unknown)[:3]})")
    load_weights(model, weights)
    return torch.load(folder / "state.pt", weights_only=True)


def _restore_optimizer(saved: dict, model, optimizer, scheduler, rng: random.Random) -> None:
    load_optimizer_state(model, optimizer, saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    version, internal, gauss = saved["python_rng"]
    rng.setstate((version, tuple(internal), gauss))


def _load_best_into(model, run_dir: Path) -> None:
    """Load the best checkpoint's personal weights and adapter/model weights back into ``model``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    best = run_dir / "best"
    if model.uses_ids and (best / "personal.safetensors").exists():
        model.load_state_dict(load_file(str(best / "personal.safetensors")), strict=False)
    if (best / "adapter.safetensors").exists():
        model.lm.load_state_dict(load_file(str(best / "adapter.safetensors")), strict=False)
    elif (best / "adapter_model.safetensors").exists():
        set_peft_model_state_dict(model.lm, load_file(str(best / "adapter_model.safetensors")))
    elif (best / "model.safetensors").exists():
        model.lm.load_state_dict(load_file(str(best / "model.safetensors")), strict=False)


def build_model(cfg: TrainConfig, train_records, device: str, total_steps: int = 1000):
    """(RecReasonModel, tokenizer, base path) ready to train according to ``cfg``."""
    from recreason.models.personalized import RecReasonModel
    from recreason.models.registry import load_model

    # Frozen base weights can live in bf16 under LoRA; full fine-tuning keeps fp32 master weights.
    load_dtype = "bf16" if cfg.precision == "bf16" and cfg.method != "full" else "fp32"
    lm, tokenizer, base_path = load_model(cfg.model, dtype=load_dtype, device=device,
                                          attn_implementation=cfg.attn_implementation)
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm = apply_method(lm, cfg, total_steps)
    if cfg.compile:
        compile_layers(lm)
    users = sorted({r.user for r in train_records})
    items = sorted({r.item for r in train_records})
    mean = float(np.mean([r.rating for r in train_records]))
    model = RecReasonModel(lm, users, items, cfg.prompt_mode, cfg.rating_head, cfg.interest_head, mean).to(device)
    model.pass_position_ids = uses_position_ids(cfg.method)
    return model, tokenizer, base_path


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

    With ``cfg.two_stage`` a first stage trains only the user/item vectors and heads with the language
    model frozen, then the main stage trains everything with a fresh optimizer (PEPLER); each stage stops
    early on the validation objective. With ``resume`` the run continues from ``run_dir/last`` (trainable
    weights, optimizer, scheduler, RNG states, stage and position in the epoch), so an interrupted run ends
    where an uninterrupted one would. ``on_step(step, model)`` is called after every optimizer step.
    """
    cfg.validate()
    prompt_cfg = prompt_cfg or PromptConfig()
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # Accelerate: one process here, or one per device under `accelerate launch` / torchrun (DDP, or our FSDP2).
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        # Our checkpoints read whole parameters from the model; sharded ones would be saved as fragments.
        raise ValueError(f"{accelerator.distributed_type.name} was requested by the accelerate config; recreason "
                         "shards with its own FSDP2 path instead: launch without --use_fsdp/--use_deepspeed and "
                         "set train.fsdp: true")
    device = str(accelerator.device)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if cfg.batch_size % world:
        raise ValueError(f"train.batch_size {cfg.batch_size} is the global batch: it must divide by {world} processes")
    progress = progress and main
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    dataset = Dataset(dataset_dir)
    train_records = dataset.subset(cfg.split_seed, "train")
    valid_records = dataset.subset(cfg.split_seed, "validation")
    prompter = DiscretePrompter(train_records, prompt_cfg)
    rng = random.Random(cfg.seed)
    if cfg.precision == "fp16" and device == "cpu":
        raise ValueError("train.precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    n_train = min(len(train_records), cfg.max_train_records or len(train_records))
    estimated_steps = cfg.max_steps or max(1, math.ceil(n_train / cfg.batch_size / cfg.grad_accum * cfg.epochs))
    model, tokenizer, base_path = build_model(cfg, train_records, device, estimated_steps)
    if cfg.max_train_records and cfg.max_train_records < len(train_records):
        train_records = rng.sample(train_records, cfg.max_train_records)
    if cfg.max_eval_records and cfg.max_eval_records < len(valid_records):
        valid_records = random.Random(cfg.seed + 1).sample(valid_records, cfg.max_eval_records)
    model.train()
    train_examples, _ = build_examples(train_records, prompter, tokenizer, cfg, model=model)
    valid_examples, _ = build_examples(valid_records, prompter, tokenizer, cfg, model=model)
    if not train_examples:
        raise DataError(f"no training examples with a non-empty {cfg.target!r} target")

    if main:
        write_run_info(run_dir, str(dataset_dir), base_path, cfg, prompt_cfg)
        if full_config is not None:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(full_config, sort_keys=False))
    if world > 1 and cfg.fsdp:
        shard_model(model, device)  # in place: FSDP2 keeps the module and its parameter names
        net = model
    else:
        net = accelerator.prepare_model(model) if world > 1 else model  # what the forward pass runs through

    steps_per_epoch = math.ceil(math.ceil(len(train_examples) / cfg.batch_size) / cfg.grad_accum)
    main_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    stages = [(cfg.stage1_steps, cfg.stage1_lr, True)] if cfg.two_stage else []
    stages.append((main_steps, cfg.lr, False))
    lm_trainable = [p for p in model.lm.parameters() if p.requires_grad]
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("training %s (%s, %s prompt, %d trainable parameters) for %s steps on %d examples",
             cfg.model, cfg.method, cfg.prompt_mode, trainable, "+".join(str(s[0]) for s in stages),
             len(train_examples))
    from transformers import get_scheduler

    writer = make_writer(cfg.report_to, run_dir, asdict(cfg)) if main else _NullWriter()
    pad_id = tokenizer.pad_token_id
    # fp16 needs loss scaling; with bf16/fp32 the scaler is a no-op pass-through.
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=cfg.precision == "fp16")
    allocate = getattr(getattr(model.lm, "base_model", None), "update_and_allocate", None) \
        if cfg.method == "adalora" else None
    state = {"stage": 0, "stage_step": 0, "step": 0, "micro": 0, "tokens_seen": 0, "best_loss": float("inf"),
             "best_step": 0, "bad_passes": 0, "stopped_early": False, "running": None, "batches": [],
             "elapsed": 0.0}
    saved = None
    if resume and (run_dir / "last" / "state.pt").exists():
        saved = _load_checkpoint(run_dir / "last", model)
        state = saved["state"]
        log.info("resumed from %s at step %d", run_dir / "last", state["step"])
    start = time.time() - state["elapsed"]
    log_file = open(run_dir / "train_log.jsonl", "a" if resume else "w") if main else _NullWriter()
    save_every = cfg.checkpoint_every or cfg.eval_every
    bar = tqdm(total=sum(s[0] for s in stages), initial=state["step"], desc="training", unit="step",
               disable=not progress)
    try:
        for stage_index, (stage_steps, lr, personal_only) in enumerate(stages):
            if stage_index < state["stage"]:
                continue
            for p in lm_trainable:
                p.requires_grad_(not personal_only)
            optimizer = _optimizer(model, cfg, lr)
            scheduler = get_scheduler(cfg.scheduler, optimizer, int(cfg.warmup_ratio * stage_steps), stage_steps)
            if saved is not None:
                _restore_optimizer(saved, model, optimizer, scheduler, rng)
                saved = None
            else:
                state.update(stage=stage_index, stage_step=0, bad_passes=0, stopped_early=False, micro=0)
            while state["stage_step"] < stage_steps and not state["stopped_early"]:
                if not state["batches"]:
                    state["batches"] = length_bucketed_batches(train_examples, cfg.batch_size, rng)
                # Every process draws the same global batch and trains on its share of it.
                batch = collate([train_examples[i] for i in state["batches"].pop()[rank::world]], pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast_context(cfg.precision, device):
                    loss, parts = joint_loss(net, batch, cfg.rating_weight)
                if cfg.method == "adalora" and not personal_only:
                    loss = loss + orthogonality_penalty(model.lm)
                scaler.scale(loss / cfg.grad_accum).backward()
                state["tokens_seen"] += int(batch["attention_mask"].sum())
                value = loss.item()
                state["running"] = value if state["running"] is None else 0.9 * state["running"] + 0.1 * value
                state["micro"] += 1
                if state["micro"] % cfg.grad_accum:
                    continue
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if allocate is not None and not personal_only:
                    allocate(state["step"] + 1)  # AdaLoRA re-distributes its rank budget
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["stage_step"] += 1
                step = state["step"]
                elapsed = time.time() - start
                writer.add_scalar("train/loss", value, step)
                writer.add_scalar("train/text_loss", parts["text"], step)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                bar.set_postfix(loss=f"{state['running']:.3f}", tok_s=f"{state['tokens_seen'] / elapsed:.0f}")
                bar.update(1)
                if state["stage_step"] % cfg.eval_every == 0 or state["stage_step"] == stage_steps:
                    val = validation_loss(net, valid_examples, cfg, pad_id, device, rank, world)
                    for key, v in val.items():
                        writer.add_scalar(f"validation/{key}", v, step)
                    improved = val["objective"] < state["best_loss"]
                    if improved:
                        state.update(best_loss=val["objective"], best_step=step, bad_passes=0)
                        weights = trainable_state(model)  # gathered from the shards under FSDP, else None
                        if main:
                            _save_best(model, run_dir, weights)
                        accelerator.wait_for_everyone()
                    else:
                        state["bad_passes"] += 1
                        state["stopped_early"] = state["bad_passes"] >= cfg.patience
                    entry = {"step": step, "stage": stage_index + 1 if cfg.two_stage else 1,
                             "train_loss": state["running"], "validation_loss": val["objective"],
                             **{f"validation_{k}": v for k, v in val.items() if k != "objective"},
                             "best": improved, "elapsed_s": round(time.time() - start, 1)}
                    log_file.write(json.dumps(entry) + "\n")
                    log_file.flush()
                    message = f"step {step}: validation loss {val['objective']:.4f}{' (best)' if improved else ''}"
                    bar.write(message) if progress else log.info(message)
                if state["stage_step"] % save_every == 0 or state["stage_step"] == stage_steps or state["stopped_early"]:
                    state["elapsed"] = time.time() - start
                    opt_state = optimizer_state(model, optimizer)  # gathered under FSDP (a collective)
                    weights = trainable_state(model)
                    if main:
                        _save_checkpoint(run_dir / "last", model, trainable_names, opt_state, scheduler, rng, state,
                                         weights)
                    accelerator.wait_for_everyone()
                if on_step is not None:
                    on_step(step, model)
            if stage_index < len(stages) - 1:
                state["stopped_early"] = False  # early stopping ends a stage, not the run
                # The next stage starts from the best weights of this one.
                _load_best_into(model, run_dir)
    finally:
        bar.close()
        log_file.close()
        writer.close()
    elapsed = time.time() - start
    summary = {
        "steps": state["step"],
        "best_step": state["best_step"],
        "best_validation_loss": state["best_loss"],
        "stopped_early": state["stopped_early"],
        "train_examples": len(train_examples),
        "validation_examples": len(valid_examples),
        "trainable_parameters": trainable,
        "tokens_seen": state["tokens_seen"],
        "tokens_per_second": state["tokens_seen"] / elapsed if elapsed else 0.0,
        "wall_seconds": elapsed,
        "config": asdict(cfg),
    }
    summary["processes"] = world
    summary["peak_memory_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
                                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
