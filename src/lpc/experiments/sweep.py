"""Run a paper experiment's grid through Hydra multirun, skipping finished runs, then report it.

    lpc-sweep experiment=codebook [scale=cpu|paper] [launcher=local|submitit_local|slurm]
                        [--dry-run] [--sweep-dir DIR] [--no-report] [any other override ...]

The experiment config (conf/experiment/NAME.yaml) names its grid in ``sweep.grid`` (key -> values).
Every grid point is one run in ``SWEEP_DIR/<key=value,...>`` (Hydra's ``override_dirname``), so a
rerun finds its runs: completed ones (metrics.json says so) are skipped, the others are launched
again and resume from their last checkpoint. The runs still to do are grouped into as few Cartesian
products as possible, and each product is one ``src/train.py -m`` call: Hydra's basic launcher
(``launcher=local``, in-process, one after the other) or hydra-submitit-launcher (``submitit_local``,
``slurm``: one job array per product). ``--dry-run`` prints the launcher's composed config (the sbatch
parameters) and the job list without launching. At the end ``lpc.experiments.report`` summarises SWEEP_DIR.
"""

from __future__ import annotations

import itertools
import json
import shlex
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from lpc.conf import BASELINE, CONF_DIR, codebook_implies_latent
from lpc.files import atomic_write_json
from lpc.training import rundir

# Each grid product is one `python -m lpc.train -m ...` (the installed lpc-train), run from the caller's
# directory like any Hydra command; nothing is looked up in a source checkout.
TRAIN = [sys.executable, "-m", "lpc.train"]
LAUNCHERS = {"local": "basic", "submitit_local": "submitit_local", "slurm": "slurm"}
MANIFEST = rundir.SWEEP_MANIFEST


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


def run_status(run_dir: Path) -> str:
    """completed | failed (to run again: it resumes from its checkpoint if it has one) | missing.
    The run directory's own answer is ``lpc.training.rundir.status``; the driver only needs done or not."""
    s = rundir.status(run_dir)
    return "failed" if s == "incomplete" else s


def products(jobs: list[dict], keys: list[str]) -> list[dict]:
    """Cover ``jobs`` exactly with few Cartesian products {key: [values]} (one multirun call each).
    Split on the first key, cover each part recursively, then merge values whose sub-products match."""
    if not jobs:
        return []
    if len(keys) == 1:
        return [{keys[0]: list(dict.fromkeys(j[keys[0]] for j in jobs))}]
    first, rest = keys[0], keys[1:]
    merged: dict[str, dict] = {}  # canonical form of the rest's cover -> {first: values, cover}
    for value in dict.fromkeys(j[first] for j in jobs):
        cover = products([j for j in jobs if j[first] == value], rest)
        key = json.dumps(cover, sort_keys=True, default=str)
        merged.setdefault(key, {"values": [], "cover": cover})["values"].append(value)
    return [{first: m["values"], **c} for m in merged.values() for c in m["cover"]]


def sweep_value(values: list) -> str:
    """Hydra sweep syntax for a list of values: a,b,c (one value: no comma)."""
    return ",".join(fmt(v) for v in values)


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    opts = {"dry_run": False, "report": True, "sweep_dir": None, "launcher": None, "experiment": None, "scale": "cpu"}
    rest, it = [], iter(argv)
    for arg in it:
        if arg == "--dry-run":
            opts["dry_run"] = True
        elif arg == "--no-report":
            opts["report"] = False
        elif arg == "--sweep-dir":
            opts["sweep_dir"] = next(it)
        elif arg.startswith("--sweep-dir="):
            opts["sweep_dir"] = arg.split("=", 1)[1]
        elif arg in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        elif arg.split("=", 1)[0] in ("experiment", "scale", "launcher") and "=" in arg:
            key, value = arg.split("=", 1)
            opts[key] = value
        else:
            rest.append(arg)
    if not opts["experiment"]:
        sys.exit(
            "lpc.experiments.sweep: experiment=NAME is required (conf/experiment/: table1, table2, codebook, noise, continuous, mixed)"
        )
    return opts, rest


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        try:
            return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
        except HydraException as err:  # unknown experiment/scale/launcher option, bad override
            sys.exit(f"lpc.experiments.sweep: {str(err).splitlines()[0]} (overrides: {' '.join(overrides)})")


