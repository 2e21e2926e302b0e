"""Compare analyze's meta pass with the real pass on many model-zoo architectures.

    python scripts/check_meta_parity.py [timm|hf|all]

For each model it prints which pass the default analysis took (``meta``, or ``real`` when the
model needs values), whether both passes give the same roles, evidence, residual additions and
warnings, the count of γ per role, and the time of each analysis (the first of each kind of
op in a process is slower on meta: PyTorch sets its Python meta kernel up). Needs timm and
transformers; builds every model with random weights, no download. Exit status 1 if any
model differs between the passes.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import Counter

import torch

from gammaguide.analysis import build_report, trace_model
from gammaguide.policy import resolve_policy

TIMM = [
    "resnet50d", "seresnext26d_32x4d", "resnetv2_50x1_bit", "convnextv2_atto", "efficientnetv2_rw_t",
    "mobilenetv3_small_100", "mobilenetv4_conv_small", "regnetx_002", "dla34", "hrnet_w18_small", "cspdarknet53",
    "ghostnet_100", "rexnet_100", "deit3_small_patch16_224", "beit_base_patch16_224", "eva02_tiny_patch14_224",
    "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "maxvit_tiny_tf_224", "coatnet_nano_rw_224",
    "poolformer_s12", "convmixer_768_32", "efficientformer_l1", "levit_128s", "xcit_nano_12_p16_224",
    "cait_xxs24_224", "pit_ti_224", "tnt_s_patch16_224", "crossvit_tiny_240", "mvitv2_tiny", "fastvit_t8",
    "edgenext_xx_small", "nfnet_l0", "vit_small_patch16_224", "vit_base_patch16_clip_224", "gcvit_xxtiny",
    "davit_tiny", "inception_next_tiny", "repvgg_a0", "densenet121", "dpn68", "hgnetv2_b0", "twins_svt_small",
    "pvt_v2_b0", "sequencer2d_s", "volo_d1_224", "tiny_vit_5m_224", "focalnet_tiny_srf",
]
_T = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128)
HF_TEXT = [  # (config class, model class, config keywords): tiny configs
    ("BertConfig", "BertModel", _T), ("RobertaConfig", "RobertaModel", _T),
    ("DistilBertConfig", "DistilBertModel", dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=128)),
    ("AlbertConfig", "AlbertModel", dict(_T, embedding_size=16)), ("ElectraConfig", "ElectraModel", _T),
    ("T5Config", "T5EncoderModel", dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, vocab_size=128)),
    ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=2, vocab_size=128)),
    ("LlamaConfig", "LlamaForCausalLM", dict(_T, num_key_value_heads=1)),
    ("MistralConfig", "MistralForCausalLM", dict(_T, num_key_value_heads=1)),
    ("Qwen2Config", "Qwen2ForCausalLM", dict(_T, num_key_value_heads=1)),
    ("Qwen3Config", "Qwen3ForCausalLM", dict(_T, num_key_value_heads=1, head_dim=16)),
    ("GemmaConfig", "GemmaForCausalLM", dict(_T, num_key_value_heads=1, head_dim=16)),
    ("Gemma2Config", "Gemma2ForCausalLM", dict(_T, num_key_value_heads=1, head_dim=16)),
    ("PhiConfig", "PhiForCausalLM", _T),
    ("OPTConfig", "OPTForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                                         vocab_size=128, word_embed_proj_dim=32)),
    ("FalconConfig", "FalconForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               vocab_size=128)),
    ("GPTNeoXConfig", "GPTNeoXForCausalLM", _T),
    ("BloomConfig", "BloomForCausalLM", dict(hidden_size=32, n_layer=2, n_head=2, vocab_size=128)),
    ("OlmoConfig", "OlmoForCausalLM", _T),
]
HF_VISION = [  # (config class, model class, config keywords, image size)
    ("ViTConfig", "ViTModel", dict(_T, image_size=32, patch_size=8), 32),
    ("ConvNextConfig", "ConvNextModel", dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]), 64),
    ("ResNetConfig", "ResNetModel", dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], embedding_size=8), 64),
    ("SwinConfig", "SwinModel", dict(image_size=64, embed_dim=16, depths=[1, 1], num_heads=[1, 2]), 64),
]


def _report(model, inputs, on_meta):
    return build_report(trace_model(model, inputs, on_meta=on_meta), resolve_policy("guidelines"))


def _key(r):
    return ([(e.param_name, e.role, e.reason) for e in r.entries],
            [(a.module_name, a.skip_arg) for a in r.residual_adds], r.warnings)


def compare(name: str, model, inputs) -> bool:
    t = time.perf_counter()
    default = _report(model, inputs, None)
    t_default = time.perf_counter() - t
    t = time.perf_counter()
    real = _report(model, inputs, False)
    t_real = time.perf_counter() - t
    same = _key(default) == _key(real)
    roles = dict(Counter(e.role for e in default.entries))
    print(f"{name:40s} {default.traced_on:5s} {'same' if same else 'DIFFERENT':9s} {t_default * 1e3:6.0f} "
          f"{t_real * 1e3:6.0f}  {roles}", flush=True)
    return same


def main() -> int:
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    warnings.simplefilter("ignore")
    print(f"{'model':40s} {'pass':5s} {'passes':9s} {'ms':>6s} {'real':>6s}  γ per role")
    ok = True
    if which in ("timm", "all"):
        import timm

        for name in TIMM:
            ok &= compare(f"timm:{name}", timm.create_model(name, num_classes=10).eval(), None)
    if which in ("hf", "all"):
        import transformers

        transformers.utils.logging.set_verbosity_error()
        for config, cls, kw in HF_TEXT:
            model = getattr(transformers, cls)(getattr(transformers, config)(**kw)).eval()
            ok &= compare(f"hf:{cls}", model, {"input_ids": torch.randint(0, 128, (2, 12))})
        for config, cls, kw, size in HF_VISION:
            model = getattr(transformers, cls)(getattr(transformers, config)(**kw)).eval()
            ok &= compare(f"hf:{cls}", model, {"pixel_values": torch.randn(1, 3, size, size)})
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
