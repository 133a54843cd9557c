"""Every table of the project in one place: the study's tables (``specs``: rows and reference figures;
``collect``, ``build``, ``output``, ``results``; the command ``python -m experiments.tables``) and the quality
benchmark's table (``quality_table``)."""
