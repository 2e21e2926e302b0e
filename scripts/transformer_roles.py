"""The LayerNorm/RMSNorm roles of common transformers, as ``gammaguide inspect`` finds them.

    python scripts/transformer_roles.py            # prints the markdown table of docs/transformers.md

Runs ``gammaguide inspect MODEL --json`` for Hugging Face BERT, GPT-2, T5 and LLaMA (tiny
configs built offline, two layers each: the same architecture as the real sizes) and for the
built-in text transformers, and groups the norms by name with the layer index replaced by N.
``python -m gammaguide inspect scripts/transformer_roles.py:t5`` inspects the T5 alone.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from collections import Counter

MODELS = [
    ("BERT (post-LN)", "hf:bert", ()),
    ("GPT-2 (pre-LN)", "hf:gpt2", ()),
    ("T5 (pre-RMSNorm, encoder-decoder)", f"{__file__}:t5", ()),
    ("LLaMA (pre-RMSNorm)", "hf:llama", ()),
    ("textcls_postln", "textcls_postln", ()),
    ("textcls_preln", "textcls_preln", ()),
    ("seq2seq_postln", "seq2seq_postln", ()),
    ("seq2seq_preln", "seq2seq_preln", ()),
]


def t5():
    """A tiny T5 (two encoder and two decoder blocks) built offline from its config, with inputs."""
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    config = transformers.T5Config(vocab_size=128, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                                   num_heads=2, decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config)
    ids = torch.ones(1, 16, dtype=torch.long)
    return model, {"input_ids": ids, "decoder_input_ids": ids}


def inspect(spec: str) -> dict:
    from gammaguide.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["inspect", spec, "--json"])
    if status:
        raise SystemExit(f"gammaguide inspect {spec} failed")
    return json.loads(out.getvalue())


def rows(doc: dict) -> list[tuple[str, int, str, str]]:
    """(norm pattern, count, roles, decision under guidelines), in the model's order."""
    groups: dict[str, list[dict]] = {}
    for e in doc["entries"]:
        pattern = re.sub(r"\.\d+\.", ".N.", e["param_name"])
        groups.setdefault(pattern, []).append(e)
    out = []
    for pattern, entries in groups.items():
        roles = Counter(e["role"] for e in entries)
        text = ", ".join(f"`{r}`" + (f" x{n}" if len(roles) > 1 else "") for r, n in roles.items())
        if len(roles) > 1 and len(entries) > 1:
            last = entries[-1]["role"]
            if roles[last] == 1:
                text = f"`{next(r for r in roles if r != last)}`; the last one `{last}`"
        decay = {e["decay"] for e in entries}
        out.append((pattern, len(entries), text, "decay" if decay == {True} else "no decay" if decay == {False}
                    else "mixed"))
    return out


def main() -> int:
    lines = ["| model | γ (layer index as N) | count | role | `guidelines` |", "|---|---|---|---|---|"]
    for label, spec, _ in MODELS:
        doc = inspect(spec)
        for i, (pattern, n, role, decision) in enumerate(rows(doc)):
            lines.append(f"| {label if i == 0 else ''} | `{pattern}` | {n} | {role} | {decision} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
