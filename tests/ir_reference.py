"""A reference interpreter for the checked IR (helper for tests, not a test file).

It evaluates a `Program` straight from checking, before any pass ran: each primitive op with plain torch,
`call`s of submodules recursively (a `repeat` stack one copy after another), `fn`s by evaluating their own
graph, weights taken by their dotted name from a parameter dict (a generated package's `named_parameters()`,
so the reference and the package share the very same tensors and gradients can be compared).

Nothing here uses the compiler's passes or code generator: only the IR node classes and the static-expression
evaluator. It is deliberately simple, op by op, to be obviously right rather than fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dslc.ir import nodes as N
from dslc.ir.evaluate import EvalError, evaluate

DTYPES = {
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f64": torch.float64,
    "i64": torch.int64,
    "i32": torch.int32,
    "bool": torch.bool,
}


class ReferenceError(Exception):
    """The program holds something this interpreter does not evaluate."""


@dataclass
class _Frame:
    mdef: N.ModuleDef | None  # None inside a fn
    prefix: str  # "block.proj." : where this module's weights live in the parameter dict
    params: dict  # module (or fn scalar) parameters, bound
    env: dict = field(default_factory=dict)  # SSA value -> tensor (or a Python value)
    syms: dict = field(default_factory=dict)  # size symbol -> int
    loop_vars: dict = field(default_factory=dict)  # `layer` -> (SubmoduleDef, index)


class Reference:
    """`Reference(program, parameters)(*inputs)`: the model's outputs as a tuple of tensors."""

    def __init__(self, program: N.Program, parameters: dict[str, torch.Tensor]):
        self.p = program
        self.weights = parameters
        self.config = program.config_values

    def __call__(self, *inputs):
        model = self.p.module(self.p.model)
        return tuple(self.run_graph(model.forward, _Frame(model, "", {}), list(inputs)))

    # ---- graphs ----------------------------------------------------------------------------------------
    def run_graph(self, g: N.Graph, frame: _Frame, inputs: list) -> list:
        if len(inputs) != len(g.args):
            raise ReferenceError(f"{len(g.args)} arguments expected, got {len(inputs)}")
        for a, v in zip(g.args, inputs):
            frame.env[a.name] = v
            if a.tensor is None:
                frame.params[a.name] = v  # a fn's scalar argument is read as `$name`
            else:
                self.bind_syms(a.tensor, v, frame)
        self.run_body(g.body, frame)
        return [frame.env[o] for o in g.outputs]

    def bind_syms(self, sig: N.TensorSig, t: torch.Tensor, frame: _Frame) -> None:
        dims = list(sig.dims)
        ell = next((i for i, d in enumerate(dims) if isinstance(d, N.Const) and d.value == "..."), None)
        for i, d in enumerate(dims):
            if isinstance(d, N.Ref) and d.kind == "sym":
                index = i if ell is None or i < ell else i - len(dims)
                frame.syms.setdefault(d.name, t.shape[index])

    def run_body(self, body, frame: _Frame) -> None:
        for st in body:
            if isinstance(st, N.Loop):
                self.run_loop(st, frame)
                continue
            results = self.run_op(st, frame)
            if len(st.results) == 1:
                results = [results]
            for r, v in zip(st.results, results):
                frame.env[r] = v

    def run_loop(self, st: N.Loop, frame: _Frame) -> None:
        sdef = self.submodule(frame, st.over)
        n = self.static(sdef.repeat, frame)
        carried = [frame.env[v] for v in st.inputs]
        for i in range(n):
            for p, v in zip(st.params, carried):
                frame.env[p] = v
            frame.loop_vars[st.var] = (sdef, i)
            self.run_body(st.body, frame)
            carried = [frame.env[y] for y in st.yields]
        frame.loop_vars.pop(st.var, None)
        for r, v in zip(st.results, carried):
            frame.env[r] = v

    # ---- modules and fns -------------------------------------------------------------------------------
    def submodule(self, frame: _Frame, name: str) -> N.SubmoduleDef:
        sdef = next((s for s in frame.mdef.submodules if s.name == name), None)
        if sdef is None:
            raise ReferenceError(f"no submodule `{name}` in `{frame.mdef.name}`")
        return sdef

    def call(self, op: N.Op, frame: _Frame, args: list):
        if op.target in frame.loop_vars:
            sdef, index = frame.loop_vars[op.target]
            path = f"{frame.prefix}{sdef.name}.{index}."
        else:
            sdef = self.submodule(frame, op.target)
            if sdef.repeat is not None:
                raise ReferenceError(f"`{op.target}` is a repeat stack: call it in a loop")
            path = f"{frame.prefix}{sdef.name}."
        child = self.p.module(sdef.module)
        params = self.bind_params(child, sdef, frame)
        out = self.run_graph(child.forward, _Frame(child, path, params), args)
        return out[0] if len(out) == 1 else tuple(out)

    def bind_params(self, child: N.ModuleDef, sdef: N.SubmoduleDef, frame: _Frame) -> dict:
        given = {p.name: self.static(a, frame) for p, a in zip(child.params, sdef.args)}
        given.update({k: self.static(v, frame) for k, v in sdef.kwargs})
        bound: dict = {}
        for p in child.params:
            if p.name in given:
                v = given[p.name]
            else:
                v = self.static(p.default, _Frame(child, "", bound))
            bound[p.name] = float(v) if p.type == "float" and isinstance(v, int) else v
        return bound

    def fn(self, op: N.Op, frame: _Frame, args: list):
        f = self.p.fn(op.target)
        out = self.run_graph(f.graph, _Frame(None, "", {}), args)
        return out[0] if len(out) == 1 else tuple(out)

    # ---- values ----------------------------------------------------------------------------------------
    def lookup(self, frame: _Frame):
        def look(r: N.Ref):
            if r.kind == "param":
                return frame.params[r.name]
            if r.kind == "config":
                return self.config[r.name]
            if r.kind == "sym":
                return frame.syms[r.name]
            if r.kind == "dtype":
                return r.name
            raise EvalError(f"`{r.name}` ({r.kind}) is not static")

        return look

    def static(self, e: N.E, frame: _Frame):
        return evaluate(e, self.lookup(frame))

    def weight(self, name: str, frame: _Frame):
        return self.weights.get(frame.prefix + name)  # absent (a false condition): None

    def value(self, e: N.E, frame: _Frame):
        """An op argument: a tensor, None (an absent weight), a dtype, a number or a list."""
        if isinstance(e, N.Ref):
            if e.kind == "value":
                return frame.env[e.name]
            if e.kind == "weight":
                return self.weight(e.name, frame)
            if e.kind == "dtype":
                return DTYPES[e.name]
            if e.kind == "dtype_of":
                if e.name.startswith("weight:"):
                    return self.weight(e.name[len("weight:") :], frame).dtype
                return frame.env[e.name].dtype
        return self.static(e, frame)

    # ---- primitive ops ---------------------------------------------------------------------------------
    def run_op(self, op: N.Op, frame: _Frame):
        args = [self.value(a, frame) for a in op.args]
        kw = {k: self.value(v, frame) for k, v in op.kwargs}
        name = op.op
        if name == "call":
            return self.call(op, frame, args)
        if name == "fn":
            return self.fn(op, frame, args)
        if name in UNARY:
            return UNARY[name](args[0])
        if name in BINARY:
            a, b = args
            if a is None or b is None:  # `y + none`: an absent optional weight
                if name not in ("add", "sub") or (a is None and name == "sub"):
                    raise ReferenceError(f"`{name}` of an absent weight")
                return b if a is None else a
            return BINARY[name](a, b)
        if name in ("sum", "mean", "amax", "amin"):
            dim = kw.get("dim", -1)
            dim = tuple(dim) if isinstance(dim, list) else dim
            return getattr(torch, name)(args[0], dim=dim, keepdim=bool(kw.get("keepdim", False)))
        if name in ("softmax", "log_softmax"):
            return getattr(torch, name)(args[0], dim=kw.get("dim", -1))
        if name == "where":
            return torch.where(*args)
        if name == "linear":
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else None
            y = x @ w.t()
            return y if b is None else y + b
        if name == "gather":
            return args[0][args[1]]
        if name == "cast":
            return args[0].to(args[1])
        if name == "reshape":
            return args[0].reshape(*args[1])
        if name == "transpose":
            return args[0].transpose(args[1], args[2])
        if name == "unsqueeze":
            return args[0].unsqueeze(args[1])
        if name == "squeeze":
            return args[0].squeeze(args[1])
        if name == "select":
            return args[0].select(args[1], args[2])
        if name == "chunk":
            return tuple(args[0].chunk(args[1], dim=kw.get("dim", -1)))
        if name == "split":
            return tuple(args[0].split(args[1], dim=kw.get("dim", -1)))
        if name == "concat":
            return torch.cat(args, dim=kw.get("dim", -1))
        if name == "arange":
            device = next((v.device for v in frame.env.values() if isinstance(v, torch.Tensor)), None)
            return torch.arange(*args, device=device)
        if name == "rotate_half":
            x1, x2 = args[0].chunk(2, dim=-1)
            return torch.cat([-x2, x1], dim=-1)
        if name == "dropout":
            return args[0]  # the tests run in eval mode
        if name == "topk":
            return tuple(torch.topk(args[0], args[1], dim=-1))
        if name == "moe_dispatch":
            return _moe_dispatch(*args)
        if name == "grouped_linear":
            return _grouped_linear(*args)
        if name == "moe_combine":
            return _moe_combine(*args)
        raise ReferenceError(f"no reference for op `{name}`")


