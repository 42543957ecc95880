"""The fast engine (``training.engine: fast``): the built-in MLP's training step without autograd, Lightning
or the optimizer's Python loop, bit-identical to the eager step it replaces.

Per batch the eager step (`shards.models.SisaModule._chunk_step` with ``engine: eager``) costs about 5x
the arithmetic on the side-by-side workload: autograd builds and walks a graph, and torch's CPU Adam loops
over the parameters in Python, 7 small kernels each. `FastMLP` calls the very kernels autograd would call,
with the same operands in the same layouts (``addmm`` forward, ``nll_loss_backward`` and
``_log_softmax_backward_data``, ``mm`` of the transposed gradient for each weight, ``sum(0)`` for each
bias, ``threshold_backward`` for ReLU, the dropout mask product), so the gradients are the same bits.
The optimizer update is torch's single-tensor Adam / SGD formula, op for op, but applied once to flat
buffers that hold every parameter, gradient and state tensor (each starting 64-byte aligned): the ops
are elementwise, so each element gets the same bits as in the per-tensor loop. The optimizer's own
state tensors become views into those buffers, so its ``state_dict`` (the checkpoint) is unchanged.
An Adam built with ``fused=True`` (the built-ins' under bf16-mixed, `shards.models.SisaModule`) is
stepped by the very kernel its ``step`` calls, ``torch._fused_adam_``, on the same per-parameter
tensors (views of the flat buffers): the kernel rounds each tensor's vectorised body and its scalar
tail differently, so one call on the flat buffers would give other bits than torch's.

With ``training.precision: bf16-mixed`` the step is the eager step under ``torch.autocast(cpu, bfloat16)``,
op for op as autograd runs it (`FastMLP.step`): the fp32 master weights, the update and the loss stay
fp32, each GEMM and the activations between them are bfloat16 (on a CPU with avx512_bf16 about 1.8x the
fp32 GEMM rate for the suite's 256-wide layers, slower for narrow ones: see the README), and Adam is the
fused one (a third of the for-loop update's time on the suite's MLP).

`build` returns None where this does not hold (another net, optimizer or option): the caller then runs
the eager step. tests/test_fast_training.py checks the bit identity on every run, including the last,
smaller batch of an epoch, dropout, weight decay, momentum, a resumed optimizer and the LR scheduler.
"""

from __future__ import annotations

import torch
from torch import nn

BF16 = torch.bfloat16
ALIGN = 16  # floats: every tensor starts on a 64-byte boundary of its flat buffer
# resolved overloads: calling them skips the overload lookup of torch.ops.aten.<name>(...)
_NLL_FORWARD = torch.ops.aten.nll_loss_forward.default
_NLL_BACKWARD = torch.ops.aten.nll_loss_backward.default
_RELU_BACKWARD = torch.ops.aten.threshold_backward.default


def _blocks(net: nn.Module) -> list[tuple[nn.Linear, bool, float]] | None:
    """(linear, relu after it, dropout p after that) per layer of a `shards.models.MLP`, or None."""
    layers = list(getattr(net, "layers", []))
    if not layers or not isinstance(layers[0], nn.Flatten) or type(net).__name__ != "MLP":
        return None
    blocks: list[list] = []
    for layer in layers[1:]:
        if type(layer) is nn.Linear:
            blocks.append([layer, False, 0.0])
        elif type(layer) is nn.ReLU and blocks and not blocks[-1][1]:
            blocks[-1][1] = True
        elif type(layer) is nn.Dropout and blocks and blocks[-1][1] and not blocks[-1][2]:
            blocks[-1][2] = float(layer.p)
        else:
            return None
    if not blocks or blocks[-1][1] or any(lin.bias is None for lin, _, _ in blocks):
        return None
    return [tuple(b) for b in blocks]


def _plain_group(opt: torch.optim.Optimizer) -> dict | None:
    """The single param group of a torch Adam or SGD in its default (single-tensor, for-loop) mode, or of
    an Adam with ``fused=True``."""
    if type(opt) not in (torch.optim.Adam, torch.optim.SGD) or len(opt.param_groups) != 1:
        return None
    g = opt.param_groups[0]
    if g.get("fused") and type(opt) is not torch.optim.Adam:
        return None
    if g.get("foreach") or g.get("differentiable") or g.get("capturable") or g.get("maximize"):
        return None
    if type(opt) is torch.optim.Adam and (g.get("amsgrad") or g.get("decoupled_weight_decay")):
        return None
    if type(opt) is torch.optim.SGD and g.get("nesterov"):
        return None
    for name in ("lr", "weight_decay", "momentum", "dampening"):
        if isinstance(g.get(name), torch.Tensor):
            return None
    return g


