"""Context parallelism for packed variable-length batches, on torch.distributed.

A packed batch (tokens + ``cu_seqlens``) too long for one GPU is split across the ranks of a
process group along the token dimension; attention still runs within each document.

Sharding (:func:`shard_plan`): every document of length L is cut into 2 x world chunks at
``floor(c * L / (2 * world))``, c = 0..2 x world, and rank r holds chunks r and 2 x world - 1 - r
(the zigzag of Megatron and TransformerEngine): under a causal mask a chunk's cost grows with its
position, and the two chunks of a rank pair an early one with a late one, so every rank gets about
the same work. Documents shorter than 2 x world leave some chunks empty; nothing is padded. A rank's
local tokens are its chunks in document order, chunk r before chunk 2 x world - 1 - r.

Attention (:func:`varlen_attn_cp`), the all-gather scheme ("llama3" context parallelism): every rank
gathers the whole batch's K and V from all ranks, then runs its local query chunks as one varlen
call against each chunk's key prefix (causal: the document's keys up to the chunk's end; with a
window, the keys the window reaches). Bottom-right alignment then puts each query row at its own
position in the document, so causal masks and windows hold as in one-GPU attention. The backward
is autograd's: the kernel's gradients for the key prefixes are summed into the gathered K and V, and
those are summed over ranks back to the rank that owns each token (reduce-scatter with NCCL, an
all-reduce with backends that lack it, such as gloo).

The ring scheme (``scheme="ring"``) holds two K/V shards instead of the whole batch's: shards hop
from rank to rank, each hop overlapped with the attention on the shard in hand, the partial
outputs merged by lse; in the backward a float32 dK/dV accumulator hops with each shard and ends
on its owner.

The plan is made on the host from ``cu_seqlens`` given on the host (a list or a CPU tensor: data
preparation knows the documents' lengths; a CUDA tensor would cost a device synchronization and
is refused) and cached, so a training step with the same document lengths reuses it.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["SCHEMES", "ShardPlan", "shard_plan", "varlen_attn_cp"]


@dataclass(frozen=True)
class _Chunk:
    doc: int
    start: int  # first token of the chunk, within its document
    end: int
    doc_start: int  # first token of the document in the global packed batch
    doc_len: int


@dataclass(frozen=True, eq=False)
class ShardPlan:
    """How one packed batch is split across ``world`` ranks, seen from ``rank``.

    Attributes (host ints): ``cu_seqlens`` the batch's global offsets; ``chunks`` this rank's
    chunks in local order (two per document, possibly empty); ``local_cu_seqlens`` their offsets
    in the local tokens; ``local_tokens`` how many tokens this rank holds; ``max_local_tokens`` the
    most any rank holds (the gather's padded size); ``positions`` each local token's position
    within its document (for rotary embeddings).
    """

    world: int
    rank: int
    cu_seqlens: tuple
    chunks: tuple
    local_cu_seqlens: tuple
    max_local_tokens: int
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def local_tokens(self) -> int:
        return self.local_cu_seqlens[-1]

    @property
    def positions(self) -> list:
        return [p for c in self.chunks for p in range(c.start, c.end)]

    def global_rows(self, rank=None) -> list:
        """The global rows of ``rank``'s local tokens (this rank's by default), in local order."""
        plan = self if rank is None or rank == self.rank else shard_plan(self.cu_seqlens,
                                                                         self.world, rank)
        return [c.doc_start + p for c in plan.chunks for p in range(c.start, c.end)]

    def shard(self, x):
        """This rank's local tokens of a global packed tensor (rows = tokens)."""
        return x.index_select(0, self._index("local", x.device))

    def unshard(self, x_local, group=None):
        """The global packed tensor from every rank's local tokens (an all-gather; for tests and
        for outputs that must be whole on every rank; no autograd)."""
        gathered = _gather_padded(x_local, self, group)
        return gathered.index_select(0, self._index("gathered", x_local.device))

    def gathered_rows(self) -> list:
        """The row of every global token in the gathered buffer (each rank's local tokens padded
        to ``max_local_tokens``, rank after rank)."""
        rows = self._device_cache.get("gathered_rows")
        if rows is None:
            rows = [0] * self.cu_seqlens[-1]
            for r in range(self.world):
                for i, g in enumerate(self.global_rows(r)):
                    rows[g] = r * self.max_local_tokens + i
            self._device_cache["gathered_rows"] = rows
        return rows

    def _index(self, name, device):
        key = (name, device)
        index = self._device_cache.get(key)
        if index is None:
            rows = self.global_rows() if name == "local" else self.gathered_rows()
            index = torch.tensor(rows, dtype=torch.long, device=device)
            self._device_cache[key] = index
        return index


