"""SignalRecorder with real signals sent to this process."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import threading
import time

import pytest

from resilient.errors import ConfigError, SignalSetupError
from resilient.signals import SIGNALS_ENV, SignalRecorder, c_handler_address, signals_from_env

TOUCHED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@pytest.fixture(autouse=True)
def restore_handlers(monkeypatch: pytest.MonkeyPatch):
    """Put back this process's handlers after each test, including ones replaced through libc."""
    monkeypatch.delenv(SIGNALS_ENV, raising=False)
    saved = {sig: signal.getsignal(sig) for sig in TOUCHED}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def send_to_self(sig: signal.Signals) -> None:
    # CPython runs the Python-level handler in the main thread at its next eval-breaker check, which in
    # practice comes before the statement after os.kill.
    os.kill(os.getpid(), sig)


class CallLog:
    """A Python signal handler that stores the signal numbers it received."""

    def __init__(self) -> None:
        self.signums: list[int] = []

    def __call__(self, signum: int, frame: object) -> None:
        self.signums.append(signum)


def libc_set_handler(sig: signal.Signals, handler: int) -> None:
    """Set the C-level handler with libc ``signal()``, bypassing Python's signal module like a native library."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    result = libc.signal(int(sig), handler)
    assert result != ctypes.c_void_p(-1).value, f"libc signal() failed with errno {ctypes.get_errno()}"


def test_recorder_records_signals_with_time() -> None:
    wall_before, monotonic_before = time.time(), time.monotonic()
    with SignalRecorder(["SIGTERM", "SIGUSR1"]) as recorder:
        send_to_self(signal.SIGTERM)
        send_to_self(signal.SIGUSR1)
        events = recorder.events
    wall_after, monotonic_after = time.time(), time.monotonic()

    assert [event.name for event in events] == ["SIGTERM", "SIGUSR1"]
    assert [event.signum for event in events] == [signal.SIGTERM, signal.SIGUSR1]
    assert recorder.first_event == events[0]
    for event in events:
        assert wall_before <= event.wall_time <= wall_after
        assert monotonic_before <= event.monotonic <= monotonic_after
    assert events[0].monotonic <= events[1].monotonic


def test_recorder_ignores_unlisted_signal() -> None:
    other = CallLog()
    signal.signal(signal.SIGUSR2, other)
    with SignalRecorder(["SIGTERM"]) as recorder:
        send_to_self(signal.SIGUSR2)

    assert recorder.events == ()
    assert other.signums == [signal.SIGUSR2]


def test_recorder_chains_previous_handler() -> None:
    previous = CallLog()
    signal.signal(signal.SIGUSR1, previous)
    with SignalRecorder(["SIGUSR1"]) as recorder:
        send_to_self(signal.SIGUSR1)

    assert previous.signums == [signal.SIGUSR1]
    assert [event.name for event in recorder.events] == ["SIGUSR1"]


def test_restore_puts_back_original() -> None:
    original = CallLog()
    signal.signal(signal.SIGUSR1, original)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    recorder = SignalRecorder(["SIGTERM", "SIGUSR1"]).install()
    assert signal.getsignal(signal.SIGUSR1) is not original

    recorder.restore()

    assert signal.getsignal(signal.SIGUSR1) is original
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert recorder.installed is False


def test_restore_after_exception_in_block() -> None:
    original = CallLog()
    signal.signal(signal.SIGUSR1, original)

    with pytest.raises(RuntimeError, match="body failed"):
        with SignalRecorder(["SIGUSR1"]) as recorder:
            raise RuntimeError("body failed")

    assert signal.getsignal(signal.SIGUSR1) is original
    assert recorder.installed is False


def test_install_off_main_thread_raises() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    recorder = SignalRecorder(["SIGUSR1"])
    errors: list[BaseException] = []

    def install() -> None:
        try:
            recorder.install()
        except BaseException as err:  # noqa: BLE001 - handed to the main thread for the asserts
            errors.append(err)

    thread = threading.Thread(target=install, name="loader-thread")
    thread.start()
    thread.join(timeout=10)

    assert len(errors) == 1
    assert isinstance(errors[0], SignalSetupError)
    assert "'loader-thread'" in str(errors[0])
    assert recorder.installed is False
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("TERM,USR1", (signal.SIGTERM, signal.SIGUSR1)),
        ("SIGUSR2", (signal.SIGUSR2,)),
        ("sigusr2", (signal.SIGUSR2,)),
        (f"{int(signal.SIGTERM)},{int(signal.SIGUSR1)}", (signal.SIGTERM, signal.SIGUSR1)),
        (" usr1 , term,,usr1 ", (signal.SIGUSR1, signal.SIGTERM)),
        ("", (signal.SIGTERM, signal.SIGUSR1)),
    ],
)
def test_env_signals_valid(monkeypatch: pytest.MonkeyPatch, value: str, expected: tuple) -> None:
    monkeypatch.setenv(SIGNALS_ENV, value)

    assert signals_from_env() == expected


def test_env_signals_unset_default() -> None:
    assert signals_from_env() == (signal.SIGTERM, signal.SIGUSR1)


def test_env_signals_used_by_recorder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SIGNALS_ENV, "USR2")

    assert SignalRecorder().signals == (signal.SIGUSR2,)


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("TERM,NOPE", "'NOPE'"),
        ("0", "'0'"),
        ("SIGTERM9", "'SIGTERM9'"),
        ("KILL", "SIGKILL"),
        (",,", "empty"),
    ],
)
def test_env_signals_invalid(monkeypatch: pytest.MonkeyPatch, value: str, named: str) -> None:
    monkeypatch.setenv(SIGNALS_ENV, value)

    with pytest.raises(ConfigError) as raised:
        signals_from_env()

    assert f"{SIGNALS_ENV}={value!r}" in str(raised.value)
    assert named in str(raised.value)


def test_ensure_installed_nothing_replaced() -> None:
    with SignalRecorder(["SIGTERM", "SIGUSR1"]) as recorder:
        assert recorder.ensure_installed() == []


def test_ensure_installed_python_replacement() -> None:
    original = CallLog()
    replacement = CallLog()
    signal.signal(signal.SIGUSR1, original)
    with SignalRecorder(["SIGTERM", "SIGUSR1"]) as recorder:
        signal.signal(signal.SIGUSR1, replacement)

        assert recorder.ensure_installed() == ["SIGUSR1"]
        assert recorder.ensure_installed() == []

        send_to_self(signal.SIGUSR1)
        assert [event.name for event in recorder.events] == ["SIGUSR1"]
        assert replacement.signums == [signal.SIGUSR1]
        assert original.signums == []

    assert signal.getsignal(signal.SIGUSR1) is original


def test_ensure_installed_python_sig_ign(caplog: pytest.LogCaptureFixture) -> None:
    with SignalRecorder(["SIGUSR1"]) as recorder:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

        with caplog.at_level(logging.WARNING, logger="resilient.signals"):
            assert recorder.ensure_installed() == ["SIGUSR1"]

        send_to_self(signal.SIGUSR1)
        assert [event.name for event in recorder.events] == ["SIGUSR1"]

    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert "is not callable and is not chained" in messages[0]


def test_ensure_installed_native_replacement() -> None:
    with SignalRecorder(["SIGUSR1"]) as recorder:
        # A native library calling signal(SIGUSR1, SIG_IGN); SIG_IGN is handler value 1.
        libc_set_handler(signal.SIGUSR1, 1)
        assert c_handler_address(signal.SIGUSR1) == 1
        # Python still reports its own handler, so only the C-level check can notice.
        assert getattr(signal.getsignal(signal.SIGUSR1), "__self__", None) is recorder
        send_to_self(signal.SIGUSR1)
        assert recorder.events == ()

        assert recorder.ensure_installed() == ["SIGUSR1"]
        assert c_handler_address(signal.SIGUSR1) not in (0, 1)

        send_to_self(signal.SIGUSR1)
        assert [event.name for event in recorder.events] == ["SIGUSR1"]
