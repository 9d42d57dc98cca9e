"""`dslc show`: the config table, the module/weight tree with parameter counts, the IR text, a .dot graph.

Printing uses rich with markup off, so shapes such as `[B, T, 896]` are never read as style tags.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dslc.ir import nodes as N
from dslc.ir.evaluate import EvalError, evaluate
from dslc.ir.printer import const_text, expr_text, print_program


def show_program(checked, ir: bool = False, graph: str | None = None, fusion: bool = False) -> int:
    """Print what `dslc show` prints; returns an exit status (1 when the graph could not be written)."""
    from rich.console import Console

    console = Console(markup=False, highlight=False, soft_wrap=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 140  # piped to a file or a pager: keep table rows on one line
    p: N.Program = checked.program
    arch = f" (arch {p.arch})" if p.arch else ""
    console.print(f"{p.model}{arch} from {p.source}", style="bold")
    console.print(config_table(p))
    console.print(weight_tree(p))
    console.print(f"total: {p.param_count:,} parameters (tied weights counted once)", style="bold")
    if ir:
        console.file.write("\n" + print_program(p, checked.types))  # verbatim: rich would wrap long lines
        console.file.flush()
    optimized = None
    if fusion or graph:
        from dslc.passes.pipeline import optimize

        optimized = optimize(p)
    if fusion:
        from dslc.report import print_fusion_report

        print_fusion_report(optimized, console)
    status = 0
    if graph:  # the IR before fusion, and after the pass pipeline beside it
        path = Path(graph)
        if path.suffix.lower() == ".svg" and shutil.which("dot") is None:
            print(
                f"error: writing {graph} needs Graphviz's `dot` program, which is not on PATH\n"
                f"  = help: install Graphviz, or write the graph as .dot: --graph {path.with_suffix('.dot')}",
                file=sys.stderr,
            )
            return 1
        before = str(path.with_name(f"{path.stem}.before{path.suffix}"))
        status = write_graph(p, before, console) or write_graph(optimized.program, graph, console)
    return status


# ---- archs (a registry of the spec's named presets) --------------------------------------------------


def arch_rows(spec: str | Path, checked) -> list[tuple[str, str, str, int]]:
    """(arch, extends, the fields it sets, parameter count) for the spec's default and each named arch; each
    arch's count comes from checking the spec with it (a failing arch raises DslcError naming it)."""
    from dslc.api import check_file

    ev = checked.config_eval
    bases = {a.name: a.base for a in _arch_decls(checked)}
    rows = [("(default)", "", "", check_file(spec).program.param_count)]
    for name, values in ev.arch_values.items():
        sets = ", ".join(f"{k} = {const_text(v)}" for k, v in values.items())
        rows.append((name, bases.get(name) or "", sets, check_file(spec, name).program.param_count))
    return rows


def _arch_decls(checked) -> tuple[N.ArchDef, ...]:
    return checked.program.config.archs


