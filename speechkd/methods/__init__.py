"""KD methods and the registry through which they enter the pipeline.

A method is one module that declares its settings (a subclass of :class:`speechkd.config.KDSettings` whose
``method`` is a ``Literal`` of its name: the recipe's ``kd:`` section is validated by the class registered for its
``method``, a union discriminated by ``method``), a :class:`speechkd.methods.base.KDMethod` (its loss and the labels
it reads, ``label_keys``) and registers a :class:`MethodSpec` under its recipe name (``kd.method``): its settings
class, how to build it for a student run, which labelling stages it needs, and whether it needs the project's own
teacher. Recipe validation, ``make_kd`` and ``needed_stages`` in :mod:`speechkd.pipeline` read only this registry.

Adding a method (worked example, a hypothetical ``cosine`` regression on the stored embeddings)::

    # speechkd/methods/cosine_kd.py
    from typing import Literal
    from speechkd.config import KDSettings
    from speechkd.methods import register
    from speechkd.methods.base import KDMethod

    class CosineKDConfig(KDSettings):      # the recipe's kd: {method: cosine, scale: 0.5}
        method: Literal["cosine"] = "cosine"
        scale: float = 1.0

    class CosineKD(KDMethod):
        label_keys = ("teacher_embeddings",)
        def forward(self, batch, enc, enc_lens, layers, ctx): ...   # (loss, logs)

    def build(exp, run, seed):
        from speechkd.data.datamodule import load_cuts
        cuts = load_cuts(exp.emb_cuts_path)
        return CosineKD(scale=run.kd.scale, ...), cuts      # run.kd is a CosineKDConfig

    register("cosine", build, CosineKDConfig, label_stages=("extract",))

then add ``"speechkd.methods.cosine_kd"`` to :data:`METHOD_MODULES`. Nothing else changes: the recipe accepts
``kd: {method: cosine}``, the pipeline runs ``extract`` before such a student and trains it with the loss.
"""

from __future__ import annotations

import importlib
from typing import Callable, NamedTuple, Optional

__all__ = ["LABEL_STAGES", "METHOD_MODULES", "MethodSpec", "method_names", "method_spec", "register"]

#: The labelling stages, in the order the pipeline runs them.
LABEL_STAGES = ("extract", "quantize", "pseudo-label")
#: Modules that register methods (imported on first use of the registry).
METHOD_MODULES = ("speechkd.methods.baseline", "speechkd.methods.mvq_kd", "speechkd.methods.seq_kd",
                  "speechkd.methods.codert")


class MethodSpec(NamedTuple):
    """How a KD method enters the pipeline.

    Attributes:
      build: ``(exp, run, seed) -> (KDMethod or None, training CutSet carrying its labels)``; may raise ValueError /
        FileNotFoundError naming the run or the missing labels.
      config: the method's settings class (a :class:`speechkd.config.KDSettings` subclass) that validates ``kd:``.
      label_stages: the labelling stages (of :data:`LABEL_STAGES`) whose outputs it reads.
      project_teacher: what about it needs the project's own transducer / AED teacher (in words, for an error
        message), or None when an SSL teacher (``teacher.hf_dir``) serves it too.
      nbest_teacher: any teacher that writes N-best lists serves it (e.g. Whisper for sequence-level KD), even where
        ``project_teacher`` is set.
    """

    build: Callable
    config: type
    label_stages: tuple[str, ...] = ()
    project_teacher: Optional[str] = None
    nbest_teacher: bool = False


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, build: Callable, config: type, label_stages: tuple[str, ...] = (),
             project_teacher: Optional[str] = None, nbest_teacher: bool = False) -> None:
    """Register KD method ``name`` (the recipe's ``kd.method``) with its settings class ``config``.

    Raises:
      ValueError: the name is taken, a label stage is not one of :data:`LABEL_STAGES`, or ``config`` is not a
        :class:`speechkd.config.KDSettings` subclass whose ``method`` accepts ``name``.
    """
    import typing

    from speechkd.config import KDSettings

    if name in _REGISTRY:
        raise ValueError(f"KD method '{name}' is registered twice")
    if not (isinstance(config, type) and issubclass(config, KDSettings)
            and name in typing.get_args(config.model_fields["method"].annotation)):
        raise ValueError(f"KD method '{name}': its settings class must subclass KDSettings with method: "
                         f"Literal[..., '{name}', ...]")
    bad = [s for s in label_stages if s not in LABEL_STAGES]
    if bad:
        raise ValueError(f"KD method '{name}': unknown label stages {bad} (have {list(LABEL_STAGES)})")
    _REGISTRY[name] = MethodSpec(build, config, tuple(label_stages), project_teacher, nbest_teacher)


def method_spec(name: str) -> MethodSpec:
    """The registered :class:`MethodSpec` of ``kd.method`` ``name``.

    Raises:
      ValueError: no method of that name (listing the registered ones).
    """
    for module in METHOD_MODULES:  # each registers on its first import (some may be imported already)
        importlib.import_module(module)
    if name not in _REGISTRY:
        raise ValueError(f"no KD method '{name}' (registered: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def method_names() -> list[str]:
    """The registered methods' names (``kd.method`` values), sorted."""
    method_spec("none")
    return sorted(_REGISTRY)
