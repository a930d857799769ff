"""ssn-edge command line: a thin layer over ssn_edge; every command's work lives in the package."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from ssn_edge import __version__

# Errors that are the user's to fix (bad file, bad recipe, missing weights): one line, no traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError)


def _user_errors() -> tuple[type[BaseException], ...]:
    extra: list[type[BaseException]] = []
    try:
        from ssn_edge.model.backbones import WeightsError

        extra.append(WeightsError)
    except Exception:  # the torch-free install has no training side
        pass
    return _USER_ERRORS + tuple(extra)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _user_errors() as exc:
            if os.environ.get("SSN_EDGE_DEBUG"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(__version__)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Train SuperSimpleNet, export it to OpenVINO FP32/FP16/INT8 and run it on a CPU."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s")


def _print_metrics(metrics: dict[str, float]) -> None:
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        click.echo(f"  {key:<{width}}  {value:8.2f}")


@main.command()
@click.option("--recipe", "recipe_path", required=True, type=click.Path(dir_okay=False), help="recipes/<name>.yaml")
@click.option("--data", "data_path", type=click.Path(), help="Dataset folder (MVTec layout) or manifest CSV.")
@click.option("--out", "out_dir", default="runs/train", show_default=True, type=click.Path(file_okay=False))
@click.option("--epochs", type=int, help="Override train.epochs.")
@click.option("--seed", type=int, help="Override train.seed.")
@click.option("--weights", help="Backbone weights file (torchvision state_dict).")
@click.option("--resume", type=click.Path(dir_okay=False), help="Continue from this checkpoint.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any recipe key, e.g. train.batch_size=16.")
def train(recipe_path, data_path, out_dir, epochs, seed, weights, resume, sets) -> None:
    """Train SSN from a recipe; writes checkpoint.pt, history.json and metrics.json to --out."""
    from ssn_edge.config import load_recipe, parse_override
    from ssn_edge.jobs import train_job

    overrides = dict(parse_override(s) for s in sets)
    if data_path:
        overrides["data.path"] = data_path
    if epochs is not None:
        overrides["train.epochs"] = epochs
    if seed is not None:
        overrides["train.seed"] = seed
    if weights:
        overrides["model.weights"] = weights
    recipe = load_recipe(recipe_path, overrides)
    result = train_job(recipe, Path(out_dir), resume=Path(resume) if resume else None)
    click.echo(f"checkpoint: {result.checkpoint}")
    if result.metrics:
        click.echo("test metrics:")
        _print_metrics(result.metrics)


@main.command("eval")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False))
@click.option("--data", "data_path", type=click.Path(), help="Dataset; default: the recipe's data.path.")
@click.option("--split", default="test", show_default=True)
@click.option("--weights", help="Backbone weights file, if not where training found it.")
@click.option("--out", "out_file", default=None, type=click.Path(dir_okay=False), help="metrics.json path (default: beside the checkpoint).")
def evaluate(checkpoint, data_path, split, weights, out_file) -> None:
    """Evaluate a checkpoint: image AUROC/AP/F1-max, pixel AUPRO/AP/AUROC."""
    from ssn_edge.jobs import eval_job

    metrics = eval_job(Path(checkpoint), data_path, split, weights)
    _print_metrics(metrics)
    out = Path(out_file) if out_file else Path(checkpoint).with_name("metrics.json")
    out.write_text(json.dumps(metrics, indent=2))
    click.echo(f"metrics: {out}")


if __name__ == "__main__":
    main()
