#!/usr/bin/env bash
# Installs what the control node needs: Debian packages (when missing) and the virtualenv.
# The virtualenv is made from Debian's /usr/bin/python3 so that sandbox nodes (Debian 12)
# can run it too: it is bound read-only into every node.
set -euo pipefail
VENV=${VENV:-.venv}
APT_PACKAGES=(systemd-container mmdebstrap iproute2 dpkg-dev python3-venv openssh-client gcc
              ca-certificates)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages: ${missing[*]}; run as root or: apt-get install ${missing[*]}" >&2
    exit 3
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp="$VENV/.dsk-installed"
if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3 -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing the Python environment into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[trainer,report,dev]' 2>&1 \
    | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import dsk_provision, torch, ansible_runner" \
    || { echo "setup: the Python environment is incomplete" >&2; exit 3; }
  touch "$stamp"
fi