def show_archs(spec: str | Path, checked) -> int:
    """`dslc show SPEC --archs`: the named archs, what each sets and its parameter count."""
    from rich.console import Console
    from rich.table import Table

    console = Console(markup=False, highlight=False, soft_wrap=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 160
    table = Table(title=f"archs of {checked.program.model} ({Path(spec).name})")
    for col in ("arch", "extends", "sets", "parameters"):
        table.add_column(col, overflow="fold", justify="right" if col == "parameters" else "left")
    for name, base, sets, count in arch_rows(spec, checked):
        table.add_row(name, base, sets, f"{count:,}")
    console.print(table)
    return 0


# ---- config ----------------------------------------------------------------------------------------


def _value_text(v) -> str:
    """A config value as the spec writes it: a list field's items in brackets (`[1, 3]`)."""
    return "[" + ", ".join(map(_value_text, v)) + "]" if isinstance(v, list) else const_text(v)


def config_table(p: N.Program):
    from rich.table import Table

    values = dict(p.values)
    table = Table(title=f"config {p.config.name}", title_justify="left")
    for col in ("field", "type", "value"):
        table.add_column(col, no_wrap=True)
    for col in ("default", "doc"):
        table.add_column(col, overflow="fold")
    for f in p.config.fields:
        value = _value_text(values[f.name]) if f.name in values else ""
        default = expr_text(f.default) if f.default is not None else ""
        table.add_row(f.name, f.type + ("?" if f.optional else ""), value, default, f.doc)
    return table


# ---- the module / weight tree ---------------------------------------------------------------------------


@dataclass
class _Node:
    """One submodule instance (or a repeat stack) of the instantiated model."""

    name: str  # path segment (`q_proj`, `layers`, `0`)
    module: str  # module type; "" for a repeat stack
    weights: list[N.WeightInfo] = field(default_factory=list)  # own weights
    children: list[_Node] = field(default_factory=list)
    repeat: int | None = None  # a repeat stack: number of layers

    def all_weights(self) -> list[N.WeightInfo]:
        out = list(self.weights)
        for c in self.children:
            out += c.all_weights()
        return out

    def params(self) -> int:
        return sum(_numel(w) for w in self.all_weights() if w.tied_to is None)


def _numel(w: N.WeightInfo) -> int:
    return math.prod(w.shape)


def build_tree(p: N.Program) -> _Node:
    """The instance tree from the module definitions and the instance weights (`Program.weights`)."""
    by_prefix: dict[str, list[N.WeightInfo]] = {}
    for w in p.weights:
        prefix, _, _ = w.name.rpartition(".")
        by_prefix.setdefault(prefix, []).append(w)
    names = [w.name for w in p.weights]
    modules = {m.name: m for m in p.modules}
    values = dict(p.values)

    def has_under(prefix: str) -> bool:
        return any(n.startswith(prefix + ".") for n in names)

    def declares_weights(mdef: N.ModuleDef, seen=()) -> bool:
        if mdef.weights:
            return True
        return any(
            m in modules and m not in seen and declares_weights(modules[m], seen + (mdef.name,))
            for s in mdef.submodules
            for m in N.modules_of(s)
        )

    def build(mdef: N.ModuleDef, name: str, path: str) -> _Node:
        node = _Node(name, mdef.name)
        own = {w.name: w for w in by_prefix.get(path, [])}
        node.weights = [
            own[f"{path}.{w.name}" if path else w.name]
            for w in mdef.weights
            if (f"{path}.{w.name}" if path else w.name) in own
        ]
        for s in mdef.submodules:
            child = modules.get(s.module)
            sub_path = f"{path}.{s.name}" if path else s.name
            if child is None:
                continue
            if s.alternatives:  # a choice: the side whose weights this instance holds
                under = sum(1 for n in names if n.startswith(sub_path + "."))
                sides = [build(modules[c.module], s.name, sub_path) for c in N.choices(s) if c.module in modules]
                fits = [
                    n
                    for n in sides
                    if len(n.all_weights()) == under and (under or not declares_weights(modules[n.module]))
                ]
                if fits:
                    node.children.append(fits[0])
                continue
            present = has_under(sub_path) or (s.condition is None and not declares_weights(child))
            if not present:
                continue
            if s.repeat is None:
                node.children.append(build(child, s.name, sub_path))
                continue
            stack = _Node(s.name, "", repeat=_repeat_count(s, sub_path, names, values))
            for i in range(stack.repeat or 0):
                stack.children.append(build(child, str(i), f"{sub_path}.{i}"))
            stack.module = child.name
            node.children.append(stack)
        return node

    return build(modules[p.model], p.model, "")


def _repeat_count(s: N.SubmoduleDef, path: str, names: list[str], values: dict) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(re.escape(path) + r"\.([0-9]+)\.", n))}
    if found:
        return max(found) + 1
    try:
        n = evaluate(s.repeat, lambda r: values[r.name] if r.kind == "config" else _fail(r))
        return n if isinstance(n, int) else 0
    except (EvalError, KeyError):
        return 0


def _fail(r: N.Ref):
    raise EvalError(f"`{r.name}` is not a config field")


