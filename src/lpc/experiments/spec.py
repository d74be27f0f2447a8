"""An experiment's runs, read from its definition: the ``sweep`` node of conf/experiment/NAME.yaml.

    sweep:
      name: noise                     # the sweep directory's name and the report's title
      grid: {flip: [0.0, 0.5], latent: [none, discrete], seed: [0, 1]}   # every combination is one run
      overrides: []                   # fixed overrides of every run
      groups:                         # optional: named parts, each one more Cartesian product
        flip-marker: {overrides: [flip=0.3], grid: {latent: [none, discrete]}}
      steer: {match: {group: flip-marker, latent: discrete}, options: [prompts=16]}   # optional: lpc-steer after
      report: {layout: grid, columns: latent, metrics: [pref_accuracy], curve: flip}

Without ``groups`` the runs are the product of ``grid``. With them, each group's runs are the product of
``grid`` and the group's own ``grid`` under the group's fixed ``overrides``, in the directory of that name:
a union of products for a benchmark whose settings are not a grid (the synthetic benchmark). A run's directory
is Hydra's ``override_dirname`` of its grid values, below its group's directory. Shared by the driver
(``lpc.experiments.sweep``) and the reporter (``lpc.experiments.report``) so both list the same runs.
"""

from __future__ import annotations

import itertools

from lpc.errors import ConfigError

GROUP_KEYS = ("grid", "overrides")


def fmt(value) -> str:
    """A grid value as a Hydra override string (also the text Hydra puts into override_dirname)."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def job_dirname(job: dict) -> str:
    """Hydra's override_dirname of a job whose only non-excluded overrides are its grid values."""
    return ",".join(sorted(f"{k}={fmt(v)}" for k, v in job.items()))


def expand_grid(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _check_grid(grid, where: str) -> dict:
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{where}={grid!r} is not allowed: a mapping of override key -> non-empty list of values")
    return grid


def groups(sweep: dict) -> dict[str | None, dict]:
    """{group name (None without groups): {"grid": its full grid, "overrides": its fixed overrides}}. The
    group's own grid keys come first, then the shared ``grid``'s (so ``seed`` stays last)."""
    shared = _check_grid(sweep.get("grid") or {}, "sweep.grid")
    parts = sweep.get("groups")
    if not parts:
        if not shared:
            raise ConfigError("sweep.grid is empty and sweep.groups is not set: an experiment needs at least one run")
        return {None: {"grid": shared, "overrides": []}}
    if not isinstance(parts, dict):
        raise ConfigError(f"sweep.groups={parts!r} is not allowed: a mapping of group name -> {{grid, overrides}}")
    out = {}
    for name, part in parts.items():
        unknown = set(part or {}) - set(GROUP_KEYS)
        if unknown:
            raise ConfigError(f"sweep.groups.{name} has {sorted(unknown)}: only {', '.join(GROUP_KEYS)} are allowed")
        own = _check_grid((part or {}).get("grid") or {}, f"sweep.groups.{name}.grid")
        clash = set(own) & set(shared)
        if clash:
            raise ConfigError(f"sweep.groups.{name}.grid repeats {sorted(clash)} of sweep.grid: say each key once")
        if not own and not shared:  # a run directory is named by its grid values: one key at least (e.g. seed)
            raise ConfigError(f"sweep.groups.{name} has no grid and sweep.grid is empty: give either one key")
        out[str(name)] = {"grid": {**own, **shared}, "overrides": list((part or {}).get("overrides") or [])}
    return out


def jobs(sweep: dict) -> list[dict]:
    """Every run of the experiment: {"group", "overrides" (grid key -> value string), "dir" (below the sweep
    directory)}, in the order of the groups and their grids."""
    out = []
    for name, part in groups(sweep).items():
        for values in expand_grid(part["grid"]):
            dirname = job_dirname(values)
            out.append(
                {
                    "group": name,
                    "overrides": {k: fmt(v) for k, v in values.items()},
                    "dir": f"{name}/{dirname}" if name else dirname,
                }
            )
    return out


def matches(job: dict, match: dict) -> bool:
    """Whether a job has every ``key: value`` of ``match`` (``group`` names its group)."""
    have = {**job["overrides"], "group": job["group"]}
    return all(str(have.get(k)) == fmt(v) for k, v in match.items())
