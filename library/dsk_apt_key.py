#!/usr/bin/python
"""Install an apt repository's signing key only when its fingerprint is the pinned one."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import fetch_url

DOCUMENTATION = r"""
module: dsk_apt_key
short_description: Check an OpenPGP key against pinned fingerprints, then install it for apt
description:
  - Reads an OpenPGP public key (ASCII-armored or binary) from I(src), a URL or a file on
    the node, and computes the fingerprint of every primary key in it (v4 and v6 keys).
    It fails, changing nothing, unless every primary key is one of I(fingerprints) and at
    least one is there: a key served next to a repository is trusted only when it is the
    key the inventory (or the role's defaults) pins, and a file that carries a second,
    unpinned key is refused, since apt would trust every key of a signed-by file.
  - With I(dest), writes the key in binary form (the bytes that were checked, dearmored)
    to I(dest) atomically, 0644 root:root, only when it differs; apt reads it through
    C(signed-by=). Without I(dest) it only checks (a keyring a package installed).
  - Needs neither gpg nor network access beyond I(src); supports check mode.
options:
  src:
    description: http://, https:// or file:// URL, or an absolute path on the node.
    type: str
    required: true
  fingerprints:
    description: Accepted primary-key fingerprints (hex; spaces and case ignored).
    type: list
    elements: str
    required: true
  dest:
    description: Keyring file to write (binary OpenPGP, for apt's signed-by).
    type: path
  timeout:
    description: Seconds to wait for the URL.
    type: int
    default: 30
"""

RETURN = r"""
found:
  description: Fingerprints of the primary keys in the source.
  returned: always
  type: list
"""

MAX_KEY_BYTES = 1 << 20
_ARMOR_BLOCK = re.compile(
    r"-----BEGIN PGP PUBLIC KEY BLOCK-----\r?\n(.*?)-----END PGP PUBLIC KEY BLOCK-----",
    re.DOTALL)
_PUBLIC_KEY, _PUBLIC_SUBKEY = 6, 14


class BadKey(ValueError):
    """The source is not a well-formed OpenPGP public key."""


def dearmor(data: bytes) -> bytes:
    """Binary OpenPGP packets of `data`: as is when binary, decoded when armored (every
    PUBLIC KEY BLOCK, concatenated; armor headers and checksum lines skipped)."""
    if data[:1] and data[0] & 0x80:
        return data
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise BadKey("neither a binary key nor ASCII armor") from exc
    blocks = _ARMOR_BLOCK.findall(text)
    if not blocks:
        raise BadKey("no PGP PUBLIC KEY BLOCK")
    out = b""
    for block in blocks:
        lines = block.splitlines()
        if "" in lines:  # armor headers end with an empty line
            lines = lines[lines.index("") + 1:]
        body = "".join(line.strip() for line in lines if not line.startswith("="))
        try:
            out += base64.b64decode(body, validate=True)
        except ValueError as exc:
            raise BadKey(f"bad base64 in the armor: {exc}") from exc
    return out


def packets(data: bytes):
    """(tag, body) of each OpenPGP packet (RFC 9580 section 4.2, both header formats)."""
    i = 0
    while i < len(data):
        first = data[i]
        i += 1
        if not first & 0x80:
            raise BadKey(f"not an OpenPGP packet at byte {i - 1}")
        if first & 0x40:  # new format
            tag = first & 0x3F
            if i >= len(data):
                raise BadKey("truncated packet header")
            octet = data[i]
            if octet < 192:
                length, i = octet, i + 1
            elif octet < 224:
                if i + 1 >= len(data):
                    raise BadKey("truncated packet header")
                length, i = ((octet - 192) << 8) + data[i + 1] + 192, i + 2
            elif octet == 255:
                length, i = int.from_bytes(data[i + 1:i + 5], "big"), i + 5
            else:
                raise BadKey("partial body lengths have no place in a key")
        else:
            tag, kind = (first >> 2) & 0x0F, first & 0x03
            if kind == 3:
                raise BadKey("indeterminate packet length")
            size = (1, 2, 4)[kind]
            length, i = int.from_bytes(data[i:i + size], "big"), i + size
        if i + length > len(data):
            raise BadKey("truncated packet")
        yield tag, data[i:i + length]
        i += length


def fingerprint(body: bytes) -> str:
    """The fingerprint of a public-key packet body: v4 SHA-1, v5/v6 SHA-256."""
    version = body[0] if body else 0
    if version == 4:
        return hashlib.sha1(b"\x99" + len(body).to_bytes(2, "big") + body).hexdigest().upper()
    if version == 5:
        return hashlib.sha256(b"\x9a" + len(body).to_bytes(4, "big") + body).hexdigest().upper()
    if version == 6:
        return hashlib.sha256(b"\x9b" + len(body).to_bytes(4, "big") + body).hexdigest().upper()
    raise BadKey(f"version {version} keys are not accepted")


def primary_fingerprints(data: bytes) -> tuple[bytes, list[str]]:
    """The binary key and the fingerprints of its primary keys."""
    binary = dearmor(data)
    found = [fingerprint(body) for tag, body in packets(binary) if tag == _PUBLIC_KEY]
    if not found:
        raise BadKey("no public key in it")
    return binary, found


def normalize(value: str) -> str:
    return re.sub(r"\s+", "", value).upper().removeprefix("0X")


def judge(found: list[str], pinned: list[str]) -> str | None:
    """Why a key with primary keys `found` must not be trusted under `pinned`, or None."""
    unpinned = [f for f in found if f not in pinned]
    if unpinned:
        return (f"key fingerprint {', '.join(unpinned)} is not pinned "
                f"(expected {', '.join(pinned)})")
    return None


def _read(module: AnsibleModule, src: str) -> bytes:
    if re.match(r"(https?|ftp)://", src):
        response, info = fetch_url(module, src, timeout=module.params["timeout"])
        if info.get("status") != 200 or response is None:
            module.fail_json(msg=f"cannot fetch {src}: {info.get('msg', '')} "
                                 f"(HTTP {info.get('status')})")
        data = response.read(MAX_KEY_BYTES + 1)
    else:
        path = src[len("file://"):] if src.startswith("file://") else src
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_KEY_BYTES + 1)
        except OSError as exc:
            module.fail_json(msg=f"cannot read {path}: {exc.strerror}")
    if len(data) > MAX_KEY_BYTES:
        module.fail_json(msg=f"{src} is larger than a key ({MAX_KEY_BYTES} bytes)")
    return data


def _write(module: AnsibleModule, path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".dsk-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        module.atomic_move(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "src": {"type": "str", "required": True},
            "fingerprints": {"type": "list", "elements": "str", "required": True,
                             "no_log": False},
            "dest": {"type": "path"},
            "timeout": {"type": "int", "default": 30},
        },
        supports_check_mode=True,
    )
    pinned = [normalize(f) for f in module.params["fingerprints"] if normalize(f)]
    if not pinned:
        module.fail_json(msg="no fingerprint pinned: a key cannot be trusted without one")
    src = module.params["src"]
    data = _read(module, src)
    try:
        binary, found = primary_fingerprints(data)
    except BadKey as exc:
        module.fail_json(msg=f"{src}: not an OpenPGP public key: {exc}")
    problem = judge(found, pinned)
    if problem:
        module.fail_json(msg=f"{src}: {problem}; refusing to trust it", found=found)
    dest = module.params["dest"]
    changed = False
    if dest:
        try:
            with open(dest, "rb") as handle:
                current = handle.read()
        except FileNotFoundError:
            current = None
        changed = current != binary
        if changed and not module.check_mode:
            _write(module, dest, binary)
        status = os.stat(dest) if os.path.exists(dest) else None
        if status is not None and ((status.st_mode & 0o7777) != 0o644
                                   or (status.st_uid, status.st_gid) != (0, 0)):
            changed = True
            if not module.check_mode:
                os.chown(dest, 0, 0)
                os.chmod(dest, 0o644)
    module.exit_json(changed=changed, found=found)


if __name__ == "__main__":
    main()
