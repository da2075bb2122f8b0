"""A strict, device-like array backend on the CPU: CuPy's semantics over NumPy, for tests.

The engine is written once for NumPy and CuPy (:mod:`cryoptycho.gpu.backend`), but the CuPy
path could only be checked on a machine with a GPU, and the mistakes that matter there are
silent on NumPy: a ``float(x)`` of a device array is a device synchronisation (the host waits
for every queued kernel), ``np.asarray(x)`` is a device → host copy, and mixing a host array
into device arithmetic fails. This backend (``get_xp("strict")``) behaves like CuPy where
CuPy differs from NumPy, and is stricter where CuPy is merely slow:

* implicit conversion of a device array to a host value or host array raises ``TypeError``
  when the package's own code (``cryoptycho.*``) does it: ``float(a)``, ``int(a)``,
  ``bool(a)`` (so ``if a:``), ``complex(a)``, ``operator.index(a)``, iteration, formatting —
  each a hidden synchronisation on CuPy. Tests' own assertions may do them (counted), as
  CuPy allows. ``np.asarray(a)`` / ``np.array(a)`` (``__array__``) raise everywhere, as on
  CuPy, and so do host arrays as operands of device arithmetic;
* reductions return 0-d device arrays, as CuPy's do;
* explicit transfers — :func:`asnumpy`, ``a.get()``, ``a.item()``, ``a.tolist()`` — and
  stream synchronisations are allowed and *counted* (:data:`counters`), as are the
  operations that synchronise inside CuPy because their result's size depends on the data
  (``unique``, ``nonzero``, boolean-mask indexing, ``bincount``: it reads ``max(x)``) and
  host → device copies (with their bytes and shapes), so a test can assert "no frame is
  copied after it is stored" and "no synchronisation in a mini-batch step".

The arrays are NumPy arrays inside a wrapper (:class:`StrictArray`) that implements the
NumPy dispatch protocols (``__array_ufunc__``, ``__array_function__``), like CuPy's ndarray.
It is for tests and for counting: nothing here is fast, and the daemon never offers it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

_THIS_FILE = os.path.abspath(__file__)


@dataclass
class Event:
    """One counted synchronisation or transfer, with the engine line that caused it."""

    kind: str  #: "sync", "d2h" (device → host copy, also a sync) or "h2d"
    what: str  #: the operation (``item``, ``get``, ``unique``, ``asarray``, …)
    nbytes: int
    shape: tuple[int, ...]
    where: str  #: "file:line function" of the first caller outside this module


@dataclass
class Counters:
    """What the strict backend counted since the last :meth:`reset`."""

    events: list[Event] = field(default_factory=list)

    def reset(self) -> None:
        self.events.clear()

    @property
    def syncs(self) -> int:
        """Points where the host waits for the device: every device → host copy, every stream
        synchronisation and every operation whose output size depends on device data."""
        return sum(1 for e in self.events if e.kind in ("sync", "d2h"))

    @property
    def d2h(self) -> list[Event]:
        return [e for e in self.events if e.kind == "d2h"]

    @property
    def h2d(self) -> list[Event]:
        return [e for e in self.events if e.kind == "h2d"]

    def summary(self) -> str:
        """One line per event — what a failing test prints to say where the syncs came from."""
        return "\n".join(f"{e.kind:4s} {e.what:10s} {e.nbytes:>10d} B {e.shape} at {e.where}"
                         for e in self.events)


#: The process-wide counters (the backend has one "device", like CuPy's current device).
counters = Counters()


_SKIP = (_THIS_FILE, os.path.join(os.path.dirname(_THIS_FILE), "backend.py"))


def _caller() -> str:
    """The first frame outside this module and backend.py: the engine line that asked."""
    for frame in reversed(traceback.extract_stack(limit=16)[:-1]):
        if os.path.abspath(frame.filename) not in _SKIP:
            return f"{os.path.basename(frame.filename)}:{frame.lineno} {frame.name}"
    return "?"


def _record(kind: str, what: str, arr: Any = None) -> None:
    nbytes = int(getattr(arr, "nbytes", 0))
    shape = tuple(getattr(arr, "shape", ()))
    counters.events.append(Event(kind, what, nbytes, shape, _caller()))


@contextlib.contextmanager
def counting() -> Iterator[Counters]:
    """``with counting() as c:`` — counters reset on entry; read ``c`` after the block."""
    counters.reset()
    yield counters


_IMPLICIT = (
    "Implicit conversion to a host value is not allowed on a device array (strict backend, "
    "as CuPy would synchronise here): use an explicit transfer (backend.to_numpy, "
    "backend.host_floats, .get(), .item())"
)


class StrictArray(NDArrayOperatorsMixin):
    """A device array: a NumPy array that refuses to leave the "device" implicitly."""

    __slots__ = ("_a",)
    __array_priority__ = 100.0

    def __init__(self, a: np.ndarray) -> None:
        self._a = a

    # --- metadata (no transfer) ---------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: StrictArray(self._a.T))

    @property
    def real(self) -> StrictArray:
        return StrictArray(self._a.real)

    @real.setter
    def real(self, value: Any) -> None:
        self._a.real = _unwrap(value)

    @property
    def imag(self) -> StrictArray:
        return StrictArray(self._a.imag)

    @imag.setter
    def imag(self, value: Any) -> None:
        self._a.imag = _unwrap(value)

    def __len__(self) -> int:
        return len(self._a)

    def __repr__(self) -> str:
        return f"StrictArray(shape={self.shape}, dtype={self.dtype})"

    # --- implicit conversions: refused in the package, counted elsewhere -----------------
    # CuPy allows float()/int()/bool()/complex() of a 0-d array (each a synchronisation) and
    # refuses __array__. Here the package's own code (cryoptycho.*) may do none of them, so
    # every host value it needs is an explicit, counted transfer; a test's own assertions
    # get CuPy's behaviour (allowed, counted).
    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(_IMPLICIT + " — np.asarray() of a device array")

    def _implicit(self, what: str) -> np.ndarray:
        caller = sys._getframe(2).f_globals.get("__name__", "")
        if caller.startswith("cryoptycho."):
            raise TypeError(f"{_IMPLICIT} — {what} of a device array in {caller}")
        _record("d2h", what, self._a)
        return self._a

    def __float__(self) -> float:
        return float(self._implicit("float()"))

    def __int__(self) -> int:
        return int(self._implicit("int()"))

    def __complex__(self) -> complex:
        return complex(self._implicit("complex()"))

    def __bool__(self) -> bool:
        return bool(self._implicit("bool()"))

    def __index__(self) -> int:
        return self._implicit("index").__index__()

    def __iter__(self) -> Any:
        return iter(_wrap(list(self._implicit("iteration"))))

    def __format__(self, spec: str) -> str:
        return format(self._implicit("format").item() if self.ndim == 0 else self._a, spec)

    # --- explicit transfers: counted ------------------------------------------------------
    def get(self, stream: Any = None, order: str = "C", out: Any = None) -> np.ndarray:
        _record("d2h", "get", self._a)
        return np.array(self._a, copy=True)

    def item(self, *args: Any) -> Any:
        _record("d2h", "item", self._a[args] if args else self._a.reshape(-1)[:1])
        return self._a.item(*args)

    def tolist(self) -> Any:
        _record("d2h", "tolist", self._a)
        return self._a.tolist()

    def set(self, arr: np.ndarray) -> None:
        """Host → device copy into this array (CuPy's ``ndarray.set``)."""
        _record("h2d", "set", arr)
        self._a[...] = arr

    # --- indexing -------------------------------------------------------------------------
    def __getitem__(self, key: Any) -> StrictArray:
        key = _index(key)
        return StrictArray(np.asarray(self._a[key]))

    def __setitem__(self, key: Any, value: Any) -> None:
        key = _index(key)
        if isinstance(value, np.ndarray):
            _record("h2d", "setitem", value)
        self._a[key] = _unwrap(value, host_ok=True)

    # --- NumPy dispatch -------------------------------------------------------------------
    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        args = [_unwrap(x) for x in inputs]
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(_unwrap(o) for o in out)
        if method == "at":
            # ufunc.at(a, indices, b): CuPy's scatter (cupyx.scatter_add); no sync
            args[1] = _index(inputs[1])
        result = getattr(ufunc, method)(*args, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        name = func.__name__
        impl = getattr(_module, name, None)
        if impl is None or not callable(impl):
            impl = _device_function(name, func)  # e.g. numpy.lib.stride_tricks functions
        return impl(*args, **kwargs)

    # --- methods: NumPy's, on the device ---------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in _HOST_ONLY:
            # __array_interface__, buffers, ctypes, tobytes: ways to the host that CuPy lacks
            raise AttributeError(f"{name!r} is not available on a device array (strict backend)")
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)

        def method(*args: Any, **kwargs: Any) -> Any:
            return _wrap(attr(*[_unwrap(a, host_ok=True) for a in args],
                              **{k: _unwrap(v, host_ok=True) for k, v in kwargs.items()}))

        return method

    def __copy__(self) -> StrictArray:
        return StrictArray(self._a.copy())

    def __deepcopy__(self, memo: Any) -> StrictArray:
        return StrictArray(self._a.copy())

    def __getstate__(self) -> Any:
        raise TypeError(_IMPLICIT + " — pickling a device array")


_HOST_ONLY = frozenset({"tobytes", "tofile", "dump", "dumps", "ctypes", "data", "base", "flat"})


def _index(key: Any) -> Any:
    """An index on the device: device arrays unwrap; host integer arrays are copied over
    (counted, as CuPy does); a boolean mask makes a result whose size depends on the data."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, StrictArray):
        if key.dtype == bool:
            _record("sync", "maskindex", key._a)
        return key._a
    if isinstance(key, np.ndarray):
        _record("h2d", "index", key)
        return key
    if isinstance(key, list):
        return np.asarray(key)
    return key


def _unwrap(x: Any, host_ok: bool = False) -> Any:
    if isinstance(x, StrictArray):
        return x._a
    if isinstance(x, np.ndarray):
        if not host_ok:
            raise TypeError(
                "a host (NumPy) array was mixed into device arithmetic (strict backend; CuPy "
                f"refuses it too): move it with xp.asarray first — shape {x.shape}, {x.dtype}"
            )
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, host_ok) for v in x)
    return x


def _wrap(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return StrictArray(x)
    if isinstance(x, np.generic):
        return StrictArray(np.asarray(x))  # reductions give 0-d device arrays, as on CuPy
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _device_function(name: str, func: Any) -> Any:
    """``func`` of NumPy applied to device arrays: host arrays refused, results on device."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if name in _DATA_DEPENDENT:
            _record("sync", name, args[0] if args else None)
        return _wrap(func(*_unwrap(list(args)), **{k: _unwrap(v) for k, v in kwargs.items()}))

    call.__name__ = name
    call.__doc__ = f"numpy.{name} on the strict device backend"
    return call


#: Operations that synchronise on CuPy: the size of their result depends on device data
#: (bincount reads max(x) and checks x ≥ 0 on the host).
_DATA_DEPENDENT = frozenset({
    "unique", "nonzero", "flatnonzero", "argwhere", "extract", "compress", "bincount",
    "trim_zeros", "histogram",
})


class _Namespace(ModuleType):
    """A module that mirrors a NumPy namespace (numpy, numpy.fft, numpy.random, ...) on the
    device: functions take and return device arrays; types and constants are NumPy's."""

    def __init__(self, name: str, base: ModuleType) -> None:
        super().__init__(name)
        self._base = base

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self._base, name)
        if isinstance(attr, type) or not callable(attr):
            return attr  # dtypes, constants (pi, inf, newaxis), exception types
        func = _device_function(name, attr)
        setattr(self, name, func)
        return func


