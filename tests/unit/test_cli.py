"""The CLI: fast start-up, the command list, error handling, and wiring to the library."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsk_provision.cli import app, parse_size
from dsk_provision.errors import EnvironmentProblem, InputError, RunFailed

REPO = Path(__file__).resolve().parent.parent.parent
EXAMPLE = REPO / "inventory" / "example"
HEAVY = ("torch", "ansible", "ansible_runner", "jsonschema", "numpy")


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_help_imports_nothing_heavy():
    """--help stays quick by importing none of the heavy libraries (torch, ansible, ...);
    its start-up time is a benchmark figure, not asserted here (it varies with load)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "dsk_provision", "--help"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "dsk_provision.cli" in imported  # the probe sees our own imports
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert heavy == [], f"--help imported {heavy}"


def test_command_list():
    out = _invoke("--help").output
    for command in ("check", "bootstrap", "validate", "train", "sandbox"):
        assert command in out
    sandbox_out = _invoke("sandbox", "--help").output
    for command in ("up", "down", "status", "link"):
        assert command in sandbox_out



def _commands(command, path=()):
    """Every command and group of the CLI, with its path of names."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_every_command_summary_is_one_line():
    """The command tables show each help text's first paragraph with its line breaks kept
    (typer's rich mode), so a summary written over two lines prints broken mid-sentence."""
    import inspect

    import typer

    broken = []
    for path, command in _commands(typer.main.get_command(app)):
        first = inspect.cleandoc(command.help or "").split("\n\n")[0]
        if not first or "\n" in first:
            broken.append(" ".join(path) or "(root)")
    assert broken == [], f"summaries missing or over several lines: {broken}"


def test_no_help_text_loses_characters_to_markup():
    """Typer's rich mode reads square brackets as markup and drops what it takes for a
    tag: "[default: 10]" or "[a-z]" would vanish from --help without a word."""
    import inspect

    import typer
    from rich.text import Text

    lost = []
    for path, command in _commands(typer.main.get_command(app)):
        texts = [("", command.help or "")]
        texts += [(param.name, getattr(param, "help", None) or "") for param in command.params]
        for name, text in texts:
            text = inspect.cleandoc(text)
            if Text.from_markup(text).plain != text:
                lost.append(f"{' '.join(path)} {name}: {text[:60]}")
    assert lost == [], lost


def test_a_closed_pipe_ends_quietly(monkeypatch, tmp_path):
    """`dsk-provision runs list | head -1` closes the pipe while the command still
    writes: Typer's quiet exit 1, not an "unexpected error" line."""
    from dsk_provision import runs

    def reader_gone(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(runs, "list_runs", reader_gone)
    result = CliRunner().invoke(app, ["--runs-dir", str(tmp_path), "runs", "list"])
    assert result.exit_code == 1
    assert "error" not in result.output


def test_check_json(tmp_path):
    result = _invoke("check", "-i", str(EXAMPLE), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["cluster"] == "example" and data["total_gpus"] == 32
    assert [n["name"] for n in data["nodes"]] == ["gpu01", "gpu02", "gpu03", "gpu04"]


def test_check_with_bad_training_config(monkeypatch, tmp_path):
    def load_config(path):
        raise InputError("must be a positive integer", file=str(path), field="model.dim")

    monkeypatch.setitem(sys.modules, "trainer.config",
                        types.SimpleNamespace(load_config=load_config))
    result = _invoke("check", "-i", str(EXAMPLE), "--config", str(tmp_path / "t.toml"))
    assert result.exit_code == 2
    assert f"error: {tmp_path / 't.toml'}: model.dim: must be a positive integer" in result.output


@pytest.mark.parametrize("edit, field", [
    (("n_heads = 4", "n_heads = 0"), "model.n_heads"),         # out of range
    (("dim = 64", 'dim = "64"'), "model.dim"),                 # wrong type
    (("[training]", "[training]\nstepz = 3"), "training.stepz"),  # unknown key
])
def test_real_bad_training_configs_exit_2_naming_the_field(tmp_path, edit, field):
    """The real trainer.config, through both commands that take a config; nothing runs."""
    text = (REPO / "trainer" / "configs" / "tiny.toml").read_text()
    assert edit[0] in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(edit[0], edit[1], 1))
    for args in (("check", "-i", str(EXAMPLE), "--config", str(bad)),
                 ("train", "-i", str(EXAMPLE), "--config", str(bad))):
        result = _invoke(*args)
        assert result.exit_code == 2, result.output
        assert f"{bad}: {field}" in result.output and "Traceback" not in result.output


def test_unexpected_error_is_one_line_unless_debug(monkeypatch):
    import dsk_provision.inventory as inventory

    def boom(path):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(inventory, "load_inventory", boom)
    result = _invoke("check", "-i", str(EXAMPLE))
    assert result.exit_code == 1
    assert "unexpected RuntimeError: disk on fire" in result.output
    assert "rerun with --debug" in result.output
    assert "Traceback" not in result.output
    debug = _invoke("--debug", "check", "-i", str(EXAMPLE))
    assert isinstance(debug.exception, RuntimeError)


def test_environment_problem_exits_3(monkeypatch):
    import dsk_provision.inventory as inventory

    def missing(path):
        raise EnvironmentProblem("ssh is not installed", hint="apt-get install openssh-client")

    monkeypatch.setattr(inventory, "load_inventory", missing)
    result = _invoke("check", "-i", str(EXAMPLE))
    assert result.exit_code == 3
    assert "error: ssh is not installed" in result.output
    assert "hint: apt-get install openssh-client" in result.output


def test_bootstrap_runs_site_yml_with_options(monkeypatch, tmp_path):
    import dsk_provision.runner as runner

    calls = []

    def fake_run(playbook, inventory, **kw):
        calls.append((playbook, inventory, kw))

    monkeypatch.setattr(runner, "run_playbook", fake_run)
    result = _invoke("--runs-dir", str(tmp_path), "bootstrap", "-i", str(EXAMPLE),
                     "--limit", "gpu01,gpu02", "--limit", "gpu03", "--tags", "common",
                     "--check")
    assert result.exit_code == 0, result.output
    (playbook, inv, kw), = calls
    assert playbook == "site.yml" and len(inv.nodes) == 4
    assert kw["command"] == "bootstrap" and kw["runs_dir"] == tmp_path
    assert kw["limit"] == ["gpu01", "gpu02", "gpu03"] and kw["tags"] == ["common"]
    assert kw["check"] is True


def test_bootstrap_failure_names_nodes(monkeypatch):
    import dsk_provision.runner as runner

    def fail(*a, **kw):
        raise RunFailed("bootstrap failed on 1 host(s): gpu02\n  gpu02: apt: no space left",
                        nodes=["gpu02"])

    monkeypatch.setattr(runner, "run_playbook", fail)
    result = _invoke("bootstrap", "-i", str(EXAMPLE))
    assert result.exit_code == 1
    assert "error: bootstrap failed on 1 host(s): gpu02" in result.output


def test_bad_inventory_stops_bootstrap_before_any_run(monkeypatch):
    import dsk_provision.runner as runner

    monkeypatch.setattr(runner, "run_playbook", lambda *a, **kw: pytest.fail("ran"))
    bad = Path(__file__).parent / "bad_inventories" / "bad_ipv4.yml"
    result = _invoke("bootstrap", "-i", str(bad))
    assert result.exit_code == 2 and "ansible_host" in result.output


def _fake_validate(passed: bool, calls: list):
    def validate(inventory, **kw):
        calls.append(kw)
        return types.SimpleNamespace(passed=passed, run_dir=Path("/runs/x"),
                                     to_dict=lambda: {"passed": passed, "nodes": 4})
    return types.SimpleNamespace(validate=validate)


def test_validate_parses_sizes_and_prints_json(monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "dsk_provision.validation.flow", _fake_validate(True, calls))
    result = _invoke("validate", "-i", str(EXAMPLE), "--begin", "8K", "--end", "1M",
                     "--factor", "4", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"passed": True, "nodes": 4}
    assert calls[0]["begin"] == "8K" and calls[0]["end"] == "1M" and calls[0]["factor"] == 4
    assert _invoke("validate", "-i", str(EXAMPLE), "--json").exit_code == 0
    assert calls[1]["begin"] == "1K" and calls[1]["end"] is None  # the profile decides


def test_validate_failed_report_exits_1(monkeypatch):
    monkeypatch.setitem(sys.modules, "dsk_provision.validation.flow", _fake_validate(False, []))
    result = _invoke("validate", "-i", str(EXAMPLE))
    assert result.exit_code == 1 and "validate FAILED" in result.output


def test_validate_json_prints_the_report_of_a_failed_run(monkeypatch):
    from dsk_provision.errors import RunFailed

    def validate(inventory, **kw):
        exc = RunFailed("allreduce_busbw failed on gpu02", nodes=["gpu02"])
        exc.report = types.SimpleNamespace(to_dict=lambda: {"passed": False, "failed": ["gpu02"]})
        raise exc

    monkeypatch.setitem(sys.modules, "dsk_provision.validation.flow",
                        types.SimpleNamespace(validate=validate))
    result = _invoke("validate", "-i", str(EXAMPLE), "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"passed": False, "failed": ["gpu02"]}
    assert "gpu02" in result.stderr


def test_validate_rejects_bad_sizes():
    result = _invoke("validate", "-i", str(EXAMPLE), "--begin", "64M", "--end", "1M")
    assert result.exit_code == 2 and "--begin" in result.output
    assert parse_size("1K", "--begin") == 1024 and parse_size("16M", "--end") == 16 << 20
    with pytest.raises(InputError):
        parse_size("lots", "--end")


def test_train_passes_config_and_nproc(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setitem(sys.modules, "dsk_provision.joblaunch", types.SimpleNamespace(
        train=lambda inv, cfg, **kw: calls.append((inv, cfg, kw))))
    result = _invoke("train", "-i", str(EXAMPLE), "--config", "tiny.toml",
                     "--nproc-per-node", "2")
    assert result.exit_code == 0, result.output
    (_inv, cfg, kw), = calls
    assert cfg == Path("tiny.toml") and kw["nproc_per_node"] == 2


def test_sandbox_commands(monkeypatch):
    seen = {}

    def up(name, nodes, *, spare=None, subnet=None, venv=None, progress=None):
        progress("starting node1")
        seen["up"] = (name, nodes, subnet)
        seen["spare"] = spare
        return types.SimpleNamespace(inventory_path=Path("/var/lib/x/hosts.yml"),
                                     nodes=["node1", "node2"], to_dict=dict,
                                     spare=[("node3", "10.213.9.13")] if spare else [])

    fake = types.SimpleNamespace(
        up=up,
        down=lambda name, progress=None: seen.setdefault("down", name),
        status=lambda name=None: [{"name": "dsk", "subnet": "10.213.9.0/24",
                                   "inventory_path": "/var/lib/x/hosts.yml",
                                   "nodes": [{"name": "node1", "ip": "10.213.9.11",
                                              "state": "running"},
                                             {"name": "node2", "ip": "10.213.9.12",
                                              "state": "stopped"}]}],
        set_link_rate=lambda name, node, rate: seen.setdefault("link", []).append(
            (name, node, rate)),
        reimage_node=lambda name, node, progress=None: seen.setdefault(
            "reimage", (name, node)) and types.SimpleNamespace(
                inventory_path=Path("/var/lib/x/hosts.yml")))
    monkeypatch.setitem(sys.modules, "dsk_provision.sandbox", fake)
    monkeypatch.setattr("dsk_provision.sandbox", fake, raising=False)
    result = _invoke("sandbox", "up", "--name", "lab", "--nodes", "2", "--subnet",
                     "10.213.9.0/24")
    assert result.exit_code == 0, result.output
    assert seen["up"] == ("lab", 2, "10.213.9.0/24")
    assert "starting node1" in result.output
    assert "/var/lib/x/hosts.yml" in result.output
    assert "dsk-provision bootstrap -i /var/lib/x/hosts.yml" in result.output
    assert seen["spare"] is None and "spare" not in result.output
    result = _invoke("sandbox", "up", "--name", "lab", "--nodes", "2", "--spare", "1")
    assert result.exit_code == 0 and seen["spare"] == 1, result.output
    assert "node3 (10.213.9.13)" in result.output
    assert ("dsk-provision nodes add -i /var/lib/x/hosts.yml node3 --host 10.213.9.13"
            in result.output)
    result = _invoke("sandbox", "reimage", "node2", "--name", "lab")
    assert result.exit_code == 0 and seen["reimage"] == ("lab", "node2"), result.output
    assert "nodes replace -i /var/lib/x/hosts.yml node2" in " ".join(result.output.split())
    assert _invoke("sandbox", "down", "--name", "lab").exit_code == 0 and seen["down"] == "lab"
    status = _invoke("sandbox", "status", "--json")
    assert json.loads(status.stdout)[0]["name"] == "dsk"
    table = _invoke("sandbox", "status").output
    assert "10.213.9.12" in table and "stopped" in table
    assert "dsk: inventory /var/lib/x/hosts.yml" in table
    assert _invoke("sandbox", "link", "node2", "--rate", "10mbit").exit_code == 0
    assert _invoke("sandbox", "link", "node2", "--clear").exit_code == 0
    assert seen["link"] == [("dsk", "node2", "10mbit"), ("dsk", "node2", None)]
    neither = _invoke("sandbox", "link", "node2")
    assert neither.exit_code == 2 and "--rate" in neither.output


@pytest.mark.parametrize("args, option", [
    (("--begin", "lots"), "--begin"),
    (("--end", "1.5K"), "--end"),   # the benchmarks on the nodes read whole numbers only
    (("--begin", "1T"), "--begin"),  # ... and no T suffix
    (("--begin", "0"), "--begin"),
])
def test_a_bad_size_fails_before_the_inventory_is_read(args, option):
    result = _invoke("validate", "-i", "/nonexistent/hosts.yml", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {option}: "), result.stderr
    assert "Traceback" not in result.output


def test_the_library_reads_sizes_as_the_cli_does(monkeypatch, tmp_path):
    """validate() checks its sizes with the CLI's parser, before any playbook runs."""
    import dsk_provision.runner as runner
    from dsk_provision.inventory import load_inventory
    from dsk_provision.validation.flow import validate

    monkeypatch.setattr(runner, "run_playbook", lambda *a, **kw: pytest.fail("ran"))
    inv = load_inventory(EXAMPLE)
    for kw, field in (({"begin": "1T"}, "begin"), ({"end": "1.5K"}, "end")):
        with pytest.raises(InputError, match=f"^{field}: .* is not a size"):
            validate(inv, runs_dir=tmp_path, **kw)
    assert list(tmp_path.iterdir()) == []


def test_output_is_data_brackets_print_as_written(monkeypatch):
    """No rich markup on the consoles: a name with brackets is not eaten as a style tag."""
    fake = types.SimpleNamespace(set_link_rate=lambda name, node, rate: None,
                                 status=lambda name=None: [])
    monkeypatch.setitem(sys.modules, "dsk_provision.sandbox", fake)
    monkeypatch.setattr("dsk_provision.sandbox", fake, raising=False)
    result = _invoke("sandbox", "link", "node[b]", "--clear")
    assert result.exit_code == 0, result.output
    assert result.stdout == "sandbox dsk: link of node[b] restored\n"
    result = _invoke("sandbox", "status", "--name", "[red]x")
    assert result.stdout == "no sandbox named [red]x is running\n"


def test_debug_shows_the_traceback_and_keeps_the_exit_code(monkeypatch):
    import dsk_provision.inventory as inventory

    def missing(path):
        raise EnvironmentProblem("ssh is not installed")

    monkeypatch.setattr(inventory, "load_inventory", missing)
    result = _invoke("--debug", "check", "-i", str(EXAMPLE))
    assert result.exit_code == 3
    assert "Traceback" in result.stderr and "error: ssh is not installed" in result.stderr


def test_nodes_cordon_uncordon_and_train_leaves_the_node_out(monkeypatch, tmp_path):
    import shutil

    inv_dir = tmp_path / "inv"
    shutil.copytree(EXAMPLE, inv_dir)
    before = (inv_dir / "hosts.yml").read_text()
    result = _invoke("nodes", "cordon", "-i", str(inv_dir), "gpu01", "--reason", "PSU")
    assert result.exit_code == 0, result.output
    assert "gpu01 cordoned (PSU); 3 of 4 nodes in service" in result.stdout
    calls = []
    monkeypatch.setitem(sys.modules, "dsk_provision.joblaunch", types.SimpleNamespace(
        train=lambda inv, cfg, **kw: calls.append(inv)))
    result = _invoke("train", "-i", str(inv_dir), "--config", "tiny.toml")
    assert result.exit_code == 0, result.output
    assert "gpu01 is cordoned (PSU): left out" in result.stdout
    assert [n.name for n in calls[0].nodes] == ["gpu02", "gpu03", "gpu04"]
    result = _invoke("check", "-i", str(inv_dir))
    assert "rendezvous on gpu02; 1 cordoned" in result.stdout
    result = _invoke("nodes", "uncordon", "-i", str(inv_dir), "gpu01")
    assert result.exit_code == 0 and "back in service" in result.stdout
    assert (inv_dir / "hosts.yml").read_text() == before
    result = _invoke("nodes", "cordon", "-i", str(inv_dir), "gpu09", "--reason", "x")
    assert result.exit_code == 2 and "no node named 'gpu09'" in result.stderr
    assert (inv_dir / "hosts.yml").read_text() == before
