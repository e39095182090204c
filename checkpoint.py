"""The run folder (--out-dir) that train_gpt2.py and train_jax.py write, and whose checkpoints
sample.py, eval_hellaswag.py, eval_core.py and export.py read:

    ckpt_0000040.pt   one torch.save dict: model_config, model, optimizer, scaler, step,
                      loader_states, world_size, config, ...
    ckpt_0000040/     the same under --fsdp: torch.distributed.checkpoint shards (sharding.py)
                      beside train_state.pt: the rest, and each shard's sha256 (checked on load)
    log.jsonl         one JSON object per event, appended by rank 0
    .lock             held (flock) by the one run writing the folder; it names its pid

`ckpt_{s:07d}` holds the weights after s optimizer steps; the fixed width sorts by name, and
nothing else in the folder counts as a checkpoint (a user's copy ckpt_best.pt is left alone).
Every file appears whole or not at all (data.atomic_output, a folder written under a temp
name and renamed); a kill leaves at most a hidden temp file, which the next run removes.

Reading a checkpoint runs no code from it: .pt files through torch.load(weights_only=True),
--fsdp folders through sharding.py's restricted reader. load() is the one place a checkpoint
is opened and checked; what it returns, the rest of the code trusts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException

import data
import runtime
import sharding
from cli import UsageError
from model import GPT, GPTConfig
from model_modern import MODEL_KIND as MODERN
from model_modern import ModernConfig, ModernGPT

LOG_NAME = "log.jsonl"
STATE_NAME = "train_state.pt"
# A checkpoint's "model_kind" names its model class; checkpoints without one are GPT-2's.
MODELS: dict[str, tuple[type[GPT] | type[ModernGPT], Any]] = {
    "gpt2": (GPT, GPTConfig), MODERN: (ModernGPT, ModernConfig)}
# Switches that GPT-2's own classes carried until 2026-12-07 (the first --recipe=modern).
# Such a checkpoint with every switch off is GPT-2's; with one on, it cannot load.
OLD_SWITCHES = ("rotary", "qk_norm", "relu_squared", "untied_head", "zero_init")
LOCK_NAME = ".lock"
CHECKPOINT_NAME = re.compile(r"ckpt_\d{7}(\.pt)?")
# What a kill can leave: a checkpoint's or the log's temp file, a --fsdp temp folder.
STALE_GLOBS = (".ckpt_*.tmp", f".{LOG_NAME}.*.tmp")


def path_for(out_dir: Path, step: int, sharded: bool = False) -> Path:
    """ckpt_0000040.pt, or the folder ckpt_0000040 of a torch.distributed.checkpoint."""
    return out_dir / (f"ckpt_{step:07d}" if sharded else f"ckpt_{step:07d}.pt")


def find(out_dir: Path) -> list[Path]:
    """The checkpoints of both kinds that a run wrote into `out_dir`, oldest first."""
    found = [p for p in out_dir.glob("ckpt_*") if CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: p.name)  # load() says what is wrong with a bad one


@contextlib.contextmanager
def hold(out_dir: Path, env: runtime.DistEnv) -> Iterator[None]:
    """Holds `out_dir` for this run alone, from before its first write to its exit: rank 0
    takes the folder's lock (the kernel drops it however the process ends, kill -9 too) and
    every rank learns whether it got it, so a refused run stops on every rank."""
    fresh = not out_dir.exists()
    with contextlib.ExitStack() as stack:
        refusal: list[str | None] = [None]
        if env.is_main:
            stack.callback(_remove_if_unused, out_dir, fresh)
            try:
                stack.enter_context(data.hold_folder(out_dir, LOCK_NAME))
            except data.FolderHeld as exc:
                refusal[0] = (f"--out-dir={out_dir}: another run (pid {exc.pid}) is writing "
                              "this folder\nhint: wait for it or stop it, or pass another "
                              "--out-dir")
        if env.is_distributed:
            torch.distributed.broadcast_object_list(refusal, src=0)
        if refusal[0] is not None:
            raise UsageError(refusal[0])
        yield


def _remove_if_unused(out_dir: Path, fresh: bool) -> None:
    """A folder this run made and left holding nothing but its lock (it stopped before its
    first write) goes again."""
    if fresh and out_dir.is_dir() and [p.name for p in out_dir.iterdir()] == [LOCK_NAME]:
        (out_dir / LOCK_NAME).unlink()
        out_dir.rmdir()


def resume_point(out_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """The --resume / --overwrite policy, checked before anything is written: the checkpoint
    to continue from (None: start afresh)."""
    existing = find(out_dir) if out_dir.is_dir() else []
    if resume:
        return existing[-1] if existing else None
    if existing and not overwrite:
        raise UsageError(f"--out-dir={out_dir} already holds checkpoints (newest "
                         f"{existing[-1].name})\nhint: pass --resume to continue, --overwrite "
                         "to start again, or another --out-dir")
    return None


def open_run(out_dir: Path, resumed: Path | None, step: int) -> None:
    """Ready the folder for a run (rank 0 only). Afresh, it loses its checkpoints and log.
    Resumed from checkpoint `resumed` at `step`, its log is cut back (atomically) to the lines
    with a lower step, then that checkpoint's line, written anew because a kill can land
    between the checkpoint's rename and its log line. A kill tears at most the last line,
    which goes; any other line that is not an event stops the resume, naming the line, before
    the log is touched. Temp files a kill left go either way."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / LOG_NAME
    if resumed is None:
        for old in [*find(out_dir), log]:
            remove(old)
    else:
        lines = log.read_bytes().splitlines() if log.exists() else []
        kept = []
        for number, line in enumerate(lines, start=1):
            try:
                event = json.loads(line.decode("utf-8"))
            except ValueError:  # JSONDecodeError, UnicodeDecodeError
                if number == len(lines):
                    continue  # torn by a kill mid-write
                event = None
            if not isinstance(event, dict) or type(event.get("step", 0)) is not int:
                raise ValueError(f"{log}:{number}: not an event of train_gpt2.py's log (a JSON "
                                 "object with an integer step)\nhint: delete that line, or "
                                 "start afresh with --overwrite")
            if event.get("step", 0) < step:
                kept.append(line.decode("utf-8") + "\n")
        kept.append(json.dumps({"step": step, "checkpoint": str(resumed)}) + "\n")
        with data.atomic_output(log) as f:
            f.write("".join(kept).encode("utf-8"))
    for stale in [p for pattern in STALE_GLOBS for p in out_dir.glob(pattern)]:
        remove(stale)


