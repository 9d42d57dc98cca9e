"""`dslc train`'s settings: the schema, a TOML file over the defaults, `--set section.key=value` over both.

No torch here: the settings are read and checked (one-line errors naming the key) before anything heavy loads.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path


class TrainError(Exception):
    """A problem with `dslc train`'s inputs, with the fix in the message (printed as one line, exit code 2)."""


@dataclass(frozen=True)
class Key:
    kind: str  # int | float | bool | str | list (of str) | floats (list of numbers)
    default: object
    doc: str
    low: float | None = None  # inclusive lower bound for numbers
    high: float | None = None  # inclusive upper bound
    choices: tuple[str, ...] = ()


SCHEMA: dict[str, dict[str, Key]] = {
    "data": {
        "seq_len": Key("int", 128, "tokens per example: causal LM packs to it, the other tasks pad or cut to it", 2),
        "eval_fraction": Key("float", 0.1, "share of the examples (packed blocks) held out for eval", 0.0, 0.9),
        "text_field": Key("str", "text", "the .jsonl field that holds the text"),
        "label_field": Key("str", "label", "the .jsonl field that holds the class (sequence classification)"),
        "mlm_probability": Key("float", 0.15, "masked LM: share of the tokens that are masked", 0.0, 1.0),
        "mask_token": Key("str", "", "masked LM: the tokenizer's mask token (default: [MASK] or <mask>)"),
    },
    "train": {
        "steps": Key("int", 100, "optimizer steps", 1),
        "batch_size": Key("int", 8, "examples per micro-batch on each process", 1),
        "grad_accum": Key("int", 1, "micro-batches per optimizer step", 1),
        "seed": Key("int", 0, "seed of the init, the data order, masking and dropout", 0, 2**63 - 1),
        "bf16": Key("bool", False, "bfloat16 autocast (the weights and optimizer stay float32)"),
        "device": Key("str", "auto", "cpu, cuda, cuda:N or auto (cuda when there is one)"),
        "eval_every": Key("int", 50, "eval loss and perplexity every N steps (0: only at the end)", 0),
        "eval_batches": Key("int", 0, "batches per eval (0: the whole held-out split)", 0),
        "log_every": Key("int", 1, "a metrics line every N steps", 1),
        "save_every": Key("int", 0, "a resumable checkpoint every N steps (0: none but the last)", 0),
        "stop_at": Key("int", 0, "stop at this step with a checkpoint, to resume later (0: run to the end)", 0),
        "output": Key("str", "runs/train", "where metrics, checkpoints and the exported model go"),
        "progress": Key("bool", True, "a rich progress bar on stderr"),
    },
    "optim": {
        "lr": Key("float", 3e-4, "peak learning rate (AdamW)", 0.0),
        "weight_decay": Key("float", 0.01, "AdamW weight decay", 0.0),
        "betas": Key("floats", [0.9, 0.95], "AdamW betas", 0.0, 1.0),
        "eps": Key("float", 1e-8, "AdamW epsilon", 0.0),
        "warmup_steps": Key("int", 10, "linear warmup from 0 to lr", 0),
        "min_lr_ratio": Key("float", 0.0, "cosine decay ends at lr * min_lr_ratio", 0.0, 1.0),
        "grad_clip": Key("float", 1.0, "clip the global grad norm to this (0: off)", 0.0),
    },
    "lora": {
        "r": Key("int", 0, "LoRA rank (0: full fine-tune)", 0),
        "alpha": Key("float", 16.0, "LoRA alpha (scale alpha / r)", 0.0),
        "dropout": Key("float", 0.0, "LoRA dropout", 0.0, 1.0),
        "targets": Key("list", ["q_proj", "v_proj"], "module names LoRA wraps"),
        "export": Key(
            "str",
            "merged",
            "merged: LoRA folded into the exported weights; adapter: the adapter too",
            choices=("merged", "adapter"),
        ),
    },
    "parallel": {
        "tp": Key("int", 1, "tensor-parallel degree (needs the package's model.parallelize)", 1),
        "fsdp": Key("bool", False, "shard parameters over the data-parallel ranks (model.parallelize)"),
        "sequence": Key("bool", True, "with tp: the spec's `sequence` norms split the sequence between blocks"),
        "reshard_after_forward": Key("bool", True, "with fsdp: free each block's gathered weights after its forward"),
        "offload": Key("bool", False, "with fsdp: keep parameter shards and optimizer state in CPU memory"),
    },
}
# [model]: any config field of the spec, over the folder's config.json (num_labels = 3, say): checked by the package
FREE_SECTIONS = ("model",)


def defaults() -> dict[str, dict]:
    out = {section: {k: _copy(key.default) for k, key in keys.items()} for section, keys in SCHEMA.items()}
    out["model"] = {}
    return out


def _copy(value):
    return list(value) if isinstance(value, list) else value


def _where_key(section: str, key: str) -> str:
    return f"{section}.{key}"


def _unknown(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean `{close[0]}`?)" if close else f" (known: {', '.join(choices)})"


