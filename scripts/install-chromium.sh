#!/usr/bin/env bash
# The browser tests drive Debian's Chromium; install it when it is missing (needs apt and root).
set -euo pipefail
[ -x /usr/bin/chromium ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "warning: /usr/bin/chromium is missing; install Debian's 'chromium' for the browser tests" >&2
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
