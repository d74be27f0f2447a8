"""The final checkpoint of a run: a ``from_pretrained`` directory plus, for LPC, the latent module.

final/
  config.json, model.safetensors, tokenizer files    (AutoModelForCausalLM.from_pretrained(final))
  latent.safetensors, latent.yaml                     (LPC runs only)
  lpc_config.yaml                                     (the run's resolved Hydra config)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from lpc.files import apply_umask
from lpc.policy import PreferenceModel

LATENT_WEIGHTS = "latent.safetensors"
LATENT_CONFIG = "latent.yaml"
RUN_CONFIG = "lpc_config.yaml"


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
    model.lm.save_pretrained(tmp, state_dict=lm_state)
    tokenizer.save_pretrained(tmp)
    OmegaConf.save(cfg, tmp / RUN_CONFIG, resolve=True)
    if model.latent is not None:
        state = {k: v.detach().contiguous().cpu() for k, v in (latent_state or model.latent.state_dict()).items()}
        save_file(state, str(tmp / LATENT_WEIGHTS))
        latent_cfg = OmegaConf.to_container(cfg.latent, resolve=True)
        latent_cfg["hidden_size"] = model.lm.config.hidden_size
        OmegaConf.save(OmegaConf.create(latent_cfg), tmp / LATENT_CONFIG)
    apply_umask(tmp)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype=None):
    """``(PreferenceModel, tokenizer, run_config)`` from a final checkpoint (or a run directory)."""
    import transformers

    path = Path(path)
    if (path / "final").is_dir():
        path = path / "final"
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path} is not a checkpoint directory (no config.json); pass a run directory or its final/ folder"
        )
    kwargs = {"dtype": dtype} if dtype is not None else {}
    lm = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    latent = None
    if (path / LATENT_WEIGHTS).exists():
        latent = instantiate(OmegaConf.load(path / LATENT_CONFIG))
        latent.load_state_dict(load_file(str(path / LATENT_WEIGHTS)))
    cfg = OmegaConf.load(path / RUN_CONFIG) if (path / RUN_CONFIG).exists() else None
    model = PreferenceModel(lm, latent, calibrate=False).to(device).eval()  # trained weights: keep them
    return model, tokenizer, cfg
