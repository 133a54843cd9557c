"""Training: the per-task loop, the LightningModule, losses, optimiser, feature cache, checkpoints, resume.

Importing the package registers the configs' OmegaConf resolvers (:mod:`moleflow.training.resolvers`)
and the config schema (:mod:`moleflow.training.schema`, ``moleflow_schema`` in Hydra's ConfigStore):
every process that composes or resolves ``conf/train.yaml`` (an entry point, a test, a launcher's worker
resolving its job's folder name) imports it first.
"""

from moleflow.training.resolvers import register_resolvers as _register_resolvers
from moleflow.training.schema import register_schema as _register_schema

_register_resolvers()
_register_schema()
