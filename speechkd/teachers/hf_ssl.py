"""A Hugging Face SSL encoder (HuBERT / wav2vec 2.0 / WavLM, ``teacher.hf_dir``) as the ASR pipeline's teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from speechkd.teachers.base import Teacher
from speechkd.utils import log

__all__ = ["HfSslTeacher"]


class HfSslTeacher(Teacher):
    """A local Hugging Face SSL checkpoint (``teacher.hf_dir``; safetensors): nothing is trained, the teacher stage
    checks the directory and ``teacher.layer``; layer outputs are its hidden states (``teacher.layer``: 0 = the CNN
    features after projection, ..., -1 = last) over the 16 kHz waveform at its CNN's frame shift (20 ms for the
    standard CNN), normalised as its ``preprocessor_config.json`` says. It has no ASR head (cannot decode)."""

    can_decode = False
    plan_seconds = 100.0
    plan_by_duration = True

    def __init__(self, exp):
        super().__init__(exp)
        self.dir = Path(exp.recipe.teacher.hf_dir)
        self._info = None

    def info(self):
        """:class:`speechkd.teachers.hf.SSLConfigInfo` of the directory (read once; no weights loaded).

        Raises:
          as :func:`speechkd.teachers.hf.check_ssl_dir` for a bad directory (naming it).
        """
        if self._info is None:
            from speechkd.teachers.hf import check_ssl_dir

            self._info = check_ssl_dir(self.dir)
        return self._info

    def describe(self) -> str:
        return f"the Hugging Face {self.info().model_type} model in {self.dir}"

    def prepare(self) -> None:
        from speechkd.teachers.hf import resolve_layer

        info = self.info()
        layer = resolve_layer(self.exp.recipe.teacher.layer, info.num_layers, "teacher.layer")
        log(f"teacher: using {self.describe()} (hidden state {layer} of 0..{info.num_layers}, width "
            f"{info.hidden_size}, {1000 * info.frame_shift:g} ms frames); no transducer is trained")

    def frame_shift(self) -> float:
        return self.info().frame_shift

    def layer_outputs(self, batches: list, layer: int) -> Iterator[tuple[str, np.ndarray]]:
        """Raises ValueError for a cut shorter than the receptive field (no frame), audio that cannot be read or is
        not mono (naming the cut), or a layer out of range (naming ``teacher.layer``)."""
        from tqdm import tqdm

        from speechkd.data.classification import WaveformDataset
        from speechkd.teachers.hf import SAMPLE_RATE, load_ssl_teacher, resolve_layer

        index = resolve_layer(layer, self.info().num_layers, "teacher.layer")
        teacher = load_ssl_teacher(self.dir, layers=[index])
        dataset = WaveformDataset((), sampling_rate=SAMPLE_RATE)
        bar = tqdm(total=sum(len(b) for b in batches), desc="HF teacher forward", unit="cut",
                   disable=not self.exp.progress)
        with torch.inference_mode():
            for batch_cuts in batches:
                batch = dataset[batch_cuts]
                for cid, n in zip(batch["cut_ids"], batch["lens"].tolist()):
                    if n < teacher.min_samples:
                        raise ValueError(f"cut '{cid}' has {n} samples ({n / SAMPLE_RATE:.3f} s), fewer than "
                                         f"the teacher's receptive field of {teacher.min_samples}: it has no frame")
                out = teacher(batch["wavs"], batch["lens"])
                h = out.hidden_states[0]  # (N, T, C)
                for i, cid in enumerate(batch["cut_ids"]):
                    yield cid, h[i, : int(out.lens[i])].float().cpu().numpy()
                bar.update(len(batch["cut_ids"]))
        bar.close()

    def label_meta(self, layer: int) -> dict[str, str]:
        return {"teacher_layer": str(layer), "teacher_hf_dir": str(self.dir.resolve())}

    def report_note(self) -> Optional[str]:
        return (f"Teacher: the Hugging Face SSL model `{self.dir}` (hidden state teacher.layer = "
                f"{self.exp.recipe.teacher.layer}); it has no ASR head, so no teacher WER: students are compared with "
                "the baseline only.")
