"""One batch of candidate decoding, as the server runs it and as it ran before, side by side.

Each setting runs in a process of its own (a thread's pool of compute threads, once made, stays for the process),
the settings alternating round by round; every process loads the run, decodes one batch to warm up, then times
``--batches`` batches of ``--prompts`` test prompts with the run's decoding settings (``--config``/``--set`` as for
``recreason serve``). Settings:

- ``loading thread``: the batch decoded on the thread that loaded the model (what a script or the batch job does);
- ``second thread``: the model loaded with every torch thread, the batch decoded on another thread (the server
  before: its batcher thread kept a second GNU OpenMP pool beside the loading thread's);
- ``second thread, loaded with one`` (the server now, ``ExplanationService``): loaded with one torch thread, the
  batch decoded on another thread with all of them;
- ``no packed layers`` and ``no top-64 pick``: the loading thread with ``packed_products`` or
  ``SeededSampler.pick`` switched off (the layers' previous forward; the sampler's whole-vocabulary scores).

Prints seconds per batch of each setting (median of its rounds), its ratio to the first, and the voluntary
context switches per batch. Run it alone: on 2 cores anything beside it skews every setting.

Usage: python benchmarks/decode_thread.py --run runs/full/distilled --config configs/demo.yaml
       --config configs/full.yaml --config configs/distilled.yaml --set generate.batch_size=16 [--rounds 3]
Results: benchmarks/results/decode_thread.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from runargs import add_run_arguments

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("loading thread", "second thread", "second thread, loaded with one", "no packed layers",
            "no top-64 pick")


def one(args) -> dict:
    """Time ``args.batches`` batches in this process under ``args.setting``."""
    import resource
    import threading

    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from recreason.config import load_config
    from recreason.generation import generate as g
    from recreason.inference import Predictor, Request

    threads = torch.get_num_threads()
    if args.setting == "second thread, loaded with one":
        torch.set_num_threads(1)
    gen = load_config(args.config or None, args.set)["generate"]
    predictor = Predictor(args.run, gen)
    if args.setting == "no packed layers":
        for module in predictor.model.modules():
            if getattr(module, "_recreason_packed", False):
                module.forward = module._recreason_unpacked
    if args.setting == "no top-64 pick":
        del g.SeededSampler.pick  # the decoding loop then takes the whole-vocabulary scores' argmax
    test = predictor.dataset.subset(predictor.run.split_seed, "test")
    random.Random(0).shuffle(test)
    prompts = [predictor.prompt(Request(r.user, r.item)).prompt for r in test[:args.prompts * (args.batches + 1)]]
    timings: list[float] = []
    switches: list[int] = []

    def decode() -> None:
        torch.set_num_threads(threads)
        for k in range(args.batches + 1):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
            start = time.perf_counter()
            g.generate_candidates(predictor.model, predictor.tokenizer,
                                  prompts[k * args.prompts:(k + 1) * args.prompts], predictor.gen_cfg, progress=False)
            if k:  # the first batch warms up (packing, caches)
                timings.append(time.perf_counter() - start)
                switches.append(resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before)

    if args.setting.startswith("second thread"):
        worker = threading.Thread(target=decode)
        worker.start()
        worker.join()
    else:
        decode()
    return {"seconds": timings, "voluntary_switches": switches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--batches", type=int, default=1, help="timed batches per process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per setting, the settings alternating")
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)  # one process's part
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/decode_thread.json"))
    args = parser.parse_args()
    if args.setting:
        print(json.dumps(one(args)))
        return
    flags = ["--run", args.run, "--prompts", str(args.prompts), "--batches", str(args.batches)]
    flags += [flag for path in args.config for flag in ("--config", path)]
    flags += [flag for item in args.set for flag in ("--set", item)]
    results = {name: {"seconds": [], "voluntary_switches": []} for name in SETTINGS}
    for _ in range(args.rounds):
        for name in SETTINGS:
            out = subprocess.run([sys.executable, __file__, *flags, "--setting", name], capture_output=True,
                                 text=True, check=True).stdout
            part = json.loads(out.strip().splitlines()[-1])
            for key in part:
                results[name][key] += part[key]
    first = statistics.median(results[SETTINGS[0]]["seconds"])
    for name in SETTINGS:
        r = results[name]
        r["median_seconds"] = statistics.median(r["seconds"])
        r["ratio_to_loading_thread"] = r["median_seconds"] / first
        print(f"{name}: {r['median_seconds']:.2f} s a batch of {args.prompts} (x{r['ratio_to_loading_thread']:.2f}; "
              f"rounds {', '.join(f'{s:.2f}' for s in r['seconds'])}), "
              f"{statistics.median(r['voluntary_switches']):.0f} voluntary context switches a batch")
    Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "setting"},
                                          "settings": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
