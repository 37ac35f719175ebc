"""The training job's configuration: one documented dataclass, parsed by OmegaConf.

    cfg = TrainConfig.from_args(["--config", "launch/recipes/demo.yaml", "rl_steps=50", "grpo.group_size=4"])
    print(config_help())                       # every field, its type, default and doc

Sources are merged in order: the dataclass defaults, each `--config FILE.yaml` (several may be
given), then the `key=value` overrides (OmegaConf's dotlist: values are YAML, so `density=1e-3`,
`k_steps=[5, 10]` and `task_kwargs={digits: 1}` all parse; `grpo.group_size=4` sets one entry
of a mapping). A mapping given whole (`task_kwargs={length: 3}`, or in a file) replaces that
field's mapping rather than merging into it: the task's kwargs must not inherit the default
task's `digits`. OmegaConf checks every value against the field's type and refuses unknown keys;
`__post_init__` then checks the values' meaning. Both raise ValueError naming the key and the
reason, before any process group or model exists.

Why OmegaConf and not a hand-written parser: typed merging of YAML files and dotlists is what it
does (interpolation such as `run_dir=runs/${comm}` comes free), and the errors carry the key.
It is imported here only, so `import sparsecomm` stays light.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import typing
from dataclasses import dataclass, field
from typing import Any

# comm mode -> what it does; sparsecomm.rl.build holds the constructors behind each name
COMMS = {
    "local": "one process, no communication (ASPG still sparsifies its own update)",
    "aspg": "ASPG + the torch.distributed sparse exchange (automatic dense switch)",
    "coordinator": "ASPG through the ZeroMQ coordinator at `coordinator` (tcp://host:port)",
    "ddp": "DDP's dense all-reduce with `optimizer` (adamw | sgd | adafactor)",
    "hook": "DDP + sparsecomm's sparse top-k comm hook at `density`, with `optimizer`",
    "powersgd": "DDP + PyTorch's PowerSGD hook (rank `powersgd_rank`, one bucket), with `optimizer`",
}
# training engine -> what runs the measured phase; sparsecomm.rl.build holds the constructors
ENGINES = {
    "ddp": "plain torch: DDP for the DDP comm modes, ASPG's own exchange otherwise",
    "deepspeed": "a DeepSpeed engine at `zero_stage` (sparsecomm.integrations.deepspeed): comm=aspg (ZeRO-0, ASPG "
                 "exchanges in step), comm=hook (ZeRO-0/1/2, compressed gradient reduction), comm=ddp (DeepSpeed's own)",
    "fsdp2": "torch FSDP2 (fully_shard) over `mesh` RxS (sparsecomm.integrations.fsdp): comm=hook (sparse "
             "cross-replica all-reduce at `density`), comm=ddp (native HSDP); ASPG is refused",
}
# comm mode -> how a DeepSpeed engine communicates (sparsecomm.integrations.deepspeed.COMMS)
DEEPSPEED_COMMS = {"aspg": "aspg", "hook": "sparse_grad", "ddp": "dense"}
ASPG_COMMS = ("aspg", "coordinator")  # ASPG communicates inside step(): it needs optimizer=aspg
DDP_COMMS = ("ddp", "hook", "powersgd")  # DDP communicates in backward(): ASPG would communicate twice
OPTIMIZERS = ("aspg", "adamw", "sgd", "adafactor")
PHASES = ("rl", "sft", "pretrain")
PRECISIONS = ("fp32", "bf16")
TRACKER_MODES = ("fp32", "cpu", "bf16")
BACKENDS = ("auto", "gloo", "nccl")
# config keys a resumed run may change: they do not alter what is computed
RESUME_MAY_CHANGE = ("resume", "rl_steps", "checkpoint_every", "console_every", "metrics_port", "tensorboard",
                     "wandb_project")
# config.json written by a run carries a `runtime` record (device, versions): a record, not a
# setting, so loading that file back as a --config skips it
RECORD_KEYS = ("runtime",)


@dataclass
class TrainConfig:
    run_dir: str = "runs/demo"
    """Where the resolved config, StepStats JSONL, checkpoints and summary go."""
    model: str = "tiny"
    """Built-in tiny | small | medium (random init, char tokenizer), or a local path / cached HF name."""
    task: str = "addition"
    """addition | sort | countdown (sparsecomm.rl.tasks): procedurally generated, verifiable."""
    task_kwargs: dict[str, Any] = field(default_factory=lambda: {"digits": 2})
    """Keyword arguments of the task (addition: digits; sort: length; countdown: n)."""
    reward: str = "default"
    """default | truthful | helpful | harmless (see sparsecomm.rl.tasks)."""
    seed: int = 0
    """Seeds the model init (the same on every rank), data (per rank) and sampling."""
    sft_steps: int = 300
    """Steps of the dense AdamW SFT warm start (0: none); it is not what the run measures."""
    sft_lr: float = 3e-3
    """Learning rate of the SFT warm start."""
    sft_batch: int = 32
    """Examples per rank per SFT (and phase=sft|pretrain) step."""
    phase: str = "rl"
    """The measured phase after the warm start: rl (GRPO) | sft | pretrain."""
    rl_steps: int = 60
    """Steps of the measured phase (RL, or SFT/pretrain with phase=sft|pretrain)."""
    rl_lr: float = 1e-3
    """Learning rate of the measured phase (constant)."""
    precision: str = "fp32"
    """fp32 master weights, or bf16: the model (and optimizer state) in bf16 for the measured phase."""
    prompts_per_step: int = 8
    """Prompts per rank per RL step (each sampled group_size times)."""
    grpo: dict[str, Any] = field(default_factory=dict)
    """GRPOConfig fields: group_size, max_new_tokens, temperature, clip_eps, beta."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N. auto: cuda:LOCAL_RANK when torch.cuda.is_available(), else cpu.
    The model, optimizer state, sampling and the exchange's buffers live there."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl for a CUDA device, gloo for cpu) | gloo | nccl. A backend
    that cannot move the device's tensors (gloo with cuda, nccl with cpu) is refused at start."""
    comm: str = "local"
    """How the measured phase communicates: local | aspg | coordinator | ddp | hook | powersgd."""
    optimizer: str = "aspg"
    """aspg (sparse, error feedback) | adamw | sgd (momentum 0.9) | adafactor (transformers)."""
    density: float = 0.01
    """Fraction of entries ASPG / the sparse hook sends per step, in (0, 1]."""
    value_codec: str = "bf16"
    """How ASPG / the sparse hook encodes the sent values (sparsecomm.codec.values: fp32, bf16, ...)."""
    aspg: dict[str, Any] = field(default_factory=dict)
    """Extra ASPG options (warmup_steps, importance, budget, switch, ...; see sparsecomm.optim.aspg)."""
    coordinator: str = ""
    """The ZeroMQ coordinator's address for comm=coordinator, tcp://HOST:PORT."""
    powersgd_rank: int = 1
    """Rank of PowerSGD's low-rank factors (comm=powersgd)."""
    lora_rank: int = 0
    """> 0: the measured phase trains LoRA adapters of this rank (peft, the `trl` extra) on the
    attention and MLP matrices instead of the full model; only the adapters are communicated."""
    kind_density: dict[str, float] = field(default_factory=dict)
    """ASPG density per layer kind (attention, mlp, norm, embedding, other), e.g. {norm: 1.0};
    kinds not named use `density`. Selection then runs per tensor (budget per_tensor)."""
    dense_baseline_every: int = 10
    """Every N steps, time a real dense all_reduce of the same parameters beside the exchange (0: never)."""
    tracker_mode: str = "fp32"
    """Sparsity tracker snapshot: fp32 (all definitions) | cpu (fp32 in host memory) | bf16 (bf16 view only)."""
    k_steps: list[int] = field(default_factory=lambda: [10])
    """Accumulated sparsity between weights K steps apart, for each K."""
    per_param_stats: bool = True
    """Per-parameter sparsity keys in StepStats (per layer kind and global are always there)."""
    hot_window: int = 0
    """Hot-parameter map window in steps (0: off); heatmaps go to RUN_DIR/hot_maps_rank{R}.npz."""
    hot_definition: str = "bf16_view"
    """Which sparsity definition counts a weight as changed in the hot map (fp32_exact, bf16_view, ...)."""
    rank_every: int = 0
    """Gradient rank (per matrix, and the stacked method over `rank_stack` steps) every N steps (0: off)."""
    rank_stack: int = 8
    """Gradients stacked for the stacked-SVD rank (its rank is <= rank_stack by construction)."""
    checkpoint_every: int = 0
    """Save RUN_DIR/checkpoint_rank{R}.pt every N measured steps (0: never)."""
    resume: bool = False
    """Continue from RUN_DIR's checkpoint (same config): exact, the warm start is not repeated."""
    eval_size: int = 200
    """Held-out prompts for the greedy exact-match accuracy before and after the measured phase."""
    heldout_fraction: float = 0.0
    """> 0: this fraction of the task's prompt space (by a fixed hash of the prompt) is held out: no
    training split contains those prompts and the eval set is `eval_size` distinct prompts drawn from
    them only (asserted disjoint at start). 0: eval prompts are drawn independently and may overlap."""
    whole_run_rank: bool = False
    """Measure the whole run's update W_end - W_start per matrix (stable / entropy / numerical rank,
    a same-shape random baseline, changed fraction fp32 and bf16 view) with the token bound (tokens
    seen by all ranks) into the summary (sparsecomm.research.update_rank)."""
    metrics_port: int = -1
    """Prometheus port (0: any free port; -1: off). Each process serves on metrics_port + its LOCAL_RANK
    (its index on its node), so every node exposes the same ports."""
    console_every: int = 10
    """Print a console line every N steps (rank 0 only)."""
    tensorboard: bool = False
    """Also write every metric to TensorBoard event files in RUN_DIR/tensorboard/rank{R} (needs the
    `track` extra: tensorboard)."""
    wandb_project: str = ""
    """Also log every metric to Weights & Biases under this project, offline into RUN_DIR (""; off;
    needs the `track` extra: wandb; `wandb sync` uploads later)."""
    engine: str = "ddp"
    """What runs the measured phase, one of ENGINES: ddp (plain torch) | deepspeed | fsdp2."""
    zero_stage: int = 0
    """engine=deepspeed: the ZeRO stage, 0 | 1 | 2 | 3 (ASPG needs 0; the compressed reduction 0-2)."""
    param_density: float = 0.0
    """engine=deepspeed comm=hook zero_stage=1|2: the all-gather of the updated partitions is sparse too, this
    fraction of each rank's partition per step (the entries that moved most since last sent; the rest stays in
    the fp32 master and follows later); 0: DeepSpeed's dense all-gather."""
    rollout_relay: str = ""
    """engine=deepspeed zero_stage=3: after every RL step each rank sends the changed bf16 entries of its own
    parameter partition to this relay coordinator (`sparsecomm coordinator --relay`, e.g. tcp://HOST:5555),
    which streams whole versions to rollout workers; the model is never gathered ("": off)."""
    deepspeed_config: str = ""
    """engine=deepspeed: a DeepSpeed JSON config merged under the one built from this recipe
    (zero_stage, a micro batch of 1, no clipping; "" for none), e.g. launch/recipes/deepspeed_zero2.json."""
    mesh: str = ""
    """engine=fsdp2: RxS, R replica groups x S shards (S=1: plain replication; S must divide the processes
    per host, so shards stay inside a host); "" means WORLDx1."""

    def __post_init__(self):
        self._coerce_scalars()
        _one_of("comm", self.comm, COMMS)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("phase", self.phase, PHASES)
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("tracker_mode", self.tracker_mode, TRACKER_MODES)
        _one_of("backend", self.backend, BACKENDS)
        if not (self.device in ("auto", "cpu", "cuda") or _is_cuda_index(self.device)):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.kind_density and self.optimizer != "aspg":
            raise ValueError("kind_density sets ASPG's per-layer-kind density: it needs optimizer=aspg")
        if not all(0 < float(v) <= 1 for v in self.kind_density.values()):
            raise ValueError(f"kind_density values must be in (0, 1], got {self.kind_density}")
        if self.rank_every < 0 or self.rank_stack < 2 or self.hot_window < 0 or self.checkpoint_every < 0:
            raise ValueError("need rank_every >= 0, rank_stack >= 2, hot_window >= 0, checkpoint_every >= 0")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if any(int(k) < 2 for k in self.k_steps):
            raise ValueError(f"k_steps must be >= 2, got {self.k_steps}")
        if self.comm in ASPG_COMMS and self.optimizer != "aspg":
            raise ValueError(f"comm={self.comm!r} is ASPG's exchange: use optimizer=aspg (or comm=ddp/hook/powersgd)")
        if self.comm in DDP_COMMS and self.optimizer == "aspg":
            raise ValueError(f"comm={self.comm!r} wraps the model in DDP; ASPG does its own communication (use comm=aspg)")
        if self.comm == "coordinator" and not self.coordinator:
            raise ValueError("comm=coordinator needs coordinator=tcp://HOST:PORT")
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        _one_of("engine", self.engine, ENGINES)
        if self.rollout_relay and not (self.engine == "deepspeed" and self.zero_stage == 3):
            raise ValueError("rollout_relay publishes ZeRO-3 partitions: it needs engine=deepspeed zero_stage=3")
        if self.param_density and self.engine != "deepspeed":
            raise ValueError(f"param_density is for engine=deepspeed (ZeRO-1/2's partition all-gather), not {self.engine}")
        if self.engine == "deepspeed":
            self._check_deepspeed()
        if self.engine == "fsdp2":
            self._check_fsdp2()
        if self.sft_steps < 0 or self.rl_steps < 0 or self.prompts_per_step < 1 or self.sft_batch < 1:
            raise ValueError("steps must be >= 0 and batch sizes >= 1")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.dense_baseline_every < 0 or self.console_every < 1 or self.eval_size < 1:
            raise ValueError("need dense_baseline_every >= 0, console_every >= 1, eval_size >= 1")
        from .losses import GRPOConfig

        try:
            GRPOConfig(**self.grpo)
        except TypeError as e:  # an unknown grpo.* key
            raise ValueError(f"grpo: {e} (fields: group_size, max_new_tokens, temperature, clip_eps, beta)") from None

    def _check_deepspeed(self) -> None:
        """engine=deepspeed: the combinations sparsecomm.integrations.deepspeed supports, refused with the reason."""
        from ..integrations.deepspeed import check_version

        try:
            check_version()  # installed and in the tested range, before any process group exists
        except RuntimeError as e:
            raise ValueError(str(e)) from None
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.comm not in DEEPSPEED_COMMS:
            raise ValueError(f"engine=deepspeed supports comm {tuple(DEEPSPEED_COMMS)} (aspg: ASPG's exchange; hook: "
                             f"compressed gradient reduction; ddp: DeepSpeed's own), got comm={self.comm!r}")
        if self.comm == "aspg" and self.zero_stage != 0:
            raise ValueError(f"engine=deepspeed comm=aspg needs zero_stage=0, got {self.zero_stage}: ASPG's moments and "
                             "residual are per worker for every parameter; ZeRO >= 1 partitions optimizer state (use "
                             "comm=hook optimizer=adamw for ZeRO-1/2)")
        if self.comm == "hook" and self.zero_stage == 3:
            raise ValueError("engine=deepspeed comm=hook supports zero_stage 0, 1, 2 (ZeRO-3's reduce-scatter is not "
                             "taken over); use comm=ddp for dense ZeRO-3")
        zero12_hook = self.comm == "hook" and self.zero_stage in (1, 2)
        if self.param_density and not (zero12_hook and 0 < self.param_density <= 1):
            raise ValueError(f"param_density={self.param_density} needs comm=hook, zero_stage 1 or 2 and a value in "
                             "(0, 1]: it replaces ZeRO-1/2's all-gather of the updated partitions")
        if self.optimizer not in ("aspg", "adamw"):
            raise ValueError(f"engine=deepspeed supports optimizer aspg or adamw, got {self.optimizer!r}")
        if self.precision == "bf16" and self.optimizer != "aspg":
            raise ValueError("engine=deepspeed with precision=bf16 is supported with ASPG only (its fp32 masters); "
                             "for AdamW put bf16 in the deepspeed_config instead")
        if self.lora_rank or self.checkpoint_every or self.resume or self.kind_density:
            raise ValueError("engine=deepspeed does not support lora_rank, checkpoint_every, resume or kind_density "
                             "in the trainer yet (sparsecomm.integrations.deepspeed.save_checkpoint works on an engine)")

    def _check_fsdp2(self) -> None:
        """engine=fsdp2: what the trainer supports with FSDP2, refused with the reason (before any process group)."""
        if self.mesh and not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", self.mesh):
            raise ValueError(f"mesh must be RxS (replica groups x shards, e.g. 2x2), got {self.mesh!r}")
        if self.comm == "coordinator":
            raise ValueError("engine=fsdp2 does not run the coordinator transport (ASPG there exchanges over "
                             "mesh['replicate'] with torch.distributed: comm=aspg)")
        if self.comm not in ("hook", "ddp", "aspg"):
            raise ValueError(f"engine=fsdp2 supports comm=hook (sparse HSDP of the gradient), comm=aspg (ASPG on the "
                             f"shards, its update exchanged across replicas) or comm=ddp (native HSDP), got {self.comm!r}")
        if self.lora_rank or self.kind_density or self.checkpoint_every or self.resume or self.precision != "fp32":
            raise ValueError("engine=fsdp2 in the trainer supports fp32 full fine-tuning without trainer checkpoints "
                             "(no lora_rank, kind_density, checkpoint_every, resume, precision=bf16); checkpoints go "
                             "through torch.distributed.checkpoint and SparseFSDPState.state_dict()")

    def _coerce_scalars(self) -> None:
        """Python callers may pass numbers as strings (a YAML 1.1 loader reads 1e-5 as one): convert
        them, or say which field is wrong. Values parsed by from_args are already typed by OmegaConf."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v, kind = getattr(self, f.name), hints[f.name]
            if kind in (int, float) and isinstance(v, str):
                try:
                    setattr(self, f.name, kind(v) if kind is float else int(v))
                except ValueError:
                    raise ValueError(f"{f.name} must be a {kind.__name__}, got {v!r}") from None
            elif kind is bool and isinstance(v, str):
                if v.lower() not in ("true", "false"):
                    raise ValueError(f"{f.name} must be true or false, got {v!r}")
                setattr(self, f.name, v.lower() == "true")

    # ------------------------------------------------------------------ parsing
    @classmethod
    def load(cls, config_files: list[str] = (), overrides: list[str] = ()) -> "TrainConfig":
        """Defaults, then each YAML file, then each `key=value` override; ValueError on anything wrong."""
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        names = [f.name for f in dataclasses.fields(cls)]
        cfg = OmegaConf.structured(cls)
        for path in config_files:
            try:
                values = OmegaConf.load(path)
            except (OSError, OmegaConfBaseException, ValueError) as e:
                raise ValueError(f"cannot read --config {path}: {e}") from None
            for key in RECORD_KEYS:
                values.pop(key, None)
            cfg = _merge(cfg, values, names, where=f"in {path}")
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"expected key=value, got {item!r}")
            key, value = item.split("=", 1)
            try:
                one = OmegaConf.from_dotlist([item])
            except OmegaConfBaseException as e:
                raise ValueError(f"cannot parse {item!r}: {_first_line(e)}") from None
            # a whole mapping replaces the field's mapping; a dotted key sets one entry
            cfg = _merge(cfg, one, names, where=f"in {item!r}", replace="." not in key)
        try:
            return OmegaConf.to_object(cfg)  # runs __post_init__ (ValueError: meaning of values)
        except OmegaConfBaseException as e:  # e.g. an interpolation that does not resolve
            raise ValueError(f"config key {getattr(e, 'full_key', '')!r}: {_first_line(e)}") from None

    @classmethod
    def from_args(cls, argv: list[str]) -> "TrainConfig":
        """`--config FILE.yaml` (optional, repeatable, anywhere) and `key=value` overrides."""
        files, overrides = split_args(argv)
        return cls.load(files, overrides)


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(config files, key=value overrides) from a command line; launch/train.py's --help is argparse's."""
    files, overrides, args = [], [], list(argv)
    while args:
        a = args.pop(0)
        if a == "--config":
            if not args:
                raise ValueError("--config needs a file")
            files.append(args.pop(0))
        elif a.startswith("--config="):
            files.append(a.split("=", 1)[1])
        elif a.startswith("-"):
            raise ValueError(f"unknown option {a!r}: the options are --config FILE and key=value overrides")
        else:
            overrides.append(a)
    return files, overrides


