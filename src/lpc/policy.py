"""The trained policy: a Hugging Face causal LM plus, for LPC, a latent module.

One backbone pass over the stacked (chosen; rejected) batch gives everything:
the last-layer hidden states feed the LM head for the response log-probs and,
for LPC, the prior (the prompt's states) and posterior (each response's states),
pooled as ``latent.pool`` says. z enters only at the LM head, ``logits = W (h + z)``, so the hidden
states the latent module reads are unaffected by z (no circularity, no extra
backbone forward).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn


class PolicyOutput(NamedTuple):
    logps: torch.Tensor  # (2B,) summed response log-probs, chosen rows first
    n_tokens: torch.Tensor  # (2B,) number of scored response tokens
    latent: object | None  # the latent module's output (LatentOutput) or None
    logit_sums: torch.Tensor | None = None  # (2B,) per row, the sum over response tokens of the mean logit
    z_kl: torch.Tensor | None = None  # (2B,) per row, sum over response tokens of KL(pi(.|z) || pi(.|z=0))


def injection_of(latent) -> str:
    """Where ``latent`` adds z (``Latent.z_injection``); a baseline (None) adds nothing, at the LM head."""
    return "head" if latent is None else latent.z_injection


def positions_of(latent) -> str:
    """Where ``latent`` adds z (``Latent.z_positions``); a baseline (None) adds nothing, at the response."""
    return "response" if latent is None else latent.z_positions


def backbone_of(lm: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (``model.model`` for Llama/Mistral)."""
    return getattr(lm, lm.base_model_prefix)


def hidden_states(lm: nn.Module, batch: dict) -> torch.Tensor:
    out = backbone_of(lm)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.last_hidden_state


def final_norm(lm: nn.Module) -> nn.Module:
    """The backbone's last normalisation layer (``model.norm`` for Llama/Mistral)."""
    norm = getattr(backbone_of(lm), "norm", None)
    if norm is None:
        raise ValueError(
            f"latent.z_injection=pre_norm needs a backbone with a final `norm` layer; {type(lm).__name__} has none"
        )
    return norm


def encode(lm: nn.Module, batch: dict, keep_pre_norm: bool = False):
    """``(hidden, pre_norm)``: the last hidden states and, with ``keep_pre_norm``, the final norm's input
    (captured by a hook during the same pass; None otherwise)."""
    if not keep_pre_norm:
        return hidden_states(lm, batch), None
    captured = {}
    handle = final_norm(lm).register_forward_hook(lambda _m, args, _out: captured.__setitem__("pre", args[0]))
    try:
        hidden = hidden_states(lm, batch)
    finally:
        handle.remove()
    return hidden, captured["pre"]


def response_logps(
    lm: nn.Module,
    hidden: torch.Tensor,
    batch: dict,
    z: torch.Tensor | None = None,
    z_positions: str = "response",
    pre_norm: torch.Tensor | None = None,
    with_logits: bool = False,
    z_kl: bool = False,
):
    """Summed log-probs of the response tokens, computing logits only where they are scored:
    ``(sums, counts)``, and with ``with_logits`` a third tensor, each row's sum over its response tokens of
    the mean logit over the vocabulary (TRL's ``logits/chosen`` is its total over the tokens' count).

    ``z`` (one row per sequence) is added to the hidden state before the LM head at
    the scored positions; unscored (prompt, padding) positions never reach the head.
    ``z_positions="all"`` adds z at every position and runs the head over all of them (as
    :func:`conditioned_on` does at generation); the scored log-probs are the same, at more cost.
    With ``pre_norm`` (the final norm's input, ``latent.z_injection=pre_norm``) z is added before the
    final norm instead: ``logits = W norm(h_pre + z)``.
    ``z_kl`` (with ``with_logits``): a fourth tensor, each row's sum over its response tokens of
    ``KL(softmax(logits with z) || softmax(logits without z))`` (``latent.lm_kl_weight``; None otherwise)."""
    target_mask = batch["response_mask"][:, 1:]  # token t+1 is predicted from position t
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(target_mask)[target_mask]
    head = lm.get_output_embeddings()
    if z is not None and pre_norm is not None:
        norm = final_norm(lm)
        if z_positions == "all":
            logits = head(norm(pre_norm[:, :-1] + z[:, None, :].to(pre_norm.dtype)))[target_mask].float()
        else:
            logits = head(norm(pre_norm[:, :-1][target_mask] + z[rows].to(pre_norm.dtype))).float()
    elif z is not None and z_positions == "all":
        logits = head(hidden[:, :-1] + z[:, None, :].to(hidden.dtype))[target_mask].float()
    else:
        h = hidden[:, :-1][target_mask]  # (N, d)
        if z is not None:
            h = h + z[rows].to(h.dtype)
        logits = head(h).float()
    labels = batch["input_ids"][:, 1:][target_mask]
    token_logps = logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    n = hidden.shape[0]
    sums = torch.zeros(n, device=hidden.device, dtype=token_logps.dtype).index_add_(0, rows, token_logps)
    counts = torch.bincount(rows, minlength=n)
    if with_logits:
        mean_logit = logits.detach().mean(-1)
        kl_sums = None
        if z_kl and z is not None:  # one more head pass over the scored positions, without z
            log_p = logits.log_softmax(-1)
            log_p0 = head(hidden[:, :-1][target_mask]).float().log_softmax(-1)
            token_kl = (log_p.exp() * (log_p - log_p0)).sum(-1)
            kl_sums = torch.zeros(n, device=hidden.device, dtype=token_kl.dtype).index_add_(0, rows, token_kl)
        return (
            sums,
            counts,
            torch.zeros(n, device=hidden.device, dtype=mean_logit.dtype).index_add_(0, rows, mean_logit),
            kl_sums,
        )
    return sums, counts


