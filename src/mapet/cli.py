"""`mapet <command>`: thin argument parsing over the library; defaults come from params.yaml."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mapet.errors import MapetError
from mapet.params import DEFAULT_PARAMS, build_settings, check_model, load_params, param


def _export(args: argparse.Namespace) -> None:
    from mapet.models import load_pretrain_model, save_backbone

    params = load_params(args.params)
    out_dir = Path(param(params, "pretrain.out_dir"))
    model_file = args.model or out_dir / "model.safetensors"
    out = args.out or out_dir / "backbone.safetensors"
    model = load_pretrain_model(model_file)
    save_backbone(model, out)
    print(f"wrote {out}: {model.backbone_name} backbone ({model.objective} pre-training), "
          f"loadable with timm.create_model({model.backbone_name!r}, **timm_kwargs)")


def _weights_import(args: argparse.Namespace) -> None:
    from mapet.models.official import import_official_mapet

    classes = None
    if args.classes_from:
        from mapet.data.dataset import read_manifest

        manifest = read_manifest(Path(args.classes_from))
        names = manifest.drop_duplicates("label").sort_values("label")
        classes = [str(name) for name in names["class_name"]]
    print("wrote " + import_official_mapet(Path(args.source), Path(args.out), classes, args.num_heads))


def _promote(args: argparse.Namespace) -> None:
    from mapet.registry.gate import write_decision
    from mapet.registry.gto import promote

    params = load_params(args.params)
    decision = promote(Path(args.repo), args.rev, Path(args.data or param(params, "data.dir")),
                       param(params, "pipeline.promotion.stage"), float(param(params, "pipeline.promotion.min_delta")),
                       param(params, "evaluate.crop_pct"))
    write_decision(decision, Path(args.out))
    verdict = f"promoted to {decision.stage!r}" if decision.promoted else "registered, not promoted"
    print(f"classifier {decision.candidate_version} at {decision.candidate_revision[:12]}: {verdict}. "
          f"{decision.reason[0].upper()}{decision.reason[1:]}. Wrote {Path(args.out) / 'decision.md'}")


def _registry_list(args: argparse.Namespace) -> None:
    from mapet.registry import open_registry
    from mapet.registry.gate import version_table
    from mapet.registry.gto import GTORegistry

    params = load_params(args.params)
    arguments = (params.get("pipeline") or {}).get("arguments") or {}
    url = (arguments.get("registry_url") or "") if args.url is None else args.url
    if not (url or args.workspace or args.repo):
        raise MapetError("no registry to read: pass --url (Kubeflow Model Registry, or set "
                         "pipeline.arguments.registry_url), --workspace (the folder mounted at /workspace, e.g. "
                         "outputs/pipeline-workspace after `python -m pipelines.cli local`) or --repo (a git "
                         "repository's GTO registry, where `mapet promote` registers)")
    for option, folder in (("--workspace", args.workspace), ("--repo", args.repo)):
        if folder and not Path(folder).is_dir():
            raise MapetError(f"{option} {folder}: no such folder")
    if args.repo:
        registry = GTORegistry(Path(args.repo), param(params, "pipeline.promotion.stage"))
    else:
        registry = open_registry(url, Path(args.workspace or "."),
                                 args.model or arguments.get("registry_model") or "mapet")
    print(f"{registry.where}\n{version_table(registry)}")


def _params(args: argparse.Namespace) -> None:
    import yaml

    from mapet.files import write_text
    from mapet.params import resolve_params, set_param

    load_params(args.params)                                            # the file as it is must be sound
    document = {**yaml.safe_load(Path(args.params).read_text()), "_path": str(args.params)}
    for assignment in args.set:
        set_param(document, assignment)
    del document["_path"]
    effective = resolve_params(document, f"{args.params} with --set")  # and so must the result
    if not args.out:
        print(yaml.safe_dump({k: v for k, v in effective.items() if k not in ("_path", "presets")}, sort_keys=False),
              end="")
        return
    write_text(args.out, yaml.safe_dump(document, sort_keys=False))
    preset = f", preset {document['preset']!r}" if document.get("preset") else ""
    print(f"wrote {args.out}: {args.params} with {len(args.set)} override(s){preset}")


def _data_import(args: argparse.Namespace) -> None:
    from mapet.data.dataset import import_dataset
    from mapet.data.sources import FORMATS

    params = load_params(args.params)
    format_name = args.format or param(params, "data.format")
    if format_name not in FORMATS:
        raise MapetError(f"unknown format {format_name!r} (choose from {', '.join(FORMATS)})")
    source_dir = Path(args.source or param(params, "data.source"))
    out = Path(args.out or param(params, "data.dir"))
    limits = param(params, "data.max_per_split") or {}
    source = FORMATS[format_name](source_dir, limits)
    result = import_dataset(source, out, format_name, args.shard_size or param(params, "data.shard_size"),
                            workers=args.workers or param(params, "data.workers"))
    counts = ", ".join(f"{split} {count}" for split, count in result.images.items())
    print(f"wrote {out}: {counts} images")
    if result.bad_files:
        listing = "\n".join(f"  {source_dir / bad['path']}: {bad['reason']}" for bad in result.bad_files)
        raise MapetError(f"{len(result.bad_files)} source file(s) could not be imported; they are left out and "
                         f"recorded in {out}/dataset.json, so validation refuses this dataset until they are "
                         f"fixed or removed:\n{listing}")


def _default_report_dir(data: Path, params: dict) -> Path:
    """validate.report_dir for the pipeline's own data (data.dir); for any other dataset folder
    DATA, the folder DATA-validation beside it, so that checking other data never overwrites the
    pipeline's tracked report."""
    if data.resolve() == Path(param(params, "data.dir")).resolve():
        return Path(param(params, "validate.report_dir"))
    data = Path(os.path.normpath(data))
    if data.name in ("", ".."):
        data = Path(os.path.abspath(data))
    return data.with_name(f"{data.name}-validation")


