"""The primitive ops and their shape/dtype rules. Layers are written in the DSL over these.

A rule takes the argument types (a `TType`, a Python scalar or list for build-time values, or
`NONE_TYPE` for an absent optional weight) and keyword values, and returns the result types or
raises `OpTypeError` with an error code and a message naming the numbers involved.
"""

from __future__ import annotations

from collections.abc import Callable

from dslc.check.dims import NONE_TYPE, Dim, Sym, TType, dim_add, dim_div, product
from dslc.ir import ops

FLOAT_DTYPES = ("float", "f32", "f16", "bf16", "f64")


class OpTypeError(Exception):
    def __init__(self, code: str, message: str, *help: str):
        super().__init__(message)
        self.code = code
        self.message = message
        self.help = tuple(h for h in help if h)


def _t(x, what: str) -> TType:
    if not isinstance(x, TType):
        raise OpTypeError("E041", f"{what} must be a tensor, got {_desc(x)}")
    return x


def _desc(x) -> str:
    if isinstance(x, TType):
        return f"a tensor {x}"
    if x == NONE_TYPE:
        return "an absent optional weight (none)"
    if x is None:
        return "`none`"
    if isinstance(x, bool):
        return f"`{str(x).lower()}`"
    if isinstance(x, str):
        return f"the string {x!r}"
    if isinstance(x, list):
        return f"the list `[{', '.join(str(i) for i in x)}]`"
    return f"`{x}`"


def _is_number(x) -> bool:
    """A build-time number or size symbol (a bool counts: torch takes it as 0 or 1)."""
    return isinstance(x, (int, float, Sym))


_SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**", "matmul": "@"}


def _dim_index(d, rank: int, what: str = "dim") -> int:
    if not isinstance(d, int) or isinstance(d, bool):
        raise OpTypeError("E041", f"{what} must be an int, got {_desc(d)}")
    if not -rank <= d < rank:
        raise OpTypeError("E031", f"{what} {d} is out of range for a rank-{rank} tensor")
    return d % rank


