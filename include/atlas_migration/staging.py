"""Optional S3 staging of dumps and reports, through the Amazon provider's ``S3Hook``.

With staging, a dump task uploads its namespace's files and the restore task (possibly on another worker)
downloads them, so workers need no shared disk. Keys mirror the local layout under
``s3://bucket/prefix/<dag_id>/<run_id>/``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from atlas_migration.engines.dump_layout import partial_path
from atlas_migration.errors import ConfigurationError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        if not uri.startswith("s3://"):
            raise ConfigurationError(f"not an S3 location: {uri!r} (expected s3://bucket/prefix)")
        bucket, _, prefix = uri[5:].partition("/")
        if not bucket:
            raise ConfigurationError(f"S3 location {uri!r} has no bucket")
        return cls(bucket, prefix.strip("/"))

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p and p.strip("/"))

    def uri(self, *parts: str) -> str:
        return f"s3://{self.bucket}/{self.key(*parts)}"


class Stager:
    """Moves files between a local run folder and its S3 mirror."""

    def __init__(self, location: S3Location, aws_conn_id: str, run_prefix: str) -> None:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        self.location = location
        self.run_prefix = run_prefix
        self.hook = S3Hook(aws_conn_id=aws_conn_id or "aws_default")

    def check_bucket(self) -> None:
        if not self.hook.check_for_bucket(self.location.bucket):
            raise ConfigurationError(
                f"S3 staging bucket '{self.location.bucket}' does not exist or is not reachable with the AWS connection"
            )

    def upload(self, local_root: Path, relative_paths: list[str]) -> list[str]:
        uris = []
        for rel in relative_paths:
            key = self.location.key(self.run_prefix, rel)
            self.hook.load_file(str(local_root / rel), key=key, bucket_name=self.location.bucket, replace=True)
            uris.append(f"s3://{self.location.bucket}/{key}")
        log.info("staged %d file(s) to %s", len(uris), self.location.uri(self.run_prefix))
        return uris

    def download(self, local_root: Path, relative_paths: list[str]) -> None:
        for rel in relative_paths:
            key = self.location.key(self.run_prefix, rel)
            destination = local_root / rel
            destination.parent.mkdir(parents=True, exist_ok=True)
            if not self.hook.check_for_key(key, bucket_name=self.location.bucket):
                raise ConfigurationError(f"staged file s3://{self.location.bucket}/{key} is missing")
            obj = self.hook.get_key(key, bucket_name=self.location.bucket)
            partial = partial_path(destination)  # not name + ".part": a dump file name may be 255 bytes already
            obj.download_file(str(partial))
            partial.replace(destination)
