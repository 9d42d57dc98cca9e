"""Program -> the files of a standalone Python package (rendered with the Jinja templates).

Python decides (names, expressions, which modules take `config` or `ctx`); the templates hold text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from dslc.check.configs import activation_fields
from dslc.check.dims import NamedInt, TType
from dslc.codegen.activations import render_activations_module, render_triton_helpers
from dslc.codegen.autodiff import RUNTIME_NAMES
from dslc.codegen.python import BodyContext, BodyRenderer, commented, static_text
from dslc.codegen.text import comment, docstring, where
from dslc.codegen.triton_region import uses_activation
from dslc.ir import nodes as N
from dslc.ir import ops
from dslc.ir.evaluate import free_refs
from dslc.resources import templates_dir

STATIC_FILES = (
    "attention.py",
    "checkpoint.py",
    "cuda_graphs.py",
    "generation.py",
    "kernels_runtime.py",
    "losses.py",
    "losses_triton.py",
    "model_base.py",
    "moe.py",
    "parallel.py",
    "outputs.py",
    "serving.py",
)
PY_TYPES = {"int": "int", "float": "float", "bool": "bool", "str": "str"}
PY_TYPES.update({f"list[{t}]": f"list[{t}]" for t in list(PY_TYPES)})  # list-typed config fields
# Standard-library modules rendered as subclasses of torch's own layers, so PEFT, torch's tensor-parallel
# styles and quantizers (which test `isinstance(m, nn.Linear)`) take them: std module -> (base class, the
# base's constructor arguments from the module's params). The base creates the weights; the forward is the
# spec's (for Linear and Embedding it is the base's own computation).
TORCH_LAYERS = {
    "Linear": ("nn.Linear", "in_features, out_features, bias=bias"),
    "Embedding": ("nn.Embedding", "num_embeddings, embedding_dim, padding_idx=padding_idx"),
    "LayerNorm": ("nn.LayerNorm", "dim, eps=eps, bias=bias"),
    "Conv2d": ("nn.Conv2d", "in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias"),
}
TORCH_LAYER_RESET = {
    "Embedding": "self._fill_padding_idx_with_zero()  # the pad row starts at zero, as in torch and HF"
}
STD_FILE = "std.model"


@dataclass
class ModuleView:
    name: str
    doc: str
    where: str
    base: str
    init_params: str
    init_lines: list[str]
    reset_lines: list[str]
    forward_name: str
    forward_args: str
    forward_lines: list[str]
    is_model: bool = False
    super_args: str = ""
    class_attrs: list[str] = field(default_factory=list)
    extra_methods: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (name, args, body lines)


@dataclass
class FnView:
    name: str
    doc: str
    where: str
    args: str
    lines: list[str]


def _closure(modules: tuple[N.ModuleDef, ...], direct, choices_agree: bool = False) -> dict[str, bool]:
    """A property of a module that holds when it or any of its submodules has it directly. `choices_agree`:
    the sides of a choice `A() if c else B()` share it (one call site calls either, so both take `ctx`)."""
    forced: set[str] = set()
    while True:
        out: dict[str, bool] = {}
        for m in modules:  # dependency order: callees first
            out[m.name] = (
                m.name in forced or direct(m) or any(out.get(c, False) for s in m.submodules for c in N.modules_of(s))
            )
        more = {
            c
            for m in modules
            for s in m.submodules
            if choices_agree and any(out.get(c, False) for c in N.modules_of(s))
            for c in N.modules_of(s)
            if not out.get(c, False)
        }
        if not more:
            return out
        forced |= more


def _uses_attention(body) -> bool:
    return _uses(body, ("attention",))


def _uses(body, names: tuple[str, ...]) -> bool:
    for st in body:
        if isinstance(st, (N.Loop, N.Branch)):
            if any(_uses(b, names) for b in N.bodies(st)):
                return True
        elif st.op in names:
            return True
    return False


HOST_SYNC_OPS = ("moe_dispatch", "grouped_linear")  # read sizes on the host (tokens per expert): no CUDA graph


def _dim_names(params: dict, config_values: dict) -> dict[int, str]:
    """Map sizes back to the name that produced them, where that name is unambiguous."""
    names: dict[int, str] = {}
    for source in (config_values, params):  # module params win over config fields
        seen: dict[int, list[str]] = {}
        for k, v in source.items():
            if isinstance(v, int) and not isinstance(v, bool) and v > 1:
                seen.setdefault(v, []).append(k)
        for v, ks in seen.items():
            if len(ks) == 1:
                names[v] = ks[0]
    return names


def _type_text(t, dim_names: dict[int, str], param_names: dict[int, str]) -> str:
    """A shape comment: a module's own parameter (`dim` inside RMSNorm), else the config expression the size
    came from, else an unambiguous name for the number."""
    if not isinstance(t, TType):
        return ""
    dims = ", ".join(
        param_names[d]
        if isinstance(d, int) and d in param_names
        else d.text
        if isinstance(d, NamedInt)
        else dim_names.get(d, str(d))
        if isinstance(d, int)
        else str(d)
        for d in t.dims
    )
    return f"[{dims}]" + ("" if t.dtype == "float" else f" {t.dtype}")


class PackageRenderer:
    def __init__(self, checked, spec_name: str, package: str, optimized=None):
        """`optimized` (dslc.passes.pipeline.Optimized): render its program; else the checked one."""
        self.checked = checked
        self.p: N.Program = optimized.program if optimized is not None else checked.program
        types = optimized.types if optimized is not None else checked.types
        self.spec_name = spec_name
        self.package = package
        self.config_values = self.p.config_values
        mods = self.p.modules
        self.needs_config = _closure(mods, lambda m: m.uses_config)
        self.needs_ctx = _closure(
            mods, lambda m: m.forward is not None and _uses_attention(m.forward.body), choices_agree=True
        )
        self.checkpointed = set(self.p.train.checkpointing)
        # the inferred types of each module's first instantiation, for shape comments
        self.first_types: dict[str, tuple[dict, dict]] = {}
        for (kind, name, params), value_types in types.items():
            if kind == "module" and name not in self.first_types:
                self.first_types[name] = (dict(params), value_types)

    def where(self, span) -> str:
        return where(span)

    # ---- modules -------------------------------------------------------------------------------------
    def torch_layer(self, m: N.ModuleDef) -> tuple[str, str] | None:
        """(base class, its constructor arguments) for a standard-library layer that torch defines."""
        return TORCH_LAYERS.get(m.name) if Path(m.span.file).name == STD_FILE else None

    def module_view(self, m: N.ModuleDef) -> ModuleView:
        is_model = m.name == self.p.model
        torch_layer = self.torch_layer(m)
        ctx = BodyContext(spec_name=self.spec_name, in_module=True, module=m)
        member_names = {w.name for w in m.weights} | {s.name for s in m.submodules}
        forward_params = _forward_params(m)
        for p in forward_params:
            ctx.param_attrs[p] = p if p not in member_names else f"{p}_value"
        ctx.conditional_weights = {w.name for w in m.weights if w.condition is not None}
        ctx.needs_ctx = self.needs_ctx
        ctx.module_of_sub = {s.name: N.modules_of(s) for s in m.submodules}
        ctx.checkpointed = self.checkpointed
        params, types = self.first_types.get(m.name, ({}, {}))
        dim_names = _dim_names(params, self.config_values)
        param_names = _dim_names(params, {})
        ctx.type_names = {k: _type_text(t, dim_names, param_names) for k, t in types.items()}

        init_params, late = [], []
        if self.needs_config[m.name]:
            init_params.append(f"config: {self.config_class}")
        for p in m.params:
            ann = PY_TYPES.get(p.type, p.type) + (" | None" if p.optional else "")
            if p.default is None:
                init_params.append(f"{p.name}: {ann}")
            elif free_refs(p.default):  # over config fields or earlier parameters: computed in the body
                init_params.append(f"{p.name}: {ann}{'' if p.optional else ' | None'} = None")
                late.append(
                    f"{p.name} = {static_text(p.default, ctx, {}, 0, init=True)} if {p.name} is None else {p.name}"
                )
            else:
                init_params.append(f"{p.name}: {ann} = {static_text(p.default, ctx, {}, 0, init=True)}")

        init = list(late)
        if self.needs_config[m.name] and not is_model:
            init.append("self.config = config")
        for p in forward_params:
            if torch_layer is None or p not in torch_layer[1]:  # the torch base stores its own arguments
                init.append(f"self.{ctx.param_attrs[p]} = {p}")
        for w in m.weights if torch_layer is None else ():
            shape = ", ".join(static_text(d, ctx, {}, 0, init=True) for d in w.shape)
            dtype = "" if w.dtype == "float" else f", dtype={_torch_dtype(w.dtype)}"
            make = f"nn.Parameter(torch.empty({shape}{dtype}))"
            if w.condition is not None:
                make += f" if {static_text(w.condition, ctx, {}, 2, init=True)} else None"
            doc = f"  # {comment(w.doc)}" if w.doc else f"  # {self.where(w.span)}"
            init += commented(f"self.{w.name} = {make}", doc)
        for s in m.submodules:
            make = self._construct(s, ctx)
            if s.repeat is not None:
                index = "i" if N.per_layer(s) else "_"
                count = static_text(s.repeat, ctx, {}, 0, init=True)
                make = f"nn.ModuleList({make} for {index} in range({count}))"
            sides = N.choices(s)  # `A(...) if c1 else B(...) if c2 else None`: one module per instance
            for k, c in enumerate(sides):
                if c.condition is None:
                    break
                after = self._construct(sides[k + 1], ctx) if k + 1 < len(sides) else "None"
                make += f" if {static_text(c.condition, ctx, {}, 2, init=True)} else {after}"
            init += commented(f"self.{s.name} = {make}", f"  # {self.where(s.span)}")
        if m.ties:
            pairs = []
            for t in m.ties:
                pair = f"{t.target!r}: {t.source!r}"
                cond = f" if {static_text(t.condition, ctx, {}, 2, init=True)}" if t.condition is not None else ""
                pairs.append((pair, cond))
            init.append("self.tied = {")
            init += [f"    **({{{pair}}}{cond + ' else {}' if cond else ''})," for pair, cond in pairs]
            init.append("}")
        for fused, parts in m.projection_groups:
            init.append(f"self.{fused} = None  # {', '.join(parts)} as one matmul, after model.fuse_projections()")
        if self.needs_ctx[m.name] and _uses_attention(m.forward.body):
            init.append("self.kv_cache = None  # a KVCache while generating")
        if m.name in self.checkpointed or any(c in self.checkpointed for s in m.submodules for c in N.modules_of(s)):
            init.append("self.gradient_checkpointing = False")
        if is_model:
            init.append("self.tie_weights()")

        reset = []
        for w in m.weights:
            if w.init == "normal":
                std = static_text(w.init_std, ctx, {}, 0) if w.init_std is not None else "0.02"
                line = f"nn.init.normal_(self.{w.name}, std={std})"
            else:
                line = f"nn.init.{w.init}_(self.{w.name})"
            reset.append(line if w.condition is None else f"if self.{w.name} is not None:\n            {line}")

        if torch_layer is not None and m.name in TORCH_LAYER_RESET:
            reset.append(TORCH_LAYER_RESET[m.name])
        g = m.forward
        renderer = BodyRenderer(g, ctx)
        lines = renderer.render()
        # the model's forward always takes the attention context (the runtime passes it), other modules when they use it
        args = [a.name for a in g.args] + (["ctx"] if self.needs_ctx[m.name] else ["ctx=None"] if is_model else [])
        if m.residual is not None:  # forward(x, residual=None): the residual add runs in the norm's kernel
            residual_arg = m.residual.args[1].name
            args.append(f"{residual_arg}=None")
            residual_lines = BodyRenderer(m.residual, ctx).render()
            lines = (
                [f"if {residual_arg} is not None:  # returns (norm of x + {residual_arg}, x + {residual_arg})"]
                + [f"    {line}" for line in residual_lines]
                + lines
            )
        attrs, extra = [], []
        if m.projection_groups:
            attrs.append(f"projection_groups = {dict(m.projection_groups)!r}")
        if is_model:
            attrs = self.model_class_attrs(m)
            head = self.loss_head(m)
            attrs.append(f"loss_head = {head[0] if head else None!r}")
            if head:
                hidden_graph = head[1]
                extra.append(("forward_hidden", ", ".join(["self"] + args), BodyRenderer(hidden_graph, ctx).render()))
                if m.head_softcap is not None:
                    extra.append(("logit_softcap", "self", self._softcap_lines(m.head_softcap, ctx)))
            if self.p.router is not None:
                attrs.append(f"router_pattern = {self.p.router.pattern!r}")
                options = ", ".join(f"{k}={static_text(v, ctx, {}, 0)}" for k, v in self.p.router.options)
                doc = '"""The load-balancing loss\'s options, from the config (the spec\'s `router` line)."""'
                extra.append(("router_options", "self", [doc, f"return dict({options})"]))
            if self.p.losses:
                attrs.append(f"losses = {tuple(d.kind for d in self.p.losses)!r}")
                doc = '"""Each declared loss\'s options, from the config (the spec\'s `loss` lines)."""'
                body = [doc, "return {"]
                for d in self.p.losses:
                    options = ", ".join(f"{k}={static_text(v, ctx, {}, 0)}" for k, v in d.options)
                    body.append(f"    {d.kind!r}: dict({options}),")
                extra.append(("loss_options", "self", [*body, "}"]))
        return ModuleView(
            name=m.name,
            doc=m.doc or f"The `{m.name}` module.",
            where=self.where(m.span),
            base="PreTrainedModel" if is_model else (torch_layer[0] if torch_layer else "nn.Module"),
            super_args="config" if is_model else (torch_layer[1] if torch_layer else ""),
            init_params=", ".join(["self"] + init_params),
            init_lines=init,
            reset_lines=reset,
            forward_name="forward_graph" if is_model else "forward",
            forward_args=", ".join(["self"] + args),
            forward_lines=lines,
            is_model=is_model,
            class_attrs=attrs,
            extra_methods=extra,
        )

    def _construct(self, s: N.SubmoduleDef, ctx: BodyContext) -> str:
        """`Module(config, args, key=value)`: one side of a submodule's declaration, in __init__."""
        args = [static_text(a, ctx, {}, 0, init=True) for a in s.args]
        args += [f"{k}={static_text(v, ctx, {}, 0, init=True)}" for k, v in s.kwargs]
        if self.needs_config[s.module]:
            args.insert(0, "config")
        return f"{s.module}({', '.join(args)})"

    def _softcap_lines(self, cap: N.HeadSoftcap, ctx: BodyContext) -> list[str]:
        """The body of the model's `logit_softcap()`: the final soft-cap the forward applies after the head."""
        unless_none = {N.BinE("!=", cap.cap, N.Const(None)), N.BinE("!=", N.Const(None), cap.cap)}
        plain = cap.test is None or cap.test in unless_none  # `cap if cap != none else none` is the cap
        value = cap.cap if plain else N.CondE(cap.cap, cap.test, N.Const(None))
        doc = '"""The soft-cap after the LM head (logits -> cap * tanh(logits / cap)), or None where it is off."""'
        return [doc, f"return {static_text(value, ctx, {}, 0)}"]

    def loss_head(self, m: N.ModuleDef):
        """((submodule, weight, bias), graph up to the head's input) when the model ends in a Linear-like
        head, or in one and the final soft-cap the loss-head pass found (`head_softcap`), so training can use
        the fused chunked loss instead of materializing the logits."""
        g = m.forward
        if len(g.outputs) != 1 or not g.body:
            return None
        if m.head_softcap is not None:  # the head call is the one whose result the cap reads
            at = [i for i, st in enumerate(g.body) if isinstance(st, N.Op) and st.results == (m.head_softcap.logits,)]
            if len(at) != 1:
                return None
            g = N.Graph(g.args, g.body[: at[0] + 1], (m.head_softcap.logits,), None, g.span)
        if not isinstance(g.body[-1], N.Op):
            return None
        last = g.body[-1]
        if last.op != "call" or last.results != g.outputs or len(last.args) != 1:
            return None
        sub = next((s for s in m.submodules if s.name == last.target), None)
        if sub is None or sub.repeat is not None or sub.alternatives:
            return None
        body = self.p.module(sub.module).forward.body
        if len(body) != 1 or not isinstance(body[0], N.Op) or body[0].op != "linear":
            return None
        lin = body[0]
        refs = [a.name if isinstance(a, N.Ref) and a.kind == "weight" else None for a in lin.args[1:]]
        if refs[0] is None:
            return None
        hidden = last.args[0]
        if not (isinstance(hidden, N.Ref) and hidden.kind == "value"):
            return None
        head = (sub.name, refs[0], refs[1] if len(refs) > 1 else None)
        return head, N.Graph(g.args, g.body[:-1], (hidden.name,), None, g.span)

    def model_class_attrs(self, m: N.ModuleDef) -> list[str]:
        outputs = N.TASKS.get(m.task or "base", ("logits",))
        n_out = len(m.forward.outputs)
        outputs = (
            outputs[:n_out]
            if len(outputs) >= n_out
            else outputs + tuple(f"output_{i}" for i in range(len(outputs), n_out))
        )
        rules = []
        for r in self.p.checkpoint.rules:
            transforms = [(name, {k: self._rule_option(v) for k, v in kw}) for name, kw in r.transforms]
            rules.append(
                {
                    "sources": list(r.sources),
                    "transforms": transforms,
                    "targets": list(r.targets),
                    "save": r.layout is None,  # HF's own format: written back through the rule
                    "layout": r.layout,  # a named section's name (`checkpoint "meta":`), else None
                }
            )
        return [
            f"config_class = {self.config_class}",
            f"task = {m.task!r}",
            f"graph_inputs = {graph_inputs(m.forward)!r}",
            f"output_names = {outputs!r}",
            f"layout_rules = {rules!r}",
            f"ignored_keys = {list(self.p.checkpoint.ignores)!r}",
            f"tp_plan = {dict(self.p.train.parallel)!r}",
            *(
                ["graph_capturable = False  # its experts' row counts are read on the host"]
                if any(_uses(mod.forward.body, HOST_SYNC_OPS) for mod in self.p.modules if mod.forward)
                else []
            ),
            *([f"remat_save = {tuple(self.p.train.save)!r}"] if self.p.train.save else []),
        ]

    def region_view(self, r, grouped: bool) -> dict:
        from dslc.codegen.triton_region import pair_params, render_region_torch, render_region_triton

        args = ", ".join(i.name for i in r.inputs)
        first = next(i.name for i in r.inputs if i.kind == "tensor" and not i.optional)
        pair = pair_params(r)
        return {
            "name": r.name,
            "args": args,
            "grouped": grouped,
            "args_a": ", ".join(pair[: len(r.inputs)]),
            "args_b": ", ".join(pair[len(r.inputs) :]),
            "outputs": len(r.outputs),
            "first_tensor": first,
            "optional": [i.name for i in r.inputs if i.optional],
            "source": r.source,
            "summary": " -> ".join(o.op for o in r.ops),
            "torch_source": render_region_torch(r).strip(),
            "triton_source": render_region_triton(r, grouped).strip(),
        }

    def _rule_option(self, e: N.E):
        """A checkpoint transform's option: a number, or a config field read when the folder loads
        (`{"config": "num_attention_heads"}`, bound by checkpoint.bind_rules)."""
        if isinstance(e, N.Ref) and e.kind == "config":
            return {"config": e.name}
        return self._const(e)

    def _const(self, e: N.E):
        from dslc.ir.evaluate import evaluate

        return evaluate(e, lambda r: self.config_values[r.name])

    def fn_view(self, f: N.FnDef) -> FnView:
        ctx = BodyContext(spec_name=self.spec_name, in_module=False)
        lines = BodyRenderer(f.graph, ctx).render()
        args = []
        for a in f.graph.args:
            args.append(f"{a.name}: torch.Tensor" if a.tensor is not None else f"{a.name}: {PY_TYPES[a.scalar_type]}")
        return FnView(f.name, f.doc, self.where(f.span), ", ".join(args), lines)

    # ---- config ----------------------------------------------------------------------------------------
    @property
    def config_class(self) -> str:
        return self.p.config.name

    def config_view(self) -> dict:
        """The config class's fields and archs, from the values the check evaluated (`checked.config_eval`).

        The build's arch and `--set` values become the fields' defaults, so `Config()` is the config that was
        checked and reported; each arch holds its values as the check evaluated them, plus the spec's own
        default for any field the build changed and the arch does not set (`for_arch` starts from the spec)."""
        from dslc.ir.evaluate import free_refs

        c = self.p.config
        ev = self.checked.config_eval
        ctx = BodyContext(spec_name=self.spec_name, in_module=False)
        ctx.config_prefix = "self"
        fixed = set(ev.fixed)
        fields, derived = [], []
        for f in c.fields:
            ann = PY_TYPES[f.type] + (" | None" if f.optional else "")
            is_derived = f.default is not None and any(r.kind == "config" for r in free_refs(f.default))
            built = static_text(N.Const(ev.values[f.name]), ctx, {}, 0) if f.name in fixed else None
            if is_derived:
                derived.append((f.name, static_text(f.default, ctx, {}, 0), {r.name for r in free_refs(f.default)}))
                doc = f.doc or f"derived: {_src(f, ctx)}"
                fields.append((f.name, f"{PY_TYPES[f.type]} | None", built or "None", doc))
            elif built is not None:
                fields.append((f.name, ann, built, f.doc))
            elif f.default is None:
                fields.append((f.name, ann, "None" if f.optional else None, f.doc))
            else:
                fields.append((f.name, ann, static_text(f.default, ctx, {}, 0), f.doc))
            name, a, default, doc = fields[-1]
            if f.type.startswith("list[") and default not in (None, "None"):  # a dataclass list default
                fields[-1] = (name, a, f"field(default_factory=lambda: {default})", doc)
        derived = _dependency_sorted(derived)
        requires = [
            (
                static_text(r.test, ctx, {}, 0),
                r.message or "requirement failed",
                sorted({x.name for x in _refs(r.test)}),
                self.where(r.span),
            )
            for r in c.requires
        ]
        archs = {}
        for name, values in ev.arch_values.items():
            restore = {k: ev.defaults[k] for k in ev.fixed if k not in values and k in ev.defaults}
            archs[name] = {**restore, **values}
        return {
            "name": c.name,
            "fields": fields,
            "derived": derived,
            "types": {f.name: (f.type, f.optional) for f in c.fields},
            "aliases": dict(c.aliases),
            "requires": requires,
            "archs": archs,
            # (field, whether it may be none, the module reading it as an activation's name)
            "activations": [
                (f, next(x.optional for x in c.fields if x.name == f), m)
                for f, m in sorted(activation_fields(self.p).items())
            ],
            "activation_names": tuple(ops.ACTIVATIONS),
        }

    def called_fns(self) -> set[str]:
        """The fns some module still calls after inlining (directly or through another fn): the others are
        not rendered."""

        def calls(body):
            for st in body:
                if isinstance(st, (N.Loop, N.Branch)):
                    for inner in N.bodies(st):
                        yield from calls(inner)
                elif st.op == "fn":
                    yield st.target

        todo = [t for m in self.p.modules for g in (m.forward, m.residual) if g is not None for t in calls(g.body)]
        fns = {f.name: f for f in self.p.fns}
        seen: set[str] = set()
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(calls(fns[name].graph.body))
        return seen

    @staticmethod
    def uses_math(modules: list[ModuleView], fns: list[FnView]) -> bool:
        """Whether modeling.py calls Python's math module (a build-time `log`, `sqrt`, `floor` or `ceil`)."""
        lines = [
            x for m in modules for x in m.init_lines + m.forward_lines + [y for _, _, ls in m.extra_methods for y in ls]
        ]
        return any("math." in line for line in lines + [x for f in fns for x in f.lines])

    def modeling_imports(self, modules: list[ModuleView], fns: list[FnView]) -> list[str]:
        """The package-relative imports modeling.py uses (nothing unused, for ruff's F401)."""
        text = "\n".join(
            line
            for m in modules
            for line in m.init_lines + m.forward_lines + [x for _, _, lines in m.extra_methods for x in lines]
        )
        text += "\n".join(line for f in fns for line in f.lines)
        imports = []
        if "kernels." in text:
            imports.append("from . import kernels")
        if re.search(r"(?<![\w.])activation\(", text):
            imports.append("from .activations import activation")
        if "attention(" in text:
            imports.append("from .attention import attention")
        if re.search(r"(?<![\w.])moe\.", text):
            imports.append("from . import moe")
        imports.append(f"from .config import {self.config_class}")
        base = ["PreTrainedModel"] + [
            n for n in ("checkpoint_call", "constant_tensor", "fused_linear") if f"{n}(" in text
        ]
        imports.append(f"from .model_base import {', '.join(base)}")
        return imports

    # ---- files ---------------------------------------------------------------------------------------
    def render(self, spec_text: str, metadata: dict, target: str = "standalone") -> dict[str, str]:
        import jinja2

        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(templates_dir() / "package")),
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.StrictUndefined,
        )
        env.filters["doc"] = docstring  # text inside a generated docstring
        env.filters["comment"] = comment  # text after a generated `#`
        modules = [self.module_view(m) for m in self.p.modules]
        called = self.called_fns()
        fns = [self.fn_view(f) for f in self.p.fns if f.name in called]
        model = next(m for m in modules if m.is_model)
        common = {
            "spec": self.spec_name,
            "package": self.package,
            "model": model.name,
            "config_class": self.config_class,
            "version": metadata["dslc_version"],
            "task": next(m.task for m in self.p.modules if m.name == self.p.model) or "base",
        }
        grouped = {
            op.target
            for m in self.p.modules
            for g in (m.forward, m.residual)
            if g is not None
            for op in N.iter_ops(g.body)
            if op.op == "region" and N.group_size(op) > 1
        }
        regions = [self.region_view(r, r.name in grouped) for r in self.p.regions]
        region_acts = uses_activation(self.p.regions)
        files = {
            "__init__.py": env.get_template("__init__.py.j2").render(**common, modules=modules, target="standalone"),
            "kernels.py": env.get_template("kernels.py.j2").render(**common, regions=regions, activations=region_acts),
            "kernels_triton.py": env.get_template("kernels_triton.py.j2").render(
                **common,
                regions=regions,
                activation_helpers=render_triton_helpers().strip() if region_acts else "",
                runtime_names=sorted(n for n in RUNTIME_NAMES if any(f"{n}(" in r["triton_source"] for r in regions)),
            ),
            "config.py": env.get_template("config.py.j2").render(**common, config=self.config_view()),
            "modeling.py": env.get_template("modeling.py.j2").render(
                **common,
                modules=modules,
                fns=fns,
                imports=self.modeling_imports(modules, fns),
                uses_math=self.uses_math(modules, fns),
            ),
        }
        for name in STATIC_FILES:
            files[name] = (templates_dir() / "package" / name).read_text()
        if region_acts or "from .activations import" in files["modeling.py"]:
            files["activations.py"] = render_activations_module()
        if target == "hf":
            files = self.hf_layer(env, common, files)
        files[spec_copy_name(self.spec_name, files)] = spec_text
        import json

        metadata = {**metadata, "files": sorted([*files, "build.json"])}  # what a rebuild may replace
        files["build.json"] = json.dumps(metadata, indent=2, sort_keys=True) + "\n"
        return files

    def hf_layer(self, env, common: dict, files: dict[str, str]) -> dict[str, str]:
        """`--target hf`: the same modeling and kernel files on transformers' base classes. The standalone
        base and config move to model_core.py and config_spec.py; model_base.py and config.py become the
        transformers layer (templates/package/hf/) that modeling.py imports unchanged."""
        spec_type = self.config_values.get("model_type")
        spec_type = spec_type if isinstance(spec_type, str) and spec_type else self.package
        files = dict(files)
        files["model_core.py"] = files.pop("model_base.py")
        files["config_spec.py"] = files.pop("config.py")
        files["model_base.py"] = (templates_dir() / "package" / "hf" / "model_base.py").read_text()
        files["config.py"] = env.get_template("hf/config.py.j2").render(
            **common, hf_model_type=f"dslc_{self.package}", spec_model_type=spec_type
        )
        files["__init__.py"] = env.get_template("__init__.py.j2").render(
            **common, modules=[self.module_view(m) for m in self.p.modules], target="hf"
        )
        return files


