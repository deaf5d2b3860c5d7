"""Extraction metrics against the real training set X0 (FineXtract Eq. 1, 2), and the histogram of the
similarity matrix the clustering thresholds."""

from __future__ import annotations

#: A-ESR thresholds: loose (0.6) and strict (0.7), as in the paper's Table 1.
ESR_THRESHOLDS = (0.6, 0.7)

#: Decimals of every printed AS / A-ESR (commands, logs, reports): A-ESR is a share of N0 training
#: images, so 3 decimals show it exactly up to N0 = 1000, and AS's sampling spread is ~0.01-0.05.
SCORE_DECIMALS = 3


def format_score(value: float) -> str:
    """An AS or A-ESR value as every command and report prints it: `SCORE_DECIMALS` decimals."""
    return f"{value:.{SCORE_DECIMALS}f}"


def format_scores(metrics: dict) -> str:
    """The scores of a metrics dict (`extraction_metrics`) on one line: "AS 0.524, A-ESR0.6 0.400, ..."."""
    return ", ".join(f"{name} {format_score(metrics[name])}" for name in ("AS", "A-ESR0.6", "A-ESR0.7"))


#: Bin width of `similarity_histogram`: the clustering's threshold step, so every threshold it tries
#: is a bin edge.
HISTOGRAM_STEP = 0.01

# rows of the similarity matrix made at a time by `similarity_histogram`: a 512 x N block and its int64
# bin indices (200 MB at N = 50,000)
_BLOCK = 512


def extraction_metrics(train_descriptors, extracted_descriptors, generated_descriptors=None) -> dict:
    """Average Similarity and Average Extraction Success Rate of extracted images.

    Eq. 1: AS = mean_i max_j sim(X0_i, Xhat_j).  Eq. 2: A-ESR_tau = mean_i 1[max_j sim(X0_i, Xhat_j) > tau],
    with sim the cosine similarity of SSCD descriptors, for tau = 0.6 and 0.7.

    Args:
        train_descriptors: (N0, D) float tensor/ndarray, L2-normalised SSCD descriptors of X0.
        extracted_descriptors: (M, D) float tensor/ndarray, L2-normalised, of the extracted images.
        generated_descriptors: optional (G, D), of every generated image the extracted ones were picked
            from. The same metrics against them are what a perfect pick could reach: an upper bound on
            AS and A-ESR, which tells a generation that never made a training image from a clustering
            that missed one.

    Returns:
        {"AS": float, "A-ESR0.6": float, "A-ESR0.7": float, "best_match": [{"train": i, "extracted": j,
        "similarity": s}] for every training image i (j indexes the extracted images),
        "extracted_best_match": the same per extracted image (its closest training image), for reports};
        with `generated_descriptors` also "generated": {"AS", "A-ESR0.6", "A-ESR0.7", "best_match":
        [{"train": i, "generated": g, "similarity": s}]} (g indexes the rows of `generated_descriptors`).

    Raises:
        ValueError: empty inputs or mismatched descriptor sizes.
    """
    import torch  # heavy: torch; metrics' formatting is used by torch-free report and fleet code

    x0 = _matrix(train_descriptors)
    xhat = _matrix(extracted_descriptors).to(x0.device)
    if x0.shape[1] != xhat.shape[1]:
        raise ValueError(
            f"descriptor sizes differ ({x0.shape[1]} vs {xhat.shape[1]}): embed both with the same SSCD model"
        )
    sim = x0 @ xhat.T
    back, back_index = sim.max(dim=0)
    result = _scores(sim, "extracted")
    result["extracted_best_match"] = [
        {"extracted": j, "train": int(i), "similarity": float(s)}
        for j, (i, s) in enumerate(zip(back_index.tolist(), back.tolist()))
    ]
    if generated_descriptors is not None:
        generated = torch.as_tensor(generated_descriptors).float()
        if generated.ndim != 2 or generated.shape[1] != x0.shape[1] or len(generated) == 0:
            raise ValueError(f"generated descriptors must be (G, {x0.shape[1]}); got {tuple(generated.shape)}")
        result["generated"] = _scores(x0.to(generated.device) @ generated.T, "generated")
    return result


def _matrix(descriptors):
    import torch

    x = torch.as_tensor(descriptors).float()
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"need non-empty (N, D) descriptors; got {tuple(x.shape)}")
    return x


def _scores(sim, name: str) -> dict:
    """AS, A-ESR and each training image's best match of a (train, candidates) similarity matrix."""
    best, index = sim.max(dim=1)
    best, index = best.cpu().double(), index.cpu()
    result = {"AS": float(best.mean())}
    for tau in ESR_THRESHOLDS:
        result[f"A-ESR{tau}"] = float((best > tau).double().mean())
    result["best_match"] = [
        {"train": i, name: int(j), "similarity": float(s)}
        for i, (j, s) in enumerate(zip(index.tolist(), best.tolist()))
    ]
    return result


def similarity_histogram(descriptors, step: float = HISTOGRAM_STEP) -> dict:
    """Histogram of the off-diagonal cosine similarities of L2-normalised descriptors, each pair once.

    Bin k counts the pairs with `float32(k * step) <= S < float32((k + 1) * step)`: the comparisons
    the clustering makes (`S >= float32(k * step)` defines its graph at threshold k * step), so the
    pairs at or above a threshold t = k * step are exactly `sum(counts[k - first:])`. The product is
    made one block of rows at a time on the descriptors' device (no N x N matrix is held).

    Args:
        descriptors: (N, D) float tensor/ndarray, N >= 2, rows L2-normalised (SSCD output).
        step: bin width (default 0.01, the clustering's threshold step).

    Returns:
        {"step": step, "first": k0, "counts": [c_k0, c_k0+1, ...], "pairs": N (N - 1) / 2}: bin
        k0 + i covers [ (k0 + i) step, (k0 + i + 1) step ); bins run from the lowest similarity's bin to
        the highest's (a similarity of exactly 1 falls in the bin starting at 1).

    Raises:
        ValueError: fewer than 2 rows, or step <= 0.
    """
    import torch

    x = torch.as_tensor(descriptors).float()
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need (N, D) descriptors with N >= 2; got {tuple(x.shape)}")
    if not step > 0:
        raise ValueError(f"step={step}: must be > 0")
    # the bin edges float32(k * step), k = -L .. L, covering [-1 - step, 1 + step]
    limit = round(1.0 / step) + 1
    ks = torch.arange(-limit, limit + 1, dtype=torch.float64)
    edges = (ks * step).to(torch.float32).to(x.device)
    counts = torch.zeros(len(edges) + 1, dtype=torch.int64, device=x.device)
    n = len(x)
    for start in range(0, n, _BLOCK):
        rows = x[start : start + _BLOCK]
        sim = rows @ x[start:].T  # columns j >= start: the upper triangle, block by block
        upper = torch.ones_like(sim, dtype=torch.bool).triu(1)  # j > i within the diagonal block
        values = sim[upper]
        # bucketize(right=True): index i with edges[i-1] <= v < edges[i]
        counts += torch.bincount(torch.bucketize(values, edges, right=True), minlength=len(counts))
    counts = counts.cpu()
    nonzero = torch.nonzero(counts).flatten()
    lo, hi = int(nonzero[0]), int(nonzero[-1])
    # bucket i (1 <= i <= len(edges) - 1) is [edges[i-1], edges[i]), i.e. bin k = ks[i - 1]
    first = int(ks[max(lo, 1) - 1])
    return {
        "step": step,
        "first": first,
        "counts": counts[max(lo, 1) : hi + 1].tolist(),
        "pairs": n * (n - 1) // 2,
    }
