"""Pinning host keys on first contact: fingerprints as ssh-keygen prints them, expect
files, and the refusals. No sshd: the nodes' keys are made with ssh-keygen and handed out
by a stand-in ssh-keyscan on PATH that prints them as the real one does."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsk_provision import hostkeys, state
from dsk_provision.cli import app
from dsk_provision.errors import InputError, RunFailed
from dsk_provision.hostkeys import HostKey, HostKeyMismatch, NotConfirmed, Target
from dsk_provision.inventory import load_inventory

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None,
                                reason="ssh-keygen is missing (apt-get install openssh-client)")

# A stand-in for ssh-keyscan: prints the keys in $FAKE_KEYS/<address>_<port>.pub the way
# ssh-keyscan prints them, or fails as it does for a host that does not answer.
FAKE_KEYSCAN = """\
#!/bin/sh
while getopts T:p:t: opt; do
  case $opt in p) port=$OPTARG;; esac
done
shift $((OPTIND - 1))
addr=$1
file="$FAKE_KEYS/${addr}_${port}.pub"
if [ ! -f "$file" ]; then
  echo "connect to address $addr port $port: Connection refused" >&2
  exit 1
fi
[ "$port" = 22 ] && host=$addr || host="[$addr]:$port"
echo "# $addr:$port SSH-2.0-OpenSSH_9.2" >&2
while read -r type blob comment; do echo "$host $type $blob"; done < "$file"
"""


def keygen(path: Path, kind: str = "ed25519", bits: int | None = None) -> HostKey:
    cmd = ["ssh-keygen", "-q", "-N", "", "-t", kind, "-f", str(path), "-C", "root@node"]
    if bits:
        cmd += ["-b", str(bits)]
    subprocess.run(cmd, check=True)
    type_, blob = Path(f"{path}.pub").read_text().split()[:2]
    return HostKey.parse(type_, blob)


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """An inventory of three nodes (gpu03 on port 2222) whose known_hosts file is empty,
    and a stand-in ssh-keyscan that answers for gpu01..gpu03 with fresh keys."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh-keyscan").write_text(FAKE_KEYSCAN)
    os.chmod(bin_dir / "ssh-keyscan", 0o755)
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_KEYS", str(keys_dir))
    inv = tmp_path / "inv"
    (inv / "group_vars").mkdir(parents=True)
    (inv / "hosts.yml").write_text(
        "all:\n  children:\n    nodes:\n      hosts:\n"
        "        gpu01: {ansible_host: 10.0.0.11}\n"
        "        gpu02: {ansible_host: 10.0.0.12}\n"
        "        gpu03: {ansible_host: 10.0.0.13, ansible_port: 2222}\n")
    known = tmp_path / "known_hosts"
    (inv / "group_vars" / "all.yml").write_text(
        "dsk_cluster_name: hk\ndsk_gpus_per_node: 8\n"
        f"ansible_ssh_common_args: -o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes\n")
    keys = {}
    for name, addr, port in (("gpu01", "10.0.0.11", 22), ("gpu02", "10.0.0.12", 22),
                             ("gpu03", "10.0.0.13", 2222)):
        keys[name] = keygen(keys_dir / f"{addr}_{port}")
    return {"inv": inv, "known": known, "keys": keys, "keys_dir": keys_dir,
            "load": lambda: load_inventory(inv)}


def expect_file(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{ln}\n" for ln in lines))
    return path


# ---------------------------------------------------------------- fingerprints, parsing

@pytest.mark.parametrize("kind,bits", [("ed25519", None), ("rsa", 3072), ("ecdsa", 384),
                                       ("ecdsa", 521)])
def test_fingerprint_lines_are_ssh_keygens(tmp_path, kind, bits):
    key = keygen(tmp_path / "k", kind, bits)
    shown = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "k.pub")], check=True,
                           capture_output=True, text=True).stdout.strip()
    assert key.fingerprint_line("root@node") == shown


