"""The IR's validity rules as code: `verify_program(p)` lists every broken rule ([] when valid).

Lowering produces valid IR; a pass must keep it valid, so tests run the verifier after every pass.
The rules:
- config: field names unique; defaults, requires and arch overrides read config fields only; aliases,
  arch overrides and evaluated values name fields; arch names unique and bases exist;
- modules: names unique, in dependency order (a submodule's module comes earlier; the model is last);
  params, weights and submodules uniquely named; static expressions read module params and config fields
  only; weight dtypes, initializers and tie paths valid; `uses_config` set when config is read;
- forward bodies (SSA): every value defined once (arguments, op results, loop params and results),
  defined before use and used only in its scope (a loop body's values stay inside the loop); ops are
  primitives (or `extra_ops`), `call` (a non-repeat submodule or the enclosing loop's variable), `fn` (an
  existing FnDef) or `region` (an existing fused region, inputs and outputs matching); weight, param,
  config, sym and dtype references resolve (`&norm.weight`, a submodule's weight, as inlining leaves it);
  outputs and loop yields are defined;
  loops run over `repeat` submodules; fns contain no calls, loops, weights or config reads;
- fns: names unique, callees listed before callers;
- instance weights: names unique, positive int shapes, `tied_to` names an existing untied weight of the
  same shape;
- checkpoint transforms and train hints name known things;
- fused regions (`Program.regions`): names unique, SSA inside (inputs, then one result per op), region
  ops known, outputs defined.
"""

from __future__ import annotations

from collections.abc import Collection

from dslc.check.primitives import PRIMITIVES
from dslc.diagnostics import Span
from dslc.ir import nodes as N
from dslc.ir.evaluate import free_refs

INITS = ("normal", "zeros", "ones")
SCALAR_TYPES = ("int", "float", "bool", "str")
LIST_TYPES = tuple(f"list[{t}]" for t in SCALAR_TYPES)  # config fields may also be lists (layer_types, longrope)


def _at(span: Span) -> str:
    return f" (at {span})"


def _dups(names) -> list[str]:
    seen, out = set(), []
    for n in names:
        if n in seen and n not in out:
            out.append(n)
        seen.add(n)
    return out


