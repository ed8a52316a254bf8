"""Distillation: a second training stage that teaches a run to write, in one greedy decode, the reason it would
choose among many candidates (MBR/QE fine-tuning, Finkelstein et al. 2023; DPO, Rafailov et al. 2023).

``distill(RUN, OUT, config)``:

1. decodes ``distill.candidates`` (null: ``generate.candidates``) candidates for ``distill.pairs`` training records and ``distill.validation_pairs``
   validation records of the run's split (kept in RUN/candidates/, resumable, as ``recreason tune`` keeps them:
   the validation records are the last ones of the split, the same ones tuning decodes);
2. chooses among them with the selection score and weights of ``generate`` (the score the run ships:
   :class:`~recreason.inference.selection.TermTable`), and for the preference objective the text it is preferred
   to (``distill.rejected``: the lowest-scored candidate, or the greedy one where it was not chosen);
3. trains OUT from RUN's best weights on them (``distill.mode``): ``chosen`` texts as targets, ``mixed`` chosen
   texts and the records' own reviews, or ``preference`` (DPO, chosen against ``distill.rejected``, RUN as the
   reference, plus the chosen texts' NLL). Early stopping measures the loss of the validation records' chosen texts.

The model, method and prompt are RUN's (the second stage continues the first); ``train`` keys such as the learning
rate, epochs and validation cadence come from the config. OUT is a run like any other: ``evaluate``, ``serve``
and ``export`` take it; OUT/distill/targets.jsonl keeps what it was trained on and OUT/distill/summary.json the cost.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import random
import shutil
import time
from pathlib import Path

from recreason.config import GenerateConfig, to_dict
from recreason.data.records import target_text
from recreason.errors import ConfigError
from recreason.inference import candidates as candidate_cache
from recreason.inference.predictor import Predictor
from recreason.rundir import Run, RunPaths
from recreason.training.trainer import Trainer

log = logging.getLogger(__name__)

# What the second stage takes from the first run whatever the config says: the weights it starts from must fit.
ARCHITECTURE = ("model", "method", "lora_r", "lora_alpha", "target_modules", "lora_top_layers", "adapter_size",
                "num_virtual_tokens", "prompt_mode", "rating_head", "interest_head", "split_seed", "target",
                "max_prompt_tokens", "max_target_tokens")


def draw(records: list, n: int | None, seed: int) -> list:
    """``n`` of ``records`` drawn with ``seed`` (all of them when ``n`` is None or larger), in their order."""
    if n is None or n >= len(records):
        return list(records)
    keep = set(random.Random(seed).sample(range(len(records)), n))
    return [r for k, r in enumerate(records) if k in keep]


def choose(predictor: Predictor, split: str, records: list, gen: GenerateConfig, progress: bool = True) -> dict:
    """Decode ``records``' candidates (cached) and choose: {"chosen", "rejected", "greedy": texts per record,
    "seconds": the decode's time}."""
    prompted, cands, seconds = candidate_cache.decode(predictor, split, records, gen, progress)
    table, texts = candidate_cache.term_table(predictor, prompted, cands, predictor.generic_table(gen))
    best, worst = table.choose(gen), table.worst(gen)
    return {"chosen": [t[k] for t, k in zip(texts, best)], "rejected": [t[k] for t, k in zip(texts, worst)],
            "greedy": [t[0] for t in texts], "seconds": seconds}


def student_config(run: Run, train_cfg):
    """The second stage's training config: ``train_cfg``'s schedule on the run's architecture, from its weights."""
    changed = {k: getattr(run.train_config, k) for k in ARCHITECTURE
               if getattr(run.train_config, k) != getattr(train_cfg, k)}
    if changed:
        log.info("distill keeps the run's %s", ", ".join(f"{k}={v!r}" for k, v in changed.items()))
    return dataclasses.replace(train_cfg, **{k: getattr(run.train_config, k) for k in ARCHITECTURE},
                               init_from=str(run.dir))


def distill(run_dir: str | Path, out_dir: str | Path, config: dict, progress: bool = True,
            resume: bool | str = False) -> dict:
    """Decode, choose and train (module docstring); returns OUT/distill/summary.json's content."""
    dcfg = config["distill"]
    gen = dataclasses.replace(config["generate"], candidates=dcfg.candidates or config["generate"].candidates)
    if gen.candidates < 2:
        raise ConfigError("distill chooses among candidates: set distill.candidates (or generate.candidates) to 2 "
                          "or more (configs/distill.yaml decodes 32)")
    out = RunPaths(out_dir)
    if Path(out_dir).resolve() == Path(run_dir).resolve():
        raise ConfigError("--out must be a new run directory, not the run being distilled")
    predictor = Predictor(run_dir, gen)
    run = predictor.run
    split = predictor.dataset.subset(run.split_seed, "train"), predictor.dataset.subset(run.split_seed, "validation")
    train_records = draw(split[0], dcfg.pairs, dcfg.seed)
    valid_records = split[1][-min(dcfg.validation_pairs, len(split[1])):]  # the records `recreason tune` decodes
    train_choice = choose(predictor, "train", train_records, gen, progress)
    valid_choice = choose(predictor, "validation", valid_records, gen, progress)
    del predictor
    gc.collect()

    refs = [target_text(r, run.info["target"]) for r in train_records]
    targets = {r.index: [c] + ([ref] if dcfg.mode == "mixed" and ref else [])
               for r, c, ref in zip(train_records, train_choice["chosen"], refs)}
    against = train_choice["greedy"] if dcfg.rejected == "greedy" else train_choice["rejected"]
    rejected = ({r.index: x for r, x, c in zip(train_records, against, train_choice["chosen"])
                 if x != c} if dcfg.mode == "preference" else None)
    out.root.mkdir(parents=True, exist_ok=True)
    out.distill.mkdir(parents=True, exist_ok=True)
    with open(out.distill_targets, "w", encoding="utf-8") as f:
        for r, c, x, g, ref in zip(train_records, train_choice["chosen"], against,
                                   train_choice["greedy"], refs):
            f.write(json.dumps({"index": r.index, "user_id": r.user, "item_id": r.item, "chosen": c, "rejected": x,
                                "greedy": g, "reference": ref}, ensure_ascii=False) + "\n")

    train_cfg = student_config(run, config["train"])
    full = {**to_dict({**config, "train": train_cfg}), "prompt": dataclasses.asdict(run.prompt_config)}
    start = time.time()
    trainer = Trainer(run.info["dataset"], out_dir, train_cfg, run.prompt_config, full, progress, targets=targets,
                      valid_targets={r.index: [c] for r, c in zip(valid_records, valid_choice["chosen"])},
                      rejected=rejected)
    summary = trainer.fit(resume)
    if RunPaths(run_dir).ranker.exists() and not out.ranker.exists():
        shutil.copytree(RunPaths(run_dir).ranker, out.ranker)  # same split, same ranking
    result = {"mode": dcfg.mode, "teacher": str(Path(run_dir).resolve()), "candidates": gen.candidates,
              "train_pairs": len(train_records), "validation_pairs": len(valid_records),
              "preference_pairs": len(rejected) if rejected is not None else None,
              "rejected": dcfg.rejected if rejected is not None else None,
              "chosen_is_greedy": sum(c == g for c, g in zip(train_choice["chosen"], train_choice["greedy"])),
              "decode_seconds": train_choice["seconds"] + valid_choice["seconds"],
              "train_seconds": time.time() - start, "steps": summary["steps"],
              "best_validation_loss": summary["best_validation_loss"]}
    (out.distill_summary).write_text(json.dumps(result, indent=2) + "\n")
    return result
