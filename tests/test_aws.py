"""EC2 lookup of source hosts through the Amazon provider, against moto in server mode."""

from __future__ import annotations

import pytest

from atlas_migration.aws import ec2_host_lookup

pytestmark = pytest.mark.integration


_NEXT_SUBNET = iter(range(1, 250))


@pytest.fixture
def ec2_instance(aws_conn) -> dict:
    """A fresh VPC, subnet and instance (moto keeps state for the whole session: never reuse addresses)."""
    import boto3

    from tests.conftest import _aws_client_kwargs

    ec2 = boto3.client("ec2", **_aws_client_kwargs())
    n = next(_NEXT_SUBNET)
    vpc = ec2.create_vpc(CidrBlock=f"10.{n}.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.{n}.1.0/24")["Subnet"]["SubnetId"]
    image = ec2.describe_images()["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.micro", SubnetId=subnet,
                                 PrivateIpAddress=f"10.{n}.1.17")["Instances"][0]
    return {"id": instance["InstanceId"], "vpc": vpc, "dns": instance["PrivateDnsName"], "ip": f"10.{n}.1.17"}


def test_private_ip_matches_an_instance(ec2_instance):
    evidence = ec2_host_lookup("aws_test")([f"{ec2_instance['ip']}:27017"])
    assert evidence and ec2_instance["id"] in evidence and ec2_instance["vpc"] in evidence
    assert "eu-west-1" in evidence


def test_private_dns_name_matches(ec2_instance):
    assert ec2_instance["id"] in (ec2_host_lookup("aws_test")([f"{ec2_instance['dns']}:27017"]) or "")


def test_unknown_host_is_not_on_aws(ec2_instance):
    assert ec2_host_lookup("aws_test")(["10.251.0.1:27017", "db.example.org:27017"]) is None


def test_aws_errors_do_not_crash_inspection(monkeypatch, caplog):
    monkeypatch.setenv("AIRFLOW_CONN_AWS_BROKEN", '{"conn_type": "aws", "login": "AKIAX", "password": "s3cr3t-v4lue",'
                       ' "extra": {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-1"}}')
    assert ec2_host_lookup("aws_broken")(["10.20.1.17:27017"]) is None
    assert "EC2 lookup with connection 'aws_broken' failed" in caplog.text
    assert "s3cr3t-v4lue" not in caplog.text
