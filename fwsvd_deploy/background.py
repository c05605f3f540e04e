"""One function in a second Python process while this one works: how ``run`` builds two branches at once.

Exporting and optimising a model is mostly single-threaded Python (the exporter's tracing, ONNX Runtime's fusion
passes), so on a machine with two or more cores the baseline's branch can run beside the candidate's. The child is
started with ``spawn`` (a fresh interpreter: no forked torch threads), inherits the terminal's signal settings (an
ignored SIGINT stays ignored), and is stopped with SIGTERM, which it turns into ``KeyboardInterrupt`` so that
half-written output folders are removed as on Ctrl-C.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any

# How long a stopped child may take to clean up before it is killed.
_STOP_SECONDS = 30.0


class ChildTraceback(Exception):
    """The traceback of an exception raised in the child, attached as the ``__cause__`` of the re-raised one."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def _child(send: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        outcome: tuple[str, Any, str] = ("ok", fn(*args), "")
    except BaseException as exc:  # noqa: BLE001 - every failure, Ctrl-C included, goes back to the parent
        outcome = ("error", exc, traceback.format_exc())
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # done: a late stop() ends the process quietly
    try:
        pickle.loads(pickle.dumps(outcome[1]))  # what the parent could not rebuild is sent as text
    except Exception:  # noqa: BLE001
        outcome = ("error", RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]}"), outcome[2])
    send.send(outcome)
    send.close()


class Background:
    """``fn(*args)`` in a spawned process; :meth:`result` waits for it, returning its value or raising its error.

    ``fn`` and ``args`` must pickle (``fn`` a module-level function). Use as a context manager: leaving the block
    before :meth:`result` (an error, Ctrl-C) stops the child and waits for it to clean up.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any, name: str = "background") -> None:
        ctx = multiprocessing.get_context("spawn")
        self._recv, send = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=_child, args=(send, fn, args), name=name)
        self._process.start()
        send.close()  # the child holds the only writing end: its death ends recv() with EOFError

    def result(self) -> Any:
        """Wait for the child; its return value, or its exception re-raised here (its traceback as the cause)."""
        try:
            status, payload, text = self._recv.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"the {self._process.name} process ended with exit code {self._process.exitcode} "
                               "before reporting (killed, or out of memory?)") from None
        self._process.join()
        if status == "error":
            raise payload from ChildTraceback(text)
        return payload

    def stop(self) -> None:
        """Stop the child if it still runs (SIGTERM, then SIGKILL after a grace period) and wait for it."""
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(_STOP_SECONDS)
            if self._process.is_alive():
                self._process.kill()
        self._process.join()
        self._recv.close()

    def __enter__(self) -> Background:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
