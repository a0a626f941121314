"""The training schedule of ``hypernetwork.kind: routed`` (`RoutedHyperLoRA`), in pure pieces.

    steps 0..K-1  bootstrap: gates 1 (the bank is a static LoRA) + a zero per-sample probe;
                  after each backward, `Bootstrap.record` keeps each sample's probe gradient
                  (`probe_features`) and its prompt
    step K        `cluster` the probe gradients into n balanced groups (the experts),
                  `pretrain_router`: encoder + router learn prompt -> group by cross-entropy,
                  `set_routing`: zero the bank's B, freeze encoder + router, mark routing set
    steps K..     hard routing, one expert per prompt; a fresh optimizer whose learning rate is
                  ramped back over ``route_rewarm_steps`` (`rewarm_factor`)
    steps K+R..K+R+W-1  the re-routing window (R = ``route_relabel_after``, W =
                  ``route_relabel_steps``): each sample is also scored under every expert
                  (`expert_losses`, no-grad forwards)
    step K+R+W    `relabel`: a fresh router learns to send each scored prompt to its lowest-KL expert;
                  then again R steps later, ``route_relabel_rounds`` rounds in all

`route` runs step K on a plain module (the learn-bench, tests/learn_bench/run.py). Why probe
gradients: dL_b / dP (P an extra rank-r B added to the bank's A) is the direction in which sample
b wants the adapter's update to move; samples of the same family want the same LoRA_c, so their
gradients cluster by family (held-out purity 95-98% on learn-bench), where the prompts' own
encoder features do not (~0.33). See `trainer.hypernetwork`.

Why re-routing: the clusters are not clean (87-90% of the bootstrap prompts in their family's
cluster on learn-bench: one sample's gradient is noisy) and the router learns their errors (held-out
prompts routed to their family's expert 87.5-98% of the time, varying by seed, and each misrouted
prompt costs about what a prompt swap does). Once the experts have trained on for R steps, a
sample's KL under each expert names its family far more surely: the lowest-KL expert is its
family's for 99.1-100% of the window's samples, and the router trained on those labels routes every
held-out prompt right (learn-bench, seeds 0 and 1).

The distributed `Trainer` runs the schedule through `RoutingSchedule` (``before_step``,
``after_backward``, ``lr_factor``, ``state_dict``). Its adapter is FSDP2-sharded: each rank
records its own samples (the probe is a per-forward leaf tensor, not a parameter, so its gradient
stays on the rank), and at step K `route_distributed` gathers every rank's records, clusters and
pre-trains on rank 0 a plain copy of the encoder and router built from their full tensors
(`RouterCopy`: ``adapter.logits`` outside the root forward would see only the shards), scatters
the result into every rank's shards and sets routing on every rank.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from hyperdistill.trainer.distributed import (
    all_gather_objects,
    broadcast_object,
    gather_objects_to_rank0,
    rank,
    world_size,
)
from hyperdistill.trainer.lora import GeneratedLoRA, LoRAWeights, hyper_lora
from hyperdistill.trainer.loss import topk_kl_per_position

if TYPE_CHECKING:
    from hyperdistill.trainer.hypernetwork import LoRABank, RoutedHyperLoRA

log = logging.getLogger(__name__)


def attach_probe(bank: LoRABank, lora: GeneratedLoRA) -> tuple[GeneratedLoRA, dict[str, torch.Tensor]]:
    """`lora` with a zero rank-r probe appended to every target: A_cat = [A_b; A], B_cat = [B_b, P_b].

    P [B, L, out, r] per module type is a fresh zero leaf that requires grad, so the student's
    output is unchanged and, after ``backward``, ``P.grad[b]`` = dL / dP_b: the gradient of the
    loss with respect to an extra per-sample B on the bank's A. Returns the LoRA and the probes.
    """
    batch, weights, probes = lora.batch_size, {}, {}
    for kind in bank.kinds:
        a, b = bank.factors(kind)
        probe = torch.zeros(batch, *b.shape, device=b.device, dtype=b.dtype, requires_grad=True)
        probes[kind] = probe
        for j, t in enumerate(bank.group(kind)):
            w = lora.weights[t.name]
            weights[t.name] = LoRAWeights(
                torch.cat([w.A, a[j].expand(batch, -1, -1)], 1), torch.cat([w.B, probe[:, j]], 2), kind
            )
    return GeneratedLoRA(weights, lora.scale), probes


def probe_features(probes: dict[str, torch.Tensor], dim: int = 0) -> torch.Tensor:
    """After ``backward``: each sample's probe gradient, flattened over targets, float32 [B, D] on
    the CPU; with ``dim`` > 0 and D > ``dim``, its count sketch [B, dim] (`sketch_map`) instead.

    Why the sketch: D = r * sum over targets of out_features is 16 * 653,568 = 10.5M floats (42 MB)
    per sample for Qwen3-Coder-Next's 13 targets (36 DeltaNet layers x (12288 + 64 + 2048), 12
    attention layers x (8192 + 512 + 512 + 2048)); the bootstrap keeps one per sample for K steps
    and gathers them on every rank. A count sketch is a fixed random linear map: inner products,
    hence the cluster geometry the k-means sees, are kept in expectation, with an error of about
    |x| |y| / sqrt(dim)."""
    if any(p.grad is None for p in probes.values()):
        raise RuntimeError("probe_features: the probe has no gradient (call it after loss.backward())")
    grads = {kind: p.grad.detach().flatten(1).float() for kind, p in probes.items()}
    if not dim or sum(g.shape[1] for g in grads.values()) <= dim:
        return torch.cat(list(grads.values()), 1).cpu()
    out = None
    for kind, g in grads.items():
        buckets, signs = sketch_map(kind, g.shape[1], dim, g.device)
        part = torch.zeros(g.shape[0], dim, device=g.device).index_add_(1, buckets, g * signs)
        out = part if out is None else out + part
    return out.cpu()


@functools.lru_cache(maxsize=32)
def sketch_map(kind: str, size: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The count sketch of ``kind``'s flattened probe gradient (``size`` entries) into ``dim``
    buckets: each entry's bucket (int64 [size]) and sign (float32 [size], +-1). The same on every
    rank and in every run: seeded by the module type's name, drawn on the CPU."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kind}:{size}:{dim}".encode()))
    buckets = torch.randint(dim, (size,), generator=gen)
    signs = torch.randint(2, (size,), generator=gen).float() * 2 - 1
    return buckets.to(device), signs.to(device)


def sinkhorn_assign(scores: torch.Tensor, iters: int = 50, eps: float = 0.05) -> torch.Tensor:
    """Balanced assignment of N rows to k columns, int64 [N]: the row-wise argmax of the
    entropic optimal-transport plan of ``scores`` [N, k] (higher = better) with uniform
    marginals, so each column gets ~N / k rows. Scores are centred per row and standardised."""
    c = scores - scores.mean(1, keepdim=True)
    c = c / (c.std() + 1e-12) / eps
    kernel = torch.exp(c - c.max())
    n, k = kernel.shape
    u, v = torch.ones(n, dtype=kernel.dtype), torch.ones(k, dtype=kernel.dtype)
    for _ in range(iters):
        u = (1.0 / n) / (kernel @ v + 1e-30)
        v = (1.0 / k) / (kernel.T @ u + 1e-30)
    return (u[:, None] * kernel * v[None]).argmax(1)


def cluster(
    features: torch.Tensor | Sequence[torch.Tensor],
    k: int,
    *,
    dims: int = 8,
    restarts: int = 10,
    iters: int = 50,
    seed: int = 0,
) -> torch.Tensor:
    """Balanced spherical k-means of the rows of ``features`` [N, D] (or of a list of row blocks
    [N_i, D], never concatenated) -> labels int64 [N] in [0, k).

    Rows are normalised to unit length (the direction of a gradient matters, not its size),
    centred, reduced to their top ``dims`` principal components (`principal_components`) and
    normalised again; then ``restarts`` runs of spherical k-means (cosine similarity; assignments
    balanced by `sinkhorn_assign`) from random rows as centroids, keeping the run with the largest
    summed cosine to the assigned centroid. Deterministic given ``seed``.
    """
    blocks = [features] if isinstance(features, torch.Tensor) else list(features)
    n = sum(len(b) for b in blocks)
    if any(b.ndim != 2 for b in blocks) or n < k:
        shapes = [tuple(b.shape) for b in blocks]
        raise ValueError(f"cluster: need 2-D [N, D] rows with N >= k = {k}, got {shapes}")
    f = principal_components(blocks, dims)
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-30)
    best_score, best = -float("inf"), None
    for restart in range(restarts):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + restart)
        centroids = f[torch.randperm(len(f), generator=gen)[:k]]
        for _ in range(iters):
            labels = sinkhorn_assign(f @ centroids.T)
            centroids = torch.stack([f[labels == j].mean(0) if (labels == j).any() else centroids[j] for j in range(k)])
            centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-30)
        score = float((f * centroids[labels]).sum())
        if score > best_score:
            best_score, best = score, labels
    return best


def principal_components(blocks: Sequence[torch.Tensor], dims: int, chunk: int = 1 << 20) -> torch.Tensor:
    """The top ``dims`` principal components float64 [N, dims] of the unit-normalised, centred rows
    of the row blocks ``blocks`` (each [N_i, D]), from their N x N Gram matrix: what the SVD of
    the [N, D] matrix gives (u * s, up to signs), without ever holding it in float64 or whole.
    Memory beyond the blocks is O(N^2 + N * chunk); the Gram matrix is summed over column chunks."""
    n = sum(len(b) for b in blocks)
    norms = torch.cat([b.double().norm(dim=1) if b.shape[1] <= chunk else _chunked_norms(b, chunk) for b in blocks])
    gram = torch.zeros(n, n, dtype=torch.float64)
    starts = [0, *itertools.accumulate(len(b) for b in blocks)]
    for c in range(0, blocks[0].shape[1], chunk):
        cols = [b[:, c : c + chunk].double() for b in blocks]
        for i, j in itertools.combinations_with_replacement(range(len(blocks)), 2):
            block = cols[i] @ cols[j].T
            gram[starts[i] : starts[i + 1], starts[j] : starts[j + 1]] += block
            if i != j:
                gram[starts[j] : starts[j + 1], starts[i] : starts[i + 1]] += block.T
    scale = 1.0 / norms.clamp_min(1e-30)
    gram = gram * scale[:, None] * scale[None]
    gram = gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()
    values, vectors = torch.linalg.eigh(gram)  # ascending
    top = values.flip(0)[:dims].clamp_min(0)
    return vectors.flip(1)[:, :dims] * top.sqrt()


def _chunked_norms(block: torch.Tensor, chunk: int) -> torch.Tensor:
    squares = sum(block[:, c : c + chunk].double().pow(2).sum(1) for c in range(0, block.shape[1], chunk))
    return squares.sqrt()


def pad_prompts(prompts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D prompt token ids -> right-padded ids int64 [B, P] (pad 0) and mask bool [B, P]."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = p, True
    return ids, mask


def pretrain_router(
    adapter: RoutedHyperLoRA,
    prompts: Sequence[torch.Tensor],
    labels: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
) -> float:
    """Train the adapter's encoder + router so that prompt i is routed to ``labels[i]``.

    prompts: 1-D token ids (valid tokens only); labels: int64 [N]. Cross-entropy of the router
    logits, a separate Adam at ``lr``, ``steps`` batches of ``batch_size`` prompts drawn with
    replacement (generator seeded by ``seed``); only the encoder and router are run. Their
    gradients are cleared afterwards (a leftover gradient would reach the main optimizer).
    Returns the last batch's cross-entropy.
    """
    params = list(adapter.encoder.parameters()) + list(adapter.router.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    device = adapter.router.weight.device
    gen = torch.Generator().manual_seed(seed)
    ce = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(len(prompts), (batch_size,), generator=gen)
        ids, mask = pad_prompts([prompts[i] for i in idx.tolist()])
        logits = adapter.logits(ids.to(device), mask.to(device))
        ce = nn.functional.cross_entropy(logits, labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        ce.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(ce.detach())


def set_routing(adapter: RoutedHyperLoRA) -> None:
    """The switch to hard routing: zero the bank's B (the experts restart from the student),
    freeze encoder + router (gradients cleared), drop the probe, mark routing set."""
    with torch.no_grad():
        for b in adapter.bank.B.values():
            b.zero_()
    for module in (adapter.encoder, adapter.router):
        module.requires_grad_(False)
        module.zero_grad(set_to_none=True)
    adapter.probe, adapter.last_probe = False, {}
    adapter.routing_set.fill_(True)


def rewarm_factor(step: int, route_after: int, rewarm_steps: int) -> float:
    """The learning-rate factor after routing is set: (step - K + 1) / rewarm for K <= step < K + rewarm, else 1."""
    if rewarm_steps and route_after <= step < route_after + rewarm_steps:
        return (step - route_after + 1) / rewarm_steps
    return 1.0


def purity(groups: Sequence[int], experts: Sequence[int], n_experts: int) -> float:
    """Share of samples whose expert is their group's under the best one-to-one group -> expert
    map (1: the routing is the grouping up to names; 1 / n for a random balanced routing)."""
    names = sorted(set(groups))
    counts = torch.zeros(len(names), n_experts, dtype=torch.long)
    for g, e in zip(groups, experts, strict=True):
        counts[names.index(g), e] += 1
    best = max(
        sum(int(counts[i, perm[i]]) for i in range(len(names)))
        for perm in itertools.permutations(range(n_experts), min(len(names), n_experts))
    )
    return best / max(1, len(groups))


@dataclass
class Bootstrap:
    """What the bootstrap steps keep: each sample's probe gradient and its prompt."""

    features: list[torch.Tensor] = field(default_factory=list)
    """float32 [B, D] per recorded step."""
    prompts: list[torch.Tensor] = field(default_factory=list)
    """1-D prompt ids (valid tokens only), one per sample, in record order."""

    def record(self, adapter: RoutedHyperLoRA, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        """After ``loss.backward()`` of a step run with ``adapter.probe``: keep the batch's rows."""
        self.add(probe_features(adapter.last_probe, adapter.config.route_feature_dim), prompt_ids, prompt_mask)

    def add(self, features: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        """Keep rows ``features`` [B, D] (on the CPU) and their prompts (ids [B, P], mask [B, P])."""
        self.features.append(features.cpu())
        self.prompts += [ids[mask.bool()].cpu() for ids, mask in zip(prompt_ids, prompt_mask, strict=True)]

    def __len__(self) -> int:
        return len(self.prompts)


def route(adapter: RoutedHyperLoRA, bootstrap: Bootstrap, seed: int = 0) -> torch.Tensor:
    """Step K on a plain adapter, from this process's records alone (no collective, also inside
    a process group): cluster the bootstrap's probe gradients, pre-train the router on the
    labels, set routing (the caller then rebuilds its optimizer). Returns the cluster labels [N].
    What `route_distributed` gives on one process, and what tests compare it with."""
    cfg = adapter.config
    labels = cluster_labels(bootstrap.features, cfg, seed)
    pretrain_router(
        adapter,
        bootstrap.prompts,
        labels,
        steps=cfg.router_pretrain_steps,
        lr=cfg.router_pretrain_lr,
        batch_size=cfg.router_pretrain_batch,
        seed=seed,
    )
    set_routing(adapter)
    return labels


def new_router(config) -> nn.Linear:
    """The router of a routed adapter (`HyperLoRAConfig` ``config``): a linear map of the context
    to the experts, weight N(0, 0.1), bias 0."""
    router = nn.Linear(config.encoder_dim, config.experts)
    nn.init.normal_(router.weight, std=0.1)
    nn.init.zeros_(router.bias)
    return router


# ---- the distributed Trainer (FSDP2) ---------------------------------------------------------------
class RouterCopy(nn.Module):
    """A plain (unsharded) copy of a routed adapter's encoder and router, from their full tensors:
    what the router pre-training trains when the adapter is FSDP2-sharded. Building it is
    collective then (every rank all-gathers the same tensors)."""

    def __init__(self, adapter: RoutedHyperLoRA):
        super().__init__()
        self.config = cfg = adapter.config
        with torch.device("meta"):  # no initialisation, no draw from the run's random stream
            self.encoder = type(adapter.encoder)(cfg, adapter.encoder._embed)  # a PromptEncoder
            self.router = nn.Linear(cfg.encoder_dim, cfg.experts)
        self.to_empty(device=adapter.routing_set.device)
        with torch.no_grad():
            for name, param in self.named_parameters():
                source = adapter.get_parameter(name)
                param.copy_(source.full_tensor() if isinstance(source, DTensor) else source)

    def reinitialise(self, seed: int) -> None:
        """Fresh weights, initialised as the adapter initialises its encoder and router, drawn
        from the CPU generator seeded by ``seed`` inside `torch.random.fork_rng` (the run's own
        random stream is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = type(self.encoder)(self.config, self.encoder._embed)
            router = new_router(self.config)
        self.encoder.load_state_dict(encoder.state_dict())
        self.router.load_state_dict(router.state_dict())

    def logits(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Router logits float32 [B, n], as `RoutedHyperLoRA.logits`."""
        return self.router(self.encoder(prompt_ids, prompt_mask))

    @torch.no_grad()
    def experts(self, prompts: Sequence[torch.Tensor], batch_size: int) -> torch.Tensor:
        """The expert each 1-D prompt is routed to, int64 [N], in batches of ``batch_size``."""
        device, out = self.router.weight.device, []
        for start in range(0, len(prompts), batch_size):
            ids, mask = pad_prompts(prompts[start : start + batch_size])
            out.append(self.logits(ids.to(device), mask.to(device)).argmax(-1).cpu())
        return torch.cat(out)

    def copy_into(self, adapter: RoutedHyperLoRA) -> None:
        """Collective: rank 0's weights into every rank's shards of ``adapter`` (scattered from
        rank 0, so every rank ends with the same full tensors), or into a plain adapter."""
        with torch.no_grad():
            for name, param in self.named_parameters():
                target = adapter.get_parameter(name)
                if isinstance(target, DTensor):
                    rows = distribute_tensor(param.detach(), target.device_mesh, target.placements)
                    target.to_local().copy_(rows.to_local())
                else:
                    target.copy_(param)


@dataclass
class Routed:
    """What the switch found, for every bootstrap prompt of every rank (rank 0's first)."""

    labels: torch.Tensor
    """The cluster of each prompt's probe gradient, int64 [N]."""
    cross_entropy: float
    """The router pre-training's last batch cross-entropy."""
    experts: torch.Tensor
    """The expert each prompt is routed to afterwards (this rank's weights), int64 [N]."""
    prompts: list[torch.Tensor] = field(default_factory=list, repr=False)
    """The prompts (1-D token ids), in the order of ``labels``."""

    def record(self, step: int, experts: int) -> dict[str, Any]:
        return {
            "step": step,
            "prompts": len(self.labels),
            "cluster_sizes": self.labels.bincount(minlength=experts).tolist(),
            "expert_sizes": self.experts.bincount(minlength=experts).tolist(),
            "router_cross_entropy": self.cross_entropy,
            "router_agreement": float((self.experts == self.labels).float().mean()),
            "experts": self.experts.tolist(),
        }


def route_distributed(adapter: RoutedHyperLoRA, bootstrap: Bootstrap, seed: int = 0) -> Routed:
    """Step K with an FSDP2-sharded (or plain) adapter; collective, every rank passes its own
    bootstrap. Gathers every rank's records, clusters them and pre-trains a `RouterCopy` on rank 0,
    scatters its weights into every rank's shards and sets routing on every rank (the caller then
    rebuilds its optimizer). On one process it gives what `route` gives."""
    if isinstance(adapter, FSDPModule):
        adapter.reshard()  # a forward without backward (an evaluation) leaves the root unsharded
    cfg = adapter.config
    # The prompts (small) go to every rank; the probe features (up to 42 MB a sample at real
    # shapes, see `probe_features`) to rank 0 only, which clusters them.
    prompts = [p for rank_prompts in all_gather_objects(bootstrap.prompts) for p in rank_prompts]
    features = gather_objects_to_rank0(bootstrap.features)
    labels = None
    if rank() == 0:
        labels = cluster_labels([f for rank_features in features for f in rank_features], cfg, seed)
    labels = broadcast_object(labels)
    return _train_router(adapter, prompts, labels, seed, then=set_routing)


@torch.no_grad()
def expert_losses(
    student: nn.Module,
    adapter: RoutedHyperLoRA,
    batch,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    optim,
    device: torch.device,
) -> torch.Tensor:
    """Each sample's top-K KL under each expert: float32 [B, n] on the CPU, nats per scored
    position (0 for a sample with none), by one no-grad forward of the student per expert.

    batch: a `Batch` (``input_ids``, ``attention_mask``, ``prompt_ids``, ``prompt_mask``);
    teacher_ids int64 [B, T-1, K], teacher_logprobs float32 [B, T-1, K], mask bool [B, T-1] as
    `distill_loss` takes them; optim: the `OptimConfig` (loss mode, temperature, chunk). On an
    FSDP2-sharded adapter or student it is collective: every rank calls it as often.
    """
    n, size = adapter.config.experts, batch.input_ids.shape[0]
    prompt_ids, prompt_mask = batch.prompt_ids.to(device), batch.prompt_mask.to(device)
    input_ids, attention = batch.input_ids.to(device), batch.attention_mask.to(device)
    mask = mask.to(device)
    rows = mask.nonzero()[:, 0]
    counts = mask.sum(1).clamp_min(1).float()
    out = torch.zeros(size, n)
    for expert in range(n):
        lora = adapter(prompt_ids, prompt_mask, experts=torch.full((size,), expert, dtype=torch.long, device=device))
        with hyper_lora(student, lora, seq_len=input_ids.shape[1]):
            hidden = student.model(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state
        kl = topk_kl_per_position(
            hidden[:, :-1][mask],
            student.get_output_embeddings(),
            teacher_ids.to(device)[mask],
            teacher_logprobs.to(device)[mask],
            temperature=optim.temperature,
            mode=optim.loss,
            chunk_size=optim.logits_chunk_positions,
        )
        out[:, expert] = (torch.zeros(size, device=kl.device).index_add_(0, rows, kl) / counts).cpu()
    for module in (adapter, student):  # a forward without backward leaves an FSDP2 root unsharded
        if isinstance(module, FSDPModule):
            module.reshard()
    return out


def relabel(adapter: RoutedHyperLoRA, scored: Bootstrap, seed: int = 0) -> Routed | None:
    """Re-routing, once routing is set; collective, every rank passes its own records (``scored``:
    `expert_losses` rows [B, n] and their prompts). Every scored prompt's label is the expert with
    its lowest KL; a fresh encoder and router (`RouterCopy.reinitialise`) train by cross-entropy
    on those labels, on rank 0, and are scattered to every rank (`route_distributed`'s way). Fresh,
    not the switch's: a router that first learnt the clusters' errors keeps some of them. The
    experts are untouched and the optimizer state stays valid (the encoder and router are frozen,
    outside it). None when no rank scored a sample (nothing changes)."""
    if isinstance(adapter, FSDPModule):
        adapter.reshard()
    prompts = [p for rank_prompts in all_gather_objects(scored.prompts) for p in rank_prompts]
    losses = [f for rank_losses in all_gather_objects(scored.features) for f in rank_losses]
    if not prompts:
        log.warning("re-routing: no rank scored a sample; the routing stays as it is")
        return None
    labels = torch.cat(losses).argmin(1)
    return _train_router(adapter, prompts, labels, seed, fresh=True)


def _train_router(
    adapter: RoutedHyperLoRA,
    prompts: list[torch.Tensor],
    labels: torch.Tensor,
    seed: int,
    then=None,
    fresh: bool = False,
) -> Routed:
    """Collective: pre-train a `RouterCopy` of the adapter (``fresh``: re-initialised, seeded by
    ``seed``) on rank 0 to send ``prompts`` to ``labels`` (every rank passes the same), scatter it
    into every rank's shards, run ``then`` (adapter) on every rank, and check that every rank's
    forward now sees rank 0's weights."""
    cfg = adapter.config
    copy = RouterCopy(adapter)
    ce = None
    if rank() == 0:
        if fresh:
            copy.reinitialise(seed)
        ce = pretrain_router(
            copy,
            prompts,
            labels,
            steps=cfg.router_pretrain_steps,
            lr=cfg.router_pretrain_lr,
            batch_size=cfg.router_pretrain_batch,
            seed=seed,
        )
    ce = broadcast_object(ce)
    copy.copy_into(adapter)
    if then is not None:
        then(adapter)
    gathered = RouterCopy(adapter)  # what this rank's forward now sees: its shards all-gathered
    pairs = zip(copy.parameters(), gathered.parameters(), strict=True)
    if rank() == 0 and not all(torch.equal(p, q) for p, q in pairs):
        raise RuntimeError("routing: the sharded encoder / router differ from the trained copy")
    return Routed(labels, ce, gathered.experts(prompts, cfg.router_pretrain_batch), prompts)


def cluster_labels(features: Sequence[torch.Tensor], cfg, seed: int) -> torch.Tensor:
    """`cluster` of the bootstrap's probe gradients (row blocks [N_i, D]) into ``cfg.experts``
    groups (`HyperLoRAConfig`)."""
    n = sum(len(f) for f in features)
    if n < cfg.experts:
        raise ValueError(
            f"routing: {n} bootstrap samples cannot be clustered into {cfg.experts} experts "
            "(raise hypernetwork.route_after_steps or route_bootstrap_samples)"
        )
    return cluster(features, cfg.experts, dims=cfg.cluster_dims, restarts=cfg.cluster_restarts, seed=seed)


class RoutingSchedule:
    """``hypernetwork.kind: routed`` in the distributed `Trainer` (steps counted over the whole run):

    - ``before_step(step)``, before a step's micro-batches: at step K = ``route_after_steps``
      (or the first step after it that finds routing unset) `route_distributed`; True then, and the
      trainer builds a fresh optimizer. At the end of each re-routing window (`relabel_window`;
      or the first step after it), `relabel`. Both are collective. Sets
      ``adapter.probe`` while routing is unset.
    - ``after_backward(batch, teacher_ids, teacher_logprobs, mask)``: before routing,
      `Bootstrap.record` of this rank's samples; in a re-routing window (`relabel_window`: round i
      scores steps K + (i + 1) R + i W .. K + (i + 1)(R + W) - 1), `expert_losses` of this
      micro-batch (collective: every rank runs the same number of micro-batches per step).
    - ``lr_factor(step)``: `rewarm_factor`, on top of the phase's learning rate.
    - ``state_dict()`` / ``load_state_dict()``: this rank's bootstrap and re-routing records and
      the number of re-routing rounds done (lists of tensors and an int: the per-rank train state
      of a checkpoint); routing itself is the adapter's ``routing_set`` buffer and its weights.

    The encoder and router are frozen from the start: the main optimizer never trains them (their
    gates are 1 until routing is set, so they get no gradient; the pre-training trains a copy), and
    their having no optimizer state before and after the switch alike keeps a checkpoint's
    optimizer state loadable into the freshly built optimizer of a resumed run.
    The switch and each re-routing are logged and written to ``<run_dir>/routing_rank<r>.json`` and
    ``<run_dir>/relabel_rank<r>.json`` (`Routed.record`, the latter with its ``round``, overwritten
    by the next round); the last of each is kept in ``events``.
    """

    def __init__(
        self,
        adapter: RoutedHyperLoRA,
        seed: int,
        run_dir: str | Path,
        *,
        student: nn.Module,
        optim,
        device: torch.device,
    ):
        self.adapter, self.seed, self.run_dir = adapter, seed, Path(run_dir)
        self.student, self.optim, self.device = student, optim, device
        self.config = adapter.config
        self.bootstrap, self.scored, self.relabels = Bootstrap(), Bootstrap(), 0
        self.events: dict[str, Routed] = {}
        """``routing`` (the switch) and ``relabel`` (the last re-routing): what they found, in
        this process's run."""
        self.step = 0
        for module in (adapter.encoder, adapter.router):
            module.requires_grad_(False)

    def relabel_window(self) -> range | None:
        """The steps of the next re-routing round's window (it re-routes at its end), or None when
        every round is done or re-routing is off."""
        cfg, done = self.config, self.relabels
        if not cfg.route_relabel_steps or done >= cfg.route_relabel_rounds:
            return None
        start = cfg.route_after_steps + (done + 1) * cfg.route_relabel_after + done * cfg.route_relabel_steps
        return range(start, start + cfg.route_relabel_steps)

    def before_step(self, step: int) -> bool:
        """Collective at the switch and the re-routings. True when routing was set now: the caller
        builds a fresh optimizer."""
        cfg, self.step = self.config, step
        switch = step >= cfg.route_after_steps and not self.adapter.routed
        window = self.relabel_window()
        if switch:
            self.events["routing"] = route_distributed(self.adapter, self.bootstrap, self.seed)
            self.bootstrap = Bootstrap()
            self._publish("routing", self.events["routing"].record(step, cfg.experts))
        elif window is not None and step >= window.stop:
            routed = relabel(self.adapter, self.scored, self.seed + self.relabels)
            self.scored, self.relabels = Bootstrap(), self.relabels + 1
            if routed is not None:
                self.events["relabel"] = routed
                self._publish("relabel", routed.record(step, cfg.experts) | {"round": self.relabels})
        self.adapter.probe = not self.adapter.routed
        return switch

    def after_backward(
        self, batch, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor
    ) -> None:
        """After a micro-batch's backward (``batch``: a `Batch`; the teacher tensors as
        `distill_loss` took them): before routing, record its samples while this rank holds fewer
        than its share of ``route_bootstrap_samples``; in a re-routing window, score them under
        every expert."""
        cfg = self.config
        share = -(-cfg.route_bootstrap_samples // world_size())
        window = self.relabel_window()
        if not self.adapter.routed:
            if len(self.bootstrap) < share:
                self.bootstrap.record(self.adapter, batch.prompt_ids, batch.prompt_mask)
        elif window is not None and self.step in window:
            losses = expert_losses(
                self.student, self.adapter, batch, teacher_ids, teacher_logprobs, mask, self.optim, self.device
            )
            scored = mask.any(1).cpu()  # a sample with no loss position says nothing of its expert
            self.scored.add(losses[scored], batch.prompt_ids[scored], batch.prompt_mask[scored])

    def lr_factor(self, step: int) -> float:
        return rewarm_factor(step, self.config.route_after_steps, self.config.route_rewarm_steps)

    def state_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.bootstrap.features),
            "prompts": list(self.bootstrap.prompts),
            "scored_losses": list(self.scored.features),
            "scored_prompts": list(self.scored.prompts),
            "relabels": self.relabels,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.bootstrap = Bootstrap(list(state.get("features", [])), list(state.get("prompts", [])))
        self.scored = Bootstrap(list(state.get("scored_losses", [])), list(state.get("scored_prompts", [])))
        self.relabels = int(state.get("relabels", 0))

    def _publish(self, event: str, record: dict[str, Any]) -> None:
        me = rank()
        if me == 0:
            log.info(
                "%s after step %d: %d prompts labelled %s, routed to %s, router cross-entropy %.4f",
                "routing set" if event == "routing" else "re-routed",
                record["step"],
                record["prompts"],
                record["cluster_sizes"],
                record["expert_sizes"],
                record["router_cross_entropy"],
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / f"{event}_rank{me}.json").write_text(json.dumps(record) + "\n")