def _merge(cfg, values, names: list[str], where: str, replace: bool = True):
    """OmegaConf.merge with errors that name the key; a top-level mapping replaces the field's."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    if not isinstance(values, DictConfig):
        raise ValueError(f"a config {where} must be a mapping of keys to values, got {type(values).__name__}")
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=3)
            raise ValueError(f"unknown config key {key!r} {where}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                             + f"; known: {sorted(names)}")
    try:
        if replace:
            for key in values:
                if OmegaConf.is_dict(cfg[key]) and OmegaConf.is_dict(values[key]):
                    cfg[key] = {}  # replaced, not merged (see the module docstring)
        return OmegaConf.merge(cfg, values)
    except ConfigKeyError as e:
        raise ValueError(f"unknown config key {e.full_key!r} {where}: {_first_line(e)}") from None
    except OmegaConfBaseException as e:
        raise ValueError(f"bad value for {e.full_key or '?'} {where}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return (getattr(e, "msg", None) or str(e)).splitlines()[0]


def _one_of(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _is_cuda_index(device: str) -> bool:
    kind, _, index = device.partition(":")
    return kind == "cuda" and index.isdigit()


def field_docs(cls=TrainConfig) -> dict[str, str]:
    """Each field's docstring (the string literal right below it), read from the class source."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (frozen app): help without docs
        return {}
    body, docs = tree.body[0].body, {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def config_help(cls=TrainConfig) -> str:
    """Every field as `name: type = default`, then its doc, indented: launch/train.py --help prints it."""
    docs, hints, lines = field_docs(cls), typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = hints[f.name].__name__ if isinstance(hints[f.name], type) else str(hints[f.name]).replace("typing.", "")
        lines.append(f"  {f.name}: {kind} = {default!r}")
        lines.extend(f"      {line}" for line in docs.get(f.name, "").splitlines())
    return "\n".join(lines)
