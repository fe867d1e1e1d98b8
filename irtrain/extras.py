"""Optional packages: which flag needs which, and the pip command that installs it.

`require(module, flag)` imports the package or raises `MissingExtraError` ("--deepspeed
zero2 needs deepspeed, which is not installed: pip install 'irtrain[deepspeed]'"), so a
missing extra is a one-line error before anything is written, never a traceback.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from irtrain.errors import MissingExtraError

#: import name -> the pip command that installs it
PIP = {
    "deepspeed": "pip install 'irtrain[deepspeed]'",
    "peft": "pip install peft",
    "bitsandbytes": "pip install bitsandbytes",
    "tensorboard": "pip install tensorboard",
    "trackio": "pip install trackio",
    "wandb": "pip install wandb",
    "mlflow": "pip install mlflow",
}


def _missing(e: ImportError, module: str) -> bool:
    """The import failed because `module` (or a part of its dotted name) is absent, not
    because the installed package is broken."""
    name = getattr(e, "name", None) or ""
    return isinstance(e, ModuleNotFoundError) and name.split(".")[0] == module.split(".")[0]


def installed(module: str) -> bool:
    """`module` imports (a package that is present but fails to import counts as absent)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require(module: str, flag: str) -> ModuleType:
    """Import `module` for `flag`, or a one-line error naming the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        pip = PIP.get(top, f"pip install {top}")
        if _missing(e, module):
            raise MissingExtraError(f"{flag} needs {top}, which is not installed: {pip}") from None
        raise MissingExtraError(f"{flag} needs {top}, which is installed but fails to import ({e}); reinstall it: {pip}") from None
