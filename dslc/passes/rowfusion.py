"""Row fusion: chains of elementwise ops and last-dim reductions become one `RowRegion`.

Pointwise chains (bias + activation, silu(gate) * up, residual adds, scaling) and row reductions
with their prologue and epilogue (RMSNorm, LayerNorm, softmax, the residual add before a norm,
producing both outputs) are the same thing here: ops whose results broadcast to one [.., N] shape,
computed one row per program. Each region is replaced by a `region` op calling it; every candidate
left unfused is recorded with the reason, for the fusion report.

Only dataflow-connected ops share a region (lines that merely sit side by side with agreeing shapes stay
apart), and a region is kept only if the Triton generator can run it (`triton_refusal`, checked at build
time): a package never holds a region that works on the PyTorch path and fails on the Triton one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from dslc.check.dims import TType
from dslc.check.primitives import OpTypeError, broadcast
from dslc.check.types import bind_params
from dslc.codegen.triton_region import triton_refusal
from dslc.ir import nodes as N
from dslc.ir.evaluate import EvalError, evaluate
from dslc.ir.regions import RegionInput, RegionOp, RowRegion
from dslc.passes.common import ELEMENTWISE, ROW_REDUCTIONS, VIEW_OPS, map_bodies, use_counts, value_refs

MAX_RANK = 4  # three leading dims and the row


@dataclass
class FusionReport:
    regions: list[tuple[str, str, RowRegion, dict]] = field(default_factory=list)  # (module, name, region, bytes)
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (module, where, reason)


def _where(span) -> str:
    return f"{Path(span.file).name}:{span.line}"


class _Fuser:
    def __init__(
        self,
        module: N.ModuleDef,
        types: dict,
        taken: set[str],
        report: FusionReport,
        weight_dims=None,
        graph: N.Graph | None = None,
    ):
        self.m = module
        self.graph = graph if graph is not None else module.forward  # the forward, or the residual variant
        self.types = types
        self.weight_dims = weight_dims or (lambda name: None)  # weight name (`norm.weight`) -> its dims or None
        self.taken = taken
        self.report = report
        self.regions: list[RowRegion] = []

    def ttype(self, name: str) -> TType | None:
        t = self.types.get(name)
        return t if isinstance(t, TType) else None

    def fusable(self, op) -> str | None:
        """None when the op may join a region, else why not."""
        if isinstance(op, N.Loop):
            return "a loop"
        if isinstance(op, N.Branch):
            return "a build-time branch"
        if op.op not in ELEMENTWISE and op.op not in ROW_REDUCTIONS:
            return f"`{op.op if op.op not in ('call', 'fn') else op.target}` is not elementwise"
        if len(op.results) != 1:
            return "more than one result"
        t = self.ttype(op.results[0])
        if t is None or t.rank < 1 or t.rank > MAX_RANK:
            return "rank outside 1..4"
        if op.op in ROW_REDUCTIONS:
            kw = dict(op.kwargs)
            dim = kw.get("dim", N.Const(-1))
            keep = kw.get("keepdim", N.Const(False))
            if not (isinstance(dim, N.Const) and dim.value in (-1, t.rank - 1)):
                return "reduces a dim other than the last"
            if not (isinstance(keep, N.Const) and keep.value is True):
                return "reduction without keepdim"
        if t.dtype not in ("float", "f32", "bf16", "f16"):
            return f"{t.dtype} result"
        return None

    def schedule(self, body) -> list:
        """Move ops that cannot be fused as early as their inputs allow (keeping their relative order),
        so the fusable ops between them end up adjacent. Fusable ops are pure, so this is safe."""
        defined_by: dict[str, int] = {}
        for i, st in enumerate(body):
            for r in st.results + st.params if isinstance(st, N.Loop) else st.results:
                defined_by[r] = i
        deps = [{defined_by[v] for v in value_refs(st) if v in defined_by} for st in body]
        fixed = [self.fusable(st) is not None for st in body]
        done: set[int] = set()
        order: list[int] = []
        pending_fixed = [i for i in range(len(body)) if fixed[i]]
        while len(order) < len(body):
            nxt = pending_fixed[0] if pending_fixed else None
            if nxt is not None and deps[nxt] <= done:
                pending_fixed.pop(0)
                pick = nxt
            else:
                pick = next(i for i in range(len(body)) if i not in done and not fixed[i] and deps[i] <= done)
            done.add(pick)
            order.append(pick)
        ordered = [body[i] for i in order]
        # then each fusable op moves down to just before its first reader, so a small table op (a rotary
        # cast) arrives next to the op that consumes it instead of opening a region of its own
        fused_values = {r for st in ordered if not fixed_op(st, self) for r in st.results}
        for i in range(len(ordered) - 1, -1, -1):
            st = ordered[i]
            if fixed_op(st, self) or not isinstance(st, N.Op) or set(_reads(st)) & fused_values:
                continue  # only leaves move (ops reading no fusable result), so chains keep their order
            first = next((j for j in range(i + 1, len(ordered)) if set(st.results) & set(_reads(ordered[j]))), None)
            if first is not None and first > i + 1:
                ordered.insert(first - 1, ordered.pop(i))
        return ordered

    def run(self, body, counts: dict) -> list:
        self.display = _display_names(body, getattr(self, "display", {}))
        queue = self.schedule(body)
        out: list = []
        cur: list[N.Op] = []
        shape: list = [None]
        while queue or cur:
            if not queue:  # the last region; ops left out of it go again
                queue = self.close(cur, shape[0], counts, out)
                cur, shape[0] = [], None
                continue
            st = queue.pop(0)
            fusable = not isinstance(st, (N.Loop, N.Branch)) and self.fusable(st) is None
            t = self.ttype(st.results[0]) if fusable else None
            if fusable and cur and self.try_join(st, t, cur, shape, queue):
                continue
            if cur:  # the region ends before `st`; ops left out of it go again, ahead of `st`
                peeled = self.close(cur, shape[0], counts, out)
                cur, shape[0] = [], None
                if peeled:
                    queue = peeled + [st] + queue
                    continue
            if isinstance(st, (N.Loop, N.Branch)):  # each body fuses on its own
                out.append(N.with_bodies(st, [self.run(list(b), counts) for b in N.bodies(st)]))
            elif fusable:
                cur, shape[0] = [st], t.dims
            else:
                out.append(st)
        return out

    def try_join(self, op: N.Op, t: TType, cur: list, shape: list, queue: list) -> bool:
        """Add `op` to the region `cur` (of shape `shape[0]`) if it is dataflow-connected to it and fits."""
        if not cur:
            return False
        members = {r for o in cur for r in o.results}
        args = value_refs(op)
        # Only dataflow-connected ops join: a consumer of the region's values, a sibling reading one of its
        # full-width inputs, or an op whose result a later op of the run reads on its way into the region (a
        # rotary table cast, `1.0 + cast(w, f32)`). Independent chains whose shapes merely agree in this config
        # (q and k when there are as many key/value heads as query heads) may not agree in another: they stay
        # apart, and so do unrelated lines that happen to sit side by side.
        if not self.connected(op, cur, shape[0]) and not self.feeds(op, cur, shape[0], queue):
            return False
        if op.op == "rotate_half" and any(a in members for a in args):
            return False  # a permutation reads its input at other columns: it must be a region input
        s = shape[0]
        if t.dims[-1] not in (s[-1], 1) and s[-1] != 1:
            return False
        try:
            new = broadcast(TType(s, "float"), TType(t.dims, "float"), "fuse")
        except OpTypeError:
            return False
        if len(new) > MAX_RANK or (new[-1] != s[-1] and s[-1] != 1):
            return False
        shape[0] = new
        cur.append(op)
        return True

    def connected(self, op: N.Op, ops: list, shape) -> bool:
        """`op` reads a value computed by `ops`, or a full-width input that one of `ops` reads."""
        members = {r for o in ops for r in o.results}
        args = set(value_refs(op))
        if args & members:
            return True
        inputs = {a for o in ops for a in value_refs(o)} - members
        return any(self.full_width(a, shape) for a in args & inputs)

    def full_width(self, value: str, shape) -> bool:
        t = self.ttype(value)
        return t is not None and tuple(t.dims) == tuple(shape)

    def feeds(self, op: N.Op, cur: list, shape, queue: list) -> bool:
        """Some later op of this run of fusable ops reads `op`'s result (directly or through ops that only read
        such results) and is itself connected to the region."""
        chain = set(op.results)
        for q in queue:
            if isinstance(q, (N.Loop, N.Branch)) or self.fusable(q) is not None:
                return False  # the region ends there
            reads = set(value_refs(q))
            if reads & chain:
                if self.connected(q, cur, shape):
                    return True
                chain |= set(q.results)
        return False

    def components(self, ops: list[N.Op], shape) -> list[list[N.Op]]:
        """`ops` split into dataflow-connected groups (edges: one reads the other's result, or both read the
        same full-width input), each in its original order."""
        parent = list(range(len(ops)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        producer = {r: i for i, o in enumerate(ops) for r in o.results}
        reader_of: dict[str, int] = {}
        for i, o in enumerate(ops):
            for a in value_refs(o):
                j = producer.get(a)
                if j is None and self.full_width(a, shape):
                    j = reader_of.setdefault(a, i)
                if j is not None:
                    parent[find(i)] = find(j)
        groups: dict[int, list[N.Op]] = {}
        for i, o in enumerate(ops):
            groups.setdefault(find(i), []).append(o)
        return list(groups.values())

    def region_shape(self, ops: list[N.Op]):
        shape = self.ttype(ops[0].results[0]).dims
        for o in ops[1:]:
            shape = broadcast(TType(shape, "float"), TType(self.ttype(o.results[0]).dims, "float"), "fuse")
        return shape

    # ---- closing: RowRegion + the `region` op ------------------------------------------------------
    def close(self, ops: list[N.Op], shape, counts: dict, out: list) -> list:
        """Emit the region for `ops` into `out`; return ops to process again (left out of the region)."""
        if not ops:
            return []
        # an op that joined for a reader that then did not: keep the largest connected group, the rest goes again
        groups = self.components(ops, shape)
        peeled: list[N.Op] = []
        if len(groups) > 1:
            keep = max(groups, key=len)
            peeled = [op for op in ops if not any(op is k for k in keep)]
            ops = keep
            shape = self.region_shape(ops)
        while True:  # a value narrower than the row (a broadcast table) leaving the region: compute it outside
            members = {r for op in ops for r in op.results}
            used_inside = self._inside_uses(ops)
            narrow = [
                op
                for op in ops
                if counts.get(op.results[0], 0) > used_inside.get(op.results[0], 0)
                and self.ttype(op.results[0]).dims[:-1] != tuple(shape[:-1])
                and not (set(value_refs(op)) & members)
            ]
            if not narrow:
                break
            for op in narrow:  # it reads nothing computed in the region: computed before it, unfused
                ops.remove(op)
                out.append(op)
                self.report.rejected.append(
                    (self.m.name, _where(op.span), f"`{op.op}`: narrower than the row and also read outside the region")
                )
            if not ops:
                return peeled
            shape = self.region_shape(ops)
        members = {r for op in ops for r in op.results}
        inside = self._inside_uses(ops)
        outputs = [r for op in ops for r in op.results if counts.get(r, 0) > inside.get(r, 0)]
        n_ops = sum(op.op != "identity" for op in ops)
        if n_ops < 2:
            op = ops[0]
            self.report.rejected.append((self.m.name, _where(op.span), f"`{op.op}` alone: no neighbour to fuse with"))
            out.extend(ops)
            return peeled
        region, args, why = self.build_region(ops, members, outputs, shape)
        if region is None:
            self.report.rejected.append((self.m.name, _where(ops[0].span), why))
            out.extend(ops)
            return peeled
        self.regions.append(region)
        before, after = _bytes(ops, region, self.types, shape, outputs)
        self.report.regions.append((self.m.name, region.name, region, {"before": before, "after": after}))
        vars_ = tuple(next((op.vars[op.results.index(o)] for op in ops if o in op.results), "") for o in outputs)
        out.append(N.Op("region", tuple(args), (), tuple(outputs), vars_, region.name, ops[0].span))
        return peeled

    @staticmethod
    def _inside_uses(ops) -> dict[str, int]:
        inside: dict[str, int] = {}
        for op in ops:
            for a in value_refs(op):
                inside[a] = inside.get(a, 0) + 1
        return inside

    def build_region(self, ops, members, outputs, shape):
        optional = {w.name for w in self.m.weights if w.condition is not None}  # may be None at run time
        for op in ops:
            for k, a in enumerate(op.args):
                if (
                    isinstance(a, N.Ref)
                    and a.kind == "weight"
                    and a.name in optional
                    and not (op.op == "add" or (op.op == "sub" and k == 1))
                ):
                    return (
                        None,
                        None,
                        (
                            f"`{op.op}` at {_where(op.span)} reads the optional weight `{a.name}` "
                            "other than as an added term"
                        ),
                    )
        inputs: list[RegionInput] = []
        args: list[N.E] = []
        names: dict = {}  # E (value ref / weight ref / static) -> region name
        read_values: set[str] = set()  # inputs read as values (not only for their dtype)
        local: dict[str, str] = {}  # member value -> its short name inside the region
        used: set[str] = set()

        def unique(base: str) -> str:
            """A short readable name: the callee's own (`h`, `t3`) without the inliner's prefix."""
            base = re.sub(r"\W", "_", re.sub(r"^.+?__\d+_", "", base)) or "v"
            name, i = base, 2
            while name in used:
                name, i = f"{base}_{i}", i + 1
            used.add(name)
            return name

        def input_name(e: N.E, as_value: bool = True) -> str:
            if e in names:
                if as_value:
                    read_values.add(names[e])
                return names[e]
            if isinstance(e, N.Ref) and e.kind in ("value", "weight"):
                name = unique(self.display.get(e.name, e.name) if e.kind == "value" else e.name.rsplit(".", 1)[-1])
                t = self.ttype(e.name) if e.kind == "value" else None
                needs_grad = t is None or t.dtype in ("float", "f32", "bf16", "f16")
                absent_ok = e.kind == "weight" and e.name in optional
                inputs.append(RegionInput(name, "tensor", needs_grad, absent_ok))
            else:
                scalar = e.name if isinstance(e, N.Ref) and e.kind in ("param", "config") else "s"
                name = unique(scalar)
                inputs.append(RegionInput(name, "scalar", False))
            names[e] = name
            args.append(e)
            if as_value:
                read_values.add(name)
            return name

        def choice_name(e: N.E) -> str:
            """The choice input carrying the build-time string `e` (a config field, a parameter or a literal)."""
            if e not in names:
                names[e] = unique(e.name if isinstance(e, N.Ref) else "act")
                inputs.append(RegionInput(names[e], "choice", False))
                args.append(e)
            return names[e]

        region_ops = []
        float_input = None
        for op in ops:
            rargs: list = []
            attrs: tuple = ()
            for k, a in enumerate(op.args):
                if op.op == "cast" and k == 1:
                    dtype = self.cast_dtype(a, op, members, names, input_name)
                    if dtype is None:
                        return None, None, f"cast at {_where(op.span)} to the dtype of a value computed in the region"
                    attrs = (("dtype", dtype),)
                    continue
                if op.op == "activation" and k == 1:  # the name: a choice input, a constexpr of the kernels
                    attrs = (("name", choice_name(a)),)
                    continue
                if isinstance(a, N.Ref) and a.kind == "value" and a.name in members:
                    rargs.append(local[a.name])
                elif isinstance(a, N.Const) and isinstance(a.value, (int, float)) and not isinstance(a.value, bool):
                    rargs.append(float(a.value))
                elif isinstance(a, N.Const):
                    return None, None, f"`{op.op}` at {_where(op.span)} takes a non-numeric constant"
                else:
                    rargs.append(input_name(a))
            if op.op == "pow" and not isinstance(rargs[1], float):
                return None, None, f"`**` at {_where(op.span)} with a non-constant exponent"
            local[op.results[0]] = unique(op.results[0])
            region_ops.append(RegionOp(op.op, tuple(rargs), local[op.results[0]], attrs))
        for i in inputs:
            if i.kind == "tensor" and float_input is None:
                ref = next(e for e, n in names.items() if n == i.name)
                t = self.ttype(ref.name) if isinstance(ref, N.Ref) and ref.kind == "value" else None
                if t is not None and t.dtype == "float":
                    float_input = i.name
        if float_input is not None:
            region_ops = [
                replace(o, attrs=(("dtype", f"input:{float_input}"),)) if o.attrs == (("dtype", "float"),) else o
                for o in region_ops
            ]
        elif any(o.attrs == (("dtype", "float"),) for o in region_ops):
            return None, None, "no input carries the model's dtype for a cast"
        out_dtypes = []
        for o in outputs:
            t = self.ttype(o)
            if t.dtype == "float":
                if float_input is None:
                    return None, None, "no input carries the model's dtype for an output"
                out_dtypes.append(f"input:{float_input}")
            else:
                out_dtypes.append(t.dtype)
        for t in self.ttype_rows(outputs):
            if t.dims[-1] != shape[-1] and t.dims[-1] != 1:
                return None, None, "an output narrower than the row"
        spans = sorted({_where(op.span) for op in ops})
        inputs = [replace(i, needs_grad=False) if i.name not in read_values else i for i in inputs]
        region = RowRegion(
            "region",
            tuple(inputs),
            tuple(region_ops),
            tuple(local[o] for o in outputs),
            output_dtypes=tuple(out_dtypes),
            source=", ".join(spans),
        )
        # the region's values in PyTorch's shapes, for what the Triton path can run
        dims: dict[str, tuple | None] = {local[r]: tuple(self.ttype(r).dims) for r in members}
        for e, n in names.items():
            if isinstance(e, N.Ref) and e.kind == "value":
                dims[n] = tuple(self.ttype(e.name).dims) if self.ttype(e.name) is not None else None
            elif isinstance(e, N.Ref) and e.kind == "weight":
                dims[n] = self.weight_dims(e.name)
        region = replace(
            region,
            inputs=tuple(
                replace(i, row_invariant=True) if i.needs_grad and _row_invariant(dims.get(i.name), tuple(shape)) else i
                for i in region.inputs
            ),
        )
        why = triton_refusal(region, dims)
        if why is not None:
            return None, None, f"the Triton path could not run it: {why}"
        return replace(region, name=self.region_name(ops)), args, None

    def ttype_rows(self, names):
        return [self.ttype(n) for n in names]

    def cast_dtype(self, a: N.E, op: N.Op, members, names, input_name) -> str | None:
        if isinstance(a, N.Ref) and a.kind == "dtype" and a.name in ("f32", "bf16", "f16"):
            return a.name
        if isinstance(a, N.Ref) and a.kind == "dtype_of":
            if a.name.startswith("weight:"):
                return None
            if a.name in members:  # a value computed here: its dtype is known from its type
                t = self.ttype(a.name)
                return "float" if t is not None and t.dtype == "float" else (t.dtype if t else None)
            return f"input:{input_name(N.Ref('value', a.name), as_value=False)}"
        return None

    def region_name(self, ops) -> str:
        """`rms_norm` for a whole module body (`rms_norm_residual` for its residual variant), else
        `<module>_<fn inlined here>` or `<module>_pointwise`."""
        suffix = "_residual" if self.graph is self.m.residual else ""
        if len(ops) == len(self.graph.body):
            base = _snake(self.m.name) + suffix
        else:
            tag = "pointwise"
            for op in ops:
                m = re.match(r"(.+?)__\d+_", op.results[0])
                if m:
                    tag = m.group(1)
                    break
            base = f"{_snake(self.m.name)}_{tag}{suffix}"
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def _row_invariant(dims: tuple | None, shape: tuple) -> bool:
    """Whether an input of `dims` holds the same row in every row of a region of `shape` (a weight [N])."""
    return (
        dims is not None
        and len(shape) > 1
        and len(dims) >= 1
        and dims[-1] == shape[-1]
        and all(d == 1 for d in dims[:-1])
    )


def _reads(st) -> list[str]:
    """Values a statement reads; for a loop, also those its body reads from outside (not only the carried ones)."""
    return value_refs(st)


def fixed_op(st, fuser) -> bool:
    """Ops that cannot join a region (they keep their place in the schedule)."""
    return isinstance(st, (N.Loop, N.Branch)) or fuser.fusable(st) is not None


def _snake(name: str) -> str:
    """RMSNorm -> rms_norm, GatedMLP -> gated_mlp, BertSelfOutput -> bert_self_output."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _bytes(ops, region: RowRegion, types: dict, shape, outputs: list[str]) -> tuple[int, int]:
    """Estimated bytes moved per row of N values, at 2 bytes per model-dtype value and 4 per f32."""
    n = shape[-1] if isinstance(shape[-1], int) else 1

    def size(name) -> int:
        t = types.get(name)
        if not isinstance(t, TType):
            return n * 2
        width = t.dims[-1] if isinstance(t.dims[-1], int) else n
        return width * (4 if t.dtype == "f32" else 2)

    before = 0
    for op in ops:
        for a in value_refs(op):
            before += size(a)
        before += sum(size(r) for r in op.results)
    after = sum(n * 2 for i in region.inputs if i.kind == "tensor") + sum(size(o) for o in outputs)
    return before, after