KNOWN_INPUTS = ("input_ids", "position_ids", "token_type_ids")  # model_base.py: what forward() takes by name


def graph_inputs(forward: N.Graph) -> tuple[str, ...]:
    """The runtime input each model forward argument takes: its own name, except that a first integer
    argument of another name (`ids`) is the token ids, `input_ids` (the HF-style forward's first argument)."""
    names = [a.name for a in forward.args]
    first = forward.args[0] if forward.args else None
    if (
        first is not None
        and first.name not in KNOWN_INPUTS
        and "input_ids" not in names
        and first.tensor is not None
        and first.tensor.dtype in ("i64", "i32")
    ):
        names[0] = "input_ids"
    return tuple(names)


def spec_copy_name(name: str, files: dict) -> str:
    """The spec's file name inside the package, or `spec.model` when it is not a plain `*.model` name or would
    replace a generated file."""
    if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.model", name) and name not in files:
        return name
    return "spec.model"


def _forward_params(m: N.ModuleDef) -> list[str]:
    """Module params read by forward (stored on self in __init__)."""
    from dslc.ir.evaluate import free_refs

    found: list[str] = []

    def visit(body) -> None:
        for st in body:
            if isinstance(st, N.Loop):
                visit(st.body)
                continue
            if isinstance(st, N.Branch):
                exprs = [st.test, st.then_value, st.else_value]
                visit(st.then)
                visit(st.orelse)
            else:
                exprs = list(st.args) + [v for _, v in st.kwargs]
            for a in exprs:
                for r in free_refs(a):
                    if r.kind == "param" and r.name not in found:
                        found.append(r.name)

    visit(m.forward.body)
    return found


def _refs(e):
    from dslc.ir.evaluate import free_refs

    return [r for r in free_refs(e) if r.kind == "config"]


def _src(f: N.FieldDef, ctx) -> str:
    return static_text(f.default, ctx, {}, 0).replace("self.", "")


def _torch_dtype(d: str) -> str:
    from dslc.codegen.python import TORCH_DTYPES

    return TORCH_DTYPES[d]


def _dependency_sorted(derived: list[tuple[str, str, set[str]]]) -> list[tuple[str, str]]:
    """(field, expression) of the derived fields, each after the derived fields it reads (declaration order
    otherwise; a base config's field such as RopeConfig's `rope_dim = head_dim` may come before what it reads).
    The checker has refused cycles."""
    deps = {name: reads for name, _, reads in derived}
    exprs = {name: expr for name, expr, _ in derived}
    out: list[tuple[str, str]] = []
    placed: set[str] = set()

    def place(name: str) -> None:
        if name in placed:
            return
        placed.add(name)
        for dep in sorted(deps[name] & deps.keys(), key=list(deps).index):
            place(dep)
        out.append((name, exprs[name]))

    for name in deps:
        place(name)
    return out
