"""The transport of sequence parallelism: ``torch.distributed`` point-to-point ring exchanges and
all-to-alls, each wait turned into one clear error when a rank dies, stalls or raises.

Nothing here waits without a bound: every operation runs under the process group's timeout (gloo's
send/recv/all-to-all honour it), and a failure is re-raised as :class:`PeerFailure` saying which
rank, which step and what travelled, so that a dead or stalled rank never leaves the others hanging.
"""

from __future__ import annotations

import datetime
import struct
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


class PeerFailure(RuntimeError):
    """A collective or ring exchange of sequence-parallel attention failed: another rank died, stalled
    past the process group's timeout, or raised before taking part."""


def _timeout(group: Any) -> Optional[datetime.timedelta]:
    """The group's timeout where the backend exposes it (gloo does), for error messages only."""
    try:
        return group._get_backend(torch.device("cpu")).options._timeout
    except (AttributeError, RuntimeError):
        return None


class Group:
    """One process group as the attention functions see it: this rank, the world size, the global
    ranks of its ring neighbours, and the timeout its operations run under."""

    def __init__(self, group: Any, op: str) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"aule_kp.distributed.{op} needs torch.distributed initialised "
                               "(torch.distributed.init_process_group) on every rank of the group")
        self.group = group if group is not None else dist.group.WORLD
        self.op = op
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of it")
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.world)
        self.timeout = _timeout(self.group)

    def _failure(self, what: str, exc: BaseException) -> PeerFailure:
        within = f" ({self.timeout.total_seconds():g} s)" if self.timeout is not None else ""
        return PeerFailure(f"aule_kp.distributed.{self.op}: rank {self.rank} of {self.world} failed while {what}: "
                           f"a rank of the group died, stalled past the group's timeout{within}, or raised "
                           f"before taking part ({type(exc).__name__}: {exc})")

    def wait(self, works: Sequence[Any], what: str) -> None:
        """Waits for ``works`` (each bounded by the group's timeout); PeerFailure saying ``what`` failed."""
        try:
            for work in works:
                work.wait()
        except RuntimeError as exc:  # gloo's and NCCL's DistBackendError are RuntimeErrors
            raise self._failure(what, exc) from exc

    def exchange(self, send: torch.Tensor, step: int, stream: int, what: str) -> Pending:
        """Sends ``send`` to the next rank of the ring and receives the previous rank's tensor of the
        same shape, without waiting: ``.wait()`` on the result gives it. ``stream`` (0, 1) keeps two
        exchanges in flight at once apart (their tags differ)."""
        if self.world == 1:
            return Pending(self, [], send, "")
        recv = torch.empty_like(send)
        tag = 2 * step + stream
        ops = [dist.P2POp(dist.isend, send, self.next, self.group, tag),
               dist.P2POp(dist.irecv, recv, self.prev, self.group, tag)]
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as exc:
            raise self._failure(f"posting {what}", exc) from exc
        return Pending(self, works, recv, f"passing {what} round the ring (step {step + 1}; "
                                          f"to rank {(self.rank + 1) % self.world}, from rank "
                                          f"{(self.rank - 1) % self.world})")

    def all_to_all(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """``all_to_all_single`` of ``x`` (its dim 0 split evenly over the ranks), waited with a clear error."""
        out = torch.empty_like(x)
        try:
            work = dist.all_to_all_single(out, x.contiguous(), group=self.group, async_op=True)
        except RuntimeError as exc:
            raise self._failure(f"posting the all-to-all of {what}", exc) from exc
        self.wait([work], f"the all-to-all of {what}")
        return out

    def check_agree(self, fields: Sequence[Tuple[str, Any]], device: torch.device) -> None:
        """ValueError naming the ranks whose ``fields`` (name, int/float/str) differ from rank 0's.

        One small ``all_gather`` before any attention work, so that a shape mismatch is an error
        here rather than a failed or, worse, a silently misread exchange later."""
        mine = torch.tensor([_as_int(value) for _, value in fields], dtype=torch.int64, device=device)
        gathered: List[torch.Tensor] = [torch.empty_like(mine) for _ in range(self.world)]
        try:
            work = dist.all_gather(gathered, mine, group=self.group, async_op=True)
        except RuntimeError as exc:
            raise self._failure("posting the check that the ranks' shapes agree", exc) from exc
        self.wait([work], "checking that the ranks' shapes agree (all_gather)")
        first = gathered[0].tolist()
        for rank, theirs in enumerate(t.tolist() for t in gathered):
            if theirs != first:
                diffs = [f"{name} {_describe(name, theirs[i], fields)} (rank 0: {_describe(name, first[i], fields)})"
                         for i, (name, _) in enumerate(fields) if theirs[i] != first[i]]
                raise ValueError(f"aule_kp.distributed.{self.op}: the inputs of rank {rank} disagree with rank 0's: "
                                 + "; ".join(diffs))


#: Strings the agreement check carries as small integers (dtype names, layouts).
_CODES = ("float32", "float16", "bfloat16", "contiguous", "zigzag")


def _as_int(value: Any) -> int:
    if isinstance(value, float):
        return struct.unpack("<q", struct.pack("<d", value))[0]
    if isinstance(value, str):
        return _CODES.index(value) if value in _CODES else -1
    return int(value)


def _describe(name: str, code: int, fields: Sequence[Tuple[str, Any]]) -> str:
    """The value a rank reported for field ``name``, decoded by the type rank-local ``fields`` has."""
    kind = type(dict(fields)[name])
    if kind is float:
        return repr(struct.unpack("<d", struct.pack("<q", code))[0])
    if kind is str:
        return repr(_CODES[code]) if 0 <= code < len(_CODES) else "?"
    if kind is bool:
        return repr(bool(code))
    return str(code)


class Pending:
    """A ring exchange in flight; ``wait()`` returns the received tensor."""

    def __init__(self, group: Group, works: List[Any], recv: torch.Tensor, what: str) -> None:
        self._group, self._works, self._recv, self._what = group, works, recv, what

    def wait(self) -> torch.Tensor:
        self._group.wait(self._works, self._what)
        return self._recv