def _fmt(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def broadcast(a: TType, b: TType, opname: str) -> tuple[Dim, ...]:
    out = []
    da, db = a.dims[::-1], b.dims[::-1]
    for i in range(max(len(da), len(db))):
        x = da[i] if i < len(da) else 1
        y = db[i] if i < len(db) else 1
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise OpTypeError(
                "E030",
                f"`{opname}` of {a} and {b}: dim {x} does not match {y}",
                "shapes broadcast from the right: each pair of dims must be equal or 1",
            )
    return tuple(reversed(out))


def join_dtype(a: str, b: str, opname: str) -> str:
    if a == b:
        return a
    raise OpTypeError(
        "E032",
        f"`{opname}` mixes dtypes {a} and {b}",
        "cast one side: `cast(x, f32)` or `cast(x, y.dtype)`",
    )


def _elementwise(name: str):
    def rule(args, kw):
        if len(args) != 1:
            raise OpTypeError("E040", f"`{name}` takes 1 argument, got {len(args)}")
        if name == "identity" and not isinstance(args[0], TType) and args[0] != NONE_TYPE:
            return [args[0]]  # `s = 2.0 * k`: a build-time value copied into a variable stays build-time
        x = _t(args[0], f"`{name}`'s argument")
        if x.dtype not in FLOAT_DTYPES and name not in ("identity", "neg", "abs"):
            raise OpTypeError("E032", f"`{name}` needs a floating-point tensor, got {x.dtype}", "cast it first")
        return [x]

    return rule


def _binary(name: str):
    def rule(args, kw):
        if len(args) != 2:
            raise OpTypeError("E040", f"`{name}` takes 2 arguments, got {len(args)}")
        a, b = args
        if a == NONE_TYPE or b == NONE_TYPE:
            if name in ("add", "sub") and (a == NONE_TYPE) != (b == NONE_TYPE):
                other = b if a == NONE_TYPE else a
                if name == "sub" and a == NONE_TYPE:
                    raise OpTypeError("E041", "cannot subtract from an absent weight")
                return [other]
            raise OpTypeError("E041", f"`{name}` of an absent optional weight", "only `+` and `-` skip a none")
        for x in (a, b):
            if not isinstance(x, TType) and not _is_number(x):
                raise OpTypeError("E041", f"`{_SYMBOLS.get(name, name)}` needs tensors or numbers, got {_desc(x)}")
        if name == "matmul" and not (isinstance(a, TType) and isinstance(b, TType)):
            raise OpTypeError(
                "E041",
                f"`@` needs tensors on both sides, got {_desc(a)} and {_desc(b)}",
                "scale with `*`; `@` is a matrix product",
            )
        if not isinstance(a, TType):
            return [_t(b, "operand")]
        if not isinstance(b, TType):
            return [a]
        if name == "matmul":
            return _matmul(a, b)
        return [TType(broadcast(a, b, name), join_dtype(a.dtype, b.dtype, name))]

    return rule


def _matmul(a: TType, b: TType):
    if a.rank < 2 or b.rank < 2:
        raise OpTypeError("E031", f"`@` needs rank >= 2 on both sides, got {a} and {b}")
    if a.dims[-1] != b.dims[-2]:
        raise OpTypeError("E030", f"`@` of {a} and {b}: inner dims {a.dims[-1]} and {b.dims[-2]} differ")
    batch = broadcast(TType(a.dims[:-2], a.dtype), TType(b.dims[:-2], b.dtype), "@")
    return [TType(batch + (a.dims[-2], b.dims[-1]), join_dtype(a.dtype, b.dtype, "@"))]


def _where(args, kw):
    if len(args) != 3:
        raise OpTypeError("E040", f"`where` takes 3 arguments, got {len(args)}")
    c = _t(args[0], "`where`'s condition")
    if c.dtype != "bool":
        raise OpTypeError("E032", f"`where`'s condition must be bool, got {c.dtype}")
    for x in args[1:]:
        if not isinstance(x, TType) and not _is_number(x):
            raise OpTypeError("E041", f"`where`'s branches must be tensors or numbers, got {_desc(x)}")
    tensors = [x for x in args[1:] if isinstance(x, TType)]
    if not tensors:
        raise OpTypeError("E041", "`where` needs at least one tensor branch")
    dims = c.dims
    for t in tensors:
        dims = broadcast(TType(dims, "bool"), t, "where")
    dtype = tensors[0].dtype if len(tensors) == 1 else join_dtype(tensors[0].dtype, tensors[1].dtype, "where")
    return [TType(dims, dtype)]


def _reduction(name: str):
    def rule(args, kw):
        if len(args) != 1:
            raise OpTypeError("E040", f"`{name}` takes 1 tensor and `dim =`, got {len(args)} arguments")
        x = _t(args[0], f"`{name}`'s argument")
        dims = kw.get("dim", -1)
        dims = dims if isinstance(dims, list) else [dims]
        axes = {_dim_index(d, x.rank) for d in dims}
        keep = kw.get("keepdim", False)
        if not isinstance(keep, bool):
            raise OpTypeError("E041", f"`{name}`'s keepdim must be true or false, got {_desc(keep)}")
        out = tuple(1 if i in axes else d for i, d in enumerate(x.dims) if keep or i not in axes)
        return [TType(out, x.dtype)]

    return rule


def _softmax(name: str):
    def rule(args, kw):
        x = _t(args[0] if args else None, f"`{name}`'s argument")
        _dim_index(kw.get("dim", -1), x.rank)
        return [x]

    return rule


def _linear(args, kw):
    if len(args) not in (2, 3):
        raise OpTypeError("E040", f"`linear` takes (x, weight, bias), got {len(args)} arguments")
    x, w = _t(args[0], "`linear`'s input"), _t(args[1], "`linear`'s weight")
    if w.rank != 2:
        raise OpTypeError("E033", f"`linear`'s weight must be [out, in], got {w}")
    if x.rank < 1 or x.dims[-1] != w.dims[1]:
        raise OpTypeError(
            "E033",
            f"`linear` of input {x} with weight {w}: input width {x.dims[-1] if x.rank else '?'} "
            f"does not match weight in_features {w.dims[1]}",
        )
    if len(args) == 3 and args[2] not in (NONE_TYPE, None):
        b = _t(args[2], "`linear`'s bias")
        if b.dims != (w.dims[0],):
            raise OpTypeError("E033", f"`linear`'s bias must be [{w.dims[0]}], got {b}")
    return [TType(x.dims[:-1] + (w.dims[0],), join_dtype(x.dtype, w.dtype, "linear"))]


def _gather(args, kw):
    if len(args) != 2:
        raise OpTypeError("E040", f"`gather` takes (table, ids), got {len(args)} arguments")
    if set(kw) - {"padding_idx"}:
        raise OpTypeError("E040", f"`gather` takes only `padding_idx` as a keyword, got {', '.join(sorted(kw))}")
    table, ids = _t(args[0], "`gather`'s table"), _t(args[1], "`gather`'s ids")
    pad = kw.get("padding_idx")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int)):
        raise OpTypeError("E041", f"`gather`'s padding_idx must be an int or none, got {_desc(pad)}")
    if ids.dtype not in ("i64", "i32"):
        raise OpTypeError("E032", f"`gather`'s ids must be integers, got {ids.dtype}")
    if table.rank != 2:
        raise OpTypeError("E031", f"`gather`'s table must be rank 2, got {table}")
    rows = table.dims[0]
    if pad is not None and isinstance(rows, int) and not -rows <= pad < rows:
        raise OpTypeError("E041", f"`gather`'s padding_idx {pad} is not a row of the {rows}-row table")
    return [TType(ids.dims + (table.dims[1],), table.dtype)]


