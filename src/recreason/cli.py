"""The ``recreason`` command: one subcommand per stage.

Every subcommand is a thin function over the library; settings come from a
YAML config (``--config``), ``--set section.key=value`` overrides and the
flags of each subcommand, in increasing priority.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

from recreason import __version__

log = logging.getLogger("recreason")


def _config(args, flags: dict | None = None):
    """The layered config; ``flags`` ({"section.key": value}) are the command's own flags, applied last and held
    to the same ranges as --set (None: not given)."""
    import yaml

    from recreason.config import load_config

    given = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
             for key, value in (flags or {}).items() if value is not None]
    return load_config(args.config, list(args.set) + given)


def _mapping(text: str) -> dict[str, str]:
    """An argparse type: ``a=b,c=d`` -> {"a": "b", "c": "d"}, or one line saying what is wrong."""
    pairs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        ours, sep, theirs = part.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise argparse.ArgumentTypeError(f"expected NAME=COLUMN pairs separated by commas, got {part!r}")
        pairs[ours.strip()] = theirs.strip()
    return pairs


def _bounded(kind, low, high):
    """An argparse type: a number of ``kind`` in [low, high], or one line saying the range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low <= value <= high):  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text} is out of range; valid: {low} to {high}")
        return value
    return parse


def cmd_prepare(args) -> int:
    """Read, validate, extract explanations and split a review log into a dataset directory."""
    from recreason.data.dataset import prepare

    cfg = _config(args, {"prepare.schema": args.schema, "prepare.seeds": args.seeds, "prepare.split": args.split,
                         "prepare.max_records": args.max_records, "prepare.items": args.items,
                         "prepare.columns": args.columns, "prepare.item_columns": args.item_columns,
                         "prepare.language": args.language})["prepare"]
    start = time.time()
    stats = prepare(args.input, args.out, cfg, progress=not args.quiet)
    print(
        f"read {stats['input_records']} records: {stats['rejected']} rejected "
        f"(see {Path(args.out) / 'rejects.jsonl'}), {stats['skipped_no_explanation']} without an explanation "
        f"sentence (see skipped.jsonl), {stats['explained']} explained"
    )
    print(f"{stats['users']} users, {stats['items']} items, {stats['features']} features ({stats['language']}); "
          f"{cfg.split} splits for seeds {list(stats['splits'])}: {next(iter(stats['splits'].values()))}")
    if "item_table" in stats:
        t = stats["item_table"]
        print(f"item table: {t['rows']} rows, {t['rejected']} rejected (see item_rejects.jsonl); "
              f"{t['log_items_described']} of the log's items described, {t['log_items_with_title']} with a title, "
              f"{t['log_items_without_metadata']} without")
    print(f"dataset written to {args.out} in {time.time() - start:.0f} s")
    return 0


def cmd_combine(args) -> int:
    """Combine prepared datasets of several domains into one, each record tagged with its domain (named in the
    prompt) and each domain keeping its own split, to train one model across domains. Example:
    recreason combine instruments=runs/mi/data music=runs/dm/data --out runs/joint/data"""
    from recreason.data.combine import combine

    names = [name for name, _ in args.sources]
    if len(set(names)) < len(names):
        raise SystemExit(f"recreason combine: each domain needs its own name, got {', '.join(names)}")
    stats = combine(dict(args.sources), args.out)
    parts = ", ".join(f"{name}: {d['explained']}" for name, d in stats["domains"].items())
    print(f"{stats['explained']} records ({parts}), {stats['users']} users, {stats['items']} items, "
          f"{stats['features']} features; splits {stats['splits']}")
    print(f"dataset written to {args.out}; train on it, then evaluate each domain with --domain NAME")
    return 0


def _sources(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name) or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DATASET_DIR with NAME of letters, digits, '-', '_' or '.', "
                                         f"got {text!r}")
    return name, path


