#!/usr/bin/env bash
# Real caremesh processes in Linux network namespaces: a hub, a GP practice and a hospice,
# each in its own namespace on a bridge, talking QUIC with mutual TLS. The hospice's link
# loses 20% of packets (nftables `numgen random`: this kernel has no netem) and is limited to
# 1 Mbit/s (tbf). The hospice is then cut off entirely, a patient objects to sharing at the
# GP and the hospice records new patients; after the heal, the script checks through the CLI
# that the purge reached the hospice and the hospice's new patients reached the hub.
#
# Needs root (namespaces, nftables, tc). Removes every namespace, rule and process it made,
# also when it fails.
#
# Usage: simulations/netns-partition.sh [CAREMESH_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "needs root: network namespaces, nftables and tc" >&2; exit 2; }
command -v ip >/dev/null || { apt-get update -qq && apt-get install -y -qq iproute2; }
command -v nft >/dev/null || { apt-get update -qq && apt-get install -y -qq nftables; }
command -v tc >/dev/null || { apt-get update -qq && apt-get install -y -qq iproute2; }

caremesh=${1:-target/release/caremesh}
if [ ! -x "$caremesh" ]; then
  cargo build --release --locked -q -p caremesh --bin caremesh
  caremesh=target/release/caremesh
fi
caremesh=$(realpath "$caremesh")

tag="cm$$"
hub_ns="$tag-hub"; gp_ns="$tag-gp"; hsp_ns="$tag-hsp"
work=$(mktemp -d)
pids=()

cleanup() {
  local status=$?
  for pid in "${pids[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
  # Whatever still runs in a namespace (a node whose launcher was killed, not the node) goes
  # too: deleting a namespace does not end its processes.
  for ns in "$hub_ns" "$gp_ns" "$hsp_ns"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
  done
  wait 2>/dev/null || true
  for _ in $(seq 20); do
    [ -z "$(for ns in "$hub_ns" "$gp_ns" "$hsp_ns"; do ip netns pids "$ns" 2>/dev/null; done)" ] && break
    sleep 0.5
  done
  for ns in "$hub_ns" "$gp_ns" "$hsp_ns"; do
    if [ -n "$(ip netns pids "$ns" 2>/dev/null)" ]; then
      echo "processes still running in $ns after cleanup" >&2
      status=1
    fi
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$work"
  if [ "$status" = 0 ]; then echo "PASS: cleaned up namespaces, rules and processes"; else
    echo "FAIL (exit $status): cleaned up namespaces, rules and processes" >&2; fi
  exit "$status"
}
trap cleanup EXIT INT TERM

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
step() { echo "== $*"; }

step "namespaces: $hub_ns (bridge, 10.77.0.1), $gp_ns (10.77.0.2), $hsp_ns (10.77.0.3)"
for ns in "$hub_ns" "$gp_ns" "$hsp_ns"; do
  ip netns add "$ns"
  in_ns "$ns" ip link set lo up
done
in_ns "$hub_ns" ip link add br0 type bridge
in_ns "$hub_ns" ip addr add 10.77.0.1/24 dev br0
in_ns "$hub_ns" ip link set br0 up
connect() { # namespace, address, short name
  local ns=$1 address=$2 name=$3
  ip link add "$tag-$name" type veth peer name "$tag-$name-br"
  ip link set "$tag-$name" netns "$ns"
  ip link set "$tag-$name-br" netns "$hub_ns"
  in_ns "$hub_ns" ip link set "$tag-$name-br" master br0 up
  in_ns "$ns" ip addr add "$address/24" dev "$tag-$name"
  in_ns "$ns" ip link set "$tag-$name" up
}
connect "$gp_ns" 10.77.0.2 gp
connect "$hsp_ns" 10.77.0.3 hsp

step "a region: authority, registry, three node homes"
"$caremesh" trust authority --out "$work/authority.key" >"$work/authority.txt"
authority=$(sed -n 's/^authority public key: //p' "$work/authority.txt")
"$caremesh" trust new --registry "$work/registry.json" --region "Namespace test" >/dev/null
# Each database encrypted, its key file outside its home, as an operator would keep them.
install -d -m 700 "$work/keys"
"$caremesh" init --dir "$work/hub" --org HUB01 --name "Hub" --kind hub \
  --sync-listen 10.77.0.1:7900 --listen 127.0.0.1:7800 --data-key-file "$work/keys/hub.key" >/dev/null
"$caremesh" init --dir "$work/gp" --org A81001 --name "Practice" --kind gp \
  --peer HUB01 --listen 127.0.0.1:7800 --data-key-file "$work/keys/gp.key" >/dev/null
"$caremesh" init --dir "$work/hsp" --org HSP01 --name "Hospice" --kind hospice \
  --peer HUB01 --listen 127.0.0.1:7800 --data-key-file "$work/keys/hsp.key" >/dev/null
for node in hub gp hsp; do
  "$caremesh" trust add --registry "$work/registry.json" --node "$work/$node" >/dev/null
done
"$caremesh" trust sign --registry "$work/registry.json" --authority-key "$work/authority.key" >/dev/null
for node in hub gp hsp; do
  "$caremesh" trust install --dir "$work/$node" --registry "$work/registry.json" \
    --authority "$authority" >/dev/null
