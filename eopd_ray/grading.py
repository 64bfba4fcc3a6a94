"""Answer grading for the math benchmarks: last ``\\boxed{...}`` of a response vs. a gold answer.

Equivalence is decided by the maintained verifier math-verify (Hugging Face): both sides are parsed to
SymPy (LaTeX, then plain expressions) and compared with ``math_verify.verify(gold, pred)``. On top of it
this module does only what the benchmark data needs:

* extraction of the *last* ``\\boxed{...}`` / ``\\boxed x`` / ``\\fbox{...}``, with nested and escaped
  braces (``\\boxed{\\{1,2\\}}``); no box, or a last box cut off by truncation, grades False;
* the same light normalisation of both sides (:func:`normalize_answer`): ``$`` delimiters, ``\\dfrac``,
  ``\\!``, digit-group commas of a lone number (``1,000``, ``10,\\!080``), a trailing full stop, and
  E notation (``4.5e33`` -> ``4.5 \\times 10^{33}``, as in Minerva's gold answers);
* a gold answer given as a list (OlympiadBench ``final_answer``) is joined with ``", "`` and compared as
  a set: ``["3", "5"]`` matches ``\\boxed{5, 3}`` but not ``\\boxed{3}`` (all answers, any order);
  multi-answer strings such as ``"1,3,5"`` likewise;
* what math-verify does itself: ``033 == 33``; ``12.0 == 12``; a decimal equals a fraction when they
  agree to 6 decimal places (``\\frac{1}{2} == 0.5``, accepted on purpose: models write either);
  ``2\\sqrt{3} == \\sqrt{12}``; units in ``\\text``/``\\mathrm`` dropped (``10 \\text{ cm} == 10``);
  ``30^\\circ == 30``; ``50\\% == 50`` and ``== 0.5``; intervals with their open/closed ends;
  ``x = 5 == 5``; text answers (``\\text{(C)} == C``).

Deadlines. SymPy can run for ever on adversarial input (``9^{9^{9^9}}``). math-verify's own timeouts
use ``signal.alarm``: that raises ValueError off the main thread (Ray may run actor methods in threads)
and cancels any alarm the caller had set (pytest-timeout). Here math-verify's timeouts are switched off
and one deadline covers the whole grade (parse gold, parse prediction, verify):

* main thread, no interval timer armed: a ``SIGALRM`` interval timer (``setitimer``, sub-second; the
  previous handler is restored). CPython's big-integer loops poll for signals, so this also stops
  huge powers computed in C;
* any other case (worker threads, or the caller's own timer pending): the grade runs in a worker
  process that grades in its own main thread as above; if it does not answer within ``timeout + 1 s``
  it is killed and restarted. Set ``EOPD_GRADING_SUBPROCESS=0`` (or if the worker cannot start) to
  grade in the calling thread with a watchdog that raises the timeout via ``PyThreadState_SetAsyncExc``
  (stops Python code, not a long C call).

The timeout exception is a ``BaseException`` (``except Exception`` in SymPy does not swallow it) and is
raised again every 50 ms until the grade unwinds. A timed-out grade is False; nothing here raises for
bad input.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from typing import Any, Callable, Sequence, TypeVar

__all__ = ["grade", "grade_answer", "extract_boxed", "normalize_answer", "GradingTimeout", "DEFAULT_TIMEOUT_S",
           "MAX_ANSWER_CHARS"]

DEFAULT_TIMEOUT_S = 5.0
# Longest gold answer in the reference data is 204 characters (OlympiadBench); a longer boxed answer is
# not parsed at all (it cannot be right and parsing it costs seconds).
MAX_ANSWER_CHARS = 1000
_REFIRE_S = 0.05

T = TypeVar("T")

# math-verify logs every timeout/parse failure with the whole input at WARNING; keep grading quiet unless
# the application configured that logger itself.
for _name in ("math_verify", "latex2sympy2_extended"):
    _lg = logging.getLogger(_name)
    if _lg.level == logging.NOTSET:
        _lg.setLevel(logging.ERROR)

_math_verify = None


def _mv():
    """math_verify, imported on first use (it pulls in SymPy and the ANTLR LaTeX parser)."""
    global _math_verify
    if _math_verify is None:
        try:
            import math_verify
        except ImportError as e:  # pragma: no cover - exercised only without the dependency
            raise ImportError("eopd_ray.grading needs math-verify: pip install 'math-verify[antlr4_13_2]'") from e
        _math_verify = math_verify
    return _math_verify


# ----------------------------------------------------------------------------------------------------
# Extraction

_BOX_START = re.compile(r"\\(?:boxed|fbox)\b")


def _boxed_at(text: str, start: int) -> tuple[str | None, bool]:
    """Content of the box whose command name ends at ``start``; (content, complete)."""
    i = start
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i < n and text[i] == "{":
        depth = 0
        j = i
        while j < n:
            c = text[j]
            if c == "\\":
                j += 2  # escaped char: \{ \} \\ do not count
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1:j], True
            j += 1
        return None, False
    if i > start:  # "\boxed 5": the token up to whitespace or "$"
        m = re.match(r"[^\s$]+", text[i:])
        if m:
            return m.group(0), True
    return None, False


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\boxed x``, ``\\fbox{...}``) in ``text``, else None.

    Nested and escaped braces are handled. If the last box is not closed (a truncated generation),
    the result is None: earlier boxes are not the final answer.
    """
    if not isinstance(text, str):
        return None
    starts = [m.end() for m in _BOX_START.finditer(text)]
    for s in reversed(starts):
        content, complete = _boxed_at(text, s)
        if not complete:
            return None
        if content is not None:
            return content.strip()
    return None


