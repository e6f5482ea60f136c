# Airflow image for the mongo_to_atlas DAGs: the official Airflow 3.3 image, the project's Python
# requirements, the MongoDB Database Tools (mongodump/mongorestore) and mongosync, both from MongoDB's
# official distribution. Versions are build arguments: pick current releases when you build.
FROM apache/airflow:3.3.2-python3.11

# 100.19.x: the newest Database Tools line that still dumps servers older than 4.2 and restores their dumps
# (100.20 dropped them); 100.12+ writes prelude.json, 100.16+ the 8.3+ time-series layout. See README "Dumps".
ARG MONGODB_TOOLS_VERSION=100.19.0
ARG MONGOSYNC_VERSION=1.15.0
ARG MONGODB_DOWNLOADS=https://fastdl.mongodb.org

USER root
RUN set -eux; \
    arch="$(dpkg --print-architecture)"; \
    case "$arch" in amd64) tools_arch=x86_64; sync_arch=x86_64 ;; arm64) tools_arch=arm64; sync_arch=arm64 ;; \
      *) echo "unsupported architecture $arch" >&2; exit 1 ;; esac; \
    apt-get update; apt-get install -y --no-install-recommends curl ca-certificates; \
    curl -fsSL -o /tmp/tools.deb \
      "${MONGODB_DOWNLOADS}/tools/db/mongodb-database-tools-debian12-${tools_arch}-${MONGODB_TOOLS_VERSION}.deb"; \
    apt-get install -y --no-install-recommends /tmp/tools.deb; \
    curl -fsSL -o /tmp/mongosync.tgz \
      "${MONGODB_DOWNLOADS}/tools/mongosync/mongosync-ubuntu2204-${sync_arch}-${MONGOSYNC_VERSION}.tgz"; \
    mkdir -p /opt/mongosync && tar -xzf /tmp/mongosync.tgz -C /opt/mongosync --strip-components=1; \
    ln -s /opt/mongosync/bin/mongosync /usr/local/bin/mongosync; \
    rm -f /tmp/tools.deb /tmp/mongosync.tgz; apt-get clean; rm -rf /var/lib/apt/lists/*; \
    mongodump --version; mongorestore --version; mongosync --version

USER airflow
COPY --chown=airflow:root requirements.txt /requirements.txt
RUN pip install --no-cache-dir -r /requirements.txt

COPY --chown=airflow:root dags/ /opt/airflow/dags/
COPY --chown=airflow:root plugins/ /opt/airflow/plugins/
COPY --chown=airflow:root include/ /opt/airflow/include/
# The library as a distribution too: its apache_airflow_provider entry point registers the connection
# types (Admin > Connections), hooks and triggers. --no-deps: requirements.txt above installed the pinned
# dependencies; the wheel is built from the same include/ tree that PYTHONPATH points at.
COPY --chown=airflow:root pyproject.toml README.md /tmp/mongo-to-atlas/
COPY --chown=airflow:root include/ /tmp/mongo-to-atlas/include/
RUN pip install --no-cache-dir --no-deps /tmp/mongo-to-atlas && rm -rf /tmp/mongo-to-atlas \
    && python -c "from importlib.metadata import version; print('mongo-to-atlas', version('mongo-to-atlas'))"
# The atlas_migration package (and the triggers the triggerer imports) live outside the DAG folder.
ENV PYTHONPATH=/opt/airflow/include \
    MIGRATION_WORK_DIR=/opt/airflow/migration-work