def _host_offsets(cu_seqlens, name):
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.device.type != "cpu":
            raise ValueError(f"shard_plan: {name} must be on the host (a list or a CPU tensor): "
                             f"sharding reads it, and reading a {cu_seqlens.device} tensor would "
                             f"synchronize with the device")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
            raise ValueError(f"shard_plan: {name} must be a 1-D integer tensor, got "
                             f"{cu_seqlens.dim()}-D {cu_seqlens.dtype}")
        cu_seqlens = cu_seqlens.tolist()
    cu = tuple(int(x) for x in cu_seqlens)
    if len(cu) < 1 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"shard_plan: {name} must start at 0 and never decrease, got "
                         f"{list(cu)[:8]}")
    return cu


def shard_plan(cu_seqlens, world_size: int, rank: int) -> ShardPlan:
    """The zigzag split of a packed batch with offsets ``cu_seqlens`` (host list or CPU tensor)
    across ``world_size`` ranks, as seen from ``rank``. Cached per (offsets, world_size, rank)."""
    for name, value in (("world_size", world_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"shard_plan: {name} must be an int, got {type(value).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_plan: need world_size >= 1 and 0 <= rank < world_size, got "
                         f"world_size={world_size}, rank={rank}")
    return _plan(_host_offsets(cu_seqlens, "cu_seqlens"), int(world_size), int(rank))


def _chunk_bounds(length, pieces):
    return [c * length // pieces for c in range(pieces + 1)]


@functools.lru_cache(maxsize=64)
def _plan(cu, world, rank):
    pieces = 2 * world
    chunks, sizes = [], [0] * world
    for doc, (start, end) in enumerate(zip(cu, cu[1:])):
        bounds = _chunk_bounds(end - start, pieces)
        for r in range(world):
            sizes[r] += (bounds[r + 1] - bounds[r]) + (bounds[pieces - r] - bounds[pieces - 1 - r])
        for c in (rank, pieces - 1 - rank):
            chunks.append(_Chunk(doc, bounds[c], bounds[c + 1], start, end - start))
    offsets = [0]
    for c in chunks:
        offsets.append(offsets[-1] + c.end - c.start)
    return ShardPlan(world, rank, cu, tuple(chunks), tuple(offsets), max(sizes) if sizes else 0)


# The single-tensor collectives took new names in torch 2.13 (the old ones warn there); 2.11 has
# only the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _gather_padded(x, plan, group):
    """(world * max_local_tokens, ...) : every rank's local tokens, each padded to the most any
    rank holds (the collectives move equal sizes)."""
    pad = plan.max_local_tokens - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros((pad,) + tuple(x.shape[1:]))])
    out = x.new_empty((plan.world * plan.max_local_tokens,) + tuple(x.shape[1:]))
    _all_gather_single(out, x.contiguous(), group=group)
    return out


class _GatherTokens(torch.autograd.Function):
    """All ranks' local tokens (padded layout); backward: each rank's gradient rows summed over
    the ranks, back on their owner."""

    @staticmethod
    def forward(ctx, x, plan, group):
        ctx.plan, ctx.group, ctx.local = plan, group, x.shape[0]
        return _gather_padded(x, plan, group)

    @staticmethod
    def backward(ctx, grad):
        plan, group = ctx.plan, ctx.group
        grad = grad.contiguous()
        rows = plan.max_local_tokens
        if dist.get_backend(group) in ("nccl", "xccl"):
            mine = grad.new_empty((rows,) + tuple(grad.shape[1:]))
            _reduce_scatter_single(mine, grad, group=group)
        else:  # gloo and others have no reduce-scatter; all_reduce works in place, on a copy
            grad = grad.clone()
            dist.all_reduce(grad, group=group)
            mine = grad[plan.rank * rows:(plan.rank + 1) * rows]
        return mine[:ctx.local], None, None


