"""The demo's evaluation of one model, as the field reports low-resolution face recognition.

- ``hr_ver``: high-resolution verification of unseen identities (10-fold accuracy; retention: what
  adaptation must not forget), and its TAR@FAR = 1e-2;
- ``xq_rank1`` / ``xq_rank5``: cross-quality 1:N identification, TinyFace style: one higher-quality
  gallery image per identity plus higher-quality distractors, low-quality probes;
- ``mixed_ver``: verification on pairs of a mixed-quality set (each image high or low quality);
- ``alpha_bins``: rank-1 against the same gallery of all probes (low-quality and mixed-quality) by
  their α bin, where α is the demo's reference mapping of each probe's BRISQUE score (the same
  bins for every method).
"""
from __future__ import annotations

import numpy as np
import torch

from petal_fast.eval import embed_images, identification_from_embeddings, make_pairs, verification_from_embeddings
from petal_fast.eval.metrics import mate_ranks

from .data import EvalSets

ALPHA_BINS = np.linspace(0.0, 1.0, 6)  # five bins of width 0.2


def alpha_bin_index(alpha: np.ndarray) -> np.ndarray:
    """Bin of each α in ``ALPHA_BINS`` (α = 1 joins the last bin)."""
    return np.clip(np.digitize(alpha, ALPHA_BINS[1:-1]), 0, len(ALPHA_BINS) - 2)


class Evaluator:
    """Fixed evaluation sets, pairs and probe α bins; ``__call__(model)`` → the metrics of one model."""

    def __init__(self, sets: EvalSets, probe_alpha: np.ndarray, pairs: int, seed: int, image_size: int,
                 device: torch.device):
        self.sets, self.size, self.device = sets, image_size, device
        self.hr_pairs = make_pairs(sets.hr_labels, pairs, seed=seed)
        self.mixed_pairs = make_pairs(sets.mixed_labels, pairs, seed=seed + 1)
        self.probe_bins = alpha_bin_index(probe_alpha)
        self.bin_counts = np.bincount(self.probe_bins, minlength=len(ALPHA_BINS) - 1)

    @torch.inference_mode()
    def __call__(self, model) -> dict:
        from petal_fast.train import prepare_images
        model.eval()

        def embed_fn(x01: torch.Tensor) -> torch.Tensor:
            return model.embedding(prepare_images(x01.clone(), self.size, self.device)).float().cpu()

        s = self.sets
        e_hr, e_gal, e_lq, e_mix = (embed_images(embed_fn, x) for x in (s.hr, s.gallery, s.lq_probes, s.mixed))
        hr = _verification(e_hr, s.hr_labels, self.hr_pairs)
        mixed = _verification(e_mix, s.mixed_labels, self.mixed_pairs)
        xq = identification_from_embeddings(e_lq, s.lq_labels, e_gal, s.gallery_labels, ranks=(1, 5))
        probes = np.concatenate([e_lq, e_mix[s.mixed_probe]])  # the order of EvalSets.alpha_probes
        labels = s.alpha_probes()[1]
        ranks, _ = mate_ranks(probes.astype(np.float64) @ e_gal.T.astype(np.float64), labels, s.gallery_labels)
        hit = ranks == 1
        bins = [float(hit[self.probe_bins == b].mean()) if self.bin_counts[b] else float("nan")
                for b in range(len(self.bin_counts))]
        return {"hr_ver": hr["accuracy"], "hr_tar": hr["tar_at_far"]["0.01"]["tar"] or 0.0,
                "xq_rank1": xq["rank"]["1"], "xq_rank5": xq["rank"]["5"], "mixed_ver": mixed["accuracy"],
                "alpha_bins": bins, "bin_counts": self.bin_counts.tolist(), "xq_cmc": xq["cmc"]}


def _verification(emb: np.ndarray, labels: np.ndarray, pairs: np.ndarray) -> dict:
    issame = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    return verification_from_embeddings(emb[pairs.reshape(-1)], issame)
