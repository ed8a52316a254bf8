"""The real embedded model: GGUF conversion, a few training steps, generation."""

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_cached_conversion_matches_gguf_logits():
    from transformers import AutoModelForCausalLM

    from recreason.models.registry import ALIASES, load_model

    model, tok, path = load_model("smollm2-135m")
    assert (Path(path) / "model.safetensors").exists()
    assert getattr(model.config, "quantization_config", None) is None
    gguf = ALIASES["smollm2-135m"].locate()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tok("The strings sound bright and warm.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)


def test_embedded_model_trains_and_generates(prepared_dir, tmp_path):
    from recreason.cli import main

    run = tmp_path / "run"
    assert main(["train", str(prepared_dir), "--out", str(run), "--max-steps", "2", "--quiet",
                 "--set", "train.eval_every=2", "--set", "train.max_eval_records=8",
                 "--set", "train.batch_size=4", "--set", "train.lora_top_layers=4"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["best_validation_loss"] < 10
    assert (run / "best" / "adapter_model.safetensors").exists()
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--run", str(run), "--max-records", "3", "--out", str(out), "--quiet",
                 "--set", "generate.max_new_tokens=16"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    assert all(len(r["generated"].split()) >= 2 for r in rows)
