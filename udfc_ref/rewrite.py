"""Graph surgery: absorb T, t into a consumer (Eq. R2), shift a layer's
output mean (bias or following BN), and remove channels physically."""

from __future__ import annotations

import numpy as np

from .graph import Model, Node


def consumer_columns(model: Model, node: Node, n_channels: int) -> np.ndarray:
    """The consumer's weight as (O, N, R) float64: R = kh*kw for a conv,
    H*W (or 1) columns per channel for a linear layer."""
    w = model.tensors[node.params["weight"]].astype(np.float64)
    return w.reshape(w.shape[0], n_channels, -1)


def absorb(model: Model, node: Node, T: np.ndarray, t: np.ndarray, dtype, fast: bool = False) -> np.ndarray:
    """Eq. R2: W'_new[:, k] = sum_i W'[:, i] T[i, k];  output += sum_i W'[:, i] t_i.

    The consumer loses the pruned input columns (physical pruning).  The
    product is float64, or with ``fast`` float32 when the stored ``dtype`` is
    at most 32 bits wide (the result is stored in it anyway; relative
    difference ~1e-6, docs/derivation.md "Precision").  Returns the output
    shift ``sum_i W'[:, i] t_i`` (O,) float64."""
    w = model.tensors[node.params["weight"]]
    o, n, m = w.shape[0], T.shape[0], T.shape[1]
    work = np.float32 if fast and np.dtype(dtype).itemsize <= 4 else np.float64
    cols = w.reshape(o, n, -1)  # (O, N, R)
    r = cols.shape[2]
    Tw = T.astype(work, copy=False)
    if r == 1:  # one GEMM (O, N) x (N, M)
        new = (cols[:, :, 0].astype(work, copy=False) @ Tw)[:, :, None]
    else:  # one GEMM (O R, N) x (N, M), then back to (O, M, R)
        ct = np.ascontiguousarray(cols.transpose(0, 2, 1), dtype=work).reshape(o * r, n)
        new = (ct @ Tw).reshape(o, r, m).transpose(0, 2, 1)
    delta = np.einsum("onr,n->o", cols, t, dtype=np.float64)
    shape = (o, m) + w.shape[2:] if node.op == "conv2d" else (o, m * r)
    out = np.empty(shape, dtype=dtype)  # C order, as a loaded file has it
    np.copyto(out.reshape(o, m, r), new, casting="unsafe")
    model.tensors[node.params["weight"]] = out
    if np.any(delta != 0):
        shift_output(model, node, delta, dtype)
    return delta


def shift_output(model: Model, node: Node, delta: np.ndarray, dtype) -> None:
    """Add ``delta`` (O,) to the layer's output: into its bias, else into the
    running mean of a BN that reads it alone (BN(y + d) with mu - d), else a
    new bias tensor ``<layer>.bias``."""
    if "bias" in node.params:
        b = model.tensors[node.params["bias"]]
        model.tensors[node.params["bias"]] = (b.astype(np.float64) + delta).astype(b.dtype)
        return
    cs = model.consumers(node.output)
    if len(cs) == 1 and cs[0].op == "batch_norm" and node.output != model.output_name:
        key = cs[0].params["running_mean"]
        mu = model.tensors[key]
        model.tensors[key] = (mu.astype(np.float64) - delta).astype(mu.dtype)
        return
    wname = node.params["weight"]
    base = wname[: -len(".weight")] if wname.endswith(".weight") else node.name
    name = base + ".bias"
    i = 0
    while name in model.tensors:
        i += 1
        name = f"{base}.bias_{i}"
    model.tensors[name] = delta.astype(dtype)
    node.params["bias"] = name


def keep_outputs(model: Model, producer: Node, bn: Node, kept: np.ndarray) -> None:
    """Keep only ``kept`` output channels of the producer and its BN."""
    for node, roles in ((producer, ("weight", "bias")), (bn, ("weight", "bias", "running_mean", "running_var"))):
        for r in roles:
            if r in node.params:
                key = node.params[r]
                model.tensors[key] = np.ascontiguousarray(model.tensors[key][kept])


def keep_rows(model: Model, node: Node, kept: np.ndarray, roles=("weight", "bias")) -> None:
    """Keep only the ``kept`` entries along axis 0 of ``node``'s tensors of
    ``roles`` (the output rows of a layer, the entries of a per-channel affine)."""
    for r in roles:
        if r in node.params:
            key = node.params[r]
            model.tensors[key] = np.ascontiguousarray(model.tensors[key][kept])


def absorb_grouped(model: Model, node: Node, T: np.ndarray, t: np.ndarray, dtype) -> None:
    """Eq. R2 for a grouped conv consumer (``groups`` = G, weight
    (O, C/G, kh, kw)): ``T`` (C, M) is block diagonal with G blocks of
    (C/G, M/G) -- a channel is rebuilt from kept channels of its own block
    only -- so each block of O/G output rows absorbs its own block of T."""
    w = model.tensors[node.params["weight"]]
    g = node.attrs["groups"]
    o, cg = w.shape[:2]
    mg = T.shape[1] // g
    cols = w.astype(np.float64).reshape(g, o // g, cg, -1)  # (G, O/G, C/G, R)
    Tb = np.stack([T[b * cg:(b + 1) * cg, b * mg:(b + 1) * mg] for b in range(g)])  # (G, C/G, M/G)
    new = np.einsum("gocr,gck->gokr", cols, Tb, optimize=True).reshape((o, mg) + w.shape[2:])
    delta = np.einsum("gocr,gc->go", cols, t.reshape(g, cg)).reshape(o)
    model.tensors[node.params["weight"]] = np.ascontiguousarray(new, dtype=dtype)
    if np.any(delta != 0):
        shift_output(model, node, delta, dtype)
