"""Side-by-side quality comparison on real data (``make quality``): MoLE-Flow rows and per-task baselines."""
