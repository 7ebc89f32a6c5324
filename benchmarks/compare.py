"""The fair comparison of the pre-training objectives, each run a DVC experiment.

    make compare                                        # mapet, plm, mim and scratch x seeds 0 1 2 3 4
    python benchmarks/compare.py --seeds 0 1 2 --objectives mapet plm mim
    python benchmarks/compare.py --out reports/compare-gpu --set pretrain.max_shards=0 --set pretrain.epochs=10
    python benchmarks/compare.py --report-only          # rebuild the tables from the experiments DVC holds
    python benchmarks/compare.py --seeds 1 2 --merge    # add seeds to the committed tables
    python benchmarks/compare.py --redraw               # results.md and results.png again, from results.json
    python benchmarks/compare.py --direct /tmp/cmp --data D --tokens T --jobs 4   # no DVC: where it is not installed

Every arm gets the same data, tokens, budget and fine-tuning recipe (the workspace's params.yaml
plus --set); only the objective, or the initialisation (scratch: no pre-training, the baseline),
and the seed change. A seed sets pre-training's, fine-tuning's and the probe's seed alike, so
the scratch run of seed S is compared with the pre-trained runs of seed S. Each run is `dvc exp run
--temp` named ``cmp-<arm>-s<seed>`` (the workspace is left as it is; DVC's run cache skips the
stages an arm shares with another, such as the tokens). The tables are written to
OUT/results.json (one record per run: objective, init, seed, top1, top5, knn_top1, linear_top1,
loss, the raw pixels' pixels_knn_top1 and pixels_linear_top1, the baseline every backbone must
beat, and code, the revision of the code that trained) and OUT/results.md (mean +- std per arm, the
paired differences between arms with their 95 % intervals, then every run). ``--merge`` adds runs
of the same code revision only: seeds run later must come from the same training code.

``--direct WORK`` runs the same arms without DVC (a GPU machine that has the mapet package but not
DVC): each run's `mapet` commands, as dvc.yaml's stages call them, in WORK/<name> on the dataset
and tokens given, ``--jobs`` runs at a time, seed by seed; the tables are rewritten as each run
ends, so a run cut short keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import scipy.stats

from mapet.files import write_json, write_text
from mapet.registry.fingerprint import code_revision

OBJECTIVES = ("mapet", "plm", "mim")
PROBE = {"pretrained": "outputs/probe/metrics.json", "scratch": "outputs/probe_scratch/metrics.json"}


def arms(objectives: list[str]) -> list[tuple[str, str]]:
    """(objective, init) of every arm: each objective pre-trained, then scratch."""
    return [(objective, "pretrained") for objective in objectives] + [("none", "scratch")]


def experiment_name(objective: str, init: str, seed: int) -> str:
    return f"cmp-{objective if init == 'pretrained' else 'scratch'}-s{seed}"


def arm_settings(objective: str, init: str, seed: int, overrides: list[str]) -> list[str]:
    return [f"pretrain.objective={objective if init == 'pretrained' else 'mapet'}", f"finetune.init={init}",
            f"pretrain.seed={seed}", f"finetune.seed={seed}", f"probe.seed={seed}", *overrides]


def run_arm(objective: str, init: str, seed: int, overrides: list[str]) -> int:
    """Runs one arm as a DVC experiment; returns dvc's exit status."""
    settings = arm_settings(objective, init, seed, overrides)
    command = ["dvc", "exp", "run", "--temp", "-n", experiment_name(objective, init, seed)]
    command += [part for setting in settings for part in ("-S", setting)]
    print("+ " + " ".join(command), flush=True)
    return subprocess.run(command).returncode


