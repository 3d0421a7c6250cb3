"""The experiment's stages, each reading the previous stage's files from the experiment directory.

    prepare   -> cuts/{train,dev,test}.jsonl.gz (+ unlabelled.jsonl.gz), fbank, cuts/skipped.jsonl, lang/tokens.model
    teacher   -> teacher/model.safetensors (+ metrics.csv, ckpt/ for resuming)
    extract   -> labels/cuts_train_emb.jsonl.gz + labels/teacher_embeddings*.h5 (float32 teacher layer)
    quantize  -> labels/quantizer.safetensors, labels/cuts_train_ci.jsonl.gz + labels/codebook_indexes*.ci
    pseudo-label -> labels/nbest/part-*.jsonl.gz, then labels/cuts_train_nbest.jsonl.gz (teacher N-best)

The labelling stages (extract, quantize, pseudo-label) live in :mod:`speechkd.labels.stages`: sharded by
``--shard i/n`` or by rank in a multi-process run, merged deterministically.
    distill   -> students/<name>-seed<k>/model.safetensors for every student run of the recipe
    evaluate  -> eval/<model>.json (+ eval/<model>-<split>-errs.txt)
    report    -> report.md, plots/*.png

With ``teacher.hf_dir`` (a Hugging Face HuBERT / wav2vec 2.0 / WavLM directory) the teacher stage only checks
that directory, ``extract`` runs that model over the training waveforms (its hidden states at its own frame
shift, 20 ms for the standard CNN), and ``evaluate`` / ``report`` have no teacher row (no ASR head, no WER).

The teacher labels (extract, quantize, pseudo-label) cover the training cuts and the untranscribed cuts of
``data.unlabelled``; students of label-based methods (mvq, l1, l2, seq) train on both, the reference loss only
on the transcribed ones.

Every stage skips work whose outputs are complete (each output is written atomically, the marker file
last), so ``speechkd run`` resumes a stopped experiment; a stopped training resumes from its last
checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from speechkd.config import Recipe, dump_recipe, needs_project_teacher
from speechkd.labels.stages import extract, pseudo_label, quantize
from speechkd.utils import log, seeded, write_json_atomic, write_text_atomic


class Experiment:
    """Paths and shared objects of one experiment directory.

    Args:
      recipe: the validated recipe; ``recipe.exp_dir`` is the directory.
      progress: show progress bars.
    """

    def __init__(self, recipe: Recipe, progress: bool = True):
        self.recipe = recipe
        self.dir = Path(recipe.exp_dir)
        self.progress = progress
        self._tokenizer = None
        self._teacher = None

    # paths
    def cuts_path(self, split: str) -> Path:
        return self.dir / "cuts" / f"{split}.jsonl.gz"

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / "lang" / "tokens.model"

    @property
    def teacher_dir(self) -> Path:
        from speechkd.config import project_teacher_dir

        return project_teacher_dir(self.dir)

    @property
    def emb_cuts_path(self) -> Path:
        return self.dir / "labels" / "cuts_train_emb.jsonl.gz"

    @property
    def ci_cuts_path(self) -> Path:
        return self.dir / "labels" / "cuts_train_ci.jsonl.gz"

    @property
    def quantizer_path(self) -> Path:
        return self.dir / "labels" / "quantizer.safetensors"

    @property
    def nbest_dir(self) -> Path:
        return self.dir / "labels" / "nbest"

    @property
    def nbest_cuts_path(self) -> Path:
        return self.dir / "labels" / "cuts_train_nbest.jsonl.gz"

    def student_dir(self, name: str, seed: int) -> Path:
        return self.dir / "students" / f"{name}-seed{seed}"

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from speechkd.data.tokenizer import Tokenizer

            self._tokenizer = Tokenizer(self.tokenizer_path)
        return self._tokenizer

    def cuts(self, split: str):
        from speechkd.data.datamodule import load_cuts

        return load_cuts(self.cuts_path(split))

    def label_cuts(self):
        """The cuts the teacher labels (frame labels, N-best): the training cuts, then the untranscribed cuts of
        ``data.unlabelled`` (``cuts/unlabelled.jsonl.gz``) when the recipe names any."""
        cuts = self.cuts("train")
        if self.recipe.data.unlabelled:
            cuts = cuts + self.cuts("unlabelled")
        return cuts

    def write_config(self) -> None:
        """Write the resolved recipe to ``config.yaml`` (every default spelled out)."""
        write_text_atomic(self.dir / "config.yaml", dump_recipe(self.recipe))

    @property
    def teacher(self):
        """The recipe's :class:`speechkd.teachers.base.Teacher` (:func:`speechkd.teachers.base.teacher_of`)."""
        if self._teacher is None:
            from speechkd.teachers.base import teacher_of

            self._teacher = teacher_of(self)
        return self._teacher

    def teacher_frame_shift(self) -> float:
        """Seconds per teacher frame (:meth:`speechkd.teachers.base.Teacher.frame_shift`)."""
        return self.teacher.frame_shift()

    def student_frame_shift(self, run=None) -> float:
        """Seconds per encoder frame of a student run (default: the recipe's student_model): 10 ms x subsampling."""
        from speechkd.data.datamodule import FRAME_SHIFT

        student = self.recipe.student_model_of(run) if run is not None else self.recipe.student_model
        return FRAME_SHIFT * student.subsampling

    def teacher_frame_ratio(self, run=None, teacher_frame_shift: Optional[float] = None) -> int:
        """Teacher frames per student frame for a student run (default: the recipe's student_model):
        :meth:`student_frame_shift` / ``teacher_frame_shift`` (default :meth:`teacher_frame_shift`; give the
        stored labels' frame shift when labels are used).

        Raises:
          ValueError: the ratio is not a whole number >= 1 (see :func:`speechkd.methods.base.frame_ratio_of`).
        """
        from speechkd.methods.base import frame_ratio_of

        t = self.teacher_frame_shift() if teacher_frame_shift is None else teacher_frame_shift
        return frame_ratio_of(self.student_frame_shift(run), t)