def _validate(args: argparse.Namespace) -> None:
    from mapet.validation import Limits, validate_dataset
    from mapet.validation.report import summary, write_html, write_json

    params = load_params(args.params)
    data = Path(args.data or param(params, "data.dir"))
    report = Path(args.report) if args.report else _default_report_dir(data, params)
    section = param(params, "validate")
    limits = build_settings("validate", section, Limits, ignore=("report_dir", "workers"))
    results = validate_dataset(data, limits, workers=args.workers or section.get("workers", 1))
    write_json(results, data, report / "validation.json")
    write_html(results, data, report / "validation.html")
    print(summary(results, data))
    print(f"report: {report / 'validation.html'}")
    if not all(r.success for r in results):
        raise MapetError(f"{data} fails validation (details in {report / 'validation.html'})")


def _vit_grid(params: dict) -> tuple[int, int]:
    check_model(param(params, "model"))
    side = param(params, "model.img_size") // param(params, "model.patch_size")
    return side, side


def _tokenizer_build(args: argparse.Namespace) -> None:
    from mapet.files import file_sha256
    from mapet.tokenizers.codebook import Codebook, KMeansSettings, sample_patch_vectors, save_codebook, train_kmeans
    from mapet.tokenizers.encoders import create_encoder

    params = load_params(args.params)
    section = param(params, "tokenizer")
    data = Path(args.data or param(params, "data.dir"))
    out = Path(args.out or param(params, "tokenizer.out_dir"))
    encoder = create_encoder(param(params, "tokenizer.encoder"))
    encoder.check_grid(_vit_grid(params))
    grid, _ = encoder.grid_and_dim()
    description = encoder.describe()
    if getattr(encoder, "codebook", None) is not None:              # VQ-KD: the checkpoint's own codes
        codebook = encoder.codebook
        save_codebook(Codebook(codebook, {"encoder": description, "k": len(codebook), "grid": list(grid),
                                          "copied_from": {"checkpoint": description["weights"],
                                                          "sha256": file_sha256(Path(description["weights"]))}}),
                      out / "codebook.safetensors")
        print(f"wrote {out / 'codebook.safetensors'}: the {len(codebook)} codes of {description['weights']} "
              f"(copied, no k-means)")
        return
    kmeans = build_settings("tokenizer", {k: v for k, v in section.items() if k in KMeansSettings.__dataclass_fields__},
                      KMeansSettings)
    vectors = sample_patch_vectors(encoder, data, section.get("split", "train"), int(param(params, "tokenizer.sample_images")),
                                   int(param(params, "tokenizer.max_vectors")), kmeans.seed,
                                   batch_size=section.get("batch_size", 64), workers=section.get("workers", 0))
    print(f"k-means: {len(vectors)} vectors of dim {vectors.shape[1]} -> k = {kmeans.k} "
          f"({kmeans.iterations} iterations x {kmeans.restarts} restarts)")
    centroids, result = train_kmeans(vectors, kmeans)
    save_codebook(Codebook(centroids, {"encoder": description, "k": kmeans.k, "grid": list(grid),
                                       "kmeans": vars(kmeans), "vectors": len(vectors), **result}),
                  out / "codebook.safetensors")
    print(f"wrote {out / 'codebook.safetensors'}: {kmeans.k} codes from {description['name']} features "
          f"in {result['kmeans_seconds']} s")
    if not description["clip"]:
        print(f"note: {description['note']}")


