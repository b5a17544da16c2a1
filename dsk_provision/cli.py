"""The dsk-provision command line. Thin: parse, call one library function, render.

Heavy modules (ansible, ansible_runner, torch, jsonschema) are imported inside the
commands, so that ``dsk-provision --help`` starts fast. What the commands print lives in
dsk_provision.render; how the library's errors become messages and exit codes lives in
one place, the root command group below.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from dsk_provision import render
from dsk_provision.errors import DskError, InputError, Interrupted, RunFailed
from dsk_provision.sandbox.naming import MAX_NODES, NAME_RULE
from dsk_provision.sizes import Size, parse_size, read_size

__all__ = ["app", "main", "parse_size"]


class _Commands(TyperGroup):
    """The root group: every command runs inside its ``invoke``, option parsing included.

    The library's typed errors become one ``error:`` line and their exit code
    (InputError 2, EnvironmentProblem 3, RunFailed 1, ClusterBusy 75, Interrupted 128 +
    the signal: 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP); anything else is one
    line and exit 1. Tracebacks only with --debug.
    """

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # help, usage errors, explicit exit codes: Typer's own handling
        except BrokenPipeError:
            raise  # the reader went away (`... --help | head`): Typer's quiet exit 1
        except DskError as exc:
            if ctx.params.get("debug"):
                import traceback

                traceback.print_exc()
            render.error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            import signal

            stopped = Interrupted(signal.SIGINT)
            render.error("interrupted")
            raise typer.Exit(stopped.exit_code) from None
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if ctx.params.get("debug"):
                raise
            render.error(f"unexpected {type(exc).__name__}: {exc} "
                         "(rerun with --debug for the traceback)")
            raise typer.Exit(1) from None


app = typer.Typer(
    name="dsk-provision",
    cls=_Commands,
    help="From fresh GPU servers to a verified multi-node training job.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
sandbox_app = typer.Typer(help="A local multi-node cluster (systemd-nspawn) to try everything.",
                          no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")
mirror_app = typer.Typer(help="An offline package mirror (apt + wheels) for air-gapped "
                              "clusters.", no_args_is_help=True)
app.add_typer(mirror_app, name="mirror")
nodes_app = typer.Typer(help="Change the cluster's nodes through the inventory.",
                        no_args_is_help=True)
app.add_typer(nodes_app, name="nodes")
hostkeys_app = typer.Typer(help="The nodes' SSH host keys: pin them on first contact.",
                           no_args_is_help=True)
app.add_typer(hostkeys_app, name="hostkeys")

keys_app = typer.Typer(help="The cluster's SSH key pair.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

runs_app = typer.Typer(help="Past runs, from their run directories (--runs-dir).",
                       no_args_is_help=True)
app.add_typer(runs_app, name="runs")

jobs_app = typer.Typer(help="Training jobs: list, status, logs, stop.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")

InventoryOpt = Annotated[Path, typer.Option(
    "--inventory", "-i", help="Inventory: a hosts.yml file or a directory holding one.")]


def _size_option(flag: str, *, help: str) -> Any:
    """An option that takes a size ('1K', '16M'): read by the one size parser, so that a
    typo fails before any connection, with the option's name in the message."""

    def size(text: str) -> Size:
        return read_size(text, flag)

    # Shown in --help like the other text options: a size is written as text.
    return typer.Option(flag, parser=size, metavar="<str>", help=help)


def _runs_dir(ctx: typer.Context) -> Path | None:
    """--runs-dir, given before the command."""
    return ctx.find_root().params["runs_dir"]


def _load(inventory: Path):
    from dsk_provision.inventory import load_inventory

    return load_inventory(inventory)


def _split(values: list[str] | None) -> list[str] | None:
    """Repeated and comma-separated values as one list: --limit a,b --limit c."""
    if not values:
        return None
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    return out or None


def _print_version(value: bool) -> None:
    if value:
        from dsk_provision import __version__

        render.line(f"dsk-provision {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    _version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print the version and exit.")] = False,
    runs_dir: Annotated[Path | None, typer.Option(
        "--runs-dir", envvar="DSK_RUNS_DIR",
        help="Where run directories go (default ./.dsk/runs).")] = None,
) -> None:
    """From fresh GPU servers to a verified multi-node training job."""


