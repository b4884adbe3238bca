"""What fits where: the memory a full fine-tune of CogVideoX needs before activations.

    python -m cogkern.memory                       # 2B, 5B and 1.5-5B, every recipe
    python -m cogkern.memory --models 5b --json memory.json
    python -m cogkern.memory --gpus 8 16 64            # the FSDP2 / Ulysses tables at these sizes

For each transformer (built from its published config on the meta device, so
no weights are downloaded or allocated) this prints the bytes that live for a
whole run: the params, their gradients and the optimizer state, for every
``cogkern.optim.FusedAdamW`` mode (its own :func:`cogkern.optim.state_bytes_per_param`
gives the per-parameter state; int8 moment scales are counted per tensor, one
fp32 scale per block of ``MOMENT_BLOCK`` elements) and for the peers' recipes
(torch AdamW with AMP, torch AdamW on bf16 params, bitsandbytes and torchao
8-bit AdamW, DeepSpeed-style bf16 with fp32 masters), each counted from what
that library allocates, with the source. Activations, the CUDA context and the
allocator's slack come on top: a "yes" means the run can start, not that a
batch fits.

Past one GPU (``--gpus``, default 8 and 64), it prints for each model the
per-GPU bytes under FSDP2 full sharding (``fully_shard`` on each block and the
root, every tensor cut along dim 0 into ceil(rows / world) rows, so rank 0 holds
the largest shard) in the main recipes, and the bytes each GPU sends per
optimizer step: the all-gathers of the params (each block's in forward and again
in backward, as reshard_after_forward=True frees them; the root's once, since
FSDP2 keeps the root gathered between forward and backward) and the
reduce-scatter of the grads, in the params' dtype (no MixedPrecisionPolicy). For
Ulysses context parallelism it prints the all-to-alls' bytes per GPU at the
model's sequence length: per attention layer q, k, v to head shards and the
output back in forward, and the same four for the gradients in backward (no
activation checkpointing, which would repeat the forward four). Activations
and the transient unsharded block FSDP2 gathers are not in the per-GPU bytes.

GB here is 10^9 bytes. A card's nameplate GB is smaller than its byte count
(an "80 GB" H100 has 85.5 * 10^9 bytes, a "141 GB" H200 150.8 * 10^9), so the
fit marks, which compare against the nameplate number, leave that difference
(about 7 %) for the CUDA context and fragmentation.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from .optim import MOMENT_BLOCK, state_bytes_per_param

GB = 10**9
BLOCK_PREFIX = "transformer_blocks."  # diffusers' name of the blocks that are each fully_shard'ed
DEFAULT_GPUS = (8, 64)
# The recipes of the sharded tables: one per way of keeping a param, the lean ones at their leanest.
SHARDED_RECIPES = ("torch AdamW + AMP (fp32 params)", "cogkern fp32, m/v fp32", "cogkern 16-bit + fp32 master, m/v fp32",
                   "cogkern bf16 + int16 remainders, m/v fp32", "cogkern bf16 + stochastic rounding, m/v int8")
ACTIVATION_BYTES = 2  # bf16 q, k, v and attention output in the all-to-alls
DEFAULT_CAPACITIES_GB = (24, 48, 80, 141)  # RTX 4090 / L40S, A6000 / A100, H100 / H200
MOMENT_MODES = ("fp32", "bf16", "int8")

# --------------------------------------------------------------------------- the published transformers

# The init arguments of diffusers.CogVideoXTransformer3DModel, as in each Hugging Face
# repo's transformer/config.json (the "_class_name" / "_diffusers_version" bookkeeping
# keys left out). Sample sizes and max_text_seq_length do not change the parameter count
# (the sin-cos position table is a buffer, and none of these use learned positions).
_COMMON = dict(
    activation_fn="gelu-approximate", attention_bias=True, attention_head_dim=64, dropout=0.0, flip_sin_to_cos=True,
    freq_shift=0, in_channels=16, max_text_seq_length=226, norm_elementwise_affine=True, norm_eps=1e-05,
    out_channels=16, patch_size=2, spatial_interpolation_scale=1.875, temporal_compression_ratio=4,
    temporal_interpolation_scale=1.0, text_embed_dim=4096, time_embed_dim=512, timestep_activation_fn="silu",
)


@dataclass(frozen=True)
class PublishedModel:
    key: str  # the --models name
    name: str
    repo: str  # Hugging Face repo whose transformer/config.json `config` copies
    config: dict

    @property
    def config_source(self) -> str:
        return f"https://huggingface.co/{self.repo}/blob/main/transformer/config.json"


MODELS: dict[str, PublishedModel] = {m.key: m for m in (
    PublishedModel("2b", "CogVideoX-2B", "THUDM/CogVideoX-2b", dict(
        _COMMON, num_attention_heads=30, num_layers=30, sample_frames=49, sample_height=60, sample_width=90,
        use_rotary_positional_embeddings=False)),
    PublishedModel("5b", "CogVideoX-5B", "THUDM/CogVideoX-5b", dict(
        _COMMON, num_attention_heads=48, num_layers=42, sample_frames=49, sample_height=60, sample_width=90,
        use_learned_positional_embeddings=False, use_rotary_positional_embeddings=True)),
    # 1.5: temporal patches of 2 (patch_size_t) and a patch embedding without bias; the
    # text-to-video model has no ofs embedding (ofs_embed_dim stays None; the I2V model sets 512).
    PublishedModel("1.5-5b", "CogVideoX1.5-5B", "THUDM/CogVideoX1.5-5B", dict(
        _COMMON, num_attention_heads=48, num_layers=42, patch_size_t=2, patch_bias=False, sample_frames=81,
        sample_height=300, sample_width=300, use_learned_positional_embeddings=False,
        use_rotary_positional_embeddings=True)),
)}


@dataclass(frozen=True)
class ParamCensus:
    """The trainable tensors of one model: how many elements each has (and, for the sharded
    tables, each one's shape and name; without them every tensor counts as 1-D and a block's)."""

    model: PublishedModel
    numels: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...] = ()
    names: tuple[str, ...] = ()

    @property
    def params(self) -> int:
        return sum(self.numels)

    def tensor_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.shapes or tuple((n,) for n in self.numels)

    def in_blocks(self) -> tuple[bool, ...]:
        """Whether each tensor is in a transformer block (its own fully_shard unit) or the root's."""
        return tuple(n.startswith(BLOCK_PREFIX) for n in self.names) if self.names else (True,) * len(self.numels)


