#!/usr/bin/env bash
# The GPU check of issue 12, run on a GPU machine from the repository root:
#
#     OUT=/results scripts/gpu_check.sh [--dry-run] [PAYLOAD]      (PAYLOAD: default .gpu_payload)
#
# PAYLOAD is built beforehand on any machine with tvmlayers (no GPU needed): .venv/bin/python scripts/gpu_payload.py
# (a runtime pack for the GPU machine's CPython, bundles of every op and mode and of ResNet-18 at batch 1 and 16,
# offline-tuning candidates when given).  The GPU machine needs python3 with torch (CUDA) and numpy, no TVM.
#
# Steps: validate the payload (every bundle's files against its manifest), check the GPU's architecture, run every
# bundle's run.py (check against torch on the GPU, then time ours and torch's op with CUDA events) writing
# <bundle>.json, .log and .rc, measure the candidates folders (measure.py -> measured-<name>.json), and summarize.
# $OUT receives summary.md, gpu_check.json, the measured-*.json files (for `tvmlayers logs import`) and
# details.tar.gz with everything else.  A failing bundle is reported and the next one runs.
# --dry-run validates the payload (with any Python, e.g. here) and prints the commands it would run.
# Exit status: 0 when every bundle matched torch and every run finished, 1 otherwise, 2 when nothing could run.
set -u

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
    dry_run=1
    shift
fi
payload=${1:-.gpu_payload}
python=${PYTHON:-python3}
bundle_timeout_s=${BUNDLE_TIMEOUT_S:-100}   # each bundle; the whole check is meant to take under 5 minutes
candidates_timeout_s=${CANDIDATES_TIMEOUT_S:-180}  # each candidates folder (ResNet-18: 306 kernels)

if [ -z "${OUT:-}" ]; then
    if [ "$dry_run" = 1 ]; then
        OUT=$(mktemp -d)
    else
        echo "gpu_check.sh: set OUT to the folder the results go to (OUT=/results scripts/gpu_check.sh)" >&2
        exit 2
    fi
fi
mkdir -p "$OUT" || { echo "gpu_check.sh: cannot create OUT=$OUT" >&2; exit 2; }
report="scripts/gpu_report.py"
[ -f "$report" ] || { echo "gpu_check.sh: run it from the repository root (no $report here)" >&2; exit 2; }

fail() {  # a problem that stops the whole check: said on stderr and in $OUT/summary.md
    echo "gpu_check.sh: $*" >&2
    printf '# GPU check did not run\n\n%s\n' "$*" > "$OUT/summary.md"
    exit 2
}

here_flag=--here
[ "$dry_run" = 1 ] && here_flag=
"$python" "$report" validate "$payload" $here_flag || fail "the payload $payload is not usable (see above)"
bundles=$("$python" "$report" list "$payload" bundles) || fail "cannot list the bundles of $payload"
candidates=$("$python" "$report" list "$payload" candidates) || fail "cannot list the candidates of $payload"
runtime=$(cd "$payload/runtime" && pwd) || fail "no runtime pack in $payload"

if [ "$dry_run" = 1 ]; then
    echo "dry run: the payload is valid; on the GPU machine this script would run:"
    echo "  $python $report check-gpu $payload"
    for path in $bundles; do
        name=$(basename "$path")
        echo "  PYTHONPATH=$runtime timeout $bundle_timeout_s $python $payload/$path/run.py --json $OUT/$name.json"
    done
    for path in $candidates; do
        name=$(basename "$path")
        echo "  PYTHONPATH=$runtime timeout $candidates_timeout_s $python $payload/$path/measure.py" \
            "--out $OUT/measured-$name.json"
    done
    echo "  $python $report summarize $payload $OUT"
    exit 0
fi

started=$(date +%s)
# Every run's files are written to a work folder first: the device tool brings back at most 8 files from $OUT,
# so $OUT ends with summary.md, gpu_check.json, the measured-*.json files and details.tar.gz (all the rest).
work=$(mktemp -d) || fail "cannot create a work folder"
"$python" "$report" check-gpu "$payload" > "$work/gpu.txt" 2>&1 || fail "$(cat "$work/gpu.txt")"
cat "$work/gpu.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$work/gpu.txt" 2>&1 || true

status=0
for path in $bundles; do
    name=$(basename "$path")
    begin=$(date +%s)
    PYTHONPATH="$runtime${PYTHONPATH:+:$PYTHONPATH}" timeout "$bundle_timeout_s" \
        "$python" "$payload/$path/run.py" --json "$work/$name.json" > "$work/$name.log" 2>&1
    rc=$?
    echo "$rc" > "$work/$name.rc"
    [ "$rc" = 0 ] || status=1
    [ "$rc" = 124 ] && echo "timed out after $bundle_timeout_s s" >> "$work/$name.log"
    echo "bundle $name: exit status $rc after $(( $(date +%s) - begin )) s ($name.log)"
done
for path in $candidates; do
    name=$(basename "$path")
    begin=$(date +%s)
    PYTHONPATH="$runtime${PYTHONPATH:+:$PYTHONPATH}" timeout "$candidates_timeout_s" \
        "$python" "$payload/$path/measure.py" --out "$work/measured-$name.json" > "$work/measured-$name.log" 2>&1
    rc=$?
    [ "$rc" = 0 ] || status=1
    echo "candidates $name: exit status $rc after $(( $(date +%s) - begin )) s (measured-$name.log)"
done

"$python" "$report" summarize "$payload" "$work" > /dev/null || { echo "gpu_check.sh: the summary failed" >&2; status=1; }
for kept in "$work"/summary.md "$work"/gpu_check.json "$work"/measured-*.json; do
    [ -f "$kept" ] && mv "$kept" "$OUT/"
done
tar -czf "$OUT/details.tar.gz" -C "$work" . || status=1
rm -rf "$work"
cat "$OUT/summary.md" 2>/dev/null
echo "gpu_check.sh: $(( $(date +%s) - started )) s; results in $OUT (summary.md, gpu_check.json, measured-*.json; every log in details.tar.gz)"
exit "$status"
