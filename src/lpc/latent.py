"""The LPC latent module: codebook, prior and posterior heads, Gumbel-softmax, the g schedule, KL.

It knows nothing of the trainer: it maps hidden states to a latent vector ``z`` (to be added to the
final hidden state before the LM head) and a per-pair ``KL(q || p)``. Inputs, all from the backbone
passes DPO already makes:

* ``h_prompt``   (B, d): last-layer state of the prompt                 -> prior  p(z | x)
* ``h_chosen``   (B, d): last-layer state of the response y_w
* ``h_rejected`` (B, d): last-layer state of the response y_l             -> posterior q(z | x, y_w > y_l)

"State of" is ``pool`` (``Latent.pooled``): the state at the last token (``last``, the reviewers' reading:
the prompt's last token, the sequence's last token) or the mean over the prompt's (the response's) tokens.

``progress`` in [0, 1] is the fraction of training done; it drives the mixing weight ``g`` that moves
the training z from the posterior's sample (g = 0) to the prior's (g = 1), the Gumbel temperature
annealing and the KL warm-up. Every choice the paper left open is a constructor argument;
docs/method.md gives the defaults and the measurements behind them.

Why z starts at exactly 0 and grows through a gate: z acts only through ``W_lm z``, a per-sequence logit
offset. Codes far below the hidden state's norm (std 0.02: ~0.3 against ~11) never act, at any learning
rate a run can afford; codes at the hidden state's norm act, but on a pretrained LM they are a random
offset of the size of the state itself (SmolLM2: NLL 3.4 -> 9.7 nats/token before any step), so the
policy is not the reference at step 0, as DPO requires. With ``gate_init=0`` the codes keep their
distinct directions at the hidden state's norm while ``z = gate x code`` is 0 at step 0 (the zero-conv /
LoRA trick): the first step's gradient reaches the gate alone, and the latent's own absolute learning
rate (``lr``: the gate is z's norm over the hidden state's, so the same value means the same on every
backbone) lets it grow at the paper's LM learning rates, where a multiple of 5e-7 would not move it
(docs/method.md, "LPC on a pretrained LM").
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lpc.errors import check_choice, require_number

SCHEDULES = ("linear", "constant", "cosine")
POSTERIOR_INPUTS = ("concat", "diff", "concat_diff")
DISCRETE_INFERENCE = ("expectation", "argmax", "sample")
CONTINUOUS_INFERENCE = ("mean", "sample")
Z_POSITIONS = ("response", "all")
Z_INJECTIONS = ("head", "pre_norm")
CODEBOOK_INITS = ("hidden", "normal", "zeros")
CODE_CENTERS = ("none", "usage", "batch")
HEAD_INPUTS = ("raw", "centered")
POOLS = ("last", "mean")


def pool_states(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, d): one state per row of ``hidden`` (B, T, d) over the positions ``mask`` (B, T) marks, the last
    of them (``last``) or their mean (``mean``, summed in float32)."""
    mask = mask.bool()
    if how == "last":
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, positions, -1).amax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if how == "mean":
        m = mask[..., None].float()
        return ((hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)).to(hidden.dtype)
    raise ValueError(f"latent.pool must be one of {POOLS}, got {how!r}")


def combine_states(h_chosen: torch.Tensor, h_rejected: torch.Tensor, how: str) -> torch.Tensor:
    """The posterior's input from the two responses' states; ``concat`` keeps the order, so the preference
    direction is visible."""
    if how == "concat":
        return torch.cat([h_chosen, h_rejected], -1)
    if how == "diff":
        return h_chosen - h_rejected
    if how == "concat_diff":
        return torch.cat([h_chosen, h_rejected, h_chosen - h_rejected], -1)
    raise ValueError(f"latent.posterior_input must be one of {POSTERIOR_INPUTS}, got {how!r}")