# ---------------------------------------------------------------- prepare
def prepare(exp: Experiment) -> None:
    """Build the data of ``data.source`` (see :mod:`speechkd.data.prepare`): checked cuts for train/dev/test (and
    unlabelled), fbank in resumable chunks, the skip report, the tokenizer."""
    from speechkd.data.prepare import prepare_data

    prepare_data(exp)


# ---------------------------------------------------------------- teacher
def train_teacher(exp: Experiment) -> None:
    """The teacher stage (:meth:`speechkd.teachers.base.Teacher.prepare`): train the project's teacher (resumable), or
    check a given checkpoint (e.g. ``teacher.hf_dir``: directory, weights, ``teacher.layer`` in range).

    Raises:
      FileNotFoundError / NotADirectoryError / ValueError: a bad checkpoint or ``teacher.layer`` (naming them).
    """
    exp.teacher.prepare()


def load_audio_16k(cut) -> np.ndarray:
    """A cut's mono waveform at 16 kHz, ``(S,)`` float32 samples (lhotse resamples a cut at another rate).

    Raises:
      ValueError: the audio cannot be read, or has more than one channel (naming the cut).
    """
    from speechkd.data.classification import waveform_batches
    from speechkd.teachers.hf import SAMPLE_RATE

    batch = next(waveform_batches([cut], cut.duration, sampling_rate=SAMPLE_RATE))
    return batch["wavs"][0].numpy()



# ---------------------------------------------------------------- distill
def make_kd(exp: Experiment, run, seed: int = 0):
    """The KD method of a student run (built by its registered :class:`speechkd.methods.MethodSpec`), the training
    cuts carrying its labels, and an optional model init.

    Args:
      exp, run: the experiment and the student run.
      seed: the run's seed (e.g. seeds the initial weights of a CoDERT module).

    Returns:
      ``(kd method or None, CutSet, init_fn or None)``; ``init_fn(student)`` copies teacher blocks
      (``kd.init_from_teacher``).

    Raises:
      ValueError / FileNotFoundError: as the method's ``build`` (labels missing or written by another quantizer or
        teacher, a CoDERT run without transducers, a student frame shift that is not a whole multiple of the
        labels'); a run that needs the project's teacher while the recipe's cannot decode (e.g. ``teacher.hf_dir``).
    """
    from speechkd.methods import method_spec

    kd_cfg = run.kd
    need = None if exp.teacher.can_decode else needs_project_teacher(kd_cfg, exp.teacher.has_nbest)
    if need:
        raise ValueError(f"student '{run.name}' uses {need}, but the teacher ({exp.teacher.describe()}) is not the "
                         "project's ASR model")
    def init_from_teacher_fn(student):
        from speechkd.methods.seq_kd import init_from_teacher
        from speechkd.models.build import load_model

        mapping = init_from_teacher(student, load_model(exp.teacher_dir)[0])
        log(f"distill: {run.name}: {len(mapping)} tensors initialised from the teacher")

    with seeded(seed):  # a method's own modules (an MVQ / L1 head, a CoDERT projection) start from the run's seed
        kd, cuts = method_spec(kd_cfg.method).build(exp, run, seed)
    return kd, cuts, init_from_teacher_fn if kd_cfg.init_from_teacher else None


