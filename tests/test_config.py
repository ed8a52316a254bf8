"""Config values: every key of configs/default.yaml has a valid range or set of choices, checked when the config is
read; out-of-range values stop with one line naming the key and the value, never a traceback later."""

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from recreason.config import CHOICES, LIMITS, SECTIONS, load_config
from recreason.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
KEYS = [(section, key) for section, values in DEFAULTS.items() if section in SECTIONS for key in values]

HOSTILE = st.one_of(
    st.integers(min_value=-10**20, max_value=10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, -5, 10**9, 2**63, float("nan"), float("inf"), -0.0, True, None, "", "x" * 5000]),
    st.text(max_size=20), st.lists(st.integers(min_value=-3, max_value=3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def documented(section: str, key: str, value) -> bool:
    """Whether an accepted value is one the config documents as valid: inside the key's range or choices (a key
    with neither is free text or a switch: any value of its type)."""
    limits, choices = LIMITS.get(section, {}).get(key), CHOICES.get(section, {}).get(key)
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if limits is not None and not (isinstance(v, (int, float)) and limits[0] <= v <= limits[1]):
            return False
        if choices is not None and v not in choices:
            return False
    return True


def test_every_numeric_key_has_a_range():
    for section, key in KEYS:
        default = DEFAULTS[section][key]
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if numeric or (isinstance(default, list) and default and isinstance(default[0], int)):
            assert key in LIMITS.get(section, {}), f"{section}.{key} has no range in recreason.config.LIMITS"


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(KEYS), HOSTILE)
@example(("prepare", "columns"), {"\n\n    ": 0})  # a mapping key with newlines: once a two-line error
def test_a_hostile_value_is_one_line_of_error_or_a_documented_accept(key, value):
    section, name = key
    try:
        raw = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    except yaml.YAMLError:
        return
    try:
        config = load_config(None, [f"{section}.{name}={raw}"])
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and name in message, message
        return
    accepted = getattr(config[section], name)
    assert documented(section, name, accepted), f"{section}.{name}={raw} accepted as {accepted!r}"


@pytest.mark.parametrize("setting, words", [
    ("generate.candidates=1000000", "1 to 256"), ("generate.candidates=0", "1 to 256"),
    ("generate.candidates=-3", "1 to 256"), ("generate.batch_size=-1", "1 to 4096"),
    ("generate.batch_size=0", "1 to 4096"), ("train.max_steps=-5", "out of range"),
    ("prepare.max_reject_fraction=nan", "finite"), ("prepare.seeds=5", "list"), ("prepare.n_process=0", "1 to 256"),
    ("train.batch_size=[1,2]", "integer"), ("train.lr=nan", "finite"), ("train.lr=-1", "out of range"),
    ("train.epochs=nan", "finite"), ("generate.max_new_tokens=0", "1 to 4096"), ("generate.num_beams=0", "1 to 64"),
    ("generate.temperature=0", "out of range"), ("generate.batch_size=64", "sequences decoded at once"),
])
def test_the_values_found_hostile_are_refused_with_the_key_and_the_range(setting, words):
    extra = ["generate.candidates=256"] if setting == "generate.batch_size=64" else []
    with pytest.raises(ConfigError) as caught:
        load_config(None, [setting, *extra])
    assert words in str(caught.value) and setting.split("=")[0].split(".")[1] in str(caught.value)


def test_a_config_file_is_held_to_the_same_ranges(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("generate:\n  candidates: 100000\n")
    with pytest.raises(ConfigError, match="candidates: 100000 is out of range"):
        load_config([bad])
    bad.write_text("generate: [1, 2]\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config([bad])


def test_auto_precision_is_bf16_only_where_it_is_native(monkeypatch, caplog):
    # an AVX2-only CPU emulates bf16 matrix products (57x slower than fp32 on one): auto must pick fp32 there
    import torch

    from recreason.models import registry

    assert registry.resolve_precision("auto", "cuda:0") == "bf16"
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert registry.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
        assert registry.resolve_precision("fp32", "cpu") == "fp32"
    registry._warned_bf16.discard("cpu")
    with caplog.at_level("WARNING"):
        assert registry.resolve_precision("bf16", "cpu") == "bf16"  # asked for explicitly: kept, with a warning
    assert "tens of times slower" in caplog.text
    assert load_config(None)["train"].precision == "auto" and load_config(None)["generate"].precision == "auto"
