"""Compiled CPU kernels for bf16 decoding, built on first use with the machine's C compiler.

``kernels.c`` beside this file holds two (:func:`compiled` loads both):

- the attention of one decoding step over a shared prompt cache: what
  :meth:`recreason.models.registry.SharedPrefix.attend` does in some 25 torch operations a layer, in one pass over each
  row's prompt keys and values;
- the llama family's RMS norm (:func:`recreason.models.registry.compiled_norms`): one call where transformers'
  ``LlamaRMSNorm`` runs seven operations, 61 times a step for SmolLM2.

It is plain C with OpenMP, compiled with ``cc -O3 -march=native -fopenmp`` into the cache directory
(``$RECREASON_CACHE/kernels``, keyed by the source, the compiler and this CPU's flags) the first time a process needs
it, about a second; in a process that has loaded torch its OpenMP runtime is torch's, so it runs on torch's threads.
Where no compiler is found or the build fails, :func:`compiled` returns None once with a warning, and decoding keeps
the torch operations.

``generate.kernels: compiled`` chooses them (``torch`` keeps the torch operations).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from recreason.config import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.Lock()
_loaded: dict[str, object] = {}


def compiler() -> str | None:
    """The C compiler to build with: ``$CC``, else ``cc``, ``gcc`` or ``clang`` on the PATH; None if none is."""
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _library_path(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha1(SOURCE.read_bytes() + version.encode() + " ".join(FLAGS).encode()
                       + _cpu_flags().encode()).hexdigest()[:16]
    return cache_root() / "kernels" / f"kernels-{key}.so"


def build(cc: str | None = None) -> Path:
    """Compile the kernel (once: a cached library is reused) and return its path; RuntimeError if it cannot."""
    cc = cc or compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    target = _library_path(cc)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then renamed: never half a library
        partial = Path(tmp) / target.name
        done = subprocess.run([cc, *FLAGS, "-o", str(partial), str(SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed to build {SOURCE.name}: {done.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    return target


@dataclass(frozen=True)
class Kernels:
    """The compiled kernels as ctypes functions: ``attention`` (``recreason_prefix_attention``), ``pairs`` whether it
    takes the prompt operands as bf16 pairs (built where the compiler targets AVX-512 BF16: half the instructions;
    else fp32 operands), ``rms_norm`` (``recreason_rms_norm``)."""

    attention: object
    pairs: bool
    rms_norm: object


def compiled() -> Kernels | None:
    """The compiled kernels, or None where they cannot be built (warned once)."""
    with _lock:
        if "compiled" not in _loaded:
            _loaded["compiled"] = _load()
        return _loaded["compiled"]


def _load():
    import torch  # noqa: F401  (loaded first: the kernel then shares torch's OpenMP runtime)

    try:
        library = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        log.warning("the compiled kernels are unavailable, decoding uses torch operations: %s", exc)
        return None
    attention = library.recreason_prefix_attention
    attention.restype = ctypes.c_int
    attention.argtypes = [ctypes.c_int] * 8 + [ctypes.c_void_p] * 8 + [ctypes.c_float, ctypes.c_float, ctypes.c_void_p]
    library.recreason_prefix_attention_pairs.restype = ctypes.c_int
    norm = library.recreason_rms_norm
    norm.restype = ctypes.c_int
    norm.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p]
    return Kernels(attention, bool(library.recreason_prefix_attention_pairs()), norm)