def run_direct(objective: str, init: str, seed: int, overrides: list[str], work: Path, data: Path,
               tokens: Path, threads: int) -> dict[str, dict]:
    """Runs one arm's stages with `mapet` in WORK/<name> (outputs/ laid out as the workspace's), each
    with ``threads`` CPU threads; returns its metrics by workspace path, as :func:`experiment_metrics`
    does."""
    folder = work / experiment_name(objective, init, seed)
    (folder / "outputs").mkdir(parents=True, exist_ok=True)
    probe = PROBE[init].removesuffix("/metrics.json")
    out_dirs = [f"{stage}.out_dir={folder / 'outputs' / stage}" for stage in ("pretrain", "finetune", "evaluate")]
    settings = arm_settings(objective, init, seed, overrides) + out_dirs + [f"probe.out_dir={folder / probe}"]
    mapet = [sys.executable, "-m", "mapet"]
    with_params = ["--params", str(folder / "params.yaml"), "--data", str(data)]
    scratch = [] if init == "pretrained" else ["--scratch"]
    commands = [[*mapet, "params", *(part for setting in settings for part in ("--set", setting)),
                 "--out", str(folder / "params.yaml")]]
    if init == "pretrained":
        commands.append([*mapet, "pretrain", *with_params, "--tokens", str(tokens)])
    commands += [[*mapet, "probe", *with_params, *scratch], [*mapet, "finetune", *with_params, *scratch],
                 [*mapet, "evaluate", *with_params]]
    with open(folder / "log.txt", "w") as log:
        for command in commands:
            log.write("+ " + " ".join(command) + "\n")
            log.flush()
            started = time.perf_counter()
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)}).returncode:
                raise RuntimeError(f"{' '.join(command[2:4])} failed: see {folder / 'log.txt'}")
            print(f"{folder.name}: {' '.join(command[2:4])} took {time.perf_counter() - started:.0f} s", flush=True)
    paths = ["outputs/evaluate/metrics.json", PROBE[init]] + (["outputs/pretrain/metrics.json"] if init == "pretrained"
                                                               else [])
    return {path: json.loads((folder / path).read_text()) for path in paths}


def experiment_metrics() -> dict[str, dict]:
    """name -> {metrics file: its data} of every experiment DVC holds."""
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], check=True, capture_output=True,
                                      text=True).stdout)
    found = {}
    for entry in shown:
        for experiment in entry.get("experiments") or []:
            revision = experiment["revs"][0]
            metrics = (revision.get("data") or {}).get("metrics") or {}
            found[experiment.get("name") or revision.get("name")] = {
                path: document.get("data", {}) for path, document in metrics.items()}
    return found


def record(objective: str, init: str, seed: int, metrics: dict[str, dict], code: str) -> dict:
    evaluated, probed = metrics["outputs/evaluate/metrics.json"], metrics[PROBE[init]]
    pretrained = init == "pretrained"
    return {"objective": objective, "init": init, "seed": seed, "code": code, "top1": evaluated["top1"],
            "top5": evaluated.get("top5"), "knn_top1": probed["knn_top1"], "linear_top1": probed["linear_top1"],
            "loss": metrics["outputs/pretrain/metrics.json"]["loss"] if pretrained else None,
            "pixels_knn_top1": probed.get("pixels_knn_top1"), "pixels_linear_top1": probed.get("pixels_linear_top1")}


def arm_name(record: dict) -> str:
    return record["objective"] if record["init"] == "pretrained" else "scratch"


def paired_differences(records: list[dict], metric: str) -> list[dict]:
    """MaPeT - PLM, MaPeT - MIM and every arm - scratch: the mean of the per-seed differences
    (the seeds both arms ran) with its 95 % interval (paired t; none below two seeds)."""
    by_arm: dict[str, dict[int, float]] = {}
    for r in records:
        if r.get(metric) is not None:
            by_arm.setdefault(arm_name(r), {})[r["seed"]] = r[metric]
    pairs = [("mapet", "plm"), ("mapet", "mim")] + [(arm, "scratch") for arm in by_arm if arm != "scratch"]
    rows = []
    for first, second in pairs:
        seeds = sorted(set(by_arm.get(first, {})) & set(by_arm.get(second, {})))
        if not seeds:
            continue
        differences = [by_arm[first][seed] - by_arm[second][seed] for seed in seeds]
        mean = statistics.mean(differences)
        half = (scipy.stats.t.ppf(0.975, len(seeds) - 1) * statistics.stdev(differences) / len(seeds) ** 0.5
                if len(seeds) > 1 else None)
        rows.append({"pair": f"{first} - {second}", "first": first, "second": second, "seeds": len(seeds),
                     "mean": mean, "differences": differences,
                     "low": None if half is None else mean - half, "high": None if half is None else mean + half})
    return rows


