"""Where the compare UI listens and who may enter.

Order: the flag (``--host``/``--port``/``--auth``), its variable (``KUBETUNE_UI_HOST``/``_PORT``/``_AUTH``: click
reads them), then Cloudera ML's application port, then the defaults. Cloudera ML (and CDSW before it) gives an
application its port in ``CDSW_APP_PORT`` (``CDSW_READONLY_PORT`` is the read-only one) and expects it served
on localhost, where its proxy adds the login (docs/ui.md cites the pages). The default host is 127.0.0.1 too:
the UI runs models on a GPU, so it is reachable from elsewhere only when asked (``--host 0.0.0.0``, as the chart
does behind its Service). There is never a public share link.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860  # Gradio's usual port
CML_PORT_VARIABLES = ("CDSW_APP_PORT", "CDSW_READONLY_PORT")


@dataclass(frozen=True)
class Bind:
    host: str
    port: int
    source: str
    """Where the port came from, for the start-up line: "--port", "CDSW_APP_PORT" or "default"."""


def resolve_bind(host: str | None, port: int | None, env: Mapping[str, str] | None = None) -> Bind:
    env = os.environ if env is None else env
    if port is not None:
        return Bind(host or DEFAULT_HOST, port, "--port")
    for name in CML_PORT_VARIABLES:
        value = env.get(name, "").strip()
        if value:
            try:
                number = int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a port number") from None
            return Bind(host or DEFAULT_HOST, number, name)
    return Bind(host or DEFAULT_HOST, DEFAULT_PORT, "default")


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """``USER:PASSWORD`` → (user, password); None or "" → no login. The password may contain ':'."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError("expected USER:PASSWORD, both non-empty")
    return user, password
