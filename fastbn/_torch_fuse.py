"""``fastbn.torch.fuse(model)``: batch norm + (add +) ReLU chains as one fastbn module.

Re-exported by :mod:`fastbn.torch` (import it from there)::

    import fastbn.torch as fbt
    fused = fbt.fuse(fbt.convert(model))     # a torch.fx.GraphModule sharing model's tensors
    y = fbt.BatchNormReLU2d(64)(x, residual)  # relu(bn(x) + residual), or relu(bn(x))

Two pieces:

* :class:`BatchNormReLU1d`, :class:`BatchNormReLU2d`, :class:`BatchNormReLU3d`:
  fastbn's ``BatchNorm*d`` (so also ``torch.nn.BatchNorm*d``: same arguments,
  parameters, buffers and ``state_dict`` keys) whose ``forward(x, residual=None)``
  returns ``relu(bn(x))``, or ``relu(bn(x) + residual)``.  In eager mode, on
  inputs fastbn takes, that is one fastbn kernel each way
  (:func:`fastbn.batch_norm_forward` with ``relu=True`` and
  :func:`fastbn.batch_norm_add_relu_forward`, and their backwards) through a
  ``torch.autograd.Function``; everywhere else (small inputs, a residual of another
  shape, dtype, device or layout, CUDA, odd strides, under ``torch.compile``) it is
  the module's batch norm followed by PyTorch's add and ReLU, so inductor fuses
  them itself when compiling.
* :func:`fuse`: a torch.fx pass that finds ``BatchNorm -> ReLU`` and
  ``BatchNorm -> add -> ReLU`` chains in a model and puts those modules in place of
  the batch norms.
"""

from __future__ import annotations

import copy
import functools
import operator
import sys
import warnings

import torch
import torch.fx
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional as _fn
from . import torch as _bridge
from .residual import (
    batch_norm_add_relu_backward,
    batch_norm_add_relu_forward,
    batch_norm_add_relu_inference,
)
from .torch import (
    _DOUBLE_BACKWARD,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    _dy_to_numpy,
    _empty_output,
    _fastbn_layout,
    _parameter,
    _parameters_fit,
    _to_numpy,
)

__all__ = ["BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d", "fuse"]


# ---------------------------------------------------------------------------
# Autograd: the fused kernels (eager mode)
# ---------------------------------------------------------------------------


def _grad(array):
    return None if array is None else torch.from_numpy(array)


def _keep_context(ctx, fastbn_ctx, layout: str) -> torch.Tensor:
    """Keep the forward's fastbn context for the backward; its statistics as an output."""
    ctx.fastbn, ctx.layout = fastbn_ctx, layout
    stats = torch.from_numpy(fastbn_ctx._stats)
    ctx.mark_non_differentiable(stats)
    return stats


