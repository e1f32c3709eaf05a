#!/usr/bin/env bash
# Build the wheel and sdist, check their metadata, install the wheel in a fresh
# virtualenv and run the test project's system checks against the installed copy
# (from a directory without the source tree, so nothing is imported from it).
# Called by scripts/test in one lane, inside that lane's virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
python -m twine check --strict "$work"/dist/*
python -m venv "$work/venv"
wheel=$(ls "$work"/dist/*.whl)
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel[all]" ${DJANGO_SPEC:+"$DJANGO_SPEC"}
cp -r manage.py testproject "$work/"
(cd "$work" && venv/bin/python -c "import django_eventbus, sys; assert 'site-packages' in django_eventbus.__file__, django_eventbus.__file__; print('installed', django_eventbus.__version__)" \
  && venv/bin/python manage.py check)