def _weight_dims(program: N.Program, mdef: N.ModuleDef, params: dict):
    """name -> dims of a weight of `mdef` (bound to `params`) or of a submodule's (`norm.weight`, after inlining)."""
    bind = bind_params(program)
    config = program.config_values

    def lookup_in(bound: dict):
        def lookup(r: N.Ref):
            if r.kind == "param" and r.name in bound:
                return bound[r.name]
            if r.kind == "config":
                return config[r.name]
            if r.kind == "dtype":
                return r.name
            raise EvalError(f"`{r.name}` is not known at build time")

        return lookup

    def resolve(m: N.ModuleDef, bound: dict, name: str):
        if "." in name:
            sub, _, rest = name.partition(".")
            sdef = next((s for s in m.submodules if s.name == sub), None)
            if sdef is None or sdef.repeat is not None or sdef.alternatives:
                return None
            child = program.module(sdef.module)
            return resolve(child, bind(child, sdef.args, sdef.kwargs, lookup_in(bound), sdef.span), rest)
        w = next((w for w in m.weights if w.name == name), None)
        return None if w is None else tuple(evaluate(d, lookup_in(bound)) for d in w.shape)

    def dims(name: str):
        try:
            return resolve(mdef, params, name)
        except (EvalError, KeyError, TypeError):
            return None

    return dims


