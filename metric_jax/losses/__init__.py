"""Embedding losses: the public list.

Every loss is a pure function
``name(embeddings, labels, ref_embeddings=None, ref_labels=None, *, ...,
distance=..., reduction=..., where=None, ref_where=None)``; see DESIGN.md.
Each module of this package lists its public names in ``__all__``.

Derivatives are reverse mode (``jax.grad``, ``jax.vjp``, gradients of
gradients). On CPU, large problems (2^21 pairs or more) of NCA, instance,
ranked list, generalized lifted structure, batch-hard / easy triplet, and
of contrastive, multi-similarity and circle on a batch against itself run
over column tiles of :mod:`metric_jax.streaming`, whose backward pass is a
custom VJP; NCA and instance use one for any batch compared with itself.
Forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) is not
available on those paths.
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
