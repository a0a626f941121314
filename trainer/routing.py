"""The training schedule of ``hypernetwork.kind: routed`` (`RoutedHyperLoRA`), in pure pieces.

    steps 0..K-1  bootstrap: gates 1 (the bank is a static LoRA) + a zero per-sample probe;
                  after each backward, `Bootstrap.record` keeps each sample's probe gradient
                  (`probe_features`) and its prompt
    step K        `cluster` the probe gradients into n balanced groups (the experts),
                  `pretrain_router`: encoder + router learn prompt -> group by cross-entropy,
                  `set_routing`: zero the bank's B, freeze encoder + router, mark routing set
    steps K..     hard routing, one expert per prompt; a fresh optimizer whose learning rate is
                  ramped back over ``route_rewarm_steps`` (`rewarm_factor`)

`route` runs step K. Why probe gradients: dL_b / dP (P an extra rank-r B added to the bank's A)
is the direction in which sample b wants the adapter's update to move; samples of the same
family want the same LoRA_c, so their gradients cluster by family (held-out purity 95-98% on
learn-bench), where the prompts' own encoder features do not (~0.33). See `trainer.hypernetwork`.
Only the learn-bench (tests/learn_bench/run.py) runs this schedule today; the distributed
`Trainer` refuses ``kind: routed``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from hyperdistill.trainer.lora import GeneratedLoRA, LoRAWeights

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


def probe_features(probes: dict[str, torch.Tensor]) -> torch.Tensor:
    """After ``backward``: each sample's probe gradient, flattened over targets, float32 [B, D]."""
    if any(p.grad is None for p in probes.values()):
        raise RuntimeError("probe_features: the probe has no gradient (call it after loss.backward())")
    return torch.cat([p.grad.detach().flatten(1).float() for p in probes.values()], 1).cpu()


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
    features: torch.Tensor, k: int, *, dims: int = 8, restarts: int = 10, iters: int = 50, seed: int = 0
) -> torch.Tensor:
    """Balanced spherical k-means of the rows of ``features`` [N, D] -> labels int64 [N] in [0, k).

    Rows are normalised to unit length (the direction of a gradient matters, not its size),
    centred, reduced by SVD to their top ``dims`` components and normalised again; then
    ``restarts`` runs of spherical k-means (cosine similarity; assignments balanced by
    `sinkhorn_assign`) from random rows as centroids, keeping the run with the largest summed
    cosine to the assigned centroid. Deterministic given ``seed``.
    """
    if features.ndim != 2 or len(features) < k:
        raise ValueError(f"cluster: need a 2-D [N, D] tensor with N >= k = {k}, got {tuple(features.shape)}")
    x = features.double()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
    x = x - x.mean(0)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    f = u[:, :dims] * s[:dims]
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
        self.features.append(probe_features(adapter.last_probe))
        self.prompts += [ids[mask.bool()].cpu() for ids, mask in zip(prompt_ids, prompt_mask, strict=True)]


def route(adapter: RoutedHyperLoRA, bootstrap: Bootstrap, seed: int = 0) -> torch.Tensor:
    """Step K: cluster the bootstrap's probe gradients, pre-train the router on the labels, set
    routing (the caller then rebuilds its optimizer). Returns the cluster labels [N]."""
    cfg = adapter.config
    labels = cluster(
        torch.cat(bootstrap.features), cfg.experts, dims=cfg.cluster_dims, restarts=cfg.cluster_restarts, seed=seed
    )
    ce = pretrain_router(
        adapter,
        bootstrap.prompts,
        labels,
        steps=cfg.router_pretrain_steps,
        lr=cfg.router_pretrain_lr,
        batch_size=cfg.router_pretrain_batch,
        seed=seed,
    )
    set_routing(adapter)
    log.info(
        "routing set: %d prompts clustered into %s, router cross-entropy %.4f",
        len(labels),
        labels.bincount(minlength=cfg.experts).tolist(),
        ce,
    )
    return labels
