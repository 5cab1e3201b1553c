"""Embedding losses: the public list.

Every loss is a pure function
``name(embeddings, labels, ref_embeddings=None, ref_labels=None, *, ...,
distance=..., reduction=..., where=None, ref_where=None)``; see DESIGN.md.
Each module of this package lists its public names in ``__all__``.
"""

import importlib as _importlib
import pkgutil as _pkgutil

__all__ = []
for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
  if _info.name.startswith("_"):
    continue
  _module = _importlib.import_module(f"{__name__}.{_info.name}")
  for _name in getattr(_module, "__all__", ()):
    globals()[_name] = getattr(_module, _name)
    __all__.append(_name)
del _info, _module, _name
