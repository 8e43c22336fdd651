"""Carrying a worker's target, args and kwargs into the child, under every start method.

Under ``fork`` the child inherits the `Payload` object as it is: nothing is pickled. Under
``spawn`` and ``forkserver`` multiprocessing pickles the process object while it starts the
child; a `Payload` then serializes its contents with cloudpickle, so closures, lambdas and
functions defined inside a test travel too. The pickler also knows multiprocessing's own
reducers (connections, sockets), and it runs *at spawning time* (inside ``Process.start``,
while ``get_spawning_popen()`` is set), which is the only moment queues, pipes, locks and
manager proxies captured by a closure may be pickled: their file descriptors are handed to
the child by the same launch.

The child does not unpickle the contents while multiprocessing loads the process object:
`Payload.load` does it later, inside the bootstrap, so a failure there (a module the child
cannot import, say) becomes the worker's reported outcome instead of a bare crash.

Runs inside workers: imports neither pytest nor the plugin.
"""

from __future__ import annotations

import copyreg
import functools
import io
import marshal
import pickle
import sys
import types
from collections import ChainMap
from collections.abc import Callable
from collections.abc import Mapping
from multiprocessing import connection as mp_connection
from multiprocessing import context as mp_context
from multiprocessing import process as mp_process
from multiprocessing import reduction
from typing import Any
from typing import ClassVar
from typing import Final
from typing import NoReturn
from typing import final


@final
class PayloadError(pickle.PicklingError):
    """The target or its arguments cannot be sent to a spawn/forkserver child."""

    #: procsafe's note saying which part cannot be pickled, why and what to do (`_pickling`).
    procsafe_note: str | None = None


def _reduce_code(code: types.CodeType) -> tuple[Callable[[bytes], object], tuple[bytes]]:
    # cloudpickle renames the file of every code object it pickles by value to
    # "<dynamic-code>"; tracebacks and stack dumps of closures would lose their test file
    # and line. The child is the same interpreter, so marshal carries code objects exactly.
    return (marshal.loads, (marshal.dumps(code),))


def _refuse_connection(connection: object) -> NoReturn:
    # Pickled field by field, a connection would arrive as a stray descriptor number whose
    # __del__ then closes whatever the receiver has open under that number.
    raise TypeError(
        f"a {type(connection).__name__} can only reach a worker as it starts (pass it as an "
        "argument or capture it in the target), not be sent back from one"
    )


_CODE: Final = {types.CodeType: _reduce_code}
_CONNECTIONS: Final = dict.fromkeys(
    (
        getattr(mp_connection, name)
        for name in ("Connection", "PipeConnection")
        if hasattr(mp_connection, name)
    ),
    _refuse_connection,
)


_PLAIN: Final[ChainMap[Any, Any]] = ChainMap(_CODE, _CONNECTIONS, copyreg.dispatch_table)


class _PlainPickler(pickle.Pickler):
    """The standard pickler with the same code and connection rules as ours."""

    dispatch_table = _PLAIN


@functools.cache
def _picklers() -> tuple[type[pickle.Pickler], type[pickle.Pickler]]:
    """cloudpickle's picklers for values and for launches, built on first use.

    Importing cloudpickle costs a worker 10-25 ms (dataclasses, inspect, logging,
    platform); a worker whose target came by reference and returns plain data never
    needs it.
    """
    import cloudpickle

    class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle ships no types
        """cloudpickle keeping code objects' file names, for values and exceptions."""

        dispatch_table: ClassVar[ChainMap[Any, Any]] = ChainMap(
            _CODE, _CONNECTIONS, cloudpickle.Pickler.dispatch_table
        )

    class _SpawnPickler(cloudpickle.Pickler):  # type: ignore[misc]
        """Adds multiprocessing's reducers: only valid while a child is being launched."""

        # multiprocessing's extra reducers fill in what only it knows how to send
        # (Connection, socket) but never override cloudpickle's. The ChainMap reads the
        # live dict, so reducers registered later with ForkingPickler.register count too.
        dispatch_table: ClassVar[ChainMap[Any, Any]] = ChainMap(
            _CODE,
            cloudpickle.Pickler.dispatch_table,
            reduction.ForkingPickler._extra_reducers,  # type: ignore[attr-defined]  # not in stubs
        )

    return _Pickler, _SpawnPickler


