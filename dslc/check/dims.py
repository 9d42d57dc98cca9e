"""Symbolic tensor types: a dim is an int or a monomial of symbols (`B`, `B*T`, `2*T`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sym:
    """coef * product(names); an opaque expression is a single name such as `(T+S)`."""

    coef: int
    names: tuple[str, ...]

    @staticmethod
    def of(name: str) -> Sym:
        return Sym(1, (name,))

    def __str__(self) -> str:
        parts = ([str(self.coef)] if self.coef != 1 else []) + list(self.names)
        return "*".join(parts)


Dim = int | Sym


def dim_mul(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    if isinstance(a, int):
        a, b = b, a
    assert isinstance(a, Sym)
    if isinstance(b, int):
        return 0 if b == 0 else Sym(a.coef * b, a.names)
    return Sym(a.coef * b.coef, tuple(sorted(a.names + b.names)))


def dim_div(a: Dim, b: Dim) -> Dim | None:
    """Exact division, or None when the quotient is not a whole dim."""
    if isinstance(b, int):
        if b == 0:
            return None
        if isinstance(a, int):
            return a // b if a % b == 0 else None
        return _norm(Sym(a.coef // b, a.names)) if a.coef % b == 0 else None
    if isinstance(a, int):
        return None
    names = list(a.names)
    for n in b.names:
        if n not in names:
            return None
        names.remove(n)
    if a.coef % b.coef:
        return None
    return _norm(Sym(a.coef // b.coef, tuple(names)))


def dim_add(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    if isinstance(a, Sym) and isinstance(b, Sym) and a.names == b.names:
        return _norm(Sym(a.coef + b.coef, a.names))
    return Sym.of(f"({a}+{b})")


def _norm(d: Dim) -> Dim:
    if isinstance(d, Sym) and not d.names:
        return d.coef
    return d


def product(dims) -> Dim:
    out: Dim = 1
    for d in dims:
        out = dim_mul(out, d)
    return out


@dataclass(frozen=True)
class TType:
    """A tensor type: dims and dtype (`float` is the model's compute dtype)."""

    dims: tuple[Dim, ...]
    dtype: str

    def __str__(self) -> str:
        """`[B, T, num_key_value_heads * head_dim]`: a size computed from config fields prints as their expression."""
        dt = "" if self.dtype == "float" else f" {self.dtype}"
        return f"[{', '.join(dim_text(d) for d in self.dims)}]{dt}"

    @property
    def rank(self) -> int:
        return len(self.dims)


NONE_TYPE = "none"  # the type of an absent optional weight


_ATOM, _MUL, _ADD = 3, 2, 1


class NamedInt(int):
    """An int that remembers the config expression it was computed from (`num_key_value_heads * head_dim`).

    It compares, hashes and prints as the plain int, so checking is unchanged; codegen reads `.text` to write
    shape comments in config names instead of one instantiation's numbers."""

    text: str
    prec: int
    fields: dict  # the config fields the text names -> their values

    def __new__(cls, value: int, text: str, prec: int = _ATOM, fields: dict | None = None):
        obj = super().__new__(cls, value)
        obj.text, obj.prec = text, prec
        obj.fields = {text: value} if fields is None else fields
        return obj

    def _with(self, other, op: str, prec: int, value: int, swap: bool = False):
        if isinstance(other, bool) or not isinstance(other, int):
            return value
        if (
            not isinstance(other, NamedInt)
            and (other == 0 and op in "+-" or other == 1 and op in ("*", "//"))
            and not (swap and op in ("-", "//"))
        ):
            return self  # x + 0, x * 1, x // 1
        fields = {**getattr(other, "fields", {}), **self.fields}
        for name, v in fields.items():  # `heads * head_dim // heads` is `head_dim`: name the field itself
            if v == value and op in ("//", "-", "+"):  # never for `*`: `kv_heads * head_dim` with one kv head
                return NamedInt(value, name, _ATOM, {name: v})
        a, b = (other, self) if swap else (self, other)
        left = _text(a, prec)
        right = _text(b, prec + 1)  # a - (b - c), a // (b * c)
        return NamedInt(value, f"{left} {op} {right}", prec, fields)

    def __add__(self, o):
        return self._with(o, "+", _ADD, int(self) + o) if isinstance(o, int) else int(self) + o

    def __radd__(self, o):
        return self._with(o, "+", _ADD, o + int(self), swap=True) if isinstance(o, int) else o + int(self)

    def __sub__(self, o):
        return self._with(o, "-", _ADD, int(self) - o) if isinstance(o, int) else int(self) - o

    def __rsub__(self, o):
        return self._with(o, "-", _ADD, o - int(self), swap=True) if isinstance(o, int) else o - int(self)

    def __mul__(self, o):
        return self._with(o, "*", _MUL, int(self) * o) if isinstance(o, int) else int(self) * o

    def __rmul__(self, o):
        return self._with(o, "*", _MUL, o * int(self), swap=True) if isinstance(o, int) else o * int(self)

    def __floordiv__(self, o):
        return self._with(o, "//", _MUL, int(self) // o) if isinstance(o, int) else int(self) // o

    def __rfloordiv__(self, o):
        return self._with(o, "//", _MUL, o // int(self), swap=True) if isinstance(o, int) else o // int(self)


def _text(v: int, prec: int) -> str:
    if isinstance(v, NamedInt):
        return f"({v.text})" if v.prec < prec else v.text
    return str(v)


def dim_text(d) -> str:
    """A dim as written in a shape comment: its config expression when it has one."""
    return d.text if isinstance(d, NamedInt) else str(d)