def cmd_export(args) -> int:
    """Export a prepared dataset as NETE/PETER reviews.pickle, or a run as a merged model or a GGUF file."""
    if args.merged or args.format == "merged":
        from recreason.rundir import Run

        out = Run(args.source).export_merged(args.out)
        print(f"wrote the merged model to {out} (loads with transformers' from_pretrained)")
        return 0
    if args.format == "gguf":
        from recreason.errors import ConfigError
        from recreason.models.export import export_gguf
        from recreason.models.registry import ALIASES
        from recreason.rundir import Run

        run = Run(args.source)
        if run.prompt_mode != "discrete":
            raise ConfigError(f"a {run.prompt_mode!r}-prompt run needs its learned user/item vectors, which GGUF "
                              "cannot hold; export discrete-prompt runs")
        reference = args.tokenizer_gguf
        if reference is None and run.info["model"] in ALIASES:
            reference = ALIASES[run.info["model"]].locate()
        elif reference is None and str(run.info["model"]).endswith(".gguf"):
            reference = run.info["model"]
        if reference is None:
            raise ConfigError("GGUF export copies the tokenizer from a GGUF of the base model: pass --tokenizer-gguf")
        from recreason.models.export import check_gguf_target

        check_gguf_target(args.out, reference)  # before minutes of merging and writing
        model, _ = run.load_model(dtype="fp32", merge=True)
        out = export_gguf(model.lm, args.out, reference, args.type, name=Path(args.source).name)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB, {args.type}); run it with llama.cpp: "
              f"llama-cli -m {out} -p '...'")
        return 0
    from recreason.data.dataset import Dataset
    from recreason.data.nete import export_nete

    path = export_nete(Dataset(args.source), args.out, args.seeds)
    print(f"wrote {path} and split folders under {args.out}")
    return 0


def cmd_train(args) -> int:
    """Fine-tune a causal LM to write explanations; writes a run directory."""
    from recreason.config import to_dict
    from recreason.training.trainer import train

    config = _config(args, {f"train.{flag}": getattr(args, flag) for flag in
                            ("model", "method", "max_steps", "lr", "batch_size", "split_seed", "epochs", "seed")})
    cfg = config["train"]
    summary = train(args.dataset, args.out, cfg, config["prompt"], to_dict(config), progress=not args.quiet,
                    resume="or-start" if args.resume_or_start else args.resume, rank_cfg=config["rank"])
    print(f"trained {summary['steps']} steps in {summary['wall_seconds']:.0f} s "
          f"({summary['tokens_per_second']:.0f} tokens/s); best validation loss "
          f"{summary['best_validation_loss']:.4f} at step {summary['best_step']}"
          f"{' (stopped early)' if summary['stopped_early'] else ''}")
    from recreason.rundir import RunPaths

    paths = RunPaths(args.out)
    print(f"run written to {args.out} (best checkpoint in {paths.best}, TensorBoard logs in {paths.tensorboard})")
    return 0


def cmd_explain(args) -> int:
    """Write a reason for every (user_id, item_id) pair of a CSV/JSONL/Parquet file (a resumable batch job)."""
    from recreason.inference import Predictor
    from recreason.jobs import explain_pairs

    gen = _config(args)["generate"]
    if args.engine == "ray":
        from recreason.jobs.cluster import explain_pairs_ray

        stats = explain_pairs_ray(args.run, gen, args.pairs, args.out, args.chunk_size, workers=args.workers,
                                  address=args.address, fmt=args.format, cold_start=args.cold_start,
                                  progress=not args.quiet)
        print(f"{stats['input_rows']} rows in {args.pairs}: {stats['rows']} explained + {stats['rejected']} rejected"
              f"; {stats['shards']} shards in {args.out} ({stats['resumed_shards']} were already done, "
              f"{stats['reasons_per_second']:.2f} reasons/s on {args.workers} worker(s))")
        return 0
    predictor = Predictor(args.run, gen, cold_start=args.cold_start)
    stats = explain_pairs(predictor, args.pairs, args.out, args.chunk_size, progress=not args.quiet)
    print(f"{stats['input_rows']} rows in {args.pairs}: {stats['rows']} explained + {stats['rejected']} rejected"
          + (f" (see {stats['rejects_file']})" if stats["rejected"] else "")
          + f"; wrote {args.out} ({stats['resumed']} pairs were already done, {stats['decoded']} distinct "
          f"requests, {stats['reasons_per_second']:.2f} reasons/s)")
    return 0


def cmd_rank(args) -> int:
    """Fit the ranking stage (an implicit ALS/BPR model, or popularity) on a dataset's training split."""
    from recreason.data.dataset import Dataset
    from recreason.ranking import fit_ranker

    config = _config(args, {"rank.model": args.model})
    cfg = config["rank"]
    start = time.time()
    ranker = fit_ranker(Dataset(args.dataset).subset(args.split_seed, "train"), cfg)
    ranker.save(args.out)
    print(f"fitted a {cfg.model} ranker on {len(ranker.users)} users and {len(ranker.items)} items in "
          f"{time.time() - start:.1f} s; written to {args.out}")
    return 0