def test_parse_keyscan_reads_keys_and_skips_banners(tmp_path):
    a = keygen(tmp_path / "a")
    b = keygen(tmp_path / "b", "rsa", 2048)
    text = f"# 10.0.0.1:22 SSH-2.0-OpenSSH_9.2\n10.0.0.1 {a.line}\n\n[10.0.0.1]:22 {b.line}\n"
    assert hostkeys.parse_keyscan(text) == [a, b]
    with pytest.raises(ValueError):
        hostkeys.parse_keyscan(f"10.0.0.1 ssh-rsa {a.blob}\n")  # an ed25519 key called rsa
    with pytest.raises(ValueError):
        hostkeys.parse_keyscan("10.0.0.1 ssh-ed25519 not-base64!\n")


def test_expect_files_in_both_formats(tmp_path):
    nodes = [Target("gpu01", "10.0.0.11"), Target("gpu02", "10.0.0.12", 2222)]
    fp1 = "SHA256:" + "A" * 43
    fp2 = "SHA256:" + "B" * 43
    fp3 = "SHA256:" + "C" * 43
    text = (f"# from the provider's console\ngpu01 {fp1}\n"
            f"256 {fp2} root@gpu02 (ED25519)\n"
            f"3072 {fp3} [10.0.0.12]:2222 (RSA)\n"
            f"other-node SHA256:{'D' * 43}\n")
    out = hostkeys.parse_expected(text, nodes, "fp.txt")
    assert [(e.fingerprint, e.kind) for e in out["gpu01"]] == [(fp1, None)]
    assert [(e.fingerprint, e.kind) for e in out["gpu02"]] == [(fp2, "ED25519"),
                                                               (fp3, "RSA")]
    assert out["gpu02"][1].where == "fp.txt:4"


@pytest.mark.parametrize("line,words", [
    (f"256 SHA256:{'A' * 43} root@elsewhere (ED25519)", "names no node"),
    ("gpu01 MD5:12:34", "not a SHA256"),
    (f"gpu01 SHA256:{'A' * 10}", "not a SHA256"),
    ("just-one-word", "neither"),
])
def test_bad_expect_lines_are_named(line, words):
    with pytest.raises(InputError) as err:
        hostkeys.parse_expected(f"\n{line}\n", [Target("gpu01", "10.0.0.11")], "fp.txt")
    assert "fp.txt:2" in str(err.value) and words in str(err.value)


def test_keygen_l_of_a_known_hosts_file_is_an_expect_file(cluster, tmp_path):
    """`ssh-keygen -lf known_hosts` output (as another machine that trusts the nodes
    prints it) vouches for the nodes it names."""
    other = tmp_path / "other_known_hosts"
    other.write_text("".join(f"{name},{addr} {cluster['keys'][name].line}\n"
                             for name, addr in (("gpu01", "10.0.0.11"),
                                                ("gpu02", "10.0.0.12"))))
    listing = subprocess.run(["ssh-keygen", "-lf", str(other)], check=True,
                             capture_output=True, text=True).stdout
    targets = hostkeys.targets(cluster["load"](), ["gpu01", "gpu02"])
    out = hostkeys.parse_expected(listing, targets, "x")
    assert out["gpu01"][0].fingerprint == cluster["keys"]["gpu01"].fingerprint
    assert out["gpu02"][0].fingerprint == cluster["keys"]["gpu02"].fingerprint


# ---------------------------------------------------------------- trust

def test_confirmed_keys_are_pinned_where_ssh_finds_them(cluster):
    asked = []
    plan = hostkeys.trust(cluster["load"](), confirm=lambda p: asked.append(p) or True)
    assert len(asked) == 1 and len(plan.new) == 3
    known = cluster["known"]
    assert stat.S_IMODE(known.stat().st_mode) == 0o644
    for host, name in (("10.0.0.11", "gpu01"), ("gpu02", "gpu02"), ("[10.0.0.13]:2222", "gpu03")):
        found = subprocess.run(["ssh-keygen", "-F", host, "-f", str(known)],
                               capture_output=True, text=True)
        assert cluster["keys"][name].blob in found.stdout, host
    # A second scan finds every key pinned: nothing asked, nothing written.
    before = known.read_bytes()
    plan = hostkeys.trust(cluster["load"](), confirm=lambda p: pytest.fail("asked again"))
    assert not plan.new and len(plan.known) == 3 and known.read_bytes() == before


