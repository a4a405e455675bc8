"""imgclf: train, evaluate, inspect and use image classifiers with PyTorch."""

__version__ = "0.1.0"