@dataclass(frozen=True)
class _Call:
    """One varlen call: the local chunks that share an effective window, and where their keys
    lie in the global packed batch."""
    causal: bool
    window: tuple
    q_rows: torch.Tensor  # local rows of the call's queries, in call order
    kv_rows: torch.Tensor  # rows of the call's keys in the gathered K/V buffer, in call order
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


def _key_span(chunk, causal, window):
    """(first key, key end, effective window) of a chunk, in document positions: the keys its
    queries may see, and the window that, bottom-right aligned to that key end, allows each query
    exactly the keys the true window allows it at its own position. Aligning to ``end`` moves the
    queries ``end - chunk.end`` keys to the right, which the window's two sides take back."""
    left, right = window
    if causal:
        right = 0
    end = chunk.doc_len if right < 0 else min(chunk.doc_len, chunk.end + right)
    shift = end - chunk.end
    first = 0 if left < 0 else max(0, chunk.start - left)
    return first, end, (-1 if left < 0 else left + shift, -1 if right < 0 else right - shift)


def _calls(plan, causal, window, device):
    """The varlen calls of this rank's chunks, and the permutation from their concatenated
    outputs back to local order."""
    key = ("calls", causal, window, device)
    cached = plan._device_cache.get(key)
    if cached is not None:
        return cached
    groups = {}
    for i, chunk in enumerate(plan.chunks):
        if chunk.end == chunk.start:
            continue
        first, end, eff = _key_span(chunk, causal, window)
        groups.setdefault(eff, []).append((i, first, end))
    gathered = plan.gathered_rows()
    calls, rows = [], []  # rows: every call's q_rows in order, kept on the host
    for eff, members in groups.items():
        ranges = []
        for i, first, end in members:
            chunk = plan.chunks[i]
            ranges.append((range(plan.local_cu_seqlens[i], plan.local_cu_seqlens[i + 1]),
                           gathered[chunk.doc_start + first:chunk.doc_start + end]))
            rows.extend(ranges[-1][0])
        calls.append(_make_call(eff, ranges, device))
    # From the host list: reading the device copies back would synchronize with the device.
    inverse = torch.empty(len(rows), dtype=torch.long)
    inverse[torch.tensor(rows, dtype=torch.long)] = torch.arange(len(rows))
    cached = (calls, inverse.to(device))
    plan._device_cache[key] = cached
    return cached


def _piece(chunk, p0, p1, causal, window):
    """A chunk's queries against the keys [p0, p1) of its document (another chunk's): (q0, q1,
    p0, p1, effective window), in document positions, narrowed to the queries that see any of
    those keys and the keys any of them sees; None when none does. As in _key_span, the window
    bottom-right aligned to the narrowed ranges allows each query what the true window allows;
    a side that reaches past every key becomes -1, so that calls group by fewer windows."""
    left, right = window
    if causal:
        right = 0
    first, end, _ = _key_span(chunk, causal, window)
    p0, p1 = max(p0, first), min(p1, end)
    if p0 >= p1:
        return None
    q0 = chunk.start if right < 0 else max(chunk.start, p0 - right)
    q1 = chunk.end if left < 0 else min(chunk.end, p1 + left)
    if q0 >= q1:
        return None
    shift = p1 - q1
    eff_left = -1 if left < 0 or left + shift >= p1 - p0 - 1 else left + shift
    eff_right = -1 if right < 0 or right - shift >= q1 - q0 - 1 else right - shift
    return q0, q1, p0, p1, (eff_left, eff_right)