def _cast(args, kw):
    if len(args) != 2:
        raise OpTypeError("E040", "`cast` takes (x, dtype)")
    x = _t(args[0], "`cast`'s input")
    dtype = args[1]
    if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES + ("i64", "i32", "bool"):
        raise OpTypeError("E032", f"`cast` needs a dtype such as f32 or `x.dtype`, got {_desc(dtype)}")
    return [TType(x.dims, dtype)]


def _reshape(args, kw):
    if len(args) != 2 or not isinstance(args[1], list):
        raise OpTypeError("E040", "`reshape` takes (x, [dims])")
    x = _t(args[0], "`reshape`'s input")
    target = list(args[1])
    holes = [i for i, d in enumerate(target) if d == -1]
    if len(holes) > 1:
        raise OpTypeError("E034", "`reshape` allows one -1")
    for d in target:
        if isinstance(d, bool) or not isinstance(d, (int, Sym)) or (isinstance(d, int) and d < -1):
            raise OpTypeError("E034", f"`reshape` dims must be sizes, got {_desc(d)}")
    total = product(x.dims)
    known = product(d for d in target if d != -1)
    if holes:
        q = dim_div(total, known)
        if q is None:
            raise OpTypeError("E034", f"cannot reshape {x} into {_fmt(target)}: {total} is not divisible by {known}")
        target[holes[0]] = q
    elif _differ(total, known):
        raise OpTypeError(
            "E034",
            f"cannot reshape {x} ({total} elements) into {_fmt(target)} ({known} elements)",
            "a head split needs the width to equal heads * head_dim",
        )
    return [TType(tuple(target), x.dtype)]


def _comparable(a: Dim, b: Dim) -> bool:
    """Whether `a != b` proves two sizes differ: not for opaque sums (`(B+T)`), whose equality the monomial form
    cannot decide; `_differ` probes those instead."""
    return not any(isinstance(d, Sym) and any(n.startswith("(") for n in d.names) for d in (a, b))


def _differ(a: Dim, b: Dim) -> bool:
    """Whether two sizes differ for some value of their symbols: exact for monomials, and for opaque sums
    (`(B+T)*H` against `B*T*H`) by evaluating both at a few assignments of the symbols (sums and products of
    symbols are polynomials: two that agree at these probes are taken as equal)."""
    if _comparable(a, b):
        return a != b
    for probe in _PROBES:
        x, y = _value(a, probe), _value(b, probe)
        if x is None or y is None:
            return False  # not an expression of symbols we can read: undecided, so not an error
        if x != y:
            return True
    return False


_PROBES = ({}, {"B": 3, "T": 7}, {"B": 11, "T": 5})  # symbol values; others take a value from their name


def _value(d: Dim, probe: dict) -> int | None:
    import ast

    def sym(name: str) -> int:
        return probe.get(name, 13 + sum(ord(c) for c in name) % 17)

    def ev(node) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            return (
                left + right
                if isinstance(node.op, ast.Add)
                else left - right
                if isinstance(node.op, ast.Sub)
                else left * right
            )
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return sym(node.id)
        raise ValueError(node)

    try:
        return ev(ast.parse(str(d), mode="eval")) if isinstance(d, Sym) else int(d)
    except (ValueError, SyntaxError, TypeError):
        return None


