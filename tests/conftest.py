"""Shared fixtures: real review lines from ../shared/data and tiny random Llama models."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
AMAZON = SHARED / "amazon-musical-instruments" / "reviews.jsonl.gz"


def amazon_lines(n: int) -> list[str]:
    if not AMAZON.exists():
        pytest.fail(f"test data {AMAZON} is missing; the tests read the real reviews from ../shared/data")
    with gzip.open(AMAZON, "rt", encoding="utf-8") as fh:
        return list(itertools.islice(fh, n))


@pytest.fixture(scope="session")
def real_lines() -> list[str]:
    return amazon_lines(600)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The embedded model's tokenizer (read from its GGUF file, no weights)."""
    from transformers import AutoTokenizer

    from recreason.models.registry import ALIASES

    gguf = ALIASES["smollm2-135m"].locate()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama with the real tokenizer, saved as a model directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def prepared_dir(real_lines, tmp_path_factory) -> Path:
    """A dataset prepared from 600 real reviews (min_feature_df lowered for the small sample)."""
    from recreason.data.dataset import PrepareConfig, prepare

    src = tmp_path_factory.mktemp("src") / "reviews.jsonl"
    src.write_text("".join(real_lines))
    out = tmp_path_factory.mktemp("dataset")
    prepare(src, out, PrepareConfig(min_feature_df=3, seeds=[1, 2]), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_run(prepared_dir, tiny_model_dir, tmp_path_factory):
    """A LoRA run of the tiny model: (run directory, training summary)."""
    from recreason.config import TrainConfig
    from recreason.training.trainer import train

    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(model=str(tiny_model_dir), method="lora", lora_r=4, lr=5e-2, batch_size=8, max_steps=12,
                      eval_every=4, max_eval_records=32, precision="fp32", patience=5)
    summary = train(prepared_dir, out, cfg, progress=False)
    return out, summary


def reloaded_validation_loss(run_dir, n_records: int = 16, seed: int = 42) -> float:
    """The text loss of a run's reloaded best checkpoint on the validation records the trainer scored."""
    import random

    import torch

    from recreason.prompts.discrete import DiscretePrompter
    from recreason.rundir import Run
    from recreason.training.data import build_examples, collate, joint_loss

    run = Run(run_dir)
    model, tok = run.load_model(dtype="fp32")
    ds = run.dataset()
    prompter = DiscretePrompter(ds.subset(run.split_seed, "train"), run.prompt_config)
    valid = random.Random(seed + 1).sample(ds.subset(run.split_seed, "validation"), n_records)
    examples, _ = build_examples(valid, prompter, tok, run.train_config, model=model)
    tokens = total = 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    with torch.no_grad():
        for start in range(0, len(order), 16):
            batch = collate([examples[i] for i in order[start:start + 16]], tok.pad_token_id)
            _, parts = joint_loss(model, batch, run.train_config.rating_weight)
            total += parts["text"] * parts["tokens"]
            tokens += parts["tokens"]
    return total / tokens


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + ("" if isinstance(r, str) and r.endswith("\n") else "\n") for r in rows))
    return path


def _postgres_binaries() -> tuple[str, str] | None:
    import glob
    import shutil

    for folder in [None, *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]:
        initdb, pg_ctl = shutil.which("initdb", path=folder), shutil.which("pg_ctl", path=folder)
        if initdb and pg_ctl:
            return initdb, pg_ctl
    return None


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server on a Unix socket in a temporary folder (no TCP port); yields its socket dir."""
    import os
    import shutil
    import subprocess
    import tempfile

    binaries = _postgres_binaries()
    if binaries is None:
        pytest.fail("PostgreSQL server programs (initdb, pg_ctl) not found: `make install` installs the Debian "
                    "package postgresql, or install it yourself")
    initdb, pg_ctl = binaries
    base = Path(tempfile.mkdtemp(prefix="recreason-pg-"))
    as_owner: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres system user
        shutil.chown(base, "postgres", "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    data, log = base / "data", base / "server.log"
    subprocess.run(as_owner + [initdb, "-D", str(data), "-A", "trust", "-U", "recreason", "--no-sync"],
                   check=True, capture_output=True)
    started = subprocess.run(as_owner + [pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                                         f"-k {base} -c listen_addresses='' -F", "start"], capture_output=True, text=True)
    if started.returncode != 0:
        pytest.fail(f"PostgreSQL did not start: {started.stderr} {log.read_text() if log.exists() else ''}")
    yield base
    subprocess.run(as_owner + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """A fresh database on the throwaway server, one per test."""
    import re

    import psycopg

    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50]
    with psycopg.connect(f"postgresql://recreason@/postgres?host={postgres_server}", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://recreason@/{name}?host={postgres_server}"


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium driven by playwright (make test installs chromium when it can)."""
    import shutil

    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("Debian's chromium is not installed (make test installs it with apt-get when run as root); "
                    "browser test skipped")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()