def _ring_calls(plan, src, causal, window, device):
    """The varlen calls of this rank's chunks against rank ``src``'s K/V shard (rows in src's
    local order). A document's query chunk meets up to two of src's chunks; each of them goes to
    its own call (grouped by window and by which of the two), so no call holds a query twice."""
    key = ("ring", src, causal, window, device)
    cached = plan._device_cache.get(key)
    if cached is not None:
        return cached
    theirs = shard_plan(plan.cu_seqlens, plan.world, src)
    groups = {}
    for i, chunk in enumerate(plan.chunks):
        if chunk.end == chunk.start:
            continue
        for j in (2 * chunk.doc, 2 * chunk.doc + 1):
            other = theirs.chunks[j]
            piece = _piece(chunk, other.start, other.end, causal, window)
            if piece is None:
                continue
            q0, q1, p0, p1, eff = piece
            mine, at = plan.local_cu_seqlens[i] - chunk.start, theirs.local_cu_seqlens[j]
            groups.setdefault((eff, j % 2), []).append(
                (range(mine + q0, mine + q1), range(at + p0 - other.start, at + p1 - other.start)))
    calls = [_make_call(eff, members, device) for (eff, _), members in groups.items()]
    plan._device_cache[key] = calls
    return calls


def _make_call(eff, members, device):
    """A _Call from its sequences' (query rows, key rows) ranges and their effective window."""
    q_rows, k_rows, cu_q, cu_k = [], [], [0], [0]
    for queries, keys in members:
        q_rows.extend(queries)
        k_rows.extend(keys)
        cu_q.append(len(q_rows))
        cu_k.append(len(k_rows))
    longs = functools.partial(torch.tensor, dtype=torch.long, device=device)
    ints = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    # (-1, 0) is the causal mask: the kernels' causal form, not their windowed one.
    is_causal = eff == (-1, 0)
    return _Call(is_causal, (-1, -1) if is_causal else eff, longs(q_rows), longs(k_rows),
                 ints(cu_q), ints(cu_k), max(b - a for a, b in zip(cu_q, cu_q[1:])),
                 max(b - a for a, b in zip(cu_k, cu_k[1:])))


def _peer(group, rank):
    return rank if group is None else dist.get_global_rank(group, rank)


def _pass_on(tensors, plan, group, tag):
    """Sends ``tensors`` to the next rank of the ring and receives as many from the previous one,
    asynchronously: (the received buffers, the requests to wait on). ``tag`` keeps two hops in
    flight at once (K/V and the gradient accumulator) apart where the backend matches by tag."""
    nxt = _peer(group, (plan.rank + 1) % plan.world)
    prev = _peer(group, (plan.rank - 1) % plan.world)
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, nxt, group, tag) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, prev, group, tag) for r in received]
    return received, dist.batch_isend_irecv(ops)


def _padded(x, rows):
    pad = rows - x.shape[0]
    return torch.cat([x, x.new_zeros((pad,) + tuple(x.shape[1:]))]) if pad else x.contiguous()


def _call_kv(kv, call, heads_kv):
    """(k, v) of one call: its key rows of a K/V buffer (K and V side by side in the heads)."""
    rows = kv.index_select(0, call.kv_rows)
    return rows[:, :heads_kv], rows[:, heads_kv:]


def _merge(out, lse, rows, part, part_lse):
    """Folds one call's (out, lse) for local ``rows`` into the running (out, lse), float32 (float64
    for float64 inputs)."""
    old = lse[:, rows]
    part_lse = part_lse.to(lse.dtype)
    new = torch.logaddexp(old, part_lse)
    finite = torch.isfinite(new)
    keep = torch.where(finite, torch.exp(old - new), torch.zeros_like(new))
    take = torch.where(finite, torch.exp(part_lse - new), torch.zeros_like(new))
    out[rows] = out[rows] * keep.t().unsqueeze(-1) + part.to(out.dtype) * take.t().unsqueeze(-1)
    lse[:, rows] = new


