"""The generic path: extract from any same-layout pair of diffusion models, with no architecture record.

ComfyUI names a LoRA layer of any model it loads by its state-dict key: ``diffusion_model.<key>``
(``comfy.lora.model_lora_keys_unet`` maps ``diffusion_model.<module>`` to
``diffusion_model.<module>.weight`` for every weight). This module builds a
:class:`~.archs.KeyTable` from the keys and shapes of two sources laid out alike, so the ordinary
extraction (``core.extract``) runs on it unchanged:

* every floating-point ``.weight`` of 2, 4 or 5 dimensions (Linear, Conv2d, Conv3d) present on both
  sides with the same shape is a layer named ``diffusion_model.<module>``; the saved file then
  holds ``diffusion_model.<module>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``, which
  ComfyUI's loader applies as it does its own extractor's output;
* with ``exact_parts``, every other floating-point tensor that changed is stored exactly, as
  ComfyUI core's extractor does: a 1-D weight (norms) as ``diffusion_model.<module>.diff``, a bias
  as ``diffusion_model.<module>.diff_b``, any other parameter (e.g. a modulation table) as
  ``diffusion_model.<key>.diff`` (ComfyUI maps a non-``.weight`` key to itself).

Sources are seen through :class:`DiffusionModelView`, which exposes only the diffusion model of a
file under ``diffusion_model.`` keys, whatever its layout on disk: ``model.diffusion_model.…``
(all-in-one checkpoint), ``diffusion_model.…`` (ComfyUI state dict) or bare keys (a
diffusion-model-only file, as in ``models/diffusion_models``). Base and tuned may come in
different ones of these. The names are those of the file, so the LoRA loads in ComfyUI when the
file is in ComfyUI's own layout (the original-model layout Comfy-Org's repackaged files use);
a diffusers-layout transformer file gives diffusers-style module names that ComfyUI's generic map
does not know. In the nodes, the names are checked against ComfyUI's key map of the loaded model.

The pair check is strict: the ``.weight`` layers must be the same keys with the same shapes on
both sides; differences raise :class:`~.errors.MismatchError` listing them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from . import quant
from .archs import Component, KeyTable, LayerGroup, LayerSpec
from .errors import FormatError, MismatchError
from .sources import KeyStyle, PairReport, WeightSource, source_dtype, source_path
from .types import BIAS_SUFFIX, BiasDiffLayer, DiffLayer, LayerDelta

Tensor = torch.Tensor

COMFY_PREFIX = "diffusion_model."
"""Prefix of every generic layer name and of the keys a :class:`DiffusionModelView` exposes."""

DIFFUSION_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
"""Where the diffusion model sits in an all-in-one checkpoint / a ComfyUI state dict."""

OTHER_PREFIXES = (
    "first_stage_model.", "cond_stage_model.", "conditioner.", "text_encoders.", "vae.", "model_ema.",
    "text_encoder.", "text_encoder_2.", "text_encoder_3.", "clip_l.", "clip_g.", "t5xxl.",
)
"""Keys that are never part of a diffusion model (VAE, text encoders, EMA copies)."""

LAYER_DIMS = (2, 4, 5)
_MAX_LISTED = 20


# ---------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------


def diffusion_prefix(keys: Iterable[str]) -> str:
    """The prefix under which ``keys`` hold a diffusion model ("" for a diffusion-model-only file)."""
    keys = list(keys)
    for prefix in DIFFUSION_PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return ""


class DiffusionModelView:
    """A source's diffusion model under ``diffusion_model.<key>`` keys (see the module docstring).

    ``quant_reads`` (fp8 bookkeeping of :mod:`.quant`) is forwarded under the exposed names.
    """

    def __init__(self, inner: WeightSource, prefix: str | None = None) -> None:
        self._inner = inner
        inner_keys = list(inner.keys())
        self.prefix = diffusion_prefix(inner_keys) if prefix is None else prefix
        self.name = str(getattr(inner, "name", "source"))
        self.path = source_path(inner)
        self.metadata: Mapping[str, str] = dict(getattr(inner, "metadata", None) or {})
        p = self.prefix
        self._map: dict[str, str] = {}
        for key in inner_keys:
            if not key.startswith(p):
                continue
            if not p and key.startswith(OTHER_PREFIXES):
                continue
            if quant.is_quant_key(key):  # scales / markers of a scaled-fp8 model seen through ComfyUI
                continue
            self._map[COMFY_PREFIX + key[len(p):]] = key
        self._inverse = {v: k for k, v in self._map.items()}

    @property
    def inner(self) -> WeightSource:
        return self._inner

    def keys(self) -> Iterable[str]:
        return self._map.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._inner.shape(self._map[key]))

    def dtype(self, key: str) -> torch.dtype:
        return source_dtype(self._inner, self._map[key])

    def get(self, key: str) -> Tensor:
        return self._inner.get(self._map[key])

    def inner_key(self, key: str) -> str:
        return self._map[key]

    @property
    def quant_reads(self) -> dict:
        reads = getattr(self._inner, "quant_reads", None) or {}
        return {self._inverse[k]: v for k, v in reads.items() if k in self._inverse}

    def __contains__(self, key: object) -> bool:
        return key in self._map

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "DiffusionModelView":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DiffusionModelView({self.name!r}, prefix {self.prefix!r}, {len(self._map)} tensors)"


def diffusion_view(source: WeightSource) -> WeightSource:
    """``source`` as a :class:`DiffusionModelView` (unchanged if it already is one, or if all its
    keys are already ``diffusion_model.`` keys, as a ComfyUI graph source's are)."""
    if isinstance(source, DiffusionModelView):
        return source
    return DiffusionModelView(source)


# ---------------------------------------------------------------------------------------------
# The key table
# ---------------------------------------------------------------------------------------------

_ATTENTION = re.compile(r"(^|[._])(attn\d*|attention|self_attn|cross_attn|qkv|to_[qkvo]|to_out|[qkvo]_proj|"
                        r"add_[qkv]_proj|to_add_out|[qkvo]|proj_qkv|img_attn|txt_attn)([._]|$)")
_MLP = re.compile(r"(^|[._])(mlp|ffn|ff|ff_context|feed_forward|fc\d*|w[123]|linear[12]|img_mlp|txt_mlp|"
                  r"net)([._]|$)")
_EMBED = re.compile(r"(embed|embedder|embedding|patch|_in$|^x_embedder|^img_in|^txt_in|time_|t_|guidance_in|"
                    r"vector_in|pos_)")
_IO = re.compile(r"(^head|final_layer|norm_out|proj_out|^out$|^out\.|conv_out|conv_in)")
_BLOCK = re.compile(r"^(.*?[A-Za-z_]*blocks?|layers)\.(\d+)\.")


def layer_group(module: str) -> LayerGroup:
    """A best guess of what a module does, from its name (for presets and reports)."""
    if _ATTENTION.search(module):
        return LayerGroup.ATTENTION
    if _MLP.search(module):
        return LayerGroup.MLP
    if _IO.search(module):
        return LayerGroup.IO
    if _EMBED.search(module):
        return LayerGroup.EMBEDDING
    return LayerGroup.PROJ


def layer_block(module: str) -> str:
    """``blocks.3.self_attn.q`` → ``blocks.3``; ``double_blocks.0.img_attn.qkv`` → ``double_blocks.0``;
    a module outside numbered blocks → ``other``."""
    m = _BLOCK.match(module)
    return f"{m.group(1)}.{m.group(2)}" if m else "other"


def _is_float(source: WeightSource, key: str) -> bool:
    return bool(source_dtype(source, key).is_floating_point)


def _listing(items: Sequence[str], what: str) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" … and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} {what}: {shown}{more}"


def _layer_keys(source: WeightSource) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for key in source.keys():
        if key.endswith(".weight"):
            shape = tuple(int(s) for s in source.shape(key))
            if len(shape) in LAYER_DIMS and _is_float(source, key):
                out[key] = shape
    return out


def _spec(key: str, shape: tuple[int, ...]) -> LayerSpec:
    name = key[: -len(".weight")]
    module = name[len(COMFY_PREFIX):] if name.startswith(COMFY_PREFIX) else name
    return LayerSpec(
        kohya=name,
        checkpoint_key=key,
        rows=None,
        comfy_key=key,
        diffusers=name,
        shape=shape,
        component=Component.UNET,
        group=layer_group(module),
        block=layer_block(module),
    )


def generic_table(base: WeightSource, tuned: WeightSource) -> tuple[KeyTable, PairReport]:
    """The key table of a same-layout pair (keys as both sources list them; see :func:`diffusion_view`).

    Raises:
        MismatchError: layer weights present on one side only, or with different shapes.
        FormatError: no 2-D/4-D/5-D floating-point ``.weight`` tensor at all.
    """
    lb, lt = _layer_keys(base), _layer_keys(tuned)
    missing_t = [k for k in lb if k not in lt]
    missing_b = [k for k in lt if k not in lb]
    mismatched = [f"{k} {list(lb[k])} vs {list(lt[k])}" for k in lb if k in lt and lb[k] != lt[k]]
    problems = []
    if missing_t:
        problems.append(_listing(missing_t, f"layer weights missing in tuned {tuned.name!r}"))
    if missing_b:
        problems.append(_listing(missing_b, f"layer weights missing in base {base.name!r}"))
    if mismatched:
        problems.append(_listing(mismatched, "shape mismatches (base vs tuned)"))
    if problems:
        raise MismatchError(
            f"base {base.name!r} and tuned {tuned.name!r} are not the same layout (generic mode compares "
            "every .weight tensor): " + "; ".join(problems)
        )
    if not lb:
        raise FormatError(
            f"{base.name!r}: no Linear/Conv weight (2-D, 4-D or 5-D floating-point '.weight' tensor) to extract"
        )
    specs = tuple(_spec(k, lb[k]) for k in lb)
    table = KeyTable(None, specs)  # type: ignore[arg-type]  # no architecture record
    report = PairReport(
        arch=None,  # type: ignore[arg-type]
        keys_compared=len(specs),
        layers=len(specs),
        notes=(f"generic mode: {len(specs)} Linear/Conv weights named by their keys "
               f"(ComfyUI-native 'diffusion_model.<module>' names), no architecture record",),
        key_style=KeyStyle.GENERIC,
        components=(Component.UNET,),
        size="generic",
    )
    return table, report


# ---------------------------------------------------------------------------------------------
# Exact parts (.diff / .diff_b)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExactParts:
    """The exactly stored tensors of an extraction and what was left out."""

    layers: Mapping[str, LayerDelta]
    diff: int  # 1-D weights and other parameters
    diff_b: int  # biases
    unchanged: int  # identical on both sides: not written
    nbytes: int

    def note(self) -> str:
        return (f"exact parts: {self.diff} .diff (1-D weights / other parameters), {self.diff_b} .diff_b "
                f"(biases), {self.nbytes / 2**20:.2f} MiB; {self.unchanged} unchanged tensors left out")


def part_name(key: str) -> tuple[str, bool]:
    """The Lora layer name of an exactly stored tensor and whether it is a bias.

    ``….weight`` → the module (written ``<module>.diff``); ``….bias`` → the key itself (a
    :class:`BiasDiffLayer`, written ``<module>.diff_b``); any other key → the key (``<key>.diff``).
    """
    if key.endswith(".weight"):
        return key[: -len(".weight")], False
    if key.endswith(BIAS_SUFFIX):
        return key, True
    return key, False


def exact_parts(base: WeightSource, tuned: WeightSource, table: KeyTable,
                dtype: torch.dtype = torch.float32) -> ExactParts:
    """Every floating-point tensor outside ``table`` that both sides hold with the same shape and that
    changed, as an exact ΔW (``fp32(t) − fp32(w)``, kept in ``dtype``).

    Raises:
        MismatchError: such a tensor has different shapes on the two sides.
    """
    layer_keys = {s.checkpoint_key for s in table.layers}
    keys_t = set(tuned.keys())
    layers: dict[str, LayerDelta] = {}
    n_diff = n_bias = unchanged = nbytes = 0
    mismatched: list[str] = []
    for key in base.keys():
        if key in layer_keys or key not in keys_t:
            continue
        if not (_is_float(base, key) and _is_float(tuned, key)):
            continue
        sb, st = tuple(base.shape(key)), tuple(tuned.shape(key))
        if sb != st:
            mismatched.append(f"{key} {list(sb)} vs {list(st)}")
            continue
        w = base.get(key)
        t = tuned.get(key)
        d = t.to(torch.float32, copy=True).sub_(w.to(torch.float32))
        if not bool(torch.any(d != 0)):
            unchanged += 1
            continue
        if not bool(torch.isfinite(d).all()):
            from .errors import NonFiniteError

            raise NonFiniteError(f"tensor {key} holds NaN or Inf values in base or tuned", (key,))
        name, is_bias = part_name(key)
        d = d.to(dtype).contiguous()
        layers[name] = BiasDiffLayer(d) if is_bias else DiffLayer(d)
        nbytes += d.numel() * d.element_size()
        if is_bias:
            n_bias += 1
        else:
            n_diff += 1
    if mismatched:
        raise MismatchError(_listing(mismatched, "tensors with different shapes (base vs tuned)"))
    return ExactParts(layers=layers, diff=n_diff, diff_b=n_bias, unchanged=unchanged, nbytes=nbytes)


def comfy_names_check(names: Iterable[str], key_map: Mapping[str, str]) -> tuple[str, ...]:
    """The Lora layer names ComfyUI's key map (``model_lora_keys_unet``) does not accept.

    A weight layer ``diffusion_model.<m>`` needs ``key_map[<name>]``; a bias layer
    ``diffusion_model.<m>.bias`` needs its module ``diffusion_model.<m>`` there (``.diff_b`` is
    applied to the module's bias).
    """
    bad = []
    for name in names:
        probe = name[: -len(BIAS_SUFFIX)] if name.endswith(BIAS_SUFFIX) else name
        if probe not in key_map:
            bad.append(name)
    return tuple(bad)



def has_record(base: WeightSource, tuned: WeightSource) -> bool:
    """Whether an architecture record of Rankwise detects either side (else the generic path applies)."""
    from .archs import detect_arch

    for source in (base, tuned):
        shapes = {k: tuple(int(s) for s in source.shape(k)) for k in source.keys()}
        try:
            detect_arch(shapes)
            return True
        except FormatError:
            continue
    return False
