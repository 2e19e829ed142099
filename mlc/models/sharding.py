"""What a model file says about tensor parallelism: how each parameter splits over
`tensor_parallel_shards` (`ShardSpec`) and whether a config's sizes allow a shard count
(`check_shards`). Splitting the weights themselves is `mlc.compiler.tensor_parallel`'s job
(the layout is described there)."""

from __future__ import annotations

from dataclasses import dataclass

from mlc.errors import MLCError


@dataclass(frozen=True)
class ShardSpec:
    """Split along `dim`; each of `segments` (sizes along `dim`; None: one) evenly in N."""

    dim: int
    segments: tuple[int, ...] | None = None

    def _segments(self, extent: int) -> tuple[int, ...]:
        segs = self.segments or (extent,)
        if sum(segs) != extent:
            raise ValueError(f"segments {segs} do not add up to the extent {extent}")
        return segs


def check_shards(config, error: type[MLCError] = MLCError) -> None:
    """Raise `error` unless the heads and MLP width of `config` split into its shard count."""
    n = config.tensor_parallel_shards
    if not isinstance(n, int) or n < 1:
        raise error(f"tensor_parallel_shards must be a positive integer, got {n!r}.",
                    param="tensor_parallel_shards")
    if n == 1:
        return
    sizes = {"num_attention_heads": config.num_attention_heads,
             "num_key_value_heads": config.num_key_value_heads,
             "intermediate_size": config.intermediate_size}
    bad = {k: v for k, v in sizes.items() if v % n}
    if bad:
        fits = [d for d in range(2, config.num_key_value_heads + 1)
                if all(v % d == 0 for v in sizes.values())]
        raise error(
            f"tensor_parallel_shards={n} does not divide "
            f"{', '.join(f'{k}={v}' for k, v in bad.items())}: each shard must get a whole "
            f"number of query heads, KV heads and MLP channels. "
            f"{'Use one of ' + str(fits) + ' or 1.' if fits else 'Use 1.'}",
            param="tensor_parallel_shards")
