#!/usr/bin/env bash
# Installs what the chat page's browser test needs (Debian's chromium and chromium-driver), when
# missing. Idempotent; the test command in README.md runs it.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "browser-deps: need root (or sudo) to install chromium" >&2; exit 1; }
    SUDO=sudo
fi
command -v apt-get >/dev/null 2>&1 || { echo "browser-deps: no apt-get; install chromium and chromedriver yourself" >&2; exit 1; }
echo "browser-deps: installing chromium and chromium-driver (apt-get)" >&2
$SUDO apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