class _RingAttention(torch.autograd.Function):
    """The ring scheme: K/V shards pass around the ring, one hop per step, each hop overlapped
    with the attention on the shard in hand; partial outputs merge by lse. The backward passes
    the shards around again, with a float32 dK/dV accumulator that follows each shard and
    reaches its owner after the last hop; each step's gradients come from the kernel's backward
    on the final out and lse, which give every block its share of the whole row's softmax."""

    @staticmethod
    def forward(ctx, q, k, v, plan, group, causal, window, scale, attn_fn, backward_fn):
        heads_kv = k.shape[1]
        kv = _padded(torch.cat([k, v], dim=1), plan.max_local_tokens)
        acc = torch.promote_types(q.dtype, torch.float32)
        out = q.new_zeros(q.shape, dtype=acc)
        lse = q.new_full((q.shape[1], q.shape[0]), -float("inf"), dtype=acc)
        for step in range(plan.world):
            src = (plan.rank - step) % plan.world
            hop = _pass_on([kv], plan, group, 0) if step < plan.world - 1 else None
            for call in _ring_calls(plan, src, causal, window, q.device):
                part, part_lse = attn_fn(q.index_select(0, call.q_rows),
                                         *_call_kv(kv, call, heads_kv), call.cu_q, call.cu_k,
                                         call.max_q, call.max_k, causal=call.causal, scale=scale,
                                         window_size=call.window, return_lse=True)
                _merge(out, lse, call.q_rows, part, part_lse)
            if hop is not None:
                (kv,), requests = hop
                for request in requests:
                    request.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.setup = (plan, group, causal, window, scale, backward_fn)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, group, causal, window, scale, backward_fn = ctx.setup
        heads_kv = k.shape[1]
        dout = dout.contiguous()
        kv = _padded(torch.cat([k, v], dim=1), plan.max_local_tokens)
        acc = lse.dtype
        dq = q.new_zeros(q.shape, dtype=acc)
        dkv = kv.new_zeros(kv.shape, dtype=acc)  # the accumulator of the shard in hand
        for step in range(plan.world):
            src = (plan.rank - step) % plan.world
            hop = _pass_on([kv], plan, group, 0) if step < plan.world - 1 else None
            for call in _ring_calls(plan, src, causal, window, q.device):
                rows = call.q_rows
                dq_call, dk_call, dv_call = backward_fn(
                    dout.index_select(0, rows), q.index_select(0, rows),
                    *_call_kv(kv, call, heads_kv), out.index_select(0, rows), lse[:, rows],
                    call.cu_q, call.cu_k, call.max_q, call.max_k, causal=call.causal,
                    scale=scale, window_size=call.window)[:3]
                dq.index_add_(0, rows, dq_call.to(acc))
                dkv.index_add_(0, call.kv_rows, torch.cat([dk_call, dv_call], dim=1).to(acc))
            # Every step ends with a hop of the accumulator, the last one home to its owner.
            requests = []
            if plan.world > 1:
                (dkv,), requests = _pass_on([dkv], plan, group, 1)
            if hop is not None:
                (kv,), more = hop
                requests = list(requests) + list(more)
            for request in requests:
                request.wait()
        dkv = dkv[:k.shape[0]].to(k.dtype)
        return (dq.to(q.dtype), dkv[:, :heads_kv], dkv[:, heads_kv:], None, None, None, None,
                None, None, None)


SCHEMES = ("allgather", "ring")


