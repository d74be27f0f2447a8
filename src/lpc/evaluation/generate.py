"""Generate from a trained checkpoint, with z from the prior or with a code the user picks.

    lpc-generate CHECKPOINT prompt="..." [code=3] [max_new_tokens=64] [greedy=true] ...

CHECKPOINT is a run directory, its ``final/`` or a checkpoint directory (``lpc.training.rundir.RunDir.of``).
For an LPC checkpoint, z is added where the latent injects it (``Latent.z_injection``) at every position
(``lpc.policy.conditioned_on``): by default z comes from the prior p(z|x) computed from the prompt's last
hidden state (the latent's configured inference mode, or ``inference=``); ``code=k`` uses the latent's code k
instead, so one can see what a code does. A baseline checkpoint (no latent) just generates. Python use:
``generate(model, tokenizer, prompts, code=3)``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lpc.data import encode_prompt
from lpc.errors import GenerateError  # noqa: F401  (raised here; defined with the others)
from lpc.evaluation.options import option, parse_command, usage, wants_help
from lpc.latent import all_inference_modes
from lpc.policy import conditioned_on, hidden_states, injection_of
from lpc.training.checkpoint import load_checkpoint, saved_latent
from lpc.training.rundir import RunDir


@dataclass
class GenerateOptions:
    """The options of ``lpc-generate``."""

    prompt: list[str] = option([], "the prompt; repeat the key for several prompts (required)", repeat=True)
    code: int | None = option(
        None, "use code K of the latent as z instead of the prior's z", "an integer >= 0 (a code)", lambda v: v >= 0
    )
    inference: str | None = option(
        None, "z from the prior in this mode (null: the checkpoint's latent.inference)", choices=all_inference_modes
    )
    max_new_tokens: int = option(64, "tokens to generate", "an integer >= 1", lambda v: v >= 1)
    seed: int = option(0, "the same seed gives the same text", "an integer >= 0", lambda v: v >= 0)
    temperature: float = option(1.0, "sampling temperature", "a number > 0", lambda v: v > 0)
    top_p: float = option(1.0, "nucleus sampling", "a number in (0, 1]", lambda v: 0 < v <= 1)
    greedy: bool = option(False, "greedy decoding instead of sampling")
    chat_template: str = option(
        "auto",
        "wrap the prompt in the tokenizer's chat template; auto: as the run trained (data.chat_template)",
        choices=("auto", "true", "false"),
    )
    top_codes: int = option(5, "how many of the prior's codes to print", "an integer >= 0", lambda v: v >= 0)


@dataclass
class Generation:
    prompt: str
    text: str
    z_source: str  # "none" | "code K" | "prior (MODE)"
    prior_probs: torch.Tensor | None = None  # (K,) the prior over the codes (a latent made of codes only)
    token_ids: list[int] = field(default_factory=list)

    def top_codes(self, n: int = 5) -> list[tuple[int, float]]:
        if self.prior_probs is None:
            return []
        p, k = self.prior_probs.topk(min(n, self.prior_probs.numel()))
        return list(zip(k.tolist(), p.tolist()))


# ---------------------------------------------------------------------- the core (usable from Python)
def check_code(latent, code: int | None) -> None:
    """A clear error for ``code=`` on a checkpoint whose latent has no codes, or out of range."""
    if code is None:
        return
    if latent is None:
        raise GenerateError(
            "code= needs an LPC checkpoint with a latent made of codes; this checkpoint has no latent "
            "(a baseline run): drop code="
        )
    _check_code_range(code, latent.num_codes, latent.kind)


def _check_code_range(code, num_codes: int, kind: str) -> None:
    if num_codes == 0:
        raise GenerateError(f"code= needs a latent made of codes; this checkpoint's latent is {kind!r}: drop code=")
    if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code < num_codes:
        raise GenerateError(
            f"code={code!r} is not allowed: an integer in [0, {num_codes - 1}] (this checkpoint has {num_codes} codes)"
        )


def _check_inference(mode: str, kind: str, allowed: tuple) -> None:
    if mode not in allowed:
        raise GenerateError(f"inference={mode!r} is not allowed for a {kind} latent: one of {allowed}")


def latent_z(model, input_ids: torch.Tensor, code: int | None = None, inference: str | None = None):
    """``(z, prior_probs, z_source)`` for one encoded prompt (shape (1, T)).

    z is the latent's code ``code`` if one is given, else the prior's z from the prompt's hidden states, pooled
    as in training (``latent.pool``). Baselines give ``(None, None, "none")``."""
    latent = model.latent
    check_code(latent, code)
    if latent is None:
        return None, None, "none"
    if code is not None:
        return latent.code_vector(code), None, f"code {code}"
    mode = inference or latent.inference
    _check_inference(mode, latent.kind, latent.inference_modes)
    every = torch.ones_like(input_ids)
    h_x = latent.pooled(hidden_states(model.lm, {"input_ids": input_ids, "attention_mask": every}), every)
    probs = latent.prior_probs(h_x)
    return latent.prior_z(h_x, mode)[0], None if probs is None else probs[0].float(), f"prior ({mode})"


@torch.no_grad()
def new_tokens(
    model, tokenizer, ids: torch.Tensor, z, max_new_tokens: int, greedy: bool, temperature: float, top_p: float
) -> torch.Tensor:
    """(rows, new) the tokens ``model.lm`` generates after the unpadded prompts ``ids`` with ``z`` (None, one
    (d,) vector, or a row each) added where the latent adds it; sampling draws from the whole vocabulary
    (``top_k`` off) unless ``top_p`` cuts it."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
    with conditioned_on(model.lm, z, at=injection_of(model.latent)):
        seq = model.lm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
    return seq[:, ids.shape[1] :]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: str | list[str],
    code: int | None = None,
    max_new_tokens: int = 64,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    chat_template: bool = False,
    inference: str | None = None,
) -> list[Generation]:
    """Generate one continuation per prompt with a ``PreferenceModel`` (``model.lm`` + ``model.latent``).

    Prompts are encoded as in training (:func:`lpc.data.encode_prompt`: optional chat template,
    exactly one BOS) and run one at a time, so the prior sees the same unpadded positions as in
    training. The global RNG is seeded with ``seed`` inside a forked RNG state: the same seed gives
    the same output and the caller's RNG is left untouched."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    check_code(model.latent, code)
    device = next(model.lm.parameters()).device
    model.eval()
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for prompt in prompts:
            ids = torch.tensor([encode_prompt(tokenizer, prompt, chat_template)], device=device)
            z, probs, source = latent_z(model, ids, code, inference)
            new = new_tokens(model, tokenizer, ids, z, max_new_tokens, greedy, temperature, top_p)[0].tolist()
            out.append(
                Generation(
                    prompt,
                    tokenizer.decode(new, skip_special_tokens=True),
                    source,
                    probs.cpu() if probs is not None else None,
                    new,
                )
            )
    return out


# ---------------------------------------------------------------------- the command
def parse_args(argv: list[str]) -> tuple[Path, GenerateOptions]:
    """``CHECKPOINT key=value ...`` -> (path, options); every check that needs no model runs here."""
    path, opts = parse_command(argv, GenerateOptions, GenerateError, run="CHECKPOINT")
    if not opts.prompt:
        raise GenerateError('prompt= is required, e.g. prompt="Explain the rules of chess."')
    return path, opts


def check_checkpoint(path: Path, opts: GenerateOptions) -> Path:
    """The checkpoint's model directory, checked against its small config files before its weights load."""
    try:
        model_dir = RunDir.of(path).require_model()
    except FileNotFoundError as err:
        raise GenerateError(str(err)) from None
    saved = saved_latent(model_dir)
    if saved is None and (opts.code is not None or opts.inference is not None):
        key = "code" if opts.code is not None else "inference"
        raise GenerateError(f"{key}= needs an LPC checkpoint; this checkpoint has no latent (a baseline run)")
    if saved is not None:
        cls, latent_cfg = saved
        if opts.code is not None:
            _check_code_range(opts.code, cls.codes_in_config(latent_cfg), cls.kind)
        if opts.inference is not None:
            _check_inference(opts.inference, cls.kind, cls.inference_modes)
    return model_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or wants_help(argv):
        print(usage(GenerateOptions, __doc__, "lpc-generate", run="CHECKPOINT"))
        return 0 if argv else 2
    try:
        path, opts = parse_args(argv)
        model_dir = check_checkpoint(path, opts)
    except GenerateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model, tokenizer, cfg = load_checkpoint(model_dir)
    chat = opts.chat_template == "true" or (
        opts.chat_template == "auto" and bool(cfg is not None and cfg.get("data", {}).get("chat_template", False))
    )
    # The options named like generate()'s parameters are passed as they are; chat_template is resolved above.
    sampling = {k: getattr(opts, k) for k in ("code", "max_new_tokens", "seed", "temperature", "top_p", "greedy")}
    chat = bool(chat and tokenizer.chat_template)
    results = generate(model, tokenizer, opts.prompt, **sampling, chat_template=chat, inference=opts.inference)
    for r in results:
        print(f"### prompt: {r.prompt}")
        print(f"### z: {r.z_source}")
        if r.prior_probs is not None and opts.top_codes > 0:
            codes = ", ".join(f"{k}: {p:.3f}" for k, p in r.top_codes(opts.top_codes))
            print(f"### prior p(z|x), top codes: {codes}")
        print(r.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
