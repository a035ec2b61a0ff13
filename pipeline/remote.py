"""The team's DVC remote: set it from the environment, check it answers, push and pull through it.

``make push`` / ``make pull`` run ``dvc push --run-cache`` / ``dvc pull --run-cache`` after one check of the
remote (endpoint reachable, keys accepted, bucket present) that fails with one line naming what is wrong, so
a stopped object store or a wrong key changes nothing in the workspace. The remote lives in
``.dvc/config.local`` (git-ignored): ``make stack-up`` writes it, and on another machine ``make pull`` writes
it from ``DDPM_DVC_REMOTE`` (an ``s3://bucket/path`` URL), ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY`` (the lines ``make stack-env`` prints).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

REMOTE = "team"


class RemoteError(RuntimeError):
    """The DVC remote is missing, unreachable, refuses the keys, or lacks its bucket; the message is one line."""


def configure(project: Path, env: Mapping[str, str] = os.environ) -> None:
    """Write the ``team`` remote (default) into ``project/.dvc/config.local`` from the client environment."""
    from dvc.config import Config

    url = env.get("DDPM_DVC_REMOTE")
    if not url:
        raise RemoteError("DDPM_DVC_REMOTE is not set: eval the lines `make stack-env` prints, or set it")
    remote = {"url": url}
    for key, name in (("endpointurl", "AWS_ENDPOINT_URL"), ("access_key_id", "AWS_ACCESS_KEY_ID"),
                      ("secret_access_key", "AWS_SECRET_ACCESS_KEY")):  # fmt: skip
        if env.get(name):
            remote[key] = env[name]
    config = Config(dvc_dir=str(Path(project) / ".dvc"))
    with config.edit("local") as local:
        local.setdefault("remote", {})[REMOTE] = remote
        local.setdefault("core", {})["remote"] = REMOTE
    (Path(project) / ".dvc" / "config.local").chmod(0o600)  # it holds the secret key


def settings(project: Path) -> tuple[str, dict]:
    """(name, config) of the project's default DVC remote."""
    from dvc.config import Config

    config = Config(dvc_dir=str(Path(project) / ".dvc"))
    name = config["core"].get("remote")
    if not name or name not in config["remote"]:
        raise RemoteError("no default DVC remote: run `make stack-up`, or set DDPM_DVC_REMOTE (see `make stack-env`)")
    return name, dict(config["remote"][name])


