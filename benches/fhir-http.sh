#!/usr/bin/env bash
# The page and the FHIR API's $everything and $summary over HTTP, from a running node:
# p50, p99 and max of curl's time_total over N requests of each, interleaved.
#
#   benches/fhir-http.sh NODE_HOME NHS_NUMBER [N] [BASELINE_NHS_NUMBER]
#
# With a baseline patient (one with only the practice's own data, whose views write no
# access record), its $everything is read in the same loop, as the baseline.
#
# Starts `caremesh run` on NODE_HOME (stop any node already running there first) on
# 127.0.0.1:7899, takes an access token (`caremesh api-token`) and a clinician's session
# (`caremesh launch`), and reads the patient. Uses target/release/caremesh unless CAREMESH
# names another binary. Each request is a view in the node's audit trail, as in use.
set -euo pipefail
home=${1:?usage: fhir-http.sh NODE_HOME NHS_NUMBER [N]}
nhs=${2:?usage: fhir-http.sh NODE_HOME NHS_NUMBER [N]}
requests=${3:-500}
baseline=${4:-}
caremesh=${CAREMESH:-target/release/caremesh}
address=127.0.0.1:7899
work=$(mktemp -d)
"$caremesh" run --dir "$home" --listen "$address" >"$work/run.log" 2>&1 &
node=$!
trap 'kill $node 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do curl -sf "http://$address/health" >/dev/null && break; sleep 0.2; done
token=$("$caremesh" api-token --dir "$home" --client fhir-http-bench | tail -n 1)
launch=$("$caremesh" launch --dir "$home" --user bench --name "Bench clinician" --nhs "$nhs" \
  --base "http://$address")
cookie=$(curl -s -o /dev/null -D - "$launch" | sed -n 's/^[Ss]et-[Cc]ookie: \([^;]*\);.*/\1/p')
time_get() { curl -s -o /dev/null -w '%{time_total}\n' "$@"; }
for _ in $(seq 1 "$requests"); do
  time_get -H "Cookie: $cookie" "http://$address/patients/$nhs" >>"$work/page"
  time_get -H "Authorization: Bearer $token" "http://$address/fhir/Patient/$nhs/\$everything" >>"$work/everything"
  time_get -H "Authorization: Bearer $token" "http://$address/fhir/Patient/$nhs/\$summary" >>"$work/summary"
  if [ -n "$baseline" ]; then
    time_get -H "Authorization: Bearer $token" \
      "http://$address/fhir/Patient/$baseline/\$everything" >>"$work/baseline"
  fi
done
series="page everything summary"
[ -n "$baseline" ] && series="$series baseline"
for what in $series; do
  sort -n "$work/$what" | awk -v what="$what" '{ t[NR] = $1 * 1000 }
    END { printf "%-11s %d requests: p50 %.1f ms, p99 %.1f ms, max %.1f ms\n",
          what, NR, t[int(NR * 0.5)], t[int(NR * 0.99)], t[NR] }'
done
