"""Generate from a trained checkpoint, with z from the prior or with a code the user picks.

    lpc-generate CHECKPOINT prompt="..." [code=3] [max_new_tokens=64] [seed=0]
                           [temperature=1.0] [top_p=1.0] [greedy=false] [inference=...]

CHECKPOINT is a run directory or its ``final/``. For an LPC checkpoint, z is added to the LM head's
input at every position (``lpc.policy.conditioned_on``): by default z comes from the prior p(z|x)
computed from the prompt's last hidden state (the latent's configured inference mode, or
``inference=``); ``code=k`` uses codebook row k instead, so one can see what a code does. A baseline
checkpoint (no latent) just generates. Python use: ``generate(model, tokenizer, prompts, code=3)``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lpc.data import encode_prompt
from lpc.errors import GenerateError  # noqa: F401  (raised here; defined with the others)
from lpc.evaluation import is_option
from lpc.latent import CONTINUOUS_INFERENCE, DISCRETE_INFERENCE
from lpc.policy import conditioned_on, hidden_states

USAGE = (
    __doc__.split("\n\n")[1]
    + """
Arguments (key=value, like the training command's overrides):
  prompt=TEXT           the prompt (repeat the key for several prompts); required
  code=K                LPC discrete checkpoints only: use codebook row K (0 <= K < codebook size)
  inference=MODE        z from the prior: expectation | argmax | sample (discrete), mean | sample (continuous);
                        default: the checkpoint's latent.inference
  max_new_tokens=N      default 64
  seed=N                default 0; the same seed gives the same text
  temperature=T         sampling temperature > 0, default 1.0
  top_p=P               nucleus sampling, 0 < P <= 1, default 1.0
  greedy=true|false     greedy decoding instead of sampling, default false
  chat_template=auto|true|false   wrap the prompt in the tokenizer's chat template; auto (default) does so
                        when the run trained with data.chat_template=true and the tokenizer has one
  top_codes=N           how many of the prior's codes to print, default 5
"""
)

DEFAULTS = {
    "code": None,
    "inference": None,
    "max_new_tokens": 64,
    "seed": 0,
    "temperature": 1.0,
    "top_p": 1.0,
    "greedy": False,
    "chat_template": "auto",
    "top_codes": 5,
}


@dataclass
class Generation:
    prompt: str
    text: str
    z_source: str  # "none" | "code K" | "prior (MODE)"
    prior_probs: torch.Tensor | None = None  # (K,) discrete LPC only
    token_ids: list[int] = field(default_factory=list)

    def top_codes(self, n: int = 5) -> list[tuple[int, float]]:
        if self.prior_probs is None:
            return []
        p, k = self.prior_probs.topk(min(n, self.prior_probs.numel()))
        return list(zip(k.tolist(), p.tolist()))


# ---------------------------------------------------------------------- the core (usable from Python)
def check_code(latent, code: int | None) -> None:
    """A clear error for ``code=`` on a checkpoint that has no codebook, or out of range."""
    if code is None:
        return
    if latent is None:
        raise GenerateError(
            "code= needs an LPC checkpoint with a discrete latent; this checkpoint has no latent "
            "(a baseline run): drop code="
        )
    if not hasattr(latent, "codebook_size"):
        raise GenerateError(
            f"code= needs a discrete latent (a codebook); this checkpoint's latent is "
            f"{getattr(latent, 'name', type(latent).__name__)!r}: drop code="
        )
    if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code < latent.codebook_size:
        raise GenerateError(
            f"code={code!r} is not allowed: an integer in [0, {latent.codebook_size - 1}] "
            f"(this checkpoint has {latent.codebook_size} codes)"
        )


def latent_z(model, input_ids: torch.Tensor, code: int | None = None, inference: str | None = None):
    """``(z, prior_probs, z_source)`` for one encoded prompt (shape (1, T)).

    z is codebook[code] if a code is given, else the prior's z from the hidden state at the prompt's
    last token (the position the prior reads in training). Baselines give ``(None, None, "none")``."""
    latent = model.latent
    check_code(latent, code)
    if latent is None:
        return None, None, "none"
    if code is not None:
        return latent.code_vector(code), None, f"code {code}"
    mode = inference or latent.inference
    allowed = DISCRETE_INFERENCE if hasattr(latent, "codebook_size") else CONTINUOUS_INFERENCE
    if mode not in allowed:
        raise GenerateError(f"inference={mode!r} is not allowed for a {latent.name} latent: one of {allowed}")
    h_x = hidden_states(model.lm, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)})[:, -1]
    if hasattr(latent, "codebook_size"):
        logits = latent.prior_logits(h_x)
        return latent.prior_z(logits, mode)[0], logits.softmax(-1)[0].float(), f"prior ({mode})"
    return latent.prior_z(h_x, mode)[0], None, f"prior ({mode})"


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
    lm = model.lm
    device = next(lm.parameters()).device
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for prompt in prompts:
            ids = torch.tensor([encode_prompt(tokenizer, prompt, chat_template)], device=device)
            z, probs, source = latent_z(model, ids, code, inference)
            with conditioned_on(lm, z, at=getattr(model.latent, "z_injection", "head")):
                seq = lm.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=not greedy,
                    pad_token_id=pad,
                    eos_token_id=tokenizer.eos_token_id,
                    **sampling,
                )
            new = seq[0, ids.shape[1] :].tolist()
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
def _parse_bool(key, value) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise GenerateError(f"{key}={value!r} is not allowed: true or false")


def _parse_number(key, value, kind, ok, allowed):
    try:
        v = kind(value)
    except ValueError:
        raise GenerateError(f"{key}={value!r} is not allowed: {allowed}") from None
    if not ok(v):
        raise GenerateError(f"{key}={value!r} is not allowed: {allowed}")
    return v


def parse_args(argv: list[str]) -> tuple[Path, dict]:
    """``CHECKPOINT key=value ...`` -> (path, options); every check that needs no model runs here."""
    positional = [a for a in argv if not is_option(a)]
    if len(positional) != 1:
        raise GenerateError(f"expected exactly one CHECKPOINT (a run directory or its final/), got {positional}")
    opts, prompts = dict(DEFAULTS), []
    for arg in argv:
        if not is_option(arg):
            continue
        key, value = arg.lstrip("+").split("=", 1)
        if key == "prompt":
            prompts.append(value)
        elif key == "code":
            opts["code"] = _parse_number(key, value, int, lambda v: v >= 0, "an integer >= 0 (a codebook row)")
        elif key == "max_new_tokens":
            opts[key] = _parse_number(key, value, int, lambda v: v >= 1, "an integer >= 1")
        elif key in ("seed", "top_codes"):
            opts[key] = _parse_number(key, value, int, lambda v: v >= 0, "an integer >= 0")
        elif key == "temperature":
            opts[key] = _parse_number(key, value, float, lambda v: v > 0, "a number > 0")
        elif key == "top_p":
            opts[key] = _parse_number(key, value, float, lambda v: 0 < v <= 1, "a number in (0, 1]")
        elif key == "greedy":
            opts[key] = _parse_bool(key, value)
        elif key == "chat_template":
            opts[key] = value.lower() if value.lower() == "auto" else _parse_bool(key, value)
        elif key == "inference":
            allowed = tuple(dict.fromkeys(DISCRETE_INFERENCE + CONTINUOUS_INFERENCE))
            if value not in allowed:
                raise GenerateError(f"inference={value!r} is not allowed: one of {allowed}")
            opts[key] = value
        else:
            raise GenerateError(f"unknown argument {key!r}; allowed: prompt, {', '.join(DEFAULTS)}")
    if not prompts:
        raise GenerateError('prompt= is required, e.g. prompt="Explain the rules of chess."')
    opts["prompts"] = prompts
    return Path(positional[0]), opts


def check_checkpoint(path: Path, opts: dict) -> None:
    """Checks against the checkpoint's small config files, before its weights load."""
    from omegaconf import OmegaConf

    from lpc.training.checkpoint import LATENT_CONFIG, is_checkpoint

    final = path / "final" if (path / "final").is_dir() else path
    if not is_checkpoint(final):
        raise GenerateError(
            f"{path} is not a checkpoint (no config.json or adapter_config.json): pass a run directory or its "
            "final/ folder"
        )
    latent_cfg = OmegaConf.load(final / LATENT_CONFIG) if (final / LATENT_CONFIG).exists() else None
    name = latent_cfg.get("name") if latent_cfg is not None else "none"
    if opts["code"] is not None:
        if latent_cfg is None:
            raise GenerateError(
                "code= needs an LPC checkpoint with a discrete latent; this checkpoint has no latent "
                "(a baseline run): drop code="
            )
        if "codebook_size" not in latent_cfg:
            raise GenerateError(f"code= needs a discrete latent (a codebook); this checkpoint's latent is {name!r}")
        k = latent_cfg.codebook_size
        if opts["code"] >= k:
            raise GenerateError(
                f"code={opts['code']} is not allowed: an integer in [0, {k - 1}] (this checkpoint has {k} codes)"
            )
    if opts["inference"] is not None:
        allowed = {"discrete": DISCRETE_INFERENCE, "continuous": CONTINUOUS_INFERENCE}.get(name)
        if allowed is None:
            raise GenerateError("inference= needs an LPC checkpoint; this checkpoint has no latent (a baseline run)")
        if opts["inference"] not in allowed:
            raise GenerateError(f"inference={opts['inference']!r} is not allowed for a {name} latent: one of {allowed}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        return 0 if argv else 2
    try:
        path, opts = parse_args(argv)
        check_checkpoint(path, opts)
    except GenerateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from lpc.training.checkpoint import load_checkpoint

    model, tokenizer, cfg = load_checkpoint(path)
    chat = opts["chat_template"]
    if chat == "auto":
        chat = bool(cfg is not None and cfg.get("data", {}).get("chat_template", False))
    chat = bool(chat and tokenizer.chat_template)
    results = generate(
        model,
        tokenizer,
        opts["prompts"],
        code=opts["code"],
        max_new_tokens=opts["max_new_tokens"],
        seed=opts["seed"],
        temperature=opts["temperature"],
        top_p=opts["top_p"],
        greedy=opts["greedy"],
        chat_template=chat,
        inference=opts["inference"],
    )
    for r in results:
        print(f"### prompt: {r.prompt}")
        print(f"### z: {r.z_source}")
        if r.prior_probs is not None and opts["top_codes"] > 0:
            codes = ", ".join(f"{k}: {p:.3f}" for k, p in r.top_codes(opts["top_codes"]))
            print(f"### prior p(z|x), top codes: {codes}")
        print(r.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