def _diffusers_transformer_class():
    try:
        from diffusers import CogVideoXTransformer3DModel
    except ImportError as exc:
        raise SystemExit(
            "python -m cogkern.memory builds the CogVideoX transformers from their configs with diffusers, which "
            f"is not importable here ({exc}). Install it: pip install 'cogkern[diffusers]' (or diffusers>=0.30)."
        ) from exc
    return CogVideoXTransformer3DModel


def count_parameters(model: PublishedModel) -> ParamCensus:
    """Builds the transformer on the meta device (no memory, no weights) and lists its params."""
    cls = _diffusers_transformer_class()
    with torch.device("meta"):
        module = cls(**model.config)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return ParamCensus(model, tuple(p.numel() for _, p in named), shapes=tuple(tuple(p.shape) for _, p in named),
                       names=tuple(n for n, _ in named))


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Recipe:
    name: str
    by: str  # "cogkern" or the peer library
    param_bytes: float  # per param
    grad_bytes: float  # per param
    state_bytes: Callable[[int], float]  # optimizer-state bytes of one tensor of n elements
    source: str
    # cogkern rows: the param dtype and FusedAdamW arguments the row stands for
    param_dtype: torch.dtype | None = None
    optimizer_kwargs: dict | None = None


def _int8_scale_correction(n: int) -> float:
    """Exact bytes of a tensor's int8 block scales (two moments, one fp32 per started block)
    minus the large-tensor share that state_bytes_per_param already counts (2 * 4 / block)."""
    return 2 * 4 * math.ceil(n / MOMENT_BLOCK) - 2 * 4 * n / MOMENT_BLOCK


def _cogkern_recipe(label: str, param_dtype: torch.dtype, moments: str, **kwargs) -> Recipe:
    per_param = state_bytes_per_param(param_dtype, moments=moments, **kwargs)
    int8 = moments == "int8"
    args = ", ".join([f"moments={moments!r}"] + [f"{k}={v!r}" for k, v in kwargs.items()])
    return Recipe(
        name=f"cogkern {label}, m/v {moments}",
        by="cogkern",
        param_bytes=param_dtype.itemsize,
        grad_bytes=param_dtype.itemsize,
        state_bytes=lambda n: n * per_param + (_int8_scale_correction(n) if int8 else 0.0),
        source=f"cogkern.optim.state_bytes_per_param({param_dtype}, {args})"
               + (f", scales per tensor: ceil(n / {MOMENT_BLOCK}) * 2 * 4 B" if int8 else ""),
        param_dtype=param_dtype,
        optimizer_kwargs=dict(moments=moments, **kwargs),
    )


