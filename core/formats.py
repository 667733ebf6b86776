"""LoRA state dicts ⇄ :class:`~.types.Lora`.

Readers understand, per module (the part of a key before its suffix):

==============  =====================================================================================
format          tensors of one module
==============  =====================================================================================
kohya / LoCon   ``.lora_up.weight`` ``.lora_down.weight`` [``.lora_mid.weight``] [``.alpha``]
LoHa            ``.hada_w1_a/b`` ``.hada_w2_a/b`` [``.hada_t1/t2``] [``.alpha``]  → densified
LoKr            ``.lokr_w1`` | ``.lokr_w1_a/b``, ``.lokr_w2`` | ``.lokr_w2_a/b`` [``.lokr_t2``] → densified
full            ``.diff`` (``.diff_b`` bias diffs are reported as unsupported)
PEFT            ``.lora_A/B.weight``, ``.lora_A/B.default.weight``, ``.lora_A/B``
diffusers       ``.lora.up/down.weight``, ``.lora_linear_layer.up/down.weight``, ``_lora.up/down.weight``
ComfyUI         the kohya suffixes on ``diffusion_model.<sgm key>`` / ``text_encoders.<clip key>`` names
==============  =====================================================================================

Module names in any of these styles are renamed to the kohya name of the architecture's key table
(``core.archs``), which is how :class:`~.types.Lora` keys its layers.

Scaling, as the loaders that define each format apply it (ComfyUI ``comfy/weight_adapter``,
LyCORIS ``functional``):

* LoRA: ΔW = alpha/r · up @ down, r = ``down.shape[0]``; no ``.alpha`` → alpha = r (scale 1).
  PEFT/diffusers files without ``.alpha`` use diffusers' ``lora_adapter_metadata`` (``lora_alpha``,
  ``r``, ``alpha_pattern``, ``use_rslora``) when the file carries it.
* LoHa: ΔW = alpha/r · (w1a @ w1b) ⊙ (w2a @ w2b), r = ``w1b.shape[0]``. Tucker form: each factor is
  ``einsum("ijkl,jr,ip->prkl", t, wb, wa)`` (``wa`` stored (r, out), ``wb`` (r, in)).
  No alpha → scale 1.
* LoKr: ΔW = s · kron(w1, w2) with w1 = w1a @ w1b (or ``lokr_w1``), w2 = w2a @ w2b, Tucker
  ``einsum("ijkl,jr,ip->prkl", t2, w2b, w2a)`` (or ``lokr_w2``); conv: w1 gets two trailing unit dims.
  s = alpha/r with r = ``w2b.shape[0]`` when w2 is factored, else ``w1b.shape[0]`` when w1 is;
  scale 1 when neither is factored or there is no alpha.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

import torch

from .errors import FormatError, MismatchError, NonFiniteError
from .finite import is_finite, non_finite_parts
from .stream_write import StreamItem
from .types import Arch, BiasDiffLayer, DiffLayer, LayerDelta, Lora, LoraLayer, bias_module

if TYPE_CHECKING:
    from .archs import KeyTable

Tensor = torch.Tensor

def _record_prefixes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from .archs import COMFY_LORA_PREFIXES, kohya_prefixes

    return kohya_prefixes(), COMFY_LORA_PREFIXES


# From the architecture records (core/data/archs): lora_unet_, lora_te_, lora_te1_ … lora_te3_.
KOHYA_PREFIXES, COMFY_PREFIXES = _record_prefixes()


class LoraFormat(str, enum.Enum):
    KOHYA = "kohya"
    LOHA = "loha"
    LOKR = "lokr"
    FULL = "full"
    PEFT = "peft"
    DIFFUSERS = "diffusers"
    COMFY = "comfy"
    CLONEOFSIMO = "cloneofsimo"


class _Role(str, enum.Enum):
    UP = "up"
    DOWN = "down"
    MID = "mid"
    ALPHA = "alpha"
    DIFF = "diff"
    HADA_W1A = "hada_w1_a"
    HADA_W1B = "hada_w1_b"
    HADA_W2A = "hada_w2_a"
    HADA_W2B = "hada_w2_b"
    HADA_T1 = "hada_t1"
    HADA_T2 = "hada_t2"
    LOKR_W1 = "lokr_w1"
    LOKR_W1A = "lokr_w1_a"
    LOKR_W1B = "lokr_w1_b"
    LOKR_W2 = "lokr_w2"
    LOKR_W2A = "lokr_w2_a"
    LOKR_W2B = "lokr_w2_b"
    LOKR_T2 = "lokr_t2"
    UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class _Suffix:
    text: str
    role: _Role
    fmt: LoraFormat | None  # None: belongs to whatever format the module's other keys have


# The one table of key suffixes. Matching takes the longest suffix that ends the key.
SUFFIXES: tuple[_Suffix, ...] = (
    _Suffix(".lora_up.weight", _Role.UP, LoraFormat.KOHYA),
    _Suffix(".lora_down.weight", _Role.DOWN, LoraFormat.KOHYA),
    _Suffix(".lora_mid.weight", _Role.MID, LoraFormat.KOHYA),
    _Suffix(".alpha", _Role.ALPHA, None),
    _Suffix(".lora_B.weight", _Role.UP, LoraFormat.PEFT),
    _Suffix(".lora_A.weight", _Role.DOWN, LoraFormat.PEFT),
    _Suffix(".lora_B.default.weight", _Role.UP, LoraFormat.PEFT),
    _Suffix(".lora_A.default.weight", _Role.DOWN, LoraFormat.PEFT),
    _Suffix(".lora_B", _Role.UP, LoraFormat.PEFT),
    _Suffix(".lora_A", _Role.DOWN, LoraFormat.PEFT),
    _Suffix(".lora.up.weight", _Role.UP, LoraFormat.DIFFUSERS),
    _Suffix(".lora.down.weight", _Role.DOWN, LoraFormat.DIFFUSERS),
    _Suffix(".lora_linear_layer.up.weight", _Role.UP, LoraFormat.DIFFUSERS),
    _Suffix(".lora_linear_layer.down.weight", _Role.DOWN, LoraFormat.DIFFUSERS),
    _Suffix("_lora.up.weight", _Role.UP, LoraFormat.DIFFUSERS),
    _Suffix("_lora.down.weight", _Role.DOWN, LoraFormat.DIFFUSERS),
    _Suffix(".hada_w1_a", _Role.HADA_W1A, LoraFormat.LOHA),
    _Suffix(".hada_w1_b", _Role.HADA_W1B, LoraFormat.LOHA),
    _Suffix(".hada_w2_a", _Role.HADA_W2A, LoraFormat.LOHA),
    _Suffix(".hada_w2_b", _Role.HADA_W2B, LoraFormat.LOHA),
    _Suffix(".hada_t1", _Role.HADA_T1, LoraFormat.LOHA),
    _Suffix(".hada_t2", _Role.HADA_T2, LoraFormat.LOHA),
    _Suffix(".lokr_w1", _Role.LOKR_W1, LoraFormat.LOKR),
    _Suffix(".lokr_w1_a", _Role.LOKR_W1A, LoraFormat.LOKR),
    _Suffix(".lokr_w1_b", _Role.LOKR_W1B, LoraFormat.LOKR),
    _Suffix(".lokr_w2", _Role.LOKR_W2, LoraFormat.LOKR),
    _Suffix(".lokr_w2_a", _Role.LOKR_W2A, LoraFormat.LOKR),
    _Suffix(".lokr_w2_b", _Role.LOKR_W2B, LoraFormat.LOKR),
    _Suffix(".lokr_t2", _Role.LOKR_T2, LoraFormat.LOKR),
    _Suffix(".diff", _Role.DIFF, LoraFormat.FULL),
    # Understood, but not representable as a ΔW of the weight: reported by name, never applied.
    _Suffix(".diff_b", _Role.UNSUPPORTED, LoraFormat.FULL),
    _Suffix(".dora_scale", _Role.UNSUPPORTED, None),
    _Suffix(".w_norm", _Role.UNSUPPORTED, None),
    _Suffix(".b_norm", _Role.UNSUPPORTED, None),
    _Suffix(".set_weight", _Role.UNSUPPORTED, None),
    _Suffix(".reshape_weight", _Role.UNSUPPORTED, None),
    _Suffix(".bias_indices", _Role.UNSUPPORTED, None),
    _Suffix(".bias_values", _Role.UNSUPPORTED, None),
    _Suffix(".bias_size", _Role.UNSUPPORTED, None),
    _Suffix(".oft_blocks", _Role.UNSUPPORTED, None),
    _Suffix(".oft_diag", _Role.UNSUPPORTED, None),
    _Suffix(".lora_embedding_A", _Role.UNSUPPORTED, LoraFormat.PEFT),
    _Suffix(".lora_embedding_B", _Role.UNSUPPORTED, LoraFormat.PEFT),
)
_SUFFIXES_LONGEST_FIRST = tuple(sorted(SUFFIXES, key=lambda s: len(s.text), reverse=True))
_UNSUPPORTED_WHY = {
    ".diff_b": "bias difference (bias deltas are not part of a Lora; ignored)",
    ".dora_scale": "DoRA magnitude (depends on the base weight; ignored, the layer is read as plain LoRA)",
    ".w_norm": "norm weight difference (ignored)",
    ".b_norm": "norm bias difference (ignored)",
    ".set_weight": "weight replacement (ignored)",
    ".reshape_weight": "weight reshape (ignored)",
}
_CLONEOFSIMO_KEY = re.compile(r"^[A-Za-z_][\w.]*:\d+:(up|down)$")


@dataclass(frozen=True)
class ReadReport:
    """What a reader understood.

    ``modules``: layers in the resulting Lora. ``unknown_keys``: keys matching no known suffix, or
    incomplete modules (e.g. an up without its down). ``unsupported_keys``: understood but not
    representable (``.diff_b``, ``.dora_scale``, norms) — ignored. ``unmapped_modules``: understood
    modules missing from the architecture's key table; kohya-named ones are kept under their own
    name, others are dropped (``notes`` says which). ``densified``: LoHa/LoKr/diff layers turned into
    :class:`~.types.DiffLayer`. ``skipped_modules``: modules whose factors do not fit their layer,
    dropped on request (``skip_bad_modules=True``; otherwise they raise). ``embeddings``: the
    textual-inversion tokens (name, shape) a cloneofsimo file carries beside its LoRA; they are not
    layers of the Lora (read them with :func:`~.cloneofsimo.embeddings`).
    """

    formats: tuple[LoraFormat, ...]
    modules: int
    unknown_keys: tuple[str, ...] = ()
    unmapped_modules: tuple[str, ...] = ()
    densified: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    unsupported_keys: tuple[str, ...] = ()
    skipped_modules: tuple[str, ...] = ()  # dropped because their factors do not fit the layer
    embeddings: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (token, shape): textual inversion kept aside

    @property
    def skipped(self) -> int:
        """How many modules were dropped for not fitting their layer (``skip_bad_modules``)."""
        return len(self.skipped_modules)

    def summary(self) -> str:
        lines = [
            f"read {self.modules} modules ({', '.join(f.value for f in self.formats) or 'no format'})"
        ]
        for label, items in (
            ("unknown keys", self.unknown_keys),
            ("unsupported keys (ignored)", self.unsupported_keys),
            ("modules not in the architecture's table", self.unmapped_modules),
            ("densified to full ΔW", self.densified),
            ("modules dropped, factors do not fit the layer", self.skipped_modules),
            ("textual-inversion embeddings (not part of the LoRA)",
             tuple(f"{t} {list(s)}" for t, s in self.embeddings)),
        ):
            if items:
                lines.append(f"{label} ({len(items)}): {_sample(items)}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _sample(items: Iterable[str], n: int = 6) -> str:
    items = list(items)
    shown = ", ".join(items[:n])
    return shown + (f", … ({len(items) - n} more)" if len(items) > n else "")


# --------------------------------------------------------------------------------------------
# key grouping


def _split_key(key: str) -> tuple[str, _Suffix] | None:
    for suffix in _SUFFIXES_LONGEST_FIRST:
        if key.endswith(suffix.text) and len(key) > len(suffix.text):
            return key[: -len(suffix.text)], suffix
    return None


def _naming_format(module: str) -> LoraFormat | None:
    if module.startswith(COMFY_PREFIXES):
        return LoraFormat.COMFY
    return None


def detect_format(keys: Iterable[str]) -> tuple[LoraFormat, ...]:
    """The formats present among ``keys`` (in :class:`LoraFormat` order).

    A ComfyUI-named module counts as COMFY (plus FULL/LOHA/LOKR for those layer types); a kohya
    suffix on any other name counts as KOHYA.
    """
    found: set[LoraFormat] = set()
    for key in keys:
        if _CLONEOFSIMO_KEY.match(key):
            found.add(LoraFormat.CLONEOFSIMO)
            continue
        split = _split_key(key)
        if split is None:
            continue
        module, suffix = split
        naming = _naming_format(module)
        if naming is not None:
            found.add(naming)
            if suffix.fmt in (LoraFormat.FULL, LoraFormat.LOHA, LoraFormat.LOKR):
                found.add(suffix.fmt)
        elif suffix.fmt is not None and suffix.role is not _Role.UNSUPPORTED:
            found.add(suffix.fmt)
    return tuple(f for f in LoraFormat if f in found)


@dataclass
class _Module:
    name: str
    parts: dict[_Role, tuple[str, Tensor]]
    formats: set[LoraFormat]

    def keys(self) -> list[str]:
        return [k for k, _ in self.parts.values()]

    def get(self, role: _Role) -> Tensor | None:
        item = self.parts.get(role)
        return None if item is None else item[1]


def _group(sd: Mapping[str, Tensor]) -> tuple[dict[str, _Module], list[str], list[str]]:
    modules: dict[str, _Module] = {}
    unknown: list[str] = []
    unsupported: list[str] = []
    for key, value in sd.items():
        split = _split_key(key)
        if split is None or not isinstance(value, torch.Tensor):
            unknown.append(key)
            continue
        name, suffix = split
        if suffix.role is _Role.UNSUPPORTED:
            unsupported.append(key)
            continue
        mod = modules.setdefault(name, _Module(name, {}, set()))
        if suffix.role in mod.parts:  # two spellings of the same part: keep the first
            unknown.append(key)
            continue
        mod.parts[suffix.role] = (key, value)
        if suffix.fmt is not None:
            mod.formats.add(suffix.fmt)
    return modules, unknown, unsupported


# --------------------------------------------------------------------------------------------
# layer construction (math in fp32)


def _alpha_of(mod: _Module) -> float | None:
    t = mod.get(_Role.ALPHA)
    if t is None:
        return None
    if t.numel() != 1:
        raise FormatError(
            f"{mod.parts[_Role.ALPHA][0]}: alpha must be a single number, got shape {tuple(t.shape)}"
        )
    value = float(t.float().item())
    if not math.isfinite(value):
        raise NonFiniteError(f"{mod.parts[_Role.ALPHA][0]} is {value}", (mod.name,))
    return value


def _loha_delta(mod: _Module, alpha: float | None) -> Tensor:
    w1a, w1b = mod.get(_Role.HADA_W1A).float(), mod.get(_Role.HADA_W1B).float()
    w2a, w2b = mod.get(_Role.HADA_W2A).float(), mod.get(_Role.HADA_W2B).float()
    t1, t2 = mod.get(_Role.HADA_T1), mod.get(_Role.HADA_T2)
    rank = int(w1b.shape[0])
    scale = 1.0 if alpha is None else alpha / rank
    if t1 is not None and t2 is not None:
        m1 = torch.einsum("ijkl,jr,ip->prkl", t1.float(), w1b.flatten(1), w1a.flatten(1))
        m2 = torch.einsum("ijkl,jr,ip->prkl", t2.float(), w2b.flatten(1), w2a.flatten(1))
    else:
        m1 = w1a.flatten(1) @ w1b.flatten(1)
        m2 = w2a.flatten(1) @ w2b.flatten(1)
    return (m1 * m2) * scale


def _lokr_delta(mod: _Module, alpha: float | None) -> Tensor:
    w1, w2 = mod.get(_Role.LOKR_W1), mod.get(_Role.LOKR_W2)
    rank: int | None = None
    if w1 is None:
        w1a, w1b = mod.get(_Role.LOKR_W1A), mod.get(_Role.LOKR_W1B)
        if w1a is None or w1b is None:
            raise FormatError(f"{mod.name}: LoKr module has neither lokr_w1 nor lokr_w1_a/_b")
        rank = int(w1b.shape[0])
        w1 = w1a.float() @ w1b.float()
    if w2 is None:
        w2a, w2b, t2 = mod.get(_Role.LOKR_W2A), mod.get(_Role.LOKR_W2B), mod.get(_Role.LOKR_T2)
        if w2a is None or w2b is None:
            raise FormatError(f"{mod.name}: LoKr module has neither lokr_w2 nor lokr_w2_a/_b")
        rank = int(w2b.shape[0])
        if t2 is not None:
            w2 = torch.einsum("ijkl,jr,ip->prkl", t2.float(), w2b.float().flatten(1), w2a.float())
        else:
            r = w2b.shape[0]
            w2 = (w2a.float() @ w2b.float().reshape(r, -1)).reshape(w2a.shape[0], *w2b.shape[1:])
    w1, w2 = w1.float(), w2.float()
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    scale = alpha / rank if (alpha is not None and rank is not None) else 1.0
    return torch.kron(w1, w2.contiguous()) * scale


def _fit_factors(up: Tensor, down: Tensor, mid: Tensor | None, shape: tuple[int, ...] | None):
    """Reshape up/down (no mid) to a weight's layout: 2-D for Linear, 4-D for Conv."""
    if shape is None or mid is not None:
        return up, down
    r = down.shape[0]
    if len(shape) == 2:
        if up.dim() == 4 and up.shape[2:] == (1, 1) and down.dim() == 4 and down.shape[2:] == (1, 1):
            return up.reshape(up.shape[0], r), down.reshape(r, -1)
        return up, down
    out_ch, in_ch, kh, kw = shape
    if up.dim() == 2 and up.shape[0] == out_ch and down.numel() == r * in_ch * kh * kw:
        return up.reshape(out_ch, r, 1, 1), down.reshape(r, in_ch, kh, kw)
    if down.dim() == 2 and down.numel() == r * in_ch * kh * kw:
        return up.reshape(up.shape[0], r, 1, 1), down.reshape(r, in_ch, kh, kw)
    return up, down


