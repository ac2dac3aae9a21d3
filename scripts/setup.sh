#!/usr/bin/env bash
# Idempotent setup for a fresh Debian/Ubuntu machine: system packages, then a virtualenv in .venv.
#   scripts/setup.sh          runtime only (the demo)
#   scripts/setup.sh --dev    plus the test tools (pytest, gradio_client, Playwright + Debian's Chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0; [[ "${1:-}" == "--dev" ]] && dev=1

apt_packages=(ffmpeg)
(( dev )) && apt_packages+=(chromium espeak-ng)
missing=()
for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if (( ${#missing[@]} )); then
  sudo_cmd=""; [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
req=requirements.txt; (( dev )) && req=requirements-dev.txt
stamp=".venv/.installed-$(cat requirements.txt "$req" | sha1sum | cut -c1-12)"
if [[ ! -f "$stamp" ]]; then
  # torch first, pinned, so nothing pulls a different build; then the rest.
  .venv/bin/pip install -q --disable-pip-version-check "$(grep '^torch==' requirements.txt)"
  .venv/bin/pip install -q --disable-pip-version-check -r "$req"
  touch "$stamp"
fi