def dumps(obj: object, *, spawning: bool = False) -> bytes:
    """Pickle *obj* with cloudpickle; *spawning* adds multiprocessing's own reducers.

    Where cloudpickle is not imported yet (a worker whose target came by reference), a
    value the standard pickler handles as cloudpickle would (nothing by value, nothing
    from ``__main__``, which cloudpickle sends by value) is pickled without it.
    """
    buffer = io.BytesIO()
    if not spawning and "cloudpickle" not in sys.modules:
        try:
            _PlainPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
        except Exception:
            buffer = io.BytesIO()  # local functions, lambdas, ...: cloudpickle's job
        else:
            data = buffer.getvalue()
            if b"__main__" not in data:
                return data
            buffer = io.BytesIO()
    values, launches = _picklers()
    (launches if spawning else values)(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def describe(target: object) -> str:
    """A short human name for a callable: its qualified name, or its type's name."""
    inner = getattr(target, "func", None)  # functools.partial: name what it wraps
    named = inner if inner is not None and callable(target) else target
    name = getattr(named, "__qualname__", None) or getattr(named, "__name__", None)
    if isinstance(name, str):
        return name
    return type(target).__name__


@final
class Payload:
    """A target with its arguments, serialized only when a spawn/forkserver child starts.

    Build it in the parent with the target and its arguments; `load` returns them in the
    child. Pickling is only allowed while multiprocessing launches a child: a payload
    pickled elsewhere could not carry the queues and pipes it may hold.
    """

    __slots__ = ("_blob", "_call", "_name")

    def __init__(
        self,
        target: Callable[..., object],
        args: tuple[object, ...] = (),
        kwargs: Mapping[str, object] | None = None,
    ) -> None:
        if not callable(target):
            raise TypeError(f"a worker target must be callable, got {target!r}")
        self._name = describe(target)
        self._call: tuple[Callable[..., object], tuple[object, ...], dict[str, object]] | None
        self._call = (target, tuple(args), dict(kwargs or {}))
        self._blob: bytes | None = None

    @property
    def name(self) -> str:
        """The target's name, for messages."""
        return self._name

    def load(self) -> tuple[Callable[..., object], tuple[object, ...], dict[str, object]]:
        """The target, args and kwargs; in a spawn/forkserver child this unpickles them.

        Raises whatever unpickling raises (typically an ImportError for a module the
        child cannot import); the bootstrap reports it as the worker's outcome.
        """
        if self._call is None:
            assert self._blob is not None
            current = mp_process.current_process()
            # Unpickle as multiprocessing unpickles the process object itself: manager
            # proxies then skip the extra incref, exactly as if they had been plain
            # Process arguments.
            current._inheriting = True  # type: ignore[attr-defined]
            try:
                target, args, kwargs = pickle.loads(self._blob)
            finally:
                del current._inheriting  # type: ignore[attr-defined]
            self._call = (target, args, kwargs)
            self._blob = None
        return self._call

    def __reduce__(self) -> tuple[Callable[[str, bytes], Payload], tuple[str, bytes]]:
        if mp_context.get_spawning_popen() is None:
            raise PayloadError(
                f"the payload of target {self._name!r} can only be pickled while "
                "multiprocessing starts a spawn or forkserver process"
            )
        if self._call is None:
            assert self._blob is not None
            return (_packed, (self._name, self._blob))
        try:
            blob = dumps(self._call, spawning=True)
        except Exception as exc:
            error = PayloadError(
                f"cannot send target {self._name!r} or its arguments to a spawn/forkserver "
                f"worker: {type(exc).__name__}: {exc}"
            )
            error.procsafe_note = self._explain(exc)
            raise error from exc
        return (_packed, (self._name, blob))

    def _explain(self, exc: BaseException) -> str | None:
        """Which part of the target or its arguments cannot be pickled, why, what to do."""
        from pytest_procsafe import _pickling  # only once a payload failed to pickle

        assert self._call is not None
        method = getattr(mp_context.get_spawning_popen(), "method", None) or "spawn"
        return _pickling.worker_note(self._call, exc, str(method), _picklers()[1])


def _packed(name: str, blob: bytes) -> Payload:
    """Rebuild a payload in the child without unpickling its contents yet."""
    payload = Payload.__new__(Payload)
    payload._name = name
    payload._call = None
    payload._blob = blob
    return payload
