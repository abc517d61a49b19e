"""Data pipeline: `mlctl prepare` (readers, cleaning, anchor mining, shard writing) and the streaming
loader with exact resume (:class:`mlctl.data.dataset.ShardLoader`)."""