def _numel(shape: Iterable[int]) -> int:
    return int(math.prod(int(s) for s in shape))


# --------------------------------------------------------------------------------------------
# naming


GENERIC_PREFIX = "diffusion_model."
"""Module names of a generic-path LoRA (core.generic), read without a key table."""


def _generic_bias_parts(sd: Mapping[str, Tensor], built: list, unsupported: list[str]) -> list[str]:
    """``unsupported`` without the ``.diff_b`` keys of ComfyUI-native modules (read as bias layers)."""
    return [k for k in unsupported if not (k.endswith(".diff_b") and k.startswith(GENERIC_PREFIX))]


def _kohya_named(name: str) -> bool:
    return name.startswith(KOHYA_PREFIXES)


def _component_prefix(name: str) -> tuple[str, str]:
    for prefix in ("unet.", "text_encoder_3.", "text_encoder_2.", "text_encoder.", "transformer."):
        if name.startswith(prefix):
            return prefix[:-1], name[len(prefix) :]
    return "", name


def _candidates(name: str) -> list[str]:
    """Spellings of one module name to look up in a key table's aliases (most direct first)."""
    out = [name]
    stems = [name]
    for wrapper, prefixes in (
        ("base_model.model.", ("", "unet.", "transformer.", "text_encoder.", "text_encoder_2.")),
        ("unet.base_model.model.", ("unet.",)),
        ("text_encoder.base_model.model.", ("text_encoder.",)),
        ("text_encoder_2.base_model.model.", ("text_encoder_2.",)),
        ("text_encoder_3.base_model.model.", ("text_encoder_3.",)),
        ("transformer.base_model.model.", ("transformer.",)),
    ):
        if name.startswith(wrapper):
            rest = name[len(wrapper) :]
            stems.extend(p + rest for p in prefixes)
    if name.startswith("lycoris_"):
        stems.append("lora_unet_" + name[len("lycoris_") :])
    if name.startswith("lora_transformer_"):  # OneTrainer / ComfyUI spelling of kohya DiT names
        stems.append("lora_unet_" + name[len("lora_transformer_") :])
    if not name.startswith(("unet.", "transformer.", "text_encoder", "base_model.")) and "." in name and not name.startswith(
        COMFY_PREFIXES
    ):  # diffusers / PEFT paths saved without a component prefix
        stems.extend(p + name for p in ("unet.", "transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3."))
    for stem in list(stems):
        # transformers ≥ 5 dropped CLIPTextModel's "text_model." level from module paths
        m = re.match(r"^(text_encoder(?:_2)?\.)(encoder\.layers\..*)$", stem)
        if m:
            stems.append(m.group(1) + "text_model." + m.group(2))
    for stem in stems:
        fixed = stem.replace(".processor.", ".")
        if fixed.endswith(".to_out"):
            fixed += ".0"
        for c in (stem, fixed):
            if c not in out:
                out.append(c)
    return out


