#!/usr/bin/env bash
# Serve one app config with `serve run`, wait until it answers, sweep request rates against it
# with `python -m pdray.bench.serve`, then shut it down.
#
#   bash examples/serve_benchmark.sh CONFIG.yaml OUTDIR LABEL [more pdray.bench.serve flags]
#
# Used for docs/benchmarks.md with examples/serve_1p1d.yaml and examples/serve_mixed.yaml.
set -euo pipefail
config=$1 out=$2 label=$3
shift 3
mkdir -p "$out"
python -m ray.serve.scripts run "$config" >"$out/$label-serve.log" 2>&1 &
server=$!
stop() {
    python -m ray.serve.scripts shutdown -y >/dev/null 2>&1 || true
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    python -m ray.scripts.scripts stop --force >/dev/null 2>&1 || true
}
trap stop EXIT
for _ in $(seq 600); do
    if python - <<'PY' 2>/dev/null; then break; fi
import sys, urllib.request
sys.exit(0 if urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=2).status == 200 else 1)
PY
    if ! kill -0 "$server" 2>/dev/null; then
        echo "serve run exited; see $out/$label-serve.log" >&2
        tail -30 "$out/$label-serve.log" >&2
        exit 1
    fi
    sleep 1
done
python -m pdray.bench.serve --base-url http://127.0.0.1:8000 --label "$label" \
    --save-result --result-dir "$out" --result-filename "$label.json" "$@"
