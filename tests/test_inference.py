"""One inference path: every command and the server give the same reason for the same (user, item, options)."""

import json

from fastapi.testclient import TestClient


def test_generate_recommend_predictor_and_server_agree(tiny_run, tmp_path, capsys):
    from recreason.cli import main
    from recreason.config import GenerateConfig
    from recreason.inference import Predictor
    from recreason.serving.app import create_app
    from recreason.serving.service import ExplanationService

    run = tiny_run[0]
    options = ["--set", "generate.max_new_tokens=6", "--set", "generate.precision=fp32", "--quiet"]
    gen = GenerateConfig(max_new_tokens=6, precision="fp32")
    out = tmp_path / "generated.jsonl"
    assert main(["generate", "--run", str(run), "--max-records", "4", "--out", str(out), *options]) == 0
    assert "wrote 4 explanations" in capsys.readouterr().out
    generated = [json.loads(line) for line in out.read_text().splitlines()]
    pairs = [(g["user"], g["item"]) for g in generated]

    predictor = Predictor(run, gen)
    direct = predictor.explain(pairs)
    assert [g["generated"] for g in generated] == [e.generated for e in direct]
    assert [g["reason"] for g in generated] == [e.reason for e in direct]
    assert [g["flags"] for g in generated] == [e.flags for e in direct]

    user, item = pairs[0]
    assert main(["recommend", "--run", str(run), "--user", user, "-k", "1000", "--json", *options]) == 0
    recommended = {r["item_id"]: r for r in json.loads(capsys.readouterr().out)["recommendations"]}
    assert item in recommended  # a test item is not in the user's training history
    assert recommended[item]["reason"] == direct[0].reason and recommended[item]["generated"] == direct[0].generated

    service = ExplanationService(run, store_url=f"sqlite:///{tmp_path / 'serving.db'}", gen_cfg=gen)
    try:
        client = TestClient(create_app(service))
        r = client.post("/v1/explanations", json={"items": [{"user_id": u, "item_id": i} for u, i in pairs]})
        assert r.status_code == 200, r.text
        served = r.json()["explanations"]
        assert [e["reason"] for e in served] == [e.reason for e in direct]
        assert [e["flags"] for e in served] == [e.flags for e in direct]
        assert [e["predicted_rating"] for e in served] == [e.predicted_rating for e in direct]
        r = client.post("/v1/recommendations", json={"user_id": user, "k": 5})
        assert [x["item_id"] for x in r.json()["recommendations"]] == list(recommended)[:5]
    finally:
        service.close()


def test_a_continuous_prompt_run_gets_the_bare_instruction_only_for_users_it_knows():
    from recreason.prompts.discrete import uses_soft_prompt

    assert uses_soft_prompt("continuous", True) and not uses_soft_prompt("continuous", False)
    assert not uses_soft_prompt("hybrid", True) and not uses_soft_prompt("discrete", True)
