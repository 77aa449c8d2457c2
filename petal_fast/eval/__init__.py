"""petal_fast.eval: verification (.bin pairs) and identification (gallery/probe) protocols, metrics, plots."""
from .bin_format import RestrictedUnpickler, UnsafePickleError, load_bin, save_bin
from .cli import add_eval_arguments, run_eval
from .metrics import (auc, cmc, kfold_splits, mate_ranks, rank_k, roc_curve, tar_at_far, tpir_at_fpir,
                      verification_accuracy)
from .plots import plot_cmc, plot_roc
from .protocols import (embed_images, identification, identification_from_embeddings, make_pairs, pair_scores,
                        split_gallery_probe, verification, verification_from_embeddings, verification_pairs)
from .report import markdown_table, save_report

__all__ = ["RestrictedUnpickler", "UnsafePickleError", "add_eval_arguments", "auc", "cmc", "embed_images",
           "identification", "identification_from_embeddings", "kfold_splits", "load_bin", "make_pairs",
           "markdown_table", "mate_ranks", "pair_scores", "plot_cmc", "plot_roc", "rank_k", "roc_curve", "run_eval",
           "save_bin", "save_report", "split_gallery_probe", "tar_at_far", "tpir_at_fpir", "verification",
           "verification_accuracy", "verification_from_embeddings", "verification_pairs"]
