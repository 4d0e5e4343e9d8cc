#!/usr/bin/env bash
# The supported-transformers matrix: the quick test subset (pytest -m "not slow") under each transformers
# version, each in its own venv over this environment's packages (--system-site-packages: the same torch,
# peft, huggingface_hub; only transformers differs). Prints one summary line per version and writes them
# to compat-results.txt (the "Supported transformers versions" table of docs/from-the-authors-code.md comes from it).
#
#   bash scripts/compat.sh                    # the matrix: 5.10.4 (veRL 0.9.1: <5.11), 5.15.0 (OpenRLHF 0.11.2),
#                                             # 5.20.0 (first native Molmo2), 5.25.0 (newest)
#   bash scripts/compat.sh 5.15.0             # one version (CI runs this one)
#   COMPAT_VENVS=DIR COMPAT_TESTS="tests/model/test_x.py" bash scripts/compat.sh ...
#
# Exits non-zero when a version's run fails. The venvs are kept under COMPAT_VENVS (default /tmp/mrrm-compat).
set -uo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
[ ${#versions[@]} -eq 0 ] && versions=(5.10.4 5.15.0 5.20.0 5.25.0)
root=${COMPAT_VENVS:-/tmp/mrrm-compat}
tests=${COMPAT_TESTS:-tests}
results=compat-results.txt
: > "$results"
status=0
for v in "${versions[@]}"; do
  env="$root/$v"
  if [ ! -x "$env/bin/python" ]; then
    python -m venv --system-site-packages "$env" || { echo "$v: venv failed" | tee -a "$results"; status=1; continue; }
  fi
  extra=()
  # transformers < 5.11 imports Hugging Face's `kernels` when installed, with an API that kernels >= 0.13
  # removed (this environment has a newer one, for transformers >= 5.25): pin an older one in the venv
  if "$env/bin/python" -c "import sys; from packaging.version import Version as V; sys.exit(0 if V('$v') < V('5.11') else 1)"; then
    extra=("kernels<0.13")
  fi
  if ! "$env/bin/pip" install -q "transformers==$v" "${extra[@]}" > "$env/install.log" 2>&1; then
    echo "$v: install failed (see $env/install.log)" | tee -a "$results"; status=1; continue
  fi
  log="$env/pytest.log"
  start=$(date +%s)
  PYTHONPATH="$PWD" "$env/bin/python" -m pytest $tests -m "not slow" -q -rfEs -p no:cacheprovider > "$log" 2>&1
  rc=$?
  line=$(grep -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed)" "$log" | tail -1 | tr -d '=' | sed 's/^ *//')
  echo "transformers $v: ${line:-no summary (see $log)} [$(( $(date +%s) - start )) s]" | tee -a "$results"
  [ $rc -eq 0 ] || { grep -E "^(FAILED|ERROR) " "$log" | head -20; status=1; }
done
exit $status
