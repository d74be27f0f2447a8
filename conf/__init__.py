"""The Hydra config tree of ``lpc-train``: the repository's ``conf/``, which the build maps into the package as
``lpc.conf`` (pyproject.toml), so an installed package and an editable one both find it.
``CONF_DIR`` is its location for code that composes configs itself (the sweep driver, the tests), and
:func:`codebook_implies_latent` is the one command-line rule every entry point applies before composing."""

from __future__ import annotations

from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent)

BASELINE = ("none", "null")  # codebook=none: no latent (the algorithm alone)


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _values(value: str) -> list[str]:
    """A Hydra sweep value's items (``8,32,128``); anything else (``range(...)``) is one opaque item."""
    return [v.strip().strip("'\"") for v in value.split(",")] if "(" not in value else [value]


def codebook_implies_latent(overrides: list[str]) -> list[str]:
    """``codebook=K`` means LPC with K codes: without a ``latent=`` choice it selects ``latent=discrete``, and
    ``codebook=none`` selects ``latent=none`` (the baseline). A conflict raises ``ValueError`` naming both keys:
    K with ``latent=none``/``continuous`` (the key would be ignored), ``none`` with ``latent=discrete``, or one
    Hydra multirun mixing ``none`` and K (Hydra cannot give its jobs different latents: ``lpc-sweep`` can, with
    ``sweep.grid.codebook=[none,8,...]``). Other overrides pass unchanged; the result is what Hydra composes."""
    codebook = next((o for o in reversed(overrides) if _split(o)[0] == "codebook"), None)
    if codebook is None:
        return list(overrides)
    latent = next((o for o in reversed(overrides) if _split(o)[0] == "latent"), None)
    values = _values(_split(codebook)[1])
    baseline = [v for v in values if v.lower() in BASELINE]
    if latent is None:
        if baseline and len(baseline) < len(values):
            raise ValueError(
                f"{codebook} mixes the baseline (none) and LPC codebook sizes in one Hydra multirun, whose jobs "
                "cannot differ in their latent; run it as `lpc-sweep experiment=... sweep.grid.codebook=[none,...]`, "
                "or as two commands (latent=none, and codebook=K,...)"
            )
        return [*overrides, "latent=none" if baseline else "latent=discrete"]
    latents = _values(_split(latent)[1])
    without_codes = [v for v in latents if v != "discrete"]
    if without_codes and len(baseline) < len(values):
        raise ValueError(
            f"{codebook} is not allowed with {latent}: codebook sets the number of LPC codes and latent="
            f"{without_codes[0]} has none, so it would be ignored; drop codebook (the baseline is latent=none), "
            "or use codebook alone (it selects latent=discrete)"
        )
    if baseline and "discrete" in latents:
        raise ValueError(f"{codebook} is not allowed with {latent}: a discrete latent needs a codebook size >= 1")
    return list(overrides)