class _BatchNormReLUFunction(torch.autograd.Function):
    """``relu(bn(x))`` in training mode: ``(y, stats)``; the backward recomputes the ReLU
    mask from ``x`` (fastbn's ``relu=True``), so nothing more than ``x`` is kept."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        layout = _fastbn_layout(x)
        array, axis = _to_numpy(x, layout)
        y, out = _empty_output(x, layout)
        _, fctx = _fn.batch_norm_forward(array, _parameter(weight), _parameter(bias), eps=eps,
                                         axis=axis, relu=True, out=out)
        ctx.save_for_backward(x)  # autograd's version check: x must not change meanwhile
        return y, _keep_context(ctx, fctx, layout)

    @staticmethod
    def backward(ctx, dy, _dstats):
        if torch.is_grad_enabled():  # create_graph=True: a double backward is coming
            raise RuntimeError(_DOUBLE_BACKWARD)
        (x,) = ctx.saved_tensors
        layout = ctx.layout
        dy_array = _dy_to_numpy(dy, x, layout)
        dx, out = _empty_output(x, layout)
        _, dgamma, dbeta = _fn.batch_norm_backward(dy_array, ctx.fastbn, out=out)
        return dx, _grad(dgamma), _grad(dbeta), None


class _BatchNormAddReLUFunction(torch.autograd.Function):
    """``relu(bn(x) + residual)`` in training mode: ``(y, stats)``.  The backward takes the
    ReLU mask from ``y`` (as PyTorch's ReLU does), so ``y`` is saved too: an in-place
    change of it before the backward raises autograd's usual error."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        layout = _fastbn_layout(x)
        array, axis = _to_numpy(x, layout)
        r_array, _ = _to_numpy(residual, layout)
        y, out = _empty_output(x, layout)
        _, fctx = batch_norm_add_relu_forward(array, r_array, _parameter(weight),
                                              _parameter(bias), eps=eps, axis=axis, out=out)
        ctx.save_for_backward(x, y)
        return y, _keep_context(ctx, fctx, layout)

    @staticmethod
    def backward(ctx, dy, _dstats):
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        x, _y = ctx.saved_tensors
        layout = ctx.layout
        dy_array = _dy_to_numpy(dy, x, layout)
        dx, out = _empty_output(x, layout)
        dr, out_residual = _empty_output(x, layout)
        _, _, dgamma, dbeta = batch_norm_add_relu_backward(dy_array, ctx.fastbn, out=out,
                                                           out_residual=out_residual)
        return dx, dr, _grad(dgamma), _grad(dbeta), None


# ---------------------------------------------------------------------------
# The modules
# ---------------------------------------------------------------------------


def _own_state(module: torch.nn.Module) -> dict:
    """``module.__dict__`` for a new module object: the same tensors, submodules and hooks
    in containers of its own (``_parameters``, ``_buffers``, ``_modules``, the hook
    dicts...), so registering on one never changes the other."""
    state = dict(module.__dict__)
    for name, value in state.items():
        if name.startswith("_") and isinstance(value, (dict, set)):
            state[name] = copy.copy(value)
    return state


def _residual_fits(residual, x: torch.Tensor) -> bool:
    """Whether the fused kernel can take ``residual`` with ``x`` (layout checked later)."""
    return (type(residual) is torch.Tensor and residual.shape == x.shape
            and residual.dtype == x.dtype and residual.device == x.device)


class _BatchNormReLUMixin:
    """``forward(x, residual=None)``: ``relu(bn(x) [+ residual])`` (``self`` is one of
    fastbn's ``BatchNorm*d``)."""

    #: How the add was spelled where :func:`fuse` found it: ``y.add_(residual)`` keeps the
    #: batch norm's dtype; ``y + residual`` promotes (used only where the kernel cannot run).
    _inplace_add = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():  # PyTorch's ops: inductor fuses them itself
            return self._relu_of(self._compiled_forward(x), residual)
        if x.numel() < _bridge.TORCH_BELOW:
            return self._relu_of(self._small_forward(x), residual)
        if type(x) is not torch.Tensor or (residual is not None
                                          and not _residual_fits(residual, x)):
            return self._relu_of(self._fastbn_forward(x), residual)
        return self._fused_forward(x, residual)

    def _relu_of(self, y: torch.Tensor, residual) -> torch.Tensor:
        """The unfused composition after the batch norm ``y`` (a fresh tensor that nothing
        else sees, so the in-place ops are safe: batch norm's backward does not use its
        output)."""
        if residual is not None:
            y = y.add_(residual) if self._inplace_add else y + residual
        return torch.relu_(y)

    def _fused_forward(self, x: torch.Tensor, residual) -> torch.Tensor:
        layout = _fastbn_layout(x)
        if (layout is None or not _parameters_fit(self.weight, x)
                or (residual is not None and _fastbn_layout(residual) != layout)):
            return self._relu_of(self._fastbn_forward(x), residual)  # its own fallbacks
        self._check_input_dim(x)
        if not self._use_batch_stats():
            return self._fused_inference(x, residual, layout)
        count = x.numel() // x.shape[1]
        if count < 2:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{x.size()}")
        eps = float(self.eps)
        if residual is None:
            y, stats = _BatchNormReLUFunction.apply(x, self.weight, self.bias, eps)
        else:
            y, stats = _BatchNormAddReLUFunction.apply(x, residual, self.weight, self.bias, eps)
        if self.training and self.track_running_stats:
            self._update_running_stats(stats, count)
        return y

    def _fused_inference(self, x: torch.Tensor, residual, layout: str) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or (
                residual is not None and residual.requires_grad)):
            return self._relu_of(self._inference(x, layout), residual)  # PyTorch's autograd
        array, axis = _to_numpy(x, layout)
        y, out = _empty_output(x, layout)
        stats = (_parameter(self.running_mean), _parameter(self.running_var),
                 _parameter(self.weight), _parameter(self.bias))
        if residual is None:
            _fn.batch_norm_inference(array, *stats, eps=float(self.eps), axis=axis, relu=True,
                                     out=out)
        else:
            batch_norm_add_relu_inference(array, _to_numpy(residual, layout)[0], *stats,
                                          eps=float(self.eps), axis=axis, out=out)
        return y

    @classmethod
    def _from_batch_norm(cls, bn: _BatchNorm, inplace_add: bool = False):
        """A module of this class computing with ``bn``'s own ``Parameter`` and buffer
        objects (so the same ``state_dict``), ``bn`` itself untouched."""
        fused = cls.__new__(cls)
        state = _own_state(bn)
        state.pop("_fastbn_guard", None)  # the small path's cache: rebuilt for this module
        object.__setattr__(fused, "__dict__", state)
        if inplace_add:
            fused._inplace_add = True
        return fused