def verdict(row: dict) -> str:
    if row["low"] is None:
        return "one seed: no interval"
    if row["low"] > 0:
        return f"{row['first']} ahead"
    if row["high"] < 0:
        return f"{row['second']} ahead"
    return "not resolved (the interval holds 0)"


def pixels_line(records: list[dict]) -> str:
    """The raw pixels' read-outs (the same for every run of one data set and probe), or nothing."""
    shown = {(r.get("pixels_knn_top1"), r.get("pixels_linear_top1")) for r in records} - {(None, None)}
    if not shown:
        return ""
    values = "; ".join(f"k-NN {knn:.4f}, linear {linear:.4f}" for knn, linear in sorted(shown))
    return (f"The baseline, raw pixels through the same probe (flattened, standardised): {values}. A backbone whose "
            f"frozen features score below it has learnt less than its input already holds.\n\n")


def differences_table(records: list[dict]) -> str:
    """Markdown: the paired differences of fine-tuned top-1 and of the linear probe, in points."""
    lines = ["| metric | pair | seeds | mean difference | 95 % interval | per seed | reading |",
             "|---|---|---|---|---|---|---|"]
    for metric in ("top1", "linear_top1"):
        for row in paired_differences(records, metric):
            interval = "" if row["low"] is None else f"[{100 * row['low']:+.2f}, {100 * row['high']:+.2f}]"
            per_seed = ", ".join(f"{100 * d:+.1f}" for d in row["differences"])
            lines.append(f"| {metric} | {row['pair']} | {row['seeds']} | {100 * row['mean']:+.2f} | {interval} | "
                         f"{per_seed} | {verdict(row)} |")
    return "\n".join(lines) + "\n"


