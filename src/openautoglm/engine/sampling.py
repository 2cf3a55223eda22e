"""Open-AutoGLM's batched sampler: one call per engine step turns the logits of every sequence that samples
now into its next token (and, when asked, its logprobs).

Per request, in this order: logits processors (structured outputs' grammars first, masked for all guided rows
at once by one bitmask, then any other processor row by row), min_tokens (EOS and stop ids masked while
the output is shorter), repetition penalty (HF semantics, over prompt + output), presence and frequency
penalties (OpenAI semantics, over the output), then either greedy argmax (temperature 0) or temperature →
top_k → top_p → min_p (transformers' warper order) and a draw.

Choices worth knowing:

- Logprobs are those of the model's raw distribution: ``log_softmax`` of the logits as the model produced
  them, before processors, penalties, temperature and truncation (what vLLM reports by default). ``top``
  holds the k most likely tokens of that distribution, best first; it may include the sampled token.
- Truncation keeps every token whose logit reaches the cut-off value, so exact ties at a top_k / top_p
  boundary are all kept (transformers' top_k does the same; its top_p drops tied tokens by sort position).
- A draw is an inverse-CDF lookup with one uniform number per random row: a request with a ``generator``
  draws exactly one number from it per step and nothing else, so its tokens do not depend on what else is in
  the batch, where it sits or how big the batch is; every decision on a row's path depends on that row alone.
  (Vectorised kernels may round a weight differently by one ulp in another batch layout; that moves a draw
  only when it lands within ~1e-7 of a token boundary.)
  (The exponential-race alternative needs V random numbers per row, measured far slower on the CPU.)
  Unseeded rows share one draw from torch's default generator.
- The caller's ``logits`` are never modified (the engine retries a failed batch row by row on the same
  tensor); rows that must change are copied into a reused work buffer.

Not thread-safe: one sampler belongs to one step loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from openautoglm.engine.guided import GrammarMasks, GrammarProcessor
from openautoglm.engine.request import Request
from openautoglm.protocol.errors import EngineError

BLOCK = 256  # tokens per block of the two-level inverse-CDF lookup
_NEG_INF = float("-inf")


@dataclass(slots=True)
class SampledLogprobs:
    token_id: int
    logprob: float  # of the sampled token, in the raw distribution
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[SampledLogprobs | None]


@dataclass(slots=True)
class SamplingPlan:
    """Which rows need what, found in one pass over the batch (global row numbers); ``Sampler.plan``."""

    random: list[int] = field(default_factory=list)
    greedy: list[int] = field(default_factory=list)
    processors: list[int] = field(default_factory=list)
    min_tokens: list[int] = field(default_factory=list)
    repetition: list[int] = field(default_factory=list)
    occurrence: list[int] = field(default_factory=list)  # presence or frequency penalty
    logprobs: list[int] = field(default_factory=list)

    def modified(self) -> set[int]:
        return {*self.processors, *self.min_tokens, *self.repetition, *self.occurrence}

    @property
    def on_device(self) -> bool:
        """No row needs the host: greedy rows with no processors, min_tokens, penalties or logprobs."""
        return not self.random and not self.logprobs and not self.modified()


def _plan(requests: Sequence[Request]) -> SamplingPlan:
    p = SamplingPlan()
    for i, req in enumerate(requests):
        sp = req.sampling_params
        (p.greedy if sp.temperature < 1e-5 else p.random).append(i)
        if req.logits_processors:
            p.processors.append(i)
        if sp.min_tokens > len(req.output_token_ids):
            p.min_tokens.append(i)
        if sp.repetition_penalty != 1.0:
            p.repetition.append(i)
        if sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0:
            p.occurrence.append(i)
        if sp.logprobs is not None:
            p.logprobs.append(i)
    return p


class Sampler:
    """Samples one token per row of a [B, vocab_size] float32 logits tensor, one row per request, in order.

    ``top_p_candidates`` is how many best tokens the top-p search looks at first (one top-k for the batch);
    a row whose nucleus is wider falls back to a histogram of its weights. It changes speed, never results.
    """

    def __init__(self, vocab_size: int, *, top_p_candidates: int = 64) -> None:
        if vocab_size < 1:
            raise EngineError(f"sampler vocab_size must be >= 1, got {vocab_size}")
        if top_p_candidates < 1:
            raise EngineError(f"sampler top_p_candidates must be >= 1, got {top_p_candidates}")
        self.vocab_size = vocab_size
        self.top_p_candidates = top_p_candidates
        self._history = _TokenHistory(vocab_size)
        self._grammars = GrammarMasks(vocab_size)
        self._buffers: dict[str, torch.Tensor] = {}

    # ---- public ---------------------------------------------------------------------------------------

    @staticmethod
    def plan(requests: Sequence[Request]) -> SamplingPlan:
        """What each row needs (``sample`` and ``sample_on_device`` take it, so a step plans once)."""
        return _plan(requests)

    def sample(
        self, logits: torch.Tensor, requests: Sequence[Request], plan: SamplingPlan | None = None
    ) -> SamplerOutput:
        self._check(logits, requests)
        n = len(requests)
        if n == 0:
            return SamplerOutput([], [])
        plan = plan if plan is not None else _plan(requests)
        modified = plan.modified()
        if not plan.random and not modified:  # the common greedy case: one argmax, nothing else
            tokens = logits.argmax(-1)
        else:
            tokens = torch.empty(n, dtype=torch.long, device=logits.device)
            work, w, nr = self._prepare(logits, requests, plan, modified, tokens)
            if nr < len(work):
                tokens[work[nr:]] = w[nr:].argmax(-1)
            if nr:
                rand_reqs = [requests[i] for i in work[:nr]]
                e = self._weights(w[:nr], rand_reqs)
                tokens[work[:nr]] = _draw(e, _uniforms(rand_reqs, e.device))
        token_ids: list[int] = tokens.tolist()
        return SamplerOutput(token_ids, self._logprobs(logits, requests, plan.logprobs, tokens))

    def sample_on_device(
        self, logits: torch.Tensor, requests: Sequence[Request], plan: SamplingPlan
    ) -> torch.Tensor | None:
        """Async scheduling: the sampled tokens as a tensor on the logits' device, queued without waiting for
        the device, when ``plan.on_device``; None otherwise (``sample`` then does the whole step)."""
        self._check(logits, requests)
        return logits.argmax(-1) if requests and plan.on_device else None

    def distribution(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """The [B, V] probabilities each row would be sampled from now (one-hot for greedy rows). Runs the
        requests' logits processors like ``sample`` does; draws nothing."""
        self._check(logits, requests)
        n, v = logits.shape
        probs = torch.zeros(n, v, dtype=torch.float32, device=logits.device)
        if n == 0:
            return probs
        plan = _plan(requests)
        tokens = torch.empty(n, dtype=torch.long, device=logits.device)
        work, w, nr = self._prepare(logits, requests, plan, set(range(n)), tokens)
        if nr < len(work):
            probs[work[nr:], w[nr:].argmax(-1)] = 1.0
        if nr:
            e = self._weights(w[:nr], [requests[i] for i in work[:nr]])[:, :v]
            probs[work[:nr]] = e / e.sum(-1, keepdim=True)
        return probs

    # ---- the steps ------------------------------------------------------------------------------------

    def _check(self, logits: torch.Tensor, requests: Sequence[Request]) -> None:
        if logits.dim() != 2 or logits.shape[0] != len(requests) or logits.shape[1] != self.vocab_size:
            raise EngineError(
                f"sampler logits must have shape [{len(requests)}, {self.vocab_size}] "
                f"(requests, vocab_size), got {list(logits.shape)}"
            )
        if logits.dtype != torch.float32:
            raise EngineError(f"sampler logits must be float32, got {logits.dtype}")

    def _prepare(
        self,
        logits: torch.Tensor,
        requests: Sequence[Request],
        plan: SamplingPlan,
        modified: set[int],
        tokens: torch.Tensor,
    ) -> tuple[list[int], torch.Tensor, int]:
        """Copy the random rows and the modified greedy rows into the work buffer (random rows first) and
        apply processors, min_tokens and penalties there; argmax the untouched greedy rows straight from
        ``logits``. Returns (global rows of the work buffer, work buffer, number of random rows)."""
        plain = [i for i in plan.greedy if i not in modified]
        work = plan.random + [i for i in plan.greedy if i in modified]
        if plain:
            tokens[_ix(plain, logits.device)] = _argmax_rows(logits, plain)
        every_row = len(work) == logits.shape[0] and work == list(range(len(work)))
        if every_row and not modified:  # nothing will write to the rows: read the caller's tensor
            return work, logits, len(plan.random)
        w = self._buffer("work", (len(work), logits.shape[1]), logits.device)
        if every_row:
            w.copy_(logits)
        elif work:
            torch.index_select(logits, 0, _dev(work, torch.long, logits.device), out=w)
        local = {g: j for j, g in enumerate(work)}
        reqs = [requests[g] for g in work]
        self._run_processors(w, reqs, [local[g] for g in plan.processors])
        _mask_min_tokens(w, reqs, [local[g] for g in plan.min_tokens])
        penalised = [requests[g] for g in (*plan.repetition, *plan.occurrence)]
        self._history.retain(penalised)
        if plan.repetition:
            self._repetition(w, reqs, [local[g] for g in plan.repetition])
        if plan.occurrence:
            self._occurrence(w, reqs, [local[g] for g in plan.occurrence])
        return work, w, len(plan.random)

    def _run_processors(self, w: torch.Tensor, reqs: list[Request], rows: list[int]) -> None:
        """Grammars first, all rows in one batch (``GrammarMasks``), then any other processor row by row."""
        if not rows:
            return
        guided = [(j, p) for j in rows for p in reqs[j].logits_processors if isinstance(p, GrammarProcessor)]
        if guided:
            self._grammars.apply(
                w, [j for j, _ in guided], [p for _, p in guided], [reqs[j].output_token_ids for j, _ in guided]
            )
        for j in rows:
            req, row = reqs[j], w[j]
            for proc in req.logits_processors:
                if isinstance(proc, GrammarProcessor):
                    continue
                out = proc(req.output_token_ids, row)
                if out is not row:
                    if out.shape != row.shape:
                        raise EngineError(
                            f"a logits processor of request {req.request_id} returned shape "
                            f"{list(out.shape)}, expected [{row.shape[0]}]"
                        )
                    row.copy_(out)
        best = _max_rows(w, rows)
        bad = (~torch.isfinite(best)).nonzero()[:, 0].tolist()
        if bad:
            req = reqs[rows[bad[0]]]
            raise EngineError(
                f"the logits processors of request {req.request_id} left no token to sample "
                f"(best logit {float(best[bad[0]])}); a processor must keep at least one finite logit"
            )

    def _repetition(self, w: torch.Tensor, reqs: list[Request], rows: list[int]) -> None:
        """Divide positive / multiply negative logits of every token seen in prompt + output (HF semantics).
        Duplicated (row, token) pairs write the same value, so no de-duplication is needed."""
        toks = [self._history.tokens(reqs[j], output_only=False) for j in rows]
        r, t = _flatten(rows, toks, w.device)
        if t.numel() == 0:
            return
        pen = torch.ones(w.shape[0], dtype=torch.float32)
        pen[rows] = torch.tensor([reqs[j].sampling_params.repetition_penalty for j in rows])
        pen = _upload(pen, w.device)[r]
        vals = w[r, t]
        w[r, t] = torch.where(vals < 0, vals * pen, vals / pen)

    def _occurrence(self, w: torch.Tensor, reqs: list[Request], rows: list[int]) -> None:
        """logit -= count * frequency_penalty + (count > 0) * presence_penalty over output tokens (OpenAI)."""
        toks = [self._history.tokens(reqs[j], output_only=True) for j in rows]
        r, t = _flatten(rows, toks, w.device)
        if t.numel() == 0:
            return
        keys, counts = torch.unique(r * w.shape[1] + t, return_counts=True)
        r, t = keys // w.shape[1], keys % w.shape[1]
        freq = torch.zeros(w.shape[0], dtype=torch.float32)
        pres = torch.zeros(w.shape[0], dtype=torch.float32)
        freq[rows] = torch.tensor([reqs[j].sampling_params.frequency_penalty for j in rows])
        pres[rows] = torch.tensor([reqs[j].sampling_params.presence_penalty for j in rows])
        freq, pres = _upload(freq, w.device), _upload(pres, w.device)
        w.index_put_((r, t), -(freq[r] * counts.to(torch.float32) + pres[r]), accumulate=True)

    def _weights(self, x: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Unnormalised probabilities exp((x - max) / T), zero outside each row's top_k / top_p / min_p
        support, in a [n, V rounded up to BLOCK] buffer whose tail is zero."""
        n, v = x.shape
        m = x.amax(-1, keepdim=True)
        if not torch.isfinite(m).all():
            bad = [reqs[j].request_id for j in (~torch.isfinite(m[:, 0])).nonzero()[:, 0].tolist()]
            raise EngineError(f"logits of requests {bad} have no finite maximum (NaN, +inf or all -inf)")
        temps = [r.sampling_params.temperature for r in reqs]
        t = None if all(tv == 1.0 for tv in temps) else _dev(temps, torch.float32, x.device).unsqueeze(1)
        nb = -(-v // BLOCK)
        e = self._buffer("exp", (n, nb * BLOCK), x.device)
        e[:, v:].zero_()
        torch.sub(x, m, out=e[:, :v])
        if t is not None:
            e[:, :v].div_(t)
        e[:, :v].exp_()
        self._truncate(x, m, e, reqs, t)
        return e

    def _truncate(
        self, x: torch.Tensor, m: torch.Tensor, e: torch.Tensor, reqs: list[Request], t: torch.Tensor | None
    ) -> None:
        n, v = x.shape
        sps = [r.sampling_params for r in reqs]
        ks = [sp.top_k if 0 < sp.top_k < v else 0 for sp in sps]
        k_rows = [j for j, k in enumerate(ks) if k]
        p_rows = [j for j, sp in enumerate(sps) if sp.top_p < 1.0]
        mp_rows = [j for j, sp in enumerate(sps) if sp.min_p > 0.0]
        if not (k_rows or p_rows or mp_rows):
            return
        thr = torch.full((n,), _NEG_INF, device=x.device)
        if k_rows:
            thr[_ix(k_rows, x.device)] = _kth_largest(self._take(x, k_rows, "top_k"), [ks[j] for j in k_rows])
        if p_rows:
            kp = [j for j in p_rows if ks[j]]
            if kp:  # top_p reads the distribution top_k left
                _mask(e, x, thr, kp)
            pi = _ix(p_rows, x.device)
            z = e.view(n, -1, BLOCK).sum(-1)[pi].sum(-1, dtype=torch.float64)
            top_p = _dev([sps[j].top_p for j in p_rows], torch.float64, x.device)
            tp = None if t is None else t[pi]
            xp, ep = self._take(x, p_rows, "top_p"), e[:, :v]
            cut = self._top_p_cut(xp, ep, p_rows, m[pi], tp, z, top_p, thr[pi])
            thr[pi] = torch.maximum(thr[pi], cut)
        if mp_rows:
            mi = _ix(mp_rows, x.device)
            log_min_p = _dev([math.log(sps[j].min_p) for j in mp_rows], torch.float32, x.device)
            scale = log_min_p if t is None else log_min_p * t[mi, 0]
            thr[mi] = torch.maximum(thr[mi], m[mi, 0] + scale)
        _mask(e, x, thr, sorted({*k_rows, *p_rows, *mp_rows}))

    def _top_p_cut(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        e_rows: list[int],
        m: torch.Tensor,
        t: torch.Tensor | None,
        z: torch.Tensor,
        top_p: torch.Tensor,
        floor: torch.Tensor,
    ) -> torch.Tensor:
        """The smallest logit each row of ``x`` (rows ``e_rows`` of ``e``) keeps. One top-k of
        ``top_p_candidates`` settles most rows; a row with a wider nucleus finds from a histogram of its weights
        which tokens surely hold it and sorts only those. Either way the cut comes from the same sorted values,
        so it does not depend on the way taken."""
        v = x.shape[1]
        k = min(self.top_p_candidates, v)
        done, cut = _nucleus(_largest(x, k), m, t, z, top_p, floor, k == v)
        rest = (~done).nonzero()[:, 0]
        if rest.numel() == 0:
            return cut
        rest_rows = rest.tolist()
        buckets, start = _nucleus_buckets(e[[e_rows[i] for i in rest_rows]], z[rest], top_p[rest])
        for r, i in enumerate(rest_rows):
            one = slice(i, i + 1)
            ti = None if t is None else t[one]
            for lo in (int(start[r]), 0):  # 0: every token, should the histogram's slack fall short
                picked = x[i][buckets[r] >= lo]
                vals = torch.sort(picked, descending=True).values.unsqueeze(0)
                ok, c = _nucleus(vals, m[one], ti, z[one], top_p[one], floor[one], picked.numel() == v)
                if bool(ok[0]):
                    cut[i] = c[0]
                    break
        return cut

    def _logprobs(
        self, logits: torch.Tensor, requests: Sequence[Request], rows: list[int], tokens: torch.Tensor
    ) -> list[SampledLogprobs | None]:
        out: list[SampledLogprobs | None] = [None] * len(requests)
        if not rows:
            return out
        x = self._take(logits, rows, "logprobs")
        tok = tokens[rows]
        # log_softmax without writing it out: x - logsumexp(x), for the sampled and the top tokens only
        lse = torch.logsumexp(x, -1, keepdim=True)
        chosen = (x.gather(1, tok.unsqueeze(1)) - lse)[:, 0].tolist()
        ks = [requests[i].sampling_params.logprobs or 0 for i in rows]
        kmax = min(max(ks), x.shape[1])
        top_v, top_i = torch.topk(x, kmax, -1) if kmax else (x[:, :0], x[:, :0].long())
        top_vl, top_il = (top_v - lse).tolist(), top_i.tolist()
        tok_l = tok.tolist()
        for j, i in enumerate(rows):
            k = ks[j]
            out[i] = SampledLogprobs(tok_l[j], chosen[j], list(zip(top_il[j][:k], top_vl[j][:k], strict=True)))
        return out

    def _take(self, x: torch.Tensor, rows: list[int], name: str) -> torch.Tensor:
        """x[rows], into a reused buffer; x itself when rows is every row in order."""
        if len(rows) == x.shape[0] and rows == list(range(x.shape[0])):
            return x
        out = self._buffer(name, (len(rows), x.shape[1]), x.device)
        return torch.index_select(x, 0, _dev(rows, torch.long, x.device), out=out)

    def _buffer(self, name: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        """A reused float32 buffer: large per-step allocations cost page faults on every step."""
        numel = shape[0] * shape[1]
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.device != device:
            buf = torch.empty(max(numel, 1), dtype=torch.float32, device=device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


# ---- helpers -----------------------------------------------------------------------------------------------


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device``. On a GPU it goes through pinned memory without waiting for the GPU
    (a copy from pageable memory would wait for every kernel queued before it)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _dev(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _upload(torch.tensor(values, dtype=dtype), device)


def _ix(rows: list[int], device: torch.device) -> list[int] | torch.Tensor:
    """Row indices for advanced indexing: the list itself on the CPU, a device tensor on a GPU (indexing a
    GPU tensor with a list copies the list over synchronously)."""
    return rows if device.type != "cuda" else _dev(rows, torch.long, device)


def _argmax_rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    if 2 * len(rows) >= logits.shape[0]:  # one pass over every row beats copying most of them out
        return logits.argmax(-1)[_ix(rows, logits.device)]
    return torch.stack([logits[i].argmax() for i in rows])  # row views: no copy


def _max_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    if 2 * len(rows) >= x.shape[0]:  # one pass over every row beats copying most of them out
        return x.amax(-1)[_ix(rows, x.device)]
    return torch.stack([x[i].amax() for i in rows])  # row views: no copy


def _largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest values of each row, descending (topk beats a sort on the CPU even for k near V/2)."""
    return torch.topk(x, k, -1).values


def _kth_largest(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    k = _dev(ks, torch.long, x.device)
    return _largest(x, max(ks)).gather(1, (k - 1).unsqueeze(1))[:, 0]


def _nucleus(
    vals: torch.Tensor,
    m: torch.Tensor,
    t: torch.Tensor | None,
    z: torch.Tensor,
    top_p: torch.Tensor,
    floor: torch.Tensor,
    whole_row: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p over each row's best logits ``vals`` (descending): token i stays while the probability mass
    before it is < top_p. Returns (settled, cut logit); a row is settled unless every token of ``vals`` stays
    and more may follow (not ``whole_row``)."""
    scaled = vals - m
    if t is not None:
        scaled = scaled / t
    w = torch.exp(scaled.double()).masked_fill_(vals < floor.unsqueeze(1), 0.0)
    cum = (w / z.unsqueeze(1)).cumsum(-1)
    before = torch.zeros_like(cum)
    before[:, 1:] = cum[:, :-1]
    kept = (before < top_p.unsqueeze(1)).sum(-1)  # a prefix: `before` never decreases
    settled = (kept < vals.shape[1]) | whole_row
    return settled, vals.gather(1, (kept - 1).clamp(min=0).unsqueeze(1))[:, 0]


_TOP_BUCKET = 0x3F800000 >> 20  # float32 1.0 read as exponent + 3 mantissa bits: 8 buckets per octave


def _nucleus_buckets(e: torch.Tensor, z: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket every weight (in [0, 1]) by its float bits, a histogram of the mass per bucket, and the lowest
    bucket each row's nucleus needs (with slack for rounding): the tokens in it or above surely hold the
    nucleus. One pass and one scatter, no sort."""
    buckets = e.contiguous().view(torch.int32) >> 20  # monotone in the weight, hence in the logit
    mass = torch.zeros(e.shape[0], _TOP_BUCKET + 1, device=e.device).scatter_add_(1, buckets.long(), e)
    mass_down = mass.flip(-1).cumsum(-1, dtype=torch.float64)  # mass in this bucket or above
    need = torch.minimum(top_p * z * (1 + 1e-4), mass_down[:, -1])
    j = torch.searchsorted(mass_down, need.unsqueeze(1))[:, 0].clamp(max=_TOP_BUCKET)
    return buckets, _TOP_BUCKET - j


def _mask(e: torch.Tensor, x: torch.Tensor, thr: torch.Tensor, rows: list[int]) -> None:
    """Zero the weights of tokens below their row's threshold, for the given rows."""
    v = x.shape[1]
    if 2 * len(rows) >= x.shape[0] or x.is_cuda:  # one pass over all rows (the others' thresholds are -inf)
        e[:, :v].masked_fill_(x < thr.unsqueeze(1), 0.0)
        return
    for j, th in zip(rows, thr[rows].tolist(), strict=True):  # row views: no copies of the rows
        e[j, :v].masked_fill_(x[j] < th, 0.0)


def _mask_min_tokens(w: torch.Tensor, reqs: list[Request], rows: list[int]) -> None:
    """While a request has fewer than min_tokens outputs, its EOS and stop token ids cannot be sampled."""
    v = w.shape[1]
    rr: list[int] = []
    tt: list[int] = []
    for j in rows:
        req = reqs[j]
        ids = {t for t in (*req.eos_token_ids, *req.sampling_params.stop_token_ids) if 0 <= t < v}
        rr.extend([j] * len(ids))
        tt.extend(ids)
    if tt:
        w[_dev(rr, torch.long, w.device), _dev(tt, torch.long, w.device)] = _NEG_INF


def _flatten(rows: list[int], toks: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate per-row token tensors; return (row of each token, token). (repeat_interleave would do, but
    its parallel kernel costs milliseconds on a busy CPU even for a few hundred tokens.)"""
    if not toks:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty
    r = torch.cat([torch.full((t.numel(),), j, dtype=torch.long) for j, t in zip(rows, toks, strict=True)])
    return _upload(r, device), _upload(torch.cat(toks), device)


def _uniforms(reqs: list[Request], device: torch.device) -> torch.Tensor:
    """One uniform in [0, 1) per row: seeded rows from their own generator, the others from one draw."""
    seeded = [j for j, r in enumerate(reqs) if r.generator is not None]
    if not seeded:
        return torch.rand(len(reqs), dtype=torch.float64, device=device)
    u = torch.empty(len(reqs), dtype=torch.float64, device=device)
    if len(seeded) < len(reqs):
        free = [j for j, r in enumerate(reqs) if r.generator is None]
        u[_ix(free, device)] = torch.rand(len(free), dtype=torch.float64, device=device)
    draws = []
    for j in seeded:
        gen = reqs[j].generator
        assert gen is not None
        draws.append(torch.rand(1, dtype=torch.float64, generator=gen, device=gen.device).to(device))
    u[_ix(seeded, device)] = torch.cat(draws)
    return u


def _draw(e: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF lookup of u * total in each row's weights, in float64 and two levels: blocks of BLOCK
    tokens, then the token inside the block (a float32 cumulative sum over 150k tokens blurs the tail)."""
    n, vp = e.shape
    blocks = e.view(n, vp // BLOCK, BLOCK)
    cb = blocks.sum(-1).cumsum(-1, dtype=torch.float64)
    total = cb[:, -1:]
    target = torch.minimum(u.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    # The first block whose cumulative weight exceeds the target; the clamps only matter for NaN weights,
    # which must not index out of range on a GPU (the caller then raises).
    b = torch.searchsorted(cb, target, right=True).clamp_(max=vp // BLOCK - 1)
    prev = torch.where(b > 0, cb.gather(1, (b - 1).clamp(min=0)), 0.0)
    inner = blocks[torch.arange(n, device=e.device), b[:, 0]].cumsum(-1, dtype=torch.float64)
    inner_total = inner[:, -1:]
    # The block's float32 sum and its float64 running sum differ by rounding: rescale, then stay inside.
    r = (target - prev) * (inner_total / (cb.gather(1, b) - prev))
    r = torch.minimum(r, torch.nextafter(inner_total, torch.zeros_like(inner_total)))
    j = torch.searchsorted(inner, r, right=True).clamp_(max=BLOCK - 1)
    return (b * BLOCK + j)[:, 0]


class _TokenHistory:
    """Prompt + output token tensors of the requests that use penalties, kept across steps so that each step
    converts only the newly generated tokens. Entries live while their request keeps using penalties."""

    __slots__ = ("_entries", "_vocab_size")

    def __init__(self, vocab_size: int) -> None:
        self._vocab_size = vocab_size
        self._entries: dict[int, _History] = {}

    def retain(self, reqs: list[Request]) -> None:
        live = {id(r) for r in reqs}
        if len(live) != len(self._entries) or any(k not in live for k in self._entries):
            self._entries = {k: h for k, h in self._entries.items() if k in live}

    def tokens(self, req: Request, *, output_only: bool) -> torch.Tensor:
        h = self._entries.get(id(req))
        if h is None or h.request is not req or not h.matches(req):
            h = _History(req, self._vocab_size)
            self._entries[id(req)] = h
        h.extend(req.output_token_ids[h.consumed :])
        return h.buf[h.num_prompt if output_only else 0 : h.size]


class _History:
    __slots__ = ("buf", "consumed", "last", "num_prompt", "request", "size", "vocab_size")

    def __init__(self, req: Request, vocab_size: int) -> None:
        self.request = req  # holds the request so its id() cannot be reused while the entry lives
        self.vocab_size = vocab_size
        prompt = _in_vocab(torch.tensor(req.prompt_token_ids, dtype=torch.long), vocab_size)
        self.num_prompt = self.size = prompt.numel()
        self.buf = torch.empty(max(2 * self.size, 64), dtype=torch.long)
        self.buf[: self.size] = prompt
        self.consumed = 0  # output tokens of the request taken in so far
        self.last = -1

    def matches(self, req: Request) -> bool:
        """Outputs only grow; if they shrank or changed, the entry is rebuilt."""
        out = req.output_token_ids
        return len(out) >= self.consumed and (self.consumed == 0 or out[self.consumed - 1] == self.last)

    def extend(self, new: list[int]) -> None:
        if not new:
            return
        t = _in_vocab(torch.tensor(new, dtype=torch.long), self.vocab_size)
        if self.size + t.numel() > self.buf.numel():
            grown = torch.empty(2 * (self.size + t.numel()), dtype=torch.long)
            grown[: self.size] = self.buf[: self.size]
            self.buf = grown
        self.buf[self.size : self.size + t.numel()] = t
        self.size += t.numel()
        self.consumed += len(new)
        self.last = new[-1]


def _in_vocab(t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Token ids outside the logits (a tokenizer larger than the LM head) have no logit to penalise."""
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
        return t[(t >= 0) & (t < vocab_size)]
    return t
