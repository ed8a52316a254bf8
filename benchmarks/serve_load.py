"""Load test of `recreason serve` on loopback, against two single-stream references on the same prompts.

1. Starts `recreason serve --run RUN` on 127.0.0.1 (a free port) and drives POST /v1/explanations with
   `--clients` concurrent clients for `--seconds` seconds (each request one distinct (user, item) pair,
   so the reason cache never answers); reports reasons/s and p50/p95/p99 latency.
2. Plain transformers: the same run's model (LoRA merged), fp32 and SDPA attention as `from_pretrained`
   gives them, `generate` one request at a time, same prompts and max_new_tokens, for `--seconds` seconds.
3. llama.cpp (`llama-cpp-python`, when installed) on the run's weights exported as f16 GGUF, one stream,
   drawing as many candidates per reason as the server (the greedy text and ``generate.candidates - 1``
   samples at the config's temperature and top-p; llama.cpp keeps the prompt's KV cache between the draws of
   one prompt, so each reason costs it one prompt and K decodes, as it costs the server).

``--config`` and ``--set`` reach the server as they reach ``recreason serve`` (e.g. ``--config configs/demo.yaml
--config configs/full.yaml --set generate.candidates=4``); the FLOP bound then counts the prompt once and every
candidate's tokens. ``--variant NAME=SECTION.KEY=VALUE`` serves once more with that setting on top, in the same
run (e.g. ``--variant compiled=generate.kernels=compiled``), keyed ``BATCHING, NAME`` in the results.

Prints the ratios of the server's throughput to each reference. Every loop is bounded in time and count,
and only loopback addresses are used.

Usage: python benchmarks/serve_load.py --run runs/demo/run [--clients 16 --seconds 60] [--config F ...] [--set K=V ...]
Results: benchmarks/results/serve_load.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import httpx

from loadgen import drive
from recreason.serving.launch import start_server

ROOT = Path(__file__).resolve().parents[1]


def pairs_for(run_dir: str, n: int) -> list[tuple[str, str]]:
    from recreason.rundir import Run

    run = Run(run_dir)
    test = run.dataset().subset(run.info["split_seed"], "test")
    rng = random.Random(0)
    rng.shuffle(test)
    return [(r.user, r.item) for r in test[:n]]


def _config_args(args) -> list[str]:
    """The server's --config and --set flags: the benchmark's, then its token limit."""
    flags = [flag for path in args.config for flag in ("--config", path)]
    flags += [flag for item in args.set for flag in ("--set", item)]
    return flags + ["--set", f"generate.max_new_tokens={args.max_new_tokens}"]


def _generate_config(args):
    """The generate section the server runs with (the same --config and --set)."""
    from recreason.config import load_config

    return load_config(args.config or None, [*args.set, f"generate.max_new_tokens={args.max_new_tokens}"])["generate"]


def load_server(args, pairs, extra: list[str] | None = None) -> dict:
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    Path(f"{args.tmp}/load.db").unlink(missing_ok=True)
    server, base = start_server(["--run", args.run, "--max-batch-size", str(args.clients), "--max-wait-ms", str(args.max_wait_ms),
                                 "--store", f"sqlite:///{args.tmp}/load.db",
                                 *_config_args(args), *(extra or [])])
    try:
        result = drive(base, pairs, args.clients, args.seconds)
        metrics = httpx.get(f"{base}/metrics").text
    finally:
        server.terminate()
        server.wait(timeout=30)
    def counter(name: str) -> float:
        return next((float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name + " ")), 0.0)

    busy = counter("recreason_generation_seconds_total")
    # the model's busy time over the run's: what batching left idle between batches (HTTP, checks, waiting)
    return {**result, "generated_tokens": counter("recreason_generated_tokens_total"), "generation_seconds": busy,
            "busy_share": busy / result["seconds"] if result.get("seconds") else None,
            "batch_size_lines": [line for line in metrics.splitlines() if line.startswith("recreason_batch_size_")]}


def matmul_peak() -> tuple[float, str]:
    """(GFLOP/s, precision): the best of 5 timings of a decoder-sized product (benchmarks/matmul_precision.py) in
    the precision serving resolves to, measured while no server runs so that nothing shares the cores; in bf16
    also against a packed weight, as the server runs its layers (the faster of the two is the peak)."""
    import torch

    from matmul_precision import gflops
    from recreason.models.registry import resolve_precision

    precision = resolve_precision("auto", "cpu")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    packed = dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return max(gflops(dtype, 20, packed=way) for _ in range(5) for way in {False, packed}), precision


def model_sizes(lm) -> tuple[int, int]:
    """(decoder matrix weights, vocabulary projection weights) of a causal LM: what a token's products cost."""
    import torch

    decoder = sum(m.weight.numel() for name, m in lm.named_modules()
                  if isinstance(m, torch.nn.Linear) and ".layers." in name)
    return decoder, lm.get_output_embeddings().weight.numel()


