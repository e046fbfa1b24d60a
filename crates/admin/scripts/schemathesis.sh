#!/usr/bin/env bash
# Fuzzes the admin API against its own OpenAPI document with schemathesis
# (PyPI), a client nobody here wrote: server errors, undocumented status
# codes, responses that do not match their schema, auth bypass, ...
#
# Runs the router over the in-memory fake service (example fake_sanvirtd) on
# a loopback port. Not part of `cargo test`: it needs Python and PyPI.
#
#   crates/admin/scripts/schemathesis.sh [extra schemathesis args]
#
# positive_data_acceptance is excluded: the schema cannot express every rule
# of the configuration model (the characters allowed in names, an mdisk path
# that must exist), so some schema-valid requests are rightly refused (400).
set -euo pipefail
cd "$(dirname "$0")/../../.."

venv=${SCHEMATHESIS_VENV:-${TMPDIR:-/tmp}/sanvirt-schemathesis}
if [ ! -x "$venv/bin/schemathesis" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q schemathesis
fi

cargo build -q -p sanvirt-admin --features fake --example fake_sanvirtd
bin=$(realpath "${CARGO_TARGET_DIR:-target}/debug/examples/fake_sanvirtd")
port=${SANVIRT_FUZZ_PORT:-17481}
token=schemathesis-token-0123456789
work=$(mktemp -d)
(cd "$work" && exec "$bin" "127.0.0.1:$port" "$token") &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do
  curl -sf "http://127.0.0.1:$port/v1/openapi.json" >/dev/null && break
  sleep 0.1
done

# schemathesis keeps a cache in its working directory: not in the repo.
cd "$work"
"$venv/bin/schemathesis" run "http://127.0.0.1:$port/v1/openapi.json" \
  -H "Authorization: Bearer $token" \
  --exclude-checks positive_data_acceptance \
  --max-examples "${SANVIRT_FUZZ_EXAMPLES:-100}" --workers 1 "$@"
