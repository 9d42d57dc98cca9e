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
        dt = "" if self.dtype == "float" else f" {self.dtype}"
        return f"[{', '.join(str(d) for d in self.dims)}]{dt}"

    @property
    def rank(self) -> int:
        return len(self.dims)


NONE_TYPE = "none"  # the type of an absent optional weight
