"""Final answers of math completions: extraction, normalisation, equivalence and clustering.

The pipeline every voting strategy uses:

1. :func:`extract_answer` pulls the final answer out of a completion (last ``\\boxed{}``, then
   the "answer is" / "Answer:" and ``####`` conventions, then what a final Python code block
   states as literal numbers). A completion without one is *answerless*:
   it counts against the budget but does not vote.
2. :func:`answer_key` maps an answer to a canonical vote key. Plain numbers take a fast path;
   everything else goes through math-verify (``str`` of the parsed sympy object) and falls back
   to the Hendrycks MATH normalisation :func:`strip_string`.
3. :func:`cluster_answers` groups equal keys, then merges distinct keys that
   :func:`equivalent` judges equal, taking the transitive closure with a union-find.

math-verify (sympy underneath) runs in worker processes, never in the caller's: its own
timeouts rely on ``SIGALRM``, which works only in a main thread, and some comparisons never end
(``\\frac{1}{42 \\log_{2023} 21}`` against ``2023^2`` ran for minutes). In a worker they apply
(:data:`MATH_VERIFY_TIMEOUT_S` each parse and comparison), and a worker that overruns
:data:`SYMBOLIC_DEADLINE_S` anyway (a long C-level computation) is killed and replaced: the
answer is then compared by key only. ``TTSCALE_SYMBOLIC_WORKERS`` sets how many run at most
(default 2; 0: in the calling thread, without timeouts). Answers that are long or could make
sympy evaluate something enormous (nested powers, factorials of large numbers) never reach
math-verify. Nothing in this module raises on malformed answers.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from fractions import Fraction
from functools import lru_cache
from typing import Any

__all__ = [
    "MAX_SYMBOLIC_CHARS",
    "AnswerClusters",
    "answer_key",
    "cluster_answers",
    "equivalent",
    "extract_answer",
    "grade",
    "grade_text",
    "last_boxed",
    "strip_string",
]

# Answers longer than this are never handed to math-verify.
MAX_SYMBOLIC_CHARS = 200
# math-verify's own limit on one parse and on one comparison, in its worker process.
MATH_VERIFY_TIMEOUT_S = 3
# The most one symbolic call may take, its parses included: then its worker is killed.
SYMBOLIC_DEADLINE_S = 15.0

_BOX_COMMANDS = ("\\boxed", "\\fbox")


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


def last_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in *text*.

    Braces are counted, so nested groups survive (``\\boxed{\\frac{1}{2}}`` gives
    ``\\frac{1}{2}``). The space form ``\\boxed 5`` yields the text after the command up to the
    next ``$``. Unbalanced braces, or a command followed by neither a brace nor a space, give
    ``None``.
    """
    if not text:
        return None
    start = -1
    command = ""
    for cmd in _BOX_COMMANDS:
        idx = text.rfind(cmd)
        while idx != -1 and _continues_name(text, idx + len(cmd)):
            idx = text.rfind(cmd, 0, idx)
        if idx > start:
            start, command = idx, cmd
    if start == -1:
        return None
    pos = start + len(command)
    if pos < len(text) and text[pos] == "{":
        depth = 0
        for i in range(pos, len(text)):
            ch = text[i]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[pos + 1 : i]
        return None
    if pos < len(text) and text[pos] == " ":
        rest = text[pos + 1 :].lstrip(" ")
        if rest.startswith("{"):
            # "\boxed {5}": treat as the brace form.
            return last_boxed(command + rest)
        content = rest.split("$", 1)[0].strip()
        return content or None
    return None


def _continues_name(text: str, pos: int) -> bool:
    """True when the command at *pos* is really a longer name (``\\boxedx``)."""
    return pos < len(text) and text[pos].isalpha()


