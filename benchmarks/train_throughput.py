"""Training throughput per method against a plain Hugging Face Trainer + peft LoRA recipe.

Each configuration runs in its own process (so peak memory is its own) on the same training prompts
of a prepared dataset, with the same batch size: `warmup` steps, then `steps` timed steps.

* ours-<method>: recreason's engine (bf16 autocast on CPU, loss on explanation tokens only, logits only
  at target positions, length-bucketed batches, LoRA on the top `--top-layers` layers when given).
  `<method>+compile` also sets `train.compile` (torch.compile per decoder layer); its one-time compile
  falls in the warmup steps (at least 3 for it); `warmup_s` reports how long the warmup took.
* hf-trainer-lora: transformers.Trainer + peft LoRA (r=16, all linear layers) with default settings:
  fp32, loss on the whole sequence, padding to the longest sequence in each batch.
* matmul peak: a plain bf16 torch.matmul loop on the same machine.

Printed per row: tokens/s (non-padding tokens through the model), ratio to the HF recipe, peak RSS (CPU)
or CUDA max allocated, seconds per epoch of the training split, and achieved GFLOP/s where
FLOPs/token = 2*P (forward) + 2*P_bp (input gradients through back-propagated layers) + 2*P_train
(weight gradients), P counting the decoder weights without the token embedding (and so without a tied
vocabulary projection); its share of the matmul peak is the utilisation.

Usage: python benchmarks/train_throughput.py --dataset runs/demo/data [--methods lora full ...]
Results: benchmarks/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["lora", "lora+compile", "adalora", "ia3", "prefix", "prompt", "adapter", "full"]


def matmul_peak(seconds: float = 3.0) -> float:
    a = torch.randn(2048, 576, dtype=torch.bfloat16)
    b = torch.randn(576, 1536, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * 2048 * 576 * 1536 * n / (time.perf_counter() - start) / 1e9


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _records(dataset_dir: str, n: int):
    from recreason.data.dataset import Dataset
    from recreason.prompts.discrete import DiscretePrompter

    ds = Dataset(dataset_dir)
    train = ds.subset(1, "train")
    return train, random.Random(0).sample(train, n), DiscretePrompter(train)


def _flops_per_token(model, backprop_fraction: float) -> float:
    total = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 2 * total + 2 * total * backprop_fraction + 2 * trainable


def run_ours(args) -> dict:
    from recreason.config import TrainConfig
    from recreason.training.data import build_examples, collate, length_bucketed_batches
    from recreason.training.trainer import Stage, StepEngine, TrainState, build_model

    method = args.one.removeprefix("ours-")
    compiled = method.endswith("+compile")
    method = method.removesuffix("+compile")
    warmup = max(args.warmup, 3) if compiled else args.warmup
    cfg = TrainConfig(model=args.model, method=method, batch_size=args.batch_size, lora_top_layers=args.top_layers,
                      precision=args.precision, compile=compiled)
    train, sample, prompter = _records(args.dataset, args.batch_size * (warmup + args.steps))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, _ = build_model(cfg, train, device, total_steps=warmup + args.steps)
    examples, _ = build_examples(sample, prompter, tok, cfg, model=model)
    batches = length_bucketed_batches(examples, cfg.batch_size, random.Random(0))
    engine = StepEngine(model, model, cfg, device)  # the trainer's own step: forward, backward, clip, update
    engine.start_stage(Stage(warmup + args.steps, 1e-4, personal_only=False))
    state = TrainState()
    layers = model.lm.config.num_hidden_layers
    bp = 1.0 if method in ("full", "prefix", "prompt") or not args.top_layers else args.top_layers / layers
    tokens, start, began = 0, None, time.perf_counter()
    for n, idx in enumerate(batches[: warmup + args.steps]):
        if n == warmup:
            start, tokens = time.perf_counter(), 0
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], tok.pad_token_id).items()}
        engine.train_step(batch, state)
        tokens += int(batch["attention_mask"].sum())
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": tokens / elapsed, "flops_per_token": _flops_per_token(model, bp),
            "warmup_s": start - began,
            "epoch_tokens": sum(len(e) for e in build_examples(train, prompter, tok, cfg)[0]),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run_hf_trainer(args) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from recreason.models.registry import load_tokenizer, resolve_model
    from recreason.prompts.discrete import render

    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear"))
    train, sample, prompter = _records(args.dataset, args.batch_size * (args.warmup + args.steps))
    texts = [render(tok, prompter.for_record(r)) + r.sentence + tok.eos_token for r in sample]
    rows = [{"input_ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts]

    def collate(batch):
        enc = tok.pad(batch, padding="longest", return_tensors="pt")
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        return {**enc, "labels": labels}

    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == args.warmup:
                marks["start"] = time.perf_counter()

    targs = TrainingArguments(output_dir=str(Path(args.tmp) / "hf"), per_device_train_batch_size=args.batch_size,
                              max_steps=args.warmup + args.steps, report_to=[], save_strategy="no",
                              logging_strategy="no", use_cpu=not torch.cuda.is_available(), dataloader_drop_last=False,
                              remove_unused_columns=False)
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[Clock()])
    trainer.train()
    elapsed = time.perf_counter() - marks["start"]
    # Trainer shuffles with its own sampler; count the tokens of the timed steps' share on average.
    per_step = sum(len(r["input_ids"]) for r in rows) / len(rows) * args.batch_size
    return {"tokens_per_s": per_step * args.steps / elapsed, "flops_per_token": _flops_per_token(model, 1.0),
            "epoch_tokens": None, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--top-layers", type=int, default=12, help="layers adapted by LoRA-family methods")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/train_throughput.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default="/tmp/recreason-bench", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = run_hf_trainer(args) if args.one == "hf-trainer-lora" else run_ours(args)
        result["peak_memory_mb"] = _peak_memory_mb()
        print("RESULT " + json.dumps(result))
        return
    peak = matmul_peak()
    rows = {}
    for name in ["hf-trainer-lora"] + [f"ours-{m}" for m in args.methods]:
        cmd = [sys.executable, __file__, "--one", name] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        rows[name] = json.loads(line[0][7:])
        print(name, rows[name], flush=True)
    base = rows.get("hf-trainer-lora", {}).get("tokens_per_s")
    print(f"\nbf16 matmul peak: {peak:.0f} GFLOP/s; batch {args.batch_size}, {args.steps} timed steps\n")
    print("| configuration | trainable params | tokens/s | vs HF Trainer LoRA | peak memory (MB) | s/epoch | GFLOP/s | share of peak |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        gflops = r["tokens_per_s"] * r["flops_per_token"] / 1e9
        epoch = f"{r['epoch_tokens'] / r['tokens_per_s']:.0f}" if r["epoch_tokens"] else ""
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else ""
        print(f"| {name} | {r['trainable']:,} | {r['tokens_per_s']:.0f} | {ratio} | {r['peak_memory_mb']:.0f} | "
              f"{epoch} | {gflops:.0f} | {gflops / peak:.0%} |")
        r["gflops"], r["share_of_peak"] = gflops, gflops / peak
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"matmul_peak_gflops": peak, "args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
