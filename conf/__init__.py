"""The Hydra config tree of ``lpc-train``: the repository's ``conf/``, which the build maps into the package as
``lpc.conf`` (pyproject.toml), so an installed package and an editable one both find it. ``CONF_DIR`` is its
location for code that composes configs itself (the sweep driver, lpc-plan, the tests).

Importing this module lets a config group have numeric option names, as ``codebook`` does (``codebook=64``
selects ``conf/codebook/64.yaml``): Hydra's override grammar reads ``64`` as an int and refuses an int as a
group's option ("Config group override must be a string or a list. Got int"; quoting it, ``codebook='64'``, is
the only way Hydra offers). Every entry point imports ``CONF_DIR`` from here before composing, so ``lpc-train``,
``compose()`` from Python, lpc-sweep and lpc-plan read ``codebook=64`` alike."""

from __future__ import annotations

from pathlib import Path

from hydra._internal.defaults_list import Overrides

CONF_DIR = str(Path(__file__).resolve().parent)


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
