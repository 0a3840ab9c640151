# The image of the Docker work pool (prefect.yaml: nightly-docker; README: Work pools): the
# project, its pinned dependencies and a git checkout that flow runs start in. Build it from a
# clean, committed checkout of main, so lineage records a real commit and `champion` may move:
#   docker build -t genpipe:latest .
# Not built by the test suite (it needs a Docker daemon); tests/test_workpool.py checks that
# the deployment's job variables are ones a docker pool accepts.
FROM python:3.11-slim

# git: DVC and lineage read the checkout's commit.
RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/genpipe
# Dependencies first, so a code change does not reinstall them. On a CPU-only host add
# `--extra-index-url https://download.pytorch.org/whl/cpu` for the much smaller torch wheel.
COPY pyproject.toml requirements.lock README.md ./
RUN mkdir -p src/genpipe && touch src/genpipe/__init__.py \
    && pip install --no-cache-dir -c requirements.lock -e . \
    && rm -rf src
COPY . .

# data/raw as data.dvc records it: pulled from the DVC remote in .dvc/config, or exported
# from the bundled digits for the default preset.
RUN genpipe data ensure

# prefect.yaml's pull step starts every flow run here.
ENV GENPIPE_CHECKOUT=/opt/genpipe \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1
