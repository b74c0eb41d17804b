"""Shared by the stage scripts: run an `endopheno` command with arguments taken from params.yaml, so a
stage behaves exactly like the command a user would type."""

import sys

from endopheno.cli import err, main
from endopheno.errors import EndophenoError
from endopheno.params import load_params


def run(command: str, options: dict) -> None:
    """Run `endopheno <command>` (e.g. "genotypes import") with `--key value` for every option that is
    set (True -> a flag)."""
    args = command.split()
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value not in (None, False):
            args += [flag, str(value)]
    sys.argv = ["endopheno", *args]
    main()


def fail(message: str) -> None:
    """A mistake in params.yaml found by the stage script itself: one line and exit status 2, as the
    command's own user errors."""
    err.print(f"[red]error:[/red] {message}", soft_wrap=True)
    sys.exit(2)


def params(section: str) -> dict:
    try:
        return load_params(section)
    except EndophenoError as e:
        fail(str(e))
