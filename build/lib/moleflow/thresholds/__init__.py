"""Decision thresholds, in one family: how they are fitted (``fitting``), what a model stores (``records``),
those made in training on held-out images (``held_out``) and the detector's calibration (``calibrator``)."""