def varlen_attn_cp(q, k, v, cu_seqlens, max_seqlen=None, *, group=None, causal=False,
                   window_size=(-1, -1), scale=None, return_lse=False, scheme="allgather",
                   attn_fn=None, attn_backward_fn=None):
    """Attention over a packed batch sharded by :func:`shard_plan` across ``group``'s ranks.

    ``q`` (local tokens, H, D), ``k`` and ``v`` (local tokens, H_kv, D) are this rank's shards
    (``plan.shard(x)``); ``cu_seqlens`` the batch's *global* offsets on the host (list or CPU
    tensor); ``max_seqlen``, if given, is checked against them. ``causal``, ``window_size`` and
    ``scale`` mean what they mean for :func:`cupy_varlen.varlen_attn` on the whole batch. Returns
    this rank's output (local tokens, H, D), differentiable with respect to q, k and v, and with
    ``return_lse`` also its rows' lse (H, local tokens) float32 as ``varlen_attn`` returns it (no
    gradient; rows of a document with no allowed key: -inf). Every rank
    of ``group`` must call it with the same ``cu_seqlens`` and arguments (it runs collectives, also
    in the backward). ``attn_fn`` replaces the kernel (default :func:`cupy_varlen.varlen_attn`;
    the tests pass the float64 reference): it is called as ``attn_fn(q, k, v, cu_q, cu_k, max_q,
    max_k, causal=..., scale=scale, window_size=..., return_lse=return_lse)`` once per distinct
    effective window of this rank's chunks (once for causal or full attention).

    ``scheme``: ``"allgather"`` (the default: one all-gather of K/V before the attention, one
    reduce-scatter of dK/dV after the backward) or ``"ring"`` (K/V shards passed rank to rank,
    each hop overlapped with the attention on the shard in hand, partial outputs merged by lse;
    a shard's dK/dV accumulator travels the same ring back to its owner; memory for two shards
    instead of the whole batch's K/V). The ring calls ``attn_fn`` per step and per window group
    with ``return_lse=True``, and in the backward ``attn_backward_fn`` (default
    :func:`cupy_varlen.varlen_attn_backward`) as ``attn_backward_fn(dout, q, k, v, out, lse,
    cu_q, cu_k, max_q, max_k, causal=..., scale=scale, window_size=...)`` with the final out and
    lse of the call's rows; the first three results are dq, dk, dv.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"varlen_attn_cp: scheme must be one of {SCHEMES}, got {scheme!r}")
    if attn_fn is None:
        from . import varlen_attn as attn_fn
    if attn_backward_fn is None:
        from . import varlen_attn_backward as attn_backward_fn
    world = dist.get_world_size(group)
    plan = shard_plan(cu_seqlens, world, dist.get_rank(group))
    longest = max((b - a for a, b in zip(plan.cu_seqlens, plan.cu_seqlens[1:])), default=0)
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"varlen_attn_cp: max_seqlen={max_seqlen} is below the longest "
                         f"document in cu_seqlens ({longest})")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 3 or x.shape[0] != plan.local_tokens:
            raise ValueError(f"varlen_attn_cp: {name} must be (local tokens = "
                             f"{plan.local_tokens}, heads, head_dim) on rank {plan.rank}, got "
                             f"{tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"varlen_attn_cp: k and v must have one shape, got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    window = tuple(int(w) for w in window_size)
    if len(window) != 2:
        raise ValueError(f"varlen_attn_cp: window_size must be (left, right), got {window_size}")
    if scheme == "ring":
        out, lse = _RingAttention.apply(q, k, v, plan, group, bool(causal), window, scale,
                                        attn_fn, attn_backward_fn)
        return (out, lse.float()) if return_lse else out
    # K and V travel as one tensor: one collective each way, in the same order on every rank;
    # each call then takes its key rows (K and V together) straight from the gathered buffer.
    kv = _GatherTokens.apply(torch.cat([k, v], dim=1), plan, group)
    heads_kv = k.shape[1]
    calls, inverse = _calls(plan, bool(causal), window, q.device)
    if not calls:
        # No local queries; q and the gathered K/V still join the graph, so that this rank takes
        # part in the backward's collective like every other (and its q gets a gradient).
        out = q * 0 + 0 * kv.sum()
        return (out, q.new_empty((q.shape[1], 0), dtype=torch.float32)) if return_lse else out
    results = []
    for call in calls:
        results.append(attn_fn(q.index_select(0, call.q_rows), *_call_kv(kv, call, heads_kv),
                               call.cu_q, call.cu_k, call.max_q, call.max_k, causal=call.causal,
                               scale=scale, window_size=call.window, return_lse=return_lse))
    if not return_lse:
        return torch.cat(results).index_select(0, inverse)
    out = torch.cat([o for o, _ in results]).index_select(0, inverse)
    lse = torch.cat([l.detach() for _, l in results], dim=1).index_select(1, inverse)
    return out, lse.float()
