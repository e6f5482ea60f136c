"""The Dockerfile's versions agree with what the project pins and tests, and docker/mongodb-download-url.sh
gives a URL only for platforms MongoDB builds each component for (no Docker daemon is needed: the script is
the part of the build that decides, and it runs here with the platforms given as arguments)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from atlas_migration.engines.mongosync import parse_version

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = (REPO / "Dockerfile").read_text()
SCRIPT = REPO / "docker" / "mongodb-download-url.sh"
OS_RELEASES = {"debian12": 'ID=debian\nVERSION_ID="12"\n', "ubuntu2404": 'ID=ubuntu\nVERSION_ID="24.04"\n',
               "ubuntu2004": 'ID=ubuntu\nVERSION_ID="20.04"\n', "rhel9": 'ID="rhel"\nVERSION_ID="9.4"\n'}


def build_arg(name: str) -> str:
    values = re.findall(rf"^ARG {name}=(\S+)$", DOCKERFILE, flags=re.MULTILINE)
    assert len(values) == 1, f"one default for {name} expected, found {values}"
    return values[0]


def download_url(tmp_path: Path, component: str, version: str, platform: str, arch: str) -> subprocess.CompletedProcess:
    os_release = tmp_path / platform
    os_release.write_text(OS_RELEASES[platform])
    return subprocess.run(["sh", str(SCRIPT), component, version, str(os_release), arch], capture_output=True,
                          text=True, timeout=30, check=False)


def test_airflow_version_is_the_pinned_one_and_installed_with_its_constraints_file():
    pinned = re.search(r"^apache-airflow==(\S+)$", (REPO / "requirements.txt").read_text(), flags=re.MULTILINE)
    assert pinned and build_arg("AIRFLOW_VERSION") == pinned.group(1)
    assert "FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION} AS airflow" in DOCKERFILE
    assert ("constraints-${AIRFLOW_VERSION}/constraints-${PYTHON_VERSION}.txt" in DOCKERFILE
            and '"apache-airflow==${AIRFLOW_VERSION}" -r /requirements.txt' in DOCKERFILE)
    # The Airflow image is the last stage: a plain `docker build .` builds it.
    assert DOCKERFILE.rindex("\nFROM ") == DOCKERFILE.index("\nFROM apache/airflow:")


def test_tool_versions_are_the_documented_lines():
    # 100.19.x: the newest Database Tools line that still dumps servers older than 4.2 (README "Dumps").
    assert build_arg("MONGODB_TOOLS_VERSION").startswith("100.19.")
    # The mongosync release the hook and the contracts follow.
    assert parse_version(build_arg("MONGOSYNC_VERSION")) == (1, 22)
    assert "FROM ubuntu:24.04 AS mongosync" in DOCKERFILE


@pytest.mark.parametrize(("arch", "name"), [("amd64", "x86_64"), ("x86_64", "x86_64")])
def test_tools_on_the_airflow_image_s_debian_12(tmp_path, arch, name):
    run = download_url(tmp_path, "tools", "100.19.0", "debian12", arch)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == (f"https://fastdl.mongodb.org/tools/db/mongodb-database-tools-debian12-{name}-"
                                  "100.19.0.deb")


def test_tools_on_debian_12_arm64_fail_the_build_with_the_way_out(tmp_path):
    run = download_url(tmp_path, "tools", "100.19.0", "debian12", "arm64")
    assert run.returncode == 2 and run.stdout == ""
    assert "not built for debian 12 on arm64" in run.stderr
    assert "linux/amd64" in run.stderr and "MONGODB_TOOLS_VERSION=none" in run.stderr


def test_tools_on_ubuntu_have_both_architectures(tmp_path):
    for arch in ("aarch64", "x86_64"):
        run = download_url(tmp_path, "tools", "100.20.0", "ubuntu2004", arch)
        name = "arm64" if arch == "aarch64" else arch
        assert run.stdout.strip().endswith(f"/mongodb-database-tools-ubuntu2004-{name}-100.20.0.deb"), run.stderr


def test_mongosync_on_ubuntu_x86_64_only_and_never_on_debian(tmp_path):
    run = download_url(tmp_path, "mongosync", "1.22.0", "ubuntu2404", "x86_64")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "https://fastdl.mongodb.org/tools/mongosync/mongosync-ubuntu2404-x86_64-1.22.0.tgz"
    arm = download_url(tmp_path, "mongosync", "1.22.0", "ubuntu2404", "arm64")
    assert arm.returncode == 2 and "only arm64 build is for Amazon Linux 2023" in arm.stderr
    debian = download_url(tmp_path, "mongosync", "1.22.0", "debian12", "x86_64")
    assert debian.returncode == 2 and "not for Debian" in debian.stderr


def test_unknown_platforms_and_architectures_are_refused(tmp_path):
    rhel = download_url(tmp_path, "tools", "100.19.0", "rhel9", "x86_64")
    assert rhel.returncode == 2 and "Supported here: Debian 12" in rhel.stderr
    s390x = download_url(tmp_path, "tools", "100.19.0", "debian12", "s390x")
    assert s390x.returncode == 2 and "architecture 's390x'" in s390x.stderr
