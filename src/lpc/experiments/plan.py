"""Will a training run fit on the GPUs, and what will it cost? Estimates from the config alone.

    lpc-plan <the overrides of src/train.py> [hardware=a100_80g_x8|h100_80g_x8|a100_40g_x8|cpu]
                       [--pairs N] [--mfu 0.4] [--headroom 0.1] [--json] [--verbose]

e.g. ``lpc-plan` model=llama3_8b algo=dpo distributed=zero3 hardware=a100_80g_x8``.
Nothing is downloaded, built or run: the model's shapes come from ``model.arch`` in conf/model/*.yaml.
A sweep (``algo=dpo,simpo``, ``seed=range(0,5)`` or an experiment's ``sweep.grid``) is planned job by job,
with totals. Exit code: 0 every job fits, 1 some job does not (the smallest change that fits is printed
as overrides to add), 2 a config error.

Per GPU it adds up (every formula and its source: docs/planning.md):

* weights + gradients + optimizer states: mixed precision (``trainer.precision=bf16|fp16``) 2 + 2 + 12
  bytes per trainable parameter (16-bit weights and gradients; AdamW's fp32 master weights and two fp32
  moments), ZeRO (Rajbhandari et al. 2020, K=12); ``precision=no``: AdamW in the weights' own dtype,
  4 + 4 + 8 for fp32. ``distributed=fsdp|zero3`` divide them by the number of GPUs, ``none|ddp`` do not.
* the frozen reference model: its weights in ``model.dtype``, replicated on every GPU (the trainer never
  shards it); none with ``trainer.reference_logps=precompute`` or for SimPO (no reference).
* fsdp/zero3: the 16-bit parameters gathered at a time (the embedding/LM-head unit and two decoder layers).
* activations of one micro-batch (``trainer.batch_size`` pairs = 2 x batch_size sequences of
  ``trainer.max_length`` tokens), Korthikanti et al. 2022: ``s b h (34 + 5 a s / h)`` bytes per layer
  without checkpointing (the ``5 a s / h`` attention-score term only for ``attn_implementation=eager``;
  SDPA/FlashAttention keep no s x s matrix); ``2 s b h`` per layer with full checkpointing plus one
  layer's full activations while it is recomputed. Scaled by 2 for fp32 activations (precision=no, fp32 model).
* ``adapter=lora|qlora``: the frozen base in ``model.dtype`` (LoRA) or 4-bit NF4 (QLoRA: ~0.52 bytes per
  parameter of the decoder's projections, the embeddings and norms in ``model.dtype``), plus 4 + 4 + 8 bytes per trainable
  parameter (the float32 adapter and latent, their gradients, AdamW's two moments); no reference copy (the base with
  the adapter off) and no sharding (one process or ddp).
* the logits of the scored tokens (at most s per sequence): 8 bytes per (token, vocabulary entry), the
  fp32 logits plus one fp32 temporary of their shape (logsumexp's x - max in the forward, their gradient
  in the backward); at evaluation (no gradient) the same for ``2 x trainer.eval_batch_size`` sequences.
  ``latent.lm_kl_weight`` > 0 keeps 16 bytes more per element for the backward: the KL to the LM without z
  saves both log-softmaxes, the probabilities and their difference (:data:`LM_KL_BYTES`, counted from the
  tensors autograd saves in tests/experiments/test_plan.py).

The verdict compares the larger of the training and evaluation peaks with ``hardware.gpu_memory_gb``
GiB less a headroom (default 10%) for the CUDA context, allocator fragmentation and temporaries.
Compute: FLOPs = 6 N T for the policy (Kaplan et al. 2020) + 2 N T for the reference forward when it runs
on the fly (+ 2 N per token of the training set once, cached, when it is precomputed); T = pairs seen x 2
x max_length, an upper bound (padding counted); GPU-hours = FLOPs / (peak x MFU).

These are estimates, not measurements. Python API: :func:`plan` (one job) and :func:`format_plan`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lpc.adapters import ADAPTERS, ALL_LINEAR, PROJECTIONS, QUANTIZABLE_LOADERS, target_modules
from lpc.conf import CONF_DIR
from lpc.errors import ConfigError, PlanError, Unplannable
from lpc.training.distributed import ACCELERATE_CONFIGS, gradient_accumulation

GiB = 2**30
DEFAULT_PAIRS = 61_135  # HuggingFaceH4/ultrafeedback_binarized, split train_prefs
DEFAULT_MFU = 0.4
DEFAULT_HEADROOM = 0.10  # of the GPU's memory, for the CUDA context, fragmentation and temporaries
DEFAULT_HARDWARE = "a100_80g_x8"
MAX_NODES = 64  # the largest job the suggestion search considers (hardware.nodes)
MAX_GPUS_PER_NODE = 8  # the most GPUs per node the suggestion search considers (hardware.gpus_per_node)
SHARDED = ("fsdp", "zero3")
DISTRIBUTED = ("none", "ddp", "fsdp", "zero3", "auto")  # auto: the planner picks (choose_distributed)
GB = 10**9  # disk sizes are in GB, as df and vendors count them (memory is in GiB)
PRECISIONS = ("no", "bf16", "fp16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}  # auto: hub checkpoints are 16-bit
OFFLOAD_OVERRIDE = "distributed.accelerate_config=<a copy of zero3.yaml with offload_optimizer_device: cpu>"


def find_conf_dir() -> Path:
    """The Hydra config tree (package data: ``lpc.conf``)."""
    return Path(CONF_DIR)


def load_hardware(name: str, conf_dir: str | Path | None = None) -> dict:
    """A hardware config (conf/hardware/NAME.yaml) as a dict, for :func:`plan` on a config composed
    without the hardware group."""
    path = Path(conf_dir or find_conf_dir()) / "hardware" / f"{name}.yaml"
    if not path.is_file():
        options = sorted(q.stem for q in path.parent.glob("*.yaml"))
        raise PlanError(f"hardware={name!r} is not allowed: one of {', '.join(options)}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


# --------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class Arch:
    """A Llama/Mistral-style decoder: no biases, SwiGLU MLP, RMSNorm, grouped-query attention."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def layer_parameters(self) -> int:
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attention = h * h + 2 * h * kv + h * h  # q, k, v, o projections
        mlp = 3 * h * self.intermediate_size  # gate, up, down
        return attention + mlp + 2 * h  # + input and post-attention RMSNorm weights

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_parameters(self) -> int:
        head = 0 if self.tie_word_embeddings else self.embedding_parameters
        return (
            self.embedding_parameters + self.num_hidden_layers * self.layer_parameters + self.hidden_size + head
        )  # final RMSNorm, untied lm_head


ARCH_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


def _int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"{key}={value!r} is not allowed: a positive integer")
    return value


def arch_of(model_cfg: Mapping) -> tuple[Arch, int | None]:
    """The model's architecture from ``model.arch`` (or, lacking one, from top-level size keys as the
    tiny model has them), and the parameter count the config states (None: not stated)."""
    name = model_cfg.get("name", "?")
    node = model_cfg.get("arch")
    if node is None:
        if not all(k in model_cfg for k in ARCH_KEYS):
            raise Unplannable(
                f"model={name} has no `model.arch` node (hidden_size, num_hidden_layers, ...; "
                f"see conf/model/llama3_8b.yaml), so it cannot be planned without loading it"
            )
        node = {**{k: model_cfg[k] for k in ARCH_KEYS}, "tie_word_embeddings": False}
    values = {k: _int(node.get(k), f"model.arch.{k}") for k in ARCH_KEYS}
    if isinstance(model_cfg.get("vocab_size"), int):  # the tiny loader's tokenizer has at most this many tokens
        values["vocab_size"] = min(values["vocab_size"], model_cfg["vocab_size"])
    arch = Arch(**values, tie_word_embeddings=bool(node.get("tie_word_embeddings", False)))
    if arch.hidden_size % arch.num_attention_heads or arch.num_attention_heads % arch.num_key_value_heads:
        raise PlanError(
            f"model={name}: hidden_size {arch.hidden_size}, {arch.num_attention_heads} heads and "
            f"{arch.num_key_value_heads} KV heads do not divide"
        )
    stated = node.get("num_parameters")
    if stated is not None and stated != arch.num_parameters:
        raise PlanError(
            f"model={name}: model.arch.num_parameters={stated:,} but its shapes give "
            f"{arch.num_parameters:,} (embeddings + layers x (q,k,v,o, gate,up,down, 2 norms) "
            f"+ final norm + untied lm_head)"
        )
    return arch, stated


