"""A converted model's inference forward as a recorded program: kernels called directly, activations in reused buffers.

A converted model (``tvmlayers.graph``) runs its graph's code: every layer through its module's ``__call__``
(hooks, the plan memo, argument checks) into a newly allocated output.  In inference that work is the same call
after call, and measured it is what separates a converted model from its kernels: on MobileNetV2 (AMD EPYC
znver4, 2 threads, batch 1) the graph's forward took 7.1-7.7 ms, its 53 kernel calls replayed on the same
tensors 5.6-6.2 ms, and replayed on outputs placed in four reused buffers 5.0 ms (the buffers stay in cache;
fresh allocations of ~25 MB of activations do not).  So the first call with grad disabled and a new input
signature (every argument's type, shape, dtype, device and strides) records a :class:`Program` while it runs
the graph, and later calls with that signature run the program:

- a tvmlayers layer whose kernel ran on its input as given (no reshaping view, one output) becomes a *kernel
  step*: the compiled function called with the input, the weight packed for its current version (as every
  call does), the bias and the residual;
- every other node (torch ops, other modules, methods) becomes a *generic step* doing what the graph's code
  does, resolving modules by their path on every call, but for two kinds that become no call at all: a module
  fetched only for kernel steps (the fused residual's conv: the step holds it), and an eval-mode Dropout or an
  Identity, whose output is its input itself (torch code after a kernel is slow: it evicted that code from the
  caches; on MobileNetV2 these took 7-20 us a fetch, 50 us the Dropout);
- a global average pool (``nn.AdaptiveAvgPool2d(1)``, ``F.adaptive_avg_pool2d(x, 1)``, ``x.mean((2, 3))``) of an
  arena buffer becomes a kernel step too: a linear kernel's dot products of each plane with ``1 / (H * W)``;
- a kernel step's output that only kernel steps read, directly or through views (flatten, reshape, view, squeeze,
  unsqueeze), skipped identities and adaptive average pools to its own size (VGG's), goes to an *arena* buffer,
  reused by liveness (a buffer is held until the last reader of any view of it ran); such views are made once, on
  the buffer; every other value is allocated per call, so what the caller gets (or a torch op keeps) is never
  overwritten later.

Before any step runs, a call checks that nothing the program relied on changed, else it runs the graph's code
and records anew: no submodule assigned to a module on the path to a layer it calls or skips (counted by torch's
global module registration hook; a ``del`` is not seen), every kernel step's module with the same weight and bias
objects, every skipped Dropout in eval mode (a pool run as a kernel or skipped with its output size), no
tvmlayers module's attribute set since (``tvmlayers.nn._base.module_changes``) and no ``.data`` assigned to a
weight (``tvmlayers.layouts.data_assignments``).  While forward hooks that a kernel step would bypass are
registered (global ones, the model's, a kernel step's module's), the graph's code runs and the program waits.
A kernel step checks the inputs it takes from generic steps (shape, contiguous, aligned) as the module would,
and calls the module instead where they differ (copying the result into its arena buffer, if it has one).  A
program runs in one thread at a time: a call that finds it running elsewhere runs the graph's code.  Tracing
(dynamo, FX, fake tensors, torch.jit) sees the graph's code.
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch.compiler import is_compiling
from torch.fx.graph_module import GraphModule
from torch.nn.modules import module as _torch_module

from . import functional as F
from . import layer_specs, layouts, nn
from .build import is_cached
from .graph import conv2d_add, has_forward_hooks
from .nn import _base
from .reference import block_channels, unblock_channels
from .schedules.cpu import cpu_config, is_simd_cpu
from .spec import KernelSpec

__all__ = ["Program", "install", "programs"]

# Programs per converted model (by input signature), least recently used first; a few, since each holds buffers
_PROGRAMS_PER_MODEL = 4
_programs: weakref.WeakKeyDictionary[GraphModule, _Programs] = weakref.WeakKeyDictionary()
_programs_lock = threading.Lock()

_WEIGHTED = (nn.Conv2d, nn.Linear)  # with their fused subclasses: a weight, maybe a bias
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_forward_hooks_always_called",
    "_global_forward_hooks_with_kwargs",
)
_tracing_state = torch._C._get_tracing_state  # torch.jit.trace: the graph's code runs, and its layers refuse it

# Submodule assignments (``parent.name = module``, ``add_module``, ``sequential[i] = module``) to a module that some
# program passes through to reach a layer it calls or skips, counted by torch's global registration hook: a call
# compares one number instead of walking every layer's path (which, cold right after a model's kernels, took 150 us
# of MobileNetV2's 300 us of checks).  A submodule deleted (``del``) is not seen: the program runs on.
_ancestors: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
_registrations = 0


def _on_registration(module: torch.nn.Module, name: str, submodule: object) -> None:
    global _registrations
    if module in _ancestors:
        _registrations += 1


_torch_module.register_module_module_registration_hook(_on_registration)


def install(converted: GraphModule) -> GraphModule:
    """Give ``converted`` (a GraphModule of ``tvmlayers.graph``) the recorded-program forward; kept by
    ``copy.deepcopy`` and pickling.  Editing the graph and calling ``recompile()`` removes it (the new code
    runs as written)."""
    cls = type(converted)  # GraphModule gives every instance a class of its own, which recompile() rewrites
    graph_forward = cls.forward

    @functools.wraps(graph_forward)
    def forward(self: GraphModule, *args: Any, **kwargs: Any) -> Any:
        if is_compiling() or kwargs or torch.is_grad_enabled() or _tracing_state():
            return graph_forward(self, *args, **kwargs)
        return _run(self, graph_forward, args)

    forward.records_programs = True  # type: ignore[attr-defined]  # what is_installed looks for
    cls.forward = forward
    cls.__reduce__ = _reduce
    if install not in converted._deepcopy_hooks:
        converted._register_deepcopy_hook(install)  # GraphModule rebuilds copies from the graph
    return converted


def is_installed(model: torch.nn.Module) -> bool:
    """Whether ``model`` has the recorded-program forward (:func:`install`)."""
    return getattr(type(model).forward, "records_programs", False)


def _reduce(self: GraphModule) -> tuple:
    rebuild, arguments = GraphModule.__reduce__(self)
    return _unpickled, (rebuild, arguments)


def _unpickled(rebuild: Callable, arguments: tuple) -> GraphModule:
    return install(rebuild(*arguments))


def programs(model: torch.nn.Module) -> list[Program]:
    """The programs recorded for ``model`` (a converted model), least recently run first."""
    with _programs_lock:
        recorded = _programs.get(model)
    return [] if recorded is None else [p for p in recorded.by_signature.values() if p is not None]


class _Programs:
    """The programs of one model by input signature, and the lock that lets one thread run them at a time."""

    def __init__(self) -> None:
        self.by_signature: OrderedDict[tuple, Program | None] = OrderedDict()  # None: a graph it does not take
        self.lock = threading.Lock()


def _signature(args: tuple) -> tuple | None:
    """What a program depends on in the arguments, None when they are not all plain tensors (tracers' proxies,
    fake tensors, subclasses, non-tensors) or one requires grad."""
    facts = []
    for arg in args:
        if type(arg) is not torch.Tensor or arg.requires_grad:
            return None
        facts.append((arg.shape, arg.dtype, arg.device, arg.stride(), arg.data_ptr() % F._ALIGNMENT == 0))
    return tuple(facts)


def _run(model: GraphModule, graph_forward: Callable, args: tuple) -> Any:
    signature = _signature(args)
    if signature is None:
        return graph_forward(model, *args)
    with _programs_lock:
        recorded = _programs.get(model)
        if recorded is None:
            recorded = _programs[model] = _Programs()
    if not recorded.lock.acquire(blocking=False):  # another thread runs it (or this one, re-entering)
        return graph_forward(model, *args)
    try:
        by_signature = recorded.by_signature
        if signature in by_signature:
            program = by_signature[signature]
            if program is None:  # a graph the program does not take
                return graph_forward(model, *args)
            obstacle = program.obstacle(model)
            if obstacle is None:
                by_signature.move_to_end(signature)
                return program.run(model, args)
            if obstacle == "hooks":
                return graph_forward(model, *args)
        program, result = Program.record(model, args)
        by_signature[signature] = program
        by_signature.move_to_end(signature)
        if len(by_signature) > _PROGRAMS_PER_MODEL:
            by_signature.popitem(last=False)
        return result
    finally:
        recorded.lock.release()


class _Recorder(torch.fx.Interpreter):
    """Runs the graph as its code would, keeping every node's value and the plan each tvmlayers layer used."""

    def __init__(self, model: GraphModule) -> None:
        super().__init__(model, garbage_collect_values=False)
        self.plans: dict[torch.fx.Node, F.Plan] = {}

    def run_node(self, node: torch.fx.Node) -> Any:
        module = _kernel_module(self.module, node)
        if module is None:
            return super().run_node(node)
        module.__dict__["_memo"] = None  # the call remembers the plan it used (none where it ran no kernel)
        value = super().run_node(node)
        memo = module.__dict__["_memo"]
        if memo is not None:
            self.plans[node] = memo[4]
        return value


