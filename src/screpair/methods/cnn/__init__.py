"""cnnImpute: CNN imputation of likely dropouts (``method="cnn"``)."""

from ._model import CNNImputer

__all__ = ["CNNImputer"]