def _train_student(exp: Experiment, name: str, seed: int, num_threads: Optional[int] = None) -> None:
    """Train one student run (one seed) into ``students/<name>-seed<seed>``."""
    from speechkd.training import fit_model

    run = next(r for r in exp.recipe.students if r.name == name)
    out = exp.student_dir(name, seed)
    train_cfg = exp.recipe.student_train
    if num_threads is not None:
        train_cfg = train_cfg.model_copy(update={"num_threads": num_threads})
    kd, cuts, init_fn = make_kd(exp, run, seed=seed)
    t0 = time.time()
    fit_model(out, exp.recipe.student_model_of(run), train_cfg, exp.tokenizer, cuts, exp.cuts("dev"), seed=seed, kd=kd,
              extra_meta={"role": "baseline" if kd is None else "distilled",
                          "method": run.kd.method, "group": name}, progress=exp.progress, init_fn=init_fn,
              runtime=exp.recipe.runtime.for_stage("distill"))
    log(f"distill: {name} seed {seed} trained in {time.time() - t0:.0f} s -> {out}")


def _train_student_process(recipe_json: str, name: str, seed: int, num_threads: int) -> str:
    """A worker process's job (:mod:`speechkd.workers`): rebuild the experiment and train one student run."""
    from speechkd.utils import set_thread_policy

    set_thread_policy(num_threads)
    exp = Experiment(Recipe.model_validate_json(recipe_json), progress=False)
    _train_student(exp, name, seed, num_threads)
    return f"{name}-seed{seed}"


def _student_runs(exp: Experiment, only: Optional[str] = None, seeds: Optional[list[int]] = None) -> list[tuple]:
    """``(run, seed)`` of every student run of the recipe and each of its seeds, or only of the run named ``only``
    and/or only ``seeds`` (the narrowing of ``distill`` and ``evaluate``), in recipe order.

    Raises:
      ValueError: ``only`` names no student of the recipe.
    """
    if only is not None and not any(r.name == only for r in exp.recipe.students):
        raise ValueError(f"no student named '{only}' in the recipe (have {[r.name for r in exp.recipe.students]})")
    return [(run, seed) for run in exp.recipe.students if only is None or run.name == only
            for seed in run.seeds if not seeds or seed in seeds]


def distill(exp: Experiment, only: Optional[str] = None, seeds: Optional[list[int]] = None) -> None:
    """Train every student run (each seed) of the recipe, or only the one named ``only`` / only ``seeds``.

    With ``recipe.parallel_runs > 1``, that many runs train at once in worker processes with one thread
    each: on a 2-core machine two one-thread runs finish sooner than the same two runs one after the other
    with two threads, since much of a small model's step is single-threaded work. Stopping the parent
    (Ctrl-C, SIGTERM, or even SIGKILL) stops the workers too; a failed run stops the others; re-running
    resumes every run from its last checkpoint (:func:`speechkd.workers.run_jobs`).

    Raises:
      ValueError: ``only`` names no student of the recipe; any error of a run (one process).
      RuntimeError: a run in a worker process failed.
    """
    pending = []
    for run, seed in _student_runs(exp, only, seeds):
        out = exp.student_dir(run.name, seed)
        if (out / "model.safetensors").is_file():
            log(f"distill: {out}/model.safetensors exists, skipped")
        else:
            pending.append((run.name, seed))
    from speechkd.distributed import world_size

    jobs = min(exp.recipe.parallel_runs, len(pending))
    if world_size() > 1:
        jobs = 1  # the processes of a multi-process run train each run together (DDP), one run after the other
    if jobs <= 1:
        for name, seed in pending:
            _train_student(exp, name, seed)
        return
    from speechkd.workers import Job, run_jobs

    recipe_json = exp.recipe.model_dump_json()
    run_jobs([Job(f"{name}-seed{seed}", _train_student_process, (recipe_json, name, seed, 1)) for name, seed in pending],
             jobs, what="student runs")


