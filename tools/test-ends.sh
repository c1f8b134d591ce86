#!/usr/bin/env bash
# One end of the supported transformers range in its own virtual environment, then its tests.
#   bash tools/test-ends.sh newest   # .venv: the newest transformers<6 pip resolves; the whole suite
#   bash tools/test-ends.sh oldest   # .venv-oldest: transformers==5.17.*; the transformers-facing tests
set -euo pipefail
cd "$(dirname "$0")/.."
end="${1:?usage: tools/test-ends.sh newest|oldest}"
export TOKENIZERS_PARALLELISM=false
extras=".[test,triton-interpreter,serve]"
case "$end" in
  newest) venv=.venv; pins=() ;;
  oldest) venv=.venv-oldest; pins=("transformers==5.17.*") ;;
  *) echo "tools/test-ends.sh: unknown end '$end' (newest|oldest)" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q torch==2.13.0
pip install -q -e "$extras" "${pins[@]}"
python -c "import sys, transformers, torch; print(f'== {sys.argv[1]} end: transformers {transformers.__version__}, torch {torch.__version__}')" "$end"
if [ "$end" = newest ]; then
  python -m pytest
else
  # shellcheck disable=SC2046
  python -m pytest $(grep -v '^#' tests/transformers_facing.txt)
fi