class _Names:
    """Looks module names up in one key table, in every spelling the table knows
    (kohya and its other UNet spelling, ComfyUI keys, diffusers paths)."""

    def __init__(self, table: KeyTable) -> None:
        self.table = table

    def _lookup(self, candidate: str):
        t = self.table
        if candidate.startswith("lora_"):
            return t.by_lora_name(candidate)
        if candidate.startswith("diffusion_model."):
            return t.by_comfy_key(candidate + ".weight")
        if candidate.startswith("text_encoders."):
            return t.by_comfy_key(candidate[len("text_encoders.") :] + ".weight")
        return t.by_diffusers(candidate)

    def resolve(self, name: str, numel: int | None):
        """(LayerSpec | None, ambiguous). Prefers a spec whose weight size matches ``numel``."""
        hits = []
        for c in _candidates(name):
            spec = self._lookup(c)
            if spec is not None and spec not in hits:
                hits.append(spec)
        if not hits:
            return None, False
        if len(hits) > 1 and numel is not None:
            fitting = [s for s in hits if _numel(s.shape) == numel]
            if fitting:
                return fitting[0], len(fitting) > 1
        return hits[0], len(hits) > 1


def _archs():
    from . import archs  # imported lazily: archs is large and optional for pure state-dict work

    return archs


def _table_for(arch: Arch, size: str = "full"):
    return _archs().key_table(arch, size)


