"""AST -> IR: evaluate the config for one arch, resolve names, lower forwards to SSA, instantiate.

`lower(files, arch=..., overrides=...)` returns a `Program`; problems become located diagnostics.
Shapes and dtypes are checked afterwards by `dslc.check`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dslc.check.primitives import PRIMITIVES
from dslc.diagnostics import Reporter, Span, did_you_mean
from dslc.ir import nodes as N
from dslc.ir.evaluate import STATIC_UNARY, EvalError, evaluate, free_refs
from dslc.ir.names import config_flags, identifier_problem
from dslc.syntax import ast as A

SCALAR_TYPES = ("int", "float", "bool", "str")
LIST_TYPES = tuple(f"list[{t}]" for t in SCALAR_TYPES)  # config fields only (HF's layer_types)
INITS = ("normal", "zeros", "ones")
ROUTER_OPTIONS = tuple(o[0] for o in N.LOSSES["load_balance"].options)  # num_experts, top_k, coef (Mixtral's)
MAX_REPEAT = 100_000  # layers in one `repeat` stack
STATIC_CALLS = (*STATIC_UNARY, "min", "max")  # the functions a build-time expression may call
MAX_WEIGHT_TENSORS = 1_000_000  # weight tensors in one model: the compiler lists each (checkpoint names, ties)
MAX_NESTING = 32  # submodules inside submodules, fns calling fns: deeper is refused (E005), never a RecursionError


class _Abort(Exception):
    """Stop lowering one declaration; the reporter already holds the diagnostic."""


class _Reported(EvalError):
    """A config value depends on a field whose error is already reported."""


def _check_type(value, type_: str, optional: bool) -> bool:
    if value is None:
        return optional
    if type_ == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_ == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if type_ == "bool":
        return isinstance(value, bool)
    if type_ == "str":
        return isinstance(value, str)
    if type_ in LIST_TYPES:
        return isinstance(value, list) and all(_check_type(v, type_[5:-1], False) for v in value)
    return True  # an unknown type name: already reported as such


def _coerce(value, type_: str):
    if type_ == "list[float]" and isinstance(value, list):
        return [float(v) for v in value]
    return float(value) if type_ == "float" and isinstance(value, int) else value


def _show(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "none"
    return repr(v) if isinstance(v, str) else str(v)


def parse_override_value(text: str):
    """`--set key=value` values: true/false/none, ints, floats, a JSON list (`[1, 2]`, `["a", "b"]`), else a string."""
    t = text.strip()
    if t.startswith("[") and t.endswith("]"):
        import json

        try:
            value = json.loads(t)
        except ValueError:
            return t
        return value if isinstance(value, list) else t
    if t in ("true", "false"):
        return t == "true"
    if t == "none":
        return None
    for conv in (int, float):
        try:
            return conv(t.replace("_", ""))
        except ValueError:
            pass
    return t


@dataclass
class ConfigEvaluation:
    """The config as the check evaluated it, once per arch; codegen renders these values, never re-evaluates."""

    values: dict  # the build's values: its arch, its `--set` overrides, derived defaults following them
    fixed: tuple[str, ...]  # fields the build's arch chain or `--set` gives a value (the package's defaults)
    arch_values: dict[str, dict]  # arch -> {field its `extends` chain sets: value, evaluated in that arch}
    defaults: dict  # field -> the spec's own default value (None for a derived one), where it has one


@dataclass
class _Decls:
    configs: dict[str, A.ConfigDecl]
    modules: dict[str, A.ModuleDecl]
    fns: dict[str, A.FnDecl]
    archs: list[A.ArchDecl]
    checkpoints: list[A.CheckpointDecl]
    trains: list[A.TrainDecl]


class Lowering:
    def __init__(
        self,
        spec: A.File,
        std: A.File | None,
        arch: str | None,
        overrides: dict[str, str],
        exact: dict | None = None,
    ):
        """`overrides`: `--set` texts by field; `exact`: field values given as values (a config variant the
        check tries), applied the same way after them."""
        self.spec = spec
        self.std = std
        self.arch = arch
        self.overrides = {**overrides, **(exact or {})}
        self._exact = set(exact or ())
        self.rep = Reporter()
        self._pending_ties: list[tuple] = []  # (target, source, TieDef, prefix) of each instantiated tie
        self._n_weights = 0  # weight tensors instantiated so far

    # ---- entry ------------------------------------------------------------------------
    def run(self) -> N.Program:
        decls = self._collect()
        models = [m for m in decls.modules.values() if m.is_model]
        if not models:
            self.rep.error(
                "E014",
                "no `model` declaration",
                Span.at(self.spec.path, 1, 1),
                "declare the top-level network: `model Name(Config): causal_lm` followed by its members",
            )
            self.rep.raise_if_errors()
        if len(models) > 1:
            self.rep.error(
                "E011", f"more than one `model` declaration (`{models[0].name}` and `{models[1].name}`)", models[1].span
            )
        model = models[0]
        config_decl = decls.configs.get(model.config or "")
        if config_decl is None:
            span = model.span
            self.rep.error(
                "E010",
                f"unknown config `{model.config}`",
                span,
                did_you_mean(model.config or "", decls.configs) or "declare it with `config Name:`",
            )
            self.rep.raise_if_errors()
        config_decl = self._with_base(config_decl, decls.configs)
        if model.task not in N.TASKS:
            self.rep.error(
                "E015",
                f"unknown task `{model.task}`",
                model.span,
                did_you_mean(model.task or "", N.TASKS) or f"tasks: {', '.join(N.TASKS)}",
            )
        self.config_fields = {f.name: f for f in config_decl.fields}
        config = self._lower_config(config_decl, decls.archs)
        values = self._evaluate_config(config)
        self.rep.raise_if_errors()
        self.values = values
        self.decls = decls

        module_defs: dict[str, N.ModuleDef] = {}
        fn_defs: dict[str, N.FnDef] = {}
        # A std module is checked against this spec's config only where the model uses it: one that names
        # config fields (std's RotaryEmbedding reads RopeConfig's) keeps its errors until it is instantiated.
        self._std_errors: dict[str, list] = {}
        for name, m in decls.modules.items():
            mark = len(self.rep.diagnostics)
            try:
                module_defs[name] = self._lower_module(m)
            except _Abort:
                pass
            found = self.rep.diagnostics[mark:]
            if self.std is not None and m.span.file == self.std.path and any(d.is_error for d in found):
                self._std_errors[name] = found
                del self.rep.diagnostics[mark:]
        for name, f in decls.fns.items():
            try:
                fn_defs[name] = self._lower_fn(f)
            except _Abort:
                pass
        self.rep.raise_if_errors()
        self.module_defs = module_defs
        self.fn_defs = fn_defs
        self._check_fn_calls()
        self.rep.raise_if_errors()

        order = self._dependency_order(model.name)
        fns_used = self._fns_used(order)
        mark = len(self.rep.diagnostics)
        weights = self._instantiate(model.name, {}, "", (), model.span)
        weights = self._apply_ties(weights)
        # An instance that failed has no weights: rules naming them would cascade from its error.
        complete = not any(d.is_error for d in self.rep.diagnostics[mark:])
        possible = self._possible_paths(model.name)
        checkpoint = self._lower_checkpoint(decls.checkpoints)
        if complete:
            self._check_layout(checkpoint, weights, possible)
        train = self._lower_train(decls.trains, order)
        router = self._lower_router(decls.modules, model, weights if complete else None, possible)
        losses = self._lower_losses(decls.modules, model)
        self.rep.raise_if_errors()
        return N.Program(
            source=self.spec.path,
            model=model.name,
            config=config,
            arch=self.arch,
            values=tuple(values.items()),
            modules=tuple(module_defs[n] for n in order),
            fns=tuple(fn_defs[n] for n in fns_used),
            checkpoint=checkpoint,
            train=train,
            weights=tuple(weights),
            router=router,
            losses=losses,
        )

    # ---- declarations ---------------------------------------------------------------------
    def _collect(self) -> _Decls:
        d = _Decls({}, {}, {}, [], [], [])
        files = [self.spec]
        uses = {u.name: u for u in self.spec.uses}
        for name, use in uses.items():
            if name != "std":
                self.rep.error("E010", f"unknown library `{name}`", use.span, did_you_mean(name, ["std"]))
        if "std" in uses and self.std is not None:
            files.insert(0, self.std)
        seen: dict[str, Span] = {}
        for f in files:
            for kind, items in (("config", f.configs), ("module", f.modules), ("fn", f.fns)):
                for item in items:
                    problem = identifier_problem(item.name, role=kind)
                    if problem:
                        self.rep.error("E012", problem, item.span)
                    if item.name in seen and f is self.spec and seen[item.name].file != f.path:
                        pass  # a spec may redefine a std declaration: its own wins
                    elif item.name in seen:
                        self.rep.error(
                            "E011",
                            f"`{item.name}` is defined twice",
                            item.span,
                            notes=(f"first defined at {seen[item.name]}",),
                        )
                        continue
                    seen[item.name] = item.span
                    target = {"config": d.configs, "module": d.modules, "fn": d.fns}[kind]
                    for other in (d.configs, d.modules, d.fns):
                        other.pop(item.name, None)
                    target[item.name] = item
        d.archs = list(self.spec.archs)
        d.checkpoints = list(self.spec.checkpoints)
        d.trains = list(self.spec.trains)
        return d

    # ---- expressions ---------------------------------------------------------------------------
    def _static(self, expr: A.Expr, resolve) -> N.E:
        """Lower a static (build-time) expression; `resolve(Name) -> N.E` binds names."""
        if isinstance(expr, A.Lit):
            return N.Const(expr.value)
        if isinstance(expr, A.Name):
            return resolve(expr)
        if isinstance(expr, A.BinOp):
            return N.BinE(expr.op, self._static(expr.left, resolve), self._static(expr.right, resolve))
        if isinstance(expr, A.UnaryOp):
            return N.UnE(expr.op, self._static(expr.operand, resolve))
        if isinstance(expr, A.Cond):
            return N.CondE(
                self._static(expr.then, resolve), self._static(expr.test, resolve), self._static(expr.orelse, resolve)
            )
        if isinstance(expr, A.ListLit):
            return N.ListE(tuple(self._static(i, resolve) for i in expr.items))
        if isinstance(expr, A.Call) and isinstance(expr.func, A.Name) and expr.func.id in STATIC_CALLS:
            return self._static_call(expr, resolve)
        if isinstance(expr, A.Index):
            return N.BinE("[]", self._static(expr.obj, resolve), self._static(expr.index, resolve))
        self.rep.error(
            "E016",
            "expected a value known at build time",
            expr.span,
            f"calls other than {', '.join(f'{c}()' for c in STATIC_CALLS)} and attributes are not allowed here",
        )
        raise _Abort

    def _static_call(self, expr: A.Call, resolve) -> N.E:
        """`int(x)`, `float(x)` (truncating, as Python), `log`, `sqrt`, `floor`, `ceil`, `min(a, b)`, `max(a, b)`
        over build-time values."""
        name = expr.func.id
        want = 1 if name in STATIC_UNARY else 2
        if len(expr.args) != want or expr.kwargs:
            self.rep.error("E040", f"`{name}` takes {want} argument(s) here", expr.span)
            raise _Abort
        args = [self._static(a, resolve) for a in expr.args]
        if want == 1:
            return N.UnE(name, args[0])
        a, b = args
        return N.CondE(a, N.BinE("<=" if name == "min" else ">=", a, b), b)

    def _unknown(self, name: A.Name, candidates, what: str = "name") -> None:
        self.rep.error("E010", f"unknown {what} `{name.id}`", name.span, did_you_mean(name.id, candidates))
        raise _Abort

    def _config_resolver(self, extra: dict[str, N.E] | None = None):
        def resolve(n: A.Name) -> N.E:
            if extra and n.id in extra:
                return extra[n.id]
            if n.id in self.config_fields:
                return N.Ref("config", n.id)
            self._unknown(n, list(self.config_fields) + list(extra or ()))
            raise AssertionError

        return resolve

    # ---- config -----------------------------------------------------------------------------------
    def _with_base(self, decl: A.ConfigDecl, configs: dict[str, A.ConfigDecl]) -> A.ConfigDecl:
        """`config C(Base):` is Base's fields, aliases and requires (its own base's first), then C's: a field C
        declares replaces Base's field of that name, and C's `from_hf` of a key replaces Base's of that key."""
        chain = [decl]
        while chain[-1].base is not None:
            ref = chain[-1].base
            base = configs.get(ref.id)
            if base is None:
                self.rep.error(
                    "E010",
                    f"unknown config `{ref.id}`",
                    ref.span,
                    did_you_mean(ref.id, [c for c in configs if c != chain[-1].name])
                    or "declare it with `config Name:`",
                )
                self.rep.raise_if_errors()
            if base in chain:
                cycle = " -> ".join([c.name for c in chain[chain.index(base) :]] + [base.name])
                self.rep.error("E060", f"config `{base.name}` extends itself", ref.span, notes=(f"through {cycle}",))
                self.rep.raise_if_errors()
            chain.append(base)
        fields, aliases, requires = [], [], []
        for level in reversed(chain):
            names, keys = {f.name for f in level.fields}, {a.hf_key for a in level.aliases}
            fields = [f for f in fields if f.name not in names] + list(level.fields)
            aliases = [a for a in aliases if a.hf_key not in keys] + list(level.aliases)
            requires += level.requires
        return replace(decl, fields=tuple(fields), aliases=tuple(aliases), requires=tuple(requires))

    def _lower_config(self, decl: A.ConfigDecl, archs: list[A.ArchDecl]) -> N.ConfigDef:
        fields, seen = [], set()
        self._failed_fields: set[str] = set()
        self.override_spans: dict[tuple[str, str], Span] = {}  # (arch, field) -> the override's span
        resolve = self._config_resolver()
        for f in decl.fields:
            problem = identifier_problem(f.name, role="config field")
            if problem:
                self.rep.error("E012", problem, f.span)
            elif f.name in config_flags() and f.type.name != "bool":
                self.rep.error(
                    "E021",
                    f"config field `{f.name}` must be bool: the generated model reads it as "
                    "a forward flag, as transformers does",
                    f.type.span,
                )
            if f.name in seen:
                self.rep.error("E011", f"config field `{f.name}` is defined twice", f.span)
            seen.add(f.name)
            if f.type.name not in SCALAR_TYPES + LIST_TYPES:
                self.rep.error(
                    "E021",
                    f"unknown type `{f.type.name}`",
                    f.type.span,
                    did_you_mean(f.type.name, SCALAR_TYPES + LIST_TYPES)
                    or f"types: {', '.join(SCALAR_TYPES + LIST_TYPES)}",
                )
            try:
                default = self._static(f.default, resolve) if f.default is not None else None
            except _Abort:
                default = None
                self._failed_fields.add(f.name)
            fields.append(N.FieldDef(f.name, f.type.name, f.type.optional, default, f.doc, f.span))
        aliases, alias_at = [], {}
        for a in decl.aliases:
            if a.field not in seen:
                self.rep.error(
                    "E010", f"alias target `{a.field}` is not a config field", a.span, did_you_mean(a.field, seen)
                )
            if a.hf_key in alias_at:
                first, at = alias_at[a.hf_key]
                self.rep.error(
                    "E011",
                    f"config.json key `{a.hf_key}` is mapped twice (to `{first}` and `{a.field}`)",
                    a.span,
                    "keep one `from_hf` line per key",
                    notes=(f"first mapped at {at}",),
                )
                continue
            alias_at[a.hf_key] = (a.field, a.span)
            aliases.append((a.hf_key, a.field))
        requires = []
        for r in decl.requires:
            try:
                test = self._static(r.test, resolve)
            except _Abort:
                continue
            requires.append(N.RequireDef(test, r.message or "", r.span))
        arch_defs, names = [], set()
        for a in archs:
            if a.name in names:
                self.rep.error("E011", f"arch `{a.name}` is defined twice", a.span)
            names.add(a.name)
            ovs, set_here = [], set()
            for o in a.overrides:
                if o.name not in seen:
                    self.rep.error("E010", f"unknown config field `{o.name}`", o.span, did_you_mean(o.name, seen))
                    continue
                if o.name in set_here:
                    self.rep.error("E011", f"arch `{a.name}` sets `{o.name}` twice", o.span)
                    continue
                set_here.add(o.name)
                self.override_spans[(a.name, o.name)] = o.span
                try:
                    ovs.append((o.name, self._static(o.value, resolve)))
                except _Abort:
                    pass
            arch_defs.append(N.ArchDef(a.name, a.base, tuple(ovs), a.span))
        for a in arch_defs:
            if a.base is not None and a.base not in names:
                self.rep.error(
                    "E022",
                    f"unknown base arch `{a.base}`",
                    a.span,
                    did_you_mean(a.base, names) or f"archs: {', '.join(sorted(names))}",
                )
        return N.ConfigDef(decl.name, tuple(fields), tuple(aliases), tuple(requires), tuple(arch_defs), decl.span)

    def _arch_overrides(self, config: N.ConfigDef) -> dict[str, dict | None]:
        """Per arch: field -> (expression, span, arch setting it), merged along its `extends` chain (the most
        derived arch wins); None for an arch whose chain has a cycle (E023, reported here once per cycle) or an
        unknown base (E022, reported at the `extends`). Each arch is resolved once: linear in the archs."""
        by_name = {a.name: a for a in config.archs}
        memo: dict[str, dict | None] = {}
        reported: set[frozenset] = set()
        for start in by_name:
            path: list[str] = []
            on_path: set[str] = set()
            cur = start
            while cur is not None and cur not in memo and cur in by_name and cur not in on_path:
                path.append(cur)
                on_path.add(cur)
                cur = by_name[cur].base
            if cur is None:
                base: dict | None = {}
            elif cur in memo:
                base = memo[cur]
            elif cur in on_path:
                cycle = path[path.index(cur) :]
                if frozenset(cycle) not in reported:
                    reported.add(frozenset(cycle))
                    what = (
                        f"arch `{cur}` extends itself"
                        if len(cycle) == 1
                        else "archs extend each other in a cycle: " + " -> ".join(f"`{c}`" for c in cycle + [cur])
                    )
                    self.rep.error("E023", what, by_name[cur].span, "remove one `extends` to break the cycle")
                base = None
            else:  # an unknown base
                base = None
            for name in reversed(path):
                if base is not None:
                    a = by_name[name]
                    base = {
                        **base,
                        **{k: (e, self.override_spans.get((name, k), a.span), name) for k, e in a.overrides},
                    }
                memo[name] = base
        return memo

    def _evaluate_config(self, config: N.ConfigDef) -> dict:
        """The build's field values (its arch and `--set` overrides; derived defaults follow overrides).

        The spec's own defaults and every arch are evaluated too, each once, and checked the same way (types,
        requirements): an arch that is never selected still fails the check. `self.config_eval` keeps the
        results for codegen, so the generated config's archs hold exactly the values checked here.
        """
        spec_span = Span(
            config.span.file,
            config.span.line,
            config.span.col,
            config.span.line,
            config.span.col + len("config ") + len(config.name),
        )
        per_arch = self._arch_overrides(config)
        fields = {f.name: f for f in config.fields}
        fixed: dict[str, tuple] = {}
        arch_ok = True
        if self.arch is not None:
            if self.arch not in per_arch:
                self.rep.error(
                    "E022",
                    f"`--arch {self.arch}`: no arch named `{self.arch}`",
                    spec_span,
                    did_you_mean(self.arch, per_arch) or f"archs: {', '.join(per_arch) or '(none declared)'}",
                )
                arch_ok = False
            elif per_arch[self.arch] is None:
                arch_ok = False
            else:
                fixed.update(per_arch[self.arch])
        for key, text in self.overrides.items():
            if key not in fields:
                self.rep.error(
                    "E024",
                    f"`--set {key}`: no config field `{key}`",
                    spec_span,
                    did_you_mean(key, fields) or f"fields: {', '.join(fields)}",
                )
                continue
            value = text if key in self._exact else parse_override_value(text)
            fixed[key] = (N.Const(value), None, None)
        reported: set[tuple[str, str]] = set()  # (arch or "", field) whose expression failed: reported once
        spec_values: dict = {}
        if self.arch is not None or self.overrides:
            spec_values = self._evaluate_values(config, {}, None, False, reported)
        values = self._evaluate_values(config, fixed, self.arch, True, reported) if arch_ok else {}
        if not (self.arch is not None or self.overrides):
            spec_values = values
        arch_values: dict[str, dict] = {}
        for name, chain in per_arch.items():
            if chain is None:
                continue
            if name == self.arch and not self.overrides:
                got = values
            else:
                got = self._evaluate_values(config, chain, name, False, reported)
            arch_values[name] = {k: got[k] for k in fields if k in chain and k in got}
        derived = {f.name for f in config.fields if f.default is not None and free_refs(f.default)}
        self.config_eval = ConfigEvaluation(
            values=values,
            fixed=tuple(k for k in fields if k in fixed),
            arch_values=arch_values,
            defaults={
                k: (None if k in derived else spec_values[k])
                for k, f in fields.items()
                if f.default is not None and (k in derived or k in spec_values)
            },
        )
        return values

    def _evaluate_values(
        self,
        config: N.ConfigDef,
        fixed: dict[str, tuple],
        arch: str | None,
        strict: bool,
        reported: set[tuple[str, str]],
    ) -> dict:
        """Field values with `fixed` (field -> (expression, span, arch or None for `--set`)) in place of defaults.

        Errors are reported at the expression that failed (an arch's override, else the field), prefixed with
        the arch evaluated. `strict`: a field without a value is an error (else it stays unknown, quietly, as do
        fields and requirements depending on it)."""
        fields = {f.name: f for f in config.fields}
        prefix = f"arch `{arch}`: " if arch is not None else ""
        values: dict = {}
        visiting: list[str] = []
        failed: set[str] = set()  # fields whose error is reported (or that are unknown): dependents stay quiet
        mark = len(self.rep.diagnostics)

        def value_of(name: str):
            """The field's value; an error is reported once, at its source, and its dependents stay quiet."""
            if name in values:
                return values[name]
            if name in failed:
                raise _Reported(name)
            f = fields[name]
            if name in visiting:
                cycle = " -> ".join(visiting[visiting.index(name) :] + [name])
                raise EvalError(f"config fields depend on each other: {cycle}")
            visiting.append(name)
            try:
                values[name] = own_value(name, f)
            except _Reported:
                failed.add(name)
                raise
            except EvalError as e:
                failed.add(name)
                source = fixed.get(name)
                key = (source[2] if source else "", name)  # the default, or the arch's override, of this field
                if source is not None and source[2] is None:  # a `--set` value
                    self.rep.error("E021", str(e), f.span)
                elif key not in reported:  # a failing default or override is reported once, not per arch
                    reported.add(key)
                    expr = source[0] if source else f.default
                    shown = [f"{r.name} = {_show(values[r.name])}" for r in free_refs(expr) if r.name in values]
                    self.rep.error(
                        "E021",
                        prefix + str(e),
                        source[1] if source else f.span,
                        f"with {', '.join(dict.fromkeys(shown))}" if shown and arch is not None else "",
                    )
                raise _Reported(name) from None
            finally:
                visiting.pop()
            return values[name]

        def own_value(name: str, f):
            expr = fixed[name][0] if name in fixed else f.default
            if expr is None and name in self._failed_fields:
                raise _Reported(name)
            if expr is None:
                if not f.optional and not strict:
                    raise _Reported(name)  # given when the config is made; nothing to check here
                if not f.optional:
                    raise EvalError(f"config field `{name}` has no default and no value")
                v = None
            else:
                v = evaluate(expr, lambda r: value_of(r.name))
            if not _check_type(v, f.type, f.optional):
                raise EvalError(f"config field `{name}` is {f.type}{'?' if f.optional else ''}, got {_show(v)}")
            return _coerce(v, f.type)

        for f in config.fields:
            try:
                value_of(f.name)
            except EvalError:  # reported (once) inside value_of
                pass
        if any(d.is_error for d in self.rep.diagnostics[mark:]) or (strict and self.rep.has_errors):
            return values
        for r in config.requires:
            used = sorted({ref.name for ref in free_refs(r.test)})
            if any(u not in values for u in used):
                continue  # depends on a field without a value here
            try:
                ok = evaluate(r.test, lambda ref: values[ref.name])
            except EvalError as e:
                self.rep.error("E020", f"{prefix}requirement cannot be evaluated: {e}", r.span)
                continue
            if not ok:
                shown = ", ".join(f"{u} = {_show(values[u])}" for u in used)
                self.rep.error(
                    "E020",
                    f"{prefix}requirement failed: {r.message or 'condition is false'}",
                    r.span,
                    f"with {shown}" if shown else "",
                    "change the arch or the `--set` values so the condition holds",
                )
        return values

    # ---- modules ---------------------------------------------------------------------------------
    def _module_resolver(self, params: dict[str, A.Param], uses: set):
        def resolve(n: A.Name) -> N.E:
            if n.id in params:
                return N.Ref("param", n.id)
            if n.id in self.config_fields:
                uses.add("config")
                return N.Ref("config", n.id)
            self._unknown(n, list(params) + list(self.config_fields))
            raise AssertionError

        return resolve

    def _lower_module(self, m: A.ModuleDecl) -> N.ModuleDef:
        uses: set = set()
        params: dict[str, A.Param] = {}
        param_defs = []
        for p in m.params:
            problem = identifier_problem(p.name, role="parameter")
            if problem:
                self.rep.error("E012", problem, p.span)
            elif p.name in self.decls.modules:
                self.rep.error(
                    "E012",
                    f"`{p.name}` names a module: a parameter of that name would hide it in the generated __init__",
                    p.span,
                )
            if p.name in params:
                self.rep.error("E011", f"parameter `{p.name}` is defined twice", p.span)
            if p.type.name not in SCALAR_TYPES:
                self.rep.error(
                    "E021", f"unknown type `{p.type.name}`", p.type.span, did_you_mean(p.type.name, SCALAR_TYPES)
                )
            default = self._static(p.default, self._module_resolver(params, uses)) if p.default is not None else None
            params[p.name] = p
            param_defs.append(N.ParamDef(p.name, p.type.name, default, p.span, p.type.optional))
        resolve = self._module_resolver(params, uses)
        member_names: dict[str, Span] = {}

        def claim(name: str, span: Span, role: str) -> None:
            problem = identifier_problem(name, role=role, is_model=m.is_model)
            if problem:
                self.rep.error("E012", problem, span)
            if name in member_names:
                self.rep.error(
                    "E011",
                    f"`{name}` is defined twice in module `{m.name}`",
                    span,
                    notes=(f"first defined at {member_names[name]}",),
                )
            member_names[name] = span

        weights = []
        failed: set[str] = set()  # members whose declaration was reported: forward uses stay quiet
        for w in m.weights:
            claim(w.name, w.span, "weight")
            try:
                weights.append(self._lower_weight(w, resolve))
            except _Abort:
                failed.add(w.name)
        subs = []
        for s in m.submodules:
            claim(s.name, s.span, "submodule")
            try:
                subs.append(self._lower_submodule(s, resolve))
            except _Abort:
                failed.add(s.name)
        ties = []
        for t in m.ties:
            cond = None
            if t.condition is not None:
                try:
                    cond = self._static(t.condition, resolve)
                except _Abort:
                    pass
            ties.append(N.TieDef(".".join(t.target), ".".join(t.source), cond, t.span))
        forward = None
        if m.forward is None:
            self.rep.error(
                "E017",
                f"module `{m.name}` has no forward",
                m.span,
                "add `forward(x: [B, T, dim]) -> [B, T, dim]:` with its body",
            )
            raise _Abort
        scope = _Scope(self, m.name, params, {w.name: w for w in weights}, {s.name: s for s in subs}, uses)
        scope.failed = failed
        forward = scope.lower_graph(m.forward.sig, m.forward.body, m.forward.span)
        return N.ModuleDef(
            name=m.name,
            params=tuple(param_defs),
            weights=tuple(weights),
            submodules=tuple(subs),
            ties=tuple(ties),
            forward=forward,
            uses_config="config" in uses,
            task=m.task,
            doc=m.doc,
            span=m.span,
        )

    def _lower_weight(self, w: A.WeightDecl, resolve) -> N.WeightDef:
        dims = []
        for d in w.shape.dims:
            if isinstance(d, A.Ellipsis_):
                self.rep.error("E031", "a weight's shape cannot contain `...`", d.span)
                raise _Abort
            dims.append(self._static(d, resolve))
        dtype = w.shape.dtype or "float"
        if dtype not in N.DTYPES:
            self.rep.error(
                "E032",
                f"unknown dtype `{dtype}`",
                w.span,
                did_you_mean(dtype, N.DTYPES) or f"dtypes: {', '.join(N.DTYPES)}",
            )
        init, std = "normal", None
        if w.init is not None:
            call = w.init if isinstance(w.init, A.Call) else None
            head = call.func if call else w.init
            if not isinstance(head, A.Name) or head.id not in INITS:
                self.rep.error(
                    "E018",
                    "unknown initializer",
                    w.init.span,
                    did_you_mean(head.id if isinstance(head, A.Name) else "", INITS)
                    or f"initializers: {', '.join(INITS)}",
                )
                raise _Abort
            init = head.id
            if call:
                for kw in call.kwargs:
                    if kw.name != "std" or init != "normal":
                        self.rep.error("E040", f"`{init}` takes no argument `{kw.name}`", kw.span)
                        continue
                    std = self._static(kw.value, resolve)
        cond = self._static(w.condition, resolve) if w.condition is not None else None
        return N.WeightDef(w.name, tuple(dims), dtype, init, std, cond, w.doc, w.span)

    def _lower_submodule(self, s: A.SubmoduleDecl, resolve) -> N.SubmoduleDef:
        ctor = s.ctor
        repeat = None
        if not isinstance(ctor, A.Call) or not isinstance(ctor.func, A.Name):
            if s.alternatives:
                self._not_a_side(ctor, s.name)
            self.rep.error("E041", "a submodule is created by calling a module: `name = Module(args)`", s.span)
            raise _Abort
        if ctor.func.id == "repeat":
            if s.alternatives:
                self._not_a_side(ctor, s.name)
            if len(ctor.args) != 2 or ctor.kwargs or not isinstance(ctor.args[1], A.Call):
                self.rep.error("E040", "`repeat` takes a count and a module: `repeat(n, Block())`", ctor.span)
                raise _Abort
            repeat = self._static(ctor.args[0], resolve)
            ctor = ctor.args[1]
            if not isinstance(ctor.func, A.Name):
                self.rep.error("E041", "expected a module name", ctor.span)
                raise _Abort
            outer = resolve

            def resolve(n: A.Name, outer=outer) -> N.E:  # in the layer's arguments `i` is its index, 0 .. n - 1
                return N.LAYER_INDEX if n.id == "i" else outer(n)

        name, args, kwargs = self._module_ctor(ctor, resolve)
        cond = self._static(s.condition, resolve) if s.condition is not None else None
        alternatives = []
        for side, test in s.alternatives:  # `A() if c else B() [if d]`: one module per instance
            if not isinstance(side, A.Call) or not isinstance(side.func, A.Name) or side.func.id == "repeat":
                self._not_a_side(side, s.name)
            side_name, side_args, side_kwargs = self._module_ctor(side, resolve)
            side_cond = self._static(test, resolve) if test is not None else None
            alternatives.append(
                N.SubmoduleDef(s.name, side_name, side_args, side_kwargs, None, side_cond, "", side.span)
            )
        return N.SubmoduleDef(s.name, name, args, kwargs, repeat, cond, s.doc, s.span, tuple(alternatives))

    def _module_ctor(self, ctor: A.Call, resolve) -> tuple[str, tuple, tuple]:
        """(module, args, kwargs) of `Module(args, key = value)` in a member declaration."""
        name = ctor.func.id
        if name not in self.decls_modules():
            self._unknown(ctor.func, [n for n, m in self.decls_modules().items() if not m.is_model], "module")
        args = tuple(self._static(a, resolve) for a in ctor.args)
        kwargs = tuple((k.name, self._static(k.value, resolve)) for k in ctor.kwargs)
        return name, args, kwargs

    def _not_a_side(self, side: A.Expr, member: str) -> None:
        """E041: a side of a choice `A() if c else B()` that is not a call of a module."""
        is_repeat = isinstance(side, A.Call) and isinstance(side.func, A.Name) and side.func.id == "repeat"
        self.rep.error(
            "E041",
            f"`{member}` chooses between modules: "
            + ("a `repeat` stack cannot be one side" if is_repeat else "each side must be a call of a module"),
            side.span,
            "choose inside the stack's layers: `repeat(n, Block(i % 2 == 0))` with `mlp = A() if sparse else B()`"
            if is_repeat
            else "`name = A(...) if cond else B(...)`; for a member that may be absent: `name = A(...) if cond`",
        )
        raise _Abort

    def decls_modules(self) -> dict[str, A.ModuleDecl]:
        return self.decls.modules

    def fn_names(self) -> set[str]:
        return set(self.decls.fns)

    def _lower_fn(self, f: A.FnDecl) -> N.FnDef:
        problem = identifier_problem(f.name, role="function")
        if problem:
            self.rep.error("E012", problem, f.span)
        elif f.name in PRIMITIVES:  # calls resolve to fns first: it would shadow the primitive
            self.rep.error(
                "E012",
                f"fn `{f.name}` would shadow the primitive `{f.name}` (a call would mean the fn here, the primitive "
                "in a spec without it)",
                f.span,
                f"call the primitive `{f.name}(...)` itself, or rename the fn (`my_{f.name}`)",
            )
        scope = _Scope(self, f.name, {}, {}, {}, set(), is_fn=True)
        graph = scope.lower_graph(f.sig, f.body, f.span)
        return N.FnDef(f.name, graph, f.doc, f.span)

    # ---- program structure ---------------------------------------------------------------------
    def _check_fn_calls(self) -> None:
        """Fns are inlined: one that calls itself (E060) or a chain of calls deeper than MAX_NESTING (E005)
        has no end or no reasonable one. Iterative, so any depth of input is answered with a diagnostic."""
        calls = {
            name: [
                (st.target, st.span) for st in N.iter_ops(f.graph.body) if st.op == "fn" and st.target in self.fn_defs
            ]
            for name, f in self.fn_defs.items()
        }
        state: dict[str, int] = {}  # 1: on the current path, 2: done
        depth: dict[str, int] = {}  # longest chain of calls from a fn (1: it calls none)
        deepest: dict[str, tuple[str, Span] | None] = {}
        reported: set[frozenset] = set()
        for root in calls:
            if root in state:
                continue
            path, stack = [root], [iter(calls[root])]
            state[root] = 1
            while stack:
                nxt = next(stack[-1], None)
                if nxt is None:
                    name = path.pop()
                    stack.pop()
                    state[name] = 2
                    done = [(depth[t], t, sp) for t, sp in calls[name] if t in depth]
                    best = max(done, key=lambda x: x[0]) if done else None
                    depth[name] = 1 + (best[0] if best else 0)
                    deepest[name] = (best[1], best[2]) if best else None
                    continue
                target, span = nxt
                if state.get(target) == 1:
                    cycle = path[path.index(target) :]
                    if frozenset(cycle) not in reported:
                        reported.add(frozenset(cycle))
                        what = f"fn `{target}` calls itself" + ("" if len(cycle) == 1 else " through others")
                        self.rep.error(
                            "E060",
                            what,
                            span,
                            "a fn is inlined where it is called, so recursion has no end",
                            notes=("through " + " -> ".join(cycle + [target]),),
                        )
                elif target not in state:
                    state[target] = 1
                    path.append(target)
                    stack.append(iter(calls[target]))
        if reported:
            return
        for name in calls:
            if depth[name] == MAX_NESTING + 1:  # the first fn of a chain one call too deep
                chain, cur = [name], deepest[name]
                while cur is not None:
                    chain.append(cur[0])
                    cur = deepest[cur[0]]
                shown = chain if len(chain) <= 6 else chain[:3] + ["..."] + chain[-2:]
                self.rep.error(
                    "E005",
                    f"fn calls nested more than {MAX_NESTING} deep",
                    deepest[name][1],
                    "call the inner fns from the outer one in sequence, or merge them",
                    notes=("through " + " -> ".join(shown),),
                )

    def _dependency_order(self, root: str) -> list[str]:
        order: list[str] = []
        placed: set[str] = set()
        stack: list[str] = []

        def visit(name: str, span: Span) -> None:
            if name in placed:
                return
            if name in stack:
                self.rep.error(
                    "E060",
                    f"module `{name}` contains itself",
                    span,
                    notes=("through " + " -> ".join(stack[stack.index(name) :] + [name]),),
                )
                raise _Abort
            if len(stack) == MAX_NESTING:
                shown = stack if len(stack) <= 6 else stack[:3] + ["..."] + stack[-2:]
                self.rep.error(
                    "E005",
                    f"submodules nested more than {MAX_NESTING} deep",
                    span,
                    "flatten the hierarchy: hold the inner modules side by side in one module",
                    notes=("through " + " -> ".join(shown + [name]),),
                )
                raise _Abort
            if name in self._std_errors:
                self.rep.diagnostics.extend(self._std_errors.pop(name))
                raise _Abort
            stack.append(name)
            for s in self.module_defs[name].submodules:
                for c in N.choices(s):
                    visit(c.module, c.span)
            stack.pop()
            order.append(name)
            placed.add(name)

        try:
            visit(root, self.module_defs[root].span)
        except _Abort:
            self.rep.raise_if_errors()
        return order

    def _fns_used(self, modules: list[str]) -> list[str]:
        used: list[str] = []

        def visit_body(body) -> None:
            for st in body:
                if isinstance(st, (N.Loop, N.Branch)):
                    for inner in N.bodies(st):
                        visit_body(inner)
                elif st.op == "fn" and st.target not in used:
                    visit_body(self.fn_defs[st.target].graph.body)
                    used.append(st.target)

        for m in modules:
            if self.module_defs[m].forward is not None:
                visit_body(self.module_defs[m].forward.body)
        return used

    def bind_params(self, mdef: N.ModuleDef, args, kwargs, outer_lookup, span: Span) -> dict:
        """Evaluate a submodule's constructor arguments and the callee's defaults."""
        values: dict = {}
        names = [p.name for p in mdef.params]
        if len(args) > len(names):
            self.rep.error(
                "E040",
                f"`{mdef.name}` takes {len(names)} argument(s), got {len(args)}",
                span,
                f"parameters: {mdef.name}({', '.join(names)})",
            )
            raise _Abort
        given: dict[str, N.E] = dict(zip(names, args))
        for k, v in kwargs:
            if k not in names:
                self.rep.error(
                    "E040",
                    f"`{mdef.name}` has no parameter `{k}`",
                    span,
                    did_you_mean(k, names) or f"parameters: {', '.join(names) or '(none)'}",
                )
                raise _Abort
            if k in given:
                self.rep.error("E040", f"parameter `{k}` of `{mdef.name}` given twice", span)
                raise _Abort
            given[k] = v
        for p in mdef.params:
            try:
                if p.name in given:
                    v = evaluate(given[p.name], outer_lookup)
                elif p.default is not None:
                    v = evaluate(p.default, lambda r: values[r.name] if r.kind == "param" else self.values[r.name])
                else:
                    self.rep.error(
                        "E040",
                        f"`{mdef.name}` needs parameter `{p.name}`",
                        span,
                        f"pass it: `{mdef.name}({', '.join(names)})`",
                    )
                    raise _Abort
            except EvalError as e:
                self.rep.error("E021", f"parameter `{p.name}` of `{mdef.name}`: {e}", span)
                raise _Abort from None
            if not _check_type(v, p.type, p.optional):
                self.rep.error("E021", f"parameter `{p.name}` of `{mdef.name}` is {p.type}, got {_show(v)}", span)
                raise _Abort
            values[p.name] = _coerce(v, p.type)
        return values

    def instance_lookup(self, params: dict):
        def lookup(r: N.Ref):
            if r.kind == "param":
                return params[r.name]
            if r.kind == "config":
                return self.values[r.name]
            raise EvalError(f"`{r.name}` is not known at build time")

        return lookup

    def _instantiate(self, name: str, params: dict, prefix: str, ties: tuple, span: Span) -> list[N.WeightInfo]:
        mdef = self.module_defs[name]
        lookup = self.instance_lookup(params)
        out: list[N.WeightInfo] = []
        for w in mdef.weights:
            try:
                if w.condition is not None and not evaluate(w.condition, lookup):
                    continue
                shape = tuple(evaluate(d, lookup) for d in w.shape)
            except EvalError as e:
                self.rep.error("E021", f"weight `{w.name}`: {e}", w.span)
                continue
            bad = [d for d in shape if not isinstance(d, int) or isinstance(d, bool) or d <= 0]
            if bad:
                self.rep.error(
                    "E030",
                    f"weight `{prefix}{w.name}` has a non-positive or non-integer size: "
                    f"[{', '.join(_show(d) for d in shape)}]",
                    w.span,
                    notes=(f"instantiated from {span}",),
                )
                continue
            if w.init_std is not None:
                try:
                    std = evaluate(w.init_std, lookup)
                except EvalError as e:
                    self.rep.error("E021", f"`normal` std of weight `{w.name}`: {e}", w.span)
                    continue
                if isinstance(std, bool) or not isinstance(std, (int, float)) or std < 0:
                    self.rep.error(
                        "E021",
                        f"`normal` std of weight `{w.name}` must be a number >= 0, got {_show(std)}",
                        w.span,
                        self._values_help(w.init_std, lookup),
                    )
                    continue
            out.append(N.WeightInfo(prefix + w.name, shape, w.dtype, w.init, None, w.span))
        for s in mdef.submodules:
            try:
                s = N.chosen(s, lookup)  # a choice's side for this instance: its module, its arguments
                if s is None:
                    continue
                child = self.module_defs[s.module]
                per_layer = N.per_layer(s)
                child_params = None if per_layer else self.bind_params(child, s.args, s.kwargs, lookup, s.span)
                if s.repeat is None:
                    out += self._instantiate(s.module, child_params, f"{prefix}{s.name}.", ties, s.span)
                    continue
                n = evaluate(s.repeat, lookup)
                if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                    self.rep.error("E021", f"repeat count must be a positive int, got {_show(n)}", s.span)
                    continue
                if n > MAX_REPEAT:
                    self.rep.error(
                        "E021",
                        f"repeat count {n:,} is too large (at most {MAX_REPEAT:,} layers)",
                        s.span,
                        self._values_help(s.repeat, lookup),
                    )
                    continue
                if per_layer:  # each layer's arguments read its index: each layer is its own instance
                    for i in range(n):
                        params_i = self.bind_params(child, s.args, s.kwargs, N.with_layer_index(lookup, i), s.span)
                        out += self._instantiate(s.module, params_i, f"{prefix}{s.name}.{i}.", ties, s.span)
                        if self._n_weights > MAX_WEIGHT_TENSORS:
                            self.rep.error(
                                "E021",
                                f"`{s.name}` would hold more than {MAX_WEIGHT_TENSORS:,} weight tensors",
                                s.span,
                                self._values_help(s.repeat, lookup),
                            )
                            break
                    continue
                p0 = f"{prefix}{s.name}.0."
                mark = len(self._pending_ties)
                layer0 = self._instantiate(s.module, child_params, p0, ties, s.span)
                if self._n_weights + len(layer0) * (n - 1) > MAX_WEIGHT_TENSORS:
                    self.rep.error(
                        "E021",
                        f"`{s.name}` would hold {len(layer0) * n:,} weight tensors "
                        f"({n:,} layers of {len(layer0):,}); at most {MAX_WEIGHT_TENSORS:,} in a model",
                        s.span,
                        self._values_help(s.repeat, lookup),
                    )
                    continue
                out += layer0
                layer0_ties = self._pending_ties[mark:]
                for i in range(1, n):  # every copy has layer 0's shapes and ties
                    pi = f"{prefix}{s.name}.{i}."
                    out += [
                        N.WeightInfo(pi + w.name[len(p0) :], w.shape, w.dtype, w.init, None, w.span) for w in layer0
                    ]
                    self._pending_ties += [
                        (pi + t[len(p0) :], pi + src[len(p0) :], tie, pi + at[len(p0) :])
                        for t, src, tie, at in layer0_ties
                    ]
                self._n_weights += len(layer0) * (n - 1)
            except EvalError as e:
                self.rep.error("E021", f"submodule `{s.name}`: {e}", s.span)
            except _Abort:
                pass
        self._n_weights += len(mdef.weights)
        for t in mdef.ties:
            try:
                if t.condition is not None and not evaluate(t.condition, lookup):
                    continue
            except EvalError as e:
                self.rep.error("E021", f"tie: {e}", t.span)
                continue
            self._pending_ties.append((prefix + t.target, prefix + t.source, t, prefix))
        return out

    def _values_help(self, e: N.E, lookup) -> str:
        """`with n = 4, layers = 2`: the params and config fields an expression reads, for a help line."""
        shown = []
        for r in free_refs(e):
            try:
                shown.append(f"{r.name} = {_show(lookup(r))}")
            except EvalError:
                pass
        return f"with {', '.join(dict.fromkeys(shown))}" if shown else ""

    def _apply_ties(self, weights: list[N.WeightInfo]) -> list[N.WeightInfo]:
        """Each tie makes its target share its source's storage: both must exist with one shape, a weight is
        tied at most once, and a tie's source is an untied weight (a tie to a tied weight, or a cycle of ties,
        would leave no storage to save or load). A tie inside a `repeat` is reported once, not per layer."""
        by_name = {w.name: w for w in weights}
        tied_at: dict[str, N.TieDef] = {}
        reported: set[Span] = set()

        def error(code: str, message: str, tie: N.TieDef, *help: str, notes: tuple = ()) -> None:
            if tie.span not in reported:
                reported.add(tie.span)
                self.rep.error(code, message, tie.span, *help, notes=notes)

        ties = []
        for target, source, tie, prefix in self._pending_ties:
            unknown = [
                (full, local) for full, local in ((target, tie.target), (source, tie.source)) if full not in by_name
            ]
            if unknown:
                full, local = unknown[0]
                local_names = [n[len(prefix) :] for n in by_name if n.startswith(prefix)]
                error("E010", f"tie names unknown weight `{local}`", tie, did_you_mean(local, local_names))
                continue
            if target == source:
                error(
                    "E060",
                    f"`{tie.target}` is tied to itself",
                    tie,
                    "a tie names two different weights: `tie head.weight = embed.weight`",
                )
                continue
            t, s = by_name[target], by_name[source]
            if t.shape != s.shape:
                error(
                    "E033",
                    f"tied weights differ in shape: `{tie.target}` is {list(t.shape)}, "
                    f"`{tie.source}` is {list(s.shape)}",
                    tie,
                )
                continue
            if target in tied_at:
                first = tied_at[target]
                error(
                    "E011",
                    f"`{tie.target}` is tied twice",
                    tie,
                    "keep one tie per weight",
                    notes=(f"first tied at {first.span}",),
                )
                continue
            tied_at[target] = tie
            ties.append((target, source, tie))
        sources = {target: source for target, source, _ in ties}
        cycles: set[frozenset] = set()
        for target, source, tie in ties:
            if source in sources:
                cycle, cur = [target], source
                while cur in sources and cur not in cycle:
                    cycle.append(cur)
                    cur = sources[cur]
                if cur == target and frozenset(cycle) in cycles:
                    continue
                if cur == target:
                    cycles.add(frozenset(cycle))
                    error(
                        "E060",
                        "tied weights form a cycle: " + " -> ".join(f"`{c}`" for c in cycle + [target]),
                        tie,
                        "one of them must keep its own storage: remove one tie",
                    )
                else:
                    error(
                        "E041",
                        f"`{tie.source}` is itself tied (to `{sources[source]}`)",
                        tie,
                        f"tie to the weight that holds the storage: `{sources[source]}`",
                    )
                continue
            w = by_name[target]
            by_name[target] = N.WeightInfo(w.name, w.shape, w.dtype, w.init, source, w.span)
        return [by_name[w.name] for w in weights]

    # ---- checkpoint and train --------------------------------------------------------------------
    def _lower_checkpoint(self, decls: list[A.CheckpointDecl]) -> N.CheckpointDef:
        rules, ignores = [], []
        no_names = self._config_resolver()
        for d in decls:
            for r in d.rules:
                transforms = []
                for t in r.transforms:
                    name = t.func.id if isinstance(t.func, A.Name) else ""
                    if name not in N.TRANSFORMS:
                        self.rep.error(
                            "E050",
                            f"unknown checkpoint transform `{name}`",
                            t.span,
                            did_you_mean(name, N.TRANSFORMS) or f"transforms: {', '.join(N.TRANSFORMS)}",
                        )
                        continue
                    if t.args:
                        self.rep.error("E050", f"`{name}` takes keyword arguments only, e.g. `{name}(dim = 0)`", t.span)
                    takes = N.TRANSFORMS[name]
                    for k in t.kwargs:
                        if k.name not in takes:
                            self.rep.error(
                                "E050",
                                f"`{name}` has no option `{k.name}`",
                                k.span,
                                f"`{name}` takes `{takes[0]} = N`" if takes else f"`{name}` takes no options",
                            )
                    if name == "permute" and not any(k.name == "heads" for k in t.kwargs):
                        self.rep.error(
                            "E050",
                            "`permute` needs the head count: `permute(heads = num_attention_heads)`",
                            t.span,
                        )
                    try:
                        kws = tuple((k.name, self._static(k.value, no_names)) for k in t.kwargs if k.name in takes)
                    except _Abort:
                        continue
                    transforms.append((name, kws))
                names = [x for x, _ in transforms]
                if len(r.sources) > 1 and "concat" not in names:
                    self.rep.error(
                        "E050",
                        "several checkpoint tensors need `concat(dim = N)`",
                        r.span,
                        'join them on the way: `"a", "b" -> concat(dim = 0) -> "ab"`',
                    )
                if len(r.targets) > 1 and "split" not in names:
                    self.rep.error(
                        "E050",
                        "several parameters need `split(dim = N)`",
                        r.span,
                        'split it on the way: `"ab" -> split(dim = 0) -> "a", "b"`',
                    )
                self._check_layer_index(r)
                rules.append(N.LayoutRuleDef(r.sources, tuple(transforms), r.targets, r.span, d.layout))
            for i in d.ignores:
                other = _other_placeholder(i.pattern)
                if other is not None:
                    self.rep.error("E050", f"`{other}` in `{i.pattern}`: {PLACEHOLDERS}", i.span)
                for ph in ("{i}", "{j}"):
                    if i.pattern.count(ph) > 1:
                        self.rep.error(
                            "E050",
                            f"`{ph}` appears {i.pattern.count(ph)} times in `{i.pattern}`",
                            i.span,
                            f"a pattern holds `{ph}` at most once",
                        )
            ignores += [i.pattern for i in d.ignores]
        return N.CheckpointDef(tuple(rules), tuple(ignores))

    def _check_layer_index(self, r: A.LayoutRule) -> None:
        """`{i}` stands for one layer index, read from the rule's first source key and written into the other
        names: at most one per pattern, and in the first source whenever another name has it. `{j}` (an expert
        index) is in every source or none, never in a target, and needs `stack` first to gather it."""
        for pattern in r.sources + r.targets:
            other = _other_placeholder(pattern)
            if other is not None:
                self.rep.error("E050", f"`{other}` in `{pattern}`: {PLACEHOLDERS}", r.span)
                return
            for ph, what in (("{i}", "one layer index, `{i}`"), ("{j}", "one expert index, `{j}`")):
                if pattern.count(ph) > 1:
                    self.rep.error(
                        "E050",
                        f"`{ph}` appears {pattern.count(ph)} times in `{pattern}`",
                        r.span,
                        f"a pattern holds {what}",
                    )
                    return
        if not self._check_expert_index(r):
            return
        first_has = "{i}" in r.sources[0]
        others = [p for p in r.sources[1:] + r.targets if "{i}" in p]
        if others and not first_has:
            self.rep.error(
                "E050",
                f"`{others[0]}` has a layer index `{{i}}`, but the checkpoint key `{r.sources[0]}` has none to give it",
                r.span,
                "put `{i}` in the first checkpoint key too, where it is read from",
            )
        elif first_has and not any("{i}" in t for t in r.targets):
            self.rep.error(
                "E050",
                f"checkpoint key `{r.sources[0]}` has a layer index `{{i}}`, but no parameter of the rule does",
                r.span,
                "every layer would load into the same parameter: put `{i}` in the parameter name too",
            )

    def _check_expert_index(self, r: A.LayoutRule) -> bool:
        """The `{j}` rules of `_check_layer_index`; False when one is broken (the `{i}` checks are skipped)."""
        names = [t.func.id if isinstance(t.func, A.Name) else "" for t in r.transforms]
        with_j = [s for s in r.sources if "{j}" in s]
        target = next((t for t in r.targets if "{j}" in t), None)
        problem = None
        if target is not None:
            problem = (
                f"parameter `{target}` has an expert index `{{j}}`, but a parameter holds all experts stacked",
                'stack the checkpoint\'s experts into one parameter: `"e.{j}.w" -> stack(dim = 0) -> "experts.w"`',
            )
        elif with_j and len(with_j) != len(r.sources):
            missing = next(s for s in r.sources if "{j}" not in s)
            problem = (
                f"checkpoint key `{missing}` has no expert index `{{j}}`, but `{with_j[0]}` does",
                "every source of a `stack` rule names one tensor per expert: put `{j}` in each",
            )
        elif with_j and (not names or names[0] != "stack"):
            problem = (
                f"checkpoint key `{with_j[0]}` has an expert index `{{j}}`, which needs `stack` as the first transform",
                'gather the experts into one tensor first: `"e.{j}.w" -> stack(dim = 0) -> "experts.w"`',
            )
        elif "stack" in names and not with_j:
            problem = (
                "`stack` gathers the tensors of every expert index `{j}`, but no checkpoint key of the rule has one",
                'name the expert in the checkpoint keys: `"experts.{j}.w" -> stack(dim = 0) -> "experts.w"`',
            )
        elif names.count("stack") > 1 or ("stack" in names and names.index("stack") != 0):
            problem = ("`stack` must come once, first: it gathers each source's experts before anything else", "")
        if problem is not None:
            self.rep.error("E050", problem[0], r.span, problem[1])
        return problem is None

    def _possible_paths(self, module: str) -> set[str]:
        """Every weight and submodule path some config could give `module`'s instances (`{i}` for a stack's
        index): each side of a choice, each optional member. A rule naming one that this config lacks (the
        experts of a Qwen2-MoE whose layers are all dense) applies to nothing here; it is not a misspelling."""
        mdef = self.module_defs.get(module)
        if mdef is None:
            return set()
        out = {w.name for w in mdef.weights}
        for sub in mdef.submodules:
            stem = f"{sub.name}.{{i}}" if sub.repeat is not None else sub.name
            out.add(stem)
            for side in N.modules_of(sub):
                out |= {f"{stem}.{p}" for p in self._possible_paths(side)}
        return out

    def _check_layout(self, checkpoint: N.CheckpointDef, weights: list[N.WeightInfo], possible: set[str]) -> None:
        """Each rule's targets must be weights of the model (or, `possible`, of other configs' instances), and its
        transforms must fit their shapes."""
        import re

        shapes = {w.name: w.shape for w in weights}
        generic = sorted({re.sub(r"\.\d+\.", ".{i}.", n) for n in shapes})
        for rule in checkpoint.rules:
            first = [re.compile("^" + re.escape(t).replace(r"\{i\}", r"\d+") + "$") for t in rule.targets]
            matched = [[n for n in shapes if pat.match(n)] for pat in first]
            if not any(matched) and all(re.sub(r"\.\d+\.", ".{i}.", t) in possible for t in rule.targets):
                continue  # a weight of other configs only
            missing = [t for t, m in zip(rule.targets, matched) if not m]
            for t in missing:
                self.rep.error(
                    "E050",
                    f"layout rule target `{t}` is not a weight of the model",
                    rule.span,
                    did_you_mean(t, generic) or "targets are parameter names, `{i}` for a layer index",
                )
            if missing:
                continue
            target_shapes = [shapes[m[0]] for m in matched]
            for name, kws in rule.transforms:
                kw = {}
                try:
                    kw = {k: evaluate(v, lambda r: self.values[r.name]) for k, v in kws}
                except EvalError as e:
                    self.rep.error("E050", f"`{name}`: {e}", rule.span)
                    continue
                dim = kw.get("dim", 0)
                if name in ("split", "concat"):
                    group = target_shapes if name == "split" else target_shapes[:1]
                    bad = [s for s in group if not (isinstance(dim, int) and -len(s) <= dim < len(s))]
                    if bad:
                        self.rep.error(
                            "E050",
                            f"`{name}(dim = {dim})` is out of range for a weight of shape {list(bad[0])}",
                            rule.span,
                        )
                        continue
                    size = target_shapes[0][dim]
                    if name == "concat" and rule.layout is None and size % len(rule.sources):
                        self.rep.error(
                            "E050",
                            f"`concat(dim = {dim})` of {len(rule.sources)} tensors into `{rule.targets[0]}` "
                            f"(dim {dim} of size {size}): save_pretrained writes a `checkpoint:` rule back as equal "
                            f"parts, and {size} does not split into {len(rule.sources)}",
                            rule.span,
                            'a layout saving does not write back goes in a named section: `checkpoint "native":`',
                        )
                    if name == "split":
                        d = dim % len(target_shapes[0])
                        rest = {tuple(x for i, x in enumerate(s) if i != d) for s in target_shapes}
                        if len(rest) > 1:
                            self.rep.error(
                                "E050",
                                f"`split(dim = {dim})` into weights of shapes "
                                f"{[list(s) for s in target_shapes]}: they differ outside dim {dim}",
                                rule.span,
                            )
                elif name == "stack":
                    rank = len(target_shapes[0])
                    if not (isinstance(dim, int) and not isinstance(dim, bool) and -rank <= dim < rank):
                        self.rep.error(
                            "E050",
                            f"`stack(dim = {dim})` is out of range for a weight of shape {list(target_shapes[0])}",
                            rule.span,
                            f"the stacked experts' dim is one of the parameter's {rank} dims: 0 to {rank - 1}",
                        )
                    elif rank < 2:
                        self.rep.error(
                            "E050",
                            f"`stack` into `{rule.targets[0]}` of shape {list(target_shapes[0])}: a stacked parameter "
                            "has a dim for the experts and at least one for each expert's tensor",
                            rule.span,
                        )
                elif name == "permute":
                    heads = kw.get("heads")
                    raw = dict(kws).get("heads")
                    rows = target_shapes[0][0]
                    if len(rule.sources) != 1 or len(rule.targets) != 1:
                        self.rep.error("E050", "`permute` maps one checkpoint tensor to one parameter", rule.span)
                    elif not (isinstance(raw, N.Const) or (isinstance(raw, N.Ref) and raw.kind == "config")):
                        self.rep.error(
                            "E050",
                            "`permute`'s heads must be a number or a config field (read for each config at load)",
                            rule.span,
                        )
                    elif isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or rows % (2 * heads):
                        self.rep.error(
                            "E050",
                            f"`permute(heads = {heads})` of `{rule.targets[0]}` ({rows} rows): each head's rows must "
                            "be an even whole number (rows = heads x head_dim, head_dim even)",
                            rule.span,
                        )
                elif name == "transpose" and any(len(s) > 2 for s in target_shapes):
                    self.rep.error(
                        "E050",
                        f"`transpose` swaps the two dims of a matrix; this weight has {len(target_shapes[0])}",
                        rule.span,
                    )

    def _lower_router(
        self, modules: dict, model: A.ModuleDecl, weights: list[N.WeightInfo] | None, possible: set[str]
    ) -> N.RouterDef | None:
        """The model's `router` line: a pattern naming submodules of the model (`{i}` a layer index; `possible`:
        paths other configs have) and the load-balancing options, each a build-time expression over the config,
        held against this config. `weights` is None where instantiating failed: the pattern is not checked."""
        import re

        for m in modules.values():
            if m.routers and not m.is_model:
                self.rep.error(
                    "E041",
                    f"`router` in module `{m.name}`: the router logits are an output of the model",
                    m.routers[0].span,
                    f'declare it in the `model` with the path from there: `router "...{m.name}...": ...`',
                )
        if not model.routers:
            return None
        r = model.routers[0]
        for extra in model.routers[1:]:
            self.rep.error(
                "E011", "the model has more than one `router` line", extra.span, notes=(f"first at {r.span}",)
            )
        paths = {n.rsplit(".", k)[0] for w in weights or () for n in [w.name] for k in range(1, n.count(".") + 1)}
        generic = sorted({re.sub(r"\.\d+(?=\.|$)", ".{i}", p) for p in paths})
        wanted = re.compile("^" + re.escape(r.pattern).replace(r"\{i\}", r"\d+") + "$")
        if other := next((x for x in re.findall(r"\{[^{}]*\}", r.pattern) if x != "{i}"), None):
            self.rep.error(
                "E050", f"`{other}` in router pattern `{r.pattern}`: the only placeholder is `{{i}}`", r.span
            )
        elif weights is not None and not any(wanted.match(p) for p in paths) and r.pattern not in possible:
            self.rep.error(
                "E010",
                f"router `{r.pattern}` is not a submodule of the model",
                r.span,
                did_you_mean(r.pattern, generic) or "name the router's Linear from the model, `{i}` for a layer index",
            )
        found = self._static_options(
            "`router`",
            r.options,
            ROUTER_OPTIONS,
            ROUTER_OPTIONS,
            r.span,
            "e.g. `num_experts = num_local_experts, top_k = num_experts_per_tok, coef = router_aux_loss_coef`",
        )
        options = [(name, e) for name, e, _ in found]
        values = {name: v for name, _, v in found}
        n, k, c = (values.get(x) for x in ROUTER_OPTIONS)
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            self.rep.error("E041", f"router `num_experts` must be a positive int, got {n!r}", r.span)
        elif k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= (n or k)):
            self.rep.error("E041", f"router `top_k` must be an int from 1 to num_experts ({n}), got {k!r}", r.span)
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not c >= 0):
            self.rep.error("E041", f"router `coef` must be a number >= 0, got {c!r}", r.span)
        return N.RouterDef(r.pattern, tuple(options), r.span)

    def _lower_losses(self, modules: dict, model: A.ModuleDecl) -> tuple[N.LossDef, ...]:
        """The model's `loss` lines: kinds of N.LOSSES the task takes, each option once, of its type and range
        (evaluated for this config), class weights as long as the logits are wide; the main loss first."""
        for m in modules.values():
            if m.losses and not m.is_model:
                self.rep.error(
                    "E041",
                    f"`loss` in module `{m.name}`: a loss belongs to the model",
                    m.losses[0].span,
                    "declare it in the `model`, over the model's outputs",
                )
        out, seen = [], {}
        task = model.task or "base"
        for decl in model.losses:
            kind = N.LOSSES.get(decl.kind)
            if kind is None:
                self.rep.error(
                    "E010",
                    f"unknown loss `{decl.kind}`",
                    decl.kind_span,
                    did_you_mean(decl.kind, [k for k, v in N.LOSSES.items() if v.declared_by is None])
                    or f"losses: {', '.join(k for k, v in N.LOSSES.items() if v.declared_by is None)}",
                )
                continue
            if kind.declared_by is not None:
                self.rep.error(
                    "E041",
                    f"loss `{decl.kind}` is declared by the model's `{kind.declared_by}` line",
                    decl.kind_span,
                    'e.g. `router "model.layers.{i}.mlp.gate": num_experts = E, top_k = K, coef = c`',
                )
                continue
            if task not in kind.tasks:
                takes = [k for k, v in N.LOSSES.items() if task in v.tasks and v.declared_by is None]
                self.rep.error(
                    "E041",
                    f"a `{task}` model cannot take loss `{decl.kind}`",
                    decl.kind_span,
                    f"`{decl.kind}` is for {', '.join(f'`{t}`' for t in kind.tasks)}; "
                    + (f"`{task}` takes {', '.join(takes)}" if takes else f"task `{task}` has no loss"),
                )
                continue
            key = "main" if kind.role == "main" else decl.kind
            if key in seen:
                mains = ", ".join(k for k, v in N.LOSSES.items() if v.role == "main")
                self.rep.error(
                    "E011",
                    f"the model declares two main losses (`{seen[key].kind}`, `{decl.kind}`)"
                    if key == "main"
                    else f"the model declares loss `{decl.kind}` twice",
                    decl.span,
                    f"one of {mains} replaces the task's loss; auxiliary losses (z_loss) add to it"
                    if key == "main"
                    else None,
                    notes=(f"first at {seen[key].span}",),
                )
                continue
            seen[key] = decl
            types = {name: type_ for name, type_, _ in kind.options}
            for a in decl.args:
                self.rep.error(
                    "E040",
                    f"loss `{decl.kind}` takes its options by name",
                    a.span,
                    f"options: {', '.join(types) or 'none'}",
                )
            required = [n for n, _, default in kind.options if default is None]
            found = self._static_options(
                f"loss `{decl.kind}`",
                decl.options,
                tuple(types),
                required,
                decl.span,
                f"e.g. `loss {decl.kind}({', '.join(f'{n} = ...' for n in required)})`",
            )
            spans = {o.name: o.value.span for o in decl.options}
            options = [
                (name, e)
                for name, e, value in found
                if self._loss_option_ok(decl.kind, name, types[name], value, model, spans[name])
            ]
            out.append(N.LossDef(decl.kind, tuple(options), decl.span))
        return tuple(sorted(out, key=lambda d: N.LOSSES[d.kind].role != "main"))

    def _static_options(
        self, what: str, given, names: tuple[str, ...], required, span: Span, example: str
    ) -> list[tuple[str, N.E, object]]:
        """A `router` or `loss` line's `name = expr` options: (name, expression, its value for this config), each
        known (E040, with a did-you-mean), once (E011) and evaluable (E041); the `required` ones all given (E040)."""
        out, seen = [], set()
        resolve = self._config_resolver()
        for o in given:
            if o.name not in names:
                self.rep.error(
                    "E040",
                    f"{what} has no option `{o.name}`",
                    o.span,
                    did_you_mean(o.name, names) or f"options: {', '.join(names) or 'none'}",
                )
                continue
            if o.name in seen:
                self.rep.error("E011", f"option `{o.name}` of {what} is given twice", o.span)
                continue
            seen.add(o.name)
            try:
                e = self._static(o.value, resolve)
            except _Abort:
                continue
            try:
                out.append((o.name, e, evaluate(e, lambda ref: self.values[ref.name])))
            except EvalError as err:
                self.rep.error("E041", f"{what} option `{o.name}`: {err}", o.value.span)
        missing = [n for n in required if n not in seen]
        if missing:
            self.rep.error("E040", f"{what} needs {', '.join(f'`{n}`' for n in missing)}", span, example)
        return out

    def _loss_option_ok(self, kind: str, name: str, type_: str, value, model: A.ModuleDecl, span: Span) -> bool:
        """One option's value for this config: of its type (E021), in range, class weights one per output (E041)."""
        optional = type_.endswith("?")
        base = type_.rstrip("?")
        if not _check_type(value, base, optional):
            self.rep.error(
                "E021",
                f"loss `{kind}` option `{name}` must be {'a ' if base != 'list[float]' else ''}{base}"
                f"{' or none' if optional else ''}, got {_show(value)}",
                span,
                "a list of numbers, one per class: a `list[float]?` config field" if base.startswith("list") else None,
            )
            return False
        if name == "label_smoothing" and not 0.0 <= value <= 1.0:
            self.rep.error("E041", f"loss `{kind}` `label_smoothing` must be in [0, 1], got {_show(value)}", span)
            return False
        if name == "coef" and not value >= 0:
            self.rep.error("E041", f"loss `{kind}` `coef` must be a number >= 0, got {_show(value)}", span)
            return False
        if isinstance(value, list):
            if any(not v >= 0 for v in value):
                self.rep.error("E041", f"loss `{kind}` `{name}`: weights must be >= 0, got {_show(value)}", span)
                return False
            width = self._output_width(model)
            if width is not None and len(value) != width:
                self.rep.error(
                    "E041",
                    f"loss `{kind}` `{name}` has {len(value)} weights, but the model has {width} classes",
                    span,
                    "one weight per class: the last dim of the model's output (num_labels, vocab_size)",
                )
                return False
        return True

    def _output_width(self, model: A.ModuleDecl) -> int | None:
        """The last dim of the model forward's first result, where this config fixes it (its class count)."""
        sig = model.forward.sig if model.forward is not None else None
        if sig is None or not sig.results or not sig.results[0].dims:
            return None
        dim = sig.results[0].dims[-1]
        mark = len(self.rep.diagnostics)
        try:
            value = evaluate(self._static(dim, self._config_resolver()), lambda ref: self.values[ref.name])
        except (_Abort, EvalError, KeyError):
            value = None
        del self.rep.diagnostics[mark:]  # a size the config does not bind (B, T): not this check's to report
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def _lower_train(self, decls: list[A.TrainDecl], modules: list[str]) -> N.TrainDef:
        ckpt, par, save = [], [], []
        for d in decls:
            for name, span in d.checkpointing:
                if name not in modules:
                    self.rep.error(
                        "E010",
                        f"activation checkpointing names unknown module `{name}`",
                        span,
                        did_you_mean(name, modules) or f"modules in this model: {', '.join(modules)}",
                    )
                ckpt.append(name)
            for pattern, style, span in d.parallel:
                if style not in N.PARALLEL_STYLES:
                    self.rep.error(
                        "E019",
                        f"unknown parallel style `{style}`",
                        span,
                        did_you_mean(style, N.PARALLEL_STYLES) or f"styles: {', '.join(N.PARALLEL_STYLES)}",
                    )
                par.append((pattern, style))
            for name, span in d.save:
                if name not in N.SAVE_OPS:
                    self.rep.error(
                        "E019",
                        f"save_activations names unknown op kind `{name}`",
                        span,
                        did_you_mean(name, N.SAVE_OPS) or f"op kinds: {', '.join(N.SAVE_OPS)}",
                    )
                elif name not in save:
                    save.append(name)
        return N.TrainDef(tuple(ckpt), tuple(par), tuple(save))


