#!/usr/bin/python
"""Write several small managed files in one module execution, each only if it differs."""

from __future__ import annotations

import os
import tempfile

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: dsk_files
short_description: Write several small files, each only when its content or attributes differ
description:
  - For every entry of I(files), compares the file's bytes with I(content) and its owner,
    group and mode with the given ones; writes the content atomically (a temporary file in
    the same directory, then a rename) only when it differs, and fixes attributes only when
    they differ. One execution replaces a copy task per file (each of which costs a stat
    and a file module execution on an unchanged node).
  - The parent directory must exist. Supports check mode and diff mode.
options:
  files:
    description: The files to manage.
    type: list
    elements: dict
    required: true
    suboptions:
      path: {description: Absolute path of the file., type: path, required: true}
      content: {description: The whole content., type: str, required: true}
      owner: {description: Owner name., type: str, default: root}
      group: {description: Group name., type: str, default: root}
      mode: {description: Octal mode as a string, like "0644"., type: str, default: "0644"}
"""

RETURN = r"""
files:
  description: Per file, its path and whether it changed (or would change in check mode).
  returned: always
  type: list
"""


def _current(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _write(module: AnsibleModule, path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".dsk-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        module.atomic_move(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "files": {
                "type": "list", "elements": "dict", "required": True,
                "options": {
                    "path": {"type": "path", "required": True},
                    "content": {"type": "str", "required": True},
                    "owner": {"type": "str", "default": "root"},
                    "group": {"type": "str", "default": "root"},
                    "mode": {"type": "str", "default": "0644"},
                },
            },
        },
        supports_check_mode=True,
    )
    results = []
    diffs = []
    any_changed = False
    for spec in module.params["files"]:
        path = spec["path"]
        if not os.path.isabs(path):
            module.fail_json(msg=f"{path}: the path must be absolute")
        if not os.path.isdir(os.path.dirname(path)):
            module.fail_json(msg=f"{path}: the directory {os.path.dirname(path)} does not exist")
        wanted = spec["content"].encode("utf-8")
        before = _current(path)
        changed = before != wanted
        if changed and not module.check_mode:
            _write(module, path, wanted)
        if os.path.exists(path):
            changed = module.set_owner_if_different(path, spec["owner"], changed)
            changed = module.set_group_if_different(path, spec["group"], changed)
            changed = module.set_mode_if_different(path, spec["mode"], changed)
        results.append({"path": path, "changed": changed})
        if changed:
            any_changed = True
            diffs.append({
                "before_header": path, "after_header": path,
                "before": (before or b"").decode("utf-8", "replace"),
                "after": spec["content"],
            })
    out = {"changed": any_changed, "files": results}
    if module._diff:
        out["diff"] = diffs
    module.exit_json(**out)


if __name__ == "__main__":
    main()
