"""The exit statuses of a training process, which cluster/train.sh turns into Slurm actions, and the signals
that mean "checkpoint and stop". Imports nothing heavy: __main__ reads it before anything else."""

import signal

EXIT_BAD_INPUT = 2
"""A bad recipe or input: never requeued (the same command would fail again)."""
EXIT_NONFINITE = 3
"""Stopped on a non-finite loss, with the last good state checkpointed: not requeued."""
EXIT_PREEMPTED = 75
"""EX_TEMPFAIL: checkpointed on a preemption signal, or a store unreachable at the start: requeue and rerun."""
EXIT_LOST_RANKS = 76
"""Lost contact with other ranks (a peer died, a node was lost, the network partitioned, or a collective waited
longer than train.dist_timeout): requeue and rerun; nothing collective (a checkpoint) can run any more."""
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""What Slurm sends before preemption or the time limit (USR1 with --signal=B:USR1@120, then TERM), and Ctrl-C
(SIGINT), which the composer launcher passes on to its ranks as SIGTERM."""
