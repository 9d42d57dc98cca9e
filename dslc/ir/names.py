"""Identifier rules: what a spec may name things, so no name can inject code into generated Python or
collide with a name the generated package binds for itself.

The tables say which names generated code binds, and where: module level of modeling.py / config.py /
__init__.py (a spec's module, fn and config classes live there too), attributes of every generated module
and of the model class (weights and submodules become attributes), attributes of the config class (config
fields become attributes), parameters and locals of generated methods (module parameters, forward
arguments). Where a template is plain Python or has plain class-level lines, its names are read from the
template itself (`model_base.py`'s `PreTrainedModel`, the config class in `config.py.j2`, imports), so a
name added there is reserved without editing this file; `tests/test_hostile_frontend.py` walks the code of
built packages and checks that every name it binds is covered here.
"""

from __future__ import annotations

import ast
import builtins
import keyword
import re
import sys
from functools import lru_cache

# attributes every torch.nn.Module has (dir(nn.Module) and a fresh instance's __dict__, torch 2.x; the
# test compares this with the installed torch): a weight, submodule or stored parameter of that name would
# shadow them
MODULE_ATTRIBUTES = frozenset(
    """training forward parameters named_parameters buffers named_buffers modules named_modules children
    named_children to to_empty cuda cpu xpu ipu mtia float half double bfloat16 type state_dict load_state_dict
    eval train apply compile register_buffer register_parameter register_module add_module get_submodule
    set_submodule get_parameter get_buffer get_extra_state set_extra_state zero_grad extra_repr requires_grad_
    share_memory dump_patches call_super_init T_destination register_backward_hook register_forward_hook
    register_forward_pre_hook register_full_backward_hook register_full_backward_pre_hook
    register_load_state_dict_post_hook register_load_state_dict_pre_hook register_state_dict_post_hook
    register_state_dict_pre_hook _apply _backward_hooks _backward_pre_hooks _buffers _call_impl
    _compiled_call_impl _forward_hooks _forward_hooks_always_called _forward_hooks_with_kwargs _forward_pre_hooks
    _forward_pre_hooks_with_kwargs _get_backward_hooks _get_backward_pre_hooks _get_name _is_full_backward_hook
    _load_from_state_dict _load_state_dict_post_hooks _load_state_dict_pre_hooks _maybe_warn_non_full_backward_hook
    _modules _named_members _non_persistent_buffers_set _parameters _register_load_state_dict_pre_hook
    _register_state_dict_hook _replicate_for_data_parallel _save_to_state_dict _slow_forward _state_dict_hooks
    _state_dict_pre_hooks _version _wrapped_call_impl
    smart_apply""".split()  # the last: transformers adds it to nn.Module when it is imported
)

# attributes the generated code keeps on (or reads from) every module it writes
GENERATED_ATTRIBUTES = {
    "config": "the config every module that reads it keeps",
    "tied": "the module's ties",
    "kv_cache": "the KV cache of a module with attention",
    "gradient_checkpointing": "the activation-checkpointing switch",
    "reset_parameters": "the method that initializes the weights",
    "projection_groups": "the fused projections",
    "forward_graph": "the model's forward graph",
    "forward_hidden": "the model's forward up to the loss head",
}

# names a spec cannot declare (module, fn, config) because the generated package's modules bind them at
# module level; the reason names what binds them. modeling.py's imports, config.py's and __init__.py's.
PACKAGE_GLOBALS = {
    "torch": "modeling.py imports torch",
    "F": "modeling.py imports torch.nn.functional as F",
    "nn": "modeling.py imports torch.nn as nn",
    "kernels": "modeling.py imports the package's kernels module",
    "attention": "modeling.py imports the package's attention function",
    "activation": "modeling.py imports the package's activation function (activations.py)",
    "moe": "modeling.py imports the package's mixture-of-experts module",
    "checkpoint_call": "modeling.py imports activation checkpointing as checkpoint_call",
    "fused_linear": "modeling.py imports fused_linear for fused projections",
    "constant_tensor": "modeling.py imports constant_tensor for the `constant` primitive",
    "math": "modeling.py imports Python's math for build-time log, sqrt, floor and ceil",
    "PreTrainedModel": "the model class's base class",
    "ConfigError": "the package's config error class",
    "CheckpointError": "the package's checkpoint error class",
    "annotations": "every generated file starts with `from __future__ import annotations`",
}

