#!/usr/bin/env bash
# System programs the tests talk to for real: the Mosquitto broker, systemd-analyze (unit file check; the systemd
# package brings libseccomp, which tools/unit_sandbox.py uses),
# /bin/kill (the unit's ExecReload=), Chromium (the pages, driven headless by Playwright) and docker-registry (the
# reference OCI registry the fleet tests push bundles to and pull them from; the tests start it on loopback).
# Installs the missing ones with apt-get when this user can (root, or
# sudo without a password); otherwise says in one line what to install and exits 0: the tests that need
# them then skip, naming the package.  Never fails the caller.
set -uo pipefail

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
[ -x /bin/kill ] || need+=(procps)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || need+=(chromium)
command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
[ ${#need[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing ${need[*]} and no apt-get here: the tests that need them will skip" \
       "(install mosquitto and systemd-analyze with your package manager)" >&2
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "system-deps: missing ${need[*]} (not root, no password-less sudo): the tests that need them will skip;" \
       "install with: sudo apt-get install --no-install-recommends ${need[*]}" >&2
  exit 0
fi
echo "system-deps: installing ${need[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { "${sudo[@]}" apt-get update -qq && \
       "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }; then
  echo "system-deps: apt-get could not install ${need[*]}: the tests that need them will skip" >&2
fi
exit 0
