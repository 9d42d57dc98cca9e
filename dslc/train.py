"""`dslc train`: fine-tune a checkpoint folder with the package built from a spec.

Settings: dslc/train_config.py (a TOML file, dedicated flags, `--set section.key=value`). Everything that can
be checked without torch is checked first; torch is imported only here, inside the command.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

from dslc.train_config import TrainError, load_settings, parse_lora

TASKS = ("causal_lm", "sequence_classification", "masked_lm")
# settings a resumed run may change without changing its losses
RESUMABLE_CHANGES = {
    "train.stop_at",
    "train.output",
    "train.progress",
    "train.save_every",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.device",
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "tokenizer.model",
)


# ---- inputs, checked before torch loads ---------------------------------------------------------------


def _flags(args) -> dict:
    flags = {}
    if args.bf16:
        flags["train.bf16"] = True
    if args.tp is not None:
        flags["parallel.tp"] = args.tp
    if args.fsdp:
        flags["parallel.fsdp"] = True
    if args.out is not None:
        flags["train.output"] = args.out
    if args.lora is not None:
        for key, value in parse_lora(args.lora).items():
            flags[f"lora.{key}"] = value
    return flags


def _check_inputs(args) -> tuple[Path, Path, Path]:
    spec, weights, data = Path(args.file), Path(args.weights), Path(args.data)
    if not spec.is_file():
        raise TrainError(f"spec not found: {spec}" if not spec.exists() else f"spec {spec} is not a regular file")
    if not weights.is_dir():
        raise TrainError(f"--weights {weights}: folder not found")
    for name in ("config.json", "tokenizer.json"):
        if not (weights / name).is_file():
            raise TrainError(
                f"--weights {weights} has no {name}"
                + (": `dslc train` tokenizes with the folder's own tokenizer.json" if name == "tokenizer.json" else "")
            )
    if not data.is_file():
        raise TrainError(f"--data {data}: " + ("not a regular file" if data.exists() else "file not found"))
    if data.suffix not in (".jsonl", ".txt"):
        raise TrainError(f"--data {data}: give a .jsonl file (one JSON object per line) or a .txt file")
    return spec, weights, data


def _read_records(path: Path, text_field: str, label_field: str | None) -> list[tuple[str, object]]:
    """(text, label) per example: each line of a .jsonl file, or a whole .txt file as one text."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TrainError(f"--data {path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix == ".txt":
        if label_field is not None:
            raise TrainError(f"--data {path}: sequence classification needs labels: give a .jsonl with text and label")
        if not raw.strip():
            raise TrainError(f"--data {path}: the file is empty")
        return [(raw, None)]
    records = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise TrainError(f"--data {path}:{n}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise TrainError(f"--data {path}:{n}: needs a string field {text_field!r} (data.text_field)")
        label = None
        if label_field is not None:
            label = obj.get(label_field)
            if isinstance(label, bool) or not isinstance(label, (int, str)) or (isinstance(label, int) and label < 0):
                raise TrainError(
                    f"--data {path}:{n}: needs a field {label_field!r} (data.label_field) holding a class: "
                    f"an int >= 0 or a string, got {label!r}"
                )
        records.append((obj[text_field], label))
    if not records:
        raise TrainError(f"--data {path}: no examples")
    return records


def _settings_flat(settings: dict) -> dict:
    return {f"{s}.{k}": v for s, table in settings.items() for k, v in table.items()}


# ---- the command --------------------------------------------------------------------------------------


def train_command(args) -> int:
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, soft_wrap=True)
    rank = int(os.environ.get("RANK", "0") or 0)
    try:
        settings = load_settings(args.config, args.set, _flags(args))
        spec, weights, data = _check_inputs(args)
        return Run(args, settings, spec, weights, data, console).run()
    except TrainError as e:
        prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
        console.print(f"[red]error[/red]: {escape(prefix + str(e))}")
        return 2


class Run:
    def __init__(self, args, settings, spec: Path, weights: Path, data: Path, console):
        self.args, self.settings, self.spec, self.weights, self.data = args, settings, spec, weights, data
        self.console = console
        self.s = _settings_flat(settings)
        self.out = Path(self.s["train.output"])
        self.rank = int(os.environ.get("RANK", "0") or 0)
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        self.main = self.rank == 0

    def log(self, text: str) -> None:
        if self.main:
            self.console.print(text, highlight=False)

    # ---- setup ----------------------------------------------------------------------------------------
    def run(self) -> int:
        s = self.s
        if s["train.stop_at"] and s["train.stop_at"] > s["train.steps"]:
            raise TrainError(f"train.stop_at = {s['train.stop_at']} is past train.steps = {s['train.steps']}")
        if s["lora.r"] == 0 and any(k.startswith("lora.") and k != "lora.r" for k in self._given_lora()):
            raise TrainError("--lora needs r=N (a rank >= 1), e.g. --lora r=8,alpha=16,targets=q_proj,v_proj")
        resume = self._resume_path()
        import torch

        self.torch = torch
        self.device = self._device()
        self._init_distributed()
        from dslc.generate import cached_build

        start = time.perf_counter()
        if self.dist is not None and not self.main:
            self.dist.barrier()  # rank 0 builds (or finds) the package first; the others import it
        pkg, reused = cached_build(self.spec, self.args.build_dir)
        if self.dist is not None and self.main:
            self.dist.barrier()
        self.pkg = pkg
        self.log(f"[dim]{'reused' if reused else 'built'} {pkg.__name__} in {time.perf_counter() - start:.2f} s[/dim]")
        models = [
            getattr(pkg, n)
            for n in pkg.__all__
            if hasattr(getattr(pkg, n), "from_pretrained") and hasattr(getattr(pkg, n), "config_class")
        ]
        self.model_cls = models[-1]
        self.task = self.model_cls.task
        if self.task not in TASKS:
            raise TrainError(
                f"{self.spec}: {self.model_cls.__name__} has task `{self.task}`: dslc train trains "
                f"{', '.join(TASKS)} models"
            )
        self._tokenizer()
        records = _read_records(
            self.data,
            s["data.text_field"],
            s["data.label_field"] if self.task == "sequence_classification" else None,
        )
        self.config = self._config(records)
        self.train_set, self.eval_set = self._datasets(records)
        self.model = self._model()
        self._parallel()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable,
            lr=s["optim.lr"],
            betas=tuple(s["optim.betas"][:2]),
            eps=s["optim.eps"],
            weight_decay=s["optim.weight_decay"],
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.step = 0
        self.cursor = 0  # examples of the shuffled train split consumed so far (all ranks)
        torch.manual_seed(s["train.seed"] + self.data_rank)  # a tensor-parallel group draws alike
        random.seed(s["train.seed"] + self.data_rank)
        self.mask_gen = torch.Generator().manual_seed(s["train.seed"] * 7919 + self.data_rank + 1)
        if resume is not None:
            self._load_checkpoint(resume)
        else:
            self._reset_metrics(0)
        code = self._loop()
        if self.dist is not None and self._owns_group:  # on success only: a failed rank must not wait on the rest
            self.dist.barrier()
            self.dist.destroy_process_group()
        return code

    def _given_lora(self) -> list[str]:
        given = [f"lora.{k}" for k in parse_lora(self.args.lora)] if self.args.lora else []
        given += [p.partition("=")[0].strip() for p in self.args.set if p.strip().startswith("lora.")]
        return given

    def _resume_path(self) -> Path | None:
        if self.args.resume is None:
            return None
        if self.args.resume != "latest":
            path = Path(self.args.resume)
            if not (path / "state.pt").is_file() and not (path / "trainer.pt").is_file():
                raise TrainError(f"--resume {path}: not a dslc train checkpoint (no state.pt)")
            return path
        found = sorted(
            (p for p in (self.out / "checkpoints").glob("step-*") if p.name[5:].isdigit()),
            key=lambda p: int(p.name[5:]),
        )
        found = [p for p in found if (p / "state.pt").is_file() or (p / "trainer.pt").is_file()]
        if not found:
            raise TrainError(f"--resume: no checkpoint in {self.out / 'checkpoints'} (train.output = {self.out})")
        return found[-1]

    def _device(self):
        torch = self.torch
        name = self.s["train.device"]
        if name == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda", self.local_rank if self.world > 1 else 0)
            return torch.device("cpu")
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            raise TrainError(f"train.device = {name!r} is not a device: use cpu, cuda, cuda:N or auto") from None
        if device.type not in ("cpu", "cuda"):
            raise TrainError(f"train.device = {name!r}: dslc train runs on cpu or cuda")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise TrainError(f"train.device = {name!r}: CUDA is not available here (torch {torch.__version__})")
            if self.world > 1 and device.index is None:
                device = torch.device("cuda", self.local_rank)
        return device

    def _init_distributed(self) -> None:
        torch = self.torch
        tp, fsdp = self.s["parallel.tp"], self.s["parallel.fsdp"]
        self.data_rank, self.data_world = 0, 1
        if self.world == 1:
            if tp > 1:
                raise TrainError(f"--tp {tp} needs {tp} processes: run under torchrun --nproc-per-node {tp}")
            self.dist = None
            return
        if self.world % tp:
            raise TrainError(f"--tp {tp} does not divide the {self.world} processes (WORLD_SIZE)")
        if tp > 1 and self.world > tp and not fsdp:
            raise TrainError(
                f"--tp {tp} on {self.world} processes: the other dimension shards with FSDP2, give --fsdp too"
            )
        # the ranks of one tensor-parallel group read the same batches: data is split over rank // tp
        self.data_rank, self.data_world = self.rank // tp, self.world // tp
        import torch.distributed as dist

        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._owns_group = not dist.is_initialized()  # torchrun's processes: ours to destroy when done
        if self._owns_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.dist = dist
        del fsdp

    def _tokenizer(self) -> None:
        from tokenizers import Tokenizer

        path = self.weights / "tokenizer.json"
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except BaseException as e:  # noqa: BLE001 - pyo3's PanicException derives from BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise TrainError(f"{path} cannot be read as a tokenizer ({type(e).__name__}: {e})") from None

    def _config(self, records):
        path = self.weights / "config.json"
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise TrainError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise TrainError(f"{path}: must be a JSON object")
        overrides = dict(self.settings["model"])
        self.labels = None
        if self.task == "sequence_classification":
            found = [label for _, label in records]
            if all(isinstance(v, int) for v in found):
                names = list(range(max(found) + 1))
            elif all(isinstance(v, str) for v in found):
                names = sorted(set(found))
            else:
                raise TrainError(f"--data {self.data}: labels mix ints and strings; use one kind")
            self.labels = names
            given = overrides.get("num_labels", values.get("num_labels") if "id2label" in values else None)
            if given is None:
                overrides["num_labels"] = len(names)
            elif not isinstance(given, int) or given < len(names):
                raise TrainError(
                    f"model.num_labels = {given!r} but --data {self.data} has {len(names)} classes: "
                    f"--set model.num_labels={len(names)}"
                )
            overrides.setdefault("id2label", {str(i): str(n) for i, n in enumerate(names)})
            overrides.setdefault("label2id", {str(n): i for i, n in enumerate(names)})
            overrides.setdefault("pad_token_id", self._pad_id(values))
        values.update(overrides)
        try:
            config = self.model_cls.config_class.from_dict(values)
        except self.pkg.ConfigError as e:
            raise TrainError(f"{path} (with [model] overrides) does not fit {self.spec.name}: {e}") from None
        unused = [k for k in self.settings["model"] if k not in config.to_dict() or k in getattr(config, "extra", {})]
        unused = [k for k in unused if k not in getattr(self.model_cls.config_class, "TYPES", {})]
        if unused and hasattr(config, "TYPES"):
            raise TrainError(
                f"model.{unused[0]}: {self.spec.name}'s config has no field {unused[0]!r} "
                f"(fields: {', '.join(config.TYPES)})"
            )
        self.config_values = values
        return config

    def _pad_id(self, values: dict) -> int:
        for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
            v = values.get(key)
            v = v[0] if isinstance(v, list) and v else v
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                return v
        return 0

    # ---- data -----------------------------------------------------------------------------------------
    def _encode(self, texts: list[str]) -> list[list[int]]:
        try:
            return [e.ids for e in self.tokenizer.encode_batch(texts)]
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise TrainError(
                f"{self.weights / 'tokenizer.json'} cannot encode --data ({type(e).__name__}: {e})"
            ) from None

    def _datasets(self, records):
        torch = self.torch
        seq = self.s["data.seq_len"]
        context = next(
            (getattr(self.config, n) for n in ("max_position_embeddings", "n_positions") if hasattr(self.config, n)),
            None,
        )
        if isinstance(context, int) and seq > context:
            raise TrainError(f"data.seq_len = {seq} is past the model's context ({context} positions)")
        encoded = self._encode([t for t, _ in records])
        vocab = getattr(self.config, "vocab_size", None)
        pad = self._pad_id(self.config_values)
        if self.task == "causal_lm":
            eos = (
                self._pad_id({"eos_token_id": self.config_values.get("eos_token_id")})
                if "eos_token_id" in self.config_values
                else None
            )
            flat: list[int] = []
            for ids in encoded:
                flat += ids + ([eos] if eos is not None and len(encoded) > 1 else [])
            blocks = len(flat) // seq
            if blocks < 2:
                raise TrainError(
                    f"--data {self.data}: {len(flat)} tokens make {blocks} block(s) of data.seq_len = {seq}: "
                    "give more text or a shorter seq_len"
                )
            ids = torch.tensor(flat[: blocks * seq], dtype=torch.long).view(blocks, seq)
            examples = {"input_ids": ids}
        else:
            rows, masks = [], []
            left = self.task == "sequence_classification"  # the spec pools the last position
            for e in encoded:
                e = e[:seq]
                padding = [pad] * (seq - len(e))
                rows.append(padding + e if left else e + padding)
                m = [0] * len(padding)
                masks.append(m + [1] * len(e) if left else [1] * len(e) + m)
            examples = {
                "input_ids": torch.tensor(rows, dtype=torch.long),
                "attention_mask": torch.tensor(masks, dtype=torch.long),
            }
            if left:
                mask = examples["attention_mask"]
                examples["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
                index = {n: i for i, n in enumerate(self.labels)}
                examples["labels"] = torch.tensor([index[label] for _, label in records], dtype=torch.long)
            else:
                self.mask_id = self._mask_token()
        if vocab is not None and int(examples["input_ids"].max()) >= vocab:
            raise TrainError(f"{self.weights / 'tokenizer.json'} gives token ids past the model's vocab_size ({vocab})")
        n = examples["input_ids"].shape[0]
        n_eval = max(1, round(n * self.s["data.eval_fraction"])) if self.s["data.eval_fraction"] > 0 else 0
        if n - n_eval < 1:
            raise TrainError(f"--data {self.data}: {n} examples leave none for training after the eval split")
        train = {k: v[: n - n_eval] for k, v in examples.items()}
        evals = {k: v[n - n_eval :] for k, v in examples.items()}
        self.log(f"data: {self.data} -> {n - n_eval} train / {n_eval} eval examples of {seq} tokens ({self.task})")
        return train, evals

    def _mask_token(self) -> int:
        name = self.s["data.mask_token"]
        for token in [name] if name else ["[MASK]", "<mask>"]:
            tid = self.tokenizer.token_to_id(token)
            if tid is not None:
                return tid
        raise TrainError(
            f"masked LM: {self.weights / 'tokenizer.json'} has no "
            + (f"token {name!r}" if name else "[MASK] or <mask> token")
            + ": set data.mask_token to the tokenizer's mask token"
        )

    def _mlm(self, batch: dict, gen) -> dict:
        torch = self.torch
        ids = batch["input_ids"].clone()
        real = batch["attention_mask"].bool()
        chosen = (torch.rand(ids.shape, generator=gen) < self.s["data.mlm_probability"]) & real
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        action = torch.rand(ids.shape, generator=gen)
        random_ids = torch.randint(0, self.config.vocab_size, ids.shape, generator=gen)
        ids = torch.where(chosen & (action < 0.8), torch.full_like(ids, self.mask_id), ids)
        ids = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, ids)
        return {"input_ids": ids, "attention_mask": batch["attention_mask"], "labels": labels}

    def _order(self, epoch: int):
        gen = self.torch.Generator().manual_seed(self.s["train.seed"] * 1_000_003 + epoch)
        return self.torch.randperm(self.train_set["input_ids"].shape[0], generator=gen)

    def _next_batch(self) -> dict:
        """This rank's share of the next global micro-batch of the shuffled train split (epochs wrap)."""
        b, n = self.s["train.batch_size"], self.train_set["input_ids"].shape[0]
        picks = []
        for c in range(self.cursor, self.cursor + b * self.data_world):
            epoch, i = divmod(c, n)
            if getattr(self, "_epoch", None) != epoch:
                self._epoch, self._perm = epoch, self._order(epoch)
            picks.append(int(self._perm[i]))
        self.cursor += b * self.data_world
        mine = self.torch.tensor(picks[self.data_rank * b : (self.data_rank + 1) * b])
        batch = {k: v[mine] for k, v in self.train_set.items()}
        return self._prepare(batch, self.mask_gen)

    def _prepare(self, batch: dict, gen) -> dict:
        if self.task == "causal_lm":
            batch = {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}
        elif self.task == "masked_lm":
            batch = self._mlm(batch, gen)
        return {k: v.to(self.device) for k, v in batch.items()}

    # ---- model ----------------------------------------------------------------------------------------
    def _model(self):
        torch = self.torch
        pkg = self.pkg
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                model = self.model_cls.from_pretrained(
                    self.weights,
                    dtype=torch.float32,
                    device=self.device,
                    strict=False,
                    config=self.config,
                    init_missing=True,
                )
            except TypeError as e:
                if "init_missing" not in str(e):
                    raise
                raise TrainError(f"{pkg.__name__} was built by an older dslc (no init_missing): rebuild it") from None
            except (pkg.ConfigError, pkg.CheckpointError) as e:
                raise TrainError(f"--weights {self.weights} does not fit {self.spec.name}: {e}") from None
        for w in caught:
            message = str(w.message)
            if message.startswith("unexpected checkpoint tensor"):
                self.log(f"[yellow]not used[/yellow]: {message.split(':')[0].removeprefix('unexpected ')}")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        new = list(model.newly_initialized)
        self.newly_initialized = new
        total = sum(p.numel() for p in model.parameters())
        fresh = sum(model.get_parameter(n).numel() for n in new)
        if fresh * 2 > total:
            raise TrainError(
                f"--weights {self.weights} holds under half of {self.model_cls.__name__}'s parameters "
                f"({len(new)} missing, {fresh:,} of {total:,} values): is it a checkpoint of this spec?"
            )
        if new:
            self.log(
                f"[yellow]newly initialized[/yellow] (not in {self.weights}, from the spec's init): "
                + ", ".join(f"{n} {list(model.get_parameter(n).shape)}" for n in new)
            )
        self.lora = None
        if self.s["lora.r"] > 0:
            model = self._apply_lora(model, new)
        model.train()
        return model

    def _apply_lora(self, model, new: list[str]):
        try:
            import peft
        except ImportError:
            raise TrainError("--lora needs the `peft` package (pip install peft)") from None
        s = self.s
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in s["lora.targets"] if t not in names]
        if missing:
            raise TrainError(
                f"lora.targets: {self.model_cls.__name__} has no module named {missing[0]!r} "
                f"(e.g. {', '.join(sorted(n for n in names if n.endswith('proj'))[:6])})"
            )
        heads = sorted({n.rsplit(".", 1)[0] for n in new})  # a new head trains in full
        cfg = peft.LoraConfig(
            r=s["lora.r"],
            lora_alpha=s["lora.alpha"],
            lora_dropout=s["lora.dropout"],
            target_modules=list(s["lora.targets"]),
            modules_to_save=heads or None,
        )
        model = peft.get_peft_model(model, cfg)
        self.lora = model
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        self.log(f"LoRA r={s['lora.r']} on {', '.join(s['lora.targets'])}: {trainable:,} of {total:,} parameters train")
        return model

    def _parallel(self) -> None:
        tp, fsdp = self.s["parallel.tp"], self.s["parallel.fsdp"]
        self.sharded = False
        self.ddp = None
        if tp > 1 or fsdp:
            target = self.model.get_base_model() if self.lora is not None else self.model
            if not hasattr(target, "parallelize"):
                raise TrainError(
                    f"{'--tp' if tp > 1 else '--fsdp'}: {self.pkg.__name__} has no model.parallelize (a package "
                    "built by a dslc without tensor/FSDP support): run without it, or data-parallel under torchrun"
                )
            if self.world == 1 and fsdp:
                raise TrainError("--fsdp needs several processes: run under torchrun --nproc-per-node N")
            from torch.distributed.device_mesh import init_device_mesh

            dp = self.world // tp
            options = {"sequence_parallel": self.s["parallel.sequence"]} if tp > 1 else {}
            if fsdp:
                options.update(
                    reshard_after_forward=self.s["parallel.reshard_after_forward"], offload=self.s["parallel.offload"]
                )
            if tp > 1 and fsdp:  # 2-D: FSDP2 over dp_shard, tensor parallel over tp
                mesh = init_device_mesh(self.device.type, (dp, tp), mesh_dim_names=("dp_shard", "tp"))
                target.parallelize(mesh, tp="tp", dp_shard="dp_shard", **options)
            elif tp > 1:
                mesh = init_device_mesh(self.device.type, (tp,), mesh_dim_names=("tp",))
                target.parallelize(mesh, tp="tp", **options)
            else:
                mesh = init_device_mesh(self.device.type, (dp,), mesh_dim_names=("dp_shard",))
                target.parallelize(mesh, dp_shard="dp_shard", **options)
            self.sharded = True
            return
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)

    def _clip_grad_norm(self, max_norm: float):
        """The global gradient norm, gradients scaled down to `max_norm`. Sharded (DTensor) gradients next to plain
        ones (tensor parallelism leaves norms replicated), or on two meshes (FSDP x TP), cannot go through one
        foreach kernel: each gradient's norm is taken on its own, full over its mesh."""
        torch = self.torch
        if not self.sharded:
            return torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in self.trainable if p.grad is not None]
        if not grads:
            return torch.zeros(())
        squares = []
        for g in grads:
            n = torch.linalg.vector_norm(g)
            squares.append((n.full_tensor() if isinstance(n, DTensor) else n).float().pow(2))
        total = torch.stack(squares).sum().sqrt()
        if math.isfinite(max_norm):
            scale = min(1.0, max_norm / (float(total) + 1e-6))
            if scale < 1.0:
                for g in grads:
                    g.mul_(scale)
        return total

    def _lr_lambda(self, step: int) -> float:
        warmup, total = self.s["optim.warmup_steps"], self.s["train.steps"]
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        floor = self.s["optim.min_lr_ratio"]
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    # ---- the loop -------------------------------------------------------------------------------------
    def _forward(self, batch: dict):
        module = self.ddp if self.ddp is not None else self.model
        with self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.s["train.bf16"]):
            return module(**batch)

    def _reduce(self, values: list[float]) -> list[float]:
        if self.dist is None:
            return values
        t = self.torch.tensor(values, dtype=self.torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return (t / self.world).tolist()

    def _loop(self) -> int:
        s = self.s
        steps, accum = s["train.steps"], s["train.grad_accum"]
        stop = s["train.stop_at"] or steps
        progress = self._progress()
        task = progress.add_task("train", total=steps, completed=self.step, loss="-", tps="-")
        started, tokens_run, first_step = time.perf_counter(), 0, self.step
        last_loss = None
        with progress:
            while self.step < stop:
                self.model.train()
                losses, tokens = [], 0
                for micro in range(accum):
                    batch = self._next_batch()
                    tokens += (
                        int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
                    )
                    sync = self.ddp is None or micro == accum - 1
                    ctx = self.ddp.no_sync() if not sync else _null()
                    with ctx:
                        loss = self._forward(batch).loss
                        (loss / accum).backward()
                    losses.append(float(loss.detach()))
                clip = s["optim.grad_clip"]
                norm = self._clip_grad_norm(clip if clip > 0 else float("inf"))
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                loss_value, tokens_all = self._reduce([sum(losses) / len(losses), tokens * self.data_world])
                last_loss = loss_value
                tokens_run += tokens_all
                elapsed = time.perf_counter() - started
                tps = tokens_run / max(elapsed, 1e-9)
                progress.update(task, completed=self.step, loss=f"{loss_value:.4f}", tps=f"{tps:,.0f}")
                if self.step % s["train.log_every"] == 0 or self.step == stop:
                    self._metric(
                        {
                            "step": self.step,
                            "loss": round(loss_value, 6),
                            "lr": lr,
                            "grad_norm": round(float(norm), 6),
                            "tokens": int(tokens_all),
                            "tokens_per_s": round(tps, 1),
                            "elapsed_s": round(elapsed, 3),
                        }
                    )
                evaluate = (s["train.eval_every"] and self.step % s["train.eval_every"] == 0) or self.step == steps
                if evaluate and self.eval_set["input_ids"].shape[0]:
                    record = self._evaluate()
                    self._metric(record)
                    if self.main:
                        progress.console.print(
                            f"step {self.step}: eval loss {record['eval_loss']:.4f}"
                            + (f", perplexity {record['eval_ppl']:.2f}" if "eval_ppl" in record else "")
                            + (f", accuracy {record['eval_accuracy']:.3f}" if "eval_accuracy" in record else ""),
                            highlight=False,
                        )
                if (s["train.save_every"] and self.step % s["train.save_every"] == 0) or self.step == stop:
                    self._save_checkpoint()
        elapsed = time.perf_counter() - started
        done = self.step - first_step
        self.log(
            f"{done} steps in {elapsed:.2f} s, {tokens_run / max(elapsed, 1e-9):,.0f} tokens/s"
            + (f", last loss {last_loss:.4f}" if last_loss is not None else "")
        )
        if self.step >= steps:
            self._export()
            self._plot()
        else:
            self.log(f"stopped at step {self.step} (train.stop_at): continue with --resume")
        if self.dist is not None:
            self.dist.barrier()
        return 0

    def _progress(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not (self.main and self.s["train.progress"]),
        )

    def _evaluate(self) -> dict:
        torch = self.torch
        model = self.model
        model.eval()
        b = self.s["train.batch_size"]
        n = self.eval_set["input_ids"].shape[0]
        limit = self.s["train.eval_batches"]
        gen = torch.Generator().manual_seed(self.s["train.seed"] + 424242)  # the same masks at every eval
        total, weight, correct, count = 0.0, 0, 0, 0
        starts = list(range(self.data_rank * b, n, b * self.data_world))
        if limit:
            starts = starts[:limit]
        with torch.no_grad():
            for i in starts:
                batch = self._prepare({k: v[i : i + b] for k, v in self.eval_set.items()}, gen)
                out = self._forward(batch)
                if self.task == "causal_lm":
                    items = batch["input_ids"].numel() - batch["input_ids"].shape[0]
                elif self.task == "masked_lm":
                    items = int((batch["labels"] != -100).sum())
                else:
                    items = batch["input_ids"].shape[0]
                    correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                    count += items
                if items:
                    total += float(out.loss) * items
                    weight += items
        total, weight, correct, count = self._reduce([total, weight, correct, count])
        weight, count = weight * self.world, count * self.world
        loss = total * self.world / max(weight, 1)
        record = {"step": self.step, "eval_loss": round(loss, 6)}
        if self.task != "sequence_classification":
            record["eval_ppl"] = round(math.exp(min(loss, 50)), 4)
        else:
            record["eval_accuracy"] = round(correct * self.world / max(count, 1), 4)
        model.train()
        return record

    # ---- metrics --------------------------------------------------------------------------------------
    def _metric(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _reset_metrics(self, upto: int) -> None:
        """metrics.jsonl holds the records of steps 1 .. `upto` (a new run: none; a resumed run: the checkpoint's)."""
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "metrics.jsonl"
        kept = []
        if upto and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= upto:
                    kept.append(line + "\n")
        path.write_text("".join(kept), encoding="utf-8")

    def _plot(self) -> None:
        if not self.main:
            return
        records = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines() if line]
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        from dslc.train_plot import loss_curve

        how = loss_curve(self.out / "loss.png", train, evals)
        self.log(f"loss curve: {self.out / 'loss.png'} ({how})")

    # ---- checkpoints ----------------------------------------------------------------------------------
    def _state(self) -> dict:
        torch = self.torch
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "mask": self.mask_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "step": self.step,
            "cursor": self.cursor,
            "settings": self.settings,
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "world_size": self.world,
        }

    def _save_checkpoint(self) -> None:
        torch = self.torch
        folder = self.out / "checkpoints" / f"step-{self.step}"
        tmp = folder.with_name(folder.name + ".tmp")
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if self.dist is not None:
            self.dist.barrier()
        state = self._state()
        if self.sharded:  # each rank writes its shards (torch.distributed.checkpoint), its RNG on its own
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optim_state = get_state_dict(self.model, self.optimizer)
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / "dcp"))
            torch.save(state, tmp / f"rank-{self.rank}.pt")
        elif self.main:
            state["model"] = self.model.state_dict()
            state["optimizer"] = self.optimizer.state_dict()
            torch.save(state, tmp / "state.pt")
        if self.dist is not None and not self.sharded:
            rng = [None] * self.world
            self.dist.all_gather_object(rng, state["rng"])
            if self.main:
                torch.save(rng, tmp / "rng.pt")
        if self.dist is not None:
            self.dist.barrier()
        if self.main:
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
            self.log(f"[dim]checkpoint {folder}[/dim]")

    def _load_checkpoint(self, folder: Path) -> None:
        torch = self.torch
        sharded = (folder / "dcp").is_dir()
        path = folder / (f"rank-{self.rank}.pt" if sharded else "state.pt")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise TrainError(f"--resume {folder}: cannot read {path.name} ({type(e).__name__}: {e})") from None
        before = _settings_flat(state["settings"])
        changed = sorted(k for k in set(before) | set(self.s) if before.get(k) != self.s.get(k))
        changed = [k for k in changed if k not in RESUMABLE_CHANGES]
        if changed:
            detail = ", ".join(f"{k} {before.get(k)!r} -> {self.s.get(k)!r}" for k in changed[:4])
            raise TrainError(
                f"--resume {folder}: the settings differ from the checkpoint's ({detail}): resume with the same ones"
            )
        if state["world_size"] != self.world:
            raise TrainError(f"--resume {folder}: written by {state['world_size']} processes, resumed by {self.world}")
        if sharded != self.sharded:
            raise TrainError(f"--resume {folder}: {'sharded' if sharded else 'unsharded'} checkpoint, the run is not")
        if sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_state, optim_state = get_state_dict(self.model, self.optimizer)
            both = {"model": model_state, "optimizer": optim_state}
            dcp.load(both, checkpoint_id=str(folder / "dcp"))
            set_state_dict(
                self.model, self.optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"]
            )
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.cursor = state["step"], state["cursor"]
        rng = state["rng"]
        if self.dist is not None and not sharded:
            rng = torch.load(folder / "rng.pt", weights_only=True)[self.rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(_tuples(rng["python"]))
        self.mask_gen.set_state(rng["mask"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self._reset_metrics(self.step)
        self.log(f"resumed from {folder} at step {self.step}")

    # ---- export ---------------------------------------------------------------------------------------
    def _export(self) -> None:
        folder = self.out / "model"
        model = self.model
        state = None
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.main:
            return
        note = "full weights"
        if self.lora is not None:
            if self.s["lora.export"] == "adapter":
                self.lora.save_pretrained(str(self.out / "adapter"))
                note = f"LoRA merged into the weights; the adapter alone in {self.out / 'adapter'}"
            else:
                note = "LoRA merged into the weights"
            model = self.lora.merge_and_unload()
            self.model = model
        if folder.exists():
            shutil.rmtree(folder)
        model.save_pretrained(folder, state_dict=state)
        copied = [n for n in TOKENIZER_FILES if (self.weights / n).is_file()]
        for name in copied:
            shutil.copyfile(self.weights / name, folder / name)
        if (self.weights / "generation_config.json").is_file() and not (folder / "generation_config.json").exists():
            shutil.copyfile(self.weights / "generation_config.json", folder / "generation_config.json")
        self.log(f"exported {folder} ({note}; {', '.join(copied)})")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _tuples(value):
    """random.getstate() after a weights_only load: its lists back to tuples."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def main_train(argv=None) -> int:  # for `python -m dslc.train`
    from dslc.cli import main

    return main(["train", *(argv if argv is not None else sys.argv[1:])])
