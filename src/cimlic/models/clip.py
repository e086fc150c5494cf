"""Frozen CLIP backbones through open_clip: loading, the prompt-embedding text path and dense image features.

This is the only module that touches open_clip internals; everything else uses :class:`ClipModel`.

Checkpoints (``load_clip``):
- ``.pt`` holding a plain state dict or a TorchScript archive (OpenAI's ``RN50.pt``, ``ViT-B-16.pt``) is an
  OpenAI checkpoint and loads as ``<arch>-quickgelu`` (OpenAI models were trained with QuickGELU). State dicts are
  read with ``torch.load(weights_only=True)``; a TorchScript archive runs code from the file, so it is opened only
  with ``allow_torchscript=True`` (or converted once with :func:`convert_torchscript_checkpoint`).
- ``.bin`` / ``.pth`` / ``.safetensors`` (or a ``.pt`` wrapping ``{"state_dict": ...}``) is an open_clip checkpoint
  and loads as ``<arch>`` unchanged.
- ``pretrained=<tag>`` uses open_clip's own download (online); ``random_init=True`` builds random weights.
"""

from __future__ import annotations

import functools
import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP, convert_to_custom_text_state_dict
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from cimlic.errors import CimlicError
from cimlic.io import load_tensor_file, save_torch, state_dict_mismatch, to_state_dict

logger = logging.getLogger(__name__)

TINY_CONFIG_DIR = Path(__file__).resolve().parents[1] / "assets" / "clip_configs"
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # TorchScript attributes, not weights
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipError(CimlicError, ValueError):
    """A CLIP architecture or checkpoint cannot be used (the message names the file or the valid choices)."""


# ------------------------------------------------------------------------------------ architectures
def register_tiny_configs() -> list[str]:
    """Register cimlic's tiny architectures (JSON configs in ``cimlic/assets/clip_configs``) with open_clip.

    Returns:
        The registered architecture names. Calling it again is a no-op.
    """
    names = sorted(p.stem for p in TINY_CONFIG_DIR.glob("*.json"))
    if not names:
        raise ClipError(f"{TINY_CONFIG_DIR}: no tiny CLIP configs found (broken installation?)")
    if not set(names) <= set(open_clip.list_models()):
        open_clip.add_model_config(TINY_CONFIG_DIR)
    return names


def list_archs() -> list[str]:
    """Every CLIP architecture name ``load_clip`` accepts (open_clip's plus cimlic's tiny ones)."""
    register_tiny_configs()
    return open_clip.list_models()


def _check_arch(arch: str) -> str:
    arch = arch.replace("/", "-")  # OpenAI spells ViT-B/16
    archs = list_archs()
    if arch not in archs:
        raise ClipError(f"unknown CLIP architecture {arch!r}; valid: {', '.join(archs)}")
    return arch


def _openai_arch(arch: str) -> str:
    """The QuickGELU variant of ``arch`` when open_clip has one (OpenAI weights need it)."""
    if arch.endswith("-quickgelu") or f"{arch}-quickgelu" not in open_clip.list_models():
        return arch
    return f"{arch}-quickgelu"


def _build_random(arch: str) -> nn.Module:
    """A randomly initialised open_clip model; plain CLIP configs are built directly (no misleading
    'initialized randomly' warning from open_clip's factory when weights are loaded right after)."""
    cfg: dict[str, Any] = open_clip.get_model_config(arch)
    special = cfg.pop("custom_text", False) or "multimodal_cfg" in cfg
    special = special or "hf_model_name" in cfg["text_cfg"] or "timm_model_name" in cfg["vision_cfg"]
    if special:
        return open_clip.create_model(arch, pretrained=None)
    return CLIP(**cfg)


@functools.lru_cache(maxsize=8)
def _tokenizer(arch: str) -> Any:
    return open_clip.get_tokenizer(arch)