def _table_sizes(arch: Arch) -> tuple[str, ...]:
    """Every key-table size of ``arch``'s record ("full", "tiny" test tables, SD3 "large")."""
    return _archs().arch_sizes(arch)


def arch_from_metadata(metadata: Mapping[str, str] | None) -> Arch | None:
    """The architecture a file's ss_*/modelspec metadata declares, if any.

    Each record lists value prefixes per metadata key (``metadata_match``); records are tried in
    ``metadata_priority`` order (SDXL before SD1, since ``ss_v2`` is written by both).
    """
    if not metadata:
        return None
    recs = sorted(_archs().records(), key=lambda r: r.metadata_priority)
    for rec in recs:
        for key, prefixes in rec.metadata_match.items():
            value = str(metadata.get(key, "")).lower()
            if value and any(value.startswith(p) if key != "ss_v2" else value == p for p in prefixes):
                return rec.arch
    return None


# --------------------------------------------------------------------------------------------
# PEFT / diffusers adapter metadata


def _adapter_config(metadata: Mapping[str, str] | None) -> dict | None:
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _peft_alpha(cfg: dict, module: str, rank: int) -> float | None:
    """alpha (in our alpha/rank convention) for a PEFT module from diffusers' adapter config."""
    component, path = _component_prefix(module)
    if path.startswith("base_model.model."):
        path = path[len("base_model.model.") :]
    packed = any("." in k and k.split(".", 1)[1] in ("r", "lora_alpha") for k in cfg)
    if packed:
        pre = f"{component}." if component else ""
        sub = {k[len(pre) :]: v for k, v in cfg.items() if pre and k.startswith(pre)}
        if not sub:
            return None
    else:
        sub = cfg
    lora_alpha = sub.get("lora_alpha")
    for pattern, value in (sub.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", path):
            lora_alpha = value
            break
    if lora_alpha is None:
        return None
    if sub.get("use_rslora"):
        return float(lora_alpha) * math.sqrt(rank)
    return float(lora_alpha)


# --------------------------------------------------------------------------------------------
# the reader


@dataclass
class _Built:
    name: str  # the module name as written in the file
    layer: LayerDelta
    formats: set[LoraFormat]
    densified: bool
    factors: str = ""  # the stored tensors and their shapes, for error messages


def _factor_shapes(mod: _Module) -> str:
    """``lora_up (320, 4), lora_down (4, 768)``: a module's tensors (alpha left out) as stored."""
    parts = sorted((k, tuple(int(n) for n in t.shape)) for role, (k, t) in mod.parts.items() if role is not _Role.ALPHA)
    return ", ".join(f"{k[len(mod.name):].lstrip('._')} {shape}" for k, shape in parts)


BAD_MODULE_HINT = "pass skip_bad_modules=True (CLI: --skip-bad-modules) to drop such modules"


def _bad_module_error(bad: list[str], label: str | None) -> MismatchError:
    many = len(bad) > 1
    where = f"{label} " if label else ""
    more = f" ({len(bad) - 1} more: {_sample(bad[1:], 3)})" if many else ""
    return MismatchError(
        f"{len(bad)} LoRA module{'s do' if many else ' does'} not fit {'their' if many else 'its'} {where}"
        f"layer{'s' if many else ''}: {bad[0]}{more}; the file is damaged or made for another model — "
        f"{BAD_MODULE_HINT}"
    )


def _build_layers(
    modules: Mapping[str, _Module], metadata: Mapping[str, str] | None, skip_bad: bool = False
) -> tuple[list[_Built], list[str], list[str], list[str]]:
    """(built modules, keys of incomplete modules, notes, modules dropped as bad when ``skip_bad``)."""
    built: list[_Built] = []
    incomplete: list[str] = []
    notes: list[str] = []
    skipped: list[str] = []
    cfg = _adapter_config(metadata)
    used_cfg = False
    for mod in modules.values():
        try:
            one = _build_one(mod, cfg)
        except FormatError as e:
            if not skip_bad:
                raise
            skipped.append(mod.name)
            notes.append(f"dropped {e}")
            continue
        if one is None:
            incomplete.extend(mod.keys())
            continue
        layer_built, from_cfg = one
        used_cfg = used_cfg or from_cfg
        built.append(layer_built)
    if used_cfg:
        notes.append("alpha taken from the file's lora_adapter_metadata (diffusers/PEFT LoraConfig)")
    return built, incomplete, notes, skipped


def _build_one(mod: _Module, cfg: dict | None) -> tuple[_Built, bool] | None:
    """One module as a layer (and whether its alpha came from the adapter config); None if incomplete."""
    factors = _factor_shapes(mod)
    used_cfg = False
    roles = set(mod.parts)
    alpha = _alpha_of(mod)
    if {_Role.UP, _Role.DOWN} <= roles:
        up, down, mid = mod.get(_Role.UP), mod.get(_Role.DOWN), mod.get(_Role.MID)
        rank = int(down.shape[0]) if down.dim() else 0
        if alpha is None and cfg is not None and mod.formats & {LoraFormat.PEFT, LoraFormat.DIFFUSERS}:
            alpha = _peft_alpha(cfg, mod.name, rank)
            used_cfg = alpha is not None
        if up.dim() not in (2, 4, 5) or down.dim() not in (2, 4, 5) or up.shape[1] != rank:
            raise FormatError(f"{mod.name}: {factors} are not LoRA factors of one rank")
        if up.dim() == 2 and down.dim() == 4:
            up = up.reshape(up.shape[0], rank, 1, 1)
        if mid is not None and (mid.dim() != 4 or down.dim() != 4):
            raise FormatError(f"{mod.name}: {factors}: lora_mid needs a 4-D conv down")
        try:
            layer = LoraLayer(up=up, down=down, alpha=float(rank if alpha is None else alpha), mid=mid)
        except ValueError as e:
            raise FormatError(f"{mod.name}: {factors}: {e}") from None
        return _Built(mod.name, layer, mod.formats, False, factors), used_cfg
    if _Role.DIFF in roles:
        return _Built(mod.name, DiffLayer(mod.get(_Role.DIFF).float()), mod.formats, True, factors), False
    if {_Role.HADA_W1A, _Role.HADA_W1B, _Role.HADA_W2A, _Role.HADA_W2B} <= roles:
        try:
            delta = _loha_delta(mod, alpha)
        except RuntimeError as e:
            raise FormatError(f"{mod.name}: LoHa tensors {factors} do not fit together ({_first_line(e)})") from None
        return _Built(mod.name, DiffLayer(delta), mod.formats, True, factors), False
    if roles & {_Role.LOKR_W1, _Role.LOKR_W1A, _Role.LOKR_W2, _Role.LOKR_W2A}:
        try:
            delta = _lokr_delta(mod, alpha)
        except RuntimeError as e:
            raise FormatError(f"{mod.name}: LoKr tensors {factors} do not fit together ({_first_line(e)})") from None
        return _Built(mod.name, DiffLayer(delta), mod.formats, True, factors), False
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _fit_to_spec(layer: LayerDelta, shape: tuple[int, ...]) -> LayerDelta | None:
    """The layer in the spec's layout, or None when its size does not match."""
    if _numel(layer.weight_shape) != _numel(shape):
        return None
    if isinstance(layer, DiffLayer):
        if tuple(layer.diff.shape) == shape:
            return layer
        return DiffLayer(layer.diff.reshape(shape))
    ws = layer.weight_shape
    if ws[0] != shape[0]:
        return None
    if ws == shape:
        return layer
    up, down = _fit_factors(layer.up, layer.down, layer.mid, shape)
    fitted = LoraLayer(up=up, down=down, alpha=layer.alpha, mid=layer.mid)
    return fitted if fitted.weight_shape == shape else None


def _fuse_parts(built: list[_Built], table) -> list[_Built]:
    """Join diffusers modules that are parts of one fused layer of ``table`` (Flux/SD3 ``to_q``,
    ``to_k``, ``to_v`` → ``qkv``) into one low-rank layer with the same ΔW: the parts' up factors
    (scaled by alpha/r) are placed at their rows, and the down factors stacked, or shared when
    every part has the same one (as Rankwise's diffusers writer stores them). Parts that are
    absent are zero rows."""
    if not getattr(table, "_parts", None):
        return built
    groups: dict[str, list[tuple[_Built, tuple]]] = {}
    specs: dict[str, object] = {}
    rest: list[_Built] = []
    for b in built:
        hit = None
        if isinstance(b.layer, LoraLayer) and b.layer.mid is None and b.layer.up.dim() == 2:
            for c in _candidates(b.name):
                hit = table.by_diffusers_part(c)
                if hit is not None:
                    break
        if hit is None:
            rest.append(b)
            continue
        spec, pieces = hit
        groups.setdefault(spec.kohya, []).append((b, pieces))
        specs[spec.kohya] = spec
    if not groups:
        return built
    for kohya, members in groups.items():
        spec = specs[kohya]
        rows, cols = spec.shape[0], _numel(spec.shape[1:])
        downs = [b.layer.down.float().reshape(b.layer.down.shape[0], -1) for b, _ in members]
        if any(d.shape[1] != cols for d in downs):
            rest.extend(b for b, _ in members)  # not this table's shapes: left to the mismatch report
            continue
        shared = all(d.shape == downs[0].shape and torch.equal(d, downs[0]) for d in downs)
        total = downs[0].shape[0] if shared else sum(d.shape[0] for d in downs)
        up = torch.zeros(rows, total)
        offset = 0
        for (b, pieces), d in zip(members, downs):
            r = d.shape[0]
            scaled = b.layer.up.float() * (float(b.layer.alpha) / b.layer.rank)
            cols_at = slice(0, r) if shared else slice(offset, offset + r)
            for piece in pieces:
                src = piece.part_rows or (0, piece.rows[1] - piece.rows[0])
                if src[1] > scaled.shape[0]:
                    break
                up[piece.rows[0]:piece.rows[1], cols_at] = scaled[src[0]:src[1]]
            offset += r
        down = downs[0] if shared else torch.cat(downs, dim=0)
        formats: set[LoraFormat] = set().union(*(b.formats for b, _ in members))
        rest.append(_Built(kohya, LoraLayer(up=up, down=down, alpha=float(total)), formats, False))
    return rest


def _score(names: _Names, built: list[_Built]) -> tuple[int, int]:
    ok = bad = 0
    for b in built:
        spec, _ = names.resolve(b.name, _numel(b.layer.weight_shape))
        if spec is None:
            continue
        if _numel(spec.shape) == _numel(b.layer.weight_shape):
            ok += 1
        else:
            bad += 1
    return ok, bad


def _choose_table(built: list[_Built], metadata: Mapping[str, str] | None):
    """Pick the architecture whose key table maps the most modules with matching shapes."""
    hint = arch_from_metadata(metadata)
    kohya_names = [b.name for b in built if _kohya_named(b.name)]
    try:
        named = _archs().detect_lora_arch(kohya_names) if kohya_names else None
    except Exception:  # a detector failure only loses a tie-breaker
        named = None
    best, best_key = None, None
    for arch in Arch:
        for size in _table_sizes(arch):
            try:
                table = _table_for(arch, size)
            except Exception:
                continue
            ok, bad = _score(_Names(table), _fuse_parts(built, table))
            # ties: the metadata's architecture, then the one told from kohya names (a Chroma LoRA
            # of block layers only has Flux's names and shapes; its modelspec says chroma)
            key = (ok - bad, arch == hint, arch == named)
            if ok > 0 and (best_key is None or key > best_key):
                best, best_key = table, key
    return best


def _table_of_arch(arch: Arch, built: list[_Built]):
    """The full-size table of ``arch``, or another size of its record (the tiny test table, SD3
    large) when that one fits the shapes better."""
    best, best_score = _table_for(arch), None
    for size in _table_sizes(arch):
        table = _table_for(arch, size)
        ok, bad = _score(_Names(table), _fuse_parts(built, table))
        if best_score is None or ok - bad > best_score:
            best, best_score = table, ok - bad
    return best


@dataclass
class _Mapped:
    """Built modules renamed onto a key table (or kept as they are without one)."""

    layers: dict[str, LayerDelta]
    formats: set[LoraFormat]
    unmapped: list[str]  # understood modules not (or not fitting) in the table
    kept: list[str]  # unmapped kohya-named modules kept under their own name
    dropped: list[str]  # unmapped foreign-named modules
    mismatched: list[str]  # "name: tensors … give ΔW …, the layer … is …"
    densified: list[str]
    notes: list[str]
    mismatched_names: list[str] = field(default_factory=list)


def _known_archs() -> str:
    return " / ".join(r.label for r in _archs().records())


def _arch_label(table) -> str:
    arch = getattr(table, "arch", None)
    return str(getattr(arch, "value", arch))


def _map_modules(built: list[_Built], table) -> _Mapped:
    names = _Names(table) if table is not None else None
    out = _Mapped({}, set(), [], [], [], [], [], [])
    for b in built:
        naming = _naming_format(b.name)
        if naming is not None:  # ComfyUI names with kohya suffixes are one format: COMFY
            out.formats |= (b.formats - {LoraFormat.KOHYA}) | {naming}
        else:
            out.formats |= b.formats
        target, layer = b.name, b.layer
        if names is not None:
            spec, ambiguous = names.resolve(b.name, _numel(b.layer.weight_shape))
            if spec is None:
                out.unmapped.append(b.name)
                if not _kohya_named(b.name):
                    out.dropped.append(b.name)
                    continue
                out.kept.append(b.name)
            else:
                shape = tuple(int(s) for s in spec.shape)
                layer = _fit_to_spec(b.layer, shape)
                if layer is None:
                    out.unmapped.append(b.name)
                    out.mismatched.append(
                        f"{b.name}: {b.factors or 'tensors'} give ΔW {tuple(b.layer.weight_shape)}, "
                        f"{_arch_label(table)} expects {shape}" + (f" for {spec.kohya}" if spec.kohya != b.name else "")
                    )
                    out.mismatched_names.append(b.name)
                    continue
                target = spec.kohya
                if ambiguous:
                    out.notes.append(f"{b.name}: several layers match this name; mapped to {target}")
        if target in out.layers:
            raise FormatError(
                f"two modules map to the same layer {target} (the second is {b.name}); "
                "the file mixes naming styles for one layer"
            )
        out.layers[target] = layer
        if b.densified:
            out.densified.append(target)
    return out


def _check_fit(mapped: _Mapped, built: list[_Built], table, explicit: bool, skip_bad: bool = False) -> None:
    """MismatchError when the LoRA is evidently for another architecture than ``table``'s, or when
    a module's factors do not fit its layer and ``skip_bad`` is not set."""
    if table is None:
        return
    label = _arch_label(table)
    if mapped.mismatched and len(mapped.mismatched) * 2 > len(built):
        raise MismatchError(
            f"{len(mapped.mismatched)} LoRA layers do not fit {label}: {_sample(mapped.mismatched, 4)}. "
            f"Is this LoRA for another model ({_known_archs()})?"
        )
    if mapped.mismatched and not skip_bad:
        raise _bad_module_error(mapped.mismatched, label)
    if len(mapped.layers) == len(mapped.kept):
        raise MismatchError(
            f"none of the {len(built)} LoRA modules belong to {label} "
            f"(e.g. {_sample([b.name for b in built], 3)}){_hint_other_arch(built, table)}"
        )
    if explicit and len(mapped.unmapped) * 2 > len(built):
        raise MismatchError(
            f"{len(mapped.unmapped)} of {len(built)} LoRA modules are not layers of {label} "
            f"(e.g. {_sample(mapped.unmapped, 4)}){_hint_other_arch(built, table)}"
        )


def _report_notes(mapped: _Mapped, table, unknown: list[str], unsupported: list[str]) -> list[str]:
    label = _arch_label(table)
    notes = list(mapped.notes)
    if mapped.mismatched:
        notes.append(
            f"{len(mapped.mismatched)} modules that do not fit their {label} layer dropped "
            f"(skip_bad_modules): {_sample(mapped.mismatched, 3)}"
        )
    if mapped.kept:
        notes.append(
            f"{len(mapped.kept)} kohya-named modules are not in the {label} key table; "
            f"kept under their own names: {_sample(mapped.kept, 3)}"
        )
    if mapped.dropped:
        notes.append(
            f"{len(mapped.dropped)} modules could not be renamed to kohya names and were dropped: "
            f"{_sample(mapped.dropped, 3)}"
        )
    for key in unsupported:
        why = next((w for s, w in _UNSUPPORTED_WHY.items() if key.endswith(s)), "not supported (ignored)")
        notes.append(f"{key}: {why}")
    if unknown:
        notes.append(f"{len(unknown)} keys not understood: {_sample(unknown, 4)}")
    nonfinite = [n for n, layer in mapped.layers.items() if not _finite(layer)]
    if nonfinite:
        notes.append(
            f"{len(nonfinite)} layers hold NaN/Inf values (resize/merge/save will refuse them): "
            f"{_sample(nonfinite, 4)}"
        )
    return notes


def _refuse_unreadable(keys: list[str]) -> None:
    raise FormatError(
        f"no LoRA module recognised among {len(keys)} keys (e.g. {_sample(keys, 5)}). Rankwise reads "
        "kohya/LoCon (lora_up/lora_down/alpha), LoHa (hada_*), LoKr (lokr_*), full (.diff), "
        "PEFT (lora_A/lora_B), diffusers (lora.up/lora_linear_layer) and ComfyUI "
        "(diffusion_model.*) keys."
    )


def lora_from_state_dict(
    sd: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    arch: Arch | None = None,
    table: KeyTable | None = None,
    skip_bad_modules: bool = False,
) -> tuple[Lora, ReadReport]:
    """Read a LoRA state dict in any supported format into a kohya-named :class:`Lora`.

    Args:
        sd: key → tensor, as stored (any dtype; low-rank factors are kept as stored, densified
            LoHa/LoKr/diff layers are fp32).
        metadata: the file's string metadata (kept on the Lora; diffusers' ``lora_adapter_metadata``
            supplies PEFT alphas).
        arch: the architecture the LoRA must fit. Modules in another architecture's naming, or with
            other shapes, raise :class:`MismatchError`. None: detected from names and shapes
            (full-size and tiny test tables).
        table: an explicit ``core.archs.KeyTable`` (e.g. a tiny test table); overrides ``arch``.
        skip_bad_modules: drop (and count in ``report.skipped_modules``) modules whose factors do
            not fit together or do not fit their layer, instead of raising.

    cloneofsimo ``lora`` files (``unet:N:up`` …) are numbered by position; :mod:`.cloneofsimo`
    names them first (and keeps their textual-inversion embeddings aside, see ``report.embeddings``).

    Returns:
        ``(lora, report)``. Modules missing from the table are kept when kohya-named, dropped
        otherwise; both are listed in ``report.unmapped_modules``.

    Raises:
        FormatError: no key is understood (the message lists sample keys), a module's tensors
            do not fit together, or foreign names cannot be mapped without an architecture.
        MismatchError: the LoRA does not fit ``arch``/``table`` (names or shapes, listed), or a
            module does not fit its layer (unless ``skip_bad_modules``).
    """
    keys = list(sd.keys())
    clone = None
    if _cloneofsimo().is_cloneofsimo(keys):
        clone = _cloneofsimo().to_kohya(sd, metadata, arch=arch, table=table)
        sd, metadata, table = clone.state_dict, clone.metadata, clone.table
        keys = list(sd.keys())
    modules, unknown, unsupported = _group(sd)
    built, incomplete, notes, skipped = _build_layers(modules, metadata, skip_bad_modules)
    unknown = unknown + incomplete
    if not built:
        if skipped:
            raise FormatError(f"every LoRA module was dropped as not fitting its layer: {_sample(skipped, 4)}")
        _refuse_unreadable(keys)

    explicit = table is not None or arch is not None
    if table is None and arch is not None:
        table = _table_of_arch(Arch(arch), built)
    if table is None:
        table = _choose_table(built, metadata)
    generic = False
    if table is None:
        foreign = [b.name for b in built if not _kohya_named(b.name)]
        if foreign and all(n.startswith(GENERIC_PREFIX) for n in foreign):
            # ComfyUI-native names of a model with no record (core.generic): kept as they are
            generic, foreign = True, []
            notes.append("no architecture record: ComfyUI-native 'diffusion_model.<module>' names kept as "
                         "they are, shapes not checked")
            unsupported = _generic_bias_parts(sd, built, unsupported)
        if foreign:
            raise FormatError(
                f"cannot map module names such as {_sample(foreign, 3)} to a known architecture "
                f"({_known_archs()}); pass arch= to say which model the LoRA is for."
            )
        if not generic:
            notes.append("architecture not recognised: kohya names kept as they are, shapes not checked")

    if table is not None:
        built = _fuse_parts(built, table)
    mapped = _map_modules(built, table)
    if generic:
        for key in sd:
            if key.endswith(".diff_b") and key.startswith(GENERIC_PREFIX):
                mapped.layers[key[: -len(".diff_b")] + ".bias"] = BiasDiffLayer(sd[key].float())
    _check_fit(mapped, built, table, explicit, skip_bad_modules)
    notes.extend(_report_notes(mapped, table, unknown, unsupported))
    skipped.extend(mapped.mismatched_names)
    if clone is not None:
        mapped.formats = {LoraFormat.CLONEOFSIMO}
        notes = list(clone.notes) + notes
    lora = Lora(
        layers=mapped.layers,
        metadata={str(k): str(v) for k, v in (metadata or {}).items()},
        arch=getattr(table, "arch", None),
    )
    report = ReadReport(
        formats=tuple(f for f in LoraFormat if f in mapped.formats),
        modules=len(mapped.layers),
        unknown_keys=tuple(unknown),
        unmapped_modules=tuple(mapped.unmapped),
        densified=tuple(mapped.densified),
        notes=tuple(notes),
        unsupported_keys=tuple(unsupported),
        skipped_modules=tuple(skipped),
        embeddings=clone.embeddings if clone is not None else (),
    )
    return lora, report


def _cloneofsimo():
    from . import cloneofsimo  # lazily: it needs the key tables

    return cloneofsimo


def _finite(layer: LayerDelta) -> bool:
    return all(is_finite(t) for t in _layer_tensors(layer).values())


def _hint_other_arch(built: list[_Built], table) -> str:
    """'; it looks like an SD1 LoRA' when another architecture maps the modules better."""
    own = getattr(table, "arch", None)
    best, best_ok = None, 0
    for arch in Arch:
        if arch == own:
            continue
        try:
            ok, bad = _score(_Names(_table_for(arch)), _fuse_parts(built, _table_for(arch)))
        except Exception:
            continue
        if ok - bad > best_ok:
            best, best_ok = arch, ok - bad
    if best is None:
        return ""
    return f"; it looks like a LoRA for {best.value} ({best_ok} of {len(built)} modules fit)"


# --------------------------------------------------------------------------------------------
# writers


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    # .to() may return the same tensor; clone so that no two saved tensors share storage
    return t.detach().to(device="cpu", dtype=dtype).contiguous().clone()


def _alpha_tensor(alpha: float, dtype: torch.dtype) -> Tensor:
    """kohya writes alpha as a 0-d tensor in the save dtype; fall back to fp32 when that would round it."""
    t = torch.tensor(float(alpha), dtype=dtype)
    if float(t.item()) != float(alpha):
        t = torch.tensor(float(alpha), dtype=torch.float32)
    return t


def _layer_tensors(layer: LayerDelta) -> dict[str, Tensor]:
    if isinstance(layer, BiasDiffLayer):
        return {"diff_b": layer.diff}
    if isinstance(layer, DiffLayer):
        return {"diff": layer.diff}
    parts = {"lora_up.weight": layer.up, "lora_down.weight": layer.down}
    if layer.mid is not None:
        parts["lora_mid.weight"] = layer.mid
    return parts


SAVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def common_alpha(lora: Lora) -> float | None:
    """The most common alpha of the low-rank layers (ties: the larger), or None without any."""
    counts: dict[float, int] = {}
    for layer in lora.layers.values():
        if isinstance(layer, LoraLayer):
            counts[float(layer.alpha)] = counts.get(float(layer.alpha), 0) + 1
    return max(counts, key=lambda a: (counts[a], a)) if counts else None


def lora_state_items(
    lora: Lora,
    *,
    dtype: torch.dtype = torch.float16,
    alpha: float | None = None,
    name_of: Callable[[str], str] | None = None,
) -> list[StreamItem]:
    """The kohya state dict of ``lora`` as stream items ``(key, shape, dtype, producer)``: each
    tensor is cast (a fresh CPU copy) only when its producer is called, so a file can be hashed
    and written one tensor at a time.

    Keys: ``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` (0-d, save dtype unless that
    would round it, then fp32), ``.lora_mid.weight`` for Tucker layers, ``<name>.diff`` for dense
    layers, ``<module>.diff_b`` for bias layers (named ``<module>.bias`` in the Lora); ``name_of``
    renames the module part. With ``alpha``, every low-rank layer is written
    with that alpha and its ``up`` scaled by ``alpha_i / alpha`` (ΔW unchanged).

    Everything is checked first: :class:`NonFiniteError` names all layers holding NaN/Inf, or
    overflowing ``dtype`` after the cast; ``ValueError`` for an unsupported dtype or alpha.
    """
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"save dtype must be float16, bfloat16, float32 or float64, got {dtype}")
    if alpha is not None and (not math.isfinite(float(alpha)) or float(alpha) <= 0):
        raise ValueError(f"a uniform alpha must be a positive number, got {alpha}")
    rename = name_of or (lambda name: name)
    items: list[StreamItem] = []
    nonfinite: list[str] = []
    overflow: list[str] = []
    for name, layer in lora.layers.items():
        parts = _layer_tensors(layer)
        if non_finite_parts(parts.items()):  # the one policy (core/finite.py)
            nonfinite.append(name)
            continue
        scale = 1.0
        if isinstance(layer, LoraLayer) and alpha is not None and float(layer.alpha) != float(alpha):
            scale = float(layer.alpha) / float(alpha)
        prefix = rename(bias_module(name) if isinstance(layer, BiasDiffLayer) else name)
        fits = True
        for suffix, t in parts.items():
            produce = partial(_cast_scaled, t, scale if suffix == "lora_up.weight" else 1.0, dtype)
            fits = fits and is_finite(produce())  # the cast itself finds a save-dtype overflow
            items.append((f"{prefix}.{suffix}", tuple(t.shape), dtype, produce))
        if not fits:
            overflow.append(name)
        if isinstance(layer, LoraLayer):
            a = _alpha_tensor(layer.alpha if scale == 1.0 else float(alpha), dtype)
            items.append((f"{prefix}.alpha", (), a.dtype, partial(torch.clone, a)))
    if nonfinite:
        raise NonFiniteError(
            f"{len(nonfinite)} layers hold NaN/Inf values: {_sample(nonfinite, 6)}", tuple(nonfinite)
        )
    if overflow:
        raise NonFiniteError(
            f"{len(overflow)} layers overflow {str(dtype).replace('torch.', '')} "
            f"(|value| > {torch.finfo(dtype).max:g}): {_sample(overflow, 6)}. Save as bfloat16 or "
            "float32, or lower the strength.",
            tuple(overflow),
        )
    return items


