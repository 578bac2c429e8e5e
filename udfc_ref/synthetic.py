"""Synthetic calibration images matched to the BatchNorm statistics (Eq. Z1-Z2).

No data: images are *optimised* until every BatchNorm layer of the network
sees, on them, the mean and variance its running statistics record
(the "distilled data" of ZeroQ, Cai et al., CVPR 2020).  They are then
ordinary calibration images for ``compress(..., calibration=x)`` (derivation
section 13): the sequential mode measures the pair statistics on them in the
network as it is compressed -- the data-free analogue of the sequential
oracle.  Derivation section 14 states the objective and what it does and
does not assume; ``docs/results.md`` measures it against the data-free
default and the real-image oracle.

The only gradient needed is that of the objective with respect to the input,
through the network: PyTorch's autograd does it (an optional extra, imported
lazily here; the network is rebuilt as a PyTorch module by
``converters.torch_export.to_module``).  NumPy measures the result
independently (:func:`bn_mismatch`) before anything is returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .calibrate import Moments, rows
from .errors import NumericError, OptionError, UDFCError
from .graph import Model

#: defaults of :func:`synthesize` (the CLI's too)
N_IMAGES = 256
STEPS = 500
LR = 0.1
BATCH = 128


@dataclass
class BNMismatch:
    """Eq. Z2 per BatchNorm node: relative mismatch of the batch statistics of
    its input on the images against its running statistics."""

    node: str
    mean: float  # ||mu_hat - mu|| / sqrt(sum sigma^2)
    var: float  # ||sigma_hat^2 - sigma^2|| / ||sigma^2||


def bn_nodes(model: Model) -> list:
    """The batch_norm nodes of ``model`` in topological order."""
    return [n for n in model.nodes if n.op == "batch_norm"]


def _stats_axes(ndim: int) -> tuple:
    """Axes a BN's batch statistics average over: all but the channel axis 1."""
    return (0,) + tuple(range(2, ndim))


def bn_mismatch(model: Model, x: np.ndarray, batch: int = 256) -> list[BNMismatch]:
    """Eq. Z2, measured with the NumPy forward (independent of the autograd
    used to optimise): for every BN node, the relative distance of the mean /
    variance of its input over the images ``x`` (all images and positions)
    to its ``running_mean`` / ``running_var``."""
    nodes = bn_nodes(model)
    acc = {n.name: Moments() for n in nodes}
    for i in range(0, len(x), batch):
        vals = model.forward(np.asarray(x[i:i + batch], dtype=np.float32), return_values=True)
        for n in nodes:
            v = rows(vals[n.inputs[0]])
            acc[n.name].add(v, v[:, :0])  # Eq. C1's streamed moments of ``a`` alone (no ``q`` columns)
    out = []
    for n in nodes:
        m = acc[n.name]
        mu_hat, var_hat = m.ma, m.va / m.n
        mu = model.tensors[n.params["running_mean"]].astype(np.float64)
        var = model.tensors[n.params["running_var"]].astype(np.float64)
        out.append(BNMismatch(n.name, float(np.linalg.norm(mu_hat - mu) / np.sqrt(max(var.sum(), 1e-300))),
                              float(np.linalg.norm(var_hat - var) / max(np.linalg.norm(var), 1e-300))))
    return out


def _check_options(model: Model, n: int, steps: int, lr: float, batch: int, threads) -> None:
    for name, v in (("n", n), ("steps", steps), ("batch", batch)) + ((("threads", threads),) if threads is not None else ()):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise OptionError(f"synthesize: {name} must be a positive integer, got {v!r}")
    if n < 2:
        raise OptionError(f"synthesize: n must be at least 2 (calibration needs two images), got {n}")
    if not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr > 0):
        raise OptionError(f"synthesize: lr must be a positive finite number, got {lr!r}")
    if not bn_nodes(model):
        raise UDFCError("synthesize: the model has no batch_norm layer; synthetic images are matched to "
                        "BatchNorm statistics (Eq. Z1), so there is nothing to match")
    for node in bn_nodes(model):
        for role in ("running_mean", "running_var"):
            if role not in node.params:
                raise UDFCError(f"synthesize: batch_norm '{node.name}' has no {role}")


