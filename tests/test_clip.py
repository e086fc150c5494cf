"""CLIP layer: tiny archs, the prompt-embedding text path vs encode_text, dense features, checkpoint loading, errors."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.model import build_model_from_openai_state_dict
from safetensors.torch import save_file
from torch import nn

from cimlic.models.clip import ClipError, ClipModel, list_archs, load_clip, register_tiny_configs

TINY = ["cimlic-tiny-vit", "cimlic-tiny-rn"]
PROMPTS = ["a photo of a dog.", "a photo of a traffic light.", "a photo of a potted plant."]


@pytest.fixture(scope="module")
def tiny() -> dict[str, ClipModel]:
    torch.manual_seed(0)
    return {arch: load_clip(arch, random_init=True) for arch in TINY}


def _images(clip: ClipModel, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, clip.image_size, clip.image_size, generator=g)


# ----------------------------------------------------------------------------------- architectures
def test_tiny_configs_registered_once():
    names = register_tiny_configs()
    assert set(TINY) <= set(names) <= set(open_clip.list_models())
    n = len(open_clip.list_models())
    register_tiny_configs()
    assert len(open_clip.list_models()) == n


@pytest.mark.parametrize("arch", TINY)
def test_tiny_clip_is_frozen_and_stays_in_eval(tiny, arch):
    clip = tiny[arch]
    parent = nn.Sequential(clip, nn.Linear(2, 2))
    parent.train()
    assert parent[1].training
    assert not any(m.training for m in clip.modules())
    assert not any(p.requires_grad for p in clip.parameters())
    assert clip.embed_dim == 128 and clip.context_length == 32
    assert clip.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    assert len(clip.image_mean) == 3 and len(clip.image_std) == 3


# --------------------------------------------------------------------------------------- text path
@pytest.mark.parametrize("arch", TINY)
def test_prompt_path_reproduces_encode_text(tiny, arch):
    clip = tiny[arch]
    tokens = clip.tokenize(PROMPTS)
    assert tokens.shape == (3, clip.context_length)
    expected = clip.model.encode_text(tokens)  # open_clip's own path
    got = clip.encode_text_from_embeddings(clip.token_embedding(tokens), clip.eot_index(tokens))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(clip.encode_text(tokens), expected, rtol=0, atol=0)
    # causal tower: cutting the sequence after the last [EOS] changes nothing
    length = int(clip.eot_index(tokens).max()) + 1
    short = clip.encode_text_from_embeddings(clip.token_embedding(tokens[:, :length]), clip.eot_index(tokens))
    torch.testing.assert_close(short, expected, rtol=0, atol=1e-5)


def test_learnable_context_construction_reproduces_encode_text(tiny):
    clip = tiny["cimlic-tiny-vit"]
    classes = ["dog", "traffic light"]
    tokens = clip.tokenize([f"a photo of a {c}." for c in classes])  # (C, L)
    emb = clip.token_embedding(tokens)  # (C, L, W)
    ctx = nn.Parameter(clip.token_embedding(clip.tokenize(["a photo of a"]))[0, 1:5].clone())  # (4, W)
    prompts = torch.cat([emb[:, :1], ctx.unsqueeze(0).expand(2, -1, -1), emb[:, 5:]], dim=1)  # [SOS] ctx class [EOS]
    feats = clip.encode_text_from_embeddings(prompts, clip.eot_index(tokens))
    torch.testing.assert_close(feats, clip.encode_text(tokens), rtol=0, atol=1e-5)
    feats.sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.parameters())


# ------------------------------------------------------------------------------------- dense path
def test_dense_vit_shapes_and_global(tiny):
    clip = tiny["cimlic-tiny-vit"]
    x = _images(clip)
    with torch.no_grad():
        dense = clip.encode_image_dense(x)
        ref = clip.encode_image(x)
    assert dense["global"].shape == (2, 128) and dense["local"].shape == (2, 64, 128)  # 32 px / patch 4 = 8x8
    torch.testing.assert_close(dense["global"], ref, rtol=0, atol=1e-6)
    # local = ln_post(patch tokens) @ proj, recomputed through open_clip's own intermediates
    visual = clip.model.visual
    with torch.no_grad():
        last = visual.forward_intermediates(x, indices=1, output_fmt="NLC")["image_intermediates"][-1]  # (B, 64, W)
        expected = visual.ln_post(last) @ visual.proj
    torch.testing.assert_close(dense["local"], expected, rtol=0, atol=1e-5)


def test_dense_resnet_shapes_and_local_projection(tiny):
    clip = tiny["cimlic-tiny-rn"]
    x = _images(clip)
    visual = clip.model.visual
    with torch.no_grad():
        dense = clip.encode_image_dense(x)
        ref = clip.encode_image(x)
        fmap = visual.forward_intermediates(x, indices=1, intermediates_only=True)["image_intermediates"][-1]
    assert dense["global"].shape == (2, 128) and dense["local"].shape == (2, 4, 128)  # 64 px / 32 = 2x2
    torch.testing.assert_close(dense["global"], ref, rtol=0, atol=1e-6)
    pool = visual.attnpool
    tokens = fmap.flatten(2).transpose(1, 2) + pool.positional_embedding[1:]  # (B, 4, C)
    v = tokens @ pool.v_proj.weight.T + pool.v_proj.bias
    expected = v @ pool.c_proj.weight.T + pool.c_proj.bias
    torch.testing.assert_close(dense["local"], expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------- real-size loading
OPENAI_KEYS = {  # names in OpenAI's released RN50.pt / ViT-B-16.pt (shared text tower + per-tower keys)
    "common": ["positional_embedding", "text_projection", "logit_scale", "token_embedding.weight", "ln_final.weight"]
    + ["transformer.resblocks.11.attn.in_proj_weight", "transformer.resblocks.0.mlp.c_fc.weight"],
    "RN50": ["visual.conv1.weight", "visual.bn1.running_mean", "visual.layer1.0.downsample.0.weight"]
    + ["visual.layer4.2.conv3.weight", "visual.attnpool.positional_embedding", "visual.attnpool.c_proj.weight"],
    "ViT-B-16": ["visual.class_embedding", "visual.positional_embedding", "visual.proj", "visual.conv1.weight"]
    + ["visual.ln_pre.weight", "visual.transformer.resblocks.11.attn.out_proj.weight", "visual.ln_post.bias"],
}
OPENAI_SHAPES = {
    "RN50": {"visual.attnpool.positional_embedding": (50, 2048), "text_projection": (512, 1024)},
    "ViT-B-16": {"visual.positional_embedding": (197, 768), "visual.proj": (768, 512), "text_projection": (512, 512)},
}


@pytest.fixture(scope="module", params=["RN50", "ViT-B-16"])
def openai_checkpoint(request, tmp_path_factory):
    """A random `<arch>-quickgelu` open_clip model saved like OpenAI's weights (fp16 state dict, extra attributes)."""
    arch = request.param
    torch.manual_seed(0)
    model = open_clip.create_model(f"{arch}-quickgelu")
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path_factory.mktemp("openai") / f"{arch}.pt"
    torch.save(sd, path)
    return arch, path, sd


