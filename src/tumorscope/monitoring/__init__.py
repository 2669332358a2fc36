"""Drift monitoring: image features and embeddings of slices (``features``), the windows they come
from (``windows``: the service's inference log or a folder of new slices) and the Evidently
report that compares them with the champion's reference (``drift``)."""