class _Stream:
    """CuPy's ``cuda.Stream`` stand-in: work is done when queued, ``synchronize`` is counted."""

    def synchronize(self) -> None:
        _record("sync", "stream", None)



class _Runtime:
    @staticmethod
    def memGetInfo() -> tuple[int, int]:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = total = 2 << 30
        return int(free), int(total)

    @staticmethod
    def getDeviceCount() -> int:
        return 1


class _Cuda(ModuleType):
    Stream = _Stream
    runtime = _Runtime()

    def __init__(self) -> None:
        super().__init__(__name__ + ".cuda")
        self._stream = _Stream()

    def get_current_stream(self) -> _Stream:
        return self._stream

    class Device:
        def __init__(self, index: int = 0) -> None:
            self.id = index

        def synchronize(self) -> None:
            _record("sync", "device", None)


def _make_module() -> _Namespace:
    mod = _Namespace(__name__ + ".xp", np)
    mod.fft = _Namespace(__name__ + ".xp.fft", np.fft)
    mod.random = _Namespace(__name__ + ".xp.random", np.random)
    mod.linalg = _Namespace(__name__ + ".xp.linalg", np.linalg)
    import scipy.ndimage

    mod.ndimage = _Namespace(__name__ + ".xp.ndimage", scipy.ndimage)  # cupyx.scipy.ndimage
    mod.lib = ModuleType(__name__ + ".xp.lib")
    mod.lib.stride_tricks = _Namespace(__name__ + ".xp.lib.stride_tricks", np.lib.stride_tricks)
    mod.cuda = _Cuda()
    mod.ndarray = StrictArray

    def asarray(a: Any, dtype: Any = None, order: Any = None) -> StrictArray:
        """Host → device (counted) or a device array as it is (cast when ``dtype`` asks)."""
        if isinstance(a, StrictArray):
            return a if dtype is None or np.dtype(dtype) == a.dtype else StrictArray(a._a.astype(dtype))
        host = np.asarray(a, dtype=dtype, order=order)
        _record("h2d", "asarray", host)
        return StrictArray(np.array(host, copy=True))

    def array(a: Any, dtype: Any = None, copy: bool = True, order: Any = None) -> StrictArray:
        if isinstance(a, StrictArray):
            return StrictArray(np.array(a._a, dtype=dtype, copy=True, order=order or "K"))
        return asarray(a, dtype, order)

    def asnumpy(a: Any, stream: Any = None, order: str = "C", out: Any = None) -> np.ndarray:
        """Device → host (counted); host data are returned as they are, as CuPy does."""
        if isinstance(a, StrictArray):
            return a.get()
        return np.asarray(a, order=order)

    def get_array_module(*args: Any) -> ModuleType:
        return mod if any(isinstance(a, StrictArray) for a in args) else np

    def scatter_add(a: StrictArray, indices: Any, values: Any) -> None:
        """cupyx.scatter_add: ``a[indices] += values`` with repeated indices summed; no sync."""
        np.add.at(a._a, _index(indices), _unwrap(values))

    mod.asarray = asarray
    mod.array = array
    mod.asnumpy = asnumpy
    mod.get_array_module = get_array_module
    mod.scatter_add = scatter_add
    return mod


#: The strict array module, as ``get_xp("strict")`` returns it.
_module = _make_module()
xp = _module


def is_strict(arr: Any) -> bool:
    return isinstance(arr, StrictArray)


sys.modules.setdefault(__name__ + ".xp", _module)
