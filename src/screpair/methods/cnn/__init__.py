"""cnnImpute: CNN imputation of likely dropouts (``method="cnn"``).

:class:`CNNImputer` takes its settings as nested configs: ``module`` (:class:`CNNConfig`),
``train`` (:class:`~screpair.methods.TrainConfig`) and ``targets`` (:class:`TargetConfig`), each
``None`` (the preset's, :data:`PRESETS`), a dict of fields to change or a config instance.
"""

from ._model import PRESETS, CNNConfig, CNNImputer, TargetConfig

__all__ = ["PRESETS", "CNNConfig", "CNNImputer", "TargetConfig"]
