"""lmforge: pretrain, fine-tune, evaluate, generate and serve language models, CPU first."""

__version__ = "0.1.0"