# -------------------------------------------------------------------------------------- checkpoints
def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:  # TorchScript archives carry compiled code and constants.pkl
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in zf.namelist())


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def read_state_dict(path: str | os.PathLike, allow_torchscript: bool = False) -> tuple[dict[str, Tensor], bool]:
    """Read a CLIP checkpoint file without running code from it (unless ``allow_torchscript``).

    Returns:
        ``(state_dict, openai)``: the weights (``module.`` prefix and TorchScript attributes removed) and whether
        the file is an OpenAI checkpoint (TorchScript archive, or an unwrapped state dict in a ``.pt`` file).
    """
    path = Path(path)
    torchscript = path.is_file() and _is_torchscript(path)
    if torchscript and not allow_torchscript:
        raise ClipError(
            f"{path}: is a TorchScript archive (like OpenAI's released .pt files); opening it runs code "
            "from the file: pass allow_torchscript=True if you trust it, or convert it once with "
            "cimlic.models.clip.convert_torchscript_checkpoint"
        )
    if torchscript:
        try:
            obj: Any = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as err:  # a damaged archive
            raise ClipError(f"{path}: not a readable checkpoint ({_first_line(err)})") from None
    else:
        obj = load_tensor_file(path, ClipError, "CLIP checkpoint")
    sd, wrapped = to_state_dict(obj, path, ClipError)
    for key in _OPENAI_EXTRA_KEYS:
        sd.pop(key, None)
    openai = torchscript or (path.suffix == ".pt" and not wrapped)
    return sd, openai


def _load_weights(model: nn.Module, sd: dict[str, Tensor], path: Path, arch: str) -> None:
    """Strictly load ``sd`` into ``model``; a mismatch is a one-line ClipError naming the first bad keys."""
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)  # old layout -> CustomTextCLIP's text.* keys
    own = model.state_dict()
    transient = {name for name, _ in model.named_buffers()} - set(own)  # non-persistent (e.g. attn_mask)
    sd = {k: v for k, v in sd.items() if k not in transient}  # TorchScript archives keep them
    if "logit_scale" in sd and sd["logit_scale"].ndim != own["logit_scale"].ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(own["logit_scale"].shape)
    problems = state_dict_mismatch(own, sd)
    if problems:
        raise ClipError(f"{path}: weights do not match CLIP architecture {arch!r} ({'; '.join(problems)})")
    model.load_state_dict(sd, strict=True)


