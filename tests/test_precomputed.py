"""Precomputed reasons served from the store (serve --reasons): stored pairs answered without the model, marked as
such; rows of another run never served; a user whose history changed gets live reasons again."""

import json

import pytest


@pytest.fixture()
def served(tiny_run, tmp_path):
    from fastapi.testclient import TestClient

    from recreason.config import GenerateConfig
    from recreason.inference import Predictor
    from recreason.jobs import explain_pairs, recommend_all
    from recreason.serving.app import create_app
    from recreason.serving.precomputed import import_reasons
    from recreason.serving.service import ExplanationService
    from recreason.serving.store import open_store

    gen = GenerateConfig(max_new_tokens=4, precision="fp32")
    predictor = Predictor(tiny_run[0], gen)
    records = predictor.dataset.subset(1, "test")[:6]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"user_id": r.user, "item_id": r.item}) + "\n" for r in records[:4]))
    explain_pairs(predictor, pairs, tmp_path / "reasons.jsonl", progress=False)
    users = sorted(predictor.prompter.user_profiles)[:3]
    recommend_all(predictor, 2, tmp_path / "top.csv", progress=False, users=users)
    shards = tmp_path / "shards"  # the Ray engine's layout: a folder of part-* files
    shards.mkdir()
    (shards / "part-00000.jsonl").write_text((tmp_path / "reasons.jsonl").read_text())
    other = json.loads((tmp_path / "reasons.jsonl").read_text().splitlines()[0])
    (tmp_path / "other.jsonl").write_text(json.dumps({**other, "model": "another-run", "reason": "NOT MINE"}) + "\n")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = open_store(url)
    counts = [import_reasons(store, path, predictor.model_tag)
              for path in (shards, tmp_path / "top.csv", tmp_path / "other.jsonl")]
    store.close()
    service = ExplanationService(tiny_run[0], store_url=url, gen_cfg=gen)
    yield TestClient(create_app(service)), service, records, users, counts, tmp_path
    service.close()


def test_stored_pairs_are_answered_from_the_store_without_the_model(served, monkeypatch):
    client, service, records, users, counts, tmp_path = served
    assert [c["stored"] for c in counts] == [4, 6, 0] and counts[2]["other_runs"] == 1
    stored = {(r["user_id"], r["item_id"]): r for r in map(json.loads, (tmp_path / "reasons.jsonl").open())}
    calls = []
    real = service.predictor.explain
    monkeypatch.setattr(service.predictor, "explain", lambda reqs, *a, **k: calls.append(len(reqs)) or real(reqs, *a, **k))
    body = {"items": [{"user_id": r.user, "item_id": r.item} for r in records[:4]]}
    answer = client.post("/v1/explanations", json=body).json()["explanations"]
    assert calls == [] and all(a["precomputed"] for a in answer)
    assert [a["reason"] for a in answer] == [stored[(r.user, r.item)]["reason"] for r in records[:4]]
    assert "NOT MINE" not in json.dumps(answer)  # another run's row is never served
    mixed = client.post("/v1/explanations", json={"items": body["items"][:1] + [
        {"user_id": records[5].user, "item_id": records[5].item}]}).json()["explanations"]
    assert [a["precomputed"] for a in mixed] == [True, False] and calls == [1]
    assert mixed[0] == answer[0]  # the route's stored row (a mixed request) reads as the front door's
    top = client.get("/v1/recommendations", params={"user_id": users[0], "k": 2}).json()["recommendations"]
    assert calls == [1] and len(top) == 2 and all(r["precomputed"] for r in top)
    assert top[0]["score"] >= top[1]["score"]


def test_a_user_whose_history_changed_gets_live_reasons_again(served):
    client, service, records, users, counts, tmp_path = served
    user, item = records[0].user, records[0].item
    item_body = {"items": [{"user_id": user, "item_id": item}]}
    assert client.post("/v1/explanations", json=item_body).json()["explanations"][0]["precomputed"]
    new = {"user_id": user, "item_id": records[1].item, "rating": 5.0, "text": "Great tone and easy strings.",
           "timestamp": 1_400_000_000}
    assert client.post("/v1/interactions", json=new).status_code == 200
    assert not client.post("/v1/explanations", json=item_body).json()["explanations"][0]["precomputed"]
    with_options = {**item_body, "options": {"max_new_tokens": 3}}
    assert not client.post("/v1/explanations", json=with_options).json()["explanations"][0]["precomputed"]


def test_the_front_door_checks_keys_and_bodies_as_the_route_does(served, monkeypatch):
    """StoredAnswers answers all-stored requests before routing: with the same key check (401 without one) and the
    same request model (422 naming the field), and without ever calling the model or the service's live path."""
    from fastapi.testclient import TestClient

    from recreason.serving.app import create_app

    _, service, records, _, _, _ = served
    monkeypatch.setattr(service, "explain", lambda *a, **k: (_ for _ in ()).throw(AssertionError("live path")))
    client = TestClient(create_app(service, api_keys={"secret"}))
    body = {"items": [{"user_id": records[0].user, "item_id": records[0].item}]}
    assert client.post("/v1/explanations", json=body).status_code == 401
    assert client.post("/v1/explanations", json=body, headers={"X-API-Key": "wrong"}).status_code == 401
    ok = client.post("/v1/explanations", json=body, headers={"Authorization": "Bearer secret"})
    assert ok.status_code == 200 and ok.json()["explanations"][0]["precomputed"] and ok.headers["x-request-id"]
    bad = client.post("/v1/explanations", json={"items": [{"user_id": "", "item_id": records[0].item}]},
                      headers={"X-API-Key": "secret"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "items.0.user_id"
    metrics = client.get("/metrics").text
    assert 'recreason_requests_total{path="/v1/explanations",status="200"} 1.0' in metrics