@dataclass
class LatentOutput:
    z: torch.Tensor  # (B, d) the latent added to the hidden states
    kl: torch.Tensor  # (B,) KL(q || p); zeros when no posterior input was given
    metrics: dict = field(default_factory=dict)
    prior_probs: torch.Tensor | None = None  # (B, K) discrete only
    posterior_probs: torch.Tensor | None = None  # (B, K) discrete only
    prior_mean: torch.Tensor | None = None  # (B, d) continuous only
    z_posterior: torch.Tensor | None = None  # (B, d) the posterior's code / mean (diagnostics, prior mode)

    def analysis(self) -> dict[str, torch.Tensor]:
        """Per-pair tensors for the latent analysis (code usage, NMI, t-SNE)."""
        out = {}
        if self.prior_probs is not None:
            out["prior_probs"] = self.prior_probs.detach()
            out["prior_code"] = self.prior_probs.argmax(-1)
        if self.posterior_probs is not None:
            out["posterior_code"] = self.posterior_probs.argmax(-1)
        if self.prior_mean is not None:
            out["prior_mean"] = self.prior_mean.detach()
        return out


def mixing_weight(progress: float, schedule: str, start: float = 0.0, end: float = 1.0, value: float = 1.0) -> float:
    """g(progress): 0 = the posterior's z, 1 = the prior's z.

    ``linear`` rises from 0 at ``start`` to 1 at ``end`` (fractions of training); ``cosine`` does the
    same along a half cosine; ``constant`` is ``value`` throughout."""
    if schedule == "constant":
        return float(value)
    t = min(max((progress - start) / max(end - start, 1e-12), 0.0), 1.0)
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * t))
    raise ValueError(f"latent.mix_schedule must be one of {SCHEDULES}, got {schedule!r}")


def annealed_temperature(progress: float, start: float, end: float | None) -> float:
    """Gumbel-softmax tau: exponential decay from ``start`` to ``end`` over training (``end=None``: constant)."""
    if end is None:
        return float(start)
    p = min(max(progress, 0.0), 1.0)
    return float(start * (end / start) ** p)


def kl_warmup_weight(progress: float, kl_weight: float, warmup: float) -> float:
    """lambda(progress): rises linearly from 0 to ``kl_weight`` over the first ``warmup`` fraction."""
    if warmup <= 0:
        return float(kl_weight)
    return float(kl_weight * min(max(progress / warmup, 0.0), 1.0))


