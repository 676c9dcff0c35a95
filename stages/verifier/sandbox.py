"""Killable worker processes that run an untrusted-input check ``check(gold, answer) -> bool`` (or a float, kept as
it is: a `--reward` function's reward) with hard limits.

What it does, for each (gold, answer) pair given to `run_checks`:
- Runs the check in a worker process (forkserver, else spawn), never in the caller's process: a hang, crash or
  memory blow-up in sympy/math-verify cannot take the caller down.
- Soft timeout: a ``setitimer`` SIGALRM interrupts the check at ``timeout`` s (status ``timeout``).
- Hard timeout: a worker still busy at ``timeout + grace`` (a long C call ignores signals; math-verify's own
  ``signal.alarm`` timeouts fail outside the main thread, measured) is SIGKILLed and replaced; its running check gets
  status ``timeout`` and the rest of its batch is re-queued. A worker that dies gets its running check ``error``.
- Memory cap: ``RLIMIT_AS`` of ``memory_mb`` per worker (MemoryError → status ``error``).
- Eval guard: sympy's `eval_expr` is wrapped in each worker (after the warm-up) to run only number/symbol constructor
  code (latex2sympy2_extended calls ``sympy.Number(token)``, which ``eval``s); anything else raises `UnsafeEval`
  (status ``error``). A check must still never hand model text to `parse_expr` on purpose.
- Throughput: a worker gets a batch of pairs per round-trip and reports each result as it finishes, so each check
  keeps its own deadline; a worker start costs ~1 s with math-verify (imports + the caller's warm-up pairs).

What it does not do: it is not an OS sandbox. Workers keep the caller's user, file system and network access (no
seccomp, namespaces or chroot); the protection against model text running code is the absence of eval plus the
guard. It knows nothing of answer extraction or math equivalence (`stages.verifier.answers`), and reads or writes no files.
"""

from __future__ import annotations

import multiprocessing as mp
import re
import signal
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Callable, NamedTuple, Sequence

Check = Callable[[str, str], bool]  # check(gold, answer) -> equivalent?; a picklable module-level function


class WorkerSpec(NamedTuple):
    """What each worker runs, and its limits."""

    check: Check
    timeout: float  # soft timeout of one check, seconds
    memory_mb: int  # address-space limit (0 = none)
    warm_up: tuple[tuple[str, str], ...] = ()  # (gold, answer) pairs run once, unguarded and untimed, at start


# --- eval guard (inside a worker) ------------------------------------------------------------------------------

class UnsafeEval(BaseException):
    """sympy was about to ``eval`` code other than number/symbol constructors (math-verify swallows Exception)."""


class _SoftTimeout(BaseException):
    """Raised by SIGALRM in a worker when a check overruns (BaseException: library code cannot swallow it)."""


_EVAL_NAMES = {"Integer", "Float", "Rational", "Symbol", "Number", "E", "I", "pi", "oo"}
_EVAL_QUOTED_RE = re.compile(r"'[A-Za-z0-9_. +\-]*'")
_EVAL_BAD_CHAR_RE = re.compile(r"[^\sA-Za-z0-9_.()+\-*/,]")
_IDENTIFIER_RE = re.compile(r"(?<![0-9.])[A-Za-z_][A-Za-z0-9_]*")


def eval_allowed(code: str) -> bool:
    """Whether sympy-generated `code` only builds numbers/symbols: allowed names, quoted alphanumerics, operators."""
    bare = _EVAL_QUOTED_RE.sub("0", code)
    if _EVAL_BAD_CHAR_RE.search(bare) or "__" in bare:
        return False
    return set(_IDENTIFIER_RE.findall(bare)) <= _EVAL_NAMES


def _install_eval_guard() -> None:
    import sympy.parsing.sympy_parser as sympy_parser

    original = sympy_parser.eval_expr

    def guarded_eval_expr(code, local_dict, global_dict):
        if not eval_allowed(code):
            raise UnsafeEval(f"sympy tried to eval {code[:60]!r}")
        return original(code, local_dict, global_dict)

    sympy_parser.eval_expr = guarded_eval_expr



# --- worker loop -----------------------------------------------------------------------------------------------

def _raise_soft_timeout(signum, frame):
    raise _SoftTimeout()


def _timed_check(check: Check, gold: str, answer: str, timeout: float) -> tuple:
    started = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        try:
            verdict = check(gold, answer)
            status, correct, detail = "ok", verdict if type(verdict) is float else bool(verdict), ""
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _SoftTimeout:
        status, correct, detail = "timeout", False, f"interrupted after {timeout:g} s"
    except UnsafeEval as exc:
        status, correct, detail = "error", False, f"UnsafeEval: {exc}"
    except Exception as exc:  # noqa: BLE001 - hostile input can raise anything inside sympy; recorded, not hidden
        status, correct, detail = "error", False, f"{type(exc).__name__}: {str(exc)[:120]}"
        if getattr(exc, "antisd_traceback", None):  # a user's reward function: its traceback, for the log
            detail += "\n" + exc.antisd_traceback[-4000:]
    return status, correct, detail, time.perf_counter() - started


