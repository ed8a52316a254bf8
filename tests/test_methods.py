"""Every fine-tuning method trains, saves, reloads and generates (tiny model)."""

import json

import pytest
import torch

from recreason.training.config import TrainConfig


@pytest.mark.parametrize("method", ["full", "lora", "adalora", "ia3", "prefix", "prompt", "adapter"])
def test_method_trains_saves_reloads_and_generates(method, prepared_dir, tiny_model_dir, tmp_path):
    from recreason.generation.generate import GenerateConfig, generate_texts
    from recreason.training.run import Run
    from recreason.training.trainer import train

    cfg = TrainConfig(model=str(tiny_model_dir), method=method, lora_r=4, lr=1e-2, batch_size=8, max_steps=4,
                      eval_every=2, max_eval_records=16, precision="fp32", num_virtual_tokens=4, adapter_size=8,
                      optimizer="sgd" if method == "ia3" else "adamw", scheduler="cosine")
    summary = train(prepared_dir, tmp_path, cfg, progress=False)
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert summary["steps"] == 4 and len(log) == 2
    if method not in ("ia3",):  # SGD on IA3's scaling vectors moves slowly; only check it runs
        assert log[-1]["validation_loss"] < log[0]["validation_loss"] + 1e-6
    run = Run(tmp_path)
    model, tok = run.load_model(dtype="fp32")
    ds = run.dataset()
    prompter = run.prompter(ds)
    records = ds.subset(1, "test")[:2]
    prompts = [run.prompt_for(prompter, tok, r) for r in records]
    texts = generate_texts(model, tok, prompts, GenerateConfig(max_new_tokens=4, precision="fp32"), progress=False)
    assert len(texts) == 2
    # The reloaded model reproduces the validation loss of the best checkpoint.
    from recreason.training.data import collate, joint_loss
    from recreason.training.run import build_examples

    valid = ds.subset(1, "validation")
    import random

    valid = random.Random(cfg.seed + 1).sample(valid, 16)
    examples, _ = build_examples(valid, prompter, tok, cfg, model=model)
    tokens = total = 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    with torch.no_grad():
        for start in range(0, len(order), 16):
            batch = collate([examples[i] for i in order[start:start + 16]], tok.pad_token_id)
            _, parts = joint_loss(model, batch, cfg.rating_weight)
            total += parts["text"] * parts["tokens"]
            tokens += parts["tokens"]
    assert total / tokens == pytest.approx(summary["best_validation_loss"], rel=1e-3)


def test_lora_export_merged_loads_with_plain_transformers(prepared_dir, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from recreason.cli import main
    from recreason.training.run import Run
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

    from recreason.training.config import TrainConfig
    from recreason.training.methods import apply_method, orthogonality_penalty

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