def fuse_rows(program: N.Program, types: dict) -> tuple[N.Program, FusionReport]:
    """Form row regions in every module forward (types: `infer_types` of this program)."""
    report = FusionReport()
    taken: set[str] = set()
    regions: list[RowRegion] = []
    first_types: dict[tuple[str, str], dict] = {}
    first_params: dict[tuple[str, str], dict] = {}
    for (kind, name, params), t in types.items():
        if (kind, name) not in first_types:
            first_types[kind, name] = t
            first_params[kind, name] = dict(params)
    for (kind, name), t in list(first_types.items()):  # a norm only ever called with a residual: the
        if kind == "residual" and ("module", name) not in first_types:  # residual variant's types hold the forward's
            first_types["module", name] = t
            first_params["module", name] = first_params[kind, name]
    modules = []
    for m in program.modules:
        if m.forward is None or ("module", m.name) not in first_types:
            modules.append(m)
            continue
        fuser = _Fuser(
            m, first_types["module", m.name], taken, report, _weight_dims(program, m, first_params["module", m.name])
        )
        body = fuser.run(list(m.forward.body), use_counts(m.forward))
        regions += fuser.regions
        m = replace(m, forward=replace(m.forward, body=tuple(body)))
        if m.residual is not None and ("residual", m.name) in first_types:
            fuser = _Fuser(
                m,
                first_types["residual", m.name],
                taken,
                report,
                _weight_dims(program, m, first_params["residual", m.name]),
                graph=m.residual,
            )
            body = fuser.run(list(m.residual.body), use_counts(m.residual))
            regions += fuser.regions
            m = replace(m, residual=replace(m.residual, body=tuple(body)))
        modules.append(m)
    regions, same = _share_identical(list(program.regions) + regions)
    if same:

        def retarget(g: N.Graph, _owner) -> N.Graph:
            return replace(g, body=tuple(_retarget(g.body, same)))

        modules = list(map_bodies(replace(program, modules=tuple(modules)), retarget).modules)
        by_name = {r.name: r for r in regions}
        report.regions = [(m, n, by_name[n], b) for m, n, r, b in report.regions if n not in same]
    return replace(program, modules=tuple(modules), regions=tuple(regions)), report