@pytest.mark.parametrize("confirm", [None, lambda p: False])
def test_unconfirmed_keys_are_not_written(cluster, confirm):
    with pytest.raises(NotConfirmed):
        hostkeys.trust(cluster["load"](), confirm=confirm)
    assert not cluster["known"].exists()


def test_expected_fingerprints_pin_without_asking(cluster, tmp_path):
    keys = cluster["keys"]
    fp = expect_file(tmp_path / "fp", [f"{n} {k.fingerprint}" for n, k in keys.items()])
    plan = hostkeys.trust(cluster["load"](), expect=fp, confirm=None)
    assert {t.name for t, _ in plan.new} == {"gpu01", "gpu02", "gpu03"}
    assert keys["gpu02"].line in cluster["known"].read_text()


def test_only_vouched_keys_are_pinned(cluster, tmp_path):
    """A node that offers two keys, one of them expected: only that one is pinned."""
    extra = keygen(tmp_path / "rsa", "rsa", 2048)
    with open(cluster["keys_dir"] / "10.0.0.11_22.pub", "a") as f:
        f.write(extra.line + "\n")
    fp = expect_file(tmp_path / "fp", [f"gpu01 {cluster['keys']['gpu01'].fingerprint}"])
    plan = hostkeys.trust(cluster["load"](), ["gpu01"], expect=fp)
    assert [k for _, k in plan.new] == [cluster["keys"]["gpu01"]]
    assert [k for _, k in plan.unvouched] == [extra]
    assert extra.blob not in cluster["known"].read_text()


def test_a_mismatching_expected_fingerprint_is_refused(cluster, tmp_path):
    impostor = keygen(tmp_path / "impostor")
    keys = cluster["keys"]
    fp = expect_file(tmp_path / "fp", [f"gpu01 {keys['gpu01'].fingerprint}",
                                       f"256 {impostor.fingerprint} root@gpu02 (ED25519)",
                                       f"gpu03 {keys['gpu03'].fingerprint}"])
    with pytest.raises(HostKeyMismatch) as err:
        hostkeys.trust(cluster["load"](), expect=fp)
    message = str(err.value)
    assert impostor.fingerprint in message and keys["gpu02"].fingerprint in message
    assert "gpu02" in message and "gpu01 " not in message
    assert not cluster["known"].exists()  # nothing written, not even the matching ones
    assert HostKeyMismatch.exit_code == 4


def test_an_expect_file_must_name_every_node(cluster, tmp_path):
    fp = expect_file(tmp_path / "fp", [f"gpu01 {cluster['keys']['gpu01'].fingerprint}"])
    with pytest.raises(InputError, match="no expected fingerprint for gpu02, gpu03"):
        hostkeys.trust(cluster["load"](), expect=fp)


def _pin(cluster, name, key, host="10.0.0.11", hashed=False):
    known = cluster["known"]
    with open(known, "a") as f:
        f.write(f"{name},{host} {key.line}\n")
    if hashed:
        subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
        Path(f"{known}.old").unlink()


@pytest.mark.parametrize("hashed", [False, True])
def test_a_changed_host_key_is_refused_with_both_fingerprints(cluster, tmp_path, hashed):
    old = keygen(tmp_path / "old")
    _pin(cluster, "gpu01", old, hashed=hashed)
    before = cluster["known"].read_bytes()
    fp = expect_file(tmp_path / "fp", [f"{n} {k.fingerprint}"
                                       for n, k in cluster["keys"].items()])
    # Neither a confirmation nor an expected fingerprint lets a changed key through.
    for kwargs in ({"confirm": lambda p: True}, {"expect": fp}):
        with pytest.raises(HostKeyMismatch) as err:
            hostkeys.trust(cluster["load"](), **kwargs)
        message = str(err.value)
        assert f"recorded {old.fingerprint}" in message
        assert f"offered now {cluster['keys']['gpu01'].fingerprint}" in message
        assert cluster["known"].read_bytes() == before


