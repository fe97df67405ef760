"""`embedtl audit`: likely label errors, outliers and leaks of an image folder, from its cached
embeddings (:func:`audit_store`), written as ``audit.json``, ``label_issues.csv``,
``corrected_labels.csv``, ``map.png`` and ``audit.html`` (:func:`write_audit`).

Label errors come from cleanlab's confident learning (``cleanlab.filter.find_label_issues``)
over out-of-fold probabilities of every labelled row (:func:`embedtl.heads.out_of_fold_proba`:
by default the logreg head's model with every fold solved at once; ``--head linear|mlp``
through `fit-head`'s training loop, fold by fold); outliers from the distance to the nearest rows
through the store's index; leaks and duplicates from `dedup`.
"""

from ._audit import OOF_C, OOF_EPOCHS, OUTLIER_K, Audit, audit_head, audit_store
from ._write import draw_map, map_png, read_reviewed, write_audit

__all__ = [
    "OOF_C",
    "OOF_EPOCHS",
    "OUTLIER_K",
    "Audit",
    "audit_head",
    "audit_store",
    "draw_map",
    "map_png",
    "read_reviewed",
    "write_audit",
]