def _transpose(args, kw):
    if len(args) != 3:
        raise OpTypeError("E040", "`transpose` takes (x, dim0, dim1)")
    x = _t(args[0], "`transpose`'s input")
    i, j = _dim_index(args[1], x.rank), _dim_index(args[2], x.rank)
    dims = list(x.dims)
    dims[i], dims[j] = dims[j], dims[i]
    return [TType(tuple(dims), x.dtype)]


def _unsqueeze(args, kw):
    x = _t(args[0] if args else None, "`unsqueeze`'s input")
    if len(args) != 2:
        raise OpTypeError("E040", "`unsqueeze` takes (x, dim)")
    d = _dim_index(args[1], x.rank + 1)
    dims = list(x.dims)
    dims.insert(d, 1)
    return [TType(tuple(dims), x.dtype)]


def _squeeze(args, kw):
    x = _t(args[0] if args else None, "`squeeze`'s input")
    d = _dim_index(args[1], x.rank)
    if x.dims[d] != 1:
        raise OpTypeError("E030", f"`squeeze` of dim {args[1]} of {x}: size is {x.dims[d]}, not 1")
    return [TType(x.dims[:d] + x.dims[d + 1 :], x.dtype)]


def _select(args, kw):
    """`select(x, dim, index)`: the slice at `index` along `dim`, which is removed (x[:, 0] for dim 1)."""
    if len(args) != 3:
        raise OpTypeError("E040", f"`select` takes (x, dim, index), got {len(args)} arguments")
    x = _t(args[0], "`select`'s input")
    d = _dim_index(args[1], x.rank)
    i = args[2]
    if not isinstance(i, int) or isinstance(i, bool):
        raise OpTypeError("E041", f"`select`'s index must be an int, got {_desc(i)}")
    size = x.dims[d]
    if isinstance(size, int) and not -size <= i < size:
        raise OpTypeError("E031", f"`select` index {i} is out of range for dim {args[1]} of {x} (size {size})")
    return [TType(x.dims[:d] + x.dims[d + 1 :], x.dtype)]


def _split_sizes(x: TType, sizes, dim: int, name: str):
    d = _dim_index(dim, x.rank)
    total = sizes[0]
    for s in sizes[1:]:
        total = dim_add(total, s)
    if _comparable(total, x.dims[d]) and total != x.dims[d]:
        raise OpTypeError(
            "E030", f"`{name}` sizes {_fmt(sizes)} add up to {total}, but dim {dim} of {x} is {x.dims[d]}"
        )
    return [TType(x.dims[:d] + (s,) + x.dims[d + 1 :], x.dtype) for s in sizes]


def _chunk(args, kw):
    if len(args) != 2:
        raise OpTypeError("E040", "`chunk` takes (x, n, dim = d)")
    x = _t(args[0], "`chunk`'s input")
    n = args[1]
    if not isinstance(n, int) or n < 1:
        raise OpTypeError("E041", f"`chunk` count must be a positive int, got {_desc(n)}")
    d = _dim_index(kw.get("dim", -1), x.rank)
    size = dim_div(x.dims[d], n)
    if size is None:
        raise OpTypeError("E034", f"`chunk` cannot split dim {x.dims[d]} of {x} into {n} equal parts")
    return [TType(x.dims[:d] + (size,) + x.dims[d + 1 :], x.dtype) for _ in range(n)]


def _split(args, kw):
    if len(args) != 2 or not isinstance(args[1], list):
        raise OpTypeError("E040", "`split` takes (x, [sizes], dim = d)")
    x = _t(args[0], "`split`'s input")
    for size in args[1]:
        if isinstance(size, bool) or not isinstance(size, (int, Sym)) or (isinstance(size, int) and size < 0):
            raise OpTypeError("E041", f"`split` sizes must be sizes, got {_desc(size)}")
    if not args[1]:
        raise OpTypeError("E040", "`split` needs at least one size")
    return _split_sizes(x, args[1], kw.get("dim", -1), "split")


def _concat(args, kw):
    tensors = [_t(a, "`concat`'s inputs") for a in args]
    if not tensors:
        raise OpTypeError("E040", "`concat` needs tensors")
    first = tensors[0]
    d = _dim_index(kw.get("dim", -1), first.rank)
    size = first.dims[d]
    for t in tensors[1:]:
        if t.rank != first.rank:
            raise OpTypeError("E031", f"`concat` of {first} and {t}: ranks differ")
        for i, (a, b) in enumerate(zip(first.dims, t.dims)):
            if i != d and a != b:
                raise OpTypeError("E030", f"`concat` of {first} and {t}: dim {i} differs ({a} vs {b})")
        join_dtype(first.dtype, t.dtype, "concat")
        size = dim_add(size, t.dims[d])
    return [TType(first.dims[:d] + (size,) + first.dims[d + 1 :], first.dtype)]