def test_host_keys_json_is_a_record_too(cluster, tmp_path):
    """A line removed from known_hosts by hand does not make a changed key new: the keys
    runs recorded in the state directory still count."""
    old = keygen(tmp_path / "old")
    state_dir = state.cluster_state_dir("hk", create=True)
    (state_dir / "host_keys.json").write_text(json.dumps({"gpu02": [old.line]}))
    with pytest.raises(HostKeyMismatch) as err:
        hostkeys.trust(cluster["load"](), confirm=lambda p: True)
    assert f"recorded {old.fingerprint}" in str(err.value)
    assert f"[{state_dir / 'host_keys.json'}]" in str(err.value)
    assert not cluster["known"].exists()


def test_replace_swaps_a_reinstalled_nodes_keys(cluster, tmp_path):
    old = keygen(tmp_path / "old")
    _pin(cluster, "gpu01", old)
    _pin(cluster, "gpu02", cluster["keys"]["gpu02"], host="10.0.0.12")
    state_dir = state.cluster_state_dir("hk", create=True)
    (state_dir / "host_keys.json").write_text(json.dumps(
        {"gpu01": [old.line], "gpu02": [cluster["keys"]["gpu02"].line]}))
    fp = expect_file(tmp_path / "fp", [f"gpu01 {cluster['keys']['gpu01'].fingerprint}"])
    plan = hostkeys.trust(cluster["load"](), ["gpu01"], expect=fp, replace=["gpu01"])
    assert [t.name for t in plan.replaced] == ["gpu01"]
    text = cluster["known"].read_text()
    assert old.blob not in text and cluster["keys"]["gpu01"].blob in text
    assert cluster["keys"]["gpu02"].blob in text  # other nodes' lines stay
    assert json.loads((state_dir / "host_keys.json").read_text()) == {
        "gpu02": [cluster["keys"]["gpu02"].line]}


@pytest.mark.parametrize("hashed", [False, True])
def test_a_node_at_a_new_address_with_its_pinned_key_is_pinned_there_and_not_at_the_old(
        cluster, tmp_path, hashed):
    key = cluster["keys"]["gpu01"]
    other = keygen(tmp_path / "other")
    # Another node's hashed lines stay as they are.
    _pin(cluster, "gpu02", cluster["keys"]["gpu02"], host="10.0.0.12", hashed=hashed)
    _pin(cluster, "gpu01", key, host="10.0.0.9")          # where gpu01 was
    with open(cluster["known"], "a") as f:
        f.write(f"10.0.0.9 {other.line}\n")   # another key at the old address: not gpu01's

    def found(host: str) -> str:
        return subprocess.run(["ssh-keygen", "-F", host, "-f", str(cluster["known"])],
                              capture_output=True, text=True).stdout

    assert key.blob not in found("10.0.0.11")
    plan = hostkeys.trust(cluster["load"](), ["gpu01", "gpu02"],
                          confirm=lambda p: pytest.fail("the same key needs no confirmation"))
    assert [t.name for t, _ in plan.moved] == ["gpu01"] and not plan.new
    assert key.blob in found("10.0.0.11") and key.blob in found("gpu01")
    assert key.blob not in found("10.0.0.9") and other.blob in found("10.0.0.9")
    assert cluster["keys"]["gpu02"].blob in found("10.0.0.12")
    # Pinned where it is now: a second scan writes nothing.
    before = cluster["known"].read_bytes()
    again = hostkeys.trust(cluster["load"](), ["gpu01", "gpu02"])
    assert not again.moved and cluster["known"].read_bytes() == before


def hashed_line(host: str, key: HostKey) -> str:
    """A known_hosts line naming ``host`` as ssh-keygen -H writes it: ``|1|salt|hash``, the
    hash an HMAC-SHA1 of the host keyed with the salt."""
    salt = os.urandom(20)
    digest = hmac.new(salt, host.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()} " \
           f"{key.line}"


