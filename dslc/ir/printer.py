"""Text form of IR expressions (and, in `print_program`, of a whole Program)."""

from __future__ import annotations

from dslc.ir import nodes as N

_PREC = {"or": 1, "and": 2, "==": 4, "!=": 4, "<": 4, "<=": 4, ">": 4, ">=": 4, "+": 5, "-": 5,
         "*": 6, "/": 6, "//": 6, "%": 6, "@": 6, "**": 8}


def _const(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, str):
        return "..." if v == "..." else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def expr_text(e: N.E, prec: int = 0) -> str:
    """Render an expression: values `%x`, params `$p`, config fields by name, symbols by name."""
    if isinstance(e, N.Const):
        return _const(e.value)
    if isinstance(e, N.Ref):
        return {"value": "%", "param": "$", "weight": "&"}.get(e.kind, "") + (
            f"dtype(%{e.name})" if e.kind == "dtype_of" else e.name)
    if isinstance(e, N.BinE):
        p = _PREC[e.op]
        right_p = p if e.op == "**" else p + 1
        text = f"{expr_text(e.left, p + (e.op == '**'))} {e.op} {expr_text(e.right, right_p)}"
        return f"({text})" if p < prec else text
    if isinstance(e, N.UnE):
        text = f"not {expr_text(e.operand, 3)}" if e.op == "not" else f"-{expr_text(e.operand, 7)}"
        return f"({text})" if prec > (3 if e.op == "not" else 7) else text
    if isinstance(e, N.CondE):
        text = f"{expr_text(e.then, 1)} if {expr_text(e.test, 1)} else {expr_text(e.orelse)}"
        return f"({text})" if prec > 0 else text
    if isinstance(e, N.ListE):
        return "[" + ", ".join(expr_text(i) for i in e.items) + "]"
    raise TypeError(type(e))