def check(project: Path) -> str:
    """Check that the default remote answers and accepts its keys; return a description of it."""
    name, remote = settings(project)
    url = urlparse(remote["url"])
    if url.scheme != "s3":
        if not url.scheme and not Path(remote["url"]).is_dir():
            raise RemoteError(f"DVC remote '{name}': folder {remote['url']} does not exist")
        return f"{name} ({remote['url']})"
    import botocore.exceptions
    from botocore.config import Config as BotoConfig

    endpoint = remote.get("endpointurl") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS default endpoint"
    s3 = s3_client(remote, BotoConfig(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1}))
    try:
        s3.head_bucket(Bucket=url.netloc)
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError) as e:
        raise RemoteError(f"DVC remote '{name}': object store at {endpoint} is unreachable ({type(e).__name__}); "
                          "is it running? (`make stack-status`)") from None  # fmt: skip
    except botocore.exceptions.NoCredentialsError:
        raise RemoteError(f"DVC remote '{name}': no access key for {endpoint}: set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY (see `make stack-env`)") from None  # fmt: skip
    except botocore.exceptions.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code"))
        if code in ("404", "NoSuchBucket"):
            raise RemoteError(f"DVC remote '{name}': bucket '{url.netloc}' does not exist at {endpoint}") from None
        refused = key_refusal(s3)  # a HEAD answer has no body: ask once more to tell the key from the bucket
        if refused:
            raise RemoteError(f"DVC remote '{name}': {endpoint} refused the access key ({refused}): check "
                              "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None  # fmt: skip
        raise RemoteError(f"DVC remote '{name}': bucket '{url.netloc}' does not exist at {endpoint}, or the "
                          f"access key may not use it ({code})") from None  # fmt: skip
    return f"{name} ({remote['url']} at {endpoint})"


def s3_client(remote: dict, config=None):
    """A boto3 S3 client for a DVC remote's settings (its endpoint and keys, else the AWS_* environment)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=remote.get("endpointurl") or os.environ.get("AWS_ENDPOINT_URL"),
        aws_access_key_id=remote.get("access_key_id") or os.environ.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=remote.get("secret_access_key") or os.environ.get("AWS_SECRET_ACCESS_KEY"),
        region_name=remote.get("region") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=config,
    )


# What a run in progress needs to be continued on another worker, beside the DVC remote's objects: its resume
# checkpoint ``<remote url>/resume/<key>.ckpt`` and the EMA snapshots it has written so far
# ``<remote url>/resume/<key>.ema/<file>``. They are not DVC data (no stage declares them).
RESUME_PREFIX = "resume"


def _resume_store(project: Path) -> tuple[Any, str, str]:
    """(S3 client or None for a folder remote, bucket or folder, the resume prefix in it)."""
    _, remote = settings(project)
    url = urlparse(remote["url"])
    if url.scheme == "s3":
        return s3_client(remote), url.netloc, "/".join(filter(None, [url.path.strip("/"), RESUME_PREFIX]))
    return None, str(Path(project) / remote["url"]), RESUME_PREFIX


def _put(s3, bucket: str, name: str, path: Path) -> None:
    if s3 is not None:
        s3.upload_file(str(path), bucket, name)
        return
    dest = Path(bucket) / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(path, tmp)
    tmp.replace(dest)


def _get(s3, bucket: str, name: str, dest: Path) -> bool:
    """Fetch one object into ``dest`` atomically; False if there is none."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if s3 is not None:
        import botocore.exceptions

        try:
            s3.download_file(bucket, name, str(tmp))
        except botocore.exceptions.ClientError as e:
            tmp.unlink(missing_ok=True)
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
                return False
            raise
    elif (Path(bucket) / name).is_file():
        shutil.copyfile(Path(bucket) / name, tmp)
    else:
        return False
    tmp.replace(dest)
    return True


def _listing(s3, bucket: str, folder: str) -> list[str]:
    """The names of the objects under ``folder`` (a prefix ending without ``/``), in name order."""
    if s3 is None:
        root = Path(bucket) / folder
        return sorted(f"{folder}/{p.name}" for p in root.iterdir() if p.is_file()) if root.is_dir() else []
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{folder}/")
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def push_resume(project: Path, path: Path, key: str) -> None:
    """Copy a resume checkpoint to the shared store under ``key``."""
    s3, bucket, prefix = _resume_store(project)
    _put(s3, bucket, f"{prefix}/{key}.ckpt", path)


def pull_resume(project: Path, key: str, dest: Path) -> bool:
    """Fetch the resume checkpoint stored under ``key`` into ``dest`` (atomically); False if there is none."""
    s3, bucket, prefix = _resume_store(project)
    return _get(s3, bucket, f"{prefix}/{key}.ckpt", dest)


def push_snapshots(project: Path, folder: Path, key: str, pushed: dict[str, tuple[int, int]]) -> list[str]:
    """Copy the EMA snapshot files of ``folder`` (``*.pt``; ``ddpm.fit.SNAPSHOTS_PARTIAL``) that are new or
    rewritten since ``pushed`` (name -> (mtime_ns, size), updated here) to the shared store under ``key``;
    return their names. A snapshot is written atomically, so a file seen here is whole."""
    changed = []
    for path in sorted(Path(folder).glob("*.pt")):
        try:
            st = path.stat()
        except FileNotFoundError:  # moved away (the run finished)
            continue
        if pushed.get(path.name) != (st.st_mtime_ns, st.st_size):
            changed.append((path, (st.st_mtime_ns, st.st_size)))
    if not changed:  # the usual case of a once-a-second check: no store settings read, no client made
        return []
    s3, bucket, prefix = _resume_store(project)
    for path, state in changed:
        _put(s3, bucket, f"{prefix}/{key}.ema/{path.name}", path)
        pushed[path.name] = state
    return [path.name for path, _ in changed]


def pull_snapshots(project: Path, key: str, dest: Path) -> list[str]:
    """Fetch the EMA snapshots stored under ``key`` into the folder ``dest``; return their names."""
    s3, bucket, prefix = _resume_store(project)
    names = []
    for name in _listing(s3, bucket, f"{prefix}/{key}.ema"):
        base = name.rsplit("/", 1)[-1]
        if base.endswith(".pt") and _get(s3, bucket, name, Path(dest) / base):
            names.append(base)
    return names


def drop_resume(project: Path, key: str) -> None:
    """Delete the resume checkpoint and snapshots stored under ``key`` (the run they belonged to finished)."""
    s3, bucket, prefix = _resume_store(project)
    if s3 is not None:
        for name in [f"{prefix}/{key}.ckpt", *_listing(s3, bucket, f"{prefix}/{key}.ema")]:
            s3.delete_object(Bucket=bucket, Key=name)
        return
    (Path(bucket) / prefix / f"{key}.ckpt").unlink(missing_ok=True)
    shutil.rmtree(Path(bucket) / prefix / f"{key}.ema", ignore_errors=True)


def key_refusal(s3) -> str | None:
    """The store's error code when it refuses the key itself (wrong secret, unknown key), else None."""
    import botocore.exceptions

    try:
        s3.list_buckets()
    except botocore.exceptions.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code"))
        return code if code in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidClientTokenId") else None
    return None


def transfer(command: str, project: Path, allow_missing: bool = False) -> int:
    """``dvc push`` / ``dvc pull`` with the run cache, after :func:`check`; 0 on success. ``allow_missing``: a
    pull skips outputs the remote does not have (the pipeline recomputes them)."""
    if command == "pull" and os.environ.get("DDPM_DVC_REMOTE"):
        configure(project)
    where = check(project)
    print(f"{command}: DVC remote {where}", file=sys.stderr)
    extra = ["--allow-missing"] if allow_missing and command == "pull" else []
    done = subprocess.run([sys.executable, "-m", "dvc", command, "--run-cache", *extra], cwd=project)
    if done.returncode != 0:
        unchanged = "the workspace is unchanged; " if command == "push" else ""
        raise RemoteError(f"dvc {command} through {where} failed (exit {done.returncode}); {unchanged}"
                          f"run `make {command}` again once the object store answers")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("push", "pull", "check", "configure"))
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--allow-missing", action="store_true", help="pull: skip what the remote does not have")
    args = parser.parse_args(argv)
    try:
        if args.command == "configure":
            configure(args.project)
        elif args.command == "check":
            print(check(args.project))
        else:
            return transfer(args.command, args.project, args.allow_missing)
    except RemoteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
