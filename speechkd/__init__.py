"""speechkd: knowledge distillation for speech models.

Four methods from the speech literature behind one data pipeline, trainer, evaluation and CLI: MVQ-KD
(Guo et al., ICASSP 2023), sequence-level KD (Mun'im et al., ICASSP 2019), CoDERT (Swaminathan et al.,
Interspeech 2021) and SSL-model KD with multi-task fine-tuning (arXiv 2210.16611).
"""

__version__ = "0.1.0"


def load(model_dir, **kwargs):
    """A trained transducer ready to transcribe: ``speechkd.load(model_dir).transcribe(paths_or_arrays)``
    (:func:`speechkd.api.load`; imported on first use so that ``import speechkd`` stays cheap)."""
    from speechkd.api import load as _load

    return _load(model_dir, **kwargs)
