"""The ``kubetune`` command. Nothing heavy at import time: ``kubetune --help`` must answer fast, so torch,
transformers and kubernetes are imported inside the commands that need them.

Every option is also an environment variable ``KUBETUNE_<COMMAND>_<OPTION>`` (click's auto_envvar_prefix).
User errors (:class:`kubetune.errors.KubetuneError`) print one line and exit with their own code.
"""

from __future__ import annotations

import sys

import click

from kubetune import __version__
from kubetune.errors import KubetuneError, storage_error
from kubetune.terminal import printable


class KubetuneGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KubetuneError as exc:
            click.secho(f"error: {printable(exc)}", fg="red", err=True)  # names user text: file names, values
            sys.exit(exc.exit_code)
        except Exception as exc:  # a full or read-only volume, met by whatever library was writing
            storage = storage_error(exc)
            if storage is None:
                raise
            click.secho(f"error: {printable(storage)}", fg="red", err=True)
            sys.exit(storage.exit_code)


@click.group(cls=KubetuneGroup, context_settings={"auto_envvar_prefix": "KUBETUNE",
                                                  "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kubetune")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """Fine-tune, merge, quantize, infer and evaluate LLMs from one recipe, locally or on Kubernetes."""
    import logging

    ctx.obj = {"verbose": verbose}  # the commands that load models quiet the libraries unless -v (kubetune.console)

    level = logging.WARNING - 10 * min(verbose, 2) if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        # Import-time notices of libraries that transformers pulls in, about kernels this machine cannot use
        # (torchao's CUDA-only extensions, torch's enum registration): nothing a user can act on.
        for name in IMPORT_NOISE_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


IMPORT_NOISE_LOGGERS = ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")


_skip_teardown = False


def skip_interpreter_teardown() -> None:
    """For a command whose work is complete (files closed, output printed) when it returns: end the process without
    Python's finalization. After torch and a transformers model class are imported, tearing their modules down
    takes ~1 s of a 2-core machine, a fifth of a cold ``kubetune estimate`` (bench/results/estimate_speed.md).
    Only the console script honours it (:func:`main`); in-process callers (tests, CliRunner) are unaffected."""
    global _skip_teardown
    _skip_teardown = True


# Command modules register themselves on ``cli``; import them for that side effect.
from kubetune.cli import local  # noqa: E402,F401
from kubetune.cli import ui  # noqa: E402,F401
from kubetune.cli import watch  # noqa: E402,F401
from kubetune.cli import insight  # noqa: E402,F401
from kubetune.cli import cluster  # noqa: E402,F401
from kubetune.cli import pod  # noqa: E402,F401
from kubetune.cli import demo  # noqa: E402,F401


def _name_an_unnamed_user() -> None:
    """OpenShift runs a container as an arbitrary UID that /etc/passwd does not name (the image's 1001 is named
    only in kubetune's own image). Libraries that ask for the user's name (getpass.getuser, e.g. for torch's and
    triton's cache folders on the GPU) then fail with "getpwuid(): uid not found", which stopped the GPU stages
    of the pod path at the model load. getpass reads $USER first: give it one where the passwd database has none."""
    import os
    import pwd

    if any(os.environ.get(v) for v in ("LOGNAME", "USER", "LNAME", "USERNAME")):
        return
    try:
        pwd.getpwuid(os.getuid())
    except KeyError:
        os.environ["USER"] = f"uid-{os.getuid()}"


def main() -> None:
    _name_an_unnamed_user()
    try:
        cli(prog_name="kubetune")
    except SystemExit as done:
        if not _skip_teardown:
            raise
        import logging
        import os

        code = done.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
