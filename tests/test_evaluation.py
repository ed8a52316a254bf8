"""recreason evaluate: the table, the files it writes, and when generated texts are reused."""

import json


def test_evaluate_writes_table_for_all_systems(tiny_run):
    from recreason.evaluation.evaluate import evaluate_run
    from recreason.generation.generate import GenerateConfig

    report = evaluate_run(tiny_run[0], gen_cfg=GenerateConfig(max_new_tokens=6, max_records=10, precision="fp32"),
                          progress=False)
    assert set(report["results"]) == {"zero-shot", "retrieval", "fine-tuned", "popularity", "matrix factorization",
                                      "ranker (als)"}  # train() fits the ranking stage next to the run
    for key in ("HR@10", "NDCG@10", "Recall@10", "Recall@20", "full NDCG@10"):
        assert 0 <= report["results"]["ranker (als)"][key] <= 1 and key in report["results"]["popularity"]
    fine = report["results"]["fine-tuned"]
    for key in ("SemSim", "Distinct-1", "Distinct-2", "Generic", "UserFeat", "Ungrounded"):
        assert key in fine
    lo, hi = report["intervals"]["fine-tuned"]["ROUGE-L"]
    assert lo <= fine["ROUGE-L"] <= hi
    diff = report["differences_to_best_baseline"]["fine-tuned"]["ROUGE-L"]
    assert diff["baseline"] in ("zero-shot", "retrieval") and diff["low"] <= diff["diff"] <= diff["high"]
    assert "RMSE" not in report["results"]["fine-tuned"]  # this run has no rating head
    assert report["results"]["popularity"]["RMSE"] > 0
    assert report["records"] == 10
    saved = json.loads((tiny_run[0] / "eval" / "test.json").read_text())
    assert saved["results"]["retrieval"]["BLEU-1"] == report["results"]["retrieval"]["BLEU-1"]
    lines = (tiny_run[0] / "generated" / "test-retrieval.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    assert row["generated"] and row["reference"] and row["generated"] != row["reference"]


def test_evaluation_reuses_texts_only_from_the_same_model_and_settings(tiny_run, monkeypatch):
    import os

    from recreason.evaluation import evaluate as E
    from recreason.generation.generate import GenerateConfig

    calls = []
    real = E.generate_for_run

    def counting(run, records, system, *args, **kwargs):
        calls.append(system)
        return real(run, records, system, *args, **kwargs)

    monkeypatch.setattr(E, "generate_for_run", counting)
    cfg = GenerateConfig(max_new_tokens=5, max_records=6, precision="fp32")
    systems = ["zero-shot", "fine-tuned"]
    E.evaluate_run(tiny_run[0], gen_cfg=cfg, systems=systems, progress=False, out_dir=tiny_run[0] / "eval-cache")
    calls.clear()
    E.evaluate_run(tiny_run[0], gen_cfg=cfg, systems=systems, progress=False, out_dir=tiny_run[0] / "eval-cache")
    assert calls == []  # same model, same settings: the texts on disk are reused
    weights = tiny_run[0] / "best" / "adapter_model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as if the run had been trained again
    E.evaluate_run(tiny_run[0], gen_cfg=cfg, systems=systems, progress=False, out_dir=tiny_run[0] / "eval-cache")
    assert calls == ["fine-tuned"]
    calls.clear()
    cfg.max_new_tokens = 7
    E.evaluate_run(tiny_run[0], gen_cfg=cfg, systems=systems, progress=False, out_dir=tiny_run[0] / "eval-cache")
    assert sorted(calls) == ["fine-tuned", "zero-shot"]


def test_html_report_renders_in_a_real_browser(tiny_run, browser):
    from recreason.config import GenerateConfig
    from recreason.evaluation.evaluate import evaluate_run

    out = tiny_run[0] / "eval-report"
    report = evaluate_run(tiny_run[0], gen_cfg=GenerateConfig(max_new_tokens=6, max_records=25, precision="fp32"),
                          progress=False, out_dir=out, bootstrap=100)
    assert report["html"] == str(out / "report.html")
    text = (out / "report.html").read_text()
    assert "src=\"http" not in text and "data:image/png;base64," in text  # self-contained
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto((out / "report.html").as_uri())
    images = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
    assert len(images) >= 4 and all(images)  # metric bars (2), loss curves, histograms
    assert page.locator("#samples tbody tr").count() == 20
    assert page.locator("#samples thead th").all_inner_texts()[:2] == ["user / item", "reference"]
    page.screenshot(path=str(out / "report.png"), full_page=False)
    assert (out / "report.png").stat().st_size > 10_000
    page.close()
