"""Service-account tokens are reused across tasks (processes) and trigger polls: counted at the Atlas
stand-in's token endpoint. The shared cache file holds neither the secret nor the token in the clear."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from atlas_migration.hooks.atlas import AtlasAdminHook
from atlas_migration.token_cache import SharedTokenCache, cache_dir
from devtools.airflow_env import REPO
from tests.hooks.test_atlas import CLIENT_ID, CLIENT_SECRET, FAST_RETRY, oauth_atlas, server  # noqa: F401

TASK = ("from atlas_migration.hooks.atlas import AtlasAdminHook; "
        "print(AtlasAdminHook('atlas_sa').get_cluster('Cluster0')['name'])")


def test_one_token_for_every_task_and_poll_of_a_run(server, oauth_atlas):  # noqa: F811
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'include'}"}
    for _ in range(3):  # three tasks: three processes, as Airflow runs them
        done = subprocess.run([sys.executable, "-c", TASK], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip().endswith("Cluster0"), done.stderr[-2000:]
    for _ in range(5):  # trigger polls: a new hook for each, as a trigger makes it
        AtlasAdminHook("atlas_sa", retry=FAST_RETRY).get_cluster("Cluster0")
    assert len(server.requests("/api/oauth/token")) == 1
    assert [r["status"] for r in server.requests("/api/atlas/v2/")] == [200] * 8

    files = list(cache_dir().iterdir())
    assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(cache_dir().stat().st_mode) == 0o700
    content = files[0].read_bytes()
    for secret in (CLIENT_SECRET, CLIENT_ID, *server.state.tokens):
        assert secret.encode() not in content
    assert CLIENT_SECRET not in files[0].name and CLIENT_ID not in files[0].name


def test_a_refused_token_is_dropped_for_everyone(server, oauth_atlas):  # noqa: F811
    oauth_atlas.get_cluster("Cluster0")
    server.advance(3601)  # Atlas's clock passes expiry: the cached token is refused
    AtlasAdminHook("atlas_sa", retry=FAST_RETRY).get_cluster("Cluster0")  # refused once, refetched, re-cached
    AtlasAdminHook("atlas_sa", retry=FAST_RETRY).get_cluster("Cluster0")  # the new token, from the cache
    assert len(server.requests("/api/oauth/token")) == 2
    assert [r["status"] for r in server.requests("/api/atlas/v2/")] == [200, 401, 200, 200]


def test_the_cache_is_unreadable_without_the_secret(tmp_path):
    mine = SharedTokenCache("https://cloud.mongodb.com", "id", "secret-1", directory=tmp_path)
    mine.save("token-abc", 3600)
    assert mine.load(margin=60)[0] == "token-abc"
    other = SharedTokenCache("https://cloud.mongodb.com", "id", "secret-2", directory=tmp_path)
    assert other.path != mine.path and other.load(margin=60) is None
    # Even the right file name with another secret does not decrypt.
    other.path = mine.path
    assert other.load(margin=60) is None
    expired = SharedTokenCache("https://cloud.mongodb.com", "id", "secret-1", directory=tmp_path,
                               wall_clock=lambda: 10**12)
    assert expired.load(margin=60) is None
