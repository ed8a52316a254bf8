"""Every setting of recreason, one dataclass per stage, and how they are layered.

Layers: dataclass defaults < YAML file < ``--set section.key=value`` < CLI flags.
A config file has one mapping per stage (``prepare``, ``prompt``, ``train``,
``generate``, ``evaluate``); each key must be a field of that stage's
dataclass, so a typo fails loudly instead of being ignored. This module sits at
the bottom of the package: it imports nothing else of recreason but its errors.
"""

from __future__ import annotations

import dataclasses
import math
import os
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


def cache_root() -> Path:
    """Where converted models and built kernels are cached: ``$RECREASON_CACHE``, else ``~/.cache/recreason``."""
    return Path(os.environ.get("RECREASON_CACHE", Path.home() / ".cache" / "recreason"))


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
    cold_users: bool = False  # true: only items are kept in training, test may hold users never seen (sparse logs)
    n_process: int = 1
    max_records: int | None = None  # read only the first N valid reviews (for quick trials)
    # Limits that protect the pipeline: a record past one of them is rejected with its line and reason.
    max_record_bytes: int = 1_000_000  # one JSON line or CSV row
    max_review_chars: int = 20_000  # review text, summary or title
    max_id_chars: int = 200  # user and item ids
    min_timestamp: int = 0  # seconds since the epoch (1970-01-01)
    max_timestamp: int = 4_102_444_800  # 2100-01-01
    max_row_lines: int = 20  # physical lines one quoted CSV row may span
    language: str = "auto"  # en (spaCy) | zh (jieba) | auto: zh when most reviews are written in Han characters
    # A log whose columns have other names: our name -> the file's (user_id, item_id, rating, text, timestamp,
    # summary, title, attributes; user, item and time are accepted for the first three), e.g. {user_id: user_md5}.
    columns: dict[str, str] = field(default_factory=dict)
    items: str | None = None  # an item table beside the log (Amazon metadata lines, JSONL, CSV, Parquet)
    item_columns: dict[str, str] = field(default_factory=dict)  # our name (item_id, title) -> the table's
    item_attributes: list[str] = field(default_factory=list)  # the table's columns to keep (empty: every short one)


@dataclass
class PromptConfig:
    user_features: int = 5  # how many of the user's most frequent features to list
    item_features: int = 5  # how many of the item's most frequent features to list
    history: int = 0  # how many of the user's latest training reviews to quote (rating and summary)
    attributes: int = 5  # how many item attributes (and its title) to show when the data has them
    evidence: int = 0  # how many of other buyers' training sentences about the item to quote (0: none)
    system: str = SYSTEM
    instruction: str = "Write one short sentence on why this user will like this item."
    answer_cue: str = "Reason:"  # ends the prompt of a model without a chat template (a pretrained base)


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
    precision: str = "auto"  # auto (bf16 where native: GPU, AVX-512 BF16/AMX CPU; else fp32) | bf16 (autocast; frozen
    # base weights stored in bf16) | fp16 (GPU, loss scaling) | fp32
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard and/or wandb
    init_from: str | None = None  # a run whose best weights start this training (`recreason distill` sets it)
    preference_beta: float = 0.1  # DPO's beta, for examples that carry a rejected text (`distill.mode: preference`)
    preference_sft_weight: float = 1.0  # + this x the chosen text's NLL beside the preference loss
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
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"train.precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
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
    no_repeat_ngram: int = 0  # ban repeating any n tokens of the reason itself (0 = off; the prompt's may recur)
    min_new_tokens: int = 0  # a reason may not end (end of text, special token, line break) before N tokens (0 = off)
    precision: str = "auto"  # auto (bf16 where native, else fp32) | bf16 | fp32: weights used for generation
    max_records: int | None = None  # generate for the first N records of the split only
    # Choose, don't just decode: with candidates > 1 the greedy text and candidates - 1 samples are scored
    # and the best is kept (recreason.inference.selection). 1 = plain decoding with the settings above.
    candidates: int = 1
    sample_temperature: float = 0.8  # sampling settings of the extra candidates
    sample_top_p: float = 0.95
    sample_stream: str = "counter"  # counter: a sample's random numbers hashed from (seed, step, token), only for
    # the tokens it can choose | mt19937: a torch generator's number per vocabulary token and step (slower; the
    # stream of the quality tables recorded before 2026-12-05)
    kernels: str = "torch"  # torch: bf16 decoding on CPU as torch operations | compiled: the attention over a shared
    # prompt cache and the RMS norms as compiled C calls (recreason.models.kernels; torch's where no compiler builds)
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
class DistillConfig:
    """`recreason distill`: a second training stage on the run's own chosen reasons (docs/design.md)."""
    mode: str = "chosen"  # chosen: the chosen candidate is the target | mixed: chosen and the reference, both |
    # preference: DPO, the chosen candidate against the lowest-scored one, from the run's weights as reference
    pairs: int | None = 500  # training records whose candidates are decoded (the cost); null: all of them
    validation_pairs: int = 64  # validation records decoded: early stopping measures their chosen texts' loss
    seed: int = 0  # which training and validation records are drawn
    candidates: int | None = None  # the teacher's candidates per pair (null: generate.candidates)
    rejected: str = "lowest"  # preference's rejected text: lowest (the lowest-scored candidate) | greedy (the
    # run's greedy text where it was not chosen: DPO then moves the greedy decode itself toward the choice)


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
    # "whole": each batch of up to max_batch_size runs from start to end; "continuous": greedy reasons decode in
    # one running batch, joining and leaving between tokens (beams, sampling and candidates always go whole). On a
    # CPU prefill is most of the work and continuous batching measured no faster (docs/results.md)
    batching: str = "whole"


