"""The dsk-provision command line. Thin: parse, call one library function, render.

Heavy modules (ansible, ansible_runner, torch, jsonschema) are imported inside the
commands, so that ``dsk-provision --help`` starts fast.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from dsk_provision.errors import DskError, InputError, RunFailed

app = typer.Typer(
    name="dsk-provision",
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

_state: dict[str, Any] = {"debug": False, "runs_dir": None}

InventoryOpt = Annotated[Path, typer.Option(
    "--inventory", "-i", help="Inventory: a hosts.yml file or a directory holding one.")]


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def _fail(message: str, code: int) -> None:
    err = _console(stderr=True)
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _guard(fn: Callable[[], Any]) -> Any:
    """Run a command body: DskError -> its message and exit code; others -> one line."""
    try:
        return fn()
    except typer.Exit:
        raise
    except DskError as exc:
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if _state["debug"]:
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _load(inventory: Path):
    from dsk_provision.inventory import load_inventory

    return load_inventory(inventory)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.I)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str, option: str) -> int:
    """'1K' -> 1024, '16M' -> 16777216 (binary units, as nccl-tests reads them)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InputError(f"{text!r} is not a size: use a number with an optional K, M or G "
                         "suffix, e.g. 1K or 16M", field=option)
    value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if value < 1:
        raise InputError(f"{text!r} must be at least 1 byte", field=option)
    return value


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    runs_dir: Annotated[Path | None, typer.Option(
        "--runs-dir", envvar="DSK_RUNS_DIR",
        help="Where run directories go (default ./.dsk/runs).")] = None,
) -> None:
    """From fresh GPU servers to a verified multi-node training job."""
    _state["debug"] = debug
    _state["runs_dir"] = runs_dir


