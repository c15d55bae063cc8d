#!/usr/bin/env bash
# Install what the review tests need, when missing: Debian's `postgresql` (server binaries; the
# tests start their own throwaway cluster with initdb/pg_ctl in a temp folder, on a unix socket)
# and `chromium` (the browser tests drive it with Playwright; Playwright's own browser download
# does not work here). Needs root for apt-get (CI runs as root); without root it only reports.
# Tests skip with a clear reason when a service is still missing.
set -uo pipefail

missing=()
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null && ! command -v initdb > /dev/null; then
  missing+=(postgresql)
fi
if [[ ! -x /usr/bin/chromium ]]; then
  missing+=(chromium)
fi
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "ci_services: postgresql and chromium present"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "ci_services: missing ${missing[*]}; run as root (or: sudo apt-get install -y ${missing[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || echo "ci_services: apt-get update failed; trying the cached lists" >&2
if ! apt-get install -y -qq "${missing[@]}" > /tmp/ci_services_apt.log 2>&1; then
  echo "ci_services: apt-get install ${missing[*]} failed (see /tmp/ci_services_apt.log)" >&2
  tail -5 /tmp/ci_services_apt.log >&2
  exit 1
fi
# The Debian package may start a system cluster; the tests do not use it.
echo "ci_services: installed ${missing[*]}"