SECTIONS = {
    "prepare": PrepareConfig,
    "prompt": PromptConfig,
    "train": TrainConfig,
    "generate": GenerateConfig,
    "rank": RankConfig,
    "evaluate": EvaluateConfig,
    "distill": DistillConfig,
}


BIG = 10**9
# The valid range of every number (inclusive), and the choices of every word, checked when a config is read, so a
# bad value stops with one line naming the key, the value and the range before any work starts. A key with no
# entry here takes any value of its type (free text: prompt.system, train.model, ...).
LIMITS: dict[str, dict[str, tuple]] = {
    "prepare": {"rating_min": (-1e6, 1e6), "rating_max": (-1e6, 1e6), "max_reject_fraction": (0.0, 1.0),
                "min_feature_df": (1, BIG), "min_words": (1, 1000), "max_words": (1, 1000), "seeds": (0, 2**31 - 1),
                "n_process": (1, 256), "max_records": (1, 10**12), "max_record_bytes": (100, 2**31 - 1),
                "max_review_chars": (1, 10**8), "max_id_chars": (1, 10**5), "min_timestamp": (0, 2**40),
                "max_timestamp": (0, 2**40), "max_row_lines": (1, 10**4)},
    "prompt": {"user_features": (0, 100), "item_features": (0, 100), "history": (0, 100), "attributes": (0, 100),
               "evidence": (0, 100)},
    "train": {"lora_r": (1, 4096), "lora_alpha": (1, 65536), "lora_dropout": (0.0, 0.99),
              "lora_top_layers": (1, 10**4), "adapter_size": (1, 65536), "num_virtual_tokens": (1, 4096),
              "personal_lr": (1e-12, 10.0), "rating_weight": (0.0, 1000.0), "stage1_steps": (1, BIG),
              "stage1_lr": (1e-12, 10.0), "split_seed": (0, 2**31 - 1), "max_prompt_tokens": (1, 65536),
              "max_target_tokens": (1, 65536), "batch_size": (1, 65536), "grad_accum": (1, 65536),
              "lr": (1e-12, 10.0), "weight_decay": (0.0, 10.0), "warmup_ratio": (0.0, 1.0),
              "max_grad_norm": (1e-6, 1e6), "epochs": (1e-6, 10**4), "max_steps": (1, BIG),
              "max_train_records": (1, 10**12), "eval_every": (1, BIG), "max_eval_records": (1, 10**9),
              "checkpoint_every": (1, BIG), "patience": (1, 10**4), "snapshot_steps": (1, BIG),
              "seed": (0, 2**32 - 1), "num_threads": (1, 4096), "preference_beta": (1e-6, 1e4),
              "preference_sft_weight": (0.0, 1e4)},
    "generate": {"max_new_tokens": (1, 4096), "batch_size": (1, 4096), "num_beams": (1, 64),
                 "temperature": (1e-4, 100.0), "top_p": (1e-6, 1.0), "seed": (0, 2**32 - 1),
                 "no_repeat_ngram": (0, 64), "min_new_tokens": (0, 4096), "max_records": (1, 10**12), "candidates": (1, 256), "sample_temperature": (1e-4, 100.0),
                 "sample_top_p": (1e-6, 1.0), "weight_likelihood": (-1e4, 1e4), "weight_grounded": (-1e4, 1e4),
                 "weight_ungrounded": (-1e4, 1e4), "weight_user": (-1e4, 1e4), "weight_generic": (-1e4, 1e4),
                 "weight_consensus": (-1e4, 1e4), "weight_consensus_bleu": (-1e4, 1e4),
                 "weight_length": (-1e4, 1e4), "generic_records": (0, 10**6)},
    "rank": {"factors": (1, 4096), "regularization": (0.0, 1e6), "iterations": (1, 10**4), "alpha": (0.0, 1e6),
             "learning_rate": (1e-9, 10.0), "popularity_weight": (0.0, 1e6), "seed": (0, 2**32 - 1)},
    "evaluate": {"max_len": (1, 1000), "bootstrap": (0, 10**6)},
    "distill": {"pairs": (1, 10**12), "validation_pairs": (1, 10**9), "seed": (0, 2**32 - 1)},
}
CHOICES: dict[str, dict[str, tuple]] = {
    "prepare": {"schema": ("auto", "amazon", "generic"), "split": ("random", "temporal"),
                "language": ("auto", "en", "zh")},
    "train": {"method": METHODS, "optimizer": ("adamw", "sgd"), "scheduler": ("linear", "cosine"),
              "attn_implementation": ("auto", "eager", "sdpa", "flash_attention_2"), "target": ("sentence", "summary"),
              "prompt_mode": ("discrete", "continuous", "hybrid"), "rating_head": ("mf", "mlp"),
              "precision": ("auto", "bf16", "fp16", "fp32"), "report_to": ("tensorboard", "wandb")},
    "generate": {"precision": ("auto", "bf16", "fp32"), "sample_stream": ("counter", "mt19937"),
                 "kernels": ("torch", "compiled")},
    "rank": {"model": ("als", "bpr", "popularity")},
    "distill": {"mode": ("chosen", "mixed", "preference"), "rejected": ("lowest", "greedy")},
    "evaluate": {"split": ("train", "validation", "test"), "systems": ("zero-shot", "retrieval", "fine-tuned")},
}
MAX_DECODE_ROWS = 8192  # generate.batch_size x generate.candidates sequences decoded at once


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


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_one(value: Any, kind: str, limits: tuple | None, choices: tuple | None, where: str) -> None:
    """One scalar against its kind ("int", "float", "str", "bool") and its range or choices."""
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, str)
    if not ok:
        wanted = {"bool": "true or false", "int": "an integer", "float": "a finite number"}.get(kind, "a string")
        raise ConfigError(f"{where}: expected {wanted}, got {_shown(value)}")
    if limits is not None and not limits[0] <= value <= limits[1]:
        raise ConfigError(f"{where}: {_shown(value)} is out of range; valid: {limits[0]:g} to {limits[1]:g}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {_shown(value)} is not one of {', '.join(map(str, choices))}")