class _KeepError:
    """Keeps the first OSError of write(), which torch.save turns into "unexpected pos ..."."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return int(self.file.write(data))
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.file.flush()


def save(path: Path, state: dict[str, Any]) -> None:
    """torch.save that never leaves a half-written checkpoint under `path`; a failed write
    (a full disk) is the OSError naming `path`."""
    with data.atomic_output(path) as f:
        out = _KeepError(f)
        try:
            torch.save(state, out)  # type: ignore[arg-type]  # it calls write and flush
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def prune(out_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0 keeps all)."""
    for old in find(out_dir)[:-keep] if keep > 0 else []:
        remove(old)


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint of either kind as one dict, on CPU, checked (check()). A --fsdp folder's
    shards come back gathered into full weights (its optimizer state stays in the folder:
    sharding.load_optimizer_state reads it on resume)."""
    path = Path(path)
    if path.is_dir() and path.suffix == ".pt":
        raise ValueError(f"{path}: a directory, not a checkpoint file\nhint: pass a ckpt_*.pt "
                         "file or a ckpt_NNNNNNN folder of train_gpt2.py --fsdp")
    if not path.is_dir() and not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found\nhint: pass the path of a "
                                "ckpt_*.pt file written by train_gpt2.py")
    # A --fsdp folder's train_state.pt holds all but the weights, and each file's checksum.
    state_file = path / STATE_NAME if path.is_dir() else path
    if not state_file.is_file():
        inside = find(path)  # a run folder (--out-dir) instead of one of its checkpoints?
        hint = (f"pass one of its checkpoints, e.g. {inside[-1]}" if inside else
                "pass a ckpt_NNNNNNN folder of train_gpt2.py --fsdp, whole")
        raise ValueError(f"{path}: no {STATE_NAME}\nhint: {hint}")
    try:
        damaged = None
        if zipfile.is_zipfile(state_file):  # torch.load does not check the records' CRC-32s
            with zipfile.ZipFile(state_file) as archive:
                damaged = archive.testzip()
        if damaged is None:
            with warnings.catch_warnings():  # torch warns about foreign pickle protocols
                warnings.simplefilter("ignore")
                state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling fails in many types
        raise ValueError(f"{state_file}: not a readable train_gpt2.py checkpoint "
                         f"({type(exc).__name__})\nhint: pass a ckpt_*.pt file") from None
    if damaged is not None:
        raise ValueError(f"{state_file}: its record {damaged} is damaged (its CRC-32 differs)"
                         "\nhint: restore the checkpoint from a copy or pass another one")
    if not path.is_dir():
        return check(path, state)
    sums = state.get("sha256", {}) if isinstance(state, dict) else {}
    for name, digest in sums.items() if isinstance(sums, dict) else [("", None)]:
        file = path / str(name)
        if not file.is_file() or data.file_sha256(file) != digest:
            what = "missing" if not file.is_file() else "not the file train_gpt2.py wrote"
            raise ValueError(f"{file}: {what} (its checksum differs)\nhint: the checkpoint is "
                             "damaged; restore it from a copy or pass another one")
    with reading(path, "shards"):
        shapes = {key.removeprefix("model."): getattr(item, "size", ())
                  for key, item in sharding.read_metadata(path).state_dict_metadata.items()
                  if key.startswith("model.")}
        state = check(state_file, state, (path, shapes))
        model_class, config_class = MODELS[state["model_kind"]]
        empty = model_class(config_class(**state["model_config"]))  # type: ignore[arg-type]
        return {**state, "model": sharding.load_full_weights(path, empty)}


def _damaged(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: {what}\nhint: the file is damaged or not a train_gpt2.py "
                      "checkpoint; pass another one")


def check(path: Path, state: Any, shards: tuple[Path, dict[str, Any]] | None = None
          ) -> dict[str, Any]:
    """Checks that `state` is a checkpoint to build a model from (and, where it holds the
    training state, to resume from) and returns it: its weights' names and shapes must be those
    its model_config calls for, of state["model"] or of `shards` ((folder, shapes) of a --fsdp
    checkpoint). In place, a missing model_kind or model entry is filled in and GPT-2's old
    switches (all off) are dropped. Anything else raises a ValueError naming the file (or the
    folder) and the key."""
    if not isinstance(state, dict) or not isinstance(state.get("model_config"), dict):
        raise _damaged(path, "no model_config entry")
    kind = state.setdefault("model_kind", "gpt2")
    if not isinstance(kind, str) or kind not in MODELS:
        raise _damaged(path, f"model_kind is {kind!r}, not one of {', '.join(MODELS)}")
    config = state["model_config"]
    if kind == "gpt2" and any(config.get(switch) is True for switch in OLD_SWITCHES):
        on = ", ".join(s for s in OLD_SWITCHES if config.get(s) is True)
        raise ValueError(f"{path}: written by the first --recipe=modern ({on} in GPT-2's "
                         "model)\nhint: today's modern model has other weights; train it again "
                         "with --recipe=modern")
    if kind == "gpt2":
        for switch in OLD_SWITCHES:
            if switch in config and type(config[switch]) is not bool:
                raise _damaged(path, f"model_config[{switch!r}] is {config[switch]!r}, not "
                               "True or False")
            config.pop(switch, None)  # off (the check above refused on): what GPT-2 is
    model_class, config_class = MODELS[kind]
    # The config class's own fields say what each entry must be: "int" fields are the shape
    # (positive, always present), "bool" and "float" ones settings with defaults.
    field_types = {f.name: f.type for f in dataclasses.fields(config_class)}
    for key in config:
        if key not in field_types:
            raise _damaged(path, f"model_config has an unknown key {key!r}")
    for key, field_type in field_types.items():
        value = config.get(key)
        if key not in config and field_type != "int":
            continue  # a setting at its default
        shown = repr(value) if key in config else "missing"
        if field_type == "int" and (type(value) is not int or value <= 0):
            raise _damaged(path, f"model_config[{key!r}] is {shown}, not a positive integer")
        if field_type == "bool" and type(value) is not bool:
            raise _damaged(path, f"model_config[{key!r}] is {shown}, not True or False")
        if field_type == "float" and (type(value) not in (int, float) or not value >= 0):
            raise _damaged(path, f"model_config[{key!r}] is {shown}, not a number >= 0")
    try:
        config_class(**config)
    except ValueError as exc:
        raise _damaged(path, f"model_config: {exc}") from None
    if not isinstance(state.setdefault("model", {}), dict):  # a --fsdp folder's come later
        raise _damaged(path, "no model entry")
    for key, tensor in state["model"].items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise _damaged(path, f"model[{key!r}] is not float weights")
    for key in ("step", "skipped_steps"):
        if key in state and (type(state[key]) is not int or state[key] < 0):
            raise _damaged(path, f"{key} is {state[key]!r}, not a count of steps")
    if "world_size" in state and (type(state["world_size"]) is not int or state["world_size"] < 1):
        raise _damaged(path, f"world_size is {state['world_size']!r}, not a number of processes")
    loaders = state.get("loader_states", [{"batch_size": 1}])
    if not isinstance(loaders, list) or not loaders or not all(
            isinstance(s, dict) and type(s.get("batch_size")) is int for s in loaders):
        raise _damaged(path, "loader_states is not a list of data loader states")
    leaves = state.get("optimizer_leaves", [])  # train_jax.py's optax state
    if not isinstance(leaves, list) or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise _damaged(path, "optimizer_leaves is not a list of tensors")
    # Every tensor in the nested dicts and lists, by its key path (model['wte.weight']).
    pending: list[tuple[str, Any]] = [("", state)]
    for name, value in pending:  # the list grows as the walk goes: breadth first, in order
        # A sum is finite only if every value is; the full test runs only when it is not.
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not (
                value.sum().isfinite() or value.isfinite().all()):
            raise _damaged(path, f"{name} holds NaN or infinite values")
        if isinstance(value, dict):
            items: Any = value.items()
        elif isinstance(value, list | tuple):
            items = enumerate(value)
        else:
            continue
        pending += [(f"{name}[{key!r}]" if name else str(key), item) for key, item in items]
    if shards is None and not state["model"]:
        return state  # no weights to check: loading them names what is missing
    where, shapes = shards or (path, {k: t.shape for k, t in state["model"].items()})
    # The layer count first, and the model laid out on the meta device: a config that asks
    # for far more than the file holds is refused before anything is allocated.
    layers = {key.split(".")[2] for key in shapes if key.startswith("transformer.h.")}
    if len(layers) != config["n_layer"]:
        raise _damaged(where, f"model_config[{'n_layer'!r}] is {config['n_layer']}, its weights "
                       f"hold {len(layers)} layers")
    with torch.device("meta"):
        empty = model_class(config_class(**config))  # type: ignore[arg-type]
        expected = {k: t.shape for k, t in empty.state_dict().items()}
    for key in sorted(expected.keys() - shapes.keys()):
        raise _damaged(where, f"model[{key!r}] is missing")
    for key in sorted(shapes.keys() - expected.keys()):
        raise _damaged(where, f"model[{key!r}] is not a weight of its model_config")
    for key, shape in expected.items():
        if tuple(shapes[key]) != tuple(shape):
            raise _damaged(where, f"model[{key!r}] has shape {tuple(shapes[key])}, its "
                           f"model_config gives {tuple(shape)}")
    return state


def model_from_state(state: dict[str, Any]) -> GPT | ModernGPT:
    """The model a checked checkpoint holds, its weights loaded."""
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the caller's RNG
        return MODELS[state["model_kind"]][0].from_checkpoint(state)


def load_model(pretrained: str | None, checkpoint: str | None,
               device: torch.device | str) -> GPT | ModernGPT:
    """The model of a checkpoint (preferred when given) or of pretrained GPT-2 weights (a hub
    name or a local Hugging Face folder), in eval mode on `device`."""
    if checkpoint is not None:
        model = model_from_state(load(checkpoint))
    elif pretrained is not None:
        model = GPT.from_pretrained(pretrained)
    else:
        raise UsageError("pass --pretrained=NAME|DIR or --checkpoint=PATH")
    return model.to(device).eval()


@contextlib.contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """What reading `what` of the checkpoint `path` raises (its content is not what
    train_gpt2.py wrote; a CheckpointException is a BaseException) as one RuntimeError naming it."""
    try:
        yield
    except (CheckpointException, KeyError, TypeError, IndexError, ValueError, AssertionError,
            RuntimeError, EOFError, OSError) as exc:
        if str(exc).startswith(str(path)):
            raise  # names the file already
        inner = next(iter(getattr(exc, "failures", {}).values()), (exc,))[0]
        detail = ": ".join([type(inner).__name__, *str(inner).strip().splitlines()[-1:]])
        raise RuntimeError(f"{path}: cannot read its {what} ({detail})\nhint: the checkpoint "
                           "is damaged or of another run; pass another one") from None


def save_training(out_dir: Path, step: int, config: Any, env: runtime.DistEnv,
                  model: GPT | ModernGPT,
                  optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  loader: data.ShardLoader, skipped_steps: int, argv: list[str]) -> Path:
    """Checkpoint `step` (every rank joins: the loader states are gathered, and under --fsdp
    each rank writes its shards), then the oldest beyond --keep-checkpoints go."""
    states: list[Any] = [loader.state_dict()] * env.world_size
    if env.is_distributed:
        torch.distributed.all_gather_object(states, loader.state_dict())
    kind = MODERN if isinstance(model, ModernGPT) else "gpt2"
    state = {"model_kind": kind, "model_config": dataclasses.asdict(model.config),
             "scaler": scaler.state_dict(),
             "skipped_steps": skipped_steps, "step": step, "loader_states": states,
             "world_size": env.world_size, "args": list(argv),
             "config": dataclasses.asdict(config)}
    path = path_for(out_dir, step, sharded=config.fsdp)
    if config.fsdp:
        _save_folder(path, model, optimizer, state, env)
    elif env.is_main:
        save(path, {**state, "model": model.state_dict(), "optimizer": optimizer.state_dict()})
    if env.is_main:
        prune(out_dir, config.keep_checkpoints)
        print(f"saved {path}", flush=True)
    return path


def _save_folder(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 state: dict[str, Any], env: runtime.DistEnv) -> None:
    """Every rank writes its shards into a temp folder; rank 0 adds train_state.pt (`state`
    and each file's sha256) and renames the folder into place, so `path` appears only once
    complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    torch.distributed.barrier()
    sha256 = sharding.write_shards(tmp, model, optimizer, env)
    if env.is_main:
        save(tmp / STATE_NAME, {**state, "sha256": sha256})
        data.replace_folder(tmp, path)
    torch.distributed.barrier()


def restore_training(state: dict[str, Any], path: Path, fsdp: bool, env: runtime.DistEnv,
                     model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler, loader: data.ShardLoader) -> tuple[int, int]:
    """Loads the optimizer state, loss scaler and loader position of the checkpoint the model
    was built from (its weights are the model's already) into `optimizer`, `scaler` and
    `loader`, and returns the checkpoint's (step, skipped steps)."""
    sharded = path.is_dir()  # its optimizer state is read from the folder below
    wanted = ("scaler", "loader_states", "step") + (() if sharded else ("optimizer",))
    if missing := [k for k in wanted if k not in state]:
        raise RuntimeError(f"{path}: no {', '.join(missing)} to resume from (written by "
                           "another trainer?)\nhint: start a new --out-dir with --init-from=PATH")
    if fsdp and not sharded:
        raise RuntimeError(f"{path}: a .pt checkpoint cannot resume under --fsdp yet\nhint: "
                           "resume it without --fsdp")
    with reading(path, "optimizer, scaler or loader state"):
        # A step is a global batch of world_size x batch_size samples, rank r taking the r-th
        # slice: another world size continues at the same sample, in the same order, if the
        # global micro-batch is unchanged.
        world_size, batch_size = env.world_size, loader.batch_size
        saved_world = state.get("world_size", len(state["loader_states"]))
        if saved_world == world_size:
            saved = state["loader_states"][env.rank]
        else:
            saved = state["loader_states"][0]
            if saved["batch_size"] * saved_world != batch_size * world_size:
                raise ValueError(
                    f"{path}: saved by {saved_world} processes with --batch-size="
                    f"{saved['batch_size']}\nhint: with {world_size} processes resume with "
                    f"--batch-size={saved['batch_size'] * saved_world / world_size:g}, so that "
                    "the global micro-batch, and the data order, stay the same")
            saved = {**saved, "rank": env.rank, "world_size": world_size,
                     "batch_size": batch_size}
        if sharded:
            sharding.load_optimizer_state(path, model, optimizer)
        else:
            try:
                optimizer.load_state_dict(state["optimizer"])
            except ValueError as exc:  # the state is another optimizer's: exc names how
                raise ValueError(f"{path}: {exc}\nhint: the checkpoint is damaged or of another "
                                 f"run; start from its weights with --init-from={path}") from None
        scaler.load_state_dict(state["scaler"])
    try:
        loader.load_state_dict(saved)
    except ValueError as exc:
        raise RuntimeError(f"{path}: {exc}") from None
    return state["step"], state.get("skipped_steps", 0)


def append_log(out_dir: Path, step: int, **values: Any) -> None:
    """One event in log.jsonl; a line per call, so a kill tears at most the last one."""
    with open(out_dir / LOG_NAME, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, **values}) + "\n")
