#!/bin/sh
# CPU a quiet region costs: starts the demo region (a hub, a GP practice, a hospital and a
# hospice, each a `caremesh run` process, syncing), lets it settle for 40 s, then sums the
# user and system CPU its node processes spend over SECONDS (from /proc/PID/stat).
# Usage: benches/idle-cpu.sh CAREMESH_BINARY [PORT] [SECONDS]
set -eu
bin=$1
port=${2:-7810}
seconds=${3:-60}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$bin" demo --dir "$dir/region" --patients 40 --port "$port" > "$dir/out" 2>&1 &
demo=$!
sleep 40
pids=$(pgrep -f "$dir/region" | grep -v "^$demo\$" || true)
ticks() {
  total=0
  for pid in $pids; do
    # Fields 14 and 15 of stat (utime, stime), counted after the command name's ')'.
    set -- $(cut -d')' -f2 "/proc/$pid/stat")
    total=$((total + ${12} + ${13}))
  done
  echo "$total"
}
before=$(ticks)
sleep "$seconds"
after=$(ticks)
hz=$(getconf CLK_TCK)
echo "$bin: $(echo "$pids" | wc -w) node processes, $(echo "scale=2; ($after - $before) / $hz" | bc) CPU seconds in ${seconds} s"
kill -INT "$demo"
wait "$demo" 2>/dev/null || true