def prompt_mask(batch: dict) -> torch.Tensor:
    """(B, T) True at the prompt's tokens of a collated pair batch (real tokens that are not the response's)."""
    return batch["attention_mask"].bool() & ~batch["response_mask"]


def expected_hidden_norm(lm: nn.Module) -> float:
    """The typical norm of the final hidden state, known without data: the backbone ends in an
    RMSNorm/LayerNorm whose output is ``w * x_hat`` with ``x_hat`` of unit RMS, so its norm is about
    ``||w||_2`` (sqrt(d) for the initial w = 1). The tiny model measures 11.7 against sqrt(128) = 11.3.
    Deterministic (no batch), so every DDP rank calibrates the latent identically."""
    norm = getattr(backbone_of(lm), "norm", None)
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.numel() == lm.config.hidden_size:
        return float(weight.detach().float().norm())
    return float(lm.config.hidden_size) ** 0.5


class PreferenceModel(nn.Module):
    """``lm`` is any ``*ForCausalLM``; ``latent`` is None (baseline) or a :class:`lpc.latent.Latent`."""

    def __init__(self, lm: nn.Module, latent: nn.Module | None = None, calibrate: bool = True):
        """``calibrate``: scale a freshly built latent to the backbone's hidden-state norm (a loaded
        checkpoint overwrites the result, so it is harmless there too)."""
        super().__init__()
        self.lm = lm
        self.latent = latent
        if latent is not None and calibrate:
            latent.calibrate(expected_hidden_norm(lm))

    def latent_inputs(self, hidden: torch.Tensor, batch: dict):
        """``(h_prompt, h_chosen, h_rejected)`` from the stacked (chosen; rejected) hidden states, pooled as the
        latent says (``latent.pool``) over the prompt's and over each response's tokens."""
        half = hidden.shape[0] // 2
        h_prompt = self.latent.pooled(hidden[:half], prompt_mask(batch)[:half])  # same in both halves (causal)
        h_response = self.latent.pooled(hidden, batch["response_mask"])
        return h_prompt, h_response[:half], h_response[half:]

    def encode(self, batch: dict):
        """``(hidden, pre_norm)`` of one backbone pass; ``pre_norm`` only when z enters before the final norm."""
        return encode(self.lm, batch, keep_pre_norm=injection_of(self.latent) == "pre_norm")

    def score(
        self,
        hidden: torch.Tensor,
        batch: dict,
        z: torch.Tensor | None,
        pre_norm: torch.Tensor | None = None,
        with_logits: bool = False,
        z_kl: bool = False,
    ):
        """Response log-probs given one z per pair (``(B, d)``, shared by y_w and y_l) or none."""
        if z is not None:
            z = torch.cat([z, z])
        return response_logps(self.lm, hidden, batch, z, positions_of(self.latent), pre_norm, with_logits, z_kl)

    def forward(self, batch: dict, progress: float = 0.0, latent_mode: str = "train") -> PolicyOutput:
        hidden, pre_norm = self.encode(batch)
        latent_out = None
        if self.latent is not None:
            latent_out = self.latent(*self.latent_inputs(hidden, batch), progress=progress, mode=latent_mode)
        z = latent_out.z if latent_out is not None else None
        penalised = z is not None and self.latent.lm_kl_weight > 0
        logps, counts, logit_sums, z_kl = self.score(hidden, batch, z, pre_norm, with_logits=True, z_kl=penalised)
        return PolicyOutput(logps, counts, latent_out, logit_sums, z_kl)


@contextlib.contextmanager
def conditioned_on(lm: nn.Module, z: torch.Tensor | None, at: str = "head"):
    """Add ``z`` (shape (B, d) or (d,)) to the LM head's input (``at="head"``) or to the final norm's
    input (``at="pre_norm"``, ``latent.z_injection``) at every position while inside the context, so
    ``lm(...)``, ``lm.generate(...)`` or an evaluation harness run the z-conditioned policy. Only the
    positions whose logits are read matter, so this equals response-only injection."""
    if z is None:
        yield lm
        return
    head = final_norm(lm) if at == "pre_norm" else lm.get_output_embeddings()

    def add_z(_module, args):
        h = args[0]
        zz = z if z.dim() == 1 else z[:, None, :] if h.dim() == 3 else z
        return (h + zz.to(h.dtype),) + tuple(args[1:])

    handle = head.register_forward_pre_hook(add_z)
    try:
        yield lm
    finally:
        handle.remove()