# ---------------------------------------------------------------- evaluate
def _models(exp: Experiment, students: list[tuple], teacher: bool = True):
    """(name, group, dir, method, seed) of the teacher (when ``teacher`` and it can decode: not an SSL encoder or
    ``teacher.hf_dir``) and of each ``(run, seed)`` in ``students`` (:func:`_student_runs`)."""
    if teacher and exp.teacher.can_decode:
        yield "teacher", "teacher", exp.teacher_dir, "none", exp.recipe.teacher.seed
    for run, seed in students:
        yield f"{run.name}-seed{seed}", run.name, exp.student_dir(run.name, seed), run.kd.method, seed


def decode_cuts(model, cuts, tokenizer, decoding: str = "greedy", beam: int = 4, max_duration: float = 200.0, progress=False,
                normalizer=None, ctc_weight: float = 0.0):
    """Decode a CutSet; returns ``(ids, refs, hyps)`` (texts), both normalised by ``normalizer`` (a
    :class:`speechkd.data.text.TextNormalizer`, the rule the references and the tokenizer were made with) when given.
    ``ctc_weight``: an attention encoder-decoder's joint CTC/attention weight with ``decoding="beam"``."""
    from tqdm import tqdm

    from speechkd.data.datamodule import AsrDataset, make_loader
    from speechkd.decoding import greedy_search, nbest_search

    ids, refs, hyps = [], [], []
    dl = make_loader(cuts, AsrDataset(None), max_duration, shuffle=False)
    with torch.inference_mode():
        for batch in tqdm(dl, desc="decode", disable=not progress):
            enc, lens, _ = model.encode(batch["features"], batch["feature_lens"])
            if decoding == "greedy":
                toks = greedy_search(model, enc, lens)
            else:
                toks = [nb[0][0] for nb in nbest_search(model, enc, lens, beam=beam, ctc_weight=ctc_weight)]
            ids += batch["cut_ids"]
            texts = tokenizer.decode(toks)
            refs += batch["texts"] if normalizer is None else [normalizer(t) for t in batch["texts"]]
            hyps += texts if normalizer is None else [normalizer(t) for t in texts]
    return ids, refs, hyps