def categorical_kl(q_logits: torch.Tensor, p_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(q || p) over the K codes, per row."""
    log_q, log_p = F.log_softmax(q_logits, -1), F.log_softmax(p_logits, -1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p) -> torch.Tensor:
    """Analytic KL(N(mu_q, var_q) || N(mu_p, var_p)) for diagonal Gaussians, summed over dimensions."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1.0).sum(-1)


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


def mean_over_processes(t: torch.Tensor) -> torch.Tensor:
    """``t`` averaged over the processes of a distributed run (``t`` itself in one process).

    Why: the running statistics are buffers that each process updates from its own micro-batch. DDP happens to
    broadcast rank 0's buffers before each forward, but ZeRO-3 and FSDP do not, so without this every rank would centre
    on its own statistics and compute another z for the same code (as SyncBatchNorm averages its batch statistics)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            t = t.clone()
            torch.distributed.all_reduce(t)
            t = t / world
    return t


class CenteredInput(nn.Module):
    """A head's input less its running mean over training batches, scaled to unit RMS per row.

    Why: a pretrained LM's state at the last prompt (or response) token is mostly the same for every pair (the
    chat template ends every prompt with the same tokens), so a head at the latent's learning rate moves every
    pair's logits the same way and the prior picks one code for all. Centred, what the head reads is how a pair
    differs from the others. The first training batch sets the mean; later ones move it by ``momentum``; the
    mean is a buffer (saved with the weights), so evaluation and a resumed run read the same one."""

    def __init__(self, dim: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("batches", torch.zeros(1, dtype=torch.long))  # (1,), not 0-d: as the gate, for ZeRO-3

    def forward(self, x: torch.Tensor, update: bool = False) -> torch.Tensor:
        if update:
            with torch.no_grad():
                batch = mean_over_processes(x.detach().mean(0).to(self.mean.dtype))
                self.mean.copy_(batch if int(self.batches) == 0 else self.mean.lerp(batch, self.momentum))
                self.batches += 1
        y = x - self.mean.to(x.dtype, copy=True)
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)


class Latent(nn.Module, abc.ABC):
    """What every latent is to the rest of the package: the policy, the trainer, evaluation, generation and
    steering use this interface and nothing else, so a new latent is a subclass here and a config file.

    * ``kind`` (class attribute): what the latent is (``discrete``, ``continuous``); ``inference_modes`` the
      values ``inference`` may take; ``name`` its config name.
    * ``z_injection`` where z enters (``head``: the LM head's input; ``pre_norm``: the final norm's input) and
      ``z_positions`` where (``response``: the scored positions; ``all``).
    * ``pooled(hidden, mask)``: the (B, d) state a head reads of a prompt or a response (``pool``); every caller
      makes ``h_prompt``, ``h_chosen`` and ``h_rejected`` with it, so training and inference read the same.
    * ``prior_z(h_prompt, inference=None)``: z from the prior p(z | x) for the prompt's pooled state.
    * code access, for latents made of a finite set of codes: ``num_codes`` (0: none), ``code_vector(k)``,
      ``prior_probs(h_prompt)`` (p(code | x); None without codes), and ``codes_in_config(cfg)``, the number of
      codes a saved ``latent.yaml`` describes, read before any weight loads.
    * ``forward(h_prompt, h_chosen, h_rejected, progress, mode)`` -> :class:`LatentOutput`, ``calibrate``,
      and what the trainer reads: ``kl_weight_at``, ``kl_free_bits``, ``lr``, ``head_lr``, ``lr_multiplier``,
      ``head_parameters``, ``lm_kl_weight``.

    The options every latent has (the subclasses pass them through ``**common``):

    ``kl_weight`` lambda; ``kl_warmup`` the fraction of training over which lambda rises from 0;
    ``kl_free_bits`` nats per pair charged no KL; ``posterior_input`` concat | diff | concat_diff;
    ``head_hidden_size`` the prior/posterior MLP width (None: the backbone's); ``mix_schedule``,
    ``mix_start``, ``mix_end``, ``mix_value`` the g schedule; ``z_positions`` response | all;
    ``z_injection`` head (z added to the LM head's input, after the final norm) | pre_norm (before it);
    ``gate_init`` the start of a learned scalar gain on z (0: z = 0 at step 0, the policy is the
    reference; None: no gain, z is the code itself); ``lr`` the latent's absolute learning rate (None:
    the LM's x ``lr_multiplier``); ``head_lr`` the prior and posterior heads' (None: ``lr``'s); ``lm_kl_weight`` mu of a penalty mu x KL(pi(.|x,z) || pi(.|x,0)) per
    response token, read by the policy and the trainer (0: off); ``head_input`` raw | centered (the heads read
    their input less its running mean, at unit RMS: :class:`CenteredInput`); ``running_momentum`` the update rate
    of the latent's running statistics (the heads' input means, the discrete codes' usage)."""

    kind: ClassVar[str]
    inference_modes: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        hidden_size: int,
        name: str,
        kl_weight: float = 0.05,
        kl_warmup: float = 0.0,
        kl_free_bits: float = 0.0,
        posterior_input: str = "concat",
        head_hidden_size: int | None = None,
        mix_schedule: str = "linear",
        mix_start: float = 0.0,
        mix_end: float = 1.0,
        mix_value: float = 1.0,
        z_positions: str = "response",
        z_injection: str = "head",
        lr_multiplier: float = 1.0,
        gate_init: float | None = 0.0,
        lr: float | None = None,
        head_lr: float | None = None,
        lm_kl_weight: float = 0.0,
        head_input: str = "raw",
        running_momentum: float = 0.05,
        pool: str = "last",
    ):
        super().__init__()
        check_choice("latent.head_input", head_input, HEAD_INPUTS)
        check_choice("latent.pool", pool, POOLS)
        require_number("latent.running_momentum", running_momentum, "a number in (0, 1]", lambda v: 0 < v <= 1)
        check_choice("latent.posterior_input", posterior_input, POSTERIOR_INPUTS)
        check_choice("latent.mix_schedule", mix_schedule, SCHEDULES)
        check_choice("latent.z_positions", z_positions, Z_POSITIONS)
        check_choice("latent.z_injection", z_injection, Z_INJECTIONS)
        require_number("latent.kl_weight", kl_weight, "a number >= 0 (lambda)", lambda v: v >= 0)
        require_number("latent.lr_multiplier", lr_multiplier, "a number > 0", lambda v: v > 0)
        require_number("latent.kl_warmup", kl_warmup, "a fraction of training in [0, 1]", lambda v: 0 <= v <= 1)
        require_number("latent.kl_free_bits", kl_free_bits, "a number of nats >= 0", lambda v: v >= 0)
        require_number("latent.lm_kl_weight", lm_kl_weight, "a number >= 0 (0: no penalty)", lambda v: v >= 0)
        if lr is not None:
            require_number("latent.lr", lr, "null (the LM's lr x lr_multiplier) or a number > 0", lambda v: v > 0)
        if head_lr is not None:
            require_number("latent.head_lr", head_lr, "null (latent.lr's) or a number > 0", lambda v: v > 0)
        if gate_init is not None:
            require_number("latent.gate_init", gate_init, "null (no gate) or a number (0: z = 0 at step 0)")
        for key, v in (("mix_start", mix_start), ("mix_end", mix_end), ("mix_value", mix_value)):
            require_number(f"latent.{key}", v, "a number in [0, 1]", lambda x: 0 <= x <= 1)
        self.hidden_size, self.kl_weight, self.name = hidden_size, kl_weight, name
        self.posterior_input, self.z_positions, self.z_injection = posterior_input, z_positions, z_injection
        # Read by the trainer: the optimizer gives the latent's parameters lr x lr_multiplier.
        self.lr_multiplier = float(lr_multiplier)
        self.lr = None if lr is None else float(lr)
        self.head_lr = None if head_lr is None else float(head_lr)
        self.lm_kl_weight = float(lm_kl_weight)
        # z = gate x (the latent's own z): one number, so it reads as ||z|| / ||h|| for codes at the hidden norm.
        # Shape (1,), not 0-d: DeepSpeed's ZeRO-3 broadcast cannot view a 0-d parameter as bytes.
        self.gate = None if gate_init is None else nn.Parameter(torch.tensor([float(gate_init)]))
        self.kl_warmup, self.kl_free_bits = float(kl_warmup), float(kl_free_bits)
        self.mix = dict(schedule=mix_schedule, start=mix_start, end=mix_end, value=mix_value)
        self.head_hidden_size = head_hidden_size or hidden_size
        self.posterior_in = {"concat": 2, "diff": 1, "concat_diff": 3}[posterior_input] * hidden_size
        self.head_input, self.running_momentum, self.pool = head_input, float(running_momentum), pool
        if head_input == "centered":
            self.prior_center = CenteredInput(hidden_size, self.running_momentum)
            self.posterior_center = CenteredInput(self.posterior_in, self.running_momentum)

    def pooled(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, d) what a head reads of the (B, T, d) last-layer states at the positions ``mask`` marks (the prompt's
        for the prior, a response's for the posterior), per ``pool``. Why ``mean`` exists: a chat template ends
        every prompt with the same tokens, and SmolLM2's state there carries the prompt's content only faintly
        (docs/method.md §7)."""
        return pool_states(hidden, mask, self.pool)

    def prior_features(self, h_prompt: torch.Tensor, update: bool = False) -> torch.Tensor:
        """What the prior head reads (``update``: a training batch, which moves the running mean)."""
        x = h_prompt.to(self.dtype)
        return self.prior_center(x, update) if self.head_input == "centered" else x

    def posterior_features(self, h_chosen, h_rejected, update: bool = False) -> torch.Tensor:
        x = self.combine(h_chosen, h_rejected).to(self.dtype)
        return self.posterior_center(x, update) if self.head_input == "centered" else x

    def combine(self, h_chosen, h_rejected):
        """The posterior's input (``posterior_input``)."""
        return combine_states(h_chosen, h_rejected, self.posterior_input)

    def g(self, progress: float) -> float:
        return mixing_weight(progress, **self.mix)

    def kl_weight_at(self, progress: float) -> float:
        """The lambda in force at ``progress`` (after the optional KL warm-up)."""
        return kl_warmup_weight(progress, self.kl_weight, self.kl_warmup)

    def calibrate(self, hidden_norm: float) -> None:
        """Called once with the backbone's typical final hidden-state norm (see ``lpc.policy``)."""

    def head_parameters(self) -> list[nn.Parameter]:
        """The prior's and posterior's MLPs (``head_lr``); the rest (codes, gate) make z itself (``lr``)."""
        return [*self.prior.parameters(), *self.posterior.parameters()]

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` through the learned gain (unchanged without one)."""
        return x if self.gate is None else self.gate * x

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    @abc.abstractmethod
    def prior_z(self, h_prompt: torch.Tensor, inference: str | None = None) -> torch.Tensor:
        """(B, d) z from the prior p(z | x) in the mode ``inference`` (None: ``self.inference``)."""

    def prior_probs(self, h_prompt: torch.Tensor) -> torch.Tensor | None:
        """(B, K) the prior's probability of each code; None for a latent without codes."""
        return None

    @property
    def num_codes(self) -> int:
        """How many codes z is chosen from (0: z is not one of a finite set of codes)."""
        return 0

    def code_vector(self, k: int) -> torch.Tensor:
        """(d,) the z of code ``k``."""
        raise ValueError(f"code={k!r} is not allowed: a {self.kind} latent has no codes")

    @classmethod
    def codes_in_config(cls, cfg) -> int:
        """``num_codes`` of the latent a saved config (``latent.yaml``) builds, without building it."""
        return 0


def all_inference_modes() -> tuple[str, ...]:
    """Every latent's inference modes, for checks made before a checkpoint (and its latent's kind) is read."""
    kinds, modes = list(Latent.__subclasses__()), []
    while kinds:
        cls = kinds.pop(0)
        kinds += cls.__subclasses__()
        modes += [m for m in getattr(cls, "inference_modes", ()) if m not in modes]
    return tuple(modes)


class DiscreteLatent(Latent):
    """K learned codes e_k in R^d; ``z = w E`` with Gumbel-softmax weights ``w``."""

    kind = "discrete"
    inference_modes = DISCRETE_INFERENCE

    def __init__(
        self,
        hidden_size: int,
        codebook_size: int = 32,
        temperature: float = 1.0,
        temperature_min: float | None = None,
        hard: bool = True,
        codebook_init: str = "zeros",
        codebook_init_scale: float = 1.0,
        inference: str = "expectation",
        name: str = "discrete",
        gate_init: float | None = None,
        center: str = "none",
        **common,
    ):
        super().__init__(hidden_size, name=name, gate_init=gate_init, **common)
        check_choice("latent.center", center, CODE_CENTERS)
        if codebook_init == "zeros" and gate_init == 0:
            raise ValueError(
                "latent.gate_init=0 with latent.codebook_init=zeros: z = gate x code would get no gradient (both "
                "factors start at 0); use one of them (gate_init=null with zeros, or codebook_init=hidden with a gate)"
            )
        require_number("codebook", codebook_size, "an integer >= 1 (the number of codes K)", lambda v: v >= 1, True)
        require_number("latent.temperature", temperature, "a number > 0", lambda v: v > 0)
        if temperature_min is not None:
            require_number(
                "latent.temperature_min", temperature_min, "null (no annealing) or a number > 0", lambda v: v > 0
            )
        check_choice("latent.inference", inference, DISCRETE_INFERENCE)
        check_choice("latent.codebook_init", codebook_init, CODEBOOK_INITS)
        require_number("latent.codebook_init_scale", codebook_init_scale, "a number >= 0", lambda v: v >= 0)
        self.codebook_size, self.hard, self.inference = codebook_size, hard, inference
        self.temperature, self.temperature_min = float(temperature), temperature_min
        self.codebook_init, self.codebook_init_scale = codebook_init, float(codebook_init_scale)
        # "normal": i.i.d. N(0, scale^2) entries; "hidden": rescaled in calibrate() to rows of norm
        # scale x the hidden state's norm (the draw is the same, only its length changes); "zeros": every
        # code 0 (z = 0 at step 0 without a gate; codes then grow apart from their own pairs' gradients).
        std = {"normal": codebook_init_scale, "hidden": 1.0 / math.sqrt(hidden_size), "zeros": 0.0}[codebook_init]
        self.codebook = nn.Parameter(torch.randn(codebook_size, hidden_size) * std)
        self.prior = _mlp(hidden_size, self.head_hidden_size, codebook_size)
        self.posterior = _mlp(self.posterior_in, self.head_hidden_size, codebook_size)
        # center="usage": every code is measured from the codes' mean under their running usage u, so the average
        # z over the pairs is 0. What all pairs share (the common direction of the DPO gradient) then cannot enter
        # z, whose codes learn only from how their pairs differ from the rest (the gradient on code j is
        # sum_i g_i (w_ij - u_j)): one code taking every pair is z = 0, not a shared offset. center="batch" centres
        # a training batch on its own mean code weights (gradient included: a pair's code is then chosen by how
        # its gradient differs from the batch's, so the pairs gain nothing by all moving to one code before u
        # catches up); evaluation and generation, with no batch to speak of, use u as center=usage does.
        self.center = center
        if center != "none":
            self.register_buffer("usage", torch.full((codebook_size,), 1.0 / codebook_size))

    def calibrate(self, hidden_norm: float) -> None:
        if self.codebook_init == "hidden":
            with torch.no_grad():
                rows = self.codebook.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                self.codebook.mul_(self.codebook_init_scale * hidden_norm / rows)

    def codes(self) -> torch.Tensor:
        """The K vectors z is made of: the codebook (less its usage-weighted mean, with center=usage|batch) through the gate."""
        book = self.codebook
        if self.center != "none":
            book = book - self.usage.to(book.dtype, copy=True) @ book  # a copy: training updates the buffer in place
        return self.gated(book)

    @property
    def num_codes(self) -> int:
        return self.codebook_size

    @classmethod
    def codes_in_config(cls, cfg) -> int:
        return int(cfg["codebook_size"])

    def code_vector(self, k: int) -> torch.Tensor:
        if not 0 <= k < self.codebook_size:
            raise ValueError(f"code must be in [0, {self.codebook_size - 1}], got {k}")
        return self.codes()[k]

    def tau(self, progress: float) -> float:
        return annealed_temperature(progress, self.temperature, self.temperature_min)

    def _draw(self, logits, tau: float) -> torch.Tensor:
        """(B, K) Gumbel-softmax code weights (one-hot with ``hard``)."""
        return F.gumbel_softmax(logits, tau=tau, hard=self.hard)

    def prior_z(self, h_prompt: torch.Tensor, inference: str | None = None) -> torch.Tensor:
        return self._prior_z_of(self.prior_logits(h_prompt), inference)

    def prior_probs(self, h_prompt: torch.Tensor) -> torch.Tensor:
        return self.prior_logits(h_prompt).softmax(-1)

    def _prior_z_of(self, p_logits: torch.Tensor, inference: str | None = None) -> torch.Tensor:
        mode = inference or self.inference
        if mode == "expectation":
            return p_logits.softmax(-1) @ self.codes()
        if mode == "argmax":
            return self.codes()[p_logits.argmax(-1)]
        if mode == "sample":
            return F.gumbel_softmax(p_logits, tau=self.temperature, hard=True) @ self.codes()
        raise ValueError(f"latent.inference must be one of {DISCRETE_INFERENCE}, got {mode!r}")

    def prior_logits(self, h_prompt, update: bool = False):
        return self.prior(self.prior_features(h_prompt, update))

    def forward(
        self, h_prompt, h_chosen=None, h_rejected=None, progress: float = 1.0, mode: str = "train"
    ) -> LatentOutput:
        train = mode == "train"
        p_logits = self.prior_logits(h_prompt, update=train)
        q_logits = None
        if h_chosen is not None:
            q_logits = self.posterior(self.posterior_features(h_chosen, h_rejected, update=train))
        tau = self.tau(progress)
        z_post = None
        if mode == "train":
            if q_logits is None:
                raise ValueError("training needs the posterior's inputs (h_chosen, h_rejected)")
            g = self.g(progress)
            # Only the samples that enter z are drawn (g = 0 or 1 at the ends of the schedule).
            w = 0.0
            for weight, logits in ((g, p_logits), (1.0 - g, q_logits)):  # the prior's draw first
                if weight > 0:
                    w = w + weight * self._draw(logits, tau)
            if self.center == "batch":  # the batch's own mean code weights, with their gradient
                z = (w - w.mean(0)) @ self.gated(self.codebook)
            else:
                z = w @ self.codes()  # center=usage: centred on the running usage before this batch
            if self.center != "none":
                with torch.no_grad():
                    batch = mean_over_processes(w.detach().mean(0).to(self.usage.dtype))
                    self.usage.lerp_(batch, self.running_momentum)
        elif mode == "prior":
            g, z = 1.0, self._prior_z_of(p_logits)
            if q_logits is not None:
                z_post = self.codes()[q_logits.argmax(-1)]
        else:
            raise ValueError(f"mode must be 'train' or 'prior', got {mode!r}")
        kl = categorical_kl(q_logits, p_logits) if q_logits is not None else torch.zeros_like(p_logits[:, 0])
        p = p_logits.softmax(-1).detach()
        q = q_logits.softmax(-1).detach() if q_logits is not None else p
        usage = q.mean(0)
        usage_entropy = -(usage * usage.clamp_min(1e-12).log()).sum()
        prior_entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        metrics = {
            "latent/kl": kl.detach().mean(),
            "latent/g": torch.tensor(g),
            "latent/temperature": torch.tensor(tau),
            "latent/prior_entropy": prior_entropy,
            "latent/prior_entropy_normalized": prior_entropy / max(math.log(self.codebook_size), 1e-12),
            "latent/code_usage_entropy": usage_entropy,
            "latent/code_perplexity": usage_entropy.exp(),
            "latent/prior_posterior_agreement": (p.argmax(-1) == q.argmax(-1)).float().mean(),
            "latent/z_norm": z.detach().norm(dim=-1).mean(),
        }
        if self.gate is not None:
            metrics["latent/gate"] = self.gate.detach()
        return LatentOutput(
            z=z,
            kl=kl,
            metrics=metrics,
            prior_probs=p,
            posterior_probs=q if q_logits is not None else None,
            z_posterior=z_post,
        )


class ContinuousLatent(Latent):
    """The rebuttal's continuous ablation: Gaussian prior/posterior heads (mean, log-variance),
    a reparameterised sample and the analytic Gaussian KL; z is injected like the discrete one.

    The heads describe ``u ~ N(mu, diag(exp(logvar)))`` in units of ``z_scale``, and ``z = z_scale * u``
    with ``z_scale = mean_scale x hidden_norm / sqrt(d)`` (set by ``calibrate``): a u of unit RMS per
    coordinate is a z of mean_scale x the hidden state's norm. The KL, invariant to that common scale,
    is computed on u. The mean heads start at zero with log-variance ``init_logvar``, so the training
    samples u ~ N(0, exp(init_logvar)) are not 0: only the gate (``gate_init=0``) makes z = 0 at step 0.
    A tiny initial variance (-8) made KL(q||p) = 0.5 e^8 |mu_q - mu_p|^2 at the start, so the posterior
    could carry nothing and z stayed at 0 (measured: z / hidden norm 0.001, no decision changed)."""

    kind = "continuous"
    inference_modes = CONTINUOUS_INFERENCE

    def __init__(
        self,
        hidden_size: int,
        inference: str = "mean",
        init_logvar: float = 0.0,
        mean_scale: float = 1.0,
        name: str = "continuous",
        **common,
    ):
        super().__init__(hidden_size, name=name, **common)
        check_choice("latent.inference", inference, CONTINUOUS_INFERENCE)
        require_number("latent.mean_scale", mean_scale, "a number > 0", lambda v: v > 0)
        self.inference, self.mean_scale = inference, float(mean_scale)
        # Not a parameter: z's unit, fixed by calibrate() (saved with the weights).
        self.register_buffer("z_scale", torch.tensor(1.0))
        self.prior = _mlp(hidden_size, self.head_hidden_size, 2 * hidden_size)
        self.posterior = _mlp(self.posterior_in, self.head_hidden_size, 2 * hidden_size)
        for head in (self.prior, self.posterior):
            nn.init.zeros_(head[-1].weight)
            with torch.no_grad():
                head[-1].bias.zero_()
                head[-1].bias[hidden_size:] = init_logvar

    def calibrate(self, hidden_norm: float) -> None:
        self.z_scale.fill_(self.mean_scale * hidden_norm / math.sqrt(self.hidden_size))

    def _params(self, head, x):
        """(mu, logvar) of u, the latent in units of z_scale, from the head's (prepared) input ``x``."""
        mu, logvar = head(x).chunk(2, -1)
        return mu, logvar.clamp(-20.0, 10.0)

    @staticmethod
    def _sample(mu, logvar):
        return mu + torch.randn_like(mu) * (0.5 * logvar).exp()

    def scale(self) -> torch.Tensor:
        """z per unit of u: z_scale through the gate."""
        return self.gated(self.z_scale)

    def prior_z(self, h_prompt: torch.Tensor, inference: str | None = None) -> torch.Tensor:
        mu, logvar = self._params(self.prior, self.prior_features(h_prompt))
        return self.scale() * (mu if (inference or self.inference) == "mean" else self._sample(mu, logvar))

    def forward(
        self, h_prompt, h_chosen=None, h_rejected=None, progress: float = 1.0, mode: str = "train"
    ) -> LatentOutput:
        train = mode == "train"
        mu_p, lv_p = self._params(self.prior, self.prior_features(h_prompt, update=train))
        post = None
        if h_chosen is not None:
            post = self._params(self.posterior, self.posterior_features(h_chosen, h_rejected, update=train))
        z_post = None
        if mode == "train":
            if post is None:
                raise ValueError("training needs the posterior's inputs (h_chosen, h_rejected)")
            g = self.g(progress)
            u = g * self._sample(mu_p, lv_p) + (1.0 - g) * self._sample(*post)
        elif mode == "prior":
            g = 1.0
            u = mu_p if self.inference == "mean" else self._sample(mu_p, lv_p)
            z_post = self.scale() * post[0] if post is not None else None
        else:
            raise ValueError(f"mode must be 'train' or 'prior', got {mode!r}")
        z = self.scale() * u
        kl = gaussian_kl(*post, mu_p, lv_p) if post is not None else torch.zeros_like(mu_p[:, 0])
        metrics = {
            "latent/kl": kl.detach().mean(),
            "latent/g": torch.tensor(g),
            "latent/prior_std": (0.5 * lv_p.detach()).exp().mean(),
            "latent/z_norm": z.detach().norm(dim=-1).mean(),
        }
        if self.gate is not None:
            metrics["latent/gate"] = self.gate.detach()
        return LatentOutput(z=z, kl=kl, metrics=metrics, prior_mean=self.scale() * mu_p, z_posterior=z_post)