def cmd_generate(args) -> int:
    """Generate explanations for a split with a trained run (or its base model: --system zero-shot)."""
    from recreason.data.records import target_text
    from recreason.evaluation.evaluate import write_generated
    from recreason.inference import Predictor, Request

    gen = _config(args, {"generate.max_records": args.max_records})["generate"]
    predictor = Predictor(args.run, gen, system=args.system)
    run, dataset = predictor.run, predictor.dataset
    records = dataset.subset(run.split_seed, args.split)
    if gen.max_records:
        records = records[: gen.max_records]
    explained = predictor.explain([Request(r.user, r.item, record=r) for r in records], progress=not args.quiet)
    texts = [e.generated for e in explained]
    out = Path(args.out) if args.out else run.paths.generated(args.split, args.system)
    write_generated(out, records, texts, [target_text(r, run.info["target"]) for r in records], dataset.features,
                    explanations=explained)
    print(f"wrote {len(texts)} explanations to {out}")
    return 0


def cmd_evaluate(args) -> int:
    """Score fine-tuned runs against the zero-shot base model, retrieval, popularity and MF baselines."""
    from recreason.evaluation.evaluate import evaluate_runs

    config = _config(args, {"generate.max_records": args.max_records, "evaluate.split": args.split})
    gen, ev = config["generate"], config["evaluate"]
    report = evaluate_runs(args.run, args.split or ev.split, gen, args.systems or ev.systems, ev.max_len,
                           regenerate=args.regenerate, progress=not args.quiet, out_dir=args.out,
                           bootstrap=ev.bootstrap, semantic=ev.semantic, domain=args.domain)
    scope = f"the first {gen.max_records} (generate.max_records)" if gen.max_records else "the whole split"
    print(f"\n{report['split']} split, {report['records']} records ({scope}), first {report['max_len']} tokens:\n")
    print(report["table"])
    if report["differences_table"]:
        print("\nPaired bootstrap difference to the best text baseline (95% interval):\n")
        print(report["differences_table"])
    print(f"\nreport written to {Path(report['html']).parent} (open {report['html']} in a browser)")
    if args.json:
        print(json.dumps(report["results"], indent=2))
    return 0


def cmd_tune(args) -> int:
    """Choose the selection weights of a run decoding several candidates, on its validation records only:
    the most ROUGE-L + BLEU-4 over greedy decoding, keeping USR, FMR, FCR and the generic rate, with generic and
    ungrounded rates at most half a reference's (recreason.evaluation.tuning says how). With --match FULL_RUN (a
    distilled run's teacher) the choice must also be at least as good as FULL_RUN's served reasons on USR,
    generic and ungrounded rates. Writes RUN/tuned.yaml, a config to layer last (--config RUN/tuned.yaml), and
    every trial to RUN/tuning/trials.json."""
    from recreason.evaluation.tuning import chosen_weights, tune

    gen = _config(args)["generate"]
    if args.also_reference and not args.also:
        from recreason.errors import ConfigError

        raise ConfigError("--also-reference is the reference of the run given with --also")
    if args.also_match and not args.also:
        from recreason.errors import ConfigError

        raise ConfigError("--also-match is the run that --also's run stands in for")
    result = tune(args.run, gen, args.reference, args.also, args.also_reference, args.records,
                  progress=not args.quiet, match=args.match, also_match=args.also_match,
                  match_margin=args.match_margin)
    from recreason.rundir import RunPaths

    weights = chosen_weights(result)
    best = result["best_within_bar"] or result["best"]
    print(f"scored {result['settings']} weight settings ({result['distinct_selections']} distinct choices) on "
          f"{result['records']} validation records with {result['candidates']} candidates each")
    if weights is None:
        print("no setting keeps greedy decoding's USR, FMR, FCR and generic rate: the tuned config decodes greedily")
    else:
        print(f"chosen: {weights}")
        print("  " + ", ".join(f"{m} {best[m]:.4g}" for m in ("BLEU-1", "BLEU-4", "ROUGE-L", "USR", "FMR", "FCR",
                                                           "Generic", "Ungrounded"))
              + f" (ROUGE-L + BLEU-4 {best['gain']:+.2f} over greedy)"
              + ("" if result["best_within_bar"] else "; no setting met the grounding bar"))
    for split, entry in (("", result), (" (--also)", result.get("later", {}))):
        if entry.get("match"):
            print(f"  matched run{split}: " + ", ".join(f"{m} {entry['match'][m]:.4g}"
                                                     for m in ("BLEU-4", "ROUGE-L", "USR", "Generic", "Ungrounded")))
    paths = RunPaths(args.run)
    print(f"wrote {paths.tuned_config} (layer it: --config {paths.tuned_config}) and {paths.trials}")
    return 0


