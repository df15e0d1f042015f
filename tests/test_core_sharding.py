"""Fusion on arrays sharded over 8 CPU devices: same shardings, same values as one device, no gathers."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kif_jax


def test_bisect_fuse_on_a_mesh_matches_one_device():
    assert jax.device_count() >= 8
    mesh = jax.make_mesh((4, 2), ("data", "model"), devices=jax.devices()[:8])
    specs = {"lora_a": P("data", "model"), "lora_b": P(None, "data"), "bias": P()}
    shapes = {"lora_a": (16, 8), "lora_b": (6, 12), "bias": (5,)}
    rng = np.random.default_rng(6)

    def tree(dist):
        return {k: jnp.asarray(dist(s), jnp.float32) for k, s in shapes.items()}

    host = [tree(rng.standard_normal) for _ in range(3)] + [tree(rng.random) for _ in range(2)]
    put = lambda t: {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in t.items()}  # noqa: E731
    sharded = [put(t) for t in host]

    fuse = jax.jit(lambda *a: kif_jax.fuse(*a, quantile=0.8, method="bisect"))
    out = fuse(*sharded)
    ref = jax.jit(lambda *a: kif_jax.fuse(*a, quantile=0.8, method="exact"))(
        *[jax.device_put(t, jax.devices()[0]) for t in host])
    for k in shapes:
        assert out[k].sharding.is_equivalent_to(sharded[0][k].sharding, len(shapes[k]))
        assert out[k].sharding.mesh.shape == mesh.shape
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(ref[k]))
    # The counting search reduces across devices (all-reduce) but never gathers the scores.
    hlo = fuse.lower(*sharded).compile().as_text()
    assert "all-reduce" in hlo and "all-gather" not in hlo and "all-to-all" not in hlo