class BatchNormReLU1d(_BatchNormReLUMixin, BatchNorm1d):
    """``relu(BatchNorm1d(x))``, or ``relu(BatchNorm1d(x) + residual)``, fused by fastbn.

    Arguments, parameters, buffers and ``state_dict`` keys are those of
    ``torch.nn.BatchNorm1d`` (it is one); ``forward(x, residual=None)``.
    """


class BatchNormReLU2d(_BatchNormReLUMixin, BatchNorm2d):
    """``relu(BatchNorm2d(x))``, or ``relu(BatchNorm2d(x) + residual)``, fused by fastbn.

    Arguments, parameters, buffers and ``state_dict`` keys are those of
    ``torch.nn.BatchNorm2d`` (it is one); ``forward(x, residual=None)``.  In eager
    mode, on CPU tensors fastbn takes (see :mod:`fastbn.torch`) of at least
    :data:`~fastbn.torch.TORCH_BELOW` elements and a residual of ``x``'s shape,
    dtype and layout, the training step is fastbn's fused kernels, two sweeps over
    memory each way; everywhere else, and under ``torch.compile``, it is the batch
    norm followed by PyTorch's add and ReLU.  Running statistics are updated exactly
    as by the batch norm alone.
    """


class BatchNormReLU3d(_BatchNormReLUMixin, BatchNorm3d):
    """``relu(BatchNorm3d(x))``, or ``relu(BatchNorm3d(x) + residual)``, fused by fastbn.

    Arguments, parameters, buffers and ``state_dict`` keys are those of
    ``torch.nn.BatchNorm3d`` (it is one); ``forward(x, residual=None)``.
    """


#: The batch norms fuse() replaces (exact classes: subclasses and SyncBatchNorm stay).
_FUSED = {torch.nn.BatchNorm1d: BatchNormReLU1d, torch.nn.BatchNorm2d: BatchNormReLU2d,
          torch.nn.BatchNorm3d: BatchNormReLU3d, BatchNorm1d: BatchNormReLU1d,
          BatchNorm2d: BatchNormReLU2d, BatchNorm3d: BatchNormReLU3d}


