"""Files generated from code (chart schema, kustomize base, dashboards, alert rules): write them, or check that
the committed copies are current. One implementation for every generator, so `--check` means the same in each.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path


def write_or_check(files: Mapping[str, str], argv: list[str], root: Path, make_target: str) -> int:
    """Write ``files`` (relative path → text) under ``root``; with ``--check`` in ``argv`` only compare.

    Returns a process exit code: 1 when ``--check`` finds a file missing or different.
    """
    check = "--check" in argv
    stale = []
    for name, text in files.items():
        path = root / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {name}")
    if stale:
        print(f"out of date (run `make {make_target}`): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0
