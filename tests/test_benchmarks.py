"""The comparison helpers of benchmarks/quality.py, checked against values worked by hand."""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality  # noqa: E402


def test_unpaired_difference_combines_both_intervals_as_independent_errors():
    # ours 2.0 with interval 1.0-3.0: standard error 2 / 3.92; PETER 1.0 with 0.5-1.5: 1 / 3.92.
    # Together sqrt(4 + 1) / 3.92 = 0.57042; 1.96 x that = 1.11803, around the difference 1.0.
    low, high = quality.unpaired_difference(2.0, (1.0, 3.0), 1.0, (0.5, 1.5))
    assert math.isclose(low, 1.0 - 1.118034, abs_tol=1e-5)
    assert math.isclose(high, 1.0 + 1.118034, abs_tol=1e-5)


def test_unpaired_difference_is_wider_than_either_interval_alone():
    low, high = quality.unpaired_difference(1.15, (0.76, 1.55), 0.59, (0.0, 0.78))
    assert high - low > 1.55 - 0.76 and high - low > 0.78


def test_rate_upper_bound_is_the_one_sided_wilson_bound():
    # 30 of 300 (0.1), z = 1.645: centre 0.1 + 0.0045100 = 0.1045100; spread 1.645 * sqrt(0.0003 + 0.0000075)
    # = 1.645 * 0.0175362 = 0.0288470; (0.1045100 + 0.0288470) / (1 + 0.0090201) = 0.13216
    assert math.isclose(quality.rate_upper_bound(0.1, 300), 0.13216, abs_tol=5e-5)


def test_shipped_configs_carry_the_weights_the_tuning_chose():
    # full.yaml and grounded.yaml copy the two settings benchmarks/quality.py --tune recorded; quality.py scores
    # test with the recorded ones, so a config that drifted from them would not be the configuration measured.
    from recreason.config import load_config

    root = Path(__file__).resolve().parents[1]
    tuning = json.loads((root / "benchmarks" / "results" / "quality" / "tuning.json").read_text())
    full = load_config([root / "configs" / "demo.yaml", root / "configs" / "full.yaml"])["generate"]
    grounded = load_config([root / "configs" / "demo.yaml", root / "configs" / "full.yaml",
                            root / "configs" / "grounded.yaml"])["generate"]
    for config, weights in ((full, tuning["best"]["weights"]), (grounded, tuning["best_within_bar"]["weights"])):
        assert {k: getattr(config, k) for k in weights} == weights
    assert full.candidates == tuning["candidates"]
