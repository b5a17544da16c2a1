"""The dsk-provision command line. Thin: parse, call one library function, render.

Heavy modules (ansible, ansible_runner, torch, jsonschema) are imported inside the
commands, so that ``dsk-provision --help`` starts fast. What the commands print lives in
dsk_provision.render; how the library's errors become messages and exit codes lives in
one place, the root command group below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from dsk_provision import render
from dsk_provision.errors import DskError, InputError, Interrupted, RunFailed
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


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
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
        "--verbose", "-v", count=True, help="More Ansible output.")] = 0,
) -> None:
    """Provision the nodes: run playbooks/site.yml."""
    inv = _load(inventory)
    from dsk_provision.runner import run_playbook

    run_playbook("site.yml", inv, command="bootstrap", runs_dir=_runs_dir(ctx),
                 limit=_split(limit), tags=_split(tags), check=check_mode,
                 console=render.console(), verbosity=verbose)


@app.command()
def validate(
    ctx: typer.Context,
    inventory: InventoryOpt,
    begin: Annotated[Size, _size_option("--begin", help="Smallest all-reduce size.")] = "1K",
    end: Annotated[Size | None, _size_option(
        "--end", help="Largest all-reduce size [default: the profile's, 16M on the "
                      "sandbox].")] = None,
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
        help="Restart the job from its newest checkpoint when a rank dies, this many "
             "times.")] = 0,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Show every line of every rank.")] = False,
    nproc_per_node: Annotated[int | None, typer.Option(
        "--nproc-per-node", min=1,
        help="Processes per node (default: its GPUs, or 1 on CPU-only nodes).")] = None,
) -> None:
    """Start the bundled trainer as a named job with torchrun on every node in service
    (cordoned nodes are left out); follow it, or --detach."""
    inv = _load(inventory)
    from dsk_provision.launch import train as run_train

    if fresh and name is None:
        raise InputError("--fresh needs the --name of the job to start over", field="--fresh")
    if fresh and not yes:
        import sys

        if not sys.stdin.isatty():
            raise InputError(f"--fresh removes job {name}'s checkpoints: confirm with --yes",
                             field="--fresh")
        typer.confirm(f"remove job {name}'s outputs and checkpoints on every node and start "
                      "over?", abort=True)
    left_out = [n for n in inv.nodes if n.cordoned]
    for node in left_out:
        render.console().print(f"train: {node.name} is cordoned ({node.cordoned}): left out",
                               markup=False, highlight=False)
    run_train(inv.in_service(), config, runs_dir=_runs_dir(ctx), console=render.console(),
              nproc_per_node=nproc_per_node, name=name, fresh=fresh, detach=detach,
              max_restarts=max_restarts, verbose=verbose, inventory_hint=str(inventory))


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


@nodes_app.command("cordon")
def nodes_cordon(
    inventory: InventoryOpt,
    name: Annotated[str, typer.Argument(help="The node to take out of service.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the inventory).")],
) -> None:
    """Keep a node in the inventory but out of `train` and the cluster-wide benchmarks
    of `validate` (written as its dsk_cordoned in the hosts file)."""
    from dsk_provision.inventory_edit import set_cordon

    inv = set_cordon(_load(inventory), name, reason)
    render.line(f"{name} cordoned ({reason}); {len(inv.active_nodes)} of {len(inv.nodes)} "
                f"nodes in service; written to {inv.hosts_file}")


@nodes_app.command("uncordon")
def nodes_uncordon(
    inventory: InventoryOpt,
    name: Annotated[str, typer.Argument(help="The node to put back into service.")],
) -> None:
    """Put a cordoned node back into service."""
    from dsk_provision.inventory_edit import set_cordon

    inv = _load(inventory)
    if inv.node(name).cordoned is None:
        render.line(f"{name} is not cordoned: nothing to do")
        return
    inv = set_cordon(inv, name, None)
    render.line(f"{name} is back in service; {len(inv.active_nodes)} of {len(inv.nodes)} "
                f"nodes in service; written to {inv.hosts_file}")


@sandbox_app.command("up")
def sandbox_up(
    name: Annotated[str, typer.Option(
        "--name", help="Sandbox name ([a-z][a-z0-9]{0,7}).")] = "dsk",
    nodes: Annotated[int, typer.Option("--nodes", min=1, max=32, help="Number of nodes.")] = 3,
    subnet: Annotated[str | None, typer.Option(
        "--subnet", help="Bridge subnet, e.g. 10.213.7.0/24.")] = None,
) -> None:
    """Create and start a local cluster; prints its inventory."""
    from dsk_provision import sandbox

    info = sandbox.up(name, nodes, subnet=subnet, progress=render.progress(render.console()))
    render.sandbox_up(name, info)


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
