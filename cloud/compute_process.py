"""The back half in a child process, away from the server's GIL.

::

    event loop --submit(cut, jobs)--> outbox --sender thread--pipe: cut, [(codec, header, body)]---> child
    future <----------------- receiver thread <--pipe: ([Answer | error] | error text, busy seconds)- BackHalf.run_coded

Running a Hugging Face module spends much of its time in Python between tensor operations, holding
the GIL; so does gRPC's request handling on the event loop. In one process the two take turns: a loop
busy a quarter of the time slows compute by about a third. In a child process compute has an
interpreter to itself. Batches are pipelined: the next one is sent while the child computes the
current one, so the child never waits for the server between batches. Answers come back in order.

Payloads are decoded in the child, next to the back half: the server's loop only parses their headers,
and what crosses the pipe is the payloads, not hidden states a few hundred times their size.

The child loads the same model and codecs by name and must report the same fingerprints. It ignores SIGINT and
SIGTERM (the server drains first, then stops it) and exits on a stop message or when the pipe closes.
A child that dies fails the batches it held; the next batch starts another.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import numpy as np
import torch
from splitwire.cloud.back import Answer, BackHalf, BackJob, CodedJob
from splitwire.split.cut import Cut

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # loading a large model from disk can take minutes
STOP_TIMEOUT_S = 10.0

Batch = concurrent.futures.Future  # of list[Answer] (or list[Answer | Exception] for coded jobs)
DecodedArrays = tuple[np.ndarray, np.ndarray]  # a decoded job as it crosses the pipe: hidden, positions


class ComputeProcessError(RuntimeError):
    """The child failed to start, died, or a batch failed in it; the message says which."""


class _Child:
    """One child process and what it was sent but has not answered yet (in order)."""

    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.pending: collections.deque[Batch] = collections.deque()
        self.lock = threading.Lock()
        self.dead = False

    def fail_pending(self, error: Exception) -> None:
        with self.lock:
            self.dead = True
            pending, self.pending = self.pending, collections.deque()
        for future in pending:
            _settle(future, error=error)


class ComputeProcess:
    """A child process running :class:`BackHalf`. ``spawn()``, ``wait_ready()``, ``submit()`` often, ``close()``."""

    def __init__(self, model: str, torch_threads: int | None, on_busy: Callable[[float], None] | None = None) -> None:
        """``on_busy(seconds)`` is called (on a receiver thread) with the wall time the child spent on each batch."""
        self.model = model
        self.torch_threads = torch_threads
        self.on_busy = on_busy
        self.fingerprint: str | None = None  # what every child must report; set by the first wait_ready()
        self.codec_fingerprints: dict[str, str] | None = None  # likewise, per codec
        self._context = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC
        self._child: _Child | None = None
        self._outbox: queue.SimpleQueue[
            tuple[Batch, Cut, list[CodedJob] | list[tuple[np.ndarray, np.ndarray]]] | None
        ] = queue.SimpleQueue()
        self._sender: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id, None when none is running."""
        child = self._child
        return child.process.pid if child is not None and child.process.is_alive() else None

    def spawn(self) -> None:
        """Start the child; it loads the model meanwhile. Call :meth:`wait_ready` before :meth:`submit`."""
        self._child = self._spawn()

    def wait_ready(
        self, expected_fingerprint: str | None = None, expected_codecs: dict[str, str] | None = None
    ) -> None:
        """Wait until the child's model and codecs are loaded and warm; refuse one whose model or codec
        fingerprints differ from the expected ones."""
        assert self._child is not None, "spawn() first"
        self.codec_fingerprints = expected_codecs
        self._wait_ready(self._child, expected_fingerprint)
        self._sender = threading.Thread(target=self._send_loop, name="splitwire-compute-send", daemon=True)
        self._sender.start()

    def submit(self, cut: Cut, jobs: Sequence[CodedJob] | Sequence[BackJob]) -> Batch:
        """Queue a batch for the child; the future resolves to what ``BackHalf.run_coded`` (coded jobs)
        or ``BackHalf.run`` (decoded ones) returns. Never blocks."""
        future: Batch = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        if all(isinstance(job, CodedJob) for job in jobs):
            self._outbox.put((future, cut, list(jobs)))
        else:
            self._outbox.put((future, cut, [(job.hidden.numpy(), job.positions.numpy()) for job in jobs]))
        return future

    def run(self, cut: Cut, jobs: Sequence[BackJob]) -> list[Answer]:
        """:meth:`submit` and wait: the same contract as ``BackHalf.run``."""
        return self.submit(cut, jobs).result()

    def run_coded(self, cut: Cut, jobs: Sequence[CodedJob]) -> list[Answer | Exception]:
        """:meth:`submit` and wait: the same contract as ``BackHalf.run_coded``."""
        return self.submit(cut, jobs).result()

    def close(self) -> None:
        """Stop sending, let the child finish what it holds, ask it to exit; kill it if it lingers."""
        if self._sender is not None:
            self._outbox.put(None)
            self._sender.join(STOP_TIMEOUT_S)
            self._sender = None
        child, self._child = self._child, None
        if child is None:
            return
        with contextlib.suppress(OSError, ValueError):  # the child is gone already
            child.conn.send(None)
        child.process.join(STOP_TIMEOUT_S)
        _kill(child)
        child.fail_pending(ComputeProcessError("the compute process was stopped"))

    # -- the sender thread and one receiver thread per child ------------------------------------

    def _send_loop(self) -> None:
        while (item := self._outbox.get()) is not None:
            future, cut, arrays = item
            try:
                child = self._alive_child()
                with child.lock:
                    if child.dead:
                        raise ComputeProcessError("the compute process died; retry")
                    child.pending.append(future)
                child.conn.send(("run", cut, arrays))
            except (ComputeProcessError, OSError, ValueError) as exc:
                _settle(future, error=exc if isinstance(exc, ComputeProcessError) else _died(exc))

    def _alive_child(self) -> _Child:
        """The running child, after starting another if it died."""
        child = self._child
        if child is not None and not child.dead and child.process.is_alive():
            return child
        if child is not None:
            log.error("compute process exited with code %s; starting another", child.process.exitcode)
            _kill(child)
        child = self._child = self._spawn()
        self._wait_ready(child, self.fingerprint)
        return child

    def _receive_loop(self, child: _Child) -> None:
        while True:
            try:
                kind, detail = child.conn.recv()
            except (EOFError, OSError) as exc:
                child.fail_pending(_died(exc, child.process.exitcode))
                return
            with child.lock:
                future = child.pending.popleft()
            outcome, busy_s = detail
            if self.on_busy is not None:  # before the answer, so a caller sees its batch counted
                try:
                    self.on_busy(busy_s)
                except Exception:  # a metrics callback must not stop the thread every answer comes through
                    log.exception("on_busy callback failed")
            if kind == "ok":
                _settle(future, result=outcome)
            else:
                _settle(future, error=ComputeProcessError(f"batch failed in the compute process: {outcome}"))

    # -- starting a child -------------------------------------------------------------------------

    def _spawn(self) -> _Child:
        parent, child_end = self._context.Pipe()
        process = self._context.Process(
            target=_child_main,
            args=(child_end, self.model, self.torch_threads),
            name="splitwire-compute",
            daemon=True,
        )
        process.start()
        child_end.close()
        return _Child(process, parent)

    def _wait_ready(self, child: _Child, expected_fingerprint: str | None) -> None:
        if not child.conn.poll(START_TIMEOUT_S):
            _kill(child)
            raise ComputeProcessError(f"compute process did not load {self.model} within {START_TIMEOUT_S:.0f} s")
        try:
            kind, detail = child.conn.recv()
        except EOFError:
            code = _kill(child)
            raise ComputeProcessError(f"compute process exited while loading {self.model} (exit code {code})") from None
        if kind != "ready":
            _kill(child)
            raise ComputeProcessError(f"compute process could not load {self.model}: {detail}")
        fingerprint, codecs = detail
        if expected_fingerprint and fingerprint != expected_fingerprint:
            _kill(child)
            raise ComputeProcessError(
                f"compute process loaded {self.model} with fingerprint {fingerprint}, the server has "
                f"{expected_fingerprint}: the model changed on disk while starting; restart the server"
            )
        if self.codec_fingerprints is not None and codecs != self.codec_fingerprints:
            _kill(child)
            differ = sorted({name for name, _ in set(codecs.items()) ^ set(self.codec_fingerprints.items())})
            raise ComputeProcessError(
                f"compute process loaded codecs that differ from the server's ({', '.join(differ)}): "
                "the checkpoints changed on disk while starting; restart the server"
            )
        self.fingerprint = fingerprint
        threading.Thread(target=self._receive_loop, args=(child,), name="splitwire-compute-recv", daemon=True).start()
        log.info("compute process %d ready with %s", child.process.pid, self.model)