def cmd_distill(args) -> int:
    """Teach a run to write in one greedy decode the reason it would choose among its candidates: decode
    distill.candidates (default generate.candidates) candidates for distill.pairs training records (kept in
    RUN/candidates/, resumable), choose with generate's selection weights, and train a second stage from RUN's
    weights into --out (distill.mode: chosen | mixed | preference). --out is a run like any other: evaluate, serve
    and export take it."""
    from recreason.jobs.distill import distill

    config = _config(args, {"distill.mode": args.mode, "distill.pairs": args.pairs})
    result = distill(args.run, args.out, config, progress=not args.quiet,
                     resume="or-start" if args.resume_or_start else False)
    from recreason.rundir import RunPaths

    print(f"distilled {args.run} into {args.out} ({result['mode']}): {result['train_pairs']} training pairs x "
          f"{result['candidates']} candidates decoded and chosen in {result['decode_seconds']:.0f} s "
          f"({result['chosen_is_greedy']} chosen texts were the greedy one), trained {result['steps']} steps in "
          f"{result['train_seconds']:.0f} s; best validation loss {result['best_validation_loss']:.4f}")
    print(f"what it was trained on: {RunPaths(args.out).distill_targets}; evaluate it greedily with "
          f"recreason evaluate --run {args.out} --set generate.candidates=1")
    print(f"choose its own selection weights with recreason tune --run {args.out} --match {args.run} (configs/"
          f"distilled.yaml holds those measured on the full run), then serve it with them layered last: recreason "
          f"serve --run {args.out} --config ... --config configs/distilled.yaml")
    return 0


def cmd_recommend(args) -> int:
    """Top-K unseen items for a user (the run's ranker; popularity for unknown users), each with a reason."""
    from recreason.errors import ConfigError
    from recreason.inference import Predictor

    gen = _config(args)["generate"]
    if args.all_users and args.engine == "ray":
        from recreason.jobs.cluster import recommend_all_ray

        if not args.out:
            raise ConfigError("--all-users writes shards: give --out DIR")
        stats = recommend_all_ray(args.run, gen, args.k, args.out, args.chunk_size, workers=args.workers,
                                  address=args.address, fmt=args.format, cold_start=args.cold_start,
                                  progress=not args.quiet)
        print(f"wrote {stats['rows']} recommendations in {stats['shards']} shards to {args.out} "
              f"({stats['resumed_shards']} were already done; {stats['reasons_per_second']:.2f} reasons/s)")
        return 0
    predictor = Predictor(args.run, gen, cold_start=args.cold_start)
    if args.all_users:
        from recreason.jobs import recommend_all

        if not args.out:
            raise ConfigError("--all-users writes a file: give --out FILE (.jsonl, .csv or .parquet)")
        stats = recommend_all(predictor, args.k, args.out, args.chunk_size, progress=not args.quiet)
        print(f"wrote {stats['rows']} recommendations to {args.out} ({stats['resumed']} users were already done; "
              f"{stats['reasons_per_second']:.2f} reasons/s)")
        return 0
    if not args.user:
        raise ConfigError("give --user USER, or --all-users with --out FILE")
    recs = predictor.recommend(args.user, args.k, not args.include_seen)
    if args.json:
        print(json.dumps({"user": args.user, "recommendations": [r.to_dict() for r in recs]}, indent=2))
        return 0
    print(f"top {len(recs)} for user {args.user}:")
    for n, r in enumerate(recs, 1):
        rating = "" if r.predicted_rating is None else f"predicted {r.predicted_rating:.2f} ({r.interest}) "
        print(f"{n:>3}. {r.item_id}  {rating}- {r.reason}")
    return 0


