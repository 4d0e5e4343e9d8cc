"""Stand-ins for the heavy runtime modules of RL frameworks (ray, vllm) that a CPU test cannot start,
so that the frameworks' OWN reward code (OpenRLHF, veRL) can be imported and driven in-process.

* Any attribute of a stubbed module is a permissive dummy class (callable, subclassable, usable in
  annotations).
* `ray.remote` is a local actor emulation: `@ray.remote` on a class gives an object whose
  `.remote(...)` builds the instance and returns a handle whose methods have `.remote(...)`;
  `actor_class(x)` returns the plain class behind it (tests build instances directly).
Nothing here imitates a reward protocol: requests are made by the frameworks' own clients.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import inspect
import sys
import types


class _Anything:
    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        return _Anything()

    def __getattr__(self, name):
        return _Anything()

    def __class_getitem__(cls, item):
        return cls


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *a, **k):
        return self.fn(*a, **k)

    def options(self, **kw):
        return self


class _Handle:
    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name):
        return _Method(getattr(self._obj, name))


class ActorClass:
    def __init__(self, cls):
        self._cls = cls

    def options(self, **kw):
        return self

    def remote(self, *a, **k):
        return _Handle(self._cls(*a, **k))


def _remote(*args, **kwargs):
    wrap = lambda obj: ActorClass(obj) if inspect.isclass(obj) else obj  # noqa: E731
    if len(args) == 1 and not kwargs and callable(args[0]):
        return wrap(args[0])
    return wrap


def actor_class(x):
    """The plain class behind a stubbed `@ray.remote` class."""
    return x._cls if isinstance(x, ActorClass) else x


_SPECIAL = {"ray": {"remote": _remote, "is_initialized": lambda: True, "get": lambda x, timeout=None: x}}


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        special = _SPECIAL.get(self.__name__, {})
        if name in special:
            return special[name]
        cls = type(name, (_Anything,), {})
        setattr(self, name, cls)
        return cls


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__version__ = "99.0.0"
        return module

    def exec_module(self, module):
        parent, _, child = module.__name__.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


def install(roots=("ray", "vllm")) -> None:
    """Stub `roots` for the rest of the process (refused when one is already imported for real)."""
    for root in roots:
        existing = sys.modules.get(root)
        if existing is not None and not isinstance(existing, _StubModule):
            raise RuntimeError(f"{root} is already imported for real; stubbing it now would mix the two")
    if not any(isinstance(f, _Finder) and set(roots) <= f.roots for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(roots))
