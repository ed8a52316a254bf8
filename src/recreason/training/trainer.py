"""The training loop as named steps: setup, fit, train step, validate, checkpoint, resume.

AdamW, linear warmup and decay, bf16 autocast, early stopping.

Loss is computed on explanation tokens only. Validation loss is measured
every ``eval_every`` optimizer steps on a fixed validation subset; the best
checkpoint is kept (safetensors) and training stops after ``patience`` passes
without improvement.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from recreason.config import PromptConfig, RankConfig, TrainConfig
from recreason.data.dataset import Dataset
from recreason.errors import ConfigError, DataError, NotARun
from recreason.models.methods import apply_method, compile_layers, orthogonality_penalty, uses_position_ids
from recreason.models.sharding import load_optimizer_state, load_weights, optimizer_state, shard_model, trainable_state
from recreason.models.registry import resolve_precision
from recreason.prompts.discrete import DiscretePrompter
from recreason.ranking import fit_ranker
from recreason.rundir import RunPaths, load_best_into, load_checkpoint, save_best, save_checkpoint, write_run_info
from recreason.training.data import (build_examples, collate, joint_loss, length_bucketed_batches, preference_loss,
                                     reference_logps)
from recreason.training.loggers import NullWriter, make_writer

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_context(precision: str, device: str):
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.split(":")[0], dtype=dtype)
    return nullcontext()


def make_optimizer(model, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
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


@dataclass
class TrainState:
    """Where training stands; saved whole in RUN/last/state.pt so a resumed run continues exactly."""

    stage: int = 0  # index into the stages (PEPLER's two-stage training has two)
    stage_step: int = 0  # optimizer steps taken in this stage
    step: int = 0  # optimizer steps taken in all
    micro: int = 0  # micro-batches in this stage (gradient accumulation)
    tokens_seen: int = 0
    best_loss: float = float("inf")
    best_step: int = 0
    bad_passes: int = 0  # validation passes without improvement
    stopped_early: bool = False
    running: float | None = None  # smoothed training loss
    batches: list[list[int]] = field(default_factory=list)  # what is left of this epoch's batch order
    elapsed: float = 0.0  # wall seconds before this process started

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainState":
        return cls(**data)


@dataclass
class Stage:
    steps: int
    lr: float
    personal_only: bool  # PEPLER stage 1: only user/item vectors and heads learn


class StepEngine:
    """One optimizer step: forward, backward (accumulated, loss-scaled), clip, step. The trainer and the
    throughput benchmark both use it, so what is measured is what trains."""

    def __init__(self, model, net, cfg: TrainConfig, device: str):
        self.model, self.net, self.cfg, self.device = model, net, cfg, device
        # fp16 needs loss scaling; with bf16/fp32 the scaler is a no-op pass-through.
        self.scaler = torch.amp.GradScaler(device.split(":")[0], enabled=cfg.precision == "fp16")
        self.allocate = getattr(getattr(model.lm, "base_model", None), "update_and_allocate", None) \
            if cfg.method == "adalora" else None
        self.optimizer = self.scheduler = None
        self.personal_only = False
        self.lm_trainable = [p for p in model.lm.parameters() if p.requires_grad]

    def start_stage(self, stage: Stage) -> None:
        from transformers import get_scheduler

        for p in self.lm_trainable:
            p.requires_grad_(not stage.personal_only)
        self.personal_only = stage.personal_only
        self.optimizer = make_optimizer(self.model, self.cfg, stage.lr)
        self.scheduler = get_scheduler(self.cfg.scheduler, self.optimizer, int(self.cfg.warmup_ratio * stage.steps),
                                       stage.steps)

    def train_step(self, batch: dict, state: TrainState) -> tuple[float, dict, bool]:
        """Run one micro-batch; take the optimizer step when ``grad_accum`` micro-batches are in.
        Returns (loss, loss parts, whether an optimizer step was taken)."""
        cfg = self.cfg
        with autocast_context(cfg.precision, self.device):
            if "pairs" in batch:  # (chosen, rejected) rows: the preference objective
                loss, parts = preference_loss(self.net, batch, cfg.preference_beta, cfg.preference_sft_weight)
            else:
                loss, parts = joint_loss(self.net, batch, cfg.rating_weight)
        if cfg.method == "adalora" and not self.personal_only:
            penalty = orthogonality_penalty(self.model.lm)
            if penalty is not None:
                loss = loss + penalty
        self.scaler.scale(loss / cfg.grad_accum).backward()
        state.tokens_seen += int(batch["attention_mask"].sum())
        value = loss.item()
        state.running = value if state.running is None else 0.9 * state.running + 0.1 * value
        state.micro += 1
        if state.micro % cfg.grad_accum:
            return value, parts, False
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.allocate is not None and not self.personal_only:
            self.allocate(state.step + 1)  # AdaLoRA re-distributes its rank budget
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.stage_step += 1
        return value, parts, True


class Trainer:
    """Fine-tune ``cfg.model`` on a prepared dataset into a run directory.

    ``Trainer(...)`` is the setup (processes, data, model, stages); :meth:`fit` runs the stages of
    :meth:`StepEngine.train_step`, :meth:`validate` and :meth:`checkpoint`; :meth:`resume` restores
    RUN/last. With ``cfg.two_stage`` a first stage trains only the user/item vectors and heads with the
    language model frozen, then the main stage trains everything with a fresh optimizer (PEPLER); each
    stage stops early on the validation objective.

    ``targets`` / ``valid_targets``: texts to train / validate on by record index instead of the records' own
    explanations (only records with an entry are used); ``rejected``: a text not to prefer per training record,
    which makes the objective DPO against the starting weights (``cfg.init_from``) plus the chosen texts' NLL.
    `recreason distill` passes the reasons a run chose among its own candidates.
    """

    def __init__(self, dataset_dir: str | Path, run_dir: str | Path, cfg: TrainConfig,
                 prompt_cfg: PromptConfig | None = None, full_config: dict | None = None, progress: bool = True,
                 targets: Mapping[int, Sequence[str]] | None = None,
                 valid_targets: Mapping[int, Sequence[str]] | None = None, rejected: Mapping[int, str] | None = None):
        cfg.validate()
        self.cfg = cfg
        self.targets, self.valid_targets, self.rejected = targets, valid_targets, rejected
        self.prompt_cfg = prompt_cfg or PromptConfig()
        self.dataset_dir, self.full_config = str(dataset_dir), full_config
        seed_everything(cfg.seed)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self._setup_processes()
        self.progress = progress and self.main
        self.run_dir = Path(run_dir)
        self.paths = RunPaths(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._setup_data_and_model()
        self.state = TrainState()

    # ----- setup -------------------------------------------------------------------------------
    def _setup_processes(self) -> None:
        """Accelerate: one process here, or one per device under `accelerate launch` / torchrun (DDP or FSDP2)."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        cfg = self.cfg
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        kind = self.accelerator.distributed_type.name
        if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            # Our checkpoints read whole parameters from the model; sharded ones would be saved as fragments.
            raise ConfigError(f"{kind} was requested by the accelerate config; recreason shards with its own FSDP2 "
                              "path instead: launch without --use_fsdp/--use_deepspeed and set train.fsdp: true")
        self.device = str(self.accelerator.device)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.main = self.accelerator.is_main_process
        if cfg.batch_size % self.world:
            raise ConfigError(f"train.batch_size {cfg.batch_size} is the global batch: it must divide by "
                              f"{self.world} processes")
        cfg.precision = resolve_precision(cfg.precision, self.device)  # what ran is what run.json records
        if cfg.precision == "fp16" and self.device == "cpu":
            raise ConfigError("train.precision fp16 needs a GPU; use bf16 or fp32 on CPU")

    def _setup_data_and_model(self) -> None:
        cfg = self.cfg
        dataset = Dataset(self.dataset_dir)
        train_records = dataset.subset(cfg.split_seed, "train")
        valid_records = dataset.subset(cfg.split_seed, "validation")
        prompter = DiscretePrompter(train_records, self.prompt_cfg)
        self.rng = random.Random(cfg.seed)
        n_train = min(len(train_records), cfg.max_train_records or len(train_records))
        estimated = cfg.max_steps or max(1, math.ceil(n_train / cfg.batch_size / cfg.grad_accum * cfg.epochs))
        self.model, self.tokenizer, self.base_path = build_model(cfg, train_records, self.device, estimated)
        if cfg.init_from:
            load_best_into(self.model, Path(cfg.init_from))
            log.info("starting from the best weights of %s", cfg.init_from)
        if self.targets is not None:
            train_records = [r for r in train_records if r.index in self.targets]
        if self.valid_targets is not None:
            valid_records = [r for r in valid_records if r.index in self.valid_targets]
        if cfg.max_train_records and cfg.max_train_records < len(train_records):
            train_records = self.rng.sample(train_records, cfg.max_train_records)
        if cfg.max_eval_records and cfg.max_eval_records < len(valid_records):
            valid_records = random.Random(cfg.seed + 1).sample(valid_records, cfg.max_eval_records)
        self.model.train()
        self.train_examples, _ = build_examples(train_records, prompter, self.tokenizer, cfg, model=self.model,
                                                texts=self.targets, rejected=self.rejected)
        self.valid_examples, _ = build_examples(valid_records, prompter, self.tokenizer, cfg, model=self.model,
                                                texts=self.valid_targets)
        if not self.train_examples:
            raise DataError(f"{self.dataset_dir}: no training examples with a non-empty {cfg.target!r} target")
        if self.rejected is not None:
            if not cfg.init_from:
                raise ConfigError("preference training needs train.init_from: the run whose weights are the reference")
            reference_logps(self.model, self.train_examples, self.tokenizer.pad_token_id, self.device)
        if self.world > 1 and cfg.fsdp:
            shard_model(self.model, self.device)  # in place: FSDP2 keeps the module and its parameter names
            net = self.model
        else:  # what the forward pass runs through
            net = self.accelerator.prepare_model(self.model) if self.world > 1 else self.model
        self.engine = StepEngine(self.model, net, cfg, self.device)
        steps_per_epoch = math.ceil(math.ceil(len(self.train_examples) / cfg.batch_size) / cfg.grad_accum)
        main_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
        self.stages = [Stage(cfg.stage1_steps, cfg.stage1_lr, True)] if cfg.two_stage else []
        self.stages.append(Stage(main_steps, cfg.lr, False))
        self.trainable_names = {n for n, p in self.model.named_parameters() if p.requires_grad}

    # ----- steps -------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        return validation_loss(self.engine.net, self.valid_examples, self.cfg, self.tokenizer.pad_token_id,
                               self.device, self.rank, self.world)

    def save_best(self, folder: str = "best") -> None:
        weights = trainable_state(self.model)  # gathered from the shards under FSDP, else None
        if self.main:
            save_best(self.model, self.run_dir, weights, folder)
        self.accelerator.wait_for_everyone()

    def checkpoint(self) -> None:
        """Write RUN/last: trainable weights, optimizer, scheduler, RNG states and the TrainState."""
        self.state.elapsed = time.time() - self._start
        opt_state = optimizer_state(self.model, self.engine.optimizer)  # gathered under FSDP (a collective)
        gathered = trainable_state(self.model)
        if self.main:
            source = gathered.items() if gathered is not None else self.model.named_parameters()
            weights = {n: p.detach().cpu().contiguous() for n, p in source if n in self.trainable_names}
            save_checkpoint(self.paths.last, weights, opt_state, self.engine.scheduler, self.rng,
                            self.state.to_dict())
        self.accelerator.wait_for_everyone()

    def resume(self, or_start: bool = False) -> dict | None:
        """Load RUN/last into the model and state; returns the optimizer/scheduler/RNG part for the stage to
        restore. A run with no checkpoint is an error unless ``or_start``."""
        last = self.paths.last
        if not last.exists():
            if or_start:
                log.info("no checkpoint in %s yet: starting from step 0", last)
                return None
            raise NotARun(f"{last} does not exist, so there is nothing to resume; train without --resume, "
                          "or pass --resume-or-start to start when no checkpoint exists")
        weights, saved = load_checkpoint(last, {n for n, _ in self.model.named_parameters()})
        load_weights(self.model, weights)
        self.state = TrainState.from_dict(saved["state"])
        log.info("resumed from %s at step %d", last, self.state.step)
        return saved

    def _restore(self, saved: dict) -> None:
        load_optimizer_state(self.model, self.engine.optimizer, saved["optimizer"])
        self.engine.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        version, internal, gauss = saved["python_rng"]
        self.rng.setstate((version, tuple(internal), gauss))

    def _after_validation(self, stage_index: int, writer, log_file, bar) -> None:
        state, step = self.state, self.state.step
        val = self.validate()
        for key, v in val.items():
            writer.add_scalar(f"validation/{key}", v, step)
        improved = val["objective"] < state.best_loss
        if improved:
            state.best_loss, state.best_step, state.bad_passes = val["objective"], step, 0
            self.save_best()
        else:
            state.bad_passes += 1
            state.stopped_early = state.bad_passes >= self.cfg.patience
        entry = {"step": step, "stage": stage_index + 1 if self.cfg.two_stage else 1,
                 "train_loss": state.running, "validation_loss": val["objective"],
                 **{f"validation_{k}": v for k, v in val.items() if k != "objective"},
                 "best": improved, "elapsed_s": round(time.time() - self._start, 1)}
        log_file.write(json.dumps(entry) + "\n")
        log_file.flush()
        message = f"step {step}: validation loss {val['objective']:.4f}{' (best)' if improved else ''}"
        bar.write(message) if self.progress else log.info(message)

    # ----- the loop ----------------------------------------------------------------------------
    def fit(self, resume: bool | str = False, on_step=None) -> dict:
        """Train every stage; write best/, last/, the log and summary.json; return the summary.
        ``resume``: True continues from RUN/last (an error when it is missing), ``"or-start"`` starts fresh
        then. ``on_step(step, model)`` is called after every optimizer step."""
        cfg, state = self.cfg, self.state
        saved = self.resume(or_start=resume == "or-start") if resume else None
        state = self.state
        if self.main:
            write_run_info(self.run_dir, self.dataset_dir, self.base_path, cfg, self.prompt_cfg)
            if self.full_config is not None:
                self.paths.config.write_text(yaml.safe_dump(self.full_config, sort_keys=False))
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("training %s (%s, %s prompt, %d trainable parameters) for %s steps on %d examples", cfg.model,
                 cfg.method, cfg.prompt_mode, trainable, "+".join(str(s.steps) for s in self.stages),
                 len(self.train_examples))
        writer = (make_writer(cfg.report_to, self.paths.tensorboard, self.run_dir, asdict(cfg)) if self.main
                  else NullWriter())
        pad_id = self.tokenizer.pad_token_id
        self._start = time.time() - state.elapsed
        log_file = open(self.paths.train_log, "a" if saved else "w") if self.main else NullWriter()
        save_every = cfg.checkpoint_every or cfg.eval_every
        bar = tqdm(total=sum(s.steps for s in self.stages), initial=state.step, desc="training", unit="step",
                   disable=not self.progress)
        try:
            for stage_index, stage in enumerate(self.stages):
                if stage_index < state.stage:
                    continue
                self.engine.start_stage(stage)
                if saved is not None:
                    self._restore(saved)
                    saved = None
                else:
                    state.stage, state.stage_step, state.bad_passes, state.stopped_early = stage_index, 0, 0, False
                    state.micro = 0
                while state.stage_step < stage.steps and not state.stopped_early:
                    if not state.batches:
                        state.batches = length_bucketed_batches(self.train_examples, cfg.batch_size, self.rng)
                    # Every process draws the same global batch and trains on its share of it.
                    rows = state.batches.pop()[self.rank::self.world]
                    batch = collate([self.train_examples[i] for i in rows], pad_id)
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    value, parts, stepped = self.engine.train_step(batch, state)
                    if not stepped:
                        continue
                    step = state.step
                    writer.add_scalar("train/loss", value, step)
                    writer.add_scalar("train/text_loss", parts["text"], step)
                    writer.add_scalar("train/lr", self.engine.scheduler.get_last_lr()[0], step)
                    elapsed = time.time() - self._start
                    bar.set_postfix(loss=f"{state.running:.3f}", tok_s=f"{state.tokens_seen / max(elapsed, 1e-9):.0f}")
                    bar.update(1)
                    if state.stage_step % cfg.eval_every == 0 or state.stage_step == stage.steps:
                        self._after_validation(stage_index, writer, log_file, bar)
                    if state.stage_step % save_every == 0 or state.stage_step == stage.steps or state.stopped_early:
                        self.checkpoint()
                    if step in cfg.snapshot_steps:
                        self.save_best(folder=RunPaths.snapshot_name(step))
                    if on_step is not None:
                        on_step(step, self.model)
                if stage_index < len(self.stages) - 1:
                    state.stopped_early = False  # early stopping ends a stage, not the run
                    load_best_into(self.model, self.run_dir)  # the next stage starts from this one's best
        finally:
            bar.close()
            log_file.close()
            writer.close()
        return self._summary(trainable)

    def _summary(self, trainable: int) -> dict:
        state = self.state
        elapsed = time.time() - self._start
        summary = {
            "steps": state.step,
            "best_step": state.best_step,
            "best_validation_loss": state.best_loss,
            "stopped_early": state.stopped_early,
            "train_examples": len(self.train_examples),
            "validation_examples": len(self.valid_examples),
            "trainable_parameters": trainable,
            "tokens_seen": state.tokens_seen,
            "tokens_per_second": state.tokens_seen / elapsed if elapsed else 0.0,
            "wall_seconds": elapsed,
            "config": asdict(self.cfg),
            "processes": self.world,
            "peak_memory_mb": (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
                               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
        if self.main:
            self.paths.summary.write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def train(dataset_dir: str | Path, run_dir: str | Path, cfg: TrainConfig, prompt_cfg: PromptConfig | None = None,
          full_config: dict | None = None, progress: bool = True, resume: bool | str = False, on_step=None,
          rank_cfg: RankConfig | None = None) -> dict:
    """Set up a :class:`Trainer` and fit it, then fit the ranking stage into RUN/ranker (``rank_cfg``; seconds);
    returns the summary (also written to RUN/summary.json)."""
    trainer = Trainer(dataset_dir, run_dir, cfg, prompt_cfg, full_config, progress)
    summary = trainer.fit(resume, on_step)
    if trainer.main:
        start = time.time()
        fit_ranker(Dataset(dataset_dir).subset(cfg.split_seed, "train"), rank_cfg).save(RunPaths(run_dir).ranker)
        log.info("fitted the %s ranker in %.1f s", (rank_cfg or RankConfig()).model, time.time() - start)
    return summary
