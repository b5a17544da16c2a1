#!/usr/bin/python
"""Verify, in one execution, the actual state of everything a role manages on a node."""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import stat
import subprocess
import tarfile

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: dsk_state
short_description: Report how a node differs from what a role manages (read-only)
description:
  - The probe behind the roles' fast re-run. Each role lists the resources it manages
    (files, blocks and lines in files, absent paths, Debian packages, services, the pinned
    packages of a Python environment, a tree unpacked from an archive); the module reads
    their real state in one Python process and returns one line per difference in
    I(drift), and whether the role must run its converge tasks in I(converge).
  - Roles call it through the dsk_verify role, with the resource lists
    their vars/main.yml declares once for both this probe and the converge tasks.
  - It changes nothing, never reports a change and runs the same in check mode.
options:
  force:
    description: Converge even without drift (check mode, dsk_force_converge).
    type: bool
    default: false
  files:
    description: Files whose content and attributes must match.
    type: list
    elements: dict
    default: []
    suboptions:
      path: {description: Absolute path., type: path, required: true}
      content:
        description: The whole expected content; without it and the checksums only the
          attributes are checked (a directory, for instance).
        type: str
      sha1: {description: Expected SHA-1 of the content (instead of I(content))., type: str}
      sha256:
        description: Expected SHA-256 of the content (keeps secrets out of the arguments).
        type: str
      src:
        description: Where the converge task copies the file from (not read here).
        type: str
      owner: {description: Owner name (not checked when omitted)., type: str}
      group: {description: Group name (not checked when omitted)., type: str}
      mode: {description: Octal mode like "0644" (not checked when omitted)., type: str}
  blocks:
    description: Blocks written by blockinfile, between "# BEGIN ..." and "# END ..." markers.
    type: list
    elements: dict
    default: []
    suboptions:
      path: {description: The file., type: path, required: true}
      marker: {description: The marker, with "{mark}" for BEGIN/END., type: str, required: true}
      block:
        description: The block's text; empty means the markers must be absent.
        type: str
        required: true
      owner: {description: Owner name., type: str}
      group: {description: Group name., type: str}
      mode: {description: Octal mode., type: str}
  lines:
    description: Lines that must be present in a file (as lineinfile with I(line) only).
    type: list
    elements: dict
    default: []
    suboptions:
      path: {description: The file., type: path, required: true}
      line: {description: The whole line., type: str, required: true}
      owner: {description: Owner name., type: str}
      group: {description: Group name., type: str}
      mode: {description: Octal mode., type: str}
  absent:
    description: Paths that must not exist.
    type: list
    elements: path
    default: []
  packages:
    description: Debian packages that must be installed (dpkg status "ii" or "hi").
    type: list
    elements: dict
    default: []
    suboptions:
      name: {description: Package name., type: str, required: true}
      version:
        description: >-
          Pinned version: a full Debian version, an upstream version ("580.159.04" matches
          580.159.04-1), or a prefix ending in "*"; empty for any.
        type: str
        default: ""
      hold: {description: Must be held (dpkg selection "hold")., type: bool, default: false}
      var: {description: The variable that holds the pin (named in the drift line)., type: str}
  services:
    description: systemd services and whether they must be enabled and active.
    type: list
    elements: dict
    default: []
    suboptions:
      name: {description: Unit name., type: str, required: true}
      enabled: {description: Must be enabled., type: bool, default: true}
      active: {description: Must be active (running)., type: bool, default: false}
  python_packages:
    description: >-
      Pinned packages ("name==version") of a Python environment, read from package
      metadata with I(python) (nothing is imported); a local suffix such as +cpu is ignored.
    type: dict
    suboptions:
      python: {description: The environment's interpreter., type: path, required: true}
      pins: {description: The pins., type: list, elements: str, required: true}
  kernel_modules:
    description: >-
      Kernel modules that must be loaded where they can be: a module not under /sys/module
      that I(modprobe) can load (modprobe -n) is drift; one this kernel lacks is not.
    type: dict
    suboptions:
      names: {description: Module names., type: list, elements: str, required: true}
      modprobe: {description: Path of modprobe; empty when it is not installed., type: str}
  archive_trees:
    description: >-
      Trees unpacked from a tar archive on the node: every member must exist in I(dest)
      with the archive's content and type, and no file may exist that the archive lacks
      (bytecode caches aside).
    type: list
    elements: dict
    default: []
    suboptions:
      archive: {description: The archive on the node., type: path, required: true}
      dest: {description: The directory it was unpacked into., type: path, required: true}
"""

RETURN = r"""
drift:
  description: One line per resource that differs from what is managed; empty when none does.
  returned: always
  type: list
  elements: str
converge:
  description: Whether the converge tasks must run (some drift, or I(force)).
  returned: always
  type: bool
drift_by_kind:
  description: The same lines by option (files, blocks, lines, absent, packages, services,
    python_packages, kernel_modules, archive_trees), for roles that converge one part at
    a time.
  returned: always
  type: dict
"""

# Leftovers of running the code, not part of what an archive ships.
_IGNORED_NAMES = {"__pycache__", ".pytest_cache"}
_IGNORED_SUFFIXES = (".pyc",)

_PYTHON_PROBE = """
import sys
from importlib.metadata import PackageNotFoundError, version
for pin in sys.argv[1:]:
    name, _, want = pin.partition("==")
    try:
        have = version(name).split("+")[0]
    except PackageNotFoundError:
        have = None
    if have != want:
        print(pin, have)
"""


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def attribute_drift(path: str, owner: str | None, group: str | None, mode: str | None) -> list[str]:
    """Differences of a file's owner, group and mode from the wanted ones (None: not checked)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return [f"{path}: missing"]
    drift = []
    if mode is not None and stat.S_IMODE(st.st_mode) != int(mode, 8):
        drift.append(f"{path}: mode {stat.S_IMODE(st.st_mode):04o}, wanted {int(mode, 8):04o}")
    if owner is not None and _name_of(pwd.getpwuid, st.st_uid) != owner:
        drift.append(f"{path}: owner {_name_of(pwd.getpwuid, st.st_uid)}, wanted {owner}")
    if group is not None and _name_of(grp.getgrgid, st.st_gid) != group:
        drift.append(f"{path}: group {_name_of(grp.getgrgid, st.st_gid)}, wanted {group}")
    return drift


def _name_of(lookup, ident: int) -> str:
    try:
        return lookup(ident)[0]
    except KeyError:
        return str(ident)


def file_drift(spec: dict) -> list[str]:
    path = spec["path"]
    if spec.get("content") is None and not spec.get("sha1") and not spec.get("sha256"):
        return attribute_drift(path, spec.get("owner"), spec.get("group"), spec.get("mode"))
    data = _read(path)
    if data is None:
        return [f"{path}: missing"]
    drift = []
    if spec.get("content") is not None and data != spec["content"].encode():
        drift.append(f"{path}: content differs")
    for algo in ("sha1", "sha256"):
        want = spec.get(algo)
        if want and hashlib.new(algo, data).hexdigest() != want.lower():
            drift.append(f"{path}: content differs ({algo})")
    return drift + attribute_drift(path, spec.get("owner"), spec.get("group"), spec.get("mode"))


def block_drift(spec: dict) -> list[str]:
    """As blockinfile sees it: the lines between the markers equal the block's lines."""
    path = spec["path"]
    begin = spec["marker"].replace("{mark}", "BEGIN")
    end = spec["marker"].replace("{mark}", "END")
    data = _read(path)
    lines = data.decode(errors="replace").splitlines() if data is not None else []
    want = spec["block"].splitlines()
    has_begin, has_end = begin in lines, end in lines
    if not want:
        return [f"{path}: block '{begin}' present, wanted absent"] if has_begin or has_end else []
    if data is None:
        return [f"{path}: missing"]
    if not (has_begin and has_end) or lines.index(begin) > lines.index(end):
        return [f"{path}: block '{begin}' missing"]
    if lines[lines.index(begin) + 1:lines.index(end)] != want:
        return [f"{path}: block '{begin}' differs"]
    return attribute_drift(path, spec.get("owner"), spec.get("group"), spec.get("mode"))


def line_drift(spec: dict) -> list[str]:
    path = spec["path"]
    data = _read(path)
    if data is None:
        return [f"{path}: missing"]
    lines = (line.rstrip("\r\n") for line in data.decode(errors="replace").splitlines())
    if spec["line"] not in lines:
        return [f"{path}: line missing"]
    return attribute_drift(path, spec.get("owner"), spec.get("group"), spec.get("mode"))


def version_matches(have: str, want: str) -> bool:
    """As the GPU roles' pins: the full version, or the upstream part before a revision."""
    if not want:
        return True
    if want.endswith("*"):
        return have.startswith(want[:-1])
    return have == want or have.startswith(want + "-")


def package_drift(specs: list[dict], rows: str) -> list[str]:
    """`rows`: dpkg-query output, one "name version status-abbrev" a line."""
    seen = {}
    for row in rows.splitlines():
        fields = row.split()
        if len(fields) >= 3:
            seen[fields[0].split(":")[0]] = (fields[1], fields[2])
    drift = []
    for spec in specs:
        name, want = spec["name"], spec.get("version") or ""
        version, status = seen.get(name, ("", "un"))
        if status[1:2] != "i":
            drift.append(f"package {name}: not installed")
        elif not version_matches(version, want):
            source = f" ({spec['var']})" if spec.get("var") else ""
            drift.append(f"package {name}: version {version}, wanted {want}{source}")
        elif spec.get("hold") and status[0] != "h":
            drift.append(f"package {name}: not held")
    return drift


def _dpkg_rows(names: list[str]) -> str:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${Version} ${db:Status-Abbrev}\n", *names],
        capture_output=True, text=True, check=False)
    return proc.stdout