_HOPE_RE = re.compile(r"\.?\s*I hope it is correct\.?\s*$", re.IGNORECASE)
_GSM8K_RE = re.compile(r"####\s*(-?[$0-9.,]+)")
# "the answer is X", "final answer is: X"; "Answer: X" / "**Final Answer:** X" at the start of a line
_ANSWER_PHRASE_RE = re.compile(
    r"answer\s+is\b\s*:?|^[ \t]*(?:[*#_]+[ \t]*)?(?:final[ \t]+)?answer[ \t]*(?:[*_]+[ \t]*)?:(?:[ \t]*[*_]+)?",
    re.IGNORECASE | re.MULTILINE,
)
# "not 5", "that ...", "to be found": prose after "the answer is", not an answer
_NOT_AN_ANSWER_RE = re.compile(
    r"(?:not|that|to|whether|because|if|as follows|below|above|unknown|correct|incorrect|right|wrong|valid"
    r"|reasonable|consistent)\b|(?:a|an|the)\s+[a-z]",
    re.IGNORECASE,
)
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")
_PROSE_GOES_ON_RE = re.compile(r",\s+(?=[a-z]{2,}\b)")
# fenced code blocks: ```lang\n ... ``` (an unclosed fence runs to the end of the text)
_FENCE_RE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CODE_LANGS = frozenset({"python", "py", "python3", "py3"})
_OUTPUT_LANGS = frozenset({"", "output", "text", "plaintext", "console", "stdout", "txt"})
# names whose final literal assignment states the answer (``result = 42`` as the last line)
_ANSWER_NAMES = frozenset({"answer", "ans", "result", "final_answer", "solution"})
_MAX_PHRASE_CHARS = 100


def extract_answer(text: str | None) -> str | None:
    """The final answer of a completion, or ``None`` when it states none.

    Order (text inside fenced Python code blocks is code, not a statement: it is skipped by the
    first three):

    1. the last ``\\boxed{}``/``\\fbox{}``;
    2. the last "answer is X" ("the final answer is X", Minerva style with a trailing "I hope it
       is correct." removed) or a line "Answer: X" (also "**Final Answer:** X"): X up to the end
       of its sentence, without ``$``/``\\(\\)``/bold/backticks; not taken when X reads as prose
       ("not 5", "that ...", "correct", "an integer", more than three words without a digit or
       LaTeX, over 100 characters); prose after a comma is cut ("5, but ..." gives 5);
    3. the last GSM8K ``#### X``;
    4. code (what a coder model often writes instead): a one-line output block (```` ```output````,
       a bare fence, ...) after the last Python block; else, in the last Python block, a final
       ``print(42)``, a final ``print(x)`` with ``x = 42`` the last binding of ``x`` at the top
       level, or a final ``answer = 42`` / ``result = 42`` (also ``ans``, ``final_answer``,
       ``solution``). Only numeric literals count: a printed expression or a computed variable
       states no answer (running the code is not extraction).

    There is deliberately no "last number in the text" fallback.
    """
    if not text:
        return None
    blocks = _fenced_blocks(text) if "```" in text else []
    prose = _mask_code(text, blocks) if blocks else text
    boxed = last_boxed(prose)
    if boxed is not None:
        boxed = boxed.strip()
        return boxed or None

    phrase = _answer_phrase(prose)
    if phrase is not None:
        return phrase

    hashes: list[str] = _GSM8K_RE.findall(prose)
    if hashes:
        ans = hashes[-1].replace(",", "").replace("$", "").rstrip(".")
        if ans and ans != "-":
            return ans
    return _code_answer(blocks) if blocks else None


def _answer_phrase(text: str) -> str | None:
    """X of the last "answer is X" / "Answer: X" in ``text`` (rules in :func:`extract_answer`)."""
    matches = list(_ANSWER_PHRASE_RE.finditer(text))
    if not matches:
        return None
    tail = text[matches[-1].end() :].strip()
    line = tail.split("\n", 1)[0].strip()
    line = _HOPE_RE.sub("", line).strip()
    for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if line.startswith(a):  # math: up to its closing delimiter
            close = line.find(b, len(a))
            return _clean_stated(line[: close + len(b)]) if close > 0 else None
    end = _SENTENCE_END_RE.search(line)
    if end is not None:
        line = line[: end.start()]
    more = _PROSE_GOES_ON_RE.search(line)  # "5, but that is wrong"
    if more is not None:
        line = line[: more.start()]
    return _clean_stated(line)


