"""Symbolic shape and dtype inference over every forward, for one evaluated config.

Each module instance (definition + parameter values) and each fn call is inferred once per
distinct argument types; call sites unify the actual argument types with the callee's declared
signature, binding symbols (`B`, `T`, `...`) and comparing sizes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dslc.check.dims import NONE_TYPE, Dim, Sym, TType, dim_add, dim_div, dim_mul
from dslc.check.primitives import PRIMITIVES, OpTypeError
from dslc.diagnostics import Reporter, Span
from dslc.ir import nodes as N
from dslc.ir.evaluate import EvalError, evaluate


class _Stop(Exception):
    """Abandon the current body after an error has been reported."""


def _freeze(v):
    return tuple(v) if isinstance(v, list) else v


class Checker:
    def __init__(self, program: N.Program, bind_params, rep: Reporter):
        self.p = program
        self.bind_params = bind_params  # (ModuleDef, args, kwargs, lookup, span) -> dict
        self.rep = rep
        self.values = program.config_values
        self.memo: dict = {}
        self.weight_types: dict[str, dict[str, TType | str]] = {}
        self.types: dict[tuple, dict[str, TType]] = {}  # (module, params) -> value types, for show

    # ---- entry ----------------------------------------------------------------------------
    def run(self) -> None:
        model = self.p.module(self.p.model)
        inputs = []
        for a in model.forward.args:
            dims = []
            for d in a.tensor.dims:
                if isinstance(d, N.Ref) and d.kind == "sym":
                    dims.append(Sym.of(d.name))
                else:
                    try:
                        dims.append(self._eval_dim(d, {}, {}))
                    except _Stop:
                        return
            inputs.append(TType(tuple(dims), a.tensor.dtype))
        try:
            self.call_module(model, {}, "", inputs, model.span)
        except _Stop:
            pass

    # ---- helpers -----------------------------------------------------------------------------
    def _lookup(self, params: dict, bindings: dict | None = None):
        def lookup(r: N.Ref):
            if r.kind == "param":
                if r.name in params:
                    return params[r.name]
            elif r.kind == "loop_index" and LOOP_INDEX + r.name in params:
                return params[LOOP_INDEX + r.name]
            elif r.kind == "config":
                return self.values[r.name]
            elif r.kind == "sym" and bindings is not None and r.name in bindings:
                return bindings[r.name]
            elif r.kind == "dtype":
                return r.name
            raise EvalError(f"`{r.name}` is not known at build time")

        return lookup

    def _eval_dim(self, e: N.E, params: dict, bindings: dict, span: Span | None = None) -> Dim:
        """A declared dim: symbols come from `bindings`; arithmetic on symbols stays symbolic."""
        if isinstance(e, N.Ref) and e.kind == "sym":
            if e.name in bindings:
                return bindings[e.name]
            return Sym.of(e.name)
        if isinstance(e, N.BinE) and e.op in ("*", "//", "+", "-") and _has_sym(e):
            a = self._eval_dim(e.left, params, bindings, span)
            b = self._eval_dim(e.right, params, bindings, span)
            if isinstance(a, int) and isinstance(b, int):
                return {"*": a * b, "//": a // b if b else 0, "+": a + b, "-": a - b}[e.op]
            if e.op == "*":
                return dim_mul(a, b)
            if e.op == "+":
                return dim_add(a, b)
            if e.op == "-":
                return Sym.of(f"({a}-{b})")
            q = dim_div(a, b)
            if q is None:
                if isinstance(a, int) and isinstance(b, int):
                    return a // b
                return Sym.of(f"({a}//{b})")
            return q
        try:
            v = evaluate(e, self._lookup(params, bindings))
        except EvalError as err:
            if span is not None:
                self.rep.error("E021", str(err), span)
            raise _Stop from None
        if isinstance(v, Sym):
            return v
        if not isinstance(v, int) or isinstance(v, bool):
            if span is not None:
                self.rep.error("E030", f"a dim must be an int, got `{v}`", span)
            raise _Stop
        return v

    def _bind_sig(
        self, sig_args, actual: list, params: dict, span: Span, callee: str, mdef: N.ModuleDef | None = None
    ) -> dict:
        """Unify declared argument types with actual ones; returns symbol bindings."""
        tensor_args = [a for a in sig_args]
        if len(actual) != len(tensor_args):
            self.rep.error(
                "E040",
                f"`{callee}` takes {len(tensor_args)} argument(s), got {len(actual)}",
                span,
                f"signature: {callee}({', '.join(a.name for a in tensor_args)})",
            )
            raise _Stop
        bindings: dict = {}
        pending = []
        for a, t in zip(tensor_args, actual):
            if a.tensor is None:  # scalar argument of a fn
                if isinstance(t, TType) or t == NONE_TYPE:
                    self.rep.error(
                        "E041", f"argument `{a.name}` of `{callee}` is a {a.scalar_type}, got a tensor", span
                    )
                    raise _Stop
                bindings[("scalar", a.name)] = t
                continue
            if not isinstance(t, TType):
                self.rep.error("E041", f"argument `{a.name}` of `{callee}` must be a tensor, got `{t}`", span)
                raise _Stop
            dims = a.tensor.dims
            ell = [i for i, d in enumerate(dims) if isinstance(d, N.Const) and d.value == "..."]
            fixed = len(dims) - len(ell)
            if (not ell and t.rank != len(dims)) or (ell and t.rank < fixed):
                self.rep.error(
                    "E031",
                    f"argument `{a.name}` of `{callee}` must have rank {len(dims)}{' or more' if ell else ''}, got {t}",
                    span,
                    f"declared as [{', '.join(_show_dim(d) for d in dims)}]",
                )
                raise _Stop
            actual_dims = list(t.dims)
            if ell:
                i = ell[0]
                n_prefix = t.rank - fixed
                pairs = list(zip(dims[:i], actual_dims[:i])) + list(zip(dims[i + 1 :], actual_dims[i + n_prefix :]))
            else:
                pairs = list(zip(dims, actual_dims))
            for d, actual_d in pairs:
                if isinstance(d, N.Ref) and d.kind == "sym":
                    if d.name in bindings and bindings[d.name] != actual_d:
                        self.rep.error(
                            "E030",
                            f"argument `{a.name}` of `{callee}`: `{d.name}` is {bindings[d.name]} "
                            f"elsewhere but {actual_d} here ({t})",
                            span,
                        )
                        raise _Stop
                    bindings[d.name] = actual_d
                else:
                    pending.append((a, d, actual_d, t))
            if a.tensor.dtype != t.dtype:
                self.rep.error(
                    "E032",
                    f"argument `{a.name}` of `{callee}` must be {_dt(a.tensor.dtype)}, got {_dt(t.dtype)}",
                    span,
                    "cast it: `cast(x, f32)`, or declare the argument's dtype",
                )
                raise _Stop
        scalar_params = dict(params)
        scalar_params.update({k[1]: v for k, v in bindings.items() if isinstance(k, tuple)})
        for a, d, actual_d, t in pending:
            want = self._eval_dim(d, scalar_params, bindings, span)
            if want != actual_d and mdef is not None and self._sized_weight(mdef, d, params):
                w, wt = self._sized_weight(mdef, d, params)
                self.rep.error(
                    "E033",
                    f"argument `{a.name}` of `{callee}` is {t}, but its weight `{w}` {wt} "
                    f"needs size {want} where it has {actual_d}",
                    span,
                    f"declared as [{', '.join(_show_dim(x) for x in a.tensor.dims)}]" + self._where(d, scalar_params),
                    "check the sizes the submodule is declared with",
                )
                raise _Stop
            if want != actual_d:
                self.rep.error(
                    "E030",
                    f"argument `{a.name}` of `{callee}`: expected size {want}, got {actual_d} (in {t})",
                    span,
                    f"declared as [{', '.join(_show_dim(x) for x in a.tensor.dims)}]" + self._where(d, scalar_params),
                )
                raise _Stop
        return bindings

    def _sized_weight(self, mdef: N.ModuleDef, d: N.E, params: dict):
        """(name, type) of a weight of `mdef` whose shape uses a param that the declared dim `d` uses."""
        from dslc.ir.evaluate import free_refs

        names = {r.name for r in free_refs(d) if r.kind == "param"}
        for w in mdef.weights:
            if names & {r.name for dim in w.shape for r in free_refs(dim) if r.kind == "param"}:
                try:
                    t = self._weights_of(mdef, params).get(w.name)
                except _Stop:
                    return None
                if isinstance(t, TType):
                    return w.name, t
        return None

    def _where(self, e: N.E, params: dict) -> str:
        """` where n = 4, ...` for the params and config fields a declared dim names."""
        from dslc.ir.evaluate import free_refs

        shown = []
        for r in free_refs(e):
            v = params.get(r.name) if r.kind == "param" else self.values.get(r.name) if r.kind == "config" else None
            if v is not None and f"{r.name} = {v}" not in shown:
                shown.append(f"{r.name} = {v}")
        return f" where {', '.join(shown)}" if shown else ""

    # ---- modules and fns --------------------------------------------------------------------
    def _weights_of(self, mdef: N.ModuleDef, params: dict) -> dict:
        lookup = self._lookup(params)
        out: dict = {}
        for w in mdef.weights:
            try:
                present = w.condition is None or evaluate(w.condition, lookup)
                out[w.name] = TType(tuple(evaluate(d, lookup) for d in w.shape), w.dtype) if present else NONE_TYPE
            except EvalError as e:
                self.rep.error("E021", str(e), w.span)
                raise _Stop from None
        return out

    def call_module(
        self, mdef: N.ModuleDef, params: dict, _prefix: str, actual: list, span: Span, residual: bool = False
    ) -> list:
        """Infer the module's forward for these argument types (`residual`: its residual-norm variant)."""
        kind = "residual" if residual else "module"
        key = (kind, mdef.name, tuple(sorted((k, _freeze(v)) for k, v in params.items())), tuple(actual))
        if key in self.memo:
            return self.memo[key]
        g = mdef.residual if residual else mdef.forward
        bindings = self._bind_sig(g.args, actual, params, span, mdef.name, mdef)
        env: dict = {a.name: t for a, t in zip(g.args, actual)}
        ctx = _Ctx(mdef, params, self._weights_of(mdef, params), {})
        ctx.bindings = bindings
        mark = len(self.rep.diagnostics)
        try:
            results = self._infer_body(g, ctx, env, bindings)
        except _Stop:
            self._relocate(mark, span, f"module `{mdef.name}`")
            raise
        self.memo[key] = results
        self.types[key[:3]] = dict(ctx.types)
        return results

    def call_fn(self, fdef: N.FnDef, actual: list, span: Span) -> list:
        key = ("fn", fdef.name, tuple(_freeze(a) for a in actual))
        if key in self.memo:
            return self.memo[key]
        g = fdef.graph
        bindings = self._bind_sig(g.args, actual, {}, span, fdef.name)
        params = {k[1]: v for k, v in bindings.items() if isinstance(k, tuple)}
        env = {a.name: t for a, t in zip(g.args, actual) if a.tensor is not None}
        ctx = _Ctx(None, params, {}, {})
        ctx.bindings = bindings
        mark = len(self.rep.diagnostics)
        try:
            results = self._infer_body(g, ctx, env, bindings)
        except _Stop:
            self._relocate(mark, span, f"fn `{fdef.name}`")
            raise
        self.memo[key] = results
        return results

    def _relocate(self, mark: int, call_site: Span, callee: str) -> None:
        """Errors raised inside the standard library point at the spec's call site, with a note."""
        for i in range(mark, len(self.rep.diagnostics)):
            d = self.rep.diagnostics[i]
            if d.span.file == self.p.source or call_site.file == d.span.file:
                continue
            note = f"inside {callee}, {Path(d.span.file).name}:{d.span.line}:{d.span.col}"
            self.rep.diagnostics[i] = replace(d, span=call_site, notes=d.notes + (note,))

    def _infer_body(self, g: N.Graph, ctx: _Ctx, env: dict, bindings: dict) -> list:
        # SSA names of the arguments equal their variable names (fresh() keeps the first use)
        types: dict[str, TType] = {}
        for a in g.args:
            if a.name in env:
                types[a.name] = env[a.name]
        ctx.types = types
        try:
            self._run(g.body, ctx)
        except _Stop:
            raise
        results = [types[o] if o in types else ctx.statics.get(o) for o in g.outputs]
        if g.result_sigs is not None:
            for i, (sig, got) in enumerate(zip(g.result_sigs, results)):
                if not isinstance(got, TType):
                    continue
                want = self._sig_type(sig, ctx.params, bindings, got, g.span)
                if want is not None and (want.dims != got.dims or want.dtype != got.dtype):
                    self.rep.error(
                        "E042",
                        f"result {i + 1} is {got}, but the signature declares {want}",
                        g.span,
                        "fix the declared result type or the computation",
                    )
                    raise _Stop
        return results

    def _sig_type(self, sig: N.TensorSig, params: dict, bindings: dict, got: TType, span: Span) -> TType | None:
        dims = []
        for d in sig.dims:
            if isinstance(d, N.Const) and d.value == "...":
                if "..." in bindings:
                    dims.extend(bindings["..."])
                else:
                    n_fixed = len(sig.dims) - 1
                    dims.extend(got.dims[: got.rank - n_fixed] if got.rank >= n_fixed else ())
                continue
            scalar_params = dict(params)
            dims.append(self._eval_dim(d, scalar_params, bindings, span))
        return TType(tuple(dims), sig.dtype)

    # ---- statements ------------------------------------------------------------------------------
    def _operand(self, e: N.E, ctx: _Ctx, span: Span):
        if isinstance(e, N.Ref):
            if e.kind == "value":
                if e.name in ctx.types:
                    return ctx.types[e.name]
                if e.name in ctx.statics:
                    return ctx.statics[e.name]
                self.rep.error("E010", f"`{e.name}` has no value here", span)
                raise _Stop
            if e.kind == "weight":
                return self._weight(ctx, e.name, span)
            if e.kind == "dtype_of":
                if e.name.startswith("weight:"):
                    t = self._weight(ctx, e.name[len("weight:") :], span)
                else:
                    t = ctx.types.get(e.name)
                return t.dtype if isinstance(t, TType) else "float"
            if e.kind == "dtype":
                return e.name
        if isinstance(e, N.ListE):
            return [self._operand(i, ctx, span) for i in e.items]
        if _has_sym(e):
            return self._eval_dim(e, ctx.params, ctx.bindings, span)
        try:
            v = evaluate(e, self._lookup(ctx.params))
        except EvalError as err:
            self.rep.error("E021", str(err), span)
            raise _Stop from None
        return v

    def _run(self, body, ctx: _Ctx) -> None:
        for st in body:
            if isinstance(st, N.Loop):
                self._loop(st, ctx)
                continue
            if isinstance(st, N.Branch):
                self._branch(st, ctx)
                continue
            args = [self._operand(a, ctx, st.span) for a in st.args]
            kwargs = {k: self._operand(v, ctx, st.span) for k, v in st.kwargs}
            results = self._op_types(st, args, kwargs, ctx)
            if len(results) != len(st.results):
                self.rep.error(
                    "E042",
                    f"`{st.target or st.op}` gives {len(results)} value(s), but {len(st.results)} name(s) receive them",
                    st.span,
                )
                raise _Stop
            for name, t in zip(st.results, results):
                if isinstance(t, TType):
                    ctx.types[name] = t
                else:
                    ctx.statics[name] = t

    def _op_types(self, st: N.Op, args: list, kwargs: dict, ctx: _Ctx) -> list:
        if st.op == "call":
            sub = self._submodule(ctx, st.target, st.span)
            if sub is None:
                self.rep.error("E010", f"unknown submodule `{st.target}`", st.span)
                raise _Stop
            sdef, child_params = sub
            if child_params is None:
                self.rep.error("E041", f"submodule `{st.target}` is absent here (its condition is false)", st.span)
                raise _Stop
            if "residual" in kwargs:  # `norm(a, residual = b)`, by the residual-norm pass
                if sdef.residual is None:
                    self.rep.error("E040", f"`{st.target}` takes no residual", st.span)
                    raise _Stop
                return self.call_module(sdef, child_params, "", args + [kwargs["residual"]], st.span, residual=True)
            return self.call_module(sdef, child_params, "", args, st.span)
        if st.op == "fn":
            return self.call_fn(self.p.fn(st.target), args, st.span)
        if st.op == "region":
            return self._region_types(st, args)
        if st.op == "fused_linear":  # each part typed as the call it replaced
            parts = [c.value for c in dict(st.kwargs)["parts"].items]
            out = []
            for part in parts:
                child, params = self._submodule(ctx, part, st.span)
                out += self.call_module(child, params, "", args, st.span)
            return out
        rule = PRIMITIVES[st.op]
        if st.op == "reshape" and len(args) == 2 and isinstance(args[1], list):
            args[1] = self._reshape_dims(st, ctx)
        try:
            out = rule(args, kwargs)
        except OpTypeError as e:
            message = e.message
            if st.op == "activation" and len(st.args) == 2 and isinstance(st.args[1], N.Ref):
                ref = st.args[1]
                what = {"config": "config field", "param": "module parameter"}.get(ref.kind, "value")
                message += f" (the value of {what} `{ref.name}`)"
            self.rep.error(e.code, message, st.span, *e.help)
            raise _Stop from None
        return out

    def _region_types(self, st: N.Op, args: list) -> list:
        """Type a fused region by running its ops through the primitive rules (each call of a grouped op)."""
        region = next(r for r in self.p.regions if r.name == st.target)
        n = len(region.inputs)
        if len(args) > n:  # `group = 2`: the first call's inputs, then the second's
            return [t for k in range(0, len(args), n) for t in self._region_types(st, args[k : k + n])]
        env = {i.name: a for i, a in zip(region.inputs, args)}
        for op in region.ops:
            vals = [env[a] if isinstance(a, str) else a for a in op.args]
            kw = {}
            if op.op == "cast":
                dtype = dict(op.attrs)["dtype"]
                vals.append(env[dtype[len("input:") :]].dtype if dtype.startswith("input:") else dtype)
            elif op.op == "activation":
                vals.append(env[dict(op.attrs)["name"]])
            elif op.op in ("sum", "mean", "amax"):
                kw = {"dim": -1, "keepdim": True}
            try:
                env[op.result] = PRIMITIVES[op.op](vals, kw)[0]
            except OpTypeError as e:
                self.rep.error(e.code, f"fused region `{region.name}`: {e.message}", st.span)
                raise _Stop from None
        return [env[o] for o in region.outputs]

    def _weight(self, ctx: _Ctx, name: str, span: Span):
        """A weight of this module, or `sub.weight` of a submodule (after inlining)."""
        if "." not in name:
            return ctx.weights[name]
        sub, _, rest = name.partition(".")
        found = self._submodule(ctx, sub, span)
        child, params = found
        return self._weight(_Ctx(child, params, self._weights_of(child, params), {}), rest, span)

    def _submodule(self, ctx: _Ctx, name: str, span: Span):
        """(definition, parameter values) of a submodule or loop variable; params None when absent."""
        name = ctx.loop_vars.get(name, name)
        if name in ctx.sub_cache:
            return ctx.sub_cache[name]
        sdef = next((s for s in ctx.mdef.submodules if s.name == name), None) if ctx.mdef else None
        if sdef is None:
            return None
        lookup = self._lookup(ctx.params)
        try:
            side = N.chosen(sdef, lookup)  # a choice `A() if c else B()`: the module this instance holds
        except EvalError as e:
            self.rep.error("E021", str(e), sdef.span)
            raise _Stop from None
        child = self.p.module((side or sdef).module)
        try:
            params = self.bind_params(child, side.args, side.kwargs, lookup, side.span) if side else None
        except Exception:
            raise _Stop from None
        ctx.sub_cache[name] = (child, params)
        return ctx.sub_cache[name]

    def _reshape_dims(self, st: N.Op, ctx: _Ctx) -> list:
        """Reshape targets may name the symbols bound from the arguments (B, T) and sizes."""
        target = st.args[1]
        assert isinstance(target, N.ListE)
        return [
            self._eval_dim(d, ctx.params, ctx.bindings, st.span)
            if not (isinstance(d, N.Const) and d.value == -1)
            else -1
            for d in target.items
        ]

    def _loop(self, st: N.Loop, ctx: _Ctx) -> None:
        for inp, param in zip(st.inputs, st.params):
            ctx.types[param] = ctx.types[inp]
        ctx.loop_vars[st.var] = st.over
        for layer, index in self._passes(ctx, st):
            if layer is not None:
                ctx.sub_cache[st.over] = layer
            if index is not None:
                ctx.params[LOOP_INDEX + st.index] = index
            self._run(st.body, ctx)
            for y, v in zip(st.yields, st.vars):
                if ctx.types.get(y) != ctx.types.get(self._find_param(st, v)):
                    self.rep.error(
                        "E030",
                        f"`{v}` changes type across a loop pass: {ctx.types.get(self._find_param(st, v))}"
                        f" -> {ctx.types.get(y)}",
                        st.span,
                        "each layer of a stack must keep its carried shape",
                    )
                    raise _Stop
        for y, r in zip(st.yields, st.results):
            ctx.types[r] = ctx.types[y]
        del ctx.loop_vars[st.var]
        ctx.params.pop(LOOP_INDEX + st.index, None)

    def _passes(self, ctx: _Ctx, st: N.Loop) -> list[tuple]:
        """(layer instance or None, layer index or None) of each pass the checker makes over a loop body: once, or
        once per distinct layer kind, or, when the body reads the layer index (`for i, layer in layers`), once
        per layer."""
        kinds = self._layer_instances(ctx, st.over, every=bool(st.index))
        if not st.index:
            return [(k, None) for k in kinds or [None]]
        if kinds is None:
            sdef = next(s for s in ctx.mdef.submodules if s.name == st.over)
            try:
                kinds = [None] * evaluate(sdef.repeat, self._lookup(ctx.params))
            except EvalError as e:
                self.rep.error("E021", str(e), sdef.span)
                raise _Stop from None
        return [(k, i) for i, k in enumerate(kinds)]

    def _branch(self, st: N.Branch, ctx: _Ctx) -> None:
        """The side this config takes is checked and gives the result's type. The other side is checked too, but
        its errors are kept back: it may read what this config leaves out (an absent option, a none field);
        `dslc check --set` with a config that takes it reports them."""
        try:
            taken = bool(evaluate(st.test, self._lookup(ctx.params)))
        except EvalError as err:
            self.rep.error("E021", str(err), st.span)
            raise _Stop from None
        sides = [(st.then, st.then_value), (st.orelse, st.else_value)]
        body, value = sides[0 if taken else 1]
        self._run(body, ctx)
        result = self._operand(value, ctx, st.span)
        if not isinstance(result, TType):
            self.rep.error("E041", f"`a if c else b` gives {result!r} here, where a tensor is needed", st.span)
            raise _Stop
        ctx.types[st.results[0]] = result
        other, other_value = sides[1 if taken else 0]
        reporter, self.rep = self.rep, Reporter()
        try:
            self._run(other, ctx)
            self._operand(other_value, ctx, st.span)
        except _Stop:
            pass
        finally:
            self.rep = reporter

    def _layer_instances(self, ctx: _Ctx, stack: str, every: bool = False) -> list | None:
        """For a `repeat` whose layer arguments read the layer index `i`: (module, params) of each distinct
        layer, in layer order (of every layer, with `every`); None for a stack of identical layers."""
        sdef = next((s for s in ctx.mdef.submodules if s.name == stack), None) if ctx.mdef else None
        if sdef is None or not N.per_layer(sdef):
            return None
        lookup = self._lookup(ctx.params)
        child = self.p.module(sdef.module)
        try:
            n = evaluate(sdef.repeat, lookup)
            layers = [
                self.bind_params(child, sdef.args, sdef.kwargs, N.with_layer_index(lookup, i), sdef.span)
                for i in range(n)
            ]
        except EvalError as e:
            self.rep.error("E021", str(e), sdef.span)
            raise _Stop from None
        except Exception:
            raise _Stop from None
        if every:
            return [(child, p) for p in layers]
        distinct = {tuple(sorted(p.items(), key=lambda kv: kv[0])): p for p in layers}
        return [(child, p) for p in distinct.values()]

    @staticmethod
    def _find_param(st: N.Loop, var: str) -> str:
        return st.params[st.vars.index(var)]


LOOP_INDEX = "\0loop index "  # ctx.params key prefix of a `for i, layer in layers` index during its pass


class _Ctx:
    """The module instance a body is inferred in."""

    def __init__(self, mdef: N.ModuleDef | None, params: dict, weights: dict, statics: dict):
        self.mdef = mdef
        self.params = params
        self.weights = weights
        self.statics = statics
        self.types: dict[str, TType] = {}
        self.loop_vars: dict[str, str] = {}
        self.bindings: dict = {}
        self.sub_cache: dict = {}


def _has_sym(e: N.E) -> bool:
    from dslc.ir.evaluate import free_refs

    return any(r.kind == "sym" for r in free_refs(e))


def _dt(d: str) -> str:
    return "the model's float dtype" if d == "float" else d


def _show_dim(d: N.E) -> str:
    from dslc.ir.printer import expr_text

    return expr_text(d).replace("$", "")  # params by their plain names