def found_in(known: Path, host: str) -> str:
    return subprocess.run(["ssh-keygen", "-F", host, "-f", str(known)],
                          capture_output=True, text=True).stdout


@pytest.mark.parametrize("name,old_address,old_port", [("gpu01", "10.0.0.9", 22),
                                                       ("gpu03", "10.0.0.9", 2200)])
def test_a_hashed_line_of_a_moved_nodes_recorded_address_goes(cluster, tmp_path, name,
                                                              old_address, old_port):
    """A hashed line names its host by a hash only: the record of provisioned nodes says
    where the node was, and a hashed line of its key naming that address (at that port)
    goes with its other old lines. Other keys' lines and hashed lines naming other hosts
    stay byte for byte."""
    from dsk_provision import provisioned

    key, other = cluster["keys"][name], keygen(tmp_path / "other")
    target = hostkeys.targets(cluster["load"](), [name])[0]
    was = Target(name, old_address, old_port)
    state_dir = state.cluster_state_dir("hk", create=True)
    provisioned.write_record(state_dir, {name: provisioned.ProvisionedNode(
        name, old_address, old_port, (key.fingerprint,), "2026-01-01T00:00:00Z",
        "2026-01-01T00:00:00Z")})
    stale = hashed_line(was.host_field(old_address), key)
    kept = [
        hashed_line("10.0.0.12", cluster["keys"]["gpu02"]),     # another node, hashed
        "10.0.0.12 " + cluster["keys"]["gpu02"].line,            # and plain
        hashed_line(was.host_field(old_address), other),         # another key at the old address
        hashed_line("10.0.0.50", key),                           # this key, another host
        # This key at the old address on a port the node was not recorded at.
        hashed_line(Target(name, old_address, 2222 if old_port == 22 else 22)
                    .host_field(old_address), key),
        f"{was.host_field(old_address)} {other.line}",           # another key, plain
    ]
    cluster["known"].write_text("\n".join([kept[0], stale, kept[1],
                                           f"{target.host_field(name)} {key.line}",
                                           *kept[2:]]) + "\n")
    assert key.blob in found_in(cluster["known"], was.host_field(old_address))

    plan = hostkeys.trust(cluster["load"](), [name, "gpu02"],
                          confirm=lambda p: pytest.fail("the same key needs no confirmation"))
    assert [t.name for t, _ in plan.moved] == [name] and not plan.new
    assert plan.recorded_names == {name: was.known_hosts_names}
    lines = cluster["known"].read_text().splitlines()
    assert lines == [*kept, f"{','.join(target.known_hosts_names)} {key.line}"]
    assert key.blob not in found_in(cluster["known"], was.host_field(old_address))
    assert key.blob in found_in(cluster["known"], target.host_field(target.address))


def test_replace_at_a_new_address_drops_the_old_keys_hashed_lines_there(cluster, tmp_path):
    """A reinstalled node brought back at another address: the key pinned for it so far
    leaves its recorded address too, where a hashed line is all that names it."""
    from dsk_provision import provisioned

    old = keygen(tmp_path / "old")
    _pin(cluster, "gpu02", cluster["keys"]["gpu02"], host="10.0.0.12")
    _pin(cluster, "gpu01", old, host="10.0.0.9", hashed=True)   # two hashed lines
    elsewhere = hashed_line("10.0.0.50", old)   # the old key, another host
    with open(cluster["known"], "a") as f:
        f.write(elsewhere + "\n")
    kept = [ln for ln in cluster["known"].read_text().splitlines() if old.blob not in ln]
    state_dir = state.cluster_state_dir("hk", create=True)
    provisioned.write_record(state_dir, {"gpu01": provisioned.ProvisionedNode(
        "gpu01", "10.0.0.9", 22, (old.fingerprint,), "2026-01-01T00:00:00Z",
        "2026-01-01T00:00:00Z")})
    fp = expect_file(tmp_path / "fp", [f"gpu01 {cluster['keys']['gpu01'].fingerprint}"])
    hostkeys.trust(cluster["load"](), ["gpu01"], expect=fp, replace=["gpu01"])
    assert cluster["known"].read_text().splitlines() == [
        *kept, elsewhere, f"gpu01,10.0.0.11 {cluster['keys']['gpu01'].line}"]
    assert old.blob not in found_in(cluster["known"], "10.0.0.9")
    assert old.blob not in found_in(cluster["known"], "gpu01")
    assert cluster["keys"]["gpu01"].blob in found_in(cluster["known"], "10.0.0.11")
    assert old.blob in found_in(cluster["known"], "10.0.0.50")
    assert cluster["keys"]["gpu02"].blob in found_in(cluster["known"], "10.0.0.12")