def _cast_scaled(t: Tensor, factor: float, dtype: torch.dtype) -> Tensor:
    if factor != 1.0:
        return (t.detach().float() * factor).to(device="cpu", dtype=dtype).contiguous()
    return _cast(t, dtype)


def _write(lora: Lora, dtype: torch.dtype, name_of) -> dict[str, Tensor]:
    return {key: produce() for key, _, _, produce in lora_state_items(lora, dtype=dtype, name_of=name_of)}


def with_uniform_alpha(lora: Lora, alpha: float | None = None) -> Lora:
    """The same ΔW for every layer, written with one alpha for all low-rank layers.

    Each layer's ``up`` is multiplied by ``alpha_i / alpha`` (so alpha/rank · up @ down is unchanged).
    ``alpha`` defaults to the most common alpha, so those layers are untouched. Why: diffusers (0.42)
    converts kohya files with per-layer alphas by alpha *patterns* that miss attention layers, so a
    dynamic-rank file with alpha = rank loads mis-scaled there; with one alpha it loads exactly (see
    tests/test_diffusers_oracle.py). ComfyUI, A1111 and kohya read either form identically.
    """
    if alpha is None:
        alpha = common_alpha(lora)
        if alpha is None:
            return lora
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"a uniform alpha must be a positive number, got {alpha}")
    layers: dict[str, LayerDelta] = {}
    for name, layer in lora.layers.items():
        if isinstance(layer, LoraLayer) and float(layer.alpha) != alpha:
            factor = float(layer.alpha) / alpha
            up = (layer.up.float() * factor).to(layer.up.dtype)
            layer = LoraLayer(up=up, down=layer.down, alpha=alpha, mid=layer.mid)
        layers[name] = layer
    return lora.replace(layers=layers)


