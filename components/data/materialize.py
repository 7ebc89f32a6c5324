"""The pipeline's first step: the repository at a git revision, its DVC-pinned data pulled onto
the shared workspace, and its params.yaml with the run's overrides.

Data is stored by content, under ``<workspace>/data/<md5 of data.dvc's output>``, so runs of the
same data version (every scheduled run until data.dvc changes) pull it once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import yaml

from components.runtime import StepError, mapet, require_writable_workspace
from mapet.params import load_params
from mapet.registry.fingerprint import code_revision, fingerprint

COMPLETE = ".complete"


# The git Secret's keys (k8s/templates/git-secret.yaml) reach the step as these variables.
GIT_SECRET_KEYS = {"token": "MAPET_GIT_TOKEN", "username": "MAPET_GIT_USERNAME", "ssh-privatekey": "MAPET_GIT_SSH_KEY",
                   "known_hosts": "MAPET_GIT_KNOWN_HOSTS"}
# An HTTPS credential helper that reads the token from the environment when git asks, so that it
# is on no command line, in no URL and in no file.
CREDENTIAL_HELPER = ("!f() { test \"$1\" = get || exit 0; echo username=\"${MAPET_GIT_USERNAME:-x-access-token}\"; "
                     "echo password=\"$MAPET_GIT_TOKEN\"; }; f")


# The DVC remote's Secret's keys (k8s/templates/dvc-remote-secret.yaml) reach the step as these.
DVC_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# What DVC's S3 remote (botocore) says when it has no credentials or the server refuses them.
REFUSED_BY_REMOTE = ("Unable to locate credentials", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                     "(403)", "Forbidden", "InvalidToken", "ExpiredToken", "NoCredentialsError")


def _secrets() -> list[str]:
    return [os.environ[name] for name in (*GIT_SECRET_KEYS.values(), *DVC_SECRET_KEYS) if os.environ.get(name)]


def _run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env)
    if result.returncode:
        message = result.stderr.strip() or result.stdout.strip()
        for secret in _secrets():
            message = message.replace(secret, "***")
        raise StepError(f"`{' '.join(argv)}` failed with status {result.returncode}:\n{message}")
    return result.stdout.strip()


def git_environment(folder: Path) -> dict[str, str]:
    """The environment of git commands: never a prompt; the Secret's HTTPS token through
    :data:`CREDENTIAL_HELPER`, or its SSH key and known_hosts written (0600) into ``folder``."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_COUNT": "2", "GIT_CONFIG_KEY_0": "credential.helper",
           "GIT_CONFIG_VALUE_0": "", "GIT_CONFIG_KEY_1": "credential.helper", "GIT_CONFIG_VALUE_1": CREDENTIAL_HELPER}
    if os.environ.get("MAPET_GIT_SSH_KEY"):
        folder.mkdir(parents=True, exist_ok=True)
        key, known_hosts = folder / "id", folder / "known_hosts"
        key.touch(mode=0o600)
        key.write_text(os.environ["MAPET_GIT_SSH_KEY"].rstrip("\n") + "\n")
        known_hosts.write_text(os.environ.get("MAPET_GIT_KNOWN_HOSTS", ""))
        env["GIT_SSH_COMMAND"] = (f"ssh -i {key} -o IdentitiesOnly=yes -o UserKnownHostsFile={known_hosts} "
                                  f"-o StrictHostKeyChecking=yes")
    return env


def clone(repo_url: str, checkout: Path, git_secret: str) -> None:
    """``git clone --no-checkout`` with the Secret's credentials; a refusal names the Secret."""
    credentials = checkout.parent / f"{checkout.name}-credentials"
    try:
        _run(["git", "clone", "--quiet", "--no-checkout", repo_url, str(checkout)], env=git_environment(credentials))
    except StepError as error:
        refused = any(sign in str(error) for sign in ("Authentication failed", "could not read Username",
                                                      "terminal prompts disabled", "Permission denied", "403", "401"))
        if not refused:
            raise
        given = "with the credentials from" if _secrets() else "anonymously: no credentials in"
        raise StepError(f"{repo_url}: the git server refused the clone ({given} the Kubernetes Secret {git_secret!r}). "
                        f"Put an HTTPS token in it (key `token`, and `username` if the server wants one) or an SSH "
                        f"key (`ssh-privatekey` and `known_hosts`): k8s/templates/git-secret.yaml\n{error}") from error
    finally:
        shutil.rmtree(credentials, ignore_errors=True)


