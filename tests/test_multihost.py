"""Two local JAX processes x 2 CPU devices (jax.distributed, gloo, loopback) vs one process.

The test starts both processes itself (``tests/mesh_worker.py multihost``),
bounds them in time and kills them in a ``finally``. Each process loads only
its own share of the global Poisson sample; the mesh ``(data=2, fsdp=2)``
spans both processes, so the reduction crosses processes and parameters are
sharded across them. The single-process reference runs the same loop here, on
one device.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dpmega import sharding

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mesh_worker  # noqa: E402

NUM_PROCESSES = 2
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def multihost(tmp_path_factory):
  out = tmp_path_factory.mktemp("multihost")
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs, logs = [], []
  try:
    for i in range(NUM_PROCESSES):
      log = open(out / f"process{i}.log", "w+")
      logs.append(log)
      procs.append(subprocess.Popen(
          [sys.executable, os.path.join(HERE, "mesh_worker.py"), "multihost", str(out), "--process_id", str(i),
           "--num_processes", str(NUM_PROCESSES), "--port", str(port)],
          env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  text = []
  for i, log in enumerate(logs):
    log.seek(0)
    text.append(f"--- process {i} (rc={procs[i].returncode}) ---\n" + log.read()[-3000:])
    log.close()
  assert all(p.returncode == 0 for p in procs), "\n".join(text)
  with open(out / "multihost.json") as f:
    info = json.load(f)
  return info, dict(np.load(out / "multihost.npz"))


@pytest.fixture(scope="module")
def single_process():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
  params, _, counts = mesh_worker.train(mesh)
  return {k: np.asarray(v) for k, v in params.items()}, counts


def test_two_processes_train_like_one_process(multihost, single_process):
  info, params = multihost
  ref, ref_counts = single_process
  assert info["process_count"] == NUM_PROCESSES
  assert info["mesh"] == {"data": 2, "fsdp": 2}
  # Each process loaded only its share, and together they covered the global sample exactly.
  assert info["counts"] == ref_counts
  for name in ref:
    assert not np.allclose(ref[name], mesh_worker.init_params()[name])  # it trained
    np.testing.assert_allclose(params[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_params_are_sharded_across_processes(multihost):
  info, _ = multihost
  assert info["fully_addressable"] is False
  assert info["param_specs"]["w1"] == "P(None, 'fsdp')"


def test_mesh_must_cover_every_process(multihost):
  info, _ = multihost
  assert "mesh must use all 4 devices" in info["partial_mesh_error"]


def test_checkpoint_saved_and_restored_from_every_process(multihost):
  info, _ = multihost
  assert info["checkpoint_roundtrip_equal"] is True
  assert info["restored_specs"] == info["param_specs"]