LM_KL_BYTES = 16  # per scored (token, vocabulary) element kept for the backward by latent.lm_kl_weight's KL


def latent_parameters(latent_cfg: Mapping, hidden_size: int) -> int:
    """Trainable parameters of the LPC latent module (lpc.latent): 0 for latent=none."""
    target = str(latent_cfg.get("_target_") or "")
    if not target:
        return 0
    hh = latent_cfg.get("head_hidden_size") or hidden_size
    inputs = {"concat": 2, "diff": 1, "concat_diff": 3}.get(latent_cfg.get("posterior_input", "concat"))
    if inputs is None:
        raise PlanError(
            f"latent.posterior_input={latent_cfg.get('posterior_input')!r} is not allowed: concat, diff or concat_diff"
        )

    def mlp(d_in: int, d_out: int) -> int:  # Linear(d_in, hh) + GELU + Linear(hh, d_out), with biases
        return d_in * hh + hh + hh * d_out + d_out

    gate = 0 if latent_cfg.get("gate_init", 0.0) is None else 1  # the learned scalar gain on z (latent.gate_init)
    if target.endswith("DiscreteLatent"):
        k = _int(latent_cfg.get("codebook_size"), "latent.codebook_size")
        return k * hidden_size + mlp(hidden_size, k) + mlp(inputs * hidden_size, k) + gate
    if target.endswith("ContinuousLatent"):
        return mlp(hidden_size, 2 * hidden_size) + mlp(inputs * hidden_size, 2 * hidden_size) + gate
    raise PlanError(f"latent._target_={target!r}: unknown latent module (DiscreteLatent or ContinuousLatent)")


def adapter_parameters(arch: Arch, r: int, targets) -> int:
    """Trainable parameters of a LoRA adapter of rank ``r`` on the named projections of every decoder layer:
    ``r (d_in + d_out)`` per projection (peft's lora_A and lora_B, no bias)."""
    h, kv, i = arch.hidden_size, arch.num_key_value_heads * arch.head_dim, arch.intermediate_size
    return arch.num_hidden_layers * sum(r * sum(PROJECTIONS[t](h, kv, i)) for t in targets)


def adapter_inputs(arch: Arch, targets) -> int:
    """The summed input widths of the adapted projections of one layer (their adapters' activations scale with it)."""
    h, kv, i = arch.hidden_size, arch.num_key_value_heads * arch.head_dim, arch.intermediate_size
    return sum(PROJECTIONS[t](h, kv, i)[0] for t in targets)


# bitsandbytes NF4 with double quantisation: 4 bits per weight, an 8-bit absmax per block of 64, and an fp32
# constant per 256 blocks (Dettmers et al. 2023, "QLoRA", section 3); 4 bits + a 32-bit absmax per 64 without it.
QLORA_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}


# --------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """One job's estimate. Memory in bytes per GPU (the ``*_gib`` helpers give GiB); compute per run."""

    # what runs where
    model: str
    algo: str
    latent: str
    distributed: str
    precision: str
    model_dtype: str
    hardware: str
    gpu_memory_gb: float
    gpus_per_node: int
    nodes: int
    world: int  # processes = GPUs used (1 for distributed=none)
    n_params: int  # the language model
    n_latent_params: int
    seq_len: int
    batch_pairs: int  # per process per micro-batch
    eval_batch_pairs: int
    gradient_checkpointing: bool
    reference: str  # on_the_fly | precompute | none (SimPO)
    attention_scores_stored: bool  # attn_implementation=eager
    offload_optimizer: bool
    # memory per GPU (bytes)
    weights: float
    gradients: float
    optimizer: float
    reference_weights: float
    gathered: float
    activations_checkpointing: float
    activations_no_checkpointing: float
    logits: float
    eval_logits: float
    host_offload_per_node: float
    train_peak: float
    eval_peak: float
    peak: float
    headroom: float
    budget: float
    fits: bool
    # compute per run
    pairs: int  # training pairs in the data set
    pairs_source: str  # where that number comes from
    global_batch: int
    steps: int
    pairs_seen: int
    tokens: int
    flops_policy: float
    flops_reference: float  # on the fly
    flops_precompute: float  # once per (model, data, length, precision): cached, shared by a sweep
    mfu: float
    peak_tflops: float
    gpu_hours: float
    wall_hours: float
    # disk in the run directory (bytes; lpc.preflight checks them against the free space at start)
    checkpoint_bytes: float  # one checkpoints/step-N/ (accelerate state: weights + AdamW's moments)
    final_bytes: float  # final/ (the exported weights)
    checkpoint_bytes_per_param: int
    final_bytes_per_param: int
    keep_checkpoints: int
    checkpoints_written: int  # over the run: every trainer.save_every steps and the last step
    checkpoints_on_disk: int  # at most at once: keep_checkpoints + the one being written
    disk_peak: float  # the most the run directory holds at once: checkpoints + final/
    bytes_per_param: list[int] = field(default_factory=list)  # weights, gradients, optimizer states
    adapter: str = "none"  # none | lora | qlora
    n_adapter_params: int = 0  # the LoRA adapter's trainable parameters
    frozen_weights: float = 0.0  # bytes of the frozen base (adapter runs)
    merged_bytes: float = 0.0  # final/merged/ (adapter.merged_export)
    # per scored (token, vocabulary) element in training: 8, + LM_KL_BYTES with latent.lm_kl_weight
    logits_bytes: int = 8
    overrides: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    suggestion: str | None = None  # the overrides to add so that it fits (None: fits, or nothing found)
    suggested: Plan | None = None  # the plan with the suggestion applied
    # on the GPUs the job has (no more GPUs or nodes), where that differs from the suggestion: adapter=lora, ...
    alternative: str | None = None
    alternative_plan: Plan | None = None

    @property
    def n_trainable(self) -> int:
        if self.adapter != "none":  # the base is frozen
            return self.n_adapter_params + self.n_latent_params
        return self.n_params + self.n_latent_params

    @property
    def activations(self) -> float:
        return self.activations_checkpointing if self.gradient_checkpointing else self.activations_no_checkpointing

    @property
    def states(self) -> float:
        """Weights + gradients + optimizer states on one GPU (the ZeRO formula)."""
        return self.weights + self.gradients + self.optimizer

    @property
    def flops(self) -> float:
        return self.flops_policy + self.flops_reference + self.flops_precompute

    @property
    def precompute_key(self) -> tuple | None:
        if self.reference != "precompute":
            return None
        return (self.model, self.pairs, self.seq_len, self.precision, self.model_dtype)

    def gib(self, name: str) -> float:
        return getattr(self, name) / GiB

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("suggested")
        out.pop("alternative_plan")
        out["suggested"] = self.suggested.to_dict() if self.suggested else None
        out["alternative_plan"] = self.alternative_plan.to_dict() if self.alternative_plan else None
        out.update(n_trainable=self.n_trainable, activations=self.activations, states=self.states, flops=self.flops)
        return out


