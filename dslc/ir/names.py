"""Identifier rules: what a spec may name things, so no name can inject code into generated Python."""

from __future__ import annotations

import keyword

# attributes every torch.nn.Module has; a weight or submodule of that name would shadow them
MODULE_ATTRIBUTES = frozenset(
    """training forward parameters named_parameters buffers named_buffers modules named_modules children
    named_children to cuda cpu float half double bfloat16 type state_dict load_state_dict eval train apply
    register_buffer register_parameter register_module add_module get_submodule get_parameter zero_grad
    extra_repr requires_grad_ share_memory config kv_cache dump_patches call_super_init""".split()
)

# names generated code uses for itself inside a forward body
GENERATED_LOCALS = frozenset(
    """self torch F nn math ops ctx kernels range len super print int float bool str list tuple dict
    isinstance Tensor None True False""".split()
)


def identifier_problem(name: str, *, role: str) -> str | None:
    """Why `name` cannot be used as a `role` (None when it can)."""
    if keyword.iskeyword(name):
        return f"`{name}` is a Python keyword and cannot name a {role}"
    if name.startswith("__"):
        return f"`{name}`: names starting with `__` are reserved"
    if role in ("weight", "submodule") and name in MODULE_ATTRIBUTES:
        return f"`{name}` would shadow the torch.nn.Module attribute of that name"
    if role in ("variable", "argument") and name in GENERATED_LOCALS:
        return f"`{name}` is reserved for generated code"
    return None
