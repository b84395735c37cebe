"""Which errors mean "the other ranks are gone" (exit 76, a requeue) and which are this rank's own fault (a
crash, not requeued): dip_scale.train.__main__.lost_other_ranks. The real faults (a killed rank, a dead
launcher, a partitioned fabric) are in tests/cluster/test_faults.py; here every message gloo's TCP transport
builds for a lost peer, and errors wrapped the ways Composer and torch re-raise them."""

from __future__ import annotations

import pytest
import torch.distributed as torch_dist

from dip_scale.train.__main__ import lost_other_ranks

GLOO = "[/pytorch/third_party/gloo/gloo/transport/tcp/{}] "
LOST = [
    GLOO.format("unbound_buffer.cc:81") + "Timed out waiting 30000ms for recv operation to complete",
    GLOO.format("unbound_buffer.cc:136") + "Timed out waiting 30000ms for send operation to complete",
    GLOO.format("pair.cc:525") + "Read error [10.78.0.2]:27794: Connection reset by peer",
    GLOO.format("pair.cc:534") + "Read error [10.78.0.2]:27794: Connection timed out",
    GLOO.format("pair.cc:589") + "Connection closed by peer [10.78.0.2]:27794",
    GLOO.format("pair.cc:446") + "Write error [10.78.0.2]:27794: Broken pipe",
    GLOO.format("pair.cc:614") + "Application timeout caused pair closure",
    GLOO.format("pair.cc:212") + "Socket closed [10.78.0.2]:27794",
]


def raised(outer: BaseException, *inner: BaseException) -> BaseException:
    """`outer` as raised while handling inner[0], itself raised from inner[1], ...: a real chain."""
    def chain(errors):
        head, *rest = errors
        if not rest:
            raise head
        try:
            chain(rest)
        except BaseException as cause:  # noqa: BLE001
            raise head from cause
    try:
        try:
            chain(list(inner)) if inner else None
        finally:
            raise outer
    except BaseException as err:  # noqa: BLE001
        return err


@pytest.mark.parametrize("message", LOST, ids=lambda m: m.split("] ")[1][:40])
def test_every_gloo_message_for_a_lost_peer_means_lost_ranks(message):
    assert lost_other_ranks(RuntimeError(message))


@pytest.mark.parametrize("kind", [torch_dist.DistBackendError, torch_dist.DistNetworkError,
                                  torch_dist.DistStoreError])
def test_torch_distributed_errors_mean_lost_ranks(kind):
    assert lost_other_ranks(kind("wait timeout after 30000ms"))


def test_found_however_deep_in_the_chain():
    """A lost peer under two layers of re-raising (a callback's error, raised from a wrapper's)."""
    err = raised(ValueError("callback failed"), RuntimeError("step failed"), RuntimeError(LOST[-2]))
    assert lost_other_ranks(err)


@pytest.mark.parametrize("err", [
    ValueError("shapes do not match"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    raised(KeyError("model.blocks.0"), ValueError("bad checkpoint")),
], ids=["value", "shapes", "oom", "chain"])
def test_a_ranks_own_errors_do_not(err):
    assert not lost_other_ranks(err)
