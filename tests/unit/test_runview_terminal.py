"""The console of a playbook run on a real terminal: a run of three local-connection hosts
where one fails, watched as a person would see it.

Two terminals: tmux (when installed; its screen is read with capture-pane) and a bare
pseudo-terminal read through a small screen model of the few control sequences a
redrawn status area uses (carriage return, cursor up, erase line). On both, the status
area shows the task and hosts done while a task runs, and at the end it is gone while
the failure, with its node and message, is still on the screen.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ROWS, COLS = 40, 120
MESSAGE = "disk on node2 is full"

pytestmark = pytest.mark.timeout(240)

PLAY = """
- name: Terminal test play
  hosts: nodes
  gather_facts: false
  tasks:
    - name: Prepare
      ansible.builtin.command: "true"
      changed_when: false
    - name: Break one node
      ansible.builtin.fail:
        msg: "disk on {{ inventory_hostname }} is full"
      when: inventory_hostname == 'node2'
    - name: Wait a little
      ansible.builtin.command: sleep 4
      changed_when: false
"""

DRIVER = """
import sys
from pathlib import Path
from dsk_provision.errors import DskError
from dsk_provision.inventory import load_inventory
from dsk_provision.runner import run_playbook
try:
    run_playbook(sys.argv[1], load_inventory(sys.argv[2]), command="unit",
                 runs_dir=Path(sys.argv[3]))
except DskError as exc:
    print(f"error: {exc}", flush=True)
    sys.exit(exc.exit_code)
