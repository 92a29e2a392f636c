"""One process of the multi-process test: 4 CPU devices, jax.distributed over 127.0.0.1,
the example decoder layer with tp over all 8 devices of both processes."""

import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_platforms", "cpu")


def main(port: int, pid: int, out: str):
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid, initialization_timeout=120)
    import numpy as np
    from jax.sharding import Mesh

    sys.path.insert(0, sys.argv[4])
    import llama_tp as ex

    assert jax.device_count() == 8 and jax.local_device_count() == 4
    cfg = ex.Config(hidden=256, heads=8, intermediate=512, batch=1, seq=8)
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    p = ex.init_params(jax.random.key(0), cfg)
    step, qs = ex.make_step(mesh, cfg, ex.quantize_params(p, "int8"))
    x = ex.inputs(cfg)
    xs = jax.make_array_from_callback(x.shape, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                                      lambda idx: x.astype(jax.numpy.bfloat16)[idx])
    y = step(qs, xs)
    np.save(out, np.asarray(y.addressable_shards[0].data, np.float32))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
