"""cloneofsimo ``lora`` files: the layer numbering against diffusers' and transformers' own module
order, reading, and the round trip to kohya files."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rankwise.core import cloneofsimo as cs
from rankwise.core.archs import arch_config, diffusers_unet_config, key_table
from rankwise.core.errors import FormatError, MismatchError
from rankwise.core.formats import LoraFormat, lora_from_state_dict
from rankwise.core.io import load_lora, save_lora
from rankwise.core.types import Arch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:
    import diffusers
    import transformers

    diffusers.UNet2DConditionModel, transformers.CLIPTextModel  # resolve the lazy modules now
    _SKIP = ""
except Exception as e:  # pragma: no cover - test extra not installed
    _SKIP = f"needs diffusers + transformers: {type(e).__name__}: {e}"

needs_diffusers = pytest.mark.skipif(bool(_SKIP), reason=_SKIP or "ok")


# ----------------------------------------------------------------------------- the oracle walk


def _injector_walk(model: torch.nn.Module, targets, search=(torch.nn.Linear,)) -> list[str]:
    """The module paths cloneofsimo's ``_find_modules_v2`` yields, in its order: every module of
    ``model.modules()`` whose class name is a target, then its ``named_modules()`` of ``search``."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for ancestor in model.modules():
        if ancestor.__class__.__name__ not in targets:
            continue
        for fullname, module in ancestor.named_modules():
            if isinstance(module, search):
                out.append(f"{names[id(ancestor)]}.{fullname}")
    return out


def _unet(arch: Arch, size: str):
    """The module structure only: built on the meta device (no memory, full size in a second)."""
    with torch.device("meta"):
        return diffusers.UNet2DConditionModel(**diffusers_unet_config(arch, size))


