"""Runs a collapse study: python run.py --config=configs/blog.py --workdir=runs/blog."""

import research  # noqa: F401  # Sets the CPU XLA flag before JAX starts.  # isort: skip

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from research import config_lib, data, report, results, study, workdir

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Study config file (configs/*.py).")
flags.DEFINE_string("workdir", None, "Directory for results; re-running resumes.")
flags.DEFINE_bool("overwrite", False, "Recompute everything, deleting earlier results.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])
jax.config.config_with_absl()  # Exposes --jax_enable_x64 and other JAX flags.


def unknown_config_field(argv) -> str:
  """The first --config.<field> override that names no field of the config schema."""
  from configs import default

  schema = default.get_config()
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config.") :].split("=", 1)[0]
    node = schema
    for part in path.split("."):
      if not hasattr(node, "keys") or part not in node:
        known = sorted(node.keys()) if hasattr(node, "keys") else []
        return f"unknown config field {path!r} (from {arg!r}); known here: {known}"
      node = node[part]
  return ""


def parse_flags(argv):
  """absl flag parsing, with one-line errors instead of tracebacks for config overrides."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}\nPass --helpshort for the flags.")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(f"error: {unknown_config_field(argv) or e}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config = FLAGS.config  # Loaded lazily: a missing or broken file fails here.
    config.to_dict()
  except (OSError, AttributeError, SyntaxError, ImportError) as e:
    reason = str(e).strip().splitlines()[-1].strip()
    sys.exit(f"error: cannot load --config={FLAGS['config'].config_filename}: {reason}")
  if FLAGS.distributed:
    jax.distributed.initialize()
  try:
    rows = study.run_study(config, FLAGS.workdir, overwrite=FLAGS.overwrite)
    report.write_report(FLAGS.workdir)
  except (config_lib.ConfigError, data.DataError, workdir.WorkdirError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print(
      f"interrupted: finished cells are kept in {FLAGS.workdir}; run the same command to resume",
      file=sys.stderr,
    )
    sys.exit(130)
  print(results.format_table(rows))
  print(f"results in {FLAGS.workdir}: results.csv, results.json, per_seed.npz, report.md")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
