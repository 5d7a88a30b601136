"""The decode-step fusion pass, shared by the GPU backends that record a step before replaying it.

A recorded step is a list of ops `(name, args)` exactly as model.py called them. `Fuser.fuse` rewrites it into
fewer, larger ops where the pattern and the data flow allow it:

    [rms_norm] matmul q, k, v, rope q, rope k, attention -> gemv_qkv (norm, QKV, RoPE, KV write by slot) + attend
    [rms_norm] matmul gate, up, swiglu                   -> gemv_glu
    matmul, add (residual)                               -> gemv_res
    rms_norm, matmul                                     -> gemv_norm

A norm is only absorbed when its output is dead afterwards (overwritten before anything else reads it). The
backend supplies what differs: how a tensor is identified (`tid`, the start of its memory) and which GEMVs its
kernels take (`gemv_ok`); it implements `_do_<name>` for every fused op name it can receive.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Tensor

# Which op arguments each recorded op reads and writes (indices), for the liveness checks.
READS = {
    "embed": (1,),
    "rms_norm": (0,),
    "matmul": (0,),
    "rope": (0, 1),
    "attention": (0, 1, 2, 3, 4),  # and the KVIndex (arg 5), whose tensors no op of a step writes
    "swiglu": (0, 1),
    "add": (0, 1),
    "gather_rows": (0, 1),
    "all_reduce": (0,),
}
WRITES = {
    "embed": (2,),
    "rms_norm": (3,),
    "matmul": (2,),
    "rope": (0,),
    "attention": (3, 4, 6),
    "swiglu": (2,),
    "add": (2,),
    "gather_rows": (2,),
    "all_reduce": (0,),
}


class Fuser:
    def __init__(self, tid: Callable[[Tensor], object], gemv_ok: Callable[..., bool], kv_dtype: str = "f16"):
        self.tid = tid
        self.gemv_ok = gemv_ok  # gemv_ok(x, *weights): one fused GEMV kernel can take x with these weights
        self.kv_dtype = kv_dtype  # the KV-cache dtype gemv_qkv writes

    def fuse(self, ops: list) -> list:
        """Rewrite a recorded T=1 step into fused ops where the pattern and the data flow allow it."""
        plan, i = [], 0
        while i < len(ops):
            for pattern in (self._qkv, self._glu, self._res, self._norm):
                got = pattern(ops, i)
                if got:
                    fused, i = got
                    plan += fused
                    break
            else:
                plan.append(ops[i])
                i += 1
        return plan

    def _dead_after(self, ops: list, j: int, t: Tensor) -> bool:
        """True if `t` is overwritten after ops[j] before anything reads it (its value there is never used)."""
        p = self.tid(t)
        for name, args in ops[j + 1 :]:
            if any(self.tid(args[a]) == p for a in READS[name]):
                return False
            if any(self.tid(args[a]) == p for a in WRITES[name]):
                return True
        return False

    def _norm_prefix(self, ops: list, i: int, h: Tensor, last: int):
        """(x, norm) if ops[i] is rms_norm(x, w, eps, h) that the ops up to ops[last] can absorb, else None."""
        name, args = ops[i]
        tid = self.tid
        if name != "rms_norm" or tid(args[3]) != tid(h) or tid(args[0]) == tid(h) or args[0].dtype != "f32":
            return None
        return (args[0], (args[1], args[2])) if self._dead_after(ops, last, h) else None

    def _matmuls(self, ops: list, i: int, n: int):
        """n consecutive matmuls from ops[i] sharing their input, or None."""
        if i + n > len(ops) or any(ops[j][0] != "matmul" for j in range(i, i + n)):
            return None
        mm = [ops[j][1] for j in range(i, i + n)]
        x = mm[0][0]
        if any(self.tid(a[0]) != self.tid(x) for a in mm) or not self.gemv_ok(x, *(a[1] for a in mm)):
            return None
        return mm

    def _with_norm(self, ops: list, i: int, start: int, h: Tensor, last: int):
        """The GEMV input: (h, None) without a preceding norm, (x, norm) if ops[i] is an absorbable norm of x into h,
        None if there is a norm that cannot be absorbed."""
        if start == i:
            return h, None
        return self._norm_prefix(ops, i, h, last)

    def _qkv(self, ops, i):
        tid = self.tid
        start = i + 1 if ops[i][0] == "rms_norm" else i
        mm = self._matmuls(ops, start, 3)
        if mm is None or start + 6 > len(ops):
            return None
        (h, wq, q, bq), (_, wk, k, bk), (_, wv, v, bv) = mm
        (n1, r1), (n2, r2), (n3, at) = ops[start + 3], ops[start + 4], ops[start + 5]
        if (n1, n2, n3) != ("rope", "rope", "attention"):
            return None
        aq, ak, av, kc, vc, kv, out, hq, hkv, hd = at
        pos = kv.pos
        if (tid(r1[0]), tid(r2[0]), tid(aq), tid(ak), tid(av)) != (tid(q), tid(k), tid(q), tid(k), tid(v)):
            return None
        if r1[1:] != (pos, hq, hd, r1[4]) or r2[1:] != (pos, hkv, hd, r1[4]):
            return None
        if kc.dtype != self.kv_dtype or wq.shape[0] != hq * hd or wk.shape[0] != hkv * hd or wv.shape[0] != hkv * hd:
            return None
        got = self._with_norm(ops, i, start, h, start + 5)
        if got is None:
            return None  # leave the norm to run on its own; the matmuls fuse at the next index
        x, norm = got
        fused = [
            ("gemv_qkv", (x, norm, wq, wk, wv, bq, bk, bv, q, k, v, kv, r1[4], hd, kc, vc)),
            ("attend", (q, kc, vc, kv, out, hq, hkv, hd)),
        ]
        return fused, start + 6

    def _glu(self, ops, i):
        tid = self.tid
        start = i + 1 if ops[i][0] == "rms_norm" else i
        mm = self._matmuls(ops, start, 2)
        if mm is None or start + 3 > len(ops) or ops[start + 2][0] != "swiglu":
            return None
        (h, wg, g, bg), (_, wu, u, bu) = mm
        sg, su, so = ops[start + 2][1]
        if bg is not None or bu is not None or wg.shape[0] != wu.shape[0]:
            return None
        if tid(sg) != tid(g) or tid(su) != tid(u):
            return None
        if tid(so) != tid(g) and not self._dead_after(ops, start + 2, g):
            return None
        got = self._with_norm(ops, i, start, h, start + 2)
        if got is None:
            return None
        x, norm = got
        return [("gemv_glu", (x, norm, wg, wu, so, u))], start + 3

    def _res(self, ops, i):
        tid = self.tid
        if i + 2 > len(ops) or ops[i][0] != "matmul" or ops[i + 1][0] != "add":
            return None
        x, w, h, bias = ops[i][1]
        a, b, out = ops[i + 1][1]
        ids = (tid(a), tid(b))
        resid = a if ids[1] == tid(h) else b
        if tid(h) not in ids or tid(out) != tid(resid) or tid(resid) == tid(h) or tid(x) == tid(resid):
            return None
        if not self.gemv_ok(x, w) or out.dtype != "f32":
            return None
        return [("gemv_res", (x, w, bias, h, resid))], i + 2

    def _norm(self, ops, i):
        if i + 2 > len(ops) or ops[i][0] != "rms_norm" or ops[i + 1][0] != "matmul":
            return None
        h, w, out, bias = ops[i + 1][1]
        prefix = self._norm_prefix(ops, i, h, i + 1)
        if not prefix or not self.gemv_ok(prefix[0], w) or self.tid(out) == self.tid(prefix[0]):
            return None
        return [("gemv_norm", (prefix[0], prefix[1], w, bias, out))], i + 2


class OpRecorder:
    """The model-facing ops of a backend whose decode steps the fusion pass rewrites: while `_rec` is a list
    (replay() recording a step) each op is appended to it as (name, args); otherwise it runs now, as `_do_<name>`."""

    _rec: list | None = None

    def _op(self, name: str, *args) -> None:
        if self._rec is not None:
            self._rec.append((name, args))
        else:
            self._run_op(name, args)

    def _run_op(self, name: str, args: tuple) -> None:
        getattr(self, "_do_" + name)(*args)

    def embed(self, weight, ids, out) -> None:
        self._op("embed", weight, ids, out)

    def rms_norm(self, x, weight, eps, out) -> None:
        self._op("rms_norm", x, weight, eps, out)

    def matmul(self, x, weight, out, bias=None) -> None:
        self._op("matmul", x, weight, out, bias)

    def rope(self, x, pos, n_heads, head_dim, rope) -> None:
        self._op("rope", x, pos, n_heads, head_dim, rope)

    def attention(self, q, k, v, k_cache, v_cache, kv, out, n_heads, n_kv_heads, head_dim) -> None:
        self._op("attention", q, k, v, k_cache, v_cache, kv, out, n_heads, n_kv_heads, head_dim)

    def swiglu(self, gate, up, out) -> None:
        self._op("swiglu", gate, up, out)

    def add(self, a, b, out) -> None:
        self._op("add", a, b, out)

    def gather_rows(self, x, rows, out) -> None:
        self._op("gather_rows", x, rows, out)