def table(records: list[dict]) -> str:
    """Markdown: mean +- std (sample, over seeds) per arm, then every run; an arm of one run has no spread."""
    columns = ("top1", "top5", "knn_top1", "linear_top1", "loss")

    def spread(values: list[float]) -> str:
        if len(values) < 2:
            return f"{values[0]:.4f} (one run)" if values else ""
        return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"

    lines = ["| arm | runs | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for arm in dict.fromkeys((r["objective"], r["init"]) for r in records):
        runs = [r for r in records if (r["objective"], r["init"]) == arm]
        name = arm_name(runs[0])
        cells = [spread([r[c] for r in runs if r[c] is not None]) for c in columns]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    lines += ["", "| objective | init | seed | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for r in records:
        cells = ["" if r[c] is None else f"{r[c]:.4f}" for c in columns]
        lines.append(f"| {r['objective']} | {r['init']} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a parameter override for every run (the budget), as `dvc exp run -S`")
    parser.add_argument("--out", type=Path, default=Path("reports/compare"))
    parser.add_argument("--report-only", action="store_true", help="write the tables from existing experiments")
    parser.add_argument("--direct", type=Path, metavar="WORK", help="run the stages without DVC, in WORK/<name>")
    parser.add_argument("--data", type=Path, help="--direct: the dataset folder")
    parser.add_argument("--tokens", type=Path, help="--direct: its token folder")
    parser.add_argument("--jobs", type=int, default=1, help="--direct: runs at a time, each with the cores / jobs "
                        "CPU threads (OMP_NUM_THREADS, where set, instead)")
    parser.add_argument("--redraw", action="store_true", help="rewrite OUT/results.md and results.png from "
                        "OUT/results.json alone (after runs merged by another revision of this script); give the "
                        "runs' --set again, which the records do not keep")
    parser.add_argument("--merge", action="store_true", help="keep the runs OUT/results.json holds already (other "
                        "seeds, run elsewhere) beside the new ones")
    args = parser.parse_args()

    if args.redraw:
        if not (args.out / "results.json").is_file():
            print(f"compare: error: --redraw: no {args.out / 'results.json'}", file=sys.stderr)
            return 2
        write_tables(json.loads((args.out / "results.json").read_text()), args)
        return 0
    runs = [(objective, init, seed) for seed in args.seeds for objective, init in arms(args.objectives)]
    args.code = code_revision()
    if args.merge and (problem := merge_problem(args.out / "results.json", args.code)):
        print(f"compare: error: {problem}", file=sys.stderr)
        return 2
    if args.direct:
        return compare_direct(runs, args)
    if not args.report_only:
        for objective, init, seed in runs:
            status = run_arm(objective, init, seed, args.set)
            if status:
                print(f"compare: error: `dvc exp run` of {experiment_name(objective, init, seed)} exited with status "
                      f"{status} (its message is above); the runs before it are kept as DVC experiments",
                      file=sys.stderr)
                return 2
    found = experiment_metrics()
    missing = [experiment_name(*run) for run in runs if experiment_name(*run) not in found]
    if missing:
        print(f"compare: error: no DVC experiment named {', '.join(missing)} (run without --report-only)",
              file=sys.stderr)
        return 2
    write_tables([record(*run, found[experiment_name(*run)], args.code) for run in runs], args)
    return 0


def compare_direct(runs: list[tuple[str, str, int]], args: argparse.Namespace) -> int:
    if not (args.data and args.tokens):
        print("compare: error: --direct needs --data and --tokens (the dataset folder and its token folder)",
              file=sys.stderr)
        return 2
    records, failed, lock = [], [], threading.Lock()
    # The cores shared out between the runs at a time: more threads than cores make every run crawl.
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // args.jobs))

    def one(run: tuple[str, str, int]) -> None:
        try:
            metrics = run_direct(*run, args.set, args.direct, args.data, args.tokens, threads)
        except RuntimeError as error:
            print(f"compare: error: {experiment_name(*run)}: {error}", file=sys.stderr, flush=True)
            failed.append(run)
            return
        with lock:
            records.append(record(*run, metrics, args.code))
            write_tables(list(records), args)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, runs))
    return 2 if failed else 0


def merge_problem(results: Path, code: str) -> str | None:
    """Why the runs in ``results`` cannot be merged with runs of code revision ``code``, or None."""
    if not results.is_file():
        return None
    held = {r.get("code") for r in json.loads(results.read_text())}
    if held <= {code}:
        return None
    named = ", ".join(sorted(revision or "none recorded" for revision in held))
    return (f"{results} holds runs of code revision {named}, and this code is {code}: a comparison's seeds "
            f"must come from the same training code. Run the seeds from a checkout of the commit that ran the "
            f"others, or write to another --out")


