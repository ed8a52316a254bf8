"""Every setting of recreason, one dataclass per stage, and how they are layered.

Layers: dataclass defaults < YAML file < ``--set section.key=value`` < CLI flags.
A config file has one mapping per stage (``prepare``, ``prompt``, ``train``,
``generate``, ``evaluate``); each key must be a field of that stage's
dataclass, so a typo fails loudly instead of being ignored. This module sits at
the bottom of the package: it imports nothing else of recreason but its errors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from recreason.errors import ConfigError

# Fine-tuning methods (see recreason.models.methods); the first three can be merged into the base weights.
METHODS = ("full", "lora", "adalora", "ia3", "prefix", "prompt", "adapter")
MERGEABLE = ("lora", "adalora", "ia3")
LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SYSTEM = "You explain product recommendations in one short sentence."


@dataclass
class PrepareConfig:
    schema: str = "auto"
    rating_min: float = 1.0
    rating_max: float = 5.0
    max_reject_fraction: float = 0.5
    min_feature_df: int = 10
    min_words: int = 4
    max_words: int = 30
    seeds: Sequence[int] = field(default_factory=lambda: [1])
    split: str = "random"  # random | temporal (test = the latest reviews, validation just before them)
    n_process: int = 1
    max_records: int | None = None  # read only the first N valid reviews (for quick trials)
    # Limits that protect the pipeline: a record past one of them is rejected with its line and reason.
    max_record_bytes: int = 1_000_000  # one JSON line or CSV row
    max_review_chars: int = 20_000  # review text, summary or title
    max_id_chars: int = 200  # user and item ids
    min_timestamp: int = 0  # seconds since the epoch (1970-01-01)
    max_timestamp: int = 4_102_444_800  # 2100-01-01
    max_row_lines: int = 20  # physical lines one quoted CSV row may span


@dataclass
class PromptConfig:
    user_features: int = 5  # how many of the user's most frequent features to list
    item_features: int = 5  # how many of the item's most frequent features to list
    history: int = 0  # how many of the user's latest training reviews to quote (rating and summary)
    attributes: int = 5  # how many item attributes (and its title) to show when the data has them
    evidence: int = 0  # how many of other buyers' training sentences about the item to quote (0: none)
    system: str = SYSTEM
    instruction: str = "Write one short sentence on why this user will like this item."


@dataclass
class TrainConfig:
    model: str = "smollm2-135m"  # alias, Hugging Face id (local cache), directory or .gguf
    method: str = "lora"  # full | lora | adalora | ia3 | prefix | prompt | adapter
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # dropout on the LoRA/adapter input; 0.05 costs ~15% of a CPU step (RNG per module)
    target_modules: list[str] = field(default_factory=lambda: list(LINEAR_MODULES))
    lora_top_layers: int | None = None  # adapt only the last N decoder layers (backward stops there: faster)
    adapter_size: int = 64  # bottleneck width of the adapter method
    num_virtual_tokens: int = 16  # prefix and prompt tuning
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9)
    scheduler: str = "linear"  # linear | cosine, both after linear warmup
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    fsdp: bool = False  # with several processes: shard the model (FSDP2) instead of replicating it (DDP)
    compile: bool = False  # torch.compile each decoder layer: faster steps after a one-time compile (~1 min)
    attn_implementation: str = "auto"  # auto (eager on CPU, sdpa on GPU) | eager | sdpa | flash_attention_2
    target: str = "sentence"  # explanation target: sentence | summary
    prompt_mode: str = "discrete"  # discrete (text) | continuous (learned user/item vectors) | hybrid (both)
    rating_head: str | None = None  # null | mf | mlp: predict the rating jointly with the text
    interest_head: bool = False  # also classify interest low/medium/high (ratings 1-2 / 3 / 4-5)
    personal_lr: float | None = 1e-2  # learning rate of user/item vectors and heads (null: same as lr)
    rating_weight: float = 0.1  # lambda in loss = NLL + lambda * (rating MSE + interest cross-entropy)
    two_stage: bool = False  # PEPLER: stage 1 trains only user/item vectors and heads, LM frozen
    stage1_steps: int = 100  # optimizer steps of stage 1 (it may stop earlier on validation loss)
    stage1_lr: float = 1e-2  # learning rate of stage 1
    split_seed: int = 1
    max_prompt_tokens: int = 160
    max_target_tokens: int = 32
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int | None = None  # caps optimizer steps; wins over epochs
    max_train_records: int | None = None  # train on a random subset (quick runs)
    eval_every: int = 100  # optimizer steps between validation passes
    max_eval_records: int | None = 256  # validation records used for early stopping
    checkpoint_every: int | None = None  # steps between resumable checkpoints in RUN/last (default: eval_every)
    patience: int = 3  # validation passes without improvement before stopping
    snapshot_steps: list[int] = field(default_factory=list)  # also keep the weights at these steps (RUN/snapshots/)
    precision: str = "bf16"  # bf16 (autocast; frozen base weights stored in bf16) | fp16 (GPU, loss scaling) | fp32
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard and/or wandb
    seed: int = 42
    num_threads: int | None = None  # torch threads; default: all cores

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"train.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"train.optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.scheduler not in ("linear", "cosine"):
            raise ConfigError(f"train.scheduler must be linear or cosine, got {self.scheduler!r}")
        if self.attn_implementation not in ("auto", "eager", "sdpa", "flash_attention_2"):
            raise ConfigError(f"train.attn_implementation must be auto, eager, sdpa or flash_attention_2, "
                             f"got {self.attn_implementation!r}")
        if self.fsdp and (self.two_stage or self.method in ("adalora", "prefix", "prompt") or self.compile
                          or self.precision == "fp16"):
            raise ConfigError("train.fsdp works with methods full, lora, ia3 and adapter; it does not support "
                             "adalora, prefix, prompt, two_stage, compile or fp16 yet")
        if self.target not in ("sentence", "summary"):
            raise ConfigError(f"train.target must be 'sentence' or 'summary', got {self.target!r}")
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"train.precision must be bf16, fp16 or fp32, got {self.precision!r}")
        if self.prompt_mode not in ("discrete", "continuous", "hybrid"):
            raise ConfigError(f"train.prompt_mode must be discrete, continuous or hybrid, got {self.prompt_mode!r}")
        if self.rating_head not in (None, "mf", "mlp"):
            raise ConfigError(f"train.rating_head must be null, mf or mlp, got {self.rating_head!r}")
        if self.two_stage and self.prompt_mode == "discrete" and not (self.rating_head or self.interest_head):
            raise ConfigError("train.two_stage needs learned vectors: a continuous/hybrid prompt or a head")
        for name in ("batch_size", "grad_accum", "eval_every", "max_target_tokens", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1")



@dataclass
class GenerateConfig:
    max_new_tokens: int = 32
    batch_size: int = 32
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    precision: str = "bf16"  # bf16 | fp32: weights used for generation
    max_records: int | None = None  # generate for the first N records of the split only
    # Choose, don't just decode: with candidates > 1 the greedy text and candidates - 1 samples are scored
    # and the best is kept (recreason.inference.selection). 1 = plain decoding with the settings above.
    candidates: int = 1
    sample_temperature: float = 0.8  # sampling settings of the extra candidates
    sample_top_p: float = 0.95
    weight_likelihood: float = 1.0  # x mean token log-probability under the model
    weight_grounded: float = 0.5  # + per feature named that the item has (up to 2)
    weight_ungrounded: float = 1.0  # - per feature named that the item lacks
    weight_user: float = 0.5  # + when the reason names one of the user's own features
    weight_generic: float = 0.5  # - x log(1 + how often the run says this sentence for other pairs)
    weight_consensus: float = 0.0  # + x mean ROUGE-L F1 with the pair's other candidates (minimum Bayes risk)
    weight_consensus_bleu: float = 0.0  # + x mean sentence BLEU-4 (add-one smoothed) with the other candidates
    weight_length: float = 0.0  # + per token of the reason, up to 20 (offsets consensus's pull to short reasons)
    generic_records: int = 200  # validation records whose greedy reasons measure what the run says often


@dataclass
class RankConfig:
    # Defaults: the grid point benchmarks/ranking.py chose on the validation split of each of seeds 1-3.
    model: str = "als"  # als | bpr (the implicit library) | popularity
    factors: int = 128
    regularization: float = 10.0
    iterations: int = 15
    alpha: float = 10.0  # ALS: confidence weight of an interaction
    learning_rate: float = 0.01  # BPR
    popularity_weight: float = 0.1  # score = model score + this x log(1 + training interactions of the item)
    use_gpu: bool = False  # implicit's CUDA kernels (needs implicit built with CUDA)
    seed: int = 0


@dataclass
class EvaluateConfig:
    split: str = "test"
    max_len: int = 20  # tokens compared per sentence, as in PEPLER
    systems: list[str] = field(default_factory=lambda: ["zero-shot", "retrieval", "fine-tuned"])
    bootstrap: int = 1000  # resamples for 95% intervals and paired differences (0: none)
    semantic: bool = True  # semantic similarity column (all-MiniLM-L6-v2, shipped in a PyPI package)


@dataclass
class ServeConfig:
    max_batch_size: int = 16  # generations run together
    max_wait_ms: float = 50.0  # how long the first queued request waits for company (a batch takes 1-3 s on CPU)
    max_new_tokens_limit: int = 64  # upper bound on a request's max_new_tokens
    max_beams: int = 4
    cache_size: int = 10000  # cached reasons (model, user, item, options, history version)
    request_timeout_s: float = 60.0  # a request still waiting after this gets 504
    max_queue: int = 256  # generations waiting beyond this: new requests get 503
    cold_start: str = "item-only"  # unknown user without history: item-only reason, or "error"


SECTIONS = {
    "prepare": PrepareConfig,
    "prompt": PromptConfig,
    "train": TrainConfig,
    "generate": GenerateConfig,
    "rank": RankConfig,
    "evaluate": EvaluateConfig,
}


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """Numbers YAML reads as strings (``5e-4`` under YAML 1.1) become the field's numeric type."""
    if isinstance(value, str) and value.lower() not in ("null", "none"):
        kinds = [k.strip() for k in annotation.split("|")]
        for kind, cast in (("int", int), ("float", float)):
            if kind in kinds:
                try:
                    return cast(value)
                except ValueError:
                    if "str" not in kinds:
                        raise ConfigError(f"{where}: expected {annotation}, got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool) and annotation.startswith("float"):
        return float(value)
    return value


def _apply(obj, values: dict[str, Any], where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(sorted(fields))}")
        setattr(obj, key, _coerce(value, str(fields[key].type), f"{where}: {key}"))


def load_config(paths=None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Return ``{section: dataclass instance}`` with every layer applied (later files win)."""
    config = {name: cls() for name, cls in SECTIONS.items()}
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for path in paths or []:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections")
        for section, values in data.items():
            if section not in SECTIONS:
                raise ConfigError(f"{path}: unknown section {section!r}; valid: {', '.join(SECTIONS)}")
            _apply(config[section], values or {}, f"{path}: {section}")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in SECTIONS:
            raise ConfigError(f"--set {item!r}: expected section.key=value with section in {', '.join(SECTIONS)}")
        _apply(config[section], {name: yaml.safe_load(raw)}, f"--set {item}")
    return config


def to_dict(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(obj) for name, obj in config.items()}
