"""The parts of ``experiments/make_tables.py``: results, collecting runs, building a table, writing it."""