# (label, param dtype, FusedAdamW arguments): every way FusedAdamW keeps a param. fp16 and
# bf16 params keep the same bytes in each mode, so the 16-bit rows stand for both.
_COGKERN_PARAM_MODES = (
    ("fp32", torch.float32, {}),
    ("16-bit + fp32 master", torch.bfloat16, {}),
    ("bf16 + int16 remainders", torch.bfloat16, dict(param_remainders=True)),
    ("bf16 + stochastic rounding", torch.bfloat16, dict(stochastic_rounding=True)),
    ("16-bit, no master (nearest)", torch.bfloat16, dict(master_weights=False)),
)


def cogkern_recipes() -> list[Recipe]:
    """Every FusedAdamW mode that state_bytes_per_param accepts (it refuses, e.g., bf16
    moments on 16-bit params updated by round to nearest)."""
    out = []
    for label, dtype, kwargs in _COGKERN_PARAM_MODES:
        for moments in MOMENT_MODES:
            try:
                out.append(_cogkern_recipe(label, dtype, moments, **kwargs))
            except ValueError:
                continue  # not a mode FusedAdamW offers
    return out


# The peers, counted from what they allocate (torch.zeros_like(p) keeps the param's dtype);
# tests/test_memory.py checks these against the installed libraries when they are present.
_BNB_BLOCK, _BNB_MIN_8BIT = 256, 4096  # bitsandbytes 0.50 (older releases used blocks of 2048)
_TORCHAO_BLOCK, _TORCHAO_MIN_QUANT, _TORCHAO_QMAP = 256, 4096, 256


def _bnb_8bit_state(n: int) -> float:
    if n < _BNB_MIN_8BIT:
        return 8.0 * n  # fp32 state1/state2 for small tensors
    # uint8 codes + fp32 absmax per block, both moments (the 256-entry qmaps are shared by all params)
    return 2.0 * n + 2 * 4 * math.ceil(n / _BNB_BLOCK)