def service_drift(specs: list[dict], run=subprocess.run) -> list[str]:
    drift = []
    for spec in specs:
        name = spec["name"]
        if spec.get("enabled", True):
            out = run(["systemctl", "is-enabled", name], capture_output=True, text=True,
                      check=False).stdout.strip()
            if out not in ("enabled", "enabled-runtime", "static", "alias"):
                drift.append(f"service {name}: {out or 'unknown'}, wanted enabled")
        if spec.get("active"):
            out = run(["systemctl", "is-active", name], capture_output=True, text=True,
                      check=False).stdout.strip()
            if out != "active":
                drift.append(f"service {name}: {out or 'unknown'}, wanted active")
    return drift


def python_drift(spec: dict | None, run=subprocess.run) -> list[str]:
    if not spec or not spec["pins"]:
        return []
    python = spec["python"]
    if not os.path.exists(python):
        return [f"{python}: missing"]
    proc = run([python, "-c", _PYTHON_PROBE, *spec["pins"]], capture_output=True, text=True,
               check=False)
    if proc.returncode != 0:
        return [f"{python}: cannot read package metadata ({proc.stderr.strip()[-200:]})"]
    drift = []
    for line in proc.stdout.splitlines():
        pin, _, have = line.partition(" ")
        found = "not installed" if have == "None" else "have " + have
        drift.append(f"python package {pin}: {found}")
    return drift


def module_drift(spec: dict | None, sys_module: str = "/sys/module",
                 run=subprocess.run) -> list[str]:
    if not spec or not spec.get("modprobe"):
        return []
    drift = []
    for name in spec["names"]:
        if os.path.isdir(os.path.join(sys_module, name)):
            continue
        if run([spec["modprobe"], "-n", "-q", name], capture_output=True,
               check=False).returncode == 0:
            drift.append(f"kernel module {name}: available, not loaded")
    return drift


def _ignored(name: str) -> bool:
    return name in _IGNORED_NAMES or name.endswith(_IGNORED_SUFFIXES)


def tree_drift(archive: str, dest: str) -> list[str]:
    """The tree under `dest` against the archive's members: content, type, nothing extra."""
    try:
        tar = tarfile.open(archive)
    except (FileNotFoundError, tarfile.TarError) as exc:
        return [f"{archive}: cannot be read ({exc.__class__.__name__})"]
    expected: set[str] = set()
    drift = []
    with tar:
        for member in tar:
            name = os.path.normpath(member.name)
            if name.startswith(("/", "..")) or _ignored(os.path.basename(name)):
                continue
            expected.add(name)
            parent = os.path.dirname(name)
            while parent:  # directories implied by a member count as members
                expected.add(parent)
                parent = os.path.dirname(parent)
            path = os.path.join(dest, name)
            if member.isdir():
                if not os.path.isdir(path):
                    drift.append(f"{path}: missing directory")
            elif member.isfile():
                data = _read(path)
                if data is None:
                    drift.append(f"{path}: missing")
                elif data != tar.extractfile(member).read():
                    drift.append(f"{path}: content differs from {archive}")
    roots = {name.split(os.sep)[0] for name in expected}
    for root in sorted(roots):
        for top, dirs, files in os.walk(os.path.join(dest, root)):
            dirs[:] = [d for d in dirs if not _ignored(d)]
            for name in dirs + files:
                if _ignored(name):
                    continue
                rel = os.path.relpath(os.path.join(top, name), dest)
                if rel not in expected:
                    drift.append(f"{os.path.join(dest, rel)}: not in {archive}")
    return drift


