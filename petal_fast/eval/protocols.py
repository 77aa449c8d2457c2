"""Evaluation protocols over any embedding function.

``embed_fn`` maps a float tensor (B, 3, H, W) in [0, 1] to embeddings (B, D). With ``flip=True`` the
embedding of an image is ``embed(x) + embed(mirror(x))`` (insightface's flip test), and every
embedding is L2-normalised before scoring.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..data.loader import to_tensor
from .metrics import (auc, cmc, mate_ranks, rank_k, roc_curve, tar_at_far, tpir_at_fpir,
                      verification_accuracy)

EmbedFn = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def embed_images(embed_fn: EmbedFn, images, batch_size: int = 64, flip: bool = True, transform=None,
                 device: str | torch.device | None = None, progress: bool = False) -> np.ndarray:
    """L2-normalised embeddings (N, D) float32 of an (N, H, W, 3) uint8 stack or a sequence of images.

    ``transform`` (e.g. a fixed :class:`~petal_fast.data.Degrade`) is applied to each uint8 image
    before it becomes a tensor.
    """
    n = len(images)
    if n == 0:
        raise ValueError("embed_images got no images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, n, batch_size)
    if progress:
        from petal_fast.progress import progress
        starts = progress(starts, desc="embedding", unit="batch")
    out = []
    for s in starts:
        chunk = [images[i] for i in range(s, min(s + batch_size, n))]
        if transform is not None:
            chunk = [transform(im) for im in chunk]
        x = to_tensor(chunk)
        if device is not None:
            x = x.to(device)
        e = embed_fn(x)
        if flip:
            e = e + embed_fn(torch.flip(x, dims=[3]))
        if e.dim() != 2 or e.shape[0] != x.shape[0]:
            raise ValueError(f"embed_fn must return (B, D) embeddings, got shape {tuple(e.shape)} for B = {x.shape[0]}")
        out.append(torch.nn.functional.normalize(e.float(), dim=1).cpu().numpy())
    return np.concatenate(out)


def pair_scores(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity and squared L2 distance of consecutive pairs (2p, 2p+1) of unit embeddings."""
    e1, e2 = embeddings[0::2], embeddings[1::2]
    cos = np.sum(e1 * e2, axis=1).astype(np.float64)
    dist = np.sum((e1 - e2) ** 2, axis=1).astype(np.float64)
    return cos, dist


