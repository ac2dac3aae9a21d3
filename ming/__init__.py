"""Ming-Lite-Omni-Preview in plain PyTorch: the thinker (`MingOmni`), its processor, and the speech path."""

from importlib import import_module

__all__ = ["MingConfig", "MingOmni", "MingProcessor"]
_HOME = {"MingConfig": ".configs", "MingOmni": ".modeling", "MingProcessor": ".processor"}


def __getattr__(name: str):
    # Imported on first use, so `import ming.audio` (say) does not pull in every model file.
    if name in _HOME:
        return getattr(import_module(_HOME[name], __name__), name)
    raise AttributeError(f"module 'ming' has no attribute {name!r}")
