"""The package's shape, as users and the other layers rely on it: what `import embedtl` costs,
which names are modules and which functions, where errors live."""

from __future__ import annotations

import inspect
import subprocess
import sys

import embedtl
import embedtl.errors

HEAVY = ("torch", "timm", "torchvision", "matplotlib", "sklearn", "faiss", "onnxruntime")


def _imported_after(code: str) -> list[str]:
    probe = f"{code}; import sys; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_import_embedtl_and_the_lower_layers_import_no_heavy_library():
    assert _imported_after("import embedtl") == []
    assert _imported_after("import embedtl.backbones, embedtl.cache, embedtl.data") == []
    assert _imported_after("import embedtl.engine, embedtl.index, embedtl.search") == []


def test_the_engine_is_a_module_and_extract_a_function():
    import embedtl.engine

    assert inspect.ismodule(embedtl.engine) and inspect.isfunction(embedtl.extract)
    assert embedtl.extract is embedtl.engine.extract
    assert embedtl.embed_files is embedtl.engine.embed_files


def test_every_error_class_is_in_errors_and_exported():
    errors = [
        o
        for o in vars(embedtl.errors).values()
        if inspect.isclass(o) and issubclass(o, Exception) and o.__module__ == "embedtl.errors"
    ]
    assert len(errors) >= 13
    for e in errors:
        assert getattr(embedtl, e.__name__) is e
        assert issubclass(e, embedtl.EmbedTLError)
    from embedtl.export import ExportError
    from embedtl.search import StaleIndexError

    assert ExportError is embedtl.ExportError and StaleIndexError is embedtl.StaleIndexError


def test_public_names_that_moved_stay_importable():
    from embedtl.predict import head_backbone
    from embedtl.search import VectorIndex, l2_normalize, plan_index

    assert VectorIndex is embedtl.index.VectorIndex and plan_index and l2_normalize
    assert callable(head_backbone)
    for name in ("build_feature_model", "FeatureModel", "open_store_index", "bench_heads"):
        assert callable(getattr(embedtl, name))