def evaluate(exp: Experiment, only: Optional[str] = None, seeds: Optional[list[int]] = None) -> None:
    """WER on dev and test, parameters, CPU real-time factor and label bytes for every trained model ->
    ``eval/<name>.json`` (written atomically; a model already evaluated with the recipe's decoding is skipped).

    Narrowed to the student run ``only`` and/or ``seeds``, it evaluates those runs only (not the teacher): it writes
    their own ``eval/`` files, so it runs beside other runs' training (their real-time factors are then measured on a
    loaded machine: evaluate again on an idle one, after deleting the JSON, for timings to report).

    Raises:
      ValueError: ``only`` names no student of the recipe.
    """
    from lhotse import CutSet

    from speechkd.data.datamodule import AsrDataset, load_cuts
    from speechkd.eval.metrics import word_error_rate, write_wer_details
    from speechkd.eval.speed import count_parameters, real_time_factor
    from speechkd.methods.mvq_kd import CI_KEY, EMB_KEY
    from speechkd.models.build import load_model
    from speechkd.labels.store import label_storage_bytes
    from speechkd.utils import set_thread_policy

    from speechkd.data.text import TextNormalizer

    with_teacher = only is None and not seeds  # a narrowed evaluate scores its student runs only
    models = list(_models(exp, _student_runs(exp, only, seeds), with_teacher))  # a bad name fails before any work
    e = exp.recipe.eval
    normalizer = TextNormalizer.from_config(exp.recipe.data.text)  # WER scored by the data's text rule
    label_bytes = {}
    if exp.ci_cuts_path.is_file():
        label_bytes["mvq"] = ("ci", label_storage_bytes(load_cuts(exp.ci_cuts_path), CI_KEY))
    if exp.emb_cuts_path.is_file():
        emb = ("float32", label_storage_bytes(load_cuts(exp.emb_cuts_path), EMB_KEY))
        label_bytes["l1"] = label_bytes["l2"] = emb
    if exp.nbest_cuts_path.is_file():
        from speechkd.labels.nbest import label_bytes as nbest_bytes

        label_bytes["seq"] = ("nbest", nbest_bytes(exp.nbest_dir))
    splits = {s: exp.cuts(s) for s in ("dev", "test")}
    rtf_cuts = splits["test"].subset(first=min(e.rtf_utts, len(splits["test"])))
    if not exp.teacher.can_decode and with_teacher:
        if exp.teacher.can_transcribe:
            _evaluate_transcribing_teacher(exp, splits, rtf_cuts, normalizer)
        else:
            log(f"evaluate: the teacher ({exp.teacher.describe()}) has no ASR head: no WER, skipped")
    decoding = {"decoding": "greedy"} if e.decoding == "greedy" else {"decoding": "beam", "beam": e.beam,
                                                                          "ctc_weight": e.ctc_weight}
    for name, group, mdir, method, seed in models:
        out = exp.dir / "eval" / f"{name}.json"
        done = json.loads(out.read_text()) if out.is_file() else None
        if done is not None and done.get("decoding_settings", {"decoding": "greedy"}) != decoding:
            log(f"evaluate: {out} was decoded with {done.get('decoding_settings', {'decoding': 'greedy'})}, the recipe "
                f"says {decoding}: evaluated again")
            done = None
        if done is not None and (not e.deployed or "deployed" in done):
            log(f"evaluate: {out} exists, skipped")
            continue
        if not (mdir / "model.safetensors").is_file():
            log(f"evaluate: {mdir} has no model yet, skipped")
            continue
        model, meta = load_model(mdir)
        if done is not None:  # evaluated before eval.deployed was switched on: add the deployed block only
            done["deployed"] = _evaluate_deployed(exp, name, model, splits["test"], rtf_cuts, normalizer,
                                                  done["test_wer"] if e.decoding == "greedy" else None)
            write_json_atomic(out, done)
            continue
        set_thread_policy(2)
        result = {"name": name, "group": group, "role": meta.get("role", "baseline"), "method": method, "seed": seed,
                  "params": count_parameters(model), "decoding_settings": decoding}
        for split, cuts in splits.items():
            ids, refs, hyps = decode_cuts(model, cuts, exp.tokenizer, e.decoding, e.beam, progress=exp.progress,
                                          normalizer=normalizer, ctc_weight=e.ctc_weight)
            stats = word_error_rate(refs, hyps)
            result[f"{split}_wer"] = stats.wer
            write_wer_details(exp.dir / "eval" / f"{name}-{split}-errs.txt", ids, refs, hyps)
        set_thread_policy(e.rtf_threads)
        batches = [AsrDataset(None)[CutSet.from_cuts([c])] for c in rtf_cuts]  # one utterance at a time

        def run_one(batch):
            from speechkd.decoding import greedy_search

            enc, lens, _ = model.encode(batch["features"], batch["feature_lens"])
            return greedy_search(model, enc, lens)

        result["rtf"] = real_time_factor(run_one, batches, audio_seconds=sum(c.duration for c in rtf_cuts))
        set_thread_policy(2)
        kind, nbytes = label_bytes.get(method, ("none", None))
        result.update(label_kind=kind, label_bytes=nbytes, **_train_times(mdir))
        if kind == "ci" and "l1" in label_bytes:
            result["float32_label_bytes"] = label_bytes["l1"][1]
        if e.deployed:
            result["deployed"] = _evaluate_deployed(exp, name, model, splits["test"], rtf_cuts, normalizer,
                                                    result["test_wer"] if e.decoding == "greedy" else None)
        write_json_atomic(out, result)
        log(f"evaluate: {name}: params {result['params'] / 1e6:.2f} M, dev WER {result['dev_wer']:.2f}%, "
            f"test WER {result['test_wer']:.2f}%, RTF {result['rtf']:.4f}")