def synthesize(model: Model, n: int = N_IMAGES, steps: int = STEPS, lr: float = LR, batch: int = BATCH,
               seed: int = 0, threads: int | None = None, progress: bool = False) -> np.ndarray:
    """Images whose BatchNorm input statistics match the running ones (Eq. Z1).

    Parameters
    ----------
    model : Model
        A udfc-ref model with at least one ``batch_norm`` node.
    n : int
        Number of images (default 256).
    steps : int
        Adam steps per batch (default 500).
    lr : float
        Adam step size on the pixels (default 0.1).
    batch : int
        Images optimised together (default 128): Eq. Z1 takes the
        statistics over one batch, so each batch matches them on its own;
        memory grows with it.
    seed : int
        Seed of the initial images ``x ~ N(0, 1)`` (deterministic).
    threads : int, optional
        PyTorch threads for the optimisation (default: PyTorch's setting);
        restored afterwards.  On a machine shared with other work, 1 is
        often much faster (measured on vgg_digits, 64 images, a loaded
        2-core machine: 0.75 s per step with 2 threads, 0.03 s with 1).
    progress : bool
        Draw a progress bar with a time estimate (on a terminal).

    Returns
    -------
    x : (n, C, H, W) float32
        Checked before it is returned: finite, and Eq. Z2 measured by the
        NumPy forward (:func:`bn_mismatch`) no worse than on the initial
        noise for every BN node.

    Raises
    ------
    OptionError, UDFCError, NumericError
        Bad options; no BatchNorm; PyTorch missing (ConversionError);
        the optimisation diverged (non-finite images).
    """
    _check_options(model, n, steps, lr, batch, threads)
    from converters.torch_common import torch_module  # noqa: PLC0415  (optional extra)
    from converters.torch_export import to_module  # noqa: PLC0415

    torch = torch_module()
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        out, x0 = _optimise(model, to_module(model), torch, n, steps, lr, batch, seed, progress)
    finally:
        torch.set_num_threads(saved)
    if not np.all(np.isfinite(out)):
        raise NumericError(f"synthesize: the optimisation diverged (non-finite pixels) at lr={lr}; try a smaller lr")
    before = bn_mismatch(model, x0)
    after = bn_mismatch(model, out)
    worse = [a.node for a, b in zip(after, before) if a.mean + a.var > b.mean + b.var + 1e-12]
    if worse:
        raise NumericError(f"synthesize: the images match the BatchNorm statistics of '{worse[0]}' worse than "
                           f"the initial noise does (Eq. Z2); try more steps or a smaller lr")
    return out


def _optimise(model, module, torch, n, steps, lr, batch, seed, progress):
    """Adam on the pixels of each batch (Eq. Z1); returns (images, initial images)."""
    from .progress import Progress

    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((n,) + tuple(model.input_shape)).astype(np.float32)
    out = np.empty_like(x0)
    batches = [(i, min(i + batch, n)) for i in range(0, n, batch)]
    with Progress(len(batches) * steps, "synthesize", enabled=None if progress else False) as bar:
        for bi, (lo, hi) in enumerate(batches):
            xb = torch.tensor(x0[lo:hi], dtype=dtype, requires_grad=True)
            opt = torch.optim.Adam([xb], lr=lr)
            for step in range(steps):
                opt.zero_grad()
                loss = bn_matching_loss(module, xb, torch)
                loss.backward()
                opt.step()
                bar.update(bi * steps + step + 1, f"batch {bi + 1}/{len(batches)} loss {float(loss.detach()):.3g}")
            out[lo:hi] = xb.detach().cpu().numpy().astype(np.float32)
    return out, x0


def bn_matching_loss(module, x, torch):
    """Eq. Z1 on one batch: ``sum_l ||mu_hat_l - mu_l||^2 / sum(sigma_l^2)
    + ||sigma_hat_l^2 - sigma_l^2||^2 / ||sigma_l^2||^2`` over the BN layers
    ``l`` of the rebuilt module, ``mu_hat, sigma_hat^2`` the batch mean and
    (biased) variance of the layer's input over images and positions."""
    recorded = []

    class _Recorder(torch.fx.Interpreter):
        def call_module(self, target, args, kwargs):
            sub = self.fetch_attr(target)
            if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
                recorded.append((args[0], sub.running_mean, sub.running_var))
            return super().call_module(target, args, kwargs)

        def call_function(self, target, args, kwargs):
            if target is torch.nn.functional.batch_norm:
                recorded.append((args[0], args[1], args[2]))
            return super().call_function(target, args, kwargs)

    _Recorder(module).run(x)
    loss = x.new_zeros(())
    for v, mu, var in recorded:
        axes = _stats_axes(v.dim())
        m = v.mean(axes)
        s2 = ((v - m.reshape((1, -1) + (1,) * (v.dim() - 2))) ** 2).mean(axes)
        loss = loss + ((m - mu) ** 2).sum() / var.sum().clamp_min(1e-30) \
            + ((s2 - var) ** 2).sum() / (var**2).sum().clamp_min(1e-30)
    return loss
