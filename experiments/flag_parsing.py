"""`run`: absl's app.run for the binaries, with a flag parser that reports an override of an unknown
config field (`--config.model.foo=1`) in one line instead of ml_collections' chained traceback, and the
preamble every binary shares."""
import re
import sys
from collections.abc import Callable

from absl import app, flags

from trainers.config_validation import unknown_field
from trainers.logs import quiet_library_logs


def _unknown_override(argv: list[str]) -> str | None:
  """The first `--config.<field>` of argv that the `--config` file does not define, as a message."""
  config_file = next((argv[i + 1] if arg in ('--config', '-config') and i + 1 < len(argv) else arg.split('=', 1)[1]
                      for i, arg in enumerate(argv) if re.match(r'^--?config(=|$)', arg)), None)
  if config_file is None:
    return None
  config = flags.FLAGS['config'].parser.parse(config_file)
  for arg in argv:
    if match := re.match(r'^--?config\.([\w.]+)(=|$)', arg):
      if problem := unknown_field(config, match.group(1)):
        return problem
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser; an override of a field the config lacks (ml_collections raises AttributeError or KeyError
  from deep inside, a 55-line chained traceback) exits with one line naming the field and the known ones."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    problem = _unknown_override(argv)
    if problem is None:
      raise
    sys.stderr.write(f'FATAL Flags parsing error: {problem}\n')
    sys.exit(1)


def run(main: Callable[[], None]) -> None:
  """app.run with `parse_flags`, then the preamble every binary shares (no stray positional arguments,
  library logs quieted), then main()."""
  def with_preamble(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    quiet_library_logs()
    main()

  app.run(with_preamble, flags_parser=parse_flags)