def plan(opts: dict, extra: list[str]) -> dict:
    """Compose the experiment and list its jobs with their run directories and status."""
    launcher = opts["launcher"]
    base = [f"experiment={opts['experiment']}", f"scale={opts['scale']}"]
    # Why: this first compose only reads scale.launcher, without a hydra/launcher choice; the launcher's keys
    # (hydra.launcher.partition=gpu, as make reproduce-* ARGS=... documents) exist only in the second one.
    cfg = compose(base + [o for o in extra if not o.lstrip("+~").startswith("hydra.launcher.")])
    if "sweep" not in cfg:
        sys.exit(f"lpc.experiments.sweep: experiment={opts['experiment']} has no `sweep` node (not a paper experiment)")
    launcher = launcher or cfg.scale.launcher
    if launcher not in LAUNCHERS:
        sys.exit(f"lpc.experiments.sweep: launcher={launcher!r} is not allowed: one of {', '.join(LAUNCHERS)}")
    hydra_launcher = f"hydra/launcher={LAUNCHERS[launcher]}"
    cfg = compose(base + extra + [hydra_launcher])
    sweep = OmegaConf.to_container(cfg.sweep, resolve=True)
    grid, fixed = sweep["grid"], list(sweep.get("overrides") or [])
    sweep_dir = Path(opts["sweep_dir"] or Path("outputs") / "sweeps" / f"{cfg.sweep.name}-{opts['scale']}").resolve()
    with open_dict(cfg):  # what the multirun commands pass (so the launcher shows its real submitit folder)
        cfg.hydra.sweep.dir = str(sweep_dir)
    jobs = []
    for values in expand_grid(grid):
        run_dir = sweep_dir / job_dirname(values)
        jobs.append(
            {"overrides": {k: fmt(v) for k, v in values.items()}, "dir": run_dir.name, "status": run_status(run_dir)}
        )
    task_extra = [o for o in extra if not o.startswith(("hydra.", "hydra/", "~hydra", "+hydra"))]
    # Only the grid values name a run directory; experiment, scale and fixed/extra overrides do not.
    exclude = ["experiment", "scale"] + [o.lstrip("+~").split("=", 1)[0] for o in fixed + task_extra]
    if "codebook" in grid and "latent" not in grid:
        exclude.append("latent")  # lpc-train adds the latent codebook=K|none implies; the grid names the run
    return {
        "experiment": opts["experiment"],
        "scale": opts["scale"],
        "launcher": launcher,
        "hydra_launcher": hydra_launcher,
        "sweep_dir": str(sweep_dir),
        "grid": grid,
        "fixed": fixed,
        "extra": extra,
        "exclude_keys": exclude,
        "task_extra": task_extra,
        "jobs": jobs,
        "cfg": cfg,
    }


def plan_jobs(p: dict) -> tuple[list, list[str]]:
    """lpc-plan's estimate of every job still to run, on the hardware its config names, and the jobs that
    cannot be planned (a config error: they are launched with the others and fail alone, named in the
    report, so one bad grid point never holds back the valid ones)."""
    from lpc.errors import PlanError
    from lpc.experiments.plan import plan as plan_one

    base = [f"experiment={p['experiment']}", f"scale={p['scale']}", *p["fixed"], *p["task_extra"]]
    plans, errors = [], []
    for j in p["jobs"]:
        if j["status"] == "completed":
            continue
        point = [f"{k}={v}" for k, v in j["overrides"].items()]
        try:
            plans.append(plan_one(compose(codebook_implies_latent(base + point)), overrides=point))
        except PlanError as err:
            errors.append(f"{j['dir']}: {err}")
    return plans, errors


