# Two images, one per platform list:
#
#   docker build -t mongo-to-atlas .                             the Airflow image (the default, last stage)
#   docker build --target mongosync -t mongo-to-atlas-mongosync .   mongosync, run beside Airflow as a service
#
# The Airflow image is the official apache/airflow image, Debian 12 (bookworm). mongosync has no Debian build
# (its platform list: Ubuntu 20.04/22.04/24.04, RHEL 7-9, Amazon Linux 2/2023), and the DAGs only talk to it
# over its HTTP API (the mongosync connection), so it gets its own Ubuntu 24.04 image instead of being copied
# into a distribution it is not built for. docker/mongodb-download-url.sh picks each download for the
# platform being built and fails the build, naming the platforms that exist, where MongoDB has no build.
#
# Versions are build arguments; the defaults are the versions the tests and the README describe.
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11

# -------------------------------------------------------------------------------------------- mongosync
FROM ubuntu:24.04 AS mongosync
# 1.22: the release the contracts and the mongosync hook follow (ceaStage in /progress, the destination
# disk check at /start). x86_64 only: mongosync's one arm64 build is for Amazon Linux 2023.
ARG MONGOSYNC_VERSION=1.22.0
ARG MONGODB_DOWNLOADS=https://fastdl.mongodb.org
COPY docker/mongodb-download-url.sh /usr/local/bin/mongodb-download-url.sh
RUN set -eu; \
    url="$(MONGODB_DOWNLOADS="$MONGODB_DOWNLOADS" sh /usr/local/bin/mongodb-download-url.sh mongosync "$MONGOSYNC_VERSION")"; \
    apt-get update; apt-get install -y --no-install-recommends ca-certificates curl; \
    curl -fsSL -o /tmp/mongosync.tgz "$url"; \
    mkdir -p /opt/mongosync; tar -xzf /tmp/mongosync.tgz -C /opt/mongosync --strip-components=1; \
    ln -s /opt/mongosync/bin/mongosync /usr/local/bin/mongosync; \
    rm -f /tmp/mongosync.tgz; apt-get purge -y curl; apt-get autoremove -y; rm -rf /var/lib/apt/lists/*; \
    mongosync --version
USER ubuntu
# The API port the mongosync connection points at. Start it with the clusters and its write-blocking
# startup configuration (1.20+), e.g. `--config /etc/mongosync/mongosync.yaml`: see README "mongosync".
EXPOSE 27182
ENTRYPOINT ["mongosync"]

# ---------------------------------------------------------------------------------------------- Airflow
FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION} AS airflow
ARG AIRFLOW_VERSION
ARG PYTHON_VERSION
# 100.19.x: the newest Database Tools line that still dumps servers older than 4.2 and restores their dumps
# (100.20 dropped them), and migrations into Atlas often start from such servers; 100.12+ writes
# prelude.json, 100.16+ the 8.3+ time-series layout. Only when every source is 4.2 or newer, build with
# 100.20.x. "none" leaves the tools out (the built-in engine copies). Debian 12's build is x86_64 only.
ARG MONGODB_TOOLS_VERSION=100.19.0
ARG MONGODB_DOWNLOADS=https://fastdl.mongodb.org

USER root
COPY docker/mongodb-download-url.sh /usr/local/bin/mongodb-download-url.sh
RUN set -eu; \
    if [ "$MONGODB_TOOLS_VERSION" != none ]; then \
      url="$(MONGODB_DOWNLOADS="$MONGODB_DOWNLOADS" sh /usr/local/bin/mongodb-download-url.sh tools "$MONGODB_TOOLS_VERSION")"; \
      apt-get update; apt-get install -y --no-install-recommends ca-certificates curl; \
      curl -fsSL -o /tmp/tools.deb "$url"; \
      apt-get install -y --no-install-recommends /tmp/tools.deb; \
      rm -f /tmp/tools.deb; apt-get clean; rm -rf /var/lib/apt/lists/*; \
      mongodump --version; mongorestore --version; \
    fi

USER airflow
# Airflow's two-step installation: the providers with Airflow's constraints file for this Airflow and
# Python version (the reproducible set Airflow was released and tested with), then the project's pins
# without constraints but with apache-airflow pinned, so they can never move Airflow itself.
RUN pip install --no-cache-dir "apache-airflow[amazon,mongo]==${AIRFLOW_VERSION}" \
      --constraint "https://raw.githubusercontent.com/apache/airflow/constraints-${AIRFLOW_VERSION}/constraints-${PYTHON_VERSION}.txt"
COPY --chown=airflow:root requirements.txt /requirements.txt
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /requirements.txt

COPY --chown=airflow:root dags/ /opt/airflow/dags/
COPY --chown=airflow:root plugins/ /opt/airflow/plugins/
COPY --chown=airflow:root include/ /opt/airflow/include/
# The library as a distribution too: its apache_airflow_provider entry point registers the connection
# types (Admin > Connections), hooks and triggers. --no-deps: the steps above installed the pinned
# dependencies; the wheel is built from the same include/ tree that PYTHONPATH points at.
COPY --chown=airflow:root pyproject.toml README.md /tmp/mongo-to-atlas/
COPY --chown=airflow:root include/ /tmp/mongo-to-atlas/include/
RUN pip install --no-cache-dir --no-deps /tmp/mongo-to-atlas && rm -rf /tmp/mongo-to-atlas \
    && python -c "from importlib.metadata import version; print('mongo-to-atlas', version('mongo-to-atlas'))"
# The atlas_migration package (and the triggers the triggerer imports) live outside the DAG folder.
ENV PYTHONPATH=/opt/airflow/include \
    MIGRATION_WORK_DIR=/opt/airflow/migration-work
