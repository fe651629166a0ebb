"""One rank of the streamed-export test, under torchrun with 2 ranks on a 1x2 mesh.

Hidden units split across the model axis (encoder rows: Shard(0); the untied decoder's
columns: Shard(1)); ``export_weights`` streams the blocks to rank 0, which writes. Rank 0
compares the files with the single-process model of the same seed, for one file and for a
sharded set (a small ``shard_parameters``), and with pieces smaller than one rank's block.
Prints ``rank R: export ok``.
"""

import sys
from pathlib import Path

import torch

from terabrain.nn.autoencoder import Autoencoder
from terabrain.parallel import (
    build_mesh,
    detect_launch_env,
    init_distributed,
    shutdown_distributed,
)
from terabrain.parallel.parallelism import Parallelism
from terabrain.train import export

out = Path(sys.argv[1])
env = detect_launch_env()
init_distributed(env, "gloo")
mesh = build_mesh(1, 2, env)
parallel = Parallelism(mesh)
export.PIECE_BYTES = 3 * 40 * 4  # three rows of the encoder per piece: several per block
for tied in (True, False):
    reference = Autoencoder(40, 8, tied=tied, seed=3)
    expected = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    sharded = parallel.parallelize(Autoencoder(40, 8, tied=tied, seed=3))
    for limit in (10**9, 100):
        directory = out / f"tied{tied}-limit{limit}"
        written = export.export_weights(sharded, directory, shard_parameters=limit)
        if env.rank == 0:
            loaded = export.load_exported(directory)
            assert loaded.keys() == expected.keys(), (loaded.keys(), expected.keys())
            for name, value in expected.items():
                assert torch.equal(loaded[name], value), name
            assert (len(written) > 2) == (limit == 100), written
print(f"rank {env.rank}: export ok", flush=True)
shutdown_distributed()