def _kernel_module(root: torch.nn.Module, node: torch.fx.Node) -> torch.nn.Module | None:
    """The tvmlayers layer ``node`` calls (as a module, or as the fused residual's conv), else None."""
    if node.op == "call_module":
        module = root.get_submodule(node.target)
    elif node.op == "call_function" and node.target is conv2d_add and node.args[0].op == "get_attr":
        module = root.get_submodule(node.args[0].target)
    else:
        return None
    return module if type(module) in _KERNEL_TYPES else None


_KERNEL_TYPES = {
    nn.Conv2d, nn.ConvReLU2d, nn.Conv2dReLU6, nn.ConvAdd2d, nn.ConvAddReLU2d,
    nn.Linear, nn.LinearReLU, nn.LinearReLU6, nn.MaxPool2d, nn.ReLU,
}  # fmt: skip


def _path(node: torch.fx.Node) -> str:
    return node.target if node.op == "call_module" else node.args[0].target


def _resolve(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at ``path`` as the graph's code reaches it (through ``_modules``, without ``getattr``)."""
    module = root
    for part in path.split(".") if path else ():
        module = module._modules[part]
    return module


def _kernel_ready(tensor: object, shape: tuple) -> bool:
    """Whether a kernel takes ``tensor`` as it is: a plain contiguous tensor of ``shape`` on the alignment."""
    return (
        type(tensor) is torch.Tensor
        and tensor.shape == shape
        and tensor.is_contiguous()
        and tensor.data_ptr() % F._ALIGNMENT == 0
    )


class Program:
    """One input signature's forward of a converted model: its steps, arena buffers and what they relied on.

    Steps are functions of the environment, a list with a slot per graph node and the model in the last one
    (a program holds no reference to its model, which owns it)."""

    def __init__(self) -> None:
        self.steps: list[Callable[[list], None]] = []
        # (path, module) of every kernel step's layer, in call order, and the spec of the kernel it calls
        self.kernel_modules: list[tuple[str, torch.nn.Module]] = []
        self.kernel_specs: list[KernelSpec] = []
        # (path, module, state) of every torch module the program does not call: eval-mode identities
        # (``_IDENTITIES``), average pools run as kernels or skipped; checked before each run to be in that state
        # (the mode, the output size)
        self.skipped_modules: list[tuple[str, torch.nn.Module, tuple]] = []
        self.arena: list[torch.Tensor] = []
        self.built: list = []  # the kernels recording built in parallel (tvmlayers.aot.BuildRecord)
        self.kernel_calls = 0  # steps calling a kernel: the layers' and the global average pools'
        self.blocked_layers: list[str] = []  # paths of the kernel steps writing channel-blocked (NCHW[x]c) buffers
        self.changes = (_base.module_changes, layouts.data_assignments, _registrations)
        # what each run checks, held directly (a module's attribute lookups cost as much again, cold): the
        # ``_parameters`` dict, weight and bias of every weighted kernel step's module, and the forward hook dicts
        # of every module whose call the program replaces
        self.parameters: list[tuple[dict, object, object]] = []
        self.hook_dicts: list[dict] = []
        self.output: Callable[[list], Any] = lambda env: None
        self.placeholders: list[int] = []
        self.size = 0

    def summary(self) -> str:
        """What the program runs, in a line."""
        megabytes = sum(b.numel() * b.element_size() for b in self.arena) / 1e6
        return (
            f"{self.kernel_calls} of {len(self.steps)} steps call kernels directly, "
            f"{len(self.arena)} arena buffer{'' if len(self.arena) == 1 else 's'} ({megabytes:.1f} MB), "
            f"{len(self.blocked_layers)} channel-blocked"
        )

    # -------------------------------------------------------------------------------------------- running

    def obstacle(self, model: GraphModule) -> str | None:
        """Why the program cannot run now: "hooks" (forward hooks it would bypass: the graph's code runs, and the
        program waits for them to go), "changed" (something it relied on changed: record anew), else None."""
        if (_base.module_changes, layouts.data_assignments, _registrations) != self.changes:
            return "changed"
        for parameters, weight, bias in self.parameters:
            if parameters.get("weight") is not weight or parameters.get("bias") is not bias:
                return "changed"
        for _, module, state in self.skipped_modules:
            if _module_state(module) != state:
                return "changed"
        if any(getattr(_torch_module, name) for name in _GLOBAL_HOOKS) or has_forward_hooks(model):
            return "hooks"
        return "hooks" if any(self.hook_dicts) else None

    def run(self, model: GraphModule, args: tuple) -> Any:
        env: list[Any] = [None] * self.size
        env[-1] = model
        for i, arg in zip(self.placeholders, args, strict=True):
            env[i] = arg
        for step in self.steps:
            step(env)
        return self.output(env)

    # ------------------------------------------------------------------------------------------ recording

    @classmethod
    def record(cls, model: GraphModule, args: tuple) -> tuple[Program | None, Any]:
        """Run ``model``'s graph on ``args`` as its code does and record it; returns the program (None for a
        graph it does not take) and the result."""
        recorder = _Recorder(model)
        result = recorder.run(*args)
        program = cls()
        try:
            program._build(model, recorder, len(args))
        except _NotRecordable:
            return None, result
        return program, result

    def _build(self, model: GraphModule, recorder: _Recorder, arguments: int) -> None:
        nodes = list(model.graph.nodes)
        index = {node: i for i, node in enumerate(nodes)}
        self.size = len(nodes) + 1  # the model in the last slot
        values = recorder.env
        kernels = {node: plan for node, plan in recorder.plans.items() if _kernel_plan(model, node, plan, values)}
        pools = {node for node in nodes if _global_pool(model, node, values, kernels)}
        # nodes whose value is their input's memory (eval-mode identities, views: flatten, reshape, ...) or its
        # values (an adaptive average pool to the input's own size: every bin one element)
        identities = {node for node in nodes if _identity(model, node)}
        same_size_pools = {node for node in nodes if node not in pools and _same_size_pool(model, node, values)}
        passes = identities | same_size_pools | {node for node in nodes if _is_view(node, values)}

        # an output read only by kernel steps (directly, or through views of it) may live in the arena (the output
        # node's arguments never do); a global average pool runs as a kernel where its input does
        def read_by_kernels_only(node: torch.fx.Node) -> bool:
            return bool(node.users) and all(
                user in kernels or user in pools or (user in passes and read_by_kernels_only(user))
                for user in node.users
            )

        in_arena = {node for node in kernels if read_by_kernels_only(node)}
        # the kernels of the pools that run as kernels: those of arena buffers (built now, not for the others)
        pools = {node: _pool_plan(node, values, kernels) for node in pools if node.args[0] in in_arena}
        in_arena |= {node for node in pools if read_by_kernels_only(node)}
        blocks = _channel_blocks(model, kernels, in_arena)
        # (input block, output block) of each conv or max-pool reading or writing a blocked buffer
        blocked = {
            node: (blocks.get(_data_args(node)[0]), blocks.get(node))
            for node in kernels
            if node in blocks or _data_args(node)[0] in blocks
        }
        try:
            self.built = _build_many(
                [layer_specs.blocked_spec(kernels[node].kernel.spec, *pair) for node, pair in blocked.items()]
            )
            blocked_plans = {node: F.blocked_plan(kernels[node], *pair) for node, pair in blocked.items()}
        except (TypeError, ValueError, RuntimeError) as err:  # a blocked kernel that does not build: NCHW throughout
            warnings.warn(f"tvmlayers: activations stay NCHW in this model's program: {err}", stacklevel=2)
            blocks, blocked_plans = {}, {}
        kernels |= blocked_plans
        self.blocked_layers = [_path(node) for node in blocks]
        # a module fetched only for kernel steps (the fused residual's conv) is fetched by none: they hold it
        unfetched = {node for node in nodes if node.op == "get_attr" and read_by_kernels_only(node)}
        # an arena buffer is free once every reader of its node and of the views of it ran
        root: dict[torch.fx.Node, torch.fx.Node] = {}
        for node in nodes:
            if node in in_arena:
                root[node] = node
            elif node in passes and node.args[0] in root:
                root[node] = root[node.args[0]]
        last_reader = {}
        for node in nodes:
            for used in node.all_input_nodes:
                last_reader[root.get(used, used)] = node
        free: list[torch.Tensor] = []
        buffers: dict[torch.fx.Node, torch.Tensor] = {}  # arena node -> its base buffer
        views: dict[torch.fx.Node, torch.Tensor] = {}  # arena-backed node -> its value, fixed for the program
        placeholders = 0
        for node in nodes:
            if node.op == "placeholder":
                if node.args:  # a default value: the program only takes calls giving every argument
                    raise _NotRecordable
                self.placeholders.append(index[node])
                placeholders += 1
            elif node.op == "output":
                self.output = _loader(node.args[0], index)
            elif node in kernels or node in pools:
                out = None
                if node in in_arena:
                    template = kernels[node].out_templates[0] if node in kernels else values[node]
                    buffers[node], views[node] = self._arena_buffer(template, free)
                    out = views[node]
                if node in kernels:
                    step = self._kernel_step(model, node, kernels[node], out, index, set(views), unfetched, blocks)
                else:
                    step = self._pool_step(model, node, pools[node], views[node.args[0]], out, values[node], index)
                self.steps.append(step)
                self.kernel_calls += 1
            elif node in unfetched:
                pass
            elif node in passes and (node in identities or node.args[0] in views):
                if node.op == "call_module":
                    self._skip(model, node.target)
                if node.args[0] not in views:  # an identity of a value of the call's own
                    self.steps.append(_alias_step(index[node], index[node.args[0]]))
                else:
                    source = views[node.args[0]]
                    views[node] = source if node in identities or node in same_size_pools else _view_of(node, source)
                    self.steps.append(_constant_step(index[node], views[node]))
            else:
                self.steps.append(_generic_step(node, index))
            # a buffer whose last reader ran is free for the nodes after it (never for this node's own output:
            # it was taken above, while its inputs were still held)
            for done in {root[used] for used in node.all_input_nodes if used in root}:
                if last_reader[done] is node:
                    free.append(buffers[done])
        if placeholders != arguments:
            raise _NotRecordable

    def _rely_on(self, model: GraphModule, path: str, module: torch.nn.Module) -> None:
        """Watch what the program assumes of the module at ``path``: that it stays there (its ancestors' submodule
        assignments are counted) and has no forward hooks."""
        parent = model
        for part in path.split("."):
            _ancestors.add(parent)
            parent = parent._modules[part]
        self.hook_dicts += [module._forward_hooks, module._forward_pre_hooks]

    def _skip(self, model: GraphModule, path: str) -> None:
        """Note that the program does not call the torch module at ``path`` (an identity, a pool it replaces)."""
        module = model.get_submodule(path)
        self.skipped_modules.append((path, module, _module_state(module)))
        self._rely_on(model, path, module)

    def _arena_buffer(self, template: torch.Tensor, free: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, view): the smallest free arena buffer large enough, or a new one, and its view in ``template``'s
        shape."""
        need = template.numel()
        fitting = [b for b in free if b.dtype == template.dtype and b.device == template.device and b.numel() >= need]
        if fitting:
            base = min(fitting, key=torch.Tensor.numel)
            del free[next(k for k, b in enumerate(free) if b is base)]  # by identity: tensors compare elementwise
        else:
            with torch.inference_mode(False):  # a plain tensor, in whichever mode the recording ran
                base = torch.empty(need, dtype=template.dtype, device=template.device)
            self.arena.append(base)
        return base, base[:need].view(template.shape)

    def _pool_step(
        self,
        model: GraphModule,
        node: torch.fx.Node,
        plan: F.Plan,
        source: torch.Tensor,
        out: torch.Tensor | None,
        recorded: torch.Tensor,
        index: dict,
    ) -> Callable[[list], None]:
        """The step of a global average pool (``_pool_plan``) on ``source`` (an arena buffer's view), into ``out`` (an
        arena view) or a new tensor where it is None."""
        if node.op == "call_module":
            self._skip(model, node.target)
        n, c, h, w = source.shape
        planes = source.view(n * c, h * w)
        weights = layouts.block_out_channels(
            torch.full((1, h * w), 1.0 / (h * w), dtype=source.dtype), plan.kernel.weight_block
        )
        function, i = plan.kernel.function, index[node]
        if out is not None:
            means = out.view(n * c, 1)

            def step(env: list) -> None:
                function(planes, weights, means)
                env[i] = out

        else:

            def step(env: list) -> None:
                result = torch.empty_like(recorded)
                function(planes, weights, result.view(n * c, 1))
                env[i] = result

        return step

    def _kernel_step(
        self,
        model: GraphModule,
        node: torch.fx.Node,
        plan: F.Plan,
        out: torch.Tensor | None,
        index: dict,
        arena_nodes: set,
        unfetched: set,
        blocks: dict,
    ) -> Callable[[list], None]:
        """The step calling ``node``'s kernel; into ``out`` (an arena view), or a new tensor where it is None.
        ``unfetched``: get_attr nodes without a step of their own, which calling the module instead fetches;
        ``blocks``: the channel block of each channel-blocked arena node (``_channel_blocks``)."""
        module = _kernel_module(model, node)
        weighted = isinstance(module, _WEIGHTED)
        weight = module._parameters.get("weight") if weighted else None
        bias = module._parameters.get("bias") if weighted else None
        self.kernel_modules.append((_path(node), module))
        self.kernel_specs.append(plan.kernel.spec)
        self._rely_on(model, _path(node), module)
        if weighted:
            self.parameters.append((module._parameters, weight, bias))
        data = _data_args(node)
        sources = [index[arg] for arg in data]
        input_shapes = (tuple(plan.kernel.spec.input_shape), tuple(plan.out_templates[0].shape))
        # inputs that are not arena buffers (from generic steps or the caller) are checked on every call, as the
        # module would: the kernel reads raw memory
        checked = [
            (source, input_shapes[min(k, 1)])
            for k, (source, arg) in enumerate(zip(sources, data, strict=True))
            if arg not in arena_nodes
        ]
        function, template, i, block = (
            plan.kernel.function,
            plan.out_templates[0],
            index[node],
            plan.kernel.weight_block,
        )
        extra = () if bias is None else (bias,)
        as_written = [_generic_step(arg, index) for arg in node.args if arg in unfetched] + [_generic_step(node, index)]
        blocked_sources = [index[arg] for arg in data if arg in blocks]
        out_block = blocks.get(node)

        def step(env: list) -> None:
            for source, shape in checked:
                if not _kernel_ready(env[source], shape):
                    # the module, as the graph's code calls it, on torch's layout of channel-blocked inputs
                    held = [(s, env[s]) for s in blocked_sources]
                    for s, value in held:
                        env[s] = unblock_channels(value)
                    for fallback in as_written:
                        fallback(env)
                    for s, value in held:
                        env[s] = value
                    if out is not None:  # later steps may read the arena buffer through fixed views of it
                        env[i] = out.copy_(block_channels(env[i], out_block))
                    return
            result = torch.empty_like(template) if out is None else out
            if weighted:
                residual = [env[source] for source in sources[1:]]
                function(env[sources[0]], layouts.packed_weight(weight, block), *extra, *residual, result)
            else:
                function(env[sources[0]], result)
            env[i] = result

        return step


class _NotRecordable(Exception):
    """A graph the program does not take (placeholders with defaults, varargs): its code runs every call."""


def _data_args(node: torch.fx.Node) -> tuple:
    """The tensors a layer's node passes: (input,) or, for the fused residual, (input, residual)."""
    return tuple(node.args[1:] if node.op == "call_function" else node.args)


def _kernel_plan(model: GraphModule, node: torch.fx.Node, plan: F.Plan, values: dict) -> bool:
    """Whether ``node``'s recorded call can be a kernel step: its kernel ran on the input as given (no view between
    the caller's shapes and the kernel's), with one output, and the residual and bias as given."""
    if plan.kernel is None or plan.in_view is not None or plan.out_view is not None or len(plan.out_templates) != 1:
        return False
    module = _kernel_module(model, node)
    if isinstance(module, nn.ReLU) and module.inplace:
        return False
    data = _data_args(node)
    if node.kwargs or len(data) != (2 if isinstance(module, nn.ConvAdd2d) else 1):
        return False
    if not all(isinstance(arg, torch.fx.Node) for arg in data):
        return False
    input_shape, out_shape = tuple(plan.kernel.spec.input_shape), tuple(plan.out_templates[0].shape)
    if not _kernel_ready(values.get(data[0]), input_shape) or not _kernel_ready(values.get(node), out_shape):
        return False
    if len(data) == 2 and not _kernel_ready(values.get(data[1]), out_shape):
        return False
    if isinstance(module, _WEIGHTED):
        bias = module._parameters.get("bias")  # a Parameter, which _kernel_ready's exact type test refuses
        return bias is None or (bias.is_contiguous() and bias.data_ptr() % F._ALIGNMENT == 0)
    return True


# Modules that return their input itself in eval mode, skipped there; exact types (a subclass may override forward)
_IDENTITIES = (torch.nn.Identity, torch.nn.Dropout, torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)
# Ops whose value is a view of their first argument's memory, in its shape: replayed once on an arena buffer
_VIEW_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
_VIEW_METHODS = ("flatten", "view", "reshape", "squeeze", "unsqueeze")


def _module_state(module: torch.nn.Module) -> tuple:
    """What a module the program skips did depends on: its mode and, for a pool, its output size."""
    return module.training, getattr(module, "output_size", None)


def _identity(model: GraphModule, node: torch.fx.Node) -> bool:
    """Whether ``node`` calls a module of ``_IDENTITIES`` in eval mode on one node, which it returns as it is.
    Skipping one saves more than its call: the first torch code after a kernel that evicted it from the caches
    runs slowly (a Dropout's call took 50 us after MobileNetV2's last conv)."""
    if node.op != "call_module" or node.kwargs or len(node.args) != 1 or not isinstance(node.args[0], torch.fx.Node):
        return False
    module = model.get_submodule(node.target)
    return type(module) in _IDENTITIES and (type(module) is torch.nn.Identity or not module.training)


def _pool_size(model: GraphModule, node: torch.fx.Node) -> object:
    """The output size ``node`` pools its one node's value to, if it is an adaptive average pool; else None."""
    if node.op == "call_module" and not node.kwargs and len(node.args) == 1:
        module = model.get_submodule(node.target)
        return module.output_size if type(module) is torch.nn.AdaptiveAvgPool2d else None
    if node.op == "call_function" and node.target is torch.nn.functional.adaptive_avg_pool2d:
        size = dict(node.kwargs).get("output_size", node.args[1] if len(node.args) == 2 else None)
        return None if isinstance(size, torch.fx.Node) or set(node.kwargs) - {"output_size"} else size
    return None


def _same_size_pool(model: GraphModule, node: torch.fx.Node, values: dict) -> bool:
    """Whether ``node`` average-pooled its input to the input's own size (VGG's 7x7 pool of 224x224 images'
    7x7 features): each output is the one element of its bin, exactly the input's value."""
    if not node.args or not isinstance(node.args[0], torch.fx.Node) or _pool_size(model, node) is None:
        return False
    value, source = values.get(node), values.get(node.args[0])
    return (
        type(value) is torch.Tensor
        and type(source) is torch.Tensor
        and source.dim() == 4
        and value.shape == source.shape
        and value.dtype == source.dtype
    )


def _is_view(node: torch.fx.Node, values: dict) -> bool:
    """Whether ``node`` (a flatten, reshape, ... of one node) gave a contiguous view of its input's memory."""
    if not (
        (node.op == "call_function" and node.target in _VIEW_FUNCTIONS)
        or (node.op == "call_method" and node.target in _VIEW_METHODS)
    ):
        return False
    if not node.args or not isinstance(node.args[0], torch.fx.Node) or node.all_input_nodes != [node.args[0]]:
        return False
    value, source = values.get(node), values.get(node.args[0])
    return (
        type(value) is torch.Tensor
        and type(source) is torch.Tensor
        and value.is_contiguous()
        and source.is_contiguous()
        and value.data_ptr() == source.data_ptr()
        and value.numel() == source.numel()
    )


def _view_of(node: torch.fx.Node, source: torch.Tensor) -> torch.Tensor:
    """``node``'s op replayed on ``source`` (an arena buffer's view): the view every run gives."""
    args, kwargs = node.args[1:], node.kwargs
    if node.op == "call_function":
        view = node.target(source, *args, **kwargs)
    else:
        view = getattr(source, node.target)(*args, **kwargs)
    if view.data_ptr() != source.data_ptr() or not view.is_contiguous():
        raise _NotRecordable
    return view


def _global(output_size: object) -> bool:
    return output_size == 1 or (isinstance(output_size, (tuple, list)) and tuple(output_size) == (1, 1))


def _global_pool(model: GraphModule, node: torch.fx.Node, values: dict, kernels: dict) -> bool:
    """Whether ``node`` is a global average pool of a kernel step's output (a ``nn.AdaptiveAvgPool2d(1)``,
    ``F.adaptive_avg_pool2d(x, 1)`` or ``x.mean((2, 3))``) of a 4-D floating-point CPU tensor, which a linear
    kernel can compute (``_pool_plan``)."""
    if node.op not in ("call_module", "call_function", "call_method") or not node.args:
        return False
    if not isinstance(node.args[0], torch.fx.Node) or node.args[0] not in kernels:
        return False
    if node.all_input_nodes != [node.args[0]]:
        return False
    if node.op == "call_method" and node.target == "mean":
        args, kwargs = node.args[1:], dict(node.kwargs)
        dims = kwargs.pop("dim", args[0] if args else None)
        keepdim = kwargs.pop("keepdim", args[1] if len(args) > 1 else False)
        if not isinstance(dims, (tuple, list)) or any(type(d) is not int for d in dims) or type(keepdim) is not bool:
            return False
        if sorted(d % 4 for d in dims) != [2, 3] or kwargs or len(args) > 2:
            return False
    elif not _global(_pool_size(model, node)):
        return False
    source, value = values.get(node.args[0]), values.get(node)
    if type(source) is not torch.Tensor or type(value) is not torch.Tensor or source.dim() != 4:
        return False
    n, c = source.shape[:2]
    return value.numel() == n * c and source.device.type == "cpu" and source.is_floating_point()


def _pool_plan(node: torch.fx.Node, values: dict, kernels: dict) -> F.Plan:
    """The plan of the linear kernel computing ``node``, a ``_global_pool``, on the target of the kernel before it.

    The mean of each plane is a dot product with a vector of ``1 / (H * W)``: the (N * C, H * W) view of the
    input times its (1, H * W) transpose.  A torch op there is slow, the kernel is not: right after the large
    conv before it, torch's pool took 130-200 us against 7 us in a loop of its own (its code had been evicted
    from the caches), the kernel step a few.  Where no such kernel is there to run, the graph's code runs.
    """
    source = values[node.args[0]]
    n, c, h, w = source.shape
    planes, weights = torch.empty(n * c, h * w, dtype=source.dtype), torch.empty(1, h * w, dtype=source.dtype)
    try:
        plan = F.linear_plan(planes, weights, None, kernels[node.args[0]].kernel.spec.target)
    except (TypeError, ValueError, RuntimeError) as err:
        raise _NotRecordable from err
    if plan.kernel is None or plan.in_view is not None or plan.out_view is not None:
        raise _NotRecordable
    return plan


def _channel_blocks(model: GraphModule, kernels: dict, in_arena: set) -> dict[torch.fx.Node, int]:
    """The arena buffers kept channel-blocked (NCHW[x]c, ``tvmlayers.ops``), each with its block: outputs of convs
    and max-pools on a SIMD CPU whose channels fill whole registers, read only by convs and such max-pools.  A
    residual has its conv's output layout, and a depthwise conv and a max-pool their input's, so a buffer that
    cannot be blocked unblocks those tied to it, until none is left to unblock.

    The layout the activations take between layers decides what a conv's inner loops read and write: blocked,
    the 1x1 convs stream contiguous channel blocks and store them as they are, no transpose to NCHW, and a
    depthwise conv vectorizes over channels (strided ones with no gathers).  Measured on znver4 (2 threads,
    MobileNetV2's convs alone, NCHW kernels / blocked ones, interleaved): depthwise 1.4-2.0x (strided 1.5-1.8x,
    but 1.0x at 112x112) before the blocked rule read its input in place, which doubled that again; 1x1 convs of
    channels in 16s 1.0-1.4x, ResNet's 3x3 convs 1.0-1.06x.  Blocks of half a register where a whole one does
    not divide the channels (MobileNetV2's 24): 0.86-1.05x per kernel and 1.005x for the model, so those stay NCHW.
    Max-pools pass blocks on, so the first convs before them write blocked (a 3-channel conv's NCHW write-back is
    most of its time: VGG's 3->64 3x3 3.3x and ResNet's 7x7 1.2x faster blocked out) and the convs after them
    read blocked; the blocked pool itself ran 1.1-3.3x faster than the NCHW one.
    """
    candidates: dict[torch.fx.Node, int] = {}
    for node, plan in kernels.items():
        spec = plan.kernel.spec
        module = _kernel_module(model, node)
        if node not in in_arena or not _blockable(module) or not is_simd_cpu(spec.target):
            continue
        lanes = cpu_config(spec.target).vector_lanes(spec.dtype)
        channels = spec["weight_shape"][0] if spec.op == "conv2d" else spec.input_shape[1]
        if lanes > 1 and channels % lanes == 0:
            candidates[node] = lanes

    def tied_to_input(node: torch.fx.Node) -> bool:
        """A max-pool and a depthwise conv give their input's layout; other grouped convs stay NCHW."""
        spec = kernels[node].kernel.spec
        return spec.op == "max_pool2d" or spec["groups"] > 1

    def keeps(node: torch.fx.Node) -> bool:
        """Whether ``node``'s buffer can stay blocked while the other candidates' do."""
        data = _data_args(node)
        spec = kernels[node].kernel.spec
        depthwise = spec.op == "conv2d" and spec["groups"] == spec.input_shape[1] == spec["weight_shape"][0]
        if spec.op == "conv2d" and spec["groups"] > 1 and not depthwise:
            return False  # grouped convs: only depthwise ones, blocked on both sides alike
        if tied_to_input(node) and candidates.get(data[0]) != candidates[node]:
            return False
        if len(data) == 2 and candidates.get(data[1]) != candidates[node]:
            return False
        for user in node.users:
            if user not in kernels or not _blockable(_kernel_module(model, user)):
                return False
            user_data = _data_args(user)
            tied = tied_to_input(user) or (len(user_data) == 2 and user_data[1] is node)
            if tied and candidates.get(user) != candidates[node]:
                return False
        return True

    while True:
        unblocked = [node for node in candidates if not keeps(node)]
        if not unblocked:
            return candidates
        for node in unblocked:
            del candidates[node]


def _blockable(module: torch.nn.Module | None) -> bool:
    """Whether a kernel step of ``module`` takes channel-blocked activations: a conv, or a max-pool without
    indices (torch's are positions in NCHW planes)."""
    return isinstance(module, nn.Conv2d) or (isinstance(module, nn.MaxPool2d) and not module.return_indices)


# From how many missing kernels recording builds them in worker processes (``tvmlayers.aot``), not here one by one:
# a worker takes seconds to start (importing torch and TVM), a small kernel about one to compile.
PARALLEL_BUILD_MIN = 8


def _build_many(specs: list) -> list:
    """Build the kernels of ``specs`` missing from the cache in parallel, where there are many (MobileNetV2's
    program: 49 channel-blocked convs); returns what was built (empty where ``kernel_for`` will build the few)."""
    missing = [spec for spec in dict.fromkeys(specs) if not is_cached(spec)]
    if len(missing) < PARALLEL_BUILD_MIN:
        return []
    from .aot import build_kernels  # noqa: PLC0415 - it loads the fake-tensor machinery, which few calls need

    return build_kernels(missing)[1]


def _alias_step(i: int, source: int) -> Callable[[list], None]:
    def step(env: list) -> None:
        env[i] = env[source]

    return step


def _constant_step(i: int, value: torch.Tensor) -> Callable[[list], None]:
    def step(env: list) -> None:
        env[i] = value

    return step


def _loader(argument: object, index: dict) -> Callable[[list], Any]:
    """A function of the environment giving ``argument`` with its nodes replaced by their values."""
    if isinstance(argument, torch.fx.Node):
        i = index[argument]
        return lambda env: env[i]
    nodes: list = []
    torch.fx.node.map_arg(argument, nodes.append)
    if not nodes:
        return lambda env: argument
    if isinstance(argument, tuple) and all(isinstance(a, torch.fx.Node) for a in argument):
        slots = [index[a] for a in argument]
        return lambda env: tuple([env[s] for s in slots])
    return lambda env: torch.fx.node.map_arg(argument, lambda node: env[index[node]])


def _generic_step(node: torch.fx.Node, index: dict) -> Callable[[list], None]:
    """What the graph's code does for ``node``, its value written to the environment."""
    i, target = index[node], node.target
    load_args, load_kwargs = _loader(tuple(node.args), index), _loader(dict(node.kwargs), index)
    if node.op == "call_function":

        def step(env: list) -> None:
            env[i] = target(*load_args(env), **load_kwargs(env))

    elif node.op == "call_method":

        def step(env: list) -> None:
            owner, *rest = load_args(env)
            env[i] = getattr(owner, target)(*rest, **load_kwargs(env))

    elif node.op == "call_module":

        def step(env: list) -> None:
            env[i] = _resolve(env[-1], target)(*load_args(env), **load_kwargs(env))

    elif node.op == "get_attr":
        owner_path, _, name = target.rpartition(".")

        def step(env: list) -> None:
            env[i] = getattr(_resolve(env[-1], owner_path), name)

    else:
        raise _NotRecordable
    return step
