r"""Sample-quality metrics: how far samples lie from the data.

- :func:`sliced_wasserstein` (:mod:`.sliced`): point sets, no learned features (the toy problems);
- FID and KID (:mod:`.fid`): :func:`frechet_distance`, :func:`kid`, streamed :class:`FeatureStatistics`,
  :func:`image_metrics` (samples against reference images) and :func:`reference_statistics` (cached);
- feature networks (:mod:`.features`): the registry :data:`FEATURES` — ``"inception"``
  (:class:`InceptionFeatures`, :mod:`.inception`: Inception-v3 pool3 as torch-fidelity computes it,
  the extra ``sdeflow[metrics]``) and ``"classifier"`` (:func:`load_classifier`, :mod:`.classifier`: a
  small classifier trained on a data set's labels, whose predictions also give the confident share
  and the effective number of classes of samples);
- :func:`load_samples` (:mod:`.samples`): samples saved as an .npz or a folder of PNGs.
"""

from .classifier import (ClassHistogram, ClassifierNet, class_coverage, classifier_accuracy, load_classifier,
                         save_classifier, train_classifier)
from .features import FEATURES, compute_features, iter_features, make_features, register_features
from .fid import FeatureStatistics, feature_statistics, frechet_distance, image_metrics, kid, reference_statistics
from .inception import InceptionFeatures
from .samples import load_samples
from .sliced import sliced_wasserstein

register_features("inception", InceptionFeatures)
register_features("classifier", load_classifier)

__all__ = [
    "sliced_wasserstein",
    "frechet_distance", "FeatureStatistics", "kid", "feature_statistics", "reference_statistics", "image_metrics",
    "FEATURES", "register_features", "make_features", "iter_features", "compute_features", "InceptionFeatures",
    "ClassifierNet", "train_classifier", "classifier_accuracy", "save_classifier", "load_classifier",
    "ClassHistogram", "class_coverage", "load_samples",
]