def _arange(args, kw):
    vals = list(args) + [1] * (3 - len(args)) if len(args) >= 2 else None
    if vals is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals[:3]):
        raise OpTypeError("E040", "`arange` takes build-time ints (start, end[, step])")
    start, end, step = vals[:3]
    if step <= 0 or end < start:
        raise OpTypeError("E034", f"`arange({start}, {end}, {step})` is empty or runs backwards")
    if start == 0 and end % step == 0:  # the common case, in a form shape comments can name: `dim // 2`
        return [TType((end // step,), "i64")]
    return [TType((max(0, (end - start + step - 1) // step),), "i64")]


def _constant(args, kw):
    if len(args) != 2 or kw:
        raise OpTypeError("E040", "`constant` takes (values, dtype): a build-time list of numbers and a dtype")
    values, dtype = args
    if not isinstance(values, list) or not values:
        raise OpTypeError("E041", f"`constant` needs a non-empty build-time list of numbers, got {_desc(values)}")
    bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))), None)
    if bad is not None:
        raise OpTypeError("E041", f"`constant`'s values must be numbers, got {_desc(bad)}")
    if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES + ("i64", "i32") or dtype == "float":
        raise OpTypeError("E032", f"`constant` needs a fixed dtype such as f32 or i64, got {_desc(dtype)}")
    return [TType((len(values),), dtype)]


def _attention(args, kw):
    if len(args) != 3:
        raise OpTypeError("E040", f"`attention` takes (q, k, v), got {len(args)} arguments")
    q, k, v = (_t(a, "`attention`'s inputs") for a in args)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.rank != 4:
            raise OpTypeError(
                "E031",
                f"`attention` needs {name} as [B, heads, T, head_dim], got {t}",
                "use split_heads(x, heads) first",
            )
    if q.dims[3] != k.dims[3]:
        raise OpTypeError("E030", f"`attention`: q head_dim {q.dims[3]} differs from k head_dim {k.dims[3]}")
    if k.dims[1] != v.dims[1] or k.dims[2] != v.dims[2]:
        raise OpTypeError("E030", f"`attention`: k {k} and v {v} disagree on heads or length")
    hq, hk = q.dims[1], k.dims[1]
    if isinstance(hq, int) and isinstance(hk, int) and hq % hk:
        raise OpTypeError(
            "E034",
            f"`attention`: {hq} query heads are not a multiple of {hk} key/value heads",
            "grouped-query attention shares each key/value head among a whole number of query heads",
        )
    join_dtype(q.dtype, k.dtype, "attention")
    join_dtype(q.dtype, v.dtype, "attention")
    for key in kw:
        if key not in ATTENTION_OPTIONS:
            raise OpTypeError("E040", f"`attention` has no option `{key}`", f"options: {', '.join(ATTENTION_OPTIONS)}")
    if "causal" not in kw:
        raise OpTypeError("E040", "`attention` needs `causal = true` or `causal = false`")
    if not isinstance(kw["causal"], bool):
        raise OpTypeError("E041", f"`attention`'s causal must be true or false, got {_desc(kw['causal'])}")
    window = kw.get("window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise OpTypeError("E041", f"`attention`'s window must be a positive int or none, got {_desc(window)}")
    for key in ("softcap", "scale"):
        v_ = kw.get(key)
        if v_ is not None and (isinstance(v_, bool) or not isinstance(v_, (int, float)) or not v_ > 0):
            raise OpTypeError("E041", f"`attention`'s {key} must be a positive number or none, got {_desc(v_)}")
    p = kw.get("dropout")
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1):
        raise OpTypeError("E041", f"`attention`'s dropout must be a probability from 0 to below 1, got {_desc(p)}")
    return [TType((q.dims[0], hq, q.dims[2], v.dims[3]), q.dtype)]


ATTENTION_OPTIONS = ("causal", "window", "softcap", "scale", "dropout")


def _rotate_half(args, kw):
    x = _t(args[0] if args else None, "`rotate_half`'s input")
    if len(args) != 1:
        raise OpTypeError("E040", "`rotate_half` takes (x)")
    if isinstance(x.dims[-1], int) and x.dims[-1] % 2:
        raise OpTypeError("E034", f"`rotate_half` needs an even last dim, got {x}")
    return [x]


def _dropout(args, kw):
    x = _t(args[0] if args else None, "`dropout`'s input")
    if len(args) > 2 or set(kw) - {"p"} or (len(args) == 2 and "p" in kw):
        raise OpTypeError("E040", "`dropout` takes (x, p) or (x, p = p)")
    p = args[1] if len(args) == 2 else kw.get("p", 0.0)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise OpTypeError("E041", f"`dropout`'s probability must be a number from 0 to 1, got {_desc(p)}")
    return [x]


def _topk(args, kw):
    x = _t(args[0] if args else None, "`topk`'s input")
    k = args[1] if len(args) > 1 else None
    if not isinstance(k, int) or isinstance(k, bool):
        raise OpTypeError("E040", "`topk` takes (x, k)")
    if k < 1:
        raise OpTypeError("E041", f"`topk`'s k must be a positive int, got {_desc(k)}")
    return [TType(x.dims[:-1] + (k,), x.dtype), TType(x.dims[:-1] + (k,), "i64")]


def _index_tensor(x, what: str) -> TType:
    t = _t(x, what)
    if t.dtype not in ("i64", "i32"):
        raise OpTypeError("E032", f"{what} must be integer indices, got {t.dtype}", "pass the indices `topk` returns")
    return t


def _same(a: Dim, b: Dim) -> bool:
    """Equal sizes, or sizes the checker cannot compare (as `reshape` holds element counts against each other)."""
    return a == b or not _comparable(a, b)


def _moe_dispatch(args, kw):
    """(x [N, H], experts [N, K] i64, num_experts) -> rows [N * K, H] grouped by expert, their slots [N * K] i64
    (slot n * K + k: token n's k-th choice), tokens per expert [num_experts] i64."""
    if len(args) != 3 or kw:
        raise OpTypeError("E040", "`moe_dispatch` takes (x, experts, num_experts)")
    x = _t(args[0], "`moe_dispatch`'s tokens")
    idx = _index_tensor(args[1], "`moe_dispatch`'s experts")
    e = args[2]
    if isinstance(e, bool) or not isinstance(e, (int, Sym)) or (isinstance(e, int) and e < 1):
        raise OpTypeError("E041", f"`moe_dispatch`'s num_experts must be a positive int, got {_desc(e)}")
    if x.rank != 2 or idx.rank != 2:
        raise OpTypeError(
            "E031",
            f"`moe_dispatch` takes tokens [N, hidden] and experts [N, k], got {x} and {idx}",
            "flatten the batch first: `reshape(x, [-1, hidden_size])`",
        )
    if not _same(x.dims[0], idx.dims[0]):
        raise OpTypeError("E030", f"`moe_dispatch`: {x.dims[0]} tokens but experts for {idx.dims[0]}")
    slots = product(idx.dims)
    return [TType((slots, x.dims[1]), x.dtype), TType((slots,), "i64"), TType((e,), "i64")]


def _grouped_linear(args, kw):
    """(x [M, in], weight [E, out, in], counts [E] i64) -> [M, out]: rows counts[0] first times weight[0], ..."""
    if len(args) != 3 or kw:
        raise OpTypeError("E040", "`grouped_linear` takes (x, weight, counts)")
    x = _t(args[0], "`grouped_linear`'s input")
    w = _t(args[1], "`grouped_linear`'s weight")
    counts = _index_tensor(args[2], "`grouped_linear`'s counts")
    if x.rank != 2 or w.rank != 3 or counts.rank != 1:
        raise OpTypeError(
            "E033",
            f"`grouped_linear` takes rows [M, in], a stacked weight [E, out, in] and counts [E], got {x}, {w} and "
            f"{counts}",
        )
    if x.dims[1] != w.dims[2]:
        raise OpTypeError(
            "E033",
            f"`grouped_linear` of rows {x} with weight {w}: row width {x.dims[1]} does not match in_features "
            f"{w.dims[2]}",
        )
    if not _same(w.dims[0], counts.dims[0]):
        raise OpTypeError(
            "E033", f"`grouped_linear`: weight {w} has {w.dims[0]} experts, counts {counts} has {counts.dims[0]}"
        )
    return [TType((x.dims[0], w.dims[1]), join_dtype(x.dtype, w.dtype, "grouped_linear"))]


def _moe_combine(args, kw):
    """(rows [N * K, H], slots [N * K] i64, weights [N, K]) -> [N, H], in the rows' dtype."""
    if len(args) != 3 or kw:
        raise OpTypeError("E040", "`moe_combine` takes (rows, slots, weights)")
    ys = _t(args[0], "`moe_combine`'s rows")
    slots = _index_tensor(args[1], "`moe_combine`'s slots")
    w = _t(args[2], "`moe_combine`'s weights")
    if ys.rank != 2 or slots.rank != 1 or w.rank != 2:
        raise OpTypeError(
            "E031",
            f"`moe_combine` takes rows [N * k, hidden], slots [N * k] and weights [N, k], got {ys}, {slots}, {w}",
        )
    if w.dtype not in FLOAT_DTYPES:
        raise OpTypeError("E032", f"`moe_combine`'s weights must be floating point, got {w.dtype}")
    n = product(w.dims)
    if not (_same(ys.dims[0], n) and _same(slots.dims[0], n)):
        raise OpTypeError(
            "E030", f"`moe_combine`: {ys.dims[0]} rows and {slots.dims[0]} slots for weights {w} ({n} slots)"
        )
    return [TType((w.dims[0], ys.dims[1]), ys.dtype)]


def _int_option(kw: dict, key: str, default: int, op: str, low: int) -> int:
    value = kw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise OpTypeError("E041", f"`{op}`'s {key} must be an int >= {low}, got {_desc(value)}")
    return value


def _window_out(size: Dim, kernel: int, stride: int, padding: int, op: str, x: TType) -> Dim:
    """Output size of a sliding window over `size`: (size + 2 padding - kernel) // stride + 1."""
    if isinstance(size, int):
        out = (size + 2 * padding - kernel) // stride + 1
        if out < 1:
            raise OpTypeError("E031", f"`{op}`: a window of {kernel} does not fit in {x} (padding {padding})")
        return out
    if kernel == stride and padding == 0:  # patches: exact when the size divides
        out = dim_div(size, kernel)
        if out is not None:
            return out
    raise OpTypeError(
        "E041",
        f"`{op}` over the symbolic size {size} of {x}: its output size is unknown",
        "declare the image size with config fields ([B, num_channels, image_size, image_size])",
    )


def _conv2d(args, kw):
    """`conv2d(x, weight, bias, stride = 1, padding = 0)`: [B, C, H, W] * [O, C, kh, kw] -> [B, O, H', W']."""
    if len(args) not in (2, 3) or set(kw) - {"stride", "padding"}:
        raise OpTypeError("E040", "`conv2d` takes (x, weight, bias, stride = s, padding = p)")
    x, w = _t(args[0], "`conv2d`'s input"), _t(args[1], "`conv2d`'s weight")
    if x.rank != 4:
        raise OpTypeError("E031", f"`conv2d` needs images as [B, C, H, W], got {x}")
    if w.rank != 4 or not all(isinstance(d, int) for d in w.dims[2:]):
        raise OpTypeError("E033", f"`conv2d`'s weight must be [out, in, kh, kw] with known kh, kw, got {w}")
    if x.dims[1] != w.dims[1]:
        raise OpTypeError(
            "E033", f"`conv2d` of {x} with weight {w}: {x.dims[1]} channels, the weight takes {w.dims[1]}"
        )
    if len(args) == 3 and args[2] not in (NONE_TYPE, None):
        b = _t(args[2], "`conv2d`'s bias")
        if b.dims != (w.dims[0],):
            raise OpTypeError("E033", f"`conv2d`'s bias must be [{w.dims[0]}], got {b}")
    stride = _int_option(kw, "stride", 1, "conv2d", 1)
    padding = _int_option(kw, "padding", 0, "conv2d", 0)
    h, wd = (_window_out(d, k, stride, padding, "conv2d", x) for d, k in zip(x.dims[2:], w.dims[2:]))
    return [TType((x.dims[0], w.dims[0], h, wd), join_dtype(x.dtype, w.dtype, "conv2d"))]


def _max_pool2d(args, kw):
    """`max_pool2d(x, kernel, stride = kernel, padding = 0)` over the last two dims of [B, C, H, W]."""
    if len(args) != 2 or set(kw) - {"stride", "padding"}:
        raise OpTypeError("E040", "`max_pool2d` takes (x, kernel, stride = s, padding = p)")
    x = _t(args[0], "`max_pool2d`'s input")
    if x.rank != 4:
        raise OpTypeError("E031", f"`max_pool2d` needs [B, C, H, W], got {x}")
    kernel = _int_option({"kernel": args[1]}, "kernel", 1, "max_pool2d", 1)
    stride = _int_option(kw, "stride", kernel, "max_pool2d", 1)
    padding = _int_option(kw, "padding", 0, "max_pool2d", 0)
    if 2 * padding > kernel:
        raise OpTypeError("E041", f"`max_pool2d`'s padding {padding} is more than half its kernel {kernel}")
    h, wd = (_window_out(d, kernel, stride, padding, "max_pool2d", x) for d in x.dims[2:])
    return [TType(x.dims[:2] + (h, wd), x.dtype)]


def _activation(args, kw):
    """`activation(x, name)`: the activation of the table `ops.ACTIVATIONS` that the build-time string `name`
    (usually a config field, `hidden_act`) names."""
    from dslc.diagnostics import did_you_mean

    if len(args) != 2 or kw:
        raise OpTypeError("E040", "`activation` takes (x, name): a tensor and an activation's name (`hidden_act`)")
    x = _t(args[0], "`activation`'s argument")
    name = args[1]
    table = ", ".join(ops.ACTIVATIONS)
    if not isinstance(name, str):
        raise OpTypeError(
            "E041", f"`activation`'s name must be a build-time string, got {_desc(name)}", f"activations: {table}"
        )
    if name not in ops.ACTIVATIONS:
        raise OpTypeError(
            "E041",
            f"no activation is named {name!r}",
            did_you_mean(name, ops.ACTIVATIONS),
            f"activations: {table}",
        )
    if x.dtype not in FLOAT_DTYPES:
        raise OpTypeError("E032", f"`activation` needs a floating-point tensor, got {x.dtype}", "cast it first")
    return [x]


def _expand(args, kw):
    """`expand(x, [dims])`: size-1 dims broadcast to the given sizes, -1 keeps a dim (cls tokens to the batch)."""
    if len(args) != 2 or not isinstance(args[1], list) or kw:
        raise OpTypeError("E040", "`expand` takes (x, [dims])")
    x = _t(args[0], "`expand`'s input")
    target = list(args[1])
    if len(target) != x.rank:
        raise OpTypeError("E034", f"`expand` of {x} needs {x.rank} sizes, got {_fmt(target)}")
    dims = []
    for have, want in zip(x.dims, target):
        if isinstance(want, bool) or not isinstance(want, (int, Sym)) or (isinstance(want, int) and want < -1):
            raise OpTypeError("E034", f"`expand` sizes must be sizes or -1, got {_desc(want)}")
        if want == -1 or want == have:
            dims.append(have)
        elif have == 1:
            dims.append(want)
        else:
            raise OpTypeError("E034", f"`expand` of {x} to {_fmt(target)}: only size-1 dims broadcast")
    return [TType(tuple(dims), x.dtype)]


UNARY = ops.names("unary")  # the elementwise ops by kind, from the one op table (dslc/ir/ops.py)
BINARY = ops.names("binary")

PRIMITIVES: dict[str, Callable] = {
    **{n: _elementwise(n) for n in UNARY if n != "activation"},
    "activation": _activation,
    **{n: _binary(n) for n in BINARY},
    "where": _where,
    **{n: _reduction(n) for n in ops.names("row")},
    "softmax": _softmax("softmax"),
    "log_softmax": _softmax("log_softmax"),
    "linear": _linear,
    "gather": _gather,
    "cast": _cast,
    "reshape": _reshape,
    "transpose": _transpose,
    "unsqueeze": _unsqueeze,
    "squeeze": _squeeze,
    "select": _select,
    "chunk": _chunk,
    "split": _split,
    "concat": _concat,
    "arange": _arange,
    "constant": _constant,
    "attention": _attention,
    "dropout": _dropout,
    "rotate_half": _rotate_half,
    "topk": _topk,
    "moe_dispatch": _moe_dispatch,
    "grouped_linear": _grouped_linear,
    "moe_combine": _moe_combine,
    "conv2d": _conv2d,
    "max_pool2d": _max_pool2d,
    "expand": _expand,
}

# how many results an op gives (default 1); chunk/split give as many as asked
MULTI_RESULT = {"chunk", "split", "topk", "moe_dispatch"}
