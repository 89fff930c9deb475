"""Which samplers exist: every module of this package that defines a named `Sampler` subclass.

Adding a sampler is adding one file here. The widgets, the CLI's --sampler, the checks and the
engine all read this registry (as ComfyUI's KSAMPLER_NAMES lists its k-diffusion samplers). The
folder is read at the first lookup, not on import, so importing the package does nothing.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Optional

from ..errors import SettingsError
from .base import Sampler

_found: Optional[dict] = None


def _samplers() -> dict:
    global _found
    if _found is None:
        found = {}
        for info in pkgutil.iter_modules(sys.modules[__package__].__path__):
            module = importlib.import_module(f"{__package__}.{info.name}")
            for obj in vars(module).values():
                if isinstance(obj, type) and issubclass(obj, Sampler) and obj.__module__ == module.__name__ \
                        and obj.name:
                    if obj.name in found:
                        raise RuntimeError(f"Two samplers are named {obj.name!r} ({type(found[obj.name]).__module__} "
                                           f"and {module.__name__}): rename one.")
                    found[obj.name] = obj()
        _found = dict(sorted(found.items()))
    return _found


def sampler_names() -> list[str]:
    return list(_samplers())


def get_sampler(name: str) -> Sampler:
    sampler = _samplers().get(name)
    if sampler is None:
        raise SettingsError(f"Unknown sampler {name!r}; choose one of {', '.join(_samplers())}.")
    return sampler


def check_sampler(name: str, steps: int) -> None:
    get_sampler(name).check_steps(steps)


def draws_per_token(name: str, steps: int) -> int:
    return get_sampler(name).draws_per_token(steps)


def default_sampler(variant: str) -> str:
    """The sampler a model variant's card uses (what 'auto' picks)."""
    owners = [s.name for s in _samplers().values() if variant in s.default_for]
    if len(owners) != 1:
        raise SettingsError(f"Model variant {variant!r} is the default of {len(owners)} samplers "
                            f"({', '.join(owners) or 'none'}); exactly one sampler must list it in default_for.")
    return owners[0]
