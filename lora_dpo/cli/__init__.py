"""The `lora-dpo` command line (main.py), one module per command: train and sft (train.py), data, plan, export,
compare; `lora-dpo app` comes from the app's package through an entry point."""

from .main import main

__all__ = ["main"]