# mixture of experts, written as the definitions read (one row at a time), not as the package computes them
def _moe_dispatch(x, experts, num_experts: int):
    k = experts.shape[-1]
    flat = experts.reshape(-1).tolist()
    slots = sorted(range(len(flat)), key=lambda s: (flat[s], s))  # by expert, then slot
    counts = [flat.count(e) for e in range(num_experts)]
    rows = torch.stack([x[s // k] for s in slots]) if slots else x[:0]
    return rows, torch.tensor(slots, dtype=torch.int64), torch.tensor(counts, dtype=torch.int64)


def _grouped_linear(rows, weight, counts):
    owner = [e for e, c in enumerate(counts.tolist()) for _ in range(c)]  # the expert of each row
    return torch.stack([weight[e] @ rows[r] for r, e in enumerate(owner)])


def _moe_combine(rows, slots, weights):
    n, k = weights.shape
    position = {s: r for r, s in enumerate(slots.tolist())}
    out = []
    for t in range(n):
        total = torch.zeros(rows.shape[-1], dtype=rows.dtype)
        for j in range(k):
            total = total + (rows[position[t * k + j]] * weights[t, j]).to(rows.dtype)
        out.append(total)
    return torch.stack(out)


def _pow(a, b):
    return a**b


def _scalar_or_tensor(fn):
    def apply(a, b):
        if not isinstance(a, torch.Tensor):
            a = torch.as_tensor(a, dtype=b.dtype, device=b.device)
        if not isinstance(b, torch.Tensor):
            b = torch.as_tensor(b, dtype=a.dtype, device=a.device)
        return fn(a, b)

    return apply


UNARY = {
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": lambda x: x * torch.sigmoid(x),
    "relu": torch.relu,
    "cos": torch.cos,
    "sin": torch.sin,
    "abs": torch.abs,
    "erf": torch.erf,
    "neg": torch.neg,
    "identity": lambda x: x,
    "gelu": lambda x: 0.5 * x * (1.0 + torch.erf(x / 2.0**0.5)),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x**3))),
}
BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "pow": _pow,
    "matmul": lambda a, b: a @ b,
    "maximum": _scalar_or_tensor(torch.maximum),
    "minimum": _scalar_or_tensor(torch.minimum),
}