class _Verifier:
    def __init__(self, program: N.Program, extra_ops: Collection[str] = ()):
        self.p = program
        self.extra_ops = frozenset(extra_ops)
        self.errors: list[str] = []
        self.fields = {f.name for f in program.config.fields}
        self.modules = {m.name: m for m in program.modules}
        self.fns = {f.name: f for f in program.fns}
        self.regions = {r.name: r for r in getattr(program, "regions", ())}

    def err(self, msg: str, span: Span | None = None) -> None:
        self.errors.append(msg + (_at(span) if span is not None else ""))

    # ---- static expressions ------------------------------------------------------------------
    def static(self, e: N.E | None, where: str, span: Span, params: set[str] | None, layer_index: bool = False) -> bool:
        """Check a build-time expression: config fields, module params when `params` is given, the layer index
        `i` when `layer_index` (a repeat's module arguments). Returns whether it reads a config field."""
        if e is None:
            return False
        uses_config = False
        for r in free_refs(e):
            if r.kind == "config":
                uses_config = True
                if r.name not in self.fields:
                    self.err(f"{where}: unknown config field `{r.name}`", span)
            elif r.kind == "param" and params is not None:
                if r.name not in params:
                    self.err(f"{where}: unknown module parameter `${r.name}`", span)
            elif r != N.LAYER_INDEX or not layer_index:
                self.err(f"{where}: a `{r.kind}` reference (`{r.name}`) is not allowed in a build-time value", span)
        return uses_config

    # ---- config ----------------------------------------------------------------------------------
    def config(self) -> None:
        c = self.p.config
        for n in _dups(f.name for f in c.fields):
            self.err(f"config: field `{n}` is defined twice")
        for f in c.fields:
            if f.type not in SCALAR_TYPES + LIST_TYPES:
                self.err(f"config field `{f.name}`: unknown type `{f.type}`", f.span)
            self.static(f.default, f"config field `{f.name}`", f.span, None)
        for key, field in c.aliases:
            if field not in self.fields:
                self.err(f"config alias `{key}` names unknown field `{field}`")
        for r in c.requires:
            self.static(r.test, "require", r.span, None)
        archs = {a.name for a in c.archs}
        for n in _dups(a.name for a in c.archs):
            self.err(f"arch `{n}` is defined twice")
        for a in c.archs:
            if a.base is not None and a.base not in archs:
                self.err(f"arch `{a.name}` extends unknown arch `{a.base}`", a.span)
            for k, v in a.overrides:
                if k not in self.fields:
                    self.err(f"arch `{a.name}` overrides unknown field `{k}`", a.span)
                self.static(v, f"arch `{a.name}`", a.span, None)
        if self.p.arch is not None and self.p.arch not in archs:
            self.err(f"program arch `{self.p.arch}` is not declared")
        names = [k for k, _ in self.p.values]
        for n in _dups(names):
            self.err(f"config value `{n}` is given twice")
        for n in names:
            if n not in self.fields:
                self.err(f"config value `{n}` names no config field")

    # ---- modules -------------------------------------------------------------------------------
    def module_order(self) -> None:
        for n in _dups(m.name for m in self.p.modules):
            self.err(f"module `{n}` is defined twice")
        if not self.p.modules or self.p.modules[-1].name != self.p.model:
            self.err(f"the model `{self.p.model}` must be the last module")
        index = {m.name: i for i, m in enumerate(self.p.modules)}
        for i, m in enumerate(self.p.modules):
            for s in (c for sub in m.submodules for c in N.choices(sub)):
                j = index.get(s.module)
                if j is None:
                    self.err(
                        f"module `{m.name}`: submodule `{s.name}` instantiates unknown module `{s.module}`", s.span
                    )
                elif j >= i:
                    self.err(
                        f"module `{m.name}` is listed before its submodule's module `{s.module}` "
                        "(modules must be in dependency order, callees first)",
                        s.span,
                    )
            if m.name == self.p.model:
                if m.task not in N.TASKS:
                    self.err(f"model `{m.name}`: unknown task `{m.task}`", m.span)
            elif m.task is not None:
                self.err(f"module `{m.name}` has a task but is not the model", m.span)

    def module(self, m: N.ModuleDef) -> None:
        where = f"module `{m.name}`"
        params = {p.name for p in m.params}
        for n in _dups(p.name for p in m.params):
            self.err(f"{where}: parameter `{n}` is defined twice", m.span)
        for n in _dups([w.name for w in m.weights] + [s.name for s in m.submodules]):
            self.err(f"{where}: member `{n}` is defined twice", m.span)
        uses = False
        for p in m.params:
            if p.type not in SCALAR_TYPES:
                self.err(f"{where}: parameter `{p.name}` has unknown type `{p.type}`", p.span)
            uses |= self.static(p.default, f"{where} parameter `{p.name}`", p.span, params)
        for w in m.weights:
            ww = f"{where} weight `{w.name}`"
            for d in w.shape:
                uses |= self.static(d, ww, w.span, params)
            uses |= self.static(w.init_std, ww, w.span, params)
            uses |= self.static(w.condition, ww, w.span, params)
            if w.dtype not in N.DTYPES:
                self.err(f"{ww}: unknown dtype `{w.dtype}`", w.span)
            if w.init not in INITS:
                self.err(f"{ww}: unknown initializer `{w.init}`", w.span)
            if w.init_std is not None and w.init != "normal":
                self.err(f"{ww}: only `normal` takes a std", w.span)
        for s in (c for sub in m.submodules for c in N.choices(sub)):
            ws = f"{where} submodule `{s.name}`"
            if s.alternatives and s.repeat is not None:
                self.err(f"{ws}: a choice of modules cannot be a repeat stack", s.span)
            for a in s.args:
                uses |= self.static(a, ws, s.span, params, layer_index=s.repeat is not None)
            for _, v in s.kwargs:
                uses |= self.static(v, ws, s.span, params, layer_index=s.repeat is not None)
            uses |= self.static(s.repeat, ws, s.span, params)
            uses |= self.static(s.condition, ws, s.span, params)
            callee = self.modules.get(s.module)
            if callee is not None:
                names = [p.name for p in callee.params]
                if len(s.args) > len(names):
                    self.err(f"{ws}: `{s.module}` takes {len(names)} argument(s), got {len(s.args)}", s.span)
                for k, _ in s.kwargs:
                    if k not in names:
                        self.err(f"{ws}: `{s.module}` has no parameter `{k}`", s.span)
        for t in m.ties:
            uses |= self.static(t.condition, f"{where} tie", t.span, params)
            for path in (t.target, t.source):
                problem = self.path_problem(m, path)
                if problem:
                    self.err(f"{where}: tie path `{path}`: {problem}", t.span)
        if m.forward is None:
            self.err(f"{where} has no forward", m.span)
        else:
            uses |= _Graph(self, where + " forward", m, None, params).run(m.forward)
        if m.residual is not None:
            _Graph(self, where + " residual forward", m, None, params).run(m.residual)
        if uses and not m.uses_config:
            self.err(f"{where} reads config fields but `uses_config` is false", m.span)

    def path_problem(self, m: N.ModuleDef, path: str) -> str | None:
        """Why `path` (e.g. `model.embed_tokens.weight`) names no weight below module `m`, or None."""
        parts = path.split(".")
        cur = m
        i = 0
        while i < len(parts):
            part = parts[i]
            last = i == len(parts) - 1
            if last:
                return None if any(w.name == part for w in cur.weights) else f"`{cur.name}` has no weight `{part}`"
            sub = next((s for s in cur.submodules if s.name == part), None)
            if sub is None:
                return f"`{cur.name}` has no submodule `{part}`"
            if sub.repeat is not None:
                i += 1
                if i >= len(parts) - 1 or not parts[i].isdigit():
                    return f"`{part}` is a repeat stack: name a layer index, `{part}.0.`"
            if sub.alternatives:  # a choice: the path must exist in one of its modules
                rest = ".".join(parts[i + 1 :])
                if all(self.path_problem(self.modules[c], rest) for c in N.modules_of(sub) if c in self.modules):
                    return f"`{part}` is a choice of modules, none of which holds `{rest}`"
                return None
            nxt = self.modules.get(sub.module)
            if nxt is None:
                return f"unknown module `{sub.module}`"
            cur = nxt
            i += 1
        return "empty path"

    # ---- fns --------------------------------------------------------------------------------------
    def fn_order(self) -> None:
        for n in _dups(f.name for f in self.p.fns):
            self.err(f"fn `{n}` is defined twice")
        index = {f.name: i for i, f in enumerate(self.p.fns)}

        def walk(body, i: int, owner: str) -> None:
            for st in body:
                if isinstance(st, (N.Loop, N.Branch)):
                    for inner in N.bodies(st):
                        walk(inner, i, owner)
                elif st.op == "fn" and st.target in index and index[st.target] >= i:
                    self.err(
                        f"{owner}: fn `{st.target}` is listed after its caller (fns must be callees first)", st.span
                    )

        for i, f in enumerate(self.p.fns):
            walk(f.graph.body, i, f"fn `{f.name}`")

    # ---- instance weights, checkpoint, train ----------------------------------------------------------
    def weights(self) -> None:
        by_name = {w.name: w for w in self.p.weights}
        for n in _dups(w.name for w in self.p.weights):
            self.err(f"weight `{n}` appears twice in the weight tree")
        for w in self.p.weights:
            if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in w.shape):
                self.err(f"weight `{w.name}` has a non-positive or non-int size {list(w.shape)}", w.span)
            if w.dtype not in N.DTYPES:
                self.err(f"weight `{w.name}`: unknown dtype `{w.dtype}`", w.span)
            if w.init not in INITS:
                self.err(f"weight `{w.name}`: unknown initializer `{w.init}`", w.span)
            if w.tied_to is None:
                continue
            src = by_name.get(w.tied_to)
            if src is None:
                self.err(f"weight `{w.name}` is tied to unknown weight `{w.tied_to}`", w.span)
            elif src.tied_to is not None:
                self.err(f"weight `{w.name}` is tied to `{w.tied_to}`, which is itself tied to `{src.tied_to}`", w.span)
            elif src.name == w.name:
                self.err(f"weight `{w.name}` is tied to itself", w.span)
            elif src.shape != w.shape:
                self.err(
                    f"weight `{w.name}` {list(w.shape)} is tied to `{src.name}` of another shape {list(src.shape)}",
                    w.span,
                )

    def checkpoint_and_train(self) -> None:
        for r in self.p.checkpoint.rules:
            if not r.sources or not r.targets:
                self.err("checkpoint rule needs at least one source and one target", r.span)
            for name, kwargs in r.transforms:
                if name not in N.TRANSFORMS:
                    self.err(f"checkpoint rule: unknown transform `{name}`", r.span)
                for _, v in kwargs:
                    self.static(v, f"checkpoint transform `{name}`", r.span, set())
        for name in self.p.train.checkpointing:
            if name not in self.modules:
                self.err(f"train: activation checkpointing names unknown module `{name}`")
        for pattern, style in self.p.train.parallel:
            if style not in N.PARALLEL_STYLES:
                self.err(f"train: parallel `{pattern}` has unknown style `{style}`")

    def fused_regions(self) -> None:
        regions = getattr(self.p, "regions", ())
        if not regions:
            return
        from dslc.ir.regions import REGION_OPS

        for n in _dups(r.name for r in regions):
            self.err(f"region `{n}` is defined twice")
        for r in regions:
            where = f"region `{r.name}`"
            defined: set[str] = set()
            for i in r.inputs:
                if i.name in defined:
                    self.err(f"{where}: input `%{i.name}` is defined twice")
                if i.kind not in ("tensor", "scalar", "choice"):
                    self.err(f"{where}: input `%{i.name}` has unknown kind `{i.kind}`")
                defined.add(i.name)
            for op in r.ops:
                if op.op not in REGION_OPS:
                    self.err(f"{where}: unknown region op `{op.op}`")
                for a in op.args:
                    if isinstance(a, str) and a not in defined:
                        self.err(f"{where}: `%{a}` is used before it is defined")
                if op.result in defined:
                    self.err(f"{where}: `%{op.result}` is defined more than once (SSA)")
                defined.add(op.result)
            for o in r.outputs:
                if o not in defined:
                    self.err(f"{where}: output `%{o}` is not defined")
            if r.output_dtypes and len(r.output_dtypes) != len(r.outputs):
                self.err(f"{where}: {len(r.outputs)} output(s) but {len(r.output_dtypes)} output dtype(s)")

    def run(self) -> list[str]:
        self.config()
        self.module_order()
        for m in self.p.modules:
            self.module(m)
        self.fn_order()
        for f in self.p.fns:
            _Graph(self, f"fn `{f.name}`", None, f, set()).run(f.graph)
        self.weights()
        self.checkpoint_and_train()
        self.fused_regions()
        return self.errors


