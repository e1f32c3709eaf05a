# Shared setup of scripts/demo and scripts/test (sourced, not run): creates the
# virtualenv $VENV with $PYTHON and installs the project with $EXTRAS, and
# $DJANGO_SPEC (e.g. "django>=6") when given.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --disable-pip-version-check -e ".[${EXTRAS:-dev}]" ${DJANGO_SPEC:+"$DJANGO_SPEC"}