# ---- forward bodies -----------------------------------------------------------------------------


class _Scope:
    """Lowers one forward (or fn) body to SSA ops."""

    def __init__(self, low: Lowering, owner: str, params, weights, subs, uses: set, is_fn: bool = False):
        self.low = low
        self.rep = low.rep
        self.owner = owner
        self.params = params
        self.weights: dict[str, N.WeightDef] = weights
        self.subs: dict[str, N.SubmoduleDef] = subs
        self.uses = uses
        self.is_fn = is_fn
        self.env: dict[str, str] = {}  # variable -> current SSA value
        self.scalars: dict[str, N.E] = {}  # fn scalar arguments
        self.loop_vars: dict[str, str] = {}  # loop variable -> repeat submodule
        self.loop_indices: set[str] = set()  # `i` of the enclosing `for i, layer in layers` loops
        self.taken: set[str] = set()
        self.next_suffix: dict[str, int] = {}  # variable -> the next `_<n>` suffix fresh() tries
        self.read: set[str] = set()
        self.defined_at: dict[str, Span] = {}
        self.used_members: set[str] = set()
        self.body: list = []
        self.syms: set[str] = set()  # size symbols bound by the signature (B, T, ...)
        self.var_of: dict[str, str] = {}  # SSA value -> the source variable it was assigned to
        self.failed: set[str] = set()  # members whose declaration failed (already reported)

    # names ------------------------------------------------------------------------------
    def fresh(self, var: str) -> str:
        """A new SSA name: the variable's own name if free, else `var_1`, ...; temporaries are `t<n>`."""
        if var:  # user-named values are never released, so counting on from the last suffix finds the same name
            i = self.next_suffix.get(var, 0)
            name = f"{var}_{i}" if i else var
            while name in self.taken:
                i += 1
                name = f"{var}_{i}"
            self.next_suffix[var] = i + 1
        else:
            i = len(self.taken)
            name = f"t{i}"
            while name in self.taken:
                i += 1
                name = f"t{i}"
        self.taken.add(name)
        return name

    def candidates(self) -> list[str]:
        return (
            list(self.env)
            + list(self.weights)
            + list(self.subs)
            + list(self.params)
            + list(self.scalars)
            + list(self.low.config_fields)
            + list(self.low.fn_names())
            + list(PRIMITIVES)
        )

    def resolve(self, n: A.Name) -> N.E:
        i = n.id
        if self.env.get(i) == _POISON or (i in self.failed and i not in self.env):
            raise _Abort
        if i in self.env:
            self.read.add(self.env[i])
            return N.Ref("value", self.env[i])
        if i in self.loop_indices:
            return N.Ref("loop_index", i)
        if i in self.scalars:
            self.read.add(i)
            return self.scalars[i]
        if i in self.weights:
            self.used_members.add(i)
            return N.Ref("weight", i)
        if i in self.params:
            return N.Ref("param", i)
        if i in N.DTYPES:
            return N.Ref("dtype", i)
        if i in self.syms:
            return N.Ref("sym", i)
        if i in self.low.config_fields and not self.is_fn:
            self.uses.add("config")
            return N.Ref("config", i)
        if i in self.subs or i in self.loop_vars:
            self.rep.error("E041", f"`{i}` is a module: call it, `{i}(x)`", n.span)
            raise _Abort
        if i in self.low.fn_names() or i in PRIMITIVES:
            self.rep.error("E041", f"`{i}` is a function: call it", n.span)
            raise _Abort
        self.low._unknown(n, self.candidates())
        raise AssertionError

    # graphs -------------------------------------------------------------------------------------
    def lower_sig_type(self, t, fn_ok: bool) -> tuple[N.TensorSig | None, str | None]:
        if isinstance(t, A.TypeRef):
            if not fn_ok:
                self.rep.error("E021", "forward arguments are tensors: give a shape, e.g. `x: [B, T, dim]`", t.span)
                raise _Abort
            if t.name not in SCALAR_TYPES:
                self.rep.error("E021", f"unknown type `{t.name}`", t.span, did_you_mean(t.name, SCALAR_TYPES))
                raise _Abort
            return None, t.name
        return self.tensor_sig(t), None

    def tensor_sig(self, t: A.TensorType) -> N.TensorSig:
        dims: list[N.E] = []
        for d in t.dims:
            if isinstance(d, A.Ellipsis_):
                if any(isinstance(x, N.Const) and x.value == "..." for x in dims):
                    self.rep.error("E031", "only one `...` per shape", d.span)
                dims.append(N.Const("..."))
            else:
                dims.append(self.low._static(d, self.sig_resolver))
        dtype = t.dtype or "float"
        if dtype not in N.DTYPES:
            self.rep.error(
                "E032",
                f"unknown dtype `{dtype}`",
                t.span,
                did_you_mean(dtype, N.DTYPES) or f"dtypes: {', '.join(N.DTYPES)}",
            )
        return N.TensorSig(tuple(dims), dtype)

    def sig_resolver(self, n: A.Name) -> N.E:
        """Shape dims: params, config fields and fn scalar args are sizes; other names are symbols."""
        if n.id in self.params:
            return N.Ref("param", n.id)
        if n.id in self.scalars:
            return self.scalars[n.id]
        if n.id in self.low.config_fields and not self.is_fn:
            self.uses.add("config")
            return N.Ref("config", n.id)
        return N.Ref("sym", n.id)

    def lower_graph(self, sig: A.Signature, body: tuple, span: Span) -> N.Graph:
        args = []
        for a in sig.args:
            problem = identifier_problem(a.name, role="argument")
            if problem:
                self.rep.error("E012", problem, a.span)
            if a.name in self.env or a.name in self.scalars:
                self.rep.error("E011", f"argument `{a.name}` is defined twice", a.span)
            tensor, scalar = self.lower_sig_type(a.type, self.is_fn)
            if scalar is not None:
                self.scalars[a.name] = N.Ref("param", a.name)
            else:
                name = self.fresh(a.name)
                self.env[a.name] = name
                self.defined_at[name] = a.span
            args.append(N.ArgDef(a.name, tensor, scalar, a.span))
        results = tuple(self.tensor_sig(t) for t in sig.results) if sig.results else None
        for a in args:
            for d in a.tensor.dims if a.tensor else ():
                if isinstance(d, N.Ref) and d.kind == "sym":
                    self.syms.add(d.name)
        for t in sig.results or ():  # a result's size symbols come from the arguments
            for n in _ast_names(t.dims):
                if n.id in self.syms or n.id in self.scalars or n.id in self.params:
                    continue
                if not self.is_fn and n.id in self.low.config_fields:
                    continue
                known = (
                    list(self.syms)
                    + list(self.scalars)
                    + list(self.params)
                    + ([] if self.is_fn else list(self.low.config_fields))
                )
                self.rep.error(
                    "E010",
                    f"unknown size `{n.id}` in the result type",
                    n.span,
                    did_you_mean(n.id, known)
                    or "a result's sizes are config fields, parameters or symbols the arguments bind",
                )
        outputs: tuple[str, ...] = ()
        for i, st in enumerate(body):
            try:
                if isinstance(st, A.Return):
                    if i != len(body) - 1:
                        self.rep.error(
                            "E013",
                            "statements after `return` never run",
                            body[i + 1].span,
                            "remove them, or move them before the `return`",
                        )
                    outputs = tuple(self.value_of(self.expr(v), v.span) for v in st.values)
                else:
                    self.stmt(st)
            except _Abort:
                for var in _assigned_vars([st]):  # later uses of a failed assignment stay quiet
                    self.env[var] = _POISON
        if not any(isinstance(st, A.Return) for st in body):
            self.rep.error("E013", "forward must end with `return`", span, "return the result: `return y`")
        if results is not None and outputs and len(results) != len(outputs):
            self.rep.error("E042", f"declared {len(results)} result(s), returns {len(outputs)}", body[-1].span)
        for name, at in self.defined_at.items():
            var = self.var_of.get(name, name)
            if name not in self.read and not var.startswith("_"):
                self.rep.warn("W001", f"`{var}` is never used", at, "remove it or prefix it with `_`")
        if not self.is_fn:
            for w in self.weights.values():
                if w.name not in self.used_members:
                    self.rep.warn(
                        "W002", f"weight `{w.name}` is never used in forward", w.span, "remove it, or use it in forward"
                    )
            for s in self.subs.values():
                if s.name not in self.used_members:
                    self.rep.warn(
                        "W002",
                        f"submodule `{s.name}` is never used in forward",
                        s.span,
                        "remove it, or call it in forward",
                    )
        return N.Graph(tuple(args), tuple(self.body), outputs, results, span)

    def value_of(self, e: N.E, span: Span) -> str:
        if isinstance(e, N.Ref) and e.kind == "value":
            return e.name
        # a weight or static returned directly: materialize it
        name = self.fresh("")
        self.body.append(N.Op("identity", (e,), (), (name,), ("",), "", span))
        return name

    def stmt(self, st) -> None:
        if isinstance(st, A.Assign):
            for t in st.targets:
                problem = identifier_problem(t, role="variable")
                if problem:
                    self.rep.error("E012", problem, st.span)
                    raise _Abort
            if len(st.targets) == 1:
                var = st.targets[0]
                e = self.expr(st.value)
                fresh_temp = (
                    isinstance(e, N.Ref)
                    and e.kind == "value"
                    and self.body
                    and e.name in self.body[-1].results
                    and e.name not in self.defined_at
                )
                if fresh_temp:
                    value = self.rename_result(e.name, var)
                else:  # `y = x`, a weight or a build-time value: an explicit copy keeps SSA
                    value = self.fresh(var)
                    self.body.append(N.Op("identity", (e,), (), (value,), (var,), "", st.span))
                self.bind(var, value, st.span)
            else:
                names = self.call_multi(st.value, st.targets, st.span)
                for t, n in zip(st.targets, names):
                    self.bind(t, n, st.span)
        elif isinstance(st, A.For):
            self.loop(st)
        elif isinstance(st, A.Return):
            self.rep.error("E013", "`return` inside a loop", st.span)

    def rename_result(self, old: str, var: str) -> str:
        """Give the last op's temporary result `old` the assigned variable's name."""
        op = self.body[-1]
        new = self.fresh(var)
        self.taken.discard(old)
        self.body[-1] = _replace(
            op,
            results=tuple(new if r == old else r for r in op.results),
            vars=tuple(var if r == old else v for r, v in zip(op.results, op.vars)),
        )
        return new

    def bind(self, var: str, value: str, span: Span) -> None:
        self.env[var] = value
        self.defined_at[value] = span
        self.var_of[value] = var

    def loop(self, st: A.For) -> None:
        if self.is_fn:
            self.rep.error("E041", "loops over modules are only allowed in a module's forward", st.span)
            raise _Abort
        sub = self.subs.get(st.iterable)
        if sub is None or sub.repeat is None:
            self.rep.error(
                "E041",
                f"`{st.iterable}` is not a `repeat` stack",
                st.span,
                did_you_mean(st.iterable, [s.name for s in self.subs.values() if s.repeat is not None]),
            )
            raise _Abort
        if st.var in self.loop_vars:
            self.rep.error(
                "E011",
                f"`{st.var}` is already the variable of an enclosing loop",
                st.span,
                f"name the inner loop's variable differently, e.g. `for {st.var}_2 in {st.iterable}:`",
            )
            raise _Abort
        if st.index is not None:
            taken = {st.var, *self.env, *self.params, *self.weights, *self.subs, *self.loop_indices}
            if st.index in taken or st.index in self.low.config_fields:
                self.rep.error(
                    "E011",
                    f"`{st.index}` already names something here; the layer index needs a name of its own",
                    st.span,
                    f"e.g. `for layer_idx, {st.var} in {st.iterable}:`",
                )
                raise _Abort
        self.used_members.add(sub.name)
        assigned = _assigned_vars(st.body)
        carried = [v for v in assigned if v in self.env]
        inputs = tuple(self.env[v] for v in carried)
        for v in inputs:
            self.read.add(v)
        outer_body, outer_env = self.body, dict(self.env)
        self.body = []
        params = []
        for v in carried:
            p = self.fresh(v)
            params.append(p)
            self.env[v] = p
        self.loop_vars[st.var] = sub.name
        if st.index is not None:
            self.loop_indices.add(st.index)
        for s in st.body:
            try:
                self.stmt(s)
            except _Abort:
                for var in _assigned_vars([s]):
                    self.env[var] = _POISON
        del self.loop_vars[st.var]
        self.loop_indices.discard(st.index)
        yields = tuple(self.env[v] for v in carried)
        for y in yields:
            self.read.add(y)
        body, self.body = tuple(self.body), outer_body
        self.env = outer_env
        results = []
        for v, p in zip(carried, params):
            r = self.fresh(v)
            results.append(r)
            self.bind(v, r, st.span)
            if p in self.read:  # used inside the loop: its value after the loop need not be read too
                self.read.add(r)
        self.body.append(
            N.Loop(
                st.var,
                sub.name,
                body,
                inputs,
                tuple(params),
                yields,
                tuple(results),
                tuple(carried),
                st.span,
                st.index or "",
            )
        )

    # expressions ------------------------------------------------------------------------------
    def expr(self, e: A.Expr) -> N.E:
        if isinstance(e, (A.Lit, A.ListLit)) or isinstance(e, A.Name):
            if isinstance(e, A.ListLit):
                return N.ListE(tuple(self.expr(i) for i in e.items))
            if isinstance(e, A.Lit):
                return N.Const(e.value)
            return self.resolve(e)
        if isinstance(e, A.Attr):
            if e.name != "dtype":
                self.rep.error("E041", f"unknown attribute `.{e.name}`", e.span, "tensors have `.dtype`")
                raise _Abort
            inner = self.expr(e.obj)
            if not (isinstance(inner, N.Ref) and inner.kind in ("value", "weight")):
                self.rep.error("E041", "`.dtype` needs a tensor", e.span)
                raise _Abort
            return N.Ref("dtype_of", inner.name if inner.kind == "value" else f"weight:{inner.name}")
        if isinstance(e, A.BinOp):
            left, right = self.expr(e.left), self.expr(e.right)
            if not (_is_tensor(left) or _is_tensor(right)):
                return N.BinE(e.op, left, right)
            op = _BINARY.get(e.op)
            if op is None:
                self.rep.error(
                    "E041",
                    f"`{e.op}` is not defined on tensors",
                    e.span,
                    "use where(), maximum() or minimum()" if e.op in ("<", ">", "<=", ">=", "==", "!=") else "",
                )
                raise _Abort
            return self.emit(op, (left, right), (), e.span)
        if isinstance(e, A.UnaryOp):
            operand = self.expr(e.operand)
            if not _is_tensor(operand):
                return N.UnE(e.op, operand)
            if e.op != "-":
                self.rep.error("E041", "`not` is not defined on tensors", e.span)
                raise _Abort
            return self.emit("neg", (operand,), (), e.span)
        if isinstance(e, A.Cond):
            return self.conditional(e)
        if isinstance(e, A.Call) and self._static_call_here(e):
            return self._body_static_call(e)
        if isinstance(e, A.Call):
            names = self.call(e, 1)
            return N.Ref("value", names[0])
        self.rep.error("E041", "unexpected expression", e.span)
        raise _Abort

    def conditional(self, e: A.Cond) -> N.E:
        """`a if c else b`: a build-time value when all three are; with tensor sides (and a build-time `c`) a
        Branch, whose untaken side never runs."""
        test = self.expr(e.test)
        if _is_tensor(test):
            self.rep.error(
                "E041",
                "`a if c else b` needs a build-time condition (config values, parameters)",
                getattr(e.test, "span", e.span),
                "for a condition on tensors use where(cond, a, b)",
            )
            raise _Abort
        outer = self.body
        try:
            self.body = []
            then = self.expr(e.then)
            then_body, self.body = tuple(self.body), []
            orelse = self.expr(e.orelse)
            else_body = tuple(self.body)
        finally:
            self.body = outer
        if not (then_body or else_body or _is_tensor(then) or _is_tensor(orelse)):
            return N.CondE(then, test, orelse)
        if not (_is_tensor(then) and _is_tensor(orelse)):
            self.rep.error(
                "E041",
                "`a if c else b` with a tensor on one side needs a tensor on the other",
                e.span,
                "write the number as a tensor expression (`x * 0.0`), or move the choice into the op's arguments",
            )
            raise _Abort
        result = self.fresh("")
        self.body.append(N.Branch(test, then_body, then, else_body, orelse, (result,), ("",), e.span))
        return N.Ref("value", result)

    def _static_call_here(self, e: A.Call) -> bool:
        """`log(theta)`, `floor(x)`, `min(a, b)` ... over build-time arguments only (no variable, weight or call
        of a module or fn): a build-time value. Over a tensor, `log` and `sqrt` are the primitives."""
        if not isinstance(e.func, A.Name) or e.func.id not in STATIC_CALLS or e.kwargs:
            return False
        if e.func.id in self.env or e.func.id in self.low.fn_names():
            return False

        def static(x: A.Expr) -> bool:
            if isinstance(x, A.Lit):
                return True
            if isinstance(x, A.Name):
                return x.id not in self.env and x.id not in self.weights and x.id not in self.subs
            if isinstance(x, A.BinOp):
                return static(x.left) and static(x.right)
            if isinstance(x, A.UnaryOp):
                return static(x.operand)
            if isinstance(x, A.Cond):
                return static(x.then) and static(x.test) and static(x.orelse)
            if isinstance(x, A.ListLit):
                return all(static(i) for i in x.items)
            if isinstance(x, A.Call):
                return self._static_call_here(x)
            return False

        return all(static(a) for a in e.args)

    def _body_static_call(self, e: A.Call) -> N.E:
        name = e.func.id
        want = 1 if name in STATIC_UNARY else 2
        if len(e.args) != want:
            self.rep.error("E040", f"`{name}` takes {want} argument(s) here", e.span)
            raise _Abort
        args = [self.expr(a) for a in e.args]
        if want == 1:
            return N.UnE(name, args[0])
        a, b = args
        return N.CondE(a, N.BinE("<=" if name == "min" else ">=", a, b), b)

    def emit(self, op: str, args, kwargs, span: Span, target: str = "", n: int = 1, vars_=None) -> N.E:
        names = tuple(self.fresh("") for _ in range(n))
        self.body.append(N.Op(op, tuple(args), tuple(kwargs), names, vars_ or ("",) * n, target, span))
        return N.Ref("value", names[0])

    def call_multi(self, e: A.Expr, targets: tuple[str, ...], span: Span) -> tuple[str, ...]:
        if not isinstance(e, A.Call):
            self.rep.error("E042", f"{len(targets)} names on the left, but the right side gives one value", span)
            raise _Abort
        self.call(e, len(targets))
        op = self.body[-1]
        new = tuple(self.fresh(t) for t in targets)
        for old in op.results:
            self.taken.discard(old)
        self.body[-1] = _replace(op, results=new, vars=tuple(targets))
        return new

    def call(self, e: A.Call, n: int) -> tuple[str, ...]:
        if not isinstance(e.func, A.Name):
            self.rep.error("E041", "only names can be called", e.span)
            raise _Abort
        f = e.func.id
        if f in self.failed and f not in self.env:
            raise _Abort
        args = tuple(self.expr(a) for a in e.args)
        kwargs = tuple((k.name, self.expr(k.value)) for k in e.kwargs)
        if f in self.env or f in self.weights or f in self.scalars:
            self.rep.error("E041", f"`{f}` is a value, not a function", e.func.span)
            raise _Abort
        if f in self.loop_vars or f in self.subs:
            if f in self.subs:
                if self.subs[f].repeat is not None:
                    self.rep.error("E041", f"`{f}` is a `repeat` stack: loop over it with `for layer in {f}:`", e.span)
                    raise _Abort
                self.used_members.add(f)
            if kwargs:
                self.rep.error("E040", "modules take positional arguments only", e.span)
                raise _Abort
            self.emit("call", args, (), e.span, target=f, n=n)
        elif f in self.low.fn_names():
            if kwargs:
                self.rep.error("E040", "functions take positional arguments only", e.span)
                raise _Abort
            self.emit("fn", args, (), e.span, target=f, n=n)
        elif f in PRIMITIVES:
            if f == "attention" and self.is_fn:
                self.rep.error(
                    "E041", "`attention` keeps a KV cache, so it must be called in a module's forward", e.span
                )
                raise _Abort
            if f == "cast" and len(args) == 2 and args[1] == N.Ref("dtype", "float"):
                self.rep.error(
                    "E032",
                    "`cast(x, float)`: `float` is the model's float dtype, which is a tensor's, not a fixed one",
                    e.args[1].span,
                    "cast to a tensor's dtype (`cast(h, x.dtype)`, `cast(h, weight.dtype)`) or a fixed one (f32, bf16, f16)",
                )
                raise _Abort
            self.emit(f, args, kwargs, e.span, n=n)
        elif f in self.low.decls.modules:
            self.rep.error(
                "E041", f"`{f}` is a module type: declare a submodule `name = {f}(...)` and call that", e.func.span
            )
            raise _Abort
        else:
            self.low._unknown(e.func, [c for c in self.candidates() if c not in self.env], "function")
        return self.body[-1].results


