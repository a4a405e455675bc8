"""imgclf: train, evaluate, inspect and use image classifiers with PyTorch.

From Python (imgclf.api): `imgclf.fit(model, data, **options) -> Run`, `imgclf.load(run_or_checkpoint)`.
Importing imgclf imports nothing else: each name below is imported when first used.
"""

__version__ = "0.1.0"

# name -> the module that defines it, imported on first use (`import imgclf` stays as cheap as a version string)
_LAZY = {"fit": "imgclf.api", "load": "imgclf.api", "Run": "imgclf.api", "Prediction": "imgclf.predict",
         "UserError": "imgclf.errors", "Stopped": "imgclf.errors"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'imgclf' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups find it directly
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