def plot(records: list[dict], path: Path) -> None:
    """results.png: each arm's fine-tuned top-1 seed by seed beside the raw pixels' linear probe,
    and the paired differences with their 95 % intervals (the rows of the differences table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mapet.engine.evaluate import save_figure

    names = list(dict.fromkeys(arm_name(r) for r in records))
    figure, (runs, differences) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1, 1.4]})
    for x, name in enumerate(names):
        for metric, offset, style in (("top1", -0.12, {"color": "#3a6ea5"}),
                                      ("linear_top1", 0.12, {"facecolors": "none", "edgecolors": "#c0504d"})):
            values = [100 * r[metric] for r in records if arm_name(r) == name and r.get(metric) is not None]
            runs.scatter([x + offset] * len(values), values, s=22, zorder=3, **style)
            if values:
                runs.hlines(statistics.mean(values), x + offset - 0.1, x + offset + 0.1, color="black", zorder=4)
    pixels = [100 * r["pixels_linear_top1"] for r in records if r.get("pixels_linear_top1") is not None]
    if pixels:
        runs.axhline(pixels[0], color="grey", linestyle="--", linewidth=1)
    runs.scatter([], [], color="#3a6ea5", label="fine-tuned, test top-1")
    runs.scatter([], [], facecolors="none", edgecolors="#c0504d", label="frozen, linear probe")
    runs.plot([], [], color="grey", linestyle="--", label="raw pixels, linear probe")
    runs.set_xticks(range(len(names)), names)
    runs.set(ylabel="top-1 (%)", title="Every seed; black: the mean")
    runs.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8, frameon=False)
    rows = [(metric, row) for metric in ("top1", "linear_top1") for row in paired_differences(records, metric)]
    for y, (metric, row) in enumerate(rows):
        color = "#3a6ea5" if metric == "top1" else "#c0504d"
        differences.scatter([100 * d for d in row["differences"]], [y] * row["seeds"], s=12, color=color, alpha=0.5)
        if row["low"] is not None:
            differences.errorbar(100 * row["mean"], y, xerr=[[100 * (row["mean"] - row["low"])],
                                                             [100 * (row["high"] - row["mean"])]],
                                 fmt="o", color=color, capsize=4)
    differences.axvline(0, color="black", linewidth=1)
    differences.set_yticks(range(len(rows)), [f"{'top-1' if m == 'top1' else 'linear'}: {row['pair']}"
                                              for m, row in rows], fontsize=8)
    differences.invert_yaxis()
    differences.set(xlabel="points, first arm minus second, seed by seed",
                    title="Paired differences, 95 % intervals (paired t)")
    seeds = sorted({r["seed"] for r in records})
    figure.suptitle(f"Objectives compared: {len(seeds)} seed(s) ({', '.join(map(str, seeds))})", fontsize=10)
    figure.tight_layout()
    save_figure(figure, path)


def write_tables(records: list[dict], args: argparse.Namespace) -> None:
    """OUT/results.json and results.md; with --merge, the runs already there that these records
    do not replace are kept (seeds run at another time or on another clone)."""
    if args.merge and (args.out / "results.json").is_file():
        new = {(r["objective"], r["init"], r["seed"]) for r in records}
        records = [r for r in json.loads((args.out / "results.json").read_text())
                   if (r["objective"], r["init"], r["seed"]) not in new] + records
    records.sort(key=lambda r: ([*OBJECTIVES, "none"].index(r["objective"]), r["seed"]))
    seeds = sorted({r["seed"] for r in records})
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", records)
    overrides = ", ".join(f"`{setting}`" for setting in args.set) or "none"
    codes = ", ".join(sorted({str(r.get("code")) for r in records}))
    write_text(args.out / "results.md", f"# Objectives compared\n\nSeeds {', '.join(map(str, seeds))}; "
                     f"overrides of params.yaml: {overrides}; code revision {codes} (the mapet sources and the "
                     f"training libraries' versions, as in the pipeline's fingerprint). Top-1/top-5: the fine-tuned classifier on the test "
                     f"split; k-NN and linear: the frozen backbone (`mapet probe`: k-NN on the average of patches, "
                     f"linear on CLS and average); loss: "
                     f"pre-training's last step.\n\n{pixels_line(records)}" + table(records) +
               "\n## Paired differences\n\nPer seed, the first arm minus the second (the same seed in both), in "
               "points of top-1: their mean and its 95 % interval (paired t over the seeds). An interval "
               "holding 0 does not rank the two arms.\n\n" + differences_table(records) +
               "\n![every seed and the paired differences](results.png)\n")
    plot(records, args.out / "results.png")
    print(f"wrote {args.out / 'results.json'}, results.md and results.png ({len(records)} runs)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
