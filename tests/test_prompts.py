from recreason.data.records import Explained
from recreason.prompts.discrete import DiscretePrompter


def rec(index, user, item, features):
    return Explained(index, user, item, 5.0, index, features[0], "good", f"the {features[0]} is good", 1,
                     features=features)


def test_own_review_never_feeds_its_prompt_and_shared_features_come_first():
    train = [
        rec(0, "u1", "i1", ["tone"]),
        rec(1, "u1", "i2", ["strings", "price"]),
        rec(2, "u2", "i1", ["price"]),
        rec(3, "u3", "i1", ["cable", "price"]),
    ]
    p = DiscretePrompter(train)
    # Record 1 is u1's only review mentioning strings/price: they must vanish from u1's profile for it.
    user_feats, item_feats = p.features("u1", "i2", train[1])
    assert user_feats == ["tone"] and item_feats == []
    # For a test pair nothing is excluded; the shared feature (price) is listed first for the item.
    user_feats, item_feats = p.features("u1", "i1")
    assert set(user_feats) == {"tone", "strings", "price"}
    assert item_feats[0] in {"tone", "price"} and set(item_feats) == {"tone", "price", "cable"}
    assert item_feats.index("cable") == 2


def test_test_records_never_feed_profiles():
    train = [rec(0, "u1", "i1", ["tone"])]
    test_record = rec(1, "u1", "i1", ["secret"])
    p = DiscretePrompter(train)
    text = p.for_record(test_record)[1]["content"]
    assert "secret" not in text and "tone" in text
