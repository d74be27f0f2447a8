"""The LPC-conditioned policy at inference time: z from the prior, added to the LM head input.

For a prompt x the prior reads the backbone's last-layer states of the prompt's tokens, pooled exactly as in
training (``Latent.pooled``: the last token or the mean, per ``latent.pool``), and the latent's inference mode
(``latent.inference``: expectation of the codes by default) turns it into z. Every position whose logits
are read (scored continuation tokens, generated tokens) gets ``W (h + z)``. A baseline (no latent) is the
plain language model. These functions need no lm-eval; the harness wrapper uses them for batches
(``lpc.evaluation.generate`` does the same for one unpadded prompt at a time).
"""

from __future__ import annotations

import torch

from lpc.policy import backbone_of


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left-padded rows get the positions they have unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def last_hidden(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d) last-layer hidden states (the LM head's input before z)."""
    out = backbone_of(lm)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


def prior_z(latent, h_prompt: torch.Tensor) -> torch.Tensor | None:
    """z for each row from the prior p(z | x) in the latent's inference mode; None for a baseline."""
    if latent is None:
        return None
    return latent.prior_z(h_prompt)


@torch.no_grad()
def prompt_prior_z(lm, latent, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """z for left-padded prompts (the attention mask marks each row's prompt tokens)."""
    if latent is None:
        return None
    return prior_z(latent, latent.pooled(last_hidden(lm, input_ids, attention_mask), attention_mask))


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)
