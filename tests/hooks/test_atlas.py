"""The Atlas / Cloud Manager hooks against the local stand-in (``devtools.atlas_api_server``).

The server runs in-thread on a free port; state machines are driven by jumping its simulated clock, so the
whole file needs no real waiting except the one ``Retry-After`` second it checks is honoured.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from requests.auth import HTTPDigestAuth

from atlas_migration.errors import ConfigurationError, MigrationError
from atlas_migration.hooks.atlas import (
    API_VERSIONS,
    AtlasAdminHook,
    AtlasApiError,
    CloudManagerHook,
    LiveMigrationDestination,
    LiveMigrationRequest,
    LiveMigrationSource,
    RetryPolicy,
)
from devtools.atlas_api_server import CUTOVER_WINDOW_SECONDS, AtlasApiServer, DeploymentSpec, Scenario

PUBLIC_KEY = "pubkey-q7Hc2"
PRIVATE_KEY = "priv-9f3e-Zq!x7-secret"
CM_PUBLIC_KEY = "cm-pubkey-81"
CM_PRIVATE_KEY = "cm-priv-44Ab-secret"
CLIENT_ID = "mdb_sa_id_5f1d7f3a2b4c"
CLIENT_SECRET = "mdb_sa_sk_Xy7-very-secret"
SECRETS = (PRIVATE_KEY, CM_PRIVATE_KEY, CLIENT_SECRET)
FAST_RETRY = RetryPolicy(max_retries=3, backoff_base=0.01, backoff_max=0.05)
MIGRATION_HOST = "migration-host-0.example.net"

# Independent copy of the contract's version table: the hooks must send exactly these.
CONTRACT_VERSIONS = {
    ("POST", r"/orgs/\w+/liveMigrations/linkTokens$"): "2023-01-01",
    ("DELETE", r"/orgs/\w+/liveMigrations/linkTokens$"): "2023-01-01",
    ("GET", r"/orgs/\w+/liveMigrations/availableProjects$"): "2023-01-01",
    ("POST", r"/groups/\w+/liveMigrations/validate$"): "2024-05-30",
    ("GET", r"/groups/\w+/liveMigrations/validate/\w+$"): "2023-01-01",
    ("POST", r"/groups/\w+/liveMigrations$"): "2024-05-30",
    ("GET", r"/groups/\w+/liveMigrations/(?!validate)\w+$"): "2023-01-01",
    ("PUT", r"/groups/\w+/liveMigrations/\w+/cutover$"): "2023-01-01",
}


def scenario(**overrides) -> Scenario:
    base = Scenario(api_keys={PUBLIC_KEY: PRIVATE_KEY}, cloud_manager_api_keys={CM_PUBLIC_KEY: CM_PRIVATE_KEY},
                    service_accounts={CLIENT_ID: CLIENT_SECRET})
    base.update(overrides)
    return base


@pytest.fixture
def server() -> Iterator[AtlasApiServer]:
    with AtlasApiServer(scenario()) as srv:
        yield srv


def set_conn(monkeypatch, conn_id: str, value: dict) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(value))


def atlas_conn(server: AtlasApiServer, **extra) -> dict:
    s = server.scenario
    return {"conn_type": "mongodb_atlas", "host": server.url, "login": PUBLIC_KEY, "password": PRIVATE_KEY,
            "extra": {"org_id": s.atlas_org_id, "project_id": s.atlas_project_id, **extra}}


@pytest.fixture
def atlas(server, monkeypatch) -> AtlasAdminHook:
    set_conn(monkeypatch, "atlas_test", atlas_conn(server))
    return AtlasAdminHook("atlas_test", retry=FAST_RETRY)


@pytest.fixture
def oauth_atlas(server, monkeypatch) -> AtlasAdminHook:
    s = server.scenario
    set_conn(monkeypatch, "atlas_sa", {"conn_type": "mongodb_atlas", "host": server.url, "extra": {
        "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
        "org_id": s.atlas_org_id, "project_id": s.atlas_project_id}})
    return AtlasAdminHook("atlas_sa", retry=FAST_RETRY)


@pytest.fixture
def cloud_manager(server, monkeypatch) -> CloudManagerHook:
    set_conn(monkeypatch, "cm_test", {"conn_type": "mongodb_cloud_manager", "host": server.url,
                                      "login": CM_PUBLIC_KEY, "password": CM_PRIVATE_KEY,
                                      "extra": {"org_id": server.scenario.cloud_manager_org_id}})
    return CloudManagerHook("cm_test", retry=FAST_RETRY)


def migration_request(server: AtlasApiServer, cluster: str = "rs0") -> LiveMigrationRequest:
    s = server.scenario
    return LiveMigrationRequest(
        source=LiveMigrationSource(cluster, s.source_projects[0].project_id, managed_authentication=True),
        destination=LiveMigrationDestination("Cluster0", s.atlas_project_id),
        migration_host=MIGRATION_HOST,
    )


def link_organizations(server: AtlasApiServer, atlas: AtlasAdminHook, cloud_manager: CloudManagerHook) -> str:
    token = atlas.create_link_token(["10.0.0.0/24"])
    assert cloud_manager.create_migration_link(token) == {"status": "NOT_SYNCED"}
    server.advance(server.scenario.link_sync_seconds)
    assert cloud_manager.get_migration_link_status() == "SYNCED"
    return token


def assert_no_secret(text: str, extra: tuple[str, ...] = ()) -> None:
    for secret in (*SECRETS, *extra):
        assert secret not in text, f"a secret leaked into: {text[:200]}"


# ---- authentication --------------------------------------------------------------------------------


def test_digest_auth_and_versioned_accept(server, atlas):
    cluster = atlas.get_cluster("Cluster0")
    assert cluster["name"] == "Cluster0"
    assert cluster["connectionStrings"]["standardSrv"].startswith("mongodb+srv://")
    assert cluster["replicationSpecs"][0]["regionConfigs"][0]["regionName"] == "US_EAST_1"
    log = server.requests("/clusters/Cluster0")
    # RFC 7616 round trip: an unauthenticated request, the challenge, the answered request.
    assert [(r["auth"], r["status"]) for r in log] == [(None, 401), ("Digest", 200)]
    assert log[-1]["accept"] == "application/vnd.atlas.2024-08-05+json"
    atlas.get_cluster("Cluster0")  # later calls reuse the nonce (nc incremented): no second challenge
    assert [r["status"] for r in server.requests("/clusters/Cluster0")] == [401, 200, 200]


def test_digest_sha256_and_stale_nonce(monkeypatch):
    with AtlasApiServer(scenario(digest_algorithms=["SHA-256"], nonce_ttl_seconds=0.2)) as srv:
        set_conn(monkeypatch, "atlas_sha", atlas_conn(srv))
        hook = AtlasAdminHook("atlas_sha", retry=FAST_RETRY)
        assert hook.get_cluster("Cluster0")["name"] == "Cluster0"
        time.sleep(0.3)  # the nonce expires: the server answers stale=true and the client re-authenticates
        assert hook.get_cluster("Cluster0")["name"] == "Cluster0"
        assert [r["status"] for r in srv.requests("/clusters/")] == [401, 200, 401, 200]


def test_digest_replay_refused(server):
    url = f"{server.url}/api/atlas/v2/groups/{server.scenario.atlas_project_id}/clusters/Cluster0"
    headers = {"Accept": "application/vnd.atlas.2024-08-05+json"}
    first = requests.get(url, auth=HTTPDigestAuth(PUBLIC_KEY, PRIVATE_KEY), headers=headers, timeout=5)
    assert first.status_code == 200
    replay = requests.get(url, headers={**headers, "Authorization": first.request.headers["Authorization"]},
                          timeout=5)
    assert replay.status_code == 401 and replay.json()["errorCode"] == "UNAUTHORIZED"


def test_bad_credentials(server, monkeypatch):
    set_conn(monkeypatch, "atlas_bad", {**atlas_conn(server), "password": PRIVATE_KEY + "-wrong"})
    hook = AtlasAdminHook("atlas_bad", retry=FAST_RETRY)
    with pytest.raises(AtlasApiError) as excinfo:
        hook.get_cluster("Cluster0")
    err = excinfo.value
    assert err.status == 401 and err.error_code == "UNAUTHORIZED"
    assert "UNAUTHORIZED" in str(err) and "HTTP 401" in str(err)
    assert_no_secret(str(err) + repr(err) + repr(hook), (PRIVATE_KEY + "-wrong", PUBLIC_KEY))
    assert isinstance(err, MigrationError)


def test_oauth_token_fetched_once_and_reused(server, oauth_atlas):
    for _ in range(3):
        oauth_atlas.get_cluster("Cluster0")
    oauth_atlas.list_available_projects()
    assert len(server.requests("/api/oauth/token")) == 1
    api_calls = server.requests("/api/atlas/v2/")
    assert len(api_calls) == 4 and all(r["auth"] == "Bearer" and r["status"] == 200 for r in api_calls)


def test_oauth_token_refreshed_before_expiry(server, oauth_atlas):
    now = [1000.0]
    oauth_atlas.clock = lambda: now[0]
    oauth_atlas.get_cluster("Cluster0")
    oauth_atlas.get_cluster("Cluster0")
    assert len(server.requests("/api/oauth/token")) == 1
    now[0] += 3600 - 30  # inside the refresh margin, still before the server's expiry
    server.advance(3600 - 30)
    oauth_atlas.get_cluster("Cluster0")
    assert len(server.requests("/api/oauth/token")) == 2
    # refreshed proactively: Atlas never saw the old token after it had expired
    assert all(r["status"] == 200 for r in server.requests("/api/atlas/v2/"))


def test_oauth_expired_token_refused_then_refetched(server, oauth_atlas):
    oauth_atlas.get_cluster("Cluster0")
    server.advance(3601)  # the server's clock passes expiry; the client's cache does not know yet
    oauth_atlas.get_cluster("Cluster0")
    statuses = [r["status"] for r in server.requests("/api/atlas/v2/")]
    assert statuses == [200, 401, 200]
    assert len(server.requests("/api/oauth/token")) == 2


def test_oauth_bad_client_secret(server, monkeypatch):
    s = server.scenario
    set_conn(monkeypatch, "atlas_sa_bad", {"conn_type": "mongodb_atlas", "host": server.url, "extra": {
        "client_id": CLIENT_ID, "client_secret": "wrong-" + CLIENT_SECRET, "project_id": s.atlas_project_id}})
    with pytest.raises(AtlasApiError) as excinfo:
        AtlasAdminHook("atlas_sa_bad", retry=FAST_RETRY).get_cluster("Cluster0")
    assert excinfo.value.status == 401 and excinfo.value.path == "/api/oauth/token"
    assert_no_secret(str(excinfo.value), ("wrong-" + CLIENT_SECRET,))


def test_token_endpoint_contract(server):
    reply = requests.post(f"{server.url}/api/oauth/token", auth=(CLIENT_ID, CLIENT_SECRET),
                          data={"grant_type": "client_credentials"}, timeout=5)
    assert reply.status_code == 200
    body = reply.json()
    assert body["expires_in"] == 3600 and body["token_type"] == "Bearer" and body["access_token"]
    wrong_grant = requests.post(f"{server.url}/api/oauth/token", auth=(CLIENT_ID, CLIENT_SECRET),
                                data={"grant_type": "password"}, timeout=5)
    assert wrong_grant.status_code == 400


# ---- versions, errors, retries ---------------------------------------------------------------------


def test_wrong_or_missing_accept_version_refused(server, atlas, monkeypatch):
    monkeypatch.setitem(API_VERSIONS, "get_cluster", "2024-05-30")  # a version this endpoint never had
    with pytest.raises(AtlasApiError) as excinfo:
        atlas.get_cluster("Cluster0")
    assert (excinfo.value.status, excinfo.value.error_code) == (406, "INVALID_VERSION_DATE")
    monkeypatch.setitem(API_VERSIONS, "get_cluster", "2023-02-01")  # a retired one
    with pytest.raises(AtlasApiError) as excinfo:
        atlas.get_cluster("Cluster0")
    assert (excinfo.value.status, excinfo.value.error_code) == (410, "VERSION_GONE")
    plain = requests.get(f"{server.url}/api/atlas/v2/orgs/{server.scenario.atlas_org_id}/liveMigrations/"
                         "availableProjects", auth=HTTPDigestAuth(PUBLIC_KEY, PRIVATE_KEY),
                         headers={"Accept": "application/json"}, timeout=5)
    assert plain.status_code == 406 and plain.json()["errorCode"] == "INVALID_VERSION_DATE"
    assert set(plain.json()) == {"error", "errorCode", "detail", "reason", "parameters"}


def test_429_retry_after_honoured(server, atlas):
    server.add_fault(429, retry_after=1, method="GET", path_regex="/clusters/")
    start = time.monotonic()
    assert atlas.get_cluster("Cluster0")["name"] == "Cluster0"
    assert time.monotonic() - start >= 1.0
    assert [r["status"] for r in server.requests("/clusters/") if r["auth"]] == [429, 200]


def test_429_with_long_retry_after_is_raised_not_slept(server, atlas):
    server.add_fault(429, retry_after=3600, method="GET")
    start = time.monotonic()
    with pytest.raises(AtlasApiError) as excinfo:
        atlas.get_cluster("Cluster0")
    assert time.monotonic() - start < 1
    assert excinfo.value.error_code == "RATE_LIMITED_TOKEN_BUCKET" and excinfo.value.retry_after == 3600


def test_token_bucket_rate_limit(monkeypatch):
    with AtlasApiServer(scenario(rate_limit_capacity=2, rate_limit_refill_per_second=20)) as srv:
        set_conn(monkeypatch, "atlas_rl", atlas_conn(srv))
        hook = AtlasAdminHook("atlas_rl", retry=FAST_RETRY)
        for _ in range(4):
            hook.get_cluster("Cluster0")
        limited = [r for r in srv.requests("/clusters/") if r["status"] == 429]
        assert limited, "the bucket of 2 should have run dry within 4 back-to-back calls"
        raw = requests.get(f"{srv.url}/api/atlas/v2/groups/{srv.scenario.atlas_project_id}/clusters/Cluster0",
                           auth=HTTPDigestAuth(PUBLIC_KEY, PRIVATE_KEY), timeout=5,
                           headers={"Accept": "application/vnd.atlas.2024-08-05+json"})
        srv.update_scenario(rate_limit_capacity=1, rate_limit_refill_per_second=0.01)
        for _ in range(2):
            raw = requests.get(raw.url, auth=HTTPDigestAuth(PUBLIC_KEY, PRIVATE_KEY), timeout=5,
                               headers={"Accept": "application/vnd.atlas.2024-08-05+json"})
        assert raw.status_code == 429 and raw.json()["errorCode"] == "RATE_LIMITED_TOKEN_BUCKET"
        assert int(raw.headers["Retry-After"]) >= 1


def test_500_then_success_and_bounded(server, atlas):
    server.add_fault(500, count=2, method="GET")
    assert atlas.get_cluster("Cluster0")["name"] == "Cluster0"
    assert [r["status"] for r in server.requests("/clusters/") if r["auth"]] == [500, 500, 200]
    server.add_fault(500, count=10, method="GET")
    with pytest.raises(AtlasApiError) as excinfo:
        atlas.get_cluster("Cluster0")
    assert (excinfo.value.status, excinfo.value.error_code) == (500, "UNEXPECTED_ERROR")
    assert len([r for r in server.requests("/clusters/") if r["status"] == 500]) == 2 + FAST_RETRY.max_retries + 1


def test_post_not_repeated_after_500_but_after_503(server, atlas):
    server.add_fault(500, method="POST", path_regex="linkTokens")
    with pytest.raises(AtlasApiError) as excinfo:
        atlas.create_link_token()
    assert excinfo.value.status == 500
    assert len([r for r in server.requests("linkTokens") if r["auth"]]) == 1
    server.add_fault(503, method="POST", path_regex="linkTokens")
    assert atlas.create_link_token()
    assert [r["status"] for r in server.requests("linkTokens") if r["auth"]] == [500, 503, 200]


def test_404_error_code_surfaced(atlas):
    with pytest.raises(AtlasApiError) as excinfo:
        atlas.get_cluster("NoSuchCluster")
    err = excinfo.value
    assert (err.status, err.error_code) == (404, "CLUSTER_NOT_FOUND")
    assert "CLUSTER_NOT_FOUND" in str(err) and "NoSuchCluster" in err.detail
    copy = pickle.loads(pickle.dumps(err))  # survives being shipped between processes
    assert (copy.status, copy.error_code, str(copy)) == (404, "CLUSTER_NOT_FOUND", str(err))
    with pytest.raises(AtlasApiError) as excinfo:
        atlas.get_live_migration("0123456789abcdef01234567")
    assert excinfo.value.status == 404


def test_unreachable_service(monkeypatch):
    from devtools.mongo_servers import free_port

    set_conn(monkeypatch, "atlas_gone", {"conn_type": "mongodb_atlas", "host": f"http://127.0.0.1:{free_port()}",
                                         "login": PUBLIC_KEY, "password": PRIVATE_KEY,
                                         "extra": {"project_id": "6507f1f77bcf86cd79943902"}})
    with pytest.raises(AtlasApiError) as excinfo:
        AtlasAdminHook("atlas_gone", retry=FAST_RETRY).get_cluster("Cluster0")
    assert excinfo.value.status is None and "cannot reach" in str(excinfo.value)


# ---- the live migration state machine ------------------------------------------------------------


def test_link_token_and_cloud_manager_link(server, atlas, cloud_manager):
    assert atlas.list_available_projects() == []  # nothing is visible before the org link is SYNCED
    token = link_organizations(server, atlas, cloud_manager)
    projects = atlas.list_available_projects()
    assert projects[0]["migrationHosts"] == [MIGRATION_HOST]
    deployment = projects[0]["deployments"][0]
    assert deployment["name"] == "rs0" and deployment["mongoDBVersion"] == "7.0.14"
    assert {"clusterId", "featureCompatibilityVersion", "managed", "sharded", "oplogSizeMB"} <= set(deployment)
    atlas.delete_link_tokens()  # revoking the token breaks the link
    assert cloud_manager.get_migration_link_status() == "NOT_SYNCED"
    with pytest.raises(AtlasApiError) as excinfo:
        cloud_manager.create_migration_link(token)
    assert excinfo.value.status == 400
    assert_no_secret(str(excinfo.value), (token,))
    cloud_manager.delete_migration_link()
    assert cloud_manager.get_migration_link_status() == "NOT_SYNCED"


def test_validation_success_then_failed(server, atlas, cloud_manager):
    link_organizations(server, atlas, cloud_manager)
    validation = atlas.validate_live_migration(migration_request(server))
    assert validation["status"] == "PENDING" and len(validation["_id"]) == 24
    server.advance(server.scenario.validation_seconds)
    done = atlas.get_live_migration_validation(validation["_id"])
    assert done["status"] == "SUCCESS" and done["errorMessage"] is None

    # A source below 6.0.17 fails validation with the reason in errorMessage.
    old = DeploymentSpec(name="legacy", mongodb_version="6.0.5", fcv="6.0")
    project = server.scenario.source_projects[0]
    project.deployments.append(old)
    failed = atlas.validate_live_migration(migration_request(server, cluster="legacy"))
    server.advance(server.scenario.validation_seconds)
    failed = atlas.get_live_migration_validation(failed["_id"])
    assert failed["status"] == "FAILED" and "6.0.17" in failed["errorMessage"]

    server.update_scenario(validation_outcome="FAILED", validation_error_message="Agent cannot reach source.")
    forced = atlas.validate_live_migration(migration_request(server))
    server.advance(server.scenario.validation_seconds)
    assert atlas.get_live_migration_validation(forced["_id"])["errorMessage"] == "Agent cannot reach source."


def test_invalid_migration_body_refused(atlas):
    body = {"source": {"clusterName": "rs0", "groupId": "6507f1f77bcf86cd79943904", "managedAuthentication": True,
                       "ssl": False},
            "destination": {"clusterName": "Cluster0", "groupId": "6507f1f77bcf86cd79943902",
                            "hostnameSchemaType": "PUBLIC"},
            "migrationHosts": ["a.example.net", "b.example.net"]}
    with pytest.raises(AtlasApiError) as excinfo:
        atlas.validate_live_migration(body)
    assert (excinfo.value.status, excinfo.value.error_code) == (400, "INVALID_ATTRIBUTE")
    with pytest.raises(AtlasApiError) as excinfo:
        atlas.create_live_migration({**body, "migrationHosts": ["a.example.net"], "unknownField": 1})
    assert excinfo.value.error_code == "INVALID_ATTRIBUTE"


def test_migration_to_complete_with_cutover(server, atlas, cloud_manager):
    s = server.scenario
    link_organizations(server, atlas, cloud_manager)
    created = atlas.create_live_migration(migration_request(server))
    assert created["status"] == "NEW" and created["readyForCutover"] is False
    mig_id = created["_id"]

    with pytest.raises(AtlasApiError) as excinfo:  # cutover before readyForCutover is refused
        atlas.cutover_live_migration(mig_id)
    assert excinfo.value.status == 400 and excinfo.value.error_code == "LIVE_MIGRATION_NOT_READY_FOR_CUTOVER"

    server.advance(s.migration_new_seconds + 1)
    first = atlas.get_live_migration(mig_id)
    server.advance(10)
    second = atlas.get_live_migration(mig_id)
    assert first["status"] == second["status"] == "WORKING"
    assert second["lagTimeSeconds"] < first["lagTimeSeconds"] and not second["readyForCutover"]

    server.advance(s.migration_initial_lag_seconds / s.migration_lag_decay_per_second)
    ready = atlas.get_live_migration(mig_id)
    assert ready["readyForCutover"] is True and ready["lagTimeSeconds"] <= s.migration_ready_lag_seconds

    atlas.cutover_live_migration(mig_id)
    cutting = atlas.get_live_migration(mig_id)
    assert cutting["status"] == "WORKING" and "lagTimeSeconds" not in cutting
    server.advance(s.migration_cutover_seconds)
    complete = atlas.get_live_migration(mig_id)
    assert complete["status"] == "COMPLETE" and complete["migrationHosts"] == [MIGRATION_HOST]


def test_every_live_migration_call_sends_the_contract_version(server, atlas, cloud_manager):
    link_organizations(server, atlas, cloud_manager)
    atlas.list_available_projects()
    validation_id = atlas.validate_live_migration(migration_request(server))["_id"]
    atlas.get_live_migration_validation(validation_id)
    mig_id = atlas.create_live_migration(migration_request(server))["_id"]
    atlas.get_live_migration(mig_id)
    with pytest.raises(AtlasApiError):
        atlas.cutover_live_migration(mig_id)  # refused (not ready), but it reached the version check first
    atlas.delete_link_tokens()
    calls = [r for r in server.requests("/api/atlas/v2/") if r["auth"]]
    for (method, pattern), version in CONTRACT_VERSIONS.items():
        matching = [r for r in calls if r["method"] == method and re.search(pattern, r["path"])]
        assert matching, f"no {method} {pattern} call was made"
        assert {r["accept"] for r in matching} == {f"application/vnd.atlas.{version}+json"}, (method, pattern)


def test_migration_expires_after_cutover_window(server, atlas, cloud_manager):
    s = server.scenario
    link_organizations(server, atlas, cloud_manager)
    mig_id = atlas.create_live_migration(migration_request(server))["_id"]
    server.advance(s.migration_new_seconds + s.migration_initial_lag_seconds / s.migration_lag_decay_per_second)
    assert atlas.get_live_migration(mig_id)["readyForCutover"] is True
    server.advance(CUTOVER_WINDOW_SECONDS - 3600)
    assert atlas.get_live_migration(mig_id)["status"] == "WORKING"  # 119 hours in: still open
    server.advance(3600)
    expired = atlas.get_live_migration(mig_id)
    assert expired["status"] == "EXPIRED" and expired["readyForCutover"] is False
    with pytest.raises(AtlasApiError):
        atlas.cutover_live_migration(mig_id)


def test_migration_failed(server, atlas, cloud_manager):
    link_organizations(server, atlas, cloud_manager)
    server.update_scenario(migration_outcome="FAILED", migration_fail_after_seconds=30)
    mig_id = atlas.create_live_migration(migration_request(server))["_id"]
    server.advance(15)
    assert atlas.get_live_migration(mig_id)["status"] == "WORKING"
    server.advance(15)
    assert atlas.get_live_migration(mig_id)["status"] == "FAILED"


def test_migration_without_link_fails(server, atlas):
    mig_id = atlas.create_live_migration(migration_request(server))["_id"]
    server.advance(server.scenario.migration_new_seconds)
    assert atlas.get_live_migration(mig_id)["status"] == "FAILED"


# ---- network peering and access list -------------------------------------------------------------


def peer_setup(atlas: AtlasAdminHook) -> dict:
    container = atlas.create_container("US_EAST_1", "192.168.248.0/21")
    assert len(container["id"]) == 24
    assert [c["id"] for c in atlas.list_containers()] == [container["id"]]
    return atlas.create_peering_connection(container_id=container["id"], aws_account_id="123456789012",
                                           vpc_id="vpc-0abc1234def567890", route_table_cidr_block="10.10.0.0/16",
                                           accepter_region_name="us-east-1")


def test_peer_reaches_available(server, atlas):
    s = server.scenario
    peer = peer_setup(atlas)
    assert peer["statusName"] == "INITIATING"
    server.advance(s.peer_initiating_seconds)
    pending = atlas.get_peering_connection(peer["id"])
    assert pending["statusName"] == "PENDING_ACCEPTANCE" and pending["connectionId"].startswith("pcx-")
    server.accept_peer(pending["connectionId"])  # what accepting it on the AWS side does
    assert atlas.get_peering_connection(peer["id"])["statusName"] == "FINALIZING"
    server.advance(s.peer_finalizing_seconds)
    available = atlas.get_peering_connection(peer["id"])
    assert available["statusName"] == "AVAILABLE" and available["errorStateName"] is None


def test_peer_fails(server, atlas):
    server.update_scenario(peer_outcome="FAILED", peer_fail_after_seconds=20)
    peer = peer_setup(atlas)
    server.advance(20)
    failed = atlas.get_peering_connection(peer["id"])
    assert failed["statusName"] == "FAILED" and failed["errorStateName"] == "REJECTED"
    with pytest.raises(AtlasApiError) as excinfo:  # one container per region
        atlas.create_container("US_EAST_1", "192.168.240.0/21")
    assert excinfo.value.status == 409


def test_access_list(atlas):
    entries = atlas.add_access_list_entries([{"ipAddress": "203.0.113.7", "comment": "migration host"},
                                             {"cidrBlock": "10.10.0.0/16", "comment": "app VPC"}])
    assert {e["cidrBlock"] for e in entries} == {"203.0.113.7/32", "10.10.0.0/16"}
    assert len(atlas.list_access_list()) == 2
    with pytest.raises(AtlasApiError) as excinfo:
        atlas.add_access_list_entries([{"ipAddress": "999.1.1.1"}])
    assert excinfo.value.error_code == "INVALID_IP_ADDRESS_OR_CIDR_NOTATION"


# ---- configuration and secrecy -------------------------------------------------------------------


def test_connection_configuration_errors(server, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_ATLAS_MISSING", raising=False)
    with pytest.raises(ConfigurationError, match="not defined"):
        AtlasAdminHook("atlas_missing").get_cluster("Cluster0")
    set_conn(monkeypatch, "atlas_half", {"conn_type": "mongodb_atlas", "extra": {"client_id": CLIENT_ID}})
    with pytest.raises(ConfigurationError, match="client_secret"):
        AtlasAdminHook("atlas_half").get_cluster("Cluster0")
    set_conn(monkeypatch, "cm_sa", {"conn_type": "mongodb_cloud_manager", "extra": {
        "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}})
    with pytest.raises(ConfigurationError, match="API key pair") as excinfo:
        CloudManagerHook("cm_sa").get_migration_link_status(org_id="6507f1f77bcf86cd79943903")
    assert_no_secret(str(excinfo.value))
    set_conn(monkeypatch, "atlas_noproj", {**atlas_conn(server), "extra": {}})
    with pytest.raises(ConfigurationError, match="project_id"):
        AtlasAdminHook("atlas_noproj").get_cluster("Cluster0")
    hook = AtlasAdminHook("atlas_noproj")
    assert hook.config.base_url == server.url
    assert_no_secret(repr(hook) + repr(hook.config))
    assert AtlasAdminHook.get_ui_field_behaviour()["relabeling"]["login"] == "Public API key"


def test_no_secret_in_logs_or_errors(server, atlas, oauth_atlas, cloud_manager, caplog, capfd):
    # Airflow routes hook loggers through structlog to stdout; plain loggers (urllib3) reach caplog.
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    token = link_organizations(server, atlas, cloud_manager)
    server.add_fault(500, count=1, method="GET")
    server.add_fault(429, count=1, retry_after=0, method="GET")
    oauth_atlas.get_cluster("Cluster0")  # retried twice, over OAuth
    server.advance(3601)
    oauth_atlas.list_available_projects()  # expired token refused, refetched
    for call in (lambda: atlas.get_cluster("Missing"), lambda: cloud_manager.create_migration_link("bogus-token"),
                 lambda: oauth_atlas.cutover_live_migration("0123456789abcdef01234567")):
        with pytest.raises(AtlasApiError) as excinfo:
            call()
        texts += [str(excinfo.value), repr(excinfo.value), repr(excinfo.value.parameters)]
    issued = tuple(server.state.tokens)  # every bearer token the server handed out
    assert len(issued) == 2
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert "retrying" in logged and "fetching a new one" in logged, "the hook's log lines were not captured"
    assert "linkTokens" in logged  # urllib3's request lines too
    everything = logged + "\n".join(texts) + repr(atlas) + repr(oauth_atlas) + repr(cloud_manager)
    assert_no_secret(everything, (token, *issued))


def test_subprocess_server_persists_state(tmp_path: Path, monkeypatch):
    state_file = tmp_path / "atlas-state.json"
    argv = [sys.executable, "-m", "devtools.atlas_api_server", "--port", "0", "--state-file", str(state_file),
            "--api-key", f"{PUBLIC_KEY}:{PRIVATE_KEY}"]
    repo = Path(__file__).resolve().parents[2]

    def start() -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen(argv, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:"), line
        return proc, line.split()[-1]

    proc, url = start()
    try:
        set_conn(monkeypatch, "atlas_proc", {"conn_type": "mongodb_atlas", "host": url, "login": PUBLIC_KEY,
                                             "password": PRIVATE_KEY, "extra": {
                                                 "org_id": "6507f1f77bcf86cd79943901",
                                                 "project_id": "6507f1f77bcf86cd79943902"}})
        container = AtlasAdminHook("atlas_proc", retry=FAST_RETRY).create_container("EU_WEST_1", "192.168.0.0/21")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert container["id"] in json.loads(state_file.read_text())["containers"]

    proc, url = start()  # a restart resumes from the state file
    try:
        set_conn(monkeypatch, "atlas_proc", {"conn_type": "mongodb_atlas", "host": url, "login": PUBLIC_KEY,
                                             "password": PRIVATE_KEY, "extra": {
                                                 "project_id": "6507f1f77bcf86cd79943902"}})
        containers = AtlasAdminHook("atlas_proc", retry=FAST_RETRY).list_containers()
        assert [c["id"] for c in containers] == [container["id"]]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_admin_endpoints(server, atlas):
    admin = f"{server.url}/__test__"
    patched = requests.patch(f"{admin}/scenario", json={"peer_auto_accept_after_seconds": 10}, timeout=5)
    assert patched.status_code == 200 and patched.json()["peer_auto_accept_after_seconds"] == 10
    assert requests.patch(f"{admin}/scenario", json={"no_such_knob": 1}, timeout=5).status_code == 400
    peer = peer_setup(atlas)
    before = requests.post(f"{admin}/clock", json={"advance_seconds": 10}, timeout=5).json()["now"]
    assert atlas.get_peering_connection(peer["id"])["statusName"] == "FINALIZING"  # accepted automatically
    after = requests.post(f"{admin}/clock", json={"advance_seconds": 5}, timeout=5).json()["now"]
    assert after - before >= 5
    assert atlas.get_peering_connection(peer["id"])["statusName"] == "AVAILABLE"
    conflict = requests.post(f"{admin}/peers/{peer['id']}/accept", timeout=5)
    assert conflict.status_code == 409  # only a PENDING_ACCEPTANCE peer can be accepted

    assert requests.post(f"{admin}/faults", json={"status": 404, "method": "GET", "error_code": "X_TEST"},
                         timeout=5).status_code == 200
    with pytest.raises(AtlasApiError) as excinfo:
        atlas.get_cluster("Cluster0")
    assert excinfo.value.error_code == "X_TEST"
    log = requests.get(f"{admin}/requests", timeout=5).json()
    assert any(r["status"] == 404 and r["path"].endswith("/clusters/Cluster0") for r in log)
    state = requests.get(f"{admin}/state", timeout=5).json()
    assert peer["id"] in state["peers"]
    assert requests.post(f"{admin}/reset", timeout=5).status_code == 204
    with pytest.raises(AtlasApiError) as excinfo:
        atlas.get_peering_connection(peer["id"])
    assert excinfo.value.status == 404


def test_outage_knob_fails_every_api_call_for_a_while(server):
    """``/__test__/outage``: every API call (either service, before auth) fails for N real seconds, answered
    503 in the error shape or with the connection dropped; admin calls and the migration clock carry on."""
    admin = f"{server.url}/__test__"
    assert requests.post(f"{admin}/outage", json={"seconds": 5, "mode": "sideways"}, timeout=5).status_code == 400
    assert requests.post(f"{admin}/outage", json={"seconds": 0.6}, timeout=5).json() == {"seconds": 0.6,
                                                                                          "mode": "503"}
    url = f"{server.url}/api/atlas/v2/groups/{server.scenario.atlas_project_id}/liveMigrations/{'a' * 24}"
    down = requests.get(url, timeout=5)
    assert down.status_code == 503 and down.json()["errorCode"] == "SERVICE_UNAVAILABLE"
    assert requests.get(f"{admin}/state", timeout=5).json()["outage_remaining_seconds"] > 0
    time.sleep(0.7)
    assert requests.get(url, timeout=5).status_code == 401  # back: the Digest challenge, as usual

    assert requests.post(f"{admin}/outage", json={"seconds": 30, "mode": "reset"}, timeout=5).status_code == 200
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=5)
    assert requests.delete(f"{admin}/outage", timeout=5).status_code == 204
    assert requests.get(url, timeout=5).status_code == 401
