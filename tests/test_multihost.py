"""Multi-host training as 2 processes x 2 CPU devices on loopback (jax.distributed,
gloo collectives) equals 1 process x 4 devices, for the Transformer and a
recurrent family (Hawk: RG-LRU state, conv); the Transformer's two processes are
killed mid-run and resumed, so its curve checks the resume too (every loss in it
still comes from two processes: the records past the checkpoint are rewritten by the
resumed pair). Tolerance: the processes' all-reduces go through gloo instead of one
process's in-memory reduction, so sums may round differently: rtol 1e-5 on losses, in float32
compute (in bf16 such a difference can flip an activation's rounding, and 12 steps of a tiny
model's fast-falling loss grew one flip to 1.3e-4 for Hawk)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(workdir, data_dir, config, processes, devices_per_process):
  flags = [f'--config={config}', f'--workdir={workdir}', f'--config.dataset.data_dir={data_dir}',
           f'--config.total_steps={STEPS}', '--config.log_every=1', '--config.checkpoint_every=4',
           '--config.eval_every=1000', '--config.eval_batches=1', '--config.seq_len=32', '--config.batch_size=8',
           '--config.model.dtype=float32']  # bf16 would turn a reduction's rounding into 2^-8 flips that grow
  env = dict(os.environ, JAX_PLATFORMS='cpu',  # the last device count in XLA_FLAGS wins
             XLA_FLAGS=os.environ['XLA_FLAGS'] + f' --xla_force_host_platform_device_count={devices_per_process}')
  if processes > 1:
    port = free_port()
    runs = [flags + ['--distributed', f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}',
                     f'--process_id={i}'] for i in range(processes)]
  else:
    runs = [flags]
  return [subprocess.Popen([sys.executable, '-m', 'experiments.train', *run], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for run in runs]


def finish(processes, timeout=300):
  try:
    for p in processes:
      p.wait(timeout=timeout)
    for p in processes:
      assert p.returncode == 0, p.stderr.read()[-3000:]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)['loss'] for line in f if 'loss' in json.loads(line)]


@pytest.mark.slow  # 3 to 5 training processes each
@pytest.mark.parametrize('config, kill', [('experiments/configs/transformer.py:tiny', True),
                                          ('experiments/configs/hawk.py:tiny', False)])
def test_two_processes_equal_one_and_resume(config, kill, data_dir, tmp_path):
  finish(launch(tmp_path / 'one', data_dir, config, processes=1, devices_per_process=4))
  reference = losses(tmp_path / 'one')
  assert len(reference) == STEPS
  workdir = tmp_path / 'two'
  if kill:  # Kill both processes after step 6 (a checkpoint at 4); the resumed pair must still match.
    processes = launch(workdir, data_dir, config, processes=2, devices_per_process=2)
    deadline = time.monotonic() + 300
    try:
      while len(losses(workdir) if (workdir / 'metrics.jsonl').exists() else []) < 6:
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes), 'run ended before step 6'
        time.sleep(0.01)
    finally:
      for p in processes:
        p.send_signal(signal.SIGKILL)
        p.wait()
  finish(launch(workdir, data_dir, config, processes=2, devices_per_process=2))
  assert losses(workdir) == pytest.approx(reference, rel=1e-5)
  assert not (workdir / 'eval.json').exists()
