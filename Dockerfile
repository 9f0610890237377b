# syntax=docker/dockerfile:1
# One image for every process of the production topology (README: Production topology):
#   dagster-webserver -h 0.0.0.0 -p 3000 -w workspace.yaml      (the default command)
#   dagster-daemon run -w workspace.yaml
#   oppsync webhooks serve --host 0.0.0.0 --port 8710
#   dagster code-server start -h 0.0.0.0 -p 4000 -m oppsync_pipeline.locations.syncs   (Helm user deployments)
#   run workers: started by the run launcher from this same image (DefaultRunLauncher in the daemon's
#   container, K8sRunLauncher as a Job, dagster-celery as a Celery worker)
# Nothing secret is in it: credentials, DAGSTER_PG_PASSWORD and oppsync.yaml come from the environment and
# mounted files at run time (.dockerignore keeps .env, secrets files and the local oppsync.yaml out).
#
#   docker build -t oppsync:0.1.0 .
#   docker build --build-arg EXTRA_PACKAGES="dagster-k8s==0.29.27" -t oppsync:0.1.0-k8s .       (Helm chart)
#   docker build --build-arg EXTRA_PACKAGES="dagster-celery[flower,redis]==0.29.27" -t oppsync:0.1.0-celery .
FROM python:3.11-slim

# Integrations the deployment's instance names (run launcher, executor); the versions pair with dagster 1.13.27.
ARG EXTRA_PACKAGES=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/home \
    GX_ANALYTICS_ENABLED=false \
    DBT_SEND_ANONYMOUS_USAGE_STATS=false \
    DO_NOT_TRACK=1

# Few glibc malloc arenas: a sync's read threads each kept one, fragmented (oppsync_pipeline/lib/memory.py).
ENV MALLOC_ARENA_MAX=2

RUN groupadd --system --gid 10001 oppsync \
    && useradd --system --uid 10001 --gid oppsync --home-dir /opt/oppsync --shell /usr/sbin/nologin oppsync

WORKDIR /opt/oppsync

# The exact set make install uses (constraints.txt); psycopg2-binary, duckdb and the rest ship manylinux wheels,
# so the slim base needs no compiler.
COPY pyproject.toml constraints.txt README.md ./
COPY oppsync_pipeline ./oppsync_pipeline
# hadolint ignore=DL3013
RUN pip install -c constraints.txt . ${EXTRA_PACKAGES}

COPY dbt ./dbt
COPY workspace.yaml ./
COPY deploy/postgres/dagster.yaml ${DAGSTER_HOME}/dagster.yaml

# The dbt project is found beside the package (lib/dbt_env.py: DBT_PROJECT_DIR = <source root>/dbt), so the
# processes import the package from this source tree, not from site-packages (where the install above put a
# copy with no dbt/ beside it). workspace.yaml's `working_directory: .` is this folder too.
ENV PYTHONPATH=/opt/oppsync

# dbt's manifest is a build artefact (defs/mart/assets.py parses only when it is missing or stale): parse it
# here against the production target. Parsing renders the profile but opens no connection.
RUN OPPSYNC_PG_HOST=parse-only OPPSYNC_PG_PORT=5432 OPPSYNC_PG_USER=parse-only OPPSYNC_PG_DBNAME=parse-only \
    dbt parse --project-dir dbt --profiles-dir dbt --target postgres \
    && rm -rf dbt/logs \
    && chown -R oppsync:oppsync dbt "${DAGSTER_HOME}"

USER 10001:10001

# webserver, receiver, code server
EXPOSE 3000 8710 4000

CMD ["dagster-webserver", "-h", "0.0.0.0", "-p", "3000", "-w", "workspace.yaml"]
