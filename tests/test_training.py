import json

import pytest
import torch

from recreason.config import TrainConfig
from recreason.training.data import Example, collate, target_loss


def test_collate_left_pads_and_masks_prompt_labels():
    batch = collate([Example([5, 6, 7], [8, 2]), Example([5], [9, 10, 2])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2], [0, 5, 9, 10, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 2], [-100, -100, 9, 10, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]
    assert int(batch["n_target"]) == 3


def test_output_head_gets_a_contiguous_input(tiny_model_dir):
    """logits_to_keep slices the hidden states; a strided 3-D input would make F.linear copy the whole
    vocabulary matrix once per batch row (measured: 40% of a prefill on CPU)."""
    from recreason.models.registry import load_model

    lm, _, _ = load_model(str(tiny_model_dir))
    assert lm.config._attn_implementation == "eager"  # auto on CPU
    seen = []
    lm.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        lm(input_ids=torch.tensor([[5, 6, 7, 8]] * 3), logits_to_keep=2)
    assert seen == [True]


def test_target_only_logits_give_the_full_sequence_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = collate([Example([11, 12, 13, 14], [20, 21, 2]), Example([11, 12], [30, 2])], pad_id=2)
    with torch.no_grad():
        ours, n = target_loss(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], labels=batch["labels"]).loss
    assert n == 5
    assert float(ours) == pytest.approx(float(full), rel=1e-5)


def test_training_lowers_validation_loss_and_keeps_best(tiny_run):
    out, summary = tiny_run
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [4, 8, 12]
    assert log[-1]["validation_loss"] < log[0]["validation_loss"]
    assert summary["best_validation_loss"] == min(e["validation_loss"] for e in log)
    assert (out / "best" / "adapter_model.safetensors").exists()
    assert any((out / "tensorboard").iterdir())
    info = json.loads((out / "run.json").read_text())
    assert info["method"] == "lora" and info["split_seed"] == 1


def test_early_stopping_stops_after_patience(prepared_dir, tiny_model_dir, tmp_path):
    from recreason.training.trainer import train

    # lr 0 never improves after the first pass: patience 2 stops at the third pass.
    cfg = TrainConfig(model=str(tiny_model_dir), method="full", lr=0.0, batch_size=8, max_steps=40, eval_every=2,
                      max_eval_records=16, precision="fp32", patience=2, warmup_ratio=0.0)
    summary = train(prepared_dir, tmp_path, cfg, progress=False)
    assert summary["stopped_early"] and summary["steps"] == 6 and summary["best_step"] == 2
    assert (tmp_path / "best" / "model.safetensors").exists()


def test_batched_generation_matches_one_at_a_time(tiny_run):
    from recreason.generation.generate import GenerateConfig, generate_texts
    from recreason.prompts.discrete import render
    from recreason.rundir import Run

    from recreason.prompts.discrete import DiscretePrompter

    run = Run(tiny_run[0])
    model, tok = run.load_model(dtype="fp32")
    ds = run.dataset()
    prompter = DiscretePrompter(ds.subset(1, "train"), run.prompt_config)
    prompts = [render(tok, prompter.for_record(r)) for r in ds.subset(1, "test")[:6]]
    cfg = GenerateConfig(max_new_tokens=8, batch_size=6, precision="fp32")
    batched = generate_texts(model, tok, prompts, cfg, progress=False)
    single = [generate_texts(model, tok, [p], cfg, progress=False)[0] for p in prompts]
    assert batched == single
    assert len({len(p) for p in prompts}) > 1  # the batch really was padded


_KILLED_RUN = """
import ast, os, signal, sys
from recreason.config import TrainConfig
from recreason.training.trainer import train

def kill_at_5(step, model):
    if step == 5:  # mid-epoch, one step after the last checkpoint: no cleanup, no finally blocks run
        os.kill(os.getpid(), signal.SIGKILL)

train(sys.argv[1], sys.argv[2], TrainConfig(**ast.literal_eval(sys.argv[3])), progress=False, on_step=kill_at_5)
"""


def _resume_config(model_dir) -> dict:
    return dict(model=str(model_dir), method="lora", lora_r=4, lr=1e-2, batch_size=8, max_steps=8,
                eval_every=4, checkpoint_every=2, max_eval_records=16, precision="fp32", patience=9)


