"""What shrinking one LayerNorm γ does to var(branch)/var(skip), in a post-LN and a pre-LN block.

    python scripts/layernorm_scale_check.py

The paper's reasons not to decay γ_first (and to decay γ_last) are about the balance of a
residual addition: L2 on γ_first shrinks the skip path against the branches, L2 on γ_last shrinks
the branch against the skip path. This multiplies the γ of ``layers.0.attn_norm`` of each
built-in classifier by 1, 1/2 and 1/4 and prints var(branch)/var(skip) at the addition that norm
feeds: in the post-LN block it is the skip input of the feed-forward addition (its role:
``stream``), in the pre-LN block it opens the attention branch (``residual_last``).

Weights are drawn so that branch and skip are of comparable size (unit-variance embeddings,
Xavier-uniform linear layers, biases of standard deviation 0.1), not BERT's small initialization,
on a batch of 64 random sentences of 16 tokens.
"""

from __future__ import annotations

import torch

from gammaguide.analysis import residual_variances
from gammaguide.models import create_model

# model -> (the norm whose γ is scaled, the addition it feeds: index among the model's adds)
CASES = {"textcls_postln": ("layers.0.attn_norm", 1), "textcls_preln": ("layers.0.attn_norm", 0)}


def main() -> int:
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (64, 16))
    print("| model | γ of layers.0.attn_norm | var(branch)/var(skip) at the add it feeds | at the next add |")
    print("|---|---|---|---|")
    for name, (norm, add) in CASES.items():
        torch.manual_seed(0)
        model = create_model(name, num_classes=2, vocab_size=1000, width=128, layers=2, heads=4).eval()
        with torch.no_grad():
            model.embed.weight.normal_()
            model.pos.weight.normal_()
            for m in model.modules():
                if isinstance(m, torch.nn.Linear):
                    torch.nn.init.xavier_uniform_(m.weight)
                    m.bias.normal_(0, 0.1)
        module = dict(model.named_modules())[norm]
        gamma = module.weight.detach().clone()
        for scale in (1.0, 0.5, 0.25):
            with torch.no_grad():
                module.weight.copy_(gamma * scale)
            ratios = [r.ratio for r in residual_variances(model, ids)]
            print(f"| {name} | x {scale:g} | {ratios[add]:.3f} | {ratios[add + 1]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
