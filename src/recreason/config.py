"""Layered configuration: dataclass defaults < YAML file < ``--set section.key=value`` < CLI flags.

A config file has one mapping per stage (``prepare``, ``prompt``, ``train``,
``generate``, ``evaluate``); each key must be a field of that stage's
dataclass, so a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recreason.data.dataset import PrepareConfig
from recreason.generation.generate import GenerateConfig
from recreason.prompts.discrete import PromptConfig
from recreason.training.config import TrainConfig


@dataclass
class EvaluateConfig:
    split: str = "test"
    max_len: int = 20  # tokens compared per sentence, as in PEPLER
    systems: list[str] = field(default_factory=lambda: ["zero-shot", "retrieval", "fine-tuned"])


SECTIONS = {
    "prepare": PrepareConfig,
    "prompt": PromptConfig,
    "train": TrainConfig,
    "generate": GenerateConfig,
    "evaluate": EvaluateConfig,
}


class ConfigError(ValueError):
    pass


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