@app.command()
def check(
    inventory: InventoryOpt,
    config: Annotated[Path | None, typer.Option(
        "--config", help="Also validate this training config (TOML).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Validate the inventory (and a training config); no connection is made."""

    def body() -> None:
        inv = _load(inventory)
        cfg = None
        if config is not None:
            from trainer.config import load_config

            cfg = load_config(config)
        if as_json:
            _print_json({
                "inventory": str(inv.path), "cluster": inv.cluster_name, "profile": inv.profile,
                "total_gpus": inv.total_gpus, "config": str(config) if config else None,
                "nodes": [{"name": n.name, "address": n.address, "port": n.port,
                           "user": n.user, "gpus": n.gpus} for n in inv.nodes],
            })
            return
        from rich.table import Table

        out = _console()
        table = Table(title=f"cluster {inv.cluster_name} ({inv.path})", title_justify="left")
        for col in ("rank", "node", "address", "port", "user", "gpus"):
            table.add_column(col, justify="right" if col in ("rank", "port", "gpus") else "left")
        for rank, n in enumerate(inv.nodes):
            table.add_row(str(rank), n.name, n.address, str(n.port), n.user or "-", str(n.gpus))
        out.print(table)
        out.print(f"{len(inv.nodes)} node(s), {inv.total_gpus} GPU(s), profile "
                  f"{inv.profile or '-'}; rendezvous on {inv.first_node.name}: inventory OK",
                  markup=False, highlight=False)
        if cfg is not None:
            out.print(f"training config {config}: OK", markup=False, highlight=False)

    _guard(body)


@app.command()
def bootstrap(
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

    def body() -> None:
        inv = _load(inventory)
        from dsk_provision.runner import run_playbook

        run_playbook("site.yml", inv, command="bootstrap", runs_dir=_state["runs_dir"],
                     limit=_split(limit), tags=_split(tags), check=check_mode,
                     console=_console(), verbosity=verbose)

    _guard(body)


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    return out or None


@app.command()
def validate(
    inventory: InventoryOpt,
    begin: Annotated[str, typer.Option("--begin", help="Smallest all-reduce size.")] = "1K",
    end: Annotated[str | None, typer.Option(
        "--end", help="Largest all-reduce size [default: the profile's, 16M on the "
                      "sandbox].")] = None,
    factor: Annotated[int, typer.Option(
        "--factor", min=2, help="Size multiplier between steps.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check every node's health and measure all-reduce bandwidth; write a report."""

    def body() -> None:
        # Sizes travel as written ("1K", "16M"), the way the benchmark reads them; they are
        # checked here so that a typo fails before any connection.
        lo = parse_size(begin, "--begin")
        if end is not None and lo > parse_size(end, "--end"):
            raise InputError(f"--begin {begin} is larger than --end {end}", field="--begin")
        inv = _load(inventory)
        from dsk_provision.validation.flow import validate as run_validate

        try:
            report = run_validate(inv, runs_dir=_state["runs_dir"], begin=begin, end=end,
                                  factor=factor, console=_console(stderr=as_json))
        except RunFailed as exc:
            # A failed check still has a full report: machines reading --json get it too.
            if as_json and getattr(exc, "report", None) is not None:
                _print_json(exc.report.to_dict())
            raise
        if as_json:
            _print_json(report.to_dict())
        else:
            verdict = "PASSED" if report.passed else "FAILED"
            _console().print(f"validate {verdict}; report in {report.run_dir}",
                             markup=False, highlight=False)
        if not report.passed:
            raise typer.Exit(1)

    _guard(body)


@app.command()
def train(
    inventory: InventoryOpt,
    config: Annotated[Path, typer.Option("--config", help="Training config (TOML).")],
    nproc_per_node: Annotated[int | None, typer.Option(
        "--nproc-per-node", min=1,
        help="Processes per node (default: its GPUs, or 1 on CPU-only nodes).")] = None,
) -> None:
    """Start the bundled trainer with torchrun on every node; stream its logs."""

    def body() -> None:
        inv = _load(inventory)
        from dsk_provision.launch import train as run_train

        run_train(inv, config, runs_dir=_state["runs_dir"], console=_console(),
                  nproc_per_node=nproc_per_node)

    _guard(body)


@sandbox_app.command("up")
def sandbox_up(
    name: Annotated[str, typer.Option(
        "--name", help="Sandbox name ([a-z][a-z0-9]{0,7}).")] = "dsk",
    nodes: Annotated[int, typer.Option("--nodes", min=1, max=32, help="Number of nodes.")] = 3,
    subnet: Annotated[str | None, typer.Option(
        "--subnet", help="Bridge subnet, e.g. 10.213.7.0/24.")] = None,
) -> None:
    """Create and start a local cluster; prints its inventory."""

    def body() -> None:
        from dsk_provision import sandbox

        out = _console()

        def progress(message: str) -> None:
            out.print(f"  {message}", markup=False, highlight=False)

        info = sandbox.up(name, nodes, subnet=subnet, progress=progress)
        inv = info.inventory_path
        out.print(f"sandbox {name} is up with {len(info.nodes)} node(s); inventory: {inv}",
                  markup=False, highlight=False)
        out.print("next:", markup=False)
        for cmd in (f"dsk-provision check -i {inv}", f"dsk-provision bootstrap -i {inv}",
                    f"dsk-provision validate -i {inv}",
                    f"dsk-provision train -i {inv} --config trainer/configs/tiny.toml",
                    f"dsk-provision sandbox down --name {name}"):
            out.print(f"  {cmd}", markup=False, highlight=False)

    _guard(body)


@sandbox_app.command("down")
def sandbox_down(
    name: Annotated[str, typer.Option("--name", help="Sandbox name.")] = "dsk",
) -> None:
    """Stop a sandbox and remove its nodes and network."""

    def body() -> None:
        from dsk_provision import sandbox

        out = _console()
        sandbox.down(name, progress=lambda m: out.print(f"  {m}", markup=False,
                                                          highlight=False))
        out.print(f"sandbox {name} is down", markup=False, highlight=False)

    _guard(body)


@sandbox_app.command("status")
def sandbox_status(
    name: Annotated[str | None, typer.Option("--name", help="Only this sandbox.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Show sandboxes and their nodes."""

    def body() -> None:
        from dsk_provision import sandbox

        rows = sandbox.status(name)
        if as_json:
            _print_json(rows)
            return
        out = _console()
        if not rows:
            out.print("no sandbox" + (f" named {name}" if name else "") + " is running",
                      markup=False)
            return
        from rich.table import Table

        table = Table()
        for col in ("sandbox", "subnet", "mirror", "node", "address", "state"):
            table.add_column(col)
        for row in rows:
            nodes = row.get("nodes") or [{}]
            for i, node in enumerate(nodes):
                node = node if isinstance(node, dict) else {"name": node}
                head = (row.get("name"), row.get("subnet"), row.get("mirror")) if i == 0 \
                    else ("", "", "")
                table.add_row(*(_cell(v) for v in head), _cell(node.get("name")),
                              _cell(node.get("ip")), _cell(node.get("state")))
        out.print(table)
        for row in rows:
            inv = row.get("inventory_path") or row.get("inventory")
            if inv:
                out.print(f"{row.get('name')}: inventory {inv}", markup=False, highlight=False,
                          soft_wrap=True)

    _guard(body)


@sandbox_app.command("link")
def sandbox_link(
    node: Annotated[str, typer.Argument(help="Node whose link to shape, e.g. node2.")],
    name: Annotated[str, typer.Option("--name", help="Sandbox name.")] = "dsk",
    rate: Annotated[str | None, typer.Option(
        "--rate", help="Limit the node's link, tc syntax (e.g. 10mbit).")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the limit.")] = False,
) -> None:
    """Slow one node's network link (to see validate name a slow node), or restore it."""

    def body() -> None:
        if (rate is None) == (not clear):
            raise InputError("give either --rate RATE or --clear", field="--rate")
        from dsk_provision import sandbox

        sandbox.set_link_rate(name, node, None if clear else rate)
        state = "restored" if clear else f"limited to {rate}"
        _console().print(f"sandbox {name}: link of {node} {state}", markup=False,
                         highlight=False)

    _guard(body)


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

    def body() -> None:
        from dsk_provision import mirror

        inv = _load(inventory)
        oses = list(dict.fromkeys(_split(os_ids) or [mirror.host_os_id()]))
        plan = mirror.plan_mirror(inv, oses, extra_packages=_split(packages) or (),
                                  gpu_stack=gpu_stack)
        sources = mirror.parse_apt_sources_options(apt_sources or [], oses)
        err = _console(stderr=True)
        for note in plan.notes:
            err.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
        manifest = mirror.build_mirror(
            plan, out, apt_sources=sources, dpkg_status=dpkg_status, wheels=wheels,
            pip_args=["--index-url", pip_index_url] if pip_index_url else [],
            progress=lambda m: err.print(f"  {m}", markup=False, highlight=False))
        if as_json:
            _print_json(manifest)
            return
        out_c = _console()
        for os_id, apt in manifest["apt"].items():
            out_c.print(f"{os_id}: {len(apt['packages'])} apt packages in {out / apt['path']}",
                        markup=False, highlight=False)
        if manifest["wheels"]:
            out_c.print(f"wheels: {len(manifest['wheels']['files'])} files in "
                        f"{out / manifest['wheels']['path']}", markup=False, highlight=False)
        out_c.print(f"serve it: dsk-provision mirror serve --dir {out} --bind ADDRESS",
                    markup=False, highlight=False)

    _guard(body)


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

    def body() -> None:
        from dsk_provision import mirror_serve as ms
        from dsk_provision.mirror import read_manifest

        first = _load(inventory).first_node.address if inventory and bind is None else None
        address = ms.check_bind(bind, inventory_first_address=first)
        manifest = read_manifest(directory)
        server = ms.make_server(directory, address, port)
        url = ms.base_url(address, port)
        out = _console()
        out.print(f"serving {directory} on {url} (Ctrl-C stops it)", markup=False,
                  highlight=False)
        out.print("inventory settings (all.vars, or per group when nodes differ):",
                  markup=False)
        for var, value, comment in ms.inventory_settings(manifest, url):
            out.print(f"  {var}: {value}    # {comment}", markup=False, highlight=False)
        try:
            server.serve_forever()
        finally:
            server.server_close()

    _guard(body)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return str(value)


def main() -> None:
    app(prog_name="dsk-provision")


if __name__ == "__main__":
    main()