PLACEHOLDERS = "the placeholders a checkpoint pattern takes are `{i}`, the layer index, and `{j}`, an expert index"


def _other_placeholder(pattern: str) -> str | None:
    """A `{...}` in a checkpoint pattern other than the layer index `{i}` and the expert index `{j}`, or None."""
    import re

    found = next((m.group(0) for m in re.finditer(r"\{[^{}]*\}", pattern) if m.group(0) not in ("{i}", "{j}")), None)
    return found


def _assigned_vars(body) -> list[str]:
    out: dict[str, None] = {}  # ordered, without repeats
    for st in body:
        if isinstance(st, A.Assign):
            out.update(dict.fromkeys(st.targets))
        elif isinstance(st, A.For):
            out.update(dict.fromkeys(_assigned_vars(st.body)))
    return list(out)


def _ast_names(exprs) -> list[A.Name]:
    """The names read by AST expressions, in order."""
    out, todo = [], list(reversed(exprs))
    while todo:
        e = todo.pop()
        if isinstance(e, A.Name):
            out.append(e)
        elif isinstance(e, A.BinOp):
            todo += [e.right, e.left]
        elif isinstance(e, A.UnaryOp):
            todo.append(e.operand)
        elif isinstance(e, A.Cond):
            todo += [e.orelse, e.test, e.then]
        elif isinstance(e, (A.ListLit,)):
            todo += list(reversed(e.items))
    return out


def _is_tensor(e: N.E) -> bool:
    return any(r.kind in ("value", "weight") for r in free_refs(e))


def _replace(op, **kw):
    from dataclasses import replace

    return replace(op, **kw)


_POISON = "<error>"  # the value of a variable whose assignment failed
_BINARY = {"+": "add", "-": "sub", "*": "mul", "/": "div", "**": "pow", "@": "matmul"}


def lower(
    spec: A.File, std: A.File | None, arch: str | None = None, overrides: dict[str, str] | None = None
) -> tuple[N.Program, list]:
    """Lower a parsed spec (with the parsed standard library) to (Program, warnings), or raise DslcError."""
    low = Lowering(spec, std, arch, overrides or {})
    try:
        program = low.run()
    except _Abort:
        low.rep.raise_if_errors()
        raise
    program_warnings = [d for d in low.rep.diagnostics if not d.is_error]
    return program, program_warnings
