"""Compile, run locally, upload, run and schedule the MaPeT pipeline.

    python -m pipelines.cli compile                         # pipelines/mapet_pipeline.yaml
    python -m pipelines.cli local                           # the whole pipeline under kfp.local, here
    python -m pipelines.cli upload --host URL               # a new version named <git sha>-data-<data md5>
    python -m pipelines.cli run --host URL                  # a run of that version at this commit
    python -m pipelines.cli schedule --host URL             # create or replace the recurring retraining run

Settings come from params.yaml's `pipeline` section; `--set` overrides run arguments.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from mapet.errors import MapetError
from mapet.params import load_params, param
from pipelines.mapet_pipeline import COMPILED, compile_pipeline

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str, cwd: Path = ROOT) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise MapetError(f"git {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


def version_name(repo: Path = ROOT) -> str:
    """``<12 hex of HEAD>-data-<8 hex of data.dvc's md5>``: what the version runs and on which data.
    A checkout with uncommitted changes has no such name, so it is refused."""
    if git("status", "--porcelain", "--untracked-files=no", cwd=repo):
        raise MapetError("the checkout has uncommitted changes: commit them first, so that the pipeline version "
                         "names the code and data it runs")
    outs = (yaml.safe_load((repo / "data.dvc").read_text()) or {}).get("outs") or [{}]
    md5 = outs[0].get("md5", "").removesuffix(".dir")
    if not md5:
        raise MapetError(f"{repo / 'data.dvc'}: no md5 (run `dvc add data` or `dvc commit data.dvc`)")
    return f"{git('rev-parse', 'HEAD', cwd=repo)[:12]}-data-{md5[:8]}"


def check_compiled() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        stale = compile_pipeline(Path(scratch) / COMPILED.name).read_text() != COMPILED.read_text()
    if stale:
        raise MapetError(f"{COMPILED} is stale: run `python -m pipelines.cli compile` (or `make pipeline`) and commit")


def find(items: list | None, attribute: str, value: str) -> Any:
    return next((item for item in items or [] if getattr(item, attribute) == value), None)


def upload(client, name: str, version: str) -> tuple[str, str]:
    """(pipeline id, version id) of ``version``, uploading the compiled YAML unless it is there already."""
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(str(COMPILED), pipeline_name=name).pipeline_id
        print(f"created pipeline {name} ({pipeline_id})")
    existing = find(client.list_pipeline_versions(pipeline_id, page_size=1000).pipeline_versions, "display_name",
                    version)
    if existing is not None:
        print(f"pipeline {name} already has version {version}")
        return pipeline_id, existing.pipeline_version_id
    created = client.upload_pipeline_version(str(COMPILED), pipeline_version_name=version, pipeline_id=pipeline_id)
    print(f"uploaded {COMPILED.name} as {name} version {version}")
    return pipeline_id, created.pipeline_version_id


def experiment_id(client, name: str) -> str:
    return client.create_experiment(name).experiment_id          # returns the existing one of that name


def run_arguments(settings: dict, overrides: list[str], git_rev: str) -> dict[str, Any]:
    arguments = {"repo_url": settings.get("repo_url") or git("remote", "get-url", "origin"), "git_rev": git_rev,
                 **(settings.get("arguments") or {})}
    for assignment in overrides:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise MapetError(f"--set {assignment!r}: expected NAME=VALUE (a pipeline parameter)")
        arguments[key] = yaml.safe_load(value)
    return arguments


def start_run(client, settings: dict, pipeline_id: str, version_id: str, version: str, arguments: dict) -> str:
    run = client.run_pipeline(experiment_id=experiment_id(client, settings["experiment"]),
                              job_name=f"{settings['name']}-{version}", pipeline_id=pipeline_id,
                              version_id=version_id, params=arguments)
    print(f"started run {run.run_id} of {settings['name']} {version}")
    return run.run_id


def schedule(client, settings: dict, pipeline_id: str, version_id: str, arguments: dict) -> str:
    """Creates the recurring run, replacing one of the same name (kfp cannot edit a recurring run)."""
    timing = settings["schedule"]
    experiment = experiment_id(client, settings["experiment"])
    listed = client.list_recurring_runs(experiment_id=experiment, page_size=1000).recurring_runs
    old = find(listed, "display_name", timing["name"])
    if old is not None:
        client.delete_recurring_run(old.recurring_run_id)
        print(f"replaced recurring run {timing['name']} ({old.recurring_run_id})")
    created = client.create_recurring_run(
        experiment_id=experiment, job_name=timing["name"], cron_expression=timing["cron"],
        max_concurrency=timing.get("max_concurrency", 1), no_catchup=True, pipeline_id=pipeline_id,
        version_id=version_id, params=arguments, enabled=True)
    print(f"recurring run {timing['name']} ({created.recurring_run_id}): cron {timing['cron']!r}, "
          f"git_rev {arguments['git_rev']}")
    return created.recurring_run_id


def run_locally(arguments: dict) -> None:
    from kfp import local

    from pipelines.mapet_pipeline import mapet_pipeline

    root = ROOT / "outputs" / "kfp-local"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    mapet_pipeline(**arguments)
    print(f"outputs of each step: {max(root.iterdir(), key=lambda p: p.stat().st_mtime)}/<step>/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.cli", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="parameters file (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("compile", help="write pipelines/mapet_pipeline.yaml")
    local_run = commands.add_parser("local", help="run the pipeline here under kfp.local (backend local)")
    local_run.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a pipeline parameter")
    for name, text in (("upload", "upload the compiled pipeline as a new version"),
                       ("run", "upload if needed, then start a run of this commit"),
                       ("schedule", "upload if needed, then create or replace the recurring run")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--host", required=True, help="Kubeflow Pipelines API endpoint, e.g. http://localhost:8080")
        sub.add_argument("--namespace", help="Kubeflow profile namespace (multi-user installs)")
        sub.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a pipeline parameter")
    args = parser.parse_args(argv)
    try:
        settings = param(load_params(args.params), "pipeline")
        if args.command == "compile":
            print(f"wrote {compile_pipeline()}")
            return 0
        if args.command == "local":
            workspace = ROOT / "outputs" / "pipeline-workspace"       # not ".../kfp-workspace": kfp.local rewrites that
            run_locally(run_arguments({**settings, "repo_url": str(ROOT), "arguments": {}},
                                      [f"workspace={workspace}", "backend=local", "dvc_remote=" + str(ROOT / ".dvc" / "cache"),
                                       *args.set], git("rev-parse", "HEAD")))
            return 0
        check_compiled()
        version = version_name()
        import kfp

        client = kfp.Client(host=args.host, namespace=args.namespace)
        pipeline_id, version_id = upload(client, settings["name"], version)
        if args.command == "run":
            start_run(client, settings, pipeline_id, version_id, version,
                      run_arguments(settings, args.set, git("rev-parse", "HEAD")))
        elif args.command == "schedule":
            schedule(client, settings, pipeline_id, version_id, run_arguments(settings, args.set, settings["git_rev"]))
    except MapetError as error:
        print(f"pipelines {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
