"""The final checkpoint of a run: a ``from_pretrained`` directory plus, for LPC, the latent module.

final/
  config.json, model.safetensors, tokenizer files    (AutoModelForCausalLM.from_pretrained(final))
  latent.safetensors, latent.yaml                     (LPC runs only)
  lpc_config.yaml                                     (the run's resolved Hydra config)

An adapter run (``adapter=lora|qlora``) writes the adapter instead of the language model's weights:

final/
  adapter_config.json, adapter_model.safetensors     (peft's format: PeftModel.from_pretrained(base, final))
  tokenizer files, latent.safetensors, latent.yaml, lpc_config.yaml
  merged/                                             (adapter.merged_export=true: the base with the adapter merged
                                                       in, laid out as a full final/ above)

:func:`load_checkpoint` rebuilds an adapter's base from the run config's ``model`` node (the loader the run used),
or from ``base_model_name_or_path`` in adapter_config.json where there is no run config.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import lpc.adapters as adapters
from lpc.files import apply_umask
from lpc.policy import PreferenceModel
from lpc.training.rundir import RUN_CONFIG, RunDir

log = logging.getLogger(__name__)

LATENT_WEIGHTS = "latent.safetensors"
LATENT_CONFIG = "latent.yaml"


def export_checkpoint(
    model: PreferenceModel, tokenizer, cfg, target: str | Path, state_dict: dict | None = None
) -> Path:
    """Write ``target`` atomically (temp dir, then rename). ``state_dict``: the full weights gathered
    from a sharded (FSDP/ZeRO-3) model by ``accelerator.get_state_dict``; ``model`` then gives only the
    structure and config."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm_state = latent_state = None
    if state_dict is not None:
        lm_state = {k[len("lm.") :]: v for k, v in state_dict.items() if k.startswith("lm.")}
        latent_state = {k[len("latent.") :]: v for k, v in state_dict.items() if k.startswith("latent.")}
    adapter = adapters.has_adapter(model.lm)
    if adapter:  # the adapter alone: the frozen base is the run's model node (or base_model_name_or_path)
        adapters.save_adapter(model.lm, tmp, base_name_or_path(cfg, model.lm))
    else:
        model.lm.save_pretrained(tmp, state_dict=lm_state)
    _write_rest(model, tokenizer, cfg, tmp, latent_state)
    if adapter and cfg.get("adapter") is not None and cfg.adapter.get("merged_export", False):
        export_merged(tmp, tmp / adapters.MERGED)
    apply_umask(tmp)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _write_rest(model: PreferenceModel, tokenizer, cfg, directory: Path, latent_state: dict | None = None) -> None:
    """The tokenizer, the run config and, for LPC, the latent's weights and config into ``directory``."""
    tokenizer.save_pretrained(directory)
    OmegaConf.save(cfg, directory / RUN_CONFIG, resolve=True)
    if model.latent is not None:
        state = {k: v.detach().contiguous().cpu() for k, v in (latent_state or model.latent.state_dict()).items()}
        save_file(state, str(directory / LATENT_WEIGHTS))
        latent_cfg = OmegaConf.to_container(cfg.latent, resolve=True)
        latent_cfg["hidden_size"] = model.lm.config.hidden_size
        OmegaConf.save(OmegaConf.create(latent_cfg), directory / LATENT_CONFIG)


def base_name_or_path(cfg, lm) -> str | None:
    """What adapter_config.json names as the adapter's base: the hub name or directory the run loaded, where the
    loader says (model.name_or_path), else the directory the weights came from (SmolLM2's converted copy)."""
    name = cfg.model.get("name_or_path") if cfg is not None and cfg.get("model") is not None else None
    return str(name) if name else (getattr(lm.config, "_name_or_path", "") or None)


def _base_model(path: Path, cfg, dtype=None, quantize: bool = True):
    """The frozen base of the adapter in ``path``, as the run loaded it: its model node (QLoRA's 4-bit base where a
    CUDA GPU and bitsandbytes are at hand, else the base unquantised, with a warning), or ``base_model_name_or_path``
    of adapter_config.json without a run config. ``quantize=False``: unquantised in any case."""
    import importlib.util

    import transformers

    kwargs = {"dtype": dtype} if dtype is not None else {}
    if cfg is None or cfg.get("model") is None:
        base = json.loads((path / adapters.ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not base:
            raise FileNotFoundError(
                f"{path} holds an adapter but neither its run config ({RUN_CONFIG}) nor a base_model_name_or_path "
                "in adapter_config.json names the base model it adapts"
            )
        return transformers.AutoModelForCausalLM.from_pretrained(base, **kwargs)
    quantize = quantize and adapters.adapter_name(cfg) == "qlora"
    if quantize and not (torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes")):
        log.warning(
            "%s: a QLoRA adapter on its base loaded unquantised (no CUDA GPU or no bitsandbytes here): its "
            "log-probs differ from training's by the 4-bit rounding of the base",
            path,
        )
        quantize = False
    lm, _ = instantiate(cfg.model, **(adapters.load_kwargs(cfg) if quantize else {}))
    return lm.to(dtype) if dtype is not None and not quantize else lm


def export_merged(final: str | Path, target: str | Path) -> Path:
    """Write ``target``: the adapter checkpoint ``final`` with the adapter merged into its base (loaded again,
    unquantised, on the CPU: QLoRA's too), with the tokenizer, latent and run config: a full ``final/`` that
    ``AutoModelForCausalLM.from_pretrained`` and ``LPCPolicy.from_pretrained`` load without peft."""
    final, target = Path(final), Path(target)
    cfg = OmegaConf.load(final / RUN_CONFIG) if (final / RUN_CONFIG).exists() else None
    adapters.merge_into(_base_model(final, cfg, quantize=False), final, target)
    import transformers

    transformers.AutoTokenizer.from_pretrained(final).save_pretrained(target)
    for name in (RUN_CONFIG, LATENT_WEIGHTS, LATENT_CONFIG):
        if (final / name).exists():
            shutil.copy2(final / name, target / name)
    return target


def saved_latent(model_dir: str | Path):
    """``(latent class, its saved config)`` of an exported model, read from ``latent.yaml`` without loading any
    weight (checks of a command's options against the latent); None for a baseline."""
    path = Path(model_dir) / LATENT_CONFIG
    if not path.exists():
        return None
    cfg = OmegaConf.load(path)
    return get_class(cfg._target_), cfg


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype=None):
    """``(PreferenceModel, tokenizer, run_config)`` from a final checkpoint (or a run directory): a full model, or
    an adapter on its base model (rebuilt as the run loaded it)."""
    import transformers

    path = RunDir.of(path).require_model()
    cfg = OmegaConf.load(path / RUN_CONFIG) if (path / RUN_CONFIG).exists() else None
    if (path / adapters.ADAPTER_CONFIG).exists():
        lm = adapters.load_adapter(_base_model(path, cfg, dtype), path)
    else:
        kwargs = {"dtype": dtype} if dtype is not None else {}
        lm = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    latent = None
    if (path / LATENT_WEIGHTS).exists():
        latent = instantiate(OmegaConf.load(path / LATENT_CONFIG))
        latent.load_state_dict(load_file(str(path / LATENT_WEIGHTS)))
    model = PreferenceModel(lm, latent, calibrate=False).to(device).eval()  # trained weights: keep them
    return model, tokenizer, cfg
