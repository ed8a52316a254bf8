"""Soft prompts, two-stage training, rating/interest heads, ranking metrics and cold start."""

import math

import pytest
import torch

from recreason.evaluation import ranking
from recreason.models.personalized import RecReasonModel, interest_class
from recreason.config import TrainConfig
from recreason.training.data import Example, collate, joint_loss


@pytest.fixture()
def tiny_lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_soft_prompt_positions_masks_and_labels(tiny_lm):
    model = RecReasonModel(tiny_lm, ["u1", "u2"], ["i1"], prompt_mode="continuous")
    batch = collate([Example([5, 6, 7], [8, 2]), Example([5], [9, 2])], pad_id=0)
    u, i = model.ids(["u2", "ghost"], ["i1", "i1"])
    assert u.tolist() == [2, 0] and i.tolist() == [1, 1]
    inputs = model._lm_inputs(batch["input_ids"], batch["attention_mask"], u, i)
    emb = inputs["inputs_embeds"]
    assert emb.shape == (2, 7, tiny_lm.config.hidden_size)
    assert torch.equal(emb[0, 0], model.user_emb.weight[2]) and torch.equal(emb[1, 1], model.item_emb.weight[1])
    # Row 2 has an unknown user: its user token is masked out, never a random vector in use.
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 1], [0, 1, 0, 0, 1, 1, 1]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, 2, 3]]
    # Labels stay -100 on every prompt position; the loss reads only the target tail.
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 2], [-100, -100, -100, 9, 2]]
    loss, parts = joint_loss(model, batch, 0.1)
    assert parts["tokens"] == 4 and torch.isfinite(loss)


