"""CLIP-ViP post-pretraining pipeline (library).

Importing this package must stay cheap: no torch, ray or mlflow at import time, so the CLI
and config validation answer fast.
"""

__version__ = "0.1.0"