def convert_torchscript_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert a trusted TorchScript CLIP archive (OpenAI ``.pt``) into a plain state dict ``.pt`` file.

    The result loads with ``torch.load(weights_only=True)``; keep the ``.pt`` suffix so it is read as OpenAI's.
    """
    sd, _ = read_state_dict(src, allow_torchscript=True)
    save_torch(dst, sd)
    return Path(dst)


def load_clip(
    arch: str,
    checkpoint: str | os.PathLike = "",
    pretrained: str = "",
    random_init: bool = False,
    device: str | torch.device = "cpu",
    allow_torchscript: bool = False,
) -> ClipModel:
    """Build a frozen CLIP by open_clip architecture name, with weights from a file, a tag or random.

    Args:
        arch: open_clip architecture (``RN50``, ``ViT-B-16``, ``cimlic-tiny-vit``, ...).
        checkpoint: OpenAI ``.pt`` or open_clip ``.bin``/``.pth``/``.safetensors`` file.
        pretrained: open_clip pretrained tag (downloads; needs the network).
        random_init: allow random weights when neither ``checkpoint`` nor ``pretrained`` is given.
        device: where the model lives.
        allow_torchscript: allow opening TorchScript archives (runs code from the file).

    Raises:
        ClipError: unknown architecture, missing/corrupt/mismatched file, or no weights requested.
    """
    arch = _check_arch(arch)
    if checkpoint and pretrained:
        raise ClipError(f"give a CLIP checkpoint file or a pretrained tag, not both ({checkpoint!r}, {pretrained!r})")
    if checkpoint:
        path = Path(checkpoint)
        sd, openai = read_state_dict(path, allow_torchscript)
        name = _openai_arch(arch) if openai else arch
        model = _build_random(name)
        _load_weights(model, sd, path, name)
        source = str(path)
        logger.info("CLIP %s loaded from %s%s", name, path, " (OpenAI checkpoint)" if openai else "")
    elif pretrained:
        name = _openai_arch(arch) if pretrained == "openai" else arch
        try:
            model = open_clip.create_model(name, pretrained=pretrained)
        except Exception as err:  # network, unknown tag, ...
            raise ClipError(f"CLIP {name!r}: cannot load pretrained tag {pretrained!r} ({_first_line(err)})") from None
        source = f"pretrained:{pretrained}"
    elif random_init:
        name, model, source = arch, _build_random(arch), "random"
        logger.warning("CLIP %s is randomly initialised (random_init=True)", arch)
    else:
        raise ClipError(
            f"no weights for CLIP {arch!r}: pass model.clip_checkpoint=<file> (OpenAI .pt or open_clip "
            ".bin/.safetensors), model.clip_pretrained=<open_clip tag> (online) or model.random_init=true"
        )
    return ClipModel(model.float(), name, source).to(device)


# --------------------------------------------------------------------------------------- the wrapper
class ClipModel(nn.Module):
    """A frozen open_clip model (always in eval mode) with the hooks prompt learning and dense heads need.

    Attributes:
        model: the wrapped open_clip model; arch: resolved architecture; source: where its weights came from.
    """

    def __init__(self, model: nn.Module, arch: str, source: str = "") -> None:
        super().__init__()
        self.model = model
        self.arch = arch
        self.source = source
        self.text_pass = "shared_prefix"  # how encode_prompts runs class-shared contexts (model.text_pass)
        self.requires_grad_(False)
        super().train(False)
        scale = getattr(model, "logit_scale", None)
        # CLIP's multiplier s = exp(log-scale), clamped at 100 as in CLIP training; a frozen Python float
        self.logit_scale: float = float(scale.detach().exp().clamp(max=100.0)) if scale is not None else 100.0

    def train(self, mode: bool = True) -> ClipModel:
        """Stay in eval mode whatever the parent does (frozen batch-norm statistics, no dropout)."""
        return super().train(False)

    # ---------------------------------------------------------------- properties
    @property
    def _text(self) -> nn.Module:
        text = getattr(self.model, "text", self.model)  # CustomTextCLIP keeps its text tower under .text
        if not all(hasattr(text, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
            raise ClipError(f"CLIP {self.arch!r}: text tower is not a CLIP text transformer (prompt path unsupported)")
        return text

    @property
    def embed_dim(self) -> int:
        """Dimension D of the joint image-text space."""
        return int(self.model.visual.output_dim)

    @property
    def context_length(self) -> int:
        """Number of token positions L of the text tower."""
        return int(self._text.positional_embedding.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the text transformer weights (the cast dtype of both towers)."""
        return self._text.transformer.get_cast_dtype()

    @property
    def device(self) -> torch.device:
        return self._text.positional_embedding.device

    @property
    def causal_text(self) -> bool:
        """True when the text tower is causal: tokens after [EOS] cannot change the [EOS] feature."""
        return getattr(self._text, "attn_mask", None) is not None

    @property
    def image_size(self) -> int:
        """Square input resolution of the image tower."""
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, list | tuple) else size)

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return tuple(getattr(self.model.visual, "image_mean", None) or _OPENAI_MEAN)

    @property
    def image_std(self) -> tuple[float, float, float]:
        return tuple(getattr(self.model.visual, "image_std", None) or _OPENAI_STD)

    # ---------------------------------------------------------------------- text
    def tokenize(self, texts: str | Sequence[str], context_length: int | None = None) -> Tensor:
        """Token ids (n, L) from this arch's tokenizer (truncated to ``context_length``), on the model's device."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return _tokenizer(self.arch)(texts, context_length=context_length or self.context_length).to(self.device)

    def eot_index(self, tokens: Tensor) -> Tensor:
        """Position (n,) of the token whose feature ``encode_text`` pools ([EOS] for CLIP)."""
        text = self._text
        pool = getattr(text, "text_pool_type", None) or getattr(text, "pool_type", "argmax")
        if pool == "argmax":  # CLIP's [EOS] has the highest id
            return tokens.argmax(dim=-1)
        if pool == "eos":
            eos = getattr(text, "text_eos_id", None) or text.eos_id
            return (tokens == eos).int().argmax(dim=-1)
        if pool == "last":
            return torch.full(tokens.shape[:1], tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
        raise ClipError(f"CLIP {self.arch!r}: text pooling {pool!r} has no single [EOS] position")

    def token_embedding(self, tokens: Tensor) -> Tensor:
        """Token embeddings (n, L, W) of token ids (n, L)."""
        return self._text.token_embedding(tokens)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Text features (n, D) of token ids (n, L), exactly open_clip's ``encode_text``."""
        return self.model.encode_text(tokens)

    def encode_text_from_embeddings(self, embeddings: Tensor, eot_index: Tensor) -> Tensor:
        """Text features (n, D) from token embeddings (n, L', W), L' <= L, pooled at ``eot_index`` (n,).

        ``embeddings`` is [SOS] + context + class tokens + [EOS] (+ padding): the frozen text transformer with its
        positional embedding, causal mask, final LayerNorm and projection, in the model's cast dtype. With a causal
        tower, sequences cut just after the last [EOS] give the same features as full-length ones (and are cheaper).
        """
        text = self._text
        if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
            raise ClipError(f"CLIP {self.arch!r}: text tower with class token or padding mask is not supported")
        n, length, _ = embeddings.shape
        cast = text.transformer.get_cast_dtype()
        x = embeddings.to(cast) + text.positional_embedding[:length].to(cast)  # (n, L', W)
        mask = getattr(text, "attn_mask", None)
        x = text.transformer(x, attn_mask=None if mask is None else mask[:length, :length])  # batch-first
        x = text.ln_final(x)
        x = x[torch.arange(n, device=x.device), eot_index.to(x.device)]  # (n, W)
        proj = text.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (n, D)

    @property
    def shared_prefix_fits(self) -> bool:
        """Whether :meth:`encode_text_shared_prefix` applies: a causal text tower of plain pre-LN attention blocks."""
        text = self._text
        if not self.causal_text or getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
            return False
        return all(_plain_block(block) for block in text.transformer.resblocks)

    def encode_text_shared_prefix(self, prefix: Tensor, tails: Tensor, owner: Tensor, eot_index: Tensor) -> Tensor:
        """Text features (n, D) of the prompts ``prefix[owner[i]] + tails[i]``, pooled at ``eot_index`` (n,).

        ``prefix`` (m, P, W) holds the embeddings every prompt of an owner starts with ([SOS] + a class-shared
        context), ``tails`` (n, T, W) the rest (class tokens, '.', [EOS]); ``eot_index`` counts from the prompt's
        start. The text tower is causal, so the prefix positions' hidden states do not depend on what follows: they
        are computed once per owner, and each tail attends to its owner's prefix keys and values **[our design]**.
        Equal to ``encode_text_from_embeddings(cat(prefix[owner], tails, 1), eot_index)`` up to float rounding (the
        attention sums in another order); the prefix's forward and backward run m times instead of n.
        """
        if not self.shared_prefix_fits:
            raise ClipError(f"CLIP {self.arch!r}: the text tower does not fit the shared-prefix pass")
        text = self._text
        cast = text.transformer.get_cast_dtype()
        (m, P, W), (n, T, _) = prefix.shape, tails.shape
        pos = text.positional_embedding.to(cast)
        flat = torch.cat(
            [(prefix.to(cast) + pos[:P]).reshape(m * P, W), (tails.to(cast) + pos[P : P + T]).reshape(n * T, W)]
        )
        allowed = torch.ones(T, P + T, dtype=torch.bool, device=flat.device)  # tail i sees the prefix and tails <= i
        allowed[:, P:] = torch.ones(T, T, dtype=torch.bool, device=flat.device).tril()
        owner = owner.to(flat.device)
        for block in text.transformer.resblocks:  # (m*P + n*T, W): every token-wise layer runs on both at once
            attn = block.attn
            heads, d = attn.num_heads, W // attn.num_heads
            qkv = nn.functional.linear(block.ln_1(flat), attn.in_proj_weight, attn.in_proj_bias)  # (., 3W)
            qp, kp, vp = qkv[: m * P].reshape(m, P, 3, heads, d).permute(2, 0, 3, 1, 4)  # (m, H, P, d) each
            qt, kt, vt = qkv[m * P :].reshape(n, T, 3, heads, d).permute(2, 0, 3, 1, 4)  # (n, H, T, d) each
            out_p = nn.functional.scaled_dot_product_attention(qp, kp, vp, is_causal=True)  # (m, H, P, d)
            out_t = nn.functional.scaled_dot_product_attention(
                qt, torch.cat([kp[owner], kt], 2), torch.cat([vp[owner], vt], 2), attn_mask=allowed
            )  # (n, H, T, d)
            out = torch.cat([out_p.transpose(1, 2).reshape(m * P, W), out_t.transpose(1, 2).reshape(n * T, W)])
            flat = flat + block.ls_1(attn.out_proj(out))
            flat = flat + block.ls_2(block.mlp(block.ln_2(flat)))
        x = text.ln_final(flat[m * P :].reshape(n, T, W))
        x = x[torch.arange(n, device=x.device), eot_index.to(x.device) - P]  # (n, W)
        proj = text.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (n, D)

    # --------------------------------------------------------------------- image
    def encode_image(self, images: Tensor) -> Tensor:
        """Global image features (B, D), exactly open_clip's ``encode_image``."""
        return self.model.encode_image(images)

    def encode_image_dense(self, images: Tensor) -> dict[str, Tensor]:
        """Global (B, D) and local (B, N, D) image features in the joint space (see :func:`dense_image_features`)."""
        return dense_image_features(self.model.visual, images)

    @property
    def has_mean_token(self) -> bool:
        """True for ResNet towers, whose attention pool has a mean token (see :meth:`add_mean_token`)."""
        return isinstance(self.model.visual, ModifiedResNet)

    def add_mean_token(self, local: Tensor) -> Tensor:
        """(B, N, D) spatial tokens -> (B, 1 + N, D): the attention pool's mean token first, as the pool orders them.

        The pool's mean token is the mean of the spatial tokens plus its own positional embedding p_0; its value and
        output projections are affine, so its local feature is the mean of the spatial local features plus
        W_c W_v (p_0 - mean_r p_r): computed from the (cached) spatial features, no second image pass.
        """
        if not self.has_mean_token:
            raise ClipError(f"CLIP {self.arch!r}: only ResNet towers have an attention-pool mean token")
        pool = self.model.visual.attnpool
        pos = pool.positional_embedding.float()  # (1 + h*w, C)
        delta = pos[0] - pos[1:].mean(dim=0)  # (C,)
        offset = pool.c_proj.weight.float() @ (pool.v_proj.weight.float() @ delta)  # (D,)
        mean = local.mean(dim=1, keepdim=True) + offset.to(local.dtype)  # (B, 1, D)
        return torch.cat([mean, local], dim=1)


