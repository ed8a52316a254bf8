"""The ranking stage (implicit's ALS/BPR behind one small interface) and full-ranking metrics."""

import numpy as np
import pytest

from recreason.config import RankConfig
from recreason.data.records import Explained
from recreason.errors import CheckpointMismatch
from recreason.evaluation import ranking
from recreason.ranking import Ranker


def _pairs():
    # Two taste groups: guitar people (g*) like g-items, drum people (d*) like d-items; "pop" is liked by many.
    pairs = [(f"g{u}", f"g-item{i}") for u in range(12) for i in range(4) if (u + i) % 4 != 0]
    pairs += [(f"d{u}", f"d-item{i}") for u in range(12) for i in range(4) if (u + i) % 4 != 0]
    pairs += [(f"d{u}", "pop") for u in range(12)] + [(f"g{u}", "pop") for u in range(6)]
    return pairs


@pytest.mark.parametrize("model", ["als", "bpr"])
def test_library_model_learns_tastes_and_falls_back_to_popularity(model, tmp_path):
    # Two factors: room for the two groups, not for memorizing who skipped which item.
    cfg = RankConfig(model=model, factors=2, iterations=300 if model == "bpr" else 30, learning_rate=0.05,
                     regularization=0.1, seed=0)
    ranker = Ranker(cfg).fit(_pairs())
    seen = {i for u, i in _pairs() if u == "g0"}  # g0 has not seen g-item0
    top = ranker.recommend("g0", 1, exclude=seen)
    assert top[0][0] == "g-item0"  # its own group's unseen item beats the popular one
    # An unknown user gets popularity: "pop" (18 users), then the 9-user items in name order.
    assert [i for i, _ in ranker.recommend("stranger", 3)] == ["pop", "d-item0", "d-item1"]
    assert ranker.score("g0", ["never-seen"]) == [float("-inf")]
    loaded = Ranker.load(ranker.save(tmp_path / "ranker"))
    assert loaded.recommend("g0", 5, seen) == ranker.recommend("g0", 5, seen)
    (tmp_path / "ranker" / "ranker.npz").write_bytes(b"broken")
    with pytest.raises(CheckpointMismatch, match="ranker.npz|damaged"):
        Ranker.load(tmp_path / "ranker")


def test_full_ranking_hand_computed():
    def rec(index, user, item):
        return Explained(index, user, item, 5.0, index, "f", "o", "s", 1)

    train = [rec(0, "u1", "a"), rec(1, "u1", "b"), rec(2, "u2", "a"), rec(3, "u3", "c"), rec(4, "u3", "d")]
    test = [rec(5, "u1", "c"), rec(6, "u2", "d"), rec(7, "u2", "b")]
    fixed = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}  # the same order for everyone
    out = ranking.full_ranking(lambda u, items: [fixed[i] for i in items], train, test, ks=(1, 2), n_resamples=50)
    # u1 ranks c, d (c relevant): recall@1 1, ndcg@1 1. u2 ranks b, c, d (b, d relevant): recall@1 1/2,
    # ndcg@1 1, recall@2 1/2, ndcg@2 = 1 / (1 + 1/log2(3)).
    assert out["users"] == 2
    assert out["Recall@1"] == pytest.approx((1 + 0.5) / 2)
    assert out["full NDCG@1"] == pytest.approx(1.0)
    assert out["Recall@2"] == pytest.approx((1 + 0.5) / 2)
    assert out["full NDCG@2"] == pytest.approx((1 + 1 / (1 + 1 / np.log2(3))) / 2)
    lo, hi = out["Recall@2 CI"]
    assert 0.5 <= lo <= out["Recall@2"] <= hi <= 1.0
    # A constant scorer gets no credit from ties: relevant items rank last among equals.
    flat = ranking.full_ranking(lambda u, items: [0.0] * len(items), train, test, ks=(1,), n_resamples=1)
    assert flat["Recall@1"] == 0.0