# ----------------------------------------------------------------------------------------------------
# Normalisation

_GROUPED_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_E_NOTATION = re.compile(r"(-?(?:\d+(?:\.\d*)?|\.\d+))[eE]([-+]?\d+)")


def normalize_answer(ans: Any) -> str:
    """Canonical string for an answer, applied to the gold answer and to the prediction alike.

    A list becomes ``", "``-joined elements; an integral float becomes an integer (``12.0`` -> ``12``);
    ``$`` delimiters (not ``\\$``), ``\\!`` and a trailing full stop are removed; ``\\dfrac``/``\\tfrac`` ->
    ``\\frac``; a number written with digit-group commas (``1,000``, ``10,\\!080``, ``10{,}080``) loses
    them; a lone number in E notation becomes ``m \\times 10^{e}``. Commas elsewhere are kept:
    ``1,3,5`` and ``(100,200)`` stay lists/tuples.
    """
    if ans is None:
        return ""
    if isinstance(ans, (list, tuple)):
        parts = [normalize_answer(a) for a in ans]
        return ", ".join(p for p in parts if p)
    if isinstance(ans, float) and ans.is_integer():
        return str(int(ans))
    s = str(ans).strip()
    s = re.sub(r"(?<!\\)\$", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\!\s*", "", s).replace("{,}", ",")
    s = s.strip()
    if s.endswith(".") and not s.endswith("\\."):
        s = s[:-1].rstrip()
    if _GROUPED_NUMBER.fullmatch(s):
        s = s.replace(",", "")
    m = _E_NOTATION.fullmatch(s)
    if m:  # 4.5e33 -> 4.5 \\times 10^{33} (LaTeX would read "e" as Euler's number)
        s = f"{m.group(1)} \\times 10^{{{int(m.group(2))}}}"
    return s


# ----------------------------------------------------------------------------------------------------
# Parsing and verification (no deadline of their own)


@lru_cache(maxsize=8192)
def _parse(ans: str) -> tuple:
    mv = _mv()
    # The same extraction for gold and prediction: the answer is put in a box and math-verify's LaTeX
    # (then plain-expression) extraction reads it. math-verify's own timeouts are off: see Deadlines.
    return tuple(mv.parse("\\boxed{" + ans + "}", parsing_timeout=None, raise_on_error=False))


def _verify(gold: str, pred: str) -> bool:
    g = _parse(gold)
    if not g:
        return False
    p = _parse(pred)
    if not p:
        return False
    return bool(_mv().verify(list(g), list(p), timeout_seconds=None, raise_on_error=False))


_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def _plain_numbers_equal(gold: str, pred: str) -> bool | None:
    """Fast path for two plain decimal numerals (most AIME, AMC, GSM8K answers): the verdict math-verify
    would give (integers exactly, otherwise equal after rounding to 6 decimals) without its ANTLR parser.
    None when either side is anything else."""
    if not (_PLAIN_NUMBER.fullmatch(gold) and _PLAIN_NUMBER.fullmatch(pred)):
        return None
    a, b = Decimal(gold), Decimal(pred)
    if a == b:
        return True
    if "." not in gold and "." not in pred:
        return False
    q = Decimal("0.000001")
    return a.quantize(q, rounding=ROUND_HALF_UP) == b.quantize(q, rounding=ROUND_HALF_UP)


# ----------------------------------------------------------------------------------------------------
# Deadlines


class GradingTimeout(BaseException):
    """Raised inside a grade that ran past its deadline (BaseException: not swallowed by SymPy)."""


def _itimer_usable() -> bool:
    return (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
            and signal.getitimer(signal.ITIMER_REAL)[0] == 0)


def _with_itimer(fn: Callable[[], T], seconds: float) -> T:
    """Main thread only: SIGALRM interval timer. Its handler also runs inside CPython's long big-integer
    loops (they poll for signals), so ``9^{9^{9^9}}`` is interrupted too."""

    def handler(signum, frame):
        raise GradingTimeout()

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds, _REFIRE_S)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
    finally:
        signal.signal(signal.SIGALRM, old)


