#!/usr/bin/env bash
# Build invtract's wheel, install it into a fresh virtualenv (system site-packages visible, so
# torch and the other dependencies are not downloaded again), check that the wheel and not the
# checkout is what runs, then run `invtract fit --example` and a two-trial `invtract calibrate`
# from an empty folder outside the checkout.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python -m pip wheel -q --no-deps --no-build-isolation -w "$tmp/dist" "$repo"
python -m venv --system-site-packages "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q "$tmp"/dist/invtract-*.whl
cd "$tmp"
mkdir work && cd work
where="$(env -u PYTHONPATH "$tmp/venv/bin/python" -c 'import invtract; print(invtract.__file__)')"
case "$where" in
  "$tmp/venv/"*) echo "wheel check: invtract imported from $where" ;;
  *) echo "error: the venv imports invtract from $where, not from the wheel" >&2; exit 1 ;;
esac
run() { env -u PYTHONPATH "$tmp/venv/bin/invtract" "$@"; }
run --version
run fit --example --run "$tmp/work/runs/example" --no-tensorboard
test -s runs/example/result.json
data="$(env -u PYTHONPATH "$tmp/venv/bin/python" -c \
  'from invtract.data import example_path as p; print(p("fod"), p("target"), p("target_seeds"))')"
read -r fod target seeds <<<"$data"
run calibrate --target "$target" --target-seeds "$seeds" --fod "$fod" --trials 2 --seed 1 \
  --run "$tmp/work/runs/calibrate" --no-tensorboard
test -s runs/calibrate/best.json
echo "wheel check: ok"
