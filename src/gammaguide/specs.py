"""Turn a MODEL spec from the command line into a model and default example inputs.

A spec is one of:

- a built-in name (``resnet20``, see ``gammaguide.models.list_models()``);
- ``torchvision:NAME`` (``torchvision.models.get_model``, no weights);
- ``timm:NAME`` (``timm.create_model``, no pretrained weights);
- ``hf:CONFIG_NAME``: a Hugging Face transformer built from a config, offline (``hf:bert``,
  ``hf:gpt2``, ``hf:llama`` are tiny; ``hf:bert-base``, ``hf:gpt2-124m``, ``hf:llama-7b`` are
  the real sizes, the last one only sensible on the meta device);
- ``path/to/file.py:factory``: the file is imported and ``factory()`` called; it returns a
  model, or a ``(model, example_inputs)`` tuple.

Optional dependencies (torchvision, timm, transformers) are imported only when a spec needs
them. Every failure is a ``GammaGuideError`` whose one-line message says what to try.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import inspect
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import GammaGuideError
from .inputs import default_input_size
from .models import MODELS, create_model, list_models
from .text_models import TEXT_MODELS, Seq2Seq, TextClassifier, list_text_models

TEXT_MODEL_TYPES = (TextClassifier, Seq2Seq)

SPEC_FORMS = "a built-in name, torchvision:NAME, timm:NAME, hf:NAME or path/to/file.py:factory"

# Models this large in float32 would exhaust a laptop's memory; ask for --meta instead.
MAX_REAL_PARAMS = 1_000_000_000
# A tensor's number of elements (and its size in bytes) is a 64-bit integer in PyTorch.
MAX_ELEMENTS = 2**63 // 8


@dataclass
class LoadedModel:
    """A model built from a spec, with the inputs to trace it with (None: analyze's default)."""

    model: nn.Module
    example_inputs: Any
    spec: str


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` -> ``(1, 3, 32, 32)``; every dimension a positive integer."""
    parts = [p.strip() for p in str(text).replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise GammaGuideError(
            f"bad --input-shape {text!r}: give positive integers separated by commas, "
            f"e.g. 1,3,32,32 for an image batch or 1,16 (batch, seq_len) for hf: models"
        )
    if math.prod(shape) > MAX_ELEMENTS:
        raise GammaGuideError(
            f"bad --input-shape {text!r}: {math.prod(shape):.3g} elements, more than a tensor can hold "
            f"({MAX_ELEMENTS:.3g}, even on the meta device); give a smaller shape, e.g. 1,3,224,224"
        )
    return shape


def load(spec: str, *, input_shape: tuple[int, ...] | None = None, meta: bool = False,
         num_classes: int | None = None) -> LoadedModel:
    """Build the model a spec names, on the meta device when ``meta``, and its example inputs."""
    spec = spec.strip()
    if not spec:
        raise GammaGuideError(f"empty MODEL; give {SPEC_FORMS}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise GammaGuideError(f"--num-classes must be a positive integer, got {num_classes!r}")
    source, sep, name = spec.partition(":")
    head, fsep, factory = spec.rpartition(":")
    if num_classes is not None and not meta and not (fsep and head.endswith(".py")):
        _refuse_if_too_many_classes(spec, num_classes)
    if fsep and head.endswith(".py"):
        # Checked first so that a path containing ':' (C:\x.py:f) still reads as a file.
        model, inputs = _from_file(head, factory, meta)
    elif spec.endswith(".py"):
        raise GammaGuideError(f"{spec!r} names a file but no factory; write it as {spec}:FUNCTION, the function "
                              f"in that file that returns the model")
    elif sep and source in _SOURCES:
        if not name:
            raise GammaGuideError(f"{spec!r} names no model; write it as {source}:NAME")
        build, make_inputs = _SOURCES[source]
        model = _on_device(meta, lambda: build(name, num_classes, meta))
        inputs = make_inputs(model, input_shape, meta) if make_inputs else None
    elif sep:
        raise GammaGuideError(f"unknown model source {source!r} in {spec!r}; give {SPEC_FORMS}")
    else:
        model = _on_device(meta, lambda: _builtin(spec, num_classes))
        inputs = _text_inputs(model, input_shape, meta)  # None for the image models
        if inputs is not None:
            input_shape = None  # it was the (batch, seq_len) of the token ids
    if input_shape is not None and source != "hf":
        # An explicit shape always wins, also over a factory's own example inputs.
        inputs = _image_input(model, input_shape, meta)
    if inputs is None:
        inputs = _default_image_input(model, spec, meta)
    return LoadedModel(model, inputs, spec)


def _refuse_if_too_many_classes(spec: str, num_classes: int) -> None:
    """A head of ``num_classes`` outputs that would make the model too large to build for real:
    count its parameters on the meta device first (free) and ask for --meta or fewer classes."""
    n = sum(p.numel() for p in load(spec, meta=True, num_classes=num_classes).model.parameters())
    if n > MAX_REAL_PARAMS:
        raise GammaGuideError(f"--num-classes {num_classes} gives {spec} {n / 1e9:.3g}B parameters "
                              f"({n * 4 / 2**30:.3g} GiB in float32); give fewer classes, or add --meta to analyze it "
                              f"on the meta device without allocating them")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Model constructors warn about things (deprecated arguments, init choices) that do not
    matter to an analysis; keep the command's output to what it found."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _device_ctx(meta: bool) -> contextlib.AbstractContextManager:
    """Where new tensors go: the meta device allocates nothing, so a 7B model costs no memory."""
    return torch.device("meta") if meta else contextlib.nullcontext()


def _on_device(meta: bool, build: Callable[[], nn.Module]) -> nn.Module:
    with _device_ctx(meta):
        return build()


def _missing(package: str, spec_form: str) -> GammaGuideError:
    return GammaGuideError(f"{spec_form} models need the optional package {package}, which is not installed; "
                           f"run: pip install {package}")


# ----------------------------------------------------------------------------- inputs


def _device(meta: bool) -> torch.device:
    return torch.device("meta") if meta else torch.device("cpu")


def _image_input(model: nn.Module, shape: tuple[int, ...], meta: bool) -> torch.Tensor:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return torch.zeros(shape, dtype=dtype, device=_device(meta))


def _default_image_input(model: nn.Module, spec: str, meta: bool) -> torch.Tensor:
    """A batch of one image at the model's default size (timm's pretrained_cfg, else 224x224)."""
    size = default_input_size(model)
    if size is None:
        raise GammaGuideError(
            f"cannot guess an input for {spec} ({type(model).__name__}): only image models (first layer a Conv2d) "
            f"get a default; pass --input-shape, e.g. --input-shape 1,3,224,224, or return (model, example_inputs) "
            f"from a file.py:factory"
        )
    return _image_input(model, (1, *size), meta)


# ----------------------------------------------------------------------------- built-in


def _builtin(name: str, num_classes: int | None) -> nn.Module:
    known = list_models() + list_text_models()
    if name not in MODELS and name not in TEXT_MODELS:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise GammaGuideError(
            f"unknown model {name!r}{hint}; built-in models are {', '.join(known)}; "
            f"or give torchvision:NAME, timm:NAME, hf:NAME or path/to/file.py:factory"
        )
    if name in TEXT_MODELS and num_classes is None:
        return create_model(name)  # its own default (two classes for the classifier)
    try:
        return create_model(name, num_classes=10 if num_classes is None else num_classes)
    except GammaGuideError:
        raise
    except Exception as exc:  # a head no tensor can hold (on any device)
        raise GammaGuideError(f"building {name} with {num_classes} classes failed: {_one_line(exc)}; give fewer "
                              f"classes with --num-classes") from exc


def _text_inputs(model: nn.Module, shape: tuple[int, ...] | None, meta: bool) -> Any:
    """Token ids for a built-in text model ((batch, seq_len), default 1x16); None for the others."""
    if not isinstance(model, TEXT_MODEL_TYPES):
        return None
    shape = HF_DEFAULT_SHAPE if shape is None else shape
    if len(shape) != 2:
        raise GammaGuideError(f"--input-shape for the text models is (batch, seq_len) of token ids, e.g. 1,16; "
                              f"got {','.join(map(str, shape))}")
    if shape[1] > model.max_len:
        raise GammaGuideError(f"seq_len {shape[1]} is longer than this model's {model.max_len} positions; "
                              f"use --input-shape {shape[0]},{model.max_len} or less")
    return model.example_inputs(*shape, device=_device(meta))


# ----------------------------------------------------------------------------- torchvision / timm


def _torchvision(name: str, num_classes: int | None, meta: bool) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise _missing("torchvision", "torchvision:NAME") from None
    known = torchvision.models.list_models()
    if name not in known:
        raise GammaGuideError(f"unknown torchvision model {name!r}{_did_you_mean(name, known)}; "
                              f"see torchvision.models.list_models() for the {len(known)} names")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    # Detection and segmentation builders default to a pretrained backbone (weights_backbone=...),
    # which they would download: no weights anywhere.
    if "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(name)).parameters:
        kwargs["weights_backbone"] = None
    try:
        with _quiet():
            return torchvision.models.get_model(name, weights=None, **kwargs)
    except Exception as exc:
        raise GammaGuideError(f"building torchvision:{name} failed: {_one_line(exc)}; "
                              f"try it without --num-classes, or another model") from exc


def _timm(name: str, num_classes: int | None, meta: bool) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise _missing("timm", "timm:NAME") from None
    if not timm.is_model(name):
        raise GammaGuideError(f"unknown timm model {name!r}{_did_you_mean(name, timm.list_models())}; "
                              f"see timm.list_models('*{name.split('.')[0][:8]}*') for names")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        with _quiet():
            return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:
        raise GammaGuideError(f"building timm:{name} failed: {_one_line(exc)}; "
                              f"try it without --num-classes, or another model") from exc


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.7)
    return f" (did you mean {', '.join(close)}?)" if close else ""


# ----------------------------------------------------------------------------- Hugging Face


# Tiny configs: a few thousand parameters, so that a forward pass is instant on a CPU; the
# architecture (and so every γ's role) is the same as the full-size model's.
_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@dataclass(frozen=True)
class HFConfig:
    config_class: str
    model_class: str
    kwargs: dict = field(default_factory=dict)
    tiny: bool = True


HF_CONFIGS: dict[str, HFConfig] = {
    # BERT with a classification head, as fine-tuned on SST-2 in the paper.
    "bert": HFConfig("BertConfig", "BertForSequenceClassification",
                     dict(_TINY, vocab_size=128, max_position_embeddings=512)),
    "bert-base": HFConfig("BertConfig", "BertForSequenceClassification", {}, tiny=False),
    "gpt2": HFConfig("GPT2Config", "GPT2LMHeadModel",
                     dict(n_embd=32, n_layer=2, n_head=2, n_inner=64, vocab_size=128, n_positions=512)),
    "gpt2-124m": HFConfig("GPT2Config", "GPT2LMHeadModel", {}, tiny=False),
    "llama": HFConfig("LlamaConfig", "LlamaForCausalLM",
                      dict(_TINY, num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)),
    # The LLaMA-1/2 7B architecture: 32 layers of width 4096, 65 RMSNorm scales.
    "llama-7b": HFConfig("LlamaConfig", "LlamaForCausalLM",
                         dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
                         tiny=False),
}

HF_DEFAULT_SHAPE = (1, 16)  # (batch, seq_len) of input_ids


def _hf(name: str, num_classes: int | None, meta: bool) -> nn.Module:
    if name not in HF_CONFIGS:
        raise GammaGuideError(f"unknown hf config {name!r}{_did_you_mean(name, list(HF_CONFIGS))}; "
                              f"gammaguide builds these offline: {', '.join('hf:' + n for n in HF_CONFIGS)}")
    try:
        import transformers
    except ImportError:
        raise _missing("transformers", "hf:NAME") from None
    entry = HF_CONFIGS[name]
    kwargs = dict(entry.kwargs)
    if num_classes is not None:
        if not entry.model_class.endswith("ForSequenceClassification"):
            raise GammaGuideError(f"--num-classes does not apply to hf:{name} (a language model); leave it out")
        kwargs["num_labels"] = num_classes
    model_class = getattr(transformers, entry.model_class)
    # The config validates itself on construction and logs (e.g. GPT-2's token ids beyond a
    # tiny vocabulary, never used here) to stderr, where only errors belong.
    with _quiet(), _hf_quiet(transformers):
        config = getattr(transformers, entry.config_class)(**kwargs)
    if not entry.tiny and not meta:
        _refuse_if_huge(name, model_class, config)
    try:
        with _quiet(), _hf_quiet(transformers):
            return model_class(config)
    except Exception as exc:  # a head no tensor can hold (on any device)
        raise GammaGuideError(f"building hf:{name} failed: {_one_line(exc)}; try it without --num-classes, or "
                              f"with fewer classes") from exc


def _refuse_if_huge(name: str, model_class: type, config: Any) -> None:
    """Building a full-size model for real would allocate all its weights; count them on
    the meta device first (free) and ask for --meta when that would be gigabytes."""
    with torch.device("meta"), _quiet():
        n = sum(p.numel() for p in model_class(config).parameters())
    if n > MAX_REAL_PARAMS:
        raise GammaGuideError(f"hf:{name} has {n / 1e9:.1f}B parameters ({n * 4 / 2**30:.0f} GiB in float32); "
                              f"add --meta to analyze it on the meta device without allocating them")


@contextlib.contextmanager
def _hf_quiet(transformers: Any) -> Iterator[None]:
    """transformers logs notes (untied weights, sdpa...) on construction; not our output."""
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _hf_inputs(model: nn.Module, shape: tuple[int, ...] | None, meta: bool) -> dict:
    shape = HF_DEFAULT_SHAPE if shape is None else shape
    if len(shape) != 2:
        raise GammaGuideError(f"--input-shape for hf: models is (batch, seq_len) of input_ids, e.g. 1,16; "
                              f"got {','.join(map(str, shape))}")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and shape[1] > limit:
        raise GammaGuideError(f"seq_len {shape[1]} is longer than this model's {limit} positions; "
                              f"use --input-shape {shape[0]},{limit} or less")
    return {"input_ids": torch.zeros(shape, dtype=torch.long, device=_device(meta))}


# source -> (builder(name, num_classes, meta), inputs(model, shape, meta) or None for images)
_SOURCES: dict[str, tuple[Callable[..., nn.Module], Callable[..., Any] | None]] = {
    "torchvision": (_torchvision, None),
    "timm": (_timm, None),
    "hf": (_hf, _hf_inputs),
}


# ----------------------------------------------------------------------------- file.py:factory


def _from_file(path_text: str, factory: str, meta: bool) -> tuple[nn.Module, Any]:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise GammaGuideError(f"model file {path_text!r} not found (from {Path.cwd()}); check the path, "
                              f"or give {SPEC_FORMS}")
    if not factory.isidentifier():
        raise GammaGuideError(f"{factory!r} is not a function name; write the spec as {path_text}:FUNCTION")
    module = _import_file(path)
    fn = getattr(module, factory, None)
    if fn is None:
        defined = sorted(n for n, v in vars(module).items()
                         if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        raise GammaGuideError(f"{path_text} has no {factory!r}; callables defined there: "
                              f"{', '.join(defined) or 'none'}; write the spec as {path_text}:FUNCTION")
    if not callable(fn):
        raise GammaGuideError(f"{path_text}:{factory} is a {type(fn).__name__}, not a function; name a function "
                              f"that returns the model")
    try:
        with _device_ctx(meta):
            result = fn()
    except GammaGuideError:
        raise
    except Exception as exc:
        raise GammaGuideError(f"{path_text}:{factory}() raised {_one_line(exc)}; fix the factory, "
                              f"or call it in Python to see the traceback") from exc
    return _unpack_factory_result(result, f"{path_text}:{factory}")


def _import_file(path: Path) -> Any:
    """Import a .py file as a fresh module, with its folder importable (for its siblings)."""
    name = f"_gammaguide_spec_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise GammaGuideError(f"cannot import {path}: not a Python file; give path/to/file.py:factory")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise GammaGuideError(f"importing {path} failed: {_one_line(exc)}; "
                              f"run python {path} to see the full traceback") from exc
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
    return module


def _unpack_factory_result(result: Any, where: str) -> tuple[nn.Module, Any]:
    if isinstance(result, nn.Module):
        return result, None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        return result[0], result[1]
    raise GammaGuideError(f"{where}() returned {type(result).__name__}; it must return an nn.Module "
                          f"or a (model, example_inputs) tuple")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
