#!/usr/bin/env bash
# Idempotent setup for a fresh Debian/Ubuntu machine: system packages, then a virtualenv in .venv.
#   scripts/setup.sh          runtime only (the demo)
#   scripts/setup.sh --dev    plus the test tools (pytest, gradio_client, Playwright + Debian's Chromium)
# It says what it is doing; a run with nothing to do is silent. A half-made .venv (say, python3-venv was missing
# the first time) is removed and made again.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0; [[ "${1:-}" == "--dev" ]] && dev=1
say() { echo "[setup] $*"; }

sudo_cmd=""; [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
apt_install() {
  say "Installing system packages: $* (needs apt-get${sudo_cmd:+ and sudo})..."
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "$@" >/dev/null
}

apt_packages=(ffmpeg)
(( dev )) && apt_packages+=(chromium espeak-ng)
missing=()
for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
(( ${#missing[@]} )) && apt_install "${missing[@]}"

venv_ok() { [[ -x .venv/bin/python && -x .venv/bin/pip ]] && .venv/bin/python -c "" 2>/dev/null; }
if ! venv_ok; then
  if [[ -e .venv ]]; then
    say "Removing an unfinished .venv left by an earlier run..."
    rm -rf .venv
  fi
  say "Creating the Python virtual environment in .venv..."
  if ! python3 -m venv .venv 2>/dev/null; then
    rm -rf .venv
    # Debian and Ubuntu ship venv's pip bootstrap separately (python3-venv, or python3.X-venv).
    version=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    apt_install python3-venv "python${version}-venv" || apt_install python3-venv
    python3 -m venv .venv || { rm -rf .venv; say "Could not create .venv: install python3-venv and run this again."; exit 1; }
  fi
fi

req=requirements.txt; (( dev )) && req=requirements-dev.txt
stamp=".venv/.installed-$(cat requirements.txt "$req" | sha1sum | cut -c1-12)"
if [[ ! -f "$stamp" ]]; then
  say "Installing the Python packages into .venv (torch, gradio, ...). The first time this downloads about 2 GB"
  say "and takes a few minutes; later starts skip it."
  # torch first, pinned, so nothing pulls a different build; then the rest.
  .venv/bin/pip install -q --disable-pip-version-check "$(grep '^torch==' requirements.txt)"
  .venv/bin/pip install -q --disable-pip-version-check -r "$req"
  touch "$stamp"
  say "Packages installed."
fi

# Triton, for running the GPU kernels' tests in its CPU interpreter (tests/test_kernels_interpret.py), kept in a
# folder of its own, off the venv's import path: the suite and the demo run as on any machine without Triton.
triton_pin="triton==3.9.0"
triton_dir=".venv/triton-interpreter"
if (( dev )) && [[ ! -f "$triton_dir/.installed-$triton_pin" ]]; then
  say "Installing $triton_pin into $triton_dir, for the kernel tests in Triton's interpreter..."
  rm -rf "$triton_dir"
  .venv/bin/pip install -q --disable-pip-version-check --no-deps --target "$triton_dir" "$triton_pin"
  touch "$triton_dir/.installed-$triton_pin"
fi
