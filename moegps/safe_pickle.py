"""A restricted unpickler for the OLMoE-paper routing statistics (``olmoe-routing/*/*.pkl``).

Those files are Python pickles, and an ordinary ``pickle.load`` runs whatever callable a file names
(``os.system``, ``subprocess.Popen``, ``builtins.eval`` ...). This loader admits only the globals the
real files use, found with ``pickletools.dis`` on every one of them:

- ``collections.Counter`` and ``collections.defaultdict`` (``defaultdict(Counter)`` in ``eid2token``);
- ``numpy.dtype`` and ``numpy.core.multiarray.scalar`` (``numpy._core.multiarray.scalar`` under
  numpy 2), which numpy's pickling uses for each ``np.int64`` key.

The two numpy globals are not handed out as the real numpy callables: ``dtype`` is replaced by a
function that builds only integer dtypes, ``scalar`` by one that decodes only integer bytes of the
right length. Everything else (dicts, lists, tuples, ints, strings) comes from pickle opcodes that
call no code. Any other global is refused with :class:`UnsafePickleError` naming the file and the
global, before anything is called. After loading, the object tree is checked to hold only the
admitted types.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from pathlib import Path

import numpy as np

# integer dtype codes numpy writes for scalar keys ('i8' in the real files)
_INT_DTYPES = {f"{c}{n}" for c in "iu" for n in (1, 2, 4, 8)}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global (callable) outside the admitted set, or holds a value of another type."""


def _integer_dtype(name, align=False, copy=True):
    if not isinstance(name, str) or name not in _INT_DTYPES:
        raise UnsafePickleError(f"numpy.dtype({name!r}) refused: only integer dtypes {sorted(_INT_DTYPES)} are admitted")
    return np.dtype(name)


def _integer_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "iu":
        raise UnsafePickleError(f"numpy scalar of dtype {dtype!r} refused: only integer scalars are admitted")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafePickleError(f"numpy scalar data {data!r:.40} is not {dtype.itemsize} bytes for dtype {dtype}")
    return np.frombuffer(data, dtype=dtype)[0]


_ALLOWED_GLOBALS = {
    ("collections", "Counter"): collections.Counter,
    ("collections", "defaultdict"): collections.defaultdict,
    ("numpy", "dtype"): _integer_dtype,
    ("numpy.core.multiarray", "scalar"): _integer_scalar,
    ("numpy._core.multiarray", "scalar"): _integer_scalar,
}
_ALLOWED_TYPES = (collections.Counter, collections.defaultdict, dict, list, tuple, int, np.integer, str, bool)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
            raise UnsafePickleError(
                f"{self.where}: refused to load global '{module}.{name}'; this loader admits only {allowed} "
                "(the types of the OLMoE routing statistics). The file may be crafted to run code."
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.where}: refused persistent id {pid!r}; this loader admits none")


_SCALARS = (int, np.integer, str)  # bool is an int


MAX_MEMBERS = 50_000_000  # keys + values examined in one file; the real files hold about 1e6


def _check_types(obj, where: str, depth: int = 0, seen: set[int] | None = None, budget: list[int] | None = None):
    """Walk containers; raise if any value is of a type outside the admitted set.

    Types are collected per container with ``set(map(type, ...))`` (C speed): the Counters of
    ``eid2token`` hold hundreds of thousands of ints, and only containers are descended into.
    Each container is examined once (``seen``, by id): a pickle can reference one list from many
    places with a few bytes each (a 269-byte file of nested repeated references is a tree of 1e12
    nodes), and walking every path would take hours. ``budget`` bounds the members examined in all.
    """
    seen = set() if seen is None else seen
    budget = [MAX_MEMBERS] if budget is None else budget
    if depth > 8:
        raise UnsafePickleError(f"{where}: object nests deeper than 8 levels; not a routing-statistics file")
    if not isinstance(obj, _ALLOWED_TYPES):
        raise UnsafePickleError(f"{where}: holds a value of type {type(obj).__name__}, not admitted")
    if isinstance(obj, collections.defaultdict) and obj.default_factory not in (None, collections.Counter, int, list, dict):
        raise UnsafePickleError(f"{where}: defaultdict with factory {obj.default_factory!r} refused")
    if isinstance(obj, dict):
        members = (obj.keys(), obj.values())
    elif isinstance(obj, (list, tuple)):
        members = (obj,)
    else:
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    for collection in members:
        budget[0] -= len(collection)
        if budget[0] < 0:
            raise UnsafePickleError(f"{where}: holds more than {MAX_MEMBERS:,} values; not a routing-statistics file")
        for t in set(map(type, collection)):
            if issubclass(t, _SCALARS):
                continue
            if not issubclass(t, (dict, list, tuple)):
                raise UnsafePickleError(f"{where}: holds a value of type {t.__name__}, not admitted")
            for v in collection:
                if type(v) is t and id(v) not in seen:
                    _check_types(v, where, depth + 1, seen, budget)


def loads(data: bytes, where: str = "<bytes>"):
    """Unpickle ``data`` admitting only the routing-statistics types (see module docstring)."""
    obj = _RestrictedUnpickler(io.BytesIO(data), where).load()
    _check_types(obj, where)
    return obj


def load(path: str | os.PathLike):
    """Load the pickle at ``path`` with the restricted unpickler; :class:`UnsafePickleError` if refused."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return loads(path.read_bytes(), str(path))
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise UnsafePickleError(f"{path}: not a valid routing-statistics pickle ({type(e).__name__}: {e})") from None
