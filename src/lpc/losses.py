"""Preference losses as small pure functions of per-sequence log-probabilities.

Every function takes 1-D tensors with one entry per pair and returns per-pair
``losses`` plus the implicit ``chosen_rewards`` / ``rejected_rewards`` used for
the TRL-style metrics and for preference accuracy (a pair is "correct" when the
chosen reward exceeds the rejected one).

The algorithm objects below (``DPO``, ``SimPO``, ``IPO``) are what the ``algo``
config group instantiates: they hold the hyper-parameters and say which
log-probs they need (summed or length-averaged, with or without a reference).
LPC does not get its own copies of these losses: by the general rule of the
paper (Sec. 3.4) it evaluates the same loss with a z-conditioned policy and adds
``lambda * KL(q || p)``, see :func:`lpc_objective`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


class LossOutput(NamedTuple):
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> LossOutput:
    """DPO (Rafailov et al. 2023): ``-log sigmoid(beta * (rho_w - rho_l))``,
    with ``rho = log pi(y|x) - log pi_ref(y|x)`` summed over the response."""
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def simpo_loss(
    policy_chosen_avg_logps: torch.Tensor, policy_rejected_avg_logps: torch.Tensor, beta: float, gamma: float
) -> LossOutput:
    """SimPO (Meng et al. 2024): ``-log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)``.

    Takes length-averaged log-probs; reference-free; ``gamma`` is the absolute
    target margin (TRL's ``gamma_beta_ratio`` is ``gamma / beta``)."""
    chosen_rewards = beta * policy_chosen_avg_logps
    rejected_rewards = beta * policy_rejected_avg_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    tau: float,
) -> LossOutput:
    """IPO (Azar et al. 2023): ``(h - 1/(2 tau))^2`` with ``h = rho_w - rho_l``.

    Whether the log-probs are summed or length-averaged is decided by the caller
    (``IPO.length_normalize``); rewards are the unscaled log-ratios ``rho``."""
    chosen_rewards = policy_chosen_logps - ref_chosen_logps
    rejected_rewards = policy_rejected_logps - ref_rejected_logps
    losses = (chosen_rewards - rejected_rewards - 1.0 / (2.0 * tau)) ** 2
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def lpc_objective(
    losses_given_z: torch.Tensor, kl: torch.Tensor, kl_weight: float, free_bits: float = 0.0
) -> torch.Tensor:
    """The LPC rule (paper Sec. 3.4): an objective ``-log f(x, y_w, y_l)`` becomes
    ``-(E_{z~q} log f(x, y_w, y_l, z) - lambda KL(q||p))``.

    ``losses_given_z`` is the baseline loss evaluated with the z-conditioned policy
    (one reparameterised sample of z per pair estimates the expectation). ``free_bits`` (nats, 0 = the
    paper's objective) charges no KL below that level per pair (Kingma et al. 2016), so the posterior
    is not pulled onto the prior before the codes mean anything."""
    if free_bits > 0:
        kl = kl.clamp_min(free_bits)
    return losses_given_z + kl_weight * kl


# --------------------------------------------------------------------------
# Algorithm objects (the `algo` config group instantiates these).
# --------------------------------------------------------------------------


@dataclass
class DPO:
    beta: float = 0.1
    name: str = "dpo"
    needs_reference = True
    average_logps = False

    def __call__(self, chosen, rejected, ref_chosen=None, ref_rejected=None) -> LossOutput:
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)


@dataclass
class SimPO:
    beta: float = 2.0
    gamma: float = 1.0
    name: str = "simpo"
    needs_reference = False
    average_logps = True

    def __call__(self, chosen, rejected, ref_chosen=None, ref_rejected=None) -> LossOutput:
        return simpo_loss(chosen, rejected, self.beta, self.gamma)


@dataclass
class IPO:
    tau: float = 0.1
    length_normalize: bool = True
    name: str = "ipo"
    needs_reference = True

    @property
    def average_logps(self) -> bool:
        return self.length_normalize

    def __call__(self, chosen, rejected, ref_chosen=None, ref_rejected=None) -> LossOutput:
        return ipo_loss(chosen, rejected, ref_chosen, ref_rejected, self.tau)
