"""Evaluate static IR expressions (config values, module params) to Python scalars."""

from __future__ import annotations

import math
from collections.abc import Callable

from dslc.ir.nodes import BinE, CondE, Const, E, ListE, Ref, UnE

Scalar = int | float | bool | str | None

# The one-argument functions of build-time expressions, as Python's (`int` truncates; floor and ceil give ints;
# `len` counts a list's items).
STATIC_UNARY = ("int", "float", "log", "sqrt", "floor", "ceil", "len")


class EvalError(Exception):
    """A static expression could not be evaluated; the message says why (no location: callers add it)."""


def _num(v: Scalar, op: str) -> int | float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise EvalError(f"`{op}` needs numbers, got {_describe(v)}")
    return v


def _describe(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return f"bool `{str(v).lower()}`"
    if isinstance(v, list):
        return "a list"
    return f"{type(v).__name__} `{v}`"


def _binary(op: str, a, b):
    if op == "and":
        return bool(a) and bool(b)
    if op == "or":
        return bool(a) or bool(b)
    if op in ("==", "!="):
        return (a == b) if op == "==" else (a != b)
    if op in ("in", "not in"):
        if not isinstance(b, list):
            raise EvalError(f"`{op}` needs a list on its right, got {_describe(b)}")
        return (a in b) == (op == "in")
    x, y = _num(a, op), _num(b, op)
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    if op in ("/", "//", "%") and y == 0:
        raise EvalError("division by zero")
    if op == "/":
        return x / y
    if op == "//":
        return x // y
    if op == "%":
        return x % y
    if op == "**":
        if abs(y) > 1024 or (isinstance(x, int) and isinstance(y, int) and abs(x) > 1 and y > 64):
            raise EvalError("exponent too large")
        if x == 0 and y < 0:
            raise EvalError("division by zero")
        try:
            result = x**y
        except OverflowError:
            raise EvalError("result is not finite") from None
        if isinstance(result, complex):
            raise EvalError(f"`{x} ** {y}` is not a real number")
        return result
    if op == "<":
        return x < y
    if op == "<=":
        return x <= y
    if op == ">":
        return x > y
    if op == ">=":
        return x >= y
    raise EvalError(f"operator `{op}` is not allowed in a static expression")


def evaluate(e: E, lookup: Callable[[Ref], Scalar]):
    """Evaluate `e`; `lookup` resolves names (and raises EvalError for unknown ones)."""
    if isinstance(e, Const):
        return e.value
    if isinstance(e, Ref):
        return lookup(e)
    if isinstance(e, BinE):
        if e.op == "and":
            return bool(evaluate(e.left, lookup)) and bool(evaluate(e.right, lookup))
        if e.op == "or":
            return bool(evaluate(e.left, lookup)) or bool(evaluate(e.right, lookup))
        if e.op == "[]":
            seq, i = evaluate(e.left, lookup), evaluate(e.right, lookup)
            if not isinstance(seq, list):
                raise EvalError(f"`[]` needs a list, got {_describe(seq)}")
            if isinstance(i, bool) or not isinstance(i, int):
                raise EvalError(f"a list index must be an int, got {_describe(i)}")
            if not -len(seq) <= i < len(seq):
                raise EvalError(f"index {i} is out of range for a list of {len(seq)}")
            return seq[i]
        result = _binary(e.op, evaluate(e.left, lookup), evaluate(e.right, lookup))
        if isinstance(result, float) and not math.isfinite(result):
            raise EvalError("result is not finite")
        if isinstance(result, int) and abs(result) > 1 << 62:
            raise EvalError("integer too large")
        return result
    if isinstance(e, UnE):
        v = evaluate(e.operand, lookup)
        if e.op == "not":
            return not v
        if e.op == "len":
            if not isinstance(v, (list, str)):
                raise EvalError(f"`len()` needs a list, got {_describe(v)}")
            return len(v)
        if e.op in STATIC_UNARY:
            v = _num(v, e.op)
            if isinstance(v, float) and not math.isfinite(v):
                raise EvalError(f"`{e.op}()` of a value that is not finite")
            if e.op == "log" and v <= 0:
                raise EvalError(f"`log({v})`: the logarithm needs a positive number")
            if e.op == "sqrt" and v < 0:
                raise EvalError(f"`sqrt({v})`: the square root needs a number >= 0")
            return {"int": int, "float": float, "log": math.log, "sqrt": math.sqrt, "floor": math.floor}.get(
                e.op, math.ceil
            )(v)
        return -_num(v, "-")
    if isinstance(e, CondE):
        return evaluate(e.then, lookup) if evaluate(e.test, lookup) else evaluate(e.orelse, lookup)
    if isinstance(e, ListE):
        return [evaluate(i, lookup) for i in e.items]
    raise EvalError(f"cannot evaluate {type(e).__name__}")


def free_refs(e: E) -> list[Ref]:
    """Every Ref in `e`, in order."""
    if isinstance(e, Ref):
        return [e]
    if isinstance(e, BinE):
        return free_refs(e.left) + free_refs(e.right)
    if isinstance(e, UnE):
        return free_refs(e.operand)
    if isinstance(e, CondE):
        return free_refs(e.then) + free_refs(e.test) + free_refs(e.orelse)
    if isinstance(e, ListE):
        return [r for i in e.items for r in free_refs(i)]
    return []