def _tokenize(args: argparse.Namespace) -> None:
    from mapet.data.dataset import read_manifest
    from mapet.tokenizers.codebook import load_codebook
    from mapet.tokenizers.encoders import create_encoder
    from mapet.tokenizers.health import codebook_health, write_health
    from mapet.tokenizers.tokens import load_tokens, tokenize_dataset

    params = load_params(args.params)
    data = Path(args.data or param(params, "data.dir"))
    codebook_path = Path(args.codebook or Path(param(params, "tokenizer.out_dir")) / "codebook.safetensors")
    out = Path(args.out or param(params, "tokenize.out_dir"))
    codebook = load_codebook(codebook_path)
    encoder = create_encoder(param(params, "tokenizer.encoder"))
    description = tokenize_dataset(encoder, codebook, codebook_path, data, out,
                                   batch_size=param(params, "tokenize.batch_size"),
                                   workers=param(params, "tokenize.workers"))
    tokens, _ = load_tokens(out, data)
    manifest = read_manifest(data)
    train = (manifest["split"] == param(params, "tokenizer.split")).to_numpy()
    metrics, counts = codebook_health(tokens[train], codebook.k)
    write_health(metrics, counts, out, description["encoder"]["name"])
    print(f"wrote {out}: {description['rows']} images x {description['grid'][0]}x{description['grid'][1]} tokens; "
          f"{metrics['codes_used']}/{metrics['codes']} codes used, perplexity {metrics['perplexity']}")


def _pretrain(args: argparse.Namespace) -> None:
    from mapet.engine.steps import loop_settings
    from mapet.engine.pretrain import PretrainSettings, run_pretrain
    from mapet.engine.probe import ProbeSettings

    params = load_params(args.params)
    config = loop_settings("pretrain", param(params, "pretrain"), param(params, "model"), PretrainSettings)
    if args.objective:
        config.objective = args.objective
    if args.init:
        config.init = args.init
    data = Path(args.data or param(params, "data.dir"))
    tokens = Path(args.tokens or param(params, "tokenize.out_dir"))
    out = Path(args.out or param(params, "pretrain.out_dir"))
    probe = build_settings("probe", params.get("probe") or {}, ProbeSettings, ignore=("out_dir",))
    metrics = run_pretrain(config, data, tokens, out, resume=args.resume, probe=probe)
    if int(os.environ.get("RANK", "0")) == 0:
        knn = f", k-NN top-1 {metrics['knn_top1']}" if "knn_top1" in metrics else ""
        print(f"wrote {out}: model.safetensors, backbone.safetensors; final loss {metrics['loss']}, "
              f"token accuracy {metrics['token_accuracy']}{knn}")


