"""``python -m moleflow train|predict|eval [overrides]``."""

from moleflow.cli import main

main()
