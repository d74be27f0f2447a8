"""What an untrained latent does to a pretrained LM: plain-text NLL (lpc.evaluation.integrity's probe) with
z = 0, under each untrained code, and the greedy answer to the first question, before any training step.

    python scripts/latent_at_init.py model=smollm2 latent=discrete codebook=8                   # the default
    python scripts/latent_at_init.py model=smollm2 latent=discrete codebook=8 latent.gate_init=null \\
        latent.codebook_init=hidden                                                             # the former default

Any lpc-train override composes the model and the latent; nothing is trained or written.
"""

from __future__ import annotations

import sys

import torch
from hydra.utils import instantiate


def main(argv: list[str]) -> int:
    from hydra import compose, initialize_config_dir

    from lpc.conf import CONF_DIR
    from lpc.evaluation.integrity import LMProbe
    from lpc.policy import PreferenceModel
    from lpc.run import load_model

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=argv)
    torch.manual_seed(int(cfg.seed))
    lm, tokenizer = load_model(cfg)
    latent = instantiate(cfg.latent, hidden_size=lm.config.hidden_size)
    model = PreferenceModel(lm, latent).eval()
    probe = LMProbe(tokenizer, chat_template=bool(cfg.model.get("chat_template", False)), max_codes=64)
    codes = list(range(getattr(latent, "codebook_size", 0)))
    report = probe.measure(model.lm, latent, probe.measure_reference(model.lm), codes)
    nll = report["per_z_nll"]
    code_nll = [v for k, v in nll.items() if k.startswith("code_")]
    print(f"plain-text NLL (nats/token): z = 0 {nll['zero']:.3f}, the prior's z {nll['prior']:.3f}", end="")
    if code_nll:
        print(
            f", untrained codes {min(code_nll):.2f} to {max(code_nll):.2f} (mean {sum(code_nll) / len(code_nll):.2f})"
        )
    else:
        print()
    print(f"greedy answer with the prior's z to {report['questions'][0]!r}: {report['texts']['answers'][0]!r}")
    print(f"the same LM without z: {report['texts']['reference_answers'][0]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
