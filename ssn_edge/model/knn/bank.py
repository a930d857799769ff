"""The memory bank: a coreset of normal patch features, and each query patch's distances to its nearest members."""

from __future__ import annotations

import torch
from torch import Tensor

# Eager queries go through the bank in blocks of rows, so the (rows, bank) distance block stays under this many
# floats (64 Mi = 256 MB) whatever the batch and bank size; the exported graph is one MatMul (runtime batch 1).
BLOCK_FLOATS = 1 << 26


def nearest_sq_distances(queries: Tensor, bank_t_neg2: Tensor, bank_sq: Tensor, k: int = 1) -> Tensor:
    """The k smallest |q - b|^2, nearest first, for each row of queries (..., C) -> (..., k).

    bank_t_neg2 is -2 * bank.T (C, N) and bank_sq |b|^2 (N,), both precomputed. The nearest rows come from one
    MatMul, the k smallest |b|^2 - 2 q.b (|q|^2 is the same for every row); their distances are then computed
    directly, |q - b|^2, from those rows gathered back out of the same constant: the expansion loses float32 digits
    to cancellation, and the square root magnifies the loss near zero, where normal patches lie."""
    if queries.dim() == 2:  # eager blocks: one fused multiply-add, one (rows, N) buffer
        scores = torch.addmm(bank_sq, queries, bank_t_neg2)
    else:  # the traced graph: MatMul, Add, TopK
        scores = torch.matmul(queries, bank_t_neg2) + bank_sq
    nearest = torch.topk(scores, k, dim=-1, largest=False, sorted=True).indices  # (..., k)
    rows = torch.index_select(bank_t_neg2, 1, nearest.reshape(-1)).T * -0.5  # exact: x 2^-1
    diff = queries.unsqueeze(-2) - rows.reshape(*nearest.shape, queries.shape[-1])
    return (diff * diff).sum(-1)


def nearest_sq_distances_blocked(queries: Tensor, bank_t_neg2: Tensor, bank_sq: Tensor, k: int = 1) -> Tensor:
    """nearest_sq_distances of queries (Q, C) -> (Q, k), in row blocks (memory bounded by BLOCK_FLOATS)."""
    rows = max(1, BLOCK_FLOATS // max(1, bank_sq.numel()))
    return torch.cat([nearest_sq_distances(queries[s : s + rows], bank_t_neg2, bank_sq, k)
                      for s in range(0, len(queries), rows)]) if len(queries) else queries.new_zeros(0, k)


def centred_constants(bank: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean (C,), -2 * centred bank.T (C, N), |centred b|^2 (N,)): what nearest_sq_distances takes. Queries and bank
    are moved by the bank's mean first: the same distances, but |b|^2 - 2 q.b loses float32 digits to cancellation
    in proportion to the norms, and ReLU features share a large mean."""
    bank = bank.float()
    mean = bank.mean(0) if len(bank) else torch.zeros(bank.shape[1])
    centred = bank - mean
    return mean, (-2.0 * centred.T).contiguous(), (centred * centred).sum(1)


def random_projection(channels: int, dims: int, seed: int) -> Tensor:
    """(channels, dims) Gaussian matrix scaled by 1/sqrt(dims): distances are kept in expectation
    (Johnson-Lindenstrauss), which is all the greedy selection needs of them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(channels, dims, generator=g) / dims**0.5


def greedy_coreset(points: Tensor, k: int, seed: int, progress: bool = False) -> Tensor:
    """Indices of k rows of points (P, d) chosen by greedy k-center selection (PatchCore 3.2, Sener & Savarese):
    from a random first row, repeatedly take the row farthest from every row taken so far. Each step is one
    matrix-vector product over the rows: O(P x k x d) time, O(P) memory beyond the points. Deterministic for a seed.
    """
    n = len(points)
    if not 1 <= k <= n:
        raise ValueError(f"coreset of {k} rows from {n}: needs 1 <= k <= {n}")
    points_t = points.float().T.contiguous()  # (d, P): the step's product streams contiguous memory (3x faster)
    sq = (points_t * points_t).sum(0)
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    farthest = torch.full((n,), float("inf"))
    steps = range(1, k)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="greedy coreset", unit="patch", mininterval=1.0)
    for i in steps:
        last = chosen[i - 1]
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2 for every row x against the centre taken last
        d = torch.matmul(points_t[:, last], points_t).mul_(-2.0).add_(sq).add_(sq[last])
        torch.minimum(farthest, d, out=farthest)
        chosen[i] = torch.argmax(farthest)
    return chosen


def random_subset(n: int, k: int, seed: int) -> Tensor:
    """k of n indices, uniformly without replacement (the random-bank baseline)."""
    if not 1 <= k <= n:
        raise ValueError(f"bank of {k} rows from {n}: needs 1 <= k <= {n}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
