"""Training: the per-task loop, the LightningModule, losses, optimiser, feature cache, checkpoints, resume.

Importing the package registers the configs' OmegaConf resolvers (:mod:`moleflow.training.resolvers`):
a launcher's worker process resolves its job's folder name (``${path_safe:...}``) after importing it.
"""

from moleflow.training.resolvers import register_resolvers as _register_resolvers

_register_resolvers()