# the files of a generated package: `from .modeling import X` in __init__.py would replace `package.X`
PACKAGE_FILES = frozenset(
    """__init__ config modeling activations attention checkpoint cuda_graphs generation kernels kernels_runtime kernels_triton
    losses losses_triton model_base model_core config_spec moe outputs parallel serving""".split()
)

# Python builtins: a module-level class or function of that name replaces the builtin for generated code
BUILTINS = frozenset(n for n in dir(builtins) if not n.startswith("_"))

# names generated code uses for itself inside a method body (forward, __init__)
GENERATED_LOCALS = frozenset(
    """self torch F nn math ops ctx kernels attention activation moe checkpoint_call fused_linear constant_tensor range len super print
    int float
    bool str list tuple dict isinstance any all getattr setattr Tensor None True False""".split()
)

# locals of generated methods that a module-level class or function of the same name would be hidden by
DECL_LOCALS = frozenset("_ self cls ctx config".split())

# third-party top-level modules a generated package imports, or its users import beside it
IMPORTED_PACKAGES = frozenset("torch safetensors triton numpy transformers jinja2 dslc".split())


# ---- names read from the templates ---------------------------------------------------------------------


def _template(name: str) -> str:
    from dslc.resources import templates_dir

    try:
        return (templates_dir() / "package" / name).read_text(encoding="utf-8")
    except OSError:
        return ""


def _class_members(tree: ast.Module, class_name: str) -> set[str]:
    """Names a class binds: its methods and class attributes, and what its methods assign to `self.`."""
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out.add(item.name)
                elif isinstance(item, ast.Assign):
                    out |= {t.id for t in item.targets if isinstance(t, ast.Name)}
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    out.add(item.target.id)
            for sub in ast.walk(node):
                if (
                    isinstance(sub, ast.Attribute)
                    and isinstance(sub.ctx, ast.Store)
                    and isinstance(sub.value, ast.Name)
                    and sub.value.id == "self"
                ):
                    out.add(sub.attr)
    return out


def _module_level_names(text: str) -> set[str]:
    """Names a template binds at module level: imports, classes, functions, assignments (Jinja lines skipped)."""
    out: set[str] = set()
    in_doc = False
    for line in text.splitlines():
        if in_doc or line.startswith('"""'):
            in_doc = (line.count('"""') % 2 == 1) != in_doc
            continue
        m = re.match(r"(?:from\s+\S+\s+)?import\s+(.+)$", line)
        if m:
            for part in m.group(1).strip("()").split(","):
                words = part.split()
                if words:
                    out.add(words[-1] if "as" in words else words[0].split(".")[0])
            continue
        m = re.match(r"(?:class|def)\s+([A-Za-z_]\w*)", line) or re.match(r"([A-Za-z_]\w*)\s*(?::[^=]*)?=", line)
        if m:
            out.add(m.group(1))
    return {n for n in out if n.isidentifier()}


@lru_cache(maxsize=1)
def model_members() -> frozenset[str]:
    """What the generated model class has besides nn.Module's: `PreTrainedModel` in model_base.py."""
    tree = _model_base_tree()
    return frozenset(_class_members(tree, "PreTrainedModel")) if tree else frozenset()


def _model_base_tree() -> ast.Module | None:
    try:
        return ast.parse(_template("model_base.py"))
    except SyntaxError:
        return None


@lru_cache(maxsize=1)
def config_keys_written() -> frozenset[str]:
    """config.json keys the generated model writes besides the fields (`config["dtype"] = ...` in model_base.py):
    a field of that name would be overwritten on save and misread on load."""
    tree = _model_base_tree()
    out = set()
    for node in ast.walk(tree) if tree else ():
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id == "config"
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)
        ):
            out.add(node.slice.value)
    return frozenset(out)


