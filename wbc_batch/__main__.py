"""`python -m wbc_batch ...`: the `wbc-batch` command, for environments whose scripts folder is not
on PATH (a venv not activated, a Windows user install)."""

from .cli import main

if __name__ == "__main__":
    main()
