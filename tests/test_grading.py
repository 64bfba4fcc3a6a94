"""Grading of boxed answers with math-verify: answer forms, extraction, garbage, threads and timeouts."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("math_verify", reason="grading needs math-verify: pip install 'math-verify[antlr4_13_2]'")

from eopd_ray import grading  # noqa: E402
from eopd_ray.grading import extract_boxed, grade, normalize_answer  # noqa: E402

# (gold as stored in a data set, what a model writes inside \boxed{}, expected verdict)
CASES = [
    # zero-padded AIME integers, AMC floats, negatives
    ("033", "33", True),
    ("33", "033", True),
    ("025", "25", True),
    ("025", "52", False),
    ("12.0", "12", True),
    ("27.0", "27.5", False),
    ("-5", "-5", True),
    ("-5", "5", False),
    ("-\\frac{35}{9}", "-\\dfrac{35}{9}", True),
    ("-\\frac{35}{9}", "\\frac{35}{9}", False),
    # fractions (a decimal equal to 6 places counts), \dfrac, \tfrac
    ("\\frac{1}{2}", "0.5", True),
    ("0.5", "\\frac12", True),
    ("\\frac{1}{2}", "0.6", False),
    ("\\frac{1}{3}", "0.3", False),
    ("\\dfrac{17}{50}", "0.34", True),
    ("\\frac43", "\\tfrac{4}{3}", True),
    ("\\frac{14}{3}", "\\frac{3}{14}", False),
    # radicals
    ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("3\\sqrt{13}", "\\sqrt{117}", True),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True),
    ("2\\sqrt{3}", "3\\sqrt{2}", False),
    # intervals
    ("(3,4]", "(3, 4]", True),
    ("(3,4]", "[3,4]", False),
    ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("(2,\\infty)", "(2,\\infty)", True),
    ("(2,\\infty)", "[2,\\infty)", False),
    # units, degrees, percent, money, text
    ("10", "10 \\text{ cm}", True),
    ("6.5", "6.5 \\mathrm{~m}", True),
    ("10", "11 \\text{ cm}", False),
    ("90^\\circ", "90", True),
    ("90", "90^{\\circ}", True),
    ("90^\\circ", "45^\\circ", False),
    ("50\\%", "50", True),
    ("0.5", "50\\%", True),
    ("18", "\\$18", True),
    ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}", True),
    ("\\text{Evelyn}", "Evelyn", True),
    ("\\text{Evelyn}", "Bob", False),
    ("\\text{(C)}", "C", True),
    ("\\text{(C)}", "D", False),
    ("\\text{east}", "\\text{east}", True),
    # numbers written with digit groups or E notation
    ("10,\\!080", "10080", True),
    ("10080", "10,080", True),
    ("11,\\! 111,\\! 111,\\! 100", "11111111100", True),
    ("4.5e33", "4.5 \\times 10^{33}", True),
    ("4.5e33", "4.6 \\times 10^{33}", False),
    ("1e-5", "10^{-5}", True),
    # tuples, sets, lists of answers (order-insensitive when several answers)
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(\\pi/2, 3)", False),
    ("3, 5, 7", "7, 5, 3", True),
    ("3, 5, 7", "3, 5", False),
    ("69,84", "84, 69", True),
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}", True),
    ("(1,8,19), (2,7,13), (4,5,7)", "(4,5,7), (1,8,19), (2,7,13)", True),
    ("(1,8,19), (2,7,13), (4,5,7)", "(1,8,19), (2,7,13)", False),
    ("(100,200)", "(100,200)", True),
    ("(100,200)", "100200", False),
    # expressions, equations, matrices, bases
    ("x=5", "5", True),
    ("p - q", "-q + p", True),
    ("x^3+3x-6", "x^3+3x+6", False),
    ("5x - 7y + 11z + 4 = 0", "5x-7y+11z+4=0", True),
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
     "\\begin{pmatrix} -\\frac13 \\\\ \\frac23 \\\\ \\frac53 \\end{pmatrix}", True),
    ("6 - 5i", "6-5i", True),
    ("6 - 5i", "6+5i", False),
    ("52_8", "52_8", True),
]


@pytest.mark.parametrize("gold,pred,expected", CASES, ids=[f"{g}|{p}" for g, p, _ in CASES])
def test_answer_forms(gold, pred, expected):
    assert grade(f"Some reasoning... so the answer is $\\boxed{{{pred}}}$.", gold) is expected


@pytest.mark.parametrize("gold,pred,expected", [
    (["$3$", "$5$"], "5, 3", True),
    (["$3$", "$5$"], "3, 5", True),
    (["$3$", "$5$"], "3", False),
    (["$3$", "$5$"], "3, 5, 7", False),
    (["$\\frac{1}{2}$"], "0.5", True),
    (("2",), "2", True),
    (12.0, "12", True),
    (33, "033", True),
    (0.25, "\\frac14", True),
])
def test_gold_as_list_or_number(gold, pred, expected):
    assert grade(f"\\boxed{{{pred}}}", gold) is expected


def test_last_box_wins():
    resp = "First try \\boxed{3}. Wait, that is wrong. Final: \\boxed{5}"
    assert grade(resp, "5")
    assert not grade(resp, "3")


def test_no_box_is_wrong():
    assert not grade("The answer is 5.", "5")
    assert not grade("", "5")


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{5}", "5"),
    ("a \\boxed{1} b \\boxed{2} c", "2"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{a_{b_{c}}} tail", "a_{b_{c}}"),
    ("\\boxed {7}", "7"),
    ("$\\boxed 7$", "7"),
    ("\\fbox{x+1}", "x+1"),
    ("\\boxed{3} then \\fbox{4}", "4"),
    ("no box here", None),
    ("\\boxed{1} ... \\boxed{2", None),  # truncated last box: no final answer
    ("\\boxed", None),
    ("\\boxedx{3}", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_nested_braces_grade():
    assert grade("\\boxed{\\frac{\\sqrt{3}}{\\left(2\\right)}}", "\\frac{\\sqrt{3}}{2}")
    assert grade("\\boxed{\\dfrac{3}{4}}", "\\frac34")


def test_normalize_answer():
    assert normalize_answer(["$3$", "$5$"]) == "3, 5"
    assert normalize_answer(12.0) == "12"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("1,3,5") == "1,3,5"
    assert normalize_answer("$\\dfrac{1}{2}$.") == "\\frac{1}{2}"
    assert normalize_answer("\\$5") == "\\$5"


GARBAGE = [
    None, 123, 4.5, b"\\boxed{5}", ["\\boxed{5}"], {"a": 1}, object(),
    "\\boxed{", "\\boxed{}", "\\boxed{}}}}", "}}}{{{", "\\boxed{\\frac{}{}}", "\\boxed{\\\\\\\\}",
    "\\boxed{\x00\x01\x02}", "\\boxed{💥 ∞ ∑}", "\\boxed{" + "(" * 60 + "}", "\\boxed{\\begin{pmatrix}}",
    "\\boxed{1/0}", "\\boxed{\\log(0)}", "\\boxed{x" * 50, "\\boxed{" + "a" * 5000 + "}",
]


@pytest.mark.parametrize("response", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_is_false_and_never_raises(response):
    assert grade(response, "5") is False


@pytest.mark.parametrize("gold", [None, "", "   ", {"x": 1}, object(), "\\frac{", "}{", [], ["", "$$"]])
def test_garbage_gold_is_false(gold):
    assert grade("\\boxed{5}", gold) is False


PATHOLOGICAL = "\\boxed{9^{9^{9^{9}}}}"  # SymPy tries to evaluate the power tower


def test_pathological_input_bounded_in_main_thread():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("needs the main thread")
    t0 = time.monotonic()
    assert grade(PATHOLOGICAL, "7", timeout=0.5) is False
    assert time.monotonic() - t0 < 5


def test_grading_in_worker_threads():
    """Off the main thread signal-based timeouts raise; grading must still work and be bounded."""
    cases = [(f"\\boxed{{{p}}}", g, e) for g, p, e in CASES[:20]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: grade(c[0], c[1]), cases))
        assert results == [e for _, _, e in cases]
        t0 = time.monotonic()
        assert pool.submit(grade, PATHOLOGICAL, "7", 0.5).result(timeout=30) is False
        assert time.monotonic() - t0 < 5
        # the grader still works after a timeout
        assert pool.submit(grade, "\\boxed{\\frac{1}{2}}", "0.5").result(timeout=30) is True


def test_stalled_worker_is_killed_and_replaced():
    worker = grading._worker()
    if worker.broken:
        pytest.skip("no grading worker process on this machine")
    assert worker.request({"p": "1", "g": "1", "t": 2.0}, 30) == "1"
    t0 = time.monotonic()
    assert worker.request({"op": "stall", "s": 60}, 0.5) is None  # SIGALRM blocked: only a kill helps
    assert time.monotonic() - t0 < 5
    assert worker.request({"p": "\\frac{1}{2}", "g": "0.5", "t": 2.0}, 30) == "1"


def test_watchdog_interrupts_python_code_in_a_thread():
    def spin():
        while True:
            pass

    out = {}

    def run():
        t0 = time.monotonic()
        try:
            grading._with_watchdog(spin, 0.3)
        except grading.GradingTimeout:
            out["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert out["elapsed"] < 3
    # no stray exception is delivered later to a thread that finished in time
    assert grading._with_watchdog(lambda: 42, 0.05) == 42
    time.sleep(0.2)


def test_callers_alarm_is_left_alone():
    """An interval timer armed by the caller (e.g. pytest-timeout) is neither cancelled nor replaced."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        pytest.skip("needs the main thread and setitimer")
    fired = []

    def handler(*_):
        fired.append(1)

    old_handler = signal.signal(signal.SIGALRM, handler)
    old_timer = signal.setitimer(signal.ITIMER_REAL, 20.0)
    try:
        assert grade("\\boxed{2\\sqrt{3}}", "\\sqrt{12}")
        assert grade(PATHOLOGICAL, "7", timeout=0.5) is False
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 0 < remaining <= 20.0
        assert signal.getsignal(signal.SIGALRM) is handler
        assert not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, *old_timer)
        signal.signal(signal.SIGALRM, old_handler)


def test_many_grades_are_fast():
    responses = [(f"Thus \\boxed{{{n:03d}}}.", str(n if i % 2 else n + 1)) for i, n in enumerate(range(500))]
    responses += [(f"\\boxed{{\\frac{{{n}}}{{{n + 1}}}}}", f"\\frac{{{n}}}{{{n + 1}}}") for n in range(100)]
    t0 = time.monotonic()
    results = [grade(r, g) for r, g in responses]
    assert results == [bool(i % 2) for i in range(500)] + [True] * 100
    assert time.monotonic() - t0 < 20
