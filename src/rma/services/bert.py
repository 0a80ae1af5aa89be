"""A BERT sentence encoder in numpy: the forward pass of sentence-transformers, without torch.

It reads a Hugging Face BERT folder (`config.json`, `model.safetensors`, `tokenizer.json`, and
sentence-transformers' `sentence_bert_config.json` / `1_Pooling/config.json` when present) and
computes what `SentenceTransformer(path).encode(texts, normalize_embeddings=True)` computes for a
mean-pooled model such as all-MiniLM-L6-v2: token, position and type embeddings, N encoder layers
(self-attention, exact GELU feed-forward, post-LayerNorm), mean pooling over the attention mask,
L2 normalisation. float32 throughout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Array = Any  # numpy arrays (numpy's stubs are not part of the typed surface here)

_LAYER_KEYS = (
    "attention.self.query.weight",
    "attention.self.query.bias",
    "attention.self.key.weight",
    "attention.self.key.bias",
    "attention.self.value.weight",
    "attention.self.value.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "intermediate.dense.weight",
    "intermediate.dense.bias",
    "output.dense.weight",
    "output.dense.bias",
    "output.LayerNorm.weight",
    "output.LayerNorm.bias",
)


def _erf(x: Array) -> Array:
    """erf to about 1e-7 (Abramowitz & Stegun 7.1.26), below float32's own rounding here."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    return sign * (1.0 - poly * np.exp(-a * a))


def _gelu(x: Array) -> Array:
    """BERT's exact GELU: x * Phi(x)."""
    return 0.5 * x * (1.0 + _erf(x / np.float32(np.sqrt(2.0))))


def _layer_norm(x: Array, weight: Array, bias: Array, eps: float) -> Array:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


@dataclass(frozen=True)
class BertConfig:
    """The parts of `config.json` and the sentence-transformers files the forward pass needs."""

    layers: int
    heads: int
    hidden: int
    eps: float
    max_tokens: int
    pooling: str

    @classmethod
    def read(cls, folder: Path) -> BertConfig:
        config = json.loads((folder / "config.json").read_text())
        if config.get("model_type", "bert") != "bert":
            raise ValueError(f"{folder}: model_type {config.get('model_type')!r} is not bert")
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{folder}: hidden_act {config.get('hidden_act')!r} is not gelu")
        max_tokens = int(config.get("max_position_embeddings", 512))
        st_config = folder / "sentence_bert_config.json"
        if st_config.is_file():
            max_tokens = min(max_tokens, int(json.loads(st_config.read_text())["max_seq_length"]))
        pooling = "mean"
        pool_config = folder / "1_Pooling" / "config.json"
        if pool_config.is_file():
            pool = json.loads(pool_config.read_text())
            if pool.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif not pool.get("pooling_mode_mean_tokens", True):
                raise ValueError(f"{pool_config}: only mean or CLS pooling is supported")
        return cls(
            layers=int(config["num_hidden_layers"]),
            heads=int(config["num_attention_heads"]),
            hidden=int(config["hidden_size"]),
            eps=float(config.get("layer_norm_eps", 1e-12)),
            max_tokens=max_tokens,
            pooling=pooling,
        )


class BertEncoder:
    """Sentence vectors from a BERT folder; thread-safe for reads, stateless per call."""

    def __init__(self, folder: Path) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        self.config = BertConfig.read(folder)
        weights = load_file(str(folder / "model.safetensors"))
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights else ""
        self._w = {k.removeprefix(prefix): v.astype(np.float32) for k, v in weights.items()}
        missing = [
            f"encoder.layer.{i}.{key}"
            for i in range(self.config.layers)
            for key in _LAYER_KEYS
            if f"encoder.layer.{i}.{key}" not in self._w
        ]
        if missing:
            raise ValueError(f"{folder}: model.safetensors lacks {missing[0]} (and maybe more)")
        # Linear layers as (in, out) so that x @ w works without a transpose per call.
        for name in list(self._w):
            if name.endswith(".weight") and "LayerNorm" not in name and "embeddings" not in name:
                self._w[name] = np.ascontiguousarray(self._w[name].T)
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=self.config.max_tokens)
        self._tokenizer = tokenizer

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, with [CLS]/[SEP], truncated to the model's length."""
        return [enc.ids for enc in self._tokenizer.encode_batch(texts)]

    def encode(self, texts: list[str], batch_size: int = 32) -> tuple[Array, int]:
        """(len(texts), hidden) unit-length float32 vectors, and the number of tokens read."""
        ids = self.tokenize(texts)
        out = np.zeros((len(texts), self.config.hidden), dtype=np.float32)
        # Batches of similar lengths pad less (sentence-transformers sorts by length too).
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            out[chunk] = self._encode_batch([ids[i] for i in chunk])
        return out, sum(len(x) for x in ids)

    def _encode_batch(self, ids: list[list[int]]) -> Array:
        w = self._w
        cfg = self.config
        length = max(len(x) for x in ids)
        tokens = np.zeros((len(ids), length), dtype=np.int64)
        mask = np.zeros((len(ids), length), dtype=np.float32)
        for row, seq in enumerate(ids):
            tokens[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1.0
        x = (
            w["embeddings.word_embeddings.weight"][tokens]
            + w["embeddings.position_embeddings.weight"][np.arange(length)][None, :, :]
            + w["embeddings.token_type_embeddings.weight"][0][None, None, :]
        )
        x = _layer_norm(
            x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], cfg.eps
        )
        bias = ((1.0 - mask) * np.float32(np.finfo(np.float32).min))[:, None, None, :]
        head_dim = cfg.hidden // cfg.heads
        scale = np.float32(1.0 / np.sqrt(head_dim))
        batch = len(ids)
        for i in range(cfg.layers):
            p = f"encoder.layer.{i}."

            def heads(t: Array) -> Array:
                return t.reshape(batch, length, cfg.heads, head_dim).transpose(0, 2, 1, 3)

            q = heads(x @ w[p + "attention.self.query.weight"] + w[p + "attention.self.query.bias"])
            k = heads(x @ w[p + "attention.self.key.weight"] + w[p + "attention.self.key.bias"])
            v = heads(x @ w[p + "attention.self.value.weight"] + w[p + "attention.self.value.bias"])
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, length, cfg.hidden)
            attn = context @ w[p + "attention.output.dense.weight"]
            attn = attn + w[p + "attention.output.dense.bias"]
            x = _layer_norm(
                attn + x,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
                cfg.eps,
            )
            hidden = _gelu(
                x @ w[p + "intermediate.dense.weight"] + w[p + "intermediate.dense.bias"]
            )
            ffn = hidden @ w[p + "output.dense.weight"] + w[p + "output.dense.bias"]
            x = _layer_norm(
                ffn + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], cfg.eps
            )
        if cfg.pooling == "cls":
            pooled = x[:, 0, :]
        else:
            summed = (x * mask[:, :, None]).sum(axis=1)
            pooled = summed / np.clip(mask.sum(axis=1, keepdims=True), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