def test_openai_state_dict_loads_as_quickgelu(openai_checkpoint):
    arch, path, sd = openai_checkpoint
    for key in OPENAI_KEYS["common"] + OPENAI_KEYS[arch]:
        assert key in sd, key
    for key, shape in OPENAI_SHAPES[arch].items():
        assert tuple(sd[key].shape) == shape, key
    # the layout is the one open_clip's OpenAI loader infers architectures from (strict load inside)
    build_model_from_openai_state_dict(dict(sd), cast_dtype=None)
    clip = load_clip(arch, checkpoint=path)
    assert clip.arch == f"{arch}-quickgelu" and clip.source == str(path)
    torch.testing.assert_close(clip.model.text_projection, sd["text_projection"].float())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        dense = clip.encode_image_dense(x)  # its global part is encode_image (checked on the tiny towers)
    assert dense["global"].shape == (2, clip.embed_dim) and torch.isfinite(dense["global"]).all()
    assert dense["local"].shape == (2, 49 if arch == "RN50" else 196, clip.embed_dim)


# ---------------------------------------------------------------------------------- other formats
def _tiny_state_dict(seed: int = 1) -> tuple[dict[str, torch.Tensor], ClipModel]:
    torch.manual_seed(seed)
    clip = load_clip("cimlic-tiny-vit", random_init=True)
    return {k: v.clone() for k, v in clip.model.state_dict().items()}, clip


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_open_clip_checkpoint_by_name_and_path(tmp_path, suffix):
    sd, ref = _tiny_state_dict()
    path = tmp_path / f"tiny{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": sd}, path)
    clip = load_clip("cimlic-tiny-vit", checkpoint=path)
    tokens = clip.tokenize(PROMPTS)
    torch.testing.assert_close(clip.encode_text(tokens), ref.encode_text(tokens), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # we build a legacy TorchScript archive on purpose
def test_torchscript_needs_explicit_flag(tmp_path):
    sd, ref = _tiny_state_dict()
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.trace_module(ref.model, {"encode_image": (torch.zeros(1, 3, 32, 32),)}), str(path))
    with pytest.raises(ClipError, match="TorchScript.*allow_torchscript"):
        load_clip("cimlic-tiny-vit", checkpoint=path)
    clip = load_clip("cimlic-tiny-vit", checkpoint=path, allow_torchscript=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(x), ref.encode_image(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ errors
def test_error_missing_file(tmp_path):
    with pytest.raises(ClipError, match=r"nope\.pt: CLIP checkpoint not found"):
        load_clip("RN50", checkpoint=tmp_path / "nope.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".bin"])
def test_error_garbage_file(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"\x00not a checkpoint\xff" * 10)
    with pytest.raises(ClipError, match=f"garbage\\{suffix}: not a readable CLIP checkpoint") as err:
        load_clip("cimlic-tiny-vit", checkpoint=path)
    assert "\n" not in str(err.value)


def test_error_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ClipError, match="not a state dict"):
        load_clip("cimlic-tiny-vit", checkpoint=path)


def test_error_architecture_mismatch(tmp_path):
    sd, _ = _tiny_state_dict()
    path = tmp_path / "tiny.safetensors"
    save_file(sd, str(path))
    pattern = r"tiny\.safetensors: weights do not match.*'cimlic-tiny-rn'.*missing.*visual\."
    with pytest.raises(ClipError, match=pattern) as err:
        load_clip("cimlic-tiny-rn", checkpoint=path)
    assert "\n" not in str(err.value)
    del sd["visual.proj"]
    sd["visual.extra"] = torch.zeros(1)
    save_file(sd, str(path))
    with pytest.raises(ClipError, match=r"1 missing key\(s\), first \['visual.proj'\].*unexpected.*visual.extra"):
        load_clip("cimlic-tiny-vit", checkpoint=path)


def test_error_shape_mismatch(tmp_path):
    sd, _ = _tiny_state_dict()
    sd["visual.proj"] = torch.zeros(3, 3)
    path = tmp_path / "tiny.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ClipError, match=r"shape mismatch.*visual.proj: \(3, 3\) vs \(128, 128\)"):
        load_clip("cimlic-tiny-vit", checkpoint=path)


def test_error_unknown_arch_lists_valid():
    with pytest.raises(ClipError, match="unknown CLIP architecture 'ViT-Q-99'; valid: .*cimlic-tiny-vit.*RN50"):
        load_clip("ViT-Q-99", random_init=True)
    assert "ViT-B-16" in list_archs()


def test_error_no_weights_without_random_init():
    with pytest.raises(ClipError, match="no weights for CLIP 'RN50'.*clip_checkpoint.*random_init"):
        load_clip("RN50")
    with pytest.raises(ClipError, match="not both"):
        load_clip("RN50", checkpoint="x.pt", pretrained="openai")
    assert issubclass(ClipError, ValueError)


def test_dense_features_reject_other_towers():
    clip = load_clip("cimlic-tiny-vit", random_init=True)
    clip.model.visual = nn.Identity()
    with pytest.raises(ClipError, match="dense features"):
        clip.encode_image_dense(torch.zeros(1, 3, 32, 32))