def useful_flop(decoder: int, vocab: int, prompt_tokens: float, generated_tokens: float) -> float:
    """The FLOP bound's count of one reason: 2 x (decoder weights x (prompt + generated tokens) + vocabulary x
    generated tokens); attention and padding left out."""
    return 2 * (decoder * (prompt_tokens + generated_tokens) + vocab * generated_tokens)


def flop_bound(args, pairs, served: dict, peak: tuple[float, str]) -> dict:
    """The share of this machine's matrix-product peak the server's reasons used: FLOP per reason as
    :func:`useful_flop` counts it (attention left out: small at these lengths), with the prompts of the pairs served
    and the generated tokens the server counted; the peak from :func:`matmul_peak`."""
    import torch

    predictor = _predictor(args)
    decoder, vocab = model_sizes(predictor.model.lm)
    served_pairs = pairs[:served["requests"]]
    prompt_tokens = [len(predictor.tokenizer(_prompt(predictor, u, i), add_special_tokens=False)["input_ids"])
                     for u, i in served_pairs]
    generated = served["generated_tokens"] / max(served["requests"], 1)
    prompt = sum(prompt_tokens) / max(len(prompt_tokens), 1)
    per_reason = useful_flop(decoder, vocab, prompt, generated)
    peak, precision = peak[0] * 1e9, peak[1]
    return {"gflop_per_reason": per_reason / 1e9, "prompt_tokens": prompt, "generated_tokens": generated,
            "peak_gflop_s": peak / 1e9, "precision": precision, "threads": torch.get_num_threads(),
            "achieved_gflop_s": served["reasons_per_s"] * per_reason / 1e9,
            "share_of_bound": served["reasons_per_s"] * per_reason / peak}


def precomputed_and_live(args, pairs) -> dict:
    """One server run: the first ``--precomputed`` pairs explained by the batch job and loaded with --reasons,
    then driven round and round for ``--seconds`` (answered from the store), then distinct other pairs generated
    live for ``--seconds``."""
    import subprocess
    import sys

    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    stored, live = pairs[:args.precomputed], pairs[args.precomputed:]
    pairs_file, reasons = Path(args.tmp) / "stored-pairs.jsonl", Path(args.tmp) / "stored-reasons.jsonl"
    pairs_file.write_text("".join(json.dumps({"user_id": u, "item_id": i}) + "\n" for u, i in stored))
    reasons.unlink(missing_ok=True)
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "recreason.cli", "explain", "--run", args.run, "--pairs", str(pairs_file),
                    "--out", str(reasons), "--quiet", *_config_args(args)], check=True)
    batch_seconds = time.monotonic() - start
    Path(f"{args.tmp}/load.db").unlink(missing_ok=True)
    server, base = start_server(["--run", args.run, "--max-batch-size", str(args.clients), "--max-wait-ms",
                                 str(args.max_wait_ms), "--store", f"sqlite:///{args.tmp}/load.db",
                                 *_config_args(args), "--reasons", str(reasons)])
    try:
        from_store = drive(base, stored, args.clients, args.seconds, repeat=True, server_pid=server.pid)
        generated = drive(base, live, args.clients, args.seconds)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"stored_pairs": len(stored), "batch_job_seconds": batch_seconds, "precomputed": from_store,
            "live": generated}


