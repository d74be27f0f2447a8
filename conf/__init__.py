"""The Hydra config tree of ``lpc-train``: the repository's ``conf/``, which the build maps into the package as
``lpc.conf`` (pyproject.toml), so an installed package and an editable one both find it. ``CONF_DIR`` is its
location for code that composes configs itself (the sweep driver, lpc-plan, the tests), and
:func:`check_codebook` the codebook group's one check, which ``lpc.config.validate`` and lpc-sweep run.

Importing this module lets a config group have numeric option names, as ``codebook`` does (``codebook=64``
selects ``conf/codebook/64.yaml``): Hydra's override grammar reads ``64`` as an int and refuses an int as a
group's option ("Config group override must be a string or a list. Got int"; quoting it, ``codebook='64'``, is
the only way Hydra offers). Every entry point imports ``CONF_DIR`` from here before composing, so ``lpc-train``,
``compose()`` from Python, lpc-sweep and lpc-plan read ``codebook=64`` alike."""

from __future__ import annotations

from pathlib import Path

from hydra._internal.defaults_list import Overrides

from lpc.errors import ConfigError

CONF_DIR = str(Path(__file__).resolve().parent)


def check_codebook(latent) -> None:
    """``codebook=K`` selects latent=discrete and sets ``latent.codebook_size`` (conf/codebook/); with another
    latent on the command line K lands in a latent that has no codes, and ``codebook=none`` sets it to null."""
    name, k = latent.get("name"), latent.get("codebook_size")
    if name == "discrete":
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            raise ConfigError(
                f"latent.codebook_size={k!r} is not allowed: an integer >= 1, the number of codes K of "
                "latent=discrete (codebook=K sets it; codebook=none is latent=none, the baseline)"
            )
    elif "codebook_size" in latent and (k is not None or name != "none"):
        given = "none" if k is None else k
        raise ConfigError(
            f"codebook={given} (latent.codebook_size={k}) is not allowed with latent={name}: only latent=discrete "
            f"has codes, so the codebook would be ignored; allowed: codebook=K alone (it selects latent=discrete), "
            f"codebook=none alone (latent=none, the baseline), or latent={name} without codebook"
        )


def _numeric_options_as_names(init):
    def __init__(self, repo, overrides_list):
        for override in overrides_list:
            value = override._value
            if isinstance(value, int) and not isinstance(value, bool) and repo.group_exists(override.key_or_group):
                override._value = str(value)  # the option's file name: codebook/64.yaml
        init(self, repo, overrides_list)

    __init__._lpc_numeric_options = True
    return __init__


if not getattr(Overrides.__init__, "_lpc_numeric_options", False):  # once, however often this module is reloaded
    Overrides.__init__ = _numeric_options_as_names(Overrides.__init__)