def verification_from_embeddings(embeddings: np.ndarray, issame, fars=(1e-4, 1e-3, 1e-2, 1e-1), n_folds: int = 10) -> dict:
    """Verification metrics from unit embeddings of 2P images laid out pair by pair."""
    issame = np.asarray(issame, bool)
    if len(embeddings) != 2 * len(issame):
        raise ValueError(f"{len(issame)} pairs need {2 * len(issame)} embeddings, got {len(embeddings)}")
    cos, dist = pair_scores(embeddings)
    kf = verification_accuracy(dist, issame, n_folds=n_folds)
    fpr, tpr, thr = roc_curve(cos, issame)
    return {"accuracy": kf["accuracy"], "accuracy_std": kf["accuracy_std"], "best_threshold": kf["best_threshold"],
            "fold_accuracy": kf["fold_accuracy"], "auc": auc(fpr, tpr),
            "tar_at_far": {str(k): v for k, v in tar_at_far(cos, issame, fars).items()},
            "num_pairs": int(len(issame)), "num_genuine": int(issame.sum()),
            "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}


def verification(embed_fn: EmbedFn, images, issame, batch_size: int = 64, flip: bool = True, transform=None,
                 device=None, fars=(1e-4, 1e-3, 1e-2, 1e-1), n_folds: int = 10, progress: bool = False) -> dict:
    """Pair verification (LFW-style ``.bin`` layout: images 2p and 2p+1 form pair p).

    Returns 10-fold accuracy (insightface protocol), AUC, TAR@FAR and the ROC curve.
    """
    emb = embed_images(embed_fn, images, batch_size, flip, transform, device, progress)
    return verification_from_embeddings(emb, issame, fars, n_folds)


def identification_from_embeddings(probe, probe_labels, gallery, gallery_labels, ranks=(1, 5, 20),
                                   fpirs=(1e-3, 1e-2, 1e-1), max_rank: int = 50) -> dict:
    """Closed-set rank-k / CMC over mated probes; open-set TPIR@FPIR when some probes are non-mated."""
    S = np.asarray(probe, np.float64) @ np.asarray(gallery, np.float64).T
    r, _ = mate_ranks(S, probe_labels, gallery_labels)
    curve = cmc(r, max_rank=min(max_rank, S.shape[1]))
    out = {"rank": {str(k): v for k, v in rank_k(r, ranks).items()}, "cmc": curve.tolist(),
           "num_probes": int(len(r)), "num_mated_probes": int((r > 0).sum()), "num_gallery": int(S.shape[1])}
    if (r == 0).any():
        out["tpir_at_fpir"] = {str(k): v for k, v in tpir_at_fpir(S, probe_labels, gallery_labels, fpirs).items()}
    return out


def identification(embed_fn: EmbedFn, probe_images, probe_labels, gallery_images, gallery_labels,
                   distractor_images=None, batch_size: int = 64, flip: bool = True, transform=None, device=None,
                   ranks=(1, 5, 20), fpirs=(1e-3, 1e-2, 1e-1), max_rank: int = 50, progress: bool = False) -> dict:
    """TinyFace-style 1:N identification: probes against gallery mates plus distractors.

    Distractors join the gallery with label −1 (they match no probe). Probes whose identity is not in
    the gallery make the evaluation open-set and add TPIR@FPIR (IJB-S style).
    """
    kw = dict(batch_size=batch_size, flip=flip, transform=transform, device=device, progress=progress)
    probe = embed_images(embed_fn, probe_images, **kw)
    gallery = embed_images(embed_fn, gallery_images, **kw)
    g_labels = np.asarray(gallery_labels)
    if distractor_images is not None and len(distractor_images):
        gallery = np.concatenate([gallery, embed_images(embed_fn, distractor_images, **kw)])
        g_labels = np.concatenate([g_labels, np.full(len(distractor_images), -1, dtype=g_labels.dtype)])
        if (np.asarray(probe_labels) == -1).any():
            raise ValueError("probe label -1 is reserved for distractors")
    out = identification_from_embeddings(probe, probe_labels, gallery, g_labels, ranks, fpirs, max_rank)
    out["num_distractors"] = 0 if distractor_images is None else int(len(distractor_images))
    return out


def make_pairs(labels, num_pairs: int, seed: int = 0) -> np.ndarray:
    """Balanced verification pairs (P, 2) of indices from a labelled set: P/2 genuine, P/2 impostor,
    deterministic by seed. Returns the index pairs; ``issame`` is ``labels[a] == labels[b]``."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    by = {c: np.nonzero(y == c)[0] for c in np.unique(y)}
    multi = [c for c, v in by.items() if len(v) >= 2]
    if not multi or len(by) < 2:
        raise ValueError("make_pairs needs an identity with two images and at least two identities")
    pairs = []
    for j in range(num_pairs):
        if j % 2 == 0:
            a, b = rng.choice(by[multi[rng.integers(len(multi))]], 2, replace=False)
        else:
            c1, c2 = rng.choice(list(by), 2, replace=False)
            a, b = rng.choice(by[c1]), rng.choice(by[c2])
        pairs.append((int(a), int(b)))
    return np.array(pairs, dtype=np.int64)


def verification_pairs(dataset, num_pairs: int, seed: int = 0, transform=None) -> tuple[np.ndarray, np.ndarray]:
    """Sample balanced pairs from a labelled face data set → (images (2P, H, W, 3) uint8, issame (P,)),
    laid out like a ``.bin`` (``save_bin`` writes them as one). ``transform`` (e.g. a fixed
    :class:`~petal_fast.data.Degrade`) is applied to every image."""
    labels = np.asarray(dataset.labels) if hasattr(dataset, "labels") else np.array([dataset[i][1] for i in range(len(dataset))])
    pairs = make_pairs(labels, num_pairs, seed)
    images = [dataset[int(i)][0] for i in pairs.reshape(-1)]
    if transform is not None:
        images = [transform(im) for im in images]
    return np.stack(images), labels[pairs[:, 0]] == labels[pairs[:, 1]]


def split_gallery_probe(labels, gallery_per_identity: int = 1, open_set_fraction: float = 0.0, seed: int = 0):
    """Split a labelled set TinyFace-style: per identity the first ``gallery_per_identity`` images
    (after a seeded shuffle) go to the gallery, the rest are probes. With ``open_set_fraction`` > 0
    that fraction of identities keeps no gallery image (their probes are non-mated).
    Returns (gallery_indices, probe_indices)."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    ids = np.unique(y)
    unknown = set(rng.choice(ids, int(round(open_set_fraction * len(ids))), replace=False).tolist())
    gallery, probe = [], []
    for c in ids:
        idx = rng.permutation(np.nonzero(y == c)[0])
        k = 0 if c in unknown else gallery_per_identity
        if c not in unknown and len(idx) <= k:
            raise ValueError(f"identity {c} has {len(idx)} images; needs more than gallery_per_identity = {k}")
        gallery.extend(idx[:k].tolist())
        probe.extend(idx[k:].tolist())
    return np.array(gallery, np.int64), np.array(probe, np.int64)