def multirun_commands(p: dict) -> list[list[str]]:
    todo = [{k: v for k, v in j["overrides"].items()} for j in p["jobs"] if j["status"] != "completed"]
    keys = list(p["grid"])
    # codebook=none (the baseline) and codebook=K select different latents: never in one multirun
    baseline = [j for j in todo if str(j.get("codebook")).lower() in BASELINE]
    cmds = []
    for prod in products(baseline, keys) + products([j for j in todo if j not in baseline], keys):
        cmds.append(
            [
                *TRAIN,
                "-m",
                f"experiment={p['experiment']}",
                f"scale={p['scale']}",
                p["hydra_launcher"],
                f"hydra.sweep.dir={p['sweep_dir']}",
                "hydra.sweep.subdir=${hydra.job.override_dirname}",  # deterministic: a rerun finds its runs
                f"hydra.job.config.override_dirname.exclude_keys=[{','.join(p['exclude_keys'])}]",
                *p["fixed"],
                *p["extra"],
                *(f"{k}={sweep_value(v)}" for k, v in prod.items()),
            ]
        )
    return cmds


def resolved(node):
    """A config node with its interpolations resolved where they can be (hardware.slurm.*), as sbatch sees it."""
    try:
        return OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    except Exception:  # noqa: BLE001 - e.g. ${hydra.sweep.dir}'s ${now:} outside a run: show it unresolved
        return node


def write_manifest(p: dict) -> None:
    manifest = {k: p[k] for k in ("experiment", "scale", "launcher", "grid", "fixed", "extra")}
    manifest["grid_keys"] = list(p["grid"])  # the JSON is written with sorted keys; this keeps the grid's order
    manifest["jobs"] = [{"overrides": j["overrides"], "dir": j["dir"]} for j in p["jobs"]]
    atomic_write_json(Path(p["sweep_dir"]) / MANIFEST, manifest)


def main(argv: list[str] | None = None) -> int:
    opts, extra = parse_args(list(sys.argv[1:] if argv is None else argv))
    p = plan(opts, extra)
    counts = {s: sum(j["status"] == s for j in p["jobs"]) for s in ("completed", "failed", "missing")}
    print(f"sweep {p['experiment']} scale={p['scale']} launcher={p['launcher']} -> {p['sweep_dir']}")
    print(
        f"{len(p['jobs'])} jobs: {counts['completed']} completed, {counts['failed']} failed (resume), "
        f"{counts['missing']} missing"
    )
    cmds = multirun_commands(p)
    from lpc.experiments.plan import format_sweep

    plans, unplanned = plan_jobs(p)
    for line in unplanned:
        print(f"lpc-sweep: config error, this job will fail: {line}", file=sys.stderr)
    misfits = [q for q in plans if not q.fits]
    if opts["dry_run"]:
        print(f"\n# {p['hydra_launcher']}: composed hydra.launcher (sbatch parameters for slurm)")
        print(OmegaConf.to_yaml(resolved(p["cfg"].hydra.launcher)), end="")
        print(f"\n# jobs ({len(p['jobs'])}): status  run dir")
        for j in p["jobs"]:
            print(f"{j['status']:9s}  {j['dir']}")
        print(f"\n# {len(cmds)} multirun command(s) it would run (each can be pasted into a shell):")
        for c in cmds:
            print(shlex.join(["lpc-train", *c[len(TRAIN) :]]))
        if plans:
            print(f"\n# lpc-plan, per GPU and per run, for the {len(plans)} job(s) still to run (docs/planning.md)")
            print(format_sweep(plans))
        return 2 if misfits else 0
    if misfits:  # refused before anything is submitted
        print(format_sweep(misfits), file=sys.stderr)
        print(
            f"lpc-sweep: {len(misfits)} of {len(plans)} job(s) do not fit {misfits[0].hardware} "
            "(lpc-plan's estimate above, with the change that would fit); nothing was launched",
            file=sys.stderr,
        )
        return 2
    Path(p["sweep_dir"]).mkdir(parents=True, exist_ok=True)
    write_manifest(p)
    failed_calls = 0
    for c in cmds:
        print("+", " ".join(c[1:]), flush=True)
        # A failing job makes Hydra's multirun exit non-zero after the other jobs ran; keep going.
        failed_calls += subprocess.run(c).returncode != 0
    rc = 0
    if opts["report"]:
        from lpc.experiments.report import write_report

        summary = write_report(p["sweep_dir"])
        print(
            f"report: {summary['report_md']} ({summary['completed']} completed, {summary['failed']} failed/"
            f"incomplete, {summary['missing']} missing)"
        )
        rc = 1 if summary["failed"] or summary["missing"] else 0
    return rc or (1 if failed_calls else 0)


if __name__ == "__main__":
    sys.exit(main())
