"""Experiment configs: ``get_config(arg)`` per file, for ``--config=configs/<name>.py[:arg]``."""
