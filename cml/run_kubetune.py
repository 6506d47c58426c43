"""Cloudera ML: run one `kubetune` command as a CML job, whose script must be a Python file.

The AMP (.project-metadata.yaml) creates a job per stage with the arguments ``stage NAME``; the recipe is the
project's KUBETUNE_RECIPE variable. Each job runs the stage exactly as a Kubernetes pod does (`kubetune stage`),
writing into the project's files, which every job of the project shares; a finished stage is skipped.
"""

import os
import sys

from kubetune.cli import main

args = sys.argv[1:]
if args[:1] == ["stage"] and "--recipe" not in args:
    args += ["--recipe", os.environ.get("KUBETUNE_RECIPE", "jobs/bloom-1b1-lora.yaml")]
sys.argv = ["kubetune", *args]
main()