def test_unknown_ids_fall_back_to_the_text_prompt(tiny_lm):
    model = RecReasonModel(tiny_lm, ["u1"], ["i1"], prompt_mode="hybrid")
    ids = torch.tensor([[11, 12, 13, 14]])
    mask = torch.ones_like(ids)
    u, i = model.ids(["nobody"], ["nothing"])
    with_soft = model.generate(ids, mask, u, i, max_new_tokens=6, do_sample=False, pad_token_id=0)
    plain = RecReasonModel(tiny_lm).generate(ids, mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert with_soft.tolist() == plain.tolist()


def test_kv_cached_generation_matches_uncached(tiny_lm):
    model = RecReasonModel(tiny_lm, ["u1", "u2"], ["i1", "i2"], prompt_mode="hybrid")
    batch = collate([Example([11, 12, 13, 14], []), Example([21, 22], [])], pad_id=0)
    u, i = model.ids(["u1", "u2"], ["i2", "i1"])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(batch["input_ids"], batch["attention_mask"], u, i, use_cache=True, **kw)
    uncached = model.generate(batch["input_ids"], batch["attention_mask"], u, i, use_cache=False, **kw)
    assert cached.shape == (2, 8)
    assert cached.tolist() == uncached.tolist()


def test_rating_heads_learn_a_synthetic_signal(tiny_lm):
    users = [f"u{n}" for n in range(8)]
    items = [f"i{n}" for n in range(8)]
    # Users 0-3 love even items, users 4-7 love odd ones.
    pairs = [(u, i) for u in range(8) for i in range(8)]
    ratings = torch.tensor([5.0 if (u < 4) == (i % 2 == 0) else 1.0 for u, i in pairs])
    for kind in ("mf", "mlp"):
        torch.manual_seed(0)
        model = RecReasonModel(tiny_lm, users, items, rating_head=kind, interest_head=True, rating_mean=3.0)
        uidx, iidx = model.ids([f"u{u}" for u, _ in pairs], [f"i{i}" for _, i in pairs])
        classes = torch.tensor([interest_class(float(r)) for r in ratings])
        opt = torch.optim.Adam(model.personal_parameters(), lr=0.02)
        for _ in range(300):
            loss = torch.nn.functional.mse_loss(model.predict_rating(uidx, iidx), ratings)
            loss = loss + torch.nn.functional.cross_entropy(model.predict_interest(uidx, iidx), classes)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            rmse = float(((model.predict_rating(uidx, iidx) - ratings) ** 2).mean().sqrt())
            acc = float((model.predict_interest(uidx, iidx).argmax(-1) == classes).float().mean())
        assert rmse < 0.5, kind  # predicting the mean would give 2.0
        assert acc > 0.9, kind


def test_two_stage_training_freezes_the_lm_in_stage_one(prepared_dir, tiny_model_dir, tmp_path):
    from recreason.training.trainer import train

    snapshots = {}

    def watch(step, model):
        lora = [p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n]
        snapshots[step] = (lora, model.user_emb.weight.detach().clone(), model.user_bias.weight.detach().clone())

    cfg = TrainConfig(model=str(tiny_model_dir), method="lora", lora_r=4, lr=1e-2, batch_size=8, max_steps=3,
                      eval_every=3, max_eval_records=16, precision="fp32", prompt_mode="continuous",
                      rating_head="mf", two_stage=True, stage1_steps=3, stage1_lr=1e-2, warmup_ratio=0.0)
    summary = train(prepared_dir, tmp_path, cfg, progress=False, on_step=watch)
    assert summary["steps"] == 6
    lora1, users1, _ = snapshots[1]
    lora3, users3, _ = snapshots[3]
    lora6, _, _ = snapshots[6]
    assert all(float(t.abs().sum()) == 0.0 for t in lora3)  # LoRA B starts at zero and stays there in stage 1
    assert not torch.equal(users1, users3)  # the user vectors do learn in stage 1
    assert any(float(t.abs().sum()) > 0.0 for t in lora6)  # stage 2 trains the adapter too
    assert (tmp_path / "best" / "personal.safetensors").exists()


def test_ranking_metrics_hand_computed():
    assert ranking.rank_of_target(0.9, [0.1, 0.95, 0.5]) == 2
    assert ranking.rank_of_target(0.5, [0.5, 0.5]) == 3  # ties rank the target last
    ranks = [1, 3, 12]
    assert ranking.hit_ratio(ranks, 10) == pytest.approx(2 / 3)
    assert ranking.ndcg(ranks, 10) == pytest.approx((1 / math.log2(2) + 1 / math.log2(4)) / 3)


def test_popularity_and_mf_baselines(prepared_dir):
    from recreason.data.dataset import Dataset
    from recreason.evaluation.metrics import rmse

    ds = Dataset(prepared_dir)
    train, test = ds.subset(1, "train"), ds.subset(1, "test")
    negatives = ranking.sample_negatives(ds.records, test, n_negatives=20, seed=0)
    seen = {(r.user, r.item) for r in ds.records}
    assert all((r.user, n) not in seen for r, negs in zip(test, negatives) for n in negs)
    assert negatives == ranking.sample_negatives(ds.records, test, n_negatives=20, seed=0)
    pop = ranking.PopularityBaseline(train)
    result = ranking.evaluate_ranking(pop.score, test, negatives, ks=(5,))
    assert 0.0 <= result["NDCG@5"] <= result["HR@5"] <= 1.0
    mf = ranking.MatrixFactorization(train, epochs=20)
    train_rmse = rmse([mf.predict(r.user, r.item) for r in train], [r.rating for r in train], 1, 5)
    mean_rmse = rmse([pop.predict(r.user, r.item) for r in train], [r.rating for r in train], 1, 5)
    assert train_rmse < mean_rmse  # MF fits the training ratings better than the mean


def test_recommend_and_evaluate_a_run_with_heads(prepared_dir, tiny_model_dir, tmp_path, capsys):
    import json

    from recreason.cli import main
    from recreason.data.dataset import Dataset
    from recreason.training.trainer import train

    cfg = TrainConfig(model=str(tiny_model_dir), method="lora", lora_r=4, lr=1e-2, batch_size=8, max_steps=4,
                      eval_every=4, max_eval_records=16, precision="fp32", prompt_mode="hybrid",
                      rating_head="mlp", interest_head=True)
    train(prepared_dir, tmp_path / "run", cfg, progress=False)
    ds = Dataset(prepared_dir)
    user = ds.subset(1, "train")[0].user
    seen = {r.item for r in ds.subset(1, "train") if r.user == user}  # the history the run knows
    args = ["recommend", "--run", str(tmp_path / "run"), "--user", user, "-k", "3", "--json",
            "--set", "generate.max_new_tokens=4", "--set", "generate.precision=fp32"]
    assert main(args) == 0
    recs = json.loads(capsys.readouterr().out)["recommendations"]
    assert len(recs) == 3 and not seen & {r["item_id"] for r in recs}
    assert [r["score"] for r in recs] == sorted((r["score"] for r in recs), reverse=True)
    assert all(r["interest"] in ("low", "medium", "high") and isinstance(r["reason"], str) for r in recs)
    # Cold start: an unknown user gets item-only reasons ranked by popularity, or a clear error.
    assert main(args[:4] + ["ghost"] + args[5:]) == 0
    assert len(json.loads(capsys.readouterr().out)["recommendations"]) == 3
    assert main(args[:4] + ["ghost", "--cold-start", "error"] + args[5:]) == 2
    assert "unknown user 'ghost'" in capsys.readouterr().err

    from recreason.evaluation.evaluate import evaluate_runs
    from recreason.generation.generate import GenerateConfig

    report = evaluate_runs([tmp_path / "run"], gen_cfg=GenerateConfig(max_new_tokens=4, max_records=12,
                                                                      precision="fp32"),
                           systems=["retrieval", "fine-tuned"], progress=False, n_negatives=20)
    row = report["results"]["fine-tuned"]
    for key in ("RMSE", "MAE", "HR@10", "NDCG@10", "InterestF1", "SentAgree", "BLEU-4", "Ungrounded", "Filtered"):
        assert key in row
    assert report["results"]["matrix factorization"]["RMSE"] > 0


def test_candidates_of_a_soft_prompt_model_keep_one_prefill_per_draw(tiny_lm, tokenizer_dir):
    """User/item vectors enter as embeddings, which the shared prefill does not take: such a model decodes its
    candidates as before (each draw runs the whole prompt) and its greedy draw is its greedy decoding."""
    from transformers import AutoTokenizer

    from recreason.config import GenerateConfig
    from recreason.generation.generate import _shared_prefill_lm, generate_candidates, generate_texts

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = RecReasonModel(tiny_lm, ["u1", "u2"], ["i1", "i2"], prompt_mode="hybrid")
    u, i = model.ids(["u1"], ["i2"])
    assert _shared_prefill_lm(model, {"user_idx": u, "item_idx": i}) is None
    assert _shared_prefill_lm(RecReasonModel(tiny_lm), {}) is tiny_lm
    prompts, users, items = ["strings with a bright tone", "a cable"], ["u1", "u2"], ["i2", "i1"]
    cfg = GenerateConfig(max_new_tokens=5, precision="fp32", candidates=3, batch_size=2)
    cands = generate_candidates(model, tok, prompts, cfg, progress=False, users=users, items=items)
    greedy = generate_texts(model, tok, prompts, GenerateConfig(max_new_tokens=5), progress=False,
                            users=users, items=items)
    assert [c[0].text for c in cands] == greedy
    assert [sum(c.count for c in row) for row in cands] == [3, 3]