def _evaluate_deployed(exp: Experiment, name: str, model, test_cuts, rtf_cuts, normalizer,
                       pytorch_greedy_wer: Optional[float] = None) -> dict:
    """The "as deployed" block of ``eval/<name>.json`` (``eval.deployed``): the model's ONNX export, fp32 and int8, in
    ``EXP/export/<name>`` (written there unless it already holds both precisions) measured by
    :func:`speechkd.export.measure_deployed` on the test split (greedy WER) and on ``rtf_cuts`` (onnxruntime RTF, one
    utterance at a time on ``eval.rtf_threads`` threads), beside the PyTorch model's greedy test WER
    (``pytorch_greedy_wer``, decoded here when not given, i.e. when ``eval.decoding`` is beam search)."""
    from speechkd.export import export_model, measure_deployed

    dst = exp.dir / "export" / name
    has_both = dst.is_dir() and any(dst.glob("*.int8.onnx")) and any(
        p for p in dst.glob("*.onnx") if not p.name.endswith(".int8.onnx"))
    if not has_both:
        export_model(model, exp.tokenizer, dst, int8=True, comment=f"{exp.recipe.name}: {name}",
                     overwrite=dst.exists())
    test = list(test_cuts)
    refs = [" ".join(s.text for s in c.supervisions if s.text) for c in test]
    if normalizer is not None:
        refs = [normalizer(r) for r in refs]
    if pytorch_greedy_wer is None:
        from speechkd.eval.metrics import word_error_rate

        _, prefs, phyps = decode_cuts(model, test_cuts, exp.tokenizer, "greedy", progress=False, normalizer=normalizer)
        pytorch_greedy_wer = word_error_rate(prefs, phyps).wer
    res = measure_deployed(dst, exp.tokenizer, [c.load_features() for c in test], refs,
                           [c.load_features() for c in rtf_cuts], sum(c.duration for c in rtf_cuts),
                           normalizer=normalizer, num_threads=exp.recipe.eval.rtf_threads)
    res.update(export_dir=str(dst), pytorch_greedy_test_wer=pytorch_greedy_wer)
    log(f"evaluate: {name} as deployed ({dst}): test WER fp32 {res['fp32']['test_wer']:.2f}% / int8 "
        f"{res['int8']['test_wer']:.2f}% (PyTorch {pytorch_greedy_wer:.2f}%), RTF fp32 {res['fp32']['rtf']:.4f} / "
        f"int8 {res['int8']['rtf']:.4f}, {res['fp32']['bytes'] / 1e6:.2f} / {res['int8']['bytes'] / 1e6:.2f} MB")
    return res


def _evaluate_transcribing_teacher(exp: Experiment, splits: dict, rtf_cuts, normalizer) -> None:
    """``eval/teacher.json`` of a teacher that is not the project's ASR model but transcribes (e.g. Whisper): greedy
    dev/test WER by the data's text rule, parameters, RTF (one utterance at a time, ``eval.rtf_threads``)."""
    from lhotse import CutSet

    from speechkd.eval.metrics import word_error_rate, write_wer_details
    from speechkd.eval.speed import count_parameters, real_time_factor
    from speechkd.utils import set_thread_policy

    out = exp.dir / "eval" / "teacher.json"
    if out.is_file():
        log(f"evaluate: {out} exists, skipped")
        return
    e = exp.recipe.eval
    model, transcribe = exp.teacher.transcriber()
    set_thread_policy(2)
    result = {"name": "teacher", "group": "teacher", "role": "teacher", "method": "none", "seed": 0,
              "params": count_parameters(model), "teacher": exp.teacher.describe()}
    for split, cuts in splits.items():
        cuts = list(cuts)
        refs = [normalizer(" ".join(s.text for s in c.supervisions if s.text)) for c in cuts]
        hyps = transcribe(cuts)
        result[f"{split}_wer"] = word_error_rate(refs, hyps).wer
        write_wer_details(exp.dir / "eval" / f"teacher-{split}-errs.txt", [c.id for c in cuts], refs, hyps)
    set_thread_policy(e.rtf_threads)
    one = [CutSet.from_cuts([c]) for c in rtf_cuts]
    result["rtf"] = real_time_factor(transcribe, one, audio_seconds=sum(c.duration for c in rtf_cuts))
    set_thread_policy(2)
    result.update(label_kind="none", label_bytes=None, train_seconds=None)
    write_json_atomic(out, result)
    log(f"evaluate: teacher ({exp.teacher.describe()}): params {result['params'] / 1e6:.2f} M, dev WER "
        f"{result['dev_wer']:.2f}%, test WER {result['test_wer']:.2f}%, RTF {result['rtf']:.4f}")