def plain_generate(args, pairs) -> dict:
    import torch

    predictor = _predictor(args)
    tok = predictor.tokenizer
    lm = predictor.model.lm  # the run's LoRA merged into the base weights
    lm.set_attn_implementation("sdpa")  # transformers' default, not the eager attention recreason picks on CPU
    done, start = 0, time.monotonic()
    with torch.no_grad():
        for user, item in pairs:
            if time.monotonic() - start > args.seconds:
                break
            ids = tok(_prompt(predictor, user, item), return_tensors="pt", add_special_tokens=False)
            lm.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            done += 1
    return {"reasons_per_s": done / (time.monotonic() - start), "requests": done}


def _predictor(args):
    """The run's greedy predictor in fp32: prompts, token counts and the greedy texts llama.cpp's are compared with."""
    from dataclasses import replace

    from recreason.inference import Predictor

    return Predictor(args.run, replace(_generate_config(args), precision="fp32", candidates=1))


def _prompt(predictor, user: str, item: str) -> str:
    from recreason.inference import Request

    return predictor.prompt(Request(user, item)).prompt


def llama_cpp(args, pairs) -> dict | None:
    """llama.cpp on the run's own fine-tuned weights, exported with `recreason export --format gguf` (f16),
    single stream, drawing the server's number of candidates per reason (the greedy text, then samples seeded per
    draw; the prompt's KV cache is kept between them, as llama-cpp-python does for a repeated prefix); also how
    many of its greedy reasons equal the Predictor's greedy reasons. Choosing among the candidates is left out:
    llama.cpp has no scorer, so its figure is a little generous."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from recreason.models.export import export_gguf
    from recreason.models.registry import ALIASES

    predictor = _predictor(args)
    gguf = Path(args.tmp) / "fine-tuned.gguf"
    export_gguf(predictor.model.lm, gguf, ALIASES["smollm2-135m"].locate(), "f16")
    import torch

    # as many threads as torch uses (llama-cpp-python's default is half the cores)
    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)
    gen = _generate_config(args)
    draws = max(1, gen.candidates)
    texts, tokens, start = [], 0, time.monotonic()
    for n, (user, item) in enumerate(pairs):
        if time.monotonic() - start > args.seconds:
            break
        prompt = _prompt(predictor, user, item)
        out = llm(prompt, max_tokens=args.max_new_tokens, temperature=0.0)
        texts.append(out["choices"][0]["text"].strip().split("\n", 1)[0].strip())
        tokens += out["usage"]["completion_tokens"]
        for j in range(1, draws):
            out = llm(prompt, max_tokens=args.max_new_tokens, temperature=gen.sample_temperature,
                      top_p=gen.sample_top_p, top_k=0, seed=n * draws + j)
            tokens += out["usage"]["completion_tokens"]
    seconds = time.monotonic() - start
    ours = [e.generated for e in predictor.explain(pairs[: len(texts)])]
    same = sum(a == b for a, b in zip(texts, ours))
    return {"reasons_per_s": len(texts) / seconds, "requests": len(texts), "candidates": draws,
            "generated_tokens": tokens, "same_as_ours": same, "threads": torch.get_num_threads(),
            "note": "the run's fine-tuned weights exported as f16 GGUF; same-as-ours compares greedy texts"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--max-wait-ms", type=float, default=50, help="the server's micro-batch wait")
    parser.add_argument("--skip-references", action="store_true", help="measure the server only")
    parser.add_argument("--batching", nargs="+", choices=["whole", "continuous"], default=["whole"],
                        help="the server's batching modes to measure, one server run each (the first is compared "
                             "with the references)")
    parser.add_argument("--config", action="append", default=[],
                        help="config files for the server, as recreason serve takes them (e.g. configs/demo.yaml, "
                             "then configs/full.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config override for the server, as recreason's --set (generate.candidates=4)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SECTION.KEY=VALUE",
                        help="also serve with this setting on top (one more server per batching, results keyed "
                             "'BATCHING, NAME'; repeatable): two settings measured in one run, the peak around each")
    parser.add_argument("--tmp", default="/tmp/recreason-load")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/serve_load.json"))
    parser.add_argument("--precomputed", type=int, default=0,
                        help="explain this many pairs with the batch job first, serve them with --reasons and measure "
                             "them (round and round) and then live pairs in one server run (to "
                             "serve_load_precomputed.json)")
    parser.add_argument("--only-llama-cpp", action="store_true", dest="only_llama_cpp",
                        help="measure llama.cpp on the exported fine-tuned model only (to serve_load_llama_cpp.json)")
    args = parser.parse_args()
    pairs = pairs_for(args.run, 2000)
    if args.precomputed:
        result = precomputed_and_live(args, pairs)
        for name in ("precomputed", "live"):
            r = result[name]
            print(f"{name}: {r['reasons_per_s']:.1f} reasons/s, p50 {r['p50_s'] * 1000:.1f} ms, p95 "
                  f"{r['p95_s'] * 1000:.1f} ms, {r['errors']} errors, {r['precomputed']} of {r['requests']} from the store")
        out = Path(args.out).with_name("serve_load_precomputed.json")
        out.write_text(json.dumps({"args": vars(args), **result}, indent=2) + "\n")
        return
    if args.only_llama_cpp:
        Path(args.tmp).mkdir(parents=True, exist_ok=True)
        result = llama_cpp(args, pairs)
        if result is None:
            raise SystemExit("llama-cpp-python is not installed: pip install llama-cpp-python")
        out = Path(args.out).with_name("serve_load_llama_cpp.json")
        out.write_text(json.dumps({"args": vars(args), "llama_cpp_fine_tuned": result}, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    # the peak is measured before the first server and after each, and the best counts: on a shared machine whose
    # speed wanders between runs (300-430 GFLOP/s here), one low measurement would flatter every share
    peaks = [matmul_peak()]
    results: dict = {"servers": {}}
    variants = [("", [])]
    for variant in args.variant:
        name, sep, setting = variant.partition("=")
        if not sep or "=" not in setting:
            parser.error(f"--variant wants NAME=SECTION.KEY=VALUE, got {variant!r}")
        variants.append((name, ["--set", setting]))
    for batching, (name, extra) in ((b, v) for b in args.batching for v in variants):
        s = load_server(args, pairs, ["--batching", batching, *extra])
        batching = f"{batching}, {name}" if name else batching
        print(f"server ({batching} batching) with {args.clients} clients: {s['reasons_per_s']:.2f} reasons/s, p50 "
              f"{s['p50_s']:.2f} s, p95 {s['p95_s']:.2f} s, p99 {s['p99_s']:.2f} s, {s['errors']} errors; the model "
              f"busy {100 * (s['busy_share'] or 0):.0f}% of the time", flush=True)
        results["servers"][batching] = s
        peaks.append(matmul_peak())
    peak = (max(value for value, _ in peaks), peaks[0][1])
    results["peak_measurements_gflop_s"] = [value for value, _ in peaks]
    for batching, s in results["servers"].items():
        bound = s["flop_bound"] = flop_bound(args, pairs, s, peak)
        print(f"FLOP bound ({batching}): {bound['gflop_per_reason']:.1f} GFLOP a reason ({bound['prompt_tokens']:.0f} "
              f"prompt + {bound['generated_tokens']:.1f} generated tokens), {bound['achieved_gflop_s']:.1f} of a "
              f"measured {bound['peak_gflop_s']:.1f} GFLOP/s peak (best of {', '.join(f'{v:.0f}' for v, _ in peaks)}; "
              f"{bound['precision']}, {bound['threads']} threads): {100 * bound['share_of_bound']:.0f}% of the bound",
              flush=True)
    s = results["servers"][args.batching[0]]
    if args.skip_references:
        print(json.dumps(results, indent=2))
        Path(args.out).write_text(json.dumps({"args": vars(args), **results}, indent=2) + "\n")
        return
    results["transformers_one_at_a_time"] = plain_generate(args, pairs)
    results["llama_cpp_single_stream"] = llama_cpp(args, pairs)
    print(json.dumps(results, indent=2))
    plain = results["transformers_one_at_a_time"]["reasons_per_s"]
    print(f"transformers generate one at a time: {plain:.2f} reasons/s; server / it = {s['reasons_per_s'] / plain:.1f}x")
    if results["llama_cpp_single_stream"]:
        ref = results["llama_cpp_single_stream"]["reasons_per_s"]
        print(f"llama.cpp single stream: {ref:.2f} reasons/s; server / it = {s['reasons_per_s'] / ref:.2f}x")
    else:
        print("llama.cpp reference skipped: pip install llama-cpp-python")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), **results}, indent=2))


if __name__ == "__main__":
    main()
