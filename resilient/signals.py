"""Signal handlers that only record which signal arrived and when.

All real work (agreement, checkpoint, exit) happens later at a step boundary in
the main loop, because a handler that saved or exited by itself could run in
the middle of a collective or of a write.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Iterable, Sequence

from resilient._logging import get_logger
from resilient.errors import ConfigError, SignalSetupError

log = get_logger(__name__)

DEFAULT_SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGUSR1")

#: Comma-separated signal names that replace the default set, e.g. ``TERM,USR1,USR2``.
SIGNALS_ENV = "RESILIENT_SIGNALS"

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


@dataclass(frozen=True)
class SignalEvent:
    """One delivered signal: its number and name, and when it arrived."""

    signum: int
    name: str
    wall_time: float
    monotonic: float


def parse_signal(value: str | int | signal.Signals) -> signal.Signals:
    """Convert ``"TERM"``, ``"SIGTERM"``, ``"15"`` or ``15`` to a ``signal.Signals``."""
    if isinstance(value, signal.Signals):
        return value
    text = str(value).strip()
    try:
        if text.isdigit():
            return signal.Signals(int(text))
        name = text.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        return signal.Signals[name]
    except (KeyError, ValueError):
        known = ", ".join(sorted(s.name for s in signal.Signals if not s.name.startswith("SIG_")))
        raise ConfigError(
            f"invalid signal {value!r}: not a signal name or number on this platform. "
            f"Use one of: {known}"
        ) from None


def parse_signals(values: Iterable[str | int | signal.Signals]) -> tuple[signal.Signals, ...]:
    """Parse several signal names, dropping duplicates and keeping the order."""
    result: list[signal.Signals] = []
    for value in values:
        sig = parse_signal(value)
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"invalid signal {sig.name}: it cannot be caught. Remove it from the signal list.")
        if sig not in result:
            result.append(sig)
    if not result:
        raise ConfigError("the signal list is empty; name at least one signal, for example SIGTERM")
    return tuple(result)


def signals_from_env(default: Sequence[str] = DEFAULT_SIGNALS) -> tuple[signal.Signals, ...]:
    """Return the signals named by ``RESILIENT_SIGNALS``, or ``default`` when it is unset."""
    raw = os.environ.get(SIGNALS_ENV, "").strip()
    if not raw:
        return parse_signals(default)
    try:
        return parse_signals(part for part in raw.split(",") if part.strip())
    except ConfigError as err:
        raise ConfigError(f"{SIGNALS_ENV}={raw!r}: {err}") from None


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()


def c_handler_address(signum: int) -> int | None:
    """Return the address of the C-level handler for ``signum`` (via ``sigaction``).

    ``signal.getsignal`` reports only handlers set from Python. A native library
    (NCCL has done this with SIGUSR1) can replace the process handler without
    Python noticing, so the installed C handler is compared as well. Returns
    None when libc cannot be queried.
    """
    if _LIBC is None:
        return None
    # struct sigaction starts with the handler pointer on Linux; 256 bytes cover
    # the whole struct on every Linux ABI.
    buffer = ctypes.create_string_buffer(256)
    if _LIBC.sigaction(ctypes.c_int(signum), None, buffer) != 0:
        return None
    return ctypes.c_void_p.from_buffer(buffer).value or 0


class SignalRecorder:
    """Install handlers that record signals, chain the previous handlers and restore them.

    Use as a context manager or call :meth:`install` and :meth:`restore`. Only
    the main thread can install handlers because Python runs them there.
    """

    def __init__(self, signals: Iterable[str | int | signal.Signals] | None = None) -> None:
        self.signals: tuple[signal.Signals, ...] = (
            signals_from_env() if signals is None else parse_signals(signals)
        )
        self._events: list[SignalEvent] = []
        self._previous: dict[signal.Signals, _Handler] = {}
        self._chained: dict[signal.Signals, _Handler] = {}
        self._c_address: dict[signal.Signals, int | None] = {}
        self._installed = False

    # -- lifecycle ---------------------------------------------------------

    def install(self) -> "SignalRecorder":
        """Install the recording handlers. Raises SignalSetupError off the main thread."""
        if self._installed:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise SignalSetupError(
                "resilient must install its signal handlers from the main thread, but it was called "
                f"from thread {threading.current_thread().name!r}. Python runs signal handlers only in "
                "the main thread; create the Supervisor (or SignalRecorder) there."
            )
        for sig in self.signals:
            previous = signal.getsignal(sig)
            signal.signal(sig, self._handle)
            self._previous[sig] = previous
            self._chained[sig] = previous
            self._c_address[sig] = c_handler_address(sig)
        self._installed = True
        log.debug("Installed signal handlers for %s.", ", ".join(s.name for s in self.signals))
        return self

    def restore(self) -> None:
        """Put back the handlers that were installed before :meth:`install`."""
        if not self._installed:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("Cannot restore signal handlers from thread %s; they stay installed.",
                        threading.current_thread().name)
            return
        for sig, previous in self._previous.items():
            # getsignal returns None for a handler set outside Python; the default is the best we can do.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._installed = False

    def __enter__(self) -> "SignalRecorder":
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    # -- handler -----------------------------------------------------------

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        self._events.append(SignalEvent(signum, sig.name, time.time(), time.monotonic()))
        chained = self._chained.get(sig)
        if callable(chained):
            chained(signum, frame)

    # -- queries -----------------------------------------------------------

    @property
    def installed(self) -> bool:
        return self._installed

    @property
    def events(self) -> tuple[SignalEvent, ...]:
        """Every signal recorded so far, oldest first."""
        return tuple(self._events)

    @property
    def first_event(self) -> SignalEvent | None:
        return self._events[0] if self._events else None

    def ensure_installed(self) -> list[str]:
        """Reinstall any handler that another library replaced; return the affected signal names.

        A replacement set from Python is kept in the chain, so it still runs
        after ours. A replacement set from native code cannot be called from
        Python and is dropped, and the warning states this.
        """
        if not self._installed:
            return []
        replaced: list[str] = []
        for sig in self.signals:
            current = signal.getsignal(sig)
            python_replaced = current != self._handle
            address = c_handler_address(sig)
            known = self._c_address.get(sig)
            native_replaced = address is not None and known is not None and address != known
            if not python_replaced and not native_replaced:
                continue

            replaced.append(sig.name)
            if python_replaced and callable(current):
                self._chained[sig] = current
                detail = f"the new Python handler {getattr(current, '__qualname__', current)!r} stays chained"
            elif python_replaced:
                # Checked before native_replaced: SIG_IGN or SIG_DFL set from Python changes the C handler too.
                detail = f"the replacement ({current!r}) is not callable and is not chained"
            else:
                detail = "a native handler had been installed; it will no longer run"
            signal.signal(sig, self._handle)
            self._c_address[sig] = c_handler_address(sig)
            log.warning("Handler for %s was replaced by another library; reinstalled resilient's handler (%s).",
                        sig.name, detail)
        return replaced