def _with_watchdog(fn: Callable[[], T], seconds: float) -> T:
    """Any thread (fallback when no worker process can run): a timer thread raises GradingTimeout in
    this thread with PyThreadState_SetAsyncExc. Interrupts Python code only, not a long C call."""
    tid = threading.get_ident()
    lock = threading.Lock()
    state = {"done": False, "fired": False}
    stop = threading.Event()
    set_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc

    def watchdog():
        if stop.wait(seconds):
            return
        while True:
            with lock:
                if state["done"]:
                    return
                state["fired"] = True
                set_exc(ctypes.c_ulong(tid), ctypes.py_object(GradingTimeout))
            if stop.wait(_REFIRE_S):
                return

    t = threading.Thread(target=watchdog, name="eopd-grading-watchdog", daemon=True)
    t.start()
    try:
        return fn()
    finally:
        with lock:
            state["done"] = True
        stop.set()
        if state["fired"]:
            set_exc(ctypes.c_ulong(tid), None)  # clear one that was set but not yet raised


def _grade_normalized(pred: str, gold: str, timeout: float | None) -> bool:
    """Grade two normalised answers in this process, under a deadline suited to the calling thread."""
    try:
        if timeout is None or timeout <= 0:
            return _verify(gold, pred)
        if _itimer_usable():
            return _with_itimer(lambda: _verify(gold, pred), timeout)
        return _with_watchdog(lambda: _verify(gold, pred), timeout)
    except GradingTimeout:
        return False
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------------
# Worker process for grades off the main thread
#
# Outside the main thread neither signal.alarm (math-verify's mechanism) nor SIGALRM works, and an
# exception injected into a thread cannot stop a C-level computation such as a huge integer power.
# Such grades are therefore sent to one child process, which grades in its main thread under the
# SIGALRM deadline above; if it does not answer within timeout + _KILL_GRACE_S it is killed and
# restarted and the grade is False. Grading holds the GIL, so one shared worker loses no parallelism.
# Set EOPD_GRADING_SUBPROCESS=0 to grade in-thread with the watchdog instead.

_KILL_GRACE_S = 1.0
_START_TIMEOUT_S = 120.0
_WORKER_CODE = ("import importlib.util, sys; "
                "s = importlib.util.spec_from_file_location('_eopd_grading_worker', sys.argv[1]); "
                "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); m._worker_main()")


