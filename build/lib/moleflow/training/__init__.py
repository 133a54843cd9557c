"""Training: the per-task loop, the LightningModule, losses, optimiser, feature cache, checkpoints, resume.

Nothing is registered on import: the entry points call :func:`moleflow.config.register` first.
"""
