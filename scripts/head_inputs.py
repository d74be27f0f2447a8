"""How plainly each input a latent head can read shows the annotator type: a linear probe on the backbone's
last-layer states, before any training, for every ``latent.pool`` and the posterior's combinations.

    python scripts/head_inputs.py experiment=synthetic_pretrained          # SmolLM2 in its chat template
    python scripts/head_inputs.py experiment=synthetic_benchmark data.visibility=always data.conflict=1.0

Any lpc-train override composes the model and the typed synthetic data (it needs the ``type`` column). The
eval pairs' states are read as the heads read them (less their mean, at unit RMS: ``latent.head_input=centered``),
and a logistic regression predicts the type from them, with 5-fold cross-validated accuracy at three strengths of
L2 regularisation. A small C is the closer picture of a head trained a few dozen steps: only a direction most of
the pairs share is found. Nothing is trained or written. docs/method.md §7 reads the output.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

C_VALUES = (0.001, 0.01, 1.0)


def centred(x: torch.Tensor) -> np.ndarray:
    """What ``lpc.latent.CenteredInput`` gives a head whose first training batch is these rows."""
    from lpc.latent import CenteredInput

    with torch.no_grad():
        return CenteredInput(x.shape[-1], momentum=1.0)(x, update=True).numpy()


def probe_accuracy(x: np.ndarray, y: np.ndarray, c: float) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    return float(cross_val_score(LogisticRegression(C=c, max_iter=5000), x, y, cv=5).mean())


@torch.no_grad()
def head_inputs(lm, eval_ds, pad_token_id: int, batch_size: int = 32) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Every input a head can read, per pair: the prompt's and the (chosen, rejected) responses' states, pooled
    at the last token and by the mean (``lpc.latent.pool_states``), responses combined as ``latent.posterior_input`` does."""
    from lpc.data import PairCollator
    from lpc.latent import POSTERIOR_INPUTS, combine_states, pool_states
    from lpc.policy import hidden_states, prompt_mask

    collate = PairCollator(pad_token_id=pad_token_id)
    parts: dict[str, list[torch.Tensor]] = {}
    types = []
    for i in range(0, len(eval_ds), batch_size):
        batch = collate([eval_ds[j] for j in range(i, min(i + batch_size, len(eval_ds)))])
        hidden = hidden_states(lm, batch).float()
        n = hidden.shape[0] // 2
        for pool in ("last", "mean"):
            prompt = pool_states(hidden[:n], prompt_mask(batch)[:n], pool)
            resp = pool_states(hidden, batch["response_mask"], pool)
            parts.setdefault(f"prior, pool={pool}", []).append(prompt)
            for how in POSTERIOR_INPUTS:
                parts.setdefault(f"posterior {how}, pool={pool}", []).append(combine_states(resp[:n], resp[n:], how))
        types.append(batch["type"])
    return {k: torch.cat(v) for k, v in parts.items()}, torch.cat(types).numpy()


def main(argv: list[str]) -> int:
    from hydra import compose, initialize_config_dir

    from lpc.conf import CONF_DIR
    from lpc.run import build_datasets, load_model

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=argv)
    torch.manual_seed(int(cfg.seed))
    lm, tokenizer = load_model(cfg)
    _, eval_ds, _ = build_datasets(cfg, tokenizer)
    if "type" not in eval_ds.column_names:
        print("head_inputs.py needs typed data (data=synthetic): the eval pairs have no 'type' column")
        return 2
    inputs, types = head_inputs(lm.eval(), eval_ds, tokenizer.pad_token_id)
    print(f"{len(types)} eval pairs, {len(set(types.tolist()))} types; 5-fold logistic-probe accuracy of the type")
    print("| head input | " + " | ".join(f"C = {c:g}" for c in C_VALUES) + " |")
    print("|---|" + "---|" * len(C_VALUES))
    for name, x in inputs.items():
        accs = [probe_accuracy(centred(x), types, c) for c in C_VALUES]
        print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