def _finetune(args: argparse.Namespace) -> None:
    from mapet.engine.steps import loop_settings
    from mapet.engine.finetune import FinetuneSettings, run_finetune

    params = load_params(args.params)
    config = loop_settings("finetune", param(params, "finetune"), param(params, "model"), FinetuneSettings,
                           model_keys_owned=("drop_path_rate",))
    data = Path(args.data or param(params, "data.dir"))
    out = Path(args.out or param(params, "finetune.out_dir"))
    if args.scratch:
        config.init = "scratch"
    if config.init not in ("pretrained", "scratch"):
        raise MapetError(f"params: finetune.init must be pretrained or scratch, got {config.init!r}")
    if config.head_init not in ("random", "probe"):
        raise MapetError(f"params: finetune.head_init must be random or probe, got {config.head_init!r}")
    backbone = None if config.init == "scratch" else \
        Path(args.backbone or Path(param(params, "pretrain.out_dir")) / "backbone.safetensors")
    metrics = run_finetune(config, data, backbone, out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {out / 'model.safetensors'}: final training loss {metrics['loss']}")


def _evaluate(args: argparse.Namespace) -> None:
    from mapet.engine.evaluate import run_evaluate

    params = load_params(args.params)
    model = Path(args.model or Path(param(params, "finetune.out_dir")) / "model.safetensors")
    out = Path(args.out or param(params, "evaluate.out_dir"))
    metrics = run_evaluate(model, Path(args.data or param(params, "data.dir")), args.split or param(params, "evaluate.split"),
                           out, param(params, "evaluate.crop_pct"), param(params, "evaluate.batch_size"),
                           param(params, "evaluate.workers"))
    top5 = f", top-5 {metrics['top5']:.4f}" if "top5" in metrics else ""
    print(f"{metrics['split']}: top-1 {metrics['top1']:.4f}{top5} on {metrics['images']} images; wrote {out}")


def _probe(args: argparse.Namespace) -> None:
    import timm
    import torch

    from mapet.data.dataset import read_description
    from mapet.files import write_json
    from mapet.engine.probe import ProbeSettings, plot_probe, run_probe
    from mapet.models import load_backbone_file

    params = load_params(args.params)
    settings = build_settings("probe", param(params, "probe"), ProbeSettings, ignore=("out_dir",))
    data = Path(args.data or param(params, "data.dir"))
    out = Path(args.out or param(params, "probe.out_dir"))
    if args.scratch:
        model = dict(param(params, "model"))
        torch.manual_seed(settings.seed)
        backbone, source = timm.create_model(model.pop("backbone"), num_classes=0, **model), "scratch"
    else:
        source = Path(args.backbone or Path(param(params, "pretrain.out_dir")) / "backbone.safetensors")
        backbone = load_backbone_file(source)
    metrics = {"backbone": str(source), **run_probe(backbone, data, settings, len(read_description(data)["classes"]))}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    plot_probe(metrics, out / "probe.png")
    print(f"probe of {source}: k-NN top-1 {metrics['knn_top1']:.4f} (average of patches), linear top-1 "
          f"{metrics['linear_top1']:.4f} (CLS and average; average alone {metrics['avg']['linear_top1']:.4f}; "
          f"CLS: {metrics['cls']['knn_top1']:.4f} / {metrics['cls']['linear_top1']:.4f}; "
          f"raw pixels: {metrics['pixels_knn_top1']:.4f} / {metrics['pixels_linear_top1']:.4f}) "
          f"on {metrics['test_images']} {settings.test_split} images; wrote {out}")


def _pictures(args: argparse.Namespace) -> None:
    from mapet.engine.pictures import PicturesSettings, run_pictures

    params = load_params(args.params)
    section = params.get("pictures") or {}
    settings = build_settings("pictures", section, PicturesSettings, ignore=("out_dir",))
    if args.images is not None:
        settings.images = args.images
    model = Path(args.model or Path(param(params, "pretrain.out_dir")) / "model.safetensors")
    out = Path(args.out or section.get("out_dir", "outputs/pictures"))
    pretrain = params.get("pretrain") or {}
    shown = run_pictures(model, Path(args.data or param(params, "data.dir")),
                         Path(args.tokens or param(params, "tokenize.out_dir")), out, settings,
                         num_predict=pretrain.get("num_predict"), min_block=pretrain.get("mim_min_block", 16))
    print(f"wrote {out}: predictions.png ({len(shown['images'])} {settings.split} images, token accuracy "
          f"{shown['token_accuracy']:.3f}), codebook.png ({len(shown['codes'])} codes), index.html")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mapet", description="MaPeT pre-training workflow.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(group, name: str, handler, help_text: str) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--params", default=DEFAULT_PARAMS, type=Path, help="parameters file (default: %(default)s)")
        sub.set_defaults(handler=handler)
        return sub

    params_command = command(commands, "params", _params,
                             "Show the effective parameters (preset applied), or write a copy with overrides.")
    params_command.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                                help="override a field, as `dvc exp run -S` does (repeatable)")
    params_command.add_argument("--out", type=Path, help="write the overridden parameters file here")

    data = commands.add_parser("data", help="Dataset commands.", description="Dataset commands.")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    importer = command(data_commands, "import", _data_import,
                       "Import images into tar shards (WebDataset layout) plus manifest.parquet.")
    importer.add_argument("--format", help="fashion-mnist or imagefolder (default: data.format)")
    importer.add_argument("--source", help="source folder (default: data.source)")
    importer.add_argument("--out", help="dataset folder to write (default: data.dir)")
    importer.add_argument("--shard-size", type=int, help="images per shard (default: data.shard_size)")
    importer.add_argument("--workers", type=int, help="decoding processes (default: data.workers)")

    validate = command(commands, "validate", _validate, "Validate a dataset folder with Great Expectations.")
    validate.add_argument("--data", help="dataset folder (default: data.dir)")
    validate.add_argument("--report", help="report folder (default: validate.report_dir for data.dir; for other "
                          "--data DIR, DIR-validation beside it, never the pipeline's report)")
    validate.add_argument("--workers", type=int, help="shard-reading processes (default: validate.workers)")

    tokenizer = commands.add_parser("tokenizer", help="Tokenizer commands.", description="Tokenizer commands.")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    build = command(tokenizer_commands, "build", _tokenizer_build,
                    "Sample patch features of the training split and run k-means: the k-CLIP codebook.")
    build.add_argument("--data", help="dataset folder (default: data.dir)")
    build.add_argument("--out", help="output folder (default: tokenizer.out_dir)")

    tokenize = command(commands, "tokenize", _tokenize,
                       "Give every patch of every image its nearest codebook id (resumable).")
    tokenize.add_argument("--data", help="dataset folder (default: data.dir)")
    tokenize.add_argument("--codebook", help="codebook file (default: <tokenizer.out_dir>/codebook.safetensors)")
    tokenize.add_argument("--out", help="output folder (default: tokenize.out_dir)")

    pretrain = command(commands, "pretrain", _pretrain,
                       "Pre-train the ViT (MaPeT, PLM or MIM) on DeepSpeed; run it under torchrun for several processes.")
    pretrain.add_argument("--objective", choices=["mapet", "plm", "mim"], help="(default: pretrain.objective)")
    pretrain.add_argument("--data", help="dataset folder (default: data.dir)")
    pretrain.add_argument("--tokens", help="token folder (default: tokenize.out_dir)")
    pretrain.add_argument("--out", help="output folder (default: pretrain.out_dir)")
    pretrain.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/latest if present")
    pretrain.add_argument("--init", help="a pre-training model file to start from (default: pretrain.init)")

    finetune = command(commands, "finetune", _finetune,
                       "Fine-tune a ViT classifier from the pre-trained backbone (or from scratch) on DeepSpeed.")
    source = finetune.add_mutually_exclusive_group()
    source.add_argument("--backbone", help="backbone file (default: <pretrain.out_dir>/backbone.safetensors)")
    source.add_argument("--scratch", action="store_true", help="random initialisation, the baseline (default: finetune.init)")
    finetune.add_argument("--data", help="dataset folder (default: data.dir)")
    finetune.add_argument("--out", help="output folder (default: finetune.out_dir)")
    finetune.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/latest if present")

    evaluate = command(commands, "evaluate", _evaluate, "Top-1/top-5, per-class accuracy and confusion matrix.")
    evaluate.add_argument("--model", help="classifier file (default: <finetune.out_dir>/model.safetensors)")
    evaluate.add_argument("--data", help="dataset folder (default: data.dir)")
    evaluate.add_argument("--split", help="split to evaluate (default: evaluate.split)")
    evaluate.add_argument("--out", help="output folder (default: evaluate.out_dir)")

    probe = command(commands, "probe", _probe,
                    "k-NN and linear-probe top-1 of a frozen backbone's features (or of a random init).")
    chosen = probe.add_mutually_exclusive_group()
    chosen.add_argument("--backbone", help="backbone file (default: <pretrain.out_dir>/backbone.safetensors)")
    chosen.add_argument("--scratch", action="store_true", help="a random initialisation of params' model: the baseline")
    probe.add_argument("--data", help="dataset folder (default: data.dir)")
    probe.add_argument("--out", help="output folder (default: probe.out_dir)")

    pictures = command(commands, "pictures", _pictures,
                       "Pictures of a pre-trained model's token predictions and of the codebook's most used codes.")
    pictures.add_argument("--model", help="pre-training model file (default: <pretrain.out_dir>/model.safetensors)")
    pictures.add_argument("--data", help="dataset folder (default: data.dir)")
    pictures.add_argument("--tokens", help="token folder (default: tokenize.out_dir)")
    pictures.add_argument("--images", type=int, help="images shown with their predictions (default: pictures.images)")
    pictures.add_argument("--out", help="output folder (default: pictures.out_dir)")

    weights = commands.add_parser("weights", help="Model files from elsewhere.", description="Model files from elsewhere.")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True, metavar="COMMAND")
    importer = command(weights_commands, "import", _weights_import,
                       "Convert a checkpoint of the paper's code (aimagelab/MaPeT): a fine-tuned classifier into a "
                       "classifier file (`mapet evaluate --model`), the pre-training model into a pre-training "
                       "model file (`mapet export`, `mapet pretrain --init`).")
    importer.add_argument("--from", dest="layout", required=True, choices=["official-mapet"], help="the checkpoint's layout")
    importer.add_argument("source", help="the checkpoint file (.pth, .pth.tar, .tar)")
    importer.add_argument("--out", required=True, help="the model file to write (.safetensors)")
    importer.add_argument("--classes-from", metavar="DATA", help="a dataset folder whose class names (by label) the "
                          "classifier's outputs take (default: class_0, class_1, ...)")
    importer.add_argument("--num-heads", type=int, help="attention heads (default: width / 64, as standard ViTs)")

    promote_command = command(commands, "promote", _promote,
                              "Register a committed run's classifier and backbone (GTO) and move them to the "
                              "stage when the classifier beats the champion there by pipeline.promotion.min_delta.")
    promote_command.add_argument("--rev", default="HEAD", help="the committed run (default: %(default)s)")
    promote_command.add_argument("--repo", default=".", help="the git repository (default: %(default)s)")
    promote_command.add_argument("--data", help="the dataset a champion evaluated on other data is evaluated on "
                                 "again (default: data.dir)")
    promote_command.add_argument("--out", default="outputs/promotion", help="decision.json and decision.md "
                                 "(default: %(default)s)")

    registry = commands.add_parser("registry", help="The model registries: the pipeline's, and GTO's.",
                                   description="The model registries: the pipeline's, and GTO's.")
    registry_commands = registry.add_subparsers(dest="registry_command", required=True, metavar="COMMAND")
    listing = command(registry_commands, "list", _registry_list,
                      "The registered versions, newest first: stage, test top-1, data, commit, fingerprint.")
    listing.add_argument("--url", help="Kubeflow Model Registry, http://HOST:PORT (default: "
                         "pipeline.arguments.registry_url)")
    listing.add_argument("--workspace", help="without a URL: the workspace folder whose registry/ to read")
    listing.add_argument("--model", help="the registered model (default: pipeline.arguments.registry_model, mapet)")
    listing.add_argument("--repo", help="instead: the classifier versions of this git repository's GTO registry "
                         "(`mapet promote`), the stage pipeline.promotion.stage")

    export = command(commands, "export", _export,
                     "Write a pre-trained model's backbone as a timm-loadable safetensors file.")
    export.add_argument("--model", type=Path, help="pre-training model file (default: <pretrain.out_dir>/model.safetensors)")
    export.add_argument("--out", type=Path, help="backbone file to write (default: <pretrain.out_dir>/backbone.safetensors)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except MapetError as error:
        print(f"mapet {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