def _signature(node: _Node, root: str) -> tuple:
    """What makes two layers identical: relative weight names, shapes, dtypes, inits, ties."""
    return tuple((w.name[len(root) :], w.shape, w.dtype, w.init, w.tied_to is None) for w in node.all_weights())


def weight_tree(p: N.Program):
    from rich.tree import Tree

    root = build_tree(p)

    def label(node: _Node) -> str:
        n = node.params()
        kind = f"{node.module} × {node.repeat}" if node.repeat is not None else node.module
        return f"{node.name}  {kind}  {n:,} params"

    def weight_label(w: N.WeightInfo) -> str:
        short = w.name.rpartition(".")[2]
        shape = "[" + ", ".join(str(d) for d in w.shape) + "]"
        text = f"{short}  {shape} {w.dtype}  {w.init}"
        if w.tied_to is not None:
            return text + f"  tied to {w.tied_to} (not counted)"
        return text + f"  {_numel(w):,}"

    def add(tree, node: _Node, path: str) -> None:
        for w in node.weights:
            tree.add(weight_label(w))
        for c in node.children:
            cpath = f"{path}.{c.name}" if path else c.name
            branch = tree.add(label(c))
            if c.repeat is None:
                add(branch, c, cpath)
                continue
            layers = c.children
            if not layers:
                continue
            first = layers[0]
            branch0 = branch.add(label(first))
            add(branch0, first, f"{cpath}.0")
            sig0 = _signature(first, f"{cpath}.0.")
            alike = [_signature(lay, f"{cpath}.{lay.name}.") == sig0 for lay in layers[1:]]
            same = [lay for lay, ok in zip(layers[1:], alike) if ok]
            other = [lay for lay, ok in zip(layers[1:], alike) if not ok]
            if same:
                idx = [int(lay.name) for lay in same]
                if len(idx) == 1:
                    span = str(idx[0])
                elif idx == list(range(idx[0], idx[-1] + 1)):
                    span = f"{{{idx[0]}..{idx[-1]}}}"
                else:
                    span = "{" + ",".join(map(str, idx)) + "}"
                each = first.params()
                branch.add(
                    f"{c.name}.{span}  {len(same)} × {first.module}, identical to {c.name}.0  "
                    f"{each:,} params each, {each * len(same):,} in all"
                )
            for lay in other:
                sub = branch.add(label(lay))
                add(sub, lay, f"{cpath}.{lay.name}")

    tree = Tree(f"{root.name}  (model)  {root.params():,} params")
    add(tree, root, "")
    return tree


# ---- graphviz -----------------------------------------------------------------------------------------------


def _dot_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class _Dot:
    def __init__(self):
        self.lines: list[str] = [
            "digraph dslc {",
            "  rankdir=TB;",
            '  node [fontname="Helvetica", fontsize=10];',
            '  edge [fontname="Helvetica", fontsize=9];',
            "  compound=true;",
        ]
        self.n = 0

    def node(self, depth: int, label: str, **attrs) -> str:
        self.n += 1
        nid = f"n{self.n}"
        extra = "".join(f", {k}={_dot_str(v)}" for k, v in attrs.items())
        self.lines.append("  " * depth + f"{nid} [label={_dot_str(label)}{extra}];")
        return nid

    def edge(self, a: str, b: str, label: str = "") -> None:
        self.lines.append(f"  {a} -> {b}" + (f" [label={_dot_str(label)}];" if label else ";"))


