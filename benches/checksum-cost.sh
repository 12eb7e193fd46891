#!/bin/sh
# What page checksums cost: ingest of PATIENTS generated patients into a fresh home, then
# `caremesh verify` (which reads every page), each timed as user+system CPU seconds, for
# two builds in alternating order RUNS times; then the one-time rewrite that gives a
# database made by the first build its checksums, opened by the second.
# Usage: benches/checksum-cost.sh CAREMESH_BEFORE CAREMESH_AFTER [PATIENTS] [RUNS]
set -eu
before=$1
after=$2
patients=${3:-2000}
runs=${4:-3}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$after" generate --org A81001 --patients "$patients" --out "$dir/extract" > /dev/null
cpu() { # command... -> "user+sys wall" of the command
  /usr/bin/time -f "%U %S %e" -o "$dir/time" "$@" > /dev/null 2>&1
  awk '{ printf "%.2f %.2f", $1 + $2, $3 }' "$dir/time"
}
measure() { # label binary run
  home="$dir/$1-$3"
  # Builds since encryption became the default must be told to keep plain text.
  plain=$("$2" init --help | grep -o -- --unencrypted || true)
  "$2" init --dir "$home" --org A81001 --name "Bench Practice" --kind gp $plain > /dev/null
  ingest=$(cpu "$2" ingest --dir "$home" "$dir/extract")
  verify=$(cpu "$2" verify --dir "$home")
  size=$(du -k "$home/node.db" | cut -f1)
  echo "$1 run $3: ingest CPU s, wall s: $ingest; verify CPU s, wall s: $verify; node.db ${size} KiB"
}
i=1
while [ "$i" -le "$runs" ]; do
  measure before "$before" "$i"
  measure after "$after" "$i"
  i=$((i + 1))
done
# The upgrade: a database made before checksums, first opened for writing by the new build.
cp -r "$dir/before-1" "$dir/upgraded"
rewrite=$(cpu "$after" audit checkpoint --dir "$dir/upgraded")
echo "upgrade of a $(du -k "$dir/before-1/node.db" | cut -f1) KiB database: CPU s, wall s: $rewrite"
"$after" verify --dir "$dir/upgraded" > /dev/null && echo "upgraded database verifies"
