"""LoRA and QLoRA adapters on the policy's language model (``adapter=lora|qlora``, peft).

The adapter is injected into the language model in place (``peft.inject_adapter_in_model``): the LM stays the same
``*ForCausalLM`` object, so :mod:`lpc.policy` (hidden states, LM head, z), generation and lm-eval see an ordinary
model whose projections carry LoRA. The base weights are frozen; only the adapter trains, and the LPC latent trains
in full beside it. The reference of DPO/IPO is the same model with the adapters switched off
(:func:`adapters_disabled`), so no second copy is loaded; with ``trainer.reference_logps=precompute`` the reference
log-probs are scored before the adapter is injected, so the cache is the full model's (same key, same entries).

On disk an adapter is peft's format (``adapter_config.json``, ``adapter_model.safetensors`` with peft's key names),
so ``peft.PeftModel.from_pretrained(base, final)`` loads it too; :func:`merge_into` writes the base with the adapter
merged in, a plain ``from_pretrained`` model. QLoRA loads the frozen base in 4 bits with bitsandbytes (NF4, double
quantisation): :func:`load_kwargs` gives the loader its ``quantization_config``. It needs a CUDA GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

# torch, transformers, safetensors and peft (an optional dependency) are imported inside the functions that use
# them: lpc-plan reads this module's tables without loading any of them, and a run without an adapter needs no peft
if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

ADAPTERS = ("none", "lora", "qlora")
# The decoder projections of a Llama/Mistral layer (the names lora.yaml's target_modules may use) and
# (input, output) widths as functions of (hidden size h, KV width kv, MLP width i): lpc.experiments.plan counts them.
PROJECTIONS = {
    "q_proj": lambda h, kv, i: (h, h),
    "k_proj": lambda h, kv, i: (h, kv),
    "v_proj": lambda h, kv, i: (h, kv),
    "o_proj": lambda h, kv, i: (h, h),
    "gate_proj": lambda h, kv, i: (h, i),
    "up_proj": lambda h, kv, i: (h, i),
    "down_proj": lambda h, kv, i: (i, h),
}
ALL_LINEAR = "all-linear"
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
# Loaders that go through from_pretrained and so can load a base in 4 bits (the tiny models are built from a config)
QUANTIZABLE_LOADERS = ("lpc.backbones.pretrained", "lpc.backbones.smollm2")
ADAPTER_CONFIG = "adapter_config.json"  # peft's file names
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's key prefix (a PeftModel's state dict)
MERGED = "merged"  # final/merged/: the base with the adapter merged in (adapter.merged_export)


def adapter_name(cfg) -> str:
    """The config's ``adapter.name`` (``none`` for a config composed without the group)."""
    node = cfg.get("adapter") if cfg is not None else None
    return str(node.get("name", "none")) if node is not None else "none"


def target_modules(node) -> list[str]:
    targets = node.get("target_modules")
    if isinstance(targets, str) and targets == ALL_LINEAR:
        return list(PROJECTIONS)
    return [str(t) for t in targets]


