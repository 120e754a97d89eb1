"""NSO under data parallelism on 8 simulated devices equals one device."""

from workers import run_worker


def test_nso_step_on_eight_devices_matches_one_device():
  report = run_worker("multidevice_worker.py")
  assert report["num_devices"] == 8
  assert report["sharded_batch_devices"] == 8
  # Training moved the parameters; both multi-device versions (jit with a
  # sharded batch, and shard_map with pmean) follow the single-device
  # trajectory up to float32 reduction order.
  assert report["moved"] > 0.1
  assert report["sharded_vs_single"] < 1e-5
  assert report["shard_map_vs_single"] < 1e-5
  # Parameters sharded over the devices follow the same trajectory, and their
  # noise is drawn shard by shard: no collective, the same values.
  assert report["param_sharded_devices"] == 8
  assert report["param_sharded_vs_single"] < 1e-5
  assert report["noise_collectives"] == {
    "normal": [],
    "normal_fast": [],
    "rademacher": [],
  }
  assert report["noise_sharded_vs_single"] == 0.0