def build(net: nn.Module, opt: torch.optim.Optimizer, bf16: bool = False) -> FastMLP | None:
    """The fast step for ``net`` trained by ``opt`` (``bf16``: under bf16 autocast), or None where the eager
    step must run."""
    blocks, group = _blocks(net), _plain_group(opt)
    if blocks is None or group is None:
        return None
    params = [p for lin, _, _ in blocks for p in (lin.weight, lin.bias)]
    if [id(p) for p in group["params"]] != [id(p) for p in params]:
        return None
    if any(p.dtype != torch.float32 or p.device.type != "cpu" or not p.requires_grad for p in params):
        return None
    keys = {frozenset(opt.state.get(p, {})) for p in params}
    wanted = {frozenset(), frozenset({"step", "exp_avg", "exp_avg_sq"})} if type(opt) is torch.optim.Adam else None
    if len(keys) != 1 or (wanted is not None and keys.pop() not in wanted):
        return None  # a partly initialised state: leave it to torch
    if type(opt) is torch.optim.Adam:
        steps = {float(opt.state[p]["step"]) for p in params if opt.state.get(p)}
        if len(steps) > 1:
            return None
    return FastMLP(blocks, opt, params, bf16)


class FastMLP:
    def __init__(self, blocks, opt, params: list[nn.Parameter], bf16: bool = False):
        self.blocks, self.opt, self.params, self.bf16 = blocks, opt, params, bf16
        self.adam = type(opt) is torch.optim.Adam
        self.fused = self.adam and bool(opt.param_groups[0].get("fused"))
        self._step = torch.zeros(())  # the fused kernel's step count, read by it for every parameter
        self._one = torch.ones(())  # d loss / d loss, as autograd seeds the backward pass
        sizes = [-(-p.numel() // ALIGN) * ALIGN for p in params]
        total = sum(sizes)
        self.P, self.G, self.M, self.V = (torch.zeros(total) for _ in range(4))
        self.grads: list[torch.Tensor] = []
        self._m_views: list[torch.Tensor] = []
        self._v_views: list[torch.Tensor] = []
        self._p_views: list[torch.Tensor] = []
        off = 0
        for p, size in zip(params, sizes):
            view = lambda buf, p=p, off=off: buf[off : off + p.numel()].view_as(p)  # noqa: E731
            with torch.no_grad():
                view(self.P).copy_(p)
            p.data = view(self.P)
            self.grads.append(view(self.G))
            self._m_views.append(view(self.M))
            self._p_views.append(view(self.P))
            self._v_views.append(view(self.V))
            off += size
        # per layer: weight, its transpose, bias (detached views of the flat buffer, built once: the same
        # operands as the module's own, without an attribute lookup and a transpose per step), relu, p
        self.layers = [(lin.weight.detach(), lin.weight.detach().t(), lin.bias.detach(), r, q) for lin, r, q in blocks]
        self.D = torch.zeros(total)  # Adam's denominator, computed in place each step
        self._bind_state()

    def _bind_state(self) -> None:
        """Make the optimizer's state tensors views into the flat buffers (created as torch would)."""
        state = self.opt.state
        first = state.get(self.params[0]) or {}
        if self.adam:
            self.count = int(float(first["step"])) if first else 0
            for p, m, v in zip(self.params, self._m_views, self._v_views):
                st = state[p]
                if st:
                    m.copy_(st["exp_avg"])
                    v.copy_(st["exp_avg_sq"])
                else:
                    st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["exp_avg"], st["exp_avg_sq"] = m, v
        else:
            self.has_buf = "momentum_buffer" in first
            for p, m in zip(self.params, self._m_views):
                if self.has_buf:
                    m.copy_(state[p]["momentum_buffer"])
                    state[p]["momentum_buffer"] = m

    def sync(self) -> None:
        """Write the step count into the optimizer's state (its state_dict is then what torch's would be)."""
        if self.adam:
            for p in self.params:
                self.opt.state[p]["step"].fill_(float(self.count))

    @torch.no_grad()
    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on the batch (x, y); returns (loss, logits) as the eager step computes them.

        Under bf16-mixed, as autograd runs the eager step under bf16 autocast: each Linear casts its input,
        weight and bias to bf16 (the weight's copy contiguous, its transpose a view: `step`'s layouts) and
        its ``addmm`` returns bf16; ReLU, dropout and their gradients are bf16; the logits are cast to fp32
        for the loss, their gradient back to bf16; each parameter's bf16 gradient is cast to fp32."""
        bf16 = self.bf16
        h = x.flatten(1)
        inputs, saved, weights = [], [], []  # each Linear's input; (relu output, dropout noise) after it
        for w, wt, bias, relu, p in self.layers:
            if bf16:
                h, w = h.to(BF16), w.to(BF16)
                wt, bias = w.t(), bias.to(BF16)
            inputs.append(h)
            weights.append(w)
            h = torch.addmm(bias, h, wt)
            r = noise = None
            if relu:
                h = r = torch.relu(h)
            if p:
                # torch.dropout on CPU: a Bernoulli(1-p) mask scaled by 1/(1-p), times the input
                noise = torch.empty_like(h).bernoulli_(1 - p).div_(1 - p)
                h = h * noise
            saved.append((r, noise))
        logits = h.float() if bf16 else h
        logp = torch._log_softmax(logits, 1, False)
        loss, total_weight = _NLL_FORWARD(logp, y, None, 1, -100)
        g = _NLL_BACKWARD(self._one, logp, y, None, 1, -100, total_weight)
        g = torch._log_softmax_backward_data(g, logp, 1, torch.float32)
        self._backward(g.to(BF16) if bf16 else g, inputs, saved, weights)
        self._update()
        return loss, logits

    def _backward(self, g: torch.Tensor, inputs: list, saved: list, weights: list) -> None:
        """Each layer's gradients, last to first, into the flat gradient buffer (cast to fp32 from bf16)."""
        for i in range(len(self.layers) - 1, -1, -1):
            r, noise = saved[i]
            if noise is not None:
                g = g * noise
            if r is not None:
                g = _RELU_BACKWARD(g, r, 0)
            if g.dtype == torch.float32:
                torch.mm(g.t(), inputs[i], out=self.grads[2 * i])
                torch.sum(g, 0, out=self.grads[2 * i + 1])
            else:
                self.grads[2 * i].copy_(torch.mm(g.t(), inputs[i]))
                self.grads[2 * i + 1].copy_(torch.sum(g, 0))
            if i > 0:
                g = g.mm(weights[i])

    def _update(self) -> None:
        """torch's single-tensor Adam / SGD step, on all parameters at once (or its fused Adam)."""
        group = self.opt.param_groups[0]
        if self.fused:
            self._fused_adam(group)
            return
        lr, wd = float(group["lr"]), group["weight_decay"]
        P, G, M = self.P, self.G, self.M
        grad = G.add(P, alpha=wd) if wd != 0 else G
        if self.adam:
            beta1, beta2 = group["betas"]
            self.count += 1
            step = float(self.count)
            M.lerp_(grad, 1 - beta1)
            self.V.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = lr / bias_correction1
            # torch: (V.sqrt() / bias_correction2**0.5).add_(eps); the same elementwise ops, in place
            denom = torch.sqrt(self.V, out=self.D).div_(bias_correction2**0.5).add_(group["eps"])
            P.addcdiv_(M, denom, value=-step_size)
            return
        momentum = group["momentum"]
        if momentum != 0:
            if not self.has_buf:  # torch's first step: the buffer is a copy of the gradient
                M.copy_(grad)
                self.has_buf = True
                for p, m in zip(self.params, self._m_views):
                    self.opt.state[p]["momentum_buffer"] = m
            else:
                M.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            grad = M
        P.add_(grad, alpha=-lr)

    def _fused_adam(self, group: dict) -> None:
        """torch's fused Adam step (`torch.optim.adam._fused_adam` on the CPU, without a grad scaler): the
        kernel adds ``weight_decay * param`` to the gradient (Adam's L2, not AdamW's decoupled decay)."""
        self.count += 1
        self._step.fill_(float(self.count))
        beta1, beta2 = group["betas"]
        n = len(self._p_views)
        torch._fused_adam_(
            self._p_views,
            self.grads,
            self._m_views,
            self._v_views,
            [],
            [self._step] * n,
            amsgrad=False,
            lr=float(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )
