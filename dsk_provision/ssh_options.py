"""ssh arguments from an inventory, read the way ssh reads them, and the rules that keep
host keys pinned. `check` (dsk_provision.inventory) and the launcher (dsk_provision.remote)
both judge a node's variables with :func:`node_ssh_problems`, so they cannot disagree.

An inventory may pass ssh options, but none that weaken host-key pinning or run a command
or load code on the control node:

- ``StrictHostKeyChecking`` only ``yes`` (or its synonym ``true``) or ``ask``; ``no``,
  ``off``, ``false`` and ``accept-new`` (which trusts any first key) are refused;
- ``UserKnownHostsFile``/``GlobalKnownHostsFile`` only the file(s) the inventory declares:
  the ``UserKnownHostsFile`` of the cluster-wide ``ansible_ssh_common_args`` (all.vars or
  group_vars/all); ``/dev/null`` and ``none`` are never a declaration;
- no ``-F`` (a config file can say anything), no ``ProxyCommand``, ``LocalCommand``,
  ``PermitLocalCommand``, ``KnownHostsCommand``, ``PKCS11Provider``/``-I``,
  ``SecurityKeyProvider``, ``VerifyHostKeyDNS=yes``, and for scp/sftp no ``-S``/``-D``
  (a program to run);
- ``ansible_host_key_checking``/``ansible_ssh_host_key_checking`` only true;
- arguments are options only: a stray word would become the host name.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Variables holding ssh (or scp/sftp) command-line arguments, and the program reading them.
SSH_ARG_VARS = {
    "ansible_ssh_common_args": "ssh",
    "ansible_ssh_extra_args": "ssh",
    "ansible_ssh_args": "ssh",
    "ansible_scp_extra_args": "scp",
    "ansible_sftp_extra_args": "sftp",
}
# Where the cluster declares its known-hosts file (read from the cluster-wide variables).
KNOWN_HOSTS_VAR = "ansible_ssh_common_args"
HOST_KEY_CHECKING_VARS = ("ansible_host_key_checking", "ansible_ssh_host_key_checking")
# The ssh program Ansible starts: only ssh itself (a wrapper could drop the pinning).
SSH_PROGRAM_VARS = ("ansible_ssh_executable",)
SSH_PROGRAMS = ("ssh", "/usr/bin/ssh")
# Ansible settings in the caller's environment that would replace ansible.cfg's ssh
# arguments (keep-alives, pinning) or its ssh program: the runner hands Ansible these
# values instead, so only the inventory's variables (judged above) add to them.
def pinned_ssh_environment() -> dict[str, str]:
    from dsk_provision.defaults import ansible_setting

    return {"ANSIBLE_SSH_ARGS": ansible_setting("ssh_connection", "ssh_args") or "",
            "ANSIBLE_SSH_COMMON_ARGS": "", "ANSIBLE_SSH_EXTRA_ARGS": "",
            "ANSIBLE_SCP_EXTRA_ARGS": "", "ANSIBLE_SFTP_EXTRA_ARGS": "",
            "ANSIBLE_SSH_EXECUTABLE": "ssh"}


# The programs' getopt strings (OpenSSH 9): a letter followed by ':' takes a value.
_GETOPT = {
    "ssh": "1246ab:c:e:fgi:kl:m:no:p:qstvxAB:CD:E:F:GI:J:KL:MNO:P:Q:R:S:TVw:W:XYy",
    "scp": "12346ABCTdfOpqRrstvD:F:J:P:S:c:i:l:o:X:",
    "sftp": "1246AafhNpqrvCc:D:i:l:o:s:S:b:B:F:J:P:R:X:",
}
_REFUSED_FLAGS = {
    "ssh": {"F": "reads an ssh config file, which can turn host key checking off",
            "I": "loads a PKCS#11 library into ssh on the control node"},
    "scp": {"F": "reads an ssh config file, which can turn host key checking off",
            "S": "runs a program of its choice on the control node instead of ssh",
            "D": "runs a program of its choice instead of the sftp server"},
    "sftp": {"F": "reads an ssh config file, which can turn host key checking off",
             "S": "runs a program of its choice on the control node instead of ssh",
             "D": "runs a program of its choice instead of the sftp server"},
}
_LOCAL_CODE = {
    "proxycommand": "runs a command on the control node",
    "localcommand": "runs a command on the control node",
    "permitlocalcommand": "lets LocalCommand run commands on the control node",
    "knownhostscommand": "runs a command on the control node that supplies host keys",
    "pkcs11provider": "loads a library into ssh on the control node",
    "securitykeyprovider": "loads a library into ssh on the control node",
    "include": "reads another config file, which can turn host key checking off",
    "match": "makes options conditional (Match exec runs commands)",
}
# StrictHostKeyChecking values that keep pinning (ssh compares them case-insensitively).
_STRICT_OK = {"yes", "true", "ask"}
_KNOWN_HOSTS_OPTIONS = {"userknownhostsfile": "UserKnownHostsFile",
                        "globalknownhostsfile": "GlobalKnownHostsFile"}
_NO_FILE = {"/dev/null", "none"}
# Ansible's boolean(): what it reads as true.
_ANSIBLE_TRUE = {"y", "yes", "on", "1", "true", "t", "1.0"}
_OPTION_LINE = re.compile(r'\s*("?)([^\s="]+)\1\s*(?:=\s*)?(.*)', re.S)


@dataclass
class SshArgs:
    """One argument string, parsed: ``-o`` options as (lowercased keyword, values, as
    written), other flags as (letter, value or None), and any non-option words."""

    options: list[tuple[str, list[str], str]] = field(default_factory=list)
    flags: list[tuple[str, str | None]] = field(default_factory=list)
    words: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)

    def keywords(self) -> set[str]:
        return {key for key, _values, _text in self.options}


def parse_option(text: str) -> tuple[str, list[str]]:
    """One ``-o`` value as ssh reads it: keyword (lowercased) and its arguments.

    ``Key=value``, ``Key value``, ``Key = value``, quoted keyword or values. Raises
    ValueError when there is no keyword or the quoting is broken."""
    m = _OPTION_LINE.fullmatch(text)
    if not m or not m.group(2):
        raise ValueError(f"-o {text!r} has no option name")
    return m.group(2).lower(), shlex.split(m.group(3), comments=True)


def parse_args(text: str, program: str = "ssh") -> SshArgs:
    """Split ``text`` as Ansible does (shlex) and read it as ``program``'s getopt does:
    combined flags (``-4o``), values attached or separate. Raises ValueError."""
    spec = _GETOPT[program]
    with_value = {spec[i] for i in range(len(spec) - 1) if spec[i + 1] == ":"}
    tokens = shlex.split(text)
    out = SshArgs(tokens=tokens)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == "--" or not token.startswith("-") or token == "-":
            out.words.append(token)
            continue
        j = 1
        while j < len(token):
            letter = token[j]
            j += 1
            if letter == ":" or letter not in spec:
                raise ValueError(f"{token!r}: {program} has no option -{letter}")
            if letter not in with_value:
                out.flags.append((letter, None))
                continue
            value = token[j:]
            if not value:
                if i >= len(tokens):
                    raise ValueError(f"-{letter} needs a value")
                value = tokens[i]
                i += 1
            if letter == "o":
                key, values = parse_option(value)
                out.options.append((key, values, value))
            else:
                out.flags.append((letter, value))
            break
    return out


def _same_file(a: str, b: str) -> bool:
    return os.path.normpath(os.path.expanduser(a)) == os.path.normpath(os.path.expanduser(b))


def declared_known_hosts(cluster_vars: Mapping[str, Any]) -> tuple[str, ...]:
    """The known-hosts file(s) the cluster-wide ssh arguments name (may be none)."""
    text = cluster_vars.get(KNOWN_HOSTS_VAR)
    if not isinstance(text, str):
        return ()
    try:
        parsed = parse_args(text)
    except ValueError:
        return ()  # reported where the value is checked
    files: list[str] = []
    for key, values, _text in parsed.options:
        if key == "userknownhostsfile":
            files += [v for v in values if v.lower() not in _NO_FILE]
    return tuple(files)


def args_problems(text: str, program: str, known_hosts: tuple[str, ...]) -> list[str]:
    """Why an argument string may not be used (empty: it may)."""
    try:
        parsed = parse_args(text, program)
    except ValueError as exc:
        return [f"cannot be read as {program} arguments: {exc}"]
    problems = []
    if parsed.words:
        problems.append(f"{' '.join(map(repr, parsed.words))} is not a {program} option "
                        f"(a stray word becomes the host name): pass options only")
    for letter, _value in parsed.flags:
        why = _REFUSED_FLAGS[program].get(letter)
        if why:
            problems.append(f"-{letter} {why}: not allowed in an inventory")
    for key, values, written in parsed.options:
        value = values[0].lower() if values else ""
        if key == "stricthostkeychecking" and value not in _STRICT_OK:
            weaker = "trusts any host's first key" if value == "accept-new" \
                else "turns host key checking off"
            problems.append(f"'-o {written}' {weaker}; host keys must be pinned: use "
                            "StrictHostKeyChecking=yes with the nodes' keys in the "
                            "inventory's known_hosts file")
        elif key in _KNOWN_HOSTS_OPTIONS:
            for file in values:
                if file.lower() in _NO_FILE:
                    problems.append(f"'-o {written}' ignores every pinned host key: point "
                                    "UserKnownHostsFile at a known_hosts file holding the "
                                    "nodes' keys")
                elif not any(_same_file(file, k) for k in known_hosts):
                    declared = ", ".join(known_hosts) if known_hosts else "none"
                    problems.append(
                        f"'-o {written}' points known hosts at {file}, not at the file the "
                        f"inventory declares ({declared}): name the known_hosts file once, "
                        f"as UserKnownHostsFile in the cluster-wide {KNOWN_HOSTS_VAR} "
                        "(all.vars or group_vars/all)")
        elif key in _LOCAL_CODE:
            problems.append(f"'-o {written}' {_LOCAL_CODE[key]}: not allowed in an inventory")
        elif key == "verifyhostkeydns" and value in ("yes", "true"):
            problems.append(f"'-o {written}' accepts host keys from DNS without the pinned "
                            "known_hosts file: leave it out")
    return problems


# What the control node's own ssh clients (the launcher's) take from ansible.cfg, so that
# Ansible and the launcher notice a dead node alike: the keep-alives of its ssh_args and
# its connect timeout.
_SHARED_SSH_OPTIONS = {"serveraliveinterval": "ServerAliveInterval",
                       "serveralivecountmax": "ServerAliveCountMax"}


def control_node_ssh_options() -> dict[str, str]:
    """ssh options (keyword lowercased -> ``-o`` value) that every ssh client the tool
    starts uses unless the inventory sets them: ConnectTimeout from ansible.cfg's
    ``timeout`` and the keep-alives of its ``ssh_args`` (their one home)."""
    from dsk_provision.defaults import ansible_setting

    out: dict[str, str] = {}
    timeout = ansible_setting("defaults", "timeout")
    if timeout:
        out["connecttimeout"] = f"ConnectTimeout={timeout.strip()}"
    for key, values, _text in parse_args(ansible_setting("ssh_connection", "ssh_args") or "")\
            .options:
        if key in _SHARED_SSH_OPTIONS and values:
            out[key] = f"{_SHARED_SSH_OPTIONS[key]}={values[0]}"
    return out


def node_ssh_problems(values: Mapping[str, Any],
                      known_hosts: tuple[str, ...]) -> list[tuple[str, str]]:
    """(variable, reason) for every setting among ``values`` that would weaken host-key
    pinning or run code on the control node. ``known_hosts``: declared_known_hosts()."""
    problems: list[tuple[str, str]] = []
    for name, program in SSH_ARG_VARS.items():
        text = values.get(name)
        if isinstance(text, str):
            problems += [(name, why) for why in args_problems(text, program, known_hosts)]
    for name in SSH_PROGRAM_VARS:
        if name in values and str(values[name]).strip() not in SSH_PROGRAMS:
            problems.append((name, f"{values[name]!r} runs another program than ssh on the "
                                   "control node, which can ignore the pinned host keys: "
                                   "remove it"))
    for name in HOST_KEY_CHECKING_VARS:
        if name in values and str(values[name]).strip().lower() not in _ANSIBLE_TRUE:
            problems.append((name, f"{values[name]!r} turns host key checking off; host keys "
                                   "must be pinned: remove it"))
    return problems
