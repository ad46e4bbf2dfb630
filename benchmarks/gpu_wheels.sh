#!/usr/bin/env bash
# The wheels gpu_session.sh carries to a lent GPU machine: the packages the tests and benchmarks need that its image
# lacks (the device tool's KINDS.md lists the image), at the versions installed here, for its Python 3.12.
# Run once in the repository root: bash benchmarks/gpu_wheels.sh  (writes .whl/, kept out of git).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
missing="monai pytorch-ignite nibabel fire termcolor torchattacks mlflow-skinny sqlalchemy alembic mako cachetools
databricks-sdk fastapi gitpython gitdb smmap google-auth pyasn1 pyasn1-modules importlib-metadata opentelemetry-api
opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions python-dotenv python-multipart sqlparse starlette
uvicorn pydantic pydantic-core annotated-types typing-inspection lazy-importer cryptography cffi pycparser"
pattern="^($(echo $missing | tr ' ' '|'))=="
rm -rf .whl
python3 -m pip freeze | sed 's/_/-/g' | grep -i -E "$pattern" | while read -r spec; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$spec"
done
ls .whl | wc -l
du -sh .whl