class _GradingWorker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self.broken = (os.name != "posix"
                       or os.environ.get("EOPD_GRADING_SUBPROCESS", "1").strip().lower() in ("0", "false", "no"))
        self.restarts = 0

    def _read_line(self, deadline: float) -> bytes | None:
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None  # the worker died
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def _kill(self) -> None:
        proc, self._proc, self._buf = self._proc, None, b""
        if proc is not None:
            try:
                proc.kill()
                proc.wait(timeout=5)
            except Exception:
                pass

    def _start(self) -> bool:
        try:
            # The module file is loaded standalone: no package __init__ (and its imports) in the child.
            self._proc = subprocess.Popen([sys.executable, "-c", _WORKER_CODE, os.path.abspath(__file__)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, close_fds=True)
            self._buf = b""
            if self._read_line(time.monotonic() + _START_TIMEOUT_S) == b"ready":
                return True
        except Exception:
            pass
        self._kill()
        self.broken = True  # do not retry a worker that cannot start; use the watchdog
        return False

    def request(self, msg: dict, wait_s: float) -> str | None:
        """Send one request; the reply line, or None on timeout/failure (the worker is then killed)."""
        with self._lock:
            if self.broken:
                return None
            if self._proc is None or self._proc.poll() is not None:
                if self._proc is not None:
                    self._kill()
                    self.restarts += 1
                if not self._start():
                    return None
            try:
                self._proc.stdin.write(json.dumps(msg).encode() + b"\n")
                self._proc.stdin.flush()
                line = self._read_line(time.monotonic() + wait_s)
            except Exception:
                line = None
            if line is None:
                self._kill()
                self.restarts += 1
                return None
            return line.decode()

    def close(self) -> None:
        with self._lock:
            self._kill()


_WORKER: _GradingWorker | None = None
_WORKER_LOCK = threading.Lock()


def _worker() -> _GradingWorker:
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = _GradingWorker()
            atexit.register(_WORKER.close)
        return _WORKER


def _forget_worker_after_fork() -> None:
    global _WORKER, _WORKER_LOCK
    _WORKER = None  # the child of a fork must not share the parent's pipes
    _WORKER_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker_after_fork)


def _worker_main() -> None:
    """Entry point of the worker process: JSON requests on stdin, "1"/"0" lines on stdout."""
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # keep stray output (Python or C) off the protocol channel
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; EOF on stdin ends the worker
    _mv()
    _parse("1")  # warm up the parser before announcing readiness
    out.write(b"ready\n")
    for raw in sys.stdin.buffer:
        try:
            msg = json.loads(raw)
            if msg.get("op") == "stall":  # test hook: ignore SIGALRM and sleep (exercises the kill path)
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
                time.sleep(float(msg["s"]))
                ok = False
            else:
                ok = _grade_normalized(msg["p"], msg["g"], msg.get("t"))
        except Exception:
            ok = False
        out.write(b"1\n" if ok else b"0\n")


# ----------------------------------------------------------------------------------------------------
# Public API


def grade(response: str, gold: str | Sequence[str] | float | int, timeout: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """True iff the last ``\\boxed{}`` answer of ``response`` is equivalent to ``gold``.

    ``gold`` may be a string, a number, or a list of answers (all must match, order-insensitive).
    No box, a truncated last box, a timeout (``timeout`` seconds for the whole grade; None disables it)
    or any error gives False. Safe in any thread; never raises for bad input.
    """
    try:
        pred = extract_boxed(response)
        if pred is None:
            return False
        return grade_answer(pred, gold, timeout=timeout)
    except ImportError:
        raise  # math-verify missing: an installation error, not a wrong answer
    except Exception:
        return False


def grade_answer(pred: str, gold: str | Sequence[str] | float | int, timeout: float | None = DEFAULT_TIMEOUT_S,
                 shortcuts: bool = True) -> bool:
    """Like :func:`grade` for an already extracted answer ``pred`` (no ``\\boxed{}`` needed).

    ``shortcuts``: decide without math-verify when both normalised answers are the same string (True)
    or both plain decimal numerals (compared as math-verify would). ``False`` sends every pair through
    math-verify (used to validate data: does each gold answer parse and equal itself?).
    """
    _mv()  # raises ImportError without math-verify rather than grading everything False
    try:
        p = normalize_answer(pred)
        g = normalize_answer(gold)
        if not p or not g or len(p) > MAX_ANSWER_CHARS or len(g) > MAX_ANSWER_CHARS:
            return False
        if shortcuts:
            if p == g:
                return True
            fast = _plain_numbers_equal(g, p)
            if fast is not None:
                return fast
        if timeout is None or timeout <= 0 or _itimer_usable():
            return _grade_normalized(p, g, timeout)
        worker = _worker()
        if not worker.broken:
            reply = worker.request({"p": p, "g": g, "t": timeout}, timeout + _KILL_GRACE_S)
            if reply is not None or not worker.broken:
                return reply == "1"
        return _grade_normalized(p, g, timeout)  # no worker process: watchdog in this thread
    except Exception:
        return False