def _share_identical(regions: list[RowRegion]) -> tuple[list[RowRegion], dict[str, str]]:
    """One region (one kernel) for regions that differ only in name: region name -> the kept one's name."""
    kept: dict[RowRegion, RowRegion] = {}
    same: dict[str, str] = {}
    out = []
    for r in regions:
        key = _canonical(r)
        if key in kept:
            first = kept[key]
            same[r.name] = first.name
            spans = sorted(set(first.source.split(", ")) | set(r.source.split(", ")))
            merged = replace(first, source=", ".join(spans))
            out[out.index(first)] = merged
            kept[key] = merged
        else:
            kept[key] = r
            out.append(r)
    return out, same


def _display_names(body, names: dict[str, str]) -> dict[str, str]:
    """Readable names for temporaries that feed regions: a call's result is named after the callee
    (`gate_proj`), a view after what it views (`cos`); named values keep their names."""
    names = dict(names)
    for st in body:
        if isinstance(st, (N.Loop, N.Branch)):
            for inner in N.bodies(st):
                names = _display_names(inner, names)
            continue
        for r, var in zip(st.results, st.vars):
            if var:
                names[r] = var
            elif st.op == "call" and len(st.results) == 1:
                names[r] = st.target
            elif (
                st.op in (*VIEW_OPS, "identity")
                and st.args
                and isinstance(st.args[0], N.Ref)
                and st.args[0].kind == "value"
            ):
                names[r] = names.get(st.args[0].name, st.args[0].name)
    return names


