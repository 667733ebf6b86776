"""Statistics of any LoRA value: per-layer rank, energy profile, size, and a spectrum picture."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from .pipeline import LayerLoop
from .progress import ProgressFn
from .rank import RankRule, Spectrum, select_rank
from .report import LayerStat, Report
from .svd import SvdMethod, decompose, decompose_factored
from .types import DiffLayer, LayerDelta, LayerStatus, Lora, LoraLayer, SkipReason, as_matrix

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

ENERGY_PROBE = RankRule.parse("sv_fro:0.99")


def layer_spectrum(layer: LayerDelta) -> Spectrum:
    """All singular values of a layer's effective ΔW (exact; never forms ΔW for low-rank layers)."""
    if isinstance(layer, LoraLayer):
        return decompose_factored(layer.up_matrix() * layer.scale, layer.down_matrix()).spectrum
    assert isinstance(layer, DiffLayer)
    d = layer.delta()
    mat = as_matrix(d) if d.dim() in (2, 4, 5) else d.reshape(1, -1)  # exact parts: σ1 = ‖Δ‖
    return decompose(mat, min(mat.shape), method=SvdMethod.EXACT, full_spectrum=True).spectrum


def lora_info(
    lora: Lora,
    *,
    spectrum: bool = False,
    plot_layers: int = 6,
    progress: ProgressFn | None = None,
) -> tuple[Report, "Image | None"]:
    """A report with one row per layer and, if asked, a spectrum picture of representative layers.

    ``retained`` is 1 (nothing is truncated); the note gives σ₁ and the rank that keeps 99% of the
    Frobenius norm, a quick hint of how far the file could be resized.
    """
    stats: list[LayerStat] = []
    spectra: dict[str, Spectrum] = {}
    with LayerLoop(len(lora.layers), progress) as loop:
        for name, layer in lora.layers.items():
            stats.append(_row(name, layer, spectra))
            loop.tick(name)
    params = {k: v for k, v in lora.metadata.items() if k in _SHOWN_METADATA}
    report = Report("info", tuple(stats), params=params)
    image = _picture(spectra, lora, plot_layers) if spectrum and spectra else None
    return report, image


def _row(name: str, layer: LayerDelta, spectra: dict[str, Spectrum]) -> LayerStat:
    spec = layer_spectrum(layer)
    spectra[name] = spec
    k99 = select_rank(spec, ENERGY_PROBE).rank if spec.fro2 > 0 else 0
    s1 = float(spec.values[0]) if spec.known else 0.0
    return LayerStat(
        name=name,
        kind=layer.kind,
        shape=layer.weight_shape,
        rank=layer.rank,
        input_rank=layer.rank,
        retained=1.0,
        norm=spec.fro2**0.5,
        nbytes=layer.nbytes(),
        status=LayerStatus.OK if spec.fro2 > 0 else LayerStatus.SKIPPED,
        skip=None if spec.fro2 > 0 else SkipReason.EMPTY,
        note=f"σ1={s1:.3g} rank@99%={k99}" + ("" if isinstance(layer, LoraLayer) else " dense"),
    )


_SHOWN_METADATA = ("ss_network_dim", "ss_network_alpha", "ss_base_model_version", "modelspec.title")


def _picture(spectra: Mapping[str, Spectrum], lora: Lora, n: int) -> "Image":
    from .spectrum import render_spectrum

    by_norm = sorted(spectra, key=lambda name: spectra[name].fro2, reverse=True)
    chosen = by_norm[:n]
    return render_spectrum({k: spectra[k] for k in chosen}, {k: lora.layers[k].rank for k in chosen})