def check_value(section: str, key: str, value, source: str):
    """`value` as the key's type, within its bounds; a TrainError naming `source` and the key otherwise."""
    spec = SCHEMA[section][key]
    name = _where_key(section, key)

    def bad(why: str) -> TrainError:
        return TrainError(f"{source}: {name} = {value!r}: {why}")

    kind = spec.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("must be true or false")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise bad("must be a string")
        if spec.choices and value not in spec.choices:
            raise bad(f"must be one of {', '.join(spec.choices)}")
        return value
    if kind == "list":
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise bad("must be a non-empty list of names")
        return value
    if kind == "floats":
        if isinstance(value, str):
            try:
                value = [float(v) for v in value.split(",")]
            except ValueError:
                raise bad("must be a list of numbers") from None
        if not isinstance(value, list) or not value or not all(_number(v) for v in value):
            raise bad("must be a list of numbers")
        value = [float(v) for v in value]
        for v in value:
            _bounds(spec, v, bad)
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("must be an integer")
    elif kind == "float":
        if not _number(value):
            raise bad("must be a number")
        value = float(value)
        if not math.isfinite(value):
            raise bad("must be finite")
    _bounds(spec, value, bad)
    return value


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bounds(spec: Key, value, bad) -> None:
    if spec.low is not None and value < spec.low:
        raise bad(f"must be at least {spec.low:g}")
    if spec.high is not None and value > spec.high:
        raise bad(f"must be at most {spec.high:g}")


def _merge(settings: dict, data: dict, source: str) -> None:
    for section, table in data.items():
        if section not in SCHEMA and section not in FREE_SECTIONS:
            raise TrainError(f"{source}: unknown section [{section}]" + _unknown(section, [*SCHEMA, *FREE_SECTIONS]))
        if not isinstance(table, dict):
            raise TrainError(f"{source}: `{section}` must be a table ([{section}]), got {type(table).__name__}")
        for key, value in table.items():
            if section in FREE_SECTIONS:
                if isinstance(value, (dict, list)):
                    raise TrainError(f"{source}: {section}.{key}: a config field takes a number, string or bool")
                settings[section][key] = value
                continue
            if key not in SCHEMA[section]:
                raise TrainError(f"{source}: unknown key {section}.{key}" + _unknown(key, SCHEMA[section]))
            settings[section][key] = check_value(section, key, value, source)


def read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise TrainError(
                f"--config {path}: reading TOML needs Python 3.11 (tomllib) or the `tomli` package on 3.10; "
                "or give every setting with --set section.key=value"
            ) from None
    if not path.is_file():
        raise TrainError(f"--config {path}: " + ("not a regular file" if path.exists() else "file not found"))
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise TrainError(f"--config {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise TrainError(f"--config {path}: not valid TOML ({e})") from None


def parse_scalar(text: str):
    """A `--set` value: a TOML literal when it is one (3e-4, true, "x", [1, 2]), else the text itself."""
    try:
        import tomllib
    except ImportError:
        tomllib = None
    text = text.strip()
    if tomllib is not None:
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except Exception:  # noqa: BLE001 - not a TOML literal: a bare string
            return text
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text, text)


def apply_sets(settings: dict, pairs: list[str]) -> None:
    for pair in pairs:
        dotted, sep, value = pair.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not sep or not dot or not key:
            raise TrainError(f"--set {pair!r} is not section.key=value (e.g. --set optim.lr=3e-4)")
        _merge(settings, {section: {key: parse_scalar(value)}}, f"--set {pair}")


def parse_lora(text: str) -> dict:
    """`r=8,alpha=16,targets=q_proj,v_proj`: a comma-separated list of key=value; an item without `=`
    continues the previous key's list (targets)."""
    out: dict[str, object] = {}
    last = None
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if sep:
            last = key.strip()
            if last not in SCHEMA["lora"]:
                raise TrainError(f"--lora {text}: unknown key {last!r}" + _unknown(last, SCHEMA["lora"]))
            out[last] = [value.strip()] if SCHEMA["lora"][last].kind == "list" else parse_scalar(value)
        elif last is not None and isinstance(out.get(last), list):
            out[last].append(item)
        else:
            raise TrainError(
                f"--lora {text}: {item!r} is not key=value (e.g. --lora r=8,alpha=16,targets=q_proj,v_proj)"
            )
    return out


def load_settings(config: str | None, sets: list[str], flags: dict) -> dict:
    """Defaults, then the TOML file, then the dedicated flags (--bf16, --lora, --tp, --fsdp, --out), then --set."""
    settings = defaults()
    if config:
        _merge(settings, read_toml(Path(config)), f"--config {config}")
    for dotted, value in flags.items():
        section, _, key = dotted.partition(".")
        _merge(settings, {section: {key: value}}, f"--{key if section != 'lora' else 'lora'}")
    apply_sets(settings, sets)
    return settings


def schema_table() -> str:
    """The keys as a Markdown table (README's Training section is written from it)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section, keys in SCHEMA.items():
        for name, key in keys.items():
            default = key.default
            shown = (
                ", ".join(map(str, default))
                if isinstance(default, list)
                else str(default).lower()
                if isinstance(default, bool)
                else default
            )
            rows.append(f"| `{section}.{name}` | `{shown}` | {key.doc} |")
    rows.append("| `model.<field>` | config.json | any config field of the spec (`model.num_labels = 3`) |")
    return "\n".join(rows)