# ---------------------------------------------------------------------------
# The torch.fx pass
# ---------------------------------------------------------------------------


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with every batch norm a leaf (fastbn's modules branch on the
    input's size, which a symbolic trace cannot follow)."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, module_qualified_name)


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _has_hooks(module: torch.nn.Module) -> bool:
    return any(getattr(module, name, None) for name in _HOOKS)


def _only_use(node: torch.fx.Node, of: torch.fx.Node) -> bool:
    """``of`` occurs exactly once among ``node``'s arguments."""
    return sum(a is of for a in node.args) + sum(v is of for v in node.kwargs.values()) == 1


def _is_relu(node: torch.fx.Node, arg: torch.fx.Node, modules: dict) -> bool:
    """``node`` is a ReLU of ``arg`` (any spelling, in place or not)."""
    if not node.args or node.args[0] is not arg or not _only_use(node, arg):
        return False
    if node.op == "call_module":
        module = modules.get(node.target)
        return (type(module) is torch.nn.ReLU and not _has_hooks(module)
                and len(node.args) == 1 and not node.kwargs)
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        if node.target is F.relu:  # F.relu(x, inplace=False): the flag alone may follow
            return len(node.args) + len(node.kwargs) <= 2 and set(node.kwargs) <= {"inplace"}
        return len(node.args) == 1 and not node.kwargs
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return len(node.args) == 1 and not node.kwargs
    return False


def _residual_of(node: torch.fx.Node, bn: torch.fx.Node):
    """``(residual, inplace)`` when ``node`` is a plain two-tensor ``bn + residual``, else
    None.  In-place adds count only when they write ``bn``'s output (``out += identity``,
    ``out.add_(identity)``), never the residual."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        inplace = node.target is operator.iadd
    elif node.op == "call_method" and node.target in ("add", "add_"):
        inplace = node.target == "add_"
    else:
        return None
    kwargs = dict(node.kwargs)
    if kwargs.pop("alpha", 1) != 1 or kwargs or len(node.args) != 2:
        return None  # alpha, out=, anything else
    a, b = node.args
    if a is bn and isinstance(b, torch.fx.Node) and b is not bn:
        return b, inplace
    if b is bn and isinstance(a, torch.fx.Node) and not inplace:
        return a, False
    return None


def _find_chains(graph: torch.fx.Graph, root: torch.nn.Module):
    """``[(bn_node, add_node or None, relu_node, inplace_add)]``: the chains that are safe
    to fuse, each add and ReLU in one chain at most (``relu(bn1(a) + bn2(b))``: the
    first batch norm)."""
    modules = dict(root.named_modules())
    names = {}
    for _, module in root.named_modules(remove_duplicate=False):
        names[id(module)] = names.get(id(module), 0) + 1
    calls, read = {}, set()
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            read.add(node.target.rpartition(".")[0])
    chains, taken = [], set()
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        module = modules.get(node.target)
        if (type(module) not in _FUSED or _has_hooks(module) or calls[node.target] != 1
                or names[id(module)] != 1 or node.target in read):
            continue  # not one of ours, watched, shared, or its state read elsewhere
        if (len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node)
                or len(node.users) != 1):
            continue  # the batch norm's output must go to the add or ReLU alone
        (user,) = node.users
        if user in taken:
            continue
        if _is_relu(user, node, modules):
            chains.append((node, None, user, False))
            taken.add(user)
            continue
        found = _residual_of(user, node)
        if found is None or len(user.users) != 1:
            continue
        (relu,) = user.users
        if _is_relu(relu, user, modules):
            chains.append((node, user, relu, found[1]))
            taken.update((user, relu))
    return chains


def _trace(root: torch.nn.Module, training: bool):
    """``(graph, new attributes)`` of ``root`` traced with every module in ``training``
    mode.  The tracer stores tensor constants as new attributes of ``root``: they are
    taken off it again (``root`` is left as it was)."""
    modes = [(m, m.training) for m in root.modules()]
    before = set(root.__dict__)
    try:
        root.train(training)
        graph = _Tracer().trace(root)
    finally:
        for m, mode in modes:
            m.training = mode
        added = {k: root.__dict__.pop(k) for k in set(root.__dict__) - before}
    return graph, added


def _mirror(module: torch.nn.Module, replace: dict, prefix: str) -> torch.nn.Module:
    """A copy of ``module``'s hierarchy that holds the modules of ``replace`` (qualified
    name -> module) in place of the originals: the containers on the way are new objects
    (with the same tensors), everything else is shared.  The copied containers cannot be
    called: their forward would now run fused batch norms."""
    clone = module.__class__.__new__(module.__class__)
    state = _own_state(module)
    state["forward"] = functools.partial(_container_forward, type(module).__name__)
    object.__setattr__(clone, "__dict__", state)
    children = clone._modules
    for name, child in children.items():
        qualified = prefix + name
        if qualified in replace:
            children[name] = replace[qualified]
        elif child is not None and any(k.startswith(qualified + ".") for k in replace):
            children[name] = _mirror(child, replace, qualified + ".")
    return clone


def _container_forward(name: str, *args, **kwargs):
    raise RuntimeError(
        f"this {name} is a container inside the GraphModule returned by fastbn.torch.fuse: "
        f"its batch norms now include the add/ReLU that followed them, so it cannot run "
        f"on its own; call the GraphModule (or the model given to fuse)")


def _untouched(model: torch.nn.Module, why: str, stacklevel: int = 3) -> torch.nn.Module:
    warnings.warn(f"fastbn.torch.fuse: {type(model).__name__} returned unchanged: {why}",
                  UserWarning, stacklevel=stacklevel)
    return model


def fuse(model: torch.nn.Module) -> torch.nn.Module:
    """Fuse ``BatchNorm -> ReLU`` and ``BatchNorm -> add -> ReLU`` chains of ``model``.

    ``model`` is traced with ``torch.fx`` (every batch norm a leaf module); each chain
    whose batch norm is an exact ``torch.nn.BatchNorm{1,2,3}d`` or fastbn's
    ``BatchNorm{1,2,3}d`` (after :func:`~fastbn.torch.convert`) becomes one
    :class:`BatchNormReLU1d`/``2d``/``3d`` call, ``relu(bn(x))`` or
    ``relu(bn(x) + residual)``.  ReLU spellings: ``nn.ReLU`` (``inplace`` or not),
    ``F.relu`` (``inplace`` or not), ``F.relu_``, ``torch.relu``, ``torch.relu_``,
    ``Tensor.relu``/``relu_``; adds: ``out + identity``, ``identity + out``,
    ``out += identity``, ``torch.add`` (no ``alpha``), ``Tensor.add``/``add_``.  Only
    chains where nothing else can see the difference are fused: the batch norm's
    output goes to the add or ReLU alone, the add's output to the ReLU alone, an
    in-place add writes the batch norm's output (not the residual), the batch norm is
    called once, has no hooks and is not shared.  Everything else stays as it was:
    subclasses, ``SyncBatchNorm``, other activations, batch norms with other users.

    Returns a new ``torch.fx.GraphModule`` with the module hierarchy of ``model``:
    the fused modules sit at their batch norms' names and hold the *same*
    ``Parameter`` and buffer objects, every other submodule is shared, so
    ``state_dict()`` keys (and their order) are ``model``'s, checkpoints load both
    ways, and an optimizer built on ``model.parameters()`` trains the result.  Train
    and evaluate the returned module (``train()``/``eval()`` on it); ``model`` itself
    is left unchanged and still computes unfused.  The containers on the way to a
    fused module are copies that refuse to be called on their own (their forward would
    now apply a ReLU twice or miss an add).  Python attributes of ``model`` other than
    modules, parameters and buffers are not carried over (as with any
    ``torch.fx.GraphModule``).

    ``model`` itself comes back (the same object), with a ``UserWarning`` naming
    the reason, when ``torch.fx`` cannot trace it (data-dependent control flow and
    the like) or its traced graph differs between training and eval mode (a Python
    branch on ``self.training`` would be frozen); without a warning when there is
    nothing to fuse.

    The result works under ``torch.compile`` (where the fused modules hand inductor
    PyTorch's own batch norm, add and ReLU to fuse) and with ``torch.autocast``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fuse() takes a torch.nn.Module, got {type(model).__name__}")
    if not any(type(m) in _FUSED for m in model.modules()):
        return model
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing compiled
    if dynamo is not None and isinstance(model, dynamo.OptimizedModule):
        return _untouched(model, "it is a torch.compile()d module; fuse the model first, "
                                 "then compile the result")
    try:
        graph, constants = _trace(model, True)
        graph_eval, _ = _trace(model, False)
    except Exception as error:  # torch.fx's TraceError, or whatever the model raised
        return _untouched(model, f"torch.fx cannot trace it ({type(error).__name__}: "
                                 f"{error})")
    if graph.python_code("self").src != graph_eval.python_code("self").src:
        return _untouched(model, "its torch.fx graph differs between train() and eval() "
                                 "(Python code branching on self.training)")
    chains = _find_chains(graph, model)
    if not chains:
        return model
    modules = dict(model.named_modules())
    replace = {}
    for bn, add, relu, inplace in chains:
        fused_cls = _FUSED[type(modules[bn.target])]
        replace[bn.target] = fused_cls._from_batch_norm(modules[bn.target], inplace)
        args = (bn.args[0],)  # read now: earlier rewrites may have replaced these nodes
        if add is not None:
            args += (add.args[1] if add.args[0] is bn else add.args[0],)
        with graph.inserting_before(relu):
            node = graph.call_module(bn.target, args)
        node.meta = dict(bn.meta)
        relu.replace_all_uses_with(node)
        graph.erase_node(relu)
        if add is not None:
            graph.erase_node(add)
        graph.erase_node(bn)
    graph.lint()
    holder = _mirror(model, replace, "")
    holder.__dict__.update(constants)
    result = torch.fx.GraphModule(holder, graph, class_name=type(model).__name__)
    # The hierarchy, parameters and buffers of model (GraphModule copies only what
    # the graph names); tensors the graph reads that model did not register (tensor
    # constants) stay non-persistent buffers, out of the state_dict.
    extra = {k: v for k, v in result._buffers.items() if k not in model._buffers}
    result._modules = holder._modules
    result._parameters = holder._parameters
    result._buffers = holder._buffers
    result._non_persistent_buffers_set = holder._non_persistent_buffers_set
    for name, tensor in extra.items():
        result.register_buffer(name, tensor, persistent=False)
    for name, value in model.__dict__.items():  # model's own hooks (state_dict's too)
        if "hooks" in name and isinstance(value, dict) and value:
            result.__dict__[name] = type(value)(value)
    if list(result.state_dict()) != list(model.state_dict()):  # a safety net
        return _untouched(model, "its fused GraphModule would have other state_dict keys")
    return result