def program_dot(p: N.Program) -> str:
    """A Graphviz digraph: one cluster per module forward (and per fn), ops as nodes, values as edges."""
    dot = _Dot()
    cluster = 0

    def graph(title: str, g: N.Graph) -> None:
        nonlocal cluster
        cluster += 1
        dot.lines.append(f"  subgraph cluster_{cluster} {{")
        dot.lines.append(f"    label={_dot_str(title)}; style=rounded;")
        defs: dict[str, str] = {}
        weight_nodes: dict[str, str] = {}
        pending: list[tuple[str, str, str]] = []

        def uses(e: N.E, target: str) -> None:
            from dslc.ir.evaluate import free_refs

            for r in free_refs(e):
                if r.kind == "value" or (r.kind == "dtype_of" and not r.name.startswith("weight:")):
                    pending.append((r.name, target, "%" + r.name))
                elif r.kind == "weight":
                    if r.name not in weight_nodes:
                        weight_nodes[r.name] = dot.node(2, "&" + r.name, shape="note")
                    dot.edge(weight_nodes[r.name], target)

        for a in g.args:
            if a.tensor is not None:
                dims = ", ".join(expr_text(d) for d in a.tensor.dims)
                defs[a.name] = dot.node(2, f"{a.name}: [{dims}] {a.tensor.dtype}", shape="ellipse")

        def body(stmts, depth: int) -> None:
            nonlocal cluster
            for st in stmts:
                if isinstance(st, N.Loop):
                    cluster += 1
                    dot.lines.append("  " * depth + f"subgraph cluster_{cluster} {{")
                    dot.lines.append("  " * depth + f"  label={_dot_str(f'for {st.var} in {st.over}')}; style=dashed;")
                    entry = dot.node(depth + 1, "loop entry", shape="circle")
                    for i, prm in zip(st.inputs, st.params):
                        pending.append((i, entry, "%" + i))
                        defs[prm] = entry
                    body(st.body, depth + 1)
                    exit_ = dot.node(depth + 1, "yield", shape="circle")
                    for y in st.yields:
                        pending.append((y, exit_, "%" + y))
                    dot.lines.append("  " * depth + "}")
                    for r in st.results:
                        defs[r] = exit_
                    continue
                if isinstance(st, N.Branch):
                    join = dot.node(depth, f"if {expr_text(st.test)}", shape="diamond")
                    for side, value in ((st.then, st.then_value), (st.orelse, st.else_value)):
                        cluster += 1
                        dot.lines.append("  " * depth + f"subgraph cluster_{cluster} {{")
                        label = "then" if side is st.then else "else"
                        dot.lines.append("  " * depth + f"  label={_dot_str(label)}; style=dotted;")
                        body(side, depth + 1)
                        dot.lines.append("  " * depth + "}")
                        uses(value, join)
                    for r in st.results:
                        defs[r] = join
                    continue
                text = st.op + (f" {st.target}" if st.target else "")
                if st.kwargs:
                    text += "\n" + ", ".join(f"{k}={expr_text(v)}" for k, v in st.kwargs)
                nid = dot.node(depth, text, shape="box")
                for a in st.args:
                    uses(a, nid)
                for _, v in st.kwargs:
                    uses(v, nid)
                for r in st.results:
                    defs[r] = nid

        body(g.body, 2)
        ret = dot.node(2, "return", shape="doublecircle")
        for o in g.outputs:
            pending.append((o, ret, "%" + o))
        dot.lines.append("  }")
        for value, target, lab in pending:
            if value in defs:
                dot.edge(defs[value], target, lab)

    for m in p.modules:
        if m.forward is not None:
            graph(f"module {m.name}", m.forward)
    for f in p.fns:
        graph(f"fn {f.name}", f.graph)
    dot.lines.append("}")
    return "\n".join(dot.lines) + "\n"


def write_graph(p: N.Program, out: str, console) -> int:
    text = program_dot(p)
    path = Path(out)
    if path.suffix.lower() == ".svg":
        exe = shutil.which("dot")
        if exe is None:
            print(
                f"error: writing {out} needs Graphviz's `dot` program, which is not on PATH\n"
                f"  = help: install Graphviz, or write the graph as .dot: --graph {path.with_suffix('.dot')}",
                file=sys.stderr,
            )
            return 1
        try:
            subprocess.run(
                [exe, "-Tsvg", "-o", str(path)], input=text, text=True, check=True, capture_output=True, timeout=120
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            print(f"error: Graphviz could not render {out}: {detail.strip()}", file=sys.stderr)
            return 1
    else:
        try:
            path.write_text(text)
        except OSError as e:
            print(f"error: cannot write {out}: {e.strerror or e}", file=sys.stderr)
            return 1
    console.print(f"wrote graph: {out}")
    return 0