class _Graph:
    """SSA and reference rules for one forward or fn body."""

    def __init__(self, v: _Verifier, where: str, module: N.ModuleDef | None, fn: N.FnDef | None, params: set[str]):
        self.v = v
        self.where = where
        self.module = module
        self.is_fn = fn is not None
        self.params = set(params)
        self.weights = {w.name for w in module.weights} if module else set()
        self.subs = {s.name: s for s in module.submodules} if module else {}
        self.defined: set[str] = set()  # every value defined anywhere in the graph, for "defined once"
        self.syms: set[str] = set()
        self.uses_config = False

    def err(self, msg: str, span: Span) -> None:
        self.v.err(f"{self.where}: {msg}", span)

    def define(self, name: str, scope: set[str], span: Span) -> None:
        if name in self.defined:
            self.err(f"`%{name}` is defined more than once (SSA)", span)
        self.defined.add(name)
        scope.add(name)

    def refs(self, e: N.E, scope: set[str], span: Span) -> None:
        for r in free_refs(e):
            self.ref(r, scope, span)

    def ref(self, r: N.Ref, scope: set[str], span: Span) -> None:
        k, n = r.kind, r.name
        if k == "value":
            if n not in scope:
                self.err(
                    f"`%{n}` is used before it is defined"
                    if n not in self.defined
                    else f"`%{n}` is used outside the loop that defines it",
                    span,
                )
        elif k == "weight":
            if self.is_fn:
                self.err(f"a fn cannot read weight `&{n}`", span)
            elif "." in n and self.module is not None:  # a submodule's weight, as inlining leaves it
                problem = self.v.path_problem(self.module, n)
                if problem:
                    self.err(f"unknown weight `&{n}`: {problem}", span)
            elif n not in self.weights:
                self.err(f"unknown weight `&{n}`", span)
        elif k == "param":
            if n not in self.params:
                self.err(f"unknown {'scalar argument' if self.is_fn else 'module parameter'} `${n}`", span)
        elif k == "config":
            self.uses_config = True
            if self.is_fn:
                self.err(f"a fn cannot read config field `{n}`", span)
            elif n not in self.v.fields:
                self.err(f"unknown config field `{n}`", span)
        elif k == "sym":
            if n not in self.syms:
                self.err(f"size symbol `{n}` is not bound by the signature", span)
        elif k == "loop_index":
            if N.loop_index_key(n) not in scope:
                self.err(f"layer index `{n}` is read outside its `for {n}, ... in` loop", span)
        elif k == "dtype":
            if n not in N.DTYPES:
                self.err(f"unknown dtype `!{n}`", span)
        elif k == "dtype_of":
            if n.startswith("weight:"):
                self.ref(N.Ref("weight", n[len("weight:") :]), scope, span)
            else:
                self.ref(N.Ref("value", n), scope, span)
        else:
            self.err(f"unknown reference kind `{k}` (`{n}`)", span)

    def sig(self, s: N.TensorSig, scope: set[str], span: Span) -> None:
        if s.dtype not in N.DTYPES:
            self.err(f"unknown dtype `{s.dtype}` in a signature", span)
        for d in s.dims:
            if not (isinstance(d, N.Const) and d.value == "..."):
                self.refs(d, scope, span)

    def run(self, g: N.Graph) -> bool:
        scope: set[str] = set()
        for a in g.args:
            if (a.tensor is None) == (a.scalar_type is None):
                self.err(f"argument `{a.name}` must be either a tensor or a scalar", a.span)
            if a.tensor is not None:
                for d in a.tensor.dims:
                    self.syms |= {r.name for r in free_refs(d) if r.kind == "sym"}
            elif a.scalar_type is not None:
                if not self.is_fn:
                    self.err(f"argument `{a.name}`: forward arguments are tensors", a.span)
                elif a.scalar_type not in SCALAR_TYPES:
                    self.err(f"argument `{a.name}`: unknown type `{a.scalar_type}`", a.span)
                if a.name in self.params:
                    self.err(f"argument `{a.name}` is defined twice", a.span)
                self.params.add(a.name)
        for a in g.args:
            if a.tensor is not None:
                self.sig(a.tensor, scope, a.span)
                self.define(a.name, scope, a.span)
        self.body(g.body, scope, {})
        for o in g.outputs:
            if o not in scope:
                self.err(f"output `%{o}` is not defined", g.span)
        if g.result_sigs is not None:
            for s in g.result_sigs:
                self.sig(s, scope, g.span)
            if len(g.result_sigs) != len(g.outputs):
                self.err(f"declares {len(g.result_sigs)} result(s) but returns {len(g.outputs)}", g.span)
        return self.uses_config

    def body(self, body: tuple, scope: set[str], loop_vars: dict[str, str]) -> None:
        for st in body:
            if isinstance(st, N.Loop):
                self.loop(st, scope, loop_vars)
            elif isinstance(st, N.Branch):
                self.branch(st, scope, loop_vars)
            elif isinstance(st, N.Op):
                self.op(st, scope, loop_vars)
            else:
                self.v.err(f"{self.where}: not a statement: {type(st).__name__}")

    def op(self, op: N.Op, scope: set[str], loop_vars: dict[str, str]) -> None:
        for a in op.args:
            self.refs(a, scope, op.span)
        for n in _dups(k for k, _ in op.kwargs):
            self.err(f"`{op.op}`: keyword `{n}` is given twice", op.span)
        for _, v in op.kwargs:
            self.refs(v, scope, op.span)
        if op.op == "call":
            if self.is_fn:
                self.err(f"a fn cannot call module `{op.target}`", op.span)
            elif op.target in loop_vars:
                pass
            elif op.target in self.subs:
                if self.subs[op.target].repeat is not None:
                    self.err(f"`{op.target}` is a repeat stack: it is called through a loop", op.span)
            else:
                self.err(f"call of unknown submodule `{op.target}`", op.span)
            callee = self.v.modules.get(self.subs[op.target].module) if op.target in self.subs else None
            residual = dict(op.kwargs).keys() == {"residual"} and callee is not None and callee.residual is not None
            if op.kwargs and not residual:
                self.err(
                    f"call of `{op.target}` takes positional arguments only (or `residual` for a norm "
                    "given a residual forward)",
                    op.span,
                )
        elif op.op == "fn":
            if op.target not in self.v.fns:
                self.err(f"call of unknown fn `{op.target}`", op.span)
            if op.kwargs:
                self.err(f"call of fn `{op.target}` takes positional arguments only", op.span)
        elif op.op == "region":
            region = self.v.regions.get(op.target)
            if region is None:
                self.err(f"call of unknown region `{op.target}`", op.span)
            else:
                calls = N.group_size(op)
                each = f" per call ({calls} calls)" if calls > 1 else ""
                if len(op.args) != calls * len(region.inputs):
                    self.err(
                        f"region `{op.target}` takes {len(region.inputs)} input(s){each}, got {len(op.args)}", op.span
                    )
                if len(op.results) != calls * len(region.outputs):
                    self.err(
                        f"region `{op.target}` gives {len(region.outputs)} output(s){each}, the op names "
                        f"{len(op.results)}",
                        op.span,
                    )
        elif op.op == "fused_linear":
            parts = dict(op.kwargs).get("parts")
            names = [c.value for c in parts.items] if isinstance(parts, N.ListE) else []
            groups = dict(self.module.projection_groups) if self.module is not None else {}
            if groups.get(op.target) != tuple(names):
                self.err(f"fused_linear `{op.target}` does not match the module's projection groups", op.span)
            if len(names) != len(op.results):
                self.err(f"fused_linear `{op.target}` has {len(names)} parts but {len(op.results)} results", op.span)
        elif op.op in PRIMITIVES or op.op in self.v.extra_ops:
            if op.target:
                self.err(f"primitive `{op.op}` has a target `{op.target}`", op.span)
        else:
            self.err(f"unknown op `{op.op}`", op.span)
        if len(op.vars) != len(op.results):
            self.err(f"`{op.op}` has {len(op.results)} result(s) but {len(op.vars)} var name(s)", op.span)
        for r in op.results:
            self.define(r, scope, op.span)

    def loop(self, lp: N.Loop, scope: set[str], loop_vars: dict[str, str]) -> None:
        if self.is_fn:
            self.err("a fn cannot loop over modules", lp.span)
        sub = self.subs.get(lp.over)
        if sub is None:
            self.err(f"loop over unknown submodule `{lp.over}`", lp.span)
        elif sub.repeat is None:
            self.err(f"loop over `{lp.over}`, which is not a repeat stack", lp.span)
        lengths = {len(lp.inputs), len(lp.params), len(lp.yields), len(lp.results), len(lp.vars)}
        if len(lengths) != 1:
            self.err(f"loop over `{lp.over}`: inputs, params, yields, results and vars differ in length", lp.span)
        for i in lp.inputs:
            if i not in scope:
                self.err(f"loop input `%{i}` is not defined", lp.span)
        inner = set(scope)
        if lp.index:
            inner.add(N.loop_index_key(lp.index))
        for p in lp.params:
            self.define(p, inner, lp.span)
        self.body(lp.body, inner, {**loop_vars, lp.var: lp.over})
        for y in lp.yields:
            if y not in inner:
                self.err(f"loop yield `%{y}` is not defined", lp.span)
        for r in lp.results:
            self.define(r, scope, lp.span)

    def branch(self, br: N.Branch, scope: set[str], loop_vars: dict[str, str]) -> None:
        if any(r.kind in ("value", "weight") for r in free_refs(br.test)):
            self.err("a branch's test must be a build-time value, not a tensor", br.span)
        self.refs(br.test, scope, br.span)
        for side, value in ((br.then, br.then_value), (br.orelse, br.else_value)):
            inner = set(scope)
            self.body(side, inner, loop_vars)
            self.refs(value, inner, br.span)
        if len(br.results) != 1 or len(br.vars) != 1:
            self.err("a branch gives one value (one result, one var name)", br.span)
        for r in br.results:
            self.define(r, scope, br.span)


def verify_program(program: N.Program, extra_ops: Collection[str] = ()) -> list[str]:
    """Every broken IR rule as a message (with its source location where there is one); [] when valid.

    `extra_ops` names ops a pass introduces beyond the primitives (e.g. a fused region), so a pipeline
    can verify after each pass: `assert verify_program(p, extra_ops=FUSED_OPS) == []`.
    """
    return _Verifier(program, extra_ops).run()