def _clean_stated(line: str) -> str | None:
    """A stated answer without its wrapping (``$``, ``\\(\\)``, ``\\[\\]``, bold, backticks),
    or None when it reads as prose rather than an answer."""
    line = line.strip().rstrip(".").strip()
    for _ in range(3):  # nested wrappers: **$42$**
        before = line
        for a, b in (("**", "**"), ("`", "`"), ("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(line) >= len(a) + len(b) and line.startswith(a) and line.endswith(b):
                line = line[len(a) : len(line) - len(b)].strip()
        line = line.rstrip(".").strip()
        if line == before:
            break
    if not line or line.startswith("`") or len(line) > _MAX_PHRASE_CHARS or _NOT_AN_ANSWER_RE.match(line):
        return None
    if not any(ch.isdigit() or ch in "\\^_{}=+-*/()[]" for ch in line) and len(line.split()) > 3:
        return None
    return line


def _fenced_blocks(text: str) -> list[tuple[str, bool, int, int, str]]:
    """(language, closed, start, end, content) of each fenced code block, in order (the last
    one is unclosed when a completion was cut off inside it)."""
    return [
        (m.group(1).lower(), m.group(0).endswith("```"), m.start(), m.end(), m.group(2))
        for m in _FENCE_RE.finditer(text)
    ]


def _mask_code(text: str, blocks: list[tuple[str, bool, int, int, str]]) -> str:
    """``text`` with every Python block blanked (same length), so its strings state nothing."""
    out = text
    for lang, _, start, end, _ in blocks:
        if lang in _CODE_LANGS:
            out = out[:start] + " " * (end - start) + out[end:]
    return out


def _code_answer(blocks: list[tuple[str, bool, int, int, str]]) -> str | None:
    """The answer a coder model's code blocks state (rules in :func:`extract_answer`)."""
    last_py = max((i for i, b in enumerate(blocks) if b[0] in _CODE_LANGS), default=None)
    if last_py is None:
        return None
    after = blocks[last_py + 1 :]
    if after:  # an output block after the code: what the model says it printed
        lang, closed, _, _, content = after[-1]
        lines = [x for x in content.strip().split("\n") if x.strip()]
        if closed and lang in _OUTPUT_LANGS and len(lines) == 1:
            label = _LABEL_RE.match(lines[0])  # "Result: 42"
            value = label.group(1) if label else lines[0]
            return None if _CODE_LIKE_RE.search(value) else _clean_stated(value)
        return None
    _, closed, _, _, code = blocks[last_py]
    return _literal_result(code) if closed else None  # a block cut off is no statement


def _literal_result(code: str) -> str | None:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    if not tree.body:
        return None
    literal: dict[str, str | None] = {}  # name -> its literal value, None once bound otherwise
    for stmt in tree.body[:-1]:
        _bind(stmt, literal, code)
    last = tree.body[-1]
    if isinstance(last, ast.Expr) and isinstance(last.value, ast.Call):
        call = last.value
        if isinstance(call.func, ast.Name) and call.func.id == "print" and len(call.args) == 1 and not call.keywords:
            arg = call.args[0]
            if isinstance(arg, ast.Name):
                return literal.get(arg.id)
            return _numeric_literal(arg, code)
        return None
    target = last.targets[0] if isinstance(last, ast.Assign) and len(last.targets) == 1 else None
    if isinstance(last, ast.Assign) and isinstance(target, ast.Name) and target.id.lower() in _ANSWER_NAMES:
        return _numeric_literal(last.value, code)
    return None


def _bind(stmt: ast.stmt, literal: dict[str, str | None], code: str) -> None:
    """Record the names ``stmt`` binds: a literal for ``x = 42`` at the top level, else None."""
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        literal[stmt.targets[0].id] = _numeric_literal(stmt.value, code)
        return
    for node in ast.walk(stmt):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            literal[node.id] = None
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            literal[node.name] = None


def _numeric_literal(node: ast.expr, code: str) -> str | None:
    """The source of an int/float literal (``-`` allowed), else None."""
    inner = node.operand if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) else node
    if not isinstance(inner, ast.Constant) or isinstance(inner.value, bool):
        return None
    if isinstance(inner.value, (int, float)):
        src = ast.get_source_segment(code, node)
        return src.replace("_", "") if src else str(inner.value)
    if isinstance(inner.value, str) and inner is node:  # print("42")
        value = inner.value.strip()
        return value if _NUMBER_TEXT_RE.fullmatch(value) else None
    return None


_NUMBER_TEXT_RE = re.compile(r"-?\d+(?:\.\d+)?")
_LABEL_RE = re.compile(r"[A-Za-z][A-Za-z ]*:\s*(.+)")
_CODE_LIKE_RE = re.compile(r"[A-Za-z_]\w*\s*\(|=|\bimport\b")


# ---------------------------------------------------------------------------------------------
# Hendrycks MATH normalisation
# ---------------------------------------------------------------------------------------------


def _fix_sqrt(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}`` (only a single bare character is wrapped)."""
    parts = s.split("\\sqrt")
    out = parts[0]
    for part in parts[1:]:
        if part and part[0] != "{":
            out += "\\sqrt{" + part[0] + "}" + part[1:]
        else:
            out += "\\sqrt" + part
    return out


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{72}`` -> ``\\frac{1}{72}``."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{"):
            out += part
            continue
        if len(part) < 2:
            return s
        num, den, rest = part[0], part[1], part[2:]
        if den == "{":
            out += "{" + num + "}" + den + rest
        else:
            out += "{" + num + "}{" + den + "}" + rest
    return out


def _fix_a_slash_b(s: str) -> str:
    """``3/4`` -> ``\\frac{3}{4}`` when both sides are plain integers."""
    pieces = s.split("/")
    if len(pieces) != 2:
        return s
    a, b = pieces
    try:
        ia, ib = int(a), int(b)
    except ValueError:
        return s
    if a != str(ia) or b != str(ib):
        return s
    return "\\frac{" + a + "}{" + b + "}"


def strip_string(s: str) -> str:
    """Hendrycks MATH answer normalisation (the eleven steps, in order)."""
    # 1. line breaks, thin spaces, doubled backslashes, tfrac/dfrac
    s = s.replace("\n", "").replace("\\!", "")
    s = s.replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    # 2. sizing commands, degrees, escaped dollars
    for junk in ("\\left", "\\right", "^{\\circ}", "^\\circ", "\\$"):
        s = s.replace(junk, "")
    # 3. units on the right
    if "\\text{ " in s:
        s = s.split("\\text{ ", 1)[0]
    # 4. percent signs
    s = s.replace("\\%", "").replace("%", "")
    # 5. leading zeros for bare decimals
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    # 6. short "k = " prefixes
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        s = sides[1]
    # 7. \sqrt3
    s = _fix_sqrt(s)
    # 8. spaces
    s = s.replace(" ", "")
    # 9. \frac12
    s = _fix_fracs(s)
    # 10. the one decimal the MATH answers spell as a fraction
    if s == "0.5":
        s = "\\frac{1}{2}"
    # 11. a/b
    return _fix_a_slash_b(s)


# ---------------------------------------------------------------------------------------------
# math-verify access (lazy; in worker processes where its timeouts apply)
# ---------------------------------------------------------------------------------------------

_mv_lock = threading.Lock()
_mv_module: Any = None


class _NoTimeoutNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


def _math_verify() -> Any:
    """Import math-verify once; ``None`` when it is unavailable."""
    global _mv_module
    if _mv_module is not None:
        return _mv_module or None
    with _mv_lock:
        if _mv_module is None:
            try:
                import math_verify  # deliberately lazy

                notice = _NoTimeoutNotice()
                for name in ("math_verify.parser", "math_verify.grader", "math_verify.utils"):
                    logging.getLogger(name).addFilter(notice)
                _mv_module = math_verify
            except Exception:  # pragma: no cover - depends on the environment
                _mv_module = False
    return _mv_module or None


_EXP_GROUP_RE = re.compile(r"\^\s*\{")
_BARE_CHAINED_POWER_RE = re.compile(r"\^\s*[^{\s]\w*\s*\^")
_BIG_EXPONENT_RE = re.compile(r"\^\s*\{?\s*\d{6,}")
_FACTORIAL_RE = re.compile(r"(\d{5,}|[)}\]])\s*!")
_LONG_NUMBER_RE = re.compile(r"\d{400,}")


def _too_risky(ans: str) -> bool:
    """Answers math-verify could spend unbounded time on (no timeouts protect it here)."""
    if len(ans) > MAX_SYMBOLIC_CHARS:
        return True
    if _BARE_CHAINED_POWER_RE.search(ans) or _BIG_EXPONENT_RE.search(ans):
        return True
    if _FACTORIAL_RE.search(ans) or _LONG_NUMBER_RE.search(ans):
        return True
    for m in _EXP_GROUP_RE.finditer(ans):
        group = _brace_group(ans, m.end() - 1)
        if group is None or "^" in group or "!" in group:
            return True
    return False


def _brace_group(s: str, open_idx: int) -> str | None:
    depth = 0
    for i in range(open_idx, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return s[open_idx + 1 : i]
    return None


def _as_latex(ans: str) -> str:
    """Wrap a bare answer so math-verify's LaTeX extraction sees it."""
    inner = ans.strip().strip("$").strip()
    return "$" + inner + "$"


_log = logging.getLogger(__name__)
# in a worker process (its main thread): math-verify's signal-based timeouts apply
_IN_WORKER = False


@lru_cache(maxsize=8192)
def _parsed(ans: str) -> tuple[Any, ...]:
    """math-verify parse of one answer (empty when unparseable, risky or unavailable)."""
    if _too_risky(ans):
        return ()
    mv = _math_verify()
    if mv is None:
        return ()
    try:
        timeout = MATH_VERIFY_TIMEOUT_S if _IN_WORKER else None
        return tuple(mv.parse(_as_latex(ans), parsing_timeout=timeout))
    except Exception:
        return ()


def _key_here(ans: str) -> str | None:
    """The string of math-verify's sympy object of ``ans`` (None: unparseable)."""
    parsed = _parsed(ans)
    if parsed and not isinstance(parsed[0], str):
        return str(parsed[0]) or None
    return None


def _equal_here(a: str, b: str) -> bool:
    """math-verify ``verify(gold=a, pred=b)`` in this process."""
    gold, pred = _parsed(a), _parsed(b)
    if not gold or not pred:
        return False
    mv = _math_verify()
    if mv is None:
        return False
    timeout = MATH_VERIFY_TIMEOUT_S if _IN_WORKER else None
    return bool(mv.verify(list(gold), list(pred), timeout_seconds=timeout))


_OPS: dict[str, Callable[..., Any]] = {"key": _key_here, "equal": _equal_here}


def _serve(conn: Any) -> None:
    """A worker process's loop: (op, args) in, the result (None on failure) out."""
    global _IN_WORKER
    _IN_WORKER = True
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # its timeouts are expected here
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            result = _OPS[op](*args)
        except Exception:
            result = None
        try:
            conn.send(result)
        except (EOFError, OSError):
            return


class _Worker:
    def __init__(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # nothing of the caller's state (engines, threads) is copied
        self.conn, child = ctx.Pipe()
        try:
            self.proc = ctx.Process(target=_serve, args=(child,), daemon=True, name="ttscale-math-verify")
            self.proc.start()
        except BaseException:
            self.conn.close()
            raise
        finally:
            child.close()

    def ask(self, op: str, args: tuple[Any, ...], deadline: float) -> Any:
        self.conn.send((op, args))
        if not self.conn.poll(deadline):
            raise TimeoutError(f"math-verify {op} of {args!r} ran past {deadline} s")
        return self.conn.recv()

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.join(5)
            self.conn.close()
        except Exception:  # already gone
            pass


class _Symbolic:
    """The math-verify workers: a call takes an idle one (or starts one, up to the limit)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._slots: threading.BoundedSemaphore | None = None
        self._size = -1
        self.killed = 0  # workers stopped: past their deadline, or dead
        self.broken = False  # workers cannot exist here (a daemonic process): calls run in the caller's thread

    def size(self) -> int:
        try:
            return max(0, int(os.environ.get("TTSCALE_SYMBOLIC_WORKERS", "2")))
        except ValueError:
            return 2

    def call(self, op: str, *args: Any) -> Any:
        """The op's result; None (compare by key) when no worker answered within the deadline."""
        size = self.size()
        if size == 0 or self.broken:
            return _OPS[op](*args)
        with self._lock:
            if self._slots is None or size != self._size:
                self._slots, self._size = threading.BoundedSemaphore(size), size
            slots = self._slots
        # every worker busy (other callers' slow comparisons): wait no longer than one deadline
        if not slots.acquire(timeout=SYMBOLIC_DEADLINE_S):
            _log.warning("no math-verify worker free within %s s: comparing by key", SYMBOLIC_DEADLINE_S)
            return None
        try:
            with self._lock:
                worker = self._idle.pop() if self._idle else None
            if worker is None:
                try:
                    worker = _Worker()
                except AssertionError as e:  # "daemonic processes are not allowed to have children"
                    _log.warning("math-verify workers cannot start (%s): comparing in-process, without timeouts", e)
                    self.broken = True
                    return _OPS[op](*args)
                except Exception as e:  # out of processes or descriptors: this call by key, the next tries again
                    _log.warning("math-verify worker did not start (%s): comparing by key", e)
                    return None
            try:
                result = worker.ask(op, args, SYMBOLIC_DEADLINE_S)
            except Exception as e:
                worker.kill()
                with self._lock:
                    self.killed += 1
                _log.warning("math-verify worker stopped: %s", e)
                return None
            with self._lock:
                self._idle.append(worker)
            return result
        finally:
            slots.release()


_SYMBOLIC = _Symbolic()


def symbolic_workers() -> int:
    """How many math-verify comparisons may run at once (``TTSCALE_SYMBOLIC_WORKERS``, default 2;
    0: in the calling thread). Callers with many independent answer sets (an eval report's
    problems) cluster that many sets at once from threads."""
    return _SYMBOLIC.size()


def _symbolic_key(ans: str) -> str | None:  # (cached by its one caller, answer_key)
    if _too_risky(ans):
        return None
    key = _SYMBOLIC.call("key", ans)
    return key if isinstance(key, str) else None


def _symbolic_equal(a: str, b: str) -> bool:
    if _too_risky(a) or _too_risky(b):
        return False
    return _SYMBOLIC.call("equal", a, b) is True


# ---------------------------------------------------------------------------------------------
# Canonical keys
# ---------------------------------------------------------------------------------------------

_INT_RE = re.compile(r"[+-]?\d+")
_GROUPED_INT_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+")
_DEC_RE = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
_SLASH_RE = re.compile(r"([+-]?)(\d+)\s*/\s*(\d+)")
_FRAC_RE = re.compile(r"([+-]?)\\[dt]?frac\s*(?:\{\s*(\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))")


def _fraction_key(value: Fraction) -> str:
    """Same spelling as ``str`` of the sympy Integer/Rational: ``51``, ``-1/2``."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{value.numerator}/{value.denominator}"


def _numeric_value(ans: str) -> Fraction | None:
    """Exact value of a plain integer, decimal or simple fraction; ``None`` otherwise."""
    s = ans.strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s[1:-1].strip()
    if not s or len(s) > 60:
        return None
    if _INT_RE.fullmatch(s):
        return Fraction(int(s))
    if _GROUPED_INT_RE.fullmatch(s):
        return Fraction(int(s.replace(",", "")))
    if _DEC_RE.fullmatch(s):
        return Fraction(s)
    m = _SLASH_RE.fullmatch(s) or _FRAC_RE.fullmatch(s)
    if m:
        groups = [g for g in m.groups()[1:] if g is not None]
        num, den = int(groups[0]), int(groups[1])
        if den == 0:
            return None
        value = Fraction(num, den)
        return -value if m.group(1) == "-" else value
    return None


@lru_cache(maxsize=65536)
def answer_key(ans: str) -> str:
    """Canonical vote key of an extracted answer.

    Integers, decimals and simple fractions map to their exact value (``"051"``, ``"51.0"`` and
    ``"\\frac{102}{2}"`` all give ``"51"``; ``"0.5"`` gives ``"1/2"``). Other answers use the
    string of math-verify's sympy object, and fall back to :func:`strip_string`.
    """
    try:
        value = _numeric_value(ans)
        if value is not None:
            return _fraction_key(value)
        key = _symbolic_key(ans)
        if key:
            return key
    except Exception:
        pass
    try:
        return strip_string(ans)
    except Exception:
        return ans.strip()


# ---------------------------------------------------------------------------------------------
# Equivalence, clustering, grading
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=65536)
def _is_integer(ans: str) -> bool:
    """A plain integer (``51``, ``-3``, ``1,000``, ``$7$``, ``51.0``, ``\\frac{102}{2}``)."""
    value = _numeric_value(ans)
    return value is not None and value.denominator == 1


@lru_cache(maxsize=65536)
def equivalent(a: str | None, b: str | None) -> bool:
    """Whether answer *b* matches gold answer *a* (math-verify ``verify(gold, pred)``).

    Equal canonical keys match immediately. Long or risky answers, and comparisons math-verify
    does not finish in time, are compared by key only. Safe to call from any thread; never raises.
    """
    try:
        if a is None or b is None:
            return False
        if answer_key(a) == answer_key(b):
            return True
        if _is_integer(a) and _is_integer(b):  # two different integers: no parse needed
            return False
        return _symbolic_equal(a, b)
    except Exception:
        return False


class AnswerClusters:
    """Incremental :func:`cluster_answers`: add answers one at a time (as samples finish) and
    read the clusters at any point, for the cost of comparing each new distinct answer with the
    ones before it, instead of re-clustering everything at every sample.

    Same partition and numbering as :func:`cluster_answers` of the answers added so far. Not
    thread-safe: one request's samples are added from one place.
    """

    def __init__(self) -> None:
        self.answers: list[str | None] = []
        self._keys: list[str | None] = []
        self._index: dict[str, int] = {}  # key -> position among the distinct keys
        self._texts: list[str] = []  # first answer text of each distinct key
        self._parent: list[int] = []
        self._all_integers = True  # every distinct answer so far is a plain integer

    def is_cheap(self, answer: str | None) -> bool:
        """Whether :meth:`add` of ``answer`` needs no math-verify work (an answerless sample, or
        an integer among integers): then it costs microseconds, fine on an event loop."""
        if answer is None or not str(answer).strip():
            return True
        return self._all_integers and _is_integer(str(answer).strip())

    def __len__(self) -> int:
        return len(self.answers)

    def _find(self, i: int) -> int:
        parent = self._parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def add(self, answer: str | None) -> None:
        self.answers.append(answer)
        text = None if answer is None or not str(answer).strip() else str(answer).strip()
        key = None if text is None else answer_key(text)
        self._keys.append(key)
        if text is None or key is None or key in self._index:
            return
        j = len(self._texts)
        self._index[key] = j
        self._all_integers = self._all_integers and _is_integer(text)
        self._texts.append(text)
        self._parent.append(j)
        for i in range(j):
            ri, rj = self._find(i), self._find(j)
            if ri == rj:
                continue
            a, b = self._texts[i], text
            if equivalent(a, b) or equivalent(b, a):
                self._parent[max(ri, rj)] = min(ri, rj)

    def extend(self, answers: Sequence[str | None]) -> AnswerClusters:
        for a in answers:
            self.add(a)
        return self

    def ids(self) -> list[int | None]:
        """Cluster id per answer (``None``: answerless), numbered by first appearance."""
        ids: dict[int, int] = {}
        out: list[int | None] = []
        for key in self._keys:
            if key is None:
                out.append(None)
                continue
            root = self._find(self._index[key])
            if root not in ids:
                ids[root] = len(ids)
            out.append(ids[root])
        return out

    def counts(self) -> list[int]:
        """Votes per cluster, largest first."""
        votes: dict[int, int] = {}
        for key in self._keys:
            if key is not None:
                root = self._find(self._index[key])
                votes[root] = votes.get(root, 0) + 1
        return sorted(votes.values(), reverse=True)


def cluster_answers(answers: Sequence[str | None]) -> list[int | None]:
    """Cluster id per sample; ``None`` for answerless samples.

    Samples with equal :func:`answer_key` share a cluster; distinct keys are merged when
    :func:`equivalent` holds in either direction (the relation is closed transitively). Ids are
    numbered 0, 1, 2, ... in order of first appearance.
    """
    return AnswerClusters().extend(answers).ids()


def _as_int(s: str) -> int | None:
    t = s.strip()
    if len(t) >= 2 and t[0] == "$" and t[-1] == "$":
        t = t[1:-1].strip()
    t = t.replace(",", "") if _GROUPED_INT_RE.fullmatch(t) else t
    if _INT_RE.fullmatch(t):
        return int(t)
    return None


def grade(pred_text_or_answer: str | None, gold: str) -> bool:
    """Offline grading of a prediction against the gold answer (gold first).

    A prediction that still contains ``\\boxed{}`` is reduced to its boxed content. Integers
    compare as integers (``"051"`` matches ``"51"``); everything else uses :func:`equivalent`.
    """
    try:
        if pred_text_or_answer is None or gold is None:
            return False
        pred = pred_text_or_answer
        if any(cmd in pred for cmd in _BOX_COMMANDS):
            boxed = last_boxed(pred)
            if boxed is None:
                return False
            pred = boxed
        pred = pred.strip()
        if not pred:
            return False
        gi, pi = _as_int(str(gold)), _as_int(pred)
        if gi is not None and pi is not None:
            return gi == pi
        return equivalent(str(gold).strip(), pred)
    except Exception:
        return False


def grade_text(text: str | None, gold: str) -> bool:
    """Grade a whole completion: ``grade(extract_answer(text), gold)``."""
    return grade(extract_answer(text), gold)
