"""The ``speechkd`` command: one subcommand per stage, and ``run`` for the whole chain.

Typical use::

    speechkd run recipes/commands_mvq.yaml              # everything, resumable
    speechkd prepare recipes/commands_mvq.yaml          # or stage by stage
    speechkd train recipes/commands_mvq.yaml            # the teacher
    speechkd extract recipes/commands_mvq.yaml          # teacher layer -> float32 labels
    speechkd quantize recipes/commands_mvq.yaml         # -> codebook indexes (CI)
    speechkd pseudo-label recipes/commands_seqkd.yaml [--shard 0/4]   # teacher N-best (sequence-level KD)
    speechkd distill recipes/commands_mvq.yaml          # every student run of the recipe
    speechkd evaluate recipes/commands_mvq.yaml
    speechkd report recipes/commands_mvq.yaml
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP threads

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="speechkd: knowledge distillation for speech models (MVQ-KD and friends).\n\n"
    "Every stage reads a recipe (YAML, validated: an unknown key is an error) and works in the recipe's "
    "experiment directory; stages skip outputs that are complete, so re-running resumes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RecipeArg = typer.Argument(..., exists=True, dir_okay=False, help="recipe YAML, e.g. recipes/digits_mvq.yaml")
ExpOpt = typer.Option(None, "--exp-dir", help="experiment directory (overrides the recipe's exp_dir)")
CorporaOpt = typer.Option(
    None, "--corpora-dir", envvar="SPEECHKD_CORPORA",
    help="folder of the shared corpora (default: ../shared/corpora)",
)
ProgressOpt = typer.Option(True, "--progress/--no-progress", help="show progress bars")


def _experiment(recipe: Path, exp_dir: Optional[Path], corpora_dir: Optional[Path], progress: bool):
    from speechkd.config import RecipeError, load_recipe
    from speechkd.pipeline import Experiment

    overrides = {}
    if exp_dir is not None:
        overrides["exp_dir"] = str(exp_dir)
    try:
        r = load_recipe(recipe, overrides)
    except RecipeError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if corpora_dir is not None:
        r.data.corpora_dir = str(corpora_dir)
    exp = Experiment(r, progress=progress)
    exp.dir.mkdir(parents=True, exist_ok=True)
    exp.write_config()
    return exp


def _stage(name: str, recipe, exp_dir, corpora_dir, progress, **kw):
    from speechkd.pipeline import STAGES

    exp = _experiment(recipe, exp_dir, corpora_dir, progress)
    try:
        STAGES[name](exp, **kw)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        typer.echo(f"error in stage '{name}': {e}", err=True)
        raise typer.Exit(1)


@app.command()
def prepare(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
            progress: bool = ProgressOpt):
    """Build connected-word cuts (train/dev/test, speaker-disjoint), 80-dim fbank, and the tokenizer."""
    _stage("prepare", recipe, exp_dir, corpora_dir, progress)


@app.command()
def train(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
          progress: bool = ProgressOpt):
    """Train the teacher transducer (resumes from its last checkpoint)."""
    _stage("teacher", recipe, exp_dir, corpora_dir, progress)


@app.command()
def extract(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
            progress: bool = ProgressOpt):
    """Run the teacher over the training cuts and store its chosen layer as float32 labels."""
    _stage("extract", recipe, exp_dir, corpora_dir, progress)


@app.command()
def quantize(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
             progress: bool = ProgressOpt):
    """Train the multi-codebook quantizer and store uint8 codebook indexes (CI) beside the cuts."""
    _stage("quantize", recipe, exp_dir, corpora_dir, progress)


@app.command("pseudo-label")
def pseudo_label(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
                 progress: bool = ProgressOpt,
                 shard: Optional[str] = typer.Option(
                     None, help="decode only shard i of n (cuts i, i+n, ...), e.g. 0/4; run every shard (in parallel if "
                                "you like), then any run merges the labels once all cuts have them")):
    """The teacher's beam search writes an N-best list (tokens, text, log-prob) for every training cut.

    Labels go to labels/nbest/ in parts written atomically: a stopped run resumes where it stopped.
    """
    _stage("pseudo-label", recipe, exp_dir, corpora_dir, progress, shard=shard)


@app.command()
def distill(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
            progress: bool = ProgressOpt,
            student: Optional[str] = typer.Option(None, help="train only the student run with this name"),
            seed: Optional[list[int]] = typer.Option(None, help="train only these seeds (repeatable)")):
    """Train the recipe's students (baseline and KD), every seed; resumes stopped runs."""
    _stage("distill", recipe, exp_dir, corpora_dir, progress, only=student, seeds=seed or None)


@app.command()
def evaluate(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
             progress: bool = ProgressOpt):
    """WER (dev, test), parameters, CPU real-time factor and label bytes -> eval/*.json."""
    _stage("evaluate", recipe, exp_dir, corpora_dir, progress)


@app.command()
def report(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
           progress: bool = ProgressOpt):
    """Write report.md and plots/*.png from eval/*.json and the training logs."""
    _stage("report", recipe, exp_dir, corpora_dir, progress)


@app.command()
def run(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
        progress: bool = ProgressOpt):
    """Run every stage the recipe needs, in order, skipping complete outputs (resumable)."""
    from speechkd.pipeline import run_all

    exp = _experiment(recipe, exp_dir, corpora_dir, progress)
    try:
        run_all(exp)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
