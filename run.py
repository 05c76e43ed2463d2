"""Runs a collapse study: python run.py --config=configs/blog.py --workdir=runs/blog."""

import research  # noqa: F401  # Sets the CPU XLA flag before JAX starts.  # isort: skip

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from research import config_lib, data, report, study

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Study config file (configs/*.py).")
flags.DEFINE_string("workdir", None, "Directory for results; re-running resumes.")
flags.DEFINE_bool("overwrite", False, "Recompute everything, deleting earlier results.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])
jax.config.config_with_absl()  # Exposes --jax_enable_x64 and other JAX flags.


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.distributed:
    jax.distributed.initialize()
  try:
    rows = study.run_study(FLAGS.config, FLAGS.workdir, overwrite=FLAGS.overwrite)
    report.write_report(FLAGS.workdir)
  except (config_lib.ConfigError, data.DataError, study.StudyError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print(
      f"interrupted: finished cells are kept in {FLAGS.workdir}; run the same command to resume",
      file=sys.stderr,
    )
    sys.exit(130)
  print(study.format_table(rows))
  print(f"results in {FLAGS.workdir}: results.csv, results.json, per_seed.npz, report.md")


if __name__ == "__main__":
  app.run(main)