def _torchao_8bit_state(n: int, param_bytes: int = 2) -> float:
    if n >= _TORCHAO_MIN_QUANT and n % _TORCHAO_BLOCK == 0:
        # uint8 codes, one fp32 scale per block and a 256-entry fp32 qmap, per moment
        return 2 * (n + 4 * (n // _TORCHAO_BLOCK) + 4 * _TORCHAO_QMAP)
    return 2.0 * n * param_bytes  # torch.zeros_like(p): m, v in the param's dtype


def peer_recipes() -> list[Recipe]:
    return [
        Recipe("torch AdamW + AMP (fp32 params)", "torch", 4, 4, lambda n: 8.0 * n,
               "torch.optim.AdamW keeps exp_avg/exp_avg_sq as torch.zeros_like(p) (fp32 here); AMP keeps fp32 "
               "params and grads (autocast's 16-bit weight copies live only during the forward)"),
        Recipe("torch AdamW, bf16 params", "torch", 2, 2, lambda n: 4.0 * n,
               "torch.optim.AdamW: zeros_like(p) makes m, v bf16 for bf16 params; no master weights, updates "
               "rounded to nearest"),
        Recipe("bitsandbytes AdamW8bit, bf16", "bitsandbytes", 2, 2, _bnb_8bit_state,
               f"bitsandbytes 0.50 bitsandbytes/optim/optimizer.py Optimizer2State.init_state: uint8 state1/state2 "
               f"with fp32 absmax per {_BNB_BLOCK}-block, fp32 state below min_8bit_size={_BNB_MIN_8BIT}; no master "
               "weights"),
        Recipe("torchao AdamW8bit, bf16", "torchao", 2, 2, _torchao_8bit_state,
               f"torchao 0.18 torchao/optim/adam.py _new_buffer + subclass_8bit.py OptimState8bit.zeros: uint8 codes, fp32 "
               f"scale per {_TORCHAO_BLOCK}-block, 256-entry fp32 qmap, for tensors of >= {_TORCHAO_MIN_QUANT} "
               f"elements divisible by {_TORCHAO_BLOCK}; else zeros_like(p) (bf16); no master weights"),
        Recipe("DeepSpeed-style bf16 + fp32 master", "DeepSpeed", 2, 2, lambda n: 12.0 * n,
               "ZeRO (Rajbhandari et al., 2020) sec. 3.1 mixed-precision Adam: 2 + 2 + K bytes, K = 12 (fp32 "
               "master, m, v), unsharded"),
        Recipe("DeepSpeed BF16_Optimizer, fp32 grad acc", "DeepSpeed", 2, 2 + 4, lambda n: 12.0 * n,
               "deepspeed/runtime/bf16_optimizer.py: fp32_groups_gradients_flat = zeros_like(bf16 flat, "
               "grad_acc_dtype=fp32) beside the bf16 grads, fp32 master partition + Adam m, v (1 GPU: no sharding)"),
    ]


def all_recipes() -> list[Recipe]:
    return cogkern_recipes() + peer_recipes()


# --------------------------------------------------------------------------- footprints


@dataclass(frozen=True)
class Footprint:
    recipe: Recipe
    params: int  # bytes
    grads: int
    state: int
    world_size: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.state

    def fits(self, capacity_gb: float) -> bool:
        return self.total <= capacity_gb * GB


def shard_numels(census: ParamCensus, world_size: int) -> tuple[int, ...]:
    """Elements of each tensor's largest FSDP2 shard (rank 0's): ceil(rows / world) rows, the
    size FSDP2 pads every rank's shard to (torch.chunk along dim 0)."""
    return tuple(-(-shape[0] // world_size) * math.prod(shape[1:]) for shape in census.tensor_shapes())


def footprint(census: ParamCensus, recipe: Recipe, world_size: int = 1) -> Footprint:
    """Bytes one GPU holds for params + grads + optimizer state, before activations.

    ``world_size`` > 1: FSDP2 full sharding, rank 0's share (the largest); the optimizer state
    is sized from each tensor's local shard (int8 blocks start again in every shard).
    """
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    numels = census.numels if world_size == 1 else shard_numels(census, world_size)
    n = sum(numels)
    state = sum(recipe.state_bytes(k) for k in numels)
    return Footprint(recipe, params=round(n * recipe.param_bytes), grads=round(n * recipe.grad_bytes),
                     state=round(state), world_size=world_size)


@dataclass(frozen=True)
class FsdpTraffic:
    """Bytes one GPU sends (and as many it receives) in one optimizer step under FSDP2."""

    recipe: Recipe
    world_size: int
    all_gather_forward: int
    all_gather_backward: int
    reduce_scatter: int

    @property
    def total(self) -> int:
        return self.all_gather_forward + self.all_gather_backward + self.reduce_scatter


def fsdp_traffic(census: ParamCensus, recipe: Recipe, world_size: int) -> FsdpTraffic:
    """Ring collectives over padded shards: an all-gather or reduce-scatter of a tensor whose shard
    has s elements moves (world - 1) * s elements through every GPU. Forward gathers every
    param; backward gathers the blocks' again (resharded after forward) but not the root's."""
    if not (isinstance(world_size, int) and world_size >= 2):
        raise ValueError(f"world_size must be an int >= 2 for sharded traffic, got {world_size!r}")
    shards = shard_numels(census, world_size)
    all_elems = sum(shards)
    block_elems = sum(s for s, in_block in zip(shards, census.in_blocks()) if in_block)
    per_peer = world_size - 1
    return FsdpTraffic(recipe, world_size,
                       all_gather_forward=round(per_peer * all_elems * recipe.param_bytes),
                       all_gather_backward=round(per_peer * block_elems * recipe.param_bytes),
                       reduce_scatter=round(per_peer * all_elems * recipe.grad_bytes))


# Tokens of one sample (text + video) each model trains on. 5B: 49 frames at 480x720 -> 13 latent
# frames of 60x90, patches of 2x2: 13 * 30 * 45 video tokens. 1.5: 81 frames at 768x1360 -> 21
# latent frames, padded to 22 for the temporal patch of 2, 96x170 latents: 11 * 48 * 85.
SEQUENCES = {"2b": (226 + 13 * 30 * 45, "49 frames, 480x720"), "5b": (226 + 13 * 30 * 45, "49 frames, 480x720"),
             "1.5-5b": (226 + 11 * 48 * 85, "81 frames, 768x1360")}
ULYSSES_DEGREES = (2, 4, 8)  # those that divide the model's heads are shown (2B's 30: only 2)


def ulysses_degrees(model: PublishedModel) -> tuple[int, ...]:
    return tuple(cp for cp in ULYSSES_DEGREES if model.config["num_attention_heads"] % cp == 0)


@dataclass(frozen=True)
class UlyssesTraffic:
    """Bytes one GPU sends (and receives) in the all-to-alls of one step, for one sample's
    sequence split over ``cp`` ranks."""

    cp: int
    seq_len: int
    layers: int
    per_all_to_all: int  # one (seq / cp, heads, head_dim) tensor, all but the 1/cp that stays

    @property
    def per_layer(self) -> int:
        return 8 * self.per_all_to_all  # forward: q, k, v, out; backward: their gradients

    @property
    def total(self) -> int:
        return self.layers * self.per_layer


def ulysses_traffic(model: PublishedModel, cp: int, seq_len: int | None = None) -> UlyssesTraffic:
    """Each rank holds seq / cp tokens of q (heads * head_dim wide); the all-to-all keeps the
    1/cp of it that is its own heads and sends the rest."""
    cfg = model.config
    if seq_len is None:
        seq_len = SEQUENCES[model.key][0]
    heads, width = cfg["num_attention_heads"], cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if heads % cp:
        raise ValueError(f"cp={cp} does not divide {model.name}'s {heads} heads")
    local = seq_len / cp * width * ACTIVATION_BYTES
    return UlyssesTraffic(cp, seq_len, cfg["num_layers"], per_all_to_all=round(local * (cp - 1) / cp))


def model_table(census: ParamCensus, recipes: list[Recipe] | None = None) -> list[Footprint]:
    """Every recipe's footprint, largest first."""
    rows = [footprint(census, r) for r in (recipes if recipes is not None else all_recipes())]
    return sorted(rows, key=lambda f: -f.total)


def format_table(census: ParamCensus, rows: list[Footprint], capacities: tuple[float, ...]) -> str:
    m = census.model
    width = max(len(f.recipe.name) for f in rows)
    caps = " ".join(f"{c:g}GB".rjust(6) for c in capacities)
    head = f"{'recipe'.ljust(width)}  B/param  params   grads   optim   total | {caps}"
    lines = [f"{m.name}: {census.params:,} parameters in {len(census.numels):,} tensors "
             f"(config: {m.repo} transformer/config.json)",
             f"GB = 10^9 bytes; params + grads + optimizer state, before activations", head, "-" * len(head)]
    n = census.params
    for f in rows:
        marks = " ".join(("yes" if f.fits(c) else "no").rjust(6) for c in capacities)
        lines.append(f"{f.recipe.name.ljust(width)}  {f.total / n:7.2f} {f.params / GB:7.2f} {f.grads / GB:7.2f} "
                     f"{f.state / GB:7.2f} {f.total / GB:7.2f} | {marks}")
    return "\n".join(lines)


def sharded_recipes() -> list[Recipe]:
    by_name = {r.name: r for r in all_recipes()}
    return [by_name[name] for name in SHARDED_RECIPES]


def format_sharded_tables(census: ParamCensus, gpus: tuple[int, ...]) -> str:
    m = census.model
    recipes = sharded_recipes()
    width = max(len(r.name) for r in recipes)
    head = (f"{'recipe'.ljust(width)}  GPUs  params   grads   optim   total | AG fwd  AG bwd      RS   moved")
    lines = [f"{m.name} under FSDP2, full shard (fully_shard each block, then the root): GB per GPU (rank 0, the "
             f"largest shard) and GB each GPU sends per step",
             "per GPU: params + grads + optimizer state, all sharded; not in it: activations, the unsharded params "
             "of the block being computed (and the next, prefetched) and its unsharded grads before the "
             "reduce-scatter",
             "moved: all-gather of the params in forward (AG fwd) and of the blocks' again in backward (AG bwd), "
             "reduce-scatter of the grads (RS), in the params' dtype",
             head, "-" * len(head)]
    for r in recipes:
        for world in gpus:
            f, t = footprint(census, r, world), fsdp_traffic(census, r, world)
            lines.append(f"{r.name.ljust(width)}  {world:4d} {f.params / GB:7.2f} {f.grads / GB:7.2f} "
                         f"{f.state / GB:7.2f} {f.total / GB:7.2f} | {t.all_gather_forward / GB:6.2f} "
                         f"{t.all_gather_backward / GB:7.2f} {t.reduce_scatter / GB:7.2f} {t.total / GB:7.2f}")
    seq_len, video = SEQUENCES[m.key]
    cfg = m.config
    lines += ["", f"{m.name}, Ulysses context parallelism over cp GPUs: all-to-all bytes each GPU sends per step "
                  f"for one sample of {seq_len:,} tokens ({video}; 226 text), bf16, {cfg['num_layers']} attention "
                  "layers, 4 all-to-alls each in forward (q, k, v, out) and 4 in backward, no activation "
                  "checkpointing",
              "  cp   MB per all-to-all   MB per layer   GB per step"]
    for cp in ulysses_degrees(m):
        u = ulysses_traffic(m, cp)
        lines.append(f"  {cp:2d}   {u.per_all_to_all / 1e6:17.2f}   {u.per_layer / 1e6:12.2f}   {u.total / GB:11.2f}")
    return "\n".join(lines)


def sharded_json(census: ParamCensus, gpus: tuple[int, ...]) -> dict:
    seq_len, video = SEQUENCES[census.model.key]
    return dict(
        fsdp2=[dict(recipe=r.name, world_size=world,
                    bytes_per_gpu=dict(params=f.params, grads=f.grads, state=f.state, total=f.total),
                    bytes_moved_per_gpu_per_step=dict(all_gather_forward=t.all_gather_forward,
                                                      all_gather_backward=t.all_gather_backward,
                                                      reduce_scatter=t.reduce_scatter, total=t.total))
               for r in sharded_recipes() for world in gpus
               for f, t in [(footprint(census, r, world), fsdp_traffic(census, r, world))]],
        ulysses=dict(seq_len=seq_len, sample=video, activation_bytes=ACTIVATION_BYTES, degrees=[
            dict(cp=u.cp, per_all_to_all=u.per_all_to_all, per_layer=u.per_layer, per_step=u.total)
            for u in (ulysses_traffic(census.model, cp) for cp in ulysses_degrees(census.model))]),
    )


def to_json(censuses: list[ParamCensus], tables: list[list[Footprint]], capacities: tuple[float, ...],
            gpus: tuple[int, ...] = DEFAULT_GPUS) -> dict:
    models = []
    for census, rows in zip(censuses, tables):
        m, n = census.model, census.params
        models.append(dict(
            key=m.key, name=m.name, config_source=m.config_source, config=m.config, params=n,
            tensors=len(census.numels),
            recipes=[dict(
                name=f.recipe.name, by=f.recipe.by, source=f.recipe.source,
                bytes=dict(params=f.params, grads=f.grads, state=f.state, total=f.total),
                bytes_per_param=dict(params=f.params / n, grads=f.grads / n, state=f.state / n, total=f.total / n),
                gb=dict(params=f.params / GB, grads=f.grads / GB, state=f.state / GB, total=f.total / GB),
                fits={f"{c:g}": f.fits(c) for c in capacities},
            ) for f in rows], sharded=sharded_json(census, gpus)))
    return dict(unit="GB = 1e9 bytes", what="params + grads + optimizer state per GPU, before activations",
                world_size=1, capacities_gb=list(capacities), moment_block=MOMENT_BLOCK, models=models)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cogkern.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--capacities", nargs="+", type=float, default=list(DEFAULT_CAPACITIES_GB), metavar="GB",
                   help="GPU memory sizes to mark fits against (default: %(default)s)")
    p.add_argument("--gpus", nargs="+", type=int, default=list(DEFAULT_GPUS), metavar="N",
                   help="GPU counts of the FSDP2 tables (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write every number, with sources, as JSON")
    args = p.parse_args(argv)
    if any(not (c > 0 and math.isfinite(c)) for c in args.capacities):
        p.error(f"--capacities must be positive numbers, got {args.capacities}")
    if any(g < 2 for g in args.gpus):
        p.error(f"--gpus must be GPU counts of 2 or more, got {args.gpus}")
    capacities, gpus = tuple(args.capacities), tuple(dict.fromkeys(args.gpus))
    censuses = [count_parameters(MODELS[k]) for k in dict.fromkeys(args.models)]
    tables = [model_table(c) for c in censuses]
    print("\n\n".join(format_table(c, t, capacities) for c, t in zip(censuses, tables)))
    print("\n\n" + "\n\n".join(format_sharded_tables(c, gpus) for c in censuses))
    print("\nsources:")
    for r in all_recipes():
        if r.by != "cogkern":
            print(f"  {r.name}: {r.source}")
    print(f"  cogkern rows: cogkern.optim.state_bytes_per_param; int8 moment scales counted per tensor "
          f"(ceil(n / {MOMENT_BLOCK}) fp32 per moment)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(censuses, tables, capacities, gpus), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
