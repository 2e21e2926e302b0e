"""Built-in transformers for text, each in a pre-LN and a post-LN form (torch only).

- ``textcls_preln`` / ``textcls_postln``: a sentence classifier (SST-2). An encoder with learned
  positions, mean pooling over the real tokens and a linear head. The post-LN form is BERT's:
  a LayerNorm on the embeddings and one after each residual addition. The pre-LN form is
  GPT-2's / ViT's: a LayerNorm at the start of each branch and one final LayerNorm.
- ``seq2seq_preln`` / ``seq2seq_postln``: an encoder-decoder translation Transformer. The
  post-LN form has the shape of fairseq's ``transformer_iwslt_de_en`` (post-LN, ReLU, FFN twice
  the width, sinusoidal positions, embeddings scaled by sqrt(width), no final norms), scaled down
  by default (width 256, 3+3 layers) so that it trains on a CPU; ``width``, ``layers`` and
  ``heads`` give the original (512, 6, 4). One embedding matrix serves source, target and output
  (a joint subword vocabulary, fairseq's ``--share-all-embeddings``). The pre-LN form adds the
  final encoder and decoder norms, as fairseq's ``--encoder-normalize-before`` does.

The blocks are written out (``x + attn(norm(x))``, ``norm(x + attn(x))``) rather than taken
from ``nn.TransformerEncoderLayer``, so that where each LayerNorm sits, and so its role, can be
read off the code. Token id 0 is padding. What gammaguide's analysis makes of each norm
(``gammaguide inspect textcls_preln``):

| model | norms | role |
|---|---|---|
| pre-LN (both) | ``attn_norm``, ``ffn_norm``, ``cross_norm`` of every block | ``residual_last`` |
| pre-LN classifier, decoder | ``final_norm`` / ``decoder_norm`` | ``head`` |
| pre-LN seq2seq | ``encoder_norm`` (its output is the memory every cross-attention reads) | ``residual_last`` |
| post-LN (both) | ``embed_norm`` and every block norm but the last one | ``stream`` |
| post-LN classifier, decoder | the last block's ``ffn_norm`` | ``head`` |
| post-LN seq2seq | the last encoder block's ``ffn_norm`` (the memory) | ``residual_last`` |
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

PAD_ID = 0


class Attention(nn.Module):
    """Multi-head attention: self-attention, or cross-attention when ``memory`` is given."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        kv = x if memory is None else memory
        b, t, d = x.shape
        s, h = kv.shape[1], self.heads
        q = self.q(x).view(b, t, h, d // h).transpose(1, 2)
        k = self.k(kv).view(b, s, h, d // h).transpose(1, 2)
        v = self.v(kv).view(b, s, h, d // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float, activation: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.activation, self.drop = activation, nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.activation(self.fc1(x))))


class EncoderBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, dropout: float, activation, pre_ln: bool):
        super().__init__()
        self.pre_ln = pre_ln
        self.attn_norm, self.attn = nn.LayerNorm(width), Attention(width, heads, dropout)
        self.ffn_norm, self.ffn = nn.LayerNorm(width), FeedForward(width, hidden, dropout, activation)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.pre_ln:  # the norm opens each branch; the stream itself is never normalized
            x = x + self.drop(self.attn(self.attn_norm(x), mask=mask))
            return x + self.drop(self.ffn(self.ffn_norm(x)))
        x = self.attn_norm(x + self.drop(self.attn(x, mask=mask)))  # the norm closes each addition
        return self.ffn_norm(x + self.drop(self.ffn(x)))


class DecoderBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, dropout: float, activation, pre_ln: bool):
        super().__init__()
        self.pre_ln = pre_ln
        self.attn_norm, self.attn = nn.LayerNorm(width), Attention(width, heads, dropout)
        self.cross_norm, self.cross = nn.LayerNorm(width), Attention(width, heads, dropout)
        self.ffn_norm, self.ffn = nn.LayerNorm(width), FeedForward(width, hidden, dropout, activation)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.drop(self.attn(self.attn_norm(x), causal=True))
            x = x + self.drop(self.cross(self.cross_norm(x), memory, mask=memory_mask))
            return x + self.drop(self.ffn(self.ffn_norm(x)))
        x = self.attn_norm(x + self.drop(self.attn(x, causal=True)))
        x = self.cross_norm(x + self.drop(self.cross(x, memory, mask=memory_mask)))
        return self.ffn_norm(x + self.drop(self.ffn(x)))


def key_mask(ids: torch.Tensor) -> torch.Tensor:
    """(batch, 1, 1, seq) bool, True where a key is a real token: what attention may look at."""
    return (ids != PAD_ID)[:, None, None, :]


def sinusoids(length: int, width: int) -> torch.Tensor:
    """Fixed sinusoidal positions (Vaswani et al. 2017; fairseq's default)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class TextClassifier(nn.Module):
    """Token ids (batch, seq) -> class logits; an encoder with learned positions."""

    def __init__(self, num_classes: int = 2, vocab_size: int = 8000, max_len: int = 64, width: int = 128,
                 layers: int = 2, heads: int = 4, hidden: int | None = None, dropout: float = 0.1,
                 pre_ln: bool = True):
        super().__init__()
        self.pre_ln, self.max_len = pre_ln, max_len
        self.embed = nn.Embedding(vocab_size, width, padding_idx=PAD_ID)
        self.pos = nn.Embedding(max_len, width)
        self.embed_norm = None if pre_ln else nn.LayerNorm(width)  # BERT normalizes the embeddings
        self.layers = nn.ModuleList(EncoderBlock(width, heads, hidden or 4 * width, dropout, F.gelu, pre_ln)
                                    for _ in range(layers))
        self.final_norm = nn.LayerNorm(width) if pre_ln else None
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)
        self.apply(_bert_init)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        real = input_ids != PAD_ID
        x = self.embed(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)
        mask = key_mask(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        weights = real.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1)  # mean over the real tokens
        return self.head(self.drop(pooled))

    def example_inputs(self, batch: int = 1, seq_len: int = 16, device=None) -> torch.Tensor:
        return _example_ids(batch, min(seq_len, self.max_len), self.embed.num_embeddings, device)


class Seq2Seq(nn.Module):
    """(source ids, target ids shifted right) -> next-token logits over the joint vocabulary."""

    def __init__(self, vocab_size: int = 8000, max_len: int = 256, width: int = 256, layers: int = 3,
                 heads: int = 4, hidden: int | None = None, dropout: float = 0.3, pre_ln: bool = False,
                 decoder_layers: int | None = None):
        super().__init__()
        self.pre_ln, self.max_len, self.scale = pre_ln, max_len, math.sqrt(width)
        self.embed = nn.Embedding(vocab_size, width, padding_idx=PAD_ID)  # source, target and output
        self.register_buffer("positions", sinusoids(max_len, width), persistent=False)
        hidden = hidden or 2 * width  # transformer_iwslt_de_en: 512 wide, FFN 1024
        self.encoder = nn.ModuleList(EncoderBlock(width, heads, hidden, dropout, F.relu, pre_ln)
                                     for _ in range(layers))
        self.encoder_norm = nn.LayerNorm(width) if pre_ln else None
        self.decoder = nn.ModuleList(DecoderBlock(width, heads, hidden, dropout, F.relu, pre_ln)
                                     for _ in range(decoder_layers or layers))
        self.decoder_norm = nn.LayerNorm(width) if pre_ln else None
        self.drop = nn.Dropout(dropout)
        self.apply(_fairseq_init)
        nn.init.normal_(self.embed.weight, 0, width ** -0.5)
        with torch.no_grad():
            self.embed.weight[PAD_ID].zero_()

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.embed(ids) * self.scale + self.positions[: ids.shape[1]])

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory, its key mask)."""
        mask = key_mask(src)
        x = self._embed(src)
        for layer in self.encoder:
            x = layer(x, mask)
        if self.encoder_norm is not None:
            x = self.encoder_norm(x)
        return x, mask

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        x = self._embed(tgt_in)
        for layer in self.decoder:
            x = layer(x, memory, memory_mask)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        return F.linear(x, self.embed.weight)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.decode(tgt_in, *self.encode(src))

    def example_inputs(self, batch: int = 1, seq_len: int = 16, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        n = min(seq_len, self.max_len)
        return (_example_ids(batch, n, self.embed.num_embeddings, device),
                _example_ids(batch, n, self.embed.num_embeddings, device))


def _example_ids(batch: int, seq_len: int, vocab: int, device) -> torch.Tensor:
    """Real (non-padding) token ids: 1, 2, 3, ... wrapped into the vocabulary."""
    ids = torch.arange(batch * seq_len, device=device).view(batch, seq_len) % max(vocab - 1, 1) + 1
    return ids


def _bert_init(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, 0, 0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.Embedding) and m.padding_idx is not None:
        with torch.no_grad():
            m.weight[m.padding_idx].zero_()


def _fairseq_init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)


def _classifier(pre_ln: bool):
    def build(num_classes: int = 2, **options) -> TextClassifier:
        return TextClassifier(num_classes, pre_ln=pre_ln, **options)
    return build


def _seq2seq(pre_ln: bool):
    def build(num_classes: int | None = None, **options) -> Seq2Seq:
        # num_classes is create_model's argument for classifiers; a translation model's output
        # is its vocabulary (vocab_size).
        return Seq2Seq(pre_ln=pre_ln, **options)
    return build


TEXT_MODELS: dict[str, Callable[..., nn.Module]] = {
    "textcls_preln": _classifier(pre_ln=True),
    "textcls_postln": _classifier(pre_ln=False),
    "seq2seq_preln": _seq2seq(pre_ln=True),
    "seq2seq_postln": _seq2seq(pre_ln=False),
}
CLASSIFIERS = ("textcls_preln", "textcls_postln")
TRANSLATORS = ("seq2seq_preln", "seq2seq_postln")


def list_text_models() -> list[str]:
    return sorted(TEXT_MODELS)