def _train_times(mdir: Path) -> dict:
    """``train_seconds`` (wall) and ``train_cpu_seconds`` of a run's ``train_summary.json`` (None when absent)."""
    p = mdir / "train_summary.json"
    summary = json.loads(p.read_text()) if p.is_file() else {}
    return {"train_seconds": summary.get("train_seconds"), "train_cpu_seconds": summary.get("train_cpu_seconds")}


# ---------------------------------------------------------------- report
def report(exp: Experiment) -> Path:
    """Write ``report.md`` and the plots from ``eval/*.json`` and the training logs (for a teacher that cannot
    decode, its :meth:`~speechkd.teachers.base.Teacher.report_note` in place of the teacher row). Returns the
    report's path."""
    from speechkd.report import write_report

    note = exp.teacher.report_note()
    path = write_report(exp.dir, title=f"speechkd experiment '{exp.recipe.name}'", teacher_note=note)
    log(f"report: {path}")
    return path


def export_run(exp: Experiment, student: Optional[str] = None, seed: int = 0, out: Optional[Path] = None,
               int8: bool = False, overwrite: bool = False, check_utts: int = 50, sherpa: bool = False) -> list[str]:
    """``speechkd export`` for ASR recipes: a student run (or the project's teacher) to ONNX
    (:func:`speechkd.export.export_model`, into ``out`` or ``EXP/export/<run>``), then checked against PyTorch on the
    first ``check_utts`` test utterances (fp32, and int8 with ``int8``; with ``sherpa`` also by sherpa-onnx from the
    audio).

    Returns:
      the lines to print (what was written, each check's result).

    Raises:
      LookupError: no such student in the recipe, or no ``student`` while the teacher is not the project's model.
      FileNotFoundError, FileExistsError, ValueError, TypeError: as :func:`~speechkd.export.export_model`.
    """
    from speechkd.export import check_export, check_sherpa_onnx, export_model
    from speechkd.models.build import load_model

    if student is None:
        if not exp.teacher.can_decode:
            raise LookupError(f"the teacher ({exp.teacher.describe()}) is not the project's transducer: give --student")
        src, name = exp.teacher_dir, "teacher"
    else:
        if student not in [s.name for s in exp.recipe.students]:
            raise LookupError(f"no student run '{student}' in the recipe ({', '.join(s.name for s in exp.recipe.students)})")
        src, name = exp.student_dir(student, seed), f"{student}-seed{seed}"
    model, _ = load_model(src)
    dst = Path(out) if out is not None else exp.dir / "export" / name
    export_model(model, exp.tokenizer, dst, int8=int8, comment=f"{exp.recipe.name}: {name}", overwrite=overwrite)
    lines = [f"exported {src} -> {dst}"]
    if check_utts > 0:
        cuts = list(exp.cuts("test"))[:check_utts]
        for q in ([False, True] if int8 else [False]):
            res = check_export(model, dst, cuts, int8=q)
            enc = "" if q else f", encoder frames within {res['encoder_max_abs']:.2e}"
            lines.append(f"check ({'int8' if q else 'fp32'}): greedy hypotheses equal to PyTorch's on "
                         f"{res['same_hypotheses']}/{res['utterances']} test utterances{enc}")
        if sherpa:
            if (dst / "joiner.onnx").is_file():
                res = check_sherpa_onnx(dst, cuts)
                lines.append(f"check (sherpa-onnx, its own fbank from the audio): hypotheses equal to onnxruntime's "
                             f"on {res['same_hypotheses']}/{res['utterances']} test utterances")
            else:
                lines.append("--sherpa: sherpa-onnx has no layout for this AED model; not checked")
    return lines


STAGES: dict[str, Callable] = {
    "prepare": prepare,
    "teacher": train_teacher,
    "extract": extract,
    "quantize": quantize,
    "pseudo-label": pseudo_label,
    "distill": distill,
    "evaluate": evaluate,
    "report": report,
}


