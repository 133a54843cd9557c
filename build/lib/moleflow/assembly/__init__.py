"""Assembly: the objects a run is made of, from settings and from files, below training and inference alike.

- ``builders``: the data module and the frozen backbone, from the user's config (Hydra) or from a stored one
  (trusted targets only, no Hydra);
- ``checkpoint_files``, ``integrity``, ``trusted_targets``, ``convert_checkpoint``: checkpoints written
  atomically with an integrity record and read without running any code (docs/checkpoints.md);
- ``model_files``: the flow model and its task names from a checked checkpoint, without Lightning;
- ``probes``: settings checked against the built backbone (image size, patch grid).
"""
