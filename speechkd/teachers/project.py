"""The project's own teacher: the transducer or attention encoder-decoder trained by the teacher stage."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from speechkd.teachers.base import Teacher
from speechkd.utils import log

__all__ = ["ProjectTeacher"]


class ProjectTeacher(Teacher):
    """A transducer / AED teacher trained here (``teacher.model``, ``teacher.train``), or one trained by speechkd in
    another experiment on the same data (``teacher.model_dir``, copied in), read from
    ``<exp>/teacher/model.safetensors``: fbank input, encoder frames of 10 ms x ``teacher.model.subsampling``; it can
    decode. Layer outputs are Conformer block outputs (``teacher.layer``, 1-based, -1 the last)."""

    can_decode = True
    has_nbest = True
    plan_seconds = 200.0  # fbank batches in manifest order

    def describe(self) -> str:
        m = self.exp.recipe.teacher.model
        return f"the project's {m.arch} teacher ({self.exp.teacher_dir})"

    def prepare(self) -> None:
        from speechkd.config import project_teacher_trained
        from speechkd.training import fit_model

        exp = self.exp
        if project_teacher_trained(exp.dir):
            log(f"teacher: {exp.teacher_dir}/model.safetensors exists, skipped")
            return
        t = exp.recipe.teacher
        if t.model_dir is not None:
            self._copy_in(Path(t.model_dir))
            return
        fit_model(exp.teacher_dir, t.model, t.train, exp.tokenizer, exp.cuts("train"), exp.cuts("dev"), seed=t.seed,
                  extra_meta={"role": "teacher", "method": "none"}, progress=exp.progress,
                  runtime=exp.recipe.runtime.for_stage("teacher"))
        log(f"teacher: trained -> {exp.teacher_dir}")

    def _copy_in(self, src: Path) -> None:
        """Copy a model trained elsewhere (``teacher.model_dir``) into ``<exp>/teacher`` (atomically).

        Raises:
          FileNotFoundError: its model.json / model.safetensors, or its experiment's tokenizer, is missing.
          ValueError: its model differs from ``teacher.model``, or its tokenizer's vocabulary from this experiment's.
        """
        import json
        import shutil

        from speechkd.config import ModelConfig
        from speechkd.models.build import load_model
        from speechkd.utils import atomic_dir

        exp = self.exp
        _, meta = load_model(src)  # the files exist and the weights fit their config (nothing unpickled)
        theirs, ours = ModelConfig.model_validate(meta["model"]), exp.recipe.teacher.model
        if theirs != ours:
            diff = {k: (v, getattr(ours, k)) for k, v in theirs.model_dump().items() if getattr(ours, k) != v}
            raise ValueError(f"teacher.model_dir {src}: its model differs from teacher.model in {diff} "
                             "(theirs, the recipe's): copy its model.json's 'model' into the recipe")
        # <exp>/teacher or <exp>/students/<run>: the experiment is one or two levels up
        found = [d / "lang" / "tokens.model" for d in (src.parent, src.parent.parent) if (d / "lang" / "tokens.model").is_file()]
        tokens = found[0] if found else src.parent.parent / "lang" / "tokens.model"
        if not found:
            raise FileNotFoundError(f"teacher.model_dir {src}: no tokenizer at {tokens} (the directory must be a run "
                                    "of a speechkd experiment: <exp>/students/<run> or <exp>/teacher)")
        from speechkd.data.tokenizer import Tokenizer

        if Tokenizer(tokens).vocabulary() != exp.tokenizer.vocabulary():
            raise ValueError(f"teacher.model_dir {src}: its experiment's tokenizer {tokens} differs from "
                             f"{exp.tokenizer_path}: the teacher must be trained on the same data and text rule")
        with atomic_dir(exp.teacher_dir) as tmp:
            shutil.copyfile(src / "model.safetensors", tmp / "model.safetensors")
            meta.update(role="teacher", method="none", trained_as=meta.get("method"), source=str(src))
            (tmp / "model.json").write_text(json.dumps(meta, indent=2))
        log(f"teacher: {src} (trained as {meta['trained_as']}) copied -> {exp.teacher_dir}")

    def teacher_id(self) -> str:
        from speechkd.labels.nbest import model_id

        return model_id(self.exp.teacher_dir)

    def nbest_decoder(self, beam: int, nbest: int, max_duration: float):
        """The transducer's modified / the AED's beam search over fbank batches of ``max_duration`` seconds (joint
        CTC/attention for the AED when ``pseudo_label.ctc_weight > 0``)."""
        from speechkd.labels.nbest import project_nbest_decoder
        from speechkd.models.build import load_model

        model, _ = load_model(self.exp.teacher_dir)
        return project_nbest_decoder(model, self.exp.tokenizer, beam, nbest, max_duration,
                                     ctc_weight=self.exp.recipe.pseudo_label.ctc_weight)

    def frame_shift(self) -> float:
        from speechkd.data.datamodule import FRAME_SHIFT

        return FRAME_SHIFT * self.exp.recipe.teacher.model.subsampling

    def layer_outputs(self, batches: list, layer: int) -> Iterator[tuple[str, np.ndarray]]:
        from tqdm import tqdm

        from speechkd.data.datamodule import AsrDataset
        from speechkd.methods.base import pick_layer
        from speechkd.models.build import load_model

        model, _ = load_model(self.exp.teacher_dir)
        dl = torch.utils.data.DataLoader(AsrDataset(None), sampler=batches, batch_size=None)
        with torch.inference_mode():
            for batch in tqdm(dl, desc="teacher forward", total=len(batches), disable=not self.exp.progress):
                _, lens, layers = model.encode(batch["features"], batch["feature_lens"])
                x = pick_layer(layers, layer)
                for i, cid in enumerate(batch["cut_ids"]):
                    yield cid, x[i, : int(lens[i])].float().cpu().numpy()
