"""Cloudera ML: the compare UI as a CML application. `kubetune ui` listens on 127.0.0.1:$CDSW_APP_PORT, where
CML's proxy puts its own login in front of it (docs/ui.md)."""

import os
import sys

from kubetune.cli import main

sys.argv = ["kubetune", "ui", "--artifacts-root", os.environ.get("KUBETUNE_ARTIFACTS_ROOT", "artifacts")]
main()
