"""The sections of ``experiments/bench.py`` (issue 8's benchmark), one module each."""