def _canonical(r: RowRegion) -> RowRegion:
    """The region with its names replaced by positional ones (inputs a0.., values v0..): equal for regions
    that compute the same thing from the same kinds of inputs."""
    names = {i.name: f"a{k}" for k, i in enumerate(r.inputs)}
    names.update({o.result: f"v{k}" for k, o in enumerate(r.ops)})

    def rename(x):
        return names.get(x, x) if isinstance(x, str) else x

    def attr(kv):
        k, v = kv
        return (k, "input:" + names[v[6:]]) if isinstance(v, str) and v.startswith("input:") else (k, v)

    return replace(
        r,
        name="",
        source="",
        notes=(),
        inputs=tuple(replace(i, name=names[i.name]) for i in r.inputs),
        ops=tuple(
            replace(o, args=tuple(map(rename, o.args)), result=names[o.result], attrs=tuple(map(attr, o.attrs)))
            for o in r.ops
        ),
        outputs=tuple(map(rename, r.outputs)),
        output_dtypes=tuple("input:" + names[d[6:]] if d.startswith("input:") else d for d in r.output_dtypes),
    )


def _retarget(body, same: dict[str, str]) -> list:
    out = []
    for st in body:
        if isinstance(st, (N.Loop, N.Branch)):
            out.append(N.with_bodies(st, [_retarget(b, same) for b in N.bodies(st)]))
        elif st.op == "region" and st.target in same:
            out.append(replace(st, target=same[st.target]))
        else:
            out.append(st)
    return out
