"""The fused ops, one package each: :mod:`.petal_linear`, :mod:`.margin_loss`, :mod:`.brisque`
(operators in ``torch.library``, backend tables, torch compositions). No ``nn.Module`` here.
:mod:`._graph` and :mod:`._eager` hold what the three share (tracing, eager routes)."""
from petal_fast.definitions.dropout import dropout_mask

__all__ = ["dropout_mask"]
