"""Refuse bad data before any GPU time is spent: Great Expectations over the manifest, over what
the shards really hold, and over the class counts.

Every rule is one GX expectation with a plain-language name; a failed rule names the images that
broke it by source path (relative to the import's source folder) and key, e.g.
``val/fox/leaked.png (val_00000012)``; the duplicate and leakage rules add where the image's copies
are, the decode rule why it does not decode, and the import rule names the files it left out.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import tarfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from mapet.data.dataset import decode_problem, read_description, read_manifest
from mapet.data.shards import read_shard

OFFENDERS_KEPT = 1000
COPIES_NAMED = 3


@dataclass(frozen=True)
class Limits:
    """What the data must satisfy (params.yaml, section ``validate``)."""

    min_size: int = 1
    max_size: int = 100_000
    modes: tuple[str, ...] = ("L", "RGB")
    min_images_per_class: int = 1
    min_class_share: float = 0.0    # each class has at least this share of its split's largest class


@dataclass(frozen=True)
class RuleResult:
    rule: str
    success: bool
    failed: int
    offenders: list[str]


def _scan_shard(path: Path) -> list[dict]:
    """What the shard really holds: for each key, its label, sha256 and decode problem."""
    try:
        samples = list(read_shard(path))
    except (OSError, EOFError, tarfile.TarError):
        return []  # a missing or unreadable shard: each image listed in it fails "present in its shard"
    return [{"key": key, "stored_label": label, "stored_sha256": hashlib.sha256(data).hexdigest(),
             "decode_problem": decode_problem(data)[0]} for key, _, data, label in samples]


def _image_table(root: Path, manifest: pd.DataFrame, workers: int, progress: bool) -> pd.DataFrame:
    shards = sorted(manifest["shard"].unique())
    found: list[dict] = []
    with ExitStack() as stack:
        if workers > 1:
            scans = stack.enter_context(multiprocessing.Pool(workers)).imap(_scan_shard, [root / s for s in shards])
        else:
            scans = map(_scan_shard, [root / s for s in shards])
        for shard, records in tqdm(zip(shards, scans), total=len(shards), desc="validate", unit="shard",
                                   disable=not progress):
            found.extend({**record, "found_in": shard} for record in records)
    stored = pd.DataFrame(found, columns=["key", "stored_label", "stored_sha256", "decode_problem", "found_in"])
    stored = stored.drop_duplicates("key")
    table = manifest.merge(stored, on="key", how="left")
    table["in_shard"] = table["found_in"].eq(table["shard"])
    # an image missing from its shard fails only the presence rule
    table["decodable"] = ~table["in_shard"] | table["decode_problem"].eq("")
    table["sha256_matches"] = ~table["in_shard"] | table["stored_sha256"].eq(table["sha256"])
    splits_per_image = table.groupby("sha256")["split"].transform("nunique")
    table["splits_with_this_image"] = splits_per_image
    table["image"] = _image_names(table)
    table["image_and_copies"] = _with_copies(table)
    problem = table["decode_problem"].fillna("")
    table["image_and_problem"] = table["image"].where(problem.eq(""), table["image"] + ": " + problem)
    return table


def _image_names(manifest: pd.DataFrame) -> pd.Series:
    """``source_path (key)`` for each image; the key alone where the manifest has no source path."""
    paths = manifest["source_path"].fillna("")
    return manifest["key"].where(paths.eq(""), paths + " (" + manifest["key"] + ")")


def _with_copies(table: pd.DataFrame) -> pd.Series:
    """Each image's name, followed, for an image stored more than once, by where its copies are."""
    names = table["image"].copy()
    repeated = table[table["sha256"].duplicated(keep=False)]
    for _, group in repeated.groupby("sha256")["image"]:
        first = group.tolist()[:COPIES_NAMED + 1]
        for position, index in enumerate(group.index):
            others = (first[:position] + first[position + 1:])[:COPIES_NAMED]
            more = len(group) - 1 - len(others)
            names[index] += ", same image as " + ", ".join(others) + (f" and {more} more" if more else "")
    return names