@dataclass
class _Setup:
    """The inputs of one estimate, normalised (what the suggestion search changes)."""

    model: str
    algo: str
    latent: str
    arch: Arch
    n_latent: int
    lm_kl: bool  # latent.lm_kl_weight > 0: the KL to the LM without z keeps more of the logits' size
    dtype: str
    precision: str
    distributed: str
    gpus_per_node: int
    nodes: int
    gpu_memory_gb: float
    hardware: str
    peak_tflops_bf16: float
    peak_tflops_fp32: float
    seq_len: int
    batch_pairs: int
    eval_batch_pairs: int
    accumulation: int | None  # trainer.gradient_accumulation_steps (None: derived from the global batch)
    global_batch_size: int | None  # trainer.global_batch_size
    max_steps: int
    epochs: int
    gradient_checkpointing: bool
    needs_reference: bool
    reference_on_the_fly: bool
    attention_scores_stored: bool
    offload_optimizer: bool
    pairs: int
    pairs_source: str
    mfu: float
    headroom: float
    overrides: list[str]
    keep_checkpoints: int = 2
    save_every: int = 0
    auto_note: str | None = None  # distributed=auto: what the planner chose, and why
    adapter: str = "none"  # none | lora | qlora
    adapter_r: int = 0
    adapter_targets: tuple[str, ...] = ()
    adapter_dropout: float = 0.0
    double_quant: bool = True  # qlora
    merged_export: bool = False
    on_cpu: bool = False  # hardware.device: cpu (QLoRA is refused there)
    quantizable: bool = False  # the model's loader goes through from_pretrained (QLoRA can load it in 4 bits)

    @property
    def n_adapter(self) -> int:
        return adapter_parameters(self.arch, self.adapter_r, self.adapter_targets) if self.adapter != "none" else 0

    @property
    def world(self) -> int:
        return 1 if self.distributed == "none" else self.gpus_per_node * self.nodes

    @property
    def grad_accum(self) -> int:
        """As the trainer derives it (lpc.training.distributed.gradient_accumulation) on this world size."""
        trainer = {"batch_size": self.batch_pairs, "gradient_accumulation_steps": self.accumulation}
        trainer["global_batch_size"] = self.global_batch_size
        try:
            return gradient_accumulation(OmegaConf.create(trainer), self.world)
        except ConfigError as err:
            raise PlanError(str(err)) from None