done

step "extracts: 30 patients at the GP, the first 3 of them also at the hospice"
"$caremesh" generate --org A81001 --patients 30 --seed 1 --out "$work/gp-extract" >/dev/null
"$caremesh" generate --org HSP01 --patients 3 --seed 1 --out "$work/hsp-extract" >/dev/null
"$caremesh" ingest --dir "$work/gp" "$work/gp-extract" >/dev/null
"$caremesh" ingest --dir "$work/hsp" "$work/hsp-extract" >/dev/null
# Extract files are named by organisation and list position, never by NHS number: read it.
nhs_in() { python3 -c "import json,sys; b=json.load(open(sys.argv[1])); print(next(i['value'] for e in b['entry'] if e['resource']['resourceType'] == 'Patient' for i in e['resource']['identifier'] if i['system'].endswith('nhs-number')))" "$1"; }
shared=$(nhs_in "$work/hsp-extract/$(ls "$work/hsp-extract" | sort | head -1)")

start() { # namespace, node: `ip netns exec` and `env` exec the node, so $! is the node
  ip netns exec "$1" env CAREMESH_LOG=warn "$caremesh" run --dir "$work/$2" >"$work/$2.log" 2>&1 &
  pids+=($!)
}
step "caremesh run in each namespace"
start "$hub_ns" hub
start "$gp_ns" gp
start "$hsp_ns" hsp

step "the hospice link: 20% packet loss each way (nftables), 1 Mbit/s (tbf)"
in_ns "$hsp_ns" nft -f - <<'NFT'
table inet lossy {
  chain in  { type filter hook input  priority 0; iif != "lo" numgen random mod 100 < 20 counter drop; }
  chain out { type filter hook output priority 0; oif != "lo" numgen random mod 100 < 20 counter drop; }
}
NFT
in_ns "$hsp_ns" tc qdisc add dev "$tag-hsp" root tbf rate 1mbit burst 32kbit latency 400ms

# json_field FILE PYTHON_EXPRESSION over `d`
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
record() { # node, nhs -> record JSON on stdout, or nothing
  "$caremesh" record --dir "$work/$1" --nhs "$2" --user "partition test" --json 2>/dev/null || true
}
sources_of() { record "$1" "$2" | json "' '.join(sorted(s['ods'] for s in d['sources']))" 2>/dev/null || true; }
wait_until() { # seconds, description, command...
  local limit=$1 what=$2; shift 2
  local started=$SECONDS
  until "$@"; do
    if (( SECONDS - started > limit )); then echo "timed out after ${limit}s: $what" >&2; return 1; fi
    sleep 2
  done
  echo "   $what after $((SECONDS - started)) s"
}
holds_gp_data() { [[ " $(sources_of hsp "$shared") " == *" A81001 "* ]]; }
# A hub opens no record (it keeps no read model of clinical items): what it holds is counted.
hub_patients() { "$caremesh" status --dir "$work/hub" --json | json "d['stats']['patients']"; }

step "over the lossy link the hospice gets the GP's record of the shared patient"
wait_until 180 "the hospice holds GP data about $shared" holds_gp_data

step "partition: the hospice is cut off (nftables drops its packets at the hub)"
in_ns "$hub_ns" nft -f - <<'NFT'
table inet cut {
  chain in  { type filter hook input  priority 0; ip saddr 10.77.0.3 drop; }
  chain out { type filter hook output priority 0; ip daddr 10.77.0.3 drop; }
}
NFT
sleep 2 # what was in flight when the cut came is stored or dropped by now
hub_before=$(hub_patients)
"$caremesh" consent set --dir "$work/gp" --nhs "$shared" --objection on >/dev/null
"$caremesh" generate --org HSP01 --patients 2 --seed 77 --out "$work/hsp-more" >/dev/null
"$caremesh" ingest --dir "$work/hsp" "$work/hsp-more" >/dev/null
sleep 30
holds_gp_data || { echo "the hospice lost the GP data while cut off: the test cannot tell a purge" >&2; exit 1; }
[ "$(hub_patients)" = "$hub_before" ] || { echo "the hub got hospice data through the partition" >&2; exit 1; }
echo "   while cut off: the hospice still holds the GP's copies; the hub lacks the hospice's new patients"

step "heal, with the loss still on"
in_ns "$hub_ns" nft delete table inet cut
purged() {
  local sources
  sources=$(sources_of hsp "$shared")
  [[ -n "$sources" && " $sources " != *" A81001 "* ]]
}
wait_until 300 "the objection purged the GP's copies at the hospice" purged
hub_has_new() { (( $(hub_patients) > hub_before )); }
wait_until 300 "the hub holds the hospice's patients recorded during the partition" hub_has_new
"$caremesh" verify --dir "$work/hsp" >/dev/null
"$caremesh" verify --dir "$work/hub" >/dev/null
echo "   verify: every stored document at the hospice and the hub checks out"
dropped=$(in_ns "$hsp_ns" nft list table inet lossy | grep -o 'packets [0-9]*' | awk '{ n += $2 } END { print n + 0 }')
echo "   the lossy link dropped $dropped packets on the way"
[ "$dropped" -gt 0 ] || { echo "no packet was dropped: the loss rule did not apply" >&2; exit 1; }