def _worker_main(conn, spec: WorkerSpec) -> None:
    """Worker loop: warm up, say ready, then answer each batch of (task, gold, answer) one result at a time."""
    check, timeout = spec.check, spec.timeout
    import logging
    import resource

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills the workers
    logging.disable(logging.CRITICAL)  # math-verify logs every parse failure; statuses carry the outcome
    if spec.memory_mb > 0:
        limit = spec.memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for gold, answer in spec.warm_up:  # e.g. sympy's lazy imports and ANTLR's caches, before any deadline runs
        try:
            check(gold, answer)
        except Exception:  # noqa: BLE001 - fixed inputs; a check that rejects some of them is still usable
            pass
    _install_eval_guard()
    signal.signal(signal.SIGALRM, _raise_soft_timeout)
    conn.send(("ready",))
    while True:
        try:
            batch = conn.recv()
        except EOFError:
            return
        if batch is None:
            return
        for task, gold, answer in batch:
            try:
                result = _timed_check(check, gold, answer, timeout)
            except _SoftTimeout:  # the alarm fired between the check's end and its cancellation
                result = ("timeout", False, f"interrupted after {timeout:g} s", timeout)
            conn.send((task, *result))


# --- worker pool (parent side) ---------------------------------------------------------------------------------

class _Worker:
    def __init__(self, context, spec: WorkerSpec):
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child_conn, spec),
                                       daemon=True, name="antisd-answer-check")
        self.process.start()
        child_conn.close()
        self.born = time.monotonic()
        self.ready = False
        self.tasks: deque[int] = deque()  # sent, not yet answered; the first one is running
        self.since = 0.0  # when the running task started (as seen by the parent)

    def send(self, batch: list[tuple[int, str, str]]) -> None:
        self.tasks.extend(task for task, _, _ in batch)
        self.since = time.monotonic()
        self.conn.send(batch)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(1.0)
        self.conn.close()


def _context(preload: Sequence[str]):
    if "forkserver" in mp.get_all_start_methods():
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(["stages.verifier.sandbox", *preload])
        return context
    return mp.get_context("spawn")


class _Pool:
    """Workers plus the queue of pair indices; enforces each running check's hard deadline."""

    def __init__(self, pairs, spec: WorkerSpec, *, workers, start_timeout, preload):
        self.pairs, self.spec = pairs, spec
        self.hard_timeout = spec.timeout + 0.5 + 0.25 * spec.timeout  # soft alarm at `timeout`, then a grace
        self.start_timeout = start_timeout
        count = min(workers, len(pairs))
        self.chunk = max(1, min(64, len(pairs) // (count * 8)))
        self.pending = deque(range(len(pairs)))
        self.results: list[tuple | None] = [None] * len(pairs)
        self.done = self.failed_starts = 0
        self.context = _context(preload)
        self.workers = [self._new_worker() for _ in range(count)]

    def _new_worker(self) -> _Worker:
        return _Worker(self.context, self.spec)

    def dispatch(self) -> None:
        for worker in self.workers:
            if worker.ready and not worker.tasks and self.pending:
                take = min(self.chunk, len(self.pending))
                worker.send([(i, *self.pairs[i]) for i in (self.pending.popleft() for _ in range(take))])

    def next_deadline(self) -> float:
        deadlines = [w.since + self.hard_timeout for w in self.workers if w.tasks]
        deadlines += [w.born + self.start_timeout for w in self.workers if not w.ready]
        return min(deadlines, default=time.monotonic() + 1.0)

    def receive(self, worker: _Worker) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            self.retire(worker, "error", f"worker died (exit code {worker.process.exitcode})", 0.0)
            return
        if message == ("ready",):
            worker.ready = True
            return
        task, status, correct, detail, seconds = message
        worker.tasks.popleft()
        worker.since = time.monotonic()
        self.results[task] = (status, correct, detail, seconds)
        self.done += 1

    def enforce_deadlines(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers):
            if worker.tasks and now > worker.since + self.hard_timeout:
                self.retire(worker, "timeout", f"worker killed after {now - worker.since:.1f} s", now - worker.since)
            elif not worker.ready and now > worker.born + self.start_timeout:
                raise RuntimeError(f"answer-check worker not ready after {self.start_timeout:g} s")

    def retire(self, worker: _Worker, status: str, detail: str, seconds: float) -> None:
        """Kill `worker`: its running task gets `status`, the rest of its batch goes back to the queue."""
        worker.kill()
        if worker.tasks:
            self.results[worker.tasks.popleft()] = (status, False, detail, seconds)
            self.done += 1
            self.pending.extendleft(reversed(worker.tasks))
        elif not worker.ready:
            self.failed_starts += 1
            if self.failed_starts >= 3:
                raise RuntimeError(f"answer-check workers fail to start ({detail})")
        self.workers[self.workers.index(worker)] = self._new_worker()

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()


def run_checks(pairs: Sequence[tuple[str, str]], check: Check, *, timeout: float = 5.0, workers: int = 2,
               memory_mb: int = 2048, warm_up: Sequence[tuple[str, str]] = (), preload: Sequence[str] = (),
               on_progress: Callable[[int, int], None] | None = None, start_timeout: float = 120.0) -> list[tuple]:
    """(status, correct, detail, seconds) of `check(gold, answer)` for each pair, in worker processes.

    `check` must be a picklable module-level function; `warm_up` pairs run in each new worker before it takes work;
    `preload` names modules the forkserver imports once for all workers. A check still running at
    ``timeout + grace`` seconds gets its worker killed and replaced; the rest of that worker's batch is re-queued.
    """
    if not pairs:
        return []
    spec = WorkerSpec(check, timeout, memory_mb, tuple(warm_up))
    pool = _Pool(pairs, spec, workers=workers, start_timeout=start_timeout, preload=preload)
    try:
        while pool.done < len(pairs):
            before = pool.done
            pool.dispatch()
            by_conn = {worker.conn: worker for worker in pool.workers}
            for conn in wait(list(by_conn), timeout=max(0.0, pool.next_deadline() - time.monotonic())):
                pool.receive(by_conn[conn])
            pool.enforce_deadlines()
            if on_progress is not None and pool.done > before:
                on_progress(pool.done, len(pairs))
    finally:
        pool.close()
    return pool.results
