"""Every fine-tuning method trains, saves, reloads and generates (tiny model)."""

import json

import pytest
import torch

from conftest import reloaded_validation_loss
from recreason.config import TrainConfig


@pytest.mark.parametrize("method", ["full", "lora", "adalora", "ia3", "prefix", "prompt", "adapter"])
def test_method_trains_saves_reloads_and_generates(method, prepared_dir, tiny_model_dir, tmp_path):
    from recreason.config import GenerateConfig
    from recreason.inference import Predictor, Request
    from recreason.training.trainer import train

    cfg = TrainConfig(model=str(tiny_model_dir), method=method, lora_r=4, lr=1e-2, batch_size=8, max_steps=4,
                      eval_every=2, max_eval_records=16, precision="fp32", num_virtual_tokens=4, adapter_size=8,
                      optimizer="sgd" if method == "ia3" else "adamw", scheduler="cosine")
    summary = train(prepared_dir, tmp_path, cfg, progress=False)
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert summary["steps"] == 4 and len(log) == 2
    if method not in ("ia3",):  # SGD on IA3's scaling vectors moves slowly; only check it runs
        assert log[-1]["validation_loss"] < log[0]["validation_loss"] + 1e-6
    # The reloaded model reproduces the validation loss of the best checkpoint ...
    assert reloaded_validation_loss(tmp_path) == pytest.approx(summary["best_validation_loss"], rel=1e-3)
    # ... and generates through the Predictor: greedy decoding starts with the forward pass's argmax token.
    predictor = Predictor(tmp_path, GenerateConfig(max_new_tokens=1, precision="fp32"))
    prompted = predictor.prompt(Request(*_pair(predictor)))
    ids = predictor.tokenizer(prompted.prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logits = predictor.model(ids["input_ids"], ids["attention_mask"], logits_to_keep=1).logits[0, -1]
        first = predictor.model.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=1, do_sample=False,
                                         pad_token_id=predictor.tokenizer.pad_token_id)
    assert int(first[0, -1]) == int(logits.argmax())


def _pair(predictor):
    record = predictor.dataset.subset(1, "test")[0]
    return record.user, record.item


def test_lora_export_merged_loads_with_plain_transformers(prepared_dir, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from recreason.cli import main
    from recreason.rundir import Run
    from recreason.training.trainer import train

    cfg = TrainConfig(model=str(tiny_model_dir), method="lora", lora_r=4, lr=5e-2, batch_size=8, max_steps=2,
                      eval_every=2, max_eval_records=8, precision="fp32")
    train(prepared_dir, tmp_path / "run", cfg, progress=False)
    assert main(["export", str(tmp_path / "run"), "--merged", "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ours, _ = Run(tmp_path / "run").load_model(dtype="fp32", merge=False)
    ids = torch.tensor([[11, 12, 13, 14, 15]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, ours.lm(ids).logits, atol=1e-4)
    cfg.method = "prefix"
    cfg.num_virtual_tokens = 2
    train(prepared_dir, tmp_path / "prefix", cfg, progress=False)
    assert main(["export", str(tmp_path / "prefix"), "--merged", "--out", str(tmp_path / "m2")]) == 2


def test_fp16_on_cpu_is_refused(prepared_dir, tiny_model_dir, tmp_path):
    from recreason.training.trainer import train

    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        train(prepared_dir, tmp_path, TrainConfig(model=str(tiny_model_dir), precision="fp16"), progress=False)


def test_adalora_orthogonality_penalty_is_the_one_peft_adds(tiny_model_dir):
    """Our loss is computed outside the model, so the trainer adds AdaLoRA's regulariser itself:
    it must equal the term peft adds to a label loss."""
    from transformers import AutoModelForCausalLM

    from recreason.config import TrainConfig
    from recreason.models.methods import apply_method, orthogonality_penalty

    torch.manual_seed(0)
    lm = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir), TrainConfig(method="adalora", lora_r=4),
                      total_steps=10)
    with torch.no_grad():  # make the factors far from orthogonal so the penalty is clearly non-zero
        for name, p in lm.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.normal_(0, 0.5)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with_reg = lm(input_ids=ids, labels=ids).loss
    plain = lm.get_base_model()(input_ids=ids, labels=ids).loss
    ours = orthogonality_penalty(lm)
    assert float(ours) > 0.1
    assert float(ours) == pytest.approx(float(with_reg - plain), rel=1e-4)
    lora = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir), TrainConfig(method="lora", lora_r=4))
    assert orthogonality_penalty(lora) is None


def test_gguf_export_loads_in_transformers_with_the_merged_models_logits(tiny_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from recreason.cli import main
    from recreason.models.registry import ALIASES
    from recreason.rundir import Run

    reference = ALIASES["smollm2-135m"].locate()  # the tiny model uses the embedded model's tokenizer
    out = tmp_path / "model.gguf"
    assert main(["export", str(tiny_run[0]), "--format", "gguf", "--out", str(out), "--type", "f16",
                 "--tokenizer-gguf", str(reference)]) == 0
    assert "llama-cli -m" in capsys.readouterr().out
    merged, tokenizer = Run(tiny_run[0]).load_model(dtype="fp32", merge=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32)
    ids = tokenizer("The tone of these strings is bright.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = merged.lm(input_ids=ids).logits
        theirs = loaded(input_ids=ids).logits
    assert theirs.shape == ours.shape
    assert torch.allclose(theirs, ours, atol=2e-2, rtol=1e-2), (theirs - ours).abs().max()
    from gguf import GGUFReader

    fields = GGUFReader(str(out)).fields
    assert fields["general.architecture"].contents() == "llama" and "tokenizer.chat_template" in fields
    q8 = tmp_path / "model-q8.gguf"
    assert main(["export", str(tiny_run[0]), "--format", "gguf", "--out", str(q8), "--type", "q8_0",
                 "--tokenizer-gguf", str(reference)]) == 0
    assert q8.stat().st_size < out.stat().st_size
