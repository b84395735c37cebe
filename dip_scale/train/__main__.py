"""Train DiP with Composer.

    python -m dip_scale.train recipes/dip_tiny_cpu.yaml                       # one process (CPU or 1 GPU)
    composer -n 8 -m dip_scale.train recipes/dip_xl_256.yaml                  # one node, 8 GPUs
    composer -n 8 -m dip_scale.train recipes/dip_xl_256.yaml train.global_batch_size=512 run_name=xl-b512
    sbatch cluster/train.sh recipes/dip_xl_256.yaml                           # N nodes (see cluster/)
    python -m dip_scale.train recipes/dip_xl_256.yaml --dry-run               # print the resolved config

To resume, run the same command again: the newest intact checkpoint of the run (local, or in the S3
save folder) is found and training continues from it. Exit status: 0 done, 2 bad recipe or input,
3 stopped on a non-finite loss, 75 preempted after a checkpoint, or a store unreachable at the start
(requeue and rerun), 76 lost contact with other ranks (a collective failed or waited longer than
train.dist_timeout: another rank died, a node was lost, the network partitioned; requeue and rerun).
"""

# A preemption can come at any moment of a start: before the heavy imports below, SIGTERM and SIGUSR1 already
# mean "exit 75, try again later" (a requeue), not the default death by signal (143 / 138), which a job
# script cannot tell from a crash. PreemptionCheckpoint takes over once training runs.
import os
import signal
import sys

from dip_scale.train.exits import EXIT_BAD_INPUT, EXIT_LOST_RANKS, EXIT_PREEMPTED, SIGNALS


def exit_now(code: int) -> None:
    """Flush and leave without the interpreter's exit: a download or data thread may still wait on a stalled
    store, and finalising around it waits for its timeouts or aborts (SIGABRT) instead of returning `code`.
    Only once nothing is left to save (checkpoints land under a temporary name first)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _leave(signum, frame):
    for sig in SIGNALS:  # on the way out: a second signal must not turn 75 into 143
        signal.signal(sig, signal.SIG_IGN)
    print(f"received {signal.Signals(signum).name} before training started: exiting with {EXIT_PREEMPTED}",
          file=sys.stderr, flush=True)
    exit_now(EXIT_PREEMPTED)  # the start may be inside a stalled download


def exit_on_signal() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _leave)


exit_on_signal()

import argparse  # noqa: E402  (after the handler: see above)
import logging  # noqa: E402
import warnings  # noqa: E402

from dip_scale.recipe import ConfigError, check_world_size, load_recipe, model_config, to_yaml  # noqa: E402


def die_with_launcher() -> None:
    """A rank started by a launcher (composer, torchrun: they set LOCAL_RANK) is killed when the launcher dies,
    instead of training on unnoticed as an orphan: its peers then see the connection close and stop too."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


# What gloo's TCP transport says when a peer is gone or silent (its messages, as torch 2.6-2.11 build it): the
# peer closed or reset the connection, a socket read or write failed, an operation passed the timeout, or an
# operation was cut off because another one on the same connection had timed out.
GLOO_LOST_CONTACT = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "Broken pipe",
                     "Application timeout caused pair closure", "Socket closed", "Read error", "Write error")


def lost_other_ranks(err: BaseException) -> bool:
    """Whether `err` says that a collective failed because other ranks are gone or unreachable (a rank died, a
    node was lost, the network partitioned, or the wait passed train.dist_timeout), not a fault of this rank."""
    import torch.distributed as torch_dist

    seen, todo = set(), [err]
    while todo:  # the error and everything it was raised from or during, however deep
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        todo += [e.__cause__, e.__context__]
        if isinstance(e, (torch_dist.DistBackendError, torch_dist.DistNetworkError, torch_dist.DistStoreError)):
            return True
        # gloo reports a peer gone or silent as a plain RuntimeError
        if isinstance(e, RuntimeError) and any(text in str(e) for text in GLOO_LOST_CONTACT):
            return True
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dip_scale.train", description=__doc__.split("\n\n")[0],
        epilog="\n".join(__doc__.splitlines()[2:8]), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=1000")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and exit")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def dry_run(recipe) -> None:
    import torch

    from dip_scale.models.dip import build_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_rank, accum = check_world_size(recipe, world)
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(model_config(recipe)).parameters())
    print(to_yaml(recipe), end="")
    print(f"# world size {world}: {per_rank} images per rank per step, {accum} micro-batch(es) per step; "
          f"model {params:,} parameters")


def main(argv=None) -> int:
    die_with_launcher()
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.dry_run:
            dry_run(recipe)
            return 0
        check_world_size(recipe, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("composer", "streaming", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="composer")

    from composer.utils import dist  # installs Composer's own SIGTERM handler (exit 143): ours again below

    exit_on_signal()
    from dip_scale.storage import StoreUnavailable, s3_compatible_defaults
    from dip_scale.train.build import build_trainer, device_type
    from dip_scale.train.callbacks.checkpoint import finish_uploads
    from dip_scale.train.callbacks.nonfinite import NonFiniteStop
    from dip_scale.train.callbacks.preemption import Preempted, ignore_signals
    from dip_scale.train.preflight import check_inputs

    exit_on_signal()
    s3_compatible_defaults()
    try:
        check_inputs(recipe)
        dist.initialize_dist(device_type(recipe), timeout=recipe.train.dist_timeout)
        trainer, paths = build_trainer(recipe)
    except (ConfigError, PermissionError) as err:  # a bad recipe, or credentials that may not do what it asks
        print(f"error: {err}", file=sys.stderr)
        ignore_signals()
        return EXIT_BAD_INPUT
    except StoreUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        ignore_signals()
        return EXIT_PREEMPTED  # try again later: a requeue, not a fresh start
    except Exception as err:
        if not lost_other_ranks(err):
            raise
        return _lost(err)
    if int(trainer.state.timestamp.batch) >= recipe.train.max_steps:
        # A rerun (or a requeue) of a finished run: nothing left to train, only uploads to complete.
        finish_uploads(trainer)
        trainer.close()
        return 0
    try:
        trainer.fit()
    except (Preempted, NonFiniteStop) as stop:
        trainer.close()
        if isinstance(stop, Preempted):
            exit_now(int(stop.code))  # checkpoint written, loggers closed; a data thread may wait on the store
        return int(stop.code)
    except Exception as err:
        if not lost_other_ranks(err):
            raise
        return _lost(err)
    trainer.close()
    if dist.get_global_rank() == 0:
        print(f"run {recipe.run_name} complete at step {int(trainer.state.timestamp.batch)}: {paths.local_root}")
    return 0


def _lost(err: BaseException) -> int:
    """Leave at once: the process group is broken, so nothing collective (a checkpoint, a clean close) can run."""
    from dip_scale.train.callbacks.preemption import ignore_signals

    ignore_signals()
    first = str(err).splitlines()[0] if str(err) else ""
    print(f"error: lost contact with other ranks ({type(err).__name__}: {first}); exiting with {EXIT_LOST_RANKS}: "
          "rerun (requeue) to resume from the last checkpoint", file=sys.stderr)
    exit_now(EXIT_LOST_RANKS)


if __name__ == "__main__":
    sys.exit(main())
