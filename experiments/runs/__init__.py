"""What the training experiments share, one module per concern.

- `spec`: a run as a configs/cifar.py variant (`RunSpec`, one resnet_jax.main command) and
  the flags every experiment has;
- `records`: a run's record (done.json beside config.json and metrics.jsonl) and run-or-skip;
- `launch`: training an experiment's runs, in this process or K at once (`train_all`), with
  `supervise` (child processes, signals, deadlines), `gpu_share` (memory, compilation cache,
  CUDA MPS) and `planner` (whole runs only, within a budget, from calibration.json);
- `results`: records to rows, noise and comparisons, and the Markdown the tables share;
- `machine`: the card and versions a run ran on.

The names most experiments use are re-exported here (`runs.make_run`, `runs.result_row`, ...).
"""

from .launch import Outcome, exit_if_left, sharing, train_all, train_in
from .machine import card
from .planner import Calibration
from .records import (DONE_FIELDS, existing, finish, last_evaluation, read_json, run_or_skip, write_json)
from .results import (binomial_se, cards, check_experiment, command_line, commands_section, compare, curves,
                      figure_runs, final_train_error, mean_std, pct, result_row, save_results, training_summary)
from .spec import (CONFIG_FILE, MAIN, RunSpec, cifar_block, define_flags, make_run, parse_concurrent, parse_data,
                   parse_depths, parse_records)


def machine_line(in_process: bool = True) -> str:
    """One line on this machine: from this process (starting its JAX backend) or, for a
    process that must keep off the accelerator while its children train, from a child."""
    from .machine import describe, line, probe

    return line(describe() if in_process else probe())
