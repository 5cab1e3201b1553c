"""absl entry points: ``python -m experiments.train|evaluate|embed``.

Each module is a thin ``main``; the logic lives in
:mod:`metric_jax.training` where tests reach it.
"""
