"""What a stage's console shows: kubetune's progress and its one summary line; the libraries' INFO tables and
banners (GPTQModel's through LogBar), their warnings, tqdm bars, FutureWarnings and import notices only with
``-v``. GPTQModel's own per-layer LogBar bars still print (LogBar has no switch for them).

The commands that load models (``kubetune run``, ``kubetune stage``) call :func:`quiet_libraries` before they
import any of them: the settings are environment defaults, logger levels and warning filters, which each library
reads when it starts. A variable the user set (``TRANSFORMERS_VERBOSITY=info``) is left alone.
"""

from __future__ import annotations

import logging
import os
import warnings

# Loggers whose INFO lines describe the library's own work (kernel picks, format conversions, shard writes).
LIBRARY_LOGGERS = ("transformers", "datasets", "huggingface_hub", "httpx", "httpx2", "httpcore", "accelerate", "peft",
                   "trl", "optimum", "gptqmodel", "tokenicer", "bitsandbytes", "torchao", "torchao.kernel.intmm",
                   "torch.utils._pytree")
# Modules whose UserWarnings are advice about their own API ("You passed `quantization_config` …").
LIBRARY_WARNING_MODULES = r"(transformers|peft|trl|accelerate|datasets|optimum|gptqmodel|torch)(\.|$)"
QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",  # "[transformers] loss_type=None …" and other advice to model authors
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # per-file download bars
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",  # "Loading weights", "Writing model shards": tqdm reads TQDM_<param> defaults (4.66+)
}


def quiet_libraries(verbose: int) -> None:
    """Hide what the libraries print for themselves, unless ``verbose`` (the CLI's ``-v`` count)."""
    if verbose:
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)

    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=LIBRARY_WARNING_MODULES)
    from logbar import LogBar  # GPTQModel's logger: banners, INFO tables, advice on calibration sizes and the GIL

    LogBar.shared().setLevel(logging.ERROR)


class ProgressLines:
    """Progress as log lines (a pod's log has no terminal to redraw a bar in): one line each time the stage's
    description changes or its completion passes another tenth."""

    def __init__(self, log: logging.Logger):
        self.log = log
        self._last: dict[str, tuple[str, int]] = {}

    def __call__(self, stage: str, completed: float, total: float | None, description: str) -> None:
        tenth = int(10 * completed / total) if total else -1
        if self._last.get(stage) == (description, tenth):
            return
        self._last[stage] = (description, tenth)
        done = f"{completed:g}/{total:g}" if total else f"{completed:g}"
        self.log.info("%s %s %s", stage, done, description)
