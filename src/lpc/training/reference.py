"""Reference log-probs computed once and shared by every run that needs the same ones.

DPO/IPO (with or without LPC) need log pi_ref(y|x) for every pair. The reference is the frozen
initial model, so these numbers depend only on (reference weights, tokenized data, precision and
device) - not on the algorithm, beta, the latent module or the seed of training. A sweep over
algo/beta/codebook/lambda therefore computes them once: ``trainer.reference_logps=precompute``
scores both splits with the *initial policy* before training (no second model is ever built), and
stores them under ``$LPC_CACHE_DIR/ref_logps/<key>/``. A later run with the same key loads them.

The key (``cache_key(key_parts(...))``) is the sha256 of:

* ``model``: the model config (name, path, revision, init_seed, sizes, dtype, attention
  implementation; ``cache_dir`` excluded) and ``weights``: a sha256 over every tensor's name, dtype,
  shape and bytes of the reference model as loaded (so an overwritten local checkpoint is a miss);
* ``tokens``: a sha256 of the tokenized train/eval splits (prompt/chosen/rejected ids in order):
  it changes with the data source, its seed and size, label flips, the tokenizer, the chat template
  and truncation; ``max_length``/``max_prompt_length`` are also listed explicitly;
* ``precision`` (trainer.precision: autocast changes the numbers), the model ``dtype``, the
  ``device`` type, and ``version`` (bumped when the scoring code changes).

A stale entry cannot be used: any change gives another key, and a loaded entry is checked against
its stored key parts and row counts. Entries are written to a temp directory and renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lpc.progress import tracked

log = logging.getLogger(__name__)
VERSION = 1  # of response_logps' scoring; bump to invalidate every cached entry
COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


def weights_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokens_fingerprint(ds) -> str:
    """Hash of the token ids, in row order (index mappings from select/filter applied)."""
    import numpy as np
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]
    h = hashlib.sha256(str(len(ds)).encode())
    for col in TOKEN_COLUMNS:
        arr = table.column(col)
        h.update(col.encode())
        h.update(np.asarray(pc.list_value_length(arr), dtype=np.int64).tobytes())
        h.update(np.asarray(pc.list_flatten(arr), dtype=np.int64).tobytes())
    return h.hexdigest()


def key_parts(cfg, lm, train_ds, eval_ds, device_type: str) -> dict:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("cache_dir", None)  # where a model is cached does not change it
    model_cfg.pop("arch", None)  # shapes for lpc-plan; the weights fingerprint covers the model
    return {
        "version": VERSION,
        "model": model_cfg,
        "weights": weights_fingerprint(lm),
        "dtype": str(next(lm.parameters()).dtype),
        "tokens": {"train": tokens_fingerprint(train_ds), "eval": tokens_fingerprint(eval_ds)},
        "max_length": cfg.trainer.max_length,
        "max_prompt_length": cfg.trainer.max_prompt_length,
        "precision": cfg.trainer.precision,
        "device": device_type,
    }


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.no_grad()
def score(lm, ds, collate, accelerator, batch_size: int) -> torch.Tensor:
    """(len(ds), 2) summed response log-probs (chosen, rejected) of ``lm`` without z. Each process
    scores every world-th row; the rows are then gathered so every process has them all."""
    from accelerate.utils import gather_object

    from lpc.policy import hidden_states, response_logps

    was_training = lm.training
    lm.eval()
    mine = list(range(accelerator.process_index, len(ds), accelerator.num_processes))
    rows = []
    for start in tracked(
        range(0, len(mine), batch_size), "reference log-probs", log, enabled=accelerator.is_main_process
    ):
        idx = mine[start : start + batch_size]
        batch = {k: v.to(accelerator.device) for k, v in collate([ds[i] for i in idx]).items()}
        with accelerator.autocast():
            sums, _ = response_logps(lm, hidden_states(lm, batch), batch)
        sums = sums.float().cpu()
        rows += [(i, sums[j].item(), sums[j + len(idx)].item()) for j, i in enumerate(idx)]
    lm.train(was_training)
    if accelerator.num_processes > 1:
        rows = gather_object(rows)
    out = torch.empty(len(ds), 2, dtype=torch.float32)
    for i, c, r in rows:
        out[i, 0], out[i, 1] = c, r
    return out


def _load(path: Path, parts: dict, sizes: dict) -> dict | None:
    from safetensors.torch import load_file

    if not (path / "key.json").exists():
        return None
    if json.loads((path / "key.json").read_text()) != json.loads(json.dumps(parts, sort_keys=True, default=str)):
        log.warning("reference log-prob cache %s does not match its key; recomputing", path)
        return None
    tensors = load_file(path / "logps.safetensors")
    if any(tensors[s].shape[0] != n for s, n in sizes.items()):
        return None
    return tensors


def attach_reference_logps(
    lm, datasets: dict, parts: dict, accelerator, collate, batch_size: int, cache_dir: str | Path
) -> tuple[dict, dict]:
    """Add ref_chosen_logps/ref_rejected_logps columns to every split, from the cache or computed
    now with ``lm`` (the initial policy = the reference). Returns (datasets, info for metrics.json)."""
    from safetensors.torch import save_file

    from lpc.backbones import _atomic_dir

    key = cache_key(parts)
    path = Path(cache_dir) / "ref_logps" / key
    sizes = {split: len(ds) for split, ds in datasets.items()}
    tensors = _load(path, parts, sizes)
    hit = tensors is not None
    if not hit:
        log.info("computing reference log-probs (%s) -> %s", ", ".join(f"{n} {s}" for s, n in sizes.items()), path)
        tensors = {split: score(lm, ds, collate, accelerator, batch_size) for split, ds in datasets.items()}
        if accelerator.is_main_process:

            def write(tmp: Path):
                save_file(tensors, tmp / "logps.safetensors")
                (tmp / "key.json").write_text(json.dumps(parts, sort_keys=True, indent=1, default=str))

            _atomic_dir(path, write)
        accelerator.wait_for_everyone()
    else:
        log.info("reference log-probs from the cache %s", path)
    out = {}
    for split, ds in datasets.items():
        t = tensors[split]
        for j, col in enumerate(COLUMNS):
            if col in ds.column_names:
                ds = ds.remove_columns(col)
            ds = ds.add_column(col, t[:, j].tolist())
        out[split] = ds
    return out, {"ref_logps/cache_hit": hit, "ref_logps/key": key}