"""


def _setup(tmp_path: Path) -> list[str]:
    inv = tmp_path / "inv"
    inv.mkdir()
    (inv / "hosts.yml").write_text(yaml.safe_dump({"all": {
        "vars": {"dsk_gpus_per_node": 0, "dsk_cluster_name": "term",
                 "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                 "ansible_remote_tmp": f"{tmp_path}/remote-tmp",
                 "ansible_control_path_dir": f"{tmp_path}/cp"},
        "children": {"nodes": {"hosts": {f"node{i}": {"ansible_host": f"127.0.0.{i}"}
                                         for i in (1, 2, 3)}}}}}))
    play = tmp_path / "play.yml"
    play.write_text(PLAY)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return [sys.executable, str(driver), str(play), str(inv), str(tmp_path / "runs")]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DSK_PLAIN_PROGRESS", "COLUMNS", "LINES", "NO_COLOR")}
    return {**env, "PYTHONPATH": str(REPO), "TERM": "xterm-256color",
            "DSK_STATE_DIR": str(tmp_path / "state")}


class Screen:
    """What a terminal shows after the bytes it was sent: text, CR, LF, cursor up and
    erase line (all that a redrawn status area uses); other sequences are ignored."""

    _SEQ = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])|\x1b[()][0-9A-Za-z]|\r|\n|[^\x1b\r\n]")

    def __init__(self) -> None:
        self.lines: list[list[str]] = [[]]
        self.row = self.col = 0

    def feed(self, text: str) -> None:
        for m in self._SEQ.finditer(text):
            token = m.group(0)
            if token == "\r":
                self.col = 0
            elif token == "\n":
                self.row += 1
                self.col = 0
                while len(self.lines) <= self.row:
                    self.lines.append([])
            elif m.group(2):
                n = int(m.group(1) or 1) if m.group(1).isdigit() else 1
                if m.group(2) == "A":
                    self.row = max(0, self.row - n)
                elif m.group(2) == "K":
                    line = self.lines[self.row]
                    del line[0 if m.group(1) == "2" else self.col:]
            elif not token.startswith("\x1b"):
                line = self.lines[self.row]
                line.extend(" " * (self.col - len(line)))
                line[self.col:self.col + 1] = [token]
                self.col += 1

    def text(self) -> str:
        return "\n".join("".join(line).rstrip() for line in self.lines).rstrip("\n")


def _run_on_pty(argv: list[str], env: dict[str, str], cwd: Path, raw_out: list[bytes]):
    """Start argv on a pseudo-terminal; yields the screen as it goes, then the exit code.
    Every byte read is appended to ``raw_out`` too."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: its stdin, stdout and stderr are the terminal
        os.chdir(cwd)
        os.execve(argv[0], argv, env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    screen = Screen()
    raw = b""
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the child is gone
                    break
                if not chunk:
                    break
                raw += chunk
                raw_out.append(chunk)
                screen.lines, screen.row, screen.col = [[]], 0, 0
                screen.feed(raw.decode("utf-8", "replace"))
            yield screen.text()
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    yield os.waitstatus_to_exitcode(status)


def _run_in_tmux(argv: list[str], env: dict[str, str], cwd: Path, tmp_path: Path):
    """Start argv in a detached tmux session of its own server; yields its screen."""
    tmux = shutil.which("tmux")
    sock = str(tmp_path / "tmux.sock")
    command = " ".join(f"'{a}'" for a in argv) + "; echo exit=$?; sleep 120"
    subprocess.run([tmux, "-S", sock, "-f", "/dev/null", "new-session", "-d", "-x", str(COLS),
                    "-y", str(ROWS), "-c", str(cwd), command], env=env, check=True)
    try:
        while True:
            shown = subprocess.run([tmux, "-S", sock, "capture-pane", "-p", "-t", "0"],
                                   capture_output=True, text=True, check=True).stdout
            found = re.search(r"^exit=(\d+)$", shown, re.M)
            if found:
                yield shown.replace(found.group(0), "").rstrip()
                yield int(found.group(1))
                return
            yield shown.rstrip()
            time.sleep(0.2)
    finally:
        subprocess.run([tmux, "-S", sock, "kill-server"], check=False)


# the status area while the last task runs: the task, and under it the hosts done
STATUS = r"task 3: Wait a little[^\n]*\n[^\n]*hosts \d+/\d+ done"


@pytest.mark.parametrize("terminal", ["pty", "tmux"])
def test_a_failure_on_one_node_stays_on_screen(tmp_path, terminal):
    argv = _setup(tmp_path)
    env = _env(tmp_path)
    raw: list[bytes] = []
    if terminal == "tmux":
        if shutil.which("tmux") is None:
            pytest.skip("tmux is not installed (the pty variant runs without it)")
        frames = _run_in_tmux(argv, env, tmp_path, tmp_path)
    else:
        frames = _run_on_pty(argv, env, tmp_path, raw)

    seen_status = None
    screens = []
    deadline = time.monotonic() + 180
    for frame in frames:
        if isinstance(frame, int):
            code = frame
            break
        screens.append(frame)
        # a frame may catch the status area half drawn (its task line, not yet the hosts
        # line under it): only a frame that holds both counts
        if seen_status is None and re.search(STATUS, frame):
            seen_status = frame
        assert time.monotonic() < deadline, screens[-1]
    final = screens[-1]
    if seen_status is None and raw:
        # On a busy machine one read can hold a status area's draw and its erasure, so that
        # no rendered frame shows it; the bytes the terminal got still hold every draw.
        stream = b"".join(raw).decode("utf-8", "replace")
        drawn = re.search(STATUS, stream)
        seen_status = drawn.group(0) if drawn else None

    assert code == 1, final
    # While the last task ran, the status area said which task and how many hosts are done
    # (node2 failed before it, so two hosts run it).
    assert seen_status is not None, final
    assert re.search(r"hosts [01]/2 done", seen_status), seen_status
    # At the end: the status area is gone, the failure is on the screen with its node and
    # message, and so is the error that ends the run.
    assert "Wait a little" not in final
    assert f"FAILED node2: Break one node: {MESSAGE}" in final, final
    assert "failed      Break one node: skipped 2, failed 1 (node2)" in final, final
    assert "error: unit failed on 1 host(s): node2" in final, final
    assert not re.search(r"hosts \d+/\d+ done", final), final
    assert "elapsed" not in final, final
