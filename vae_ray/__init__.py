"""vae-ray: variational autoencoders trained, tuned and sampled at cluster scale on Ray.

The Python API (api.py) is imported on first use, so that `import vae_ray`
(and the command line's `--help`) loads neither torch nor Ray:

    import vae_ray
    model = vae_ray.load("runs/mnist")
    images = model.sample(16)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"

# The public names: tests/test_api.py pins them.
__all__ = [
    "Model",
    "ModelSpec",
    "UserError",
    "__version__",
    "encode",
    "evaluate",
    "export",
    "generate",
    "load",
    "train",
    "tune",
    "tune_sampling",
]

_LAZY = {
    "Model": "api",
    "load": "api",
    "train": "api",
    "export": "api",
    "tune_sampling": "api",
    "ModelSpec": "spec",
    "UserError": "errors",
}
# These four are modules of the package too: the module is the attribute,
# and calling it calls the API's function (api.CommandModule).
_COMMAND_MODULES = ("generate", "encode", "evaluate", "tune")


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _COMMAND_MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'vae_ray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