@lru_cache(maxsize=1)
def config_flags() -> frozenset[str]:
    """Config keys the generated model reads as forward flags (`self._flag("output_hidden_states", ...)`, as
    transformers reads them): a field of that name must be a bool."""
    tree = _model_base_tree()
    out = set()
    for node in ast.walk(tree) if tree else ():
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "_flag"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.add(node.args[0].value)
    return frozenset(out)


@lru_cache(maxsize=1)
def config_members() -> frozenset[str]:
    """What the generated config class binds besides the spec's fields: the class-level lines of config.py.j2's
    class (methods, class variables, `extra`) and the names its class body reads while it runs."""
    out = {"extra", "TYPES", "ALIASES", "ARCHS", "from_dict", "from_pretrained", "for_arch", "to_dict", "_check_type"}
    inside = False
    for line in _template("config.py.j2").splitlines():
        if line.startswith("class {{"):
            inside = True
            continue
        if inside and line and not line[0].isspace() and not line.startswith("{"):
            inside = False
        if not inside:
            continue
        m = re.match(r"    (?:def\s+|@)?([A-Za-z_]\w*)\s*(?:[:=(]|$)", line)  # members, decorators
        if m:
            out.add(m.group(1))
    out |= {"field", "dict", "ClassVar"}  # read by the class body itself: `extra: dict = field(default_factory=dict)`
    return frozenset(out)


@lru_cache(maxsize=1)
def package_globals() -> dict[str, str]:
    """Module-level names of the generated files a spec's declarations share a namespace with."""
    out = dict(PACKAGE_GLOBALS)
    for file in ("config.py.j2", "modeling.py.j2", "__init__.py.j2"):
        for name in sorted(_module_level_names(_template(file))):
            out.setdefault(name, f"{file.removesuffix('.j2')} binds it")
    return out


# ---- the rules ---------------------------------------------------------------------------------------------


def identifier_problem(name: str, *, role: str, is_model: bool = False) -> str | None:
    """Why `name` cannot be used as a `role` (None when it can); `is_model`: a member of the model class."""
    if keyword.iskeyword(name):
        return f"`{name}` is a Python keyword and cannot name a {role}"
    if name.startswith("__"):
        return f"`{name}`: names starting with `__` are reserved"
    if role in ("config", "module", "fn", "function"):
        if name in DECL_LOCALS:
            return f"`{name}` is reserved for generated code (a local name in its methods)"
        globals_ = package_globals()
        if name in globals_:
            return f"`{name}` is a name the generated package binds itself ({globals_[name]})"
        if name in BUILTINS:
            return f"`{name}` would shadow the Python builtin of that name in the generated package"
        if name in PACKAGE_FILES and role in ("config", "module"):
            return f"`{name}` would shadow the generated package's `{name}` module (`from .modeling import {name}`)"
    if role == "parameter" and name in ("self", "config"):
        return f"`{name}` is reserved for generated code (every module's __init__ takes `self` and `config`)"
    if role in ("weight", "submodule", "parameter"):
        if name in MODULE_ATTRIBUTES:
            return f"`{name}` would shadow the torch.nn.Module attribute of that name"
        if name in GENERATED_ATTRIBUTES:
            return f"`{name}` is an attribute generated code keeps on modules ({GENERATED_ATTRIBUTES[name]})"
        if is_model and name in model_members():
            return f"`{name}` would shadow the generated model's attribute of that name (from PreTrainedModel)"
    if role == "config field" and name in config_members():
        return f"`{name}` would shadow the generated config class's attribute of that name"
    if role == "config field" and name in config_keys_written():
        return f"`{name}` is a config.json key the generated model writes itself when it saves"
    if role in ("variable", "argument", "parameter") and name in GENERATED_LOCALS:
        return f"`{name}` is reserved for generated code"
    return None


def package_name_problem(name: str) -> str | None:
    """Why a generated package cannot be called `name`: it would shadow a module it or its users import."""
    if name in IMPORTED_PACKAGES:
        return f"`{name}` would shadow the `{name}` package that generated code imports"
    if name in sys.stdlib_module_names:
        return f"`{name}` would shadow the Python standard library's `{name}` module"
    return None
