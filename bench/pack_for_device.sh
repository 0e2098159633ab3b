#!/usr/bin/env bash
# Packs a kaggle_3m folder for a lent GPU, whose calls carry at most 64 MiB each (the device
# tool's README): tar.xz (the 49 shared patients: 353 MB of TIFFs -> 132 MB, a few minutes on
# 2 cores), cut into parts that travel one call each in .devdata/p<N>/ (ignored by git), the first
# one small enough to travel beside .whl (bench/device_check.sh says how to fill .whl).
#
#     bash bench/pack_for_device.sh /work/data/kaggle_3m [ARCHIVE]
#
# ARCHIVE (default /work/devpack/<folder>.tar.xz) is reused when it exists. Then, one call each,
# back to back (a machine is given back after 30 s idle, and /tmp with it):
#   call 1, carry [".whl", ".devdata/p1"]: mkdir -p /tmp/dd && cp .devdata/p1/* /tmp/dd/ &&
#       python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl
#   call k, carry [".devdata/pk"]: cp .devdata/pk/* /tmp/dd/
#   last call: also  cat /tmp/dd/lgg.* > /tmp/lgg.tar.xz && echo "SHA  /tmp/lgg.tar.xz" |
#       sha256sum -c (SHA printed below) &&
#       mkdir -p /tmp/data && xz -dc /tmp/lgg.tar.xz | tar x -C /tmp/data, then the work
#       (e.g. PYTHONPATH=/tmp/site python3 bench/device_cv.py --data=/tmp/data/kaggle_3m ...).
set -euo pipefail
[ $# -ge 1 ] && [ -d "$1" ] || { echo "usage: bash bench/pack_for_device.sh KAGGLE_3M_DIR [ARCHIVE]" >&2; exit 2; }
src=$(realpath "$1")
archive=${2:-/work/devpack/$(basename "$src").tar.xz}
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
if [ ! -s "$archive" ]; then
  mkdir -p "$(dirname "$archive")"
  tar cf - -C "$(dirname "$src")" "$(basename "$src")" | xz -6 -T0 > "$archive.partial"
  mv "$archive.partial" "$archive"
fi
grep -qx '/.devdata/' "$repo/.git/info/exclude" 2>/dev/null || echo /.devdata/ >> "$repo/.git/info/exclude"
rm -rf "$repo/.devdata" && mkdir -p "$repo/.devdata"
# A call carries at most 64 MiB: the repository (under 1 MB) and one part; the first also .whl.
limit=$((64 * 1024 * 1024 - 2 * 1000 * 1000))
wheels=$(du -cb "$repo"/.whl 2>/dev/null | tail -1 | cut -f1)
first=$((limit - ${wheels:-0})) rest=$limit size=$(stat -c %s "$archive")
offset=0 n=1
while [ "$offset" -lt "$size" ]; do
  chunk=$([ "$n" -eq 1 ] && echo "$first" || echo "$rest")
  mkdir -p "$repo/.devdata/p$n"
  dd if="$archive" of="$repo/.devdata/p$n/lgg.$(printf %02d $((n - 1)))" bs=1M status=none \
    iflag=skip_bytes,count_bytes skip="$offset" count="$chunk"
  offset=$((offset + chunk)) n=$((n + 1))
done
echo "parts: $(ls -d "$repo"/.devdata/p* | xargs -n1 basename | tr '\n' ' ')"
echo "sha256 of the archive: $(sha256sum "$archive" | cut -d' ' -f1)"