def _class_table(manifest: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    splits = sorted(manifest["split"].unique())
    counts = manifest.groupby(["split", "label"]).size()
    rows = [{"split": split, "label": label, "class": f"{split}/{name}", "images": int(counts.get((split, label), 0))}
            for split in splits for label, name in enumerate(classes)]
    table = pd.DataFrame(rows, columns=["split", "label", "class", "images"])
    largest = table.groupby("split")["images"].transform("max").clip(lower=1)
    table["share_of_largest"] = table["images"] / largest
    return table


def _rules(limits: Limits, num_classes: int):
    """(rule name, table, id column, expectation) for every check."""
    import great_expectations.expectations as gxe

    return [
        ("import: every source file could be read", "bad_files", "path", gxe.ExpectTableRowCountToEqual(value=0)),
        ("manifest: keys are unique", "images", "image", gxe.ExpectColumnValuesToBeUnique(column="key")),
        ("shard: every listed image is present in its shard", "images", "image",
         gxe.ExpectColumnValuesToBeInSet(column="in_shard", value_set=[True])),
        ("shard: every image decodes", "images", "image_and_problem",
         gxe.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True])),
        ("shard: sha256 matches the manifest", "images", "image",
         gxe.ExpectColumnValuesToBeInSet(column="sha256_matches", value_set=[True])),
        ("label: within the class list", "images", "image",
         gxe.ExpectColumnValuesToBeBetween(column="label", min_value=0, max_value=num_classes - 1)),
        ("duplicates: no image twice within a split", "images", "image_and_copies",
         gxe.ExpectCompoundColumnsToBeUnique(column_list=["split", "sha256"])),
        ("leakage: no image in more than one split", "images", "image_and_copies",
         gxe.ExpectColumnValuesToBeBetween(column="splits_with_this_image", max_value=1)),
        (f"size: width within {limits.min_size}..{limits.max_size}", "images", "image",
         gxe.ExpectColumnValuesToBeBetween(column="width", min_value=limits.min_size, max_value=limits.max_size)),
        (f"size: height within {limits.min_size}..{limits.max_size}", "images", "image",
         gxe.ExpectColumnValuesToBeBetween(column="height", min_value=limits.min_size, max_value=limits.max_size)),
        (f"mode: one of {', '.join(limits.modes)}", "images", "image",
         gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=list(limits.modes))),
        (f"classes: at least {limits.min_images_per_class} images per class and split", "classes", "class",
         gxe.ExpectColumnValuesToBeBetween(column="images", min_value=limits.min_images_per_class)),
        (f"classes: balanced (each at least {limits.min_class_share:.0%} of its split's largest)", "classes",
         "class", gxe.ExpectColumnValuesToBeBetween(column="share_of_largest", min_value=limits.min_class_share)),
    ]


def _run_expectations(tables: dict[str, pd.DataFrame], limits: Limits, num_classes: int) -> list[RuleResult]:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("mapet")
    batches = {name: source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
               .get_batch(batch_parameters={"dataframe": table}) for name, table in tables.items()}
    results = []
    for rule, table_name, id_column, expectation in _rules(limits, num_classes):
        table = tables[table_name]
        result = batches[table_name].validate(expectation, result_format={
            "result_format": "COMPLETE", "unexpected_index_column_names": [id_column]})
        if isinstance(expectation, gx.expectations.ExpectTableRowCountToEqual):
            offenders = table[id_column].astype(str).tolist()
        else:
            offenders = [str(row[id_column]) for row in result.result.get("unexpected_index_list") or []]
        results.append(RuleResult(rule, bool(result.success), len(offenders), offenders[:OFFENDERS_KEPT]))
    return results


def validate_dataset(root: Path, limits: Limits, workers: int = 1, progress: bool = True) -> list[RuleResult]:
    """Check the dataset folder ``root``; one result per rule, in a fixed order."""
    root = Path(root)
    manifest = read_manifest(root)
    description = read_description(root)
    classes = description.get("classes", [])
    bad_files = pd.DataFrame(description.get("bad_files", []), columns=["path", "split", "reason"])
    bad_files["path"] = bad_files["path"] + " (" + bad_files["reason"] + ")"
    tables = {"images": _image_table(root, manifest, workers, progress),
              "classes": _class_table(manifest, classes),
              "bad_files": bad_files}
    return _run_expectations(tables, limits, len(classes))