def needed_stages(recipe: Recipe) -> list[str]:
    """The stages a recipe needs: the labelling stages its students' methods declare
    (:attr:`speechkd.methods.MethodSpec.label_stages`, in :data:`speechkd.methods.LABEL_STAGES` order) between the
    teacher and the students."""
    from speechkd.methods import LABEL_STAGES, method_spec

    wanted = {stage for r in recipe.students for stage in method_spec(r.kd.method).label_stages}
    return ["prepare", "teacher"] + [s for s in LABEL_STAGES if s in wanted] + ["distill", "evaluate", "report"]


#: The pipeline module of each recipe ``task``. A module gives ``EXPERIMENT`` (``(recipe, progress) -> experiment``),
#: ``STAGES`` (name -> stage function, in run order), ``needed_stages(recipe)`` and ``ALL_RANK_STAGES``; a new kind of
#: recipe is one such module and a line here.
PIPELINES: dict[str, str] = {"asr": "speechkd.pipeline", "ssl": "speechkd.ssl_pipeline"}


def pipeline_module(task: str):
    """The pipeline module of a recipe task (:data:`PIPELINES`).

    Raises:
      ValueError: an unknown task (naming the known ones).
    """
    import importlib

    if task not in PIPELINES:
        raise ValueError(f"no pipeline for task {task!r}; known: {', '.join(PIPELINES)}")
    return importlib.import_module(PIPELINES[task])


def make_experiment(recipe, progress: bool = True):
    """The experiment of a recipe, by its ``task``: :class:`Experiment` for ASR,
    :class:`speechkd.ssl_pipeline.SslExperiment` for ``task: ssl``."""
    return pipeline_module(recipe.task).EXPERIMENT(recipe, progress=progress)


def stages_of(exp) -> dict[str, Callable]:
    """The stage functions of an experiment's pipeline (in run order)."""
    return pipeline_module(exp.recipe.task).STAGES


#: Stages every process of a multi-process run executes together (fits train with DDP; labelling splits the cuts
#: by rank); any other stage runs on global rank 0 while the others wait (:func:`run_stage`).
ALL_RANK_STAGES = frozenset({"teacher", "extract", "quantize", "pseudo-label", "distill"})


def start_processes(exp) -> bool:
    """Join this process to the others of a launched multi-process run (:func:`speechkd.distributed.init_distributed`)
    and turn off progress bars except on rank 0. Returns True in a multi-process run."""
    from speechkd.config import RuntimeConfig
    from speechkd.distributed import init_distributed, is_main

    runtime = getattr(exp.recipe, "runtime", None) or RuntimeConfig()
    several = init_distributed(runtime.uses_gpu())
    if several and not is_main():
        exp.progress = False
    return several


def run_stage(exp, name: str, **kwargs) -> None:
    """Run one stage of the experiment's pipeline. In a multi-process run, a stage of the pipeline's
    ``ALL_RANK_STAGES`` runs on every rank, any other on rank 0 only; every rank then waits for the others, so no rank starts a stage before
    the previous one's outputs exist.

    Raises:
      KeyError: no stage of that name for this kind of experiment.
    """
    from speechkd.distributed import barrier, is_main, world_size

    module = pipeline_module(exp.recipe.task)
    fn = module.STAGES[name]
    if world_size() == 1 or name in module.ALL_RANK_STAGES or is_main():
        fn(exp, **kwargs)
    barrier()


def run_all(exp: Experiment, stages: Optional[list[str]] = None) -> None:
    """Run the recipe's stages in order (its pipeline's ``needed_stages``: :func:`needed_stages` for ASR,
    :func:`speechkd.ssl_pipeline.needed_stages`); each skips what is already complete. In a multi-process run
    (see :mod:`speechkd.distributed`) every rank calls this; stages run as :func:`run_stage` says."""
    from speechkd.distributed import is_main

    start_processes(exp)
    exp.dir.mkdir(parents=True, exist_ok=True)
    if is_main():
        exp.write_config()
    needed = pipeline_module(exp.recipe.task).needed_stages(exp.recipe)
    for name in stages or needed:
        t0 = time.time()
        run_stage(exp, name)
        log(f"stage {name} done ({time.time() - t0:.0f} s)")


EXPERIMENT = Experiment