def test_run_killed_with_sigkill_resumes_to_the_same_result(prepared_dir, tiny_model_dir, tmp_path):
    import signal
    import subprocess
    import sys

    from recreason.training.trainer import train

    straight = train(prepared_dir, tmp_path / "a", TrainConfig(**_resume_config(tiny_model_dir)), progress=False)

    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_RUN, str(prepared_dir), str(tmp_path / "b"), repr(_resume_config(tiny_model_dir))],
        capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "b" / "summary.json").exists()
    saved = torch.load(tmp_path / "b" / "last" / "state.pt", weights_only=True)
    assert saved["state"]["step"] == 4  # the checkpoint written at step 4; step 5 was lost with the process
    assert len(saved["state"]["batches"]) > 0  # the kill landed mid-epoch

    resumed = train(prepared_dir, tmp_path / "b", TrainConfig(**_resume_config(tiny_model_dir)), progress=False,
                    resume=True)
    assert resumed["steps"] == 8
    assert resumed["best_validation_loss"] == pytest.approx(straight["best_validation_loss"], rel=1e-6)
    log_b = [json.loads(x)["step"] for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert log_b == [4, 8]


def test_interrupted_run_resumes_to_the_same_result(prepared_dir, tiny_model_dir, tmp_path):
    """An exception (e.g. KeyboardInterrupt) between checkpoints: the same resume path, in-process."""
    from recreason.training.trainer import train

    straight = train(prepared_dir, tmp_path / "a", TrainConfig(**_resume_config(tiny_model_dir)), progress=False)

    class Crash(RuntimeError):
        pass

    def crash_at_7(step, model):
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        train(prepared_dir, tmp_path / "b", TrainConfig(**_resume_config(tiny_model_dir)), progress=False,
              on_step=crash_at_7)
    resumed = train(prepared_dir, tmp_path / "b", TrainConfig(**_resume_config(tiny_model_dir)), progress=False,
                    resume=True)
    assert resumed["best_validation_loss"] == pytest.approx(straight["best_validation_loss"], rel=1e-6)


def test_loggers_are_checked_before_training(prepared_dir, tiny_model_dir, tmp_path):
    import importlib.util

    from recreason.training.trainer import train

    cfg = TrainConfig(model=str(tiny_model_dir), max_steps=1, eval_every=1, max_eval_records=4, precision="fp32",
                      report_to=["tensorboard", "mlflow"])
    with pytest.raises(ValueError, match="unknown logger 'mlflow'"):
        train(prepared_dir, tmp_path, cfg, progress=False)
    if importlib.util.find_spec("wandb") is None:
        cfg.report_to = ["wandb"]
        with pytest.raises(ValueError, match="pip install wandb"):
            train(prepared_dir, tmp_path, cfg, progress=False)


def test_compiled_layers_train_like_eager_ones(prepared_dir, tiny_model_dir, tmp_path):
    """train.compile: same losses as the uncompiled run (within float tolerance), same checkpoint names."""
    from safetensors.torch import load_file

    from recreason.training.trainer import train

    def cfg(compile_layers):
        return TrainConfig(model=str(tiny_model_dir), method="lora", lora_r=4, lr=1e-2, batch_size=8, max_steps=3,
                           eval_every=3, max_eval_records=8, precision="fp32", compile=compile_layers)

    eager = train(prepared_dir, tmp_path / "eager", cfg(False), progress=False)
    compiled = train(prepared_dir, tmp_path / "compiled", cfg(True), progress=False)
    assert compiled["best_validation_loss"] == pytest.approx(eager["best_validation_loss"], rel=1e-4)
    names = lambda run: set(load_file(run / "best" / "adapter_model.safetensors"))  # noqa: E731
    assert names(tmp_path / "compiled") == names(tmp_path / "eager")


def test_fsdp_refuses_combinations_it_does_not_support():
    for bad in (dict(method="prefix"), dict(method="adalora"), dict(two_stage=True, rating_head="mf"), dict(compile=True)):
        with pytest.raises(ValueError, match="train.fsdp works with methods full, lora, ia3 and adapter"):
            TrainConfig(fsdp=True, **bad).validate()
    TrainConfig(fsdp=True, method="ia3").validate()
