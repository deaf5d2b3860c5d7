"""Extraction metrics against the real training set X0 (FineXtract Eq. 1, 2)."""

from __future__ import annotations

#: A-ESR thresholds: loose (0.6) and strict (0.7), as in the paper's Table 1.
ESR_THRESHOLDS = (0.6, 0.7)


def extraction_metrics(train_descriptors, extracted_descriptors) -> dict:
    """Average Similarity and Average Extraction Success Rate of extracted images.

    Eq. 1: AS = mean_i max_j sim(X0_i, Xhat_j).  Eq. 2: A-ESR_tau = mean_i 1[max_j sim(X0_i, Xhat_j) > tau],
    with sim the cosine similarity of SSCD descriptors, for tau = 0.6 and 0.7.

    Args:
        train_descriptors: (N0, D) float tensor/ndarray, L2-normalised SSCD descriptors of X0.
        extracted_descriptors: (M, D) float tensor/ndarray, L2-normalised, of the extracted images.

    Returns:
        {"AS": float, "A-ESR0.6": float, "A-ESR0.7": float, "best_match": [{"train": i, "extracted": j,
        "similarity": s}] for every training image i (j indexes the extracted images),
        "extracted_best_match": the same per extracted image (its closest training image), for reports}.

    Raises:
        ValueError: empty inputs or mismatched descriptor sizes.
    """
    import torch

    x0 = torch.as_tensor(train_descriptors).float()
    xhat = torch.as_tensor(extracted_descriptors).float().to(x0.device)
    if x0.ndim != 2 or xhat.ndim != 2 or len(x0) == 0 or len(xhat) == 0:
        raise ValueError(f"need non-empty (N, D) descriptors; got {tuple(x0.shape)} and {tuple(xhat.shape)}")
    if x0.shape[1] != xhat.shape[1]:
        raise ValueError(
            f"descriptor sizes differ ({x0.shape[1]} vs {xhat.shape[1]}): embed both with the same SSCD model"
        )
    sim = x0 @ xhat.T
    back, back_index = sim.max(dim=0)
    best, index = sim.max(dim=1)
    best, index = best.cpu().double(), index.cpu()
    result = {"AS": float(best.mean())}
    for tau in ESR_THRESHOLDS:
        result[f"A-ESR{tau}"] = float((best > tau).double().mean())
    result["best_match"] = [
        {"train": i, "extracted": int(j), "similarity": float(s)}
        for i, (j, s) in enumerate(zip(index.tolist(), best.tolist()))
    ]
    result["extracted_best_match"] = [
        {"extracted": j, "train": int(i), "similarity": float(s)}
        for j, (i, s) in enumerate(zip(back_index.tolist(), back.tolist()))
    ]
    return result