@app.command()
def check(
    inventory: InventoryOpt,
    config: Annotated[Path | None, typer.Option(
        "--config", help="Also validate this training config (TOML).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Validate the inventory (and a training config); no connection is made."""
    inv = _load(inventory)
    if config is not None:
        from trainer.config import load_config

        load_config(config)
    from dsk_provision.state import claim_cluster_state_dir
    from dsk_provision.trust import key_dir_warnings

    # Read only: a state directory another inventory owns is refused here as at bootstrap.
    claim_cluster_state_dir(inv.cluster_name, inv.hosts_file, create=False)
    warnings = key_dir_warnings(inv)
    if as_json:
        render.print_json({**render.inventory_json(inv, config), "warnings": warnings})
    else:
        render.inventory_summary(inv, config)
        render.warnings(warnings)


def _expect_option() -> typer.models.OptionInfo:
    return typer.Option(
        "--expect", help="New nodes' expected host key fingerprints (lines 'NODE SHA256:...' "
                         "or `ssh-keygen -l` output): keys they vouch for are pinned without "
                         "asking, as with `hostkeys scan --expect`.")


def _yes_keys_option() -> typer.models.OptionInfo:
    return typer.Option(
        "--yes", help="Pin new nodes' host keys without asking (their fingerprints are "
                      "printed); a key that differs from the recorded one is still refused.")


@app.command()
def bootstrap(
    ctx: typer.Context,
    inventory: InventoryOpt,
    limit: Annotated[list[str] | None, typer.Option(
        "--limit", help="Only these nodes (repeat or comma-separate).")] = None,
    tags: Annotated[list[str] | None, typer.Option(
        "--tags", help="Only these parts, e.g. common,ssh_trust.")] = None,
    check_mode: Annotated[bool, typer.Option(
        "--check", help="Dry run: report what would change.")] = False,
    verbose: Annotated[int, typer.Option(
        "--verbose", "-v", count=True,
        help="A line per host and task, and more Ansible output in the run directory.")] = 0,
    validate_new: Annotated[bool, typer.Option(
        "--validate/--no-validate",
        help="After bringing in new nodes: their checks and an all-reduce with them.")] = True,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the recap and per-host results as JSON (progress goes to "
                       "stderr); an addition's two runs as {\"runs\": [...]}.")] = False,
    expect: Annotated[Path | None, _expect_option()] = None,
    yes: Annotated[bool, _yes_keys_option()] = False,
) -> None:
    """Provision the nodes: run playbooks/site.yml.

    Nodes provisioned before get only a trust refresh when new ones are brought in, and
    the new ones are validated (see docs/operations.md); --limit or --tags run exactly
    what they say."""
    inv = _load(inventory)
    from dsk_provision.runner import run_playbook

    out = render.console(stderr=as_json)
    records: list[dict] = []

    def run(*args, **kwargs):
        # Every run's record is kept: a failed or stopped run has one too.
        try:
            result = run_playbook(*args, **kwargs)
        except DskError as exc:
            if getattr(exc, "record", None):
                records.append(exc.record)
            raise
        if getattr(result, "record", None):
            records.append(result.record)
        return result

    def print_records() -> None:
        if as_json and records:
            render.print_json(records[0] if len(records) == 1 else {"runs": records})

    try:
        if limit or tags:
            run("site.yml", inv, command="bootstrap", runs_dir=_runs_dir(ctx),
                limit=_split(limit), tags=_split(tags), check=check_mode, console=out,
                verbosity=verbose)
        else:
            _bring_in(ctx, inv, check=check_mode, verbose=verbose, validate_new=validate_new,
                      run=run, out=out, host_keys=_host_key_policy(expect, yes, out))
    except DskError:
        print_records()
        raise
    print_records()


def _host_key_policy(expect: Path | None, yes: bool, out=None):
    """How `bootstrap`, `nodes add` and `nodes replace` trust new nodes' host keys: the
    fingerprints shown, then pinned when --expect vouches for them, when --yes says so,
    or when the person at the terminal answers y."""
    from dsk_provision.lifecycle import HostKeyPolicy

    return HostKeyPolicy(expect=expect,
                         confirm=(lambda plan: True) if yes else render.host_keys_confirm,
                         show=lambda plan: render.host_keys_plan(plan, out=out))


def _bring_in(ctx: typer.Context, inv, *, check: bool, verbose: int, validate_new: bool,
              run=None, out=None, host_keys=None) -> None:
    """The planned bootstrap (dsk_provision.lifecycle.bring_in), with its summary."""
    from dsk_provision.lifecycle import bring_in

    out = out or render.console()
    outcome = bring_in(inv, run=run, check=check, say=lambda m: out.print(m, soft_wrap=True),
                       host_keys=host_keys, runs_dir=_runs_dir(ctx), console=out,
                       verbosity=verbose)
    if outcome.summary():
        out.print(outcome.summary(), soft_wrap=True)
    if not check:
        _validate_added(ctx, inv, outcome, validate_new)


def _brought_in(ctx: typer.Context, inv, outcome, done: str, validate_new: bool) -> None:
    """After `nodes add` or `nodes replace`: what was done, the run's summary, validation."""
    render.line(done)
    if outcome.summary():
        render.line(outcome.summary())
    _validate_added(ctx, inv, outcome, validate_new)


def _validate_added(ctx: typer.Context, inv, outcome, enabled: bool) -> None:
    """validate's checks of the nodes an addition brought in, and the cluster-wide
    all-reduce with them (dsk_provision.validation.flow.validate, ``only``)."""
    plan = outcome.plan
    added = [n for n in outcome.bootstrapped if plan is not None and not plan.full]
    if not added:
        return
    if not enabled:
        render.line(f"not validated (--no-validate): {', '.join(added)}; run "
                    f"`dsk-provision validate -i {inv.path}` to check them")
        return
    from dsk_provision.validation.flow import validate as run_validate

    in_service = [n.name for n in inv.active_nodes]
    render.line(f"validating the new nodes ({', '.join(added)}): their checks, and an "
                f"all-reduce across the {len(in_service)} nodes in service")
    try:
        report = run_validate(inv, runs_dir=_runs_dir(ctx), console=render.console(),
                              only=added)
    except RunFailed as exc:
        failed = RunFailed(f"{', '.join(added)} brought in (recorded), but {exc.message}",
                           nodes=exc.nodes, hint=exc.hint)
        raise failed from exc
    render.validate_verdict(report)
    if not report.passed:
        raise typer.Exit(1)


@app.command()
def validate(
    ctx: typer.Context,
    inventory: InventoryOpt,
    begin: Annotated[Size, _size_option("--begin", help="Smallest all-reduce size.")] = "1K",
    end: Annotated[Size | None, _size_option(
        "--end", help="Largest all-reduce size (default: the profile's, 16M on the "
                      "sandbox).")] = None,
    factor: Annotated[int, typer.Option(
        "--factor", min=2, help="Size multiplier between steps.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check every node's health and measure all-reduce bandwidth; write a report."""
    if end is not None and begin.bytes > end.bytes:
        raise InputError(f"--begin {begin.text} is larger than --end {end.text}",
                         field="--begin")
    inv = _load(inventory)
    from dsk_provision.validation.flow import validate as run_validate

    try:
        # Sizes travel as written ("1K", "16M"), the way the benchmarks read them.
        report = run_validate(inv, runs_dir=_runs_dir(ctx), begin=begin.text,
                              end=end.text if end else None, factor=factor,
                              console=render.console(stderr=as_json))
    except RunFailed as exc:
        # A failed check still has a full report: machines reading --json get it too.
        if as_json and getattr(exc, "report", None) is not None:
            render.print_json(exc.report.to_dict())
        raise
    if as_json:
        render.print_json(report.to_dict())
    else:
        render.validate_verdict(report)
    if not report.passed:
        raise typer.Exit(1)


@app.command()
def train(
    ctx: typer.Context,
    inventory: InventoryOpt,
    config: Annotated[Path, typer.Option("--config", help="Training config (TOML).")],
    name: Annotated[str | None, typer.Option(
        "--name", help="The job's name (default: the config's name and the time). "
                       "Launching a name again continues from its newest checkpoint.")] = None,
    fresh: Annotated[bool, typer.Option(
        "--fresh", help="Start the named job over: remove its outputs and checkpoints "
                        "first (asks for confirmation).")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    detach: Annotated[bool, typer.Option(
        "--detach", help="Start the job on the nodes and return; see `jobs`.")] = False,
    max_restarts: Annotated[int, typer.Option(
        "--max-restarts", min=0,
        help="Restart the job from its newest checkpoint when a rank dies, up to this many "
             "times between two checkpoints.")] = 0,
    min_nodes: Annotated[int | None, typer.Option(
        "--min-nodes", min=1,
        help="With --max-restarts: when a node dies, go on without it while at least this "
             "many nodes remain (default: stop the job).")] = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Show every line of every rank.")] = False,
    nproc_per_node: Annotated[int | None, typer.Option(
        "--nproc-per-node", min=1,
        help="Processes per node (default: its GPUs, or 1 on CPU-only nodes).")] = None,
    container: Annotated[str | None, typer.Option(
        "--container", metavar="IMAGE",
        help="Run the job in this image through the nodes' container runtime "
             "(containers_runtime), GPUs through CDI, InfiniBand devices where the "
             "node has them.")] = None,
    launcher: Annotated[str | None, typer.Option(
        "--launcher", help="ssh or slurm (default: dsk_launcher, else ssh).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="slurm: print the sbatch script; start nothing.")] = False,
    nodes: Annotated[int | None, typer.Option(
        "--nodes", min=1, help="slurm: nodes of the job (default: every node in service).")] = None,
    gpus_per_node: Annotated[int | None, typer.Option(
        "--gpus-per-node", min=0, help="slurm: GPUs per node (default: dsk_gpus).")] = None,
    time_limit: Annotated[str | None, typer.Option(
        "--time-limit", help="slurm: the job's time limit (minutes or D-HH:MM:SS).")] = None,
    partition: Annotated[str | None, typer.Option(
        "--partition", help="slurm: the partition (default: Slurm's default).")] = None,
) -> None:
    """Start the bundled trainer as a named job with torchrun on every node in service.

    Cordoned nodes are left out. Over SSH (follow it, or --detach) or as a Slurm job."""
    inv = _load(inventory)
    from dsk_provision import slurm
    from dsk_provision.joblaunch import train as run_train

    if fresh and name is None:
        raise InputError("--fresh needs the --name of the job to start over", field="--fresh")
    if fresh and not yes:
        if not sys.stdin.isatty():
            raise InputError(f"--fresh removes job {name}'s checkpoints: confirm with --yes",
                             field="--fresh")
        typer.confirm(f"remove job {name}'s outputs and checkpoints on every node and start "
                      "over?", abort=True)
    left_out = [n for n in inv.nodes if n.cordoned]
    for node in left_out:
        render.console().print(f"train: {node.name} is cordoned ({node.cordoned}): left out",
                               markup=False, highlight=False)
    if slurm.launcher(inv, launcher) == "slurm":
        if fresh or max_restarts or min_nodes:
            raise InputError("--fresh, --max-restarts and --min-nodes are options of the ssh "
                             "launcher's named jobs", field="launcher",
                             hint="a Slurm job is neither requeued nor restarted "
                                  "(docs/slurm.md, \"Restarts\")")
        if container:
            raise InputError("the slurm launcher does not run jobs in a container image",
                             field="--container",
                             hint="use the ssh launcher (--launcher ssh) for --container, "
                                  "or a Slurm container plugin (enroot/pyxis) in your own "
                                  "sbatch script")
        options = slurm.SlurmOptions(nodes=nodes, gpus_per_node=gpus_per_node,
                                     time_limit=time_limit, partition=partition)
        out = slurm.train(inv.in_service(), config, runs_dir=_runs_dir(ctx),
                          console=render.console(), nproc_per_node=nproc_per_node,
                          options=options, dry_run=dry_run, name=name, detach=detach)
        if dry_run:
            sys.stdout.write(out)
        return
    if dry_run or nodes is not None or gpus_per_node is not None or time_limit or partition:
        raise InputError("--dry-run, --nodes, --gpus-per-node, --time-limit and --partition "
                         "are options of the slurm launcher", field="launcher",
                         hint="add --launcher slurm, or set dsk_launcher: slurm")
    run_train(inv.in_service(), config, runs_dir=_runs_dir(ctx), console=render.console(),
              nproc_per_node=nproc_per_node, name=name, fresh=fresh, detach=detach,
              max_restarts=max_restarts, min_nodes=min_nodes, verbose=verbose,
              inventory_hint=str(inventory), container=container)


JobName = Annotated[str, typer.Argument(help="The job's name (see `jobs list`).")]


@jobs_app.command("list")
def jobs_list(
    inventory: InventoryOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """The jobs that have a directory on the nodes, and their state."""
    from dsk_provision.jobs import list_jobs

    found, silent = list_jobs(_load(inventory))
    if as_json:
        render.print_json({"jobs": [j.to_dict() for j in found], "unreachable": silent})
    else:
        render.jobs_list(found, silent)


@jobs_app.command("status")
def jobs_status(
    inventory: InventoryOpt,
    name: JobName,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """State, step, loss, tokens/s, MFU, ETA, last checkpoint and restarts, per node."""
    from dsk_provision.jobs import job_status

    status = job_status(_load(inventory), name)
    if as_json:
        render.print_json(status.to_dict())
    else:
        render.job_status(status)


@jobs_app.command("logs")
def jobs_logs(
    inventory: InventoryOpt,
    name: JobName,
    node: Annotated[str | None, typer.Option("--node", help="Only this node.")] = None,
    rank: Annotated[int | None, typer.Option("--rank", min=0, help="Only this rank.")] = None,
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="Keep printing what the job writes until it ends.")] = False,
    lines: Annotated[int | None, typer.Option(
        "--lines", "-n", min=0, help="The last N lines of each log (default: all).")] = None,
) -> None:
    """The job's logs, each line prefixed with its node and rank."""
    from dsk_provision.jobs import print_logs

    inv = _load(inventory)
    code = print_logs(inv, name, node=inv.node(node).name if node else None, rank=rank,
                      follow=follow, lines=lines)
    if code:
        raise typer.Exit(code)


@jobs_app.command("stop")
def jobs_stop(
    inventory: InventoryOpt,
    name: JobName,
    grace: Annotated[float, typer.Option(
        "--grace", min=0, help="Seconds the ranks get to save a checkpoint and end before "
                               "every process of the job is killed.")] = 120.0,
) -> None:
    """Stop the job on every node: a checkpoint at the next step, then nothing left."""
    from dsk_provision.jobs import stop_job

    result = stop_job(_load(inventory), name, grace_s=grace)
    render.job_stopped(result)
    if result.unreachable or result.left:
        raise RunFailed(f"job {name} may still run on "
                        f"{', '.join(result.unreachable + sorted(result.left))}",
                        nodes=result.unreachable + sorted(result.left))


@app.command()
def status(
    ctx: typer.Context,
    inventory: InventoryOpt,
    drift: Annotated[bool, typer.Option(
        "--drift", help="Also run bootstrap's check mode and list "
                        "what it would change (slower: every role's probe).")] = False,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=1, help="Seconds one node may take to answer.")] = 15.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """One row per node: reachable, cordoned, GPUs, versions, drift, last validation.

    The versions are the driver's, CUDA's and NCCL's. One probe per node, in parallel, each
    bounded by --timeout."""
    inv = _load(inventory)
    from dsk_provision.status import cluster_status

    result = cluster_status(inv, runs_dir=_runs_dir(ctx), drift=drift, timeout=timeout,
                            console=render.console(stderr=True))
    if as_json:
        render.print_json(result.to_dict())
    else:
        render.cluster_status(result)


@nodes_app.command("cordon")
def nodes_cordon(
    inventory: InventoryOpt,
    name: Annotated[str, typer.Argument(help="The node to take out of service.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the inventory).")],
) -> None:
    """Keep a node in the inventory but out of `train` and cluster-wide benchmarks.

    The cluster-wide benchmarks are those of `validate`; the mark is written as the node's
    dsk_cordoned in the hosts file. With Slurm on, the node is drained in Slurm with the
    reason."""
    from dsk_provision.lifecycle import cordon

    inv = cordon(_load(inventory), name, reason, say=render.line)
    render.line(f"{name} cordoned ({reason}); {len(inv.active_nodes)} of {len(inv.nodes)} "
                f"nodes in service; written to {inv.hosts_file}")


@nodes_app.command("uncordon")
def nodes_uncordon(
    inventory: InventoryOpt,
    name: Annotated[str, typer.Argument(help="The node to put back into service.")],
) -> None:
    """Put a cordoned node back into service (with Slurm on, resumed in Slurm too)."""
    from dsk_provision.lifecycle import cordon

    inv = _load(inventory)
    if inv.node(name).cordoned is None:
        render.line(f"{name} is not cordoned: nothing to do")
        return
    inv = cordon(inv, name, None, say=render.line)
    render.line(f"{name} is back in service; {len(inv.active_nodes)} of {len(inv.nodes)} "
                f"nodes in service; written to {inv.hosts_file}")


@app.command()
def init(
    inventory: Annotated[Path, typer.Option(
        "--inventory", "-i", help="The directory to write hosts.yml and group_vars/all.yml "
                                  "into.")],
    hosts: Annotated[str | None, typer.Option(
        "--hosts", help="Addresses and IPv4 ranges, comma-separated: "
                        "10.0.0.11,10.0.0.12 or 10.0.0.11-10.0.0.18.")] = None,
    hosts_file: Annotated[Path | None, typer.Option(
        "--hosts-file", help="A file of 'name address' or 'name address port' lines.")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", help="dsk_cluster_name (default: the directory's name).")] = None,
    gpus: Annotated[int, typer.Option(
        "--gpus", help="GPUs per node (--probe reads them).")] = 8,
    profile: Annotated[str | None, typer.Option(
        "--profile", help="Hardware profile of validate (--probe picks it from the GPUs' "
                          "model).")] = None,
    prefix: Annotated[str, typer.Option(
        "--prefix", help="Node names for --hosts: PREFIX01, PREFIX02...")] = "gpu",
    port: Annotated[int, typer.Option("--port", min=1, max=65535,
                                      help="SSH port of every node.")] = 22,
    user: Annotated[str, typer.Option("--user", help="ansible_user.")] = "root",
    key: Annotated[str, typer.Option(
        "--key", help="ansible_ssh_private_key_file.")] = "~/.ssh/id_ed25519",
    known_hosts: Annotated[str | None, typer.Option(
        "--known-hosts", help="The known_hosts file that pins the nodes' host keys (absolute) "
                              "(default: known_hosts in the inventory's directory).")] = None,
    probe: Annotated[bool, typer.Option(
        "--probe", help="Pin the host keys (as `hostkeys scan`), then read GPUs, OS and "
                        "interfaces from the nodes over SSH.")] = False,
    expect: Annotated[Path | None, typer.Option(
        "--expect", help="With --probe: the nodes' expected host key fingerprints, as for "
                         "`hostkeys scan --expect`.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an inventory already in the directory.")] = False,
) -> None:
    """Write a new, commented inventory (hosts.yml, group_vars/all.yml) that passes `check`."""
    from dsk_provision import inventory_init as ii

    if (hosts is None) == (hosts_file is None):
        raise InputError("give the nodes with --hosts or with --hosts-file (one of them)",
                         field="--hosts")
    if expect is not None and not probe:
        raise InputError("--expect checks host keys, which only --probe collects",
                         field="--expect")
    if hosts is not None:
        specs = ii.hosts_from_list(hosts, prefix=prefix, port=port)
    else:
        specs = ii.hosts_from_file(hosts_file, port=port)
    cluster = name if name is not None else Path(inventory).expanduser().absolute().name
    settings = ii.Settings(cluster_name=cluster, gpus_per_node=gpus, profile=profile,
                           user=user, key=key, known_hosts=known_hosts or "")
    result = ii.init_inventory(inventory, specs, settings, force=force, probe_nodes=probe,
                               expect=expect, confirm=render.host_keys_confirm,
                               show=render.host_keys_plan)
    render.inventory_written(result)


@hostkeys_app.command("scan")
def hostkeys_scan(
    inventory: InventoryOpt,
    nodes: Annotated[list[str] | None, typer.Argument(
        help="Only these nodes (default: every node of the inventory).")] = None,
    expect: Annotated[Path | None, typer.Option(
        "--expect", help="Pin without asking the keys whose fingerprints this file lists: "
                         "lines 'NODE SHA256:...' or `ssh-keygen -l` output.")] = None,
    replace: Annotated[list[str] | None, typer.Option(
        "--replace", help="A reinstalled node whose recorded keys give way to its new "
                          "ones (repeat or comma-separate); still confirmed or expected.")]
        = None,
    timeout: Annotated[int | None, typer.Option(
        "--timeout", min=1, max=300,
        help="Seconds to wait for each node (default: 10).")] = None,
) -> None:
    """Collect the nodes' host keys, show their fingerprints, and pin them.

    They are pinned in the inventory's known_hosts file once confirmed or matched with
    --expect. A key that differs from the recorded one is refused (exit code 4); a
    declined or unanswered prompt writes nothing (exit code 1)."""
    from dsk_provision import hostkeys

    plan = hostkeys.trust(_load(inventory), nodes or None, expect=expect,
                          confirm=render.host_keys_confirm, replace=_split(replace) or (),
                          timeout=timeout or hostkeys.SCAN_TIMEOUT_S,
                          show=render.host_keys_plan)
    render.host_keys_done(plan)


@nodes_app.command("add")
def nodes_add(
    ctx: typer.Context,
    inventory: InventoryOpt,
    name: Annotated[str | None, typer.Argument(help="The new node's name.")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Its address.")] = None,
    gpus: Annotated[int | None, typer.Option(
        "--gpus", min=0, help="Its GPUs, when not the cluster's dsk_gpus_per_node.")] = None,
    port: Annotated[int | None, typer.Option(
        "--port", min=1, max=65535, help="Its SSH port (default 22).")] = None,
    from_file: Annotated[Path | None, typer.Option(
        "--from", help="Several nodes from a YAML list: '- {name: gpu09, host: 10.0.0.9}' "
                       "(keys name, host, port, gpus).")] = None,
    verbose: Annotated[int, typer.Option(
        "--verbose", "-v", count=True, help="More Ansible output.")] = 0,
    validate_new: Annotated[bool, typer.Option(
        "--validate/--no-validate",
        help="Then their checks and an all-reduce with them.")] = True,
    expect: Annotated[Path | None, _expect_option()] = None,
    yes: Annotated[bool, _yes_keys_option()] = False,
) -> None:
    """Write new nodes into the inventory, then bootstrap, trust and validate them.

    Bringing them in is a full bootstrap of the new nodes, a trust refresh of the others,
    then validate's checks of the new nodes and an all-reduce with them. Their host keys
    are pinned first, as `hostkeys scan` pins them (confirmed, --expect or --yes); nodes
    whose keys are refused or that do not answer over SSH are not written."""
    from dsk_provision.inventory_edit import NewNode
    from dsk_provision.lifecycle import add, read_node_file

    if from_file is not None:
        if name is not None or host is not None or gpus is not None or port is not None:
            raise InputError("give either --from FILE or NAME --host ADDRESS, not both",
                             field="--from")
        nodes = read_node_file(from_file)
    else:
        if name is None or host is None:
            raise InputError("name the node and its address: NAME --host ADDRESS "
                             "(or --from FILE for several)", field="--host")
        nodes = [NewNode(name, host, port=port, gpus=gpus)]
    outcome, inv = add(_load(inventory), nodes, say=render.line, runs_dir=_runs_dir(ctx),
                       console=render.console(), verbosity=verbose,
                       host_keys=_host_key_policy(expect, yes))
    _brought_in(ctx, inv, outcome, f"added {', '.join(n.name for n in nodes)} to "
                f"{inv.hosts_file}", validate_new)


@nodes_app.command("replace")
def nodes_replace(
    ctx: typer.Context,
    inventory: InventoryOpt,
    name: Annotated[str, typer.Argument(help="The node that is on new hardware.")],
    host: Annotated[str | None, typer.Option(
        "--host", help="Its new address (default: the inventory's).")] = None,
    port: Annotated[int | None, typer.Option(
        "--port", min=1, max=65535, help="Its new SSH port.")] = None,
    yes: Annotated[bool, typer.Option(
        "--yes", help="Do not ask for confirmation, neither of the replacement nor of the "
                      "new host key (its fingerprint is printed).")] = False,
    verbose: Annotated[int, typer.Option(
        "--verbose", "-v", count=True, help="More Ansible output.")] = 0,
    validate_new: Annotated[bool, typer.Option(
        "--validate/--no-validate",
        help="Then its checks and an all-reduce with it.")] = True,
    expect: Annotated[Path | None, _expect_option()] = None,
) -> None:
    """The same node name on new hardware: new host key, full bootstrap, trust refreshed.

    Its old host key is revoked everywhere, the new one pinned (confirmed, --expect or
    --yes), the node fully bootstrapped and the others' trust refreshed."""
    from dsk_provision.lifecycle import replace

    inv = _load(inventory)
    node = inv.node(name)
    if not yes:
        typer.confirm(f"replace {name} ({host or node.address}): forget its host key and "
                      "bootstrap it as new hardware?", abort=True)
    outcome, inv = replace(inv, name, host=host, port=port, say=render.line,
                           runs_dir=_runs_dir(ctx), console=render.console(),
                           verbosity=verbose, host_keys=_host_key_policy(expect, yes))
    _brought_in(ctx, inv, outcome, f"{name} replaced in {inv.hosts_file}", validate_new)


@nodes_app.command("remove")
def nodes_remove(
    ctx: typer.Context,
    inventory: InventoryOpt,
    name: Annotated[str, typer.Argument(help="The node to take out of the cluster.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    keep_key: Annotated[bool, typer.Option(
        "--keep-key", help="Do not rotate the cluster key: the removed node's copy stays "
                           "accepted on every remaining node until `keys rotate` (when "
                           "removing several nodes, rotate with the last).")] = False,
    verbose: Annotated[int, typer.Option(
        "--verbose", "-v", count=True, help="More Ansible output.")] = 0,
) -> None:
    """Take a node out of the inventory and out of the other nodes' trust.

    The remaining nodes forget its name, address and host key, the inventory drops it,
    and the cluster key it held is rotated on the remaining nodes. The node is not
    contacted (a dead node can be removed)."""
    from dsk_provision.lifecycle import check_removal, remove

    inv = _load(inventory)
    remaining = check_removal(inv, name)
    if not yes:
        typer.confirm(f"remove {name} ({inv.node(name).address}) from the cluster? "
                      f"{len(remaining)} node(s) stay"
                      + ("" if keep_key else " and get a new cluster key"), abort=True)
    outcome, smaller = remove(inv, name, say=render.line, rotate_key=not keep_key,
                              runs_dir=_runs_dir(ctx), console=render.console(),
                              verbosity=verbose)
    render.line(f"{name} removed; {len(smaller.nodes)} node(s) in {smaller.hosts_file}")
    if outcome.summary():
        render.line(outcome.summary())
    if outcome.key_warning:
        render.warnings([outcome.key_warning])


@keys_app.command("rotate")
def keys_rotate(
    ctx: typer.Context,
    inventory: InventoryOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """A new cluster key pair, tried on every node before the old one is removed.

    The new key is authorized and tried on every node before the old one is removed from
    every node's authorized_keys. An interrupted rotation resumes."""
    inv = _load(inventory)
    from dsk_provision.keys import rotate

    out = render.console(stderr=as_json)
    result = rotate(inv, runs_dir=_runs_dir(ctx), console=out, say=render.progress(out))
    if as_json:
        render.print_json(result.to_dict())
    else:
        render.keys_rotated(result)


@runs_app.command("list")
def runs_list(
    ctx: typer.Context,
    command: Annotated[str | None, typer.Option(
        "--command", help="Only runs of this command (bootstrap, validate ...).")] = None,
    cluster: Annotated[str | None, typer.Option("--cluster", help="Only this cluster's.")] = None,
    last: Annotated[int, typer.Option("--last", min=1, help="How many runs.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the runs as JSON.")] = False,
) -> None:
    """Recent runs, newest first: command, cluster, start, duration, result."""
    from dsk_provision import runs

    found = runs.list_runs(_runs_dir(ctx), command=command, cluster=cluster, limit=last)
    if as_json:
        render.print_json([r.to_dict() for r in found])
    else:
        from dsk_provision.rundir import runs_root

        render.runs_table(found, runs_root(_runs_dir(ctx)))


@runs_app.command("show")
def runs_show(
    ctx: typer.Context,
    run: Annotated[str | None, typer.Argument(
        help="A run's directory name (or its start), or path; default: the latest.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run as JSON.")] = False,
) -> None:
    """One run: its recap, failures and where its reports are."""
    from dsk_provision import runs

    found = runs.find_run(run, _runs_dir(ctx))
    problems = runs.failures(found)
    paths = runs.report_paths(found)
    if as_json:
        render.print_json({**found.to_dict(), "failures": [
            {"host": h, "message": m} for h, m in problems],
            "reports": [str(p) for p in paths], "record": found.record})
    else:
        render.run_detail(found, problems, paths)


@sandbox_app.command("up")
def sandbox_up(
    name: Annotated[str, typer.Option("--name", help=f"Sandbox name: {NAME_RULE}.")] = "dsk",
    nodes: Annotated[int, typer.Option(
        "--nodes", help=f"Number of nodes (with the spare ones, at most {MAX_NODES}).")] = 3,
    spare: Annotated[int | None, typer.Option(
        "--spare",
        help="More nodes started but left out of the inventory, to try `nodes add` "
             "(default: as many as the running sandbox has, else 0).")] = None,
    subnet: Annotated[str | None, typer.Option(
        "--subnet", help="Bridge subnet, e.g. 10.213.7.0/24.")] = None,
) -> None:
    """Create and start a local cluster; prints its inventory."""
    from dsk_provision import sandbox

    info = sandbox.up(name, nodes, spare=spare, subnet=subnet,
                      progress=render.progress(render.console()))
    render.sandbox_up(name, info)


@sandbox_app.command("reimage")
def sandbox_reimage(
    node: Annotated[str, typer.Argument(help="Node to give a new disk and host key.")],
    name: Annotated[str, typer.Option("--name", help="Sandbox name.")] = "dsk",
) -> None:
    """Wipe a node and start it again with a new SSH host key, to try `nodes replace`.

    This stands for new hardware at the same address."""
    from dsk_provision import sandbox

    info = sandbox.reimage_node(name, node, progress=render.progress(render.console()))
    render.line(f"{node} of sandbox {name} has a new disk and host key; bring it back "
                f"with: dsk-provision nodes replace -i {info.inventory_path} {node}")


@sandbox_app.command("down")
def sandbox_down(
    name: Annotated[str, typer.Option("--name", help="Sandbox name.")] = "dsk",
) -> None:
    """Stop a sandbox and remove its nodes and network."""
    from dsk_provision import sandbox

    sandbox.down(name, progress=render.progress(render.console()))
    render.sandbox_down(name)


@sandbox_app.command("status")
def sandbox_status(
    name: Annotated[str | None, typer.Option("--name", help="Only this sandbox.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Show sandboxes and their nodes."""
    from dsk_provision import sandbox

    rows = sandbox.status(name)
    if as_json:
        render.print_json(rows)
    else:
        render.sandbox_status(rows, name)


@sandbox_app.command("link")
def sandbox_link(
    node: Annotated[str, typer.Argument(help="Node whose link to shape, e.g. node2.")],
    name: Annotated[str, typer.Option("--name", help="Sandbox name.")] = "dsk",
    rate: Annotated[str | None, typer.Option(
        "--rate", help="Limit the node's link, tc syntax (e.g. 10mbit).")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the limit.")] = False,
) -> None:
    """Slow one node's network link (to see validate name a slow node), or restore it."""
    if (rate is None) == (not clear):
        raise InputError("give either --rate RATE or --clear", field="--rate")
    from dsk_provision import sandbox

    sandbox.set_link_rate(name, node, rate)
    render.sandbox_link(name, node, rate)


@mirror_app.command("build")
def mirror_build(
    inventory: InventoryOpt,
    out: Annotated[Path, typer.Option("--out", help="Mirror directory.")] = Path("mirror"),
    os_ids: Annotated[list[str] | None, typer.Option(
        "--os", help="Nodes' OS: debian-12, ubuntu-22.04, ubuntu-24.04 (repeat; default: "
                     "this control node's).")] = None,
    apt_sources: Annotated[list[str] | None, typer.Option(
        "--apt-sources", help="[OS=]FILE of one-line `deb` sources to resolve from "
                              "(needed for an OS other than this control node's).")] = None,
    dpkg_status: Annotated[Path | None, typer.Option(
        "--dpkg-status", help="A node's /var/lib/dpkg/status: leave out what it has "
                              "(default: the full dependency closure).")] = None,
    packages: Annotated[list[str] | None, typer.Option(
        "--package", help="Another apt package (name or name=version; repeat).")] = None,
    gpu_stack: Annotated[bool, typer.Option(
        "--gpu-stack/--no-gpu-stack",
        help="Include the NVIDIA stack (driver, CUDA, NCCL ...) for nodes with GPUs.")] = True,
    wheels: Annotated[bool, typer.Option(
        "--wheels/--no-wheels", help="Download the trainer environment's wheels.")] = True,
    pip_index_url: Annotated[str | None, typer.Option(
        "--pip-index-url", help="Index to download wheels from (default: pip's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Download every apt package and wheel the inventory's nodes install."""
    from dsk_provision import mirror
    from dsk_provision.state import cluster_state_dir

    inv = _load(inventory)
    oses = list(dict.fromkeys(_split(os_ids) or [mirror.host_os_id()]))
    plan = mirror.plan_mirror(inv, oses, extra_packages=_split(packages) or (),
                              gpu_stack=gpu_stack)
    sources = mirror.parse_apt_sources_options(apt_sources or [], oses)
    render.mirror_notes(plan.notes)
    signing_home = cluster_state_dir(inv.cluster_name, create=True) / mirror.SIGNING_DIR
    manifest = mirror.build_mirror(
        plan, out, signing_home=signing_home, apt_sources=sources, dpkg_status=dpkg_status,
        wheels=wheels,
        pip_args=["--index-url", pip_index_url] if pip_index_url else [],
        progress=render.progress(render.console(stderr=True)))
    if as_json:
        render.print_json(manifest)
    else:
        render.mirror_built(manifest, out)


@mirror_app.command("serve")
def mirror_serve(
    directory: Annotated[Path, typer.Option("--dir", help="A built mirror.")] = Path("mirror"),
    bind: Annotated[str | None, typer.Option(
        "--bind", help="Address to listen on (default: the one that reaches the "
                       "inventory's first node, else 127.0.0.1).")] = None,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8080,
    inventory: Annotated[Path | None, typer.Option(
        "--inventory", "-i", help="Pick the bind address that reaches these nodes.")] = None,
) -> None:
    """Serve a built mirror in the foreground; prints the inventory settings to use."""
    from dsk_provision import mirror_serve as ms
    from dsk_provision.mirror import read_manifest

    first = _load(inventory).first_node.address if inventory and bind is None else None
    address = ms.check_bind(bind, inventory_first_address=first)
    manifest = read_manifest(directory)
    server = ms.make_server(directory, address, port)
    url = ms.base_url(address, port)
    render.mirror_serving(directory, url, ms.inventory_settings(manifest, url, directory))
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main() -> None:
    app(prog_name="dsk-provision")


if __name__ == "__main__":
    main()