def _text_encoder(arch: Arch, size: str):
    te = arch_config(arch, size).text_encoders[0]
    cfg = transformers.CLIPTextConfig(
        hidden_size=te.hidden, intermediate_size=te.mlp, num_hidden_layers=te.layers,
        num_attention_heads=max(1, te.hidden // 8), projection_dim=te.hidden,
        vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    with torch.device("meta"):
        return transformers.CLIPTextModel(cfg)


def _legacy_block_order(unet: torch.nn.Module) -> None:
    """Re-register each BasicTransformerBlock's children as old diffusers did: ``ff`` between
    ``attn1`` and ``attn2`` (the order cloneofsimo's own example files were trained with)."""
    for m in unet.modules():
        if m.__class__.__name__ == "BasicTransformerBlock":
            items = list(m._modules.items())
            ff = [kv for kv in items if kv[0] == "ff"]
            rest = [kv for kv in items if kv[0] != "ff"]
            at = [k for k, _ in rest].index("attn1") + 1
            m._modules = OrderedDict(rest[:at] + ff + rest[at:])


def _ours(arch, size, model, targets, order):
    table = key_table(arch, size)
    prefix = "unet." if model == cs.UNET else "text_encoder."
    return [s.diffusers[len(prefix):] for s in cs.injection_order(table, model, targets, order)]


@needs_diffusers
@pytest.mark.parametrize("size", ["tiny", "full"])
@pytest.mark.parametrize("arch", [Arch.SD1, Arch.SD2], ids=lambda a: a.value)
def test_unet_order_matches_diffusers_module_walk(arch, size):
    unet = _unet(arch, size)
    theirs = _injector_walk(unet, cs.UNET_DEFAULT_TARGETS)
    assert theirs == _ours(arch, size, cs.UNET, cs.UNET_DEFAULT_TARGETS, cs.BlockOrder.CURRENT)
    _legacy_block_order(unet)
    theirs_legacy = _injector_walk(unet, cs.UNET_DEFAULT_TARGETS)
    assert theirs_legacy != theirs
    assert theirs_legacy == _ours(arch, size, cs.UNET, cs.UNET_DEFAULT_TARGETS, cs.BlockOrder.LEGACY)


@needs_diffusers
def test_extended_unet_targets_match_diffusers_module_walk():
    """``inject_trainable_lora_extended``: ResnetBlock2D too, Linear and Conv2d children."""
    unet = _unet(Arch.SD1, "tiny")
    theirs = _injector_walk(unet, cs.UNET_EXTENDED_TARGETS, (torch.nn.Linear, torch.nn.Conv2d))
    assert theirs == _ours(Arch.SD1, "tiny", cs.UNET, cs.UNET_EXTENDED_TARGETS, cs.BlockOrder.CURRENT)


@needs_diffusers
@pytest.mark.parametrize("arch", [Arch.SD1, Arch.SD2], ids=lambda a: a.value)
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_text_encoder_order_matches_transformers_module_walk(arch, size):
    te = _text_encoder(arch, size)
    # transformers ≥ 5 dropped CLIPTextModel's "text_model." level from module paths
    theirs = [n if n.startswith("text_model.") else "text_model." + n
              for n in _injector_walk(te, cs.TE_DEFAULT_TARGETS)]
    assert theirs == _ours(arch, size, cs.TEXT_ENCODER, None, cs.BlockOrder.CURRENT)
    assert theirs[:4] == [f"text_model.encoder.layers.0.self_attn.{p}" for p in ("k_proj", "v_proj", "q_proj", "out_proj")]


def test_full_sd1_counts_match_cloneofsimo_example_files():
    """lora_disney / analog_svd: 144 UNet and 48 text-encoder layers for SD 1.5."""
    table = key_table(Arch.SD1)
    assert len(cs.injection_order(table, cs.UNET)) == 144
    assert len(cs.injection_order(table, cs.TEXT_ENCODER)) == 48


# ----------------------------------------------------------------------------- files built here


def _cloneofsimo_sd(arch: Arch, size: str, gen, *, order=cs.BlockOrder.LEGACY, rank=2, te=True,
                    embeds=("<s1>", "<s2>")):
    table = key_table(arch, size)
    sd: dict[str, torch.Tensor] = {}
    md: dict[str, str] = {}
    truth: dict[str, torch.Tensor] = {}  # kohya name → ΔW
    models = [cs.UNET] + ([cs.TEXT_ENCODER] if te else [])
    for model in models:
        targets = cs.UNET_DEFAULT_TARGETS if model == cs.UNET else cs.TE_DEFAULT_TARGETS
        md[model] = json.dumps(sorted(targets))
        for i, spec in enumerate(cs.injection_order(table, model, targets, order)):
            up = torch.randn(spec.shape[0], rank, generator=gen) * 0.1
            down = torch.randn(rank, spec.shape[1], generator=gen) * 0.1
            sd[f"{model}:{i}:up"], sd[f"{model}:{i}:down"] = up, down
            md[f"{model}:{i}:rank"] = str(rank)
            truth[spec.kohya] = up @ down
    dim = arch_config(arch, size).text_encoders[0].hidden
    for token in embeds:
        sd[token] = torch.randn(dim, generator=gen)
        md[token] = cs.EMBED_FLAG
    return sd, md, truth


@pytest.mark.parametrize("order", list(cs.BlockOrder), ids=lambda o: o.value)
def test_read_names_every_layer_and_keeps_embeddings_aside(order, gen):
    sd, md, truth = _cloneofsimo_sd(Arch.SD1, "tiny", gen, order=order)
    lora, report = lora_from_state_dict(sd, md)
    assert report.formats == (LoraFormat.CLONEOFSIMO,)
    assert lora.arch is Arch.SD1
    assert set(lora.layers) == set(truth)
    for name, delta in truth.items():
        assert torch.allclose(lora.layers[name].delta(), delta, atol=1e-6), name
        assert lora.layers[name].alpha == lora.layers[name].rank  # scale 1
    assert dict(report.embeddings) == {"<s1>": (24,), "<s2>": (24,)}
    assert not report.unknown_keys
    assert any(order.value in n for n in report.notes)
    assert set(cs.embeddings(sd, md)) == {"<s1>", "<s2>"}
    assert not any(":" in k for k in lora.metadata if k != "rankwise.source_format")


def test_file_round_trip_to_kohya_keeps_every_delta(tmp_path, gen):
    """cloneofsimo file → read → save kohya → reload: ΔW equal layer by layer; resize/merge work."""
    from rankwise.core.merge import MergeInput, MergeMode, merge
    from rankwise.core.rank import RankPolicy, RankRule
    from rankwise.core.resize import resize

    sd, md, truth = _cloneofsimo_sd(Arch.SD1, "tiny", gen)
    src = tmp_path / "lora_cloneofsimo.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(src), metadata=md)
    lora, report = load_lora(src)
    out = tmp_path / "kohya.safetensors"
    save_lora(lora, out, dtype=torch.float32)
    again, report2 = load_lora(out)
    assert report2.formats == (LoraFormat.KOHYA,)
    assert set(again.layers) == set(truth)
    for name, delta in truth.items():
        assert torch.allclose(again.layers[name].delta(), delta, atol=1e-6), name
    small, _ = resize(lora, RankPolicy(RankRule.parse("1")))
    assert all(layer.rank == 1 for layer in small.layers.values())
    merged, _ = merge([MergeInput(lora=lora, ratio=1.0), MergeInput(lora=again, ratio=-1.0)], mode=MergeMode.CONCAT)
    assert all(float(layer.delta().abs().max()) < 1e-5 for layer in merged.layers.values())


def test_unet_only_file_and_sd2_are_read(gen):
    sd, md, truth = _cloneofsimo_sd(Arch.SD2, "tiny", gen, te=False, embeds=())
    lora, report = lora_from_state_dict(sd, md)
    assert lora.arch is Arch.SD2 and set(lora.layers) == set(truth)


def test_missing_target_metadata_uses_defaults_with_a_note(gen):
    sd, md, truth = _cloneofsimo_sd(Arch.SD1, "tiny", gen)
    del md["unet"]
    lora, report = lora_from_state_dict(sd, md)
    assert set(lora.layers) == set(truth)
    assert any("defaults assumed" in n for n in report.notes)


def test_gap_in_numbering_is_an_error(gen):
    sd, md, _ = _cloneofsimo_sd(Arch.SD1, "tiny", gen)
    del sd["unet:3:down"]
    with pytest.raises(FormatError, match=r"lack an up or a down tensor \(first unet:3\)"):
        lora_from_state_dict(sd, md)


def test_wrong_count_is_an_error_naming_the_layer_counts(gen):
    sd, md, _ = _cloneofsimo_sd(Arch.SD1, "tiny", gen, te=False, embeds=())
    last = max(int(k.split(":")[1]) for k in sd)
    del sd[f"unet:{last}:up"], sd[f"unet:{last}:down"]
    with pytest.raises(MismatchError, match=r"fits no SD1/SD2 layer order: .*layers for these targets, the file"):
        lora_from_state_dict(sd, md)


def test_shape_misfit_names_the_module_and_the_layer(gen):
    sd, md, _ = _cloneofsimo_sd(Arch.SD1, "tiny", gen, te=False, embeds=())
    sd["unet:0:down"] = torch.zeros(2, 7)
    with pytest.raises(MismatchError) as err:
        lora_from_state_dict(sd, md)
    msg = str(err.value)
    assert "\n" not in msg and "unet:0 (up (16, 2), down (2, 7))" in msg and "attn1.to_q (16, 16)" in msg


def test_unknown_target_class_and_model_are_refused(gen):
    sd, md, _ = _cloneofsimo_sd(Arch.SD1, "tiny", gen)
    md["unet"] = json.dumps(["Transformer2DModel"])
    with pytest.raises(FormatError, match=r"targets \['Transformer2DModel'\]"):
        lora_from_state_dict(sd, md)
    sd2 = {"vae:0:up": torch.zeros(4, 1), "vae:0:down": torch.zeros(1, 4)}
    with pytest.raises(FormatError, match="unknown model 'vae'"):
        lora_from_state_dict(sd2, {})


def test_rank_metadata_that_disagrees_is_an_error(gen):
    sd, md, _ = _cloneofsimo_sd(Arch.SD1, "tiny", gen)
    md["unet:5:rank"] = "8"
    with pytest.raises(FormatError, match=r"unet:5: the metadata says rank 8, the tensors have rank 2"):
        lora_from_state_dict(sd, md)


def test_cli_resize_and_info_read_cloneofsimo_files(tmp_path, gen, capsys):
    from rankwise.core.cli import main

    sd, md, truth = _cloneofsimo_sd(Arch.SD1, "tiny", gen)
    src = tmp_path / "c.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(src), metadata=md)
    out = tmp_path / "k.safetensors"
    assert main(["resize", str(src), "--rank", "2", "-o", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "(cloneofsimo)" in text and "textual-inversion embeddings kept aside" in text
    again, _ = load_lora(out)
    for name, delta in truth.items():
        assert torch.allclose(again.layers[name].delta(), delta, atol=2e-3), name
    assert main(["info", str(src)]) == 0


# ----------------------------------------------------------------------------- the real example files

EXAMPLES = os.environ.get("RANKWISE_CLONEOFSIMO_EXAMPLES", "")
_EXAMPLE_NAMES = ("lora_disney.safetensors", "analog_svd_rank4.safetensors")


@pytest.mark.skipif(not EXAMPLES or not all((Path(EXAMPLES) / n).is_file() for n in _EXAMPLE_NAMES),
                    reason="set RANKWISE_CLONEOFSIMO_EXAMPLES to a folder with cloneofsimo/lora's "
                           "example_loras/lora_disney.safetensors and analog_svd_rank4.safetensors")
@pytest.mark.parametrize("name", _EXAMPLE_NAMES)
def test_real_example_files(name, tmp_path):
    path = Path(EXAMPLES) / name
    lora, report = load_lora(path)
    assert report.formats == (LoraFormat.CLONEOFSIMO,) and lora.arch is Arch.SD1
    assert len(lora) == 192 and not report.unknown_keys
    assert any(cs.BlockOrder.LEGACY.value in n for n in report.notes)
    if name == "lora_disney.safetensors":
        assert dict(report.embeddings) == {"<s1>": (768,), "<s2>": (768,)}
    out = tmp_path / "kohya.safetensors"
    save_lora(lora, out, dtype=torch.float32)
    again, _ = load_lora(out)
    for key, layer in lora.layers.items():
        assert torch.allclose(again.layers[key].delta(), layer.delta().float(), atol=1e-6), key


def test_random_positional_key_sets_give_a_rankwise_error_or_a_result():
    """Fuzz: random cloneofsimo-like key sets, shapes and metadata never raise anything else."""
    from rankwise.core.errors import RankwiseError

    rng = torch.Generator().manual_seed(7)

    def randint(n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=rng))

    for _ in range(100):
        sd, md = {}, {}
        for _ in range(randint(6) + 1):
            model = ["unet", "text_encoder", "vae", "unet"][randint(4)]
            i = randint(4)
            shape = [randint(5) for _ in range(randint(5))]
            sd[f"{model}:{i}:{['up', 'down'][randint(2)]}"] = torch.zeros(shape)
            if randint(3) == 0:
                md[f"{model}:{i}:rank"] = ["1", "x", "4", ""][randint(4)]
        if randint(2):
            md["unet"] = ['["Attention"]', "not json", "[]", '["GEGLU", "ResnetBlock2D"]'][randint(4)]
        if randint(3) == 0:
            sd["<s1>"] = torch.zeros(randint(3) + 1)
        try:
            lora, report = lora_from_state_dict(sd, md)
        except RankwiseError as e:
            assert "\n" not in str(e)
        else:
            assert report.formats == (LoraFormat.CLONEOFSIMO,)


def test_extended_file_with_resnet_convs_is_read(gen):
    """``inject_trainable_lora_extended``: ResnetBlock2D convs are 4-D factors (up 1×1, down k×k)."""
    table = key_table(Arch.SD1, "tiny")
    sd, truth = {}, {}
    md = {"unet": json.dumps(sorted(cs.UNET_EXTENDED_TARGETS))}
    for i, spec in enumerate(cs.injection_order(table, cs.UNET, cs.UNET_EXTENDED_TARGETS, cs.BlockOrder.CURRENT)):
        out_ch, rest = spec.shape[0], spec.shape[1:]
        if len(rest) == 3:
            up, down = torch.randn(out_ch, 2, 1, 1, generator=gen), torch.randn(2, *rest, generator=gen)
        else:
            up, down = torch.randn(out_ch, 2, generator=gen), torch.randn(2, *rest, generator=gen)
        sd[f"unet:{i}:up"], sd[f"unet:{i}:down"] = up, down
        truth[spec.kohya] = (up.flatten(1) @ down.flatten(1)).reshape(spec.shape)
    lora, report = lora_from_state_dict(sd, md)
    assert set(lora.layers) == set(truth)
    assert any(len(s) == 4 for s in (tuple(t.shape) for t in truth.values()))
    for name, delta in truth.items():
        assert torch.allclose(lora.layers[name].delta(), delta, atol=1e-5), name