def check(cfg) -> None:
    """``ValueError`` naming the key, its value and what is allowed, for an adapter config that cannot train here.
    Runs before any model loads (lpc.config.validate turns it into a ConfigError: exit 2). QLoRA is refused where
    torch sees no CUDA GPU and where bitsandbytes is missing."""
    import importlib.util

    node = cfg.get("adapter")
    name = adapter_name(cfg)
    if name not in ADAPTERS:
        raise ValueError(f"adapter.name={name!r} is not allowed: one of {', '.join(ADAPTERS)}")
    if name == "none":
        return

    def require(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            raise ValueError(f"adapter.{key}={node.get(key)!r} is not allowed: {allowed}")

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    r, alpha, dropout = node.get("r"), node.get("alpha"), node.get("dropout")
    require(isinstance(r, int) and not isinstance(r, bool) and r >= 1, "r", "an integer >= 1 (the adapter's rank)")
    require(number(alpha) and alpha > 0, "alpha", "a number > 0 (the adapter's output is scaled by alpha / r)")
    require(number(dropout) and 0 <= dropout < 1, "dropout", "a number in [0, 1)")
    targets = node.get("target_modules")
    listed = not isinstance(targets, str) and targets is not None and len(targets) > 0
    require(
        targets == ALL_LINEAR or (listed and all(str(t) in PROJECTIONS for t in targets)),
        "target_modules",
        f"{ALL_LINEAR}, or a non-empty list of the decoder's projections: {', '.join(PROJECTIONS)}",
    )
    require(isinstance(node.get("merged_export", False), bool), "merged_export", "true or false")
    distributed = cfg.distributed.get("name") if cfg.get("distributed") is not None else "none"
    if distributed in ("fsdp", "zero3"):
        raise ValueError(
            f"adapter={name} is not allowed with distributed={distributed}: an adapter trains on one process or "
            "under ddp here (distributed=none, ddp or auto); the frozen base is not sharded (docs/training.md)"
        )
    if importlib.util.find_spec("peft") is None:
        raise ValueError(f"adapter={name} needs peft: pip install peft (make install installs it)")
    if name == "qlora":
        require(node.get("quant_type") in QUANT_TYPES, "quant_type", " or ".join(QUANT_TYPES))
        require(isinstance(node.get("double_quant"), bool), "double_quant", "true or false")
        require(node.get("compute_dtype") in COMPUTE_DTYPES, "compute_dtype", ", ".join(COMPUTE_DTYPES))
        import torch

        if not torch.cuda.is_available():  # the machine, not hardware.device: one process uses its GPU either way
            raise ValueError(
                "adapter=qlora is not allowed here: QLoRA loads the frozen base in 4 bits with bitsandbytes, which "
                "needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False); use adapter=lora on CPU "
                "(lpc-plan plans qlora anywhere)"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("adapter=qlora needs bitsandbytes: pip install -e '.[qlora]' (a CUDA machine)")
        loader = str(cfg.model.get("_target_", ""))
        if loader not in QUANTIZABLE_LOADERS:
            raise ValueError(
                f"adapter=qlora is not allowed with model={cfg.model.get('name')}: its loader ({loader}) builds the "
                "model from a config; QLoRA needs a checkpoint loaded with from_pretrained (model=smollm2 or a hub model)"
            )


# --------------------------------------------------------------------------- building
def lora_config(node):
    """peft's ``LoraConfig`` for an ``adapter`` node (no bias, the decoder's projections, never the LM head)."""
    from peft import LoraConfig

    return LoraConfig(
        r=int(node.r),
        lora_alpha=float(node.alpha),
        lora_dropout=float(node.dropout),
        target_modules=target_modules(node),
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_kwargs(cfg) -> dict:
    """Extra keyword arguments of the model loader: for QLoRA, bitsandbytes' 4-bit ``quantization_config`` and the
    process's GPU as ``device_map`` (a 4-bit model is placed when it loads); nothing otherwise."""
    if adapter_name(cfg) != "qlora":
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    node = cfg.adapter
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=str(node.quant_type),
        bnb_4bit_use_double_quant=bool(node.double_quant),
        bnb_4bit_compute_dtype=getattr(torch, str(node.compute_dtype)),
    )
    return {"quantization_config": quantization, "device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}


def add_adapter(lm: nn.Module, node) -> nn.Module:
    """Inject a LoRA adapter into ``lm`` in place and freeze everything else of it; returns ``lm``. The adapter's
    weights are float32 whatever the base's dtype (peft's ``autocast_adapter_dtype``): AdamW's updates of a
    16-bit adapter would round away, and accelerate's autocast computes in 16 bits anyway."""
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    lm.requires_grad_(False)
    inject_adapter_in_model(lora_config(node), lm)
    cast_adapter_dtype(lm, "default")
    for name, p in lm.named_parameters():  # peft marks the adapter trainable; nothing else may be
        p.requires_grad_(".lora_" in name)
    return lm


def tuner_layers(lm: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in lm.modules() if isinstance(m, BaseTunerLayer)]


def has_adapter(lm: nn.Module) -> bool:
    """Whether ``lm`` carries a peft adapter (injected by :func:`add_adapter` or loaded by :func:`load_adapter`)."""
    return bool(getattr(lm, "peft_config", None))


@contextlib.contextmanager
def adapters_disabled(lm: nn.Module):
    """Inside the context ``lm`` computes as its base model (every adapter layer skipped): the reference of an
    adapter run. The layers' flag is set directly, not with ``enable_adapters``, which also rewrites the adapter's
    ``requires_grad`` (an open graph's leaves would then lose their gradients)."""
    layers = tuner_layers(lm)
    before = [m._disable_adapters for m in layers]
    try:
        for m in layers:
            m._disable_adapters = True
        yield lm
    finally:
        for m, was in zip(layers, before):
            m._disable_adapters = was


def parameter_counts(lm: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameters of ``lm`` (a 4-bit weight counts its parameters, not its packed bytes)."""
    import torch

    trainable = total = 0
    for p in lm.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 and hasattr(p, "quant_state") else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


# --------------------------------------------------------------------------- checkpoints
def trainable_state_only(models, weights, _output_dir) -> None:
    """accelerate's save-state pre-hook: a checkpoint of an adapter run keeps the adapter and the latent (every
    trainable parameter, every buffer), not the frozen base (16 GB of a 8B model, the same in every checkpoint).
    Resuming loads it with ``strict=False`` over the base the run rebuilt."""
    for model, state in zip(models, weights):
        # remove_duplicate=False: a tied LM head is a second name of the embedding (SmolLM2)
        frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        for key in [k for k in state if k in frozen]:
            del state[key]


def adapter_state_dict(lm: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft's key names (``base_model.model.<module>.lora_A.weight``), on the CPU."""
    from peft import get_peft_model_state_dict

    return {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(lm).items()}


def save_adapter(lm: nn.Module, directory: str | Path, base_name_or_path: str | None = None) -> None:
    """``adapter_config.json`` and ``adapter_model.safetensors`` in peft's format into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = lm.peft_config["default"]
    config.base_model_name_or_path = base_name_or_path
    config.inference_mode = True
    config.save_pretrained(str(directory))
    save_file(adapter_state_dict(lm), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def load_adapter(lm: nn.Module, directory: str | Path) -> nn.Module:
    """``lm`` (a base model) with the adapter of ``directory`` injected in place and loaded, frozen; returns ``lm``."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import cast_adapter_dtype
    from safetensors.torch import load_file

    directory = Path(directory)
    config = LoraConfig.from_pretrained(str(directory))
    inject_adapter_in_model(config, lm)
    cast_adapter_dtype(lm, "default")
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(directory / ADAPTER_WEIGHTS)).items()}
    result = set_peft_model_state_dict(lm, state)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{directory / ADAPTER_WEIGHTS} does not fit the model: {len(missing)} adapter weights missing "
            f"({missing[:2]}), {len(result.unexpected_keys)} unexpected ({list(result.unexpected_keys)[:2]})"
        )
    return lm.requires_grad_(False)


def merge_and_unload(lm: nn.Module) -> nn.Module:
    """``lm`` with each adapter added into its base weight and the adapter layers replaced by their base layers: a
    plain model again (peft's ``merge_and_unload``, in place); returns ``lm``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(lm.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(lm.get_submodule(parent) if parent else lm, child, module.get_base_layer())
    if hasattr(lm, "peft_config"):
        del lm.peft_config
    return lm


def merge_into(base: nn.Module, adapter_dir: str | Path, target: str | Path) -> Path:
    """Write ``target``: ``base`` (a model as the run loaded it, unquantised) with the adapter of ``adapter_dir``
    merged in, as a ``from_pretrained`` directory (config.json, model.safetensors)."""
    merged = merge_and_unload(load_adapter(base, adapter_dir))
    merged.save_pretrained(str(target))
    return Path(target)