def cmd_serve(args) -> int:
    """Serve a trained run over HTTP: explanations, recommendations, interactions, /healthz, /metrics."""
    import os

    import uvicorn

    from recreason.config import to_dict
    from recreason.errors import ConfigError

    if args.api_key_file:
        keys = [line.strip() for line in Path(args.api_key_file).read_text().splitlines() if line.strip()]
        if not keys:
            raise ConfigError(f"{args.api_key_file} holds no API key")
    from recreason.rundir import Run

    from recreason.serving.store import check_store

    Run(args.run)  # fail here, before workers start, when the run is missing
    if args.store:
        check_store(args.store)
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    wildcard = args.host in ("0.0.0.0", "::", "")
    if args.allowed_hosts:
        allowed = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    else:
        allowed = ["*"] if wildcard else ["localhost", "127.0.0.1", "::1"] + ([] if loopback else [args.host])
    if not loopback and not args.api_key_file:
        log.warning("serving on %s with no API key: anyone who can reach it can read histories and record "
                    "interactions; pass --api-key-file", args.host)
    if allowed == ["*"]:
        log.warning("bound to every interface with no --allowed-hosts: any Host header is answered")
    if args.reasons:  # loaded once, before the workers start; each worker answers stored pairs from the store
        from recreason.serving.precomputed import import_reasons
        from recreason.serving.store import open_store

        run = Run(args.run)
        store = open_store(args.store or str(run.paths.store))
        try:
            loaded = import_reasons(store, args.reasons, run.fingerprint())
        finally:
            store.close()
        print(f"stored {loaded['stored']} precomputed reasons from {args.reasons}"
              + (f"; {loaded['other_runs']} rows written by another run were left out" if loaded["other_runs"] else ""))
    # Each worker process builds its own service (one model per worker) from these settings.
    os.environ["RECREASON_SERVE"] = json.dumps({
        "run": args.run, "store": args.store, "api_key_file": args.api_key_file, "private_metrics": args.private_metrics,
        "allowed_hosts": allowed,
        "generate": to_dict(_config(args))["generate"],
        "serve": {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
                  "cold_start": args.cold_start, "batching": args.batching},
    })
    print(f"serving {args.run} on http://{args.host}:{args.port} with {args.workers} worker(s) (OpenAPI at /docs)")
    uvicorn.run("recreason.serving.app:app_from_environment", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level="warning")
    return 0


def _add_prepare(sub, common) -> None:
    p = sub.add_parser("prepare", parents=[common], help=cmd_prepare.__doc__, description=cmd_prepare.__doc__)
    p.add_argument("input", help="review log: Amazon dump or generic JSONL/CSV/Parquet, optionally .gz")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--schema", choices=["auto", "amazon", "generic"], help="input schema (default: auto)")
    p.add_argument("--seeds", type=int, nargs="+", help="split seeds (default: 1)")
    p.add_argument("--split", choices=["random", "temporal"],
                   help="random 8:1:1 (default) or temporal: test on the latest reviews, validate on the ones before")
    p.add_argument("--max-records", type=int, help="use only the first N valid reviews")
    p.add_argument("--items", metavar="FILE",
                   help="item table beside the log: Amazon metadata lines (Python dict literals, read safely), JSONL, "
                        "CSV or Parquet; titles, categories, genres and tags enter the prompt and the web page")
    p.add_argument("--columns", type=_mapping, metavar="OURS=THEIRS,...",
                   help="names of the log's columns, e.g. user_id=user_md5,item_id=douban_id,text=content,"
                        "timestamp=comment_time (user, item and time are accepted as short names)")
    p.add_argument("--item-columns", type=_mapping, dest="item_columns", metavar="OURS=THEIRS,...",
                   help="names of the item table's id and title columns, e.g. item_id=MOVIE_ID,title=NAME")
    p.add_argument("--language", choices=["auto", "en", "zh"],
                   help="language of the reviews: en (spaCy), zh (jieba) or auto (default: zh when most are Chinese)")
    p.set_defaults(func=cmd_prepare)


def _add_combine(sub, common) -> None:
    p = sub.add_parser("combine", parents=[common], help="combine prepared datasets of several domains into one",
                       description=cmd_combine.__doc__)
    p.add_argument("sources", nargs="+", type=_sources, metavar="NAME=DATASET",
                   help="a domain's name and its prepared dataset directory (at least two)")
    p.add_argument("--out", required=True, help="combined dataset directory to write")
    p.set_defaults(func=cmd_combine)


def _add_export(sub, common) -> None:
    p = sub.add_parser("export", parents=[common], help=cmd_export.__doc__, description=cmd_export.__doc__)
    p.add_argument("source", help="prepared dataset directory (nete) or run directory (merged)")
    p.add_argument("--format", choices=["nete", "merged", "gguf"], default="nete",
                   help="nete (dataset for PETER/PEPLER), merged (Hugging Face model dir) or gguf (one file for "
                        "llama.cpp/Ollama/LM Studio); default nete")
    p.add_argument("--type", choices=["f16", "q8_0", "f32"], default="f16", help="with --format gguf: weight type")
    p.add_argument("--tokenizer-gguf", dest="tokenizer_gguf",
                   help="with --format gguf: a GGUF of the base model to copy the tokenizer from (default: the "
                        "embedded model's file)")
    p.add_argument("--merged", action="store_true", help="same as --format merged: LoRA/AdaLoRA/IA3 merged into the base")
    p.add_argument("--out", required=True, help="output directory (a .gguf file with --format gguf)")
    p.add_argument("--seeds", type=_bounded(int, 0, 2**31 - 1), nargs="+", help="splits to export as folds 1..n (default: all)")
    p.set_defaults(func=cmd_export)