# ------------------------------------------------------------------------------------ dense features
def _plain_block(block: nn.Module) -> bool:
    """An open_clip pre-LN block: x + ls_1(attn(ln_1(x))), then x + ls_2(mlp(ln_2(x))), self-attention of one
    packed in-projection with biases and nothing else (no added key/value biases, no cross-attention norm)."""
    attn = getattr(block, "attn", None)
    return (
        isinstance(attn, nn.MultiheadAttention)
        and attn._qkv_same_embed_dim
        and attn.in_proj_bias is not None
        and attn.bias_k is None
        and not attn.add_zero_attn
        and not hasattr(block, "ln_1_kv")
        and all(isinstance(getattr(block, k, None), nn.Module) for k in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2"))
        and type(block).forward is open_clip.transformer.ResidualAttentionBlock.forward
    )


def dense_image_features(visual: nn.Module, images: Tensor) -> dict[str, Tensor]:
    """Global (B, D) and local (B, N, D) features of an open_clip image tower (METHODS §5.1); works on copies too.

    ViT: every patch token after ``ln_post`` and ``proj`` (class token excluded). ResNet: the attention pool's
    value and output projections applied to each spatial token plus its positional embedding (the values the pool
    would mix), without attention mixing. ``global`` equals the tower's usual output (``encode_image``).
    """
    if isinstance(visual, VisionTransformer):
        return _dense_vit(visual, images)
    if isinstance(visual, ModifiedResNet):
        return _dense_resnet(visual, images)
    raise ClipError(f"dense features need a ViT or ModifiedResNet image tower (got {type(visual).__name__})")


def _dense_vit(visual: VisionTransformer, images: Tensor) -> dict[str, Tensor]:
    if visual.attn_pool is not None:
        raise ClipError("dense features need a class-token ViT (no attentional pooler)")
    x = visual.transformer(visual._embeds(images))  # (B, 1 + N, W)
    pooled, _ = visual._pool(x)  # (B, W), as in open_clip's forward
    tokens = visual.ln_post(x[:, 1:])  # (B, N, W)
    if visual.proj is not None:
        pooled, tokens = pooled @ visual.proj, tokens @ visual.proj
    return {"global": pooled, "local": tokens}


def _dense_resnet(visual: ModifiedResNet, images: Tensor) -> dict[str, Tensor]:
    x = visual.stem(images)
    for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        x = layer(x)  # (B, C, h, w)
    pool = visual.attnpool
    pooled = pool(x)  # (B, D)
    tokens = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
    tokens = tokens + pool.positional_embedding[1:].to(tokens.dtype)  # spatial positions (index 0 = mean token)
    local = pool.c_proj(pool.v_proj(tokens))  # (B, h*w, D)
    return {"global": pooled, "local": local}


# ------------------------------------------------------------------------------------ trainable trunks
def make_trunk(visual: nn.Module) -> tuple[str, int]:
    """Turn a *copy* of an open_clip image tower into a token trunk in place; return (kind, token width).

    ViT (``clip_vit``): the patch tokens after ``ln_post``; ``proj`` is removed. ModifiedResNet (``clip_rn``): the
    ``layer4`` map; the attention pool is removed. Used by CPRFL's ``clip`` backbone (its own weights, never CLIP's).
    """
    if isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None:
            raise ClipError("a CLIP trunk needs a class-token ViT (no attentional pooler)")
        visual.proj = None  # unused by a trunk (and an unused parameter would get no gradient)
        return "clip_vit", int(visual.ln_post.normalized_shape[0])
    if isinstance(visual, ModifiedResNet):
        width = int(visual.attnpool.k_proj.in_features)
        del visual.attnpool  # the trunk ends at layer4
        return "clip_rn", width
    raise ClipError(f"unsupported CLIP image tower {type(visual).__name__} (ViT or ModifiedResNet)")


def trunk_tokens(visual: nn.Module, kind: str, images: Tensor) -> Tensor:
    """Tokens (B, N, W) of a trunk made by :func:`make_trunk` (ViT: patch tokens; ResNet: the flattened map)."""
    if kind == "clip_vit":
        x = visual.transformer(visual._embeds(images))  # (B, 1 + N, W)
        return visual.ln_post(x[:, 1:])  # (B, N, W)
    x = visual.stem(images)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))  # (B, W, h, w)
    return x.flatten(2).transpose(1, 2)  # (B, h*w, W)