def lora_to_state_dict(lora: Lora, *, dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """The kohya state dict of ``lora``: ``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``
    (0-d, save dtype unless that would round it, then fp32), ``.lora_mid.weight`` for Tucker layers,
    ``<name>.diff`` for dense layers.

    Tensors are contiguous CPU copies that share no storage. Raises :class:`NonFiniteError` naming
    the layers when a value is NaN/Inf before the cast or overflows ``dtype`` after it.
    """
    return _write(lora, dtype, lambda name: name)


def lora_to_comfy_state_dict(
    lora: Lora, *, dtype: torch.dtype = torch.float16, table: KeyTable | None = None
) -> dict[str, Tensor]:
    """ComfyUI-native key style: ``diffusion_model.<sgm>.lora_up.weight``,
    ``text_encoders.<clip key>.lora_up.weight`` (what ComfyUI's own LoRA extractor writes, plus
    ``.alpha``). Needs the key table of ``lora.arch`` (or ``table``); unknown layers raise
    :class:`MismatchError`."""
    return {key: produce() for key, _, _, produce in _comfy_items(lora, dtype=dtype, alpha=None, table=table)}


# --------------------------------------------------------------------------------------------
# writer codecs: one per naming style, beside the reader table


def _table_of(lora: Lora, table: KeyTable | None, what: str):
    if table is not None:
        return table
    if lora.arch is None:
        raise MismatchError(f"the LoRA has no architecture; {what} names need one ({_known_archs()})")
    return _table_for(lora.arch, _size_fitting(lora))


def _size_fitting(lora: Lora) -> str:
    """The size of ``lora.arch``'s record whose table fits the LoRA's layer shapes best."""
    best, best_ok = "full", -1
    for size in _table_sizes(lora.arch):
        table = _table_for(lora.arch, size)
        ok = 0
        for name, layer in lora.layers.items():
            spec = table.by_kohya(name)
            ok += spec is not None and _numel(spec.shape) == _numel(layer.weight_shape)
        if ok > best_ok:
            best, best_ok = size, ok
    return best


def _specs_of(lora: Lora, table, style: str) -> dict[str, object]:
    specs = {n: table.by_kohya(n) for n in lora.layers}
    missing = [n for n, s in specs.items() if s is None]
    if missing:
        raise MismatchError(
            f"{len(missing)} layers are not in the {_arch_label(table)} key table, so they have no {style} "
            f"name: {_sample(missing, 4)}"
        )
    return specs


def _kohya_items(lora: Lora, *, dtype: torch.dtype, alpha: float | None, table=None) -> list[StreamItem]:
    return lora_state_items(lora, dtype=dtype, alpha=alpha)


def _comfy_items(lora: Lora, *, dtype: torch.dtype, alpha: float | None, table=None) -> list[StreamItem]:
    table = _table_of(lora, table, "ComfyUI key")
    specs = _specs_of(lora, table, "ComfyUI")

    def comfy_name(name: str) -> str:
        key = specs[name].comfy_key
        stem = key[: -len(".weight")] if key.endswith(".weight") else key
        return stem if stem.startswith("diffusion_model.") else "text_encoders." + stem

    return lora_state_items(lora, dtype=dtype, alpha=alpha, name_of=comfy_name)


def _diffusers_parts(spec, up: Tensor) -> list[tuple[str, Tensor]]:
    """``(diffusers module path, up rows of that module)``: a fused layer's up factor split by rows
    (pieces placed where diffusers keeps them, e.g. its swapped shift/scale halves)."""
    if not spec.splits:
        return [(spec.diffusers, up)]
    out = []
    for path in spec.diffusers_modules:
        pieces = [s for s in spec.splits if s.path == path]
        rows = max((s.part_rows or (0, s.rows[1] - s.rows[0]))[1] for s in pieces)
        part = up.new_zeros((rows,) + tuple(up.shape[1:]))
        for s in pieces:
            dst = s.part_rows or (0, s.rows[1] - s.rows[0])
            part[dst[0]:dst[1]] = up[s.rows[0]:s.rows[1]]
        out.append((path, part))
    return out


def _diffusers_items(lora: Lora, *, dtype: torch.dtype, alpha: float | None = None, table=None) -> list[StreamItem]:
    """diffusers / PEFT names: ``<module>.lora_A.weight`` (down) and ``.lora_B.weight`` (up × alpha/r),
    no ``.alpha`` (PEFT's scale is 1); T5 layers keep kohya names (``lora_te3_…``, which ComfyUI loads). A fused weight diffusers splits gets the same down factor
    on every part and its up factor split by rows, which is exact: ``[B_q; B_k; B_v] A = B A``."""
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"save dtype must be float16, bfloat16, float32 or float64, got {dtype}")
    table = _table_of(lora, table, "diffusers")
    specs = _specs_of(lora, table, "diffusers")
    dense = [n for n, layer in lora.layers.items() if not isinstance(layer, LoraLayer) or layer.mid is not None]
    if dense:
        raise MismatchError(
            f"{len(dense)} layers are full ΔW or Tucker (LoCon mid) layers, which diffusers/PEFT names cannot "
            f"hold: {_sample(dense, 4)}; save them with kohya names"
        )
    nonfinite = [n for n, layer in lora.layers.items() if not _finite(layer)]
    if nonfinite:
        raise NonFiniteError(f"{len(nonfinite)} layers hold NaN/Inf values: {_sample(nonfinite, 6)}", tuple(nonfinite))
    # T5 has no diffusers LoRA name any loader reads (diffusers' SD3/Flux loaders skip it; ComfyUI
    # maps only kohya / ComfyUI names onto T5), so its layers keep their kohya names in this style.
    t5 = {te.component for te in _archs().arch_config(table.arch).text_encoders if te.layout.value == "t5"}
    kept = Lora({n: layer for n, layer in lora.layers.items() if specs[n].component in t5}, arch=lora.arch)
    items: list[StreamItem] = lora_state_items(kept, dtype=dtype) if kept.layers else []
    overflow: list[str] = []
    for name, layer in lora.layers.items():
        spec = specs[name]
        if spec.component in t5:
            continue
        scale = float(layer.alpha) / layer.rank
        up = layer.up.detach().float() * scale
        for path, part in _diffusers_parts(spec, up):
            for suffix, t in (("lora_A.weight", layer.down), ("lora_B.weight", part)):
                produce = partial(_cast, t, dtype)
                if not is_finite(produce()) and name not in overflow:
                    overflow.append(name)
                items.append((f"{path}.{suffix}", tuple(t.shape), dtype, produce))
    if overflow:
        raise NonFiniteError(
            f"{len(overflow)} layers overflow {str(dtype).replace('torch.', '')}: {_sample(overflow, 6)}. Save as "
            "bfloat16 or float32, or lower the strength.",
            tuple(overflow),
        )
    return items