def _add_train(sub, common) -> None:
    p = sub.add_parser("train", parents=[common], help=cmd_train.__doc__, description=cmd_train.__doc__)
    p.add_argument("dataset", help="prepared dataset directory")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--model", help="alias (smollm2-135m; gemma3-270m, multilingual, with the extra "
                                          "'multilingual'), local directory, .gguf file or cached HF id")
    p.add_argument("--method", choices=["full", "lora", "adalora", "ia3", "prefix", "prompt", "adapter"],
                   help="fine-tuning method (train.method; default lora)")
    p.add_argument("--max-steps", type=int, dest="max_steps", help="stop after this many optimizer steps")
    p.add_argument("--epochs", type=float, help="passes over the training split (train.epochs)")
    p.add_argument("--lr", type=float, help="peak learning rate (train.lr)")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="global batch size (train.batch_size)")
    p.add_argument("--split-seed", type=int, dest="split_seed", help="which prepared split to train on")
    p.add_argument("--seed", type=int, help="random seed of initialisation and batch order")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT/last (weights, optimizer, scheduler, RNG, data "
                        "position); an error when OUT/last is missing or damaged")
    p.add_argument("--resume-or-start", action="store_true", dest="resume_or_start",
                   help="like --resume, but start from step 0 when OUT has no checkpoint yet")
    p.set_defaults(func=cmd_train)


def _add_explain(sub, common) -> None:
    p = sub.add_parser("explain", parents=[common], help=cmd_explain.__doc__, description=cmd_explain.__doc__)
    p.add_argument("--run", required=True, help="run directory from 'recreason train'")
    p.add_argument("--pairs", required=True,
                   help="CSV/JSONL/Parquet with user_id, item_id; optional history (texts) for unknown users and "
                        "item_features for unknown items")
    p.add_argument("--out", required=True, help="output file: .jsonl, .csv or .parquet; rerunning resumes it")
    p.add_argument("--chunk-size", type=_bounded(int, 1, 100_000), default=256, dest="chunk_size",
                   help="pairs per chunk written to the journal; a killed job loses at most one (default 256)")
    p.add_argument("--cold-start", choices=["item-only", "error"], default="item-only",
                   help="unknown user without history: item-only reason, or reject the row (default item-only)")
    _add_engine(p)
    p.set_defaults(func=cmd_explain)


def _add_engine(p) -> None:
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local (default): this machine, through a journal; ray: shards on a Ray cluster, --out is "
                        "then a folder of part-NNNNN files with a manifest, and a rerun skips the shards done")
    p.add_argument("--address", help="with --engine ray: the cluster's address (default: start a local instance)")
    p.add_argument("--workers", type=_bounded(int, 1, 10_000), default=1,
                   help="with --engine ray: actors, each holding the run's model once (default 1)")
    p.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl",
                   help="with --engine ray: the shards' format (default jsonl)")


def _add_rank(sub, common) -> None:
    p = sub.add_parser("rank", parents=[common], help=cmd_rank.__doc__, description=cmd_rank.__doc__)
    p.add_argument("dataset", help="prepared dataset directory")
    p.add_argument("--out", required=True, help="folder to write (RUN/ranker is where recommend and serve look)")
    p.add_argument("--model", choices=["als", "bpr", "popularity"], help="ranking model (rank.model; default als)")
    p.add_argument("--split-seed", type=_bounded(int, 0, 2**31 - 1), default=1, dest="split_seed",
                   help="which split's training part to fit on")
    p.set_defaults(func=cmd_rank)


def _add_generate(sub, common) -> None:
    p = sub.add_parser("generate", parents=[common], help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    p.add_argument("--run", required=True, help="run directory from 'recreason train'")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"],
                   help="which split's records to explain (default test)")
    p.add_argument("--system", default="fine-tuned", choices=["fine-tuned", "zero-shot"],
                   help="the fine-tuned run, or its base model before fine-tuning")
    p.add_argument("--max-records", type=int, help="only the first N records of the split")
    p.add_argument("--out", help="JSONL file (default: RUN/generated/SPLIT-SYSTEM.jsonl)")
    p.set_defaults(func=cmd_generate)


