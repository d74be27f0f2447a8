"""Run an experiment (experiments/NAME/README.md) through Hydra multirun, skipping finished runs, then report it.

    lpc-sweep experiment=NAME [scale=cpu|paper] [launcher=local|submitit_local|slurm]
                        [--dry-run] [--sweep-dir DIR] [--parallel N] [--no-report] [any other override ...]

NAME is a config of conf/experiment/ (the paper's experiments and the synthetic benchmark; --help lists
them). Its ``sweep`` node lists the runs (lpc.experiments.spec): ``sweep.grid`` (key -> values), optionally
``sweep.groups`` (named parts, each its own product under its own fixed overrides). Every run has its
directory ``SWEEP_DIR[/<group>]/<key=value,...>`` (Hydra's ``override_dirname``), so a rerun finds its runs:
completed ones (metrics.json says so) are skipped, the others are launched again and resume from their last
checkpoint. The runs still to do are grouped into as few Cartesian products as possible, and each product is
one ``lpc-train -m`` call: Hydra's basic launcher (``launcher=local``, in-process, one after the other) or
hydra-submitit-launcher (``submitit_local``, ``slurm``: one job array per product); ``--parallel N`` runs N
of these calls at a time (default 1). ``sweep.steer`` then runs ``lpc-steer`` on the completed runs it
matches. ``--dry-run`` prints the launcher's composed config (the sbatch parameters), the job list and
lpc-plan's estimate without launching. At the end ``lpc-report`` summarises SWEEP_DIR (default:
outputs/sweeps/<sweep.name>-<scale>) into its report.md.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from lpc.conf import CONF_DIR, check_codebook
from lpc.errors import ConfigError
from lpc.experiments import spec
from lpc.experiments.spec import fmt
from lpc.files import atomic_write_json
from lpc.training import rundir

# Each grid product is one `python -m lpc.train -m ...` (the installed lpc-train), run from the caller's
# directory like any Hydra command; nothing is looked up in a source checkout.
TRAIN = [sys.executable, "-m", "lpc.train"]
STEER = [sys.executable, "-m", "lpc.evaluation.steering"]  # lpc-steer
LAUNCHERS = {"local": "basic", "submitit_local": "submitit_local", "slurm": "slurm"}
MANIFEST = rundir.SWEEP_MANIFEST


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


def experiment_names() -> list[str]:
    """The experiment configs on disk (conf/experiment/*.yaml)."""
    return sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    opts = {"dry_run": False, "report": True, "sweep_dir": None, "launcher": None, "experiment": None, "scale": "cpu"}
    opts["parallel"] = 1
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
        elif arg == "--parallel" or arg.startswith("--parallel="):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, "")
            if not value.isdigit() or int(value) < 1:
                sys.exit(f"lpc.experiments.sweep: --parallel {value!r} is not allowed: a whole number >= 1")
            opts["parallel"] = int(value)
        elif arg in ("-h", "--help"):
            print(__doc__)
            print(f"Experiments (conf/experiment/): {', '.join(experiment_names())}")
            sys.exit(0)
        elif arg.split("=", 1)[0] in ("experiment", "scale", "launcher") and "=" in arg:
            key, value = arg.split("=", 1)
            opts[key] = value
        else:
            rest.append(arg)
    if not opts["experiment"]:
        sys.exit(f"lpc.experiments.sweep: experiment=NAME is required, one of {', '.join(experiment_names())}")
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
        sys.exit(f"lpc.experiments.sweep: experiment={opts['experiment']} has no `sweep` node (not an experiment)")
    launcher = launcher or cfg.scale.launcher
    if launcher not in LAUNCHERS:
        sys.exit(f"lpc.experiments.sweep: launcher={launcher!r} is not allowed: one of {', '.join(LAUNCHERS)}")
    hydra_launcher = f"hydra/launcher={LAUNCHERS[launcher]}"
    cfg = compose(base + extra + [hydra_launcher])
    sweep = OmegaConf.to_container(cfg.sweep, resolve=True)
    try:
        parts, jobs = spec.groups(sweep), spec.jobs(sweep)
    except ConfigError as err:
        sys.exit(f"lpc.experiments.sweep: experiment={opts['experiment']}: {err}")
    sweep_dir = Path(opts["sweep_dir"] or Path("outputs") / "sweeps" / f"{cfg.sweep.name}-{opts['scale']}").resolve()
    with open_dict(cfg):  # what the multirun commands pass (so the launcher shows its real submitit folder)
        cfg.hydra.sweep.dir = str(sweep_dir)
    for j in jobs:
        j["status"] = run_status(sweep_dir / j["dir"])
    return {
        "experiment": opts["experiment"],
        "scale": opts["scale"],
        "launcher": launcher,
        "hydra_launcher": hydra_launcher,
        "sweep_dir": str(sweep_dir),
        "grid": sweep.get("grid") or {},
        "groups": parts,
        "fixed": list(sweep.get("overrides") or []),
        "extra": extra,
        "task_extra": [o for o in extra if not o.startswith(("hydra.", "hydra/", "~hydra", "+hydra"))],
        "steer": sweep.get("steer"),
        "jobs": jobs,
        "cfg": cfg,
    }


def exclude_keys(p: dict, group: str | None) -> list[str]:
    """The overrides that do not name a run directory: all but the grid values (experiment, scale, the fixed,
    the group's and the command line's overrides)."""
    part = p["groups"][group]
    fixed = p["fixed"] + part["overrides"] + p["task_extra"]
    exclude = ["experiment", "scale"] + [o.lstrip("+~").split("=", 1)[0] for o in fixed]
    return exclude


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
        group = p["groups"][j["group"]]["overrides"]
        try:
            cfg = compose(base + group + point)
            check_codebook(cfg.latent)  # codebook=8 with latent=continuous on the command line: named before launch
            plans.append(plan_one(cfg, overrides=point))
        except (PlanError, ConfigError) as err:
            errors.append(f"{j['dir']}: {err}")
    return plans, errors


def multirun_commands(p: dict) -> list[list[str]]:
    """One ``lpc-train -m`` per Cartesian product of the runs still to do, group by group."""
    cmds = []
    for group, part in p["groups"].items():
        todo = [dict(j["overrides"]) for j in p["jobs"] if j["group"] == group and j["status"] != "completed"]
        keys = list(part["grid"])
        sweep_dir = Path(p["sweep_dir"]) / group if group else Path(p["sweep_dir"])
        for prod in products(todo, keys):  # codebook=none and codebook=K may share one: conf/codebook/
            cmds.append(
                [
                    *TRAIN,
                    "-m",
                    f"experiment={p['experiment']}",
                    f"scale={p['scale']}",
                    p["hydra_launcher"],
                    f"hydra.sweep.dir={sweep_dir}",
                    "hydra.sweep.subdir=${hydra.job.override_dirname}",  # deterministic: a rerun finds its runs
                    f"hydra.job.config.override_dirname.exclude_keys=[{','.join(exclude_keys(p, group))}]",
                    *p["fixed"],
                    *part["overrides"],
                    *p["extra"],
                    *(f"{k}={sweep_value(v)}" for k, v in prod.items()),
                ]
            )
    return cmds


def steer_commands(p: dict) -> list[list[str]]:
    """``lpc-steer RUN`` for every completed run ``sweep.steer.match`` selects that has no steering yet."""
    steer = p["steer"]
    if not steer:
        return []
    cmds = []
    for j in p["jobs"]:
        run_dir = Path(p["sweep_dir"]) / j["dir"]
        if not spec.matches(j, steer.get("match") or {}) or run_status(run_dir) != "completed":
            continue
        if not (run_dir / rundir.ANALYSIS / "steering.json").exists():
            cmds.append([*STEER, str(run_dir), *(steer.get("options") or [])])
    return cmds


def resolved(node):
    """A config node with its interpolations resolved where they can be (hardware.slurm.*), as sbatch sees it."""
    try:
        return OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    except Exception:  # noqa: BLE001 - e.g. ${hydra.sweep.dir}'s ${now:} outside a run: show it unresolved
        return node


def write_manifest(p: dict) -> None:
    manifest = {k: p[k] for k in ("experiment", "scale", "launcher", "grid", "fixed", "extra", "command")}
    manifest["grid_keys"] = list(p["grid"])  # the JSON is written with sorted keys; this keeps the grid's order
    manifest["groups"] = {str(g): part["overrides"] for g, part in p["groups"].items() if g}
    manifest["jobs"] = [{"overrides": j["overrides"], "group": j["group"], "dir": j["dir"]} for j in p["jobs"]]
    atomic_write_json(Path(p["sweep_dir"]) / MANIFEST, manifest)


def print_dry_run(p: dict, cmds: list[list[str]], plans: list) -> None:
    from lpc.experiments.plan import format_sweep

    print(f"\n# {p['hydra_launcher']}: composed hydra.launcher (sbatch parameters for slurm)")
    print(OmegaConf.to_yaml(resolved(p["cfg"].hydra.launcher)), end="")
    print(f"\n# jobs ({len(p['jobs'])}): status  run dir")
    for j in p["jobs"]:
        print(f"{j['status']:9s}  {j['dir']}")
    print(f"\n# {len(cmds)} multirun command(s) it would run (each can be pasted into a shell):")
    for c in cmds:
        print(shlex.join(["lpc-train", *c[len(TRAIN) :]]))
    if p["steer"]:
        print(
            f"\n# then lpc-steer RUN {' '.join(p['steer'].get('options') or [])} on the completed runs of {p['steer'].get('match')}"
        )
    if plans:
        print(f"\n# lpc-plan, per GPU and per run, for the {len(plans)} job(s) still to run (docs/planning.md)")
        print(format_sweep(plans))


def run(cmds: list[list[str]], parallel: int = 1) -> int:
    """Run the commands, ``parallel`` at a time (a failing one does not stop the others); the number that failed."""
    failed, running = 0, []
    for c in cmds:
        if len(running) >= parallel:
            failed += running.pop(0).wait() != 0
        print("+", " ".join(c[1:]), flush=True)
        running.append(subprocess.Popen(c))
    return failed + sum(proc.wait() != 0 for proc in running)


def main(argv: list[str] | None = None) -> int:
    opts, extra = parse_args(list(sys.argv[1:] if argv is None else argv))
    p = plan(opts, extra)
    p["command"] = shlex.join(["lpc-sweep", *(sys.argv[1:] if argv is None else argv)])  # quoted by the report
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
        print_dry_run(p, cmds, plans)
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
    # A failing job makes Hydra's multirun exit non-zero after the other jobs ran; keep going.
    failed_calls = run(cmds, opts["parallel"]) + run(steer_commands(p), opts["parallel"])
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