def _naming_style(style):
    return _archs().NamingStyle(getattr(style, "value", style))


def _writers() -> dict:
    ns = _archs().NamingStyle
    return {ns.KOHYA: _kohya_items, ns.COMFY: _comfy_items, ns.DIFFUSERS: _diffusers_items}


def naming_styles(arch: Arch | None) -> tuple[str, ...]:
    """The naming styles a LoRA of ``arch`` can be saved in (its record's list; kohya and
    ComfyUI-native without an architecture)."""
    if arch is None:
        return ("kohya",)
    return tuple(s.value for s in _archs().record(arch).naming_styles)


def lora_items(
    lora: Lora,
    naming="kohya",
    *,
    dtype: torch.dtype = torch.float16,
    alpha: float | None = None,
    table: KeyTable | None = None,
) -> list[StreamItem]:
    """The state dict of ``lora`` in one naming style (``kohya`` | ``comfy`` | ``diffusers``, or ``auto``:
    the first style of the architecture's record: diffusers for SD3, kohya for the others), as
    stream items; each style is a codec in ``_writers()`` (see :func:`lora_state_items` for kohya).
    ``alpha`` (a uniform alpha) applies to the styles that write ``.alpha``."""
    if str(getattr(naming, "value", naming)) == "auto":  # the record's default style (kohya without an arch)
        naming = naming_styles(lora.arch)[0]
    style = _naming_style(naming)
    if style.value not in ("kohya",) and lora.arch is not None and table is None:
        allowed = naming_styles(lora.arch)
        if style.value not in allowed:
            raise MismatchError(
                f"{_archs().arch_label(lora.arch)} LoRAs are saved with {' or '.join(allowed)} names, not {style.value}"
            )
    return _writers()[style](lora, dtype=dtype, alpha=alpha, table=table)


def lora_to_diffusers_state_dict(
    lora: Lora, *, dtype: torch.dtype = torch.float16, table: KeyTable | None = None
) -> dict[str, Tensor]:
    """diffusers/PEFT key style (``transformer.…lora_A/lora_B.weight``; see :func:`_diffusers_items`)."""
    return {key: produce() for key, _, _, produce in _diffusers_items(lora, dtype=dtype, table=table)}
