"""Where a source runs on AWS: match its host names / IPs to EC2 instances (Amazon provider's EC2Hook)."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable

from atlas_migration.redaction import redact

log = logging.getLogger(__name__)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def ec2_host_lookup(aws_conn_id: str) -> Callable[[list[str]], str | None]:
    """A lookup for ``inspect_source``: returns evidence text when a host is an EC2 instance, else None.
    AWS errors are logged and treated as 'not found' (inspection never crashes on an optional probe)."""

    def lookup(hosts: list[str]) -> str | None:
        from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook

        names = [h.rsplit(":", 1)[0] for h in hosts]
        ips = [n for n in names if _is_ip(n)]
        dns = [n for n in names if not _is_ip(n)]
        filters = [("private-ip-address", ips), ("ip-address", ips), ("private-dns-name", dns), ("dns-name", dns)]
        try:
            hook = EC2Hook(aws_conn_id=aws_conn_id, api_type="client_type")
            region = hook.conn.meta.region_name
            for name, values in filters:
                if not values:
                    continue
                reply = hook.conn.describe_instances(Filters=[{"Name": name, "Values": values}])
                for reservation in reply.get("Reservations", []):
                    for instance in reservation.get("Instances", []):
                        return (f"EC2 instance {instance['InstanceId']} in {region} "
                                f"(VPC {instance.get('VpcId', '?')}) matches {name} {', '.join(values)}")
        except Exception as exc:  # botocore errors, missing credentials, unreachable endpoint
            log.warning("EC2 lookup with connection '%s' failed: %s", aws_conn_id, redact(str(exc)))
        return None

    return lookup
