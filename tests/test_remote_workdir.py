"""A workdir on an object store (--workdir=gs://bucket/run, the README's multi-host example), tested on a
fake gs:// without network (tests/fake_gcs.py): every file goes through etils.epath, as orbax's do."""
import json

import pytest

from tests.fake_gcs import fake_gcs
from tests.helpers import tiny_experiment
from trainers.checkpoints import read_checkpoint
from trainers.experiment import Experiment
from trainers.run_config import config_for
from trainers.training.evaluator import evaluate_checkpoint, write_results
from trainers.training.train_loop import train


@pytest.mark.fault('--workdir=gs://bucket/run (the multi-host example; a fake gs:// here, no network)',
                   'train, a resumed train, evaluate and sample write and read it through etils.epath: config, '
                   'metrics, checkpoints and evaluations land in the bucket, the lock is released, nothing is '
                   'written to a local folder named gs:')
def test_gs_workdir_trains_resumes_evaluates_and_samples(tmp_path, data_dir, monkeypatch):
  monkeypatch.chdir(tmp_path)  # where os.path.abspath('gs://bucket/run') would put a folder `gs:`
  bucket, workdir = tmp_path / 'gcs', 'gs://bucket/run'
  (bucket / 'bucket').mkdir(parents=True)
  config = tiny_experiment(data_dir, total_steps=6, log_every=1, checkpoint_every=3, eval_every=1000)
  with fake_gcs(bucket):
    train(config, workdir, stop_at=4)
    train(config, workdir)
    write_results(workdir, evaluate_checkpoint(config, workdir, num_batches=1))
    recorded = config_for(workdir, None, check_dataset=False)  # what sample does, then it reads the checkpoint
    exp = Experiment.build(recorded)
    with exp.activate():
      step, _, _ = read_checkpoint(workdir, exp.restore_target())
  run = bucket / 'bucket' / 'run'
  assert step == 6 and not (tmp_path / 'gs:').exists()
  assert sorted(p.name for p in run.iterdir()) == ['checkpoints', 'config.json', 'eval.json', 'eval_6.json',
                                                   'metrics.jsonl']
  assert [json.loads(line)['step'] for line in (run / 'metrics.jsonl').read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
  assert sorted(p.name for p in (run / 'checkpoints').iterdir() if p.name.isdigit()) == ['3', '4', '6']
  assert json.loads((run / 'eval.json').read_text())['step'] == 6