def pinned_md5(checkout: Path) -> str:
    dvc_file = checkout / "data.dvc"
    if not dvc_file.is_file():
        raise StepError(f"{dvc_file.name} not found at this revision: the repository pins no data")
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
    if len(outs) != 1 or "md5" not in outs[0]:
        raise StepError(f"{dvc_file.name}: expected one output with an md5, found {outs!r}")
    return outs[0]["md5"].removesuffix(".dir")


def pull(checkout: Path, dvc_secret: str) -> None:
    """``dvc pull data.dvc``; a remote that refuses the credentials (or gets none) is one message
    naming the remote and the Secret, with no credential in it."""
    try:
        _run(["dvc", "pull", "data.dvc"], cwd=checkout)
    except StepError as error:
        refusal = next((line for line in str(error).splitlines() if any(sign in line for sign in REFUSED_BY_REMOTE)),
                       None)
        if refusal is None:
            raise
        remote = _run(["dvc", "remote", "default"], cwd=checkout) or "(none)"
        url = _run(["dvc", "config", f"remote.{remote}.url"], cwd=checkout) if remote != "(none)" else ""
        given = ("with the credentials from" if any(os.environ.get(name) for name in DVC_SECRET_KEYS)
                 else "without credentials: none came from")
        raise StepError(f"the DVC remote {remote!r} ({url}) refused the data pull {given} the Kubernetes Secret "
                        f"{dvc_secret!r}. Put the remote's AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in that "
                        f"Secret (k8s/templates/dvc-remote-secret.yaml) or name another with the pipeline parameter "
                        f"dvc_secret.\n{refusal}") from None


def materialize(repo_url: str, git_rev: str, workspace: str | Path, dvc_remote: str, overrides: list[str],
                params_out: str | Path, git_secret: str = "mapet-git", dvc_secret: str = "mapet-dvc-remote"
                ) -> dict[str, Any]:
    """Returns the data's description: its path on the workspace, the commit, the md5, and the
    run's fingerprint (:func:`mapet.registry.fingerprint.fingerprint`) with the code revision in it.
    ``git_secret`` names the Secret whose credentials (see :func:`git_environment`) clone a
    private repository, ``dvc_secret`` the one whose keys are the DVC remote's credentials."""
    require_writable_workspace(workspace)
    workspace = Path(workspace)
    checkout = workspace / "tmp" / f"checkout-{uuid.uuid4().hex[:12]}"
    checkout.parent.mkdir(parents=True, exist_ok=True)
    try:
        clone(repo_url, checkout, git_secret)
        _run(["git", "checkout", "--quiet", git_rev], cwd=checkout)
        commit = _run(["git", "rev-parse", "HEAD"], cwd=checkout)
        md5 = pinned_md5(checkout)
        target = workspace / "data" / md5
        if (target / COMPLETE).is_file():
            print(f"data {md5} is already on the workspace: {target}")
        else:
            if dvc_remote:
                _run(["dvc", "remote", "add", "--local", "--force", "--default", "pipeline", dvc_remote], cwd=checkout)
            print(f"pulling data {md5} of {repo_url}@{commit[:12]}", flush=True)
            pull(checkout, dvc_secret)
            (checkout / "data" / COMPLETE).write_text(commit + "\n")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(checkout / "data", target)
            except OSError:
                if not (target / COMPLETE).is_file():                 # not a concurrent run's finished copy
                    raise
        mapet("params", "--params", checkout / "params.yaml", *[f"--set={o}" for o in overrides], "--out", params_out)
        code = code_revision()
        return {"path": str(target), "git_commit": commit, "data_md5": md5, "repo_url": repo_url, "code_revision": code,
                "fingerprint": fingerprint(md5, load_params(params_out), code)}
    finally:
        shutil.rmtree(checkout, ignore_errors=True)