def _number(value, key: str, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
        raise PlanError(f"{key}={value!r} is not allowed: a number > {low:g}")
    return float(value)


def _accelerate_offload(name: str | None) -> bool:
    """Whether the accelerate config ``distributed.accelerate_config`` offloads DeepSpeed's optimizer to CPU.
    ``name`` is a file or a name in the package's training/accelerate/."""
    if not name:
        return False
    candidates = [Path(name), Path(f"{name}.yaml"), ACCELERATE_CONFIGS / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            ds = OmegaConf.to_container(OmegaConf.load(path), resolve=True).get("deepspeed_config") or {}
            return str(ds.get("offload_optimizer_device", "none")).lower() in ("cpu", "nvme")
    return False


def _setup(
    cfg: DictConfig, hardware: Mapping, pairs: int | None, mfu: float, headroom: float, overrides: list[str]
) -> _Setup:
    try:
        model, trainer, algo = cfg.model, cfg.trainer, cfg.algo
        latent = cfg.get("latent") or {}
        distributed = cfg.distributed.name
    except Exception as err:  # noqa: BLE001 - a missing node/key or an interpolation that does not resolve
        raise PlanError(f"the config lacks what a plan needs: {err}") from err
    if distributed not in DISTRIBUTED:
        raise PlanError(f"distributed.name={distributed!r} is not allowed: one of {', '.join(DISTRIBUTED)}")
    if trainer.precision not in PRECISIONS:
        raise PlanError(f"trainer.precision={trainer.precision!r} is not allowed: one of {', '.join(PRECISIONS)}")
    dtype = str(model.get("dtype", "float32"))
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"model.dtype={dtype!r} is not allowed: one of {', '.join(DTYPE_BYTES)}")
    arch, _ = arch_of(model)
    ref_mode = trainer.get("reference_logps", "on_the_fly")
    if ref_mode not in ("precompute", "on_the_fly"):
        raise PlanError(f"trainer.reference_logps={ref_mode!r} is not allowed: precompute or on_the_fly")
    needs_reference = algo.get("name") != "simpo"  # SimPO is reference-free (lpc.losses.SimPO.needs_reference)
    pairs_source = "--pairs"
    if pairs is None:
        data = cfg.get("data") or {}
        if isinstance(data.get("n_train"), int):  # the synthetic data states its size
            pairs, pairs_source = data.get("n_train"), "data.n_train"
        else:
            pairs, pairs_source = DEFAULT_PAIRS, "default: UltraFeedback binarized train_prefs; --pairs N"
        if isinstance(data.get("max_rows"), int) and data.get("max_rows") < pairs:
            pairs, pairs_source = data.get("max_rows"), "data.max_rows"
    for key in ("name", "gpus_per_node", "gpu_memory_gb", "nodes", "peak_tflops_bf16"):
        if key not in hardware:
            raise PlanError(f"hardware.{key} is missing (conf/hardware/*.yaml)")
    peak_bf16 = _number(hardware["peak_tflops_bf16"], "hardware.peak_tflops_bf16")
    adapter = _adapter_fields(cfg.get("adapter") or {"name": "none"})
    if adapter["adapter"] != "none" and distributed in SHARDED:
        raise PlanError(
            f"adapter={adapter['adapter']} is not allowed with distributed={distributed}: an adapter trains on one "
            "process or under ddp (distributed=none, ddp or auto)"
        )
    return _Setup(
        **adapter,
        on_cpu=str(hardware.get("device", "cuda")).lower() == "cpu",
        quantizable=str(model.get("_target_", "")) in QUANTIZABLE_LOADERS,
        model=str(model.get("name", "?")),
        algo=str(algo.get("name", "?")),
        latent=str(latent.get("name", "none")),
        arch=arch,
        n_latent=latent_parameters(latent, arch.hidden_size),
        lm_kl=latent.get("name", "none") != "none" and float(latent.get("lm_kl_weight") or 0.0) > 0,
        dtype=dtype,
        precision=trainer.precision,
        distributed=distributed,
        gpus_per_node=_int(hardware["gpus_per_node"], "hardware.gpus_per_node"),
        nodes=_int(hardware["nodes"], "hardware.nodes"),
        gpu_memory_gb=_number(hardware["gpu_memory_gb"], "hardware.gpu_memory_gb"),
        hardware=str(hardware["name"]),
        peak_tflops_bf16=peak_bf16,
        peak_tflops_fp32=_number(hardware.get("peak_tflops_fp32", peak_bf16), "hardware.peak_tflops_fp32"),
        seq_len=_int(trainer.max_length, "trainer.max_length"),
        batch_pairs=_int(trainer.batch_size, "trainer.batch_size"),
        eval_batch_pairs=_int(trainer.get("eval_batch_size", trainer.batch_size), "trainer.eval_batch_size"),
        accumulation=trainer.get("gradient_accumulation_steps", 1),
        global_batch_size=trainer.get("global_batch_size"),
        max_steps=int(trainer.get("max_steps", -1)),
        epochs=int(trainer.get("epochs", 1)),
        gradient_checkpointing=bool(trainer.get("gradient_checkpointing", False)),
        needs_reference=needs_reference,
        reference_on_the_fly=needs_reference and ref_mode == "on_the_fly",
        attention_scores_stored=model.get("attn_implementation") == "eager",
        offload_optimizer=distributed == "zero3" and _accelerate_offload(cfg.distributed.get("accelerate_config")),
        pairs=_int(pairs, "--pairs"),
        pairs_source=pairs_source,
        mfu=_number(mfu, "--mfu"),
        headroom=float(headroom),
        overrides=list(overrides),
        keep_checkpoints=max(int(trainer.get("keep_checkpoints", 2)), 1),
        save_every=max(int(trainer.get("save_every", 0)), 0),
    )


def _adapter_fields(node: Mapping) -> dict:
    """The ``_Setup`` fields of an ``adapter`` node (conf/adapter/*.yaml); a PlanError names a bad value."""
    name = str(node.get("name", "none"))
    if name not in ADAPTERS:
        raise PlanError(f"adapter.name={name!r} is not allowed: one of {', '.join(ADAPTERS)}")
    if name == "none":
        return {"adapter": "none"}
    targets = node.get("target_modules")
    if not (targets == ALL_LINEAR or (targets and not isinstance(targets, str) and set(targets) <= set(PROJECTIONS))):
        raise PlanError(
            f"adapter.target_modules={targets!r} is not allowed: {ALL_LINEAR}, or a list of {', '.join(PROJECTIONS)}"
        )
    dropout = node.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise PlanError(f"adapter.dropout={dropout!r} is not allowed: a number in [0, 1)")
    return {
        "adapter": name,
        "adapter_r": _int(node.get("r"), "adapter.r"),
        "adapter_targets": tuple(target_modules(node)),
        "adapter_dropout": float(dropout),
        "double_quant": bool(node.get("double_quant", True)),
        "merged_export": bool(node.get("merged_export", False)),
    }


def default_adapter(name: str, conf_dir: str | Path | None = None) -> dict:
    """conf/adapter/NAME.yaml as a plain dict (qlora's on top of lora's, as its defaults list composes it)."""
    root = Path(conf_dir or find_conf_dir()) / "adapter"
    node = OmegaConf.to_container(OmegaConf.load(root / "lora.yaml"), resolve=True)
    if name != "lora":
        own = OmegaConf.to_container(OmegaConf.load(root / f"{name}.yaml"), resolve=True)
        own.pop("defaults", None)
        node.update(own)
    return node


def _frozen_base_bytes(s: _Setup) -> float:
    """An adapter run's frozen base: LoRA's in ``model.dtype``; QLoRA's decoder projections in 4 bits (NF4), its
    embeddings, LM head and norms in ``model.dtype`` (bitsandbytes quantises the decoder's Linear layers only)."""
    a = s.arch
    if s.adapter == "lora":
        return DTYPE_BYTES[s.dtype] * a.num_parameters
    linear = a.num_hidden_layers * (a.layer_parameters - 2 * a.hidden_size)
    return QLORA_BYTES[s.double_quant] * linear + DTYPE_BYTES[s.dtype] * (a.num_parameters - linear)


def _memory(s: _Setup) -> dict:
    """Bytes per GPU of one training step and one eval step: the ``Plan``'s memory fields."""
    a, world = s.arch, s.world
    mixed = s.precision in ("bf16", "fp16")
    dtype_bytes = DTYPE_BYTES[s.dtype]
    # bytes per trainable parameter: weights, gradients, optimizer states
    if mixed and s.distributed in SHARDED:
        w, g, o = 2, 2, 12  # 16-bit copies; fp32 master + m + v (ZeRO, K=12)
    elif mixed:  # autocast over fp32 weights (lpc.run.master_weights loads 16-bit models in fp32)
        w, g, o = 4, 4, 8
    else:
        w, g, o = dtype_bytes, dtype_bytes, 2 * dtype_bytes  # plain AdamW in the weights' dtype
    compute_bytes = 2 if mixed else dtype_bytes
    n = a.num_parameters
    per_gpu = (n + s.n_latent) / (world if s.distributed in SHARDED else 1)
    m = {"weights": w * per_gpu, "gradients": g * per_gpu, "optimizer": o * per_gpu, "host_offload_per_node": 0.0}
    m["frozen_weights"] = 0.0
    if s.adapter != "none":  # the frozen base + the float32 adapter and latent with their gradients and moments
        w, g, o = 4, 4, 8
        trainable = s.n_adapter + s.n_latent
        m["frozen_weights"] = _frozen_base_bytes(s)
        m.update(weights=m["frozen_weights"] + w * trainable, gradients=g * trainable, optimizer=o * trainable)
        if s.adapter == "qlora":
            compute_bytes = 2
    if s.offload_optimizer:  # fp32 states + fp32 grads of every GPU of a node, in its host RAM
        m.update(optimizer=0.0, host_offload_per_node=(o + 4) * per_gpu * min(s.gpus_per_node, world))
    ref_bytes = w if mixed and s.distributed not in SHARDED else dtype_bytes  # a copy of the loaded policy
    on_the_fly = s.reference_on_the_fly and s.adapter == "none"  # an adapter's reference is its base: no copy
    m["reference_weights"] = ref_bytes * n if on_the_fly else 0.0  # replicated, never sharded
    m["gathered"] = 0.0
    if s.distributed in SHARDED:  # the embedding/head unit and the current + prefetched decoder layer
        units = (2 - a.tie_word_embeddings) * a.embedding_parameters + 2 * a.layer_parameters
        m["gathered"] = compute_bytes * units
    # activations of one micro-batch: 2 x batch_size sequences of seq_len tokens (Korthikanti et al. 2022)
    sq, b, h, L = s.seq_len, 2 * s.batch_pairs, a.hidden_size, a.num_hidden_layers
    scale = compute_bytes / 2
    scores = 5 * a.num_attention_heads * sq / h if s.attention_scores_stored else 0.0
    per_layer = sq * b * h * (34 + scores) * scale
    if s.adapter != "none":
        # each adapted projection's input again, as its adapter's matmul keeps it (a 16-bit copy under autocast or
        # after dropout) plus dropout's 1-byte mask, and the rank-r output lora_B keeps
        per_element = (compute_bytes if mixed or s.adapter_dropout > 0 else 0) + (1 if s.adapter_dropout > 0 else 0)
        inputs = adapter_inputs(a, s.adapter_targets)
        per_layer += sq * b * (inputs * per_element + len(s.adapter_targets) * s.adapter_r * compute_bytes)
    m["activations_no_checkpointing"] = L * per_layer
    m["activations_checkpointing"] = L * 2 * sq * b * h * scale + per_layer
    # the scored tokens' logits (at most sq per sequence): fp32 + one fp32 temporary of the same shape, and what
    # latent.lm_kl_weight's KL keeps for the backward
    m["logits_bytes"] = 8 + LM_KL_BYTES * s.lm_kl
    m["logits"] = m["logits_bytes"] * sq * b * a.vocab_size
    m["eval_logits"] = 8 * sq * 2 * s.eval_batch_pairs * a.vocab_size
    static = sum(m[k] for k in ("weights", "gradients", "optimizer", "reference_weights", "gathered"))
    act = m["activations_checkpointing" if s.gradient_checkpointing else "activations_no_checkpointing"]
    m["train_peak"] = static + act + m["logits"]
    # the trainer frees the gradients after each step (zero_grad(set_to_none=True)); DeepSpeed's ZeRO-3
    # keeps its gradient partitions allocated
    m["eval_peak"] = static - (0 if s.distributed == "zero3" else m["gradients"]) + m["eval_logits"]
    m["peak"] = max(m["train_peak"], m["eval_peak"])
    m["budget"] = s.gpu_memory_gb * GiB * (1 - s.headroom)
    m["fits"] = m["peak"] <= m["budget"]
    m["_bytes_per_param"] = w, g, o  # for the text only
    return m


def _compute(s: _Setup) -> dict:
    """Steps, tokens, FLOPs and GPU-hours of the run, with the trainer's step arithmetic (lpc.training.trainer)."""
    n, world = s.arch.num_parameters, s.world
    global_batch = s.batch_pairs * s.grad_accum * world
    steps_per_epoch = s.pairs // global_batch
    if steps_per_epoch < 1:
        raise PlanError(
            f"{s.pairs} training pairs are fewer than one global batch ({global_batch} = "
            f"batch_size x gradient_accumulation_steps x {world} processes): the trainer refuses"
        )
    if s.max_steps <= 0 and s.epochs <= 0:
        raise PlanError("trainer.max_steps or trainer.epochs must be > 0")
    steps = s.max_steps if s.max_steps > 0 else s.epochs * steps_per_epoch
    tokens = steps * global_batch * 2 * s.seq_len
    c = {"global_batch": global_batch, "steps": steps, "pairs_seen": steps * global_batch, "tokens": tokens}
    c["flops_policy"] = 6.0 * (n + s.n_latent) * tokens
    if s.adapter != "none":  # the frozen base: forward and the input gradients, no weight gradients
        c["flops_policy"] = (4.0 * n + 6.0 * (s.n_adapter + s.n_latent)) * tokens
    c["flops_reference"] = 2.0 * n * tokens if s.reference_on_the_fly else 0.0
    once = s.needs_reference and not s.reference_on_the_fly
    c["flops_precompute"] = 2.0 * n * s.pairs * 2 * s.seq_len if once else 0.0
    sixteen_bit = s.precision in ("bf16", "fp16") or DTYPE_BYTES[s.dtype] == 2
    c["peak_tflops"] = s.peak_tflops_bf16 if sixteen_bit else s.peak_tflops_fp32
    flops = c["flops_policy"] + c["flops_reference"] + c["flops_precompute"]
    c["gpu_hours"] = flops / (c["peak_tflops"] * 1e12 * s.mfu) / 3600
    c["wall_hours"] = c["gpu_hours"] / world
    return c


def _disk(s: _Setup, steps: int) -> dict:
    """Bytes the run directory holds: a checkpoint (accelerate's state: the weights and AdamW's two moments in the
    dtype the weights train in; under ZeRO-3 DeepSpeed's fp32 master weights and moments, its partitioned 16-bit
    weights are not saved), final/ (the exported weights: 16-bit under ZeRO-3 with mixed precision), and the most
    at once. The trainer writes a new checkpoint before it deletes the oldest of the ``keep_checkpoints`` it keeps,
    then writes final/ after the last one. Tokenizer, RNG and config files (KB to MB) are not counted."""
    n = s.arch.num_parameters + s.n_latent
    mixed = s.precision in ("bf16", "fp16")
    weight = 4 if mixed else DTYPE_BYTES[s.dtype]  # fp32 masters under mixed precision (master_weights, FSDP, ZeRO)
    per_checkpoint = 3 * weight  # weights + AdamW's two moments
    per_final = 2 if mixed and s.distributed == "zero3" else weight  # DeepSpeed's consolidated 16-bit weights
    written = (steps - 1) // s.save_every + 1 if s.save_every > 0 else 1  # the last step always saves
    on_disk = min(written, s.keep_checkpoints + 1)
    checkpoint, final = per_checkpoint * n, per_final * n
    merged = 0.0
    if s.adapter != "none":  # the float32 adapter and latent (+ AdamW's moments); the frozen base is not saved
        per_checkpoint, per_final = 12, 4
        trainable = s.n_adapter + s.n_latent
        checkpoint, final = per_checkpoint * trainable, per_final * trainable
        if s.merged_export:  # final/merged/: the base (reloaded in model.dtype, unquantised) with the adapter in it
            merged = DTYPE_BYTES[s.dtype] * s.arch.num_parameters + 4 * s.n_latent
            final += merged
    return {
        "checkpoint_bytes": checkpoint,
        "final_bytes": final,
        "checkpoint_bytes_per_param": per_checkpoint,
        "final_bytes_per_param": per_final,
        "keep_checkpoints": s.keep_checkpoints,
        "checkpoints_written": written,
        "checkpoints_on_disk": on_disk,
        "disk_peak": max(on_disk * checkpoint, min(written, s.keep_checkpoints) * checkpoint + final),
        "merged_bytes": merged,
    }


def _notes(s: _Setup, memory: dict) -> list[str]:
    notes = []
    if s.auto_note:
        notes.append(s.auto_note)
    if s.distributed == "none" and s.gpus_per_node * s.nodes > 1:
        notes.append(
            f"distributed=none runs one process on one GPU; the other {s.gpus_per_node * s.nodes - 1} "
            f"GPUs of {s.hardware} stay idle"
        )
    if s.reference_on_the_fly and s.distributed in SHARDED:
        notes.append(
            "the on-the-fly reference model is replicated, not sharded, on every GPU "
            "(trainer.reference_logps=precompute removes it)"
        )
    if (
        DTYPE_BYTES[s.dtype] == 2
        and s.distributed in ("none", "ddp")
        and s.precision in ("bf16", "fp16")
        and s.adapter == "none"
    ):
        notes.append(
            f"model.dtype={s.dtype} with distributed={s.distributed}: the trainer loads the weights in float32 "
            "(fp32 master weights for mixed precision, lpc.run.master_weights), as counted here"
        )
    if s.adapter != "none":
        base = "4-bit NF4 (bitsandbytes)" if s.adapter == "qlora" else s.dtype
        notes.append(
            f"adapter={s.adapter}: the frozen base in {base}, no fp32 master copy (it does not train); the adapter "
            f"(r={s.adapter_r}, {len(s.adapter_targets)} projections per layer) and the latent train in float32; "
            "the reference is the base with the adapter off (no second copy)"
        )
    if s.adapter == "qlora" and s.on_cpu:
        notes.append("adapter=qlora needs a CUDA GPU and bitsandbytes: lpc-train refuses it on this CPU hardware")
    if s.adapter == "qlora" and not s.quantizable:
        notes.append(
            f"adapter=qlora: model={s.model} is built from a config, not loaded in 4 bits: lpc-train refuses it"
        )
    if s.offload_optimizer:
        notes.append(
            f"optimizer states offloaded to CPU: {memory['host_offload_per_node'] / GiB:.1f} GiB of host RAM per node"
        )
    return notes


# Plan fields copied from the setup as they are (the others are computed, or renamed below).
_COPIED = (
    "model algo latent distributed precision hardware gpu_memory_gb gpus_per_node nodes world seq_len batch_pairs "
    "eval_batch_pairs gradient_checkpointing attention_scores_stored offload_optimizer headroom pairs pairs_source mfu "
    "adapter"
).split()


def _estimate(s: _Setup) -> Plan:
    if not 0 < s.mfu <= 1:
        raise PlanError(f"--mfu {s.mfu} is not allowed: a fraction in (0, 1]")
    if not 0 <= s.headroom < 1:
        raise PlanError(f"--headroom {s.headroom} is not allowed: a fraction in [0, 1)")
    memory, compute = _memory(s), _compute(s)
    disk = _disk(s, compute["steps"])
    notes = _notes(s, memory)
    bytes_per_param = memory.pop("_bytes_per_param")
    reference = "on_the_fly" if s.reference_on_the_fly else ("precompute" if s.needs_reference else "none")
    return Plan(
        **{k: getattr(s, k) for k in _COPIED},
        model_dtype=s.dtype,
        n_params=s.arch.num_parameters,
        n_latent_params=s.n_latent,
        n_adapter_params=s.n_adapter,
        reference=reference,
        **memory,
        **compute,
        **disk,
        bytes_per_param=list(bytes_per_param),
        overrides=list(s.overrides),
        notes=notes,
    )


# --------------------------------------------------------------------------- what would fit
# Tried in this order; a combination of fewer changes always wins over one of more. Within a change that has
# a size (GPUs, nodes, micro-batch) the smallest one that fits wins. "adapter" (adapter=lora, then adapter=qlora on
# GPUs) comes last: it changes what trains (an adapter, not the whole model), so it is the suggestion only where
# nothing else fits; the plan's ``alternative`` gives it where the suggestion needs more GPUs than the job has.
STEPS = ("precompute", "checkpointing", "zero3", "gpus", "nodes", "micro_batch", "offload", "adapter")
# The order in which a combination's changes are applied: a change of size is searched on top of the others
# (more GPUs or nodes shrink only sharded states, so ZeRO-3 and the offload come first).
ON_THE_GPUS_GIVEN = ("precompute", "checkpointing", "micro_batch", "adapter")  # what the alternative may change
APPLY_ORDER = ("precompute", "checkpointing", "zero3", "offload", "adapter", "micro_batch", "gpus", "nodes")


def _halvings(n: int) -> list[int]:
    """n, n // 2, ..., 1."""
    out = [n]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def _micro_batches(s: _Setup) -> list[tuple[_Setup, list[str]]]:
    """Smaller micro-batches, for training and for evaluation, fewest halvings first (the evaluation's first: it
    changes no update). The global batch stays: derived from trainer.global_batch_size, or the accumulation
    grows by the factor the micro-batch shrank."""
    train, evaluation = _halvings(s.batch_pairs), _halvings(s.eval_batch_pairs)
    pairs = [(i, j) for i in range(len(train)) for j in range(len(evaluation)) if i or j]
    out = []
    for i, j in sorted(pairs, key=lambda ij: (ij[0] + ij[1], ij[0])):
        b, e = train[i], evaluation[j]
        cur, added = dataclasses.replace(s, batch_pairs=b, eval_batch_pairs=e), []
        if i:
            added.append(f"trainer.batch_size={b}")
            if s.global_batch_size is None:  # keep batch_size x accumulation
                per_step = s.batch_pairs * (s.accumulation or 1)
                if per_step % b:
                    continue
                cur = dataclasses.replace(cur, accumulation=per_step // b)
                added.append(f"trainer.gradient_accumulation_steps={per_step // b}")
        if j:
            added.append(f"trainer.eval_batch_size={e}")
        out.append((cur, added))
    return out


def _variants(s: _Setup, step: str) -> list[tuple[_Setup, list[str]]]:
    """``s`` with one change applied, and the overrides that make it, smallest change first; empty where the
    change does not apply."""
    if step == "precompute":
        if not s.reference_on_the_fly:
            return []
        return [(dataclasses.replace(s, reference_on_the_fly=False), ["trainer.reference_logps=precompute"])]
    if step == "checkpointing":
        if s.gradient_checkpointing:
            return []
        return [(dataclasses.replace(s, gradient_checkpointing=True), ["trainer.gradient_checkpointing=true"])]
    if step in ("zero3", "gpus", "nodes", "offload") and s.adapter != "none":
        return []  # an adapter run is not sharded (lpc.adapters.check)
    if step == "zero3":
        if s.distributed in SHARDED or s.gpus_per_node * s.nodes < 2:
            return []
        return [(dataclasses.replace(s, distributed="zero3"), ["distributed=zero3"])]
    if step == "gpus":  # more GPUs on the node: they shrink sharded states only, so ZeRO-3 comes with them
        shard = [] if s.distributed in SHARDED else ["distributed=zero3"]
        dist = s.distributed if s.distributed in SHARDED else "zero3"
        return [
            (dataclasses.replace(s, distributed=dist, gpus_per_node=g), shard + [f"hardware.gpus_per_node={g}"])
            for g in range(s.gpus_per_node + 1, MAX_GPUS_PER_NODE + 1)
        ]
    if step == "nodes":
        if s.distributed not in SHARDED:
            return []  # more GPUs only shrink sharded states
        return [(dataclasses.replace(s, nodes=k), [f"hardware.nodes={k}"]) for k in range(s.nodes + 1, MAX_NODES + 1)]
    if step == "micro_batch":
        return _micro_batches(s)
    if step == "offload":
        if s.offload_optimizer:
            return []
        extra = [] if s.distributed == "zero3" else ["distributed=zero3"]
        return [(dataclasses.replace(s, distributed="zero3", offload_optimizer=True), extra + [OFFLOAD_OVERRIDE])]
    if step == "adapter":
        if s.adapter != "none":
            return []
        out = []
        for name in ("lora", "qlora"):
            if name == "qlora" and (s.on_cpu or not s.quantizable):
                continue  # refused there (lpc.adapters.check)
            cur = dataclasses.replace(s, **_adapter_fields(default_adapter(name)))
            added = [f"adapter={name}"]
            if s.distributed in SHARDED:  # an adapter is not sharded: ddp on the same GPUs
                cur = dataclasses.replace(cur, distributed="ddp" if s.world > 1 else "none")
                added.append(f"distributed={cur.distributed}")
            out.append((cur, added))
        return out
    raise ValueError(step)


def _fits(s: _Setup) -> Plan | None:
    try:
        p = _estimate(s)
    except PlanError:  # e.g. more GPUs than one global batch has pairs for
        return None
    return p if p.fits else None


def _search(s: _Setup, steps: list[str], added: list[str]) -> tuple[str, Plan] | None:
    if not steps:
        p = _fits(s)
        return (" ".join(_last_wins(added)), p) if p is not None else None
    for cur, extra in _variants(s, steps[0]):
        found = _search(cur, steps[1:], added + extra)
        if found is not None:
            return found
    return None


def _last_wins(overrides: list[str]) -> list[str]:
    """One override per key, the last given (a later step may change what an earlier one set: adapter's ddp)."""
    keys = [o.split("=", 1)[0] for o in overrides]
    return [o for i, o in enumerate(overrides) if keys[i] not in keys[i + 1 :]]


def suggest(s: _Setup, steps: tuple[str, ...] = STEPS) -> tuple[str, Plan] | None:
    """The smallest change (fewest of ``steps``, earlier steps first; within a step, its smallest size)
    after which the job fits: ``(overrides to add, the plan with them)``, or None."""
    for size in range(1, len(steps) + 1):
        for combo in itertools.combinations(steps, size):
            found = _search(s, sorted(combo, key=APPLY_ORDER.index), [])
            if found is not None:
                return found
    return None


def choose_distributed(s: _Setup) -> _Setup:
    """``distributed=auto``: one process -> ``none``; more -> ``ddp`` where it fits (every GPU holds the whole
    model: no sharding traffic), else ``zero3`` (the verdict and the suggestion then speak of ZeRO-3)."""
    if s.distributed != "auto":
        return s
    world = s.gpus_per_node * s.nodes
    if world == 1:
        return dataclasses.replace(s, distributed="none", auto_note="distributed=auto: one process -> none")
    if s.adapter != "none":
        note = f"distributed=auto: adapter={s.adapter} is not sharded -> ddp over {world} processes"
        return dataclasses.replace(s, distributed="ddp", auto_note=note)
    ddp = dataclasses.replace(s, distributed="ddp")
    try:
        p = _estimate(ddp)
    except PlanError:
        p = None
    if p is not None and p.fits:
        return dataclasses.replace(ddp, auto_note=f"distributed=auto: ddp fits on {world} processes -> ddp")
    why = f"peak {p.peak / GiB:.1f} of {p.budget / GiB:.1f} GiB" if p is not None else "not plannable"
    return dataclasses.replace(
        s, distributed="zero3", auto_note=f"distributed=auto: ddp does not fit ({why}) -> zero3 over {world} processes"
    )


def plan(
    cfg: DictConfig,
    hardware: Mapping | None = None,
    pairs: int | None = None,
    mfu: float = DEFAULT_MFU,
    headroom: float = DEFAULT_HEADROOM,
    overrides: list[str] | None = None,
) -> Plan:
    """Estimate one job of the composed config ``cfg`` on ``hardware`` (default: ``cfg.hardware``).

    ``pairs``: training pairs in the data set (default: ``data.n_train`` for the synthetic data, else
    61,135, the UltraFeedback binarized train_prefs split). Raises :class:`PlanError` for a config error."""
    if hardware is None:
        if "hardware" not in cfg:
            raise PlanError("no hardware: pass one or compose the config with hardware=<conf/hardware option>")
        hardware = cfg.hardware
    if isinstance(hardware, DictConfig):
        hardware = OmegaConf.to_container(hardware, resolve=True)
    s = choose_distributed(_setup(cfg, hardware, pairs, mfu, headroom, overrides or []))
    p = _estimate(s)
    if not p.fits:
        found = suggest(s)
        if found is not None:
            p.suggestion, p.suggested = found
        if s.adapter == "none" and (found is None or found[1].world > p.world or found[1].nodes > p.nodes):
            # the suggestion needs more GPUs than the job has: what would fit on these, an adapter included
            alternative = suggest(s, ON_THE_GPUS_GIVEN)
            if alternative is not None:
                p.alternative, p.alternative_plan = alternative
    return p


# --------------------------------------------------------------------------- text
def _g(x: float) -> str:
    return f"{x / GiB:8.2f} GiB"


def _gb(x: float) -> str:
    return f"{x / GB:9.2f} GB" if x >= 0.1 * GB else f"{x / GB:9.4f} GB"


def _hours(x: float) -> str:
    return f"{x:,.1f}" if x >= 1 else f"{x:.3g}"


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def format_plan(p: Plan) -> str:
    """The plan as lpc-plan prints it: the job, memory per GPU, compute, disk, then the verdict."""
    lines = _job_lines(p) + _memory_lines(p) + _compute_lines(p) + _disk_lines(p)
    lines += [f"  note: {n}" for n in p.notes]
    lines += _verdict_lines(p)
    return "\n".join(line.rstrip() for line in lines)


def _gpus(p: Plan) -> str:
    return f"{p.world} GPU{'s' if p.world > 1 else ''}"


def _job_lines(p: Plan) -> list[str]:
    lat = f" + latent {p.n_latent_params:,}" if p.n_latent_params else ""
    adapter = ""
    if p.adapter != "none":
        share = p.n_trainable / (p.n_params + p.n_adapter_params + p.n_latent_params)
        adapter = f"; adapter={p.adapter}: {p.n_adapter_params:,} parameters ({share:.2%} of all, the latent's included, train)"
    return [
        f"lpc-plan: {' '.join(p.overrides) or '(defaults)'}",
        f"  model {p.model}: {p.n_params:,} parameters{lat}; algo={p.algo} latent={p.latent} "
        f"precision={p.precision} (model.dtype={p.model_dtype}) distributed={p.distributed}{adapter}",
        f"  hardware {p.hardware}: {p.nodes} x {p.gpus_per_node} GPUs of {p.gpu_memory_gb:g} GiB; this job uses {_gpus(p)}",
        f"  micro-batch {p.batch_pairs} pairs = {2 * p.batch_pairs} sequences x {p.seq_len} tokens; "
        f"gradient checkpointing {'on' if p.gradient_checkpointing else 'off'}",
    ]


def _state_lines(p: Plan) -> list[str]:
    """Weights, gradients and optimizer states: of the adapter and latent only over a frozen base, or sharded."""
    bw, bg, bo = p.bytes_per_param
    if p.adapter != "none":
        base = f"4-bit NF4 projections, the rest {p.model_dtype}" if p.adapter == "qlora" else f"{p.model_dtype}"
        return [
            f"  weights                      {_g(p.weights)}   frozen base {p.frozen_weights / GiB:.2f} GiB ({base}) "
            f"+ {bw} B/param of the adapter and latent",
            f"  gradients                    {_g(p.gradients)}   {bg} B/param of the adapter and latent",
            f"  optimizer states (AdamW)     {_g(p.optimizer)}   {bo} B/param (2 fp32 moments) of the adapter and latent",
        ]
    shard = f" / {p.world} GPUs" if p.distributed in SHARDED else ""
    moments = " (fp32 master + 2 moments)" if bo == 12 else " (2 moments)"
    return [
        f"  weights                      {_g(p.weights)}   {bw} B/param{shard}",
        f"  gradients                    {_g(p.gradients)}   {bg} B/param{shard}",
        f"  optimizer states (AdamW)     {_g(p.optimizer)}   "
        + ("offloaded to CPU" if p.offload_optimizer else f"{bo} B/param{moments}{shard}"),
    ]


def _memory_lines(p: Plan) -> list[str]:
    ref = {
        "on_the_fly": "the base with the adapter off (no copy)"
        if p.adapter != "none"
        else f"on the fly ({p.model_dtype}, replicated)",
        "precompute": "precomputed log-probs",
        "none": f"none ({p.algo})",
    }[p.reference]
    lines = ["Memory per GPU (estimate):", *_state_lines(p)]
    lines += [f"  reference model              {_g(p.reference_weights)}   {ref}"]
    if p.gathered:
        lines.append(
            f"  gathered parameters          {_g(p.gathered)}   {p.distributed}: embedding/head unit + 2 layers"
        )
    on, off = ("<- in use", "") if p.gradient_checkpointing else ("", "<- in use")
    return lines + [
        f"  activations, checkpointing   {_g(p.activations_checkpointing)}   {on}",
        f"  activations, none            {_g(p.activations_no_checkpointing)}   {off}",
        f"  logits (fp32 + temporary)    {_g(p.logits)}   {p.logits_bytes} B x {2 * p.batch_pairs} x {p.seq_len} x vocabulary"
        + (" (8 + 16 for latent.lm_kl_weight's KL)" if p.logits_bytes > 8 else ""),
        f"  = training peak              {_g(p.train_peak)}",
        f"  evaluation peak              {_g(p.eval_peak)}   states{' - gradients' if p.distributed != 'zero3' else ''} + logits of {2 * p.eval_batch_pairs} sequences",
        f"  budget                       {_g(p.budget)}   {p.gpu_memory_gb:g} GiB less {p.headroom:.0%} headroom",
    ]


def _compute_lines(p: Plan) -> list[str]:
    return [
        "Compute per run (upper bound: every sequence padded to max_length):",
        f"  {p.pairs:,} pairs ({p.pairs_source}) -> {p.steps:,} steps x {p.global_batch} pairs = {p.pairs_seen:,} pairs seen, "
        f"{p.tokens:.3g} tokens",
        f"  FLOPs: policy {'4NT + 6 N_trainable T' if p.adapter != 'none' else '6NT'} {p.flops_policy:.3g}"
        + (f" + reference 2NT {p.flops_reference:.3g}" if p.flops_reference else "")
        + (f" + reference precompute {p.flops_precompute:.3g} (once, cached)" if p.flops_precompute else "")
        + f" = {p.flops:.3g}",
        f"  {_hours(p.gpu_hours)} GPU-hours at MFU {p.mfu:g} of {p.peak_tflops:g} TFLOPS "
        f"= {_hours(p.wall_hours)} h on {_gpus(p)}",
    ]


def _disk_lines(p: Plan) -> list[str]:
    what = "fp32 master weights + 2 moments (DeepSpeed)" if p.distributed == "zero3" else "weights + AdamW's 2 moments"
    if p.adapter != "none":
        what = "the adapter and latent + AdamW's 2 moments (not the frozen base)"
    merged = f" + merged/ {_gb(p.merged_bytes).strip()}" if p.merged_bytes else ""
    per = "trainable param" if p.adapter != "none" else "param"
    at_once = p.checkpoints_on_disk * p.checkpoint_bytes
    kept = min(p.checkpoints_written, p.keep_checkpoints)
    peak_what = (
        f"{p.checkpoints_on_disk} checkpoint{'s' if p.checkpoints_on_disk > 1 else ''}, the newest being written"
        if at_once >= p.disk_peak
        else f"{kept} checkpoint{'s' if kept > 1 else ''} + final/"
    )
    return [
        "Disk in the run directory (estimate; GB = 10^9 bytes):",
        f"  checkpoint                   {_gb(p.checkpoint_bytes)}   {p.checkpoint_bytes_per_param} B/{per}: {what}",
        f"  final/                       {_gb(p.final_bytes)}   {p.final_bytes_per_param} B/{per}{merged}",
        f"  = peak                       {_gb(p.disk_peak)}   {peak_what} "
        f"({p.checkpoints_written} written, trainer.keep_checkpoints={p.keep_checkpoints})",
    ]


def _change_lines(label: str, change: str, q: Plan, why: str = "") -> list[str]:
    """A change that makes the job fit, and the plan with it."""
    return [
        f"  {label}: add  {change}",
        f"  -> peak {q.peak / GiB:.1f} GiB of {q.budget / GiB:.1f} GiB on {q.world} GPU(s), "
        f"{_hours(q.gpu_hours)} GPU-hours ({_hours(q.wall_hours)} h){why}",
    ]


def _verdict_lines(p: Plan) -> list[str]:
    peak = f"peak {p.peak / GiB:.1f} GiB of {p.budget / GiB:.1f} GiB usable per GPU"
    if p.fits:
        return [f"Verdict: fits ({peak})"]
    lines = [f"Verdict: does not fit ({peak})"]
    if p.suggestion:
        lines += _change_lines("smallest change that fits", p.suggestion, p.suggested)
    else:
        lines.append(
            "  nothing in (precompute the reference, gradient checkpointing, ZeRO-3, up to "
            f"{MAX_NODES} nodes, smaller micro-batches, CPU optimizer offload, LoRA, QLoRA) fits: what does not "
            "shard (activations, logits, the reference) needs a smaller trainer.max_length, or bigger GPUs"
        )
    if p.alternative:
        q = p.alternative_plan
        why = " (adapter: trains a LoRA adapter and the latent, not the whole model)" if q.adapter != "none" else ""
        lines += _change_lines(f"on the {_plural(p.world, 'GPU')} this job has", p.alternative, q, why)
    return lines


def format_sweep(plans: list[Plan]) -> str:
    head = f"  {'peak GiB':>8} {'budget':>7} {'GPUs':>4} {'sharding':>8} {'batch':>5} {'GPU-h':>9}  verdict   job"
    lines = [f"Sweep: {len(plans)} jobs (per GPU: peak memory and budget in GiB; batch: pairs per step)", head]
    for p in plans:
        verdict = "fits" if p.fits else "NO FIT"
        lines.append(
            f"  {p.peak / GiB:8.1f} {p.budget / GiB:7.1f} {p.world:4d} {p.distributed:>8} {p.global_batch:5d} "
            f"{_hours(p.gpu_hours):>9}  {verdict:8}  {' '.join(p.overrides)}"
        )
        if not p.fits:
            lines.append(f"  {'':40}  add: {p.suggestion or '(nothing found)'}")

    def hours(flops: float, p: Plan) -> float:
        return flops / (p.peak_tflops * 1e12 * p.mfu) / 3600

    # A sweep precomputes each reference once: the cache is keyed by model, data, length and precision.
    once = {p.precompute_key: p for p in plans if p.precompute_key is not None}
    flops = sum(p.flops_policy + p.flops_reference for p in plans) + sum(p.flops_precompute for p in once.values())
    gpu_hours = sum(hours(p.flops_policy + p.flops_reference, p) for p in plans) + sum(
        hours(p.flops_precompute, p) for p in once.values()
    )
    fits = sum(p.fits for p in plans)
    lines += [
        f"Total: {sum(p.tokens for p in plans):.3g} tokens, {flops:.3g} FLOPs, {_hours(gpu_hours)} GPU-hours "
        f"(references precomputed once per model and data); {fits}/{len(plans)} jobs fit"
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line
def _hydra_compose(conf_dir: Path, overrides: list[str]) -> DictConfig:
    import warnings

    from hydra import compose, initialize_config_dir

    with warnings.catch_warnings():  # config.yaml's optional search path (conf/local) need not exist
        warnings.filterwarnings("ignore", message=".*hydra.searchpath.*is not available", category=UserWarning)
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)


def _hardware_overrides(conf_dir: Path, hardware: list[str]) -> list[str]:
    """The hardware group is not in config.yaml's defaults list yet: append it (+hardware=...) unless it is."""
    defaults = OmegaConf.load(conf_dir / "config.yaml").get("defaults") or []
    wired = any(
        isinstance(d, (dict, DictConfig)) and any(str(k).lstrip("+/ ").startswith("hardware") for k in d)
        for d in defaults
    )
    if wired:
        return hardware
    out = ["+" + o if o.startswith("hardware=") else o for o in hardware]
    if not any(o.startswith("+hardware=") for o in out):
        out.insert(0, f"+hardware={DEFAULT_HARDWARE}")
    return out


def expand_jobs(overrides: list[str], conf_dir: Path) -> list[tuple[list[str], DictConfig]]:
    """One (overrides, composed config) per job: Hydra sweep syntax (a,b / range(...)) on the command line
    and an experiment's ``sweep.grid`` (lpc.experiments.sweep) are expanded into their products."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    axes = []
    for o in parsed:
        if o.is_sweep_override():
            axes.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    jobs = []
    for combo in itertools.product(*axes):
        combo = list(combo)
        hw = [o for o in combo if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] == "hardware"]
        rest = [o for o in combo if o not in hw]
        shown = rest + hw  # as the user wrote them
        hw = _hardware_overrides(conf_dir, hw)
        cfg = _hydra_compose(conf_dir, rest + hw)
        grid = OmegaConf.to_container(cfg.sweep, resolve=True).get("grid") if "sweep" in cfg else None
        if not grid:
            jobs.append((shown, cfg))
            continue
        given = {o.lstrip("+~").split("=", 1)[0] for o in rest}
        fixed = list(OmegaConf.to_container(cfg.sweep, resolve=True).get("overrides") or [])
        keys = [k for k in grid if k not in given]  # the command line wins over the grid
        for values in itertools.product(*(grid[k] for k in keys)):
            point = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in zip(keys, values)]
            job = rest + fixed + point
            jobs.append((shown + fixed + point, _hydra_compose(conf_dir, job + hw)))
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lpc-plan",
        description=__doc__.split("\n\n")[0],
        epilog="Overrides are those of src/train.py, plus hardware=<a100_80g_x8|h100_80g_x8|a100_40g_x8|cpu> "
        "and hardware.<key>=<value>. Exit code 0: fits; 1: does not fit; 2: config error. docs/planning.md",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=llama3_8b distributed=zero3")
    parser.add_argument(
        "--pairs",
        type=int,
        default=None,
        help=f"training pairs in the data set (default: data.n_train for synthetic data, else "
        f"{DEFAULT_PAIRS:,} = UltraFeedback binarized train_prefs)",
    )
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation (default 0.4)")
    parser.add_argument(
        "--headroom", type=float, default=DEFAULT_HEADROOM, help="fraction of GPU memory kept free (default 0.1)"
    )
    parser.add_argument("--json", action="store_true", help="print the plans as JSON")
    parser.add_argument("--verbose", action="store_true", help="a sweep: print every job's full plan")
    parser.add_argument(
        "-m", "--multirun", action="store_true", help="accepted and ignored (sweeps are expanded anyway)"
    )
    try:
        args = parser.parse_intermixed_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        conf_dir = Path(os.environ.get("LPC_PLAN_CONF_DIR") or find_conf_dir())
        jobs = expand_jobs(args.overrides, conf_dir)
        plans = [plan(cfg, pairs=args.pairs, mfu=args.mfu, headroom=args.headroom, overrides=job) for job, cfg in jobs]
    except (PlanError, HydraException, OmegaConfBaseException, ValueError) as err:
        print(f"lpc-plan: config error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([p.to_dict() for p in plans], indent=2))
    elif len(plans) == 1 or args.verbose:
        print("\n\n".join(format_plan(p) for p in plans))
    if len(plans) > 1 and not args.json:
        print(("\n" if args.verbose else "") + format_sweep(plans))
    print("(estimates from formulas, not measurements: docs/planning.md)", file=sys.stderr)
    return 0 if all(p.fits for p in plans) else 1


if __name__ == "__main__":
    sys.exit(main())