def test_an_unreachable_node_is_named_and_the_others_pinned(cluster):
    (cluster["keys_dir"] / "10.0.0.12_22.pub").unlink()
    with pytest.raises(RunFailed, match="gpu02.*Connection refused") as err:
        hostkeys.trust(cluster["load"](), confirm=lambda p: True)
    assert err.value.nodes == ["gpu02"]
    text = cluster["known"].read_text()
    assert cluster["keys"]["gpu01"].blob in text and cluster["keys"]["gpu03"].blob in text


def test_an_inventory_without_a_known_hosts_file_is_refused(cluster):
    (cluster["inv"] / "group_vars" / "all.yml").write_text("dsk_gpus_per_node: 8\n")
    with pytest.raises(InputError, match="no known_hosts file"):
        hostkeys.trust(cluster["load"](), confirm=lambda p: True)


# ---------------------------------------------------------------- the command

def test_scan_command_exit_codes(cluster, tmp_path):
    runner = CliRunner()
    inv = str(cluster["inv"])
    declined = runner.invoke(app, ["hostkeys", "scan", "-i", inv], input="n\n")
    assert declined.exit_code == 1 and not cluster["known"].exists()
    for name, key in cluster["keys"].items():
        target = hostkeys.targets(cluster["load"](), [name])[0]
        assert key.fingerprint_line(",".join(target.known_hosts_names)) in declined.output
    done = runner.invoke(app, ["hostkeys", "scan", "-i", inv, "gpu01", "gpu03"], input="y\n")
    assert done.exit_code == 0, done.output
    assert "pinned 2 key(s) of 2 node(s)" in done.output
    assert cluster["keys"]["gpu02"].blob not in cluster["known"].read_text()
    keygen(cluster["keys_dir"] / "10.0.0.11_22_new")
    keys_dir = cluster["keys_dir"]
    os.replace(keys_dir / "10.0.0.11_22_new.pub", keys_dir / "10.0.0.11_22.pub")
    changed = runner.invoke(app, ["hostkeys", "scan", "-i", inv, "gpu01"], input="y\n")
    assert changed.exit_code == 4 and "host key changed" in changed.output
    unknown = runner.invoke(app, ["hostkeys", "scan", "-i", inv, "gpu09"])
    assert unknown.exit_code == 2 and "gpu09" in unknown.output


def test_a_state_directory_of_another_inventory_is_refused(cluster, tmp_path):
    """host_keys.json belongs to the inventory that owns the state directory, as `check`
    says: another inventory with the same cluster name is refused before any scan."""
    state.claim_cluster_state_dir("hk", tmp_path / "elsewhere" / "hosts.yml")
    with pytest.raises(InputError, match="already used by the inventory"):
        hostkeys.trust(cluster["load"](), confirm=lambda p: True)
    assert not cluster["known"].exists()


def test_two_recorded_keys_of_one_type_are_both_accepted(tmp_path):
    """A known_hosts file may hold two keys of one type for a node (a rotation): the
    node offering either is no change; a third key is."""
    a, b, c = (keygen(tmp_path / n) for n in "abc")
    assert hostkeys.compare([b], [a, b]) is None
    assert hostkeys.compare([a], [a, b]) is None
    why = hostkeys.compare([c], [a, b])
    assert why and a.fingerprint in why and b.fingerprint in why and c.fingerprint in why