def _add_evaluate(sub, common) -> None:
    p = sub.add_parser("evaluate", parents=[common], help=cmd_evaluate.__doc__, description=cmd_evaluate.__doc__)
    p.add_argument("--run", required=True, action="append",
                   help="run directory from 'recreason train'; repeat to compare runs on one split in one table")
    p.add_argument("--out", help="report directory (default: FIRST_RUN/eval)")
    p.add_argument("--split", choices=["validation", "test"], help="split to score (default evaluate.split: test)")
    p.add_argument("--systems", nargs="+", choices=["zero-shot", "retrieval", "fine-tuned"],
                   help="systems to compare (default evaluate.systems: all three)")
    p.add_argument("--max-records", type=int, help="evaluate the first N records of the split")
    p.add_argument("--regenerate", action="store_true", help="ignore texts generated earlier")
    p.add_argument("--domain", help="score one domain of a combined dataset (recreason combine): its test records "
                                    "and its feature vocabulary; the report goes to RUN/eval/DOMAIN")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    p.set_defaults(func=cmd_evaluate)


def _add_tune(sub, common) -> None:
    p = sub.add_parser("tune", parents=[common], help="choose a run's selection weights on validation records",
                       description=cmd_tune.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example (what configs/full.yaml's weights came from; `make tune`):\n"
                              "  recreason tune --run runs/full/run --reference runs/demo/run \\\n"
                              "      --also runs/temporal/run --also-reference runs/temporal/demo \\\n"
                              "      --config configs/demo.yaml --config configs/full.yaml\n"
                              "then: recreason evaluate --run runs/full/run --config configs/demo.yaml "
                              "--config configs/full.yaml --config runs/full/run/tuned.yaml")
    p.add_argument("--run", required=True, help="run directory from 'recreason train'")
    p.add_argument("--reference", help="a cheaper run on the same data (e.g. the demo configuration's) whose greedy "
                                       "generic and ungrounded rates set the bar (default: this run's greedy text)")
    p.add_argument("--also", help="a run of the same configuration trained on another split (e.g. prepare --split "
                                  "temporal): the choice must meet the bar on its validation records too")
    p.add_argument("--also-reference", dest="also_reference", help="the reference run for --also's split")
    p.add_argument("--records", type=_bounded(int, 1, 10**9), help="tune on the last N validation records only (default: all after "
                                               "the first generate.generic_records)")
    p.add_argument("--match", help="a run this one stands in for (a distilled run: the full run that taught it), "
                                   "served as configured: choose only weights whose USR, generic and ungrounded rates "
                                   "are at least as good as its reasons' on the same records")
    p.add_argument("--also-match", dest="also_match", help="the run --also's run stands in for")
    p.add_argument("--match-margin", dest="match_margin", type=_bounded(float, 0.0, 1.0), default=0.01,
                   help="how much better than the matched run's USR, generic and ungrounded rates a choice must be "
                        "on the validation records (default 0.01: a guard against a setting that is best by luck)")
    p.set_defaults(func=cmd_tune)


def _add_distill(sub, common) -> None:
    p = sub.add_parser("distill", parents=[common], help="train a run on the reasons it chooses among candidates",
                       description=cmd_distill.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example (configs/distill.yaml holds the measured settings):\n"
                              "  recreason distill --run runs/full/run --out runs/full/distilled \\\n"
                              "      --config configs/demo.yaml --config configs/full.yaml --config configs/distill.yaml\n"
                              "then its own selection weights (make tune-distilled; configs/distilled.yaml holds "
                              "the measured ones) and serving with them:\n"
                              "  recreason serve --run runs/full/distilled --config configs/demo.yaml "
                              "--config configs/full.yaml --config configs/distilled.yaml")
    p.add_argument("--run", required=True, help="the run to distil (from 'recreason train')")
    p.add_argument("--out", required=True, help="the new run directory")
    p.add_argument("--mode", choices=("chosen", "mixed", "preference"),
                   help="chosen texts as targets | chosen and the reviews | DPO chosen vs lowest-scored "
                        "(default: distill.mode, chosen)")
    p.add_argument("--pairs", type=_bounded(int, 1, 10**12),
                   help="training records to decode candidates for (default: distill.pairs, 500)")
    p.add_argument("--resume-or-start", action="store_true", dest="resume_or_start",
                   help="continue the second stage from OUT/last when it exists (decoded candidates are always kept)")
    p.set_defaults(func=cmd_distill)


def _add_recommend(sub, common) -> None:
    p = sub.add_parser("recommend", parents=[common], help=cmd_recommend.__doc__, description=cmd_recommend.__doc__)
    p.add_argument("--run", required=True, help="run directory from 'recreason train'")
    p.add_argument("--user", help="user id")
    p.add_argument("--all-users", action="store_true", dest="all_users",
                   help="every user the run knows, written to --out as a resumable batch job")
    p.add_argument("--out", help="with --all-users: output file; the extension picks JSONL, CSV or Parquet")
    p.add_argument("--chunk-size", type=_bounded(int, 1, 100_000), default=32, dest="chunk_size",
                   help="with --all-users: users per chunk written to the journal (default 32)")
    p.add_argument("-k", type=_bounded(int, 1, 1000), default=10, help="how many items, 1 to 1000 (default 10)")
    p.add_argument("--include-seen", action="store_true", help="also rank items the user already interacted with")
    p.add_argument("--cold-start", choices=["item-only", "error"], default="item-only",
                   help="unknown user: rank by popularity with item-only reasons, or fail (default item-only)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_engine(p)
    p.set_defaults(func=cmd_recommend)


def _add_serve(sub, common) -> None:
    p = sub.add_parser("serve", parents=[common], help=cmd_serve.__doc__, description=cmd_serve.__doc__)
    p.add_argument("--run", "--model", dest="run", required=True, help="run directory from 'recreason train'")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_bounded(int, 1, 65535), default=8000, help="port to listen on (default 8000)")
    p.add_argument("--store", help="store URL: sqlite:///PATH or postgresql://USER@HOST/DB (needs recreason[postgres]); "
                                 "default: the SQLite file RUN/serving.db, seeded from the dataset on first start")
    p.add_argument("--api-key-file", help="file with one accepted API key per line (default: no keys)")
    p.add_argument("--private-metrics", action="store_true", dest="private_metrics",
                   help="/metrics needs an API key too (default: open, for a Prometheus scraper)")
    p.add_argument("--max-batch-size", type=_bounded(int, 1, 1024), default=16,
                   help="generations batched together, 1 to 1024 (default 16)")
    p.add_argument("--max-wait-ms", type=_bounded(float, 0.0, 10_000.0), default=50.0,
                   help="how long the first queued request waits for others to join its batch (default 50)")
    p.add_argument("--batching", choices=["whole", "continuous"], default="whole",
                   help="whole (default): each batch of up to --max-batch-size runs from start to end; continuous: "
                        "the reasons decode in one running batch (greedy reasons, or every draw of every request "
                        "where the configuration chooses among candidates), each request joining between two tokens "
                        "and answered as soon as its reason ends (beam search and sampling always go whole). On a "
                        "CPU at 16 closed-loop clients continuous measured no faster (docs/results.md)")
    p.add_argument("--cold-start", choices=["item-only", "error"], default="item-only",
                   help="unknown user without history: item-only reason, or 404 (default item-only)")
    p.add_argument("--reasons", help="a batch job's output (recreason explain / recommend --all-users: a file or a "
                                     "folder of Ray shards) to answer from the store without the model; rows of "
                                     "another run are left out")
    p.add_argument("--allowed-hosts", dest="allowed_hosts",
                   help="comma-separated Host names the server answers (default: localhost, 127.0.0.1 and ::1, plus "
                        "--host when it is one address; '*' for any): a guard against DNS rebinding")
    p.add_argument("--workers", type=_bounded(int, 1, 64), default=1, help="worker processes, each with its own model copy")
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recreason",
        description="Fine-tune a language model to explain recommendations: prepare -> train -> generate -> evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"recreason {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", action="append", default=[],
                        help="YAML config file (see configs/default.yaml); repeat to layer files, later ones win")
    common.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set train.lr=5e-4 (repeatable)")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_prepare(sub, common)
    _add_combine(sub, common)
    _add_export(sub, common)
    _add_train(sub, common)
    _add_explain(sub, common)
    _add_rank(sub, common)
    _add_generate(sub, common)
    _add_evaluate(sub, common)
    _add_tune(sub, common)
    _add_distill(sub, common)
    _add_recommend(sub, common)
    _add_serve(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "accelerate", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from recreason.errors import RecReasonError

    try:
        return args.func(args)
    except RecReasonError as exc:  # a failure the user can act on: one line; anything else is a bug: traceback
        print(f"recreason {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"recreason {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
