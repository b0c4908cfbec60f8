"""`python cli.py ...` — the same click group as the `vaedec` console script (see vaedec/cli.py)."""

from vaedec.cli import main

if __name__ == "__main__":
    main()
