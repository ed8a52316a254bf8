import json

import pytest

from conftest import write_jsonl
from recreason.cli import build_parser, main
from recreason.config import ConfigError, load_config


def test_shipped_configs_load_against_the_dataclasses():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    paths = sorted(root.rglob("*.yaml"))
    assert len(paths) >= 10  # default, demo and the experiment overrides
    for path in paths:
        config = load_config([root / "demo.yaml", path])
        config["train"].validate()
        assert config["train"].model == "smollm2-135m"
    default = load_config(root / "default.yaml")
    fresh = load_config(None)
    assert {k: vars(v) for k, v in default.items()} == {k: vars(v) for k, v in fresh.items()}
    import yaml  # default.yaml lists every key, so users can read every setting in one place

    listed = yaml.safe_load((root / "default.yaml").read_text())
    assert {section: set(keys) for section, keys in listed.items()} == {k: set(vars(v)) for k, v in fresh.items()}


def test_overrides_and_unknown_keys(tmp_path):
    cfg = load_config(None, ["train.lr=5e-4", "generate.num_beams=3"])
    assert cfg["train"].lr == 5e-4 and cfg["generate"].num_beams == 3
    with pytest.raises(ConfigError, match="unknown key 'lrate'"):
        load_config(None, ["train.lrate=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        load_config(bad)


def test_prepare_and_export_from_the_command_line(real_lines, tmp_path, capsys):
    src = write_jsonl(tmp_path / "reviews.jsonl", real_lines[:200] + ["{oops\n"])
    out = tmp_path / "ds"
    assert main(["prepare", str(src), "--out", str(out), "--quiet", "--set", "prepare.min_feature_df=3"]) == 0
    printed = capsys.readouterr().out
    assert "read 201 records: 1 rejected" in printed
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["raw"]) for r in rejects] == [(201, "{oops\n")]
    assert "JSON" in rejects[0]["reason"]
    assert main(["export", str(out), "--format", "nete", "--out", str(tmp_path / "nete")]) == 0
    assert (tmp_path / "nete" / "reviews.pickle").exists()


def test_errors_are_reported_without_tracebacks(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "r"), "--model", "no/such-model"]) == 2
    assert "not a prepared dataset" in capsys.readouterr().err


def test_unknown_model_explains_how_to_provide_one():
    from recreason.models.registry import ModelNotFound, resolve_model

    with pytest.raises(ModelNotFound, match="never downloads"):
        resolve_model("someone/not-cached-model")


def test_help_describes_every_command_and_option():
    import argparse

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"prepare", "export", "train", "generate", "evaluate", "recommend", "serve"} <= set(commands)
    for name, sub in commands.items():
        func = sub.get_default("func")
        assert func.__doc__ and sub.description == func.__doc__, name
        undocumented = [a.dest for a in sub._actions if not a.help and a.dest not in ("help",)]
        assert not undocumented, f"recreason {name}: options without help: {undocumented}"


def test_numbers_in_yaml_scientific_notation_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  max_steps: '20'\n")
    cfg = load_config(path)
    assert cfg["train"].lr == 0.001 and cfg["train"].max_steps == 20
    with pytest.raises(ConfigError, match="expected int"):
        load_config(None, ["train.batch_size=many"])
