"""relu_dask.objectstores: which URLs and storage options go through obstore, translated how."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relu_dask import objectstores

pytest.importorskip("obstore")

ENDPOINT = "http://127.0.0.1:9000"


@pytest.fixture(autouse=True)
def _no_aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws/credentials


def _config(url: str, options: dict[str, object]) -> tuple[objectstores.Bucket, str]:
    found = objectstores.bucket_of(url, options)
    assert not isinstance(found, str), found
    return found


def test_s3fs_options_are_translated() -> None:
    bucket, key = _config(
        "s3://lab/runs/acts.zarr/",
        {
            "key": "K",
            "secret": "S",
            "token": "T",
            "client_kwargs": {"endpoint_url": ENDPOINT, "region_name": "eu-west-1"},
            "config_kwargs": {"connect_timeout": 2, "read_timeout": 5, "retries": {"max_attempts": 3}},
            "requester_pays": True,
        },
    )
    assert (bucket.name, key) == ("lab", "runs/acts.zarr")
    assert json.loads(bucket.config_json) == {
        "access_key_id": "K",
        "secret_access_key": "S",
        "session_token": "T",
        "endpoint": ENDPOINT,
        "region": "eu-west-1",
        "request_payer": True,
    }
    assert (bucket.connect_timeout_s, bucket.timeout_s, bucket.retries) == (2.0, 5.0, 2)
    anonymous, _ = _config("s3://open-data/x.zarr", {"anon": True, "endpoint_url": ENDPOINT})
    assert json.loads(anonymous.config_json) == {"endpoint": ENDPOINT, "region": "us-east-1", "skip_signature": True}
    assert anonymous.retries == objectstores.DEFAULT_RETRIES


def test_the_region_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    bucket, _ = _config("s3://lab/acts.zarr", {"anon": True})
    assert json.loads(bucket.config_json)["region"] == "ap-south-1"


@pytest.mark.parametrize(
    ("url", "options", "reason"),
    [
        ("gs://lab/acts.zarr", {}, "gs:// is reached through fsspec"),
        ("s3://lab/acts.zarr", {"endpoint_url": ENDPOINT, "profile": "work"}, "storage option(s) profile"),
        ("s3://lab/acts.zarr", {"endpoint_url": ENDPOINT, "client_kwargs": {"verify": False}}, "client_kwargs"),
        ("s3://lab/acts.zarr", {"key": "K", "secret": "S"}, "no region given"),
    ],
)
def test_what_obstore_is_not_given_stays_with_s3fs(url: str, options: dict[str, object], reason: str) -> None:
    found = objectstores.bucket_of(url, options)
    assert isinstance(found, str) and found.startswith(reason), found


def test_credentials_of_an_aws_profile_stay_with_s3fs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text("[default]\naws_access_key_id = K\n")
    found = objectstores.bucket_of("s3://lab/acts.zarr", {"endpoint_url": ENDPOINT})
    assert isinstance(found, str) and "AWS profile" in found
    assert not isinstance(objectstores.bucket_of("s3://lab/a", {"endpoint_url": ENDPOINT, "key": "K"}), str)


@pytest.mark.parametrize("where", ["config", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"])
def test_any_aws_profile_file_stays_with_s3fs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, where: str) -> None:
    """SSO, credential_process, role_arn: botocore reads them from ~/.aws/config, obstore does not."""
    if where == "config":
        (tmp_path / ".aws").mkdir()
        (tmp_path / ".aws" / "config").write_text("[default]\ncredential_process = /bin/false\n")
    else:
        monkeypatch.setenv(where, str(tmp_path / "elsewhere"))
    found = objectstores.bucket_of("s3://lab/acts.zarr", {"endpoint_url": ENDPOINT})
    assert isinstance(found, str) and "AWS profile" in found


def test_keys_given_beside_an_environment_token_stay_with_s3fs(monkeypatch: pytest.MonkeyPatch) -> None:
    """obstore would sign the given keys with the environment's session token (another identity's)."""
    monkeypatch.setenv("AWS_SESSION_TOKEN", "ENV-TOKEN")
    given = {"endpoint_url": ENDPOINT, "key": "K", "secret": "S"}
    found = objectstores.bucket_of("s3://lab/acts.zarr", given)
    assert isinstance(found, str) and "AWS_SESSION_TOKEN" in found
    bucket, _ = _config("s3://lab/acts.zarr", {**given, "token": "T"})  # a token of their own: obstore
    assert json.loads(bucket.config_json)["session_token"] == "T"