def probe(params: dict, run=subprocess.run) -> dict[str, list[str]]:
    """Drift lines by kind of resource (an empty list for every kind that matches)."""
    packages = params.get("packages") or []
    return {
        "files": [line for spec in params.get("files") or [] for line in file_drift(spec)],
        "blocks": [line for spec in params.get("blocks") or [] for line in block_drift(spec)],
        "lines": [line for spec in params.get("lines") or [] for line in line_drift(spec)],
        "absent": [f"{path}: present, wanted absent" for path in params.get("absent") or []
                   if os.path.lexists(path)],
        "packages": (package_drift(packages, _dpkg_rows([p["name"] for p in packages]))
                     if packages else []),
        "services": service_drift(params.get("services") or [], run),
        "python_packages": python_drift(params.get("python_packages"), run),
        "kernel_modules": module_drift(params.get("kernel_modules"), run=run),
        "archive_trees": [line for spec in params.get("archive_trees") or []
                          for line in tree_drift(spec["archive"], spec["dest"])],
    }


_ATTRS = {"owner": {"type": "str"}, "group": {"type": "str"}, "mode": {"type": "str"}}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "files": {"type": "list", "elements": "dict", "default": [], "options": {
                "path": {"type": "path", "required": True}, "content": {"type": "str"},
                "sha1": {"type": "str"}, "sha256": {"type": "str"}, "src": {"type": "str"},
                **_ATTRS}},
            "blocks": {"type": "list", "elements": "dict", "default": [], "options": {
                "path": {"type": "path", "required": True},
                "marker": {"type": "str", "required": True},
                "block": {"type": "str", "required": True}, **_ATTRS}},
            "lines": {"type": "list", "elements": "dict", "default": [], "options": {
                "path": {"type": "path", "required": True},
                "line": {"type": "str", "required": True}, **_ATTRS}},
            "absent": {"type": "list", "elements": "path", "default": []},
            "packages": {"type": "list", "elements": "dict", "default": [], "options": {
                "name": {"type": "str", "required": True},
                "version": {"type": "str", "default": ""},
                "hold": {"type": "bool", "default": False},
                "var": {"type": "str"}}},
            "services": {"type": "list", "elements": "dict", "default": [], "options": {
                "name": {"type": "str", "required": True},
                "enabled": {"type": "bool", "default": True},
                "active": {"type": "bool", "default": False}}},
            "python_packages": {"type": "dict", "options": {
                "python": {"type": "path", "required": True},
                "pins": {"type": "list", "elements": "str", "required": True}}},
            "kernel_modules": {"type": "dict", "options": {
                "names": {"type": "list", "elements": "str", "required": True},
                "modprobe": {"type": "str", "default": ""}}},
            "archive_trees": {"type": "list", "elements": "dict", "default": [], "options": {
                "archive": {"type": "path", "required": True},
                "dest": {"type": "path", "required": True}}},
            "force": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    by_kind = probe(module.params)
    drift = [line for lines in by_kind.values() for line in lines]
    module.exit_json(changed=False, drift=drift, drift_by_kind=by_kind,
                     converge=bool(drift) or module.params["force"])


if __name__ == "__main__":
    main()