def _settle(future: Batch, result: object = None, error: Exception | None = None) -> None:
    """Resolve ``future`` unless another thread already has (a dying child races with its receiver)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _died(exc: BaseException, exit_code: int | None = None) -> ComputeProcessError:
    code = f" (exit code {exit_code})" if exit_code is not None else ""
    return ComputeProcessError(f"the compute process died during a batch{code}: {type(exc).__name__}")


def _kill(child: _Child) -> int | None:
    if child.process.is_alive():
        child.process.kill()
    child.process.join(STOP_TIMEOUT_S)
    child.conn.close()
    return child.process.exitcode


def _child_main(conn: Connection, model_name: str, torch_threads: int | None) -> None:
    """The child: load, report ready, then answer batches in order until told to stop or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the server drains in-flight work first
    from splitwire.codec.catalog import CodecCatalog
    from splitwire.split.models import load_model

    try:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        model = load_model(model_name)
        catalog = CodecCatalog.for_model(model.fingerprint, model.hidden_size, vocab_size=model.vocab_size)
        for codec in catalog:
            codec.warm_up()
        back = BackHalf(model, catalog)
        back.warm_up(Cut.from_wire(model, None))
    except Exception as exc:  # reported to the parent, which names it in its error
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", (model.fingerprint, {codec.name: codec.fingerprint() for codec in catalog})))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server went away
            return
        if message is None:
            return
        _, cut, jobs = message
        started = time.monotonic()
        try:
            if all(isinstance(job, CodedJob) for job in jobs):
                answers: list[Answer | Exception] | list[Answer] = back.run_coded(cut, jobs)
            else:
                decoded = [BackJob(torch.from_numpy(np.asarray(h)), torch.from_numpy(np.asarray(p))) for h, p in jobs]
                answers = back.run(cut, decoded)
            kind, outcome = "ok", answers
        except Exception as exc:  # one bad batch must not take the child down
            kind, outcome = "error", f"{type(exc).__name__}: {exc}"
        conn.send((kind, (outcome, time.monotonic() - started)))  # a failed batch's time was busy too
