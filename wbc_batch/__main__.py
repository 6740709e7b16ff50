"""The `wbc-batch` command's entry point, and `python -m wbc_batch ...` for environments whose
scripts folder is not on PATH (a venv not activated, a Windows user install).

The CLI is imported inside `main`, not at the top: importing it loads numpy and the rest (about
0.1 s), and a Ctrl-C pressed then ended in a traceback from inside numpy's import. Only the
standard library is imported before the guard.
"""

import sys

#: as `interrupts.BEFORE_START` says it (not imported: a Ctrl-C could come during that import)
BEFORE_START = "Interrupted before anything was done."


def main(argv=None) -> None:
    """Console-script entry point: `wbc_batch.cli.main`, with Ctrl-C during its import handled."""
    try:
        from . import interrupts
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{BEFORE_START}\n")
        sys.exit(130)  # 128 + SIGINT, as everywhere else
    # this process ends with the command: a finished run may keep signals from its closing
    # lines (`interrupts.calm_to_the_end`); a program calling `cli.main` keeps its handlers
    interrupts.owns_process = True
    cli_main(argv)


if __name__ == "__main__":
    main()