def check_value(section: str, key: str, value: Any, annotation: str, where: str) -> None:
    """``value`` against the field's type (``annotation``), :data:`LIMITS` and :data:`CHOICES`; a
    :class:`ConfigError` of one line naming the key, the value and what is valid otherwise."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None:
        if "None" not in kinds:
            raise ConfigError(f"{where}: null is not valid; expected {annotation}")
        return
    limits, choices = LIMITS.get(section, {}).get(key), CHOICES.get(section, {}).get(key)
    base = kinds[0]
    if base.startswith("dict["):
        if not isinstance(value, dict) or len(value) > 1000:
            raise ConfigError(f"{where}: expected a mapping of names to names, got {_shown(value)}")
        for name, other in value.items():
            _check_one(name, "str", None, None, where)
            _check_one(other, "str", None, None, f"{where}[{_shown(name)}]")  # a key may hold newlines
        return
    if base.startswith(("list[", "Sequence[")):
        inner = base[base.index("[") + 1:-1]
        if not isinstance(value, (list, tuple)) or len(value) > 1000:
            raise ConfigError(f"{where}: expected a list of {inner} (at most 1000), got {_shown(value)}")
        for item in value:
            _check_one(item, inner, limits, choices, where)
        return
    _check_one(value, base, limits, choices, where)


def _apply(obj, values: dict[str, Any], where: str, section: str = "") -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {_shown(values)}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(sorted(fields))}")
        annotation = str(fields[key].type)
        value = _coerce(value, annotation, f"{where}: {key}")
        check_value(section, key, value, annotation, f"{where}: {key}")
        setattr(obj, key, value)


def check_together(config: dict[str, Any]) -> None:
    """Rules between keys of one section, checked once every layer is applied."""
    prepare, gen = config["prepare"], config["generate"]
    if prepare.rating_min >= prepare.rating_max:
        raise ConfigError(f"prepare.rating_min ({prepare.rating_min:g}) must be below prepare.rating_max "
                          f"({prepare.rating_max:g})")
    if prepare.min_words > prepare.max_words:
        raise ConfigError(f"prepare.min_words ({prepare.min_words}) must not exceed prepare.max_words "
                          f"({prepare.max_words})")
    if prepare.min_timestamp >= prepare.max_timestamp:
        raise ConfigError("prepare.min_timestamp must be below prepare.max_timestamp")
    if not prepare.seeds:
        raise ConfigError("prepare.seeds: give at least one split seed")
    if gen.batch_size * gen.candidates * max(1, gen.num_beams) > MAX_DECODE_ROWS:
        raise ConfigError(f"generate.batch_size x generate.candidates x generate.num_beams = "
                          f"{gen.batch_size * gen.candidates * max(1, gen.num_beams)} sequences decoded at once; "
                          f"at most {MAX_DECODE_ROWS}: lower the batch size")
    config["train"].validate()


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
            _apply(config[section], values or {}, f"{path}: {section}", section)
    for item in overrides or []:
        label = item if item.isprintable() and len(item) <= 80 else _shown(item)  # one line in every message
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in SECTIONS:
            raise ConfigError(f"--set {label}: expected section.key=value with section in {', '.join(SECTIONS)}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--set {label}: the value is not valid YAML") from None
        _apply(config[section], {name: value}, f"--set {label}", section)
    check_together(config)
    return config


def to_dict(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(obj) for name, obj in config.items()}
